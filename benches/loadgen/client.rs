//! Clients for the three systems the load generator drives, all over WebSocket so that the
//! transport costs the same: switchboard's JSON frames, NATS's text protocol, MQTT 3.1.1
//! (QoS 0). Each is the smallest correct client for the operations a scenario needs:
//! connect (authenticated where the system has auth), subscribe, publish, receive.
//! All three are also reached over plain TCP, to show what WebSocket costs on top:
//! switchboard's TCP transport (the same JSON frames, each behind a 4-byte length), NATS's
//! client port and MQTT's plain listener (their protocols as byte streams).

use std::net::{IpAddr, SocketAddr};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use memchr::memmem;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::codec::{BytesCodec, FramedRead, FramedWrite, LengthDelimitedCodec};

type Ws = WebSocketStream<TcpStream>;

/// Nanoseconds since the load generator started: the clock in every payload.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A payload of `size` bytes (at least the timestamp): `{"t":<ns>,"p":"xxx…"}`.
pub fn payload(size: usize) -> Vec<u8> {
    let head = format!("{{\"t\":{},\"p\":\"", now_ns());
    let pad = size.saturating_sub(head.len() + 2);
    let mut v = Vec::with_capacity(head.len() + pad + 2);
    v.extend_from_slice(head.as_bytes());
    v.resize(v.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    v
}

/// A payload carrying a sequence number as well: `{"t":<ns>,"s":<seq>,"p":"xxx…"}`.
pub fn payload_seq(size: usize, seq: u64) -> Vec<u8> {
    let head = format!("{{\"t\":{},\"s\":{seq},\"p\":\"", now_ns());
    let pad = size.saturating_sub(head.len() + 2);
    let mut v = Vec::with_capacity(head.len() + pad + 2);
    v.extend_from_slice(head.as_bytes());
    v.resize(v.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    v
}

/// The sequence number inside a frame carrying a [`payload_seq`].
pub fn seq_of(frame: &[u8]) -> Option<u64> {
    static KEY: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b",\"s\":"));
    number_after(frame, &KEY)
}

/// The send timestamp inside whatever frame carried a payload: found, not parsed, so that
/// reading it costs the same for every system. The search is memchr's: a byte-at-a-time
/// one cost switchboard's clients, whose frames put the sender and message id before the
/// payload, three times what it cost the peers' (4.7 % of the load generator's samples
/// against 1.6 % at the peak of `direct`).
pub fn sent_at(frame: &[u8]) -> Option<u64> {
    static KEY: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"{\"t\":"));
    number_after(frame, &KEY)
}

/// The decimal number that follows the first `key` in `frame`.
fn number_after(frame: &[u8], key: &memmem::Finder<'_>) -> Option<u64> {
    let at = key.find(frame)? + key.needle().len();
    let digits = frame[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&frame[at..at + digits]).ok()?.parse().ok()
}

/// NATS's `PUB <subject> <size>\r\n`, written without `format!` (whose machinery cost the
/// peer's clients about 6 % of the load generator's samples at the peak of `direct`).
fn nats_pub_line(frame: &mut BytesMut, prefix: &str, name: &str, size: usize) {
    frame.put_slice(b"PUB ");
    frame.put_slice(prefix.as_bytes());
    frame.put_slice(name.as_bytes());
    frame.put_u8(b' ');
    frame.put_slice(itoa::Buffer::new().format(size).as_bytes());
    frame.put_slice(b"\r\n");
}

/// What [`Reader::next_delivery`] read.
#[derive(Debug)]
pub enum Delivery {
    /// A message's frame (switchboard's whole `message` frame, a peer's payload).
    Payload(Bytes),
    /// switchboard refused one of this client's sends.
    Refused,
}

/// Which system a client talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Switchboard,
    Nats,
    Mosquitto,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Switchboard => "switchboard",
            System::Nats => "nats-server",
            System::Mosquitto => "mosquitto",
        }
    }
}

