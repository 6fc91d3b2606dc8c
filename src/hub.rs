//! The node's shared state and the one delivery pipeline every entry point uses.
//!
//! Sessions (client sends) and the HTTP API (pushes) both come here to authenticate, to
//! stamp a message with its id and time, to run the app's filters, and to hand the result
//! to the recipients' sessions. The hub owns the apps, their registries and the current
//! plugin set; it does not do I/O itself.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::Secret;
use crate::auth::jwt::JwtVerifier;
use crate::auth::nonce::NonceStore;
use crate::cluster::membership::NodeRecord;
use crate::cluster::nats::{Cluster, Pending, Remote, Target};
use crate::cluster::{Addrs, NodeInfo};
use crate::config::{AuthMode, Config, FailurePolicy};
use crate::metrics::{AppMetrics, ClusterScrape, Metrics, PluginScrape, Scrape};
use crate::plugin::{AuthOutcome, AuthRequest, FilterMessage, PluginError, PluginSet, RouteNode, RouteUser, Verdict};
use crate::protocol::{
    EVENT_CHANNEL, EVENT_DIRECT, Envelope, ErrorCode, Frame, MsgId, MsgIdGen, conversation_id, encode_message, now_ms,
};
use crate::registry::{Delivered, QueueLimits, Registry, SessionHandle};
use crate::routing;
use crate::session::ConnectRequest;

/// One configured application: its credentials and its users on this node.
#[derive(Debug)]
pub struct App {
    pub id: String,
    secret: Secret,
    jwt: JwtVerifier,
    pub registry: Registry,
    pub nonces: Mutex<NonceStore>,
    pub metrics: AppMetrics,
}

impl App {
    pub fn secret(&self) -> &[u8] {
        self.secret.expose()
    }
}

/// Who a connection belongs to, once authenticated.
#[derive(Debug, Clone)]
pub struct Identity {
    pub app: Arc<App>,
    pub uid: String,
    /// From the app's authenticator plugin (e.g. region, roles); filters see it.
    pub metadata: Vec<(String, String)>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRefusal {
    pub code: ErrorCode,
    pub message: String,
    /// The authenticator plugin's own code, when it was the plugin that refused.
    pub reason: Option<String>,
}

impl From<ErrorCode> for AuthRefusal {
    fn from(code: ErrorCode) -> Self {
        Self { code, message: crate::session::describe(code).into(), reason: None }
    }
}

/// A message the app's filters stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `denied` (a filter said no) or `filter_failed` (a filter broke and fails closed).
    pub code: ErrorCode,
    pub message: String,
}

/// A message accepted for delivery.
#[derive(Debug)]
pub struct Sent {
    pub msg_id: MsgId,
    pub send_at: u64,
    pub delivery: Delivery,
}

/// Who sends a client message, and whether they want to know where it went.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    pub uid: &'a str,
    /// The connection's metadata, for filters.
    pub metadata: &'a [(String, String)],
    /// Whether the delivery count is wanted (an `ack`). Without it, other nodes of a
    /// cluster are not asked for theirs.
    pub wants_count: bool,
    /// The conversation id of this sender and the direct recipient, when the caller has it
    /// at hand (a session remembers the one of its last recipient); worked out otherwise.
    pub conversation: Option<&'a str>,
    /// When this node received the message, in Unix milliseconds: its `send_at`. A session
    /// reads the clock once for each burst of frames it reads in one go, rather than once
    /// per message (a clock read per message was about 3 % of the server's CPU at the peak,
    /// docs/performance.md).
    pub received_at: u64,
}

/// Where a message went: this node's sessions now, the other nodes' answers to come.
#[derive(Debug)]
pub struct Delivery {
    pub local: Delivered,
    pub remote: RemoteDelivery,
}

#[derive(Debug)]
pub enum RemoteDelivery {
    /// Not a cluster: this node is everything.
    Single,
    /// Published; the other nodes' answers are being collected.
    Pending(Pending),
    /// Published without asking the other nodes for counts (the sender wants no `ack`).
    Unanswered,
    /// NATS is unreachable: nothing could be sent to other nodes.
    Unavailable,
}

