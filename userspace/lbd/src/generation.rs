//! The generation orchestration: which generation this lbd main is, and the upgrades that
//! make the next one. `lbctl upgrade` starts the new binary as the next main and hands it
//! everything over the handoff channel (`upgrade.rs` has the channel and its checks,
//! `handoff.rs` the message), commits on its "ready" and otherwise stops it and puts this
//! generation's workers back in the steering maps; `lbctl upgrade --workers-only` rolls the
//! worker slots onto a new binary (`workers.rs` does the roll).
//!
//! It owns the generation number, the binary an upgrade defaults to, and what of the command
//! socket an upgrade hands over (a duplicate, and its server's pause switch).

use crate::command::{CommandServer, Pauser};
use crate::fds;
use crate::listeners::{self, ListenerError};
use crate::steering::Steering;
use crate::upgrade::{self, FdRole, Handoff, HandoffError, Reply};
use crate::workers::{limit, RollError, Workers};
use lb_config::protocol::{Payload, WorkerAck};
use lb_config::state::State;
use lb_config::Config;
use lb_ebpf_common::WorkerState;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a new generation (new workers, or a new lbd with its workers) gets to become
/// ready before the upgrade is rolled back.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Why an upgrade did not happen. Each is the one line lbctl prints; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot use {}: {source}", exe.display())]
    Missing {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not an executable file", exe.display())]
    NotExecutable { exe: PathBuf },
    #[error("cannot open {}: {source}", exe.display())]
    Open {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("internal: the supervisor has no command socket to hand over")]
    NoCommandSocket,
    #[error("listener {listener}: {source}")]
    Socket {
        listener: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {listener}: {source}")]
    Steering {
        listener: usize,
        #[source]
        source: crate::steering::SteeringError,
    },
    #[error("creating the handoff channel: {0}")]
    Channel(#[source] std::io::Error),
    #[error("cannot start {}: {source}", exe.display())]
    Start {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The new lbd failed: it was stopped, and this generation keeps serving.
    #[error(
        "upgrade to {} failed: {why}; the new lbd (pid {pid}) was stopped and generation {generation} keeps serving unchanged",
        exe.display()
    )]
    RolledBack {
        exe: PathBuf,
        why: String,
        pid: Pid,
        generation: u64,
    },
    #[error("{0}; the running workers keep serving (nothing changed)")]
    Workers(#[source] RollError),
}

/// Why the listeners could not change (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum RebindError {
    #[error("duplicating the workers' binary descriptor: {0}")]
    Binary(#[source] std::io::Error),
    #[error("listener {address}: {source}")]
    Duplicate {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error(transparent)]
    ConfigFile(#[from] fds::FdError),
    #[error("{0}; the running workers keep serving (nothing changed)")]
    Roll(#[from] RollError),
}

/// This lbd main's generation, and what an upgrade needs besides the worker slots.
pub(crate) struct Generation {
    /// Bumped by each upgrade (the first lbd is generation 1).
    number: u64,
    /// Where this lbd's binary is: the default of `lbctl upgrade` (a new binary put there).
    exe: PathBuf,
    /// A duplicate of the command socket, and its server's pause switch, for an upgrade.
    command: Option<(OwnedFd, Pauser)>,
}

/// What the running lbd hands the next one besides the worker slots' sockets and programs.
pub(crate) struct Running<'a> {
    pub config: &'a Config,
    pub state: &'a State,
    pub source: &'a Path,
    /// The backends found down.
    pub down: Vec<(String, SocketAddr)>,
    /// The session ticket keys (`lb_proxy::tickets::Keys::to_bytes`).
    pub ticket_keys: Vec<u8>,
    /// With `[sync]`: the etcd revision up to which changes were read and applied.
    pub sync_revision: Option<u64>,
}

impl Generation {
    pub(crate) fn new(number: u64) -> std::io::Result<Generation> {
        Ok(Generation {
            number,
            exe: std::env::current_exe()?,
            command: None,
        })
    }

    pub(crate) fn number(&self) -> u64 {
        self.number
    }

    /// Keeps what an upgrade hands over of the command socket.
    pub(crate) fn set_command_socket(&mut self, commands: &CommandServer) -> std::io::Result<()> {
        let fd = commands.listener().as_fd().try_clone_to_owned()?;
        self.command = Some((fd, commands.pauser()));
        Ok(())
    }

    /// `lbctl upgrade --workers-only`: a new worker for every slot from `exe` (default: this
    /// lbd's binary) on the same sockets; the old ones are retired once all are ready. If any
    /// new worker fails, the new ones are retired instead and the old ones keep serving.
    pub(crate) fn roll_workers(
        &mut self,
        workers: &mut Workers,
        exe: Option<PathBuf>,
        config: &Config,
    ) -> Result<Payload, UpgradeError> {
        let exe = exe.unwrap_or_else(|| self.exe.clone());
        check_executable(&exe)?;
        let binary = fds::Binary::open(&exe).map_err(|source| UpgradeError::Open {
            exe: exe.clone(),
            source,
        })?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let (new, old) = workers
            .roll(&binary, config, deadline)
            .map_err(UpgradeError::Workers)?;
        let new: Vec<String> = new.iter().map(|(_, pid)| pid.to_string()).collect();
        let old: Vec<String> = old.iter().map(Pid::to_string).collect();
        log::info!(
            "workers upgraded from {}: new pids [{}], old pids [{}] finish their requests",
            exe.display(),
            new.join(", "),
            old.join(", ")
        );
        // Restarted workers run this binary from now on, whatever is put at its path later.
        workers.set_binary(binary);
        self.exe = exe;
        Ok(Payload::Done {
            message: format!(
                "workers upgraded: new workers [{}] serve; old workers [{}] finish their requests and exit",
                new.join(", "),
                old.join(", ")
            ),
        })
    }

    /// `lbctl upgrade`: starts `exe` (default: this lbd's binary) as the next main, hands it
    /// everything (upgrade.rs), and on its "ready" commits: this main stops accepting
    /// commands, and once lbctl has its answer the caller retires the workers and exits. Any
    /// failure stops the new main and leaves this one serving, unchanged.
    pub(crate) fn hand_over(
        &mut self,
        workers: &mut Workers,
        exe: Option<PathBuf>,
        running: Running<'_>,
    ) -> Result<Payload, UpgradeError> {
        let exe = exe.unwrap_or_else(|| self.exe.clone());
        check_executable(&exe)?;
        let (command_fd, pauser) = self.command.as_ref().ok_or(UpgradeError::NoCommandSocket)?;
        let (roles, descriptors) = describe(command_fd.as_fd(), workers)?;
        let message = Handoff {
            version: upgrade::HANDOFF_VERSION,
            from_version: upgrade::version().to_owned(),
            from_pid: std::process::id(),
            generation: self.number,
            source: running.source.to_path_buf(),
            state: running.state.to_toml(),
            log_level: workers.log_level.as_str().to_owned(),
            down: running.down,
            ticket_keys: Some(running.ticket_keys),
            sync_revision: running.sync_revision,
            fds: roles,
        };
        let (mut ours, theirs) = UnixStream::pair().map_err(UpgradeError::Channel)?;
        let mut command = Command::new(&exe);
        command
            .arg("--log-level")
            .arg(workers.log_level.as_str())
            .arg("--upgrade-fd")
            .arg(fds::raw(&theirs).to_string())
            .stdin(std::process::Stdio::null());
        fds::inherit_fds_detached(&mut command, vec![fds::raw(&theirs)]);
        let child = command.spawn().map_err(|source| UpgradeError::Start {
            exe: exe.clone(),
            source,
        })?;
        let pid = Pid::from_raw(child.id() as i32);
        drop(child);
        drop(theirs);
        log::info!(
            "upgrade: started {} (pid {pid}) as generation {}",
            exe.display(),
            self.number + 1
        );
        let ready = handshake(&mut ours, &message, &descriptors, pid);
        drop(descriptors);
        let (new_pid, new_version, new_generation) = match ready {
            Ok(ready) => ready,
            Err(why) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                workers.reassert_steering(running.config);
                return Err(UpgradeError::RolledBack {
                    exe,
                    why,
                    pid,
                    generation: self.number,
                });
            }
        };
        // From here on the new main serves. Accept no more commands: they go to it.
        pauser.pause();
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::MainPid(new_pid)]) {
            log::warn!("cannot tell systemd the new main pid: {e}");
        }
        let old = format!(
            "generation {} (lbd {}, pid {})",
            self.number,
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
}

/// Sends the handoff to the new main (pid `pid`), waits for its "ready" and commits: its pid,
/// version and generation; or why not, in words for lbctl.
fn handshake(
    ours: &mut UnixStream,
    message: &Handoff,
    descriptors: &[BorrowedFd<'_>],
    pid: Pid,
) -> Result<(u32, String, u64), String> {
    if let Err(e) = upgrade::send(ours, message, descriptors) {
        // Most often the new binary is gone already: say how it ended, not "broken pipe".
        return Err(exit_reason(pid, Duration::from_millis(500)).unwrap_or_else(|| e.to_string()));
    }
    let alive = || exit_reason(pid, Duration::ZERO).map_or(Ok(()), Err);
    let ready = match upgrade::read_reply(ours, Instant::now() + READY_TIMEOUT, alive) {
        Ok(Reply::Ready {
            pid,
            version,
            generation,
        }) => (pid, version, generation),
        Ok(Reply::Failed { error }) => return Err(format!("it refused the handoff: {error}")),
        Err(HandoffError::TimedOut) => {
            return Err(format!(
                "it was not ready within {} s",
                READY_TIMEOUT.as_secs()
            ))
        }
        Err(HandoffError::Gone(why)) => return Err(why),
        // A reset or a closed channel most often means the new binary ended.
        Err(e) => return Err(exit_reason(pid, Duration::from_millis(500)).unwrap_or(e.to_string())),
    };
    if let Err(e) = upgrade::commit(ours) {
        return Err(format!("it went away before the commit: {e}"));
    }
    Ok(ready)
}

/// A configuration whose listeners differ from `old`'s: binds the new listeners' sockets
/// (and loads their steering program), keeps the sockets of the listeners that stay, then
/// rolls the workers onto the new set, like `lbctl upgrade --workers-only`. The old workers
/// finish their requests, including what waits in a removed listener's queue; the removed
/// listener closes when the last of them exits. Any failure changes nothing.
pub(crate) fn change_listeners(
    workers: &mut Workers,
    old: &Config,
    config: &Config,
) -> Result<Vec<WorkerAck>, RebindError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let binary = workers.binary().map_err(RebindError::Binary)?;
    let mut sockets: Vec<Vec<TcpListener>> = Vec::new();
    let mut kept: Vec<Option<usize>> = Vec::new();
    for listener in &config.listeners {
        let before = old
            .listeners
            .iter()
            .position(|l| l.address == listener.address);
        let group = match before.and_then(|i| workers.sockets().get(i)) {
            Some(group) => group
                .iter()
                .map(TcpListener::try_clone)
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|source| RebindError::Duplicate {
                    address: listener.address,
                    source,
                })?,
            None => listeners::bind_group(listener.address, config.workers)?,
        };
        sockets.push(group);
        kept.push(before);
    }
    let config_file = crate::workers::config_memfd(config)?;
    let (old_sockets, old_file) = workers.swap_listeners(sockets, config_file);
    // The programs of the listeners that stay move into the new list, in the new order; the
    // others are loaded. On a failure every program goes back where it was.
    let mut previous: Vec<Option<Steering>> = workers
        .swap_steering(Vec::new())
        .into_iter()
        .map(Some)
        .collect();
    let mut steering = Vec::new();
    let mut failed = None;
    if config.steering == lb_config::Steering::Ebpf {
        for (k, listener) in config.listeners.iter().enumerate() {
            let reused = kept
                .get(k)
                .copied()
                .flatten()
                .and_then(|i| previous.get_mut(i).and_then(Option::take));
            if let Some(st) = reused {
                steering.push(st);
                continue;
            }
            let group = workers.sockets().get(k).map_or(&[][..], Vec::as_slice);
            match listeners::load_group(config, listener, group) {
                Ok(mut st) => {
                    // Connections to the new listener wait in the new workers' queues.
                    for w in 0..u32::try_from(config.workers).unwrap_or(0) {
                        let _ = st.set_worker_state(w, WorkerState::active(limit(config)));
                    }
                    steering.push(st);
                }
                Err(e) => {
                    failed = Some(RebindError::from(e));
                    break;
                }
            }
        }
    }
    workers.swap_steering(steering);
    let rolled = match failed {
        Some(e) => Err(e),
        None => workers
            .roll(&binary, config, deadline)
            .map_err(RebindError::from),
    };
    let new = match rolled {
        Ok((new, _old)) => new,
        Err(e) => {
            drop(workers.swap_listeners(old_sockets, old_file));
            let moved = workers.swap_steering(Vec::new());
            workers.swap_steering(put_back(previous, moved, &kept));
            return Err(e);
        }
    };
    drop(old_sockets);
    let addresses = |c: &Config| {
        c.listeners
            .iter()
            .map(|l| l.address.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    log::info!(
        "listeners changed: {} → {}",
        addresses(old),
        addresses(config)
    );
    Ok(new
        .into_iter()
        .map(|(index, pid)| WorkerAck {
            index,
            pid: Some(pid.as_raw() as u32),
            error: None,
        })
        .collect())
}

/// The steering list of the old listeners again, after a failed change: `moved` holds the
/// programs taken for the new listeners (in the new order, with `kept[k]` the old index of
/// new listener `k`); those reused go back to their old index, the newly loaded are dropped.
fn put_back(
    mut previous: Vec<Option<Steering>>,
    moved: Vec<Steering>,
    kept: &[Option<usize>],
) -> Vec<Steering> {
    for (st, old) in moved.into_iter().zip(kept) {
        if let Some(slot) = old.and_then(|i| previous.get_mut(i)) {
            if slot.is_none() {
                *slot = Some(st);
            }
        }
    }
    previous.into_iter().flatten().collect()
}

/// The descriptors an upgrade hands over, and the role of each: the command socket, every
/// listener socket (listener × worker), and per listener the steering program and its maps.
fn describe<'a>(
    command: BorrowedFd<'a>,
    workers: &'a Workers,
) -> Result<(Vec<FdRole>, Vec<BorrowedFd<'a>>), UpgradeError> {
    let mut roles = vec![FdRole::CommandSocket];
    let mut descriptors = vec![command];
    for (listener, group) in workers.sockets().iter().enumerate() {
        for (worker, socket) in group.iter().enumerate() {
            let address = socket
                .local_addr()
                .map_err(|source| UpgradeError::Socket { listener, source })?;
            roles.push(FdRole::Listener {
                listener,
                worker,
                address,
            });
            descriptors.push(socket.as_fd());
        }
    }
    for (listener, steering) in workers.steering().iter().enumerate() {
        let fds = steering
            .fds()
            .map_err(|source| UpgradeError::Steering { listener, source })?;
        roles.push(FdRole::SteeringProgram { listener });
        descriptors.push(fds.program);
        use lb_ebpf_common::names;
        let mut maps = vec![
            (names::SOCKETS, fds.sockets),
            (names::WORKERS, fds.workers),
            (names::CONTROL, fds.control),
            (names::COUNTERS, fds.counters),
        ];
        if let Some(per_ip) = fds.per_ip {
            if let Some(track) = per_ip.track {
                roles.push(FdRole::TrackProgram { listener });
                descriptors.push(track);
            }
            if let Some(link) = per_ip.link {
                roles.push(FdRole::TrackLink { listener });
                descriptors.push(link);
            }
            maps.extend([
                (names::LIMITS, per_ip.limits),
                (names::CONNS, per_ip.conns),
                (names::RATES, per_ip.rates),
            ]);
        }
        for (map, fd) in maps {
            roles.push(FdRole::SteeringMap {
                listener,
                map: map.to_owned(),
            });
            descriptors.push(fd);
        }
    }
    Ok((roles, descriptors))
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
fn check_executable(exe: &Path) -> Result<(), UpgradeError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(exe).map_err(|source| UpgradeError::Missing {
        exe: exe.to_path_buf(),
        source,
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(UpgradeError::NotExecutable {
            exe: exe.to_path_buf(),
        });
    }
    Ok(())
}
