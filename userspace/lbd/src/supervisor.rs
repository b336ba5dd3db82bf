//! The supervisor: lbd's main process, made of parts that own their data. It holds the running
//! configuration (the file plus every lbctl change, `lb_config::state::State`) and runs main's
//! loop: signals, the worker slots ([`Workers`], `workers.rs`: spawn, reap, back-off, channels),
//! the observer ([`Observer`], `observe.rs`: health checks, metrics), and the command socket,
//! whose requests it answers between the turns (`verbs.rs`). This generation and its upgrades
//! are [`Generation`]'s (`generation.rs`). On SIGTERM or SIGINT it asks every worker to drain,
//! waits for them, and exits 0.

use crate::command::CommandServer;
use crate::generation::{Generation, RebindError, Running, UpgradeError};
use crate::listeners::{self, ListenerError};
use crate::observe::{LogLevelError, Observer};
use crate::steering::Steering;
use crate::upgrade;
use crate::workers::{RollError, Workers, WorkersError};
use lb_config::protocol::{BackendHealth, Payload, Sample, WorkerAck, WorkerStatus};
use lb_config::state::State;
use lb_config::Config;
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the supervisor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error(transparent)]
    Workers(#[from] WorkersError),
    #[error("locating the lbd binary for workers: {0}")]
    Exe(#[source] std::io::Error),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("duplicating the command socket: {0}")]
    CommandSocket(#[source] std::io::Error),
    #[error("per-client limits: {0}")]
    ClientLimits(String),
}

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

/// How [`Supervisor::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped: every worker is gone and the sockets are closed.
    Stopped,
    /// Upgraded: the next lbd serves the same sockets and the command socket; hand the
    /// command server over without removing its file.
    HandedOver,
}

/// How often lbd's main process gives its heap's free pages back to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(10);
/// How long after the start the first trim comes.
const FIRST_TRIM: Duration = Duration::from_secs(1);

/// Gives the free pages inside the heap back to the kernel. lbd's main process allocates
/// much at a few moments (loading a steering program parses the kernel's BTF, 5.5 MB, at
/// start and for each listener added; a reload parses a config) and little in between; glibc
/// returns only the free memory at the top of the heap by itself, so what those moments left
/// in the middle stayed resident: measured after a start, 2.9 MB of anonymous memory before,
/// 1.1 MB after. A walk over the heap's free chunks, every [`TRIM_EVERY`].
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointer and only releases memory the allocator holds free;
    // every live allocation stays where it is.
    unsafe {
        libc::malloc_trim(0);
    }
    if let Err(e) = crate::pages::FilePages::find().and_then(|pages| pages.unmap()) {
        log::debug!("unmapping the binary's pages: {e}");
    }
}

pub struct Supervisor {
    config: Config,
    /// The running configuration as a document: the file plus every lbctl change since.
    state: State,
    source: PathBuf,
    started: Instant,
    /// When the heap's free memory was last given back to the kernel ([`trim_heap`]).
    trimmed: Instant,
    stop: Option<Stop>,
    workers: Workers,
    generation: Generation,
    observer: Observer,
    /// `[bgp]`: tells bird2 whether to announce the VIP.
    bgp: Option<crate::bgp::Announcer>,
}

impl Supervisor {
    /// Binds every listener for every worker. Nothing is started yet.
    pub fn new(
        config: Config,
        state: State,
        source: &Path,
        log_level: log::LevelFilter,
    ) -> Result<Supervisor, SupervisorError> {
        let mut sockets = Vec::new();
        for listener in &config.listeners {
            sockets.push(listeners::bind_group(listener.address, config.workers)?);
        }
        let steering = match config.steering {
            lb_config::Steering::Kernel => Vec::new(),
            lb_config::Steering::Ebpf => listeners::load_steering(&config, &sockets)?,
        };
        Supervisor::assemble(
            config, state, source, log_level, sockets, steering, 1, None, 0,
        )
    }

    /// Takes over what the previous lbd handed over (its sockets and steering program, its
    /// running state); this one is the next generation. Nothing is started yet.
    pub fn adopt(
        handed: upgrade::Handed,
        log_level: log::LevelFilter,
    ) -> Result<(Supervisor, std::os::unix::net::UnixListener), SupervisorError> {
        let upgrade::Handed {
            generation,
            source,
            state,
            config,
            command,
            sockets,
            steering,
            down,
            ticket_keys,
            sync_revision,
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
            ticket_keys,
            sync_revision.unwrap_or(0),
        )?;
        supervisor.observer.seed_health(&supervisor.config, &down);
        // The handed-over programs carry the previous lbd's limits; this state's win.
        let config = supervisor.config.clone();
        supervisor
            .workers
            .set_client_limits(&config, &config)
            .map_err(SupervisorError::ClientLimits)?;
        Ok((supervisor, command))
    }

