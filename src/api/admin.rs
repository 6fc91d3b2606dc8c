//! `/admin/...`: operator endpoints, behind the `[admin] token` bearer token.
//!
//! - `GET /admin/plugins`: the plugin set in force and per (plugin, app) metrics.
//! - `POST /admin/plugins/reload`: re-read plugin config and files and swap them in.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde::Serialize;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::{ApiError, ErrorBody};
use crate::hub::Hub;
use crate::plugin::{MetricsSnapshot, PluginSet};

fn authorize(hub: &Hub, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &hub.config().admin.token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin endpoints are off; set [admin] token in the config",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("admin_unauthorized", "send Authorization: Bearer <[admin] token>"))
    }
}

#[derive(Serialize, ToSchema)]
pub(super) struct PluginView {
    name: String,
    world: &'static str,
    path: String,
    failure: crate::config::FailurePolicy,
    deadline_ms: f64,
}

#[derive(Serialize, ToSchema)]
pub(super) struct PluginsView {
    generation: u64,
    plugins: Vec<PluginView>,
    metrics: Vec<MetricsSnapshot>,
}

fn view(set: &PluginSet) -> PluginsView {
    PluginsView {
        generation: set.generation,
        plugins: set
            .plugins
            .values()
            .map(|p| PluginView {
                name: p.name.to_string(),
                world: p.world.as_str(),
                path: p.path.display().to_string(),
                failure: p.failure,
                deadline_ms: p.deadline.as_secs_f64() * 1000.0,
            })
            .collect(),
        metrics: set.metrics(),
    }
}

/// The plugin set in force and per (plugin, app) metrics.
#[utoipa::path(get, path = "/admin/plugins", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "Plugins and their metrics", body = PluginsView),
        (status = 401, description = "`admin_unauthorized`", body = ErrorBody),
        (status = 403, description = "`admin_disabled`: no `[admin] token` configured", body = ErrorBody),
    ))]
pub(super) async fn plugins(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Result<Json<PluginsView>, ApiError> {
    authorize(&hub, &headers)?;
    Ok(Json(view(&hub.plugins())))
}

/// Re-read the plugin config and files and swap them in; connections are not touched.
#[utoipa::path(post, path = "/admin/plugins/reload", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "Reloaded: the new set", body = PluginsView),
        (status = 401, description = "`admin_unauthorized`", body = ErrorBody),
        (status = 403, description = "`admin_disabled`", body = ErrorBody),
        (status = 422, description = "`reload_failed`: the previous plugins stay in force", body = ErrorBody),
    ))]
pub(super) async fn reload(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Result<Json<PluginsView>, ApiError> {
    authorize(&hub, &headers)?;
    match hub.reload_plugins().await {
        Ok(_) => Ok(Json(view(&hub.plugins()))),
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reload_failed",
            format!("{e}; the previous plugins stay in force"),
        )),
    }
}

#[derive(Serialize, ToSchema)]
pub(super) struct DrainStarted {
    draining: bool,
    connections: usize,
    window_ms: u64,
}

/// Starts draining: the node leaves routing at once and moves its clients to other nodes
/// over `shutdown.drain_window`. The node keeps running (and answering the API) until it
/// is stopped.
#[utoipa::path(post, path = "/admin/drain", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 202, description = "Draining has started", body = DrainStarted),
        (status = 401, description = "`admin_unauthorized`", body = ErrorBody),
        (status = 403, description = "`admin_disabled`", body = ErrorBody),
    ))]
pub(super) async fn drain(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<DrainStarted>), ApiError> {
    authorize(&hub, &headers)?;
    let window = hub.config().shutdown.drain_window;
    let connections = hub.connections();
    let h = hub.clone();
    tokio::spawn(async move { h.drain(window).await });
    Ok((StatusCode::ACCEPTED, Json(DrainStarted { draining: true, connections, window_ms: window.as_millis() as u64 })))
}
