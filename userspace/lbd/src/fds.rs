//! The few places where lbd handles raw file descriptors: handing sockets to a worker across
//! fork+exec, and taking them back as typed objects in the worker. Every `unsafe` of the
//! supervisor/worker boundary lives here.
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
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number; async-signal-safe.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
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
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`, a c_int we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || accepting == 0 {
        return Err(FdError::NotAListener { fd });
    }
    // SAFETY: the fd was inherited for this purpose, is a listening socket (checked above)
    // and nothing else in this process owns it.
    Ok(unsafe { TcpListener::from_raw_fd(fd) })
}

/// Takes ownership of an inherited fd holding the worker's config text.
pub fn file_from_fd(fd: RawFd) -> Result<File, FdError> {
    // SAFETY: fstat fills a stat struct we own; it only checks that the fd is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(FdError::Io {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the fd is open (fstat succeeded), was inherited for this purpose and is owned
    // by nothing else in this process.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
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
pub fn memfd_with(text: &str) -> Result<File, FdError> {
    let fd =
        nix::sys::memfd::memfd_create(c"kakehi-config", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| FdError::Memfd(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(text.as_bytes()).map_err(FdError::Memfd)?;
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
