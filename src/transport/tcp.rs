//! Plain TCP: each frame is a 4-byte big-endian length followed by that many bytes of
//! UTF-8 JSON, and the first frame must be `connect`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::codec::{Framed, LengthDelimitedCodec, LengthDelimitedCodecError};
use tokio_util::task::TaskTracker;

use super::batch::{Batch, Framing};
use super::readahead::ReadAhead;
use super::{Inbound, Outbound, ReadError, ReadReady, Transport};
use crate::hub::Hub;
use crate::protocol::{ClientFrame, ErrorCode, decode_client_frame};
use crate::session::{self, ConnectRequest};

const PING_FRAME: &[u8] = br#"{"type":"ping"}"#;
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// Adapts a byte stream with length-prefixed frames to [`FrameIo`](super::FrameIo).
#[derive(Debug)]
pub struct TcpIo<S> {
    inner: Framed<S, LengthDelimitedCodec>,
    /// Whether `inner` has a read buffer ([`super::poll_read_frames`]).
    read_buffer: bool,
    /// The open message of a connection that asked for batched frames.
    batch: Option<Batch>,
    shut_down: bool,
    drained: usize,
}

impl<S: AsyncRead + AsyncWrite + ReadReady + Unpin> TcpIo<S> {
    pub fn new(stream: S, max_frame_bytes: usize) -> Self {
        let codec = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .big_endian()
            .max_frame_length(max_frame_bytes)
            .new_codec();
        Self { inner: super::framed(stream, codec), read_buffer: false, batch: None, shut_down: false, drained: 0 }
    }
}

impl<S> TcpIo<S> {
    /// Joins the frames written between flushes into one length-prefixed frame of at most
    /// `max_frame_bytes`, a line each ([`super::batch`]).
    pub fn batched(mut self, on: bool, max_frame_bytes: usize) -> Self {
        self.batch = on.then(|| Batch::new(Framing::Length32, max_frame_bytes));
        self
    }

    /// Ends the open batch, if any: what is in the write buffer may now be written.
    fn seal(&mut self) {
        if let Some(batch) = &mut self.batch {
            batch.seal(self.inner.write_buffer_mut());
        }
    }

    /// Gives the read buffer back if it holds nothing: after its `connect` frame a client is
    /// usually quiet.
    fn release_read_buffer(&mut self) {
        super::release_read_buffer(&mut self.inner, &mut self.read_buffer);
    }
}

