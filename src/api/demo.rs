//! The demo page (`GET /demo`, assets embedded in the binary) and development tokens
//! (`POST /api/v1/dev/token`).
//!
//! Both answer only with `[demo] enabled = true`, and tokens only for apps with
//! `dev_tokens = true`. Both are off by default: a development token endpoint lets anyone
//! be any user of that app. The repository's `config.toml` turns both on for its `demo` app.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ErrorBody};
use crate::hub::Hub;
use crate::protocol::{now_ms, valid_uid};

const INDEX_HTML: &str = include_str!("../demo/index.html");
const DEMO_JS: &str = include_str!("../demo/demo.js");
const DEMO_CSS: &str = include_str!("../demo/demo.css");
/// The browser client, the same file as `clients/js/switchboard.js`.
const CLIENT_JS: &str = include_str!("../../clients/js/switchboard.js");

/// Longest lifetime of a development token.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

fn demo_off() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "the demo page is off ([demo] enabled = false)")
}

fn served(hub: &Hub, content_type: &'static str, body: &'static str) -> Response {
    if !hub.config().demo.enabled {
        return demo_off().into_response();
    }
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// The demo page: pick a user, connect, chat with another tab.
#[utoipa::path(get, path = "/demo", tag = "demo",
    responses(
        (status = 200, description = "The page", content_type = "text/html; charset=utf-8", body = String),
        (status = 404, description = "`not_found`: `[demo] enabled = false`", body = ErrorBody),
    ))]
pub(super) async fn page(State(hub): State<Arc<Hub>>) -> Response {
    served(&hub, "text/html; charset=utf-8", INDEX_HTML)
}

/// The demo page's script and style, and the browser client module.
#[utoipa::path(get, path = "/demo/{file}", tag = "demo",
    params(("file" = String, Path, description = "`demo.js`, `demo.css` or `switchboard.js` (the client module)")),
    responses(
        (status = 200, description = "The file", content_type = "text/javascript; charset=utf-8", body = String),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ))]
pub(super) async fn asset(State(hub): State<Arc<Hub>>, Path(file): Path<String>) -> Response {
    match file.as_str() {
        "demo.js" => served(&hub, "text/javascript; charset=utf-8", DEMO_JS),
        "switchboard.js" => served(&hub, "text/javascript; charset=utf-8", CLIENT_JS),
        "demo.css" => served(&hub, "text/css; charset=utf-8", DEMO_CSS),
        _ => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such demo file").into_response(),
    }
}

#[derive(Serialize, ToSchema)]
pub(super) struct DemoConfig {
    /// Apps that hand out development tokens (`dev_tokens = true`).
    apps: Vec<String>,
}

/// What the demo page needs to know: the apps it may get tokens for.
#[utoipa::path(get, path = "/demo/config.json", tag = "demo",
    responses(
        (status = 200, description = "The demo's settings", body = DemoConfig),
        (status = 404, description = "`not_found`: `[demo] enabled = false`", body = ErrorBody),
    ))]
pub(super) async fn config(State(hub): State<Arc<Hub>>) -> Result<Json<DemoConfig>, ApiError> {
    if !hub.config().demo.enabled {
        return Err(demo_off());
    }
    let apps = hub.config().apps.iter().filter(|(_, a)| a.dev_tokens).map(|(id, _)| id.clone()).collect();
    Ok(Json(DemoConfig { apps }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenRequest {
    /// An app with `dev_tokens = true`.
    #[schema(example = "demo")]
    app_id: String,
    /// Any user id: 1-128 bytes without control characters.
    #[schema(value_type = super::UserId, example = "alice")]
    uid: String,
    /// Lifetime in seconds (default 3600, at most 86400).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400)]
    ttl_secs: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct TokenResponse {
    /// A client token (HS256 JWT) for `uid`.
    token: String,
    uid: String,
    app_id: String,
    /// Unix seconds.
    expires_at: u64,
}

/// A client token for any user of an app that allows development tokens.
#[utoipa::path(post, path = "/api/v1/dev/token", tag = "demo",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "A token", body = TokenResponse),
        (status = 400, description = "`invalid_body`, `invalid_uid`, `invalid_ttl`", body = ErrorBody),
        (status = 403, description = "`dev_tokens_disabled`: the app does not set `dev_tokens = true`", body = ErrorBody),
        (status = 404, description = "`unknown_app`; `not_found`: `[demo] enabled = false`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
    ))]
pub(super) async fn token(
    State(hub): State<Arc<Hub>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenResponse>, ApiError> {
    if !hub.config().demo.enabled {
        return Err(demo_off());
    }
    let body = body?;
    let req: TokenRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("expected {{\"app_id\",\"uid\"}}: {e}")))?;
    let (Some(app), Some(app_config)) = (hub.app(&req.app_id), hub.config().apps.get(&req.app_id)) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_app",
            format!("app {:?} is not configured", req.app_id),
        ));
    };
    if !app_config.dev_tokens {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "dev_tokens_disabled",
            "this app does not hand out development tokens ([apps.<id>] dev_tokens = true)",
        ));
    }
    if !valid_uid(&req.uid) {
        return Err(ApiError::bad_request("invalid_uid", "uid must be 1-128 bytes without control characters"));
    }
    let ttl = match req.ttl_secs {
        None => DEFAULT_TTL,
        Some(s) if (1..=MAX_TTL.as_secs()).contains(&s) => Duration::from_secs(s),
        Some(_) => return Err(ApiError::bad_request("invalid_ttl", "ttl_secs must be 1-86400")),
    };
    let token = crate::auth::jwt::issue(app.secret(), &req.uid, ttl);
    Ok(Json(TokenResponse { token, uid: req.uid, app_id: req.app_id, expires_at: now_ms() / 1000 + ttl.as_secs() }))
}
