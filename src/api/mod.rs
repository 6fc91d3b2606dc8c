//! The HTTP API (axum): route discovery, push, version and health.
//!
//! Owns request parsing, the JSON error shape `{"error":{"code","message"}}` and status
//! codes. It does not deliver anything itself; it calls the hub. docs/http-api.md is the
//! human version of this module.

mod admin;
mod channels;
mod error;
mod push;
mod route;
pub mod serve;
mod version;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use error::ApiError;

use crate::hub::Hub;

/// The API's router; the same one serves HTTP and HTTPS.
pub fn router(hub: Arc<Hub>) -> Router {
    let body_limit = hub.config().limits.max_http_body_bytes;
    let request_timeout = hub.config().limits.http_request_timeout;
    Router::new()
        .route("/route", get(route::route))
        .route("/route/batch", post(route::batch))
        .route("/api/version", get(version::version))
        .route("/healthz", get(version::healthz))
        .route("/api/v1/push", post(push::push))
        .route("/api/v1/im/push", post(push::push))
        .route("/api/v1/channels/{channel}/publish", post(channels::publish))
        .route("/admin/plugins", get(admin::plugins))
        .route("/admin/drain", post(admin::drain))
        .route("/admin/plugins/reload", post(admin::reload))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(move |req, next| serve::request_deadline(request_timeout, req, next)))
        .with_state(hub)
}
