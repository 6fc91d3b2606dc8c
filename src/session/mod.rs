//! One task per client connection: authentication, the read/write loop, heartbeat,
//! per-connection rate limit and backpressure.
//!
//! Owns everything that happens between "a transport produced a connection" and "the
//! connection is gone". It is generic over [`FrameIo`], so TCP, WS and WSS sessions are the
//! same code. It does not parse transports' framing or decide where messages go (the hub
//! does).

mod rate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng as _;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{Instrument, debug, info_span};

use crate::cluster::nats::Target;
use crate::hub::{App, ConnGuard, Hub, Identity, Outcome, Sender, Sent};
use crate::protocol::{
    ClientFrame, DecodeError, ErrorCode, Frame, SendFrame, ServerFrame, conversation_id, decode_client_frame, now_ms,
};
use crate::registry::{QueueOwner, SessionControl, SessionHandle, Taken};
use crate::transport::{FrameIo, Inbound, Outbound, ReadError, Transport};

use rate::TokenBucket;

/// How long a closing connection gets to take its last frames and say goodbye.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Queued frames written between two flushes (and inbound frames handled between two).
pub(crate) const MAX_BATCH: usize = 64;

/// Inbound frames a session with filters reads before handling them, so that their sends
/// are filtered together. Few enough that the buffers holding them, which live across
/// awaits and so may be freed on another worker thread, stay small: glibc returns a freed
/// chunk over about 1 KiB to the arena of the thread that allocated it, under that arena's
/// lock. With bursts of 64 read at once, 9 % of the server's samples at the peak were
/// threads waiting on that lock (docs/performance.md).
const FILTER_RUN: usize = 12;

/// What a client presented when connecting; the input to authentication.
#[derive(Clone)]
pub struct ConnectRequest {
    pub app_id: Option<String>,
    pub token: Option<String>,
    pub transport: Transport,
    pub remote: SocketAddr,
    /// Other query parameters of a WebSocket upgrade (never the token or `batch`).
    pub params: Vec<(String, String)>,
    /// The client reads batched frames (`batch=1`, docs/protocol.md); the transport joins
    /// them, the session says so in `connected`.
    pub batch: bool,
}

// The token is a credential: keep it out of `{:?}`.
impl std::fmt::Debug for ConnectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRequest")
            .field("app_id", &self.app_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("transport", &self.transport)
            .field("remote", &self.remote)
            .field("params", &self.params)
            .field("batch", &self.batch)
            .finish()
    }
}

impl ConnectRequest {
    /// Reads `app_id`, `token`, `batch` and any other parameters from an upgrade's query
    /// string; fails (with what to tell the client) on a `batch` that is not a boolean.
    pub fn from_query(query: &str, transport: Transport, remote: SocketAddr) -> Result<Self, &'static str> {
        let mut request = Self { app_id: None, token: None, transport, remote, params: Vec::new(), batch: false };
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "app_id" => request.app_id = Some(v.into_owned()),
                "token" => request.token = Some(v.into_owned()),
                "batch" => {
                    request.batch = match &*v {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err("the batch parameter must be 1, true, 0 or false"),
                    }
                }
                _ => request.params.push((k.into_owned(), v.into_owned())),
            }
        }
        Ok(request)
    }
}

/// A human sentence for a connection-ending error code.
pub(crate) fn describe(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::UnknownApp => "app_id is missing or not configured on this node",
        ErrorCode::TokenMissing => "no token was given",
        ErrorCode::TokenMalformed => "the token is not a well-formed JWT",
        ErrorCode::TokenAlgorithm => "the token's algorithm is not HS256",
        ErrorCode::TokenSignature => "the token's signature does not match the app's secret",
        ErrorCode::TokenExpired => "the token has expired",
        ErrorCode::TokenNotYetValid => "the token is not valid yet (nbf)",
        ErrorCode::TokenClaims => "the token needs exp and a sub of 1-128 bytes without control characters",
        ErrorCode::TooManyDevices => "this user already holds limits.max_connections_per_user connections",
        ErrorCode::SlowConsumer => "the connection did not keep up with its messages",
        ErrorCode::IdleTimeout => "nothing was received within heartbeat.idle_timeout",
        ErrorCode::ServerShutdown => "the node is shutting down",
        _ => "connection closed",
    }
}

/// Tells a client why it is being disconnected, then closes, all within [`CLOSE_TIMEOUT`].
pub async fn reject<T: FrameIo>(io: T, code: ErrorCode, message: &str) {
    reject_with_reason(io, code, message, None).await
}

async fn reject_with_reason<T: FrameIo>(mut io: T, code: ErrorCode, message: &str, reason: Option<&str>) {
    let frame = ServerFrame::Error { code, message, reason, client_id: None, fatal: true }.encode();
    let _ = timeout(CLOSE_TIMEOUT, async {
        io.feed(Outbound::Frame(frame)).await?;
        io.feed(Outbound::Close(code)).await?;
        io.close().await
    })
    .await;
}

