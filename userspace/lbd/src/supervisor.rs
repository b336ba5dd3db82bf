//! The supervisor: lbd's main process. It binds every listener once per worker (one
//! SO_REUSEPORT group per listener address), starts `workers` worker processes (`lbd worker`,
//! fork+exec of the same binary) with their sockets and the config, restarts a worker that
//! exits or is killed on the very same sockets, and on SIGTERM or SIGINT asks every worker to
//! drain, waits for them, and exits 0.
//!
//! The supervisor keeps its own copy of every listening socket, so a worker's death closes
//! none of them: connections waiting in a dead worker's accept queue stay there until its
//! replacement accepts them.

use crate::command::{CommandServer, Pauser};
use crate::fds;
use crate::listeners;
use crate::steering::Steering;
use crate::upgrade::{self, FdRole, Handoff, Reply};
use anyhow::Context as _;
use lb_config::protocol::Payload;
use lb_config::state::State;
use lb_config::{Config, SteeringPolicy};
use lb_ebpf_common::{counter, Policy, WorkerState};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use std::fs::File;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// On top of `timeouts.drain` (the workers' own deadline), how long the supervisor waits for
/// stopping workers before SIGKILL.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);
/// A worker that dies sooner than this after its start is restarted with a growing delay (it
/// cannot start, or dies at its first request: a loop to slow down). One that ran longer is
/// restarted at once, so its slot serves again within a turn of main's loop (~20 ms): a
/// worker killed by the OOM killer or an operator is not a crash loop.
const STABLE_AFTER: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a new generation (new workers, or a new lbd with its workers) gets to become
/// ready before the upgrade is rolled back.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the supervisor leaves its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM, SIGINT or `lbctl shutdown`: drain the workers, then exit.
    Drain,
    /// `lbctl shutdown --hard`.
    Hard,
    /// `lbctl upgrade` succeeded: the next lbd serves; retire this one's workers, exit.
    HandedOver,
}

/// Environment variable for tests: while the file it names exists, starting a worker fails.
pub const START_FAILS: &str = "KAKEHI_TEST_WORKER_START_FAILS";

/// What a roll of the workers did: the new (slot, pid) pairs and the retired pids.
type Rolled = (Vec<(usize, Pid)>, Vec<Pid>);

/// How [`Supervisor::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped: every worker is gone and the sockets are closed.
    Stopped,
    /// Upgraded: the next lbd serves the same sockets and the command socket; hand the
    /// command server over without removing its file.
    HandedOver,
}

struct Slot {
    pid: Option<Pid>,
    started: Instant,
    backoff: Duration,
    start_at: Option<Instant>,
    /// The supervisor's end of the worker's channel (configuration updates).
    channel: Option<UnixStream>,
    /// The read end of the worker's trace pipe: the syscall its sandbox refused, if it did.
    trace: Option<File>,
    /// Since when the worker's channel is closed while the worker still runs.
    closed_since: Option<Instant>,
    restarts: u64,
}

pub struct Supervisor {
    config: Config,
    /// The running configuration as a document: the file plus every lbctl change since.
    state: State,
    source: PathBuf,
    started: Instant,
    stop: Option<Stop>,
    /// Bumped by each upgrade (the first lbd is generation 1).
    generation: u64,
    /// Workers of a previous generation (or a rolled-back one) finishing their requests.
    retiring: Vec<Pid>,
    /// A duplicate of the command socket, and its server's pause switch, for an upgrade.
    command: Option<(OwnedFd, Pauser)>,
    config_file: File,
    /// `sockets[listener][worker]`: all sockets of one listener share its reuseport group.
    sockets: Vec<Vec<TcpListener>>,
    /// With `steering = "ebpf"`: the program of each listener's group, by listener index.
    steering: Vec<Steering>,
    slots: Vec<Slot>,
    /// Where this lbd's binary is: the default of `lbctl upgrade` (a new binary put there).
    exe: PathBuf,
    /// What workers run: this lbd's own binary, held open (or a workers-only upgrade's).
    worker_binary: fds::Binary,
    /// What workers are started with (`lbctl log-level` changes it).
    pub(crate) log_level: log::LevelFilter,
    /// Health checks, health pushes to workers, the metrics exporter (observe.rs).
    pub(crate) observer: crate::observe::Observer,
}

