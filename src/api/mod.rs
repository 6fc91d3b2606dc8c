//! The HTTP API (axum): route discovery, push, channels, version, health, metrics, admin,
//! the demo page and its development tokens, and the OpenAPI document describing them all.
//!
//! Owns request parsing, the JSON error shape `{"error":{"code","message"}}` and status
//! codes. It does not deliver anything itself; it calls the hub. docs/http-api.md is the
//! human version of this module.
//!
//! Every route is registered through [`OpenApiRouter`] with its handler's `#[utoipa::path]`
//! annotation, so a route cannot be served without being in `/api/openapi.json`; clippy.toml
//! forbids axum's own `Router::route` and friends, which would bypass it.

mod admin;
mod channels;
mod demo;
mod error;
mod metrics;
mod push;
mod route;
pub mod serve;
mod version;

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorBody};

use crate::hub::Hub;

/// A user id as the API takes it: 1-128 bytes of UTF-8 without control characters
/// (`protocol::valid_uid` checks it; JSON Schema counts characters, so its `maxLength`
/// is the byte limit of ASCII ids).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(transparent)]
pub(crate) struct UserId(pub(crate) String);

impl utoipa::PartialSchema for UserId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(crate::protocol::MAX_UID_LEN))
            .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]+$"))
            .description(Some("A user id: 1-128 bytes of UTF-8 without control characters"))
            .examples(["alice"])
            .into()
    }
}

impl utoipa::ToSchema for UserId {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "switchboard HTTP API",
        description = "Route discovery (WuKongIM-compatible), signed push and channel publish for app servers, \
                       health, metrics and operator endpoints of a switchboard node. Errors are always \
                       `{\"error\":{\"code\",\"message\"}}` with a stable `code`; docs/http-api.md explains \
                       signing and every code.",
        license(name = "Apache-2.0"),
    ),
    tags(
        (name = "route", description = "Which node a client should connect to"),
        (name = "push", description = "App servers sending to users and channels (HMAC-signed)"),
        (name = "node", description = "Version, health and metrics"),
        (name = "admin", description = "Operator endpoints (bearer token; on the admin listener when it is on)"),
        (name = "demo", description = "The demo page and development tokens (development machines only)"),
    ),
    components(schemas(ErrorBody)),
    modifiers(&AdminToken),
)]
struct ApiDoc;

/// The admin endpoints' bearer token (`[admin] token`).
struct AdminToken;

impl utoipa::Modify for AdminToken {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("admin_token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// What clients, app servers and load balancers use.
fn public_routes() -> OpenApiRouter<Arc<Hub>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(route::route))
        .routes(routes!(route::batch))
        .routes(routes!(push::push))
        .routes(routes!(push::push_im))
        .routes(routes!(channels::publish))
        .routes(routes!(version::version))
        .routes(routes!(version::healthz))
        .routes(routes!(openapi_json))
        .routes(routes!(demo::page))
        .routes(routes!(demo::asset))
        .routes(routes!(demo::config))
        .routes(routes!(demo::token))
}

/// What operators use: served by the admin listener when it is on, else with the rest.
fn operator_routes() -> OpenApiRouter<Arc<Hub>> {
    OpenApiRouter::new()
        .routes(routes!(metrics::metrics))
        .routes(routes!(admin::plugins))
        .routes(routes!(admin::reload))
        .routes(routes!(admin::drain))
}

/// The OpenAPI 3.1 document: of every route, or (`operator = false`) of the public ones
/// only, as the HTTP listener serves them when the admin listener has the rest.
pub fn openapi(operator: bool) -> &'static utoipa::openapi::OpenApi {
    static ALL: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    static PUBLIC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    if operator {
        ALL.get_or_init(|| public_routes().merge(operator_routes()).split_for_parts().1)
    } else {
        PUBLIC.get_or_init(|| public_routes().split_for_parts().1)
    }
}

/// This document: what this listener serves.
#[utoipa::path(get, path = "/api/openapi.json", tag = "node",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json")))]
async fn openapi_json(State(hub): State<Arc<Hub>>) -> axum::Json<&'static utoipa::openapi::OpenApi> {
    axum::Json(openapi(!hub.config().listeners.admin.enabled))
}

/// The router of the HTTP and HTTPS listeners.
pub fn router(hub: Arc<Hub>) -> Router {
    let mut routes = public_routes();
    if !hub.config().listeners.admin.enabled {
        routes = routes.merge(operator_routes());
    }
    let cors = cors(&hub.config().cors.allowed_origins);
    let router = finish(routes, hub);
    match cors {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// Lets pages from `origins` call the API from a browser (`None`: same origin only).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Validated with the config: every entry is a header-safe origin.
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::CONTENT_TYPE])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// The router of the admin listener (`[listeners.admin]`).
pub fn admin_router(hub: Arc<Hub>) -> Router {
    finish(operator_routes(), hub)
}

fn finish(routes: OpenApiRouter<Arc<Hub>>, hub: Arc<Hub>) -> Router {
    let body_limit = hub.config().limits.max_http_body_bytes;
    let request_timeout = hub.config().limits.http_request_timeout;
    let (router, _) = routes.split_for_parts();
    router
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(move |req, next| serve::request_deadline(request_timeout, req, next)))
        .with_state(hub)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_has_every_operation() {
        let doc = serde_json::to_value(super::openapi(true)).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let mut ops: Vec<String> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                ops.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        ops.sort();
        assert_eq!(
            ops,
            [
                "GET /admin/plugins",
                "GET /api/openapi.json",
                "GET /api/version",
                "GET /demo",
                "GET /demo/config.json",
                "GET /demo/{file}",
                "GET /healthz",
                "GET /metrics",
                "GET /route",
                "POST /admin/drain",
                "POST /admin/plugins/reload",
                "POST /api/v1/channels/{channel}/publish",
                "POST /api/v1/dev/token",
                "POST /api/v1/im/push",
                "POST /api/v1/push",
                "POST /route/batch",
            ]
        );
    }
}