    // What a new supervisor is made of, fresh or handed over: a struct for it would only be
    // taken apart again here.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: Config,
        state: State,
        source: &Path,
        log_level: log::LevelFilter,
        sockets: Vec<Vec<TcpListener>>,
        mut steering: Vec<Steering>,
        generation: u64,
        ticket_keys: Option<lb_proxy::tickets::Keys>,
        sync_revision: u64,
    ) -> Result<Supervisor, SupervisorError> {
        for st in &mut steering {
            // Informational (the program ignores it): which generation drives the maps.
            let _ = st.set_generation(u32::try_from(generation).unwrap_or(u32::MAX));
        }
        let workers = Workers::new(&config, log_level, sockets, steering, ticket_keys)?;
        let observer = Observer::new(config.sync.as_ref(), sync_revision);
        let bgp = config
            .bgp
            .as_ref()
            .map(|b| crate::bgp::Announcer::new(b, source));
        Ok(Supervisor {
            config,
            state,
            source: source.to_path_buf(),
            started: Instant::now(),
            // The first trim comes a second after the start, once the workers are up: the
            // start's allocations (the BTF parse) and pages were most of main's resident
            // memory, and ten seconds of them showed in a short bench's first scenario.
            trimmed: Instant::now()
                .checked_sub(TRIM_EVERY - FIRST_TRIM)
                .unwrap_or_else(Instant::now),
            stop: None,
            workers,
            generation: Generation::new(generation).map_err(SupervisorError::Exe)?,
            observer,
            bgp,
        })
    }

    /// Gives the supervisor what an upgrade hands over of the command socket.
    pub fn set_command_socket(&mut self, commands: &CommandServer) -> Result<(), SupervisorError> {
        self.generation
            .set_command_socket(commands)
            .map_err(SupervisorError::CommandSocket)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.number()
    }

    pub fn addresses(&self) -> Vec<std::net::SocketAddr> {
        self.config.listeners.iter().map(|l| l.address).collect()
    }

    /// The supervisor's signals, to install before anything is bound: a SIGTERM that
    /// arrives while lbd starts must stop it cleanly, not kill it.
    pub fn signals() -> Result<signal_hook::iterator::Signals, SupervisorError> {
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGCHLD])
            .map_err(SupervisorError::Signals)
    }

    /// Runs until SIGTERM/SIGINT or `lbctl shutdown`, then drains the workers and returns.
    /// Requests on the command socket are answered between the checks.
    pub fn run(
        &mut self,
        signals: &mut signal_hook::iterator::Signals,
        commands: &CommandServer,
    ) -> Exit {
        loop {
            for signal in signals.pending() {
                if signal == SIGTERM || signal == SIGINT {
                    self.stop.get_or_insert(Stop::Drain);
                }
            }
            self.workers.reap(false);
            self.workers.police(&self.config);
            match self.stop {
                Some(Stop::HandedOver) => {
                    self.retire_all();
                    return Exit::HandedOver;
                }
                Some(stop) => {
                    // Routers move new flows to the other appliances while this one drains.
                    if let Some(bgp) = &mut self.bgp {
                        bgp.want(false);
                    }
                    self.workers.shutdown(stop == Stop::Hard, &self.config);
                    return Exit::Stopped;
                }
                None => {}
            }
            self.workers.start_due(&self.config);
            self.workers.tickets.rotate_if_due(Instant::now());
            self.observer
                .turn(&mut self.workers, &self.config, self.stop.is_some());
            for change in self.observer.remote_changes() {
                let error = crate::verbs::apply_change(self, &change.edit)
                    .err()
                    .map(|e| e.to_string());
                self.observer.remote_applied(&change, error);
            }
            if self.bgp.is_some() {
                let announce = self.serves();
                if let Some(bgp) = &mut self.bgp {
                    bgp.want(announce);
                }
            }
            if self.trimmed.elapsed() >= TRIM_EVERY {
                trim_heap();
                self.trimmed = Instant::now();
            }
            commands.poll_timeout(self, Duration::from_millis(20));
        }
    }

    /// Whether this appliance should be announced: a worker runs and some cluster has a
    /// backend up (by the health checks, every appliance's with `[sync]`).
    fn serves(&self) -> bool {
        let running = self
            .workers
            .rows(false)
            .iter()
            .any(|w| w.state == lb_config::protocol::WorkerState::Running);
        let down = self.observer.down();
        let up = self.config.clusters.iter().any(|c| {
            c.backends
                .iter()
                .any(|b| !down.iter().any(|(n, a)| *n == c.name && *a == b.address))
        });
        running && up
    }

    /// Starts every worker and waits until each answers on its channel (it is then in its
    /// event loop, sandboxed, accepting). Used by a new lbd before it says "ready".
    pub fn start_generation(&mut self, timeout: Duration) -> Result<(), RollError> {
        self.workers
            .start_all(&self.config, Instant::now() + timeout)
    }

    /// After a handover: asks every worker of this generation to finish its requests and
    /// exit, and waits for them (SIGKILL after the grace).
    pub fn retire_all(&mut self) {
        self.workers.retire_all(&self.config);
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

    pub(crate) fn workers_mut(&mut self) -> &mut Workers {
        &mut self.workers
    }

    /// Every worker slot, for `lbctl status`.
    pub(crate) fn worker_rows(&self) -> Vec<WorkerStatus> {
        self.workers.rows(self.stop.is_some())
    }

    /// The backends of `lbctl status`.
    pub(crate) fn health_rows(&mut self) -> Vec<BackendHealth> {
        self.observer.health_rows(&mut self.workers, &self.config)
    }

    /// A change lbctl made here (written to etcd with `[sync]`).
    pub(crate) fn publish(&mut self, edit: &lb_config::state::Edit) {
        self.observer.publish(edit);
    }

    /// `lbctl status`'s sync part.
    pub(crate) fn sync_status(&self) -> Option<Box<lb_config::protocol::SyncStatus>> {
        self.observer.sync_status()
    }

    /// `lbctl metrics`.
    pub(crate) fn all_samples(&mut self) -> Vec<Sample> {
        self.observer
            .all_samples(&mut self.workers, &self.config, self.stop.is_some())
    }

    /// `lbctl log-level`.
    pub(crate) fn set_log_level(&mut self, level: &str) -> Result<Payload, LogLevelError> {
        self.observer.set_log_level(&mut self.workers, level)
    }

    /// `lbctl upgrade --workers-only`.
    pub(crate) fn roll_workers(&mut self, exe: Option<PathBuf>) -> Result<Payload, UpgradeError> {
        self.generation
            .roll_workers(&mut self.workers, exe, &self.config)
    }

    /// `lbctl upgrade`: on success this main stops once lbctl has its answer.
    pub(crate) fn hand_over(&mut self, exe: Option<PathBuf>) -> Result<Payload, UpgradeError> {
        let running = Running {
            config: &self.config,
            state: &self.state,
            source: &self.source,
            down: self.observer.health_down(),
            ticket_keys: self.workers.tickets.keys().to_bytes(),
            sync_revision: self.observer.sync_revision(),
        };
        let done = self.generation.hand_over(&mut self.workers, exe, running)?;
        self.stop = Some(Stop::HandedOver);
        Ok(done)
    }

    /// A configuration with other listeners: the workers are rolled onto new sockets.
    pub(crate) fn change_listeners(
        &mut self,
        config: &Config,
    ) -> Result<Vec<WorkerAck>, RebindError> {
        crate::generation::change_listeners(&mut self.workers, &self.config, config)
    }

    /// Carries a new steering policy and connection limit into the eBPF programs.
    pub(crate) fn update_steering(&mut self, config: &Config) {
        self.workers.update_steering(config);
    }

    /// Sets the per-client limits of `config` on the running listeners (see
    /// [`Workers::set_client_limits`]).
    pub(crate) fn set_client_limits(
        &mut self,
        running: &Config,
        config: &Config,
    ) -> Result<(), String> {
        self.workers.set_client_limits(running, config)
    }

    /// Makes `state` the running state; workers started from now on get `config`, what it
    /// validated to.
    pub(crate) fn replace_state(
        &mut self,
        state: State,
        config: Config,
    ) -> Result<(), crate::fds::FdError> {
        self.workers.replace_config(&config)?;
        self.state = state;
        self.config = config;
        Ok(())
    }
}
