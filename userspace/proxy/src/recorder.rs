//! kakehi's recorder for the `metrics` facade: the registry behind every `counter!`, `gauge!`
//! and `histogram!` handle a worker (or lbd's main process) registers, and the samples it
//! turns them into when the supervisor scrapes.
//!
//! Handles are registered once, when a listener, cluster or backend is first seen, and kept by
//! their owner ([`crate::stats::Stats`], main's health checks); a request only calls
//! `increment` or `record` on a handle it already holds. The registry keeps its own reference
//! to each handle's value, and a value nobody else holds any more (its cluster was removed
//! from the configuration) is left out of the next scrape and forgotten.
//!
//! Histograms keep fixed buckets ([`BUCKETS`]), not the observations: summing the buckets of
//! every worker, key by key, gives the process-wide histogram, which is how lbd merges them.
//!
//! A worker's event loop is single-threaded, so its recorder is made with [`Writers::One`]:
//! each value has one writer, and an update is a plain load and store (no locked
//! read-modify-write on the request path). Main's recorder, whose handles may be written from
//! more than one thread, is made with [`Writers::Many`] and uses atomic read-modify-writes.

use lb_config::protocol::Sample;
use metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName};
use metrics::{Metadata, SharedString, Unit};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

/// Upper bounds of the histogram buckets, in seconds (Prometheus' defaults, from 1 ms).
pub const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How many threads write a recorder's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// One thread writes every value (a worker's event loop).
    One,
    /// Any thread may write any value.
    Many,
}

/// A u64 that one writer adds to with a load and a store, or many with `fetch_add`.
#[derive(Debug)]
struct Cell {
    value: AtomicU64,
    writers: Writers,
}

impl Cell {
    fn new(writers: Writers) -> Cell {
        Cell {
            value: AtomicU64::new(0),
            writers,
        }
    }

    fn add(&self, n: u64) {
        match self.writers {
            Writers::One => self
                .value
                .store(self.value.load(Relaxed).wrapping_add(n), Relaxed),
            Writers::Many => {
                self.value.fetch_add(n, Relaxed);
            }
        }
    }

    /// Applies `f` to the f64 whose bits the cell holds.
    fn update_f64(&self, f: impl Fn(f64) -> f64) {
        match self.writers {
            Writers::One => {
                let old = f64::from_bits(self.value.load(Relaxed));
                self.value.store(f(old).to_bits(), Relaxed);
            }
            Writers::Many => {
                let _ = self.value.fetch_update(Relaxed, Relaxed, |bits| {
                    Some(f(f64::from_bits(bits)).to_bits())
                });
            }
        }
    }

    fn get(&self) -> u64 {
        self.value.load(Relaxed)
    }

