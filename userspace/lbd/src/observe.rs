//! The observer: what lbd main does each turn of its loop for observability. It keeps the
//! health checks in step with the running config, tells every worker which backends are down,
//! and answers the metrics exporter's scrapes with the figures of every process. Also the
//! lbctl verbs that read them (`metrics`, the backends of `status`) and `log-level`.
//!
//! The workers' figures come over their channels: main sends [`Order::Metrics`] to every
//! worker, then reads the answers as they come (`workers.rs`' `ask_all`), so the workers
//! answer in parallel; the per-worker gauges get a `worker` label here and everything else is
//! summed across workers. Health verdicts go out as [`Order::Health`], which workers do not
//! answer: to each worker whenever the down set changes, and to every new worker process (a
//! restarted worker, or the next generation after an upgrade) as soon as it exists.
//!
//! A worker process that is gone (it died and was restarted, or was replaced by an upgrade)
//! takes its counters with it; main keeps them as of its last answer and adds them to the
//! sums, so that totals do not go backwards (what it counted after that answer is lost).

use crate::health::Health;
use crate::metrics::{Exporter, Merged};
use crate::sync::{Remote, Sync};
use crate::workers::{Unanswered, Workers};
use lb_config::protocol::channel::{Order, Reply};
use lb_config::protocol::{BackendHealth, Payload, Sample};
use lb_config::Config;
use lb_proxy::recorder::{Recorder, Writers};
use metrics::{counter, Counter};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a worker gets to answer a metrics request (and a log level).
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a worker gets to answer `lbctl status`'s question (its ejected backends).
const STATUS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a metrics address that could not be bound (still held by the previous lbd
/// during an upgrade, say) is tried again.
const REBIND_EVERY: Duration = Duration::from_secs(1);

/// Why a log level was not set everywhere.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("unknown log level {0:?}: use error, warn, info, debug, trace or off")]
    Unknown(String),
    #[error("log level {level} set in lbd and {applied} workers, not in: {failed}")]
    Partly {
        level: String,
        applied: usize,
        failed: String,
    },
}

/// What a worker answered that is not the reply asked for.
#[derive(Debug, thiserror::Error)]
enum Unexpected {
    #[error(transparent)]
    Unanswered(#[from] Unanswered),
    #[error("{error}")]
    Refused { error: String },
    #[error("unexpected answer {0:?}")]
    Other(Box<Reply>),
}

/// The health checks, the metrics exporter, and what the workers were told and answered.
pub struct Observer {
    /// Main's own figures (steering, health checks, worker restarts), recorded through the
    /// `metrics` facade.
    recorder: Arc<Recorder>,
    /// The handles of figures read from elsewhere at each scrape (the eBPF program's counters,
    /// the worker slots' restarts), held until the next one.
    polled: Vec<Counter>,
    health: Health,
    /// `[sync]`: the other appliances' changes and verdicts, through etcd.
    sync: Option<Sync>,
    /// The down set last computed (local verdicts, or every appliance's with `[sync]`), and
    /// a number bumped whenever it changes: what the workers are told.
    down: Vec<(String, SocketAddr)>,
    down_version: u64,
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

impl Observer {
    /// With `[sync]`, its thread starts reading etcd from `revision` (what the previous lbd
    /// read; 0 for every change).
    pub(crate) fn new(sync: Option<&lb_config::Sync>, revision: u64) -> Observer {
        let recorder = Recorder::new(Writers::Many);
        Observer {
            health: Health::new(Arc::clone(&recorder)),
            sync: sync.map(|s| Sync::start(s, revision, &recorder)),
            down: Vec::new(),
            down_version: 0,
            recorder,
            polled: Vec::new(),
            exporter: None,
            bind_failed: None,
            pushed: HashMap::new(),
            last: HashMap::new(),
            retired: Merged::default(),
        }
    }

    /// The changes other appliances made, to apply in order (none without `[sync]`).
    pub(crate) fn remote_changes(&mut self) -> Vec<Remote> {
        self.sync.as_mut().map(Sync::poll).unwrap_or_default()
    }

    /// Another appliance's change was applied (`error` None) or refused.
    pub(crate) fn remote_applied(&mut self, change: &Remote, error: Option<String>) {
        if let Some(sync) = &mut self.sync {
            sync.applied(change, error);
        }
    }

