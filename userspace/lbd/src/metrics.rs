//! Prometheus exposition: merging the workers' samples and rendering the text format, and the
//! small HTTP responder that serves it on `[metrics] address`.
//!
//! The figures are recorded through the `metrics` facade, into kakehi's own recorder
//! (lb-proxy's `recorder.rs`): each worker has one, and main has one for its own figures
//! (steering, health checks, worker restarts). They reach this file as samples, histograms
//! already bucketed; what is left is summing them key by key across processes and writing the
//! text format (version 0.0.4), checked in the tests against a real parser (prometheus-parse).
//! (metrics-exporter-prometheus is not used: it keeps one process's observations, and cannot
//! take in the bucket counts of other processes.)
//!
//! The responder runs in a thread of its own and never touches the workers: for each
//! `GET /metrics` it asks the supervisor's loop for the text over a channel and waits for it
//! (the supervisor owns the workers' channels). Anything else gets 404 or 405. Each client is
//! served by a thread of its own, at most [`MAX_CLIENTS`] at once (one more gets a 503 at
//! once), and each has a total deadline: its head within [`HEAD_DEADLINE`] of its connect and
//! everything within [`CLIENT_DEADLINE`], however it trickles its bytes. A slow or silent
//! client costs one thread for a bounded time and holds up no other scrape.

use lb_config::protocol::Sample;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How long a scrape waits for the supervisor's answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after its connect a client has to send its whole request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// How long after its connect a client's connection is closed, whatever it is doing (reading
/// its head, waiting for the text, or reading the answer slowly).
const CLIENT_DEADLINE: Duration = Duration::from_secs(20);
/// Clients served at once.
const MAX_CLIENTS: usize = 8;
const MAX_REQUEST_HEAD: usize = 8192;

/// Adds `samples` into `into`, summing the values of samples with the same name and labels
/// (counters, gauges and cumulative histogram buckets all add up across workers).
#[derive(Default)]
pub struct Merged {
    samples: Vec<Sample>,
    index: HashMap<(String, BTreeMap<String, String>), usize>,
}

impl Merged {
    pub fn add(&mut self, samples: impl IntoIterator<Item = Sample>) {
        for s in samples {
            let key = (s.name.clone(), s.labels.clone());
            match self.index.get(&key).and_then(|&i| self.samples.get_mut(i)) {
                Some(existing) => existing.value += s.value,
                None => {
                    self.index.insert(key, self.samples.len());
                    self.samples.push(s);
                }
            }
        }
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    pub fn into_samples(self) -> Vec<Sample> {
        self.samples
    }
}

/// The metric family a sample belongs to, and whether it is part of a histogram.
fn family(name: &str, histograms: &std::collections::HashSet<String>) -> (String, bool) {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if histograms.contains(base) {
                return (base.to_string(), true);
            }
        }
    }
    (name.to_string(), false)
}

/// The Prometheus text format (0.0.4) of `samples`: families sorted by name, each with its
/// HELP and TYPE lines; within a family, samples in the order given.
/// Samples whose metric or label names are not Prometheus names are left out (they come from
/// workers, which main does not trust to write its exposition: a name holding a newline or a
/// brace would forge lines); label values are escaped.
pub fn render(samples: &[Sample]) -> String {
    let samples: Vec<&Sample> = samples.iter().filter(|s| well_named(s)).collect();
    let samples = samples.as_slice();
    let histograms: std::collections::HashSet<String> = samples
        .iter()
        .filter_map(|s| s.name.strip_suffix("_bucket"))
        // A name that is only the suffix has no family name before it: it stays a gauge.
        .filter(|base| !base.is_empty())
        .map(str::to_string)
        .collect();
    let mut families: BTreeMap<String, (bool, Vec<&Sample>)> = BTreeMap::new();
    for &s in samples {
        let (name, histogram) = family(&s.name, &histograms);
        families
            .entry(name)
            .or_insert_with(|| (histogram, Vec::new()))
            .1
            .push(s);
    }
    let mut out = String::new();
    for (name, (histogram, members)) in families {
        let kind = if histogram {
            "histogram"
        } else if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {}", help(&name));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in members {
            out.push_str(&s.name);
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", number(s.value));
        }
    }
    out
}

