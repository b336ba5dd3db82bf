//! The worker's own figures: per listener, cluster and backend counters and histograms,
//! recorded through the `metrics` facade into the worker's [`Recorder`].
//!
//! Sessions report what happened (a request ended, a connect failed, a TLS handshake ended).
//! The handles for a listener, cluster or backend are registered the first time it is seen and
//! kept here, so a request costs a map lookup by key and an add per figure, no registration
//! and no allocation. [`Stats::samples`] asks the recorder for everything as Prometheus-named
//! samples when the supervisor asks over the worker's channel. Summing the samples of every
//! worker, key by key, gives the process-wide figures: counters and histogram buckets add up,
//! which is why histograms are fixed-bucket. Rendering the text format and serving it belong
//! to lbd.

use crate::accesslog::Record;
use crate::recorder::{Recorder, Writers};
use lb_config::protocol::Sample;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Label};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
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

/// The level a [`Traffic`] is kept at, which names its metrics.
#[derive(Debug, Clone, Copy)]
enum Level {
    Listener,
    Cluster,
    Backend,
}

impl Level {
    fn name(self, figure: &str) -> String {
        let level = match self {
            Level::Listener => "listener",
            Level::Cluster => "cluster",
            Level::Backend => "backend",
        };
        format!("kakehi_{level}_{figure}")
    }
}

/// What requests did at one level (listener, cluster or backend).
struct Traffic {
    level: Level,
    labels: Vec<Label>,
    /// Requests by status class: index 1 to 5 for 1xx to 5xx, 0 for anything else. Registered
    /// when the first request of the class ends (a class never seen is not exported).
    requests: [Option<Counter>; 6],
    bytes_in: Counter,
    bytes_out: Counter,
    duration: Histogram,
}

impl Traffic {
    fn new(recorder: &Recorder, level: Level, labels: Vec<Label>) -> Traffic {
        recorder.register(|| Traffic {
            level,
            requests: Default::default(),
            bytes_in: counter!(level.name("received_bytes_total"), labels.iter()),
            bytes_out: counter!(level.name("sent_bytes_total"), labels.iter()),
            duration: histogram!(level.name("request_duration_seconds"), labels.iter()),
            labels,
        })
    }

    fn record(&mut self, recorder: &Recorder, r: &Record<'_>, http: bool) {
        if http {
            let class = usize::from(r.status / 100);
            let slot = if (1..=5).contains(&class) { class } else { 0 };
            if let Some(c) = self.requests.get_mut(slot) {
                let c = c.get_or_insert_with(|| {
                    let class = match slot {
                        1..=5 => format!("{slot}xx"),
                        _ => "other".to_string(),
                    };
                    let mut labels = self.labels.clone();
                    labels.push(Label::new("class", class));
                    recorder.register(|| counter!(self.level.name("requests_total"), labels))
                });
                c.increment(1);
            }
            self.duration.record(r.duration.as_secs_f64());
        }
        self.bytes_in.increment(r.bytes_in);
        self.bytes_out.increment(r.bytes_out);
    }
}