impl Supervisor {
    /// Binds every listener for every worker. Nothing is started yet.
    pub fn new(
        config: Config,
        state: State,
        source: &Path,
        log_level: log::LevelFilter,
    ) -> anyhow::Result<Supervisor> {
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
        Supervisor::assemble(config, state, source, log_level, sockets, steering, 1)
    }

    /// Takes over what the previous lbd handed over (its sockets and steering program, its
    /// running state); this one is the next generation. Nothing is started yet.
    pub fn adopt(
        handed: upgrade::Handed,
        log_level: log::LevelFilter,
    ) -> anyhow::Result<(Supervisor, std::os::unix::net::UnixListener)> {
        let upgrade::Handed {
            generation,
            source,
            state,
            config,
            command,
            sockets,
            steering,
            down,
            ..
        } = handed;
        let mut supervisor = Supervisor::assemble(
            config,
            state,
            &source,
            log_level,
            sockets,
            steering,
            generation + 1,
        )?;
        supervisor.seed_health(&down);
        Ok((supervisor, command))
    }

    fn assemble(
        config: Config,
        state: State,
        source: &Path,
        log_level: log::LevelFilter,
        sockets: Vec<Vec<TcpListener>>,
        mut steering: Vec<Steering>,
        generation: u64,
    ) -> anyhow::Result<Supervisor> {
        let config_file = fds::memfd_with(&state.to_toml())?;
        let exe = std::env::current_exe().context("locating the lbd binary for workers")?;
        let worker_binary = fds::Binary::current()
            .context("opening the lbd binary (/proc/self/exe) for workers")?;
        for st in &mut steering {
            // Informational (the program ignores it): which generation drives the maps.
            let _ = st.set_generation(u32::try_from(generation).unwrap_or(u32::MAX));
        }
        let slots = (0..config.workers)
            .map(|_| Slot {
                pid: None,
                started: Instant::now(),
                backoff: Duration::from_millis(100),
                start_at: Some(Instant::now()),
                channel: None,
                trace: None,
                closed_since: None,
                restarts: 0,
            })
            .collect();
        Ok(Supervisor {
            config,
            state,
            source: source.to_path_buf(),
            started: Instant::now(),
            stop: None,
            generation,
            retiring: Vec::new(),
            command: None,
            config_file,
            sockets,
            steering,
            slots,
            exe,
            worker_binary,
            log_level,
            observer: crate::observe::Observer::default(),
        })
    }

