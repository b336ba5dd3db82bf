//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4), for `load_balancing = "maglev"`.
//!
//! The lookup table has [`M`] = 65,537 slots (a prime), each naming a backend. It is built from
//! the cluster's backend list alone (each backend's address as text and its weight), with a
//! hash fixed here ([`hash`]: FNV-1a then a 64-bit finalizer), so two lbd processes with the
//! same list build the same table on any machine: the same key reaches the same backend
//! whichever appliance takes the flow. Each backend walks its own permutation of the slots
//! (an offset and a skip from its name) and takes the next free one, in turns; a backend of
//! weight w takes w slots per turn, so slots follow weights. Removing one of N backends moves
//! about 1/N of the keys: the others keep nearly all their slots.
//!
//! A key whose slot names a backend that cannot take it now (down, draining, ejected,
//! already tried) goes to the next slot, and so on: deterministic on every appliance, and
//! the table is not rebuilt for a health change.

/// Slots in a table: the paper's prime, large enough that 100 backends are balanced within 1%.
pub const M: usize = 65_537;

/// FNV-1a over `bytes`, then a finalizer (from MurmurHash3's fmix64) so that near keys land
/// far apart. Stable across processes, machines and versions.
pub fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The key of a client address: its 16 bytes (IPv4 as mapped IPv6), hashed.
pub fn ip_key(ip: std::net::IpAddr) -> u64 {
    let v6 = match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    hash(0, &v6.octets())
}

/// The table of `backends` (name, weight ≥ 1), in list order: slot → index in the list.
/// Empty when the list is.
pub fn build(backends: &[(String, u32)]) -> Vec<u16> {
    if backends.is_empty() || backends.len() > usize::from(u16::MAX) {
        return Vec::new();
    }
    let m = M as u64;
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|(name, _)| {
            let offset = hash(1, name.as_bytes()) % m;
            let skip = hash(2, name.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut table = vec![u16::MAX; M];
    let mut filled = 0;
    while filled < M {
        for (i, ((_, weight), (offset, skip))) in backends.iter().zip(&perms).enumerate() {
            for _ in 0..(*weight).max(1) {
                if filled == M {
                    break;
                }
                // The backend's next slot in its permutation that is still free.
                let slot = loop {
                    let Some(n) = next.get_mut(i) else {
                        return Vec::new();
                    };
                    let c = ((offset + *skip * *n) % m) as usize;
                    *n += 1;
                    if table.get(c) == Some(&u16::MAX) {
                        break c;
                    }
                };
                if let Some(cell) = table.get_mut(slot) {
                    *cell = i as u16;
                }
                filled += 1;
            }
        }
    }
    table
}

/// The first backend from `key`'s slot on that `usable` accepts.
pub fn lookup(table: &[u16], key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
    if table.is_empty() {
        return None;
    }
    let start = (key % table.len() as u64) as usize;
    (0..table.len())
        .map(|step| (start + step) % table.len())
        .filter_map(|slot| table.get(slot).map(|&b| usize::from(b)))
        .find(|&b| usable(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("10.0.0.{}:8080", i + 1), 1))
            .collect()
    }

    fn counts(table: &[u16], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &b in table {
            c[usize::from(b)] += 1;
        }
        c
    }

    #[test]
    fn ten_backends_share_the_slots_within_one_percent() {
        let table = build(&names(10));
        assert_eq!(table.len(), M);
        let c = counts(&table, 10);
        let ideal = M as f64 / 10.0;
        let worst = c
            .iter()
            .map(|&n| (n as f64 - ideal).abs() / ideal)
            .fold(0.0, f64::max);
        eprintln!("10 backends: slots {c:?}, worst {:.3}% off", worst * 100.0);
        assert!(worst <= 0.01, "{c:?}");
    }

    #[test]
    fn weights_are_honoured() {
        let mut list = names(3);
        list[0].1 = 2;
        let c = counts(&build(&list), 3);
        let ratio = c[0] as f64 / c[1] as f64;
        eprintln!("weights 2:1:1: slots {c:?}, ratio {ratio:.3}");
        assert!((1.98..=2.02).contains(&ratio), "{c:?}");
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth_of_the_keys() {
        for n in [5usize, 10, 20] {
            let before = build(&names(n));
            // The last backend removed: the others keep their places in the list.
            let after = build(&names(n - 1));
            let keys = 100_000u64;
            let mut moved = 0;
            let mut moved_not_removed = 0;
            for k in 0..keys {
                let key = hash(7, &k.to_le_bytes());
                let a = lookup(&before, key, |_| true).unwrap();
                let b = lookup(&after, key, |_| true).unwrap();
                if a != b {
                    moved += 1;
                    if a != n - 1 {
                        moved_not_removed += 1;
                    }
                }
            }
            let share = moved as f64 / keys as f64;
            let extra = moved_not_removed as f64 / keys as f64;
            eprintln!(
                "{n} backends, one removed: {:.2}% of keys moved (1/N = {:.2}%), {:.2}% of keys moved between backends that stayed",
                share * 100.0,
                100.0 / n as f64,
                extra * 100.0
            );
            assert!(share >= 1.0 / n as f64 - 0.01, "{n}: {share}");
            assert!(share <= 1.0 / n as f64 + 0.02, "{n}: {share}");
        }
    }

    #[test]
    fn unusable_backends_are_skipped_to_the_next_slot() {
        let table = build(&names(4));
        let key = 12345;
        let first = lookup(&table, key, |_| true).unwrap();
        let second = lookup(&table, key, |b| b != first).unwrap();
        assert_ne!(first, second);
        // The same answer every time: no randomness.
        assert_eq!(lookup(&table, key, |b| b != first), Some(second));
        assert_eq!(lookup(&table, key, |_| false), None);
    }

    /// The first 12 slots of the table of 10.0.0.1:8080, 10.0.0.2:8080, 10.0.0.3:8080.
    const PINNED_SLOTS: [u16; 12] = [0, 2, 0, 0, 2, 1, 2, 1, 0, 0, 2, 0];

    #[test]
    fn the_table_and_hash_are_fixed() {
        // Another process, another machine: the same inputs, the same table. Pinned values
        // catch a change of hash that would split appliances of different versions.
        assert_eq!(build(&names(3)), build(&names(3)));
        assert_eq!(hash(0, b"kakehi"), hash(0, b"kakehi"));
        assert_eq!(
            ip_key("192.0.2.1".parse().unwrap()),
            ip_key("::ffff:192.0.2.1".parse().unwrap())
        );
        assert_eq!(hash(0, b""), 0xefd0_1f60_ba99_2926, "{:#x}", hash(0, b""));
        let first: Vec<u16> = build(&names(3)).into_iter().take(12).collect();
        eprintln!("first slots of 3 backends: {first:?}");
        assert_eq!(first, PINNED_SLOTS);
    }
}