/// A metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) and label names (`[a-zA-Z_][a-zA-Z0-9_]*`) as
/// the text format allows them.
pub fn well_named(sample: &Sample) -> bool {
    fn name(n: &str, colon: bool) -> bool {
        let ok = |c: char, first: bool| {
            c.is_ascii_alphabetic()
                || c == '_'
                || (colon && c == ':')
                || (!first && c.is_ascii_digit())
        };
        let mut chars = n.chars();
        chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
    }
    name(&sample.name, true) && sample.labels.keys().all(|k| name(k, false))
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// One line of help per family.
fn help(family: &str) -> &'static str {
    let level = if family.starts_with("kakehi_listener_") {
        "listener"
    } else if family.starts_with("kakehi_cluster_") {
        "cluster"
    } else {
        "backend"
    };
    let what = family
        .split_once('_')
        .and_then(|(_, rest)| rest.split_once('_'))
        .map_or(family, |(_, rest)| rest);
    match (family, what) {
        ("kakehi_steering_decisions_total", _) => {
            "Connections the eBPF program steered to each worker"
        }
        ("kakehi_steering_drops_total", _) => "Connections the eBPF program refused in the kernel",
        ("kakehi_worker_connections", _) => "Live client connections of each worker",
        ("kakehi_worker_buffers_in_use", _) => "I/O buffers of each worker's pool in use",
        ("kakehi_worker_buffers_max", _) => "The limit of each worker's buffer pool",
        ("kakehi_worker_loop_turn_seconds", _) => {
            "Turns of each worker's event loop, from the poll's return to the end of its work"
        }
        ("kakehi_worker_restarts_total", _) => {
            "Times each worker slot was restarted after its process died"
        }
        ("kakehi_sync_connected", _) => "1 while etcd answers lbd's [sync] requests, 0 when not",
        ("kakehi_sync_revision", _) => "etcd's revision up to which other appliances' changes were read",
        ("kakehi_sync_changes_total", _) => {
            "Changes written to etcd (origin local) and other appliances' changes applied or refused"
        }
        ("kakehi_backend_up", _) => {
            "1 when the active health check finds the backend up, 0 when down"
        }
        ("kakehi_health_checks_total", _) => "Active health check probes, by result",
        ("kakehi_backend_health_transitions_total", _) => {
            "Times the active health check changed the backend's state"
        }
        ("kakehi_backend_ejected", _) => {
            "Workers that currently keep the backend out of rotation after consecutive errors"
        }
        ("kakehi_backend_ejections_total", _) => {
            "Passive ejections of the backend after consecutive connect errors or 5xx"
        }
        ("kakehi_backend_active_requests", _) => "Requests in flight to the backend",
        ("kakehi_backend_response_time_seconds", _) => {
            "From the backend connection being ready to the first response byte"
        }
        (_, "requests_total") => match level {
            "listener" => "Requests by status class, per listener",
            "cluster" => "Requests by status class, per cluster",
            _ => "Requests by status class, per backend",
        },
        (_, "received_bytes_total") => "Bytes read from clients",
        (_, "sent_bytes_total") => "Bytes written to clients",
        (_, "request_duration_seconds") => "From a request's first byte to the end of its exchange",
        (_, "connections_total") => match level {
            "listener" => "Client connections accepted",
            _ => "New connections opened to the backend",
        },
        (_, "connections_active") => "Client connections open",
        (_, "tls_handshakes_total") => "TLS handshakes completed",
        (_, "tls_handshake_failures_total") => {
            "TLS connections closed before their handshake completed"
        }
        (_, "connect_errors_total") => "Failed connections to backends",
        (_, "retries_total") => "Connection attempts after a failed one, for the same request",
        (_, "rate_limited_total") => "Requests answered 429 for a frontend's rate_limit",
        _ => "kakehi metric",
    }
}

/// The HTTP side of the exporter: a thread accepting scrapes, and one per client.
pub struct Exporter {
    requests: mpsc::Receiver<mpsc::SyncSender<String>>,
    address: SocketAddr,
}