    /// Gives the supervisor what an upgrade hands over of the command socket.
    pub fn set_command_socket(&mut self, commands: &CommandServer) -> anyhow::Result<()> {
        let fd = commands
            .listener()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the command socket")?;
        self.command = Some((fd, commands.pauser()));
        Ok(())
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
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
    ) -> anyhow::Result<Exit> {
        loop {
            for signal in signals.pending() {
                if signal == SIGTERM || signal == SIGINT {
                    self.stop.get_or_insert(Stop::Drain);
                }
            }
            self.reap(false);
            self.police_channels();
            match self.stop {
                Some(Stop::HandedOver) => {
                    self.retire_all();
                    return Ok(Exit::HandedOver);
                }
                Some(stop) => {
                    self.shutdown(stop == Stop::Hard)?;
                    return Ok(Exit::Stopped);
                }
                None => {}
            }
            self.start_due();
            self.observe();
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
        self.stop = Some(if hard { Stop::Hard } else { Stop::Drain });
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

    /// Starts the workers whose time has come. One that cannot be started (fork, exec or a
    /// descriptor failed) is tried again with the same growing delay as one that keeps dying:
    /// main never stops serving for a worker.
    fn start_due(&mut self) {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let due = self
                .slots
                .get(index)
                .is_some_and(|s| s.pid.is_none() && s.start_at.is_some_and(|t| t <= now));
            if !due {
                continue;
            }
            if let Err(e) = self.spawn(index) {
                let Some(slot) = self.slots.get_mut(index) else {
                    continue;
                };
                let delay = slot.backoff;
                slot.start_at = Some(Instant::now() + delay);
                slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
                log::error!("cannot start worker {index}: {e:#}; trying again in {delay:?}");
            }
        }
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let (pid, channel, trace) = self.start_worker(index, &self.worker_binary)?;
        if let Some(slot) = self.slots.get_mut(index) {
            slot.channel = Some(channel);
            slot.trace = Some(trace);
            slot.closed_since = None;
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

    /// Starts worker `index` from `binary` on this supervisor's sockets; returns its pid, the
    /// supervisor's end of its channel and of its trace pipe. The slot is not touched.
    fn start_worker(
        &self,
        index: usize,
        binary: &fds::Binary,
    ) -> anyhow::Result<(Pid, UnixStream, File)> {
        if let Some(path) = std::env::var_os(START_FAILS) {
            // Test-only: a worker that cannot be started, for as long as the file exists.
            if Path::new(&path).exists() {
                anyhow::bail!("{START_FAILS}: {} exists", Path::new(&path).display());
            }
        }
        let exe = binary.path();
        let mut command = binary.command();
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
        let (trace, trace_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .context("creating the worker's trace pipe")?;
        command
            .arg("--trace-fd")
            .arg(fds::raw(&trace_end).to_string());
        let mut inherited = vec![
            fds::raw(&self.config_file),
            fds::raw(&theirs),
            fds::raw(&trace_end),
        ];
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
            .with_context(|| format!("starting worker {index} ({})", exe.display()))?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child is reaped with waitpid in `reap`; the handle is not needed.
        drop(child);
        drop(theirs);
        drop(trace_end);
        Ok((pid, ours, File::from(trace)))
    }

    /// Collects exited workers; unless `stopping`, schedules their restart.
    fn reap(&mut self, stopping: bool) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let (pid, mut how) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exited with status {code}")),
                WaitStatus::Signaled(pid, signal, _) => (pid, format!("was killed by {signal}")),
                _ => continue,
            };
            if let WaitStatus::Signaled(_, Signal::SIGSYS, _) = status {
                // The sandbox refused a syscall: the worker's SIGSYS handler named it on its
                // trace pipe just before it died.
                let trace = self
                    .slots
                    .iter()
                    .find(|s| s.pid == Some(pid))
                    .and_then(|s| s.trace.as_ref());
                how = format!("{how} ({})", crate::sandbox::describe_violation(trace));
            }
            let Some(index) = self.slots.iter().position(|s| s.pid == Some(pid)) else {
                if let Some(at) = self.retiring.iter().position(|&p| p == pid) {
                    self.retiring.swap_remove(at);
                    log::info!("retired worker (pid {pid}) {how}");
                }
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

    /// Between two commands nobody waits for an answer on a worker's channel: whatever is there
    /// is late, and is dropped (a bounded amount per turn). A channel found closed (main shut
    /// it when a frame was cut in half, or the worker closed it) means the worker must leave
    /// within the drain timeout; one still there after it (stopped, or stuck in a loop) is
    /// killed, and restarted like any dead worker.
    fn police_channels(&mut self) {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd as _;
        const TURN_BUDGET: usize = 4;
        let grace = self.config.timeouts.drain + SHUTDOWN_SLACK;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let (Some(pid), Some(channel)) = (slot.pid, slot.channel.as_ref()) else {
                continue;
            };
            let mut closed = false;
            let mut buf = [0u8; 16 << 10];
            for _ in 0..TURN_BUDGET {
                match recv(channel.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => log::debug!("worker {index}: dropped {n} bytes of late answers"),
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if !closed {
                slot.closed_since = None;
                continue;
            }
            let since = *slot.closed_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= grace {
                log::warn!(
                    "worker {index} (pid {pid}): its channel closed {:?} ago and it is still running: killing it",
                    since.elapsed()
                );
                let _ = kill(pid, Signal::SIGKILL);
                slot.closed_since = None;
            }
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
        let deadline = Instant::now() + self.config.timeouts.drain + SHUTDOWN_SLACK;
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
    config
        .listeners
        .iter()
        .zip(sockets)
        .map(|(listener, group)| load_group(config, listener, group))
        .collect()
}

/// Loads the steering program of one listener's group, fills its socket slots and attaches
/// it. Workers stay inactive until they start.
fn load_group(
    config: &Config,
    listener: &lb_config::Listener,
    group: &[TcpListener],
) -> anyhow::Result<Steering> {
    let policy = policy_of(config.steering_policy);
    let workers = u32::try_from(config.workers).context("too many workers")?;
    {
        let what = || {
            format!(
                "listener {}: eBPF steering (steering = \"ebpf\"; \"kernel\" uses plain reuseport hashing)",
                listener.address
            )
        };
        let mut steering =
            Steering::load(policy, workers).map_err(|e| cannot_load(listener.address, &e))?;
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
        Ok(steering)
    }
}

/// One line for an operator whose lbd cannot load its steering program: what is missing,
/// and that `steering = "kernel"` runs without it. The kernel's own words end the line; a
/// verifier log (a program the kernel refused, which no setting fixes) follows it.
fn cannot_load(
    address: std::net::SocketAddr,
    error: &crate::steering::SteeringError,
) -> anyhow::Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut errno = None;
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            errno = io.raw_os_error();
        }
        cause = e.source();
    }
    let missing = match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "the privilege to load eBPF programs (CAP_BPF and CAP_PERFMON, which root has)"
        }
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
            "kernel support for BPF sk_reuseport programs (Linux 5.8 or newer with the bpf() syscall)"
        }
        _ => "a steering program the kernel accepts",
    };
    let first = match error {
        crate::steering::SteeringError::Load { io_error, .. } => io_error.to_string(),
        other => other.to_string(),
    };
    let mut line = format!(
        "listener {address}: eBPF steering (the default) cannot start: lbd lacks {missing}; \
         set steering = \"kernel\" to run without eBPF (plain SO_REUSEPORT hashing) [{first}]"
    );
    if let crate::steering::SteeringError::Load { verifier_log, .. } = error {
        line.push_str("\nverifier log:\n");
        line.push_str(verifier_log);
    }
    anyhow::Error::msg(line)
}

fn policy_of(policy: SteeringPolicy) -> Policy {
    match policy {
        SteeringPolicy::FlowHash => Policy::FlowHash,
        SteeringPolicy::LeastConnections => Policy::LeastConnections,
        SteeringPolicy::PowerOfTwo => Policy::PowerOfTwo,
    }
}

/// Upgrades: a new generation of workers (`lbctl upgrade --workers-only`), or a new lbd
/// (`lbctl upgrade`, see upgrade.rs for the handoff protocol).
impl Supervisor {
    /// Starts every worker and waits until each answers on its channel (it is then in its
    /// event loop, sandboxed, accepting). Used by a new lbd before it says "ready".
    pub fn start_generation(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        for index in 0..self.slots.len() {
            self.spawn(index)
                .map_err(|e| format!("starting worker {index}: {e:#}"))?;
        }
        let text = self.state.to_toml();
        for index in 0..self.slots.len() {
            let pid = self.slots.get(index).and_then(|s| s.pid);
            let channel = self
                .slots
                .get_mut(index)
                .and_then(|s| s.channel.as_mut())
                .ok_or_else(|| format!("worker {index} has no channel"))?;
            probe(channel, &text, deadline).map_err(|e| {
                format!(
                    "worker {index} (pid {}) did not become ready: {e}",
                    pid.map_or(0, Pid::as_raw)
                )
            })?;
        }
        Ok(())
    }

