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

use crate::answers::Verdict;
use crate::supervisor::Supervisor;
use lb_config::protocol::{Applied, ListenerStatus, Payload, Status, Verb, WorkerAck};
use lb_config::state::{self, State};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

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
        let mut sent = Vec::new();
        let mut acks = Vec::new();
        for (index, pid, channel) in self.channels() {
            match send_frame(channel, text.as_bytes()) {
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

/// How long one whole frame to a worker may take to write: a worker that does not read its
/// channel (stuck, or not ours any more) cannot block main.
pub(crate) const CHANNEL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes a channel whose frames no longer line up (half a frame was written or read): the
/// worker sees its end close, drains and exits, and its replacement gets a fresh channel.
fn condemn(channel: &UnixStream, why: String) -> String {
    let _ = channel.shutdown(std::net::Shutdown::Both);
    format!("{why}; its channel is closed, so the worker drains and is replaced")
}

/// Sends one frame holding `body` to a worker, all of it within [`CHANNEL_WRITE_TIMEOUT`].
pub(crate) fn send_frame(channel: &mut UnixStream, body: &[u8]) -> Result<(), String> {
    let frame = channel_frame(body);
    let deadline = Instant::now() + CHANNEL_WRITE_TIMEOUT;
    let mut left = frame.as_slice();
    while !left.is_empty() {
        let time = deadline.saturating_duration_since(Instant::now());
        let why = if time.is_zero() {
            Some(format!(
                "the worker did not take a frame of {} bytes within {CHANNEL_WRITE_TIMEOUT:?}",
                frame.len()
            ))
        } else {
            channel
                .set_write_timeout(Some(time))
                .err()
                .map(|e| e.to_string())
        };
        if let Some(why) = why {
            return Err(if left.len() < frame.len() {
                condemn(channel, why)
            } else {
                why
            });
        }
        match channel.write(left) {
            Ok(0) => return Err("the worker's channel is closed".into()),
            Ok(n) => left = left.get(n..).unwrap_or_default(),
            Err(e) if transient(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// A read or write that may simply be tried again: interrupted, or cut by its timeout.
pub(crate) fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
    )
}

/// Fills `buf` from the channel by `deadline`; on failure, how much was read and why.
fn read_by(
    channel: &mut UnixStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), (usize, String)> {
    let mut filled = 0;
    while filled < buf.len() {
        let time = deadline.saturating_duration_since(Instant::now());
        if time.is_zero() || channel.set_read_timeout(Some(time)).is_err() {
            return Err((filled, "timed out".into()));
        }
        match channel.read(buf.get_mut(filled..).unwrap_or_default()) {
            Ok(0) => return Err((filled, "the worker's channel is closed".into())),
            Ok(n) => filled += n,
            Err(e) if transient(&e) => {}
            Err(e) => return Err((filled, e.to_string())),
        }
    }
    Ok(())
}

/// Reads one frame from a worker, whole by `deadline` (however slowly it trickles) and at
/// most [`crate::answers::MAX_WORKER_FRAME`] bytes.
pub(crate) fn recv_frame(channel: &mut UnixStream, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    match read_by(channel, &mut len, deadline) {
        Ok(()) => {}
        Err((0, why)) => return Err(why),
        Err((_, why)) => return Err(condemn(channel, why)),
    }
    let len = crate::answers::frame_len(len).map_err(|why| condemn(channel, why))?;
    let mut body = vec![0u8; len];
    read_by(channel, &mut body, deadline).map_err(|(_, why)| condemn(channel, why))?;
    Ok(body)
}

/// Reads one answer frame from a worker: `ok`, or `error: WHY`, waiting at most `timeout` in
/// all. Answers that came too late for their request (metrics, ejected backends: observe.rs)
/// are skipped, until the deadline.
pub(crate) fn read_answer(channel: &mut UnixStream, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let body =
            recv_frame(channel, deadline).map_err(|e| format!("no answer from the worker: {e}"))?;
        return match crate::answers::verdict(&body) {
            Verdict::Late => continue,
            Verdict::Done => Ok(()),
            Verdict::Refused(why) | Verdict::Unexpected(why) => Err(why),
        };
    }
}
