//! The local index of live sessions: user id -> the sessions (devices) that user holds on
//! this node, for one app.
//!
//! Owns registration, delivery of an already-encoded frame to every session of a user, and
//! disconnecting sessions that cannot keep up. It does not encode frames, decide who may
//! send to whom, or know about other nodes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use crate::protocol::{ErrorCode, Frame};

/// Out-of-band control of one session, and its outbound queue: anyone holding a handle can
/// queue a frame for it, or ask it to close with a reason, even when its queue is full.
#[derive(Debug, Default)]
pub struct SessionControl {
    /// 0 = not kicked; otherwise an index into [`KICK_REASONS`] plus one.
    reason: AtomicU8,
    notify: Notify,
    queue: Mutex<Queue>,
    /// The session, waiting for its queue to fill.
    queue_waker: AtomicWaker,
}

/// Frames waiting to be written to one connection. A frame for this connection alone is
/// copied into one buffer (and the sender drops its own frame on its own thread); a frame
/// for several (a channel's subscribers, a user's devices) is queued by reference, shared
/// by all of them. The session takes a run of frames at once ([`Taken`]). Before, every
/// frame went through a channel and was freed by the session's thread: glibc's malloc then
/// locks the arena the frame came from, and the channel's bookkeeping was atomics the two
/// threads shared (docs/performance.md).
#[derive(Debug, Default)]
struct Queue {
    /// The bytes of the copied frames, in order.
    text: BytesMut,
    frames: VecDeque<Queued>,
    /// Bytes of all the frames waiting, copied or shared.
    bytes: usize,
    /// The session has ended: nothing more is queued.
    closed: bool,
}

/// One frame in a [`Queue`].
#[derive(Debug)]
enum Queued {
    /// The next `len` bytes of the queue's `text`; `one_line` as [`Frame::is_one_line`].
    Copied {
        len: usize,
        one_line: bool,
    },
    Shared(Frame),
}

impl Queued {
    fn len(&self) -> usize {
        match self {
            Queued::Copied { len, .. } => *len,
            Queued::Shared(frame) => frame.len(),
        }
    }

    fn copied_len(&self) -> usize {
        match self {
            Queued::Copied { len, .. } => *len,
            Queued::Shared(_) => 0,
        }
    }
}

/// How much one session's queue may hold before its session counts as a slow consumer
/// (`limits.outbound_queue` and `limits.outbound_queue_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub frames: usize,
    pub bytes: usize,
}

/// A queue's buffer past this capacity is not kept once a take has emptied the queue: a
/// burst to one connection does not hold its memory for the rest of the connection's life.
const KEEP_QUEUE_CAPACITY: usize = 64 * 1024;

