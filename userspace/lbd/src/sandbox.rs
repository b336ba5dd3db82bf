//! The worker sandbox: what a worker gives up before it reads any network input.
//!
//! In order: switch to the configured group and user (a root lbd with neither falls back to
//! `nobody`/`nogroup`, as nginx does: a worker never runs as root), drop every capability from
//! the bounding, permitted, effective, inheritable and ambient sets, set no_new_privs, and
//! install a seccomp allowlist. The allowlist is data, one line and one reason per syscall
//! (and per argument pattern where the syscall alone says too little: `setsockopt` by level
//! and option, `socket` by family and type, `mmap`/`mprotect` without `PROT_EXEC`, `tgkill`
//! to the worker itself), compiled once with seccompiler. Any other call traps
//! (`SECCOMP_RET_TRAP`): the SIGSYS handler (`trap`) writes the syscall's number to the
//! worker's trace pipe (a pipe of its own, not the channel, whose answers someone may be
//! waiting for) and to stderr, then the worker dies by SIGSYS; the supervisor reads the pipe
//! when it reaps the worker ([`violation`]) and names the syscall in its log. Everything the worker needs that the
//! list forbids (opening files, binding, exec, ptrace, bpf...) happens before `enter`, in
//! `worker_main.rs`.

use caps::CapSet;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;
use std::os::fd::RawFd;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("unknown user {0:?} (from the config's `user`)")]
    UnknownUser(String),
    #[error("unknown group {0:?} (from the config's `group`)")]
    UnknownGroup(String),
    #[error(
        "user \"nobody\" does not exist here (named by the config's `user`, or the fallback \
         of a root lbd whose config names none): set `user` and `group` to an existing \
         unprivileged account"
    )]
    NoUnprivilegedUser,
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
    #[error("cannot install the SIGSYS handler: {0}")]
    Trap(#[source] nix::Error),
    #[error("cannot install the seccomp filter: {0}")]
    Install(#[source] seccompiler::Error),
}

/// The user and group a root lbd's workers run as when the config names neither (nginx's
/// choice; `nogroup` is Debian's name for the group of `nobody`, other systems use the user's
/// own primary group).
pub const FALLBACK_USER: &str = "nobody";
pub const FALLBACK_GROUP: &str = "nogroup";

/// A condition on one argument of a syscall (all conditions of an entry must hold).
#[derive(Clone, Copy)]
enum Arg {
    /// Argument `.0` equals `.1`.
    Is(u8, u64),
    /// Argument `.0`, masked with `.1`, equals `.2`.
    Masked(u8, u64, u64),
    /// Argument `.0` is the worker's own pid.
    OwnPid(u8),
}

/// A syscall the worker may make, and why it needs it.
struct Allowed {
    nr: libc::c_long,
    /// Conditions on arguments (all must hold); several entries of one syscall are OR'ed.
    only: &'static [Arg],
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
    // socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol): the low bits of the
    // type are the type proper (SOCK_TYPE_MASK); no raw, datagram or packet sockets.
    Allowed {
        nr: libc::SYS_socket,
        only: &[
            Arg::Is(0, libc::AF_INET as u64),
            Arg::Masked(1, SOCK_TYPE_MASK, libc::SOCK_STREAM as u64),
        ],
        why: "open IPv4 TCP connections to backends",
    },
    Allowed {
        nr: libc::SYS_socket,
        only: &[
            Arg::Is(0, libc::AF_INET6 as u64),
            Arg::Masked(1, SOCK_TYPE_MASK, libc::SOCK_STREAM as u64),
        ],
        why: "open IPv6 TCP connections to backends",
    },
    allow(libc::SYS_connect, "connect to backends"),
    // setsockopt(fd, level, optname, ...): only the options the data path sets. Nothing that
    // attaches or detaches a program or a filter (SO_ATTACH_REUSEPORT_[CE]BPF,
    // SO_ATTACH_FILTER, SO_DETACH_*): the steering program belongs to the supervisor.
    Allowed {
        nr: libc::SYS_setsockopt,
        only: &[
            Arg::Is(1, libc::IPPROTO_TCP as u64),
            Arg::Is(2, libc::TCP_NODELAY as u64),
        ],
        why: "TCP_NODELAY on client and backend connections (lb-proxy worker.rs, tcp.rs)",
    },
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
        only: &[Arg::Is(1, libc::FIONBIO)],
        why: "set a socket non-blocking",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[Arg::Is(1, libc::F_SETPIPE_SZ as u64)],
        why: "grow a TCP passthrough pipe: larger splices cost half the CPU per byte",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[Arg::Is(1, libc::F_GETFL as u64)],
        why: "read file status flags",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[Arg::Is(1, libc::F_SETFL as u64)],
        why: "set O_NONBLOCK",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[Arg::Is(1, libc::F_GETFD as u64)],
        why: "read FD_CLOEXEC",
    },
    Allowed {
        nr: libc::SYS_fcntl,
        only: &[Arg::Is(1, libc::F_SETFD as u64)],
        why: "set FD_CLOEXEC",
    },
    // Memory: the allocator.
    // Memory: the allocator. Never executable: no code is made at run time (the steering map
    // is mapped before the sandbox).
    allow(libc::SYS_brk, "heap growth"),
    Allowed {
        nr: libc::SYS_mmap,
        only: &[Arg::Masked(2, libc::PROT_EXEC as u64, 0)],
        why: "allocator arenas, never PROT_EXEC",
    },
    allow(libc::SYS_munmap, "allocator arenas"),
    allow(libc::SYS_mremap, "growing large allocations"),
    allow(libc::SYS_madvise, "allocator returns memory"),
    Allowed {
        nr: libc::SYS_mprotect,
        only: &[Arg::Masked(2, libc::PROT_EXEC as u64, 0)],
        why: "allocator guard pages, never PROT_EXEC",
    },
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
    // tgkill(tgid, tid, sig): only into the worker itself (no kill(2) at all).
    Allowed {
        nr: libc::SYS_tgkill,
        only: &[Arg::OwnPid(0)],
        why: "abort() raises SIGABRT on itself; the SIGSYS handler re-raises SIGSYS",
    },
    allow(libc::SYS_getppid, "notice the supervisor is gone"),
    // Leaving.
    allow(libc::SYS_exit, "thread exit"),
    allow(libc::SYS_exit_group, "process exit"),
];

