//! `GET /api/version` and `GET /healthz`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use crate::cluster::Addrs;
use crate::hub::Hub;

#[derive(Serialize)]
pub(super) struct NodeView {
    id: String,
    #[serde(flatten)]
    addrs: Addrs,
}

#[derive(Serialize)]
pub(super) struct Version {
    version: &'static str,
    node_id: String,
    nodes: Vec<NodeView>,
    warnings: Vec<String>,
}

pub(super) async fn version(State(hub): State<Arc<Hub>>) -> Json<Version> {
    let node = hub.node();
    Json(Version {
        version: env!("CARGO_PKG_VERSION"),
        node_id: node.id.clone(),
        nodes: vec![NodeView { id: node.id.clone(), addrs: node.external.clone() }],
        warnings: node.warnings.clone(),
    })
}

#[derive(Serialize)]
pub(super) struct Health {
    status: &'static str,
    connections: usize,
}

/// 200 while serving; 503 once shutdown has begun, so a load balancer stops sending clients.
pub(super) async fn healthz(State(hub): State<Arc<Hub>>) -> (StatusCode, Json<Health>) {
    let connections = hub.connections();
    if hub.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "shutting_down", connections }))
    } else {
        (StatusCode::OK, Json(Health { status: "ok", connections }))
    }
}
