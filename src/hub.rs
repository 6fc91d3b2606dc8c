//! The node's shared state and the one delivery pipeline every entry point uses.
//!
//! Sessions (client sends) and the HTTP API (pushes) both come here to authenticate, to
//! stamp a message with its id and time, to run the app's filters, and to hand the result
//! to the recipients' sessions. The hub owns the apps, their registries and the current
//! plugin set; it does not do I/O itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::Secret;
use crate::auth::jwt::JwtVerifier;
use crate::auth::nonce::NonceStore;
use crate::cluster::{Addrs, NodeInfo};
use crate::config::{AuthMode, Config, FailurePolicy};
use crate::plugin::{AuthOutcome, AuthRequest, FilterMessage, PluginError, PluginSet, RouteNode, RouteUser, Verdict};
use crate::protocol::{EVENT_DIRECT, Envelope, ErrorCode, MsgIdGen, conversation_id, encode_message, now_ms};
use crate::registry::Registry;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub msg_id: String,
    pub send_at: u64,
    /// Connections the message was handed to.
    pub delivered: usize,
    /// Connections of the recipient that were too slow to take it (and are being closed).
    pub dropped: usize,
}

/// Per-recipient result of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub uid: String,
    pub connections: usize,
    pub dropped: usize,
    /// Set when the app's filters stopped the message for this recipient.
    pub refused: Option<Refused>,
}