    /// `lbctl upgrade --workers-only`: starts a new worker for every slot from `exe` on the
    /// same sockets, waits until all are ready, then retires the old ones (they stop
    /// accepting, finish their requests and exit). If any new worker fails, the new ones are
    /// retired instead and the old ones keep serving.
    pub(crate) fn roll_workers(&mut self, exe: Option<PathBuf>) -> Result<Payload, String> {
        let exe = exe.unwrap_or_else(|| self.exe.clone());
        check_executable(&exe)?;
        let binary =
            fds::Binary::open(&exe).map_err(|e| format!("cannot open {}: {e}", exe.display()))?;
        let text = self.state.to_toml();
        let (new, old) = self.roll(&binary, &text)?;
        let new: Vec<String> = new.iter().map(|(_, pid)| pid.to_string()).collect();
        let old: Vec<String> = old.iter().map(Pid::to_string).collect();
        log::info!(
            "workers upgraded from {}: new pids [{}], old pids [{}] finish their requests",
            exe.display(),
            new.join(", "),
            old.join(", ")
        );
        // Restarted workers run this binary from now on, whatever is put at its path later.
        self.worker_binary = binary;
        self.exe = exe;
        Ok(Payload::Done {
            message: format!(
                "workers upgraded: new workers [{}] serve; old workers [{}] finish their requests and exit",
                new.join(", "),
                old.join(", ")
            ),
        })
    }