/// Authenticates a connection and, if it is accepted, runs its session to the end.
pub async fn start<T: FrameIo>(io: T, hub: Arc<Hub>, request: ConnectRequest, guard: ConnGuard) {
    let Identity { app, uid, metadata } = match hub.authenticate(&request) {
        Ok(identity) => identity,
        Err(refusal) => {
            let app = hub.known_app(request.app_id.as_deref());
            hub.metrics().rejected(app, request.transport, refusal.code.as_str());
            debug!(remote = %request.remote, transport = %request.transport, app = request.app_id.as_deref().unwrap_or(""), code = %refusal.code, reason = refusal.reason.as_deref().unwrap_or(""), "connect rejected");
            return reject_with_reason(io, refusal.code, &refusal.message, refusal.reason.as_deref()).await;
        }
    };
    let conn_id = hub.next_conn_id();
    let control = Arc::new(SessionControl::default());
    let handle = SessionHandle { conn_id, control: control.clone() };
    if let Err(code) = hub.register(&app, &uid, handle.clone()).await {
        hub.metrics().rejected(Some(&app.id), request.transport, code.as_str());
        return reject(io, code, describe(code)).await;
    }
    let held = hub.metrics().connected(&app.id, request.transport);
    if hub.is_draining() {
        // A client that reaches a node on its way out is moved on at once.
        control.kick(ErrorCode::NodeDraining);
    }
    if hub.is_shutting_down() {
        // Registered after `Hub::shut_down` swept the registry (or while it did).
        control.kick(ErrorCode::ServerShutdown);
    }
    let span =
        info_span!("conn", app = %app.id, %uid, transport = %request.transport, remote = %request.remote, conn_id);
    let session = Session {
        bucket: TokenBucket::new(hub.config().limits.messages_per_second, hub.config().limits.message_burst),
        io,
        hub: hub.clone(),
        app: app.clone(),
        uid,
        metadata,
        conn_id,
        _queue: QueueOwner::new(control.clone()),
        taken: Taken::default(),
        control,
        handle,
        channels: Vec::new(),
        last_seen: Instant::now(),
        received_at: now_ms(),
        conversation: None,
        batch: request.batch,
    };
    async move {
        debug!("connected");
        let mut session = session;
        let exit = session.serve().await;
        // Unregister first: from here on nobody should count this connection as a recipient.
        hub.unregister(&app, &session.uid, conn_id);
        for channel in std::mem::take(&mut session.channels) {
            hub.leave_channel(&app, &channel, conn_id);
        }
        debug!(reason = %exit, "disconnected");
        drop(held);
        hub.metrics().disconnected(&app.id, exit.reason());
        session.goodbye(exit).await;
        drop(guard);
    }
    .instrument(span)
    .await;
}

struct Session<T> {
    io: T,
    hub: Arc<Hub>,
    app: Arc<App>,
    uid: String,
    /// Identity metadata from the app's authenticator, shown to its filters.
    metadata: Vec<(String, String)>,
    conn_id: u64,
    /// Closes this session's queue when the session ends.
    _queue: QueueOwner,
    /// Frames taken from the queue to be written.
    taken: Taken,
    control: Arc<SessionControl>,
    /// This session's own queue entry: channel subscriptions, and acks that wait for other
    /// nodes' answers, go through it.
    handle: SessionHandle,
    /// Channels this connection subscribed to.
    channels: Vec<String>,
    bucket: TokenBucket,
    /// When the client last sent anything; drives the idle timeout.
    last_seen: Instant,
    /// The same moment in Unix milliseconds: the `send_at` of the messages of the burst of
    /// frames read then.
    received_at: u64,
    /// The last direct recipient and this user's conversation id with them: messages tend
    /// to go to the same peer many times in a row, and the id costs a SHA-256.
    conversation: Option<(Box<str>, Box<str>)>,
    /// The client asked for batched frames (said back in `connected`).
    batch: bool,
}

/// Why a session ended.
#[derive(Debug)]
enum Exit {
    /// The client closed, or its socket failed.
    Gone,
    /// The session ends with an error the client is told about.
    Fatal(ErrorCode, String),
    /// The node is shutting down.
    Shutdown,
    /// The node is draining: the client is moved to another node.
    Moved,
}

impl Exit {
    /// The `reason` label of `switchboard_disconnects_total`.
    fn reason(&self) -> &'static str {
        match self {
            Exit::Gone => "client_closed",
            Exit::Fatal(code, _) => code.as_str(),
            Exit::Shutdown => ErrorCode::ServerShutdown.as_str(),
            Exit::Moved => ErrorCode::NodeDraining.as_str(),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Gone => f.write_str("client closed"),
            Exit::Fatal(code, msg) => write!(f, "{code}: {msg}"),
            Exit::Shutdown => f.write_str("server shutdown"),
            Exit::Moved => f.write_str("moved to another node"),
        }
    }
}

impl Exit {
    /// How a session kicked for `code` ends.
    fn kicked(code: ErrorCode) -> Exit {
        match code {
            ErrorCode::NodeDraining => Exit::Moved,
            ErrorCode::ServerShutdown => Exit::Shutdown,
            code => Exit::Fatal(code, describe(code).into()),
        }
    }
}

enum Event {
    Kicked(ErrorCode),
    /// Frames wait in the session's queue.
    Outbound,
    Inbound(Option<Result<Inbound, ReadError>>),
    Tick,
}