    fn get_f64(&self) -> f64 {
        f64::from_bits(self.get())
    }
}

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.add(value);
    }

    fn absolute(&self, value: u64) {
        self.value.fetch_max(value, Relaxed);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        self.update_f64(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update_f64(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.value.store(value.to_bits(), Relaxed);
    }
}

/// A fixed-bucket histogram of seconds. `counts[i]` holds the observations in bucket `i` only
/// (not cumulative); the last slot holds those above every bound.
#[derive(Debug)]
struct Buckets {
    counts: [Cell; BUCKETS.len() + 1],
    sum: Cell,
}

impl Buckets {
    fn new(writers: Writers) -> Buckets {
        Buckets {
            counts: std::array::from_fn(|_| Cell::new(writers)),
            sum: Cell::new(writers),
        }
    }
}

impl HistogramFn for Buckets {
    fn record(&self, secs: f64) {
        // The first bucket whose bound is at least `secs` (BUCKETS.len(): none).
        let slot = BUCKETS.partition_point(|&b| b < secs);
        if let Some(c) = self.counts.get(slot) {
            c.add(1);
        }
        self.sum.update_f64(|s| s + secs);
    }
}

#[derive(Debug, Clone)]
enum Value {
    Counter(Arc<Cell>),
    Gauge(Arc<Cell>),
    Histogram(Arc<Buckets>),
}

impl Value {
    /// Whether a handle outside the registry still holds it.
    fn held(&self) -> bool {
        match self {
            Value::Counter(c) | Value::Gauge(c) => Arc::strong_count(c) > 1,
            Value::Histogram(h) => Arc::strong_count(h) > 1,
        }
    }
}

#[derive(Default)]
struct Registry {
    values: HashMap<Key, Value>,
}

/// The recorder. Cheap to share: clone the [`Arc`] it is made in.
pub struct Recorder {
    writers: Writers,
    registry: Mutex<Registry>,
    /// Handles given out (by `register_*`), to check that the request path registers none.
    registrations: AtomicU64,
}

impl Recorder {
    pub fn new(writers: Writers) -> Arc<Recorder> {
        Arc::new(Recorder {
            writers,
            registry: Mutex::new(Registry::default()),
            registrations: AtomicU64::new(0),
        })
    }

    /// How many handles were registered so far.
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Relaxed)
    }

    /// Runs `f` (which uses the `counter!`, `gauge!` and `histogram!` macros) with this
    /// recorder as the one they register with.
    pub fn register<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self, f)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value registered under `key`, made by `make` when there is none (or when the one
    /// there is of another kind: the newest registration wins).
    fn value(
        &self,
        key: &Key,
        make: impl FnOnce(Writers) -> Value,
        same: fn(&Value) -> bool,
    ) -> Value {
        self.registrations.fetch_add(1, Relaxed);
        let mut registry = self.registry();
        if let Some(v) = registry.values.get(key) {
            if same(v) {
                return v.clone();
            }
        }
        let v = make(self.writers);
        registry.values.insert(key.clone(), v.clone());
        v
    }

    /// Every value some handle still holds, as Prometheus samples: counters and gauges as one
    /// sample each, histograms as cumulative `_bucket` samples (label `le`), `_sum` and
    /// `_count`. Sorted by name, then by labels (addresses in address order), so a scrape
    /// reads the same whatever order things were first seen in. Values no handle holds are
    /// forgotten.
    pub fn samples(&self) -> Vec<Sample> {
        let mut registry = self.registry();
        registry.values.retain(|_, v| v.held());
        let mut keys: Vec<(&Key, &Value)> = registry.values.iter().collect();
        keys.sort_by(|a, b| order(a.0, b.0));
        let mut out = Vec::new();
        for (key, value) in keys {
            let labels: BTreeMap<String, String> = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            let name = key.name();
            match value {
                Value::Counter(c) => out.push(sample(name, labels, c.get() as f64)),
                Value::Gauge(g) => out.push(sample(name, labels, g.get_f64())),
                Value::Histogram(h) => {
                    let mut cumulative = 0;
                    for (i, count) in h.counts.iter().enumerate() {
                        cumulative += count.get();
                        let le = BUCKETS.get(i).map_or("+Inf".to_string(), f64::to_string);
                        let mut l = labels.clone();
                        l.insert("le".into(), le);
                        out.push(sample(&format!("{name}_bucket"), l, cumulative as f64));
                    }
                    out.push(sample(
                        &format!("{name}_sum"),
                        labels.clone(),
                        h.sum.get_f64(),
                    ));
                    out.push(sample(&format!("{name}_count"), labels, cumulative as f64));
                }
            }
        }
        out
    }
}

/// Name first, then the labels in the order given; label values that are both socket
/// addresses or both numbers compare as such (127.0.0.1:9001 before 127.0.0.1:10000, worker 2
/// before worker 10).
fn order(a: &Key, b: &Key) -> std::cmp::Ordering {
    a.name().cmp(b.name()).then_with(|| {
        let value = |l: &metrics::Label| {
            let addr = l.value().parse::<SocketAddr>().ok();
            let number = l.value().parse::<u64>().ok();
            (l.key().to_string(), addr, number, l.value().to_string())
        };
        a.labels().map(value).cmp(b.labels().map(value))
    })
}

