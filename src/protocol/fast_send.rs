//! A reader for the one frame clients send most, `send`, in its usual shape: without
//! serde's generic field matching, which was the largest part of handling a message.
//!
//! It takes only frames it can read with certainty: an object whose keys are among `type`
//! (`"send"`), `to`, `client_id`, `data` and `ack`, each at most once, strings without escape
//! sequences, `ack` as `true` or `false`, and values the full decoder would accept. Anything
//! else (an escape, an unknown or repeated key, a `null`, an invalid value) is left to
//! [`decode_client_frame`](super::decode_client_frame)'s serde path, which then gives the
//! same answer, or the error, it always gave. `data` is still read by serde_json, so what
//! counts as valid JSON there does not change.

use std::borrow::Cow;

use serde::Deserialize as _;
use serde_json::value::RawValue;

use super::frame::SendFrame;
use super::{MAX_CLIENT_ID_LEN, valid_uid};

/// The `send` frame in `text`, if it has the usual shape (see the module docs); `None`
/// means "decode it the general way", never "invalid".
pub(super) fn decode_send(text: &str) -> Option<SendFrame<'_>> {
    let mut r = Reader { text, pos: 0 };
    let (mut ty, mut to, mut client_id, mut data, mut ack) = (None, None, None, None, None);
    r.skip_ws();
    r.eat(b'{')?;
    loop {
        r.skip_ws();
        let key = r.plain_str()?;
        r.skip_ws();
        r.eat(b':')?;
        r.skip_ws();
        let slot_taken = match key {
            "type" => ty.replace(r.plain_str()?).is_some(),
            "to" => to.replace(r.plain_str()?).is_some(),
            "client_id" => client_id.replace(r.plain_str()?).is_some(),
            "data" => data.replace(r.raw_value()?).is_some(),
            "ack" => ack.replace(r.boolean()?).is_some(),
            _ => return None,
        };
        if slot_taken {
            return None;
        }
        r.skip_ws();
        match r.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    r.skip_ws();
    if r.pos != text.len() || ty.is_some_and(|t| t != "send") {
        return None;
    }
    let (to, data) = (to?, data?);
    if !valid_uid(to) || client_id.is_some_and(|id: &str| id.len() > MAX_CLIENT_ID_LEN) || data.get() == "null" {
        return None;
    }
    Some(SendFrame { to: Cow::Borrowed(to), data, client_id: client_id.map(Cow::Borrowed), ack: ack.unwrap_or(true) })
}

struct Reader<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Option<u8> {
        let b = *self.text.as_bytes().get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// JSON's whitespace (and only JSON's: no form feed).
    fn skip_ws(&mut self) {
        let rest = &self.text.as_bytes()[self.pos..];
        self.pos += rest.iter().take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')).count();
    }

    /// A string without escapes or control characters (which JSON does not allow raw).
    fn plain_str(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let rest = &self.text.as_bytes()[self.pos..];
        let len = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if rest[len] != b'"' {
            return None;
        }
        let s = &self.text[self.pos..self.pos + len];
        self.pos += len + 1;
        Some(s)
    }

    fn boolean(&mut self) -> Option<bool> {
        let rest = &self.text[self.pos..];
        let (value, len) = if rest.starts_with("true") {
            (true, 4)
        } else if rest.starts_with("false") {
            (false, 5)
        } else {
            return None;
        };
        self.pos += len;
        Some(value)
    }

    /// Any JSON value, checked and delimited by serde_json.
    fn raw_value(&mut self) -> Option<&'a RawValue> {
        let rest = &self.text[self.pos..];
        let mut de = serde_json::Deserializer::from_str(rest);
        let raw = <&RawValue>::deserialize(&mut de).ok()?;
        // The value borrows from `rest`: where it ends is where reading goes on.
        let end = raw.get().as_ptr() as usize - rest.as_ptr() as usize + raw.get().len();
        self.pos += end;
        Some(raw)
    }
}
