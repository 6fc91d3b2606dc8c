//! WebSocket (and, over a TLS stream, WebSocket Secure): the upgrade handshake at
//! `/ws/connect` and the adapter that makes a WebSocket a [`FrameIo`](super::FrameIo).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::codec::Framed;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::batch::{Batch, Framing};
use super::readahead::ReadAhead;
use super::wsframe::{self, FrameError, Received, Text, WsCodec};
use super::{Inbound, Outbound, ReadError, ReadReady, Transport};
use crate::hub::{ConnGuard, Hub};
use crate::protocol::ErrorCode;
use crate::session::{self, ConnectRequest};

/// The one path clients upgrade on.
pub const CONNECT_PATH: &str = "/ws/connect";

/// Bytes read and thrown away after closing, so that closing the socket with unread input
/// does not turn into a TCP reset that destroys the close frame just sent.
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// Adapts a WebSocket to frames: text messages carry frames, pings and pongs count as
/// activity (pings are answered), binary messages are refused.
#[derive(Debug)]
pub struct WsIo<S> {
    inner: Framed<S, WsCodec>,
    /// Whether `inner` has a read buffer ([`super::poll_read_frames`]).
    read_buffer: bool,
    close: CloseState,
    /// The client sent a close frame (with this code, if any): ours is the reply.
    peer_closed: Option<Option<u16>>,
    /// Our close frame is written (or queued).
    close_sent: bool,
    /// The client's bytes stopped being a WebSocket stream: closing reads raw bytes.
    broken: bool,
    /// The write buffer holds the upgrade response: give it back after the first flush,
    /// which most connections follow with a long quiet spell.
    first_flush: bool,
    /// The open message of a connection that asked for batched frames.
    batch: Option<Batch>,
    drained: usize,
}

/// Progress of [`WsIo`]'s close sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseState {
    Open,
    /// Our close frame is out; reading until the client's close reply.
    AwaitingReply,
    /// The WebSocket stream broke mid-frame: read raw bytes until the client hangs up.
    Draining,
    /// Close handshake over: shut the socket.
    ShuttingDown,
    Done,
}

impl<S> WsIo<S>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    /// Takes over a connection whose upgrade handshake is done; messages (all fragments
    /// together) over `max_message` bytes end it.
    pub fn new(stream: S, max_message: usize) -> Self {
        Self {
            inner: super::framed(stream, WsCodec::new(max_message)),
            read_buffer: false,
            close: CloseState::Open,
            peer_closed: None,
            close_sent: false,
            broken: false,
            first_flush: false,
            batch: None,
            drained: 0,
        }
    }

    /// Joins the frames written between flushes into one message of at most
    /// `max_frame_bytes`, a line each ([`super::batch`]).
    pub fn batched(mut self, on: bool, max_frame_bytes: usize) -> Self {
        self.batch = on.then(|| Batch::new(Framing::WsText, max_frame_bytes));
        self
    }

    /// Ends the open batch, if any: what is in the write buffer may now be written.
    fn seal(&mut self) {
        if let Some(batch) = &mut self.batch {
            batch.seal(self.inner.write_buffer_mut());
        }
    }

    /// Takes bytes the connection owes its client (the upgrade response, held back by
    /// [`Handshaking`]): they leave first, in the same write as the first frames.
    pub fn with_unsent(mut self, bytes: &[u8]) -> Self {
        self.inner.write_buffer_mut().extend_from_slice(bytes);
        self.first_flush = true;
        self
    }
}

impl<S> Stream for WsIo<S>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    type Item = Result<Inbound, ReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.peer_closed.is_some() || self.broken {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        let polled = ready!(super::poll_read_frames(&mut this.inner, &mut this.read_buffer, cx));
        let item = match polled {
            None => return Poll::Ready(None),
            Some(Ok(Received::Text(text))) => Ok(Inbound::Frame(text)),
            Some(Ok(Received::Binary(_))) => Err(ReadError::Binary),
            Some(Ok(Received::Ping(payload))) => {
                // Answered at the session's next flush, which follows every burst it reads.
                if !self.close_sent {
                    self.seal();
                    wsframe::put_frame(self.inner.write_buffer_mut(), wsframe::OP_PONG, &payload);
                }
                Ok(Inbound::Activity)
            }
            Some(Ok(Received::Pong)) => Ok(Inbound::Activity),
            // The client closed; the reply goes out at close().
            Some(Ok(Received::Close(code))) => {
                self.peer_closed = Some(code);
                return Poll::Ready(None);
            }
            Some(Err(e)) => {
                let e = match e {
                    FrameError::Io(e) => ReadError::Io(e),
                    FrameError::TooLarge => ReadError::TooLarge,
                    FrameError::InvalidUtf8 => ReadError::InvalidUtf8,
                    FrameError::Protocol(why) => ReadError::Protocol(why.to_string()),
                };
                // Past anything but a failed read, the bytes are no longer a WebSocket stream.
                self.broken = !matches!(e, ReadError::Io(_));
                Err(e)
            }
        };
        Poll::Ready(Some(item))
    }
}

