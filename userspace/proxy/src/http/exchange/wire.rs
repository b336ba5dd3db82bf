//! Moving bytes between a side and a kawa buffer: reads that respect edge-triggered readiness,
//! conversion and vectored writes, the raw pipe, the TLS flush and the lingering close.

use super::{Exchange, FrontWire, Io, Side, Step};
use crate::pool::PoolBuf;
use kawa::Kawa;
use std::io::{self, ErrorKind, IoSlice, Read, Write};

/// Writes what TLS still holds for the client when the socket takes it; false when the
/// connection failed.
pub(super) fn flush_front<I: Io>(io: &mut I) -> bool {
    let (front, side) = io.front();
    if !side.writable || !front.has_pending() {
        return true;
    }
    match front.flush_pending() {
        Ok(()) => true,
        Err(e) if would_block(&e) => {
            side.writable = false;
            true
        }
        Err(_) => false,
    }
}

pub(super) fn linger<I: Io>(io: &mut I) -> Step {
    let (front, side) = io.front();
    let mut scratch = [0u8; 4096];
    loop {
        if !side.readable {
            return Step::Blocked;
        }
        match front.discard(&mut scratch) {
            Ok(0) => return Step::Close,
            Ok(_) => {}
            Err(e) if would_block(&e) => {
                side.readable = false;
                return Step::Blocked;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Step::Close,
        }
    }
}

pub(super) fn would_block(e: &io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

pub(super) enum ReadOutcome {
    Data(usize),
    Blocked,
    /// No room left in the buffer: wait for the other side to drain it.
    Full,
    Eof,
    Error,
}

pub(super) enum WriteOutcome {
    Wrote(usize),
    Nothing,
    Blocked,
    Error,
}

/// The buffer is full of bytes the parser cannot use yet and nothing parsed waits to be
/// sent: a line longer than the buffer, which no read can complete.
pub(super) fn stuck(kawa: &Kawa<PoolBuf>) -> bool {
    kawa.storage.available_space() == 0 && kawa.blocks.is_empty() && kawa.out.is_empty()
}

/// Reads what the side has into the kawa buffer, as far as it has room.
pub(super) fn read_into(
    stream: &mut impl Read,
    side: &mut Side,
    kawa: &mut Kawa<PoolBuf>,
) -> ReadOutcome {
    if !side.readable {
        return ReadOutcome::Blocked;
    }
    if kawa.storage.available_space() == 0 {
        // Shifting moves parsed bytes: only safe while no block points into the buffer.
        if kawa.blocks.is_empty() && kawa.storage.start > 0 {
            let amount = kawa.storage.shift();
            kawa.push_left(amount as u32);
        }
        if kawa.storage.available_space() == 0 {
            return ReadOutcome::Full;
        }
    }
    loop {
        let room = kawa.storage.available_space();
        match stream.read(kawa.storage.space()) {
            Ok(0) => return ReadOutcome::Eof,
            Ok(n) => {
                kawa.storage.fill(n);
                if n < room && !side.hup {
                    // A short read drained the socket: with edge-triggered readiness the next
                    // bytes bring a new event, so skip the read that would say EAGAIN. Not
                    // after a hang-up, which came in an event already consumed: the next read
                    // must see the end of the stream.
                    side.readable = false;
                }
                return ReadOutcome::Data(n);
            }
            Err(e) if would_block(&e) => {
                side.readable = false;
                return ReadOutcome::Blocked;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return ReadOutcome::Error,
        }
    }
}

/// Slices of kawa's output given to one vectored write, at most: a response head is a few
/// dozen (a slice per name, separator, value and line end); what does not fit goes in the
/// next write.
const MAX_SLICES: usize = 256;

/// Converts parsed blocks to HTTP/1.1 bytes and writes as much as the peer takes.
pub(super) fn write_kawa(
    stream: &mut impl Write,
    writable: &mut bool,
    kawa: &mut Kawa<PoolBuf>,
) -> WriteOutcome {
    crate::http::prepare(kawa);
    if kawa.out.is_empty() {
        // Still let kawa release what it no longer references.
        kawa.consume(0);
        return WriteOutcome::Nothing;
    }
    if !*writable {
        return WriteOutcome::Blocked;
    }
    loop {
        // kawa's `as_io_slice` collects into a new Vec on every write (a malloc, a realloc and
        // a free per response): the same slices, at most [`MAX_SLICES`], on the stack.
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let buffer = kawa.storage.buffer();
        let mut count = 0;
        for block in &kawa.out {
            let (kawa::OutBlock::Store(store), Some(slot)) = (block, slices.get_mut(count)) else {
                break;
            };
            *slot = IoSlice::new(store.data(buffer));
            count += 1;
        }
        match stream.write_vectored(slices.get(..count).unwrap_or_default()) {
            Ok(0) => return WriteOutcome::Error,
            Ok(n) => {
                kawa.consume(n);
                return WriteOutcome::Wrote(n);
            }
            Err(e) if would_block(&e) => {
                *writable = false;
                return WriteOutcome::Blocked;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return WriteOutcome::Error,
        }
    }
}

/// Pipe mode: read raw bytes into the buffer (no parsing).
pub(super) fn read_raw(
    stream: &mut impl Read,
    side: &mut Side,
    kawa: &mut Kawa<PoolBuf>,
) -> ReadOutcome {
    kawa.blocks.clear();
    kawa.out.clear();
    read_into(stream, side, kawa)
}

/// Pipe mode: write the raw bytes held in the buffer.
pub(super) fn write_raw(
    stream: &mut impl Write,
    writable: &mut bool,
    kawa: &mut Kawa<PoolBuf>,
) -> WriteOutcome {
    if kawa.storage.is_empty() {
        return WriteOutcome::Nothing;
    }
    if !*writable {
        return WriteOutcome::Blocked;
    }
    loop {
        match stream.write(kawa.storage.data()) {
            Ok(0) => return WriteOutcome::Error,
            Ok(n) => {
                kawa.storage.consume(n);
                kawa.storage.head = kawa.storage.start;
                if kawa.storage.is_empty() {
                    kawa.storage.clear();
                }
                return WriteOutcome::Wrote(n);
            }
            Err(e) if would_block(&e) => {
                *writable = false;
                return WriteOutcome::Blocked;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return WriteOutcome::Error,
        }
    }
}

impl Exchange {
    /// Reads from the client into the request's buffer, counting the bytes.
    pub(super) fn read_front<I: Io>(&mut self, io: &mut I) -> ReadOutcome {
        let (front, side) = io.front();
        let out = read_into(front, side, &mut self.front_kawa);
        match out {
            ReadOutcome::Data(n) => self.ex.bytes_in += n as u64,
            ReadOutcome::Eof => side.eof = true,
            _ => {}
        }
        out
    }

    /// After a 101: raw bytes both ways until both sides are done.
    pub(super) fn pipe<I: Io>(&mut self, io: &mut I) -> Step {
        if io.back().is_none() {
            return Step::Close;
        }
        let mut progress = false;
        // client -> backend
        let front_eof = io.front().1.eof;
        if !front_eof {
            let (front, side) = io.front();
            match read_raw(front, side, &mut self.front_kawa) {
                ReadOutcome::Data(_) => progress = true,
                ReadOutcome::Eof => {
                    side.eof = true;
                    progress = true;
                }
                ReadOutcome::Error => return Step::Close,
                ReadOutcome::Blocked | ReadOutcome::Full => {}
            }
        }
        if let Some((back, side)) = io.back() {
            match write_raw(back, &mut side.writable, &mut self.front_kawa) {
                WriteOutcome::Wrote(_) => progress = true,
                WriteOutcome::Error => return Step::Close,
                WriteOutcome::Blocked | WriteOutcome::Nothing => {}
            }
        }
        let front_eof = io.front().1.eof;
        if front_eof && self.front_kawa.storage.is_empty() {
            io.shutdown_back_write();
        }
        // backend -> client
        let mut back_eof = false;
        if let Some((back, side)) = io.back() {
            if !side.eof {
                match read_raw(back, side, &mut self.back_kawa) {
                    ReadOutcome::Data(_) => progress = true,
                    ReadOutcome::Eof => {
                        side.eof = true;
                        progress = true;
                    }
                    ReadOutcome::Error => return Step::Close,
                    ReadOutcome::Blocked | ReadOutcome::Full => {}
                }
            }
            back_eof = side.eof;
        }
        let (front, side) = io.front();
        match write_raw(front, &mut side.writable, &mut self.back_kawa) {
            WriteOutcome::Wrote(n) => {
                progress = true;
                self.ex.bytes_out += n as u64;
            }
            WriteOutcome::Error => return Step::Close,
            WriteOutcome::Blocked | WriteOutcome::Nothing => {}
        }
        if back_eof && self.back_kawa.storage.is_empty() {
            let (front, side) = io.front();
            front.shutdown_write();
            if side.eof {
                return Step::Close;
            }
        }
        if progress {
            self.since = io.now();
            Step::Progress
        } else {
            Step::Blocked
        }
    }
}
