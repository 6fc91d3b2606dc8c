//! Many nodes over NATS: per-user and per-channel interest subjects, the message envelope,
//! and gathering delivery counts from the nodes that hold a recipient.
//!
//! A node subscribes to `{prefix}.u.{app}.{user}` while it holds at least one connection of
//! that user, and to `{prefix}.c.{app}.{channel}` while a local connection subscribes to the
//! channel. A message is published once to the recipient's subject, so NATS delivers it to
//! exactly the nodes with interest and to no other. Each receiving node delivers it locally
//! and answers the publisher's reply subject with how many connections took it; with no
//! interest anywhere, the NATS server itself answers "no responders" at once. See
//! docs/cluster.md.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, StatusCode};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::membership::{Membership, NodeRecord};
use crate::config::{ClusterConfig, Config};
use crate::hub::Hub;
use crate::protocol::Frame;
use crate::registry::Delivered;

/// What a message is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    User { app: &'a str, uid: &'a str },
    Channel { app: &'a str, channel: &'a str },
}

/// What the other nodes did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// No other node holds the recipient.
    Nobody,
    /// Other nodes took it: connections reached and dropped (slow consumers).
    Delivered(Delivered),
    /// The cluster could not be asked (NATS unreachable) or did not answer in time.
    Unavailable,
}

/// A subject token for a user id or channel name: as is when it is a safe token, else a
/// hash (user ids may hold characters NATS subjects cannot). The two forms never collide:
/// hashed tokens start with `~`, which a safe token never contains.
fn token(s: &str) -> String {
    if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        s.to_string()
    } else {
        use sha2::{Digest, Sha256};
        format!("~{}", hex::encode(&Sha256::digest(s.as_bytes())[..16]))
    }
}

/// The wire envelope: kind (`u`/`c`), app, target, then the client frame itself, so the
/// receiving node passes the frame's bytes straight to its sockets.
fn envelope(target: Target<'_>, frame: &Frame) -> Bytes {
    let (kind, app, name) = match target {
        Target::User { app, uid } => (b'u', app, uid),
        Target::Channel { app, channel } => (b'c', app, channel),
    };
    let mut b = BytesMut::with_capacity(4 + app.len() + name.len() + frame.len());
    b.put_u8(kind);
    b.put_u8(app.len() as u8);
    b.put_slice(app.as_bytes());
    b.put_u16(name.len() as u16);
    b.put_slice(name.as_bytes());
    b.put_slice(frame.as_bytes());
    b.freeze()
}

fn open_envelope(mut b: Bytes) -> Option<(u8, String, String, Frame)> {
    use bytes::Buf;
    if b.remaining() < 2 {
        return None;
    }
    let kind = b.get_u8();
    let app_len = b.get_u8() as usize;
    if b.remaining() < app_len + 2 {
        return None;
    }
    let app = String::from_utf8(b.split_to(app_len).to_vec()).ok()?;
    let name_len = b.get_u16() as usize;
    if b.remaining() < name_len {
        return None;
    }
    let name = String::from_utf8(b.split_to(name_len).to_vec()).ok()?;
    let frame = Frame::try_from(b).ok()?;
    Some((kind, app, name, frame))
}

/// An answer to one of our publishes.
enum Answer {
    NoResponders,
    Took(Delivered),
}

/// A publish whose answers are being collected.
pub struct Pending {
    cluster: Arc<Cluster>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Answer>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("id", &self.id).finish()
    }
}

impl Pending {
    /// Waits for the answers: done at "no responders", or `gather_window` after the last
    /// answer, or at `request_timeout`.
    pub async fn wait(mut self) -> Remote {
        let deadline = Instant::now() + self.cluster.request_timeout;
        let mut total = Delivered::default();
        let mut answered = false;
        loop {
            let until = if answered { (Instant::now() + self.cluster.gather_window).min(deadline) } else { deadline };
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(Answer::NoResponders)) => {
                    break if answered { Remote::Delivered(total) } else { Remote::Nobody };
                }
                Ok(Some(Answer::Took(d))) => {
                    total.sessions += d.sessions;
                    total.dropped += d.dropped;
                    answered = true;
                }
                Ok(None) => break Remote::Unavailable,
                Err(_) => break if answered { Remote::Delivered(total) } else { Remote::Unavailable },
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.cluster.waiting.lock().expect("gather lock").remove(&self.id);
    }
}

/// This node's part in the cluster.
pub struct Cluster {
    client: Client,
    prefix: String,
    /// `{prefix}.r.{node id}`: our reply subjects are `{inbox}.{id}`.
    inbox: String,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<Answer>>>,
    /// Forwarding task per subscribed subject, with how many local holders want it.
    interest: Mutex<HashMap<String, (usize, JoinHandle<()>)>>,
    hub: Weak<Hub>,
    gather_window: Duration,
    request_timeout: Duration,
    pub membership: Arc<Membership>,
    /// Messages received from and sent to other nodes (for metrics).
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("prefix", &self.prefix).field("inbox", &self.inbox).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.urls: cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
    #[error("cluster: {0}")]
    Setup(String),
}

