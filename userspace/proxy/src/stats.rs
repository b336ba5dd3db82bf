//! The worker's own figures: per listener, cluster and backend counters and histograms, kept
//! as plain integers by the single-threaded event loop (no atomics, no locks, no allocation
//! per request once a key has been seen).
//!
//! Sessions report what happened (a request ended, a connect failed, a TLS handshake ended);
//! [`Stats::samples`] turns everything into Prometheus-named samples when the supervisor asks
//! for them over the worker's channel. Summing the samples of every worker, key by key, gives
//! the process-wide figures: counters and histogram buckets add up, which is why histograms
//! are fixed-bucket here. Rendering the text format and serving it belong to lbd.

use crate::accesslog::Record;
use lb_config::protocol::Sample;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::time::Duration;

/// A fast multiplicative hasher (FxHash's) for the maps below, looked up several times per
/// request: their keys are cluster names and addresses from the configuration, not client
/// input, so they need no protection against chosen collisions.
#[derive(Default)]
pub struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let word = chunk
                .iter()
                .enumerate()
                .fold(0u64, |w, (i, b)| w | u64::from(*b) << (8 * i));
            self.add(word);
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Upper bounds of the histogram buckets, in seconds (Prometheus' defaults, from 1 ms).
pub const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of durations. `counts[i]` holds the observations in bucket `i`
/// only (not cumulative); the last slot holds those above every bound.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        // The first bucket whose bound is at least `secs` (BUCKETS.len(): none).
        let slot = BUCKETS.partition_point(|&b| b < secs);
        if let Some(c) = self.counts.get_mut(slot) {
            *c += 1;
        }
        self.sum += secs;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `_bucket` (cumulative, `le` label), `_sum` and `_count` samples.
    fn push(&self, out: &mut Vec<Sample>, name: &str, labels: &[(&str, &str)]) {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count;
            let le = match BUCKETS.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_string(),
            };
            let mut l = labels.to_vec();
            l.push(("le", &le));
            out.push(sample(&format!("{name}_bucket"), &l, cumulative as f64));
        }
        out.push(sample(&format!("{name}_sum"), labels, self.sum));
        out.push(sample(&format!("{name}_count"), labels, self.count as f64));
    }
}

/// What requests did at one level (listener, cluster or backend).
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// Requests by status class: index 1 to 5 for 1xx to 5xx, 0 for anything else.
    pub requests: [u64; 6],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Histogram,
}

impl Traffic {
    fn record(&mut self, r: &Record<'_>, http: bool) {
        if http {
            let class = usize::from(r.status / 100);
            let slot = if (1..=5).contains(&class) { class } else { 0 };
            if let Some(c) = self.requests.get_mut(slot) {
                *c += 1;
            }
            self.duration.observe(r.duration);
        }
        self.bytes_in += r.bytes_in;
        self.bytes_out += r.bytes_out;
    }

    fn push(&self, out: &mut Vec<Sample>, level: &str, labels: &[(&str, &str)]) {
        for (slot, count) in self.requests.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            let class = match slot {
                1..=5 => format!("{slot}xx"),
                _ => "other".to_string(),
            };
            let mut l = labels.to_vec();
            l.push(("class", &class));
            out.push(sample(
                &format!("kakehi_{level}_requests_total"),
                &l,
                *count as f64,
            ));
        }
        out.push(sample(
            &format!("kakehi_{level}_received_bytes_total"),
            labels,
            self.bytes_in as f64,
        ));
        out.push(sample(
            &format!("kakehi_{level}_sent_bytes_total"),
            labels,
            self.bytes_out as f64,
        ));
        self.duration.push(
            out,
            &format!("kakehi_{level}_request_duration_seconds"),
            labels,
        );
    }
}

#[derive(Debug, Clone, Default)]
pub struct ListenerStats {
    pub traffic: Traffic,
    pub accepted: u64,
    pub closed: u64,
    pub tls_handshakes: u64,
    pub tls_failures: u64,
}

#[derive(Debug, Clone, Default)]
pub struct BackendStats {
    pub traffic: Traffic,
    /// From the backend connection being ready to the first response byte.
    pub response_time: Histogram,
    /// New connections opened to it (reused idle ones not counted).
    pub connections: u64,
    pub connect_errors: u64,
    /// Attempts that came to this backend after another one failed.
    pub retries: u64,
    /// Times this worker took it out of rotation after consecutive errors.
    pub ejections: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterStats {
    pub traffic: Traffic,
    pub connect_errors: u64,
    /// Requests answered 429 for a frontend's `rate_limit`.
    pub rate_limited: u64,
    pub retries: u64,
    pub backends: FastMap<SocketAddr, BackendStats>,
}

/// Every figure of one worker.
#[derive(Debug, Default)]
pub struct Stats {
    pub listeners: FastMap<SocketAddr, ListenerStats>,
    pub clusters: FastMap<String, ClusterStats>,
}

impl Stats {
    /// The cluster's figures, created on first use (the name is copied only then: this runs
    /// for every request). Never None in practice.
    fn cluster(&mut self, name: &str) -> Option<&mut ClusterStats> {
        if !self.clusters.contains_key(name) {
            self.clusters
                .insert(name.to_string(), ClusterStats::default());
        }
        self.clusters.get_mut(name)
    }

