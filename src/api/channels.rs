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
use utoipa::ToSchema;

use super::push::{is_zero, object_body, sender, verify_signed};
use super::{ApiError, ErrorBody};
use crate::hub::{App, Hub, Sender};
use crate::protocol::{now_ms, valid_channel};

/// A channel publish, signed like a push.
#[derive(Deserialize, ToSchema)]
struct PublishBody<'a> {
    #[serde(borrow)]
    #[schema(value_type = String, example = "demo")]
    app_key: Cow<'a, str>,
    /// Delivered to subscribers as the message frame's `data`.
    #[serde(borrow)]
    #[schema(value_type = Object)]
    message: &'a RawValue,
    #[serde(borrow)]
    #[schema(value_type = String)]
    nonce: Cow<'a, str>,
    /// Optional sender user id shown to subscribers.
    #[serde(borrow, default)]
    #[schema(value_type = Option<String>)]
    from: Option<Cow<'a, str>>,
}

#[derive(Serialize, ToSchema)]
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

/// Publish to every subscriber of a channel, on every node.
#[utoipa::path(post, path = "/api/v1/channels/{channel}/publish", tag = "push",
    request_body = PublishBody<'_>,
    params(
        ("channel" = String, Path, description = "1-64 characters of A-Z a-z 0-9 _ - :"),
        ("x-switchboard-timestamp" = u64, Header, description = "Unix seconds when the request was signed"),
        ("x-switchboard-signature" = String, Header, description = "As for /api/v1/push"),
    ),
    responses(
        (status = 200, description = "Published", body = PublishResponse),
        (status = 400, description = "`invalid_body`, `invalid_channel`, `invalid_sender`, `invalid_nonce`, \
            `denied`, `filter_failed`", body = ErrorBody),
        (status = 401, description = "As for /api/v1/push", body = ErrorBody),
        (status = 409, description = "`nonce_replayed`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 503, description = "`nonce_store_full`", body = ErrorBody),
    ))]
pub(super) async fn publish(
    State(hub): State<Arc<Hub>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PublishResponse>, ApiError> {
    let mut app = None;
    let result = publish_checked(&hub, &channel, &headers, body, &mut app).await;
    let outcome = result.as_ref().map_or_else(|e| e.code, |_| "ok");
    hub.metrics().push_request(app.as_ref().map(|a: &Arc<App>| a.id.as_str()), outcome);
    result
}

async fn publish_checked(
    hub: &Hub,
    channel: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    app: &mut Option<Arc<App>>,
) -> Result<Json<PublishResponse>, ApiError> {
    let body = body?;
    let req: PublishBody<'_> = object_body(&body, "publish body")?;
    let signed = verify_signed(hub, headers, &body, &req.app_key, &req.nonce)?;
    *app = Some(signed.app.clone());
    if !valid_channel(channel) {
        return Err(ApiError::bad_request("invalid_channel", "a channel name is 1-64 characters of A-Z a-z 0-9 _ - :"));
    }
    let from = sender(&req.from)?;
    signed.commit(hub, &req.nonce)?;
    signed.app.metrics.from_channel_api.inc();
    let max_bytes = hub.config().limits.max_http_body_bytes;
    let from = Sender { uid: from, metadata: &[], wants_count: true, conversation: None, received_at: now_ms() };
    match hub.publish_channel(signed.app, from, channel, req.message, max_bytes).await {
        Ok(sent) => {
            let outcome = sent.delivery.finish().await;
            Ok(Json(PublishResponse {
                msg_id: sent.msg_id.to_string(),
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