/// The type bits of `socket`'s second argument (the kernel's SOCK_TYPE_MASK).
const SOCK_TYPE_MASK: u64 = 0xf;

/// The compiled filter for the process `pid`: every syscall outside [`POLICY`] traps
/// (SIGSYS; see `trap`).
pub fn compile_filter(pid: u32) -> Result<BpfProgram, SandboxError> {
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
            .map(|&arg| {
                let (index, op, value) = match arg {
                    Arg::Is(index, value) => (index, SeccompCmpOp::Eq, value),
                    Arg::Masked(index, mask, value) => (index, SeccompCmpOp::MaskedEq(mask), value),
                    Arg::OwnPid(index) => (index, SeccompCmpOp::Eq, u64::from(pid)),
                };
                SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SandboxError::Filter(e.to_string()))?;
        list.push(SeccompRule::new(conditions).map_err(|e| SandboxError::Filter(e.to_string()))?);
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Filter(e.to_string()))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(|e| SandboxError::Filter(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Filter(e.to_string()))
}

/// Switches identity, drops capabilities, sets no_new_privs and installs the filter. A
/// violation is reported on `trace` (the write end of the worker's trace pipe) before the
/// worker dies.
pub fn enter(
    user: Option<&str>,
    group: Option<&str>,
    trace: Option<RawFd>,
) -> Result<(), SandboxError> {
    let filter = compile_filter(std::process::id())?;
    let supervisor = nix::unistd::getppid();
    let (user, group) = identity(user, group, nix::unistd::geteuid().is_root());
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
    trap::install(trace).map_err(SandboxError::Trap)?;
    // seccompiler sets PR_SET_NO_NEW_PRIVS itself before installing the filter.
    seccompiler::apply_filter(&filter).map_err(SandboxError::Install)
}

/// Who the worker becomes: the configured user and group. When lbd runs as root and the
/// config names no user, the user is `nobody` (a worker never keeps uid 0), and with no
/// group either, the group is `nogroup` where it exists (otherwise `nobody`'s own primary
/// group).
fn identity<'a>(
    user: Option<&'a str>,
    group: Option<&'a str>,
    root: bool,
) -> (Option<&'a str>, Option<&'a str>) {
    if !root || user.is_some() {
        return (user, group);
    }
    let group = group.or_else(|| {
        nix::unistd::Group::from_name(FALLBACK_GROUP)
            .ok()
            .flatten()
            .map(|_| FALLBACK_GROUP)
    });
    (Some(FALLBACK_USER), group)
}

