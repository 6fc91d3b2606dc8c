//! The node's shared state and the one delivery pipeline every entry point uses.
//!
//! Sessions (client sends) and the HTTP API (pushes) both come here to authenticate, to
//! stamp a message with its id and time, and to hand it to the recipients' sessions. The
//! hub owns the apps and their registries; it does not do I/O itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::auth::Secret;
use crate::auth::jwt::JwtVerifier;
use crate::auth::nonce::NonceStore;
use crate::cluster::{Addrs, NodeInfo};
use crate::config::Config;
use crate::protocol::{EVENT_DIRECT, Envelope, ErrorCode, MsgIdGen, conversation_id, encode_message, now_ms};
use crate::registry::Registry;

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
    pub fn new(config: Config, node: NodeInfo) -> Arc<Self> {
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

    /// Checks a client's credentials: the app must exist and the token must be its.
    pub fn authenticate(&self, app_id: Option<&str>, token: Option<&str>) -> Result<(Arc<App>, String), ErrorCode> {
        let app = app_id.and_then(|id| self.apps.get(id)).ok_or(ErrorCode::UnknownApp)?;
        let uid = app.jwt.verify(token.unwrap_or_default())?;
        Ok((app.clone(), uid))
    }

    /// Delivers a direct message from `from` to every connection of `to` in `app`.
    pub async fn send_direct(&self, app: &App, from: &str, to: &str, data: &RawValue) -> Sent {
        let msg_id = self.ids.next();
        let send_at = now_ms();
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
        Sent { msg_id, send_at, delivered: d.sessions, dropped: d.dropped }
    }

    /// Delivers one pushed message to each recipient; one `msg_id` for all of them.
    pub async fn push(
        &self,
        app: &App,
        from: &str,
        recipients: &[String],
        data: &RawValue,
    ) -> (String, u64, Vec<Recipient>) {
        let msg_id = self.ids.next();
        let send_at = now_ms();
        let results = recipients
            .iter()
            .map(|to| {
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
                Recipient { uid: to.clone(), connections: d.sessions, dropped: d.dropped }
            })
            .collect();
        (msg_id, send_at, results)
    }

    /// Which node each user should connect to. On one node, every user gets this node.
    pub fn route(&self, uids: Vec<String>, intranet: bool) -> Vec<RouteGroup> {
        if uids.is_empty() {
            return Vec::new();
        }
        vec![RouteGroup { uids, addrs: self.addrs(intranet).clone() }]
    }

    /// The node one user should connect to.
    pub fn route_user(&self, _uid: Option<&str>, intranet: bool) -> Addrs {
        self.addrs(intranet).clone()
    }

    pub fn addrs(&self, intranet: bool) -> &Addrs {
        if intranet { &self.node.intranet } else { &self.node.external }
    }
}
