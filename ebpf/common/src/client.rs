//! Per-client limits: what the steering program, the `track` program and lbd agree on.
//!
//! A listener may cap each client's open connections (`max_connections_per_ip`) and the rate
//! at which it opens them (`max_connection_rate_per_ip`). Both are enforced by the
//! `sk_reuseport` program at the SYN, before any worker sees the connection: over a limit it
//! returns SK_DROP and the client gets a reset. Open connections are counted by a second
//! program, `track` (`sock_ops`, attached to lbd's cgroup), which adds one when a connection
//! to the listener is established and takes it off when that connection closes, both in the
//! kernel: a connection counts from its handshake's last ACK to its close, whether or not a
//! worker has accepted it yet, and nothing in user space has to report a close.
//!
//! The limits of one listener sit in LIMITS ([`Limits`]); the counts in CONNS and the rate
//! state in RATES, both LRU hashes keyed by the client's address ([`ClientKey`]). The rate is
//! a generic cell rate algorithm ([`admit`]): one `u64` per client, no division in the
//! kernel.

use core::net::IpAddr;

/// A client's address as a map key: an IPv6 address as it is, an IPv4 one as `::ffff:a.b.c.d`.
/// Each word holds four bytes of the address in network order, as they sit in the packet (and
/// in `bpf_sock_ops.remote_ip4`/`remote_ip6`), so the kernel programs copy words and never
/// swap bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The sixteen bytes of the address, four per word, in memory order.
    pub words: [u32; 4],
}

/// The third word of an IPv4-mapped IPv6 address: bytes 0, 0, 0xff, 0xff.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl ClientKey {
    /// An IPv4 address from its four bytes as one word read from packet memory.
    pub const fn v4(word: u32) -> Self {
        Self {
            words: [0, 0, V4_MAPPED, word],
        }
    }

    /// An IPv6 address from its four words read from packet memory.
    pub const fn v6(words: [u32; 4]) -> Self {
        Self { words }
    }

    /// The key of `ip` (what lbd and the tests compute for an address).
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::v4(u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(v6) => {
                let [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p] = v6.octets();
                Self::v6([
                    u32::from_ne_bytes([a, b, c, d]),
                    u32::from_ne_bytes([e, f, g, h]),
                    u32::from_ne_bytes([i, j, k, l]),
                    u32::from_ne_bytes([m, n, o, p]),
                ])
            }
        }
    }
}

/// The single entry of LIMITS: one listener's per-client limits, and how `track` recognises
/// that listener's connections among every TCP socket of lbd's cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// The most connections one client may have open; 0 = no limit (and no counting).
    pub max_connections: u32,
    /// The listener's port, in host order (`bpf_sock_ops.local_port`'s order).
    pub port: u32,
    /// The listener's network namespace (SO_NETNS_COOKIE, `bpf_get_netns_cookie`).
    pub netns_cookie: u64,
    /// The listener's address, unless it is bound to any address (`bind_any`).
    pub local: ClientKey,
    /// 1: the listener is bound to 0.0.0.0 or ::, so any local address is its.
    pub bind_any: u32,
    /// Keeps the layout free of padding.
    pub reserved: u32,
    /// Nanoseconds between two connections at the steady rate; 0 = no rate limit.
    pub rate_interval_ns: u64,
    /// How far ahead of the steady rate a client may run (the burst, as time).
    pub rate_tolerance_ns: u64,
}

impl Limits {
    /// The byte size of the entry.
    pub const SIZE: usize = 56;

    /// A rate of `per_second` connections per second with a burst of as many: the interval
    /// and tolerance [`admit`] takes. 0 turns the rate limit off.
    pub const fn rate(per_second: u32) -> (u64, u64) {
        if per_second == 0 {
            return (0, 0);
        }
        let interval = 1_000_000_000 / per_second as u64;
        (interval, interval * (per_second as u64 - 1))
    }
}

/// Generic cell rate algorithm. `tat` is the client's theoretical arrival time (0 for a
/// client not seen yet), `now` the time of this connection (monotonic ns, never 0). A client
/// that keeps to one connection per `interval` is always admitted, and one may run ahead of
/// that by `tolerance` (a burst of `tolerance / interval + 1` connections at once). Returns
/// the client's new `tat` if the connection is admitted, 0 if it is refused (an admitted
/// `tat` is never 0, since it is at least `now + interval`).
#[inline(always)]
pub const fn admit(tat: u64, now: u64, interval: u64, tolerance: u64) -> u64 {
    let start = if tat > now { tat } else { now };
    if start - now > tolerance {
        return 0;
    }
    start.saturating_add(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_what_the_map_holds() {
        assert_eq!(core::mem::size_of::<Limits>(), Limits::SIZE);
        assert_eq!(core::mem::size_of::<ClientKey>(), 16);
    }

    #[test]
    fn v4_keys_are_mapped_v6_keys() {
        let v4: IpAddr = "10.1.2.3"
            .parse()
            .unwrap_or(IpAddr::V4(core::net::Ipv4Addr::LOCALHOST));
        let mapped: IpAddr = "::ffff:10.1.2.3"
            .parse()
            .unwrap_or(IpAddr::V4(core::net::Ipv4Addr::LOCALHOST));
        assert_eq!(ClientKey::of(v4), ClientKey::of(mapped));
        assert_eq!(
            ClientKey::of(v4).words[3],
            u32::from_ne_bytes([10, 1, 2, 3])
        );
    }

    #[test]
    fn a_burst_of_the_rate_is_admitted_then_one_per_interval() {
        let (interval, tolerance) = Limits::rate(5);
        assert_eq!(interval, 200_000_000);
        let now = 1_000_000_000;
        let mut tat = 0;
        for _ in 0..5 {
            tat = admit(tat, now, interval, tolerance);
            assert_ne!(tat, 0);
        }
        assert_eq!(admit(tat, now, interval, tolerance), 0, "the sixth at once");
        assert_eq!(admit(tat, now + interval - 1, interval, tolerance), 0);
        let later = admit(tat, now + interval, interval, tolerance);
        assert_ne!(later, 0, "one interval later, one more");
        assert_eq!(admit(later, now + interval, interval, tolerance), 0);
        // Idle for long: the whole burst again.
        let mut tat = later;
        for _ in 0..5 {
            tat = admit(tat, now + 10 * 1_000_000_000, interval, tolerance);
            assert_ne!(tat, 0);
        }
    }

    #[test]
    fn a_rate_of_one_has_no_burst() {
        let (interval, tolerance) = Limits::rate(1);
        assert_eq!(tolerance, 0);
        let tat = admit(0, 5, interval, tolerance);
        assert_eq!(admit(tat, 6, interval, tolerance), 0);
        assert_eq!(Limits::rate(0), (0, 0));
    }
}