/// What carries a client's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    WebSocket,
    /// Plain TCP: switchboard's TCP transport (4-byte big-endian length, then the frame),
    /// the peers' native listeners.
    Tcp,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub system: System,
    pub ws: SocketAddr,
    /// The plain TCP listener: switchboard's TCP transport, NATS's client port, MQTT's.
    pub tcp: SocketAddr,
    /// Which of the two clients use.
    pub wire: Wire,
    /// switchboard: the app and its secret (tokens are minted per user).
    pub app: String,
    pub secret: String,
    /// switchboard: mint hmac-auth plugin tokens with this key instead of JWTs.
    pub hmac_key: Option<String>,
    /// switchboard: ask for batched frames (`batch=1`): the frames written in one burst
    /// arrive as one message, a line each (NATS's byte stream lets one message carry many).
    pub batch: bool,
}

impl Endpoint {
    /// The same server reached over `wire`.
    pub fn over(&self, wire: Wire) -> Endpoint {
        Endpoint { wire, ..self.clone() }
    }
}

/// A token for `uid`: a JWT signed with the app's secret, or an hmac-auth plugin token.
fn token(endpoint: &Endpoint, uid: &str) -> String {
    match &endpoint.hmac_key {
        None => switchboard::auth::jwt::issue(endpoint.secret.as_bytes(), uid, Duration::from_secs(3600)),
        Some(key) => {
            use hmac::{Mac, SimpleHmac};
            let expiry = switchboard::protocol::now_ms() / 1000 + 3600;
            let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
            mac.update(format!("{uid}:{expiry}:").as_bytes());
            format!("{uid}:{expiry}::{}", hex::encode(mac.finalize().into_bytes()))
        }
    }
}

/// Frames are written when the caller flushes or this many bytes are waiting, over WebSocket
/// and over TCP alike: a sender's window of 64 messages around a 128-byte payload (about
/// 10 KB, as switchboard `send` frames or as NATS `PUB`s) leaves in one write.
const WRITE_BUFFER: usize = 16 * 1024;

/// Frames are written as [`WRITE_BUFFER`] says; tungstenite's `write_buffer_size(0)` would
/// write every frame at once. Messages may be as large as tungstenite's defaults allow:
/// nats-server puts all it has buffered for a client in one message, which passed 1 MiB in
/// a paced run of 4 two-way pairs.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(WRITE_BUFFER)
}

