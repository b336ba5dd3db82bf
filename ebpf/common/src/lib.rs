//! lb-ebpf-common: what kakehi's eBPF steering program and its userspace agree on.
//!
//! It owns the `#[repr(C)]` layout of the program's maps — per-worker state ([`WorkerState`]
//! in WORKERS), the control record ([`Control`] in CONTROL), the counter indices
//! ([`counter`]) — and the worker-picking policies themselves ([`pick`]), written once as
//! pure functions so that the kernel program runs exactly the code that the unit tests here
//! check on the host. It is `no_std` and has no dependency by default, so the eBPF program
//! can use it; the `user` feature adds `aya::Pod` for the loader, the `mmap` feature a safe
//! view of the WORKERS map mapped into a worker process ([`mmap::WorkerStates`]). The program
//! lives in `ebpf/steer`, the loader in lbd's `steering` module.

#![no_std]
#![deny(unsafe_code)]

#[cfg(feature = "mmap")]
extern crate std;

pub mod client;
#[cfg(feature = "mmap")]
pub mod mmap;
pub mod pick;
#[cfg(feature = "user")]
mod pod;

/// The most workers one program steers between: the size of SOCKETS and WORKERS.
pub const MAX_WORKERS: u32 = 64;

/// `BPF_F_MMAPABLE` (linux/bpf.h): the WORKERS array is created with it, so a worker can map
/// it and publish its live connection count without a syscall.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The names of the program and its maps in the object, as the loader looks them up.
pub mod names {
    /// The `sk_reuseport` program.
    pub const PROGRAM: &str = "steer";
    /// REUSEPORT_SOCKARRAY: slot = worker index, value = that worker's listening socket.
    pub const SOCKETS: &str = "SOCKETS";
    /// Array (mmapable) of [`crate::WorkerState`], index = worker index.
    pub const WORKERS: &str = "WORKERS";
    /// Array of one [`crate::Control`].
    pub const CONTROL: &str = "CONTROL";
    /// Per-CPU array of `u64`, indexed by [`crate::counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// The `sock_ops` program that counts each client's open connections.
    pub const TRACK: &str = "track";
    /// Array of one [`crate::client::Limits`].
    pub const LIMITS: &str = "LIMITS";
    /// LRU hash: [`crate::client::ClientKey`] -> open connections (`u64`).
    pub const CONNS: &str = "CONNS";
    /// LRU hash: [`crate::client::ClientKey`] -> the client's rate state (`u64`, see
    /// [`crate::client::admit`]).
    pub const RATES: &str = "RATES";
}

/// How the program picks a worker for a new connection (`Control::policy`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    /// The connection's 4-tuple hash modulo the worker count, probing forward past draining
    /// and full workers: the same 4-tuple lands on the same worker.
    #[default]
    FlowHash = 0,
    /// The accepting worker with the fewest live connections.
    LeastConnections = 1,
    /// Two random workers, the one with fewer live connections wins.
    PowerOfTwo = 2,
}

impl Policy {
    /// The policy stored as `raw` in CONTROL, if it is one.
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::FlowHash),
            1 => Some(Self::LeastConnections),
            2 => Some(Self::PowerOfTwo),
            _ => None,
        }
    }

    /// The value stored in CONTROL.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }
}

/// One worker's entry in WORKERS: 16 bytes, `live` at byte 4 (see [`WorkerState::LIVE_OFFSET`]).
///
/// A worker takes new connections when it is ACTIVE, not DRAINING, and not full; it is full
/// when `limit != 0 && live >= limit` (limit 0 means unlimited).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerState {
    /// [`WorkerState::ACTIVE`] | [`WorkerState::DRAINING`].
    pub flags: u32,
    /// The worker's live (accepted, not yet closed) connections; written by the worker.
    pub live: u32,
    /// The most live connections the worker takes; 0 = unlimited.
    pub limit: u32,
    /// Keeps the size a multiple of 8 (the kernel rounds array values up to it anyway).
    pub reserved: u32,
}

impl WorkerState {
    /// The worker is up and may be given connections.
    pub const ACTIVE: u32 = 1;
    /// The worker finishes what it has and takes no new connection.
    pub const DRAINING: u32 = 2;
    /// The byte offset of `live` inside one entry.
    pub const LIVE_OFFSET: usize = 4;
    /// The byte size of one entry, as laid out in the map and its mmap'ed pages.
    pub const SIZE: usize = 16;