/// Frame entries a queue keeps room for once a take has emptied it (more after a burst
/// are given back).
const KEEP_QUEUE_FRAMES: usize = 64;

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

    pub fn reason(&self) -> Option<ErrorCode> {
        match self.reason.load(Ordering::Acquire) {
            0 => None,
            n => Some(KICK_REASONS[(n - 1) as usize]),
        }
    }

    /// Bytes of frames waiting in the session's queue.
    pub fn queued_bytes(&self) -> usize {
        self.queue().bytes
    }

    /// A panic elsewhere while the lock was held cannot leave the queue half-written: every
    /// change to it is a push or a take that completes before the guard is dropped.
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ready when frames wait in the queue (or once it is closed); the session's loop
    /// waits on this.
    pub fn poll_queued(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before looking, so a frame queued after the look wakes this task.
        self.queue_waker.register(cx.waker());
        let q = self.queue();
        if q.frames.is_empty() && !q.closed { Poll::Pending } else { Poll::Ready(()) }
    }

    /// Takes up to `max` of the queued frames, oldest first, into `into`, and returns how
    /// many frames `into` holds. Frames still in `into` from the take before are written
    /// first: then nothing new is taken. Holds the queue's lock for a few moves; the frames
    /// are cut apart after.
    pub fn take_queued(&self, max: usize, into: &mut Taken) -> usize {
        if !into.frames.is_empty() {
            return into.frames.len();
        }
        into.run = Bytes::new();
        into.frames.shrink_to(KEEP_QUEUE_FRAMES);
        // The buffer taken last time, whole again now that its frames are gone, is what the
        // senders fill next.
        let spare_ready = into.spare.try_reclaim(into.spare_capacity);
        let mut q = self.queue();
        let n = max.min(q.frames.len());
        if n == 0 {
            return 0;
        }
        into.frames.extend(q.frames.drain(..n));
        q.bytes -= into.frames.iter().map(Queued::len).sum::<usize>();
        if q.frames.is_empty() {
            q.frames.shrink_to(KEEP_QUEUE_FRAMES);
            let next = if spare_ready { std::mem::take(&mut into.spare) } else { BytesMut::new() };
            let mut full = std::mem::replace(&mut q.text, next);
            drop(q);
            let capacity = full.capacity();
            into.run = full.split().freeze();
            // Kept to be given back, unless it grew too large to keep.
            (into.spare, into.spare_capacity) =
                if capacity <= KEEP_QUEUE_CAPACITY { (full, capacity) } else { (BytesMut::new(), 0) };
        } else {
            let len: usize = into.frames.iter().map(Queued::copied_len).sum();
            into.run = q.text.split_to(len).freeze();
        }
        n
    }

    /// Ends the queue: what waits in it is dropped, and offers fail from now on.
    fn close_queue(&self) {
        let mut q = self.queue();
        *q = Queue { closed: true, ..Queue::default() };
    }
}

/// Frames taken from a queue at once ([`SessionControl::take_queued`]), to be written in
/// order: an iterator of them. The session keeps it, with the buffer it took last: the
/// senders fill one buffer while the session writes out the other, and the two change
/// places at each take that empties the queue, so that neither is allocated again.
#[derive(Debug, Default)]
pub struct Taken {
    /// The bytes of the copied frames among `frames`.
    run: Bytes,
    frames: VecDeque<Queued>,
    /// The buffer `run` was cut from, empty, and its capacity when it was taken.
    spare: BytesMut,
    spare_capacity: usize,
}

impl Iterator for Taken {
    type Item = Frame;

    fn next(&mut self) -> Option<Frame> {
        match self.frames.pop_front()? {
            Queued::Shared(frame) => Some(frame),
            Queued::Copied { len, one_line } => {
                let text = self.run.split_to(len);
                // SAFETY: `offer` copied these bytes from whole frames, which are UTF-8, in
                // the order of `frames`, which holds their lengths: each piece is one
                // frame's bytes.
                #[allow(unsafe_code)]
                Some(unsafe { Frame::from_utf8_unchecked(text, one_line) })
            }
        }
    }
}

/// The session's end of its queue: dropping it closes the queue, so that nothing is
/// queued for a connection that is gone.
#[derive(Debug)]
pub struct QueueOwner(Arc<SessionControl>);

impl QueueOwner {
    pub fn new(control: Arc<SessionControl>) -> Self {
        Self(control)
    }
}

impl Drop for QueueOwner {
    fn drop(&mut self) {
        self.0.close_queue();
    }
}

