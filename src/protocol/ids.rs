//! Message ids, conversation ids and the wall clock in the units the protocol uses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Generates message ids: 24 hex digits = 48-bit milliseconds, 16-bit sequence, 32-bit node
/// tag. Ids from one node are strictly increasing; the node tag (a hash of the node id)
/// keeps ids from different nodes apart without coordination.
#[derive(Debug)]
pub struct MsgIdGen {
    /// `ms << 16 | seq` of the last id handed out.
    last: AtomicU64,
    node_tag: u32,
}

impl MsgIdGen {
    pub fn new(node_id: &str) -> Self {
        let digest = Sha256::digest(node_id.as_bytes());
        let node_tag = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        Self { last: AtomicU64::new(0), node_tag }
    }

    /// The next id, given the current time in milliseconds since the Unix epoch (the
    /// message's `send_at`, so that both come from one clock read).
    pub fn next_at(&self, now_ms: u64) -> MsgId {
        let floor = now_ms << 16;
        let prev = self
            .last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |prev| Some((prev + 1).max(floor)))
            .expect("closure always returns Some");
        let id = (prev + 1).max(floor);
        let mut text = [0u8; 24];
        hex::encode_to_slice(id.to_be_bytes(), &mut text[..16]).expect("8 bytes are 16 hex digits");
        hex::encode_to_slice(self.node_tag.to_be_bytes(), &mut text[16..]).expect("4 bytes are 8 hex digits");
        MsgId(text)
    }
}

/// One message id: its 24 hex digits, held inline (one is made per message).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgId([u8; 24]);

impl MsgId {
    pub fn as_str(&self) -> &str {
        // Read three times per message sent (its frame, its ack, the filters' view): checking
        // the 24 bytes each time was 278 of the server's 8,234 instructions per message
        // (callgrind, docs/performance.md).
        #[allow(unsafe_code)]
        // SAFETY: the bytes are ASCII hex digits: `next_at` alone writes them (the field is
        // private and nothing hands out `&mut` to it), with `hex::encode_to_slice`.
        unsafe {
            std::str::from_utf8_unchecked(&self.0)
        }
    }
}

impl std::ops::Deref for MsgId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The id shared by every message between the same two users of an app, in either
/// direction: `d:` + 32 hex digits of SHA-256 over the app and the sorted pair. Hashing
/// (rather than joining the ids with a separator) keeps it unambiguous for any user ids.
pub fn conversation_id(app: &str, a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h = Sha256::new();
    for part in [app, lo, hi] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut id = *b"d:00000000000000000000000000000000";
    hex::encode_to_slice(&digest[..16], &mut id[2..]).expect("16 bytes are 32 hex digits");
    std::str::from_utf8(&id).expect("hex digits are ASCII").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_have_fixed_width() {
        let g = MsgIdGen::new("n1");
        let mut prev = g.next_at(now_ms());
        for _ in 0..10_000 {
            let id = g.next_at(now_ms());
            assert_eq!(id.len(), 24);
            assert!(id > prev, "{id} <= {prev}");
            prev = id;
        }
    }

    #[test]
    fn ids_are_time_sequence_and_node_in_hex() {
        let g = MsgIdGen::new("n1");
        let first = g.next_at(1);
        let tag = &first[16..];
        assert_eq!(g.next_at(0x0123_4567_89ab).as_str(), format!("0123456789ab0000{tag}"));
        // Within the same millisecond the sequence counts up.
        assert_eq!(g.next_at(0x0123_4567_89ab).as_str(), format!("0123456789ab0001{tag}"));
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    #[test]
    fn ids_differ_between_nodes() {
        let (a, b) = (MsgIdGen::new("n1"), MsgIdGen::new("n2"));
        assert_ne!(a.next_at(1)[16..], b.next_at(1)[16..]);
    }

    #[test]
    fn conversation_is_symmetric_and_unambiguous() {
        assert_eq!(conversation_id("demo", "alice", "bob"), conversation_id("demo", "bob", "alice"));
        assert_ne!(conversation_id("demo", "a@b", "c"), conversation_id("demo", "a", "b@c"));
        assert_ne!(conversation_id("demo", "alice", "bob"), conversation_id("other", "alice", "bob"));
        assert_eq!(conversation_id("demo", "alice", "bob").len(), 34);
    }
}
