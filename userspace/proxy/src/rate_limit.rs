//! Request rates per client address (a frontend's `rate_limit`), held in memory every worker
//! shares, so that the limit holds however the client's connections are spread.
//!
//! The table is a row of `u64` words in a shared mapping that lbd's main process creates and
//! every worker maps before its sandbox goes on ([`SharedSlots`]; the mapping itself is
//! lbd's). Word 0 holds a random seed; the rest are two rows of [`SLOTS_PER_ROW`] slots, each
//! a generic cell rate algorithm's theoretical arrival time
//! (`lb_ebpf_common::client::admit`, the algorithm the kernel program applies to connection
//! rates). A client and a frontend hash (with the seed, so a client cannot aim at another's
//! slots) to one slot in each row, updated with compare-and-swap: a request is admitted when
//! either of its slots admits it, so a client that shares one slot with a heavy one is still
//! judged by its own traffic in the other; one over its rate is over in both. Nothing is
//! allocated per client, and the table's size is fixed: [`WORDS`] words, 512 KiB.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use lb_ebpf_common::client::{admit, ClientKey, Limits};

/// Slots per row (two rows).
pub const SLOTS_PER_ROW: usize = 1 << 15;
/// The table's length in `u64` words: the seed, then the two rows.
pub const WORDS: usize = 1 + 2 * SLOTS_PER_ROW;

/// The shared words of the table, as a worker (or a test) holds them.
pub trait SharedSlots: Send {
    /// Word `index` (0..[`WORDS`]).
    fn word(&self, index: usize) -> Option<&AtomicU64>;
}

/// A frontend's limit: which frontend (part of the key) and its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Tells frontends apart in the table (the cluster and the frontend's place in it).
    pub id: u32,
    pub interval_ns: u64,
    pub tolerance_ns: u64,
}

impl RateLimit {
    /// `per_second` requests per second with a burst of as many; `None` for 0 (no limit).
    pub fn per_second(id: u32, per_second: u32) -> Option<RateLimit> {
        let (interval_ns, tolerance_ns) = Limits::rate(per_second);
        (interval_ns != 0).then_some(RateLimit {
            id,
            interval_ns,
            tolerance_ns,
        })
    }
}

/// The table of every worker: see the module's note.
pub struct RateTable {
    slots: Box<dyn SharedSlots>,
}

impl std::fmt::Debug for RateTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RateTable")
    }
}

impl RateTable {
    pub fn new(slots: Box<dyn SharedSlots>) -> RateTable {
        RateTable { slots }
    }

    /// Whether a request from `client` to the frontend of `limit`, at `now_ns` (monotonic
    /// clock), is within the rate; if it is, it is counted.
    pub fn admit(&self, limit: &RateLimit, client: IpAddr, now_ns: u64) -> bool {
        let seed = self.slots.word(0).map_or(0, |w| w.load(Ordering::Relaxed));
        let mut hasher = std::hash::DefaultHasher::new();
        (seed, limit.id, ClientKey::of(client)).hash(&mut hasher);
        let hash = hasher.finish();
        let first = 1 + (hash as usize % SLOTS_PER_ROW);
        let second = 1 + SLOTS_PER_ROW + ((hash >> 32) as usize % SLOTS_PER_ROW);
        let verdicts = [first, second].map(|index| {
            self.slots
                .word(index)
                .map(|slot| (slot, slot.load(Ordering::Relaxed)))
        });
        let mut admitted = false;
        for (slot, tat) in verdicts.into_iter().flatten() {
            let next = admit(tat, now_ns, limit.interval_ns, limit.tolerance_ns);
            if next == 0 {
                continue;
            }
            admitted = true;
            // Another worker may have moved the slot since: its update or this one is kept,
            // never a mix (one request more or less in a burst, at worst).
            let _ = slot.compare_exchange(tat, next, Ordering::Relaxed, Ordering::Relaxed);
        }
        admitted
    }
}

/// A table in this process's own memory (tests, and a worker run without lbd's main).
pub struct LocalSlots(Vec<AtomicU64>);

impl LocalSlots {
    pub fn new(seed: u64) -> LocalSlots {
        let mut words: Vec<AtomicU64> = (0..WORDS).map(|_| AtomicU64::new(0)).collect();
        if let Some(first) = words.first_mut() {
            *first = AtomicU64::new(seed);
        }
        LocalSlots(words)
    }
}

impl SharedSlots for LocalSlots {
    fn word(&self, index: usize) -> Option<&AtomicU64> {
        self.0.get(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RateTable {
        RateTable::new(Box::new(LocalSlots::new(0x5eed)))
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_burst_of_the_rate_then_one_per_interval_per_client_and_frontend() {
        let table = table();
        let limit = RateLimit::per_second(1, 5).unwrap_or(RateLimit {
            id: 1,
            interval_ns: 0,
            tolerance_ns: 0,
        });
        let a: IpAddr = IpAddr::from([10, 0, 0, 1]);
        let b: IpAddr = IpAddr::from([10, 0, 0, 2]);
        let now = 100 * SECOND;
        let admitted = (0..20).filter(|_| table.admit(&limit, a, now)).count();
        assert_eq!(admitted, 5, "the burst");
        assert!(
            table.admit(&limit, b, now),
            "another client has its own budget"
        );
        let other_frontend = RateLimit { id: 2, ..limit };
        assert!(table.admit(&other_frontend, a, now), "and another frontend");
        assert!(!table.admit(&limit, a, now + SECOND / 10));
        assert!(
            table.admit(&limit, a, now + SECOND / 5),
            "one more per 200 ms"
        );
    }

    #[test]
    fn a_heavy_client_does_not_starve_the_others() {
        let table = table();
        let limit = RateLimit::per_second(7, 10).unwrap_or(RateLimit {
            id: 7,
            interval_ns: 0,
            tolerance_ns: 0,
        });
        let now = 50 * SECOND;
        // 500 clients at their rate's burst and one far over it: the light clients are served
        // (sharing both slots with busy clients is rare: about 500 x (500/32768)^2 / 2).
        let heavy = IpAddr::from([192, 0, 2, 1]);
        for _ in 0..1000 {
            table.admit(&limit, heavy, now);
        }
        let refused = (0..500u32)
            .filter(|n| {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
                !(0..10).all(|_| table.admit(&limit, ip, now))
            })
            .count();
        assert!(refused <= 1, "{refused} light clients refused");
        assert!(!table.admit(&limit, heavy, now));
        assert_eq!(RateLimit::per_second(7, 0), None);
    }
}