/// What the registry keeps for each session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub conn_id: u64,
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
    /// Queues a copy of `frame` without waiting: for a frame this session alone receives.
    /// A full queue kicks the session as a slow consumer.
    pub fn offer(&self, frame: &Frame, limits: QueueLimits) -> Result<(), OfferError> {
        self.queue(frame, limits, |q| {
            q.text.extend_from_slice(frame.as_bytes());
            Queued::Copied { len: frame.len(), one_line: frame.is_one_line() }
        })
    }

    /// Queues `frame` itself, shared with the other sessions it goes to (its bytes are
    /// not copied per session); otherwise as [`offer`](Self::offer).
    pub fn offer_shared(&self, frame: &Frame, limits: QueueLimits) -> Result<(), OfferError> {
        self.queue(frame, limits, |_| Queued::Shared(frame.clone()))
    }

    fn queue(
        &self,
        frame: &Frame,
        limits: QueueLimits,
        put: impl FnOnce(&mut Queue) -> Queued,
    ) -> Result<(), OfferError> {
        let control = &*self.control;
        let mut q = control.queue();
        if q.closed {
            return Err(OfferError::Closed);
        }
        if q.frames.len() >= limits.frames || q.bytes + frame.len() > limits.bytes {
            drop(q);
            control.kick(ErrorCode::SlowConsumer);
            return Err(OfferError::Full);
        }
        let was_empty = q.frames.is_empty();
        let queued = put(&mut q);
        q.frames.push_back(queued);
        q.bytes += frame.len();
        drop(q);
        if was_empty {
            control.queue_waker.wake();
        }
        Ok(())
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
    /// What one session's queue may hold before it counts as a slow consumer.
    limits: QueueLimits,
}

impl Registry {
    pub fn new(limits: QueueLimits) -> Self {
        Self { users: DashMap::new(), channels: DashMap::new(), sessions: AtomicUsize::new(0), limits }
    }