    /// An active worker with `limit` connections at most (0 = unlimited) and none live.
    pub const fn active(limit: u32) -> Self {
        Self {
            flags: Self::ACTIVE,
            live: 0,
            limit,
            reserved: 0,
        }
    }

    /// The same state with `live` connections.
    pub const fn with_live(self, live: u32) -> Self {
        Self { live, ..self }
    }

    /// The same state, marked draining.
    pub const fn draining(self) -> Self {
        Self {
            flags: self.flags | Self::DRAINING,
            ..self
        }
    }

    /// `limit != 0 && live >= limit`.
    pub const fn is_full(&self) -> bool {
        self.limit != 0 && self.live >= self.limit
    }

    /// Whether the program may give this worker a new connection, and if not, why.
    pub const fn eligibility(&self) -> Eligibility {
        if self.flags & Self::ACTIVE == 0 || self.flags & Self::DRAINING != 0 {
            Eligibility::Off
        } else if self.is_full() {
            Eligibility::Full
        } else {
            Eligibility::Takes
        }
    }
}

/// What one worker's state says about a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eligibility {
    /// Active, not draining, under its limit.
    Takes,
    /// Active and not draining, but at its limit.
    Full,
    /// Not active, or draining.
    Off,
}

/// The single entry of CONTROL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// A [`Policy`] as `u32`; an unknown value is treated as flow-hash.
    pub policy: u32,
    /// How many workers (slots 0..workers) the program picks from; at most [`MAX_WORKERS`].
    pub workers: u32,
    /// The supervisor generation that wrote this (for upgrades; the program ignores it).
    pub generation: u32,
}

/// Indices into COUNTERS (a per-CPU array of `u64`; userspace sums the CPUs).
pub mod counter {
    use crate::MAX_WORKERS;

    /// `DECISIONS + i`: connections the program steered to worker `i`.
    pub const DECISIONS: u32 = 0;
    /// SK_DROP: every worker that could take connections was at its limit.
    pub const DROPS_ALL_FULL: u32 = MAX_WORKERS;
    /// SK_DROP: no worker is active (none configured, all draining or stopped).
    pub const DROPS_NO_WORKER: u32 = MAX_WORKERS + 1;
    /// SK_PASS without a selection: `bpf_sk_select_reuseport` failed (an empty slot, or a
    /// socket of another group), so the kernel picked by its own hash.
    pub const SELECT_FAILED: u32 = MAX_WORKERS + 2;
    /// SK_DROP: the client already had `max_connections_per_ip` connections open.
    pub const DROPS_PER_IP_CONNECTIONS: u32 = MAX_WORKERS + 3;
    /// SK_DROP: the client opened connections faster than `max_connection_rate_per_ip`.
    pub const DROPS_PER_IP_RATE: u32 = MAX_WORKERS + 4;
    /// The counters of an lbd before per-client limits (its COUNTERS map is this long).
    pub const LEN_WITHOUT_PER_IP: u32 = MAX_WORKERS + 3;
    /// The number of counters.
    pub const LEN: u32 = MAX_WORKERS + 5;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_what_the_map_and_the_mmap_view_assume() {
        assert_eq!(core::mem::size_of::<WorkerState>(), WorkerState::SIZE);
        assert_eq!(
            core::mem::offset_of!(WorkerState, live),
            WorkerState::LIVE_OFFSET
        );
        assert_eq!(core::mem::size_of::<Control>(), 12);
    }

    #[test]
    fn eligibility_follows_flags_and_limit() {
        assert_eq!(WorkerState::default().eligibility(), Eligibility::Off);
        assert_eq!(
            WorkerState::active(0).with_live(1_000_000).eligibility(),
            Eligibility::Takes
        );
        assert_eq!(
            WorkerState::active(2).with_live(1).eligibility(),
            Eligibility::Takes
        );
        assert_eq!(
            WorkerState::active(2).with_live(2).eligibility(),
            Eligibility::Full
        );
        assert_eq!(
            WorkerState::active(2).draining().eligibility(),
            Eligibility::Off
        );
    }

    #[test]
    fn policy_round_trips() {
        for policy in [
            Policy::FlowHash,
            Policy::LeastConnections,
            Policy::PowerOfTwo,
        ] {
            assert_eq!(Policy::from_u32(policy.as_u32()), Some(policy));
        }
        assert_eq!(Policy::from_u32(3), None);
    }
}