fn sample(name: &str, labels: BTreeMap<String, String>, value: f64) -> Sample {
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

impl metrics::Recorder for Recorder {
    // Help texts are lbd's (metrics.rs), one per family: descriptions are not kept here.
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.value(
            key,
            |w| Value::Counter(Arc::new(Cell::new(w))),
            |v| matches!(v, Value::Counter(_)),
        ) {
            Value::Counter(c) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.value(
            key,
            |w| Value::Gauge(Arc::new(Cell::new(w))),
            |v| matches!(v, Value::Gauge(_)),
        ) {
            Value::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.value(
            key,
            |w| Value::Histogram(Arc::new(Buckets::new(w))),
            |v| matches!(v, Value::Histogram(_)),
        ) {
            Value::Histogram(h) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::{counter, gauge, histogram};

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn handles_record_into_the_registry_and_dropped_ones_are_forgotten() {
        for writers in [Writers::One, Writers::Many] {
            let r = Recorder::new(writers);
            let (c, g, h) = r.register(|| {
                (
                    counter!("kakehi_x_total", "cluster" => "app"),
                    gauge!("kakehi_g"),
                    histogram!("kakehi_d_seconds", "cluster" => "app"),
                )
            });
            c.increment(2);
            c.increment(3);
            g.set(7.0);
            g.decrement(2.0);
            for secs in [0.0005, 0.003, 0.003, 20.0] {
                h.record(secs);
            }
            // Registering the same key again gives the same value.
            r.register(|| counter!("kakehi_x_total", "cluster" => "app"))
                .increment(1);
            let s = r.samples();
            let app = ("cluster", "app");
            assert_eq!(value(&s, "kakehi_x_total", &[app]), Some(6.0));
            assert_eq!(value(&s, "kakehi_g", &[]), Some(5.0));
            let le = |b| value(&s, "kakehi_d_seconds_bucket", &[app, ("le", b)]);
            assert_eq!(le("0.001"), Some(1.0));
            assert_eq!(le("0.0025"), Some(1.0));
            assert_eq!(le("0.005"), Some(3.0));
            assert_eq!(le("10"), Some(3.0));
            assert_eq!(le("+Inf"), Some(4.0));
            assert_eq!(value(&s, "kakehi_d_seconds_count", &[app]), Some(4.0));
            let sum = value(&s, "kakehi_d_seconds_sum", &[app]).unwrap();
            assert!((sum - 20.0065).abs() < 1e-9, "{sum}");
            drop(c);
            let s = r.samples();
            assert_eq!(value(&s, "kakehi_x_total", &[app]), None);
            assert_eq!(value(&s, "kakehi_g", &[]), Some(5.0));
        }
    }

    #[test]
    fn samples_are_in_name_then_address_order() {
        let r = Recorder::new(Writers::One);
        let held: Vec<Counter> = ["127.0.0.1:10000", "127.0.0.1:9001", "127.0.0.1:9002"]
            .iter()
            .map(|a| r.register(|| counter!("kakehi_b_total", "backend" => *a)))
            .chain([r.register(|| counter!("kakehi_a_total"))])
            .collect();
        let s = r.samples();
        let order: Vec<String> = s
            .iter()
            .map(|s| format!("{} {:?}", s.name, s.labels.get("backend")))
            .collect();
        assert_eq!(
            order,
            [
                "kakehi_a_total None",
                "kakehi_b_total Some(\"127.0.0.1:9001\")",
                "kakehi_b_total Some(\"127.0.0.1:9002\")",
                "kakehi_b_total Some(\"127.0.0.1:10000\")",
            ]
        );
        drop(held);
    }

    #[test]
    fn many_threads_lose_no_increment() {
        let r = Recorder::new(Writers::Many);
        let c = r.register(|| counter!("kakehi_n_total"));
        std::thread::scope(|s| {
            for _ in 0..4 {
                let c = c.clone();
                s.spawn(move || (0..10_000).for_each(|_| c.increment(1)));
            }
        });
        assert_eq!(value(&r.samples(), "kakehi_n_total", &[]), Some(40_000.0));
    }
}
