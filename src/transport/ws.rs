//! WebSocket (and, over a TLS stream, WebSocket Secure): the upgrade handshake at
//! `/ws/connect` and the adapter that makes a WebSocket a [`FrameIo`](super::FrameIo).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::readahead::ReadAhead;
use super::{Cork, Inbound, Outbound, ReadError, Transport};
use crate::hub::{ConnGuard, Hub};
use crate::protocol::ErrorCode;
use crate::session::{self, ConnectRequest};

/// The one path clients upgrade on.
pub const CONNECT_PATH: &str = "/ws/connect";

/// Bytes read and thrown away after closing, so that closing the socket with unread input
/// does not turn into a TCP reset that destroys the close frame just sent.
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// Adapts a WebSocket to frames: text messages carry frames, pings and pongs count as
/// activity, binary messages are refused.
#[derive(Debug)]
pub struct WsIo<S> {
    inner: WebSocketStream<S>,
    close: CloseState,
    /// The socket was corked for the handshake ([`Cork`]): released at the first flush.
    corked: bool,
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
    S: AsyncRead + AsyncWrite + Cork + Unpin,
{
    pub fn new(inner: WebSocketStream<S>) -> Self {
        Self { inner, close: CloseState::Open, corked: false, drained: 0 }
    }

    /// Takes a connection whose socket was corked before the handshake; the first flush (or
    /// close) releases it.
    pub fn uncork_at_first_flush(mut self) -> Self {
        self.corked = true;
        self
    }

    fn uncork(&mut self) {
        if self.corked {
            self.corked = false;
            self.inner.get_ref().set_cork(false);
        }
    }

    /// Wraps a stream on which the handshake already happened elsewhere.
    pub async fn from_raw(stream: S, role: Role, config: WebSocketConfig) -> Self {
        Self::new(WebSocketStream::from_raw_socket(stream, role, Some(config)).await)
    }
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        other => io::Error::other(other),
    }
}

impl<S> Stream for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Result<Inbound, ReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let item = match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(Message::Text(text))) => Ok(Inbound::Frame(text)),
                Some(Ok(Message::Binary(_))) => Err(ReadError::Binary),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(Inbound::Activity),
                // The client closed; tungstenite queues the close reply, flushed on close().
                Some(Ok(Message::Close(_))) => return Poll::Ready(None),
                Some(Ok(Message::Frame(_))) => continue,
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Poll::Ready(None),
                Some(Err(WsError::Capacity(_))) => Err(ReadError::TooLarge),
                Some(Err(WsError::Utf8(_))) => Err(ReadError::InvalidUtf8),
                Some(Err(WsError::Io(e))) => Err(ReadError::Io(e)),
                Some(Err(e)) => Err(ReadError::Protocol(e.to_string())),
            };
            return Poll::Ready(Some(item));
        }
    }
}

impl<S> Sink<Outbound> for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Cork + Unpin,
{
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_ready(cx).map_err(to_io)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Outbound) -> io::Result<()> {
        let msg = match item {
            Outbound::Frame(frame) => Message::Text(frame.into_text()),
            Outbound::Ping => Message::Ping(Bytes::new()),
            Outbound::Close(code) => {
                Message::Close(Some(CloseFrame { code: code.close_code().into(), reason: code.as_str().into() }))
            }
        };
        Pin::new(&mut self.inner).start_send(msg).map_err(to_io)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        self.uncork();
        Poll::Ready(flushed.map_err(to_io))
    }

    /// Completes the close handshake: sends a close frame unless one was sent, reads (and
    /// drops) what the client still sends until its close reply, then shuts the socket.
    /// Bounded by [`LINGER_MAX_BYTES`]; callers bound it in time.
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.close != CloseState::Open {
                // Our last frames are written (a refusal's error and close frames leave with
                // the upgrade response); the client has to see them to answer.
                this.uncork();
            }
            this.close = match this.close {
                CloseState::Open => {
                    // An error here means the peer is gone; there is nothing left to tell it.
                    match ready!(Pin::new(&mut this.inner).poll_close(cx)) {
                        Ok(()) => CloseState::AwaitingReply,
                        Err(_) => CloseState::ShuttingDown,
                    }
                }
                CloseState::AwaitingReply => match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                    None | Some(Ok(Message::Close(_))) => CloseState::ShuttingDown,
                    Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_))) => {
                        CloseState::ShuttingDown
                    }
                    Some(Ok(m)) if this.drained < LINGER_MAX_BYTES => {
                        this.drained += m.len();
                        CloseState::AwaitingReply
                    }
                    Some(Ok(_)) => CloseState::ShuttingDown,
                    Some(Err(_)) => CloseState::Draining,
                },
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

/// The WebSocket settings for client connections: a 1 KiB read buffer (this node holds many
/// idle connections; larger frames still arrive whole, and on plain WS [`ReadAhead`] makes
/// the socket reads 16 KiB: docs/performance.md),
/// writes batched up to 16 KiB between flushes, frames capped.
pub fn ws_config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
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
    S: AsyncRead + AsyncWrite + Cork + Unpin + Send + 'static,
{
    let limits = &hub.config().limits;
    let full = guard.is_none();
    let mut query: Option<String> = None;
    // Whether an upgrade request arrived: a connection closed before one (a load balancer's
    // TCP health check, a port scan) is not a refused client.
    let mut requested = false;
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        requested = true;
        if req.uri().path() != CONNECT_PATH {
            return Err(json_error(404, "not_found", "WebSocket clients connect at /ws/connect"));
        }
        if full {
            return Err(json_error(503, "too_many_connections", "this node is at limits.max_connections"));
        }
        query = Some(req.uri().query().unwrap_or_default().to_string());
        Ok(resp)
    };
    // Held until the session's first reply joins the upgrade response (or the socket
    // closes, for a refused upgrade).
    stream.set_cork(true);
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config(limits.max_frame_bytes)));
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
    let request = ConnectRequest::from_query(&query, transport, remote);
    session::start(WsIo::new(ws).uncork_at_first_flush(), hub, request, guard).await;
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
    use socket2::SockRef;
    use tokio::net::TcpStream;

    use super::*;

    async fn corked_pair() -> (WsIo<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        server.set_cork(true);
        let ws = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        (WsIo::new(ws).uncork_at_first_flush(), client)
    }

    fn corked(io: &WsIo<TcpStream>) -> bool {
        SockRef::from(io.inner.get_ref()).tcp_cork().unwrap()
    }

    /// Held only until the session's first reply: a socket left corked would hold every
    /// later frame for the kernel's 200 ms.
    #[tokio::test]
    async fn the_first_flush_releases_the_socket() {
        let (mut io, _client) = corked_pair().await;
        assert!(corked(&io));
        io.feed(Outbound::Ping).await.unwrap();
        assert!(corked(&io), "feeding alone does not release");
        io.flush().await.unwrap();
        assert!(!corked(&io));
    }

    /// A session that closes without a flush (it found nothing to say) releases too: the
    /// client has to see the close frame to answer it.
    #[tokio::test]
    async fn closing_releases_the_socket() {
        let (mut io, _client) = corked_pair().await;
        // The client never answers; one poll of the close is enough.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), io.close()).await;
        assert!(!corked(&io));
    }
}
