//! `POST /api/v1/push` (alias `/api/v1/im/push`): an app server sends a message to users.
//!
//! Checked in this order, each with its own error code: body shape, app, timestamp window,
//! signature, recipients, nonce (recorded last, once everything else is good, so nobody can
//! burn an app's nonces without its secret). `channels.rs` signs its requests the same way.

use std::borrow::Cow;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::{ApiError, ErrorBody};
use crate::auth::nonce::NonceCheck;
use crate::auth::signature::{self, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::hub::App;
use crate::hub::Hub;
use crate::protocol::{looks_like_object, now_ms, valid_uid};

/// The longest nonce accepted.
pub(super) const MAX_NONCE_LEN: usize = 128;

/// One user id, or a list of them.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
enum SendTo {
    One(#[schema(inline)] super::UserId),
    Many(Vec<super::UserId>),
}

/// A push. Sign the exact body bytes: see docs/http-api.md.
#[derive(Deserialize, ToSchema)]
struct PushBody<'a> {
    /// The app id.
    #[serde(borrow)]
    #[schema(value_type = String, example = "demo")]
    app_key: Cow<'a, str>,
    /// Recipients (1 to `push.max_recipients`); duplicates are sent once.
    send_to: SendTo,
    /// Delivered to the recipients as the message frame's `data`.
    #[serde(borrow)]
    #[schema(value_type = Object)]
    message: &'a RawValue,
    /// 1-128 bytes, never reused within `push.timestamp_window`.
    #[serde(borrow)]
    #[schema(value_type = String, min_length = 1, max_length = 128)]
    nonce: Cow<'a, str>,
    /// Optional sender user id shown to recipients; `""` (the app server) when absent.
    #[serde(borrow, default)]
    #[schema(value_type = Option<super::UserId>)]
    from: Option<Cow<'a, str>>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct RecipientResult {
    uid: String,
    /// `delivered`, `dropped` or `offline` (see `protocol::delivery_status`), or `denied` /
    /// `filter_failed` when the app's filters stopped the message for this recipient.
    status: &'static str,
    /// Why the filters stopped it.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Connections of this user the message was handed to.
    connections: usize,
    /// Connections of this user too slow to take it (being closed as slow consumers).
    #[serde(skip_serializing_if = "is_zero")]
    dropped: usize,
    /// `"unavailable"` when other nodes could not be asked: the counts are this node's.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<&'static str>,
}

pub(super) fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Serialize, ToSchema)]
pub(super) struct PushResponse {
    msg_id: String,
    send_at: u64,
    /// Connections reached over all recipients.
    delivered: usize,
    results: Vec<RecipientResult>,
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A signed request whose app, timestamp and signature checked out; its nonce is recorded
/// by [`Signed::commit`] once everything else about the request is valid too.
pub(super) struct Signed<'h> {
    pub(super) app: &'h Arc<App>,
    ts: u64,
}

/// Checks `app_key`, the timestamp window and the HMAC signature of a push-style request.
pub(super) fn verify_signed<'h>(
    hub: &'h Hub,
    headers: &HeaderMap,
    body: &[u8],
    app_key: &str,
    nonce: &str,
) -> Result<Signed<'h>, ApiError> {
    let app = hub
        .app(app_key)
        .ok_or_else(|| ApiError::unauthorized("unknown_app", "app_key is not configured on this node"))?;
    let window = hub.config().push.timestamp_window.as_secs();
    let ts_text = header(headers, TIMESTAMP_HEADER).ok_or_else(|| {
        ApiError::unauthorized("timestamp_missing", format!("the {TIMESTAMP_HEADER} header is required"))
    })?;
    let ts: u64 = ts_text
        .trim()
        .parse()
        .map_err(|_| ApiError::unauthorized("timestamp_invalid", format!("{TIMESTAMP_HEADER} must be Unix seconds")))?;
    let now = now_ms() / 1000;
    if ts.abs_diff(now) > window {
        return Err(ApiError::unauthorized(
            "timestamp_stale",
            format!("{TIMESTAMP_HEADER} is more than {window}s away from the node's clock (push.timestamp_window)"),
        ));
    }
    if ts < hub.started_secs() {
        return Err(ApiError::unauthorized(
            "timestamp_stale",
            "signed before this node started; nonces from before a restart are not remembered, so sign again",
        ));
    }
    let sig = header(headers, SIGNATURE_HEADER).ok_or_else(|| {
        ApiError::unauthorized("signature_missing", format!("the {SIGNATURE_HEADER} header is required"))
    })?;
    if !signature::verify(app.secret(), ts_text, nonce, body, sig) {
        return Err(ApiError::unauthorized(
            "signature_invalid",
            "signature does not match hex(HMAC-SHA256(secret, timestamp \\n nonce \\n body))",
        ));
    }
    Ok(Signed { app, ts })
}

impl Signed<'_> {
    /// Records the nonce: the last check, so that a refused request can be fixed and signed
    /// again with the same nonce.
    pub(super) fn commit(&self, hub: &Hub, nonce: &str) -> Result<(), ApiError> {
        if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
            return Err(ApiError::bad_request("invalid_nonce", format!("nonce must be 1-{MAX_NONCE_LEN} bytes")));
        }
        let window = hub.config().push.timestamp_window.as_secs();
        let now = now_ms() / 1000;
        match self.app.nonces.lock().expect("nonce store lock").check_and_insert(nonce, now, self.ts + window) {
            NonceCheck::Fresh => Ok(()),
            NonceCheck::Replayed => {
                Err(ApiError::new(StatusCode::CONFLICT, "nonce_replayed", "this nonce was already used"))
            }
            NonceCheck::Full => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "nonce_store_full",
                "too many pushes within push.timestamp_window for push.nonce_capacity; retry shortly",
            )),
        }
    }
}

