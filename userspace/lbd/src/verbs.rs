//! What each lbctl verb does: the supervisor's `Handler` of the command socket.
//!
//! The running state is the config document (`lb_config::state::State`). A change
//! (`Verb::Change`, one `Edit`) is applied to a copy and validated whole, once, by the same
//! validator as the file; the checked configuration it gives is pushed to every running worker
//! over its channel as it is (workers neither parse nor validate it again); lbctl's answer
//! lists what changed and how each worker took it. Only then does the copy become the running
//! state, and the config memfd handed to (re)started workers is replaced, so a worker restarted
//! later starts from the current state, not from the file. A refused change changes nothing.
//! A change of the listeners binds the new sockets and rolls the workers onto them (the old
//! workers finish their requests), like `lbctl upgrade --workers-only`.
//!
//! The socket, the framing and every refusal that needs no state are `command.rs`'s; the
//! workers, the observer and the upgrades are the supervisor's parts (`workers.rs`,
//! `observe.rs`, `generation.rs`).

use crate::generation::{RebindError, UpgradeError};
use crate::observe::LogLevelError;
use crate::supervisor::Supervisor;
use lb_config::protocol::channel::{Order, Reply};
use lb_config::protocol::{Applied, ListenerStatus, Payload, Status, Verb, WorkerAck};
use lb_config::state::{self, Checked, State, StateError};
use lb_config::ConfigError;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// How long a worker may take to apply a configuration.
const WORKER_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a verb was refused: the one line lbctl prints. A refused change changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum VerbError {
    #[error("cannot write {}: {source}", path.display())]
    Save {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Edit(#[from] StateError),
    #[error("{what} cannot change at runtime: restart lbd (or, later, lbctl upgrade)")]
    Fixed { what: &'static str },
    #[error(transparent)]
    Listeners(#[from] RebindError),
    #[error("the change was applied but not recorded: {0}")]
    NotRecorded(#[source] crate::fds::FdError),
    #[error(transparent)]
    Upgrade(#[from] Box<UpgradeError>),
    #[error(transparent)]
    LogLevel(#[from] LogLevelError),
    #[error("{0}")]
    ClientLimits(String),
}

impl crate::command::Handler for Supervisor {
    type Error = VerbError;

    fn handle(&mut self, verb: Verb) -> Result<Payload, VerbError> {
        log::info!("lbctl: {}", verb.name());
        match verb {
            Verb::Status => Ok(Payload::Status(status(self))),
            Verb::StateDump => Ok(Payload::State(Box::new(self.state().clone()))),
            Verb::StateSave { path } => {
                save(&self.state().to_toml(), &path).map_err(|source| VerbError::Save {
                    path: path.clone(),
                    source,
                })?;
                Ok(Payload::Done {
                    message: format!("state saved to {}", path.display()),
                })
            }
            Verb::StateLoad { path } => apply_state(self, State::load_checked(&path)?),
            Verb::Reload => {
                let path = self.source().to_path_buf();
                apply_state(self, State::load_checked(&path)?)
            }
            Verb::ClusterList => Ok(Payload::Clusters(self.state().cluster_summaries())),
            Verb::Shutdown { hard } => {
                self.request_stop(hard);
                Ok(Payload::Done {
                    message: if hard {
                        "stopping now".into()
                    } else {
                        "stopping: workers finish their requests first".into()
                    },
                })
            }
            Verb::Metrics => Ok(Payload::Metrics(self.all_samples())),
            Verb::LogLevel { level } => Ok(self.set_log_level(&level)?),
            Verb::Upgrade {
                binary,
                workers_only: true,
            } => Ok(self.roll_workers(binary).map_err(Box::new)?),
            Verb::Upgrade {
                binary,
                workers_only: false,
            } => Ok(self.hand_over(binary).map_err(Box::new)?),
            Verb::Change(edit) => {
                let done = apply_change(self, &edit)?;
                self.publish(&edit);
                Ok(done)
            }
        }
    }
}

/// Writes `text` at `path` through a temporary file, mode 0600: the saved state holds the
/// private keys of the certificates.
fn save(text: &str, path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp-kakehi");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// One change, from lbctl or from another appliance (`sync.rs`): applied to a copy of the
/// running state, validated whole, pushed to the workers; refused, it changes nothing.
pub(crate) fn apply_change(
    sup: &mut Supervisor,
    edit: &lb_config::state::Edit,
) -> Result<Payload, VerbError> {
    let checked = sup.state().apply(edit, sup.source())?;
    apply_state(sup, checked)
}

/// Pushes `checked` to every worker and makes it the running state.
fn apply_state(sup: &mut Supervisor, checked: Checked) -> Result<Payload, VerbError> {
    let Checked { state: new, config } = checked;
    let old_listeners: Vec<_> = sup.config().listeners.iter().map(|l| l.address).collect();
    let new_listeners: Vec<_> = config.listeners.iter().map(|l| l.address).collect();
    let listeners_changed = old_listeners != new_listeners;
    for (what, same) in [
        ("workers", config.workers == sup.config().workers),
        ("steering", config.steering == sup.config().steering),
        ("user", config.user == sup.config().user),
        ("group", config.group == sup.config().group),
        (
            "buffer_size",
            config.buffer_size == sup.config().buffer_size,
        ),
        (
            "command_socket",
            config.command_socket == sup.config().command_socket,
        ),
        (
            "access_log.target",
            config.access_log.target == sup.config().access_log.target,
        ),
        ("sync", config.sync == sup.config().sync),
        ("bgp", config.bgp == sup.config().bgp),
    ] {
        if !same {
            return Err(VerbError::Fixed { what });
        }
    }
    let changes = state::diff(sup.state(), &new);
    if changes.is_empty() {
        return Ok(Payload::Applied(Applied {
            changes,
            workers: Vec::new(),
        }));
    }
    // Per-client limits live in the kernel: set them first, so that a listener that cannot
    // have them refuses the change before anything else moves.
    let running = sup.config().clone();
    sup.set_client_limits(&running, &config)
        .map_err(VerbError::ClientLimits)?;
    let workers = if listeners_changed {
        // New sockets: the workers are replaced by ones that hold them (no restart).
        match sup.change_listeners(&config) {
            Ok(workers) => workers,
            Err(e) => {
                let _ = sup.set_client_limits(&running, &running);
                return Err(e.into());
            }
        }
    } else {
        push_to_workers(sup, &config)
    };
    sup.update_steering(&config);
    sup.replace_state(new, config)
        .map_err(VerbError::NotRecorded)?;
    Ok(Payload::Applied(Applied { changes, workers }))
}

/// Sends the whole configuration to every running worker; collects their answers.
fn push_to_workers(sup: &mut Supervisor, config: &lb_config::Config) -> Vec<WorkerAck> {
    let order = Order::Configure {
        config: Box::new(config.clone()),
    };
    sup.workers_mut()
        .ask_all(&order, WORKER_APPLY_TIMEOUT)
        .into_iter()
        .map(|(index, pid, answer)| WorkerAck {
            index,
            pid: Some(pid),
            error: match answer {
                Ok(Reply::Done) => None,
                Ok(Reply::Refused { error }) => Some(error),
                Ok(other) => Some(format!("unexpected answer from the worker: {other:?}")),
                Err(e) => Some(e.to_string()),
            },
        })
        .collect()
}

fn status(sup: &mut Supervisor) -> Status {
    Status {
        version: crate::upgrade::version().into(),
        pid: std::process::id(),
        generation: sup.generation(),
        config: sup.source().to_path_buf(),
        uptime_secs: sup.uptime().as_secs(),
        workers: sup.worker_rows(),
        listeners: sup
            .state()
            .listeners
            .iter()
            .map(|l| ListenerStatus {
                address: l.address.clone(),
                protocol: l.protocol.unwrap_or(state::ListenerProtocolDef::Http),
                frontends: sup
                    .state()
                    .clusters
                    .values()
                    .flat_map(|c| c.frontends.iter())
                    .filter(|f| f.address == l.address)
                    .count(),
            })
            .collect(),
        backends: sup.health_rows(),
        sync: sup.sync_status(),
    }
}