fn labels(pairs: &[(&'static str, String)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(k, v)| Label::new(*k, v.clone()))
        .collect()
}

struct ListenerStats {
    traffic: Traffic,
    accepted: Counter,
    active: Gauge,
    tls_handshakes: Counter,
    tls_failures: Counter,
}

impl ListenerStats {
    fn new(recorder: &Recorder, address: SocketAddr) -> ListenerStats {
        let l = labels(&[("listener", address.to_string())]);
        recorder.register(|| ListenerStats {
            accepted: counter!("kakehi_listener_connections_total", l.iter()),
            active: gauge!("kakehi_listener_connections_active", l.iter()),
            tls_handshakes: counter!("kakehi_listener_tls_handshakes_total", l.iter()),
            tls_failures: counter!("kakehi_listener_tls_handshake_failures_total", l.iter()),
            traffic: Traffic::new(recorder, Level::Listener, l.clone()),
        })
    }
}

struct BackendStats {
    traffic: Traffic,
    /// From the backend connection being ready to the first response byte.
    response_time: Histogram,
    /// New connections opened to it (reused idle ones not counted).
    connections: Counter,
    connect_errors: Counter,
    /// Attempts that came to this backend after another one failed.
    retries: Counter,
    /// Times this worker took it out of rotation after consecutive errors.
    ejections: Counter,
}

impl BackendStats {
    fn new(recorder: &Recorder, cluster: &str, address: SocketAddr) -> BackendStats {
        let l = labels(&[
            ("cluster", cluster.to_string()),
            ("backend", address.to_string()),
        ]);
        recorder.register(|| BackendStats {
            response_time: histogram!("kakehi_backend_response_time_seconds", l.iter()),
            connections: counter!("kakehi_backend_connections_total", l.iter()),
            connect_errors: counter!("kakehi_backend_connect_errors_total", l.iter()),
            retries: counter!("kakehi_backend_retries_total", l.iter()),
            ejections: counter!("kakehi_backend_ejections_total", l.iter()),
            traffic: Traffic::new(recorder, Level::Backend, l.clone()),
        })
    }
}

struct ClusterStats {
    name: String,
    traffic: Traffic,
    connect_errors: Counter,
    /// Requests answered 429 for a frontend's `rate_limit`.
    rate_limited: Counter,
    retries: Counter,
    backends: FastMap<SocketAddr, BackendStats>,
}

impl ClusterStats {
    fn new(recorder: &Recorder, name: &str) -> ClusterStats {
        let l = labels(&[("cluster", name.to_string())]);
        recorder.register(|| ClusterStats {
            name: name.to_string(),
            connect_errors: counter!("kakehi_cluster_connect_errors_total", l.iter()),
            rate_limited: counter!("kakehi_cluster_rate_limited_total", l.iter()),
            retries: counter!("kakehi_cluster_retries_total", l.iter()),
            traffic: Traffic::new(recorder, Level::Cluster, l.clone()),
            backends: FastMap::default(),
        })
    }

    fn backend(&mut self, recorder: &Recorder, address: SocketAddr) -> &mut BackendStats {
        let name = &self.name;
        self.backends
            .entry(address)
            .or_insert_with(|| BackendStats::new(recorder, name, address))
    }
}

/// A configured backend's gauges, set from its balancer when the supervisor scrapes.
struct BackendGauges {
    active: Gauge,
    ejected: Gauge,
}

/// The worker's own figures: gauges set when the supervisor scrapes, and its loop's turns.
struct WorkerGauges {
    connections: Gauge,
    buffers_in_use: Gauge,
    buffers_max: Gauge,
    /// How long each turn of the event loop took, from the poll's return to the end of its
    /// work: every connection with something to do waited through the turn, so a long one is
    /// a stall all of them paid for.
    turns: Histogram,
}

/// Every figure of one worker.
pub struct Stats {
    recorder: Arc<Recorder>,
    listeners: FastMap<SocketAddr, ListenerStats>,
    clusters: FastMap<String, ClusterStats>,
    worker: WorkerGauges,
    backends: FastMap<(String, SocketAddr), BackendGauges>,
}

impl Default for Stats {
    fn default() -> Stats {
        let recorder = Recorder::new(Writers::One);
        let worker = recorder.register(|| WorkerGauges {
            connections: gauge!("kakehi_worker_connections"),
            buffers_in_use: gauge!("kakehi_worker_buffers_in_use"),
            buffers_max: gauge!("kakehi_worker_buffers_max"),
            turns: histogram!("kakehi_worker_loop_turn_seconds"),
        });
        Stats {
            recorder,
            listeners: FastMap::default(),
            clusters: FastMap::default(),
            worker,
            backends: FastMap::default(),
        }
    }
}

/// The cluster's figures, registered on first use (the name is copied only then: this runs
/// for every request). Never None in practice.
fn cluster<'a>(
    clusters: &'a mut FastMap<String, ClusterStats>,
    recorder: &Recorder,
    name: &str,
) -> Option<&'a mut ClusterStats> {
    if !clusters.contains_key(name) {
        clusters.insert(name.to_string(), ClusterStats::new(recorder, name));
    }
    clusters.get_mut(name)
}

fn listener<'a>(
    listeners: &'a mut FastMap<SocketAddr, ListenerStats>,
    recorder: &Recorder,
    address: SocketAddr,
) -> &'a mut ListenerStats {
    listeners
        .entry(address)
        .or_insert_with(|| ListenerStats::new(recorder, address))
}

impl Stats {
    /// One request (or, with `http` false, one TCP passthrough connection) ended.
    pub fn request(&mut self, r: &Record<'_>, http: bool) {
        let Stats {
            recorder,
            listeners,
            clusters,
            ..
        } = self;
        listener(listeners, recorder, r.listener)
            .traffic
            .record(recorder, r, http);
        if r.cluster.is_empty() {
            return;
        }
        let Some(cluster) = cluster(clusters, recorder, r.cluster) else {
            return;
        };
        cluster.traffic.record(recorder, r, http);
        if r.error == Some(crate::cut::Cut::RateLimited) {
            cluster.rate_limited.increment(1);
        }
        if let Some(address) = r.backend {
            let backend = cluster.backend(recorder, address);
            backend.traffic.record(recorder, r, http);
            if let Some(t) = r.backend_time {
                backend.response_time.record(t.as_secs_f64());
            }
        }
    }

    /// One turn of the worker's event loop took `took`.
    pub fn turn(&self, took: Duration) {
        self.worker.turns.record(took.as_secs_f64());
    }

    pub fn accepted(&mut self, address: SocketAddr) {
        let l = listener(&mut self.listeners, &self.recorder, address);
        l.accepted.increment(1);
        l.active.increment(1.0);
    }

    pub fn closed(&mut self, address: SocketAddr) {
        listener(&mut self.listeners, &self.recorder, address)
            .active
            .decrement(1.0);
    }

    /// A TLS handshake on `address` ended, well or not.
    pub fn tls_handshake(&mut self, address: SocketAddr, ok: bool) {
        let l = listener(&mut self.listeners, &self.recorder, address);
        if ok {
            l.tls_handshakes.increment(1);
        } else {
            l.tls_failures.increment(1);
        }
    }

