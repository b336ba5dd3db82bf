//! Session deadlines: a min-heap of (deadline, slab key, session id) with lazy updates.
//!
//! A session keeps its own current deadline; the heap only needs an entry no later than it.
//! Pushing happens when a deadline moves earlier; when an entry pops before the session's real
//! deadline it is pushed again for the later time. The session id guards against a slab key
//! reused by a newer session.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Timers {
    pub fn schedule(&mut self, at: Instant, key: usize, id: u64) {
        self.heap.push(Reverse((at, key, id)));
    }

    /// The next entry due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize, u64)> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// When the earliest entry is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_order_only_when_due() {
        let now = Instant::now();
        let mut t = Timers::default();
        t.schedule(now + Duration::from_secs(2), 1, 10);
        t.schedule(now + Duration::from_secs(1), 2, 20);
        assert!(t.pop_due(now).is_none());
        assert_eq!(t.next_deadline(), Some(now + Duration::from_secs(1)));
        let later = now + Duration::from_secs(3);
        assert_eq!(t.pop_due(later).map(|e| e.1), Some(2));
        assert_eq!(t.pop_due(later).map(|e| e.1), Some(1));
        assert!(t.is_empty());
    }
}
