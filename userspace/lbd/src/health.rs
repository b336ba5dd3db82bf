//! Active health checks of backends, run by lbd's main process.
//!
//! Why in main and not in the workers: one probe per backend and interval whatever the
//! number of workers (a backend sees the same check traffic with 1 or 64 workers), one
//! verdict that every worker applies the same way, and one place that logs state changes and
//! answers `lbctl status`. Main is not sandboxed, so a probe is a plain blocking socket in a
//! thread of its own; the workers' event loops never wait for one. The verdicts travel to the
//! workers as `Order::Health` requests on their channels (see lb-proxy's `orders.rs`); what a
//! worker sees itself (connect errors, 5xx) is its passive ejection, in lb-proxy's balancer.
//!
//! Each checked backend has a thread that probes it every `interval`: a TCP connect, or with a
//! `path` an HTTP/1.1 request (`method`, default GET) whose status must be within `status`
//! (default 200 to 399), all within `timeout`. A
//! backend starts up; `fall` failed probes in a row put it down, `rise` good ones bring it
//! back. [`Health::poll`] collects the results; [`Health::sync`] starts and stops threads
//! when the clusters change.
//!
//! A cluster with `backend_tls` is checked over TLS, verified as the workers verify its
//! backends (same roots, same name): a TCP check is then a TLS handshake, and an HTTP check
//! goes inside it. A backend whose certificate does not verify is down, saying why.

use lb_config::protocol::{BackendHealth, HealthState};
use lb_config::{Config, HealthCheck};
use lb_proxy::recorder::Recorder;
use metrics::{counter, gauge, Counter, Gauge};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// (cluster, backend address).
type Key = (String, SocketAddr);

/// How often a probe thread looks at its stop flag while it waits for the next probe.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Bytes of the answer read to find its status line.
const MAX_STATUS_LINE: usize = 1024;

struct Outcome {
    key: Key,
    /// The probe thread's id (a restarted check's late results are ignored).
    id: u64,
    result: Result<(), String>,
}

struct Check {
    spec: HealthCheck,
    tls: Option<lb_config::BackendTls>,
    id: u64,
    stop: Arc<AtomicBool>,
    up: bool,
    /// Good or failed probes in a row.
    streak: u32,
    since: Instant,
    checks: u64,
    failed: u64,
    last_error: Option<String>,
    figures: Figures,
}

/// A checked backend's metrics, registered when its check starts.
struct Figures {
    up: Gauge,
    ok: Counter,
    failed: Counter,
    /// State changes.
    transitions: Counter,
}

impl Figures {
    fn new(recorder: &Recorder, (cluster, address): &Key) -> Figures {
        let (cluster, backend) = (cluster.clone(), address.to_string());
        recorder.register(|| {
            let up = gauge!("kakehi_backend_up", "cluster" => cluster.clone(), "backend" => backend.clone());
            up.set(1.0);
            let checks = |result: &'static str| {
                counter!(
                    "kakehi_health_checks_total",
                    "cluster" => cluster.clone(), "backend" => backend.clone(), "result" => result
                )
            };
            Figures {
                up,
                ok: checks("ok"),
                failed: checks("failed"),
                transitions: counter!(
                    "kakehi_backend_health_transitions_total",
                    "cluster" => cluster.clone(), "backend" => backend.clone()
                ),
            }
        })
    }
}

impl Drop for Check {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub struct Health {
    checks: HashMap<Key, Check>,
    sender: mpsc::Sender<Outcome>,
    results: mpsc::Receiver<Outcome>,
    next_id: u64,
    /// Main's recorder, which the checks' figures are registered with.
    recorder: Arc<Recorder>,
}

impl Health {
    pub fn new(recorder: Arc<Recorder>) -> Health {
        let (sender, results) = mpsc::channel();
        Health {
            checks: HashMap::new(),
            sender,
            results,
            next_id: 0,
            recorder,
        }
    }

