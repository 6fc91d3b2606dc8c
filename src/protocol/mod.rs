//! The client protocol: frame types, their JSON encoding and the stable error codes.
//!
//! No I/O lives here. Decoding borrows from the received bytes and keeps a message's `data`
//! as raw JSON text, so a message crosses the node without being parsed into a tree and
//! written back out. docs/protocol.md is the human version of this module.

mod code;
mod fast_send;
mod frame;
mod ids;

pub use code::ErrorCode;
pub use frame::{
    ChannelFrame, ClientFrame, ConnectFrame, DecodeError, Envelope, Frame, SendFrame, ServerFrame, decode_client_frame,
    encode_message, looks_like_object,
};
pub use ids::{MsgId, MsgIdGen, conversation_id, now_ms};

/// The longest user id, in bytes.
pub const MAX_UID_LEN: usize = 128;

/// The longest `client_id` a client may attach to a frame.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// Event number of a direct message between two users.
pub const EVENT_DIRECT: u16 = 1;

/// Event number of a message to a channel.
pub const EVENT_CHANNEL: u16 = 2;

/// The longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 64;

/// Whether `name` is a channel name: 1 to 64 characters of `A-Z a-z 0-9 _ - :`.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b':')
}

/// The `status` of an `ack` or a push result: `delivered` when at least one connection took
/// the message, `dropped` when the recipient is online but every connection was too slow to
/// take it (those connections are being closed), `offline` when it has no connection.
pub fn delivery_status(delivered: usize, dropped: usize) -> &'static str {
    match (delivered, dropped) {
        (0, 0) => "offline",
        (0, _) => "dropped",
        _ => "delivered",
    }
}

/// Whether `uid` is a user id: 1..=128 bytes, no control characters.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= MAX_UID_LEN && !uid.chars().any(char::is_control)
}