impl<S> Sink<Outbound> for WsIo<S>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The inner sink writes its buffer out once it holds a batch's worth.
        if self.inner.write_buffer().len() >= super::WRITE_BATCH {
            self.seal();
        }
        Sink::<Text>::poll_ready(Pin::new(&mut self.inner), cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Outbound) -> io::Result<()> {
        if self.close_sent {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closing"));
        }
        let this = &mut *self;
        if let (Some(batch), Outbound::Frame(frame)) = (&mut this.batch, &item)
            && batch.push(this.inner.write_buffer_mut(), frame)
        {
            return Ok(());
        }
        self.seal();
        match item {
            Outbound::Frame(frame) => return Pin::new(&mut self.inner).start_send(Text(frame.into_bytes())),
            Outbound::Ping => {
                super::release_write_buffer(&mut self.inner);
                wsframe::put_frame(self.inner.write_buffer_mut(), wsframe::OP_PING, &[]);
            }
            Outbound::Close(code) => {
                self.close_sent = true;
                wsframe::put_close(self.inner.write_buffer_mut(), Some(code.close_code()), code.as_str());
            }
        }
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.seal();
        let flushed = ready!(Sink::<Text>::poll_flush(Pin::new(&mut self.inner), cx));
        if std::mem::take(&mut self.first_flush) {
            super::release_write_buffer(&mut self.inner);
        }
        Poll::Ready(flushed)
    }

    /// Completes the close handshake: sends a close frame unless one was sent (the reply
    /// to the client's, if it closed first), reads (and drops) what the client still sends
    /// until its close reply, then shuts the socket. Bounded by [`LINGER_MAX_BYTES`];
    /// callers bound it in time.
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.seal();
        let this = &mut *self;
        loop {
            this.close = match this.close {
                CloseState::Open => {
                    if !this.close_sent {
                        this.close_sent = true;
                        // A reply repeats the client's status code (section 5.5.1).
                        let code = this.peer_closed.flatten();
                        wsframe::put_close(this.inner.write_buffer_mut(), code, "");
                    }
                    // Our last frames are written (a refusal's error and close frames leave
                    // with the upgrade response); the client has to see them to answer.
                    let flushed = ready!(Sink::<Text>::poll_flush(Pin::new(&mut this.inner), cx));
                    // An error here means the peer is gone; there is nothing left to tell it.
                    match flushed {
                        Err(_) => CloseState::ShuttingDown,
                        Ok(()) if this.peer_closed.is_some() => CloseState::ShuttingDown,
                        Ok(()) if this.broken => CloseState::Draining,
                        Ok(()) => CloseState::AwaitingReply,
                    }
                }
                CloseState::AwaitingReply => {
                    match ready!(super::poll_read_frames(&mut this.inner, &mut this.read_buffer, cx)) {
                        None | Some(Ok(Received::Close(_))) | Some(Err(FrameError::Io(_))) => CloseState::ShuttingDown,
                        Some(Ok(message)) if this.drained < LINGER_MAX_BYTES => {
                            // Payload and the smallest masked header: empty frames count too.
                            this.drained += 6 + match message {
                                Received::Text(text) => text.len(),
                                Received::Binary(len) => len,
                                Received::Ping(payload) => payload.len(),
                                Received::Pong | Received::Close(_) => 0,
                            };
                            CloseState::AwaitingReply
                        }
                        Some(Ok(_)) => CloseState::ShuttingDown,
                        Some(Err(_)) => CloseState::Draining,
                    }
                }
                CloseState::Draining => {
                    let mut buf = [0u8; 1024];
                    let mut rb = ReadBuf::new(&mut buf);
                    match ready!(Pin::new(this.inner.get_mut()).poll_read(cx, &mut rb)) {
                        Ok(()) if !rb.filled().is_empty() && this.drained < LINGER_MAX_BYTES => {
                            this.drained += rb.filled().len();
                            CloseState::Draining
                        }
                        _ => CloseState::ShuttingDown,
                    }
                }
                CloseState::ShuttingDown => {
                    let _ = ready!(Pin::new(this.inner.get_mut()).poll_shutdown(cx));
                    CloseState::Done
                }
                CloseState::Done => return Poll::Ready(Ok(())),
            };
        }
    }
}