    /// Starts the checks `config` asks for that do not run yet, with the same settings, and
    /// stops those it no longer has.
    pub fn sync(&mut self, config: &Config) {
        let mut wanted: HashMap<Key, (&HealthCheck, Option<&lb_config::BackendTls>)> =
            HashMap::new();
        for cluster in &config.clusters {
            let Some(spec) = &cluster.health_check else {
                continue;
            };
            for b in &cluster.backends {
                wanted.insert(
                    (cluster.name.clone(), b.address),
                    (spec, cluster.backend_tls.as_ref()),
                );
            }
        }
        let before = self.checks.len();
        self.checks.retain(|key, check| {
            wanted
                .get(key)
                .is_some_and(|(spec, tls)| **spec == check.spec && *tls == check.tls.as_ref())
        });
        for (key, (spec, tls_spec)) in wanted {
            if self.checks.contains_key(&key) {
                continue;
            }
            let tls = match tls_spec.map(client_tls).transpose() {
                Ok(tls) => tls,
                Err(e) => {
                    log::error!(
                        "cluster {}: cannot start the health check of {}: {e}",
                        key.0,
                        key.1
                    );
                    continue;
                }
            };
            self.next_id += 1;
            let stop = Arc::new(AtomicBool::new(false));
            let spawned = std::thread::Builder::new()
                .name(format!("health {}", key.1))
                .stack_size(64 * 1024)
                .spawn({
                    let (key, spec, stop, sender, id) = (
                        key.clone(),
                        spec.clone(),
                        Arc::clone(&stop),
                        self.sender.clone(),
                        self.next_id,
                    );
                    move || probe_loop(key, spec, tls, id, &stop, &sender)
                });
            if let Err(e) = spawned {
                log::error!(
                    "cluster {}: cannot start the health check of {}: {e}",
                    key.0,
                    key.1
                );
                continue;
            }
            let figures = Figures::new(&self.recorder, &key);
            self.checks.insert(
                key,
                Check {
                    spec: spec.clone(),
                    tls: tls_spec.cloned(),
                    id: self.next_id,
                    stop,
                    up: true,
                    streak: 0,
                    since: Instant::now(),
                    checks: 0,
                    failed: 0,
                    last_error: None,
                    figures,
                },
            );
        }
        if before != self.checks.len() {
            log::debug!("{} backends health-checked", self.checks.len());
        }
    }

    /// Takes the probes' results in; true when a backend went up or down.
    pub fn poll(&mut self) -> bool {
        let mut changed = false;
        while let Ok(outcome) = self.results.try_recv() {
            let Some(check) = self.checks.get_mut(&outcome.key) else {
                continue;
            };
            if check.id != outcome.id {
                continue;
            }
            check.checks += 1;
            let ok = outcome.result.is_ok();
            if ok {
                check.figures.ok.increment(1);
            }
            if let Err(e) = outcome.result {
                check.failed += 1;
                check.figures.failed.increment(1);
                check.last_error = Some(e);
            }
            if ok == check.up {
                check.streak = 0;
                continue;
            }
            check.streak += 1;
            let needed = if ok { check.spec.rise } else { check.spec.fall };
            if check.streak < needed {
                continue;
            }
            check.up = ok;
            check.streak = 0;
            check.since = Instant::now();
            check.figures.transitions.increment(1);
            check.figures.up.set(if ok { 1.0 } else { 0.0 });
            changed = true;
            let (cluster, address) = &outcome.key;
            if ok {
                log::warn!(
                    "cluster {cluster}: backend {address} is up ({needed} good health checks in a row)"
                );
            } else {
                log::warn!(
                    "cluster {cluster}: backend {address} is down ({needed} failed health checks in a row, last: {})",
                    check.last_error.as_deref().unwrap_or("?")
                );
            }
        }
        changed
    }

    /// Marks `keys` down as the previous lbd found them (an upgrade hands its verdicts
    /// over), for the backends checked here; their probes go on and bring them back after
    /// `rise` good ones.
    pub fn assume_down(&mut self, keys: &[Key]) {
        for key in keys {
            if let Some(check) = self.checks.get_mut(key) {
                if check.up {
                    check.up = false;
                    check.figures.up.set(0.0);
                    check.streak = 0;
                    check.since = Instant::now();
                    check.last_error = Some("down when lbd was upgraded".into());
                }
            }
        }
    }

    /// Every checked backend's verdict: up or not.
    pub fn verdicts(&self) -> std::collections::BTreeMap<Key, bool> {
        self.checks.iter().map(|(k, c)| (k.clone(), c.up)).collect()
    }

    /// The backends found down, sorted.
    pub fn down(&self) -> Vec<Key> {
        let mut out: Vec<Key> = self
            .checks
            .iter()
            .filter(|(_, c)| !c.up)
            .map(|(k, _)| k.clone())
            .collect();
        out.sort();
        out
    }