async fn connect(config: &Config, c: &ClusterConfig, node_id: &str) -> Result<Client, ClusterError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("switchboard {node_id}"))
        // Our own publishes never come back to our own subscriptions: a node delivers its
        // local recipients itself.
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => warn!("NATS connection lost; reconnecting"),
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => debug!(event = %other, "NATS event"),
            }
        });
    if let Some(token) = &c.token {
        options = options.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&c.user, &c.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(creds) = &c.credentials_file {
        options = options.credentials_file(config.resolve(creds)).await.map_err(|e| ClusterError::Connect {
            urls: c.urls.join(","),
            message: format!("cluster.credentials_file: {e}"),
        })?;
    }
    if let Some(ca) = &c.tls_ca_file {
        options = options.add_root_certificates(config.resolve(ca)).require_tls(true);
    } else if c.require_tls {
        options = options.require_tls(true);
    }
    let urls: Vec<async_nats::ServerAddr> = c
        .urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| ClusterError::Connect { urls: c.urls.join(","), message: e.to_string() })?;
    // retry_on_initial_connect makes connect() return at once; wait (bounded) for the first
    // connection so that start-up fails loudly when NATS is unreachable.
    let client = options
        .connect(urls)
        .await
        .map_err(|e| ClusterError::Connect { urls: c.urls.join(","), message: e.to_string() })?;
    let started = Instant::now();
    while client.connection_state() != State::Connected {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(ClusterError::Connect { urls: c.urls.join(","), message: "no connection within 10 s".into() });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(client)
}

