//! `GET /api/version` and `GET /healthz`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::cluster::Addrs;
use crate::hub::Hub;

#[derive(Serialize, ToSchema)]
pub(super) struct NodeView {
    id: String,
    #[serde(flatten)]
    addrs: Addrs,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    connections: u64,
    draining: bool,
}

#[derive(Serialize, ToSchema)]
pub(super) struct Version {
    version: &'static str,
    node_id: String,
    nodes: Vec<NodeView>,
    /// `"connected"` or `"disconnected"` when clustered over NATS; absent on a single node.
    #[serde(skip_serializing_if = "Option::is_none")]
    nats: Option<&'static str>,
    warnings: Vec<String>,
}

/// This node's version and the nodes it routes to.
#[utoipa::path(get, path = "/api/version", tag = "node",
    responses((status = 200, description = "Version, nodes, NATS state", body = Version)))]
pub(super) async fn version(State(hub): State<Arc<Hub>>) -> Json<Version> {
    let node = hub.node();
    Json(Version {
        version: env!("CARGO_PKG_VERSION"),
        node_id: node.id.clone(),
        nodes: hub
            .route_nodes()
            .into_iter()
            .map(|n| NodeView {
                id: n.id,
                addrs: n.external,
                region: n.region,
                connections: n.connections,
                draining: n.draining,
            })
            .collect(),
        nats: hub.cluster().map(|c| if c.is_connected() { "connected" } else { "disconnected" }),
        warnings: node.warnings.clone(),
    })
}

#[derive(Serialize, ToSchema)]
pub(super) struct Health {
    /// `ok`, `draining` or `shutting_down`.
    status: &'static str,
    connections: usize,
}

/// 200 while serving; 503 once shutdown has begun, so a load balancer stops sending clients.
#[utoipa::path(get, path = "/healthz", tag = "node",
    responses(
        (status = 200, description = "Serving", body = Health),
        (status = 503, description = "Draining or shutting down: send clients elsewhere", body = Health),
    ))]
pub(super) async fn healthz(State(hub): State<Arc<Hub>>) -> (StatusCode, Json<Health>) {
    let connections = hub.connections();
    if hub.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "draining", connections }))
    } else if hub.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "shutting_down", connections }))
    } else {
        (StatusCode::OK, Json(Health { status: "ok", connections }))
    }
}
