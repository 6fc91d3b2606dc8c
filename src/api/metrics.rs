//! `GET /metrics`: Prometheus metrics (see `crate::metrics` for what is counted).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, ErrorBody};
use crate::hub::Hub;

/// The node's metrics in the OpenMetrics text format (which Prometheus scrapes natively).
#[utoipa::path(get, path = "/metrics", tag = "node",
    responses(
        (status = 200, description = "Metrics; docs/operations.md lists them",
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        (status = 404, description = "`not_found`: `[metrics] enabled = false`", body = ErrorBody),
    ))]
pub(super) async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    if !hub.config().metrics.enabled {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "metrics are off ([metrics] enabled = false)")
            .into_response();
    }
    let text = hub.metrics().render(hub.scrape());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}
