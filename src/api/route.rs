//! `GET /route` and `POST /route/batch`: which address a client should connect to, in
//! WuKongIM's response shape.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};

use super::ApiError;
use crate::cluster::Addrs;
use crate::hub::{Hub, RouteGroup};
use crate::protocol::valid_uid;

/// `intranet` from the query string: absent or `0` is the public side, `1` the internal one.
fn intranet(query: &Option<String>) -> Result<bool, ApiError> {
    let mut intranet = false;
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes()) {
        if k == "intranet" {
            intranet = match &*v {
                "0" | "" => false,
                "1" => true,
                _ => return Err(ApiError::bad_request("invalid_parameter", "intranet must be 0 or 1")),
            };
        }
    }
    Ok(intranet)
}

fn query_param(query: &Option<String>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

pub(super) async fn route(State(hub): State<Arc<Hub>>, RawQuery(query): RawQuery) -> Result<Json<Addrs>, ApiError> {
    let intranet = intranet(&query)?;
    let uid = query_param(&query, "uid");
    if let Some(uid) = &uid
        && !valid_uid(uid)
    {
        return Err(ApiError::bad_request("invalid_uid", "uid must be 1-128 bytes without control characters"));
    }
    Ok(Json(hub.route_user(uid.as_deref(), intranet)))
}

pub(super) async fn batch(
    State(hub): State<Arc<Hub>>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<RouteGroup>>, ApiError> {
    let intranet = intranet(&query)?;
    let body = body?;
    let uids: Vec<String> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("invalid_body", format!("body must be a JSON array of user id strings: {e}"))
    })?;
    let max = hub.config().route.batch_max_uids;
    if uids.len() > max {
        return Err(ApiError::bad_request(
            "too_many_uids",
            format!("at most {max} uids per request (route.batch_max_uids)"),
        ));
    }
    if let Some(i) = uids.iter().position(|u| !valid_uid(u)) {
        return Err(ApiError::bad_request(
            "invalid_uid",
            format!("uids[{i}] must be 1-128 bytes without control characters"),
        ));
    }
    Ok(Json(hub.route(uids, intranet)))
}