    pub fn queue_limits(&self) -> QueueLimits {
        self.limits
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
    pub fn deliver(&self, uid: &str, frame: &Frame) -> Delivered {
        offer_all(self.users.get(uid).as_deref().map(Vec::as_slice), frame, self.limits)
    }

    /// Offers `frame` to every local subscriber of `channel`.
    pub fn deliver_channel(&self, channel: &str, frame: &Frame) -> Delivered {
        offer_all(self.channels.get(channel).as_deref().map(Vec::as_slice), frame, self.limits)
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

/// Offers `frame` to each of `sessions`: copied into a lone session's queue, shared by
/// several.
fn offer_all(sessions: Option<&[SessionHandle]>, frame: &Frame, limits: QueueLimits) -> Delivered {
    let sessions = sessions.unwrap_or_default();
    let offer = if sessions.len() == 1 { SessionHandle::offer } else { SessionHandle::offer_shared };
    let mut out = Delivered::default();
    for s in sessions {
        match offer(s, frame, limits) {
            Ok(()) => out.sessions += 1,
            Err(OfferError::Full) => out.dropped += 1,
            // The session is on its way out and will unregister itself.
            Err(OfferError::Closed) => {}
        }
    }
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

    const LIMITS: QueueLimits = QueueLimits { frames: 4, bytes: 1 << 20 };

    fn handle(id: u64) -> (SessionHandle, QueueOwner) {
        let control = Arc::<SessionControl>::default();
        (SessionHandle { conn_id: id, control: control.clone() }, QueueOwner::new(control))
    }

    fn take_all(h: &SessionHandle) -> Vec<Frame> {
        take(h, usize::MAX)
    }

    fn take(h: &SessionHandle, max: usize) -> Vec<Frame> {
        let mut taken = Taken::default();
        let n = h.control.take_queued(max, &mut taken);
        let frames: Vec<Frame> = taken.collect();
        assert_eq!(frames.len(), n);
        frames
    }

    #[test]
    fn every_device_receives_and_full_queue_is_kicked() {
        let r = Registry::new(LIMITS);
        let (a, _qa) = handle(1);
        let (b, _qb) = handle(2);
        let (a_seen, b_control) = (a.clone(), b.control.clone());
        assert!(r.register("u", a, 4).unwrap(), "first session of u");
        assert!(!r.register("u", b, 4).unwrap());
        let frame = Frame::from_static("x");
        for _ in 0..4 {
            assert_eq!(r.deliver("u", &frame), Delivered { sessions: 2, dropped: 0 });
        }
        take_all(&a_seen);
        assert_eq!(r.deliver("u", &frame), Delivered { sessions: 1, dropped: 1 }, "b holds 4 frames already");
        assert_eq!(b_control.reason(), Some(ErrorCode::SlowConsumer));
        assert_eq!(r.deliver("nobody", &frame), Delivered::default());
        assert_eq!(take_all(&a_seen), [frame]);
    }

    #[test]
    fn per_user_limit_and_unregister() {
        let r = Registry::new(LIMITS);
        r.register("u", handle(1).0, 2).unwrap();
        r.register("u", handle(2).0, 2).unwrap();
        assert_eq!(r.register("u", handle(3).0, 2), Err(ErrorCode::TooManyDevices));
        assert_eq!(r.len(), 2);
        assert!(!r.unregister("u", 1));
        assert!(r.unregister("u", 2), "last session of u");
        assert_eq!((r.len(), r.users()), (0, 0));
    }

    #[test]
    fn channels_deliver_to_subscribers() {
        let r = Registry::new(LIMITS);
        let (a, _qa) = handle(1);
        let (b, _qb) = handle(2);
        assert!(r.join("room", a.clone()));
        assert!(!r.join("room", a.clone()), "joining twice is a no-op");
        assert!(!r.join("room", b));
        assert_eq!(r.deliver_channel("room", &Frame::from_static("m")).sessions, 2);
        assert_eq!(take_all(&a)[0].as_str(), "m");
        assert!(!r.leave("room", 1));
        assert!(r.leave("room", 2));
        assert_eq!(r.channels(), 0);
    }

    #[test]
    fn byte_budget_counts_as_full() {
        let r = Registry::new(QueueLimits { frames: 100, bytes: 10 });
        let (a, _qa) = handle(1);
        let seen = a.clone();
        r.register("u", a, 1).unwrap();
        let frame = Frame::from_static("123456");
        assert_eq!(r.deliver("u", &frame).sessions, 1);
        assert_eq!(seen.control.queued_bytes(), 6);
        assert_eq!(r.deliver("u", &frame), Delivered { sessions: 0, dropped: 1 }, "12 bytes > 10");
        assert_eq!(seen.control.reason(), Some(ErrorCode::SlowConsumer));
        assert_eq!(take_all(&seen), [frame]);
        assert_eq!(seen.control.queued_bytes(), 0);
    }

    #[test]
    fn frames_come_out_whole_in_order_and_a_run_at_a_time() {
        // Copied and shared ones mixed.
        let (a, _qa) = handle(1);
        let limits = QueueLimits { frames: 100, bytes: 1 << 20 };
        // Of different sizes; every other one known to be one line.
        let frames: Vec<Frame> = (0..10)
            .map(|i| match i % 2 {
                0 => Frame::from(format!("{{\"n\":{i}}}\n").repeat(i + 1)),
                _ => crate::protocol::ServerFrame::Ack {
                    client_id: Some(&"c".repeat(i)),
                    msg_id: "m",
                    status: "delivered",
                    delivered: i,
                    dropped: 0,
                    cluster: None,
                }
                .encode(),
            })
            .collect();
        assert!(frames[1].is_one_line() && !frames[0].is_one_line());
        for (i, f) in frames.iter().enumerate() {
            match i % 3 {
                0 => a.offer_shared(f, limits).unwrap(),
                _ => a.offer(f, limits).unwrap(),
            }
        }
        let mut got = take(&a, 3);
        assert_eq!(got, frames[..3]);
        a.offer(&Frame::from_static("late"), limits).unwrap();
        got.extend(take(&a, 100));
        assert_eq!(got.len(), 11);
        assert_eq!(got[3..10], frames[3..]);
        assert_eq!(got[10].as_str(), "late");
        assert!(got.iter().zip(&frames).all(|(g, f)| g.is_one_line() == f.is_one_line()));
        assert!(take(&a, 100).is_empty());
    }

    #[test]
    fn a_frame_for_one_session_is_copied_and_for_several_shared() {
        let r = Registry::new(LIMITS);
        let (a, _qa) = handle(1);
        let (b, _qb) = handle(2);
        r.register("alone", a.clone(), 4).unwrap();
        r.join("room", a.clone());
        r.join("room", b.clone());
        let (direct, channel) = (Frame::from("d".repeat(50)), Frame::from("c".repeat(50)));
        r.deliver("alone", &direct);
        r.deliver_channel("room", &channel);
        assert_eq!((a.control.queued_bytes(), b.control.queued_bytes()), (100, 50));
        let (got_a, got_b) = (take_all(&a), take_all(&b));
        assert_eq!(got_a, [direct.clone(), channel.clone()]);
        assert_eq!(got_b, std::slice::from_ref(&channel));
        let at = |f: &Frame| f.as_bytes().as_ptr();
        assert_ne!(at(&got_a[0]), at(&direct), "copied");
        assert_eq!((at(&got_a[1]), at(&got_b[0])), (at(&channel), at(&channel)), "shared");
        assert_eq!((a.control.queued_bytes(), b.control.queued_bytes()), (0, 0));
    }

    #[test]
    fn frames_left_from_a_take_come_out_before_anything_new_is_taken() {
        let (a, _qa) = handle(1);
        for text in ["one", "two", "three"] {
            a.offer(&Frame::from(text.to_string()), LIMITS).unwrap();
        }
        let mut taken = Taken::default();
        assert_eq!(a.control.take_queued(2, &mut taken), 2);
        assert_eq!(taken.next().unwrap().as_str(), "one");
        assert_eq!(a.control.take_queued(2, &mut taken), 1, "\"two\" is still to be written");
        let rest: Vec<_> = std::iter::from_fn(|| {
            let frame = taken.next();
            if frame.is_none() && a.control.take_queued(2, &mut taken) != 0 {
                return taken.next();
            }
            frame
        })
        .collect();
        assert_eq!(rest.iter().map(Frame::as_str).collect::<Vec<_>>(), ["two", "three"]);
    }

    #[test]
    fn two_buffers_take_turns() {
        let (a, _qa) = handle(1);
        let limits = QueueLimits { frames: 100, bytes: 1 << 20 };
        let frame = Frame::from("x".repeat(100));
        let mut taken = Taken::default();
        let mut buffers = std::collections::HashSet::new();
        for _ in 0..8 {
            for _ in 0..5 {
                a.offer(&frame, limits).unwrap();
            }
            assert_eq!(a.control.take_queued(usize::MAX, &mut taken), 5);
            buffers.insert(taken.run.as_ptr() as usize);
            assert_eq!(taken.by_ref().collect::<Vec<_>>(), vec![frame.clone(); 5]);
        }
        assert_eq!(buffers.len(), 2, "each take fills one of the same two buffers");
    }

    #[test]
    fn a_closed_queue_takes_nothing_and_drops_what_waited() {
        let (a, qa) = handle(1);
        a.offer(&Frame::from_static("x"), LIMITS).unwrap();
        drop(qa);
        assert_eq!(a.offer(&Frame::from_static("y"), LIMITS), Err(OfferError::Closed));
        assert_eq!((a.control.queued_bytes(), take_all(&a).len()), (0, 0));
        assert_eq!(a.control.reason(), None, "a closed queue is not a slow consumer");
    }

    #[tokio::test]
    async fn a_frame_queued_while_the_session_waits_wakes_it() {
        let (a, _qa) = handle(1);
        let control = a.control.clone();
        let waiting = tokio::spawn(async move { std::future::poll_fn(|cx| control.poll_queued(cx)).await });
        tokio::task::yield_now().await;
        a.offer(&Frame::from_static("x"), LIMITS).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting).await.expect("woken").unwrap();
    }

    #[tokio::test]
    async fn kick_before_wait_is_not_lost() {
        let c = SessionControl::default();
        c.kick(ErrorCode::ServerShutdown);
        c.kick(ErrorCode::SlowConsumer);
        assert_eq!(c.kicked().await, ErrorCode::ServerShutdown);
    }
}
