//! The few places where lbd handles raw file descriptors: handing sockets to a worker across
//! fork+exec, and taking them back as typed objects in the worker. Every `unsafe` of the
//! supervisor/worker boundary lives here; where nix or socket2 wraps a call (prctl, a socket
//! option, SCM_RIGHTS), the wrapper is used, and `unsafe` is left for taking ownership of an
//! inherited fd number and for the `pre_exec` hooks between fork and exec.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("fd {fd} is not a listening TCP socket")]
    NotAListener { fd: RawFd },
    #[error("fd {fd}: {source}")]
    Io {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the config memfd: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("cannot set up the session ticket keys: {0}")]
    Tickets(String),
}

/// Makes `fds` survive the exec of `command` (in the child only: the parent's flags are
/// untouched), and asks the kernel to send the child SIGTERM if the supervisor dies.
pub fn inherit_fds(command: &mut Command, fds: Vec<RawFd>) {
    let hook = move || -> std::io::Result<()> {
        for &fd in &fds {
            // SAFETY: fcntl on an fd number the parent owns; after fork the child has its own
            // descriptor table, so clearing FD_CLOEXEC here does not affect the parent.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // prctl(PR_SET_PDEATHSIG): one syscall, async-signal-safe.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
        Ok(())
    };
    // SAFETY: the hook only calls async-signal-safe functions (fcntl, prctl) and touches no
    // lock or allocator between fork and exec.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Takes ownership of an inherited fd that must be a listening TCP socket.
pub fn listener_from_fd(fd: RawFd) -> Result<TcpListener, FdError> {
    let owned = owned_from_fd(fd)?;
    let accepting = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn);
    if !matches!(accepting, Ok(true)) {
        return Err(FdError::NotAListener { fd });
    }
    Ok(TcpListener::from(owned))
}

/// Takes ownership of an inherited fd holding the worker's config text.
pub fn file_from_fd(fd: RawFd) -> Result<File, FdError> {
    Ok(File::from(owned_from_fd(fd)?))
}

/// Takes ownership of an inherited fd of any kind (checked to be open).
pub fn owned_from_fd(fd: RawFd) -> Result<OwnedFd, FdError> {
    // SAFETY: fcntl(F_GETFD) only reads the descriptor flags; it fails on a closed fd.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(FdError::Io {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the fd is open (checked above), was inherited for this purpose and nothing
    // else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A sealed-by-convention in-memory file with `text`, to hand the config to workers.
pub fn memfd_with(bytes: &[u8]) -> Result<File, FdError> {
    let fd =
        nix::sys::memfd::memfd_create(c"kakehi-config", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| FdError::Memfd(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(bytes).map_err(FdError::Memfd)?;
    Ok(file)
}

/// Reads a whole inherited file from its start, without moving the offset it shares with
/// the other processes holding it.
pub fn read_all(file: &File) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = file.read_at(&mut chunk, bytes.len() as u64)?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

/// Like [`inherit_fds`], for a process that must outlive this one (the next lbd of an
/// upgrade): no parent-death signal.
pub fn inherit_fds_detached(command: &mut Command, fds: Vec<RawFd>) {
    let hook = move || -> std::io::Result<()> {
        for &fd in &fds {
            // SAFETY: as in `inherit_fds`: the child's own descriptor table, after fork.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only calls fcntl, which is async-signal-safe.
    unsafe {
        command.pre_exec(hook);
    }
}

/// At most this many fds travel in one message (the kernel's limit is SCM_MAX_FD, 253).
const FDS_PER_MESSAGE: usize = 200;

/// Sends `fds` over a unix stream socket, in messages of one byte each carrying up to
/// [`FDS_PER_MESSAGE`] descriptors (the receiver must know how many to expect).
pub fn send_fds(stream: &std::os::unix::net::UnixStream, fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let iov = [std::io::IoSlice::new(b"F")];
        let cmsg = [ControlMessage::ScmRights(chunk)];
        let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .map_err(std::io::Error::from)?;
        if sent != 1 {
            return Err(std::io::Error::other(
                "short write while passing descriptors",
            ));
        }
    }
    Ok(())
}

/// Receives exactly `count` descriptors sent by [`send_fds`]. Every received fd is owned
/// (close-on-exec) even when the count turns out wrong, so nothing leaks on an error.
pub fn recv_fds(
    stream: &std::os::unix::net::UnixStream,
    count: usize,
) -> std::io::Result<Vec<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut out: Vec<OwnedFd> = Vec::with_capacity(count);
    while out.len() < count {
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        if msg.bytes == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the sender closed after {} of {count} descriptors",
                    out.len()
                ),
            ));
        }
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                for fd in received {
                    // SAFETY: the kernel just installed `fd` in this process for us; nothing
                    // else owns it.
                    out.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if truncated {
            return Err(std::io::Error::other(
                "descriptors were truncated in transit (MSG_CTRUNC)",
            ));
        }
    }
    if out.len() != count {
        return Err(std::io::Error::other(format!(
            "expected {count} descriptors, received {}",
            out.len()
        )));
    }
    Ok(out)
}

/// What kind of object an fd refers to, as far as the upgrade handoff checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// A listening TCP socket bound to this address.
    TcpListener(std::net::SocketAddr),
    /// A listening unix stream socket.
    UnixListener,
    /// A BPF program of this type (BPF_PROG_TYPE_*).
    BpfProgram(u32),
    /// A BPF map of this type (BPF_MAP_TYPE_*).
    BpfMap(u32),
    /// A BPF link of this type, as /proc names it ("cgroup", ...).
    BpfLink(String),
    /// Anything else.
    Other(String),
}