impl<T: FrameIo> Session<T> {
    /// Tells the client why the session ended (where there is anyone left to tell).
    async fn goodbye(mut self, exit: Exit) {
        match &exit {
            Exit::Gone => {
                // Answer the client's close frame, if it sent one, and shut the socket.
                let _ = timeout(CLOSE_TIMEOUT, self.io.close()).await;
            }
            Exit::Fatal(code, message) => reject(self.io, *code, message).await,
            Exit::Shutdown | Exit::Moved => {
                let code =
                    if matches!(exit, Exit::Moved) { ErrorCode::NodeDraining } else { ErrorCode::ServerShutdown };
                // What was queued before the shutdown was acknowledged to its senders as
                // delivered: write it out first (bounded like every goodbye).
                let io = &mut self.io;
                let control = &self.control;
                let taken = &mut self.taken;
                let _ = timeout(CLOSE_TIMEOUT, async {
                    // A take first hands back what a cut-off write left in `taken`.
                    while control.take_queued(usize::MAX, taken) != 0 {
                        for frame in taken.by_ref() {
                            io.feed(Outbound::Frame(frame)).await?;
                        }
                    }
                    io.flush().await
                })
                .await;
                // A drain already spreads the moves over its window; a plain shutdown asks
                // clients to spread their reconnects themselves.
                let spread = self.hub.config().shutdown.reconnect_jitter.as_millis() as u64;
                let delay_ms = if spread == 0 || code == ErrorCode::NodeDraining {
                    0
                } else {
                    rand::thread_rng().gen_range(0..spread)
                };
                let home = self.hub.new_home(&self.uid).unwrap_or_default();
                let frame = ServerFrame::Reconnect {
                    reason: code.as_str(),
                    tcp_addr: &home.tcp_addr,
                    ws_addr: &home.ws_addr,
                    wss_addr: &home.wss_addr,
                    delay_ms,
                };
                let _ = timeout(CLOSE_TIMEOUT, self.io.feed(Outbound::Frame(frame.encode()))).await;
                reject(self.io, code, describe(code)).await;
            }
        }
    }

    async fn serve(&mut self) -> Exit {
        let hb = self.hub.config().heartbeat.clone();
        let connected = ServerFrame::Connected {
            uid: &self.uid,
            conn_id: &self.conn_id.to_string(),
            node_id: &self.hub.node().id,
            ping_interval_ms: hb.ping_interval.as_millis() as u64,
            idle_timeout_ms: hb.idle_timeout.as_millis() as u64,
            batch: self.batch,
        }
        .encode();
        if let Err(exit) = self.send(Outbound::Frame(connected)).await {
            return exit;
        }

        let control = self.control.clone();
        let mut next_ping = Instant::now() + hb.ping_interval;
        let tick = sleep_until(next_ping);
        // Kicks (slow consumer, drain, shutdown) all arrive here; waited on by one future for
        // the whole session rather than one per event.
        let kicked = control.kicked();
        tokio::pin!(tick, kicked);
        loop {
            // Being kicked goes first; among the rest, select! picks at random so that a
            // steady stream one way never starves the other.
            let event = if let Some(reason) = control.reason() {
                Event::Kicked(reason)
            } else {
                tokio::select! {
                    reason = &mut kicked => Event::Kicked(reason),
                    () = std::future::poll_fn(|cx| control.poll_queued(cx)) => Event::Outbound,
                    inbound = self.io.next() => Event::Inbound(inbound),
                    _ = &mut tick => Event::Tick,
                }
            };
            let step = match event {
                Event::Kicked(code) => Err(Exit::kicked(code)),
                Event::Outbound => self.flush_with_queued().await,
                Event::Inbound(item) => self.on_inbound_burst(item).await,
                Event::Tick => {
                    let now = Instant::now();
                    let idle_deadline = self.last_seen + hb.idle_timeout;
                    if now >= idle_deadline {
                        Err(Exit::Fatal(ErrorCode::IdleTimeout, describe(ErrorCode::IdleTimeout).into()))
                    } else {
                        let mut result = Ok(());
                        if now >= next_ping {
                            next_ping = now + hb.ping_interval;
                            result = self.send(Outbound::Ping).await;
                        }
                        tick.as_mut().reset(next_ping.min(idle_deadline));
                        result
                    }
                }
            };
            if let Err(exit) = step {
                return exit;
            }
        }
    }

    /// Handles `first` and whatever else the client already sent (up to [`MAX_BATCH`]),
    /// then flushes the replies once: one write for a burst of acks, not one per frame.
    async fn on_inbound_burst(&mut self, first: Option<Result<Inbound, ReadError>>) -> Result<(), Exit> {
        use futures_util::FutureExt as _;
        // Anything the client sends, even a refused frame, shows it is alive. One clock
        // read per burst: the rate limit charges all its frames at this instant, and their
        // messages carry it as `send_at`. A frame picked up later in a burst whose handling
        // waited (on the cluster, on filters) carries this earlier time too; the next burst
        // reads the clock again.
        self.last_seen = Instant::now();
        self.received_at = now_ms();
        if self.hub.filters_messages(&self.app) {
            return self.on_filtered_burst(first).await;
        }
        self.on_inbound(first).await?;
        for _ in 1..MAX_BATCH {
            // Being kicked (or shut down) is answered before more queued input.
            if self.control.reason().is_some() {
                break;
            }
            match self.io.next().now_or_never() {
                Some(item) => self.on_inbound(item).await?,
                None => break,
            }
        }
        self.flush_with_queued().await
    }

