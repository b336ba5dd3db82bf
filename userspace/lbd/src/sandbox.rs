//! The worker sandbox: what a worker gives up before it reads any network input.
//!
//! In order: switch to the configured group and user (if any), drop every capability from the
//! bounding, permitted, effective, inheritable and ambient sets, set no_new_privs, and install
//! a seccomp allowlist that kills the process on any other syscall. The allowlist is data, one
//! line and one reason per syscall, compiled once with seccompiler. Everything the worker
//! needs that the list forbids (opening files, binding, exec, ptrace, bpf...) happens before
//! `enter`, in `worker_main.rs`.

use caps::CapSet;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("unknown user {0:?} (from the config's `user`)")]
    UnknownUser(String),
    #[error("unknown group {0:?} (from the config's `group`)")]
    UnknownGroup(String),
    #[error("cannot switch to {what}: {source}")]
    Identity {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot drop capabilities: {0}")]
    Capabilities(#[source] caps::errors::CapsError),
    #[error("cannot build the seccomp filter: {0}")]
    Filter(String),
    #[error("the supervisor exited while this worker was starting")]
    SupervisorGone,
    #[error("cannot install the seccomp filter: {0}")]
    Install(#[source] seccompiler::Error),
}

/// A syscall the worker may make, and why it needs it.
struct Allowed {
    nr: libc::c_long,
    /// Conditions on arguments (all must hold); several entries of one syscall are OR'ed.
    only: &'static [(u8, u64)],
    #[allow(dead_code)] // documentation carried with the data
    why: &'static str,
}

const fn allow(nr: libc::c_long, why: &'static str) -> Allowed {
    Allowed { nr, only: &[], why }
}

/// The worker's allowlist (x86_64 and aarch64 syscall names through libc).
const POLICY: &[Allowed] = &[
    // The event loop.
    allow(libc::SYS_epoll_pwait, "mio waits for readiness"),
    #[cfg(target_arch = "x86_64")]
    allow(libc::SYS_epoll_wait, "mio waits for readiness"),
    allow(libc::SYS_epoll_ctl, "register and deregister sockets"),
    // Sockets.
    allow(libc::SYS_accept4, "accept client connections"),
    Allowed {
        nr: libc::SYS_socket,
        only: &[(0, libc::AF_INET as u64)],
        why: "open IPv4 connections to backends",
    },
    Allowed {
        nr: libc::SYS_socket,
        only: &[(0, libc::AF_INET6 as u64)],
        why: "open IPv6 connections to backends",
    },
    allow(libc::SYS_connect, "connect to backends"),
    allow(libc::SYS_setsockopt, "TCP_NODELAY on new connections"),
    allow(
        libc::SYS_getsockopt,
        "SO_ERROR after a non-blocking connect",
    ),
    allow(libc::SYS_getpeername, "confirm a non-blocking connect"),
    allow(
        libc::SYS_getsockname,
        "local addresses for logs and headers",
    ),
    allow(
        libc::SYS_shutdown,
        "half-close after a response or in a pipe",
    ),
    allow(libc::SYS_close, "close finished connections"),
    // Data.
    allow(libc::SYS_read, "read from sockets"),
    allow(libc::SYS_readv, "vectored reads"),
    allow(
        libc::SYS_recvfrom,
        "recv, and MSG_PEEK on idle backend connections",
    ),
    allow(
        libc::SYS_write,
        "write to sockets, the access log and stderr",
    ),
    allow(libc::SYS_writev, "vectored writes of parsed HTTP blocks"),
    allow(libc::SYS_sendto, "send on sockets"),
    allow(
        libc::SYS_splice,
        "TCP passthrough moves bytes socket -> pipe -> socket without copying them",
    ),
    allow(
        libc::SYS_pipe2,
        "pipes for splice, one per bulk direction of a TCP passthrough connection (pooled)",
    ),
    // Descriptor flags: only the non-blocking and close-on-exec flags, and pipe sizes.
    Allowed {
        nr: libc::SYS_ioctl,
        only: &[(1, libc::FIONBIO)],
        why: "set a socket non-blocking",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[(1, libc::F_SETPIPE_SZ as u64)],
        why: "grow a TCP passthrough pipe: larger splices cost half the CPU per byte",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[(1, libc::F_GETFL as u64)],
        why: "read file status flags",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[(1, libc::F_SETFL as u64)],
        why: "set O_NONBLOCK",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[(1, libc::F_GETFD as u64)],
        why: "read FD_CLOEXEC",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[(1, libc::F_SETFD as u64)],
        why: "set FD_CLOEXEC",
    },
    // Memory: the allocator.
    allow(libc::SYS_brk, "heap growth"),
    allow(libc::SYS_mmap, "allocator arenas"),
    allow(libc::SYS_munmap, "allocator arenas"),
    allow(libc::SYS_mremap, "growing large allocations"),
    allow(libc::SYS_madvise, "allocator returns memory"),
    allow(libc::SYS_mprotect, "allocator guard pages"),
    // Time, randomness, identity for logs.
    allow(
        libc::SYS_clock_gettime,
        "Instant::now when the vDSO is not used",
    ),
    allow(
        libc::SYS_getrandom,
        "hash map seeds; TLS randomness (aws-lc: handshake nonces, ECDHE keys, ticket keys)",
    ),
    allow(libc::SYS_getpid, "pid in log lines"),
    allow(libc::SYS_gettid, "thread id in log lines"),
    // Synchronisation inside std (stdout lock, once cells).
    allow(libc::SYS_futex, "std locks"),
    allow(libc::SYS_sched_yield, "std spin loops"),
    // Signals: SIGTERM starts the drain; abort() on a panic raises SIGABRT.
    allow(libc::SYS_rt_sigreturn, "return from the SIGTERM handler"),
    allow(libc::SYS_rt_sigprocmask, "signal masks in std and abort()"),
    allow(libc::SYS_sigaltstack, "std's stack overflow handler"),
    allow(libc::SYS_restart_syscall, "restart an interrupted wait"),
    allow(libc::SYS_tgkill, "abort() raises SIGABRT on itself"),
    allow(libc::SYS_getppid, "notice the supervisor is gone"),
    // Leaving.
    allow(libc::SYS_exit, "thread exit"),
    allow(libc::SYS_exit_group, "process exit"),
];

/// The compiled filter: every syscall outside [`POLICY`] kills the process.
pub fn compile_filter() -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for entry in POLICY {
        let list = rules.entry(entry.nr).or_default();
        if entry.only.is_empty() {
            // An unconditional entry must stay rule-less (seccompiler: empty = always allow).
            list.clear();
            continue;
        }
        let conditions = entry
            .only
            .iter()
            .map(|&(arg, value)| {
                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SandboxError::Filter(e.to_string()))?;
        list.push(SeccompRule::new(conditions).map_err(|e| SandboxError::Filter(e.to_string()))?);
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Filter(e.to_string()))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| SandboxError::Filter(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Filter(e.to_string()))
}

/// Switches identity, drops capabilities, sets no_new_privs and installs the filter.
pub fn enter(user: Option<&str>, group: Option<&str>) -> Result<(), SandboxError> {
    let filter = compile_filter()?;
    let supervisor = nix::unistd::getppid();
    // The bounding set first: shrinking it needs CAP_SETPCAP, which setuid takes away.
    drop_bounding_set()?;
    switch_identity(user, group)?;
    clear_capabilities()?;
    // A uid/gid change clears the parent-death signal set before exec: set it again, then
    // make sure the supervisor did not die in between (we would not be told).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(|source| {
        SandboxError::Identity {
            what: "the parent-death signal".into(),
            source,
        }
    })?;
    if nix::unistd::getppid() != supervisor {
        return Err(SandboxError::SupervisorGone);
    }
    // seccompiler sets PR_SET_NO_NEW_PRIVS itself before installing the filter.
    seccompiler::apply_filter(&filter).map_err(SandboxError::Install)
}