/// A set of users and the node they should connect to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
    /// Unix seconds when this node started: pushes signed earlier are refused, because the
    /// nonces that protected them from replay were not remembered across the restart.
    started_secs: u64,
    /// The plugins in force; a reload swaps the whole set at once.
    plugins: ArcSwap<PluginSet>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
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
        let apps = config
            .apps
            .iter()
            .map(|(id, app)| {
                let app = App {
                    id: id.clone(),
                    secret: Secret::new(app.secret.as_bytes()),
                    jwt: JwtVerifier::new(app.secret.as_bytes(), app.token_leeway),
                    registry: Registry::new(config.limits.outbound_queue_bytes),
                    nonces: Mutex::new(NonceStore::new(config.push.nonce_capacity)),
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
            started_secs: now_ms() / 1000,
            plugins: ArcSwap::from_pointee(plugins),
            reloading: tokio::sync::Mutex::new(()),
        })
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

    /// Cancelled when the node starts shutting down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
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

    /// Runs the app's filters over one message, in order. Returns the data to deliver when
    /// a filter rewrote it, or why it must not be delivered.
    fn filter(&self, msg: &FilterMessage<'_>, max_bytes: usize) -> Result<Option<Box<RawValue>>, Refused> {
        let plugins = self.plugins.load();
        let mut rewritten: Option<Box<RawValue>> = None;
        for pool in &plugins.app(msg.app_id).filters {
            let data = rewritten.as_deref().map_or(msg.data, RawValue::get);
            match pool.filter(&FilterMessage { data, ..*msg }, max_bytes) {
                Ok(Verdict::Allow) => {}
                Ok(Verdict::Deny(reason)) => return Err(Refused { code: ErrorCode::Denied, message: reason }),
                Ok(Verdict::Rewrite(raw)) => rewritten = Some(raw),
                Err(failure) => {
                    let name = pool.plugin_name();
                    match pool.plugin.failure {
                        FailurePolicy::FailOpen => {
                            pool.warn_rate_limited(&failure, "filter failed; failing open, message passes");
                        }
                        FailurePolicy::FailClosed => {
                            pool.warn_rate_limited(&failure, "filter failed; failing closed, message refused");
                            return Err(Refused {
                                code: ErrorCode::FilterFailed,
                                message: format!(
                                    "filter {name} failed ({}); the message was not delivered",
                                    failure.kind.as_str()
                                ),
                            });
                        }
                    }
                }
            }
        }
        Ok(rewritten)
    }

    /// Delivers a direct message from `from` to every connection of `to` in `app`, after
    /// the app's filters.
    pub async fn send_direct(
        &self,
        app: &App,
        from: &str,
        from_metadata: &[(String, String)],
        to: &str,
        data: &RawValue,
    ) -> Result<Sent, Refused> {
        let msg_id = self.ids.next();
        let send_at = now_ms();
        let msg = FilterMessage {
            app_id: &app.id,
            from,
            to,
            event: EVENT_DIRECT,
            data: data.get(),
            msg_id: &msg_id,
            send_at,
            sender_metadata: from_metadata,
        };
        let rewritten = self.filter(&msg, self.config.limits.max_frame_bytes)?;
        let data = rewritten.as_deref().unwrap_or(data);
        let conversation = conversation_id(&app.id, from, to);
        let frame = encode_message(&Envelope {
            from,
            to,
            event: EVENT_DIRECT,
            data,
            msg_id: &msg_id,
            send_at,
            conversation_id: &conversation,
        });
        let d = app.registry.deliver(to, &frame);
        Ok(Sent { msg_id, send_at, delivered: d.sessions, dropped: d.dropped })
    }

    /// Delivers one pushed message to each recipient (filtered per recipient); one `msg_id`
    /// for all of them.
    pub async fn push(
        &self,
        app: &App,
        from: &str,
        recipients: &[String],
        data: &RawValue,
    ) -> (String, u64, Vec<Recipient>) {
        let msg_id = self.ids.next();
        let send_at = now_ms();
        let max_bytes = self.config.limits.max_http_body_bytes;
        let results = recipients
            .iter()
            .map(|to| {
                let msg = FilterMessage {
                    app_id: &app.id,
                    from,
                    to,
                    event: EVENT_DIRECT,
                    data: data.get(),
                    msg_id: &msg_id,
                    send_at,
                    sender_metadata: &[],
                };
                let rewritten = match self.filter(&msg, max_bytes) {
                    Ok(r) => r,
                    Err(refused) => {
                        return Recipient { uid: to.clone(), connections: 0, dropped: 0, refused: Some(refused) };
                    }
                };
                let conversation = conversation_id(&app.id, from, to);
                let frame = encode_message(&Envelope {
                    from,
                    to,
                    event: EVENT_DIRECT,
                    data: rewritten.as_deref().unwrap_or(data),
                    msg_id: &msg_id,
                    send_at,
                    conversation_id: &conversation,
                });
                let d = app.registry.deliver(to, &frame);
                Recipient { uid: to.clone(), connections: d.sessions, dropped: d.dropped, refused: None }
            })
            .collect();
        (msg_id, send_at, results)
    }

    /// The nodes users can be routed to. On a single node: this one.
    pub fn route_nodes(&self) -> Vec<(RouteNode, &NodeInfo)> {
        let me = RouteNode {
            id: self.node.id.clone(),
            connections: self.connections() as u64,
            capacity: self.config.limits.max_connections as u64,
            draining: self.is_shutting_down(),
            ..RouteNode::default()
        };
        vec![(me, &self.node)]
    }

    /// Which node each user should connect to, grouped by node in WuKongIM's shape: the
    /// app's router plugin (or the global one) decides, with rendezvous hashing as the
    /// fallback when there is none or it fails.
    pub fn route(&self, app_id: Option<&str>, users: &[RouteUser], intranet: bool) -> Vec<RouteGroup> {
        if users.is_empty() {
            return Vec::new();
        }
        let members = self.route_nodes();
        let nodes: Vec<RouteNode> = members.iter().map(|(n, _)| n.clone()).collect();
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
                    let info = members[node].1;
                    let addrs = if intranet { &info.intranet } else { &info.external };
                    groups.push((node, RouteGroup { uids: vec![user.uid.clone()], addrs: addrs.clone() }));
                }
            }
        }
        groups.into_iter().map(|(_, g)| g).collect()
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
