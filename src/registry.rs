//! The local index of live sessions: user id -> the sessions (devices) that user holds on
//! this node, for one app.
//!
//! Owns registration, delivery of an already-encoded frame to every session of a user, and
//! disconnecting sessions that cannot keep up. It does not encode frames, decide who may
//! send to whom, or know about other nodes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use dashmap::DashMap;
use tokio::sync::{Notify, mpsc};

use crate::protocol::{ErrorCode, Frame};

/// Out-of-band control of one session: anyone holding a handle can ask it to close with a
/// reason, even when its outbound queue is full.
#[derive(Debug, Default)]
pub struct SessionControl {
    /// 0 = not kicked; otherwise an index into [`KICK_REASONS`] plus one.
    reason: AtomicU8,
    notify: Notify,
    /// Bytes of frames sitting in the session's outbound queue.
    queued_bytes: AtomicUsize,
}

const KICK_REASONS: [ErrorCode; 4] =
    [ErrorCode::SlowConsumer, ErrorCode::ServerShutdown, ErrorCode::Internal, ErrorCode::NodeDraining];

impl SessionControl {
    /// Asks the session to close. The first reason wins.
    pub fn kick(&self, reason: ErrorCode) {
        let idx = KICK_REASONS.iter().position(|r| *r == reason).unwrap_or(2) as u8 + 1;
        if self.reason.compare_exchange(0, idx, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // Every waiter: the session waits in its loop and, during a write, there too.
            self.notify.notify_waiters();
        }
    }

    /// Resolves once [`kick`](Self::kick) has been called; returns the reason.
    pub async fn kicked(&self) -> ErrorCode {
        loop {
            // Created before the check: it hears every notify_waiters from here on, so a
            // kick between the check and the wait is not missed.
            let notified = self.notify.notified();
            if let Some(reason) = self.reason() {
                return reason;
            }
            notified.await;
        }
    }

    /// The session took `frame` off its queue.
    pub fn dequeued(&self, frame: &Frame) {
        self.queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    pub fn reason(&self) -> Option<ErrorCode> {
        match self.reason.load(Ordering::Acquire) {
            0 => None,
            n => Some(KICK_REASONS[(n - 1) as usize]),
        }
    }
}

/// What the registry keeps for each session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub conn_id: u64,
    pub tx: mpsc::Sender<Frame>,
    pub control: Arc<SessionControl>,
}

/// Why a frame could not be queued for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferError {
    /// The queue is full (in frames or bytes): the session is kicked as a slow consumer.
    Full,
    /// The session is closing.
    Closed,
}

impl SessionHandle {
    /// Queues `frame` without waiting, keeping the byte count the session's budget is
    /// checked against; a full queue kicks the session as a slow consumer.
    pub fn offer(&self, frame: Frame, max_queued_bytes: usize) -> Result<(), OfferError> {
        let len = frame.len();
        let queued = self.control.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        let result = if queued > max_queued_bytes {
            Err(OfferError::Full)
        } else {
            self.tx.try_send(frame).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => OfferError::Full,
                mpsc::error::TrySendError::Closed(_) => OfferError::Closed,
            })
        };
        if let Err(e) = result {
            self.control.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            if e == OfferError::Full {
                self.control.kick(ErrorCode::SlowConsumer);
            }
        }
        result
    }
}

/// Result of offering a frame to a user's sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Sessions that accepted the frame into their queue.
    pub sessions: usize,
    /// Sessions whose queue was full: they were disconnected as slow consumers.
    pub dropped: usize,
}

impl std::ops::AddAssign for Delivered {
    fn add_assign(&mut self, other: Self) {
        self.sessions += other.sessions;
        self.dropped += other.dropped;
    }
}

/// Outbound queue sizes of one app's sessions, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub total: u64,
    pub max: u64,
}

/// The sessions of one app on this node: by user, and by channel subscribed to.
#[derive(Debug)]
pub struct Registry {
    users: DashMap<Box<str>, Vec<SessionHandle>>,
    channels: DashMap<Box<str>, Vec<SessionHandle>>,
    sessions: AtomicUsize,
    /// Queued bytes one session may hold before it counts as a slow consumer.
    max_queued_bytes: usize,
}