fn switch_identity(user: Option<&str>, group: Option<&str>) -> Result<(), SandboxError> {
    use nix::unistd::{setgid, setgroups, setuid, Group, User};
    let identity = |what: String| move |source| SandboxError::Identity { what, source };
    let user = match user {
        Some(name) => Some(
            User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| SandboxError::UnknownUser(name.to_string()))?,
        ),
        None => None,
    };
    let gid = match group {
        Some(name) => Some(
            Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| SandboxError::UnknownGroup(name.to_string()))?
                .gid,
        ),
        None => user.as_ref().map(|u| u.gid),
    };
    if let Some(gid) = gid {
        setgroups(&[gid]).map_err(identity(format!("supplementary groups [{gid}]")))?;
        setgid(gid).map_err(identity(format!("group {gid}")))?;
    }
    if let Some(user) = user {
        setuid(user.uid).map_err(identity(format!("user {}", user.name)))?;
    }
    Ok(())
}

fn drop_bounding_set() -> Result<(), SandboxError> {
    // The bounding set can only shrink with CAP_SETPCAP; without it there is nothing the
    // process could regain anyway once permitted is empty and no_new_privs is set.
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            caps::drop(None, CapSet::Bounding, cap).map_err(SandboxError::Capabilities)?;
        }
    }
    Ok(())
}

