//! The upgrade handoff message and every check made on it before a descriptor is received:
//! the types the old and the new lbd main exchange (`upgrade.rs` has the socket side), the
//! decoding of the message with its version, the handed-over state (read, then validated like
//! a config file), and the descriptor roles it announces against what that state needs.
//!
//! Pure functions over bytes: the `upgrade_handoff` fuzz target includes this file with
//! `#[path]` and feeds it arbitrary messages. The descriptors themselves (their kind, the
//! address a socket is bound to, the type of a BPF object) are checked in `upgrade.rs`, once
//! received, against the roles checked here.

use lb_config::state::State;
use lb_config::{Config, ConfigError};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The version of the handoff message; a main refuses a message of another version.
pub const HANDOFF_VERSION: u32 = 1;

/// What the old main hands over, besides the descriptors.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    /// [`HANDOFF_VERSION`] of the sender.
    pub version: u32,
    /// The sender's lbd version and build.
    pub from_version: String,
    pub from_pid: u32,
    /// The sender's generation; the receiver becomes `generation + 1`.
    pub generation: u64,
    /// The config file lbd was started with (reload reads it).
    pub source: PathBuf,
    /// The running state (the file plus every lbctl change), as TOML.
    pub state: String,
    pub log_level: String,
    /// The backends the health checks found down, as (cluster, address): the new lbd starts
    /// with them down instead of sending them requests until its own checks agree.
    #[serde(default)]
    pub down: Vec<(String, SocketAddr)>,
    /// The session ticket keys (`lb_proxy::tickets::Keys::to_bytes`): the new workers open
    /// the tickets the old ones issued. None from an lbd before them: new keys are drawn.
    #[serde(default)]
    pub ticket_keys: Option<Vec<u8>>,
    /// With `[sync]`: the etcd revision up to which the sender read and applied the other
    /// appliances' changes; the new lbd reads on from there (none: from the start).
    #[serde(default)]
    pub sync_revision: Option<u64>,
    /// What each descriptor that follows is, in order.
    pub fds: Vec<FdRole>,
}

/// The role of one handed-over descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FdRole {
    CommandSocket,
    Listener {
        listener: usize,
        worker: usize,
        address: SocketAddr,
    },
    SteeringProgram {
        listener: usize,
    },
    SteeringMap {
        listener: usize,
        map: String,
    },
    /// The `sock_ops` program that counts each client's connections (an lbd from before
    /// per-client limits hands none over).
    TrackProgram {
        listener: usize,
    },
    /// That program's link to lbd's cgroup, once a connection limit made it.
    TrackLink {
        listener: usize,
    },
}

/// The new main's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Ready {
        pid: u32,
        version: String,
        generation: u64,
    },
    Failed {
        error: String,
    },
}