    /// A change lbctl made here: to etcd, with `[sync]`.
    pub(crate) fn publish(&mut self, edit: &lb_config::state::Edit) {
        if let Some(sync) = &mut self.sync {
            sync.publish(edit);
        }
    }

    pub(crate) fn sync_status(&self) -> Option<Box<lb_config::protocol::SyncStatus>> {
        self.sync.as_ref().map(|s| Box::new(s.status()))
    }

    /// The backends the workers are told are down.
    pub(crate) fn down(&self) -> &[(String, SocketAddr)] {
        &self.down
    }

    /// The etcd revision read so far, for the next lbd.
    pub(crate) fn sync_revision(&self) -> Option<u64> {
        self.sync.as_ref().map(Sync::revision)
    }
}

impl Observer {
    /// One turn: health checks, health pushes, the exporter.
    pub(crate) fn turn(&mut self, workers: &mut Workers, config: &Config, stopping: bool) {
        self.health.sync(config);
        self.health.poll();
        self.push_health(workers);
        self.keep_exporter(config);
        if let Some(exporter) = &self.exporter {
            let pending = exporter.pending();
            if !pending.is_empty() {
                let text = crate::metrics::render(&self.gather(workers, config, stopping));
                for scrape in pending {
                    let _ = scrape.try_send(text.clone());
                }
            }
        }
    }

    /// The backends found down, for the handoff of an upgrade.
    pub(crate) fn health_down(&self) -> Vec<(String, SocketAddr)> {
        self.health.down()
    }

    /// Starts the health checks of the running config with `down` marked down (what the
    /// previous lbd found), before the first workers start.
    pub(crate) fn seed_health(&mut self, config: &Config, down: &[(String, SocketAddr)]) {
        self.health.sync(config);
        self.health.assume_down(down);
    }

    /// `lbctl metrics`: every sample of lbd and its workers.
    pub(crate) fn all_samples(
        &mut self,
        workers: &mut Workers,
        config: &Config,
        stopping: bool,
    ) -> Vec<Sample> {
        self.gather(workers, config, stopping)
    }

    /// The backends table of `lbctl status`.
    /// With, for each backend, how many workers keep it ejected (asked of each worker, which
    /// answers at once; a worker that does not within [`STATUS_TIMEOUT`] counts for none).
    pub(crate) fn health_rows(&self, workers: &mut Workers, config: &Config) -> Vec<BackendHealth> {
        let mut rows = self.health.rows(config);
        for (index, _, answer) in workers.ask_all(&Order::Ejected, STATUS_TIMEOUT) {
            let ejected = match expect(answer, |r| match r {
                Reply::Ejected { backends } => Ok(backends),
                other => Err(other),
            }) {
                Ok(ejected) => ejected,
                Err(e) => {
                    log::warn!("worker {index}: no ejected backends for lbctl status: {e}");
                    continue;
                }
            };
            for row in &mut rows {
                if ejected
                    .iter()
                    .any(|(c, a)| *c == row.cluster && a.to_string() == row.address)
                {
                    row.ejected_by += 1;
                }
            }
        }
        rows
    }