impl Exporter {
    /// Binds `address` and starts serving; scrapes wait for [`Exporter::pending`] answers.
    pub fn start(address: SocketAddr) -> std::io::Result<Exporter> {
        let listener = TcpListener::bind(address)?;
        let (sender, requests) = mpsc::channel();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&listener, &sender))?;
        Ok(Exporter { requests, address })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Scrapes waiting for the text.
    pub fn pending(&self) -> Vec<mpsc::SyncSender<String>> {
        self.requests.try_iter().collect()
    }
}

/// One client's place among the [`MAX_CLIENTS`]; given back when its thread ends.
struct Seat(Arc<AtomicUsize>);

impl Seat {
    fn take(taken: &Arc<AtomicUsize>) -> Option<Seat> {
        taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CLIENTS).then_some(n + 1)
            })
            .ok()
            .map(|_| Seat(Arc::clone(taken)))
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(listener: &TcpListener, scrapes: &mpsc::Sender<mpsc::SyncSender<String>>) {
    let taken = Arc::new(AtomicUsize::new(0));
    // Set by a client thread that finds the supervisor gone (the exporter was dropped).
    let gone = Arc::new(AtomicBool::new(false));
    for stream in listener.incoming() {
        if gone.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut stream) = stream else {
            continue;
        };
        let deadline = Instant::now() + CLIENT_DEADLINE;
        let Some(seat) = Seat::take(&taken) else {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            reply(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "too many scrapes at once\n",
                Instant::now() + Duration::from_secs(1),
            );
            continue;
        };
        let scrapes = scrapes.clone();
        let gone = Arc::clone(&gone);
        let spawned = std::thread::Builder::new()
            .name("metrics-client".into())
            .spawn(move || {
                let _seat = seat;
                if !answer(stream, &scrapes, deadline) {
                    gone.store(true, Ordering::SeqCst);
                }
            });
        if let Err(e) = spawned {
            log::warn!("metrics: cannot start a thread for a client: {e}");
        }
    }
}

/// Sets the socket's timeout to what is left before `deadline`; false when nothing is left.
fn time_left(stream: &TcpStream, deadline: Instant, read: bool) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    if read {
        stream.set_read_timeout(Some(left)).is_ok()
    } else {
        stream.set_write_timeout(Some(left)).is_ok()
    }
}

/// Serves one connection (one request) by `deadline`; false when the supervisor is gone.
fn answer(
    mut stream: TcpStream,
    scrapes: &mpsc::Sender<mpsc::SyncSender<String>>,
    deadline: Instant,
) -> bool {
    let head_by = deadline.min(Instant::now() + HEAD_DEADLINE);
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_REQUEST_HEAD {
            reply(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
                deadline,
            );
            return true;
        }
        if !time_left(&stream, head_by, true) {
            return true;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return true,
            Ok(n) => head.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        reply(
            &mut stream,
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n",
            deadline,
        );
        return true;
    }
    if method != "GET" && method != "HEAD" {
        reply(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n",
            deadline,
        );
        return true;
    }
    let (tx, rx) = mpsc::sync_channel(1);
    if scrapes.send(tx).is_err() {
        return false;
    }
    let wait = SCRAPE_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
    match rx.recv_timeout(wait) {
        Ok(body) => {
            let body = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            reply(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
                deadline,
            );
        }
        Err(_) => reply(
            &mut stream,
            "503 Service Unavailable",
            "text/plain",
            "lbd did not answer in time\n",
            deadline,
        ),
    }
    true
}

