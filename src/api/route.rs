//! `GET /route` and `POST /route/batch`: which address a client should connect to, in
//! WuKongIM's response shape.
//!
//! Beyond WuKongIM: `app_id` selects the app's router plugin, and a user may come with a
//! location (`region`, `lat`, `lon`) for geographic routing.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ErrorBody};
use crate::cluster::Addrs;
use crate::hub::{Hub, RouteGroup};
use crate::plugin::RouteUser;
use crate::protocol::valid_uid;

/// The query string of both endpoints.
#[derive(Debug, Default, IntoParams)]
#[into_params(parameter_in = Query)]
struct RouteQuery {
    /// `1` for the addresses inside the data centre, `0` (default, also empty) for the public ones.
    #[param(value_type = Option<String>, pattern = "^[01]?$")]
    intranet: bool,
    /// Use this app's router plugin.
    app_id: Option<String>,
    /// The user to route (`GET /route` only); without it, this node's addresses.
    #[param(value_type = Option<super::UserId>)]
    uid: Option<String>,
    /// The user's region, for geographic routers (`GET /route` only).
    region: Option<String>,
    /// The user's latitude, -90 to 90 (`GET /route` only).
    #[param(minimum = -90.0, maximum = 90.0)]
    lat: Option<f64>,
    /// The user's longitude, -180 to 180 (`GET /route` only).
    #[param(minimum = -180.0, maximum = 180.0)]
    lon: Option<f64>,
}

fn parse_query(query: &Option<String>) -> Result<RouteQuery, ApiError> {
    let mut q = RouteQuery::default();
    let coordinate = |name: &str, v: &str, range: f64| -> Result<f64, ApiError> {
        v.parse::<f64>().ok().filter(|x| x.abs() <= range).ok_or_else(|| {
            ApiError::bad_request("invalid_parameter", format!("{name} must be a number within ±{range}"))
        })
    };
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes()) {
        match &*k {
            "intranet" => {
                q.intranet = match &*v {
                    // Empty too: clients that build the URL from an unset variable send it.
                    "0" | "" => false,
                    "1" => true,
                    _ => return Err(ApiError::bad_request("invalid_parameter", "intranet must be 0 or 1")),
                }
            }
            "app_id" => q.app_id = Some(v.into_owned()),
            "uid" => q.uid = Some(v.into_owned()),
            "region" => q.region = Some(v.into_owned()),
            "lat" => q.lat = Some(coordinate("lat", &v, 90.0)?),
            "lon" => q.lon = Some(coordinate("lon", &v, 180.0)?),
            _ => {}
        }
    }
    Ok(q)
}

fn check_app(hub: &Hub, app: &Option<String>) -> Result<(), ApiError> {
    match app {
        Some(id) if hub.app(id).is_none() => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "unknown_app",
            format!("app {id:?} is not configured"),
        )),
        _ => Ok(()),
    }
}

/// Where one user (or any client) should connect: WuKongIM's response shape.
#[utoipa::path(get, path = "/route", tag = "route",
    params(RouteQuery),
    responses(
        (status = 200, description = "The node's addresses; a disabled listener is `\"\"`", body = Addrs),
        (status = 400, description = "`invalid_parameter`, `invalid_uid`", body = ErrorBody),
        (status = 404, description = "`unknown_app`", body = ErrorBody),
    ))]
pub(super) async fn route(State(hub): State<Arc<Hub>>, RawQuery(query): RawQuery) -> Result<Json<Addrs>, ApiError> {
    let q = parse_query(&query)?;
    check_app(&hub, &q.app_id)?;
    let Some(uid) = q.uid else {
        // No user named: this node, like WuKongIM.
        return Ok(Json(hub.addrs(q.intranet).clone()));
    };
    if !valid_uid(&uid) {
        return Err(ApiError::bad_request("invalid_uid", "uid must be 1-128 bytes without control characters"));
    }
    let user = RouteUser { uid, region: q.region, lat: q.lat, lon: q.lon, metadata: Vec::new() };
    let group = hub.route(q.app_id.as_deref(), std::slice::from_ref(&user), q.intranet).into_iter().next();
    Ok(Json(group.map(|g| g.addrs).unwrap_or_else(|| hub.addrs(q.intranet).clone())))
}

/// The query string of `POST /route/batch`: users and their locations come in the body.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Only describes the query string for the document; parse_query reads it.
struct BatchQuery {
    /// `1` for the addresses inside the data centre, `0` (default, also empty) for the public ones.
    #[param(value_type = Option<String>, pattern = "^[01]?$")]
    intranet: bool,
    /// Use this app's router plugin.
    app_id: Option<String>,
}

/// A batch entry: a bare user id (WuKongIM) or an object with a location.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
enum BatchUser {
    Uid(super::UserId),
    Located {
        #[schema(value_type = super::UserId)]
        uid: String,
        #[serde(default)]
        region: Option<String>,
        #[serde(default)]
        lat: Option<f64>,
        #[serde(default)]
        lon: Option<f64>,
    },
}

/// Which node each of many users should connect to, grouped by node.
#[utoipa::path(post, path = "/route/batch", tag = "route",
    params(BatchQuery),
    request_body(content = Vec<BatchUser>, description = "User ids, or objects with a location"),
    responses(
        (status = 200, description = "One group per node", body = Vec<RouteGroup>),
        (status = 400, description = "`invalid_parameter` (also for `uid`, `region`, `lat`, `lon`: they go in the \
            body), `invalid_body`, `invalid_uid`, `too_many_uids`", body = ErrorBody),
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
    ))]
pub(super) async fn batch(
    State(hub): State<Arc<Hub>>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<RouteGroup>>, ApiError> {
    let q = parse_query(&query)?;
    if q.uid.is_some() || q.region.is_some() || q.lat.is_some() || q.lon.is_some() {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "uid, region, lat and lon go in the body of /route/batch, per user",
        ));
    }
    check_app(&hub, &q.app_id)?;
    let body = body?;
    let entries: Vec<BatchUser> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("body must be a JSON array of user ids (or {{\"uid\",\"region\",\"lat\",\"lon\"}} objects): {e}"),
        )
    })?;
    let max = hub.config().route.batch_max_uids;
    if entries.len() > max {
        return Err(ApiError::bad_request(
            "too_many_uids",
            format!("at most {max} uids per request (route.batch_max_uids)"),
        ));
    }
    let mut users = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let user = match entry {
            BatchUser::Uid(uid) => RouteUser { uid: uid.0, ..RouteUser::default() },
            BatchUser::Located { uid, region, lat, lon } => {
                if lat.is_some_and(|x| x.abs() > 90.0) || lon.is_some_and(|x| x.abs() > 180.0) {
                    return Err(ApiError::bad_request("invalid_body", format!("uids[{i}]: lat/lon out of range")));
                }
                RouteUser { uid, region, lat, lon, metadata: Vec::new() }
            }
        };
        if !valid_uid(&user.uid) {
            return Err(ApiError::bad_request(
                "invalid_uid",
                format!("uids[{i}] must be 1-128 bytes without control characters"),
            ));
        }
        users.push(user);
    }
    Ok(Json(hub.route(q.app_id.as_deref(), &users, q.intranet)))
}