    /// Starts a new worker for every slot from `exe` with the supervisor's current sockets and
    /// config memfd, waits until each has taken `text`, then retires the old ones. On a
    /// failure the new ones are retired instead. Returns the new (index, pid) and old pids.
    fn roll(&mut self, exe: &fds::Binary, text: &str) -> Result<Rolled, String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut fresh: Vec<(usize, Pid, UnixStream, File)> = Vec::new();
        let mut failure = None;
        for index in 0..self.slots.len() {
            match self.start_worker(index, exe) {
                Ok((pid, channel, trace)) => fresh.push((index, pid, channel, trace)),
                Err(e) => {
                    failure = Some(format!("starting worker {index}: {e:#}"));
                    break;
                }
            }
        }
        if failure.is_none() {
            for (index, pid, channel, _) in &mut fresh {
                if let Err(e) = probe(channel, text, deadline) {
                    failure = Some(format!(
                        "new worker {index} (pid {pid}) did not become ready: {e}"
                    ));
                    break;
                }
            }
        }
        if let Some(failure) = failure {
            for (_, pid, _, _) in fresh {
                let _ = kill(pid, Signal::SIGTERM);
                self.retiring.push(pid);
            }
            return Err(format!(
                "{failure}; the running workers keep serving (nothing changed)"
            ));
        }
        let limit = u32::try_from(self.config.max_connections).unwrap_or(u32::MAX);
        let mut old = Vec::new();
        let mut new = Vec::new();
        for (index, pid, channel, trace) in fresh {
            let Some(slot) = self.slots.get_mut(index) else {
                continue;
            };
            if let Some(previous) = slot.pid.replace(pid) {
                let _ = kill(previous, Signal::SIGTERM);
                self.retiring.push(previous);
                old.push(previous);
            }
            slot.channel = Some(channel);
            slot.trace = Some(trace);
            slot.closed_since = None;
            slot.started = Instant::now();
            slot.start_at = None;
            slot.backoff = Duration::from_millis(100);
            new.push((index, pid));
            self.set_worker_state(index, WorkerState::active(limit));
        }
        Ok((new, old))
    }