fn switch_identity(user: Option<&str>, group: Option<&str>) -> Result<(), SandboxError> {
    use nix::unistd::{setgid, setgroups, setuid, Group, User};
    let identity = |what: String| move |source| SandboxError::Identity { what, source };
    let user = match user {
        Some(name) => Some(User::from_name(name).ok().flatten().ok_or_else(|| {
            if name == FALLBACK_USER {
                SandboxError::NoUnprivilegedUser
            } else {
                SandboxError::UnknownUser(name.to_string())
            }
        })?),
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

/// What a worker killed by SIGSYS left in its trace pipe (the read end, non-blocking): the
/// number of the syscall the sandbox refused. Reads only what is there, a line at most.
pub fn violation(trace: &std::fs::File) -> Option<i64> {
    use std::io::Read as _;
    let mut buf = [0u8; 32];
    let n = (&*trace).read(&mut buf).ok()?;
    let text = std::str::from_utf8(buf.get(..n)?).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// How the supervisor's log says why a worker died by SIGSYS: the syscall its trace pipe
/// names, if it named one.
pub fn describe_violation(trace: Option<&std::fs::File>) -> String {
    match trace.and_then(violation) {
        Some(nr) => format!(
            "the sandbox refused syscall {} (number {nr})",
            syscall_name(nr)
        ),
        None => "a syscall the sandbox refused; it did not say which".into(),
    }
}

/// A syscall's name, for the log line of a violation ("syscall 54" where it is not listed).
pub fn syscall_name(nr: i64) -> String {
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or_else(|| format!("syscall {nr}"), |(_, name)| (*name).to_string())
}

/// The syscalls a violation most likely names: those of [`POLICY`] (refused for their
/// arguments) and the usual suspects of an escape.
const NAMES: &[(libc::c_long, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_close, "close"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_tkill, "tkill"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_seccomp, "seccomp"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_setgid, "setgid"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_pkey_mprotect, "pkey_mprotect"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_open, "open"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_fork, "fork"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_vfork, "vfork"),
];

/// Test-only: one forbidden call per rule, made by a real worker when the test sets
/// `KAKEHI_TEST_SECCOMP_PROBE` (test_hooks.rs) so that the sandbox is seen enforcing in the
/// process that serves. `listener` is one of the worker's listening sockets.
pub mod probe {
    #![allow(unsafe_code)]

    /// Makes the forbidden call `name`; returns only if the sandbox let it through.
    pub fn forbidden_call(name: &str, listener: std::os::fd::RawFd) -> String {
        let one: libc::c_int = 1;
        // SAFETY: raw syscalls with integer arguments, or pointers to a live c_int of the
        // given length; the mapping, if made, is anonymous and never used.
        let rc = unsafe {
            match name {
                "setsockopt" => libc::syscall(
                    libc::SYS_setsockopt,
                    listener,
                    libc::SOL_SOCKET,
                    libc::SO_DETACH_REUSEPORT_BPF,
                    std::ptr::from_ref(&one),
                    4,
                ),
                "tgkill" => libc::syscall(libc::SYS_tgkill, libc::getppid(), libc::getppid(), 0),
                "socket" => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_RAW, 1),
                "mmap" => libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ),
                _ => libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/etc/hostname".as_ptr(),
                    libc::O_RDONLY,
                ),
            }
        };
        format!("{name} returned {rc}")
    }
}