impl Registry {
    pub fn new(max_queued_bytes: usize) -> Self {
        Self { users: DashMap::new(), channels: DashMap::new(), sessions: AtomicUsize::new(0), max_queued_bytes }
    }

    pub fn max_queued_bytes(&self) -> usize {
        self.max_queued_bytes
    }

    /// Adds a session for `uid`, unless the user already holds `max_per_user` sessions.
    /// Returns whether it is the user's first session on this node.
    pub fn register(&self, uid: &str, handle: SessionHandle, max_per_user: usize) -> Result<bool, ErrorCode> {
        let mut entry = self.users.entry(uid.into()).or_default();
        if entry.len() >= max_per_user {
            return Err(ErrorCode::TooManyDevices);
        }
        entry.push(handle);
        self.sessions.fetch_add(1, Ordering::Relaxed);
        Ok(entry.len() == 1)
    }

    /// Removes a session; returns whether it was the user's last one on this node.
    pub fn unregister(&self, uid: &str, conn_id: u64) -> bool {
        remove_from(&self.users, uid, conn_id, Some(&self.sessions))
    }

    /// Subscribes a session to `channel`; returns whether it is the channel's first local
    /// subscriber.
    pub fn join(&self, channel: &str, handle: SessionHandle) -> bool {
        let mut entry = self.channels.entry(channel.into()).or_default();
        if entry.iter().any(|h| h.conn_id == handle.conn_id) {
            return false;
        }
        entry.push(handle);
        entry.len() == 1
    }

    /// Unsubscribes a session; returns whether the channel has no local subscriber left.
    pub fn leave(&self, channel: &str, conn_id: u64) -> bool {
        remove_from(&self.channels, channel, conn_id, None)
    }

    /// Offers `frame` to every session of `uid` without waiting: a session whose queue is
    /// full (in frames or in bytes) is kicked as a slow consumer, so one stuck reader never
    /// delays anyone else.
    pub fn deliver(&self, uid: &str, frame: Frame) -> Delivered {
        offer_all(self.users.get(uid).as_deref().map(Vec::as_slice), frame, self.max_queued_bytes)
    }

    /// Offers `frame` to every local subscriber of `channel`.
    pub fn deliver_channel(&self, channel: &str, frame: Frame) -> Delivered {
        offer_all(self.channels.get(channel).as_deref().map(Vec::as_slice), frame, self.max_queued_bytes)
    }

    /// Every session of this app on this node (for draining).
    pub fn all_sessions(&self) -> Vec<(String, SessionHandle)> {
        self.users
            .iter()
            .flat_map(|e| e.value().iter().map(|h| (e.key().to_string(), h.clone())).collect::<Vec<_>>())
            .collect()
    }

    /// Bytes waiting in this app's outbound queues: in all of them, and in the fullest one.
    pub fn queued_bytes(&self) -> QueueStats {
        let mut stats = QueueStats::default();
        for entry in self.users.iter() {
            for h in entry.value() {
                let q = h.control.queued_bytes() as u64;
                stats.total += q;
                stats.max = stats.max.max(q);
            }
        }
        stats
    }

    /// Sessions of `uid` on this node.
    pub fn sessions_of(&self, uid: &str) -> usize {
        self.users.get(uid).map_or(0, |s| s.len())
    }

    /// Local subscribers of `channel`.
    pub fn subscribers_of(&self, channel: &str) -> usize {
        self.channels.get(channel).map_or(0, |s| s.len())
    }

    /// Sessions of this app on this node.
    pub fn len(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Users with at least one session here.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }
}

/// Offers one copy of `frame` to each of `sessions`; the last one gets `frame` itself (a
/// user with one connection, the usual case, costs no copy).
fn offer_all(sessions: Option<&[SessionHandle]>, frame: Frame, max_bytes: usize) -> Delivered {
    let mut out = Delivered::default();
    let Some((last, others)) = sessions.unwrap_or_default().split_last() else { return out };
    let mut tally = |offered| match offered {
        Ok(()) => out.sessions += 1,
        Err(OfferError::Full) => out.dropped += 1,
        // The session is on its way out and will unregister itself.
        Err(OfferError::Closed) => {}
    };
    for s in others {
        tally(s.offer(frame.clone(), max_bytes));
    }
    tally(last.offer(frame, max_bytes));
    out
}