/// An accepted stream during the upgrade handshake. Once the upgrade is accepted, what
/// tungstenite writes (the `101` response) is kept here rather than sent: it leaves with
/// the session's first reply (`connected`, or a refusal and the close frame) in one write,
/// so the client gets one segment (over WSS, one TLS record) without the socket being
/// held back by an option of its own (docs/performance.md). A refused upgrade (404, 503)
/// is written through as usual.
struct Handshaking<S> {
    inner: S,
    /// Set by the upgrade callback when it accepts, before the response is written.
    hold: Arc<AtomicBool>,
    held: Vec<u8>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Handshaking<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Handshaking<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.hold.load(Ordering::Relaxed) {
            self.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.hold.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Settings for the WebSocket tungstenite builds at the end of the handshake, which is
/// taken apart at once ([`WsIo`] frames the connection): buffers as small as it allows.
fn handshake_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(1024).write_buffer_size(0)
}

fn json_error(status: u16, code: &str, message: &str) -> ErrorResponse {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut resp = ErrorResponse::new(Some(body));
    *resp.status_mut() = http::StatusCode::from_u16(status).expect("valid status");
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

/// Runs the upgrade handshake on an accepted stream, then hands the connection to a session.
// The callback's error type is tungstenite's `ErrorResponse`, not ours to shrink.
#[allow(clippy::result_large_err)]
///
/// `guard` is the connection's slot (`None` when the node is full: the upgrade is answered
/// 503); `deadline` bounds the handshake.
pub async fn serve_connection<S>(
    stream: S,
    remote: std::net::SocketAddr,
    transport: Transport,
    hub: Arc<Hub>,
    guard: Option<ConnGuard>,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    let limits = &hub.config().limits;
    let full = guard.is_none();
    let mut query: Option<String> = None;
    // Whether an upgrade request arrived: a connection closed before one (a load balancer's
    // TCP health check, a port scan) is not a refused client.
    let mut requested = false;
    let hold = Arc::new(AtomicBool::new(false));
    let accepted = hold.clone();
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        requested = true;
        if req.uri().path() != CONNECT_PATH {
            return Err(json_error(404, "not_found", "WebSocket clients connect at /ws/connect"));
        }
        if full {
            return Err(json_error(503, "too_many_connections", "this node is at limits.max_connections"));
        }
        query = Some(req.uri().query().unwrap_or_default().to_string());
        accepted.store(true, Ordering::Relaxed);
        Ok(resp)
    };
    let stream = Handshaking { inner: stream, hold, held: Vec::new() };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(handshake_config()));
    let ws = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            if requested {
                let reason = if full { ErrorCode::TooManyConnections.as_str() } else { "handshake_failed" };
                hub.metrics().rejected(None, transport, reason);
            }
            debug!(%remote, %transport, error = %e, "WebSocket handshake failed");
            return;
        }
        Err(_) => {
            hub.metrics().rejected(None, transport, ErrorCode::ConnectTimeout.as_str());
            debug!(%remote, %transport, "WebSocket handshake timed out");
            return;
        }
    };
    let (Some(guard), Some(query)) = (guard, query) else { return };
    // tungstenite refuses bytes sent after the upgrade request and before our response
    // (RFC 6455, section 4.1: the client waits), so it holds none that this would drop.
    let Handshaking { inner, held, .. } = ws.into_inner();
    let io = WsIo::new(inner, limits.max_frame_bytes).with_unsent(&held);
    match ConnectRequest::from_query(&query, transport, remote) {
        Ok(request) => session::start(io.batched(request.batch, limits.max_frame_bytes), hub, request, guard).await,
        Err(why) => {
            hub.metrics().rejected(None, transport, ErrorCode::InvalidFrame.as_str());
            session::reject(io, ErrorCode::InvalidFrame, why).await;
        }
    }
}

