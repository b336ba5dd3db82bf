//! Zero-copy forwarding with splice(2): socket → pipe → socket, the bytes never copied into
//! the worker's memory.
//!
//! A [`Pipe`] is one kernel pipe (non-blocking, close-on-exec) used by one direction of one TCP
//! passthrough connection. Pipes come from a [`PipePool`]: a connection that ends with its
//! pipes empty gives them back, so a busy worker does not pay pipe2 + fcntl + two closes per
//! connection; a pipe still holding bytes is closed instead.
//!
//! Size: each pipe is grown to [`PIPE_SIZE`] (F_SETPIPE_SZ). Measured on loopback with 1 GiB
//! each way, a 64 KiB pipe (the default) cost the worker 1.5-2.1 s of CPU per GiB, 256 KiB
//! 0.8-1.0 s, 512 KiB or 1 MiB about 0.8 s: most of the cost is per splice call and per
//! packet, so fewer, larger moves win. Kernel memory is bounded by the kernel's own per-user
//! pipe accounting (`fs.pipe-user-pages-soft`, 64 MiB by default, for all the workers of the
//! user together: about 256 pipes of 256 KiB, pooled ones included). Past it the kernel
//! refuses to grow a pipe (and would hand out 8 KiB ones): then the pipe is closed and the
//! caller copies through its pooled buffers instead, which costs CPU but no more memory.
//!
//! The syscalls (`pipe2`, `splice`, `fcntl(F_SETPIPE_SZ)`) are in the worker's seccomp
//! allowlist (lbd's sandbox.rs). nix wraps them, so this crate needs no unsafe code.

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// Asked per splice call; the kernel moves at most what the pipe (or the socket) takes.
const SPLICE_LEN: usize = 1 << 20;
/// The size each pipe is grown to (see the module docs).
pub const PIPE_SIZE: usize = 256 * 1024;

/// One pipe, read and write ends.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Idle pipes kept for the next connections.
#[derive(Debug)]
pub struct PipePool {
    free: Vec<Pipe>,
    max_idle: usize,
    size: usize,
}

impl PipePool {
    /// A pool keeping up to `max_idle` empty pipes of `size` bytes.
    pub fn new(max_idle: usize, size: usize) -> PipePool {
        PipePool {
            free: Vec::new(),
            max_idle,
            size,
        }
    }

    /// A pooled pipe, or a new one grown to the pool's size; None when the kernel refuses
    /// either.
    pub fn get(&mut self) -> Option<Pipe> {
        if let Some(pipe) = self.free.pop() {
            return Some(pipe);
        }
        let (read, write) = match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok(ends) => ends,
            Err(e) => {
                log::debug!("pipe2 failed ({e}): copying through buffers instead");
                return None;
            }
        };
        let size = i32::try_from(self.size).unwrap_or(i32::MAX);
        if let Err(e) = fcntl(&write, FcntlArg::F_SETPIPE_SZ(size)) {
            log::debug!("cannot grow a pipe to {size} bytes ({e}): copying through buffers");
            return None;
        }
        Some(Pipe { read, write })
    }

    /// Takes `pipe` back if it is `empty` and the pool has room; otherwise closes it.
    pub fn put(&mut self, pipe: Pipe, empty: bool) {
        if empty && self.free.len() < self.max_idle {
            self.free.push(pipe);
        }
    }

    pub fn idle(&self) -> usize {
        self.free.len()
    }
}

/// Moves what `src` has into `pipe`. Ok(0) is the end of the stream; `WouldBlock` means the
/// socket is empty or the pipe is full (the caller knows which from what the pipe holds).
pub fn fill(src: impl AsFd, pipe: &Pipe) -> io::Result<usize> {
    retry(|| {
        splice(
            src.as_fd(),
            None,
            pipe.write.as_fd(),
            None,
            SPLICE_LEN,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )
    })
}

/// Moves up to `len` bytes from `pipe` into `dst`.
pub fn drain(pipe: &Pipe, dst: impl AsFd, len: usize) -> io::Result<usize> {
    retry(|| {
        splice(
            pipe.read.as_fd(),
            None,
            dst.as_fd(),
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )
    })
}

fn retry(mut call: impl FnMut() -> nix::Result<usize>) -> io::Result<usize> {
    loop {
        match call() {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn moves_bytes_between_sockets_and_reports_eof() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut a = TcpStream::connect(addr).unwrap();
        let (b, _) = listener.accept().unwrap();
        let c_out = TcpStream::connect(addr).unwrap();
        let (mut c_in, _) = listener.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut pool = PipePool::new(4, PIPE_SIZE);
        let pipe = pool.get().unwrap();
        // Empty socket: WouldBlock.
        let e = fill(&b, &pipe).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        a.write_all(b"hello, splice").unwrap();
        let mut moved = 0;
        while moved < 13 {
            match fill(&b, &pipe) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(drain(&pipe, &c_out, moved).unwrap(), 13);
        let mut got = [0u8; 13];
        c_in.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello, splice");
        drop(a);
        let eof = loop {
            match fill(&b, &pipe) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(eof, 0);
        pool.put(pipe, true);
        assert_eq!(pool.idle(), 1);
        let again = pool.get().unwrap();
        pool.put(again, false);
        assert_eq!(pool.idle(), 0);
    }
}