    /// A configuration whose listeners differ from the running ones: binds the new
    /// listeners' sockets (and loads their steering program), keeps the sockets of the
    /// listeners that stay, then rolls the workers onto the new set. The old workers finish
    /// their requests, including what waits in a removed listener's queue; the removed
    /// listener closes when the last of them exits. Any failure changes nothing.
    pub(crate) fn change_listeners(
        &mut self,
        config: &Config,
        text: &str,
    ) -> Result<Vec<lb_config::protocol::WorkerAck>, String> {
        let binary = self
            .worker_binary
            .try_clone()
            .map_err(|e| format!("duplicating the workers' binary descriptor: {e}"))?;
        let mut sockets = Vec::new();
        let mut kept: Vec<Option<usize>> = Vec::new();
        for listener in &config.listeners {
            let old = self
                .config
                .listeners
                .iter()
                .position(|l| l.address == listener.address);
            let group = match old.and_then(|i| self.sockets.get(i)) {
                Some(group) => group
                    .iter()
                    .map(TcpListener::try_clone)
                    .collect::<std::io::Result<Vec<_>>>()
                    .map_err(|e| format!("listener {}: {e}", listener.address))?,
                None => (0..config.workers)
                    .map(|_| listeners::bind(listener.address))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .map_err(|e| format!("{e:#}"))?,
            };
            sockets.push(group);
            kept.push(old);
        }
        let mut previous: Vec<Option<Steering>> = std::mem::take(&mut self.steering)
            .into_iter()
            .map(Some)
            .collect();
        let put_back = |previous: Vec<Option<Steering>>, moved: Vec<(usize, Steering)>| {
            let mut previous = previous;
            for (i, steering) in moved {
                if let Some(slot) = previous.get_mut(i) {
                    *slot = Some(steering);
                }
            }
            previous.into_iter().flatten().collect::<Vec<_>>()
        };
        let mut steering = Vec::new();
        let mut moved: Vec<(usize, Steering)> = Vec::new();
        if config.steering == lb_config::Steering::Ebpf {
            for (k, (listener, group)) in config.listeners.iter().zip(&sockets).enumerate() {
                let reused = kept
                    .get(k)
                    .copied()
                    .flatten()
                    .and_then(|i| previous.get_mut(i).and_then(Option::take).map(|s| (i, s)));
                match reused {
                    Some((i, st)) => {
                        moved.push((i, st));
                        steering.push(None);
                    }
                    None => match load_group(config, listener, group) {
                        Ok(mut st) => {
                            // Connections to the new listener wait in the new workers' queues.
                            let limit = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
                            for w in 0..u32::try_from(config.workers).unwrap_or(0) {
                                let _ = st.set_worker_state(w, WorkerState::active(limit));
                            }
                            steering.push(Some(st));
                        }
                        Err(e) => {
                            self.steering = put_back(previous, moved);
                            return Err(format!("{e:#}"));
                        }
                    },
                }
            }
        }
        // The new steering list, in the new listeners' order: reused programs are moved in
        // (and moved back on failure, by their old index).
        let mut reused = moved.into_iter();
        let new_steering: Vec<Steering> = steering
            .into_iter()
            .filter_map(|st| st.or_else(|| reused.next().map(|(_, s)| s)))
            .collect();
        let order: Vec<Option<usize>> = kept.clone();
        let config_file = fds::memfd_with(text).map_err(|e| e.to_string())?;
        let old_sockets = std::mem::replace(&mut self.sockets, sockets);
        let old_file = std::mem::replace(&mut self.config_file, config_file);
        let old_config = std::mem::replace(&mut self.config, config.clone());
        self.steering = new_steering;
        match self.roll(&binary, text) {
            Ok((new, _old)) => {
                drop(old_sockets);
                log::info!(
                    "listeners changed: {} → {}",
                    old_config
                        .listeners
                        .iter()
                        .map(|l| l.address.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    config
                        .listeners
                        .iter()
                        .map(|l| l.address.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                Ok(new
                    .into_iter()
                    .map(|(index, pid)| lb_config::protocol::WorkerAck {
                        index,
                        pid: Some(pid.as_raw() as u32),
                        error: None,
                    })
                    .collect())
            }
            Err(e) => {
                self.sockets = old_sockets;
                self.config_file = old_file;
                self.config = old_config;
                let current = std::mem::take(&mut self.steering);
                let moved_back: Vec<(usize, Steering)> = current
                    .into_iter()
                    .zip(order.iter())
                    .filter_map(|(st, old)| old.map(|i| (i, st)))
                    .collect();
                self.steering = put_back(previous, moved_back);
                Err(e)
            }
        }
    }

    /// `lbctl upgrade`: starts `exe` (default: this lbd's binary) as the next main, hands it
    /// everything (upgrade.rs), and on its "ready" commits: this main stops accepting
    /// commands and, once lbctl has its answer, retires its workers and exits. Any failure
    /// stops the new main and leaves this one serving, unchanged.
    pub(crate) fn hand_over(&mut self, exe: Option<PathBuf>) -> Result<Payload, String> {
        let exe = exe.unwrap_or_else(|| self.exe.clone());
        check_executable(&exe)?;
        let (command_fd, pauser) = self
            .command
            .as_ref()
            .ok_or("internal: the supervisor has no command socket to hand over")?;
        let mut roles = vec![FdRole::CommandSocket];
        let mut descriptors: Vec<BorrowedFd<'_>> = vec![command_fd.as_fd()];
        for (listener, group) in self.sockets.iter().enumerate() {
            for (worker, socket) in group.iter().enumerate() {
                let address = socket
                    .local_addr()
                    .map_err(|e| format!("listener {listener}: {e}"))?;
                roles.push(FdRole::Listener {
                    listener,
                    worker,
                    address,
                });
                descriptors.push(socket.as_fd());
            }
        }
        for (listener, steering) in self.steering.iter().enumerate() {
            let fds = steering
                .fds()
                .map_err(|e| format!("listener {listener}: {e}"))?;
            roles.push(FdRole::SteeringProgram { listener });
            descriptors.push(fds.program);
            use lb_ebpf_common::names;
            for (map, fd) in [
                (names::SOCKETS, fds.sockets),
                (names::WORKERS, fds.workers),
                (names::CONTROL, fds.control),
                (names::COUNTERS, fds.counters),
            ] {
                roles.push(FdRole::SteeringMap {
                    listener,
                    map: map.to_owned(),
                });
                descriptors.push(fd);
            }
        }
        let message = Handoff {
            version: upgrade::HANDOFF_VERSION,
            from_version: upgrade::version().to_owned(),
            from_pid: std::process::id(),
            generation: self.generation,
            source: self.source.clone(),
            state: self.state.to_toml(),
            log_level: self.log_level.as_str().to_owned(),
            down: self.health_down(),
            fds: roles,
        };
        let (mut ours, theirs) =
            UnixStream::pair().map_err(|e| format!("creating the handoff channel: {e}"))?;
        let mut command = Command::new(&exe);
        command
            .arg("--log-level")
            .arg(self.log_level.as_str())
            .arg("--upgrade-fd")
            .arg(fds::raw(&theirs).to_string())
            .stdin(std::process::Stdio::null());
        fds::inherit_fds_detached(&mut command, vec![fds::raw(&theirs)]);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let pid = Pid::from_raw(child.id() as i32);
        drop(child);
        drop(theirs);
        log::info!(
            "upgrade: started {} (pid {pid}) as generation {}",
            exe.display(),
            self.generation + 1
        );
        let give_up = |why: String| -> String {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            format!(
                "upgrade to {} failed: {why}; the new lbd (pid {pid}) was stopped and generation {} keeps serving unchanged",
                exe.display(),
                self.generation
            )
        };
        if let Err(e) = upgrade::send(&mut ours, &message, &descriptors) {
            // Most often the new binary is gone already: say how it ended, not "broken pipe".
            let why =
                exit_reason(pid, Duration::from_millis(500)).unwrap_or_else(|| format!("{e:#}"));
            let error = give_up(why);
            self.reassert_steering();
            return Err(error);
        }
        let alive = || exit_reason(pid, Duration::ZERO).map_or(Ok(()), Err);
        let reply = upgrade::read_reply(&mut ours, Instant::now() + READY_TIMEOUT, alive);
        let (new_pid, new_version, new_generation) = match reply {
            Ok(Reply::Ready {
                pid,
                version,
                generation,
            }) => (pid, version, generation),
            Ok(Reply::Failed { error }) => {
                let error = give_up(format!("it refused the handoff: {error}"));
                self.reassert_steering();
                return Err(error);
            }
            Err(e) if e == "timed out" => {
                let error = give_up(format!(
                    "it was not ready within {} s",
                    READY_TIMEOUT.as_secs()
                ));
                self.reassert_steering();
                return Err(error);
            }
            Err(e) => {
                // A reset or a closed channel most often means the new binary ended.
                let why = exit_reason(pid, Duration::from_millis(500)).unwrap_or(e);
                let error = give_up(why);
                self.reassert_steering();
                return Err(error);
            }
        };
        if let Err(e) = upgrade::commit(&mut ours) {
            let error = give_up(format!("it went away before the commit: {e}"));
            self.reassert_steering();
            return Err(error);
        }
        // From here on the new main serves. Accept no more commands: they go to it.
        pauser.pause();
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::MainPid(new_pid)]) {
            log::warn!("cannot tell systemd the new main pid: {e}");
        }
        self.stop = Some(Stop::HandedOver);
        let old = format!(
            "generation {} (lbd {}, pid {})",
            self.generation,
            upgrade::version(),
            std::process::id()
        );
        let new = format!("generation {new_generation} (lbd {new_version}, pid {new_pid})");
        log::info!("upgrade: {old} → {new}; retiring this generation's workers");
        Ok(Payload::Done {
            message: format!(
                "upgraded: {old} → {new}; the old workers finish their requests and exit"
            ),
        })
    }

    /// After a failed upgrade: the new generation may have written its own workers' states
    /// into the steering maps; make them this generation's again (keeping live counts).
    fn reassert_steering(&mut self) {
        let limit = u32::try_from(self.config.max_connections).unwrap_or(u32::MAX);
        for index in 0..self.slots.len() {
            let running = self.slots.get(index).is_some_and(|s| s.pid.is_some());
            let Ok(slot) = u32::try_from(index) else {
                continue;
            };
            for (listener, steering) in self.steering.iter_mut().enumerate() {
                let live = steering.worker_state(slot).map(|w| w.live).unwrap_or(0);
                let state = if running {
                    WorkerState::active(limit).with_live(live)
                } else {
                    WorkerState::default()
                };
                if let Err(e) = steering.set_worker_state(slot, state) {
                    log::error!("listener {listener}: cannot restore worker {index}'s state: {e}");
                }
            }
        }
    }

    /// After a handover: asks every worker of this generation to finish its requests and
    /// exit, and waits for them (SIGKILL after the grace). The steering maps and the sockets
    /// belong to the next generation now: nothing in them is touched.
    pub fn retire_all(&mut self) {
        for slot in &mut self.slots {
            if let Some(pid) = slot.pid.take() {
                let _ = kill(pid, Signal::SIGTERM);
                self.retiring.push(pid);
            }
            slot.channel = None;
            slot.start_at = None;
        }
        let deadline = Instant::now() + self.config.timeouts.drain + SHUTDOWN_SLACK;
        while !self.retiring.is_empty() && Instant::now() < deadline {
            self.reap(true);
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in self.retiring.drain(..) {
            log::warn!("retired worker pid {pid} did not stop in time: killing it");
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

/// Sends the running configuration to a worker and waits for its "ok": the worker is in its
/// event loop. A worker that died answers with the end of its channel, at once.
fn probe(channel: &mut UnixStream, text: &str, deadline: Instant) -> Result<(), String> {
    crate::runtime::send_frame(channel, text.as_bytes())
        .map_err(|e| format!("cannot reach it: {e}"))?;
    let left = deadline.saturating_duration_since(Instant::now());
    crate::runtime::read_answer(channel, left.max(Duration::from_millis(1)))
}

/// How the child `pid` ended, if it ended within `wait` (it is reaped then).
fn exit_reason(pid: Pid, wait: Duration) -> Option<String> {
    let deadline = Instant::now() + wait;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => {
                return Some(format!("it exited with status {code}"))
            }
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Some(format!("it was killed by {signal}"))
            }
            _ if Instant::now() >= deadline => return None,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Refuses a binary that is not there or cannot be run, before anything starts.
fn check_executable(exe: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(exe).map_err(|e| format!("cannot use {}: {e}", exe.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not an executable file", exe.display()));
    }
    Ok(())
}