/// The SIGSYS handler: the trace a violation leaves. Everything in it is async-signal-safe:
/// no allocation, no lock, only `write`, `getpid`, `gettid` and `tgkill`, which the filter
/// allows.
mod trap {
    #![allow(unsafe_code)]

    use std::os::fd::RawFd;
    use std::sync::atomic::{AtomicI32, Ordering};

    /// The write end of the worker's trace pipe, or -1.
    static TRACE: AtomicI32 = AtomicI32::new(-1);

    /// The head of a `siginfo_t` for SIGSYS (the kernel's `_sigsys` member of the union,
    /// which the libc crate does not expose): signo, errno, code, then, 8-aligned on 64-bit
    /// targets, the call address, the syscall number and the audit arch.
    #[repr(C)]
    struct SigsysInfo {
        signo: libc::c_int,
        errno: libc::c_int,
        code: libc::c_int,
        call_addr: *mut libc::c_void,
        syscall: libc::c_int,
        arch: libc::c_uint,
    }

    /// Installs the handler (one shot: the disposition goes back to default as it runs, so
    /// the re-raised SIGSYS kills the process).
    pub fn install(trace: Option<RawFd>) -> nix::Result<()> {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        TRACE.store(trace.unwrap_or(-1), Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::SigAction(on_sigsys),
            SaFlags::SA_SIGINFO | SaFlags::SA_RESETHAND | SaFlags::SA_NODEFER,
            SigSet::empty(),
        );
        // SAFETY: the handler is async-signal-safe (see the module doc); it replaces no
        // handler anyone relies on (SIGSYS is not otherwise handled in a worker).
        unsafe { sigaction(Signal::SIGSYS, &action) }.map(|_| ())
    }

    /// Writes `n` in decimal at the end of `buf`; returns where it starts.
    fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
        let mut at = buf.len();
        loop {
            at -= 1;
            if let Some(digit) = buf.get_mut(at) {
                *digit = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || at == 0 {
                return at;
            }
        }
    }