/// Opens a TCP connection to `to` from `source` (an address in 127.0.0.0/8, so that many
/// connections do not run out of one address's ephemeral ports).
async fn dial(to: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let socket = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = source_for(to, source) {
        // Leave the port to connect(), which only needs the 4-tuple to be unique; a bind to
        // port 0 would look for a port free on that address alone.
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(to).await.with_context(|| format!("connect {to}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The source address to bind for a connection to `to`: `source` (a loopback address) only
/// when `to` is a loopback address of the same family. The kernel refuses a loopback
/// source towards another machine (`--target`), which the OS's own choice reaches.
fn source_for(to: SocketAddr, source: Option<IpAddr>) -> Option<IpAddr> {
    source.filter(|ip| to.ip().is_loopback() && ip.is_ipv4() == to.is_ipv4())
}

/// Dials the WebSocket listener and upgrades at `path`.
async fn open(endpoint: &Endpoint, path: &str, source: Option<IpAddr>) -> anyhow::Result<Ws> {
    let stream = dial(endpoint.ws, source).await?;
    let mut request = format!("ws://{}{path}", endpoint.ws).into_client_request()?;
    if endpoint.system == System::Mosquitto {
        request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await?;
    Ok(ws)
}

/// How frames leave: WebSocket messages, length-prefixed on switchboard's TCP transport, or
/// as they are on the peers' TCP listeners (over TCP text and binary are the same bytes).
enum Out {
    Ws(SplitSink<Ws, Message>),
    Tcp(FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>),
    Raw(FramedWrite<OwnedWriteHalf, BytesCodec>),
}

impl Out {
    async fn feed(&mut self, msg: Message) -> anyhow::Result<()> {
        match self {
            Out::Ws(sink) => sink.feed(msg).await?,
            Out::Tcp(sink) => sink.feed(msg.into_data()).await?,
            Out::Raw(sink) => sink.feed(msg.into_data()).await?,
        }
        Ok(())
    }

    async fn send(&mut self, msg: Message) -> anyhow::Result<()> {
        self.feed(msg).await?;
        self.flush().await
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Out::Ws(sink) => sink.flush().await?,
            Out::Tcp(sink) => SinkExt::<Bytes>::flush(sink).await?,
            Out::Raw(sink) => SinkExt::<Bytes>::flush(sink).await?,
        }
        Ok(())
    }

    async fn close(&mut self) {
        // Closing is best effort: the server may be gone already.
        match self {
            Out::Ws(sink) => drop(sink.close().await),
            Out::Tcp(sink) => drop(SinkExt::<Bytes>::close(sink).await),
            Out::Raw(sink) => drop(SinkExt::<Bytes>::close(sink).await),
        }
    }
}

/// How frames arrive (see [`Out`]).
enum In {
    Ws(SplitStream<Ws>),
    Tcp(FramedRead<OwnedReadHalf, LengthDelimitedCodec>),
    Raw(FramedRead<OwnedReadHalf, BytesCodec>),
}

/// Connects to `endpoint` on its wire: upgrading at `ws_path` on WebSocket.
async fn halves(endpoint: &Endpoint, ws_path: &str, source: Option<IpAddr>) -> anyhow::Result<(Out, In)> {
    if endpoint.wire == Wire::WebSocket {
        let (sink, stream) = open(endpoint, ws_path, source).await?.split();
        return Ok((Out::Ws(sink), In::Ws(stream)));
    }
    let (read, write) = dial(endpoint.tcp, source).await?.into_split();
    // tokio-util's own boundary is 8 KiB, which split a window in two writes.
    fn buffered<E>(mut sink: FramedWrite<OwnedWriteHalf, E>) -> FramedWrite<OwnedWriteHalf, E> {
        sink.set_backpressure_boundary(WRITE_BUFFER);
        sink
    }
    Ok(if endpoint.system == System::Switchboard {
        let codec = || LengthDelimitedCodec::builder().max_frame_length(1 << 20).new_codec();
        (Out::Tcp(buffered(FramedWrite::new(write, codec()))), In::Tcp(FramedRead::new(read, codec())))
    } else {
        let (sink, stream) = (FramedWrite::new(write, BytesCodec::new()), FramedRead::new(read, BytesCodec::new()));
        (Out::Raw(buffered(sink)), In::Raw(stream))
    })
}

/// The sending half of a connection.
pub struct Writer {
    system: System,
    sink: Out,
    /// Switchboard: ask for an `ack` per send (the default).
    ack: bool,
}

/// The receiving half; yields the frames that carried payloads.
pub struct Reader {
    system: System,
    stream: In,
    /// NATS and MQTT are byte streams inside WebSocket messages: what is not yet a whole
    /// protocol message.
    buf: BytesMut,
    /// switchboard's batched frames: the lines of the last message not yet taken.
    lines: Bytes,
}

/// Connects as `id` and, when `subscribe` is true, subscribes to `id`'s own topic (for
/// switchboard, being connected as a user is the subscription).
pub async fn connect(
    endpoint: &Endpoint,
    id: &str,
    subscribe: bool,
    source: Option<IpAddr>,
) -> anyhow::Result<(Writer, Reader)> {
    match endpoint.system {
        System::Switchboard => {
            let token = token(endpoint, id);
            let batch = if endpoint.batch { "&batch=1" } else { "" };
            let path = format!("/ws/connect?app_id={}&token={token}{batch}", endpoint.app);
            let (mut sink, stream) = halves(endpoint, &path, source).await?;
            if endpoint.wire == Wire::Tcp {
                // Over TCP the credentials are the first frame.
                let connect = serde_json::json!({"type": "connect", "app_id": endpoint.app, "token": token,
                    "batch": endpoint.batch});
                sink.send(Message::Text(connect.to_string().into())).await?;
            }
            let mut reader = Reader::new(System::Switchboard, stream);
            let hello = reader.next_frame().await?.ok_or_else(|| anyhow!("closed before connected"))?;
            if !hello.starts_with(br#"{"type":"connected""#) {
                bail!("switchboard refused {id}: {}", String::from_utf8_lossy(&hello));
            }
            if endpoint.batch != memmem::find(&hello, br#""batch":true"#).is_some() {
                bail!(
                    "switchboard did not answer batch={} in connected: {}",
                    endpoint.batch,
                    String::from_utf8_lossy(&hello)
                );
            }
            Ok((Writer { system: System::Switchboard, sink, ack: true }, reader))
        }
        System::Nats => {
            let (mut sink, stream) = halves(endpoint, "/", source).await?;
            let mut reader = Reader::new(System::Nats, stream);
            let mut hello = String::from("CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n");
            if subscribe {
                hello += &format!("SUB u.{id} 1\r\n");
            }
            hello += "PING\r\n";
            sink.send(Message::Binary(Bytes::from(hello))).await?;
            // The PONG proves CONNECT and SUB were processed.
            reader.nats_until_pong().await?;
            Ok((Writer { system: System::Nats, sink, ack: true }, reader))
        }
        System::Mosquitto => {
            let (mut sink, stream) = halves(endpoint, "/", source).await?;
            let mut reader = Reader::new(System::Mosquitto, stream);
            sink.send(Message::Binary(mqtt_connect(id))).await?;
            reader.mqtt_expect(0x20).await.context("CONNACK")?;
            if subscribe {
                sink.send(Message::Binary(mqtt_subscribe(&format!("u/{id}")))).await?;
                reader.mqtt_expect(0x90).await.context("SUBACK")?;
            }
            Ok((Writer { system: System::Mosquitto, sink, ack: true }, reader))
        }
    }
}

/// Connects as `id` and subscribes to channel `channel` (switchboard channel, NATS subject
/// `c.{channel}`, MQTT topic `c/{channel}`).
pub async fn connect_channel(
    endpoint: &Endpoint,
    id: &str,
    channel: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<(Writer, Reader)> {
    let (mut writer, mut reader) = connect(endpoint, id, false, source).await?;
    match endpoint.system {
        System::Switchboard => {
            let frame = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
            writer.sink.send(Message::Text(Utf8Bytes::from(frame))).await?;
            loop {
                let f = reader.next_frame().await?.ok_or_else(|| anyhow!("closed before subscribed"))?;
                if f.starts_with(br#"{"type":"subscribed""#) {
                    break;
                }
                if f.starts_with(br#"{"type":"error""#) {
                    bail!("subscribe refused: {}", String::from_utf8_lossy(&f));
                }
            }
        }
        System::Nats => {
            writer.sink.send(Message::Binary(Bytes::from(format!("SUB c.{channel} 2\r\nPING\r\n")))).await?;
            reader.nats_until_pong().await?;
        }
        System::Mosquitto => {
            writer.sink.send(Message::Binary(mqtt_subscribe(&format!("c/{channel}")))).await?;
            reader.mqtt_expect(0x90).await.context("SUBACK")?;
        }
    }
    Ok((writer, reader))
}

impl Writer {
    /// Switchboard: whether sends ask for an `ack` (peers never answer a publish).
    pub fn set_ack(&mut self, ack: bool) {
        self.ack = ack;
    }

    /// Queues `payload` for every subscriber of `channel`.
    pub async fn feed_channel(&mut self, channel: &str, payload: &[u8]) -> anyhow::Result<()> {
        let msg = match self.system {
            System::Switchboard => {
                let mut frame = String::with_capacity(payload.len() + 48);
                frame.push_str(r#"{"type":"publish","channel":""#);
                frame.push_str(channel);
                frame.push_str(r#"","data":"#);
                frame.push_str(std::str::from_utf8(payload)?);
                frame.push('}');
                Message::Text(Utf8Bytes::from(frame))
            }
            System::Nats => {
                let mut frame = BytesMut::with_capacity(payload.len() + 32);
                nats_pub_line(&mut frame, "c.", channel, payload.len());
                frame.put_slice(payload);
                frame.put_slice(b"\r\n");
                Message::Binary(frame.freeze())
            }
            System::Mosquitto => Message::Binary(mqtt_publish(&format!("c/{channel}"), payload)),
        };
        self.sink.feed(msg).await
    }

    /// Sends `payload` to the user (switchboard) or topic (peers) `to`. `feed`s only:
    /// call [`flush`](Self::flush) to put it on the wire, so bursts can be batched.
    pub async fn feed(&mut self, to: &str, payload: &[u8]) -> anyhow::Result<()> {
        let msg = match self.system {
            System::Switchboard => {
                let mut frame = String::with_capacity(payload.len() + 32);
                frame.push_str("{\"to\":\"");
                frame.push_str(to);
                frame.push_str("\",\"data\":");
                frame.push_str(std::str::from_utf8(payload)?);
                if !self.ack {
                    frame.push_str(",\"ack\":false");
                }
                frame.push('}');
                Message::Text(Utf8Bytes::from(frame))
            }
            System::Nats => {
                let mut frame = BytesMut::with_capacity(payload.len() + 32);
                nats_pub_line(&mut frame, "u.", to, payload.len());
                frame.put_slice(payload);
                frame.put_slice(b"\r\n");
                Message::Binary(frame.freeze())
            }
            System::Mosquitto => Message::Binary(mqtt_publish(&format!("u/{to}"), payload)),
        };
        self.sink.feed(msg).await
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.sink.flush().await
    }

    pub async fn close(mut self) {
        self.sink.close().await;
    }
}

/// A switchboard frame that is a fatal `error` (the server closes the connection after it)
/// as an error naming the server's reason: the run cannot go on, and that reason is the one
/// worth reporting, not what the client's next write or read then fails with.
fn check_not_fatal(frame: &[u8]) -> anyhow::Result<()> {
    if frame.starts_with(br#"{"type":"error""#) && memmem::find(frame, br#""fatal":true"#).is_some() {
        bail!("the server closed the connection: {}", String::from_utf8_lossy(frame));
    }
    Ok(())
}

impl Reader {
    fn new(system: System, stream: In) -> Self {
        Self { system, stream, buf: BytesMut::new(), lines: Bytes::new() }
    }

    /// switchboard: the next frame, a line of a batched message or a message of its own.
    async fn next_frame(&mut self) -> anyhow::Result<Option<Bytes>> {
        if self.lines.is_empty() {
            match self.next_raw().await? {
                Some(message) => self.lines = message,
                None => return Ok(None),
            }
        }
        Ok(Some(match memchr::memchr(b'\n', &self.lines) {
            Some(end) => {
                let line = self.lines.split_to(end);
                self.lines.advance(1);
                line
            }
            None => std::mem::take(&mut self.lines),
        }))
    }

    /// The next WebSocket message's (or TCP frame's) bytes (switchboard: one frame, or a
    /// batch of them).
    async fn next_raw(&mut self) -> anyhow::Result<Option<Bytes>> {
        let stream = match &mut self.stream {
            In::Ws(stream) => stream,
            In::Tcp(frames) => return Ok(frames.next().await.transpose()?.map(BytesMut::freeze)),
            In::Raw(bytes) => return Ok(bytes.next().await.transpose()?.map(BytesMut::freeze)),
        };
        loop {
            match stream.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => return Ok(Some(Bytes::from(t))),
                Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
                Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads more bytes into the protocol buffer; false at end of stream.
    async fn fill(&mut self) -> anyhow::Result<bool> {
        match self.next_raw().await? {
            Some(bytes) => {
                self.buf.extend_from_slice(&bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The next frame that carries a payload (switchboard `message`, NATS `MSG`, MQTT
    /// `PUBLISH`), `None` when the connection closed, or an error when switchboard closed it
    /// with a fatal error frame. Other frames are skipped.
    pub async fn next_payload(&mut self) -> anyhow::Result<Option<Bytes>> {
        loop {
            match self.system {
                System::Switchboard => match self.next_switchboard_delivery().await? {
                    None => return Ok(None),
                    Some(Delivery::Payload(frame)) => return Ok(Some(frame)),
                    Some(Delivery::Refused) => continue,
                },
                System::Nats => {
                    if let Some(msg) = self.nats_take_msg()? {
                        return Ok(Some(msg));
                    }
                    if !self.fill().await? {
                        return Ok(None);
                    }
                }
                System::Mosquitto => {
                    if let Some((kind, body)) = self.mqtt_take()? {
                        if kind & 0xF0 == 0x30 {
                            return Ok(Some(body));
                        }
                        continue;
                    }
                    if !self.fill().await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The next frame that carries a payload or, from switchboard, says that a send was
    /// refused (an `error` frame); `None` when the connection closed, an error when the server
    /// closed it with a fatal error frame. Other frames (acks) are skipped.
    pub async fn next_delivery(&mut self) -> anyhow::Result<Option<Delivery>> {
        if self.system != System::Switchboard {
            return Ok(self.next_payload().await?.map(Delivery::Payload));
        }
        self.next_switchboard_delivery().await
    }

    /// [`next_delivery`](Self::next_delivery) from switchboard.
    async fn next_switchboard_delivery(&mut self) -> anyhow::Result<Option<Delivery>> {
        loop {
            match self.next_frame().await? {
                None => return Ok(None),
                Some(frame) if frame.starts_with(br#"{"type":"message""#) => return Ok(Some(Delivery::Payload(frame))),
                Some(frame) if frame.starts_with(br#"{"type":"error""#) => {
                    check_not_fatal(&frame)?;
                    return Ok(Some(Delivery::Refused));
                }
                Some(_) => continue,
            }
        }
    }

    /// Reads frames until the connection closes, counting switchboard `error` frames (a
    /// message that was refused, e.g. by a filter, and will never arrive); an error when the
    /// server closed the connection with a fatal one.
    pub async fn drain_counting_errors(mut self, errors: impl Fn()) -> anyhow::Result<()> {
        while let Some(frame) = self.next_frame().await? {
            if self.system == System::Switchboard && frame.starts_with(br#"{"type":"error""#) {
                check_not_fatal(&frame)?;
                errors();
            }
        }
        Ok(())
    }

    fn nats_take_msg(&mut self) -> anyhow::Result<Option<Bytes>> {
        nats_take_msg(&mut self.buf)
    }

    fn mqtt_take(&mut self) -> anyhow::Result<Option<(u8, Bytes)>> {
        mqtt_take(&mut self.buf)
    }

    async fn nats_until_pong(&mut self) -> anyhow::Result<()> {
        loop {
            while let Some(eol) = line_end(&self.buf) {
                let line = self.buf.split_to(eol + 2);
                if line.starts_with(b"PONG") {
                    return Ok(());
                }
                if line.starts_with(b"-ERR") {
                    bail!("nats-server: {}", String::from_utf8_lossy(&line));
                }
            }
            if !self.fill().await? {
                bail!("nats-server closed the connection");
            }
        }
    }

    async fn mqtt_expect(&mut self, kind: u8) -> anyhow::Result<()> {
        loop {
            if let Some((k, body)) = self.mqtt_take()? {
                if k & 0xF0 == kind {
                    // CONNACK: return code in the second byte.
                    if kind == 0x20 && body.get(1).copied().unwrap_or(1) != 0 {
                        bail!("mosquitto refused the connection: {body:?}");
                    }
                    return Ok(());
                }
                continue;
            }
            if !self.fill().await? {
                bail!("mosquitto closed the connection");
            }
        }
    }
}

/// Where the first NATS protocol line in `buf` ends (its `\r\n`).
fn line_end(buf: &[u8]) -> Option<usize> {
    memmem::find(buf, b"\r\n")
}

/// NATS: one complete `MSG` from `buf`; `INFO`, `+OK`, `PING`, `PONG` are skipped.
fn nats_take_msg(buf: &mut BytesMut) -> anyhow::Result<Option<Bytes>> {
    loop {
        let Some(eol) = line_end(buf) else { return Ok(None) };
        if buf.starts_with(b"MSG ") {
            let line = std::str::from_utf8(&buf[..eol])?;
            let len: usize = line.rsplit(' ').next().unwrap_or("").parse().context("MSG length")?;
            if buf.len() < eol + 2 + len + 2 {
                return Ok(None);
            }
            buf.advance(eol + 2);
            let body = buf.split_to(len).freeze();
            buf.advance(2);
            return Ok(Some(body));
        }
        if buf.starts_with(b"-ERR") {
            bail!("nats-server: {}", String::from_utf8_lossy(&buf[..eol]));
        }
        buf.advance(eol + 2);
    }
}

/// MQTT: one complete control packet from `buf` as (first byte, body).
fn mqtt_take(buf: &mut BytesMut) -> anyhow::Result<Option<(u8, Bytes)>> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len |= ((b & 0x7F) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            bail!("bad MQTT remaining length");
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let kind = buf[0];
    buf.advance(i);
    Ok(Some((kind, buf.split_to(len).freeze())))
}

fn mqtt_remaining(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

fn mqtt_string(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

fn mqtt_connect(client_id: &str) -> Bytes {
    let mut body = BytesMut::new();
    mqtt_string(&mut body, "MQTT");
    body.put_u8(4); // protocol level 3.1.1
    body.put_u8(0x02); // clean session
    body.put_u16(0); // keep-alive off: runs are short, and nothing else should ping
    mqtt_string(&mut body, client_id);
    let mut packet = BytesMut::with_capacity(body.len() + 5);
    packet.put_u8(0x10);
    mqtt_remaining(&mut packet, body.len());
    packet.put_slice(&body);
    packet.freeze()
}

fn mqtt_subscribe(topic: &str) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u16(1); // packet id
    mqtt_string(&mut body, topic);
    body.put_u8(0); // QoS 0
    let mut packet = BytesMut::with_capacity(body.len() + 5);
    packet.put_u8(0x82);
    mqtt_remaining(&mut packet, body.len());
    packet.put_slice(&body);
    packet.freeze()
}

fn mqtt_publish(topic: &str, payload: &[u8]) -> Bytes {
    let len = 2 + topic.len() + payload.len();
    let mut packet = BytesMut::with_capacity(len + 5);
    packet.put_u8(0x30); // PUBLISH, QoS 0
    mqtt_remaining(&mut packet, len);
    mqtt_string(&mut packet, topic);
    packet.put_slice(payload);
    packet.freeze()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn a_spread_source_is_bound_only_towards_loopback() {
        let spread = Some(IpAddr::from([127, 0, 0, 7]));
        let at = |addr: &str| addr.parse::<SocketAddr>().unwrap();
        assert_eq!(source_for(at("127.0.0.1:80"), spread), spread);
        assert_eq!(source_for(at("127.5.0.1:80"), spread), spread);
        // Another machine, and loopback of the other family: the OS picks.
        assert_eq!(source_for(at("10.0.0.5:80"), spread), None);
        assert_eq!(source_for(at("[::1]:80"), spread), None);
        assert_eq!(source_for(at("127.0.0.1:80"), None), None);
    }

    #[test]
    fn a_nats_pub_line_names_the_subject_and_the_size() {
        let mut frame = BytesMut::new();
        nats_pub_line(&mut frame, "u.", "r3-12", 1_048_576);
        assert_eq!(&frame[..], b"PUB u.r3-12 1048576\r\n");
    }

    /// A reader of switchboard frames over TCP (length-delimited), fed `frames` and then
    /// closed by the server side.
    async fn reader_of(frames: &[&str]) -> Reader {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut out = FramedWrite::new(server, LengthDelimitedCodec::new());
        for frame in frames {
            out.send(Bytes::copy_from_slice(frame.as_bytes())).await.unwrap();
        }
        drop(out);
        let (read, _write) = client.into_split();
        Reader::new(System::Switchboard, In::Tcp(FramedRead::new(read, LengthDelimitedCodec::new())))
    }

    const MESSAGE: &str = r#"{"type":"message","from":"s","to":"r","event":1,"data":{}}"#;
    const REFUSED: &str = r#"{"type":"error","code":"rate_limited","message":"over","fatal":false}"#;
    const KICKED: &str = r#"{"type":"error","code":"slow_consumer","message":"behind","fatal":true}"#;

    #[tokio::test]
    async fn a_fatal_error_frame_ends_every_reader_with_the_servers_reason() {
        let mut r = reader_of(&[r#"{"type":"ack","msg_id":"1"}"#, REFUSED, MESSAGE, KICKED, MESSAGE]).await;
        assert_eq!(r.next_payload().await.unwrap().as_deref(), Some(MESSAGE.as_bytes()));
        let e = r.next_payload().await.unwrap_err().to_string();
        assert!(e.contains("slow_consumer"), "{e}");

        let mut r = reader_of(&[REFUSED, MESSAGE, KICKED]).await;
        assert!(matches!(r.next_delivery().await, Ok(Some(Delivery::Refused))));
        assert!(matches!(r.next_delivery().await, Ok(Some(Delivery::Payload(_)))));
        let e = r.next_delivery().await.unwrap_err().to_string();
        assert!(e.contains("slow_consumer"), "{e}");

        let refusals = AtomicU64::new(0);
        let count = || {
            refusals.fetch_add(1, Ordering::Relaxed);
        };
        let e = reader_of(&[REFUSED, REFUSED, KICKED]).await.drain_counting_errors(count).await.unwrap_err();
        assert!(e.to_string().contains("slow_consumer"), "{e}");
        assert_eq!(refusals.load(Ordering::Relaxed), 2);
        // A connection that just closes ends them without an error.
        assert!(reader_of(&[MESSAGE]).await.drain_counting_errors(|| {}).await.is_ok());
        let mut r = reader_of(&[]).await;
        assert!(r.next_payload().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_websocket_message_over_a_mebibyte_is_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let payload = vec![b'x'; 3 << 20];
        let mut msg = BytesMut::new();
        msg.put_slice(format!("MSG u.r0 1 {}\r\n", payload.len()).as_bytes());
        msg.put_slice(&payload);
        msg.put_slice(b"\r\n");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            ws.send(Message::Binary(msg.freeze())).await.unwrap();
            ws
        });
        let endpoint = Endpoint {
            system: System::Nats,
            ws: addr,
            tcp: addr,
            wire: Wire::WebSocket,
            app: String::new(),
            secret: String::new(),
            hmac_key: None,
            batch: false,
        };
        let (_, stream) = open(&endpoint, "/", None).await.unwrap().split();
        let mut reader = Reader::new(System::Nats, In::Ws(stream));
        let read = reader.next_payload().await.unwrap().expect("a message");
        assert_eq!(read.len(), payload.len());
        drop(server.await.unwrap());
    }

    #[test]
    fn timestamp_is_found_in_any_envelope() {
        let p = payload(100);
        assert_eq!(p.len(), 100);
        let t = sent_at(&p).unwrap();
        let framed = [br#"{"type":"message","from":"a","data":"#.as_slice(), &p, b"}"].concat();
        assert_eq!(sent_at(&framed), Some(t));
        assert_eq!(sent_at(br#"{"type":"ack"}"#), None);
    }

    #[test]
    fn mqtt_lengths_round_trip() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&mqtt_publish("u/x", &vec![b'a'; 300]));
        let (kind, body) = mqtt_take(&mut buf).unwrap().unwrap();
        assert_eq!(kind, 0x30);
        assert_eq!(body.len(), 2 + 3 + 300);
        assert!(buf.is_empty());
    }

    #[test]
    fn nats_messages_split_across_frames() {
        let mut buf = BytesMut::from(&b"INFO {}\r\nMSG u.a 1 5\r\nhel"[..]);
        assert_eq!(nats_take_msg(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"lo\r\nPING\r\n");
        assert_eq!(nats_take_msg(&mut buf).unwrap().as_deref(), Some(&b"hello"[..]));
        assert_eq!(nats_take_msg(&mut buf).unwrap(), None);
    }
}
