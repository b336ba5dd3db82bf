//! Load balancing: which backend of a cluster gets the next request.
//!
//! Policies: smooth weighted round-robin (as nginx's), weighted random, least connections
//! (active requests divided by weight), power of two choices (two weighted random picks, the
//! less loaded wins) and Maglev consistent hashing of a key (`maglev.rs`; the key is the
//! cluster's `hash_key`, the client's address by default). Backup backends are used only when no other backend can be tried. A
//! backend already tried for this request is excluded, so a connect failure retries elsewhere.
//!
//! Health: a backend that the supervisor's active checks found down (`down`), or that this
//! worker ejected after consecutive failures (passive ejection, clusters with a
//! `health_check` only: `fall` connect errors, 5xx answers, 502s or response timeouts in a
//! row, as the sessions report them), is not picked. An
//! ejected backend comes back after a back-off (the check interval, doubled at each ejection
//! in a row, at most 32 times); one more failure then ejects it again, a success resets it.

use lb_config::{Cluster, LoadBalancing};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A small, fast, non-cryptographic generator (xorshift64*), seeded per worker.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[derive(Debug, Clone)]
pub struct BackendState {
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    /// Requests this worker has in flight to the backend.
    pub active: u32,
    /// Gets no new requests.
    pub draining: bool,
    /// The active health check says it is down (set by the supervisor).
    pub down: bool,
    /// Consecutive failures (connect errors, 5xx) seen by this worker.
    failures: u32,
    /// Ejected by this worker until then (passive health).
    ejected_until: Option<Instant>,
    /// Ejections in a row (the back-off doubles with each).
    ejections: u32,
    current_weight: i64,
}

impl BackendState {
    /// May get new requests.
    pub fn available(&self) -> bool {
        !self.draining && !self.down && self.ejected_until.is_none()
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Keeps what this worker learned about the backend's health across a reconfiguration.
    pub fn carry_health(&mut self, old: &BackendState) {
        self.down = old.down;
        self.failures = old.failures;
        self.ejected_until = old.ejected_until;
        self.ejections = old.ejections;
    }
}

/// Passive ejection settings of a cluster (from its `health_check`).
#[derive(Debug, Clone, Copy)]
pub struct Passive {
    /// Consecutive failures that eject a backend.
    pub threshold: u32,
    /// The first back-off.
    pub backoff: Duration,
}

/// The balancing state of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterState {
    pub name: String,
    pub policy: LoadBalancing,
    pub backends: Vec<BackendState>,
    /// None: no passive ejection (the cluster has no `health_check`).
    pub passive: Option<Passive>,
    /// The backends speak h2c (`http2 = true`).
    pub http2: bool,
    /// `backend_tls`: the client side of TLS to the backends (set by the worker, which holds
    /// the crypto provider and the system's roots).
    pub tls: Option<std::sync::Arc<crate::back_stream::BackendTls>>,
    /// Some backend is ejected (so [`ClusterState::revive`] has something to do).
    any_ejected: bool,
    /// `maglev`: the lookup tables of the primary backends and of the backups.
    maglev: Option<std::sync::Arc<[MaglevTable; 2]>>,
    /// `maglev`: what it hashes.
    pub hash_key: lb_config::HashKey,
}

/// A Maglev table over some of a cluster's backends: slot → position in `members` →
/// backend index.
#[derive(Debug, Default)]
struct MaglevTable {
    slots: Vec<u16>,
    members: Vec<usize>,
}

impl MaglevTable {
    fn over(cluster: &Cluster, backup: bool) -> MaglevTable {
        let members: Vec<usize> = cluster
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.backup == backup)
            .map(|(i, _)| i)
            .collect();
        let list: Vec<(String, u32)> = members
            .iter()
            .filter_map(|&i| cluster.backends.get(i))
            .map(|b| (b.address.to_string(), b.weight.max(1)))
            .collect();
        MaglevTable {
            slots: crate::maglev::build(&list),
            members,
        }
    }
}

/// Backends already tried for one request (bit i = backend i; clusters over 64 backends treat
/// the rest as never excluded, which only costs a possible second try of the same backend).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tried(u64);

impl Tried {
    pub fn insert(&mut self, i: usize) {
        if i < 64 {
            self.0 |= 1 << i;
        }
    }
    pub fn contains(self, i: usize) -> bool {
        i < 64 && self.0 & (1 << i) != 0
    }
    pub fn count(self) -> u32 {
        self.0.count_ones()
    }
}