/// Writes the answer, giving up at `deadline` (a client reading slowly is cut off).
fn reply(stream: &mut TcpStream, status: &str, content_type: &str, body: &str, deadline: Instant) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    for mut bytes in [head.as_bytes(), body.as_bytes()] {
        while !bytes.is_empty() {
            if !time_left(stream, deadline, false) {
                return;
            }
            match stream.write(bytes) {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            value,
        }
    }

    #[test]
    fn samples_of_several_workers_add_up() {
        let mut m = Merged::default();
        m.add([s("a_total", &[("x", "1")], 2.0), s("b", &[], 1.0)]);
        m.add([
            s("a_total", &[("x", "1")], 3.0),
            s("a_total", &[("x", "2")], 1.0),
        ]);
        let got = m.into_samples();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].value, 5.0);
        assert_eq!(got[2].labels["x"], "2");
    }

    #[test]
    fn the_text_format_parses_back() {
        let samples = vec![
            s(
                "kakehi_listener_requests_total",
                &[("listener", "127.0.0.1:80"), ("class", "2xx")],
                7.0,
            ),
            s(
                "kakehi_backend_response_time_seconds_bucket",
                &[("le", "0.1")],
                3.0,
            ),
            s(
                "kakehi_backend_response_time_seconds_bucket",
                &[("le", "+Inf")],
                4.0,
            ),
            s("kakehi_backend_response_time_seconds_sum", &[], 0.75),
            s("kakehi_backend_response_time_seconds_count", &[], 4.0),
            s("kakehi_worker_connections", &[("worker", "0")], 2.0),
            s("kakehi_odd", &[("path", "a\"b\\c\nd")], 1.5),
        ];
        let text = render(&samples);
        assert!(
            text.contains("# TYPE kakehi_backend_response_time_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kakehi_listener_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kakehi_worker_connections gauge\n"),
            "{text}"
        );
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        let find = |name: &str| parsed.samples.iter().find(|x| x.metric == name).unwrap();
        match &find("kakehi_listener_requests_total").value {
            prometheus_parse::Value::Counter(v) => assert_eq!(*v, 7.0),
            other => panic!("{other:?}"),
        }
        match &find("kakehi_backend_response_time_seconds").value {
            prometheus_parse::Value::Histogram(h) => {
                assert_eq!(h.len(), 2);
                assert_eq!(h[1].count, 4.0);
            }
            other => panic!("{other:?}"),
        }
        // Escaped as the format says (prometheus-parse keeps the escapes as written).
        assert_eq!(find("kakehi_odd").labels.get("path"), Some(r#"a\"b\\c\nd"#));
    }

    /// Issue 12, item 7: names come from workers; one holding a newline or a brace must not
    /// forge lines of the exposition.
    #[test]
    fn names_that_are_not_prometheus_names_are_left_out() {
        let samples = vec![
            s("kakehi_ok_total", &[("cluster", "a")], 1.0),
            s(
                "kakehi_x_total{cluster=\"a\"} 1\nkakehi_forged_total",
                &[],
                7.0,
            ),
            s(
                "kakehi_y_total",
                &[("le\"} 9\nkakehi_forged_too_total{a", "1")],
                2.0,
            ),
            s("9starts_with_a_digit", &[], 1.0),
        ];
        let text = render(&samples);
        assert!(!text.contains("forged"), "{text}");
        assert!(!text.contains("9starts"), "{text}");
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        let names: Vec<&str> = parsed.samples.iter().map(|x| x.metric.as_str()).collect();
        assert_eq!(names, ["kakehi_ok_total"], "{text}");
    }

    /// Found by the `worker_answers` fuzz target (30-minute run): a sample named just
    /// `_bucket` made the empty name a histogram family, and the exposition got a HELP and a
    /// TYPE line with no metric name. Its `_sum` and `_count` would have joined it.
    #[test]
    fn a_bucket_suffix_alone_makes_no_nameless_family() {
        let samples = vec![
            s("_bucket", &[("le", "+Inf")], 3.0),
            s("_count", &[], 3.0),
            s("kakehi_worker_connections", &[], 1.0),
        ];
        let text = render(&samples);
        for line in text.lines().filter(|l| l.starts_with('#')) {
            let name = line.split(' ').nth(2).unwrap_or_default();
            assert!(
                !name.is_empty(),
                "a family without a name: {line:?} in\n{text}"
            );
        }
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        let mut names: Vec<&str> = parsed.samples.iter().map(|x| x.metric.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["_bucket", "_count", "kakehi_worker_connections"],
            "{text}"
        );
    }
}