/// The final count of a delivery, over the whole cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub delivered: Delivered,
    /// The other nodes could not be asked: `delivered` counts this node only.
    pub cluster_unavailable: bool,
}

impl Outcome {
    /// `delivered`, `dropped`, `offline`, or `unavailable` (nothing delivered here and the
    /// cluster could not be asked).
    pub fn status(&self) -> &'static str {
        if self.delivered.sessions == 0 && self.delivered.dropped == 0 && self.cluster_unavailable {
            "unavailable"
        } else {
            crate::protocol::delivery_status(self.delivered.sessions, self.delivered.dropped)
        }
    }
}

impl Delivery {
    /// Whether the final count is known already (no other node to hear from).
    pub fn is_settled(&self) -> bool {
        !matches!(self.remote, RemoteDelivery::Pending(_))
    }

    /// Waits for the other nodes' answers and adds them up.
    pub async fn finish(self) -> Outcome {
        let mut delivered = self.local;
        let mut cluster_unavailable = false;
        match self.remote {
            RemoteDelivery::Single | RemoteDelivery::Unanswered => {}
            RemoteDelivery::Unavailable => cluster_unavailable = true,
            RemoteDelivery::Pending(p) => match p.wait().await {
                Remote::Nobody => {}
                Remote::Delivered(d) => delivered += d,
                Remote::Unavailable => cluster_unavailable = true,
            },
        }
        Outcome { delivered, cluster_unavailable }
    }
}

/// Per-recipient result of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub uid: String,
    pub outcome: Outcome,
    /// Set when the app's filters stopped the message for this recipient.
    pub refused: Option<Refused>,
}

/// A set of users and the node they should connect to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct RouteGroup {
    pub uids: Vec<String>,
    #[serde(flatten)]
    pub addrs: Addrs,
}

#[derive(Debug)]
pub struct Hub {
    config: Config,
    apps: HashMap<String, Arc<App>>,
    node: NodeInfo,
    ids: MsgIdGen,
    connections: AtomicUsize,
    next_conn_id: AtomicU64,
    shutdown: CancellationToken,
    /// Set by [`shut_down`](Hub::shut_down) before anything else; a session that registers
    /// reads it once, to learn of a shutdown whose sweep of the registry it missed.
    stopping: AtomicBool,
    /// Unix seconds when this node started: pushes signed earlier are refused, because the
    /// nonces that protected them from replay were not remembered across the restart.
    started_secs: u64,
    /// The plugins in force; a reload swaps the whole set at once.
    plugins: ArcSwap<PluginSet>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// The NATS cluster, when `[cluster]` is configured (attached after start-up).
    cluster: OnceLock<Arc<Cluster>>,
    /// Leaving: out of routing, clients being moved.
    draining: AtomicBool,
    metrics: Metrics,
}

