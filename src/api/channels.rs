//! `POST /api/v1/channels/{channel}/publish`: an app server publishes to a channel, signed
//! like a push.

use std::borrow::Cow;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::ApiError;
use super::push::{is_zero, sender, verify_signed};
use crate::hub::Hub;
use crate::protocol::{looks_like_object, valid_channel};

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    app_key: Cow<'a, str>,
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(borrow)]
    nonce: Cow<'a, str>,
    #[serde(borrow, default)]
    from: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
pub(super) struct PublishResponse {
    msg_id: String,
    send_at: u64,
    /// `delivered` (some subscriber took it), `offline` (no subscriber anywhere), `dropped`,
    /// or `unavailable` (no local subscriber and the cluster could not be asked).
    status: &'static str,
    /// Subscriber connections reached, over the whole cluster.
    delivered: usize,
    #[serde(skip_serializing_if = "is_zero")]
    dropped: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<&'static str>,
}

pub(super) async fn publish(
    State(hub): State<Arc<Hub>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PublishResponse>, ApiError> {
    let body = body?;
    if !looks_like_object(&body) {
        return Err(ApiError::bad_request("invalid_body", "publish body must be a JSON object"));
    }
    let req: PublishBody<'_> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("publish body: {e}")))?;
    let signed = verify_signed(&hub, &headers, &body, &req.app_key, &req.nonce)?;
    if !valid_channel(&channel) {
        return Err(ApiError::bad_request("invalid_channel", "a channel name is 1-64 characters of A-Z a-z 0-9 _ - :"));
    }
    let from = sender(&req.from)?;
    signed.commit(&hub, &req.nonce)?;
    let max_bytes = hub.config().limits.max_http_body_bytes;
    match hub.publish_channel(signed.app, from, &[], &channel, req.message, max_bytes).await {
        Ok(sent) => {
            let outcome = sent.delivery.finish().await;
            Ok(Json(PublishResponse {
                msg_id: sent.msg_id,
                send_at: sent.send_at,
                status: outcome.status(),
                delivered: outcome.delivered.sessions,
                dropped: outcome.delivered.dropped,
                cluster: outcome.cluster_unavailable.then_some("unavailable"),
            }))
        }
        Err(refused) => Err(ApiError::bad_request(refused.code.as_str(), refused.message)),
    }
}