    /// Every backend of `config`, for `lbctl status`.
    pub fn rows(&self, config: &Config) -> Vec<BackendHealth> {
        let mut out = Vec::new();
        for cluster in &config.clusters {
            for b in &cluster.backends {
                let key = (cluster.name.clone(), b.address);
                let check = self.checks.get(&key);
                let state = match check {
                    _ if b.draining => HealthState::Draining,
                    None => HealthState::Unchecked,
                    Some(c) if c.up => HealthState::Up,
                    Some(_) => HealthState::Down,
                };
                out.push(BackendHealth {
                    cluster: cluster.name.clone(),
                    address: b.address.to_string(),
                    check: cluster
                        .health_check
                        .as_ref()
                        .map_or_else(|| "none".to_string(), describe),
                    state,
                    since_secs: check.map(|c| c.since.elapsed().as_secs()),
                    checks: check.map_or(0, |c| c.checks),
                    failed_checks: check.map_or(0, |c| c.failed),
                    last_error: check.and_then(|c| c.last_error.clone()),
                    ejected_by: 0,
                });
            }
        }
        out
    }
}

/// "http GET /health", "http HEAD /ping 204" or "tcp", with the interval.
fn describe(h: &HealthCheck) -> String {
    let what = match &h.path {
        Some(p) if h.status == (200, 399) => format!("http {} {p}", h.method),
        Some(p) if h.status.0 == h.status.1 => format!("http {} {p} {}", h.method, h.status.0),
        Some(p) => format!("http {} {p} {}-{}", h.method, h.status.0, h.status.1),
        None => "tcp".to_string(),
    };
    format!("{what} every {}", humantime::format_duration(h.interval))
}

/// How a check reaches a `backend_tls` cluster's backend: the rustls configuration the
/// workers use for it, and the name it must prove.
pub struct ProbeTls {
    config: Arc<rustls::ClientConfig>,
    spec: lb_config::BackendTls,
}

/// The TLS side of the checks of a `backend_tls` cluster.
fn client_tls(spec: &lb_config::BackendTls) -> Result<ProbeTls, String> {
    static SYSTEM: std::sync::OnceLock<(Arc<rustls::RootCertStore>, Option<String>)> =
        std::sync::OnceLock::new();
    let system = SYSTEM.get_or_init(lb_proxy::back_stream::system_store);
    if let (true, Some(why)) = (spec.roots.is_empty(), &system.1) {
        return Err(format!(
            "the system's CA certificates cannot be read: {why}"
        ));
    }
    let provider = Arc::new(lb_config::certs::provider());
    Ok(ProbeTls {
        config: lb_proxy::back_stream::client_config(spec, &provider, &system.0)?,
        spec: spec.clone(),
    })
}

fn probe_loop(
    key: Key,
    spec: HealthCheck,
    tls: Option<ProbeTls>,
    id: u64,
    stop: &AtomicBool,
    sender: &mpsc::Sender<Outcome>,
) {
    let mut next = Instant::now();
    loop {
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(STOP_POLL.min(next.saturating_duration_since(Instant::now())));
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        next = Instant::now() + spec.interval;
        let http = spec.path.as_deref().map(|path| HttpCheck {
            method: &spec.method,
            path,
            status: spec.status,
            host: spec.host.as_deref(),
        });
        let result = probe(key.1, http, tls.as_ref(), spec.timeout);
        let outcome = Outcome {
            key: key.clone(),
            id,
            result,
        };
        if sender.send(outcome).is_err() {
            return;
        }
    }
}

/// An HTTP check: the request, and the lowest and highest status that mean up.
#[derive(Debug, Clone, Copy)]
pub struct HttpCheck<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: (u16, u16),
    /// The Host header; None: the backend's address.
    pub host: Option<&'a str>,
}

/// A probe's connection: a socket, or TLS over it.
trait Probed: Read + Write {
    fn tcp(&self) -> &TcpStream;
}

impl Probed for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Probed for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

/// One probe within `timeout`: a connect (and the TLS handshake, with `tls`), and for an HTTP
/// check the request and a status in its range.
pub fn probe(
    address: SocketAddr,
    http: Option<HttpCheck<'_>>,
    tls: Option<&ProbeTls>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&address, timeout)
        .map_err(|e| format!("connect: {}", short(&e)))?;
    let Some(tls) = tls else {
        return ask(stream, address, http, deadline);
    };
    let name = lb_proxy::back_stream::server_name(&tls.spec, address);
    let conn = rustls::ClientConnection::new(Arc::clone(&tls.config), name)
        .map_err(|e| format!("TLS: {e}"))?;
    let mut stream = rustls::StreamOwned::new(conn, stream);
    let left = deadline.saturating_duration_since(Instant::now());
    let timeouts = stream
        .sock
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .and_then(|()| {
            stream
                .sock
                .set_write_timeout(Some(left.max(Duration::from_millis(1))))
        });
    timeouts.map_err(|e| format!("TLS handshake: {e}"))?;
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).map_err(|e| {
            let detail = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .map_or_else(|| short(&e), ToString::to_string);
            format!("TLS handshake: {detail}")
        })?;
    }
    ask(stream, address, http, deadline)
}