fn clear_capabilities() -> Result<(), SandboxError> {
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(SandboxError::Capabilities)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(unsafe_code)]
    use super::*;

    /// Forks; the child installs the filter and makes one syscall; returns how it ended.
    fn in_sandboxed_child(syscall: fn() -> libc::c_long) -> nix::sys::wait::WaitStatus {
        let filter = compile_filter().unwrap();
        // SAFETY: the child only installs the filter (a prctl and a seccomp syscall on
        // memory prepared before the fork), makes one raw syscall and calls _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = match seccompiler::apply_filter(&filter) {
                    Ok(()) => {
                        syscall();
                        0
                    }
                    Err(_) => 3,
                };
                // SAFETY: _exit is async-signal-safe and ends the child immediately.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap()
            }
        }
    }

    #[test]
    fn forbidden_syscalls_kill_the_process() {
        use nix::sys::signal::Signal;
        use nix::sys::wait::WaitStatus;
        fn openat() -> libc::c_long {
            // SAFETY: a raw syscall with a valid C string path.
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0) }
        }
        fn execve() -> libc::c_long {
            // SAFETY: a raw syscall with a valid path and null argv/envp (rejected or killed).
            unsafe { libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0) }
        }
        fn unix_socket() -> libc::c_long {
            // SAFETY: a raw syscall with plain integer arguments; AF_UNIX is not allowed.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) }
        }
        fn ptrace() -> libc::c_long {
            // SAFETY: a raw syscall with plain integer arguments.
            unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) }
        }
        type Call = fn() -> libc::c_long;
        let forbidden: [(&str, Call); 4] = [
            ("openat", openat),
            ("execve", execve),
            ("socket(AF_UNIX)", unix_socket),
            ("ptrace", ptrace),
        ];
        for (name, call) in forbidden {
            match in_sandboxed_child(call) {
                WaitStatus::Signaled(_, Signal::SIGSYS, _) => {}
                other => panic!("{name}: expected death by SIGSYS, got {other:?}"),
            }
        }
    }

    #[test]
    fn allowed_syscalls_work() {
        use nix::sys::wait::WaitStatus;
        fn getpid() -> libc::c_long {
            // SAFETY: getpid has no arguments.
            unsafe { libc::syscall(libc::SYS_getpid) }
        }
        fn inet_socket() -> libc::c_long {
            // SAFETY: plain integer arguments; the fd leaks into the exiting child only.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) }
        }
        let status = in_sandboxed_child(getpid);
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
        let status = in_sandboxed_child(inet_socket);
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    }
}
