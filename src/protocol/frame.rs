//! Frames and their JSON encoding.

use std::borrow::Cow;
use std::cell::RefCell;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{ErrorCode, MAX_CLIENT_ID_LEN, valid_channel, valid_uid};

/// A frame received from a client, borrowing from the received bytes.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Connect(ConnectFrame<'a>),
    Send(SendFrame<'a>),
    Subscribe(ChannelFrame<'a>),
    Unsubscribe(ChannelFrame<'a>),
    Publish(ChannelFrame<'a>),
    Ping,
    Pong,
}

/// `subscribe`, `unsubscribe` and `publish` (which also carries `data`).
#[derive(Debug)]
pub struct ChannelFrame<'a> {
    pub channel: Cow<'a, str>,
    pub data: Option<&'a RawValue>,
    pub client_id: Option<Cow<'a, str>>,
    /// `publish` only: whether an accepted message is answered with an `ack`.
    pub ack: bool,
}

#[derive(Debug)]
pub struct ConnectFrame<'a> {
    pub app_id: Cow<'a, str>,
    pub token: Cow<'a, str>,
    /// `"batch": true`: the client reads batched frames.
    pub batch: bool,
}

#[derive(Debug)]
pub struct SendFrame<'a> {
    pub to: Cow<'a, str>,
    /// The message body exactly as the client wrote it.
    pub data: &'a RawValue,
    pub client_id: Option<Cow<'a, str>>,
    /// Whether an accepted message is answered with an `ack` (`"ack": false`: fire and
    /// forget, like MQTT QoS 0; refusals are still answered with an `error`).
    pub ack: bool,
}

/// Why a frame was refused, with the `client_id` to echo when the frame had a readable one.
#[derive(Debug)]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
    pub client_id: Option<String>,
}

/// Every field any client frame may carry. Unknown fields are ignored so that clients can
/// add their own without breaking older nodes.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    client_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    app_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    /// Read raw so that only `send` and `publish` give it a meaning (and a type).
    #[serde(borrow, default)]
    ack: Option<&'a RawValue>,
    /// Read raw, as `ack`: only `connect` gives it a meaning.
    #[serde(borrow, default)]
    batch: Option<&'a RawValue>,
}

/// Whether `bytes` starts (after whitespace) like a JSON object. serde reads a struct from
/// a JSON array by position, so every object-only input checks this first.
pub fn looks_like_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Decodes one client frame (UTF-8 already checked: the transports deliver text).
pub fn decode_client_frame(text: &str) -> Result<ClientFrame<'_>, DecodeError> {
    match super::fast_send::decode_send(text) {
        Some(send) => Ok(ClientFrame::Send(send)),
        None => decode_any(text),
    }
}