impl Cluster {
    /// Connects to NATS, joins the node registry and starts answering for this node.
    pub async fn start(hub: &Arc<Hub>, me: NodeRecord) -> Result<Arc<Self>, ClusterError> {
        let config = hub.config();
        let c = config.cluster.as_ref().ok_or_else(|| ClusterError::Setup("no [cluster] section".into()))?;
        let client = connect(config, c, &me.id).await?;
        let js = async_nats::jetstream::new(client.clone());
        let membership = Membership::join(&js, format!("{}_nodes", c.subject_prefix), c.ttl, me.clone())
            .await
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
        let inbox = format!("{}.r.{}", c.subject_prefix, me.id);
        let cluster = Arc::new(Self {
            client,
            prefix: c.subject_prefix.clone(),
            inbox: inbox.clone(),
            next_id: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            interest: Mutex::new(HashMap::new()),
            hub: Arc::downgrade(hub),
            gather_window: c.gather_window,
            request_timeout: c.request_timeout,
            membership: membership.clone(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        });
        // Answers to our publishes.
        let mut answers = cluster
            .client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| ClusterError::Setup(format!("cannot subscribe to replies: {e}")))?;
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            while let Some(msg) = answers.next().await {
                let Some(cluster) = weak.upgrade() else { return };
                let Some(id) = msg.subject.rsplit('.').next().and_then(|s| s.parse::<u64>().ok()) else { continue };
                let answer = if msg.status == Some(StatusCode::NO_RESPONDERS) {
                    Answer::NoResponders
                } else {
                    let text = std::str::from_utf8(&msg.payload).unwrap_or("");
                    let mut parts = text.split(' ').map(|p| p.parse::<usize>().unwrap_or(0));
                    Answer::Took(Delivered { sessions: parts.next().unwrap_or(0), dropped: parts.next().unwrap_or(0) })
                };
                if let Some(tx) = cluster.waiting.lock().expect("gather lock").get(&id) {
                    let _ = tx.send(answer);
                }
            }
        });
        let hub_for_count = Arc::downgrade(hub);
        membership.spawn(
            c.heartbeat,
            move || hub_for_count.upgrade().map_or(0, |h| h.connections() as u64),
            hub.shutdown_token(),
        );
        Ok(cluster)
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn subject(&self, target: Target<'_>) -> String {
        match target {
            Target::User { app, uid } => format!("{}.u.{app}.{}", self.prefix, token(uid)),
            Target::Channel { app, channel } => format!("{}.c.{app}.{}", self.prefix, token(channel)),
        }
    }

    /// One more local holder of `target` (a connection of the user, a channel subscriber):
    /// the first makes this node subscribe. The returned future resolves once the NATS
    /// server has the subscription (bounded: NATS may be unreachable), so that a client told
    /// "connected" is reachable from every node attached to the same NATS server.
    pub fn add_interest(self: &Arc<Self>, target: Target<'_>) -> impl std::future::Future<Output = ()> + use<> {
        let subject = self.subject(target);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let mut interest = self.interest.lock().expect("interest lock");
        if let Some((count, _)) = interest.get_mut(&subject) {
            *count += 1;
            let _ = ready_tx.send(());
        } else {
            let (client, weak, subj) = (self.client.clone(), Arc::downgrade(self), subject.clone());
            let barrier = format!("{}.barrier", self.inbox);
            let task = tokio::spawn(async move {
                let mut sub = match client.subscribe(subj.clone()).await {
                    Ok(sub) => sub,
                    Err(e) => {
                        warn!(subject = %subj, error = %e, "cannot subscribe; this node will not receive it");
                        return;
                    }
                };
                // A round trip to the server proves it has the subscription.
                // A round trip through the server proves it has processed the SUB: a request
                // to a subject nobody serves is answered "no responders" by the server itself,
                // after everything this connection sent before it. (A flush only proves the
                // bytes left this process.)
                let _ = tokio::time::timeout(Duration::from_secs(2), client.request(barrier, Bytes::new())).await;
                let _ = ready_tx.send(());
                Self::forward(&mut sub, &weak).await;
            });
            interest.insert(subject, (1, task));
        }
        async move {
            let _ = ready_rx.await;
        }
    }

    async fn forward(sub: &mut async_nats::Subscriber, weak: &Weak<Self>) {
        {
            while let Some(msg) = sub.next().await {
                let Some(cluster) = weak.upgrade() else { return };
                cluster.on_message(msg).await;
            }
        }
    }

    /// One fewer local holder; the last makes this node unsubscribe.
    pub fn remove_interest(&self, target: Target<'_>) {
        let subject = self.subject(target);
        let mut interest = self.interest.lock().expect("interest lock");
        if let Some((count, _)) = interest.get_mut(&subject) {
            *count -= 1;
            if *count == 0
                && let Some((_, task)) = interest.remove(&subject)
            {
                // Dropping the subscriber (with the task) unsubscribes.
                task.abort();
            }
        }
    }

    /// Subjects this node is subscribed to (users and channels held here).
    pub fn interest_count(&self) -> usize {
        self.interest.lock().expect("interest lock").len()
    }

    async fn on_message(&self, msg: async_nats::Message) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let Some(hub) = self.hub.upgrade() else { return };
        let Some((kind, app, name, frame)) = open_envelope(msg.payload) else {
            debug!(subject = %msg.subject, "ignoring a message with an unreadable envelope");
            return;
        };
        let delivered = match kind {
            b'u' => hub.deliver_local(Target::User { app: &app, uid: &name }, &frame),
            b'c' => hub.deliver_local(Target::Channel { app: &app, channel: &name }, &frame),
            _ => return,
        };
        if let Some(reply) = msg.reply
            && let Err(e) =
                self.client.publish(reply, format!("{} {}", delivered.sessions, delivered.dropped).into()).await
        {
            debug!(error = %e, "cannot answer a delivery");
        }
    }

    /// Publishes a message to the nodes holding `target`; the returned [`Pending`] collects
    /// their answers. `None` when NATS is unreachable right now: the caller reports that,
    /// rather than letting the client library buffer the message and claiming success.
    pub async fn publish(self: &Arc<Self>, target: Target<'_>, frame: &Frame) -> Option<Pending> {
        if !self.is_connected() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.waiting.lock().expect("gather lock").insert(id, tx);
        // Dropped unpublished, it takes its entry out of `waiting` again.
        let pending = Pending { cluster: self.clone(), id, rx };
        let reply = format!("{}.{id}", self.inbox);
        self.publish_envelope(target, frame, Some(reply)).await.then_some(pending)
    }

    /// Publishes a message to the nodes holding `target` without a reply subject: they
    /// deliver it and answer nothing. False when NATS is unreachable right now.
    pub async fn publish_unanswered(&self, target: Target<'_>, frame: &Frame) -> bool {
        self.is_connected() && self.publish_envelope(target, frame, None).await
    }

    /// Hands the envelope to the NATS client, with `reply` as its reply subject; counts it.
    async fn publish_envelope(&self, target: Target<'_>, frame: &Frame, reply: Option<String>) -> bool {
        let (subject, payload) = (self.subject(target), envelope(target, frame));
        let published = match reply {
            Some(reply) => self.client.publish_with_reply(subject, reply, payload).await,
            None => self.client.publish(subject, payload).await,
        };
        match published {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                debug!(error = %e, "cannot publish to the cluster");
                false
            }
        }
    }

    /// Flushes what was published, so that tests and shutdown know it left this node.
    pub async fn flush(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip() {
        let frame = Frame::from_static(r#"{"type":"message"}"#);
        let b = envelope(Target::User { app: "demo", uid: "böb x" }, &frame);
        let (kind, app, uid, f) = open_envelope(b).unwrap();
        assert_eq!((kind, app.as_str(), uid.as_str(), f.as_str()), (b'u', "demo", "böb x", frame.as_str()));
        assert!(open_envelope(Bytes::from_static(b"u\x05ab")).is_none());
    }

    #[test]
    fn tokens_are_safe_and_distinct() {
        assert_eq!(token("alice_1-x"), "alice_1-x");
        let hashed = token("a.b c>*");
        assert!(hashed.starts_with('~') && !hashed.contains(['.', ' ', '>', '*']));
        assert_ne!(token("a.b"), token("a.c"));
        assert_eq!(token(&"x".repeat(65)).len(), 33);
    }
}
