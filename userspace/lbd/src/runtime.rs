//! Runtime changes: how the supervisor answers lbctl (the `Handler` of the command socket).
//!
//! The running state is the config document (`lb_config::state::State`). A change is applied
//! to a copy, validated whole by the same validator as the file, then pushed to every running
//! worker over its channel as the complete new configuration text; lbctl's answer lists what
//! changed and how each worker took it. Only then does the copy become the running state, and
//! the config memfd handed to (re)started workers is replaced, so a worker restarted later
//! starts from the current state, not from the file. A refused change changes nothing.
//! A change of the listeners binds the new sockets and rolls the workers onto them (the old
//! workers finish their requests), like `lbctl upgrade --workers-only`.

use crate::supervisor::Supervisor;
use lb_config::protocol::{Applied, ListenerStatus, Payload, Status, Verb, WorkerAck};
use lb_config::state::{self, State};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How long a worker may take to apply a configuration.
const WORKER_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

impl crate::command::Handler for Supervisor {
    fn handle(&mut self, verb: Verb) -> Result<Payload, String> {
        log::info!("lbctl: {}", verb.name());
        match verb {
            Verb::Status => Ok(Payload::Status(self.status())),
            Verb::StateDump => Ok(Payload::State(Box::new(self.state().clone()))),
            Verb::StateSave { path } => {
                let text = self.state().to_toml();
                let tmp = path.with_extension("tmp-kakehi");
                // Mode 0600: the saved state holds the private keys of the certificates.
                let write = || -> std::io::Result<()> {
                    use std::os::unix::fs::OpenOptionsExt;
                    let _ = std::fs::remove_file(&tmp);
                    let mut file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    file.write_all(text.as_bytes())?;
                    file.sync_all()?;
                    std::fs::rename(&tmp, &path)
                };
                write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                Ok(Payload::Done {
                    message: format!("state saved to {}", path.display()),
                })
            }
            Verb::StateLoad { path } => {
                let new = State::load(&path)
                    .map_err(|e| e.to_string())?
                    .with_absolute_paths(&path);
                self.apply_state(new)
            }
            Verb::Reload => {
                let path = self.source().to_path_buf();
                let new = State::load(&path)
                    .map_err(|e| e.to_string())?
                    .with_absolute_paths(&path);
                self.apply_state(new)
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
            Verb::LogLevel { level } => self.set_log_level(&level),
            Verb::Upgrade {
                binary,
                workers_only: true,
            } => self.roll_workers(binary),
            Verb::Upgrade {
                binary,
                workers_only: false,
            } => self.hand_over(binary),
            other => {
                if let Some(message) = crate::command::not_supported_yet(&other) {
                    return Err(message);
                }
                let Some(edit) = other.edit() else {
                    return Err(format!("{} is not supported", other.name()));
                };
                let new = self
                    .state()
                    .apply(&edit, self.source())
                    .map_err(|e| e.to_string())?;
                self.apply_state(new)
            }
        }
    }
}

impl Supervisor {
    /// Validates `new`, pushes it to every worker, and makes it the running state.
    fn apply_state(&mut self, new: State) -> Result<Payload, String> {
        let config = new.validate(self.source()).map_err(|e| e.to_string())?;
        let old_listeners: Vec<_> = self.config().listeners.iter().map(|l| l.address).collect();
        let new_listeners: Vec<_> = config.listeners.iter().map(|l| l.address).collect();
        let listeners_changed = old_listeners != new_listeners;
        for (what, same) in [
            ("workers", config.workers == self.config().workers),
            ("steering", config.steering == self.config().steering),
            ("user", config.user == self.config().user),
            ("group", config.group == self.config().group),
            (
                "buffer_size",
                config.buffer_size == self.config().buffer_size,
            ),
            (
                "command_socket",
                config.command_socket == self.config().command_socket,
            ),
            (
                "access_log.target",
                config.access_log.target == self.config().access_log.target,
            ),
        ] {
            if !same {
                return Err(format!(
                    "{what} cannot change at runtime: restart lbd (or, later, lbctl upgrade)"
                ));
            }
        }
        let changes = state::diff(self.state(), &new);
        if changes.is_empty() {
            return Ok(Payload::Applied(Applied {
                changes,
                workers: Vec::new(),
            }));
        }
        let text = new.to_toml();
        let workers = if listeners_changed {
            // New sockets: the workers are replaced by ones that hold them (no restart).
            self.change_listeners(&config, &text)?
        } else {
            self.push_to_workers(&text)
        };
        self.update_steering(&config);
        self.replace_state(new, config, &text)
            .map_err(|e| format!("the change was applied but not recorded: {e}"))?;
        Ok(Payload::Applied(Applied { changes, workers }))
    }