impl ClusterState {
    pub fn new(cluster: &Cluster) -> ClusterState {
        ClusterState {
            name: cluster.name.clone(),
            policy: cluster.load_balancing,
            http2: cluster.http2,
            tls: None,
            backends: cluster
                .backends
                .iter()
                .map(|b| BackendState {
                    address: b.address,
                    weight: b.weight.max(1),
                    backup: b.backup,
                    active: 0,
                    draining: b.draining,
                    down: false,
                    failures: 0,
                    ejected_until: None,
                    ejections: 0,
                    current_weight: 0,
                })
                .collect(),
            passive: cluster.health_check.as_ref().map(|h| Passive {
                threshold: h.fall.max(1),
                backoff: h.interval,
            }),
            any_ejected: false,
            maglev: (cluster.load_balancing == LoadBalancing::Maglev).then(|| {
                std::sync::Arc::new([
                    MaglevTable::over(cluster, false),
                    MaglevTable::over(cluster, true),
                ])
            }),
            hash_key: cluster.hash_key.clone(),
        }
    }

    /// Lets ejected backends whose back-off is over be tried again.
    pub fn revive(&mut self, now: Instant) {
        if !self.any_ejected {
            return;
        }
        let mut still = false;
        for b in &mut self.backends {
            match b.ejected_until {
                Some(until) if until <= now => {
                    log::info!(
                        "cluster {}: backend {} back in rotation after its back-off",
                        self.name,
                        b.address
                    );
                    b.ejected_until = None;
                }
                Some(_) => still = true,
                None => {}
            }
        }
        self.any_ejected = still;
    }

    /// A request to `backend` succeeded (`ok`) or failed (connect error, 5xx). Returns true
    /// when this failure ejects it.
    pub fn report(&mut self, backend: usize, ok: bool, now: Instant) -> bool {
        let Some(passive) = self.passive else {
            return false;
        };
        let Some(b) = self.backends.get_mut(backend) else {
            return false;
        };
        if ok {
            b.failures = 0;
            b.ejections = 0;
            return false;
        }
        b.failures = b.failures.saturating_add(1);
        if b.failures < passive.threshold || b.ejected_until.is_some() {
            return false;
        }
        let backoff = passive.backoff.saturating_mul(1 << b.ejections.min(5));
        b.ejections = b.ejections.saturating_add(1);
        // Back from this ejection, one more failure ejects it again.
        b.failures = passive.threshold.saturating_sub(1);
        b.ejected_until = Some(now + backoff);
        self.any_ejected = true;
        log::warn!(
            "cluster {}: backend {} ejected for {} after {} consecutive failures",
            self.name,
            b.address,
            humantime::format_duration(backoff),
            passive.threshold
        );
        true
    }

    /// Marks the backends the active health checks found down (by address); the others up.
    pub fn set_down(&mut self, down: &[SocketAddr]) {
        for b in &mut self.backends {
            b.down = down.contains(&b.address);
        }
    }

    /// The next backend, skipping those in `tried`; None when none is left.
    pub fn pick(&mut self, tried: Tried, rng: &mut Rng) -> Option<usize> {
        self.pick_keyed(tried, rng, 0)
    }

    /// [`ClusterState::pick`], with the request's key for a `maglev` cluster (see
    /// [`ClusterState::hash_key`]).
    pub fn pick_keyed(&mut self, tried: Tried, rng: &mut Rng, key: u64) -> Option<usize> {
        if let Some(tables) = self.maglev.clone() {
            return tables
                .iter()
                .find_map(|table| self.maglev_lookup(table, tried, key));
        }
        let primary = self.pick_among(false, tried, rng);
        primary.or_else(|| self.pick_among(true, tried, rng))
    }

    fn maglev_lookup(&self, table: &MaglevTable, tried: Tried, key: u64) -> Option<usize> {
        let usable = |i: usize| {
            !tried.contains(i) && self.backends.get(i).is_some_and(BackendState::available)
        };
        if !table.members.iter().any(|&i| usable(i)) {
            return None;
        }
        crate::maglev::lookup(&table.slots, key, |m| {
            table.members.get(m).is_some_and(|&i| usable(i))
        })
        .and_then(|m| table.members.get(m).copied())
    }