    /// A connection to a backend was attempted: `retry` when another backend failed before
    /// for the same request, `new` when it is a fresh connection (not an idle one reused).
    pub fn attempt(&mut self, name: &str, address: SocketAddr, retry: bool, new: bool) {
        let Some(c) = cluster(&mut self.clusters, &self.recorder, name) else {
            return;
        };
        if retry {
            c.retries.increment(1);
        }
        let b = c.backend(&self.recorder, address);
        if retry {
            b.retries.increment(1);
        }
        if new {
            b.connections.increment(1);
        }
    }

    pub fn connect_error(&mut self, name: &str, address: SocketAddr) {
        let Some(c) = cluster(&mut self.clusters, &self.recorder, name) else {
            return;
        };
        c.connect_errors.increment(1);
        c.backend(&self.recorder, address)
            .connect_errors
            .increment(1);
    }

    pub fn ejected(&mut self, name: &str, address: SocketAddr) {
        if let Some(c) = cluster(&mut self.clusters, &self.recorder, name) {
            c.backend(&self.recorder, address).ejections.increment(1);
        }
    }

    /// Forgets the clusters and backends that are no longer configured: their handles are
    /// dropped, and the recorder leaves them out of the next scrape.
    pub fn retain(&mut self, clusters: &[crate::balancer::ClusterState]) {
        let configured = |name: &str, address: SocketAddr| {
            clusters
                .iter()
                .any(|c| c.name == name && c.backends.iter().any(|b| b.address == address))
        };
        self.clusters.retain(|name, stats| {
            if !clusters.iter().any(|c| &c.name == name) {
                return false;
            }
            stats.backends.retain(|a, _| configured(name, *a));
            true
        });
        self.backends.retain(|(name, a), _| configured(name, *a));
    }

    /// Every figure as samples. `live` and `buffers` (in use, limit) are the worker's gauges;
    /// the backends' in-flight requests come from the balancers.
    pub fn samples(
        &mut self,
        clusters: &[crate::balancer::ClusterState],
        live: usize,
        buffers: (usize, usize),
    ) -> Vec<Sample> {
        self.worker.connections.set(live as f64);
        self.worker.buffers_in_use.set(buffers.0 as f64);
        self.worker.buffers_max.set(buffers.1 as f64);
        for c in clusters {
            for b in &c.backends {
                let key = (c.name.clone(), b.address);
                let recorder = &self.recorder;
                let g = self.backends.entry(key).or_insert_with(|| {
                    let l = labels(&[
                        ("cluster", c.name.clone()),
                        ("backend", b.address.to_string()),
                    ]);
                    recorder.register(|| BackendGauges {
                        active: gauge!("kakehi_backend_active_requests", l.iter()),
                        ejected: gauge!("kakehi_backend_ejected", l.iter()),
                    })
                });
                g.active.set(f64::from(b.active));
                g.ejected.set(if b.is_ejected() { 1.0 } else { 0.0 });
            }
        }
        // Backends no longer configured lose their gauges (their traffic figures go when the
        // worker applies the configuration, in `retain`).
        self.backends.retain(|(name, address), _| {
            clusters
                .iter()
                .any(|c| &c.name == name && c.backends.iter().any(|b| b.address == *address))
        });
        self.recorder.samples()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
    fn handles_are_registered_once_not_per_request() {
        let mut stats = Stats::default();
        let listener: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let backend: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let one = |stats: &mut Stats| {
            stats.accepted(listener);
            stats.attempt("app", backend, false, true);
            stats.request(&record(200, "app", 3), true);
            stats.closed(listener);
        };
        one(&mut stats);
        let after_first = stats.recorder.registrations();
        for _ in 0..1000 {
            one(&mut stats);
        }
        assert_eq!(stats.recorder.registrations(), after_first);
        let s = stats.samples(&[], 0, (0, 0));
        assert_eq!(
            value(&s, "kakehi_backend_requests_total", &[("class", "2xx")]),
            Some(1001.0)
        );
        assert_eq!(
            value(&s, "kakehi_listener_connections_total", &[]),
            Some(1001.0)
        );
        assert_eq!(
            value(&s, "kakehi_listener_connections_active", &[]),
            Some(0.0)
        );
    }

    #[test]
    fn loop_turns_are_counted_in_buckets() {
        let mut stats = Stats::default();
        for micros in [200, 900, 3_000, 40_000] {
            stats.turn(Duration::from_micros(micros));
        }
        let s = stats.samples(&[], 0, (0, 0));
        let le = |b: &str| value(&s, "kakehi_worker_loop_turn_seconds_bucket", &[("le", b)]);
        assert_eq!(le("0.001"), Some(2.0));
        assert_eq!(le("0.0025"), Some(2.0));
        assert_eq!(le("0.005"), Some(3.0));
        assert_eq!(le("0.05"), Some(4.0));
        assert_eq!(
            value(&s, "kakehi_worker_loop_turn_seconds_count", &[]),
            Some(4.0)
        );
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