    /// Writes all of `bytes` to `fd`, giving up on the first error.
    fn write_all(fd: RawFd, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // SAFETY: write(2) from a buffer we own, of its length.
            let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
            let Ok(n) = usize::try_from(n) else { return };
            if n == 0 {
                return;
            }
            bytes = bytes.get(n..).unwrap_or_default();
        }
    }

    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo; for a seccomp trap its
        // union is `_sigsys`, laid out as `SigsysInfo`.
        let nr = unsafe { info.cast::<SigsysInfo>().as_ref() }.map_or(-1, |i| i.syscall);
        let mut digits = [0u8; 20];
        let start = decimal(u64::from(nr.unsigned_abs()), &mut digits);
        let number = digits.get(start..).unwrap_or_default();
        // For the supervisor: `NR\n` in the trace pipe.
        let trace = TRACE.load(Ordering::SeqCst);
        if trace >= 0 {
            write_all(trace, number);
            write_all(trace, b"\n");
        }
        write_all(2, b"kakehi worker: the sandbox refused syscall ");
        write_all(2, number);
        write_all(2, b"; dying by SIGSYS\n");
        // SAFETY: getpid, gettid and tgkill take and return plain integers; SIGSYS is back
        // to its default action (SA_RESETHAND) and not blocked (SA_NODEFER), so this ends the
        // process with SIGSYS, the way the supervisor expects a violation to end.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::gettid(),
                libc::SIGSYS,
            );
            libc::_exit(128 + libc::SIGSYS)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(unsafe_code)]
    use super::*;
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;

    type Call = fn() -> libc::c_long;

    /// Forks; the child installs the filter (compiled for its own pid; with the SIGSYS
    /// handler reporting on `trace` if given) and makes one syscall; returns how it ended.
    fn in_sandboxed_child(syscall: Call, trace: Option<RawFd>) -> WaitStatus {
        // SAFETY: the child compiles the filter (glibc's malloc is usable after fork), installs
        // it (a prctl and a seccomp syscall), makes one raw syscall and calls _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = match compile_filter(std::process::id()) {
                    Ok(filter) => {
                        let trapped = trace.map_or(Ok(()), |fd| trap::install(Some(fd)));
                        match trapped.is_ok() && seccompiler::apply_filter(&filter).is_ok() {
                            true => {
                                syscall();
                                0
                            }
                            false => 3,
                        }
                    }
                    Err(_) => 4,
                };
                // SAFETY: _exit is async-signal-safe and ends the child immediately.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap()
            }
        }
    }

    fn assert_killed(calls: &[(&str, Call)]) {
        let mut allowed = Vec::new();
        for (name, call) in calls {
            match in_sandboxed_child(*call, None) {
                WaitStatus::Signaled(_, Signal::SIGSYS, _) => {}
                other => allowed.push(format!("{name}: {other:?}")),
            }
        }
        assert!(
            allowed.is_empty(),
            "expected death by SIGSYS, but:\n{}",
            allowed.join("\n")
        );
    }

    fn assert_allowed(calls: &[(&str, Call)]) {
        for (name, call) in calls {
            let status = in_sandboxed_child(*call, None);
            assert!(
                matches!(status, WaitStatus::Exited(_, 0)),
                "{name}: {status:?}"
            );
        }
    }

    #[test]
    fn forbidden_syscalls_kill_the_process() {
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
        assert_killed(&[
            ("openat", openat),
            ("execve", execve),
            ("socket(AF_UNIX)", unix_socket),
            ("ptrace", ptrace),
        ]);
    }

    /// setsockopt(-1, level, name, &1, 4): the filter decides before the kernel looks at
    /// the fd (without it: EBADF).
    fn setsockopt(level: libc::c_int, name: libc::c_int) -> libc::c_long {
        let one: libc::c_int = 1;
        // SAFETY: a raw syscall; optval points at a live c_int of the given length.
        unsafe {
            libc::syscall(
                libc::SYS_setsockopt,
                -1,
                level,
                name,
                std::ptr::from_ref(&one),
                4,
            )
        }
    }

    /// Issue 12, item 6: a worker must not touch its listener's steering or filters.
    #[test]
    fn setsockopt_is_limited_to_the_data_paths_options() {
        assert_killed(&[
            ("SO_ATTACH_FILTER", || {
                setsockopt(libc::SOL_SOCKET, libc::SO_ATTACH_FILTER)
            }),
            ("SO_DETACH_FILTER", || {
                setsockopt(libc::SOL_SOCKET, libc::SO_DETACH_FILTER)
            }),
            ("SO_ATTACH_BPF", || {
                setsockopt(libc::SOL_SOCKET, libc::SO_ATTACH_BPF)
            }),
            ("SO_ATTACH_REUSEPORT_CBPF", || {
                setsockopt(libc::SOL_SOCKET, libc::SO_ATTACH_REUSEPORT_CBPF)
            }),
            ("SO_ATTACH_REUSEPORT_EBPF", || {
                setsockopt(libc::SOL_SOCKET, libc::SO_ATTACH_REUSEPORT_EBPF)
            }),
            ("SO_DETACH_REUSEPORT_BPF", || {
                setsockopt(libc::SOL_SOCKET, libc::SO_DETACH_REUSEPORT_BPF)
            }),
            ("SO_REUSEPORT", || {
                setsockopt(libc::SOL_SOCKET, libc::SO_REUSEPORT)
            }),
            ("TCP_NODELAY at SOL_SOCKET", || {
                setsockopt(libc::SOL_SOCKET, libc::TCP_NODELAY)
            }),
        ]);
        assert_allowed(&[("TCP_NODELAY", || {
            setsockopt(libc::IPPROTO_TCP, libc::TCP_NODELAY)
        })]);
    }

    #[test]
    fn signals_only_go_to_the_worker_itself() {
        assert_killed(&[
            ("kill(parent)", || {
                // SAFETY: signal 0 only checks that the target exists.
                unsafe { libc::syscall(libc::SYS_kill, libc::getppid(), 0) }
            }),
            ("tgkill(parent)", || {
                // SAFETY: signal 0 only checks that the target exists.
                unsafe { libc::syscall(libc::SYS_tgkill, libc::getppid(), libc::getppid(), 0) }
            }),
        ]);
        assert_allowed(&[("tgkill(self)", || {
            // SAFETY: signal 0 only checks that the target exists.
            unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) }
        })]);
    }

    #[test]
    fn sockets_are_tcp_over_ip_only() {
        fn socket(family: libc::c_int, kind: libc::c_int) -> libc::c_long {
            // SAFETY: plain integer arguments; the fd leaks into the exiting child only.
            unsafe { libc::syscall(libc::SYS_socket, family, kind, 0) }
        }
        assert_killed(&[
            ("AF_INET SOCK_DGRAM", || {
                socket(libc::AF_INET, libc::SOCK_DGRAM)
            }),
            ("AF_INET SOCK_RAW", || socket(libc::AF_INET, libc::SOCK_RAW)),
            ("AF_INET6 SOCK_RAW|SOCK_NONBLOCK", || {
                socket(libc::AF_INET6, libc::SOCK_RAW | libc::SOCK_NONBLOCK)
            }),
            ("AF_PACKET", || socket(libc::AF_PACKET, libc::SOCK_RAW)),
        ]);
        assert_allowed(&[
            ("AF_INET SOCK_STREAM", || {
                socket(libc::AF_INET, libc::SOCK_STREAM)
            }),
            ("AF_INET6 SOCK_STREAM|SOCK_NONBLOCK|SOCK_CLOEXEC", || {
                socket(
                    libc::AF_INET6,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            }),
        ]);
    }

    #[test]
    fn memory_is_never_made_executable() {
        fn mmap(prot: libc::c_int) -> libc::c_long {
            // SAFETY: an anonymous private mapping; it leaks into the exiting child only.
            unsafe {
                libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            }
        }
        fn mprotect(prot: libc::c_int) -> libc::c_long {
            let page = mmap(libc::PROT_READ);
            // SAFETY: changes the protection of the page mapped just above (or fails).
            unsafe { libc::syscall(libc::SYS_mprotect, page, 4096, prot) }
        }
        assert_killed(&[
            ("mmap(PROT_EXEC)", || {
                mmap(libc::PROT_READ | libc::PROT_EXEC)
            }),
            ("mprotect(PROT_EXEC)", || {
                mprotect(libc::PROT_READ | libc::PROT_EXEC)
            }),
        ]);
        assert_allowed(&[
            ("mmap(rw)", || mmap(libc::PROT_READ | libc::PROT_WRITE)),
            ("mprotect(none)", || mprotect(libc::PROT_NONE)),
        ]);
    }

    #[test]
    fn allowed_syscalls_work() {
        fn getpid() -> libc::c_long {
            // SAFETY: getpid has no arguments.
            unsafe { libc::syscall(libc::SYS_getpid) }
        }
        assert_allowed(&[("getpid", getpid)]);
    }

    /// The trace: the handler reports the refused syscall in the trace pipe, and the process
    /// still dies by SIGSYS.
    #[test]
    fn a_violation_names_its_syscall_in_the_trace_pipe() {
        let (ours, theirs) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .unwrap();
        let status = in_sandboxed_child(
            || setsockopt(libc::SOL_SOCKET, libc::SO_DETACH_REUSEPORT_BPF),
            Some(std::os::fd::AsRawFd::as_raw_fd(&theirs)),
        );
        drop(theirs);
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "{status:?}"
        );
        assert_eq!(
            violation(&std::fs::File::from(ours)),
            Some(libc::SYS_setsockopt)
        );
        assert_eq!(syscall_name(libc::SYS_setsockopt), "setsockopt");
    }

    #[test]
    fn root_without_a_user_falls_back_to_nobody() {
        let (user, _) = identity(None, None, true);
        assert_eq!(user, Some(FALLBACK_USER));
        assert_eq!(identity(None, None, false), (None, None));
        assert_eq!(identity(Some("kakehi"), None, true), (Some("kakehi"), None));
        assert_eq!(
            identity(None, Some("adm"), true),
            (Some(FALLBACK_USER), Some("adm"))
        );
    }
}