    /// One request (or, with `http` false, one TCP passthrough connection) ended.
    pub fn request(&mut self, r: &Record<'_>, http: bool) {
        self.listeners
            .entry(r.listener)
            .or_default()
            .traffic
            .record(r, http);
        if r.cluster.is_empty() {
            return;
        }
        let Some(cluster) = self.cluster(r.cluster) else {
            return;
        };
        cluster.traffic.record(r, http);
        if r.error == Some(crate::cut::Cut::RateLimited) {
            cluster.rate_limited += 1;
        }
        if let Some(address) = r.backend {
            let backend = cluster.backends.entry(address).or_default();
            backend.traffic.record(r, http);
            if let Some(t) = r.backend_time {
                backend.response_time.observe(t);
            }
        }
    }

    pub fn accepted(&mut self, listener: SocketAddr) {
        self.listeners.entry(listener).or_default().accepted += 1;
    }

    pub fn closed(&mut self, listener: SocketAddr) {
        self.listeners.entry(listener).or_default().closed += 1;
    }

    /// A TLS handshake on `listener` ended, well or not.
    pub fn tls_handshake(&mut self, listener: SocketAddr, ok: bool) {
        let l = self.listeners.entry(listener).or_default();
        if ok {
            l.tls_handshakes += 1;
        } else {
            l.tls_failures += 1;
        }
    }

    /// A connection to a backend was attempted: `retry` when another backend failed before
    /// for the same request, `new` when it is a fresh connection (not an idle one reused).
    pub fn attempt(&mut self, cluster: &str, address: SocketAddr, retry: bool, new: bool) {
        let Some(c) = self.cluster(cluster) else {
            return;
        };
        if retry {
            c.retries += 1;
        }
        let b = c.backends.entry(address).or_default();
        if retry {
            b.retries += 1;
        }
        if new {
            b.connections += 1;
        }
    }

    pub fn connect_error(&mut self, cluster: &str, address: SocketAddr) {
        let Some(c) = self.cluster(cluster) else {
            return;
        };
        c.connect_errors += 1;
        c.backends.entry(address).or_default().connect_errors += 1;
    }

    pub fn ejected(&mut self, cluster: &str, address: SocketAddr) {
        if let Some(c) = self.cluster(cluster) {
            c.backends.entry(address).or_default().ejections += 1;
        }
    }

    /// Forgets the clusters and backends that are no longer configured.
    pub fn retain(&mut self, clusters: &[crate::balancer::ClusterState]) {
        self.clusters.retain(|name, stats| {
            let Some(c) = clusters.iter().find(|c| &c.name == name) else {
                return false;
            };
            stats
                .backends
                .retain(|a, _| c.backends.iter().any(|b| b.address == *a));
            true
        });
    }

    /// Every figure as samples. `live` and `buffers` (in use, limit) are the worker's gauges;
    /// the backends' in-flight requests come from the balancers.
    pub fn samples(
        &self,
        clusters: &[crate::balancer::ClusterState],
        live: usize,
        buffers: (usize, usize),
    ) -> Vec<Sample> {
        let mut out = Vec::new();
        out.push(sample("kakehi_worker_connections", &[], live as f64));
        out.push(sample(
            "kakehi_worker_buffers_in_use",
            &[],
            buffers.0 as f64,
        ));
        out.push(sample("kakehi_worker_buffers_max", &[], buffers.1 as f64));
        let listeners: BTreeMap<String, &ListenerStats> = self
            .listeners
            .iter()
            .map(|(a, s)| (a.to_string(), s))
            .collect();
        for (address, l) in &listeners {
            let labels = [("listener", address.as_str())];
            l.traffic.push(&mut out, "listener", &labels);
            let n = |name: &str, v: u64| sample(name, &labels, v as f64);
            out.push(n("kakehi_listener_connections_total", l.accepted));
            out.push(n(
                "kakehi_listener_connections_active",
                l.accepted.saturating_sub(l.closed),
            ));
            out.push(n("kakehi_listener_tls_handshakes_total", l.tls_handshakes));
            out.push(n(
                "kakehi_listener_tls_handshake_failures_total",
                l.tls_failures,
            ));
        }
        let mut names: Vec<&String> = self.clusters.keys().collect();
        names.sort();
        for name in names {
            let Some(c) = self.clusters.get(name) else {
                continue;
            };
            let labels = [("cluster", name.as_str())];
            c.traffic.push(&mut out, "cluster", &labels);
            out.push(sample(
                "kakehi_cluster_connect_errors_total",
                &labels,
                c.connect_errors as f64,
            ));
            out.push(sample(
                "kakehi_cluster_retries_total",
                &labels,
                c.retries as f64,
            ));
            out.push(sample(
                "kakehi_cluster_rate_limited_total",
                &labels,
                c.rate_limited as f64,
            ));
            let mut backends: Vec<(&SocketAddr, &BackendStats)> = c.backends.iter().collect();
            backends.sort_by_key(|(a, _)| **a);
            for (address, b) in backends {
                let address = address.to_string();
                let labels = [("cluster", name.as_str()), ("backend", address.as_str())];
                b.traffic.push(&mut out, "backend", &labels);
                b.response_time
                    .push(&mut out, "kakehi_backend_response_time_seconds", &labels);
                let n = |name: &str, v: u64| sample(name, &labels, v as f64);
                out.push(n("kakehi_backend_connections_total", b.connections));
                out.push(n("kakehi_backend_connect_errors_total", b.connect_errors));
                out.push(n("kakehi_backend_retries_total", b.retries));
                out.push(n("kakehi_backend_ejections_total", b.ejections));
            }
        }
        for c in clusters {
            for b in &c.backends {
                let address = b.address.to_string();
                let labels = [("cluster", c.name.as_str()), ("backend", address.as_str())];
                out.push(sample(
                    "kakehi_backend_active_requests",
                    &labels,
                    f64::from(b.active),
                ));
                out.push(sample(
                    "kakehi_backend_ejected",
                    &labels,
                    if b.is_ejected() { 1.0 } else { 0.0 },
                ));
            }
        }
        out
    }
}

impl crate::cx::Cx {
    /// A connection attempt to backend `backend` of cluster `cluster` (indexes into
    /// `self.clusters`) was made: the `attempt`-th for its request.
    pub fn note_attempt(&mut self, cluster: usize, address: SocketAddr, attempt: u32, new: bool) {
        if let Some(c) = self.clusters.get(cluster) {
            self.stats.attempt(&c.name, address, attempt > 1, new);
        }
    }

