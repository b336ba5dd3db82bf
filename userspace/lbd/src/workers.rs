//! The worker slots of one lbd main: for each of the `workers` slots, the worker process that
//! serves it (fork+exec of `lbd worker` with its sockets, the config memfd and its channel),
//! its restarts with back-off, and main's end of its channel; and what they are started on:
//! every listener's sockets (`sockets[listener][worker]`, one SO_REUSEPORT group per listener
//! address), the steering program of each group, the config memfd, and the binary held open.
//!
//! main keeps its own copy of every listening socket, so a worker's death closes none of them:
//! connections waiting in a dead worker's accept queue stay there until its replacement
//! accepts them on the very same socket.
//!
//! It leaves to others what the workers are told (the observer: health and metrics; the
//! command handler: configurations), when a new generation starts (`generation.rs`), and the
//! channel's framing (`channel.rs`).

use crate::channel::{self, Asked, ChannelError, WorkerChannel};
use crate::fds;
use crate::listeners;
use crate::steering::{Steering, SteeringError};
use crate::test_hooks;
use lb_config::protocol::channel::{Order, Reply};
use lb_config::protocol::WorkerStatus;
use lb_config::Config;
use lb_ebpf_common::{counter, WorkerState};
use lb_proxy::recorder::Recorder;
use metrics::Counter;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// On top of `timeouts.drain` (the workers' own deadline), how long main waits for stopping
/// workers before SIGKILL.
pub(crate) const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);
/// A worker that dies sooner than this after its start is restarted with a growing delay (it
/// cannot start, or dies at its first request: a loop to slow down). One that ran longer is
/// restarted at once, so its slot serves again within a turn of main's loop (~20 ms): a
/// worker killed by the OOM killer or an operator is not a crash loop.
const STABLE_AFTER: Duration = Duration::from_millis(250);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}: {} exists", test_hooks::START_FAILS, path.display())]
    TestHook { path: PathBuf },
    #[error("creating the worker's channel: {0}")]
    Channel(#[source] std::io::Error),
    #[error("creating the worker's trace pipe: {0}")]
    Trace(#[source] nix::Error),
    #[error("internal: no socket for worker {index}")]
    NoSocket { index: usize },
    #[error("the steering WORKERS map: {0}")]
    Steering(#[source] SteeringError),
    #[error("starting worker {index} ({}): {source}", exe.display())]
    Spawn {
        index: usize,
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a set of workers did not take over.
#[derive(Debug, thiserror::Error)]
pub enum RollError {
    #[error("starting worker {index}: {source}")]
    Start {
        index: usize,
        #[source]
        source: StartError,
    },
    #[error("worker {index} (pid {pid}) did not become ready: {source}")]
    NotReady {
        index: usize,
        pid: Pid,
        #[source]
        source: Unready,
    },
    #[error("worker {index} has no channel")]
    NoChannel { index: usize },
}

/// Why a new worker did not answer its first configuration.
#[derive(Debug, thiserror::Error)]
pub enum Unready {
    #[error("cannot reach it: {0}")]
    Send(#[source] ChannelError),
    #[error("no answer from the worker: {0}")]
    Answer(#[source] ChannelError),
    #[error("{error}")]
    Refused { error: String },
    #[error("unexpected answer from the worker: {reply:?}")]
    Unexpected { reply: Box<Reply> },
}

/// Why a worker has no answer to a request sent to every worker.
#[derive(Debug, thiserror::Error)]
pub enum Unanswered {
    #[error("cannot reach the worker: {0}")]
    Send(#[source] ChannelError),
    #[error("no answer from the worker: {0}")]
    Answer(#[source] ChannelError),
}

/// What a roll of the workers did: the new (slot, pid) pairs and the retired pids.
pub(crate) type Rolled = (Vec<(usize, Pid)>, Vec<Pid>);

struct Slot {
    pid: Option<Pid>,
    started: Instant,
    backoff: Duration,
    start_at: Option<Instant>,
    channel: Option<WorkerChannel>,
    /// The read end of the worker's trace pipe: the syscall its sandbox refused, if it did.
    trace: Option<File>,
    /// Since when the worker's channel is closed while the worker still runs.
    closed_since: Option<Instant>,
    restarts: u64,
}

/// A worker process started, not yet serving a slot.
struct Fresh {
    index: usize,
    pid: Pid,
    channel: WorkerChannel,
    trace: File,
}

/// The worker slots and what their workers are started on.
pub(crate) struct Workers {
    slots: Vec<Slot>,
    /// Workers of a previous generation (or a rolled-back one) finishing their requests.
    retiring: Vec<Pid>,
    /// `sockets[listener][worker]`: all sockets of one listener share its reuseport group.
    sockets: Vec<Vec<TcpListener>>,
    /// With `steering = "ebpf"`: the program of each listener's group, by listener index.
    steering: Vec<Steering>,
    /// The running configuration (checked: `channel::encode_config`), handed to every
    /// worker started.
    config_file: File,
    /// What workers run: this lbd's own binary, held open (or a workers-only upgrade's).
    binary: fds::Binary,
    /// What workers are started with (`lbctl log-level` changes it).
    pub(crate) log_level: log::LevelFilter,
    /// The table of request rates every worker maps (`lb_proxy::rate_limit`).
    rates_file: File,
    /// The session ticket keys every worker maps.
    pub(crate) tickets: crate::tickets::TicketKeys,
}

impl Workers {
    /// Slots for `config.workers` workers on `sockets`, none started yet.
    pub(crate) fn new(
        config: &Config,
        log_level: log::LevelFilter,
        sockets: Vec<Vec<TcpListener>>,
        steering: Vec<Steering>,
        tickets: Option<lb_proxy::tickets::Keys>,
    ) -> Result<Workers, WorkersError> {
        let config_file = config_memfd(config)?;
        let rates_file = rates_memfd()?;
        let tickets = crate::tickets::TicketKeys::new(tickets)?;
        let binary = fds::Binary::current().map_err(WorkersError::Binary)?;
        let slots = (0..config.workers)
            .map(|_| Slot {
                pid: None,
                started: Instant::now(),
                backoff: FIRST_BACKOFF,
                start_at: Some(Instant::now()),
                channel: None,
                trace: None,
                closed_since: None,
                restarts: 0,
            })
            .collect();
        Ok(Workers {
            slots,
            retiring: Vec::new(),
            sockets,
            steering,
            config_file,
            binary,
            log_level,
            rates_file,
            tickets,
        })
    }

    /// Every listener's sockets, `[listener][worker]`.
    pub(crate) fn sockets(&self) -> &[Vec<TcpListener>] {
        &self.sockets
    }

    /// The steering program of every listener (none with kernel steering).
    pub(crate) fn steering(&self) -> &[Steering] {
        &self.steering
    }

    /// Workers started from now on get `config`.
    pub(crate) fn replace_config(&mut self, config: &Config) -> Result<(), fds::FdError> {
        self.config_file = config_memfd(config)?;
        Ok(())
    }

    /// Restarted workers run `binary` from now on.
    pub(crate) fn set_binary(&mut self, binary: fds::Binary) {
        self.binary = binary;
    }

    /// The running workers' channels: (index, pid, channel).
    pub(crate) fn channels(&mut self) -> Vec<(usize, u32, &mut WorkerChannel)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| {
                let pid = s.pid?.as_raw() as u32;
                s.channel.as_mut().map(|c| (i, pid, c))
            })
            .collect()
    }

    /// Sends `order` to every running worker, then waits for all their answers within
    /// `timeout`, reading them as they come: (index, pid, answer) by slot.
    pub(crate) fn ask_all(
        &mut self,
        order: &Order,
        timeout: Duration,
    ) -> Vec<(usize, u32, Result<Reply, Unanswered>)> {
        let mut out = Vec::new();
        let mut asked = Vec::new();
        let mut pids = Vec::new();
        for (index, pid, channel) in self.channels() {
            match channel.send(order.clone()) {
                Ok(id) => {
                    pids.push((index, pid));
                    asked.push(Asked { index, channel, id });
                }
                Err(e) => out.push((index, pid, Err(Unanswered::Send(e)))),
            }
        }
        let answers = channel::gather(asked, Instant::now() + timeout);
        for ((index, answer), (_, pid)) in answers.into_iter().zip(pids) {
            out.push((index, pid, answer.map_err(Unanswered::Answer)));
        }
        out.sort_by_key(|(index, _, _)| *index);
        out
    }

    /// Every worker slot: pid, state, live connections (known with eBPF steering), restarts.
    pub(crate) fn rows(&self, stopping: bool) -> Vec<WorkerStatus> {
        use lb_config::protocol::WorkerState as Row;
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let state = match (s.pid, stopping) {
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
                WorkerStatus {
                    index: i,
                    pid: s.pid.map(|p| p.as_raw() as u32),
                    state,
                    connections: if self.steering.is_empty() { None } else { live },
                    restarts: s.restarts,
                }
            })
            .collect()
    }

    /// Steering decisions and drops, per listener of `config`, read from the eBPF program's
    /// counters into counters of `recorder`; the handles are returned to be held until the
    /// next scrape (a listener `config` no longer has is then forgotten).
    pub(crate) fn steering_figures(&self, config: &Config, recorder: &Recorder) -> Vec<Counter> {
        let mut out = Vec::new();
        for (steering, listener) in self.steering.iter().zip(&config.listeners) {
            let Ok(counters) = steering.counters() else {
                continue;
            };
            let get = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
            let address = listener.address.to_string();
            recorder.register(|| {
                for w in 0..self.slots.len() as u32 {
                    let c = metrics::counter!(
                        "kakehi_steering_decisions_total",
                        "listener" => address.clone(), "worker" => w.to_string()
                    );
                    c.absolute(get(counter::DECISIONS + w));
                    out.push(c);
                }
                for (reason, index) in [
                    ("all_full", counter::DROPS_ALL_FULL),
                    ("no_worker", counter::DROPS_NO_WORKER),
                    ("per_ip_connections", counter::DROPS_PER_IP_CONNECTIONS),
                    ("per_ip_rate", counter::DROPS_PER_IP_RATE),
                ] {
                    let c = metrics::counter!(
                        "kakehi_steering_drops_total",
                        "listener" => address.clone(), "reason" => reason
                    );
                    c.absolute(get(index));
                    out.push(c);
                }
            });
        }
        out
    }

    /// Sets the per-client limits `config` gives the listeners that are running now (those of
    /// `running`, the config the steering list follows; a listener `config` drops is left
    /// alone, one it adds gets its limits when its program is loaded). Stops at the first
    /// failure, with the listener's address in the message.
    pub(crate) fn set_client_limits(
        &mut self,
        running: &Config,
        config: &Config,
    ) -> Result<(), String> {
        for (index, listener) in running.listeners.iter().enumerate() {
            let Some(wanted) = config
                .listeners
                .iter()
                .find(|l| l.address == listener.address)
            else {
                continue;
            };
            let (Some(steering), Some(socket)) = (
                self.steering.get_mut(index),
                self.sockets.get(index).and_then(|group| group.first()),
            ) else {
                continue;
            };
            steering
                .set_limits(listeners::client_limits(wanted), socket)
                .map_err(|e| format!("listener {}: {e}", listener.address))?;
        }
        Ok(())
    }

    /// Carries a new steering policy and connection limit into the eBPF programs.
    pub(crate) fn update_steering(&mut self, config: &Config) {
        let policy = listeners::policy_of(config.steering_policy);
        let limit = limit(config);
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

    /// After a failed upgrade: the new generation may have written its own workers' states
    /// into the steering maps; make them this generation's again (keeping live counts).
    pub(crate) fn reassert_steering(&mut self, config: &Config) {
        let limit = limit(config);
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

    /// Starts the workers whose time has come. One that cannot be started (fork, exec or a
    /// descriptor failed) is tried again with the same growing delay as one that keeps dying:
    /// main never stops serving for a worker.
    pub(crate) fn start_due(&mut self, config: &Config) {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let due = self
                .slots
                .get(index)
                .is_some_and(|s| s.pid.is_none() && s.start_at.is_some_and(|t| t <= now));
            if !due {
                continue;
            }
            if let Err(e) = self.spawn(index, config) {
                let Some(slot) = self.slots.get_mut(index) else {
                    continue;
                };
                let delay = slot.backoff;
                slot.start_at = Some(Instant::now() + delay);
                slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
                log::error!("cannot start worker {index}: {e}; trying again in {delay:?}");
            }
        }
    }

    /// Starts the worker of slot `index` from the slots' binary.
    fn spawn(&mut self, index: usize, config: &Config) -> Result<(), StartError> {
        let fresh = self.start(index, None)?;
        let pid = fresh.pid;
        self.seat(fresh, config);
        log::info!("worker {index} started (pid {pid})");
        Ok(())
    }

    /// Puts a started worker in its slot; connections steered to it wait in its socket's
    /// queue until it accepts. Returns the pid it replaced, if any.
    fn seat(&mut self, fresh: Fresh, config: &Config) -> Option<Pid> {
        let Fresh {
            index,
            pid,
            channel,
            trace,
        } = fresh;
        let slot = self.slots.get_mut(index)?;
        let previous = slot.pid.replace(pid);
        slot.channel = Some(channel);
        slot.trace = Some(trace);
        slot.closed_since = None;
        slot.started = Instant::now();
        slot.start_at = None;
        self.set_worker_state(index, WorkerState::active(limit(config)));
        previous
    }

    /// Starts worker `index` from `binary` (default: the slots' own) on the current sockets;
    /// the slot is not touched.
    fn start(&self, index: usize, binary: Option<&fds::Binary>) -> Result<Fresh, StartError> {
        if let Some(path) = test_hooks::start_fails() {
            // Test-only: a worker that cannot be started, for as long as the file exists.
            return Err(StartError::TestHook { path });
        }
        let binary = binary.unwrap_or(&self.binary);
        let mut command = binary.command();
        command
            .arg("--log-level")
            .arg(self.log_level.as_str())
            .arg("worker")
            .arg("--index")
            .arg(index.to_string())
            .arg("--config-fd")
            .arg(fds::raw(&self.config_file).to_string());
        let (ours, theirs) = UnixStream::pair().map_err(StartError::Channel)?;
        command
            .arg("--channel-fd")
            .arg(fds::raw(&theirs).to_string());
        let (trace, trace_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(StartError::Trace)?;
        command
            .arg("--trace-fd")
            .arg(fds::raw(&trace_end).to_string());
        command
            .arg("--rates-fd")
            .arg(fds::raw(&self.rates_file).to_string())
            .arg("--tickets-fd")
            .arg(fds::raw(self.tickets.file()).to_string());
        let mut inherited = vec![
            fds::raw(&self.config_file),
            fds::raw(&theirs),
            fds::raw(&trace_end),
            fds::raw(&self.rates_file),
            fds::raw(self.tickets.file()),
        ];
        for group in &self.sockets {
            let socket = group.get(index).ok_or(StartError::NoSocket { index })?;
            command
                .arg("--listener-fd")
                .arg(fds::raw(socket).to_string());
            inherited.push(fds::raw(socket));
        }
        for steering in &self.steering {
            let fd = fds::raw(&steering.workers_fd().map_err(StartError::Steering)?);
            command.arg("--workers-map-fd").arg(fd.to_string());
            inherited.push(fd);
        }
        fds::inherit_fds(&mut command, inherited);
        let child = command.spawn().map_err(|source| StartError::Spawn {
            index,
            exe: binary.path().to_path_buf(),
            source,
        })?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child is reaped with waitpid in `reap`; the handle is not needed.
        drop(child);
        drop(theirs);
        drop(trace_end);
        Ok(Fresh {
            index,
            pid,
            channel: WorkerChannel::new(ours),
            trace: File::from(trace),
        })
    }

    /// Starts every slot's worker and waits until each has taken `config` (it is then in its
    /// event loop, sandboxed, accepting). Used by a new lbd before it says "ready".
    pub(crate) fn start_all(
        &mut self,
        config: &Config,
        deadline: Instant,
    ) -> Result<(), RollError> {
        for index in 0..self.slots.len() {
            self.spawn(index, config)
                .map_err(|source| RollError::Start { index, source })?;
        }
        let mut asked = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let pid = slot.pid.unwrap_or(Pid::from_raw(0));
            let channel = slot
                .channel
                .as_mut()
                .ok_or(RollError::NoChannel { index })?;
            asked.push((pid, channel));
        }
        probe(asked.into_iter().enumerate(), config, deadline)
    }

    /// Starts a new worker for every slot from `binary` on the current sockets and config
    /// memfd, waits until each has taken `config`, then retires the old ones (they stop
    /// accepting, finish their requests and exit). On a failure the new ones are retired
    /// instead and the old ones keep serving. Returns the new (index, pid) and old pids.
    pub(crate) fn roll(
        &mut self,
        binary: &fds::Binary,
        config: &Config,
        deadline: Instant,
    ) -> Result<Rolled, RollError> {
        let mut fresh: Vec<Fresh> = Vec::new();
        let mut failure = None;
        for index in 0..self.slots.len() {
            match self.start(index, Some(binary)) {
                Ok(started) => fresh.push(started),
                Err(source) => {
                    failure = Some(RollError::Start { index, source });
                    break;
                }
            }
        }
        if failure.is_none() {
            let asked = fresh.iter_mut().map(|f| (f.index, (f.pid, &mut f.channel)));
            failure = probe(asked, config, deadline).err();
        }
        if let Some(failure) = failure {
            for started in fresh {
                let _ = kill(started.pid, Signal::SIGTERM);
                self.retiring.push(started.pid);
            }
            return Err(failure);
        }
        let mut old = Vec::new();
        let mut new = Vec::new();
        for started in fresh {
            let (index, pid) = (started.index, started.pid);
            if let Some(previous) = self.seat(started, config) {
                let _ = kill(previous, Signal::SIGTERM);
                self.retiring.push(previous);
                old.push(previous);
            }
            if let Some(slot) = self.slots.get_mut(index) {
                slot.backoff = FIRST_BACKOFF;
            }
            new.push((index, pid));
        }
        Ok((new, old))
    }

    /// The slots' binary, duplicated (a roll onto new sockets runs the same binary).
    pub(crate) fn binary(&self) -> std::io::Result<fds::Binary> {
        self.binary.try_clone()
    }

    /// Puts new listener sockets and config memfd in place for the workers started from now
    /// on; returns the old ones (to put back if those workers fail).
    pub(crate) fn swap_listeners(
        &mut self,
        sockets: Vec<Vec<TcpListener>>,
        config_file: File,
    ) -> (Vec<Vec<TcpListener>>, File) {
        (
            std::mem::replace(&mut self.sockets, sockets),
            std::mem::replace(&mut self.config_file, config_file),
        )
    }

    /// Puts new steering programs in place (one per listener, in the listeners' order);
    /// returns the old ones.
    pub(crate) fn swap_steering(&mut self, steering: Vec<Steering>) -> Vec<Steering> {
        std::mem::replace(&mut self.steering, steering)
    }

    /// Collects exited workers; unless `stopping`, schedules their restart.
    pub(crate) fn reap(&mut self, stopping: bool) {
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
                slot.backoff = FIRST_BACKOFF;
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

    /// Between two requests nobody waits for an answer on a worker's channel: whatever is
    /// there is late, and is dropped, whole. A channel found closed (main shut it down when a
    /// frame was cut in half, or the worker closed it) means the worker must leave within the
    /// drain timeout; one still there after it (stopped, or stuck in a loop) is killed, and
    /// restarted like any dead worker.
    pub(crate) fn police(&mut self, config: &Config) {
        let grace = config.timeouts.drain + SHUTDOWN_SLACK;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let (Some(pid), Some(channel)) = (slot.pid, slot.channel.as_mut()) else {
                continue;
            };
            if channel.drop_late(index) {
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
    fn log_counters(&self, config: &Config) {
        for (steering, listener) in self.steering.iter().zip(&config.listeners) {
            let Ok(counters) = steering.counters() else {
                continue;
            };
            let get = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
            let decisions: Vec<String> = (0..self.slots.len() as u32)
                .map(|w| get(counter::DECISIONS + w).to_string())
                .collect();
            log::info!(
                "steering {}: decisions per worker [{}], dropped all-full {}, dropped no-worker {}, select failed {}, dropped per-ip-connections {}, dropped per-ip-rate {}",
                listener.address,
                decisions.join(", "),
                get(counter::DROPS_ALL_FULL),
                get(counter::DROPS_NO_WORKER),
                get(counter::SELECT_FAILED),
                get(counter::DROPS_PER_IP_CONNECTIONS),
                get(counter::DROPS_PER_IP_RATE)
            );
        }
    }

    /// Stops every worker (`hard`: at once) and waits for them, SIGKILL after the grace; the
    /// listening sockets are closed first.
    pub(crate) fn shutdown(&mut self, hard: bool, config: &Config) {
        log::info!("stopping: draining {} workers", self.slots.len());
        // No worker takes new connections any more: the program refuses them in the kernel.
        for index in 0..self.slots.len() {
            self.set_worker_state(index, WorkerState::active(limit(config)).draining());
        }
        self.log_counters(config);
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
        let deadline = Instant::now() + config.timeouts.drain + SHUTDOWN_SLACK;
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
    }

    /// After a handover: asks every worker of this generation to finish its requests and
    /// exit, and waits for them (SIGKILL after the grace). The steering maps and the sockets
    /// belong to the next generation now: nothing in them is touched.
    pub(crate) fn retire_all(&mut self, config: &Config) {
        for slot in &mut self.slots {
            if let Some(pid) = slot.pid.take() {
                let _ = kill(pid, Signal::SIGTERM);
                self.retiring.push(pid);
            }
            slot.channel = None;
            slot.start_at = None;
        }
        let deadline = Instant::now() + config.timeouts.drain + SHUTDOWN_SLACK;
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

/// Why the slots could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    #[error(transparent)]
    ConfigFile(#[from] fds::FdError),
    #[error("opening the lbd binary (/proc/self/exe) for workers: {0}")]
    Binary(#[source] std::io::Error),
}

/// The connection limit the steering program holds each worker to.
pub(crate) fn limit(config: &Config) -> u32 {
    u32::try_from(config.max_connections).unwrap_or(u32::MAX)
}

/// Sends the running configuration to every new worker of `asked` ((index, (pid, channel)))
/// and waits, by `deadline`, until each has answered it: the worker is then in its event
/// loop. All answer in parallel; a worker that died answers with the end of its channel, at
/// once.
fn probe<'a>(
    asked: impl Iterator<Item = (usize, (Pid, &'a mut WorkerChannel))>,
    config: &Config,
    deadline: Instant,
) -> Result<(), RollError> {
    let order = Order::Configure {
        config: Box::new(config.clone()),
    };
    let mut waiting = Vec::new();
    let mut pids = Vec::new();
    for (index, (pid, channel)) in asked {
        let id = channel
            .send(order.clone())
            .map_err(|e| RollError::NotReady {
                index,
                pid,
                source: Unready::Send(e),
            })?;
        pids.push(pid);
        waiting.push(Asked { index, channel, id });
    }
    for ((index, answer), pid) in channel::gather(waiting, deadline).into_iter().zip(pids) {
        let unready = match answer {
            Ok(Reply::Done) => continue,
            Ok(Reply::Refused { error }) => Unready::Refused { error },
            Ok(other) => Unready::Unexpected {
                reply: Box::new(other),
            },
            Err(e) => Unready::Answer(e),
        };
        return Err(RollError::NotReady {
            index,
            pid,
            source: unready,
        });
    }
    Ok(())
}

/// A memfd holding `config` as a worker reads it at start (`channel::decode_config`): the
/// checked configuration, which the worker neither parses nor validates again.
/// The table of request rates: `lb_proxy::rate_limit::WORDS` zeroed words, but the first,
/// a seed drawn for this lbd (so that no client can tell which clients share its slots).
fn rates_memfd() -> Result<File, fds::FdError> {
    use std::hash::BuildHasher as _;
    let seed = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    let file = fds::memfd_with(&seed.to_ne_bytes())?;
    let bytes = u64::try_from(lb_proxy::rate_limit::WORDS * 8).unwrap_or(u64::MAX);
    file.set_len(bytes).map_err(fds::FdError::Memfd)?;
    Ok(file)
}

pub(crate) fn config_memfd(config: &Config) -> Result<File, fds::FdError> {
    let bytes = lb_config::protocol::channel::encode_config(config)
        .map_err(|e| fds::FdError::Memfd(std::io::Error::other(e)))?;
    fds::memfd_with(&bytes)
}
