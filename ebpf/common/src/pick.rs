//! The steering policies as pure functions: which worker gets a new connection.
//!
//! The eBPF program calls these with a closure that reads WORKERS; the tests below call them
//! with plain arrays. Each skips workers that are draining, inactive or full, and says why
//! when none is left ([`NoWorker`]), which the program turns into SK_DROP and a counter.
//! Loops are bounded by [`MAX_WORKERS`] so that the verifier can see them end, and no value
//! on the way is an `Option` or a payload-less error: LLVM leaves the payload register of a
//! `None` undefined, and the verifier refuses a program that reads an undefined register
//! (`R4 !read_ok`), even where the value is never used. What the program does with the pick
//! (the socket selection, the counters) is `ebpf/steer`'s.

use crate::{Eligibility, WorkerState, MAX_WORKERS};

/// Why no worker can take a new connection.
///
/// `repr(u32)`, so that `Result<u32, NoWorker>` carries a defined 32-bit payload on both
/// sides (see the module's note on undefined registers).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoWorker {
    /// At least one worker is active and not draining, and every such worker is full.
    AllFull = 1,
    /// No worker is active and not draining (or there are none).
    NoneActive = 2,
}

#[inline(always)]
const fn clamp(workers: u32) -> u32 {
    if workers > MAX_WORKERS {
        MAX_WORKERS
    } else {
        workers
    }
}

/// Flow hash: worker `hash % workers` when it takes connections. Otherwise a second start is
/// drawn from the same hash and the first worker from there on (wrapping) that takes them is
/// picked: the flows of a draining or full worker spread over the others instead of all
/// landing on its neighbour, and the flows of the other workers do not move. The same hash
/// (the same 4-tuple) gives the same worker while the states do not change.
#[inline(always)]
pub fn flow_hash(
    hash: u32,
    workers: u32,
    state: impl Fn(u32) -> WorkerState,
) -> Result<u32, NoWorker> {
    let workers = clamp(workers);
    if workers == 0 {
        return Err(NoWorker::NoneActive);
    }
    let first = hash % workers;
    if state(first).eligibility() == Eligibility::Takes {
        return Ok(first);
    }
    probe(rehash(hash) % workers, workers, state)
}

/// A second, independent-looking value from `hash` (Fibonacci hashing, high half).
#[inline(always)]
const fn rehash(hash: u32) -> u32 {
    hash.wrapping_mul(0x9E37_79B1) >> 16
}

/// The first worker, from `start` on (wrapping), that takes connections.
#[inline(always)]
fn probe(start: u32, workers: u32, state: impl Fn(u32) -> WorkerState) -> Result<u32, NoWorker> {
    let mut any_full = false;
    for step in 0..MAX_WORKERS {
        if step >= workers {
            break;
        }
        let mut index = start + step;
        if index >= workers {
            index -= workers;
        }
        match state(index).eligibility() {
            Eligibility::Takes => return Ok(index),
            Eligibility::Full => any_full = true,
            Eligibility::Off => {}
        }
    }
    Err(if any_full {
        NoWorker::AllFull
    } else {
        NoWorker::NoneActive
    })
}

/// Least connections: the worker that takes connections with the fewest live ones. Ties go
/// to the first one met scanning from `seed % workers`, so that equal workers share the load.
#[inline(always)]
pub fn least_connections(
    seed: u32,
    workers: u32,
    state: impl Fn(u32) -> WorkerState,
) -> Result<u32, NoWorker> {
    let workers = clamp(workers);
    if workers == 0 {
        return Err(NoWorker::NoneActive);
    }
    let start = seed % workers;
    // (index, live) of the best so far; `found` says whether there is one.
    let mut found = false;
    let mut best_index = 0;
    let mut best_live = 0;
    let mut any_full = false;
    for step in 0..MAX_WORKERS {
        if step >= workers {
            break;
        }
        let mut index = start + step;
        if index >= workers {
            index -= workers;
        }
        let worker = state(index);
        match worker.eligibility() {
            Eligibility::Takes => {
                if !found || worker.live < best_live {
                    found = true;
                    best_index = index;
                    best_live = worker.live;
                }
            }
            Eligibility::Full => any_full = true,
            Eligibility::Off => {}
        }
    }
    if found {
        Ok(best_index)
    } else if any_full {
        Err(NoWorker::AllFull)
    } else {
        Err(NoWorker::NoneActive)
    }
}