/// Accepts plain WebSocket connections until shutdown.
pub async fn accept_loop(listener: TcpListener, hub: Arc<Hub>, tracker: TaskTracker) {
    let stop = hub.shutdown_token();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                let deadline = tokio::time::Instant::now() + hub.config().limits.connect_timeout;
                let guard = hub.try_admit();
                tracker.spawn(serve_connection(
                    ReadAhead::new(stream),
                    remote,
                    Transport::Ws,
                    hub.clone(),
                    guard,
                    deadline,
                ));
            }
            Err(e) => super::accept_backoff(&e).await,
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use futures_util::SinkExt;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpStream;

    use super::*;

    async fn pair() -> (WsIo<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (WsIo::new(server, 1024), client)
    }

    const UPGRADE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";

    /// Until the upgrade is accepted, writes go through (a refusal is sent as it is
    /// written); after, they are held, and flushing them sends nothing.
    #[tokio::test]
    async fn the_handshake_holds_what_follows_the_acceptance() {
        let hold = Arc::new(AtomicBool::new(false));
        let mut stream = Handshaking { inner: CountingSocket::default(), hold: hold.clone(), held: Vec::new() };
        stream.write_all(b"HTTP/1.1 404 Not Found\r\n\r\n").await.unwrap();
        stream.flush().await.unwrap();
        assert_eq!(stream.inner.writes, 1);
        hold.store(true, Ordering::Relaxed);
        stream.write_all(UPGRADE).await.unwrap();
        stream.flush().await.unwrap();
        assert_eq!(stream.inner.writes, 1, "nothing more reached the socket");
        assert_eq!(stream.held, UPGRADE);
    }

    /// The held upgrade response leaves first, in the same write as the session's first
    /// reply: the client gets both in one segment.
    #[tokio::test]
    async fn the_upgrade_response_leaves_with_the_first_reply() {
        let mut io = WsIo::new(CountingSocket::default(), 1024).with_unsent(UPGRADE);
        io.feed(Outbound::Frame(crate::protocol::Frame::from(r#"{"type":"connected"}"#.to_string()))).await.unwrap();
        assert_eq!(io.inner.get_ref().writes, 0, "feeding alone sends nothing");
        io.flush().await.unwrap();
        let socket = io.inner.get_ref();
        assert_eq!(socket.writes, 1);
        assert!(socket.written.starts_with(UPGRADE), "{:?}", String::from_utf8_lossy(&socket.written));
        assert_eq!(socket.written.len(), UPGRADE.len() + 2 + r#"{"type":"connected"}"#.len());
        // Written, the two leave nothing behind: a quiet connection holds no write buffer.
        assert_eq!(io.inner.write_buffer().capacity(), 0);
    }

    /// A client that sends nothing after its upgrade (most of them, most of the time) gets
    /// no read buffer; one is allocated when a frame arrives.
    #[tokio::test]
    async fn a_quiet_connection_holds_no_read_buffer() {
        use futures_util::{FutureExt as _, StreamExt as _};
        let (mut io, mut client) = pair().await;
        assert!(io.next().now_or_never().is_none());
        assert_eq!(io.inner.read_buffer().capacity(), 0);
        // A masked text frame "{}" (mask 1, 2, 3, 4).
        client.write_all(&[0x81, 0x82, 1, 2, 3, 4, b'{' ^ 1, b'}' ^ 2]).await.unwrap();
        let Some(Ok(Inbound::Frame(text))) = io.next().await else { panic!("no frame") };
        assert_eq!(text, "{}");
        assert!(io.inner.read_buffer().capacity() > 0);
    }

    /// A socket that counts the writes that reach it (and never has anything to read).
    #[derive(Default)]
    struct CountingSocket {
        writes: usize,
        written: Vec<u8>,
    }

    impl AsyncRead for CountingSocket {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for CountingSocket {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl ReadReady for CountingSocket {
        fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    /// A session's full batch of deliveries at the usual message size (a 128-byte payload,
    /// as the load generator sends) reaches the socket in one write, not two: each write is
    /// a system call and, over loopback, the receiver's wake-up too.
    #[tokio::test]
    async fn a_full_batch_of_messages_is_one_write() {
        use crate::protocol::{Envelope, MsgIdGen, conversation_id, encode_message};
        let data = format!(r#"{{"t":1763916512345678901,"p":"{}"}}"#, "x".repeat(96));
        assert_eq!(data.len(), 128);
        let data = serde_json::value::RawValue::from_string(data).unwrap();
        let msg_id = MsgIdGen::new("node-1").next_at(1_763_916_512_345);
        let conversation = conversation_id("app", "s17", "r17");
        let envelope = Envelope {
            from: "s17",
            to: "r17",
            channel: None,
            event: 1,
            data: &data,
            msg_id: &msg_id,
            send_at: 1_763_916_512_345,
            conversation_id: &conversation,
        };
        let frame = encode_message(&envelope);
        let mut io = WsIo::new(CountingSocket::default(), 1024);
        for _ in 0..crate::session::MAX_BATCH {
            io.feed(Outbound::Frame(frame.clone())).await.unwrap();
        }
        io.flush().await.unwrap();
        let socket = io.inner.get_ref();
        assert_eq!(socket.written.len(), crate::session::MAX_BATCH * (frame.len() + 4), "every frame, with its header");
        assert_eq!(socket.writes, 1, "{} bytes in {} writes", socket.written.len(), socket.writes);
    }

    /// The server's frames in `wire`: (opcode, payload) each.
    fn server_frames(mut wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        while !wire.is_empty() {
            let (len, at) = match wire[1] {
                126 => (usize::from(u16::from_be_bytes([wire[2], wire[3]])), 4),
                127 => panic!("no batch needs a 64-bit length"),
                len => (usize::from(len), 2),
            };
            frames.push((wire[0], wire[at..at + len].to_vec()));
            wire = &wire[at + len..];
        }
        frames
    }

    /// A batch larger than the write buffer's limit: the inner sink writes mid-burst, and
    /// every message it writes is whole; a ping seals the open one; nothing is lost or
    /// reordered.
    #[tokio::test]
    async fn a_batch_is_sealed_before_any_write() {
        let mut io = WsIo::new(CountingSocket::default(), 1024).batched(true, 1 << 16);
        let frame = |i: usize| format!(r#"{{"n":{i},"p":"{}"}}"#, "x".repeat(1000));
        for i in 0..crate::session::MAX_BATCH {
            io.feed(Outbound::Frame(crate::protocol::Frame::from(frame(i)))).await.unwrap();
        }
        io.feed(Outbound::Ping).await.unwrap();
        io.feed(Outbound::Frame(crate::protocol::Frame::from(frame(64)))).await.unwrap();
        io.flush().await.unwrap();
        let socket = io.inner.get_ref();
        assert!(socket.writes >= 2, "the burst was written before the flush: {}", socket.writes);
        let frames = server_frames(&socket.written);
        let opcodes: Vec<u8> = frames.iter().map(|(op, _)| *op).collect();
        assert_eq!(opcodes, [0x81, 0x81, 0x89, 0x81], "two messages of the burst, the ping, the last frame");
        let lines: Vec<String> = frames
            .iter()
            .filter(|(op, _)| *op == 0x81)
            .flat_map(|(_, payload)| {
                std::str::from_utf8(payload).unwrap().split('\n').map(str::to_string).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(lines, (0..=64).map(frame).collect::<Vec<_>>());
    }

    /// The buffer a burst grew is given back at the next heartbeat ping: a connection that
    /// was busy once does not keep tens of kilobytes while quiet.
    #[tokio::test]
    async fn the_ping_gives_back_a_grown_write_buffer() {
        let mut io = WsIo::new(CountingSocket::default(), 1024);
        let (_, grown, after) = super::super::burst_then_ping(&mut io, |io| io.inner.write_buffer().capacity()).await;
        assert!(grown >= super::super::WRITE_BATCH, "{grown}");
        assert!(after < 4096, "the frame after the ping went into the old buffer: {after}");
        assert_eq!(io.inner.get_ref().writes, 4, "two for the batch, one for the ping, one for the last frame");
    }

    /// A session that closes without a flush (it found nothing to say) sends the upgrade
    /// response too, before its close frame: the client has to see both to answer.
    #[tokio::test]
    async fn closing_sends_the_upgrade_response_first() {
        let mut io = WsIo::new(CountingSocket::default(), 1024).with_unsent(UPGRADE);
        // The client never answers; one poll of the close is enough.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), io.close()).await;
        let socket = io.inner.get_ref();
        assert_eq!(socket.writes, 1);
        assert!(socket.written.starts_with(UPGRADE));
        assert_eq!(&socket.written[UPGRADE.len()..], [0x88, 0], "an empty close frame");
    }
}
