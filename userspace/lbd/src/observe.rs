//! What the supervisor does each turn of its loop for observability: it keeps the health
//! checks in step with the running config, tells every worker which backends are down, and
//! answers the metrics exporter's scrapes with the figures of every process. Also the
//! lbctl verbs that read them (`metrics`, the backends of `status`) and `log-level`.
//!
//! The workers' figures come over their channels: main sends `\0metrics` to every worker,
//! then reads each answer (`metrics JSON`, see lb-proxy's `control.rs`), so the workers
//! answer in parallel; the per-worker gauges get a `worker` label here and everything else
//! is summed across workers. Health verdicts go out as `\0health JSON`, which workers do not
//! answer: to each worker whenever the down set changes, and to every new worker process
//! (a restarted worker, or the next generation after an upgrade) as soon as it exists.
//!
//! A worker process that is gone (it died and was restarted, or was replaced by an upgrade)
//! takes its counters with it; main keeps them as of its last answer and adds them to the
//! sums, so that totals do not go backwards (what it counted after that answer is lost).

use crate::answers::Tagged;
use crate::health::Health;
use crate::metrics::{Exporter, Merged};
use crate::runtime::{recv_frame, send_frame};
use crate::supervisor::Supervisor;
use lb_config::protocol::{BackendHealth, Payload, Sample};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long a worker gets to answer a metrics request.
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a worker gets to answer `lbctl status`'s question (its ejected backends).
const STATUS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a metrics address that could not be bound (still held by the previous lbd
/// during an upgrade, say) is tried again.
const REBIND_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Observer {
    health: Health,
    exporter: Option<Exporter>,
    /// The last failed bind: (address, when), to retry and to log once.
    bind_failed: Option<(SocketAddr, Instant)>,
    /// For each worker slot, the pid and the health version it was last sent.
    pushed: HashMap<usize, (u32, u64)>,
    /// For each worker slot, the pid and the counters of its last metrics answer.
    last: HashMap<usize, (u32, Vec<Sample>)>,
    /// The counters of worker processes that are gone (restarted, upgraded), as of their
    /// last answer: kept in the sums, so that a restart does not make them go backwards.
    retired: Merged,
}

impl Supervisor {
    /// One turn: health checks, health pushes, the exporter.
    pub(crate) fn observe(&mut self) {
        let mut observer = std::mem::take(&mut self.observer);
        observer.health.sync(self.config());
        observer.health.poll();
        self.push_health(&mut observer);
        self.keep_exporter(&mut observer);
        if let Some(exporter) = &observer.exporter {
            let pending = exporter.pending();
            if !pending.is_empty() {
                let text = crate::metrics::render(&self.gather(&mut observer));
                for scrape in pending {
                    let _ = scrape.try_send(text.clone());
                }
            }
        }
        self.observer = observer;
    }

    /// The backends found down, for the handoff of an upgrade.
    pub(crate) fn health_down(&self) -> Vec<(String, SocketAddr)> {
        self.observer.health.down()
    }

    /// Starts the health checks of the running config with `down` marked down (what the
    /// previous lbd found), before the first workers start.
    pub(crate) fn seed_health(&mut self, down: &[(String, SocketAddr)]) {
        let mut observer = std::mem::take(&mut self.observer);
        observer.health.sync(self.config());
        observer.health.assume_down(down);
        self.observer = observer;
    }

    /// `lbctl metrics`: every sample of lbd and its workers.
    pub(crate) fn all_samples(&mut self) -> Vec<Sample> {
        let mut observer = std::mem::take(&mut self.observer);
        let samples = self.gather(&mut observer);
        self.observer = observer;
        samples
    }

    /// The backends table of `lbctl status`.
    /// With, for each backend, how many workers keep it ejected (asked of each worker, which
    /// answers at once; a worker that does not within [`STATUS_TIMEOUT`] counts for none).
    pub(crate) fn health_rows(&mut self) -> Vec<BackendHealth> {
        let mut rows = self.observer.health.rows(self.config());
        let mut asked = Vec::new();
        for (index, _, channel) in self.channels() {
            if send_frame(channel, b"\0ejected").is_ok() {
                asked.push(index);
            }
        }
        for index in asked {
            let Some(channel) = self.channel(index) else {
                continue;
            };
            let answer = read_tagged(channel, b"ejected ", STATUS_TIMEOUT)
                .and_then(|json| crate::answers::ejected(&json));
            match answer {
                Ok(ejected) => {
                    for row in &mut rows {
                        if ejected
                            .iter()
                            .any(|(c, a)| *c == row.cluster && *a == row.address)
                        {
                            row.ejected_by += 1;
                        }
                    }
                }
                Err(e) => log::warn!("worker {index}: no ejected backends for lbctl status: {e}"),
            }
        }
        rows
    }

    /// `lbctl log-level LEVEL`: main's level, every worker's, and the level workers started
    /// from now on get.
    pub(crate) fn set_log_level(&mut self, level: &str) -> Result<Payload, String> {
        let filter: log::LevelFilter = level.parse().map_err(|_| {
            format!("unknown log level {level:?}: use error, warn, info, debug, trace or off")
        })?;
        log::set_max_level(filter);
        self.log_level = filter;
        let filter = filter.as_str().to_ascii_lowercase();
        let frame = format!("\0log-level {filter}");
        let mut sent = Vec::new();
        let mut failed = Vec::new();
        for (index, _, channel) in self.channels() {
            match send_frame(channel, frame.as_bytes()) {
                Ok(()) => sent.push(index),
                Err(e) => failed.push(format!("worker {index}: {e}")),
            }
        }
        let mut applied = 0;
        for index in sent {
            let Some(channel) = self.channel(index) else {
                continue;
            };
            match crate::runtime::read_answer(channel, METRICS_TIMEOUT) {
                Ok(()) => applied += 1,
                Err(e) => failed.push(format!("worker {index}: {e}")),
            }
        }
        log::warn!("log level set to {filter} by lbctl");
        if failed.is_empty() {
            Ok(Payload::Done {
                message: format!("log level {filter} (lbd and {applied} workers)"),
            })
        } else {
            Err(format!(
                "log level {filter} set in lbd and {applied} workers, not in: {}",
                failed.join("; ")
            ))
        }
    }

    fn push_health(&mut self, observer: &mut Observer) {
        let version = observer.health.version();
        let down = observer.health.down();
        let mut text = None;
        let mut live = Vec::new();
        for (index, pid, channel) in self.channels() {
            live.push(index);
            // A worker process not told anything yet knows of no backend down.
            let needs = match observer.pushed.get(&index) {
                Some(&(p, v)) if p == pid => v != version,
                _ => !down.is_empty(),
            };
            if !needs {
                observer.pushed.insert(index, (pid, version));
                continue;
            }
            let text = text.get_or_insert_with(|| {
                let pairs: Vec<(&str, String)> = down
                    .iter()
                    .map(|(c, a)| (c.as_str(), a.to_string()))
                    .collect();
                serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into())
            });
            match send_frame(channel, format!("\0health {text}").as_bytes()) {
                Ok(()) => {
                    observer.pushed.insert(index, (pid, version));
                }
                Err(e) => log::warn!("worker {index}: cannot send the health state: {e}"),
            }
        }
        observer.pushed.retain(|i, _| live.contains(i));
    }

    fn keep_exporter(&mut self, observer: &mut Observer) {
        let wanted = self.config().metrics.as_ref().map(|m| m.address);
        if observer.exporter.as_ref().map(Exporter::address) == wanted {
            return;
        }
        let Some(address) = wanted else {
            // The exporter thread keeps its socket until lbd exits; it serves nothing more.
            observer.exporter = None;
            return;
        };
        if let Some((failed, at)) = observer.bind_failed {
            if failed == address && at.elapsed() < REBIND_EVERY {
                return;
            }
        }
        match Exporter::start(address) {
            Ok(exporter) => {
                log::info!("metrics served at http://{address}/metrics");
                observer.exporter = Some(exporter);
                observer.bind_failed = None;
            }
            Err(e) => {
                if observer.bind_failed.is_none_or(|(a, _)| a != address) {
                    log::warn!(
                        "metrics: cannot listen on {address}: {e} (trying again every second)"
                    );
                }
                observer.bind_failed = Some((address, Instant::now()));
            }
        }
    }

    /// Every sample: steering, health, worker slots, and the workers' own.
    fn gather(&mut self, observer: &mut Observer) -> Vec<Sample> {
        let mut merged = Merged::default();
        merged.add(self.samples());
        merged.add(observer.health.samples());
        for row in self.worker_rows() {
            merged.add([Sample {
                name: "kakehi_worker_restarts_total".into(),
                labels: [("worker".to_string(), row.index.to_string())].into(),
                value: row.restarts as f64,
            }]);
        }
        let mut asked = Vec::new();
        let mut live = HashMap::new();
        for (index, pid, channel) in self.channels() {
            live.insert(index, pid);
            if send_frame(channel, b"\0metrics").is_ok() {
                asked.push((index, pid));
            }
        }
        let gone: Vec<usize> = observer
            .last
            .iter()
            .filter(|(index, (pid, _))| live.get(index) != Some(pid))
            .map(|(index, _)| *index)
            .collect();
        for index in gone {
            if let Some((_, samples)) = observer.last.remove(&index) {
                observer.retired.add(samples);
            }
        }
        for (index, pid) in asked {
            let Some(channel) = self.channel(index) else {
                continue;
            };
            match read_metrics(channel) {
                Ok(samples) => {
                    let (samples, left_out) = crate::answers::worker_samples(samples, index);
                    if left_out > 0 {
                        log::warn!(
                            "worker {index}: left out {left_out} metric samples whose names are not Prometheus names",
                        );
                    }
                    let counters = samples.iter().filter(|s| is_counter(&s.name)).cloned();
                    observer.last.insert(index, (pid, counters.collect()));
                    merged.add(samples);
                }
                Err(e) => log::warn!("worker {index}: no metrics: {e}"),
            }
        }
        merged.add(observer.retired.samples().iter().cloned());
        merged.into_samples()
    }
}

/// Counters and histogram parts: what only grows, and adds up across processes over time.
fn is_counter(name: &str) -> bool {
    ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// Reads one `metrics JSON` answer from a worker.
fn read_metrics(channel: &mut UnixStream) -> Result<Vec<Sample>, String> {
    let json = read_tagged(channel, b"metrics ", METRICS_TIMEOUT)?;
    crate::answers::metrics(&json)
}

/// Reads a worker's answer that starts with `tag`, and returns what follows it, all within
/// `timeout`. An `ok` or `error: ...` before it is the late answer to a configuration that
/// timed out, and another tagged answer a late one to an earlier question: skipped (their
/// askers gave up on them), until the deadline.
fn read_tagged(channel: &mut UnixStream, tag: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let body = recv_frame(channel, deadline).map_err(|e| format!("no answer: {e}"))?;
        match crate::answers::tagged(&body, tag) {
            Tagged::Found(rest) => return Ok(rest.to_vec()),
            Tagged::Unexpected(why) => return Err(why),
            Tagged::Late => {
                log::debug!("skipped a late answer: {}", crate::answers::head(&body));
            }
        }
    }
}
