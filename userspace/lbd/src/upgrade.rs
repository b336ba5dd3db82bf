//! The upgrade handoff between two lbd main processes (`lbctl upgrade`).
//!
//! The running ("old") main starts the new binary as `lbd --upgrade-fd N`, with one end of a
//! unix socketpair as fd N, and sends over it one versioned message, then the descriptors:
//!
//! 1. old → new: a [`Handoff`] frame (the running state as TOML, the generation, the log
//!    level, and the role of every descriptor that follows), then the descriptors themselves
//!    with SCM_RIGHTS: the command socket, every listener socket (listener × worker), and per
//!    listener the steering program and its four maps.
//! 2. new: checks the count and the kind of every descriptor against the message and the state
//!    (a TCP listener bound to the listener's address, a BPF program of type sk_reuseport, BPF
//!    maps of the right types and names), validates the state like a config file, starts its
//!    workers on the very same sockets and waits until each one answers on its channel.
//! 3. new → old: a [`Reply`]: ready (pid, version, generation), or failed with the reason.
//! 4. old → new: `commit`. From then on the new main serves the command socket and the old
//!    one stops accepting commands, answers lbctl, and retires its workers (they stop
//!    accepting, finish their requests and exit); then it exits.
//!
//! The message, its types and every check made before a descriptor is received are in
//! `handoff.rs`; this file has the socket side and the descriptors' own checks.
//!
//! Nothing is re-bound: the accept queues, the reuseport groups and the attached steering
//! program are the same kernel objects before and after, so no connection waiting in a queue
//! is reset. If the new main exits, fails, or is not ready in time, the old one kills it and
//! keeps serving unchanged. If the old main dies after the new one is ready, the new one takes
//! over without the commit.

use crate::fds::{self, FdKind};
use crate::handoff::{self, CheckError, Checked};
pub use crate::handoff::{FdRole, Handoff, Reply, HANDOFF_VERSION};
use crate::steering::{self, OwnedPerIpFds, OwnedSteeringFds, Steering, SteeringError};
use lb_config::protocol::frame;
use lb_config::state::State;
use lb_config::Config;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Largest frame either side accepts (the state of a big config fits many times over).
const MAX_FRAME: usize = 64 << 20;
/// The word the old main sends once it has taken the new main's "ready".
const COMMIT: &str = "commit";

/// What went wrong on the handoff channel, or with what came over it.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("timed out")]
    TimedOut,
    #[error("the other side closed the channel")]
    Closed,
    /// The other side is gone (how it ended, as its watcher says).
    #[error("{0}")]
    Gone(String),
    #[error(transparent)]
    TooLarge(#[from] frame::TooLarge),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("encoding the {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the new lbd's reply is not valid: {0}")]
    BadReply(#[source] serde_json::Error),
    #[error("unexpected word from the running lbd: {0:?}")]
    BadCommit(String),
    #[error("internal: {roles} descriptor roles for {descriptors} descriptors")]
    RoleCount { roles: usize, descriptors: usize },
    #[error("internal: descriptor {index} ({role:?}) is {kind:?}")]
    WrongKind {
        index: usize,
        role: FdRole,
        kind: FdKind,
    },
    #[error("{what}: {source}")]
    Descriptors {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A descriptor is not what its role says, or is missing or given twice.
    #[error("{0}")]
    Descriptor(String),
    #[error("listener {listener}: taking over the steering maps: {source}")]
    Adopt {
        listener: usize,
        #[source]
        source: SteeringError,
    },
}

/// This binary's version and a short id of the executable file it runs from (its size,
/// modification time and inode, hashed), so two builds of one version can be told apart.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        let build = std::fs::metadata("/proc/self/exe")
            .map(|m| {
                // FNV-1a: no cryptography needed, only a stable fingerprint.
                let words = [m.len(), m.mtime() as u64, m.mtime_nsec() as u64, m.ino()];
                let hash = words
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                    });
                format!("{:08x}", hash >> 32)
            })
            .unwrap_or_else(|_| "unknown".into());
        format!("{} (binary {build})", env!("CARGO_PKG_VERSION"))
    })
}

