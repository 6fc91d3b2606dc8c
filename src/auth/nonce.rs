//! Memory of the push nonces seen recently, so a captured push cannot be replayed.
//!
//! A nonce must be remembered until its request's timestamp falls out of the accepted
//! window; after that the timestamp check refuses a replay on its own. The store is
//! bounded: when it is full of nonces that are all still needed, a new request is refused
//! rather than an old nonce forgotten (forgetting would reopen the replay).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;

/// Outcome of [`NonceStore::check_and_insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    Fresh,
    Replayed,
    Full,
}

#[derive(Debug)]
pub struct NonceStore {
    capacity: usize,
    seen: HashSet<Arc<str>>,
    /// (expiry in Unix seconds, nonce), soonest first.
    expiries: BinaryHeap<Reverse<(u64, Arc<str>)>>,
}

impl NonceStore {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, seen: HashSet::new(), expiries: BinaryHeap::new() }
    }

    /// Records `nonce` until `expires_at` (Unix seconds) unless it is already known.
    pub fn check_and_insert(&mut self, nonce: &str, now: u64, expires_at: u64) -> NonceCheck {
        while let Some(Reverse((expiry, _))) = self.expiries.peek() {
            if *expiry > now {
                break;
            }
            let Reverse((_, old)) = self.expiries.pop().expect("peeked");
            self.seen.remove(&old);
        }
        if self.seen.contains(nonce) {
            return NonceCheck::Replayed;
        }
        if self.seen.len() >= self.capacity {
            return NonceCheck::Full;
        }
        let nonce: Arc<str> = nonce.into();
        self.seen.insert(nonce.clone());
        self.expiries.push(Reverse((expires_at, nonce)));
        NonceCheck::Fresh
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_is_caught_until_expiry_and_capacity_holds() {
        let mut s = NonceStore::new(2);
        assert_eq!(s.check_and_insert("a", 100, 110), NonceCheck::Fresh);
        assert_eq!(s.check_and_insert("a", 105, 115), NonceCheck::Replayed);
        assert_eq!(s.check_and_insert("b", 105, 200), NonceCheck::Fresh);
        assert_eq!(s.check_and_insert("c", 105, 200), NonceCheck::Full);
        // "a" expired at 110: it is forgotten and its place is free again.
        assert_eq!(s.check_and_insert("c", 111, 200), NonceCheck::Fresh);
        assert_eq!(s.len(), 2);
    }
}
