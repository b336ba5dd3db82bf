//! Load balancing: which backend of a cluster gets the next request.
//!
//! Policies: smooth weighted round-robin (as nginx's), weighted random, least connections
//! (active requests divided by weight) and power of two choices (two weighted random picks, the
//! less loaded wins). Backup backends are used only when no other backend can be tried. A
//! backend already tried for this request is excluded, so a connect failure retries elsewhere.

use lb_config::{Cluster, LoadBalancing};
use std::net::SocketAddr;

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
    current_weight: i64,
}

/// The balancing state of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterState {
    pub name: String,
    pub policy: LoadBalancing,
    pub backends: Vec<BackendState>,
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
            backends: cluster
                .backends
                .iter()
                .map(|b| BackendState {
                    address: b.address,
                    weight: b.weight.max(1),
                    backup: b.backup,
                    active: 0,
                    draining: b.draining,
                    current_weight: 0,
                })
                .collect(),
        }
    }

    /// The next backend, skipping those in `tried`; None when none is left.
    pub fn pick(&mut self, tried: Tried, rng: &mut Rng) -> Option<usize> {
        let primary = self.pick_among(false, tried, rng);
        primary.or_else(|| self.pick_among(true, tried, rng))
    }

    fn candidates(&self, backup: bool, tried: Tried) -> impl Iterator<Item = usize> + '_ {
        self.backends
            .iter()
            .enumerate()
            .filter(move |(i, b)| b.backup == backup && !b.draining && !tried.contains(*i))
            .map(|(i, _)| i)
    }

    fn pick_among(&mut self, backup: bool, tried: Tried, rng: &mut Rng) -> Option<usize> {
        match self.policy {
            LoadBalancing::RoundRobin => self.smooth_round_robin(backup, tried),
            LoadBalancing::Random => self.weighted_random(backup, tried, rng),
            LoadBalancing::LeastConnections => self.least_loaded(self.candidates(backup, tried)),
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
            if b.backup != backup || b.draining || tried.contains(i) {
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
}
