//! The supervisor: lbd's main process. It binds every listener once per worker (one
//! SO_REUSEPORT group per listener address), starts `workers` worker processes (`lbd worker`,
//! fork+exec of the same binary) with their sockets and the config, restarts a worker that
//! exits or is killed on the very same sockets, and on SIGTERM or SIGINT asks every worker to
//! drain, waits for them, and exits 0.
//!
//! The supervisor keeps its own copy of every listening socket, so a worker's death closes
//! none of them: connections waiting in a dead worker's accept queue stay there until its
//! replacement accepts them.

use crate::command::CommandServer;
use crate::fds;
use crate::listeners;
use crate::steering::Steering;
use anyhow::Context as _;
use lb_config::state::State;
use lb_config::{Config, SteeringPolicy};
use lb_ebpf_common::{counter, Policy, WorkerState};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long workers get to finish in-flight requests on shutdown (their own drain deadline
/// is shorter; this is the supervisor's last word before SIGKILL).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// A worker that dies sooner than this after its start is restarted with a growing delay.
const STABLE_AFTER: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct Slot {
    pid: Option<Pid>,
    started: Instant,
    backoff: Duration,
    start_at: Option<Instant>,
    /// The supervisor's end of the worker's channel (configuration updates).
    channel: Option<UnixStream>,
    restarts: u64,
}

pub struct Supervisor {
    config: Config,
    /// The running configuration as a document: the file plus every lbctl change since.
    state: State,
    source: PathBuf,
    started: Instant,
    stop: Option<bool>,
    config_file: File,
    /// `sockets[listener][worker]`: all sockets of one listener share its reuseport group.
    sockets: Vec<Vec<TcpListener>>,
    /// With `steering = "ebpf"`: the program of each listener's group, by listener index.
    steering: Vec<Steering>,
    slots: Vec<Slot>,
    exe: PathBuf,
    log_level: log::LevelFilter,
}

impl Supervisor {
    /// Binds every listener for every worker. Nothing is started yet.
    pub fn new(
        config: Config,
        state: State,
        source: &Path,
        log_level: log::LevelFilter,
    ) -> anyhow::Result<Supervisor> {
        let config_text = state.to_toml();
        let mut sockets = Vec::new();
        for listener in &config.listeners {
            let group = (0..config.workers)
                .map(|_| listeners::bind(listener.address))
                .collect::<anyhow::Result<Vec<_>>>()?;
            sockets.push(group);
        }
        let steering = match config.steering {
            lb_config::Steering::Kernel => Vec::new(),
            lb_config::Steering::Ebpf => load_steering(&config, &sockets)?,
        };
        let config_file = fds::memfd_with(&config_text)?;
        let exe = std::env::current_exe().context("locating the lbd binary for workers")?;
        let slots = (0..config.workers)
            .map(|_| Slot {
                pid: None,
                started: Instant::now(),
                backoff: Duration::from_millis(100),
                start_at: Some(Instant::now()),
                channel: None,
                restarts: 0,
            })
            .collect();
        Ok(Supervisor {
            config,
            state,
            source: source.to_path_buf(),
            started: Instant::now(),
            stop: None,
            config_file,
            sockets,
            steering,
            slots,
            exe,
            log_level,
        })
    }

    pub fn addresses(&self) -> Vec<std::net::SocketAddr> {
        self.config.listeners.iter().map(|l| l.address).collect()
    }

    /// The supervisor's signals, to install before anything is bound: a SIGTERM that
    /// arrives while lbd starts must stop it cleanly, not kill it.
    pub fn signals() -> anyhow::Result<signal_hook::iterator::Signals> {
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGCHLD])
            .context("installing the signal handlers")
    }

    /// Runs until SIGTERM/SIGINT or `lbctl shutdown`, then drains the workers and returns.
    /// Requests on the command socket are answered between the checks.
    pub fn run(
        &mut self,
        signals: &mut signal_hook::iterator::Signals,
        commands: &CommandServer,
    ) -> anyhow::Result<()> {
        loop {
            for signal in signals.pending() {
                if signal == SIGTERM || signal == SIGINT {
                    self.stop.get_or_insert(false);
                }
            }
            self.reap(false);
            if let Some(hard) = self.stop {
                return self.shutdown(hard);
            }
            self.start_due()?;
            commands.poll_timeout(self, Duration::from_millis(20));
        }
    }

    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn source(&self) -> &Path {
        &self.source
    }

    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn request_stop(&mut self, hard: bool) {
        self.stop = Some(hard);
    }

    /// The running workers' channels: (index, pid, channel).
    pub(crate) fn channels(&mut self) -> Vec<(usize, u32, &mut UnixStream)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| {
                let pid = s.pid?.as_raw() as u32;
                s.channel.as_mut().map(|c| (i, pid, c))
            })
            .collect()
    }

    pub(crate) fn channel(&mut self, index: usize) -> Option<&mut UnixStream> {
        self.slots.get_mut(index).and_then(|s| s.channel.as_mut())
    }

    /// Every worker slot: pid, state, live connections (known with eBPF steering), restarts.
    pub(crate) fn worker_rows(&self) -> Vec<lb_config::protocol::WorkerStatus> {
        use lb_config::protocol::WorkerState as Row;
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let state = match (s.pid, self.stop.is_some()) {
                    (Some(_), true) => Row::Draining,
                    (Some(_), false) => Row::Running,
                    (None, true) => Row::Stopped,
                    (None, false) => Row::Restarting,
                };
                let live = self.steering.iter().try_fold(0u64, |sum, st| {
                    st.worker_state(i as u32)
                        .ok()
                        .map(|w| sum + u64::from(w.live))
                });
                lb_config::protocol::WorkerStatus {
                    index: i,
                    pid: s.pid.map(|p| p.as_raw() as u32),
                    state,
                    connections: if self.steering.is_empty() { None } else { live },
                    restarts: s.restarts,
                }
            })
            .collect()
    }

    /// Steering decisions and drops as metric samples.
    pub(crate) fn samples(&self) -> Vec<lb_config::protocol::Sample> {
        let mut out = Vec::new();
        for (steering, listener) in self.steering.iter().zip(&self.config.listeners) {
            let Ok(counters) = steering.counters() else {
                continue;
            };
            let get = |i: u32| counters.get(i as usize).copied().unwrap_or(0) as f64;
            let sample =
                |name: &str, labels: &[(&str, String)], value: f64| lb_config::protocol::Sample {
                    name: name.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| ((*k).to_string(), v.clone()))
                        .collect(),
                    value,
                };
            let address = listener.address.to_string();
            for w in 0..self.slots.len() as u32 {
                out.push(sample(
                    "kakehi_steering_decisions_total",
                    &[("listener", address.clone()), ("worker", w.to_string())],
                    get(counter::DECISIONS + w),
                ));
            }
            for (reason, index) in [
                ("all_full", counter::DROPS_ALL_FULL),
                ("no_worker", counter::DROPS_NO_WORKER),
            ] {
                out.push(sample(
                    "kakehi_steering_drops_total",
                    &[("listener", address.clone()), ("reason", reason.into())],
                    get(index),
                ));
            }
        }
        out
    }

    /// Carries a new steering policy and connection limit into the eBPF programs.
    pub(crate) fn update_steering(&mut self, config: &Config) {
        let policy = policy_of(config.steering_policy);
        let limit = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
        for (listener, steering) in self.steering.iter_mut().enumerate() {
            if let Err(e) = steering.set_policy(policy) {
                log::error!("listener {listener}: cannot set the steering policy: {e}");
            }
            for (index, slot) in self.slots.iter().enumerate() {
                let Ok(index) = u32::try_from(index) else {
                    continue;
                };
                if slot.pid.is_none() {
                    continue;
                }
                // Keep the live count the worker publishes; only the limit changes.
                let live = steering.worker_state(index).map(|w| w.live).unwrap_or(0);
                let state = WorkerState::active(limit).with_live(live);
                if let Err(e) = steering.set_worker_state(index, state) {
                    log::error!("listener {listener}: cannot set worker {index}'s limit: {e}");
                }
            }
        }
    }

    /// Makes `state` the running state; workers started from now on get its text.
    pub(crate) fn replace_state(
        &mut self,
        state: State,
        config: Config,
        text: &str,
    ) -> anyhow::Result<()> {
        self.config_file = fds::memfd_with(text)?;
        self.state = state;
        self.config = config;
        Ok(())
    }

    fn start_due(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let due = self
                .slots
                .get(index)
                .is_some_and(|s| s.pid.is_none() && s.start_at.is_some_and(|t| t <= now));
            if due {
                self.spawn(index)?;
            }
        }
        Ok(())
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let mut command = Command::new(&self.exe);
        command
            .arg("--log-level")
            .arg(self.log_level.as_str())
            .arg("worker")
            .arg("--index")
            .arg(index.to_string())
            .arg("--source")
            .arg(&self.source)
            .arg("--config-fd")
            .arg(fds::raw(&self.config_file).to_string());
        let (ours, theirs) = UnixStream::pair().context("creating the worker's channel")?;
        command
            .arg("--channel-fd")
            .arg(fds::raw(&theirs).to_string());
        let mut inherited = vec![fds::raw(&self.config_file), fds::raw(&theirs)];
        for group in &self.sockets {
            let socket = group
                .get(index)
                .context("internal: no socket for this worker")?;
            command
                .arg("--listener-fd")
                .arg(fds::raw(socket).to_string());
            inherited.push(fds::raw(socket));
        }
        for steering in &self.steering {
            let fd = fds::raw(&steering.workers_fd()?);
            command.arg("--workers-map-fd").arg(fd.to_string());
            inherited.push(fd);
        }
        fds::inherit_fds(&mut command, inherited);
        let child = command
            .spawn()
            .with_context(|| format!("starting worker {index} ({})", self.exe.display()))?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child is reaped with waitpid in `reap`; the handle is not needed.
        drop(child);
        drop(theirs);
        if let Some(slot) = self.slots.get_mut(index) {
            slot.channel = Some(ours);
            slot.pid = Some(pid);
            slot.started = Instant::now();
            slot.start_at = None;
        }
        // Connections steered to it wait in its socket's queue until it accepts.
        let limit = u32::try_from(self.config.max_connections).unwrap_or(u32::MAX);
        self.set_worker_state(index, WorkerState::active(limit));
        log::info!("worker {index} started (pid {pid})");
        Ok(())
    }

    /// Collects exited workers; unless `stopping`, schedules their restart.
    fn reap(&mut self, stopping: bool) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let (pid, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exited with status {code}")),
                WaitStatus::Signaled(pid, signal, _) => (pid, format!("was killed by {signal}")),
                _ => continue,
            };
            let Some(index) = self.slots.iter().position(|s| s.pid == Some(pid)) else {
                continue;
            };
            if stopping {
                if let Some(slot) = self.slots.get_mut(index) {
                    slot.pid = None;
                    slot.channel = None;
                }
                log::info!("worker {index} (pid {pid}) {how}");
                continue;
            }
            // Until its replacement runs, new connections go to the other workers.
            self.set_worker_state(index, WorkerState::default());
            let Some(slot) = self.slots.get_mut(index) else {
                continue;
            };
            slot.pid = None;
            slot.channel = None;
            slot.restarts += 1;
            let lived = slot.started.elapsed();
            if lived >= STABLE_AFTER {
                slot.backoff = Duration::from_millis(100);
                slot.start_at = Some(Instant::now());
            } else {
                slot.start_at = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
            }
            log::warn!(
                "worker {index} (pid {pid}) {how} after {lived:?}; restarting it on the same sockets"
            );
        }
    }

    fn set_worker_state(&mut self, index: usize, state: WorkerState) {
        let Ok(index) = u32::try_from(index) else {
            return;
        };
        for (listener, steering) in self.steering.iter_mut().enumerate() {
            if let Err(e) = steering.set_worker_state(index, state) {
                log::error!("listener {listener}: cannot set worker {index}'s steering state: {e}");
            }
        }
    }

    /// The kernel program's decisions and drops, per listener, in lbd's log.
    fn log_counters(&self) {
        for (steering, listener) in self.steering.iter().zip(&self.config.listeners) {
            let Ok(counters) = steering.counters() else {
                continue;
            };
            let get = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
            let decisions: Vec<String> = (0..self.slots.len() as u32)
                .map(|w| get(counter::DECISIONS + w).to_string())
                .collect();
            log::info!(
                "steering {}: decisions per worker [{}], dropped all-full {}, dropped no-worker {}, select failed {}",
                listener.address,
                decisions.join(", "),
                get(counter::DROPS_ALL_FULL),
                get(counter::DROPS_NO_WORKER),
                get(counter::SELECT_FAILED)
            );
        }
    }

    fn shutdown(&mut self, hard: bool) -> anyhow::Result<()> {
        log::info!("stopping: draining {} workers", self.slots.len());
        // No worker takes new connections any more: the program refuses them in the kernel.
        for index in 0..self.slots.len() {
            let limit = u32::try_from(self.config.max_connections).unwrap_or(u32::MAX);
            self.set_worker_state(index, WorkerState::active(limit).draining());
        }
        self.log_counters();
        // Close our copies of the listening sockets: once the workers close theirs, new
        // connections are refused by the kernel instead of queueing for nobody.
        self.sockets.clear();
        let signal = if hard {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        for slot in &self.slots {
            if let Some(pid) = slot.pid {
                let _ = kill(pid, signal);
            }
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while self.slots.iter().any(|s| s.pid.is_some()) && Instant::now() < deadline {
            self.reap(true);
            std::thread::sleep(Duration::from_millis(20));
        }
        for slot in &mut self.slots {
            if let Some(pid) = slot.pid.take() {
                log::warn!("worker pid {pid} did not stop in time: killing it");
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
        }
        Ok(())
    }
}

/// Loads one steering program per listener group, fills its socket slots (worker i's socket
/// of that listener in slot i) and attaches it. Workers stay inactive until they start.
fn load_steering(config: &Config, sockets: &[Vec<TcpListener>]) -> anyhow::Result<Vec<Steering>> {
    let policy = policy_of(config.steering_policy);
    let workers = u32::try_from(config.workers).context("too many workers")?;
    let mut out = Vec::new();
    for (listener, group) in config.listeners.iter().zip(sockets) {
        let what = || {
            format!(
                "listener {}: eBPF steering (steering = \"ebpf\"; \"kernel\" uses plain reuseport hashing)",
                listener.address
            )
        };
        let mut steering = Steering::load(policy, workers).with_context(what)?;
        for (index, socket) in group.iter().enumerate() {
            let index = u32::try_from(index).context("too many workers")?;
            steering
                .set_worker_socket(index, socket)
                .with_context(what)?;
        }
        let first = group.first().context("a listener without sockets")?;
        steering.attach(first).with_context(what)?;
        log::info!(
            "listener {}: eBPF steering attached ({:?}, {} workers)",
            listener.address,
            policy,
            workers
        );
        out.push(steering);
    }
    Ok(out)
}

fn policy_of(policy: SteeringPolicy) -> Policy {
    match policy {
        SteeringPolicy::FlowHash => Policy::FlowHash,
        SteeringPolicy::LeastConnections => Policy::LeastConnections,
        SteeringPolicy::PowerOfTwo => Policy::PowerOfTwo,
    }
}