    fn candidates(&self, backup: bool, tried: Tried) -> impl Iterator<Item = usize> + '_ {
        self.backends
            .iter()
            .enumerate()
            .filter(move |(i, b)| b.backup == backup && b.available() && !tried.contains(*i))
            .map(|(i, _)| i)
    }

    fn pick_among(&mut self, backup: bool, tried: Tried, rng: &mut Rng) -> Option<usize> {
        match self.policy {
            LoadBalancing::RoundRobin => self.smooth_round_robin(backup, tried),
            LoadBalancing::Random => self.weighted_random(backup, tried, rng),
            LoadBalancing::LeastConnections => self.least_loaded(self.candidates(backup, tried)),
            // Handled by `pick_keyed` (a table per cluster); as random if it has none.
            LoadBalancing::Maglev => self.weighted_random(backup, tried, rng),
            LoadBalancing::PowerOfTwo => {
                let a = self.weighted_random(backup, tried, rng)?;
                let b = self.weighted_random(backup, tried, rng)?;
                self.least_loaded([a, b].into_iter())
            }
        }
    }

    /// nginx's smooth weighted round-robin: every candidate gains its weight, the largest wins
    /// and pays back the total. Spreads a 5:1:1 weighting as a b a c a a a, not a a a a a b c.
    fn smooth_round_robin(&mut self, backup: bool, tried: Tried) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        let mut best_weight = i64::MIN;
        for (i, b) in self.backends.iter_mut().enumerate() {
            if b.backup != backup || !b.available() || tried.contains(i) {
                continue;
            }
            b.current_weight += i64::from(b.weight);
            total += i64::from(b.weight);
            if b.current_weight > best_weight {
                best_weight = b.current_weight;
                best = Some(i);
            }
        }
        let chosen = self.backends.get_mut(best?)?;
        chosen.current_weight -= total;
        best
    }

    fn weighted_random(&self, backup: bool, tried: Tried, rng: &mut Rng) -> Option<usize> {
        let total: u64 = self
            .candidates(backup, tried)
            .filter_map(|i| self.backends.get(i))
            .map(|b| u64::from(b.weight))
            .sum();
        if total == 0 {
            return None;
        }
        let mut point = rng.below(total);
        for i in self.candidates(backup, tried) {
            let w = self.backends.get(i).map_or(0, |b| u64::from(b.weight));
            if point < w {
                return Some(i);
            }
            point -= w;
        }
        None
    }

    /// The candidate with the fewest active requests per unit of weight (ties: first).
    fn least_loaded(&self, candidates: impl Iterator<Item = usize>) -> Option<usize> {
        candidates
            .filter_map(|i| self.backends.get(i).map(|b| (i, b)))
            // compare active/weight without division: a.active * b.weight < b.active * a.weight
            .min_by(|(_, a), (_, b)| {
                (u64::from(a.active) * u64::from(b.weight))
                    .cmp(&(u64::from(b.active) * u64::from(a.weight)))
            })
            .map(|(i, _)| i)
    }

    pub fn acquire(&mut self, backend: usize) {
        if let Some(b) = self.backends.get_mut(backend) {
            b.active += 1;
        }
    }

    pub fn release(&mut self, backend: usize) {
        if let Some(b) = self.backends.get_mut(backend) {
            b.active = b.active.saturating_sub(1);
        }
    }

    pub fn address(&self, backend: usize) -> Option<SocketAddr> {
        self.backends.get(backend).map(|b| b.address)
    }
}

/// After a configuration change: the position in `new` of the cluster at `cluster` in `old`,
/// by name; `None` when it was removed.
pub fn remap_cluster(old: &[ClusterState], new: &[ClusterState], cluster: usize) -> Option<usize> {
    old.get(cluster)
        .and_then(|oc| new.iter().position(|nc| nc.name == oc.name))
}

