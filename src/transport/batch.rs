//! Batched frames (`batch=1` on connect, docs/protocol.md): the frames a session writes
//! between two flushes leave as one WebSocket message (or one length-prefixed TCP frame),
//! one JSON frame per line; a batch is cut where the transport writes its buffer out
//! mid-burst (past [`super::WRITE_BATCH`]) and around control frames. A client then reads
//! one message per burst instead of one per frame, as a NATS client can, its protocol being
//! a byte stream inside WebSocket messages.
//!
//! The frames are appended to the connection's write buffer behind a header whose length is
//! filled in when the message is sealed, so batching copies nothing more than writing the
//! frames one by one does.

use bytes::{BufMut, BytesMut};

use crate::protocol::Frame;

/// The largest message a batch grows to (less when `limits.max_frame_bytes` is lower); a
/// frame that would take it past this starts the next message, and a frame this large or
/// larger is written on its own.
pub(crate) const MAX_BATCH_BYTES: usize = u16::MAX as usize;

/// Room reserved for the header of an open message: a WebSocket frame header with a 16-bit
/// length, or TCP's 4-byte length prefix.
const HEADER: usize = 4;

/// How the transport frames a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// A final, unmasked WebSocket text frame, its length in the shortest form.
    WsText,
    /// A 4-byte big-endian length prefix.
    Length32,
}

/// The open message of a connection that batches its frames.
#[derive(Debug)]
pub(crate) struct Batch {
    framing: Framing,
    /// The largest payload of a batched message.
    limit: usize,
    /// Where the open message's header starts in the write buffer.
    open: Option<usize>,
}

impl Batch {
    /// Batches of at most `max_frame_bytes` (the node's limit on one frame, which a batch
    /// keeps to as well) and never over [`MAX_BATCH_BYTES`].
    pub(crate) fn new(framing: Framing, max_frame_bytes: usize) -> Self {
        Self { framing, limit: max_frame_bytes.min(MAX_BATCH_BYTES), open: None }
    }

    /// Appends `frame` to the open message in `buf` (opening one if needed) and returns
    /// true; returns false, with any open message sealed, when `frame` is too large to
    /// share one: the caller writes it alone.
    ///
    /// Newlines separate the frames, so a newline inside a frame becomes a space. In a
    /// JSON text a raw newline can only be whitespace between tokens (inside a string it
    /// must be escaped), so the frame means the same. A frame known to hold none
    /// ([`Frame::is_one_line`]) is not searched.
    pub(crate) fn push(&mut self, buf: &mut BytesMut, frame: &Frame) -> bool {
        let (one_line, frame) = (frame.is_one_line(), frame.as_bytes());
        if frame.len() >= self.limit {
            self.seal(buf);
            return false;
        }
        match self.open {
            Some(start) if buf.len() - start - HEADER + 1 + frame.len() <= self.limit => buf.put_u8(b'\n'),
            _ => {
                self.seal(buf);
                self.open = Some(buf.len());
                buf.put_bytes(0, HEADER);
            }
        }
        let at = buf.len();
        buf.extend_from_slice(frame);
        if !one_line {
            for i in memchr::memchr_iter(b'\n', frame) {
                buf[at + i] = b' ';
            }
        }
        true
    }

    /// Writes the open message's header: after this the write buffer may be put on the
    /// wire. Transports seal before every flush and before any other frame they write.
    pub(crate) fn seal(&mut self, buf: &mut BytesMut) {
        let Some(start) = self.open.take() else { return };
        let len = buf.len() - start - HEADER;
        let header = &mut buf[start..start + HEADER];
        match self.framing {
            Framing::Length32 => header.copy_from_slice(&(len as u32).to_be_bytes()),
            Framing::WsText if len >= 126 => {
                header[0] = 0x80 | super::wsframe::OP_TEXT;
                header[1] = 126;
                header[2..].copy_from_slice(&(len as u16).to_be_bytes());
            }
            Framing::WsText => {
                // The 7-bit form is two bytes shorter: move the payload up to it.
                header[0] = 0x80 | super::wsframe::OP_TEXT;
                header[1] = len as u8;
                buf.copy_within(start + HEADER.., start + 2);
                buf.truncate(buf.len() - 2);
            }
        }
    }

    /// Whether a message is open (the write buffer is not ready for the wire).
    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        self.open.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `text`, not known to be one line (as any frame not encoded by hand).
    fn frame(text: &[u8]) -> Frame {
        Frame::from(String::from_utf8(text.to_vec()).unwrap())
    }