    /// [`on_inbound_burst`](Self::on_inbound_burst) for an app with filters: the burst is
    /// read [`FILTER_RUN`] frames at a time, so that the `send` frames among them go
    /// through the filters together (one call per filter that takes batches, instead of
    /// one per message). Replies keep the order of the frames.
    async fn on_filtered_burst(&mut self, first: Option<Result<Inbound, ReadError>>) -> Result<(), Exit> {
        use futures_util::FutureExt as _;
        let mut next = Some(first);
        let mut read = 0;
        while let Some(item) = next.take() {
            let mut items = Vec::with_capacity(FILTER_RUN);
            items.push(item);
            read += 1;
            // The end of the stream or a read error ends the burst; being kicked (or shut
            // down) is answered before more queued input.
            let go_on = |items: &[Option<Result<Inbound, ReadError>>], read: usize| {
                read < MAX_BATCH && matches!(items.last(), Some(Some(Ok(_))))
            };
            while items.len() < FILTER_RUN && go_on(&items, read) && self.control.reason().is_none() {
                let Some(item) = self.io.next().now_or_never() else { break };
                items.push(item);
                read += 1;
            }
            let more = items.len() == FILTER_RUN && go_on(&items, read);
            self.on_filtered_frames(items).await?;
            if more && self.control.reason().is_none() {
                next = self.io.next().now_or_never();
            }
        }
        self.flush_with_queued().await
    }

    /// Handles what [`on_filtered_burst`](Self::on_filtered_burst) read: the frames in
    /// order, each run of `send`s among them through [`send_run`](Self::send_run), and the
    /// end of the stream or a read error, which can only come last, after them. A session
    /// kicked meanwhile handles nothing more.
    async fn on_filtered_frames(&mut self, mut items: Vec<Option<Result<Inbound, ReadError>>>) -> Result<(), Exit> {
        let last = if matches!(items.last(), Some(Some(Ok(_)))) { None } else { items.pop() };
        let mut run = Vec::with_capacity(items.len());
        for item in &items {
            let Some(Ok(Inbound::Frame(text))) = item else { continue };
            match decode_client_frame(text) {
                Ok(ClientFrame::Send(send)) => run.push(send),
                // Anything else (refusals included) is answered after the sends before it.
                frame => {
                    self.send_run(&mut run).await?;
                    if self.control.reason().is_some() {
                        return Ok(());
                    }
                    self.on_decoded(frame).await?;
                }
            }
        }
        self.send_run(&mut run).await?;
        match last {
            Some(last) => self.on_inbound(last).await,
            None => Ok(()),
        }
    }