/// Why a handoff message is refused before any descriptor is received.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the running lbd speaks handoff version {offered}, this one {HANDOFF_VERSION}")]
    Version { offered: u64 },
    #[error("the handoff message is not valid: {0}")]
    Invalid(#[source] serde_json::Error),
    #[error("the handed-over state: {0}")]
    State(#[source] ConfigError),
    #[error("the handed-over state does not validate here: {0}")]
    Validate(#[source] ConfigError),
    /// The descriptor roles are not what the state needs.
    #[error("{0}")]
    Roles(String),
}

/// A handoff message that passed every check that needs no descriptor.
pub struct Checked {
    pub message: Handoff,
    /// The handed-over state (steering made explicit for an older lbd's state).
    pub state: State,
    pub config: Config,
}

/// Decodes the message, checks its version, reads and validates its state, and checks that
/// its descriptor roles are exactly what that state needs. Any error means: refuse, start
/// nothing, use no descriptor.
pub fn check(body: &[u8]) -> Result<Checked, CheckError> {
    let message = decode(body)?;
    let mut state = State::from_toml(&message.state, &message.source).map_err(CheckError::State)?;
    keep_kernel_steering_of_an_older_lbd(&mut state, &message.fds);
    let config = state
        .validate(&message.source)
        .map_err(CheckError::Validate)?;
    check_roles(&message.fds, &config)?;
    Ok(Checked {
        message,
        state,
        config,
    })
}

/// The message in `body`, of this version.
pub fn decode(body: &[u8]) -> Result<Handoff, CheckError> {
    let message: Handoff = match serde_json::from_slice(body) {
        Ok(message) => message,
        Err(e) => {
            // Say which version was offered when the shape is another version's.
            let version = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
            match version {
                Some(v) if v != u64::from(HANDOFF_VERSION) => {
                    return Err(CheckError::Version { offered: v })
                }
                _ => return Err(CheckError::Invalid(e)),
            }
        }
    };
    if message.version != HANDOFF_VERSION {
        return Err(CheckError::Version {
            offered: u64::from(message.version),
        });
    }
    Ok(message)
}

/// `steering` defaulted to "kernel" before it defaulted to "ebpf": a state without the key,
/// handed over with no steering program, comes from an lbd that ran without eBPF. The new
/// generation keeps serving on those very sockets the same way (loading a program now would
/// need the sockets re-bound); steering = "ebpf" in the file, then a restart, switches.
pub fn keep_kernel_steering_of_an_older_lbd(state: &mut State, roles: &[FdRole]) {
    let programs = roles
        .iter()
        .any(|r| matches!(r, FdRole::SteeringProgram { .. }));
    if state.steering.is_none() && !programs && !state.listeners.is_empty() {
        log::warn!(
            "the running lbd steers without eBPF (steering was not set, and \"kernel\" was the \
             default before \"ebpf\"): this generation keeps kernel steering; set steering = \
             \"ebpf\" and restart lbd to switch"
        );
        state.steering = Some(lb_config::state::SteeringDef::Kernel);
    }
}

/// The steering maps a listener's descriptors include, by name.
pub const STEERING_MAPS: [&str; 4] = [
    lb_ebpf_common::names::SOCKETS,
    lb_ebpf_common::names::WORKERS,
    lb_ebpf_common::names::CONTROL,
    lb_ebpf_common::names::COUNTERS,
];

/// The maps of the per-client limits: handed over with `track`, all or none.
pub const PER_IP_MAPS: [&str; 3] = [
    lb_ebpf_common::names::LIMITS,
    lb_ebpf_common::names::CONNS,
    lb_ebpf_common::names::RATES,
];

/// Checks that `roles` are exactly the descriptors `config` needs, each once: the command
/// socket, a socket per listener and worker (at the listener's address), and with eBPF
/// steering a program and its maps per listener, plus (from an lbd that has per-client
/// limits) `track`, its maps and its cgroup link.
pub fn check_roles(roles: &[FdRole], config: &Config) -> Result<(), CheckError> {
    let listeners = config.listeners.len();
    let workers = config.workers;
    let ebpf = config.steering == lb_config::Steering::Ebpf;
    let per_listener = workers.saturating_add(if ebpf { 1 + STEERING_MAPS.len() } else { 0 });
    let expected = listeners.saturating_mul(per_listener).saturating_add(1);
    let optional = if ebpf {
        listeners.saturating_mul(2 + PER_IP_MAPS.len())
    } else {
        0
    };
    if roles.len() < expected || roles.len() > expected.saturating_add(optional) {
        return Err(CheckError::Roles(format!(
            "{} descriptors handed over; {listeners} listeners × {workers} workers{} need {expected}{}",
            roles.len(),
            if ebpf { " with eBPF steering" } else { "" },
            if ebpf {
                format!(" (and up to {optional} more for per-client limits)")
            } else {
                String::new()
            }
        )));
    }
    let mut seen = HashSet::new();
    for (index, role) in roles.iter().enumerate() {
        let in_range = |listener: usize| {
            if listener >= listeners {
                return Err(CheckError::Roles(format!(
                    "descriptor {index}: no listener {listener} in the state"
                )));
            }
            Ok(())
        };
        match role {
            FdRole::CommandSocket => {}
            FdRole::Listener {
                listener,
                worker,
                address,
            } => {
                in_range(*listener)?;
                if *worker >= workers {
                    return Err(CheckError::Roles(format!(
                        "descriptor {index}: no worker {worker} (workers = {workers})"
                    )));
                }
                if let Some(expected) = config.listeners.get(*listener).map(|l| l.address) {
                    let same = address.ip() == expected.ip()
                        && (expected.port() == 0 || address.port() == expected.port());
                    if !same {
                        return Err(CheckError::Roles(format!(
                            "descriptor {index}: listener {listener} is {expected} in the state, \
                             the message says {address}"
                        )));
                    }
                }
            }
            FdRole::SteeringProgram { listener } => {
                in_range(*listener)?;
                if !ebpf {
                    return Err(CheckError::Roles(format!(
                        "descriptor {index}: a steering program, but steering is not eBPF"
                    )));
                }
            }
            FdRole::SteeringMap { listener, map } => {
                in_range(*listener)?;
                if !ebpf {
                    return Err(CheckError::Roles(format!(
                        "descriptor {index}: a steering map, but steering is not eBPF"
                    )));
                }
                if !STEERING_MAPS.contains(&map.as_str()) && !PER_IP_MAPS.contains(&map.as_str()) {
                    return Err(CheckError::Roles(format!(
                        "descriptor {index}: unknown map {map:?}"
                    )));
                }
            }
            FdRole::TrackProgram { listener } | FdRole::TrackLink { listener } => {
                in_range(*listener)?;
                if !ebpf {
                    return Err(CheckError::Roles(format!(
                        "descriptor {index}: a per-client limits program, but steering is not eBPF"
                    )));
                }
            }
        }
        if !seen.insert(slot(role)) {
            return Err(CheckError::Roles(format!(
                "descriptor {index}: {role:?} is handed over twice"
            )));
        }
    }
    // Nothing needed is missing: with no duplicate and the count in range, an extra
    // per-client role could still stand in for a missing steering one.
    if ebpf {
        for listener in 0..listeners {
            let missing = |what: String| {
                CheckError::Roles(format!("listener {listener}: no {what} handed over"))
            };
            if !seen.contains(&(2, listener, 0, "")) {
                return Err(missing("steering program".into()));
            }
            for map in STEERING_MAPS {
                if !seen.contains(&(3, listener, 0, map)) {
                    return Err(missing(format!("map {map}")));
                }
            }
            let per_ip = PER_IP_MAPS
                .iter()
                .filter(|map| seen.contains(&(3, listener, 0, **map)))
                .count();
            let track = seen.contains(&(4, listener, 0, ""));
            let link = seen.contains(&(5, listener, 0, ""));
            if per_ip != 0 && per_ip != PER_IP_MAPS.len() {
                return Err(missing("whole set of per-client maps".into()));
            }
            if (track && per_ip == 0) || (link && !track) {
                return Err(CheckError::Roles(format!(
                    "listener {listener}: the per-client program or its link, without what it needs"
                )));
            }
        }
    }
    Ok(())
}

/// What a role fills: two roles for one slot are one descriptor too many. (What is missing
/// is found when the descriptors are sorted: `upgrade.rs` needs each one by its role.)
fn slot(role: &FdRole) -> (u8, usize, usize, &str) {
    match role {
        FdRole::CommandSocket => (0, 0, 0, ""),
        FdRole::Listener {
            listener, worker, ..
        } => (1, *listener, *worker, ""),
        FdRole::SteeringProgram { listener } => (2, *listener, 0, ""),
        FdRole::SteeringMap { listener, map } => (3, *listener, 0, map.as_str()),
        FdRole::TrackProgram { listener } => (4, *listener, 0, ""),
        FdRole::TrackLink { listener } => (5, *listener, 0, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str =
        "workers = 2\nsteering = \"kernel\"\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n";

    fn message(fds: Vec<FdRole>) -> Vec<u8> {
        serde_json::to_vec(&Handoff {
            version: HANDOFF_VERSION,
            from_version: "test".into(),
            from_pid: 1,
            generation: 1,
            source: "/etc/kakehi/config.toml".into(),
            state: STATE.into(),
            log_level: "info".into(),
            down: Vec::new(),
            ticket_keys: None,
            sync_revision: None,
            fds,
        })
        .unwrap()
    }

    fn listener(worker: usize) -> FdRole {
        FdRole::Listener {
            listener: 0,
            worker,
            address: "127.0.0.1:4000".parse().unwrap(),
        }
    }

    #[test]
    fn per_client_roles_come_all_together_or_not_at_all() {
        let state = "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n";
        let message = |fds: Vec<FdRole>| {
            serde_json::to_vec(&Handoff {
                version: HANDOFF_VERSION,
                from_version: "test".into(),
                from_pid: 1,
                generation: 1,
                source: "/etc/kakehi/config.toml".into(),
                state: state.into(),
                log_level: "info".into(),
                down: Vec::new(),
                ticket_keys: None,
                sync_revision: None,
                fds,
            })
            .unwrap()
        };
        let map = |name: &str| FdRole::SteeringMap {
            listener: 0,
            map: name.into(),
        };
        let base = || {
            let mut roles = vec![
                FdRole::CommandSocket,
                listener(0),
                FdRole::SteeringProgram { listener: 0 },
            ];
            roles.extend(STEERING_MAPS.iter().map(|m| map(m)));
            roles
        };
        let full = || {
            let mut roles = base();
            roles.extend(PER_IP_MAPS.iter().map(|m| map(m)));
            roles.push(FdRole::TrackProgram { listener: 0 });
            roles.push(FdRole::TrackLink { listener: 0 });
            roles
        };
        assert!(check(&message(base())).is_ok(), "an lbd from before them");
        assert!(check(&message(full())).is_ok());
        let mut no_link = full();
        no_link.pop();
        assert!(check(&message(no_link)).is_ok(), "no connection limit yet");
        let mut one_map = base();
        one_map.push(map("LIMITS"));
        let mut link_only = full();
        link_only.retain(|r| !matches!(r, FdRole::TrackProgram { .. }));
        let mut instead = full();
        instead.retain(|r| *r != map("COUNTERS"));
        for (bad, why) in [
            (one_map, "whole set of per-client maps"),
            (link_only, "without what it needs"),
            (instead, "no map COUNTERS"),
        ] {
            let err = check(&message(bad)).err().unwrap().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn roles_must_be_exactly_what_the_state_needs() {
        let good = vec![FdRole::CommandSocket, listener(0), listener(1)];
        assert!(check(&message(good)).is_ok());
        for (bad, why) in [
            (vec![FdRole::CommandSocket, listener(0)], "need 3"),
            (
                vec![FdRole::CommandSocket, listener(0), listener(0)],
                "twice",
            ),
            (
                vec![FdRole::CommandSocket, listener(0), listener(2)],
                "no worker 2",
            ),
            (
                vec![FdRole::CommandSocket, FdRole::CommandSocket, listener(0)],
                "twice",
            ),
            (
                vec![
                    FdRole::CommandSocket,
                    listener(0),
                    FdRole::SteeringProgram { listener: 0 },
                ],
                "not eBPF",
            ),
        ] {
            let err = check(&message(bad)).err().unwrap().to_string();
            assert!(err.contains(why), "{err}");
        }
        let other_ip = FdRole::Listener {
            listener: 0,
            worker: 1,
            address: "127.0.0.2:4000".parse().unwrap(),
        };
        let err = check(&message(vec![FdRole::CommandSocket, listener(0), other_ip]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("127.0.0.1:0 in the state"), "{err}");
    }

    #[test]
    fn another_version_is_named() {
        let text = String::from_utf8(message(vec![])).unwrap();
        let future = text.replace("\"version\":1", "\"version\":2");
        let err = decode(future.as_bytes()).err().unwrap().to_string();
        assert!(err.contains("version 2"), "{err}");
        let err = decode(b"{").err().unwrap().to_string();
        assert!(err.contains("not valid"), "{err}");
    }
}