/// Removes `conn_id` from `key`'s list; true when the list became empty (and was removed).
fn remove_from(
    map: &DashMap<Box<str>, Vec<SessionHandle>>,
    key: &str,
    conn_id: u64,
    count: Option<&AtomicUsize>,
) -> bool {
    let mut emptied = false;
    let removed = map.remove_if_mut(key, |_, sessions| {
        if let Some(i) = sessions.iter().position(|s| s.conn_id == conn_id) {
            sessions.swap_remove(i);
            if let Some(c) = count {
                c.fetch_sub(1, Ordering::Relaxed);
            }
        }
        emptied = sessions.is_empty();
        emptied
    });
    removed.is_some() && emptied
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(id: u64, cap: usize) -> (SessionHandle, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(cap);
        (SessionHandle { conn_id: id, tx, control: Arc::default() }, rx)
    }

    #[test]
    fn every_device_receives_and_full_queue_is_kicked() {
        let r = Registry::new(1 << 20);
        let (a, mut ra) = handle(1, 4);
        let (b, _rb) = handle(2, 1);
        let b_control = b.control.clone();
        assert!(r.register("u", a, 4).unwrap(), "first session of u");
        assert!(!r.register("u", b, 4).unwrap());
        let frame = Frame::from_static("x");
        assert_eq!(r.deliver("u", frame.clone()), Delivered { sessions: 2, dropped: 0 });
        assert_eq!(r.deliver("u", frame.clone()), Delivered { sessions: 1, dropped: 1 });
        assert_eq!(b_control.reason(), Some(ErrorCode::SlowConsumer));
        assert_eq!(ra.try_recv().unwrap(), frame);
        assert_eq!(r.deliver("nobody", frame.clone()), Delivered::default());
    }

    #[test]
    fn per_user_limit_and_unregister() {
        let r = Registry::new(1 << 20);
        r.register("u", handle(1, 1).0, 2).unwrap();
        r.register("u", handle(2, 1).0, 2).unwrap();
        assert_eq!(r.register("u", handle(3, 1).0, 2), Err(ErrorCode::TooManyDevices));
        assert_eq!(r.len(), 2);
        assert!(!r.unregister("u", 1));
        assert!(r.unregister("u", 2), "last session of u");
        assert_eq!((r.len(), r.users()), (0, 0));
    }

    #[test]
    fn channels_deliver_to_subscribers() {
        let r = Registry::new(1 << 20);
        let (a, mut ra) = handle(1, 4);
        let (b, _rb) = handle(2, 4);
        assert!(r.join("room", a.clone()));
        assert!(!r.join("room", a), "joining twice is a no-op");
        assert!(!r.join("room", b));
        assert_eq!(r.deliver_channel("room", Frame::from_static("m")).sessions, 2);
        assert_eq!(ra.try_recv().unwrap().as_str(), "m");
        assert!(!r.leave("room", 1));
        assert!(r.leave("room", 2));
        assert_eq!(r.channels(), 0);
    }

    #[test]
    fn byte_budget_counts_as_full() {
        let r = Registry::new(10);
        let (a, mut ra) = handle(1, 100);
        let control = a.control.clone();
        r.register("u", a, 1).unwrap();
        let frame = Frame::from_static("123456");
        assert_eq!(r.deliver("u", frame.clone()).sessions, 1);
        assert_eq!(r.deliver("u", frame.clone()), Delivered { sessions: 0, dropped: 1 }, "12 bytes > 10");
        assert_eq!(control.reason(), Some(ErrorCode::SlowConsumer));
        let got = ra.try_recv().unwrap();
        control.dequeued(&got);
        assert_eq!(control.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn kick_before_wait_is_not_lost() {
        let c = SessionControl::default();
        c.kick(ErrorCode::ServerShutdown);
        c.kick(ErrorCode::SlowConsumer);
        assert_eq!(c.kicked().await, ErrorCode::ServerShutdown);
    }
}