/// Writes one frame (the shared codec's), blocking until it is all written.
pub fn write_frame(stream: &mut UnixStream, body: &[u8]) -> Result<(), HandoffError> {
    stream.write_all(&frame::encode(&[body], MAX_FRAME)?)?;
    stream.flush()?;
    Ok(())
}

/// Reads one frame, waiting at most until `deadline`; `alive` is asked between waits and
/// its error ends the wait (the old main uses it to notice that the new one exited).
pub fn read_frame(
    stream: &mut UnixStream,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<Vec<u8>, HandoffError> {
    // Never read past the frame: the descriptors that may follow ride on the next byte,
    // and a plain read of that byte would drop them. So: the prefix, then the body exactly.
    let mut buffer = vec![0u8; frame::LENGTH_BYTES];
    let mut filled = 0;
    let mut have_len = false;
    loop {
        if filled == buffer.len() {
            if have_len {
                buffer.drain(..frame::LENGTH_BYTES);
                return Ok(buffer);
            }
            let mut prefix = [0u8; frame::LENGTH_BYTES];
            prefix.copy_from_slice(buffer.get(..frame::LENGTH_BYTES).unwrap_or(&[0; 4]));
            let len = frame::body_len(prefix, MAX_FRAME)?;
            buffer.resize(frame::LENGTH_BYTES + len, 0);
            have_len = true;
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(HandoffError::TimedOut);
        }
        let slice = (deadline - now).min(Duration::from_millis(100));
        stream.set_read_timeout(Some(slice))?;
        match stream.read(buffer.get_mut(filled..).unwrap_or_default()) {
            Ok(0) => return Err(HandoffError::Closed),
            Ok(n) => filled += n,
            Err(e) if crate::channel::transient(&e) => {}
            Err(e) => return Err(e.into()),
        }
        alive().map_err(HandoffError::Gone)?;
    }
}

/// Sends the handoff: the message, then every descriptor in the order of `message.fds`.
pub fn send(
    stream: &mut UnixStream,
    message: &Handoff,
    descriptors: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), HandoffError> {
    if message.fds.len() != descriptors.len() {
        return Err(HandoffError::RoleCount {
            roles: message.fds.len(),
            descriptors: descriptors.len(),
        });
    }
    // The sender checks too: a descriptor that is not what its role says is a bug here,
    // better refused before the new lbd sees it.
    for (index, (role, fd)) in message.fds.iter().zip(descriptors).enumerate() {
        let kind = fds::kind_of(*fd);
        if !role_matches(role, &kind) {
            return Err(HandoffError::WrongKind {
                index,
                role: role.clone(),
                kind,
            });
        }
    }
    let body = serde_json::to_vec(message).map_err(|source| HandoffError::Encode {
        what: "handoff",
        source,
    })?;
    write_frame(stream, &body)?;
    let raw: Vec<_> = descriptors.iter().map(fds::raw).collect();
    fds::send_fds(stream, &raw).map_err(|source| HandoffError::Descriptors {
        what: "sending the descriptors",
        source,
    })
}

/// What the new main takes over, checked.
pub struct Handed {
    pub from_version: String,
    pub from_pid: u32,
    pub generation: u64,
    pub source: PathBuf,
    pub state: State,
    pub config: Config,
    pub down: Vec<(String, SocketAddr)>,
    pub ticket_keys: Option<lb_proxy::tickets::Keys>,
    pub sync_revision: Option<u64>,
    pub command: UnixListener,
    /// `sockets[listener][worker]`.
    pub sockets: Vec<Vec<TcpListener>>,
    pub steering: Vec<Steering>,
}

/// Receives and checks a handoff (the new main's side). Any error means: refuse, start
/// nothing.
pub fn receive(stream: &mut UnixStream, timeout: Duration) -> Result<Handed, HandoffError> {
    let body = read_frame(stream, Instant::now() + timeout, || Ok(()))?;
    // Every check that needs no descriptor comes first: a message refused here leaves the
    // descriptors unread, and they close with the channel.
    let Checked {
        message,
        state,
        config,
    } = handoff::check(&body)?;
    // read_frame left a short read timeout on the socket; the descriptors follow at once.
    stream.set_read_timeout(Some(timeout))?;
    let descriptors =
        fds::recv_fds(stream, message.fds.len()).map_err(|source| HandoffError::Descriptors {
            what: "receiving the descriptors of the handoff",
            source,
        })?;
    let parts = sort(&message.fds, descriptors, &config)?;
    Ok(Handed {
        from_version: message.from_version,
        from_pid: message.from_pid,
        generation: message.generation,
        source: message.source,
        state,
        config,
        down: message.down,
        ticket_keys: message
            .ticket_keys
            .as_deref()
            .and_then(lb_proxy::tickets::Keys::from_bytes),
        sync_revision: message.sync_revision,
        command: parts.command,
        sockets: parts.sockets,
        steering: parts.steering,
    })
}

struct Parts {
    command: UnixListener,
    sockets: Vec<Vec<TcpListener>>,
    steering: Vec<Steering>,
}

/// Puts every descriptor where its role says, checking that the roles are exactly what
/// `config` needs and that each descriptor is of the kind its role claims.
fn sort(
    roles: &[FdRole],
    descriptors: Vec<OwnedFd>,
    config: &Config,
) -> Result<Parts, HandoffError> {
    let refuse = HandoffError::Descriptor;
    let listeners = config.listeners.len();
    let workers = config.workers;
    let ebpf = config.steering == lb_config::Steering::Ebpf;
    let expected = 1 + listeners * workers + if ebpf { listeners * 5 } else { 0 };
    let optional = if ebpf { listeners * 5 } else { 0 };
    if roles.len() < expected || roles.len() > expected + optional {
        return Err(refuse(format!(
            "{} descriptors handed over; {listeners} listeners × {workers} workers{} need {expected}",
            roles.len(),
            if ebpf { " with eBPF steering" } else { "" }
        )));
    }
    let mut command = None;
    let mut sockets: Vec<Vec<Option<TcpListener>>> = (0..listeners)
        .map(|_| (0..workers).map(|_| None).collect())
        .collect();
    let mut programs: Vec<Option<OwnedFd>> = (0..listeners).map(|_| None).collect();
    let mut tracks: Vec<Option<OwnedFd>> = (0..listeners).map(|_| None).collect();
    let mut links: Vec<Option<OwnedFd>> = (0..listeners).map(|_| None).collect();
    let mut maps: Vec<std::collections::HashMap<String, OwnedFd>> =
        (0..listeners).map(|_| Default::default()).collect();
    for (index, (role, fd)) in roles.iter().zip(descriptors).enumerate() {
        let kind = fds::kind_of(fd.as_fd());
        let wrong = |wanted: &str| {
            refuse(format!(
                "descriptor {index} ({role:?}) should be {wanted}, it is {kind:?}"
            ))
        };
        match role {
            FdRole::CommandSocket => {
                if kind != FdKind::UnixListener {
                    return Err(wrong("a listening unix socket"));
                }
                if command.replace(UnixListener::from(fd)).is_some() {
                    return Err(refuse("two command sockets handed over".into()));
                }
            }
            FdRole::Listener {
                listener,
                worker,
                address,
            } => {
                let Some(expected) = config.listeners.get(*listener).map(|l| l.address) else {
                    return Err(refuse(format!(
                        "descriptor {index}: no listener {listener} in the state"
                    )));
                };
                let bound = match kind {
                    FdKind::TcpListener(bound) => bound,
                    _ => return Err(wrong("a listening TCP socket")),
                };
                let same = bound.ip() == expected.ip()
                    && (expected.port() == 0 || bound.port() == expected.port());
                if !same || *address != bound {
                    return Err(refuse(format!(
                        "descriptor {index}: listener {listener} is {expected} in the state, \
                         the socket is bound to {bound} (message says {address})"
                    )));
                }
                let slot = sockets
                    .get_mut(*listener)
                    .and_then(|group| group.get_mut(*worker))
                    .ok_or_else(|| {
                        refuse(format!(
                            "descriptor {index}: no worker {worker} (workers = {workers})"
                        ))
                    })?;
                if slot.replace(TcpListener::from(fd)).is_some() {
                    return Err(refuse(format!(
                        "descriptor {index}: listener {listener} worker {worker} given twice"
                    )));
                }
            }
            FdRole::SteeringProgram { listener } => {
                if kind != FdKind::BpfProgram(steering::PROG_TYPE_SK_REUSEPORT) {
                    return Err(wrong("an sk_reuseport BPF program"));
                }
                let slot = programs
                    .get_mut(*listener)
                    .ok_or_else(|| refuse(format!("descriptor {index}: no listener {listener}")))?;
                if slot.replace(fd).is_some() {
                    return Err(refuse(format!(
                        "descriptor {index}: two programs for listener {listener}"
                    )));
                }
            }
            FdRole::TrackProgram { listener } | FdRole::TrackLink { listener } => {
                let (slots, wanted) = match role {
                    FdRole::TrackProgram { .. } => (&mut tracks, "the sock_ops program track"),
                    _ => (&mut links, "the cgroup link of track"),
                };
                if !role_matches(role, &kind) {
                    return Err(wrong(wanted));
                }
                let slot = slots
                    .get_mut(*listener)
                    .ok_or_else(|| refuse(format!("descriptor {index}: no listener {listener}")))?;
                if slot.replace(fd).is_some() {
                    return Err(refuse(format!(
                        "descriptor {index}: {wanted} of listener {listener} given twice"
                    )));
                }
            }
            FdRole::SteeringMap { listener, map } => {
                let wanted = map_type(map)
                    .ok_or_else(|| refuse(format!("descriptor {index}: unknown map {map:?}")))?;
                if kind != FdKind::BpfMap(wanted) {
                    return Err(wrong(&format!("BPF map {map} (type {wanted})")));
                }
                let group = maps
                    .get_mut(*listener)
                    .ok_or_else(|| refuse(format!("descriptor {index}: no listener {listener}")))?;
                if group.insert(map.clone(), fd).is_some() {
                    return Err(refuse(format!(
                        "descriptor {index}: map {map} of listener {listener} given twice"
                    )));
                }
            }
        }
    }
    let command = command.ok_or_else(|| refuse("no command socket handed over".into()))?;
    let sockets = sockets
        .into_iter()
        .enumerate()
        .map(|(l, group)| {
            group
                .into_iter()
                .enumerate()
                .map(|(w, s)| {
                    s.ok_or_else(|| refuse(format!("no socket for listener {l} worker {w}")))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut steering = Vec::new();
    if ebpf {
        let per_listener = programs
            .into_iter()
            .zip(maps)
            .zip(tracks.into_iter().zip(links));
        for (listener, ((program, mut group), (track, link))) in per_listener.enumerate() {
            let has_per_ip = group.contains_key(lb_ebpf_common::names::LIMITS);
            let mut take = |name: &str| {
                group.remove(name).ok_or_else(|| {
                    refuse(format!("listener {listener}: no map {name} handed over"))
                })
            };
            if link.is_some() && track.is_none() {
                return Err(refuse(format!(
                    "listener {listener}: the link of track, without track"
                )));
            }
            // An lbd from before per-client limits hands none of these over.
            let per_ip = if has_per_ip {
                Some(OwnedPerIpFds {
                    track,
                    limits: take(lb_ebpf_common::names::LIMITS)?,
                    conns: take(lb_ebpf_common::names::CONNS)?,
                    rates: take(lb_ebpf_common::names::RATES)?,
                    link,
                })
            } else if track.is_some() {
                return Err(refuse(format!(
                    "listener {listener}: track without map {} handed over",
                    lb_ebpf_common::names::LIMITS
                )));
            } else {
                None
            };
            let fds = OwnedSteeringFds {
                program: program
                    .ok_or_else(|| refuse(format!("listener {listener}: no steering program")))?,
                sockets: take(lb_ebpf_common::names::SOCKETS)?,
                workers: take(lb_ebpf_common::names::WORKERS)?,
                control: take(lb_ebpf_common::names::CONTROL)?,
                counters: take(lb_ebpf_common::names::COUNTERS)?,
                per_ip,
            };
            if let Some(name) = group.keys().next() {
                return Err(refuse(format!(
                    "listener {listener}: map {name} handed over without the program that uses it"
                )));
            }
            let adopted =
                Steering::adopt(fds).map_err(|source| HandoffError::Adopt { listener, source })?;
            if adopted.control().workers as usize != workers {
                return Err(refuse(format!(
                    "listener {listener}: the steering program steers {} workers, the state has {workers}",
                    adopted.control().workers
                )));
            }
            steering.push(adopted);
        }
    }
    Ok(Parts {
        command,
        sockets,
        steering,
    })
}

/// Whether a descriptor of `kind` can play `role` (the listener's address included).
fn role_matches(role: &FdRole, kind: &FdKind) -> bool {
    match (role, kind) {
        (FdRole::CommandSocket, FdKind::UnixListener) => true,
        (FdRole::Listener { address, .. }, FdKind::TcpListener(bound)) => address == bound,
        (FdRole::SteeringProgram { .. }, FdKind::BpfProgram(t)) => {
            *t == steering::PROG_TYPE_SK_REUSEPORT
        }
        (FdRole::SteeringMap { map, .. }, FdKind::BpfMap(t)) => map_type(map) == Some(*t),
        (FdRole::TrackProgram { .. }, FdKind::BpfProgram(t)) => *t == steering::PROG_TYPE_SOCK_OPS,
        (FdRole::TrackLink { .. }, FdKind::BpfLink(t)) => t == "cgroup",
        _ => false,
    }
}

fn map_type(name: &str) -> Option<u32> {
    use lb_ebpf_common::names;
    match name {
        n if n == names::SOCKETS => Some(steering::MAP_TYPE_REUSEPORT_SOCKARRAY),
        n if n == names::WORKERS || n == names::CONTROL || n == names::LIMITS => {
            Some(steering::MAP_TYPE_ARRAY)
        }
        n if n == names::CONNS || n == names::RATES => Some(steering::MAP_TYPE_LRU_HASH),
        n if n == names::COUNTERS => Some(steering::MAP_TYPE_PERCPU_ARRAY),
        _ => None,
    }
}

/// The new main's answer, sent to the old one.
pub fn reply(stream: &mut UnixStream, reply: &Reply) -> Result<(), HandoffError> {
    let body = serde_json::to_vec(reply).map_err(|source| HandoffError::Encode {
        what: "reply",
        source,
    })?;
    write_frame(stream, &body)
}

/// The old main: tells the new one to go on.
pub fn commit(stream: &mut UnixStream) -> Result<(), HandoffError> {
    write_frame(stream, COMMIT.as_bytes())
}

/// The new main, after "ready": waits for the commit. `Ok(true)`: committed; `Ok(false)`:
/// the old main is gone (it closed the channel), so this one takes over anyway. `Err`: the
/// old main gave up on this one (timeout or rollback).
pub fn wait_commit(stream: &mut UnixStream, timeout: Duration) -> Result<bool, HandoffError> {
    match read_frame(stream, Instant::now() + timeout, || Ok(())) {
        Ok(body) if body == COMMIT.as_bytes() => Ok(true),
        Ok(body) => Err(HandoffError::BadCommit(
            String::from_utf8_lossy(&body).into_owned(),
        )),
        Err(HandoffError::Closed) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The old main: reads the new main's reply.
pub fn read_reply(
    stream: &mut UnixStream,
    deadline: Instant,
    alive: impl FnMut() -> Result<(), String>,
) -> Result<Reply, HandoffError> {
    let body = read_frame(stream, deadline, alive)?;
    serde_json::from_slice(&body).map_err(HandoffError::BadReply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handoff_message_round_trips_and_a_future_version_is_named() {
        let message = Handoff {
            version: HANDOFF_VERSION,
            from_version: "0.1.0 (binary 1234abcd)".into(),
            from_pid: 42,
            generation: 3,
            source: "/etc/kakehi/config.toml".into(),
            state: "workers = 1\n".into(),
            log_level: "info".into(),
            down: Vec::new(),
            ticket_keys: None,
            sync_revision: None,
            fds: vec![
                FdRole::CommandSocket,
                FdRole::Listener {
                    listener: 0,
                    worker: 0,
                    address: "127.0.0.1:80".parse().unwrap(),
                },
                FdRole::SteeringMap {
                    listener: 0,
                    map: "WORKERS".into(),
                },
            ],
        };
        let text = serde_json::to_string(&message).unwrap();
        let back: Handoff = serde_json::from_str(&text).unwrap();
        assert_eq!(back.fds, message.fds);
        assert_eq!(back.state, message.state);

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let future = text.replace("\"version\":1", "\"version\":2");
        write_frame(&mut a, future.as_bytes()).unwrap();
        let err = receive(&mut b, Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("version 2"), "{err}");
    }

    #[test]
    fn the_sender_refuses_a_descriptor_that_does_not_match_its_role() {
        let (mut a, _b) = UnixStream::pair().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let message = Handoff {
            version: HANDOFF_VERSION,
            from_version: "test".into(),
            from_pid: 1,
            generation: 1,
            source: "/x.toml".into(),
            state: String::new(),
            log_level: "info".into(),
            down: Vec::new(),
            ticket_keys: None,
            sync_revision: None,
            fds: vec![
                FdRole::Listener {
                    listener: 0,
                    worker: 0,
                    address: other.local_addr().unwrap(),
                },
                FdRole::CommandSocket,
            ],
        };
        let err = send(&mut a, &message, &[tcp.as_fd(), tcp.as_fd()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("descriptor 0"), "{err}");
    }

    #[test]
    fn descriptors_pass_and_are_checked_by_kind() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = std::env::temp_dir().join(format!("kakehi-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cmd.sock");
        let _ = std::fs::remove_file(&path);
        let unix = UnixListener::bind(&path).unwrap();
        fds::send_fds(&a, &[fds::raw(&tcp), fds::raw(&unix), fds::raw(&a)]).unwrap();
        let got = fds::recv_fds(&b, 3).unwrap();
        assert_eq!(
            fds::kind_of(got[0].as_fd()),
            FdKind::TcpListener(tcp.local_addr().unwrap())
        );
        assert_eq!(fds::kind_of(got[1].as_fd()), FdKind::UnixListener);
        assert!(matches!(fds::kind_of(got[2].as_fd()), FdKind::Other(_)));
        // Fewer descriptors than announced: a clear error, not a hang.
        fds::send_fds(&a, &[fds::raw(&tcp)]).unwrap();
        drop(a.shutdown(std::net::Shutdown::Write));
        let err = fds::recv_fds(&b, 2).unwrap_err().to_string();
        assert!(err.contains("1 of 2"), "{err}");
        let _ = write_frame(&mut b, b"x");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