    /// The backend failed a request: a connect error (`connect`) or a 5xx answer. Counted,
    /// and reported to its cluster's passive health.
    pub fn backend_failed(&mut self, cluster: usize, backend: usize, connect: bool) {
        let now = self.now;
        let Some(c) = self.clusters.get_mut(cluster) else {
            return;
        };
        let Some(address) = c.address(backend) else {
            return;
        };
        if connect {
            self.stats.connect_error(&c.name, address);
        }
        if c.report(backend, false, now) {
            self.stats.ejected(&c.name, address);
        }
    }

    /// The backend served a request (or accepted a TCP connection) well.
    pub fn backend_ok(&mut self, cluster: usize, backend: usize) {
        let now = self.now;
        if let Some(c) = self.clusters.get_mut(cluster) {
            c.report(backend, true, now);
        }
    }
}

fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
    Sample {
        name: name.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(status: u16, cluster: &'a str, ms: u64) -> Record<'a> {
        Record {
            request_id: "x",
            client: "127.0.0.1:1".parse().unwrap(),
            listener: "127.0.0.1:80".parse().unwrap(),
            cluster,
            backend: Some("127.0.0.1:9001".parse().unwrap()),
            method: "GET",
            host: "h",
            path: "/",
            proto: "h1",
            status,
            bytes_in: 10,
            bytes_out: 100,
            duration: Duration::from_millis(ms),
            backend_time: Some(Duration::from_millis(ms)),
            error: None,
            client_cert: None,
        }
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn requests_are_counted_by_class_and_buckets_are_cumulative() {
        let mut stats = Stats::default();
        stats.request(&record(200, "app", 3), true);
        stats.request(&record(204, "app", 30), true);
        stats.request(&record(503, "app", 3000), true);
        stats.request(&record(404, "", 1), true);
        let s = stats.samples(&[], 2, (4, 100));
        let l = ("listener", "127.0.0.1:80");
        assert_eq!(
            value(&s, "kakehi_listener_requests_total", &[l, ("class", "2xx")]),
            Some(2.0)
        );
        assert_eq!(
            value(&s, "kakehi_listener_requests_total", &[l, ("class", "4xx")]),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "kakehi_cluster_requests_total", &[("class", "5xx")]),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "kakehi_listener_received_bytes_total", &[l]),
            Some(40.0)
        );
        let le = |b: &str| {
            value(
                &s,
                "kakehi_cluster_request_duration_seconds_bucket",
                &[("le", b)],
            )
        };
        assert_eq!(le("0.001"), Some(0.0));
        assert_eq!(le("0.005"), Some(1.0));
        assert_eq!(le("0.05"), Some(2.0));
        assert_eq!(le("2.5"), Some(2.0));
        assert_eq!(le("5"), Some(3.0));
        assert_eq!(le("+Inf"), Some(3.0));
        assert_eq!(
            value(&s, "kakehi_cluster_request_duration_seconds_count", &[]),
            Some(3.0)
        );
        assert_eq!(value(&s, "kakehi_worker_buffers_in_use", &[]), Some(4.0));
    }

    #[test]
    fn tcp_connections_count_bytes_but_no_requests() {
        let mut stats = Stats::default();
        stats.request(&record(0, "db", 5), false);
        let s = stats.samples(&[], 0, (0, 0));
        assert!(value(&s, "kakehi_cluster_requests_total", &[]).is_none());
        assert_eq!(
            value(&s, "kakehi_cluster_sent_bytes_total", &[("cluster", "db")]),
            Some(100.0)
        );
    }
}