    fn batched(framing: Framing, frames: &[&[u8]]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        let mut batch = Batch::new(framing, MAX_BATCH_BYTES);
        for text in frames {
            assert!(batch.push(&mut buf, &frame(text)));
        }
        batch.seal(&mut buf);
        buf.to_vec()
    }

    #[test]
    fn frames_become_lines_of_one_message() {
        let ws = batched(Framing::WsText, &[br#"{"a":1}"#, br#"{"b":2}"#]);
        assert_eq!(ws, b"\x81\x0f{\"a\":1}\n{\"b\":2}");
        let tcp = batched(Framing::Length32, &[br#"{"a":1}"#, br#"{"b":2}"#]);
        assert_eq!(tcp, b"\0\0\0\x0f{\"a\":1}\n{\"b\":2}");
    }

    #[test]
    fn websocket_lengths_take_the_shortest_form() {
        for (len, header) in [(1, vec![0x81, 1]), (125, vec![0x81, 125]), (126, vec![0x81, 126, 0, 126])] {
            let frame = vec![b'x'; len];
            let message = batched(Framing::WsText, &[&frame]);
            assert_eq!(message[..header.len()], header[..], "{len}");
            assert_eq!(&message[header.len()..], &frame[..], "{len}");
        }
        let frame = vec![b'x'; 40_000];
        let message = batched(Framing::WsText, &[&frame, &frame[..100]]);
        assert_eq!(message[..4], [0x81, 126, 0x9c, 0xa5]);
        assert_eq!(message.len(), 4 + 40_101);
    }

    #[test]
    fn newlines_inside_a_frame_become_spaces() {
        let ws = batched(Framing::WsText, &[b"{\n\"a\":\r\n1}", b"{}"]);
        assert_eq!(&ws[2..], b"{ \"a\":\r 1}\n{}");
        let value: serde_json::Value = serde_json::from_slice(&ws[2..12]).unwrap();
        assert_eq!(value, serde_json::json!({"a": 1}));
    }

    #[test]
    fn a_full_message_is_sealed_and_the_next_one_opened() {
        let large = frame(&[b'x'; 30_000]);
        let mut buf = BytesMut::new();
        let mut batch = Batch::new(Framing::Length32, MAX_BATCH_BYTES);
        for _ in 0..3 {
            assert!(batch.push(&mut buf, &large));
        }
        batch.seal(&mut buf);
        // Two frames and their newline fit in 65,535 bytes; the third opens a second message.
        assert_eq!(buf[..4], 60_001u32.to_be_bytes());
        assert_eq!(buf[4 + 60_001..4 + 60_001 + 4], 30_000u32.to_be_bytes());
        assert_eq!(buf.len(), 4 + 60_001 + 4 + 30_000);
    }

    #[test]
    fn a_frame_too_large_to_share_is_left_to_the_caller() {
        let mut buf = BytesMut::new();
        let mut batch = Batch::new(Framing::WsText, MAX_BATCH_BYTES);
        assert!(batch.push(&mut buf, &frame(b"{}")));
        assert!(!batch.push(&mut buf, &frame(&vec![b'x'; MAX_BATCH_BYTES])));
        // The open message was sealed first, so the caller's frame follows it.
        assert!(!batch.is_open());
        assert_eq!(&buf[..], b"\x81\x02{}");
    }

    #[test]
    fn a_lower_frame_limit_bounds_the_batch() {
        let mut buf = BytesMut::new();
        let mut batch = Batch::new(Framing::Length32, 100);
        for _ in 0..3 {
            assert!(batch.push(&mut buf, &frame(&[b'x'; 40])));
        }
        assert!(!batch.push(&mut buf, &frame(&[b'x'; 100])), "a frame at the limit travels alone");
        // 40 + 1 + 40 fit in 100; the third frame opened a second message.
        assert_eq!(buf[..4], 81u32.to_be_bytes());
        assert_eq!(buf[4 + 81..4 + 81 + 4], 40u32.to_be_bytes());
    }

    #[test]
    fn sealing_nothing_writes_nothing() {
        let mut buf = BytesMut::from(&b"ping"[..]);
        Batch::new(Framing::WsText, MAX_BATCH_BYTES).seal(&mut buf);
        assert_eq!(&buf[..], b"ping");
    }
}