impl<S: AsyncRead + AsyncWrite + ReadReady + Unpin> Stream for TcpIo<S> {
    type Item = Result<Inbound, ReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let polled = ready!(super::poll_read_frames(&mut this.inner, &mut this.read_buffer, cx));
        Poll::Ready(match polled {
            None => None,
            Some(Ok(frame)) => Some(match Utf8Bytes::try_from(frame.freeze()) {
                Ok(text) => Ok(Inbound::Frame(text)),
                Err(_) => Err(ReadError::InvalidUtf8),
            }),
            Some(Err(e)) if e.get_ref().is_some_and(|inner| inner.is::<LengthDelimitedCodecError>()) => {
                Some(Err(ReadError::TooLarge))
            }
            Some(Err(e)) => Some(Err(ReadError::Io(e))),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + ReadReady + Unpin> Sink<Outbound> for TcpIo<S> {
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The inner sink writes its buffer out once it holds a batch's worth.
        if self.inner.write_buffer().len() >= super::WRITE_BATCH {
            self.seal();
        }
        Sink::<Bytes>::poll_ready(Pin::new(&mut self.inner), cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Outbound) -> io::Result<()> {
        let this = &mut *self;
        if let (Some(batch), Outbound::Frame(frame)) = (&mut this.batch, &item)
            && batch.push(this.inner.write_buffer_mut(), frame)
        {
            return Ok(());
        }
        self.seal();
        match item {
            Outbound::Frame(frame) => Pin::new(&mut self.inner).start_send(frame.into_bytes()),
            Outbound::Ping => {
                super::release_write_buffer(&mut self.inner);
                Pin::new(&mut self.inner).start_send(Bytes::from_static(PING_FRAME))
            }
            // The session's fatal `error` frame already said why; closing is poll_close.
            Outbound::Close(_) => Ok(()),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.seal();
        Sink::<Bytes>::poll_flush(Pin::new(&mut self.inner), cx)
    }

    /// Flushes, sends FIN, then reads and drops what the client still sends (bounded), so
    /// that the last frame is not lost to a TCP reset.
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.seal();
        let this = &mut *self;
        if !this.shut_down {
            let _ = ready!(Sink::<Bytes>::poll_flush(Pin::new(&mut this.inner), cx));
            let _ = ready!(Pin::new(this.inner.get_mut()).poll_shutdown(cx));
            this.shut_down = true;
        }
        let raw = this.inner.get_mut();
        let mut buf = [0u8; 1024];
        while this.drained < LINGER_MAX_BYTES {
            let mut rb = ReadBuf::new(&mut buf);
            match ready!(Pin::new(&mut *raw).poll_read(cx, &mut rb)) {
                Ok(()) if rb.filled().is_empty() => break,
                Ok(()) => this.drained += rb.filled().len(),
                Err(_) => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Waits for the `connect` frame, then hands the connection to a session.
pub async fn serve_connection<S>(stream: S, remote: std::net::SocketAddr, hub: Arc<Hub>)
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    let limits = &hub.config().limits;
    let mut io = TcpIo::new(stream, limits.max_frame_bytes);
    let rejected = |code: ErrorCode| hub.metrics().rejected(None, Transport::Tcp, code.as_str());
    let Some(guard) = hub.try_admit() else {
        rejected(ErrorCode::TooManyConnections);
        return session::reject(io, ErrorCode::TooManyConnections, "this node is at limits.max_connections").await;
    };
    let first = match tokio::time::timeout(limits.connect_timeout, io.next()).await {
        Err(_) => {
            rejected(ErrorCode::ConnectTimeout);
            let msg = "no connect frame within limits.connect_timeout";
            return session::reject(io, ErrorCode::ConnectTimeout, msg).await;
        }
        Ok(None | Some(Err(ReadError::Io(_)))) => return,
        Ok(Some(Err(e))) => {
            let code = e.code().unwrap_or(ErrorCode::ProtocolError);
            rejected(code);
            return session::reject(io, code, &e.to_string()).await;
        }
        Ok(Some(Ok(Inbound::Activity))) => unreachable!("TCP framing never yields bare activity"),
        Ok(Some(Ok(Inbound::Frame(bytes)))) => bytes,
    };
    let request = match decode_client_frame(&first) {
        Ok(ClientFrame::Connect(c)) => ConnectRequest {
            app_id: Some(c.app_id.into_owned()),
            token: Some(c.token.into_owned()),
            transport: Transport::Tcp,
            remote,
            params: Vec::new(),
            batch: c.batch,
        },
        Ok(_) => {
            rejected(ErrorCode::ConnectRequired);
            let msg = r#"the first frame must be {"type":"connect","app_id":...,"token":...}"#;
            return session::reject(io, ErrorCode::ConnectRequired, msg).await;
        }
        Err(e) => {
            rejected(e.code);
            return session::reject(io, e.code, &e.message).await;
        }
    };
    // The frame shares the read buffer's memory: both go before the session starts.
    drop(first);
    io.release_read_buffer();
    let io = io.batched(request.batch, limits.max_frame_bytes);
    session::start(io, hub, request, guard).await;
}

/// Accepts TCP clients until shutdown.
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
                tracker.spawn(serve_connection(ReadAhead::new(stream), remote, hub.clone()));
            }
            Err(e) => super::accept_backoff(&e).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::SinkExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::protocol::Frame;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    /// Frames larger than the 1 KiB read buffer, and many small ones in one write, arrive
    /// whole and in order through the per-thread read chunks.
    #[tokio::test]
    async fn frames_larger_than_the_read_buffer_and_bursts_arrive_whole() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut io = TcpIo::new(ReadAhead::new(near), 1 << 20);
        let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(40_000));
        let mut burst = framed(big.as_bytes());
        for i in 0..500 {
            burst.extend(framed(format!(r#"{{"n":{i}}}"#).as_bytes()));
        }
        let writer = tokio::spawn(async move {
            far.write_all(&burst).await.unwrap();
            far
        });
        let Some(Ok(Inbound::Frame(first))) = io.next().await else { panic!("no first frame") };
        assert_eq!(first, big.as_str());
        for i in 0..500 {
            let Some(Ok(Inbound::Frame(f))) = io.next().await else { panic!("frame {i} missing") };
            assert_eq!(f, format!(r#"{{"n":{i}}}"#).as_str());
        }
        drop(writer.await.unwrap());
        assert!(io.next().await.is_none(), "the peer closed");
    }

    /// A connection allocates its read buffer when there is something to read, and gives it
    /// back after the `connect` frame: a quiet client holds none.
    #[tokio::test]
    async fn a_quiet_connection_holds_no_read_buffer() {
        use futures_util::FutureExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut far = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (near, _) = listener.accept().await.unwrap();
        let mut io = TcpIo::new(ReadAhead::new(near), 1 << 20);
        assert!(io.next().now_or_never().is_none(), "nothing to read yet");
        assert_eq!(io.inner.read_buffer().capacity(), 0, "and no buffer for it");

        far.write_all(&framed(br#"{"type":"connect"}"#)).await.unwrap();
        let Some(Ok(Inbound::Frame(f))) = io.next().await else { panic!("no frame") };
        assert_eq!(f, r#"{"type":"connect"}"#);
        assert!(io.inner.read_buffer().capacity() > 0);
        io.release_read_buffer();
        assert!(io.next().now_or_never().is_none());
        assert_eq!(io.inner.read_buffer().capacity(), 0, "given back, and not taken again while quiet");

        far.write_all(&framed(br#"{"n":2}"#)).await.unwrap();
        let Some(Ok(Inbound::Frame(f))) = io.next().await else { panic!("no frame") };
        assert_eq!(f, r#"{"n":2}"#);
    }

    /// Writes queue up past the old 2 KiB boundary and leave with the flush, each frame
    /// behind its length; an idle connection's write buffer starts empty.
    #[tokio::test]
    async fn queued_frames_leave_length_prefixed_at_the_flush() {
        let (near, mut far) = tokio::io::duplex(256 * 1024);
        let mut io = TcpIo::new(near, 1 << 20);
        assert_eq!(io.inner.write_buffer().capacity(), 0);
        let frames: Vec<String> =
            (0..300).map(|i| format!(r#"{{"type":"message","n":{i},"pad":"{}"}}"#, "y".repeat(64))).collect();
        for f in &frames {
            io.feed(Outbound::Frame(Frame::from(f.clone()))).await.unwrap();
        }
        io.flush().await.unwrap();
        let expected: Vec<u8> = frames.iter().flat_map(|f| framed(f.as_bytes())).collect();
        let mut got = vec![0; expected.len()];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }

    /// The buffer a burst grew is given back at the next heartbeat ping.
    #[tokio::test]
    async fn the_ping_gives_back_a_grown_write_buffer() {
        let (near, mut far) = tokio::io::duplex(256 * 1024);
        let mut io = TcpIo::new(near, 1 << 20);
        let (frame, grown, after) =
            super::super::burst_then_ping(&mut io, |io| io.inner.write_buffer().capacity()).await;
        assert!(grown >= super::super::WRITE_BATCH, "{grown}");
        assert!(after < 4096, "the frame after the ping went into the old buffer: {after}");
        // The burst, the ping, then the frame after it.
        let mut got = vec![0; (crate::session::MAX_BATCH + 1) * (frame.len() + 4) + PING_FRAME.len() + 4];
        far.read_exact(&mut got).await.unwrap();
        assert!(got.ends_with(&framed(frame.as_bytes())));
    }
}