    /// Sends the whole configuration to every running worker; collects their answers.
    fn push_to_workers(&mut self, text: &str) -> Vec<WorkerAck> {
        let frame = channel_frame(text.as_bytes());
        let mut sent = Vec::new();
        let mut acks = Vec::new();
        for (index, pid, channel) in self.channels() {
            match channel.write_all(&frame) {
                Ok(()) => sent.push((index, pid)),
                Err(e) => acks.push(WorkerAck {
                    index,
                    pid: Some(pid),
                    error: Some(format!("cannot reach the worker: {e}")),
                }),
            }
        }
        for (index, pid) in sent {
            let error = match self.channel(index) {
                Some(channel) => read_answer(channel, WORKER_APPLY_TIMEOUT).err(),
                None => Some("the worker went away".into()),
            };
            acks.push(WorkerAck {
                index,
                pid: Some(pid),
                error,
            });
        }
        acks.sort_by_key(|a| a.index);
        acks
    }

    fn status(&mut self) -> Status {
        Status {
            version: crate::upgrade::version().into(),
            pid: std::process::id(),
            generation: self.generation(),
            config: self.source().to_path_buf(),
            uptime_secs: self.uptime().as_secs(),
            workers: self.worker_rows(),
            listeners: self
                .state()
                .listeners
                .iter()
                .map(|l| ListenerStatus {
                    address: l.address.clone(),
                    protocol: l.protocol.unwrap_or(state::ListenerProtocolDef::Http),
                    frontends: self
                        .state()
                        .clusters
                        .values()
                        .flat_map(|c| c.frontends.iter())
                        .filter(|f| f.address == l.address)
                        .count(),
                })
                .collect(),
            backends: self.health_rows(),
        }
    }
}

/// One frame on a worker's channel: u32 big-endian length, then `body` (a configuration's
/// text, or a `\0` command).
pub(crate) fn channel_frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads one answer frame from a worker: `ok`, or `error: WHY`, waiting at most `timeout`.
/// A metrics answer that came too late for its request (observe.rs) is skipped.
pub(crate) fn read_answer(channel: &mut UnixStream, timeout: Duration) -> Result<(), String> {
    loop {
        match read_one_answer(channel, timeout) {
            Err(e)
                if e.starts_with("unexpected answer from the worker: \"metrics ")
                    || e.starts_with("unexpected answer from the worker: \"ejected ") => {}
            other => return other,
        }
    }
}

fn read_one_answer(channel: &mut UnixStream, timeout: Duration) -> Result<(), String> {
    let _ = channel.set_read_timeout(Some(timeout));
    let mut len = [0u8; 4];
    channel
        .read_exact(&mut len)
        .map_err(|e| format!("no answer from the worker: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 16 << 20 {
        return Err("the worker's answer is too large".into());
    }
    let mut body = vec![0u8; len];
    channel
        .read_exact(&mut body)
        .map_err(|e| format!("no answer from the worker: {e}"))?;
    let body = String::from_utf8_lossy(&body);
    match body.strip_prefix("error: ") {
        Some(why) => Err(why.to_string()),
        None if body == "ok" => Ok(()),
        None => Err(format!("unexpected answer from the worker: {body:?}")),
    }
}