/// Reads a body that must be one JSON object (serde would also take an array for a
/// struct); `what` names it in the `invalid_body` message.
pub(super) fn object_body<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T, ApiError> {
    if !looks_like_object(body) {
        return Err(ApiError::bad_request("invalid_body", format!("{what} must be a JSON object")));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("invalid_body", format!("{what}: {e}")))
}

/// A sender id given in a push body, checked.
pub(super) fn sender<'a>(from: &'a Option<Cow<'a, str>>) -> Result<&'a str, ApiError> {
    let from = from.as_deref().unwrap_or("");
    if !from.is_empty() && !valid_uid(from) {
        return Err(ApiError::bad_request("invalid_sender", "from must be 1-128 bytes without control characters"));
    }
    Ok(from)
}

/// Send a message to users.
///
/// The message is filtered per recipient by the app's filter plugins and delivered to every
/// connection of each recipient on every node; the answer says, per recipient, how many.
#[utoipa::path(post, path = "/api/v1/push", tag = "push",
    request_body = PushBody<'_>,
    params(
        ("x-switchboard-timestamp" = u64, Header, description = "Unix seconds when the request was signed"),
        ("x-switchboard-signature" = String, Header,
            description = "hex(HMAC-SHA256(app secret, timestamp \\n nonce \\n body))"),
    ),
    responses(
        (status = 200, description = "Accepted; per-recipient outcome", body = PushResponse),
        (status = 400, description = "`invalid_body`, `invalid_recipient`, `invalid_sender`, `invalid_nonce`", body = ErrorBody),
        (status = 401, description = "`unknown_app`, `timestamp_missing`, `timestamp_invalid`, `timestamp_stale`, \
            `signature_missing`, `signature_invalid`", body = ErrorBody),
        (status = 409, description = "`nonce_replayed`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 503, description = "`nonce_store_full`: retry shortly", body = ErrorBody),
    ))]
pub(super) async fn push(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PushResponse>, ApiError> {
    let mut app = None;
    let result = push_checked(&hub, &headers, body, &mut app).await;
    let outcome = result.as_ref().map_or_else(|e| e.code, |_| "ok");
    hub.metrics().push_request(app.as_ref().map(|a: &Arc<App>| a.id.as_str()), outcome);
    result
}

/// The same as `POST /api/v1/push` (WuKongIM's path).
#[utoipa::path(post, path = "/api/v1/im/push", tag = "push",
    request_body = PushBody<'_>,
    params(
        ("x-switchboard-timestamp" = u64, Header, description = "Unix seconds when the request was signed"),
        ("x-switchboard-signature" = String, Header, description = "As for /api/v1/push"),
    ),
    responses(
        (status = 200, description = "Accepted; per-recipient outcome", body = PushResponse),
        (status = 400, description = "As for /api/v1/push", body = ErrorBody),
        (status = 401, description = "As for /api/v1/push", body = ErrorBody),
        (status = 409, description = "`nonce_replayed`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 503, description = "`nonce_store_full`", body = ErrorBody),
    ))]
pub(super) async fn push_im(
    state: State<Arc<Hub>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PushResponse>, ApiError> {
    push(state, headers, body).await
}

/// The push, checked in order; `app` is set once the request is known to come from it.
async fn push_checked(
    hub: &Hub,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    app: &mut Option<Arc<App>>,
) -> Result<Json<PushResponse>, ApiError> {
    let body = body?;
    let req: PushBody<'_> = object_body(&body, "push body")?;
    let signed = verify_signed(hub, headers, &body, &req.app_key, &req.nonce)?;
    *app = Some(signed.app.clone());

    let mut recipients = match req.send_to {
        SendTo::One(uid) => vec![uid.0],
        SendTo::Many(uids) => uids.into_iter().map(|u| u.0).collect(),
    };
    let max = hub.config().push.max_recipients;
    if recipients.is_empty() || recipients.len() > max {
        return Err(ApiError::bad_request(
            "invalid_recipient",
            format!("send_to must name 1-{max} users (push.max_recipients)"),
        ));
    }
    if let Some(bad) = recipients.iter().find(|u| !valid_uid(u)) {
        return Err(ApiError::bad_request(
            "invalid_recipient",
            format!("send_to has {bad:?}; user ids are 1-128 bytes without control characters"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    recipients.retain(|u| seen.insert(u.clone()));
    let from = sender(&req.from)?;
    signed.commit(hub, &req.nonce)?;

    let (msg_id, send_at, results) = hub.push(signed.app, from, &recipients, req.message).await;
    let delivered = results.iter().map(|r| r.outcome.delivered.sessions).sum();
    let results = results
        .into_iter()
        .map(|r| RecipientResult {
            status: match &r.refused {
                Some(refused) => refused.code.as_str(),
                None => r.outcome.status(),
            },
            reason: r.refused.map(|refused| refused.message),
            uid: r.uid,
            connections: r.outcome.delivered.sessions,
            dropped: r.outcome.delivered.dropped,
            cluster: r.outcome.cluster_unavailable.then_some("unavailable"),
        })
        .collect();
    Ok(Json(PushResponse { msg_id: msg_id.to_string(), send_at, delivered, results }))
}