/// [`decode_client_frame`] for every frame, through serde.
fn decode_any(text: &str) -> Result<ClientFrame<'_>, DecodeError> {
    // serde would read a struct from a JSON array by position; frames are objects only.
    if !looks_like_object(text.as_bytes()) {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => DecodeError {
                code: ErrorCode::InvalidFrame,
                message: "frame must be a JSON object".into(),
                client_id: None,
            },
            Err(e) => DecodeError {
                code: ErrorCode::InvalidJson,
                message: format!("frame is not valid JSON: {e}"),
                client_id: None,
            },
        });
    }
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| {
        let code = if e.is_data() { ErrorCode::InvalidFrame } else { ErrorCode::InvalidJson };
        let what = if e.is_data() { "frame has the wrong shape" } else { "frame is not valid JSON" };
        DecodeError { code, message: format!("{what}: {e}"), client_id: None }
    })?;
    let fail = |code, message: &str, client_id: &Option<Cow<'_, str>>| DecodeError {
        code,
        message: message.to_string(),
        client_id: client_id.as_deref().map(str::to_string),
    };
    if let Some(id) = &wire.client_id
        && id.len() > MAX_CLIENT_ID_LEN
    {
        return Err(fail(ErrorCode::InvalidFrame, "client_id is longer than 64 bytes", &None));
    }
    let ack = || match wire.ack.map(RawValue::get) {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(fail(ErrorCode::InvalidFrame, "\"ack\" must be true or false", &wire.client_id)),
    };
    let ty = match wire.ty.as_deref() {
        Some(ty) => ty,
        None if wire.to.is_some() => "send",
        None => return Err(fail(ErrorCode::InvalidFrame, "frame has no \"type\"", &wire.client_id)),
    };
    match ty {
        "send" => {
            let Some(to) = wire.to else {
                return Err(fail(ErrorCode::InvalidFrame, "send frame needs \"to\"", &wire.client_id));
            };
            if !valid_uid(&to) {
                return Err(fail(
                    ErrorCode::InvalidRecipient,
                    "\"to\" must be 1-128 bytes without control characters",
                    &wire.client_id,
                ));
            }
            let Some(data) = wire.data else {
                return Err(fail(ErrorCode::InvalidFrame, "send frame needs \"data\"", &wire.client_id));
            };
            let ack = ack()?;
            Ok(ClientFrame::Send(SendFrame { to, data, client_id: wire.client_id, ack }))
        }
        "connect" => match (wire.app_id, wire.token) {
            (Some(app_id), Some(token)) => {
                let batch = match wire.batch.map(RawValue::get) {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(_) => {
                        return Err(fail(ErrorCode::InvalidFrame, "\"batch\" must be true or false", &wire.client_id));
                    }
                };
                Ok(ClientFrame::Connect(ConnectFrame { app_id, token, batch }))
            }
            (None, _) => Err(fail(ErrorCode::UnknownApp, "connect frame needs \"app_id\"", &wire.client_id)),
            (_, None) => Err(fail(ErrorCode::TokenMissing, "connect frame needs \"token\"", &wire.client_id)),
        },
        "subscribe" | "unsubscribe" | "publish" => {
            let Some(channel) = wire.channel else {
                return Err(fail(ErrorCode::InvalidFrame, &format!("{ty} frame needs \"channel\""), &wire.client_id));
            };
            if !valid_channel(&channel) {
                return Err(fail(
                    ErrorCode::InvalidChannel,
                    "a channel name is 1-64 characters of A-Z a-z 0-9 _ - :",
                    &wire.client_id,
                ));
            }
            if ty == "publish" && wire.data.is_none() {
                return Err(fail(ErrorCode::InvalidFrame, "publish frame needs \"data\"", &wire.client_id));
            }
            let ack = if ty == "publish" { ack()? } else { true };
            let frame = ChannelFrame { channel, data: wire.data, client_id: wire.client_id, ack };
            Ok(match ty {
                "subscribe" => ClientFrame::Subscribe(frame),
                "unsubscribe" => ClientFrame::Unsubscribe(frame),
                _ => ClientFrame::Publish(frame),
            })
        }
        "ping" => Ok(ClientFrame::Ping),
        "pong" => Ok(ClientFrame::Pong),
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            Err(fail(ErrorCode::UnknownType, &format!("unknown frame type {shown:?}"), &wire.client_id))
        }
    }
}

/// A frame the server sends, other than `message` (see [`Envelope`]).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Connected {
        uid: &'a str,
        conn_id: &'a str,
        node_id: &'a str,
        ping_interval_ms: u64,
        idle_timeout_ms: u64,
        /// Present (`true`) when the client asked for batched frames and gets them.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        batch: bool,
    },
    Ack {
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        msg_id: &'a str,
        status: &'static str,
        delivered: usize,
        #[serde(skip_serializing_if = "is_zero")]
        dropped: usize,
        /// `"unavailable"` when other nodes could not be reached: `delivered` counts this
        /// node only.
        #[serde(skip_serializing_if = "Option::is_none")]
        cluster: Option<&'static str>,
    },
    Subscribed {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
    },
    Unsubscribed {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        /// An authenticator plugin's own rejection code (`auth_rejected`).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        fatal: bool,
    },
    Ping,
    Pong,
    Reconnect {
        reason: &'a str,
        tcp_addr: &'a str,
        ws_addr: &'a str,
        wss_addr: &'a str,
        delay_ms: u64,
    },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> Frame {
        if let ServerFrame::Ack { client_id, msg_id, status, delivered, dropped, cluster } = *self {
            return encode_ack(client_id, msg_id, status, delivered, dropped, cluster);
        }
        // Serialising these plain structs cannot fail.
        Frame::from(serde_json::to_string(self).expect("server frame serialises"))
    }
}

