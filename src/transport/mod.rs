//! Transports: accept loops for TCP, WS and WSS, each producing the one connection type
//! sessions work with.
//!
//! Owns sockets, TLS, the WebSocket handshake and framing (WS text messages, or a 4-byte
//! length prefix on TCP). Above this module a connection is a [`FrameIo`]: a stream of
//! inbound JSON frames and a sink of outbound ones, whatever carried them. It does not look
//! inside frames.

mod batch;
pub mod readahead;
pub mod tcp;
pub mod tls;
pub mod ws;
mod wsframe;

use std::fmt;
use std::io;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::{Sink, Stream};
use tokio::io::AsyncRead;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::codec::{Decoder, Framed};

use crate::protocol::{ErrorCode, Frame};

/// How a client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Ws,
    Wss,
}

impl Transport {
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something received from a client.
#[derive(Debug)]
pub enum Inbound {
    /// One JSON frame, its UTF-8 checked by the transport (so decoding does not check again).
    Frame(Utf8Bytes),
    /// Proof of life without a frame (a WebSocket ping or pong).
    Activity,
}

/// Something to send to a client.
#[derive(Debug)]
pub enum Outbound {
    /// One JSON frame.
    Frame(Frame),
    /// A liveness probe: a WebSocket ping, or a `{"type":"ping"}` frame on TCP.
    Ping,
    /// End the connection for this reason (a WebSocket close frame; nothing on TCP, where
    /// the session's `error` frame already said why).
    Close(ErrorCode),
}

/// Why reading from a client failed.
#[derive(Debug)]
pub enum ReadError {
    /// A WebSocket binary message; the connection can go on.
    Binary,
    /// A frame over `limits.max_frame_bytes`; the stream cannot be resynchronised.
    TooLarge,
    /// A text frame that is not UTF-8.
    InvalidUtf8,
    /// A WebSocket protocol violation.
    Protocol(String),
    /// The socket failed or the peer vanished without closing.
    Io(io::Error),
}

impl ReadError {
    /// The error code to tell the client, or `None` when the connection is simply gone.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ReadError::Binary => Some(ErrorCode::BinaryUnsupported),
            ReadError::TooLarge => Some(ErrorCode::FrameTooLarge),
            ReadError::InvalidUtf8 => Some(ErrorCode::InvalidUtf8),
            ReadError::Protocol(_) => Some(ErrorCode::ProtocolError),
            ReadError::Io(_) => None,
        }
    }

    pub fn is_fatal(&self) -> bool {
        !matches!(self, ReadError::Binary)
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Binary => f.write_str("binary frames are not supported; send JSON as text"),
            ReadError::TooLarge => f.write_str("frame exceeds limits.max_frame_bytes"),
            ReadError::InvalidUtf8 => f.write_str("text frame is not valid UTF-8"),
            ReadError::Protocol(e) => write!(f, "WebSocket protocol error: {e}"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A client connection as sessions see it. `None` from the stream means the client closed.
pub trait FrameIo:
    Stream<Item = Result<Inbound, ReadError>> + Sink<Outbound, Error = io::Error> + Unpin + Send + 'static
{
}

impl<T> FrameIo for T where
    T: Stream<Item = Result<Inbound, ReadError>> + Sink<Outbound, Error = io::Error> + Unpin + Send + 'static
{
}

/// A stream that can tell whether a read would find something without being given a buffer
/// to read into.
pub trait ReadReady {
    /// `Ready` when a read may return bytes, the end of the stream or an error; `Pending`
    /// arranges for the task to be woken when that changes.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl<S: ReadReady> ReadReady for readahead::ReadAhead<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buffered() > 0 { Poll::Ready(Ok(())) } else { self.get_ref().poll_read_ready(cx) }
    }
}

impl<S> ReadReady for tokio_rustls::server::TlsStream<S> {
    /// Always: the TLS layer may hold decrypted bytes that the socket no longer shows.
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
impl ReadReady for tokio::io::DuplexStream {
    /// Always (an in-memory stream, for tests): reads then allocate at once.
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The read buffer of a connection: small, because the node holds many connections
/// ([`readahead::ReadAhead`] under it makes the socket reads large).
const READ_BUFFER: usize = 1024;
/// Frames written are put on the wire once this many bytes wait, or at the flush. Room for
/// a whole batch of the session's (64 frames) at the usual message size: a `message` frame
/// around a 128-byte payload is about 300 bytes, 64 of them with their headers 19.6 KB,
/// which at 16 KiB took two writes where one does (docs/performance.md: about half the
/// `writev` calls per message at the peak). A connection keeps the buffer it grew (after a
/// busy moment, about twice this at most, unless a single frame was larger) until its next
/// heartbeat ping ([`release_write_buffer`]).
const WRITE_BATCH: usize = 32 * 1024;

/// A connection's frames over `stream`, with neither buffer at its working size: the read
/// buffer is allocated when there is something to read ([`poll_read_frames`]), the write
/// buffer grows with what is written (up to [`WRITE_BATCH`] before it is put on the wire).
pub(crate) fn framed<T, U>(stream: T, codec: U) -> Framed<T, U> {
    let mut inner = Framed::with_capacity(stream, codec, 0);
    *inner.write_buffer_mut() = bytes::BytesMut::new();
    inner.set_backpressure_boundary(WRITE_BATCH);
    inner
}

/// Polls a framed connection whose read buffer is allocated only once there is something
/// to read: a client that connects and then stays quiet (most of them, most of the time)
/// holds no read buffer (docs/performance.md). Once allocated the buffer is kept, so a
/// busy connection allocates nothing per read. `allocated` is the caller's record of
/// whether it has one (a buffer whose frames were all split off can show no capacity
/// while it still owns its memory).
pub(crate) fn poll_read_frames<T, U>(
    framed: &mut Framed<T, U>,
    allocated: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<U::Item, U::Error>>>
where
    T: AsyncRead + ReadReady + Unpin,
    U: Decoder,
{
    let fresh = !*allocated;
    if fresh {
        // An error is left for the read below to report.
        let _ = ready!(framed.get_ref().poll_read_ready(cx));
        // Made with its capacity rather than reserved: `BytesMut` remembers the capacity it
        // was made with, and when frames split off it still hold the old memory, the next
        // buffer is at least that large. Reserved into an empty one, it would remember 0,
        // and start again from a few bytes, a read system call each.
        debug_assert!(framed.read_buffer().is_empty(), "a buffer is only given back empty");
        *framed.read_buffer_mut() = bytes::BytesMut::with_capacity(READ_BUFFER);
        *allocated = true;
    }
    let polled = Pin::new(&mut *framed).poll_next(cx);
    // Readiness can be stale (nothing has read the socket since it was last seen ready): a
    // buffer allocated for a read that found nothing is given back.
    if fresh && polled.is_pending() && framed.read_buffer().is_empty() {
        release_read_buffer(framed, allocated);
    }
    polled
}

/// Gives a framed connection's read buffer back if it holds nothing; the next read that
/// finds something allocates it again.
pub(crate) fn release_read_buffer<T, U>(framed: &mut Framed<T, U>, allocated: &mut bool) {
    if framed.read_buffer().is_empty() {
        *framed.read_buffer_mut() = bytes::BytesMut::new();
        *allocated = false;
    }
}

/// Gives a framed connection's write buffer back if nothing waits in it. Transports call it
/// as they write the heartbeat ping (once per `heartbeat.ping_interval`), so a connection
/// that grew its buffer in a busy moment (up to about twice [`WRITE_BATCH`]) does not keep it
/// while quiet; a busy one regrows it once per interval.
pub(crate) fn release_write_buffer<T, U>(framed: &mut Framed<T, U>) {
    if framed.write_buffer().is_empty() {
        *framed.write_buffer_mut() = bytes::BytesMut::new();
    }
}

/// Grows `io`'s write buffer with a burst of a session's full batch of 1 KiB frames,
/// writes it out, pings, and feeds one more frame; returns that frame and the buffer's
/// capacity (read by `capacity`) after the burst and after the last frame. With the buffer
/// given back at the ping, the last frame lands in a fresh buffer of its own size.
#[cfg(test)]
pub(crate) async fn burst_then_ping<T>(io: &mut T, capacity: impl Fn(&T) -> usize) -> (Frame, usize, usize)
where
    T: Sink<Outbound, Error = io::Error> + Unpin,
{
    use futures_util::SinkExt as _;
    let frame = Frame::from(format!(r#"{{"type":"message","data":"{}"}}"#, "x".repeat(1000)));
    for _ in 0..crate::session::MAX_BATCH {
        io.feed(Outbound::Frame(frame.clone())).await.unwrap();
    }
    let grown = capacity(io);
    // Written out, the buffer shows no room left (it was advanced past what was written)
    // but still owns its memory: a write that reused it would find it all again.
    io.flush().await.unwrap();
    io.send(Outbound::Ping).await.unwrap();
    io.feed(Outbound::Frame(frame.clone())).await.unwrap();
    let after = capacity(io);
    io.flush().await.unwrap();
    (frame, grown, after)
}

/// Sleeps a little after an accept error (e.g. out of file descriptors) so that an accept
/// loop does not spin; the error is logged by the caller.
pub(crate) async fn accept_backoff(err: &io::Error) {
    tracing::warn!(error = %err, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}