    /// Sends a run of `send` frames from one burst: each is charged to the rate limit,
    /// then the app's filters see all that passed at once, then each is delivered and
    /// answered, in order. Leaves `run` empty.
    async fn send_run(&mut self, run: &mut Vec<SendFrame<'_>>) -> Result<(), Exit> {
        if run.is_empty() {
            return Ok(());
        }
        let stamps: Vec<_> = run
            .iter()
            .map(|_| {
                self.app.metrics.from_clients.inc();
                self.bucket.try_take(self.last_seen).then(|| self.hub.stamp_at(self.received_at))
            })
            .collect();
        let from = Sender { conversation: None, ..self.sender(false) };
        let mut msgs = Vec::with_capacity(run.len());
        for (send, (msg_id, send_at)) in run.iter().zip(&stamps).filter_map(|(s, stamp)| Some((s, stamp.as_ref()?))) {
            let to = Target::User { app: &self.app.id, uid: &send.to };
            msgs.push(Hub::message(&self.app, from, to, send.data, msg_id, *send_at));
        }
        let max_bytes = self.hub.config().limits.max_frame_bytes;
        let mut answers = self.hub.filter_burst(&self.app, &msgs, max_bytes).into_iter();
        drop(msgs);
        for (send, stamp) in run.drain(..).zip(stamps) {
            if self.control.reason().is_some() {
                break;
            }
            let client_id = send.client_id.as_deref();
            let Some((msg_id, send_at)) = stamp else {
                self.rate_limited(client_id).await?;
                continue;
            };
            match answers.next().expect("an answer per stamped message") {
                Err(refused) => self.error(refused.code, &refused.message, client_id).await?,
                Ok(rewritten) => {
                    self.remember_conversation(&send.to);
                    let from = self.sender(send.ack);
                    let to = Target::User { app: &self.app.id, uid: &send.to };
                    let sent = self
                        .hub
                        .send_filtered(&self.app, from, to, send.data, rewritten.as_deref(), msg_id, send_at)
                        .await;
                    if send.ack {
                        self.ack(client_id, sent).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn on_inbound(&mut self, item: Option<Result<Inbound, ReadError>>) -> Result<(), Exit> {
        match item {
            None => Err(Exit::Gone),
            Some(Ok(Inbound::Frame(text))) => self.on_frame(&text).await,
            Some(Ok(Inbound::Activity)) => Ok(()),
            Some(Err(ReadError::Io(e))) => {
                debug!(error = %e, "read failed");
                Err(Exit::Gone)
            }
            Some(Err(e)) => {
                let code = e.code().unwrap_or(ErrorCode::ProtocolError);
                if e.is_fatal() {
                    Err(Exit::Fatal(code, e.to_string()))
                } else {
                    self.error(code, &e.to_string(), None).await
                }
            }
        }
    }

    async fn on_frame(&mut self, text: &str) -> Result<(), Exit> {
        self.on_decoded(decode_client_frame(text)).await
    }

    async fn on_decoded(&mut self, frame: Result<ClientFrame<'_>, DecodeError>) -> Result<(), Exit> {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return self.error(e.code, &e.message, e.client_id.as_deref()).await,
        };
        match frame {
            ClientFrame::Send(send) => {
                let client_id = send.client_id.as_deref();
                self.app.metrics.from_clients.inc();
                if !self.bucket.try_take(self.last_seen) {
                    return self.rate_limited(client_id).await;
                }
                self.remember_conversation(&send.to);
                let from = self.sender(send.ack);
                match self.hub.send_direct(&self.app, from, &send.to, send.data).await {
                    Ok(_) if !send.ack => Ok(()),
                    Ok(sent) => self.ack(client_id, sent).await,
                    Err(refused) => self.error(refused.code, &refused.message, client_id).await,
                }
            }
            ClientFrame::Ping => self.write(ServerFrame::Pong.encode()).await,
            ClientFrame::Pong => Ok(()),
            ClientFrame::Subscribe(c) => {
                let client_id = c.client_id.as_deref();
                if !self.channels.iter().any(|joined| *joined == c.channel) {
                    if self.channels.len() >= self.hub.config().limits.max_channels_per_connection {
                        let msg = "this connection is at limits.max_channels_per_connection";
                        return self.error(ErrorCode::TooManyChannels, msg, client_id).await;
                    }
                    self.hub.join_channel(&self.app, &c.channel, self.handle.clone()).await;
                    self.channels.push(c.channel.to_string());
                }
                self.write(ServerFrame::Subscribed { channel: &c.channel, client_id }.encode()).await
            }
            ClientFrame::Unsubscribe(c) => {
                if let Some(i) = self.channels.iter().position(|joined| *joined == c.channel) {
                    self.channels.swap_remove(i);
                    self.hub.leave_channel(&self.app, &c.channel, self.conn_id);
                }
                let client_id = c.client_id.as_deref();
                self.write(ServerFrame::Unsubscribed { channel: &c.channel, client_id }.encode()).await
            }
            ClientFrame::Publish(c) => {
                let client_id = c.client_id.as_deref();
                self.app.metrics.from_clients.inc();
                if !self.hub.config().apps[&self.app.id].client_publish {
                    self.app.metrics.denied(ErrorCode::PublishForbidden);
                    let msg = "this app lets only its server publish to channels ([apps.<id>] client_publish)";
                    return self.error(ErrorCode::PublishForbidden, msg, client_id).await;
                }
                if !self.bucket.try_take(self.last_seen) {
                    return self.rate_limited(client_id).await;
                }
                let data = c.data.expect("decode requires data on publish");
                let max = self.hub.config().limits.max_frame_bytes;
                // A channel message has no conversation with one peer.
                let from = Sender { conversation: None, ..self.sender(c.ack) };
                match self.hub.publish_channel(&self.app, from, &c.channel, data, max).await {
                    Ok(_) if !c.ack => Ok(()),
                    Ok(sent) => self.ack(client_id, sent).await,
                    Err(refused) => self.error(refused.code, &refused.message, client_id).await,
                }
            }
            ClientFrame::Connect(_) => {
                self.error(ErrorCode::AlreadyConnected, "this connection is already authenticated", None).await
            }
        }
    }

    /// Acknowledges a send. When other nodes still have to answer, the ack follows later
    /// through this session's queue, so the connection goes on reading meanwhile.
    async fn ack(&mut self, client_id: Option<&str>, sent: Sent) -> Result<(), Exit> {
        if sent.delivery.is_settled() {
            let outcome = sent.delivery.finish().await;
            return self.write(ack_frame(client_id, &sent.msg_id, &outcome)).await;
        }
        let (handle, client_id) = (self.handle.clone(), client_id.map(str::to_string));
        let limits = self.app.registry.queue_limits();
        tokio::spawn(async move {
            let outcome = sent.delivery.finish().await;
            let _ = handle.offer(&ack_frame(client_id.as_deref(), &sent.msg_id, &outcome), limits);
        });
        Ok(())
    }

    /// This session as the sender of a direct message to the recipient it last
    /// [remembered](Self::remember_conversation).
    fn sender(&self, wants_count: bool) -> Sender<'_> {
        Sender {
            uid: &self.uid,
            metadata: &self.metadata,
            wants_count,
            conversation: self.conversation.as_ref().map(|(_, id)| &**id),
            received_at: self.received_at,
        }
    }

    /// Makes [`Session::conversation`] the one with `to`.
    fn remember_conversation(&mut self, to: &str) {
        if self.conversation.as_ref().is_none_or(|(peer, _)| **peer != *to) {
            let id = conversation_id(&self.app.id, &self.uid, to);
            self.conversation = Some((to.into(), id.into()));
        }
    }

    async fn rate_limited(&mut self, client_id: Option<&str>) -> Result<(), Exit> {
        self.app.metrics.denied(ErrorCode::RateLimited);
        let msg = "over limits.messages_per_second; the frame was dropped";
        self.error(ErrorCode::RateLimited, msg, client_id).await
    }

    async fn error(&mut self, code: ErrorCode, message: &str, client_id: Option<&str>) -> Result<(), Exit> {
        self.write(ServerFrame::Error { code, message, reason: None, client_id, fatal: false }.encode()).await
    }

    /// Queues a reply; [`flush_with_queued`](Self::flush_with_queued) puts it on the wire.
    async fn write(&mut self, frame: Frame) -> Result<(), Exit> {
        let limit = self.hub.config().limits.write_timeout;
        guarded(&self.control, limit, self.io.feed(Outbound::Frame(frame))).await
    }

    /// Sends one item and flushes, within `limits.write_timeout`.
    async fn send(&mut self, item: Outbound) -> Result<(), Exit> {
        let limit = self.hub.config().limits.write_timeout;
        guarded(&self.control, limit, self.io.send(item)).await
    }

    /// Flushes the replies written so far together with the frames queued for this session
    /// (up to [`MAX_BATCH`]): a client that both sends and receives gets its acks and the
    /// messages waiting for it in one write, not one each.
    async fn flush_with_queued(&mut self) -> Result<(), Exit> {
        let limit = self.hub.config().limits.write_timeout;
        let control = &*self.control;
        let taken = &mut self.taken;
        let io = &mut self.io;
        let write = async {
            control.take_queued(MAX_BATCH, taken);
            for frame in taken.by_ref() {
                io.feed(Outbound::Frame(frame)).await?;
            }
            io.flush().await
        };
        guarded(control, limit, write).await
    }
}

fn ack_frame(client_id: Option<&str>, msg_id: &str, outcome: &Outcome) -> Frame {
    ServerFrame::Ack {
        client_id,
        msg_id,
        status: outcome.status(),
        delivered: outcome.delivered.sessions,
        dropped: outcome.delivered.dropped,
        cluster: outcome.cluster_unavailable.then_some("unavailable"),
    }
    .encode()
}

/// Runs a write within `limit`. A fatal kick (a slow consumer's) abandons it at once: a
/// write blocked on a full socket must not keep a slow consumer registered. A drain or a
/// shutdown lets it finish within the limit: the frame in it was counted as delivered, and
/// the goodbye then writes out the rest of the queue the same way.
async fn guarded(
    control: &SessionControl,
    limit: Duration,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), Exit> {
    use futures_util::FutureExt as _;
    if let Some(exit) = control.reason().and_then(fatal_kick) {
        return Err(exit);
    }
    // Most writes complete at the first poll (into the transport's buffer, or a flush the
    // socket takes whole). Those need neither the timer nor the kick watch, whose set-up (a
    // clock read, the runtime handle, a waiter) costs more than such a write; this runs
    // several times per message. A write that has to wait is polled again below, with both.
    let mut write = std::pin::pin!(write);
    if let Some(result) = write.as_mut().now_or_never() {
        return finish_write(Ok(result));
    }
    let kicked = async {
        match fatal_kick(control.kicked().await) {
            Some(exit) => exit,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        exit = kicked => Err(exit),
        result = timeout(limit, write) => finish_write(result),
    }
}

/// How a kick for `code` ends a write in progress, if it does.
fn fatal_kick(code: ErrorCode) -> Option<Exit> {
    match Exit::kicked(code) {
        exit @ Exit::Fatal(..) => Some(exit),
        Exit::Moved | Exit::Shutdown | Exit::Gone => None,
    }
}

/// A write that fails means the client is gone; one that times out means it is stuck.
fn finish_write(result: Result<std::io::Result<()>, tokio::time::error::Elapsed>) -> Result<(), Exit> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            debug!(error = %e, "write failed");
            Err(Exit::Gone)
        }
        Err(_) => {
            Err(Exit::Fatal(ErrorCode::SlowConsumer, "a write did not complete within limits.write_timeout".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    //! The session loop against an in-memory connection, with tokio's clock paused so that
    //! heartbeat timing is exact and instant.

    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Context, Poll};

    use futures_util::{Sink, Stream};
    use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
    use tokio_tungstenite::tungstenite::Utf8Bytes;

    use super::*;
    use crate::cluster::{Addrs, NodeInfo};
    use crate::config::Config;

    struct MemoryIo {
        inbound: UnboundedReceiver<Result<Inbound, ReadError>>,
        outbound: UnboundedSender<Outbound>,
        /// While closed, writes wait as on a socket whose peer reads nothing.
        gate: Arc<Gate>,
    }

    /// A socket's room for writes: closed, it keeps the writer's waker; opening wakes it.
    #[derive(Default)]
    struct Gate {
        closed: AtomicBool,
        waker: std::sync::Mutex<Option<std::task::Waker>>,
        /// Flushes so far: each is a write to the socket.
        flushes: std::sync::atomic::AtomicUsize,
    }

    impl Gate {
        fn close(&self) {
            self.closed.store(true, Ordering::SeqCst);
        }

        fn open(&self) {
            self.closed.store(false, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    impl Stream for MemoryIo {
        type Item = Result<Inbound, ReadError>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.inbound.poll_recv(cx)
        }
    }

    impl Sink<Outbound> for MemoryIo {
        type Error = std::io::Error;
        fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            *self.gate.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.gate.closed.load(Ordering::SeqCst) { Poll::Pending } else { Poll::Ready(Ok(())) }
        }
        fn start_send(self: Pin<&mut Self>, item: Outbound) -> std::io::Result<()> {
            self.outbound.send(item).map_err(|_| std::io::ErrorKind::BrokenPipe.into())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.gate.flushes.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Client {
        to_server: UnboundedSender<Result<Inbound, ReadError>>,
        from_server: UnboundedReceiver<Outbound>,
        gate: Arc<Gate>,
    }

    impl Client {
        async fn next(&mut self) -> Outbound {
            self.from_server.recv().await.expect("the session is still writing")
        }

        async fn next_json(&mut self) -> serde_json::Value {
            match self.next().await {
                Outbound::Frame(f) => serde_json::from_str(f.as_str()).unwrap(),
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    const SECRET: &str = "session-test-secret-0123456789";

    async fn connect(tweak: impl FnOnce(&mut Config)) -> (Client, Arc<Hub>) {
        let mut config: Config = format!("[apps.demo]\nsecret = \"{SECRET}\"\n").parse().unwrap();
        tweak(&mut config);
        let node =
            NodeInfo { id: "n1".into(), external: Addrs::default(), intranet: Addrs::default(), warnings: vec![] };
        let hub = Hub::new(config, node, crate::plugin::PluginSet::default());
        (connect_to(&hub).await, hub)
    }

    /// Connects alice to `hub`; returns once she has her `connected` frame.
    async fn connect_to(hub: &Arc<Hub>) -> Client {
        let (to_server, inbound) = unbounded_channel();
        let (outbound, from_server) = unbounded_channel();
        let request = ConnectRequest {
            app_id: Some("demo".into()),
            token: Some(crate::auth::jwt::issue(SECRET.as_bytes(), "alice", Duration::from_secs(3600))),
            transport: Transport::Tcp,
            remote: "127.0.0.1:1".parse().unwrap(),
            params: vec![],
            batch: false,
        };
        let guard = hub.try_admit().unwrap();
        let gate = Arc::new(Gate::default());
        tokio::spawn(start(MemoryIo { inbound, outbound, gate: gate.clone() }, hub.clone(), request, guard));
        let mut client = Client { to_server, from_server, gate };
        assert_eq!(client.next_json().await["type"], "connected");
        client
    }

    fn heartbeat(c: &mut Config) {
        c.heartbeat.ping_interval = Duration::from_secs(10);
        c.heartbeat.idle_timeout = Duration::from_secs(30);
    }

    #[tokio::test(start_paused = true)]
    async fn pings_on_schedule_and_closes_when_idle() {
        let (mut client, hub) = connect(heartbeat).await;
        let start = Instant::now();
        for n in 1..=2 {
            assert!(matches!(client.next().await, Outbound::Ping));
            assert_eq!(start.elapsed(), Duration::from_secs(10 * n));
        }
        // Silence since the start: closed at exactly the idle timeout.
        let error = client.next_json().await;
        assert_eq!((error["code"].as_str(), error["fatal"].as_bool()), (Some("idle_timeout"), Some(true)));
        assert!(matches!(client.next().await, Outbound::Close(ErrorCode::IdleTimeout)));
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        wait_for(|| hub.connections() == 0).await;
    }

    #[tokio::test(start_paused = true)]
    async fn any_sign_of_life_keeps_the_connection() {
        let (mut client, hub) = connect(heartbeat).await;
        for _ in 0..10 {
            assert!(matches!(client.next().await, Outbound::Ping));
            // A WebSocket pong, or a refused binary frame: both show the client is there.
            client.to_server.send(Ok(Inbound::Activity)).unwrap();
            assert!(matches!(client.next().await, Outbound::Ping));
            client.to_server.send(Err(ReadError::Binary)).unwrap();
            assert_eq!(client.next_json().await["code"], "binary_unsupported");
        }
        assert_eq!(hub.app("demo").unwrap().registry.sessions_of("alice"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn kick_wins_over_a_busy_connection() {
        let (mut client, hub) = connect(heartbeat).await;
        for _ in 0..100 {
            client.to_server.send(ping()).unwrap();
        }
        hub.shut_down();
        // At most the frames already being handled are answered before the goodbye.
        let mut pongs = 0;
        loop {
            match client.next().await {
                Outbound::Frame(f) if f.as_str().contains("pong") => pongs += 1,
                Outbound::Frame(f) if f.as_str().contains("reconnect") => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(pongs <= 1, "shutdown is handled before queued input: {pongs} pongs");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_and_a_delivery_waiting_for_the_same_client_leave_in_one_write() {
        let (mut client, _hub) = connect(heartbeat).await;
        let before = client.gate.flushes.load(Ordering::SeqCst);
        // alice writes to herself: handling the send queues the message for her session
        // before her ack is flushed.
        let send = r#"{"type":"send","to":"alice","data":{"n":1},"client_id":"c1"}"#;
        client.to_server.send(Ok(Inbound::Frame(Utf8Bytes::from_static(send)))).unwrap();
        let ack = client.next_json().await;
        assert_eq!((ack["type"].as_str(), ack["client_id"].as_str()), (Some("ack"), Some("c1")));
        let message = client.next_json().await;
        assert_eq!((message["type"].as_str(), message["data"]["n"].as_i64()), (Some("message"), Some(1)));
        // Let the session go round its loop, then count: one flush for both frames.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(client.gate.flushes.load(Ordering::SeqCst) - before, 1);
    }

    fn ping() -> Result<Inbound, ReadError> {
        Ok(Inbound::Frame(Utf8Bytes::from_static(r#"{"type":"ping"}"#)))
    }

    fn write_timeout(c: &mut Config) {
        heartbeat(c);
        c.limits.write_timeout = Duration::from_secs(5);
        c.limits.outbound_queue = 4;
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_stuck_past_the_write_timeout_ends_the_session() {
        within_a_minute(async {
            let (mut client, hub) = connect(write_timeout).await;
            client.gate.close();
            let start = Instant::now();
            client.to_server.send(ping()).unwrap();
            // The pong's write gives up at 5 s; the goodbye then waits for the socket (up to
            // CLOSE_TIMEOUT), which takes writes again at 6 s.
            tokio::time::sleep(Duration::from_secs(6)).await;
            assert_eq!(hub.connections(), 1, "still saying goodbye");
            client.gate.open();
            let error = client.next_json().await;
            assert_eq!((error["code"].as_str(), error["fatal"].as_bool()), (Some("slow_consumer"), Some(true)));
            assert!(matches!(client.next().await, Outbound::Close(ErrorCode::SlowConsumer)));
            assert_eq!(start.elapsed(), Duration::from_secs(6));
            wait_for(|| hub.connections() == 0).await;
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_kick_ends_a_stuck_write_at_once() {
        within_a_minute(async {
            let (mut client, hub) = connect(write_timeout).await;
            client.gate.close();
            let start = Instant::now();
            let app = hub.app("demo").unwrap().clone();
            let data = serde_json::value::RawValue::from_string("1".into()).unwrap();
            let from =
                Sender { uid: "bob", metadata: &[], wants_count: false, conversation: None, received_at: now_ms() };
            // The first message is taken off the queue and its write waits; the next four
            // fill the queue and the sixth finds it full, which kicks the session as a slow
            // consumer.
            for _ in 0..6 {
                hub.send_direct(&app, from, "alice", &data).await.unwrap();
                tokio::task::yield_now().await;
            }
            wait_for(|| app.registry.sessions_of("alice") == 0).await;
            assert!(start.elapsed() < Duration::from_secs(1), "waited {:?} for the write timeout", start.elapsed());
            client.gate.open();
            // The goodbye goes out once the socket takes writes again.
            let error = client.next_json().await;
            assert_eq!(error["code"], "slow_consumer");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_lets_a_stuck_write_finish_then_says_reconnect() {
        within_a_minute(async {
            let (mut client, hub) = connect(write_timeout).await;
            client.gate.close();
            client.to_server.send(ping()).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            hub.shut_down();
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(hub.connections(), 1, "the write is still under way");
            client.gate.open();
            // The frame that was being written is not lost; then the goodbye.
            assert_eq!(client.next_json().await["type"], "pong");
            let reconnect = client.next_json().await;
            assert_eq!(
                (reconnect["type"].as_str(), reconnect["reason"].as_str()),
                (Some("reconnect"), Some("server_shutdown"))
            );
            wait_for(|| hub.connections() == 0).await;
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_connecting_during_shutdown_is_told_to_reconnect() {
        within_a_minute(async {
            let (mut client, hub) = connect(|c| {
                heartbeat(c);
                c.shutdown.reconnect_jitter = Duration::ZERO;
            })
            .await;
            client.to_server.send(ping()).unwrap();
            assert_eq!(client.next_json().await["type"], "pong");
            hub.shut_down();
            // Registered after the sweep: the session notices on its own.
            let mut late = connect_to(&hub).await;
            for c in [&mut client, &mut late] {
                let reconnect = c.next_json().await;
                assert_eq!(reconnect["reason"], "server_shutdown", "{reconnect}");
            }
        })
        .await;
    }

    /// Fails a test that would otherwise wait forever (time is paused, so a minute passes
    /// at once when nothing else is left to run).
    async fn within_a_minute(test: impl std::future::Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(60), test).await.expect("the test finished within a minute");
    }

    async fn wait_for(cond: impl Fn() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("condition never held");
    }
}
