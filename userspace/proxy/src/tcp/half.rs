//! One direction of a TCP passthrough connection: the bytes read from one side and not yet
//! written to the other, through the pooled buffer or, for bulk transfers, a pipe and
//! splice(2).

use crate::cx::Cx;
use crate::pool::PoolBuf;
use crate::proxy_protocol::V2Header;
use crate::splice::{self, Pipe, PipePool};
use kawa::AsBuffer;
use mio::net::TcpStream;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;

/// Readiness of one socket, from its events.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Ready {
    pub(super) readable: bool,
    pub(super) writable: bool,
    /// The peer shut its write side: a short read is not the end, read until 0.
    pub(super) hup: bool,
}

/// Whether a direction moves its bytes through a pipe.
pub(super) enum Zero {
    /// Copy through the buffer (small exchanges).
    Off,
    /// A read filled the whole buffer: get a pipe for the next reads.
    Wanted,
    On {
        pipe: Pipe,
        /// Bytes in the pipe.
        held: usize,
        /// The last splice into the pipe found it full (or the socket empty): wait until
        /// some of it is written before reading again.
        maybe_full: bool,
    },
    /// No pipe could be had: copy for good.
    Unavailable,
}

pub(super) enum Io {
    Moved,
    Idle,
    Eof,
    Error,
}

/// One direction of the connection: what was read from one side and not yet written to the
/// other. Buffered bytes are always older than piped ones, so the buffer is written first.
pub(super) struct Half {
    pub(super) buf: PoolBuf,
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) zero: Zero,
    /// Bytes to send before any other (the PROXY protocol header) and how many were sent.
    pub(super) prefix: Option<(V2Header, usize)>,
    /// The source side ended its stream.
    pub(super) eof: bool,
    /// The EOF was passed on (shutdown of the destination's write side).
    pub(super) shut: bool,
    pub(super) read: u64,
    pub(super) written: u64,
}

impl Half {
    pub(super) fn new(buf: PoolBuf) -> Half {
        Half {
            buf,
            start: 0,
            end: 0,
            zero: Zero::Off,
            prefix: None,
            eof: false,
            shut: false,
            read: 0,
            written: 0,
        }
    }

    pub(super) fn buffered(&self) -> &[u8] {
        self.buf
            .as_buffer()
            .get(self.start..self.end)
            .unwrap_or_default()
    }

    pub(super) fn piped(&self) -> usize {
        match &self.zero {
            Zero::On { held, .. } => *held,
            _ => 0,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end && self.piped() == 0 && self.prefix.is_none()
    }

    /// Drops the first `n` buffered bytes (a header that is not forwarded).
    pub(super) fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads what `src` has, into the pipe or the buffer.
    pub(super) fn fill(
        &mut self,
        src: &mut TcpStream,
        ready: &mut Ready,
        pipes: &mut PipePool,
    ) -> Io {
        if self.eof || !ready.readable {
            return Io::Idle;
        }
        if matches!(self.zero, Zero::Wanted) {
            self.zero = match pipes.get() {
                Some(pipe) => Zero::On {
                    pipe,
                    held: 0,
                    maybe_full: false,
                },
                None => Zero::Unavailable,
            };
        }
        let Zero::On {
            pipe,
            held,
            maybe_full,
        } = &mut self.zero
        else {
            return self.read_into_buffer(src, ready);
        };
        if *maybe_full {
            return Io::Idle;
        }
        match splice::fill(&*src, pipe) {
            Ok(0) => {
                self.eof = true;
                Io::Eof
            }
            Ok(n) => {
                *held += n;
                self.read += n as u64;
                Io::Moved
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // An empty pipe cannot be full: the socket is drained. Otherwise either may be
                // the cause; try again once the pipe has been written from.
                if *held == 0 {
                    ready.readable = false;
                } else {
                    *maybe_full = true;
                }
                Io::Idle
            }
            Err(_) => Io::Error,
        }
    }

    pub(super) fn read_into_buffer(&mut self, src: &mut TcpStream, ready: &mut Ready) -> Io {
        let capacity = self.buf.as_buffer().len();
        if self.end == capacity {
            if self.start == 0 {
                return Io::Idle; // full: wait for the other side to take some
            }
            self.buf
                .as_mut_buffer()
                .copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = capacity - self.end;
        loop {
            let Some(space) = self.buf.as_mut_buffer().get_mut(self.end..) else {
                return Io::Idle;
            };
            match src.read(space) {
                Ok(0) => {
                    self.eof = true;
                    return Io::Eof;
                }
                Ok(n) => {
                    self.end += n;
                    self.read += n as u64;
                    if n < room && !ready.hup {
                        // A short read drained the socket; the next bytes bring an event.
                        ready.readable = false;
                    }
                    if n == capacity && matches!(self.zero, Zero::Off) {
                        self.zero = Zero::Wanted;
                    }
                    return Io::Moved;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    ready.readable = false;
                    return Io::Idle;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Io::Error,
            }
        }
    }

    /// Writes what it holds to `dst`: the prefix, then the buffer, then the pipe.
    pub(super) fn flush(&mut self, dst: &mut TcpStream, ready: &mut Ready) -> Io {
        if !ready.writable {
            return Io::Idle;
        }
        let result = if let Some((header, sent)) = self.prefix {
            let rest = header.as_bytes().get(sent..).unwrap_or_default();
            write_some(dst, rest).map(|n| {
                let sent = sent + n;
                self.prefix = (sent < header.as_bytes().len()).then_some((header, sent));
                0
            })
        } else if self.start < self.end {
            let rest = self
                .buf
                .as_buffer()
                .get(self.start..self.end)
                .unwrap_or_default();
            write_some(dst, rest).inspect(|&n| {
                self.start += n;
                if self.start >= self.end {
                    self.start = 0;
                    self.end = 0;
                }
            })
        } else if let Zero::On {
            pipe,
            held,
            maybe_full,
        } = &mut self.zero
        {
            if *held == 0 {
                return Io::Idle;
            }
            splice::drain(pipe, &*dst, *held).inspect(|&n| {
                *held = held.saturating_sub(n);
                *maybe_full = false;
            })
        } else {
            return Io::Idle;
        };
        match result {
            Ok(n) => {
                self.written += n as u64;
                Io::Moved
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ready.writable = false;
                Io::Idle
            }
            Err(_) => Io::Error,
        }
    }

    /// Passes the source's EOF on once everything before it is delivered.
    /// When the other direction has ended too the connection closes now, and the close
    /// sends the FIN: no shutdown call then (every byte was read, so the close does not reset).
    pub(super) fn pass_eof(&mut self, dst: &TcpStream, other_shut: bool) -> bool {
        if self.eof && !self.shut && self.is_empty() {
            if !other_shut {
                let _ = dst.shutdown(Shutdown::Write);
            }
            self.shut = true;
            return true;
        }
        false
    }

    pub(super) fn release(self, cx: &mut Cx) {
        cx.pool.checkin(self.buf);
        if let Zero::On { pipe, held, .. } = self.zero {
            cx.pipes.put(pipe, held == 0);
        }
    }
}

pub(super) fn write_some(dst: &mut TcpStream, data: &[u8]) -> std::io::Result<usize> {
    loop {
        match dst.write(data) {
            Ok(0) if !data.is_empty() => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