/// After a configuration change: the positions in `new` of a connection's cluster and backend
/// (by cluster name and backend address), or `usize::MAX` for both when either was removed
/// (the connection goes on; it no longer counts for balancing).
pub fn remap_backend(
    old: &[ClusterState],
    new: &[ClusterState],
    cluster: usize,
    address: SocketAddr,
) -> (usize, usize) {
    remap_cluster(old, new, cluster)
        .and_then(|c| {
            new.get(c)
                .and_then(|nc| nc.backends.iter().position(|b| b.address == address))
                .map(|b| (c, b))
        })
        .unwrap_or((usize::MAX, usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_config::{Backend, ClusterProtocol};

    fn cluster(policy: LoadBalancing, weights: &[(u32, bool)]) -> ClusterState {
        ClusterState::new(&Cluster {
            name: "c".into(),
            protocol: ClusterProtocol::Http,
            load_balancing: policy,
            frontends: vec![],
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &(weight, backup))| Backend {
                    address: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    weight,
                    backup,
                    draining: false,
                })
                .collect(),
            health_check: None,
            send_proxy: false,
            http2: false,
            backend_tls: None,
            hash_key: lb_config::HashKey::SourceIp,
        })
    }

    fn counts(c: &mut ClusterState, n: usize) -> Vec<usize> {
        let mut rng = Rng::new(7);
        let mut out = vec![0; c.backends.len()];
        for _ in 0..n {
            out[c.pick(Tried::default(), &mut rng).unwrap()] += 1;
        }
        out
    }

    #[test]
    fn round_robin_is_weighted_and_smooth() {
        let mut c = cluster(LoadBalancing::RoundRobin, &[(1, false), (2, false)]);
        assert_eq!(counts(&mut c, 300), vec![100, 200]);
        let mut c = cluster(
            LoadBalancing::RoundRobin,
            &[(5, false), (1, false), (1, false)],
        );
        let mut rng = Rng::new(1);
        let seq: Vec<usize> = (0..7)
            .map(|_| c.pick(Tried::default(), &mut rng).unwrap())
            .collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn random_follows_weights() {
        let mut c = cluster(LoadBalancing::Random, &[(1, false), (3, false)]);
        let got = counts(&mut c, 40_000);
        assert!((9_000..11_000).contains(&got[0]), "{got:?}");
    }

    #[test]
    fn least_connections_prefers_idle() {
        let mut c = cluster(LoadBalancing::LeastConnections, &[(1, false), (1, false)]);
        let mut rng = Rng::new(3);
        c.acquire(0);
        assert_eq!(c.pick(Tried::default(), &mut rng), Some(1));
        c.acquire(1);
        c.acquire(1);
        assert_eq!(c.pick(Tried::default(), &mut rng), Some(0));
    }

    #[test]
    fn power_of_two_avoids_the_loaded_backend() {
        let mut c = cluster(
            LoadBalancing::PowerOfTwo,
            &[(1, false), (1, false), (1, false)],
        );
        for _ in 0..50 {
            c.acquire(0);
        }
        let got = counts(&mut c, 3000);
        // backend 0 wins only when both picks land on it: about 1/9 of the time.
        assert!(got[0] < 500, "{got:?}");
    }

    #[test]
    fn retries_skip_tried_then_use_backup() {
        let mut c = cluster(
            LoadBalancing::RoundRobin,
            &[(1, false), (1, false), (1, true)],
        );
        let mut rng = Rng::new(3);
        let mut tried = Tried::default();
        let a = c.pick(tried, &mut rng).unwrap();
        tried.insert(a);
        let b = c.pick(tried, &mut rng).unwrap();
        assert_ne!(a, b);
        tried.insert(b);
        assert_eq!(c.pick(tried, &mut rng), Some(2));
        tried.insert(2);
        assert_eq!(c.pick(tried, &mut rng), None);
    }

    #[test]
    fn down_backends_are_skipped_and_none_left_means_none() {
        let mut c = cluster(LoadBalancing::RoundRobin, &[(1, false), (1, false)]);
        let down = c.backends[0].address;
        c.set_down(&[down]);
        assert_eq!(counts(&mut c, 10), vec![0, 10]);
        let other = c.backends[1].address;
        c.set_down(&[down, other]);
        assert_eq!(c.pick(Tried::default(), &mut Rng::new(1)), None);
        c.set_down(&[]);
        assert_eq!(counts(&mut c, 10), vec![5, 5]);
    }

    #[test]
    fn passive_ejection_backs_off_and_doubles() {
        let mut c = cluster(LoadBalancing::RoundRobin, &[(1, false), (1, false)]);
        assert!(
            !c.report(0, false, Instant::now()),
            "no health_check: never ejected"
        );
        c.passive = Some(Passive {
            threshold: 2,
            backoff: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        assert!(!c.report(0, false, t0));
        assert!(!c.report(0, true, t0), "a success resets the count");
        assert!(!c.report(0, false, t0));
        assert!(c.report(0, false, t0), "second failure in a row ejects");
        assert_eq!(counts(&mut c, 4), vec![0, 4]);
        c.revive(t0 + Duration::from_millis(999));
        assert!(c.backends[0].is_ejected());
        c.revive(t0 + Duration::from_secs(1));
        assert!(!c.backends[0].is_ejected());
        // One more failure ejects it again, for twice as long.
        let t1 = t0 + Duration::from_secs(1);
        assert!(c.report(0, false, t1));
        c.revive(t1 + Duration::from_millis(1999));
        assert!(c.backends[0].is_ejected());
        c.revive(t1 + Duration::from_secs(2));
        assert!(c.backends[0].available());
        assert!(!c.report(0, true, t1));
        assert!(!c.report(0, false, t1), "reset: the threshold counts again");
    }
}
