//! The listeners of the config as kernel objects: binding their TCP sockets with SO_REUSEADDR
//! and SO_REUSEPORT (so that several workers, and the next generation during an upgrade, can
//! share one address), non-blocking, with a deep accept backlog; and loading and attaching the
//! eBPF steering program of each listener's reuseport group (the program itself and its maps
//! are `steering.rs`'s). Who holds the sockets, and when workers start on them, is
//! `workers.rs`'s.

use crate::steering::{ClientLimits, Steering, SteeringError};
use lb_config::{Config, Listener, SteeringPolicy};
use lb_ebpf_common::Policy;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, TcpListener};

const BACKLOG: i32 = 4096;

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("listener {address}: {source}")]
    Socket {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {address}: cannot bind (is another process using it?): {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The steering program cannot be loaded at all: the line says what lbd lacks, and ends
    /// with the kernel's own words (so it carries no source of its own).
    #[error("{line}")]
    CannotLoad { line: String },
    #[error(
        "listener {address}: eBPF steering (steering = \"ebpf\"; \"kernel\" uses plain reuseport hashing): {source}"
    )]
    Steering {
        address: SocketAddr,
        #[source]
        source: Box<SteeringError>,
    },
    #[error("listener {address}: {workers} workers is too many for eBPF steering")]
    TooManyWorkers { address: SocketAddr, workers: usize },
    #[error("listener {address}: a listener without sockets")]
    NoSockets { address: SocketAddr },
}

/// A listening socket bound to `address`, to share with the other sockets of its group.
pub fn bind(address: SocketAddr) -> Result<TcpListener, ListenerError> {
    let what = |source| ListenerError::Socket { address, source };
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(what)?;
    socket.set_reuse_address(true).map_err(what)?;
    socket.set_reuse_port(true).map_err(what)?;
    if address.is_ipv6() {
        socket.set_only_v6(true).map_err(what)?;
    }
    socket.set_nonblocking(true).map_err(what)?;
    socket
        .bind(&address.into())
        .map_err(|source| ListenerError::Bind { address, source })?;
    socket.listen(BACKLOG).map_err(what)?;
    Ok(socket.into())
}

/// `workers` sockets bound to `address`: one reuseport group.
pub fn bind_group(address: SocketAddr, workers: usize) -> Result<Vec<TcpListener>, ListenerError> {
    (0..workers).map(|_| bind(address)).collect()
}

/// Loads one steering program per listener group, fills its socket slots (worker i's socket
/// of that listener in slot i) and attaches it. Workers stay inactive until they start.
pub fn load_steering(
    config: &Config,
    sockets: &[Vec<TcpListener>],
) -> Result<Vec<Steering>, ListenerError> {
    config
        .listeners
        .iter()
        .zip(sockets)
        .map(|(listener, group)| load_group(config, listener, group))
        .collect()
}

/// The per-client limits `listener` asks for.
pub fn client_limits(listener: &Listener) -> ClientLimits {
    ClientLimits {
        max_connections: listener.max_connections_per_ip,
        rate_per_second: listener.max_connection_rate_per_ip,
    }
}

/// Loads the steering program of one listener's group, fills its socket slots, sets its
/// per-client limits and attaches it. Workers stay inactive until they start.
pub fn load_group(
    config: &Config,
    listener: &Listener,
    group: &[TcpListener],
) -> Result<Steering, ListenerError> {
    let address = listener.address;
    let policy = policy_of(config.steering_policy);
    let too_many = || ListenerError::TooManyWorkers {
        address,
        workers: config.workers,
    };
    let workers = u32::try_from(config.workers).map_err(|_| too_many())?;
    let what = |source| ListenerError::Steering {
        address,
        source: Box::new(source),
    };
    let mut steering = Steering::load(policy, workers).map_err(|e| cannot_load(address, e))?;
    for (index, socket) in group.iter().enumerate() {
        let index = u32::try_from(index).map_err(|_| too_many())?;
        steering.set_worker_socket(index, socket).map_err(what)?;
    }
    let first = group.first().ok_or(ListenerError::NoSockets { address })?;
    let limits = client_limits(listener);
    steering.set_limits(limits, first).map_err(what)?;
    steering.attach(first).map_err(what)?;
    log::info!("listener {address}: eBPF steering attached ({policy:?}, {workers} workers)");
    if limits != ClientLimits::default() {
        log::info!(
            "listener {address}: per-client limits in the kernel: {} connections, {}/s (0: none)",
            limits.max_connections,
            limits.rate_per_second
        );
    }
    Ok(steering)
}

/// One line for an operator whose lbd cannot load its steering program: what is missing,
/// and that `steering = "kernel"` runs without it. The kernel's own words end the line; a
/// verifier log (a program the kernel refused, which no setting fixes) follows it.
fn cannot_load(address: SocketAddr, error: SteeringError) -> ListenerError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
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
    let first = match &error {
        SteeringError::Load { io_error, .. } => io_error.to_string(),
        other => other.to_string(),
    };
    let mut line = format!(
        "listener {address}: eBPF steering (the default) cannot start: lbd lacks {missing}; \
         set steering = \"kernel\" to run without eBPF (plain SO_REUSEPORT hashing) [{first}]"
    );
    if let SteeringError::Load { verifier_log, .. } = &error {
        line.push_str("\nverifier log:\n");
        line.push_str(verifier_log);
    }
    ListenerError::CannotLoad { line }
}

/// The program's policy for the config's `steering_policy`.
pub fn policy_of(policy: SteeringPolicy) -> Policy {
    match policy {
        SteeringPolicy::FlowHash => Policy::FlowHash,
        SteeringPolicy::LeastConnections => Policy::LeastConnections,
        SteeringPolicy::PowerOfTwo => Policy::PowerOfTwo,
    }
}