/// The HTTP part of a probe, over a connection made.
fn ask<S: Probed>(
    mut stream: S,
    address: SocketAddr,
    http: Option<HttpCheck<'_>>,
    deadline: Instant,
) -> Result<(), String> {
    let Some(HttpCheck {
        method,
        path,
        status: (lowest, highest),
        host,
    }) = http
    else {
        return Ok(());
    };
    let host = host.map_or_else(|| address.to_string(), str::to_string);
    let left = |what: &str| {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(format!("{what}: timed out"))
        } else {
            Ok(left)
        }
    };
    stream
        .tcp()
        .set_write_timeout(Some(left("send")?))
        .map_err(|e| format!("send: {e}"))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kakehi-health-check\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {}", short(&e)))?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 512];
    let line_end = loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if head.len() >= MAX_STATUS_LINE {
            return Err("answer: no status line".into());
        }
        stream
            .tcp()
            .set_read_timeout(Some(left("answer")?))
            .map_err(|e| format!("answer: {e}"))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err("answer: connection closed before a status line".into()),
            Ok(n) => head.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("answer: {}", short(&e))),
        }
    };
    let line = String::from_utf8_lossy(head.get(..line_end).unwrap_or_default()).into_owned();
    let mut parts = line.split(' ');
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    };
    match status {
        Some(code) if (lowest..=highest).contains(&code) => Ok(()),
        Some(code) => Err(format!("status {code}")),
        None => Err(format!(
            "answer: not HTTP ({:?})",
            line.chars().take(40).collect::<String>()
        )),
    }
}

/// An I/O error in a few words: "timed out" rather than the OS's sentence for EAGAIN, and
/// without the "(os error N)" tail.
fn short(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".into(),
        _ => {
            let text = e.to_string();
            match text.find(" (os error ") {
                Some(at) => text.get(..at).unwrap_or(&text).to_string(),
                None => text,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static [u8]) -> SocketAddr {
        serve_once_seen(answer).0
    }

    /// Also gives what the probe sent.
    fn serve_once_seen(answer: &'static [u8]) -> (SocketAddr, mpsc::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap_or(0);
            let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = s.write_all(answer);
        });
        (addr, rx)
    }

    #[test]
    fn http_probe_wants_a_2xx_or_3xx_status() {
        let t = Duration::from_secs(2);
        let get = Some(HttpCheck {
            method: "GET",
            path: "/health",
            status: (200, 399),
            host: None,
        });
        let ok = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(probe(ok, get, None, t), Ok(()));
        let redirect = serve_once(b"HTTP/1.0 302 Found\r\nLocation: /\r\n\r\n");
        assert_eq!(probe(redirect, get, None, t), Ok(()));
        let bad = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        assert_eq!(probe(bad, get, None, t), Err("status 503".into()));
        let garbage = serve_once(b"SSH-2.0-OpenSSH\r\n");
        assert!(probe(garbage, get, None, t)
            .unwrap_err()
            .contains("not HTTP"));
        let closed = serve_once(b"");
        assert!(probe(closed, get, None, t).unwrap_err().contains("closed"));
        // A narrower range: only 204 means up.
        let only_204 = Some(HttpCheck {
            method: "HEAD",
            path: "/ping",
            status: (204, 204),
            host: Some("app.example"),
        });
        let (ok, seen) = serve_once_seen(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(probe(ok, only_204, None, t), Err("status 200".into()));
        assert_eq!(
            seen.recv().unwrap(),
            "HEAD /ping HTTP/1.1\r\nHost: app.example\r\nUser-Agent: kakehi-health-check\r\n\
             Connection: close\r\n\r\n"
        );
        let (ok, seen) = serve_once_seen(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(probe(ok, get, None, t), Ok(()));
        assert!(seen
            .recv()
            .unwrap()
            .starts_with(&format!("GET /health HTTP/1.1\r\nHost: {ok}\r\n")));
    }

    #[test]
    fn a_silent_backend_times_out_and_a_closed_port_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let silent = l.local_addr().unwrap();
        let started = Instant::now();
        let get = Some(HttpCheck {
            method: "GET",
            path: "/",
            status: (200, 399),
            host: None,
        });
        let e = probe(silent, get, None, Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(l);
        // A port bound but not listening refuses connections, and stays ours: once the
        // listener above is gone its port could be taken by a parallel test, or picked as the
        // probe's own source port (a TCP self-connect, which succeeds).
        let held =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        held.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let closed = held.local_addr().unwrap().as_socket().unwrap();
        let e = probe(closed, None, None, Duration::from_millis(200)).unwrap_err();
        assert_eq!(e, "connect: Connection refused");
    }
}