/// The `ack` frame, one per message sent: written out by hand, byte for byte what the
/// derived `Serialize` gives (a test holds them together), without serde's per-key escaping.
fn encode_ack(
    client_id: Option<&str>,
    msg_id: &str,
    status: &str,
    delivered: usize,
    dropped: usize,
    cluster: Option<&str>,
) -> Frame {
    exact_frame(true, |out| {
        out.put(r#"{"type":"ack""#);
        if let Some(client_id) = client_id {
            out.put(r#","client_id":"#);
            out.json_str(client_id);
        }
        out.put(r#","msg_id":"#);
        out.json_str(msg_id);
        out.put(r#","status":"#);
        out.json_str(status);
        out.put(r#","delivered":"#);
        out.put(itoa::Buffer::new().format(delivered));
        if dropped != 0 {
            out.put(r#","dropped":"#);
            out.put(itoa::Buffer::new().format(dropped));
        }
        if let Some(cluster) = cluster {
            out.put(r#","cluster":"#);
            out.json_str(cluster);
        }
        out.put("}");
    })
}

/// Runs a hand-written encoder into this thread's scratch buffer and copies the result into
/// an allocation of exactly its size. A full buffer becomes the frame's `Bytes` as it is;
/// one with room to spare would cost a second allocation (and a second free) for the sharing
/// header, which is dearer than copying a few hundred bytes.
///
/// `one_line` is the caller's word that nothing it put raw (outside [`Out::json_str`], which
/// escapes newlines) holds a newline.
fn exact_frame(one_line: bool, write: impl FnOnce(&mut Out<'_>)) -> Frame {
    thread_local! {
        static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        let mut out = Out(scratch);
        write(&mut out);
        Frame { text: Utf8Bytes::from(scratch.as_str().to_owned()), one_line }
    })
}

/// Where a hand-written encoder writes: see [`exact_frame`].
struct Out<'a>(&'a mut String);

impl Out<'_> {
    fn put(&mut self, s: &str) {
        self.0.push_str(s);
    }

    /// Puts `s` as a JSON string, escaped exactly as serde_json escapes it. User ids,
    /// message ids and the like seldom need it: those are copied in one go.
    fn json_str(&mut self, s: &str) {
        // No early exit, so that the check runs over whole vectors.
        let plain = s.bytes().fold(true, |plain, b| plain & (b >= 0x20) & (b != b'"') & (b != b'\\'));
        if plain {
            self.0.reserve(s.len() + 2);
            self.0.push('"');
            self.0.push_str(s);
            self.0.push('"');
        } else {
            self.0.push_str(&serde_json::to_string(s).expect("a string serialises"));
        }
    }
}

/// A message as it is delivered: the `message` frame's fields.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub from: &'a str,
    pub to: &'a str,
    /// The channel, for a channel message (`to` is the channel too).
    pub channel: Option<&'a str>,
    pub event: u16,
    pub data: &'a RawValue,
    pub msg_id: &'a str,
    pub send_at: u64,
    pub conversation_id: &'a str,
}

/// Encodes the `message` frame once; the bytes are shared by every connection it goes to.
/// Written out by hand, byte for byte what serde writes for it (a test holds them together):
/// this runs for every message, and serde escapes every key it writes.
pub fn encode_message(envelope: &Envelope<'_>) -> Frame {
    let e = envelope;
    // `data` is the sender's JSON as it came, the one part put raw: it may hold a newline
    // between its tokens.
    let one_line = memchr::memchr(b'\n', e.data.get().as_bytes()).is_none();
    exact_frame(one_line, |out| {
        out.put(r#"{"type":"message","from":"#);
        out.json_str(e.from);
        out.put(r#","to":"#);
        out.json_str(e.to);
        if let Some(channel) = e.channel {
            out.put(r#","channel":"#);
            out.json_str(channel);
        }
        out.put(r#","event":"#);
        out.put(itoa::Buffer::new().format(e.event));
        out.put(r#","data":"#);
        out.put(e.data.get());
        out.put(r#","msg_id":"#);
        out.json_str(e.msg_id);
        out.put(r#","send_at":"#);
        out.put(itoa::Buffer::new().format(e.send_at));
        out.put(r#","conversation_id":"#);
        out.json_str(e.conversation_id);
        out.put("}");
    })
}

/// One encoded server frame: JSON text, known to be UTF-8 (so no transport validates it
/// again), and cheap to clone, so one encoding is shared by every connection it goes to.
#[derive(Debug, Clone)]
pub struct Frame {
    text: Utf8Bytes,
    /// Known to hold no raw newline, so a [batch](crate::transport) need not look for one
    /// to replace. Only the hand-written encoders know it; any other frame may hold one.
    one_line: bool,
}

impl Frame {
    pub fn as_bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }

    pub fn as_str(&self) -> &str {
        self.text.as_str()
    }

    pub fn len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// True when the frame is known to hold no raw newline (false: it may hold one).
    pub fn is_one_line(&self) -> bool {
        self.one_line
    }

    pub fn into_text(self) -> Utf8Bytes {
        self.text
    }

    pub fn into_bytes(self) -> Bytes {
        Bytes::from(self.text)
    }

    pub const fn from_static(s: &'static str) -> Self {
        Self { text: Utf8Bytes::from_static(s), one_line: false }
    }

    /// A frame of `bytes`, which the caller knows to be UTF-8 (and, with `one_line`, to
    /// hold no newline): pieces of a buffer that frames were copied into.
    ///
    /// # Safety
    /// `bytes` must be valid UTF-8.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn from_utf8_unchecked(bytes: Bytes, one_line: bool) -> Self {
        // SAFETY: the caller's promise.
        Self { text: unsafe { Utf8Bytes::from_bytes_unchecked(bytes) }, one_line }
    }
}

/// Frames are equal when their text is: whether a newline was ruled out is not part of it.
impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Frame {}

impl TryFrom<Bytes> for Frame {
    type Error = std::str::Utf8Error;

    /// A frame received from another node: checked once to be UTF-8.
    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        Utf8Bytes::try_from(bytes).map(|text| Self { text, one_line: false })
    }
}

impl From<String> for Frame {
    fn from(s: String) -> Self {
        Self { text: Utf8Bytes::from(s), one_line: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole `message` frame as serde writes it, `"type":"message"` first: the reference
    /// [`encode_message`] is held to.
    impl Serialize for Envelope<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeStruct;
            let mut m = s.serialize_struct("message", 9)?;
            m.serialize_field("type", "message")?;
            m.serialize_field("from", self.from)?;
            m.serialize_field("to", self.to)?;
            match self.channel {
                Some(channel) => m.serialize_field("channel", channel)?,
                None => m.skip_field("channel")?,
            }
            m.serialize_field("event", &self.event)?;
            m.serialize_field("data", self.data)?;
            m.serialize_field("msg_id", self.msg_id)?;
            m.serialize_field("send_at", &self.send_at)?;
            m.serialize_field("conversation_id", self.conversation_id)?;
            m.end()
        }
    }

    #[test]
    fn send_without_type_is_send() {
        let f = decode_client_frame(r#"{"to":"bob","data":{"text":"hi"}}"#).unwrap();
        let ClientFrame::Send(s) = f else { panic!() };
        assert_eq!(s.to, "bob");
        assert_eq!(s.data.get(), r#"{"text":"hi"}"#);
    }

    #[test]
    fn ack_is_asked_for_unless_turned_off() {
        let ack = |t: &str| match decode_client_frame(t).unwrap() {
            ClientFrame::Send(s) => s.ack,
            ClientFrame::Publish(c) => c.ack,
            other => panic!("{other:?}"),
        };
        assert!(ack(r#"{"to":"bob","data":1}"#));
        assert!(ack(r#"{"to":"bob","data":1,"ack":true}"#));
        assert!(!ack(r#"{"to":"bob","data":1,"ack":false}"#));
        assert!(!ack(r#"{"type":"publish","channel":"c","data":1,"ack":false}"#));
        let e = decode_client_frame(r#"{"to":"bob","data":1,"ack":0,"client_id":"c1"}"#).unwrap_err();
        assert_eq!((e.code, e.client_id.as_deref()), (ErrorCode::InvalidFrame, Some("c1")));
        // Other frames ignore it, as they ignore every field they do not use.
        assert!(matches!(decode_client_frame(r#"{"type":"ping","ack":"x"}"#), Ok(ClientFrame::Ping)));
    }

    /// Frames near the usual `send`, each taken by the fast reader or left to serde.
    const SEND_LIKE: &[&str] = &[
        r#"{"type":"send","to":"bob","data":{"t":1,"p":"x"},"client_id":"c1","ack":false}"#,
        r#"{"to":"bob","data":1}"#,
        " {\t\"to\" :\r\n\"bob\" , \"data\": [1, {\"a\": null}] ,\"ack\":true } \n",
        r#"{"data":"s","to":"bob","type":"send"}"#,
        r#"{"to":"bob","data":1,"ack":null}"#,
        r#"{"to":"bob","data":null}"#,
        r#"{"to":"bob","data":1,"data":2}"#,
        r#"{"to":"bob","to":"eve","data":1}"#,
        r#"{"to":"bob","data":1,"ack":0}"#,
        r#"{"to":"bob","data":1,"ack":truex}"#,
        r#"{"to":"bob","data":1,"ack":true,}"#,
        r#"{"to":"bob","data":1}x"#,
        r#"{"to":"bob","data":1"#,
        r#"{"to":"bob","data":01}"#,
        r#"{"to":"bob","data":[1,]}"#,
        r#"{"to":"b\u006fb","data":1}"#,
        r#"{"t\u006f":"bob","data":1}"#,
        r#"{"to":"bob","data":1,"extra":{"x":[1,2]}}"#,
        r#"{"type":"publish","to":"bob","channel":"c","data":1}"#,
        r#"{"type":"ping","to":"bob","data":1}"#,
        r#"{"to":"","data":1}"#,
        "{\"to\":\"b\u{7f}b\",\"data\":1}",
        "{\"to\":\"b\tb\",\"data\":1}",
        r#"{"to":5,"data":1}"#,
        r#"{"to":"bob","data":1,"client_id":"0123456789012345678901234567890123456789012345678901234567890123456789"}"#,
        r#"{"to":"bob","data":1,"client_id":5}"#,
        r#"{"to":"bob"}"#,
        r#"{"data":1}"#,
        r#"{}"#,
        "{\"to\":\"bob\",\"data\":1}\u{c}",
    ];

    /// Checks that when the fast reader takes `text`, serde reads the same `send` from it,
    /// and that decoding `text` gives what serde gives. Returns whether the fast reader took it.
    fn fast_reader_agrees(text: &str) -> bool {
        let general = decode_any(text);
        let Some(fast) = crate::protocol::fast_send::decode_send(text) else {
            // Left to serde, which answers as it always did (and is what decoding does).
            assert_eq!(format!("{:?}", decode_client_frame(text)), format!("{general:?}"), "{text}");
            return false;
        };
        let Ok(ClientFrame::Send(g)) = general else { panic!("{text}: fast read a send, serde {general:?}") };
        assert_eq!(
            (&fast.to, fast.data.get(), &fast.client_id, fast.ack),
            (&g.to, g.data.get(), &g.client_id, g.ack),
            "{text}"
        );
        true
    }

    #[test]
    fn the_fast_send_reader_agrees_with_serde() {
        for text in SEND_LIKE {
            fast_reader_agrees(text);
        }
    }

    /// The same agreement over frames with random bytes changed, inserted or removed.
    #[test]
    fn the_fast_send_reader_agrees_with_serde_on_mangled_frames() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b" \t\n{}[]:,\"\\tuefalsnr0123456789.-+eE_abcdotyp";
        let (mut fast_taken, mut cases) = (0, 0);
        for template in &SEND_LIKE[..4] {
            for _ in 0..5_000 {
                let mut bytes = template.as_bytes().to_vec();
                for _ in 0..rng.gen_range(1..=3) {
                    let at = rng.gen_range(0..=bytes.len());
                    let b = alphabet[rng.gen_range(0..alphabet.len())];
                    match rng.gen_range(0..3) {
                        0 if at < bytes.len() => bytes[at] = b,
                        1 if at < bytes.len() => drop(bytes.remove(at)),
                        _ => bytes.insert(at, b),
                    }
                }
                let text = String::from_utf8(bytes).expect("ASCII stays UTF-8");
                cases += 1;
                fast_taken += usize::from(fast_reader_agrees(&text));
            }
        }
        // Both outcomes occur, so the comparison above is not vacuous.
        assert!(fast_taken > cases / 20 && fast_taken < cases, "{fast_taken} of {cases} taken by the fast reader");
    }

    #[test]
    fn usual_sends_take_the_fast_reader() {
        let taken: Vec<_> =
            SEND_LIKE.iter().copied().filter(|t| crate::protocol::fast_send::decode_send(t).is_some()).collect();
        assert_eq!(taken, &SEND_LIKE[..4], "only the first four have the usual shape");
    }

    #[test]
    fn escaped_strings_decode() {
        let f = decode_client_frame(r#"{"type":"send","to":"b\u00f6b","data":1,"client_id":"a\"b"}"#).unwrap();
        let ClientFrame::Send(s) = f else { panic!() };
        assert_eq!(s.to, "böb");
        assert_eq!(s.client_id.as_deref(), Some("a\"b"));
    }

    #[test]
    fn errors_have_codes() {
        let code = |t: &str| decode_client_frame(t).unwrap_err().code;
        assert_eq!(code("{nope"), ErrorCode::InvalidJson);
        assert_eq!(code(""), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"to":5,"data":1}"#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"[1,2]"#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"["send","bob",1]"#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#" "text" "#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"type":"send","to":"bob"}"#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"type":"send","to":"","data":1}"#), ErrorCode::InvalidRecipient);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"data":1}"#), ErrorCode::InvalidFrame);
    }

    #[test]
    fn client_id_is_echoed_on_error() {
        let e = decode_client_frame(r#"{"type":"send","to":"","data":1,"client_id":"c9"}"#).unwrap_err();
        assert_eq!(e.client_id.as_deref(), Some("c9"));
    }

    #[test]
    fn message_frame_passes_data_through() {
        let data = RawValue::from_string(r#"{"z":1,  "a":[true]}"#.into()).unwrap();
        let bytes = encode_message(&Envelope {
            from: "alice",
            to: "bob",
            channel: None,
            event: 1,
            data: &data,
            msg_id: "m1",
            send_at: 7,
            conversation_id: "d:x",
        });
        assert_eq!(
            bytes.as_str(),
            r#"{"type":"message","from":"alice","to":"bob","event":1,"data":{"z":1,  "a":[true]},"msg_id":"m1","send_at":7,"conversation_id":"d:x"}"#
        );
        let channel = encode_message(&Envelope {
            from: "a\"b",
            to: "room:1",
            channel: Some("room:1"),
            event: 2,
            data: &data,
            msg_id: "m2",
            send_at: 8,
            conversation_id: "c:room:1",
        });
        assert_eq!(
            channel.as_str(),
            r#"{"type":"message","from":"a\"b","to":"room:1","channel":"room:1","event":2,"data":{"z":1,  "a":[true]},"msg_id":"m2","send_at":8,"conversation_id":"c:room:1"}"#
        );
    }

    /// Strings that need every kind of escape serde_json makes, and some that need none.
    const AWKWARD: [&str; 9] =
        ["", "alice", "a\"b", "back\\slash", "tab\tnew\nline\r", "\u{1}\u{1f}", "\u{7f}é漢🙂", "/</script>", "d:0f"];

    #[test]
    fn message_frame_is_what_serde_writes() {
        let data = RawValue::from_string(r#"{"t":"x\"y"}"#.into()).unwrap();
        for (i, s) in AWKWARD.iter().enumerate() {
            let other = AWKWARD[(i + 3) % AWKWARD.len()];
            for channel in [None, Some(other)] {
                let e = Envelope {
                    from: s,
                    to: other,
                    channel,
                    event: u16::MAX,
                    data: &data,
                    msg_id: other,
                    send_at: u64::MAX - i as u64,
                    conversation_id: s,
                };
                let serde = serde_json::to_string(&e).unwrap();
                assert_eq!(encode_message(&e).as_str(), serde, "{e:?}");
                let parsed: serde_json::Value = serde_json::from_str(&serde).unwrap();
                assert_eq!((parsed["from"].as_str(), parsed["to"].as_str()), (Some(*s), Some(other)));
            }
        }
    }

    #[test]
    fn only_a_raw_newline_in_data_makes_a_message_more_than_one_line() {
        let flat = RawValue::from_string(r#"{"k":"v\n"}"#.into()).unwrap();
        let spread = RawValue::from_string("{\n\"k\": 1}".into()).unwrap();
        let message = |data| {
            let e = Envelope {
                from: "new\nline",
                to: "bob",
                channel: None,
                event: 1,
                data,
                msg_id: "m1",
                send_at: 1,
                conversation_id: "d:x",
            };
            encode_message(&e)
        };
        assert!(message(&flat).is_one_line());
        assert!(!message(&spread).is_one_line());
        let ack = ServerFrame::Ack {
            client_id: Some("c\n1"),
            msg_id: "m1",
            status: "delivered",
            delivered: 1,
            dropped: 0,
            cluster: None,
        };
        assert!(ack.encode().is_one_line());
        // Any other frame may hold one, as far as anyone knows.
        assert!(!Frame::from(String::from("{}")).is_one_line());
        assert_eq!(Frame::from(String::from("{}")), Frame::from_static("{}"));
    }

    #[test]
    fn ack_frame_is_what_serde_writes() {
        for (i, s) in AWKWARD.iter().enumerate() {
            for (delivered, dropped, cluster) in [(0, 0, None), (3, 0, None), (1, 2, Some("unavailable"))] {
                for client_id in [None, Some(AWKWARD[(i + 1) % AWKWARD.len()])] {
                    let ack =
                        ServerFrame::Ack { client_id, msg_id: s, status: "delivered", delivered, dropped, cluster };
                    assert_eq!(ack.encode().as_str(), serde_json::to_string(&ack).unwrap(), "{ack:?}");
                }
            }
        }
        let ack = ServerFrame::Ack {
            client_id: Some("c1"),
            msg_id: "m1",
            status: "dropped",
            delivered: 0,
            dropped: 2,
            cluster: None,
        };
        assert_eq!(
            ack.encode().as_str(),
            r#"{"type":"ack","client_id":"c1","msg_id":"m1","status":"dropped","delivered":0,"dropped":2}"#
        );
    }

    #[test]
    fn error_frame_shape() {
        let f = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down",
            reason: None,
            client_id: None,
            fatal: false,
        };
        assert_eq!(f.encode().as_str(), r#"{"type":"error","code":"rate_limited","message":"slow down"}"#);
    }
}