/// Looks at `fd` and says what it is: sockets through getsockopt/getsockname, BPF objects
/// through /proc/self/fdinfo (which names a program's or map's type).
pub fn kind_of(fd: std::os::fd::BorrowedFd<'_>) -> FdKind {
    let raw = fd.as_raw_fd();
    let socket = socket2::SockRef::from(&fd);
    if let Ok(domain) = socket.domain() {
        let listening = socket.is_listener().unwrap_or(false);
        let stream = socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM);
        if !(listening && stream) {
            return FdKind::Other("a socket that is not a listening stream socket".into());
        }
        if domain == socket2::Domain::UNIX {
            return FdKind::UnixListener;
        }
        if domain == socket2::Domain::IPV4 || domain == socket2::Domain::IPV6 {
            return match socket.local_addr().ok().and_then(|a| a.as_socket()) {
                Some(addr) => FdKind::TcpListener(addr),
                None => FdKind::Other("a socket without a local address".into()),
            };
        }
        return FdKind::Other(format!("a socket of family {domain:?}"));
    }
    let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")) else {
        return FdKind::Other("an fd /proc cannot describe".into());
    };
    let field = |name: &str| -> Option<u32> {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    if let Some(t) = field("prog_type:") {
        return FdKind::BpfProgram(t);
    }
    if let Some(t) = field("map_type:") {
        return FdKind::BpfMap(t);
    }
    if let Some(t) = info.lines().find_map(|l| l.strip_prefix("link_type:")) {
        return FdKind::BpfLink(t.trim().to_owned());
    }
    FdKind::Other("not a socket nor a BPF object".into())
}

/// The binary workers are started from, held open: what runs is the file opened (the running
/// lbd's own, from `/proc/self/exe`, or the one a workers-only upgrade named), even after
/// another file is put at its path (the documented upgrade replaces the binary on disk
/// first). Workers are exec'd through `/proc/self/fd/N` of this descriptor (`fexecve`).
pub struct Binary {
    file: File,
    /// Where it was, for logs and the workers' argv\[0\].
    path: std::path::PathBuf,
}

impl Binary {
    /// The binary this process runs.
    pub fn current() -> std::io::Result<Binary> {
        let path = std::env::current_exe()?;
        let file = File::open("/proc/self/exe")?;
        Ok(Binary { file, path })
    }

    /// The binary at `path`, as it is now.
    pub fn open(path: &std::path::Path) -> std::io::Result<Binary> {
        Ok(Binary {
            file: File::open(path)?,
            path: path.to_path_buf(),
        })
    }

    pub fn try_clone(&self) -> std::io::Result<Binary> {
        Ok(Binary {
            file: self.file.try_clone()?,
            path: self.path.clone(),
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// A command that executes this very file. The descriptor is close-on-exec: the kernel
    /// resolves `/proc/self/fd/N` (in the child, which has it) before it closes it.
    pub fn command(&self) -> Command {
        let mut command = Command::new(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
        command.arg0(&self.path);
        command
    }
}