/// Power of two choices: workers `first % workers` and `second % workers` (made distinct when
/// there are two or more); the one with fewer live connections wins, a draining or full one
/// loses. When neither takes connections, least connections over all of them decides.
#[inline(always)]
pub fn power_of_two(
    first: u32,
    second: u32,
    workers: u32,
    state: impl Fn(u32) -> WorkerState,
) -> Result<u32, NoWorker> {
    let workers = clamp(workers);
    if workers == 0 {
        return Err(NoWorker::NoneActive);
    }
    let a = first % workers;
    let mut b = second % workers;
    if b == a && workers > 1 {
        b = if a + 1 >= workers { 0 } else { a + 1 };
    }
    let (worker_a, worker_b) = (state(a), state(b));
    let takes_a = worker_a.eligibility() == Eligibility::Takes;
    let takes_b = worker_b.eligibility() == Eligibility::Takes;
    if takes_a && takes_b {
        Ok(if worker_b.live < worker_a.live { b } else { a })
    } else if takes_a {
        Ok(a)
    } else if takes_b {
        Ok(b)
    } else {
        least_connections(a, workers, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(list: &[WorkerState]) -> impl Fn(u32) -> WorkerState + '_ {
        move |index| list.get(index as usize).copied().unwrap_or_default()
    }

    const UP: WorkerState = WorkerState::active(0);

    #[test]
    fn flow_hash_is_hash_modulo_workers_and_skips_who_cannot_take() {
        let all = [UP; 4];
        assert_eq!(flow_hash(6, 4, states(&all)), Ok(2));
        assert_eq!(flow_hash(6, 4, states(&all)), Ok(2));
        let third_draining = [UP, UP, UP.draining(), UP];
        let third_full = [UP, UP, WorkerState::active(1).with_live(1), UP];
        for hash in 0..1000u32 {
            for list in [&third_draining, &third_full] {
                let picked = flow_hash(hash, 4, states(list)).unwrap();
                assert_ne!(picked, 2);
                if hash % 4 != 2 {
                    assert_eq!(picked, hash % 4, "an undisturbed flow moved");
                }
                assert_eq!(flow_hash(hash, 4, states(list)), Ok(picked));
            }
        }
        let only_first = [UP, UP.draining(), UP.draining(), UP.draining()];
        for hash in 0..100u32 {
            assert_eq!(flow_hash(hash, 4, states(&only_first)), Ok(0));
        }
    }

    #[test]
    fn flow_hash_spreads_a_draining_workers_flows() {
        let third_draining = [UP, UP, UP.draining(), UP];
        let mut seen = [0u32; 4];
        for hash in 0..40_000u32 {
            let hash = hash.wrapping_mul(2_654_435_761);
            seen[flow_hash(hash, 4, states(&third_draining)).unwrap() as usize] += 1;
        }
        // Probing from the same start would give worker 3 half of everything (20,000).
        assert_eq!(seen[2], 0);
        assert!(
            seen.iter()
                .all(|&n| n == 0 || (11_000..=16_000).contains(&n)),
            "{seen:?}"
        );
    }

    #[test]
    fn flow_hash_spreads_over_every_worker() {
        let all = [UP; 4];
        let mut seen = [0u32; 4];
        for hash in 0..4000u32 {
            let hash = hash.wrapping_mul(2_654_435_761);
            seen[flow_hash(hash, 4, states(&all)).unwrap() as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn no_worker_says_why() {
        let full = [WorkerState::active(3).with_live(3); 4];
        assert_eq!(flow_hash(1, 4, states(&full)), Err(NoWorker::AllFull));
        assert_eq!(
            least_connections(1, 4, states(&full)),
            Err(NoWorker::AllFull)
        );
        assert_eq!(power_of_two(1, 2, 4, states(&full)), Err(NoWorker::AllFull));
        let off = [UP.draining(), WorkerState::default()];
        assert_eq!(flow_hash(1, 2, states(&off)), Err(NoWorker::NoneActive));
        assert_eq!(
            least_connections(1, 0, states(&off)),
            Err(NoWorker::NoneActive)
        );
        assert_eq!(
            power_of_two(1, 2, 2, states(&off)),
            Err(NoWorker::NoneActive)
        );
        let mixed = [UP.draining(), WorkerState::active(1).with_live(1)];
        assert_eq!(flow_hash(0, 2, states(&mixed)), Err(NoWorker::AllFull));
    }

    #[test]
    fn least_connections_takes_the_fewest_live_and_skips_full_and_draining() {
        let list = [
            UP.with_live(5),
            UP.with_live(2),
            UP.with_live(0).draining(),
            WorkerState::active(1).with_live(1),
        ];
        for seed in 0..8 {
            assert_eq!(least_connections(seed, 4, states(&list)), Ok(1));
        }
        let ties = [UP.with_live(1), UP.with_live(1), UP.with_live(1)];
        assert_eq!(least_connections(0, 3, states(&ties)), Ok(0));
        assert_eq!(least_connections(2, 3, states(&ties)), Ok(2));
    }

    #[test]
    fn power_of_two_prefers_the_lower_and_never_a_draining_one() {
        let list = [
            UP.with_live(9),
            UP.with_live(3),
            UP.draining(),
            UP.with_live(4),
        ];
        assert_eq!(power_of_two(0, 1, 4, states(&list)), Ok(1));
        assert_eq!(power_of_two(3, 1, 4, states(&list)), Ok(1));
        assert_eq!(power_of_two(2, 0, 4, states(&list)), Ok(0));
        // The same pick twice becomes two distinct workers.
        assert_eq!(power_of_two(0, 0, 4, states(&list)), Ok(1));
        // Neither takes connections: least connections over all.
        let list = [
            UP.draining(),
            UP.with_live(7),
            UP.draining(),
            UP.with_live(4),
        ];
        assert_eq!(power_of_two(0, 2, 4, states(&list)), Ok(3));
    }

    #[test]
    fn worker_counts_beyond_the_maximum_are_clamped() {
        let all = [UP; MAX_WORKERS as usize];
        let picked = flow_hash(u32::MAX, 1000, states(&all)).unwrap();
        assert!(picked < MAX_WORKERS);
    }
}