    /// `lbctl log-level LEVEL`: main's level, every worker's, and the level workers started
    /// from now on get.
    pub(crate) fn set_log_level(
        &mut self,
        workers: &mut Workers,
        level: &str,
    ) -> Result<Payload, LogLevelError> {
        let filter: log::LevelFilter = level
            .parse()
            .map_err(|_| LogLevelError::Unknown(level.to_owned()))?;
        log::set_max_level(filter);
        workers.log_level = filter;
        let filter = filter.as_str().to_ascii_lowercase();
        let order = Order::LogLevel {
            level: filter.clone(),
        };
        let mut applied = 0;
        let mut failed = Vec::new();
        for (index, _, answer) in workers.ask_all(&order, METRICS_TIMEOUT) {
            match expect(answer, |r| match r {
                Reply::Done => Ok(()),
                other => Err(other),
            }) {
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
            Err(LogLevelError::Partly {
                level: filter,
                applied,
                failed: failed.join("; "),
            })
        }
    }

    fn push_health(&mut self, workers: &mut Workers) {
        let down = match &mut self.sync {
            Some(sync) => sync.down(&self.health.verdicts()),
            None => self.health.down(),
        };
        if down != self.down {
            self.down = down;
            self.down_version += 1;
        }
        let version = self.down_version;
        let down = &self.down;
        let mut live = Vec::new();
        for (index, pid, channel) in workers.channels() {
            live.push(index);
            // A worker process not told anything yet knows of no backend down.
            let needs = match self.pushed.get(&index) {
                Some(&(p, v)) if p == pid => v != version,
                _ => !down.is_empty(),
            };
            if !needs {
                self.pushed.insert(index, (pid, version));
                continue;
            }
            match channel.send(Order::Health { down: down.clone() }) {
                Ok(_) => {
                    self.pushed.insert(index, (pid, version));
                }
                Err(e) => log::warn!("worker {index}: cannot send the health state: {e}"),
            }
        }
        self.pushed.retain(|i, _| live.contains(i));
    }

    fn keep_exporter(&mut self, config: &Config) {
        let wanted = config.metrics.as_ref().map(|m| m.address);
        if self.exporter.as_ref().map(Exporter::address) == wanted {
            return;
        }
        let Some(address) = wanted else {
            // The exporter thread keeps its socket until lbd exits; it serves nothing more.
            self.exporter = None;
            return;
        };
        if let Some((failed, at)) = self.bind_failed {
            if failed == address && at.elapsed() < REBIND_EVERY {
                return;
            }
        }
        match Exporter::start(address) {
            Ok(exporter) => {
                log::info!("metrics served at http://{address}/metrics");
                self.exporter = Some(exporter);
                self.bind_failed = None;
            }
            Err(e) => {
                if self.bind_failed.is_none_or(|(a, _)| a != address) {
                    log::warn!(
                        "metrics: cannot listen on {address}: {e} (trying again every second)"
                    );
                }
                self.bind_failed = Some((address, Instant::now()));
            }
        }
    }

    /// Every sample: steering, health, worker slots, and the workers' own.
    fn gather(&mut self, workers: &mut Workers, config: &Config, stopping: bool) -> Vec<Sample> {
        let mut polled = workers.steering_figures(config, &self.recorder);
        self.recorder.register(|| {
            for row in workers.rows(stopping) {
                let c = counter!("kakehi_worker_restarts_total", "worker" => row.index.to_string());
                c.absolute(row.restarts);
                polled.push(c);
            }
        });
        // The previous scrape's handles go only now, so that a figure read again keeps its
        // value in the registry.
        self.polled = polled;
        let mut merged = Merged::default();
        merged.add(self.recorder.samples());
        let live: HashMap<usize, u32> = workers
            .channels()
            .into_iter()
            .map(|(index, pid, _)| (index, pid))
            .collect();
        let gone: Vec<usize> = self
            .last
            .iter()
            .filter(|(index, (pid, _))| live.get(index) != Some(pid))
            .map(|(index, _)| *index)
            .collect();
        for index in gone {
            if let Some((_, samples)) = self.last.remove(&index) {
                self.retired.add(samples);
            }
        }
        for (index, pid, answer) in workers.ask_all(&Order::Metrics, METRICS_TIMEOUT) {
            let samples = match expect(answer, |r| match r {
                Reply::Metrics { samples } => Ok(samples),
                other => Err(other),
            }) {
                Ok(samples) => samples,
                Err(e) => {
                    log::warn!("worker {index}: no metrics: {e}");
                    continue;
                }
            };
            let (samples, left_out) = crate::answers::worker_samples(samples, index);
            if left_out > 0 {
                log::warn!(
                    "worker {index}: left out {left_out} metric samples whose names are not Prometheus names",
                );
            }
            let counters = samples.iter().filter(|s| is_counter(&s.name)).cloned();
            self.last.insert(index, (pid, counters.collect()));
            merged.add(samples);
        }
        merged.add(self.retired.samples().iter().cloned());
        merged.into_samples()
    }
}

/// The reply `pick` takes from a worker's answer; a refusal or another reply is an error.
fn expect<T>(
    answer: Result<Reply, Unanswered>,
    pick: impl FnOnce(Reply) -> Result<T, Reply>,
) -> Result<T, Unexpected> {
    match pick(answer?) {
        Ok(value) => Ok(value),
        Err(Reply::Refused { error }) => Err(Unexpected::Refused { error }),
        Err(other) => Err(Unexpected::Other(Box::new(other))),
    }
}

/// Counters and histogram parts: what only grows, and adds up across processes over time.
fn is_counter(name: &str) -> bool {
    ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}