/// Holds one slot of `limits.max_connections` while a connection lives.
#[derive(Debug)]
pub struct ConnGuard {
    hub: Arc<Hub>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.hub.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hub {
    pub fn new(config: Config, node: NodeInfo, plugins: PluginSet) -> Arc<Self> {
        let metrics = Metrics::new();
        let apps = config
            .apps
            .iter()
            .map(|(id, app)| {
                let app = App {
                    id: id.clone(),
                    secret: Secret::new(app.secret.as_bytes()),
                    jwt: JwtVerifier::new(app.secret.as_bytes(), app.token_leeway),
                    registry: Registry::new(QueueLimits {
                        frames: config.limits.outbound_queue,
                        bytes: config.limits.outbound_queue_bytes,
                    }),
                    nonces: Mutex::new(NonceStore::new(config.push.nonce_capacity)),
                    metrics: metrics.app(id),
                };
                (id.clone(), Arc::new(app))
            })
            .collect();
        Arc::new(Self {
            ids: MsgIdGen::new(&node.id),
            config,
            apps,
            node,
            connections: AtomicUsize::new(0),
            next_conn_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            stopping: AtomicBool::new(false),
            started_secs: now_ms() / 1000,
            plugins: ArcSwap::from_pointee(plugins),
            reloading: tokio::sync::Mutex::new(()),
            cluster: OnceLock::new(),
            draining: AtomicBool::new(false),
            metrics,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `id` if it names a configured app (so that metrics never take a label from a client).
    pub fn known_app<'a>(&self, id: Option<&'a str>) -> Option<&'a str> {
        id.filter(|id| self.apps.contains_key(*id))
    }

    /// What `/metrics` reports beyond the counters: read now from where it is kept.
    pub fn scrape(&self) -> Scrape {
        let mut queues: Vec<_> = self.apps.values().map(|a| (a.id.clone(), a.registry.queued_bytes())).collect();
        queues.sort_by(|a, b| a.0.cmp(&b.0));
        let plugins = self
            .plugins
            .load()
            .pools()
            .into_iter()
            .map(|pool| {
                let (latency_buckets, latency_sum_seconds, latency_count) =
                    pool.latency_histogram(&crate::metrics::PLUGIN_LATENCY_BOUNDS);
                PluginScrape { snapshot: pool.snapshot(), latency_buckets, latency_sum_seconds, latency_count }
            })
            .collect();
        let cluster = self.cluster.get().map(|c| ClusterScrape {
            connected: c.is_connected(),
            live_nodes: c.membership.live().len(),
            published: c.sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
        });
        Scrape { node_id: self.node.id.clone(), draining: self.is_draining(), queues, plugins, cluster }
    }

    pub fn started_secs(&self) -> u64 {
        self.started_secs
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn app(&self, id: &str) -> Option<&Arc<App>> {
        self.apps.get(id)
    }

    pub fn apps(&self) -> impl Iterator<Item = &Arc<App>> {
        self.apps.values()
    }

    /// The plugin set in force now.
    pub fn plugins(&self) -> arc_swap::Guard<Arc<PluginSet>> {
        self.plugins.load()
    }

    /// A token cancelled when the node starts shutting down, for listeners and background
    /// tasks to wait on. It is a child of the node's own: cancelling it stops only its
    /// holder. A shutdown starts with [`shut_down`](Self::shut_down), which sessions hear of.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.child_token()
    }

    /// Starts shutting down: listeners stop accepting and every session says goodbye (a
    /// `reconnect` frame). Sessions are told through their own kick signal, so that waiting
    /// for a shutdown costs them nothing shared per message.
    pub fn shut_down(&self) {
        // Before the sweep: a session registering meanwhile either is swept or sees the
        // flag right after registering (`session::start`).
        self.stopping.store(true, Ordering::SeqCst);
        self.shutdown.cancel();
        for session in self.sessions() {
            session.control.kick(ErrorCode::ServerShutdown);
        }
    }

    /// Every session of every app on this node, now.
    fn sessions(&self) -> Vec<SessionHandle> {
        self.apps.values().flat_map(|a| a.registry.all_sessions()).map(|(_, h)| h).collect()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Takes a connection slot, or `None` when the node is full.
    pub fn try_admit(self: &Arc<Self>) -> Option<ConnGuard> {
        let max = self.config.limits.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ConnGuard { hub: self.clone() })
    }

    /// Connections currently held (authenticated or still handshaking).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Decides who a connecting client is: the app's JWT check, its authenticator plugin, or
    /// both in turn, as the app is configured.
    pub fn authenticate(&self, req: &ConnectRequest) -> Result<Identity, AuthRefusal> {
        let app = req.app_id.as_deref().and_then(|id| self.apps.get(id)).ok_or(ErrorCode::UnknownApp)?;
        let token = req.token.as_deref().unwrap_or_default();
        let plugins = self.plugins.load();
        let Some(auth) = &plugins.app(&app.id).auth else {
            let uid = app.jwt.verify(token)?;
            return Ok(Identity { app: app.clone(), uid, metadata: Vec::new() });
        };
        let verified = match auth.mode {
            AuthMode::AfterJwt => Some(app.jwt.verify(token)?),
            AuthMode::Replace => None,
        };
        let remote = req.remote.to_string();
        let request = AuthRequest {
            app_id: &app.id,
            token,
            transport: req.transport,
            remote_addr: &remote,
            params: &req.params,
            verified_uid: verified.as_deref(),
        };
        match auth.pool.authenticate(&request) {
            Ok(AuthOutcome::Accept { uid, metadata }) => Ok(Identity { app: app.clone(), uid, metadata }),
            Ok(AuthOutcome::Reject { code, message }) => {
                Err(AuthRefusal { code: ErrorCode::AuthRejected, message, reason: Some(code) })
            }
            Err(failure) => {
                warn!(plugin = auth.pool.plugin_name(), app = %app.id, kind = failure.kind.as_str(), error = %failure, "authenticator failed; refusing the connection");
                Err(AuthRefusal {
                    code: ErrorCode::AuthUnavailable,
                    message: "the app's authenticator is failing; try again later".into(),
                    reason: None,
                })
            }
        }
    }

    /// Whether `app` has filters: a session then reads a burst of sends before handling
    /// them, so that the filters see them together ([`Hub::filter_burst`]).
    pub fn filters_messages(&self, app: &App) -> bool {
        !self.plugins.load().app(&app.id).filters.is_empty()
    }

    /// Runs the app's filters over one message, in order. Returns the data to deliver when
    /// a filter rewrote it, or why it must not be delivered.
    fn filter(&self, msg: &FilterMessage<'_>, max_bytes: usize) -> Result<Option<Box<RawValue>>, Refused> {
        if self.plugins.load().app(msg.app_id).filters.is_empty() {
            return Ok(None);
        }
        self.filter_many(std::slice::from_ref(msg), max_bytes).pop().expect("one answer per message")
    }

    /// Runs the app's filters over messages of one sender, each filter over all the
    /// messages still standing (one call for them all where the filter takes batches), and
    /// counts the refusals. Per message, in order: the data to deliver when a filter rewrote
    /// it, or why it must not be delivered.
    pub fn filter_burst(
        &self,
        app: &App,
        msgs: &[FilterMessage<'_>],
        max_bytes: usize,
    ) -> Vec<Result<Option<Box<RawValue>>, Refused>> {
        let answers = self.filter_many(msgs, max_bytes);
        for refused in answers.iter().filter_map(|a| a.as_ref().err()) {
            app.metrics.denied(refused.code);
        }
        answers
    }

    fn filter_many(&self, msgs: &[FilterMessage<'_>], max_bytes: usize) -> Vec<Result<Option<Box<RawValue>>, Refused>> {
        let mut answers: Vec<Result<Option<Box<RawValue>>, Refused>> = msgs.iter().map(|_| Ok(None)).collect();
        let Some(first) = msgs.first() else { return answers };
        let plugins = self.plugins.load();
        // While no filter has refused or rewritten anything, the next one sees `msgs` as
        // they are.
        let mut untouched = true;
        for pool in &plugins.app(first.app_id).filters {
            let (standing, verdicts) = if untouched {
                (None, pool.filter_many(msgs, max_bytes))
            } else {
                // The messages no filter has refused yet, with the data the filters before left.
                let (mut standing, mut batch) = (Vec::with_capacity(msgs.len()), Vec::with_capacity(msgs.len()));
                for (i, (m, answer)) in msgs.iter().zip(&answers).enumerate() {
                    if let Ok(rewritten) = answer {
                        standing.push(i);
                        batch.push(FilterMessage { data: rewritten.as_deref().unwrap_or(m.data), ..*m });
                    }
                }
                if standing.is_empty() {
                    break;
                }
                let verdicts = pool.filter_many(&batch, max_bytes);
                (Some(standing), verdicts)
            };
            for (k, verdict) in verdicts.into_iter().enumerate() {
                let i = standing.as_ref().map_or(k, |s| s[k]);
                if !matches!(verdict, Ok(Verdict::Allow)) {
                    untouched = false;
                }
                match verdict {
                    Ok(Verdict::Allow) => {}
                    Ok(Verdict::Deny(reason)) => answers[i] = Err(Refused { code: ErrorCode::Denied, message: reason }),
                    Ok(Verdict::Rewrite(raw)) => answers[i] = Ok(Some(raw)),
                    Err(failure) => match pool.plugin.failure {
                        FailurePolicy::FailOpen => {
                            pool.warn_rate_limited(&failure, "filter failed; failing open, message passes");
                        }
                        FailurePolicy::FailClosed => {
                            pool.warn_rate_limited(&failure, "filter failed; failing closed, message refused");
                            answers[i] = Err(Refused {
                                code: ErrorCode::FilterFailed,
                                message: format!(
                                    "filter {} failed ({}); the message was not delivered",
                                    pool.plugin_name(),
                                    failure.kind.as_str()
                                ),
                            });
                        }
                    },
                }
            }
        }
        answers
    }

    /// Delivers to this node's sessions of `target`.
    pub fn deliver_local(&self, target: Target<'_>, frame: &Frame) -> Delivered {
        let (Target::User { app, .. } | Target::Channel { app, .. }) = target;
        match self.apps.get(app) {
            Some(app) => Self::deliver_in(app, target, frame),
            None => Delivered::default(),
        }
    }

    /// Delivers to this node's sessions of `target`, which is in `app`.
    fn deliver_in(app: &App, target: Target<'_>, frame: &Frame) -> Delivered {
        let delivered = match target {
            Target::User { uid, .. } => app.registry.deliver(uid, frame),
            Target::Channel { channel, .. } => app.registry.deliver_channel(channel, frame),
        };
        if delivered.sessions != 0 {
            app.metrics.delivered.inc_by(delivered.sessions as u64);
        }
        if delivered.dropped != 0 {
            app.metrics.dropped.inc_by(delivered.dropped as u64);
        }
        delivered
    }

    /// Delivers `frame` to `target` on this node and, in a cluster, publishes it to the
    /// other nodes that hold the target (asking for their counts when `wants_count`).
    async fn deliver(&self, app: &App, target: Target<'_>, frame: Frame, wants_count: bool) -> Delivery {
        debug_assert!(matches!(target, Target::User { app: id, .. } | Target::Channel { app: id, .. } if id == app.id));
        let local = Self::deliver_in(app, target, &frame);
        let Some(cluster) = self.cluster.get() else {
            return Delivery { local, remote: RemoteDelivery::Single };
        };
        let remote = match wants_count {
            false => match cluster.publish_unanswered(target, &frame).await {
                true => RemoteDelivery::Unanswered,
                false => RemoteDelivery::Unavailable,
            },
            true => match cluster.publish(target, &frame).await {
                Some(pending) => RemoteDelivery::Pending(pending),
                None => RemoteDelivery::Unavailable,
            },
        };
        Delivery { local, remote }
    }

    /// Encodes one message that passed the filters, with `rewritten` data if they rewrote it.
    /// `conversation`: a direct message's conversation id, if the caller knows it already.
    fn encode(
        app: &App,
        msg: &FilterMessage<'_>,
        rewritten: Option<&RawValue>,
        channel: Option<&str>,
        conversation: Option<&str>,
    ) -> Frame {
        let data = rewritten.unwrap_or(msg.data);
        let conversation = match (channel, conversation) {
            (Some(c), _) => Cow::Owned(format!("c:{c}")),
            (None, Some(known)) => {
                debug_assert_eq!(known, conversation_id(&app.id, msg.from, msg.to), "a stale conversation id");
                Cow::Borrowed(known)
            }
            (None, None) => Cow::Owned(conversation_id(&app.id, msg.from, msg.to)),
        };
        encode_message(&Envelope {
            from: msg.from,
            to: msg.to,
            channel,
            event: msg.event,
            data,
            msg_id: msg.msg_id,
            send_at: msg.send_at,
            conversation_id: &conversation,
        })
    }

    /// A new message's id and time (Unix milliseconds), now.
    pub fn stamp(&self) -> (MsgId, u64) {
        self.stamp_at(now_ms())
    }

    /// A new message's id, for a message received at `send_at` (Unix milliseconds).
    pub fn stamp_at(&self, send_at: u64) -> (MsgId, u64) {
        (self.ids.next_at(send_at), send_at)
    }

    /// Delivers a direct message from `from` to every connection of `to` in `app`, on every
    /// node, after the app's filters.
    pub async fn send_direct(&self, app: &App, from: Sender<'_>, to: &str, data: &RawValue) -> Result<Sent, Refused> {
        let max_bytes = self.config.limits.max_frame_bytes;
        self.send_from(app, from, Target::User { app: &app.id, uid: to }, data, max_bytes).await
    }

    /// Publishes to every subscriber of `channel` in `app`, on every node, after the app's
    /// filters (which see the channel as `to` and event 2).
    pub async fn publish_channel(
        &self,
        app: &App,
        from: Sender<'_>,
        channel: &str,
        data: &RawValue,
        max_bytes: usize,
    ) -> Result<Sent, Refused> {
        self.send_from(app, from, Target::Channel { app: &app.id, channel }, data, max_bytes).await
    }

    /// One message from one sender to a user or a channel: filtered, encoded once,
    /// delivered here and on the other nodes.
    async fn send_from(
        &self,
        app: &App,
        from: Sender<'_>,
        target: Target<'_>,
        data: &RawValue,
        max_bytes: usize,
    ) -> Result<Sent, Refused> {
        let (msg_id, send_at) = self.stamp_at(from.received_at);
        let msg = Self::message(app, from, target, data, &msg_id, send_at);
        let rewritten = self.filter(&msg, max_bytes).inspect_err(|refused| app.metrics.denied(refused.code))?;
        Ok(self.send_filtered(app, from, target, data, rewritten.as_deref(), msg_id, send_at).await)
    }

    /// What the filters see of a message from `from` to `target`.
    pub fn message<'a>(
        app: &'a App,
        from: Sender<'a>,
        target: Target<'a>,
        data: &'a RawValue,
        msg_id: &'a str,
        send_at: u64,
    ) -> FilterMessage<'a> {
        let (to, event) = match target {
            Target::User { uid, .. } => (uid, EVENT_DIRECT),
            Target::Channel { channel, .. } => (channel, EVENT_CHANNEL),
        };
        FilterMessage {
            app_id: &app.id,
            from: from.uid,
            to,
            event,
            data,
            msg_id,
            send_at,
            sender_metadata: from.metadata,
        }
    }

    /// Encodes and delivers a stamped message the filters let through (`rewritten`: the
    /// data they put in its place), here and on the other nodes.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_filtered(
        &self,
        app: &App,
        from: Sender<'_>,
        target: Target<'_>,
        data: &RawValue,
        rewritten: Option<&RawValue>,
        msg_id: MsgId,
        send_at: u64,
    ) -> Sent {
        let msg = Self::message(app, from, target, data, &msg_id, send_at);
        let channel = match target {
            Target::User { .. } => None,
            Target::Channel { channel, .. } => Some(channel),
        };
        let frame = Self::encode(app, &msg, rewritten, channel, from.conversation);
        let delivery = self.deliver(app, target, frame, from.wants_count).await;
        Sent { msg_id, send_at, delivery }
    }

    /// Delivers one pushed message to each recipient (filtered per recipient), on every
    /// node; one `msg_id` for all of them. Waits for the other nodes' counts.
    pub async fn push(
        &self,
        app: &App,
        from: &str,
        recipients: &[String],
        data: &RawValue,
    ) -> (MsgId, u64, Vec<Recipient>) {
        app.metrics.from_push.inc();
        let (msg_id, send_at) = self.stamp();
        let max_bytes = self.config.limits.max_http_body_bytes;
        // An app server has no connection metadata, and waits for every node's count.
        let sender = Sender { uid: from, metadata: &[], wants_count: true, conversation: None, received_at: send_at };
        let msgs: Vec<FilterMessage<'_>> = recipients
            .iter()
            .map(|to| Self::message(app, sender, Target::User { app: &app.id, uid: to }, data, &msg_id, send_at))
            .collect();
        // One filter call for all the recipients where the filter takes batches.
        let answers = self.filter_burst(app, &msgs, max_bytes);
        let mut deliveries = Vec::with_capacity(recipients.len());
        for (msg, answer) in msgs.iter().zip(answers) {
            deliveries.push(match answer {
                Ok(rewritten) => {
                    let frame = Self::encode(app, msg, rewritten.as_deref(), None, None);
                    Ok(self.deliver(app, Target::User { app: &app.id, uid: msg.to }, frame, true).await)
                }
                Err(refused) => Err(refused),
            });
        }
        // The other nodes answer in parallel.
        let outcomes = futures_util::future::join_all(deliveries.into_iter().map(|d| async move {
            match d {
                Ok(delivery) => Ok(delivery.finish().await),
                Err(refused) => Err(refused),
            }
        }))
        .await;
        let results = recipients
            .iter()
            .zip(outcomes)
            .map(|(uid, outcome)| match outcome {
                Ok(o) => {
                    app.metrics.push_recipient(o.status());
                    Recipient { uid: uid.clone(), outcome: o, refused: None }
                }
                Err(refused) => {
                    app.metrics.push_recipient(refused.code.as_str());
                    Recipient { uid: uid.clone(), outcome: Outcome::default(), refused: Some(refused) }
                }
            })
            .collect();
        (msg_id, send_at, results)
    }

    /// Joins a session to a channel (and, for the first local subscriber, subscribes this
    /// node to the channel in the cluster, waiting until NATS has the subscription).
    pub async fn join_channel(&self, app: &App, channel: &str, handle: SessionHandle) {
        if app.registry.join(channel, handle)
            && let Some(c) = self.cluster.get()
        {
            c.add_interest(Target::Channel { app: &app.id, channel }).await;
        }
    }

    pub fn leave_channel(&self, app: &App, channel: &str, conn_id: u64) {
        if app.registry.leave(channel, conn_id)
            && let Some(c) = self.cluster.get()
        {
            c.remove_interest(Target::Channel { app: &app.id, channel });
        }
    }

    /// Registers a session (and, for the user's first session here, subscribes this node
    /// to the user in the cluster, waiting until NATS has the subscription).
    pub async fn register(&self, app: &App, uid: &str, handle: SessionHandle) -> Result<(), ErrorCode> {
        let first = app.registry.register(uid, handle, self.config.limits.max_connections_per_user)?;
        if first && let Some(c) = self.cluster.get() {
            c.add_interest(Target::User { app: &app.id, uid }).await;
        }
        Ok(())
    }

    pub fn unregister(&self, app: &App, uid: &str, conn_id: u64) {
        if app.registry.unregister(uid, conn_id)
            && let Some(c) = self.cluster.get()
        {
            c.remove_interest(Target::User { app: &app.id, uid });
        }
    }

    /// The cluster this node is part of, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Attaches the cluster (once, at start-up).
    pub fn set_cluster(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// This node as the registry describes it.
    pub fn node_record(&self) -> NodeRecord {
        let c = self.config.cluster.as_ref();
        NodeRecord {
            id: self.node.id.clone(),
            external: self.node.external.clone(),
            intranet: self.node.intranet.clone(),
            region: c.and_then(|c| c.region.clone()),
            lat: c.and_then(|c| c.lat),
            lon: c.and_then(|c| c.lon),
            connections: self.connections() as u64,
            capacity: c.and_then(|c| c.capacity).unwrap_or(self.config.limits.max_connections as u64),
            draining: self.is_draining(),
            heartbeat_ms: now_ms(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// The nodes users can be routed to: every live node of the cluster, or this one.
    pub fn route_nodes(&self) -> Vec<NodeRecord> {
        match self.cluster.get() {
            Some(c) => c.membership.live(),
            None => vec![self.node_record()],
        }
    }

    /// Which node each user should connect to, grouped by node in WuKongIM's shape: the
    /// app's router plugin (or the global one) decides among the live nodes, with
    /// rendezvous hashing as the fallback when there is none or it fails.
    pub fn route(&self, app_id: Option<&str>, users: &[RouteUser], intranet: bool) -> Vec<RouteGroup> {
        if users.is_empty() {
            return Vec::new();
        }
        let members = self.route_nodes();
        let nodes: Vec<RouteNode> = members
            .iter()
            .map(|m| RouteNode {
                id: m.id.clone(),
                region: m.region.clone(),
                lat: m.lat,
                lon: m.lon,
                connections: m.connections,
                capacity: m.capacity,
                draining: m.draining,
            })
            .collect();
        let plugins = self.plugins.load();
        let router = match app_id {
            Some(id) => plugins.app(id).router.as_ref(),
            None => plugins.global_router.as_ref(),
        };
        let assignment = routing::assign(router.map(|r| &**r), app_id.unwrap_or("*"), users, &nodes);
        let mut groups: Vec<(usize, RouteGroup)> = Vec::new();
        for (user, node) in users.iter().zip(assignment) {
            match groups.iter_mut().find(|(n, _)| *n == node) {
                Some((_, g)) => g.uids.push(user.uid.clone()),
                None => {
                    let m = &members[node];
                    let addrs = if intranet { &m.intranet } else { &m.external };
                    groups.push((node, RouteGroup { uids: vec![user.uid.clone()], addrs: addrs.clone() }));
                }
            }
        }
        groups.into_iter().map(|(_, g)| g).collect()
    }

    /// The node `uid` should move to when this one goes away: `None` when that is this
    /// node (a single node has nowhere else to send its clients).
    pub fn new_home(&self, uid: &str) -> Option<Addrs> {
        let user = RouteUser { uid: uid.into(), ..RouteUser::default() };
        let group = self.route(None, std::slice::from_ref(&user), false).into_iter().next()?;
        (group.addrs != self.node.external).then_some(group.addrs)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Leaves routing at once, then moves every client to its new node, spread over
    /// `window` so that the others are not hit by a reconnect storm. Returns how many
    /// connections were asked to move.
    pub async fn drain(self: &Arc<Self>, window: Duration) -> usize {
        if self.draining.swap(true, Ordering::AcqRel) {
            return 0;
        }
        if let Some(c) = self.cluster.get() {
            c.membership.update(|r| r.draining = true);
            if let Err(e) = c.membership.publish().await {
                warn!(error = %e, "could not announce draining; other nodes will see it at the next heartbeat");
            }
        }
        let sessions = self.sessions();
        let n = sessions.len();
        info!(connections = n, ?window, "draining: moving clients to other nodes");
        let started = tokio::time::Instant::now();
        for (i, s) in sessions.into_iter().enumerate() {
            let at = started + window.mul_f64(i as f64 / n.max(1) as f64);
            tokio::time::sleep_until(at).await;
            s.control.kick(ErrorCode::NodeDraining);
        }
        n
    }

    /// Re-reads the plugin configuration (from the config file when the node was started
    /// from one) and the plugin files, builds and initialises the new set off the async
    /// runtime, and swaps it in. On any failure the running set stays and the error says
    /// why. Connections are not touched.
    pub async fn reload_plugins(&self) -> Result<u64, PluginError> {
        let _one_at_a_time = self.reloading.lock().await;
        let config = match &self.config.source {
            Some(path) => Config::load(path).map_err(|e| PluginError::Config(e.to_string()))?,
            None => self.config.clone(),
        };
        let generation = self.plugins.load().generation + 1;
        let set = tokio::task::spawn_blocking(move || PluginSet::load(&config, generation))
            .await
            .map_err(|e| PluginError::Config(format!("plugin loading panicked: {e}")))??;
        let names: Vec<&str> = set.plugins.keys().map(String::as_str).collect();
        info!(generation, plugins = ?names, "plugins reloaded");
        self.plugins.store(Arc::new(set));
        Ok(generation)
    }

    pub fn addrs(&self, intranet: bool) -> &Addrs {
        if intranet { &self.node.intranet } else { &self.node.external }
    }
}
