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

/// Slices given to one vectored write, at most; what does not fit goes in the next write.
const MAX_SLICES: usize = 64;
/// kawa's output is a slice per name, separator, value and line end of a head: a few dozen
/// slices of a few bytes each. The kernel pays for every slice of a `writev` (the copy into
/// the socket walks them one by one: measured, `_copy_from_iter` took 8% of a worker's time
/// on keep-alive, against under 1% for nginx, which writes a head in one piece). Runs of
/// slices shorter than this are copied into one piece on the stack; longer ones (bodies) go
/// as they are.
const COALESCE_UNDER: usize = 1024;
/// The room for those copies, per write.
const COALESCE_ROOM: usize = 8 * 1024;

thread_local! {
    static ROOM: std::cell::RefCell<[u8; COALESCE_ROOM]> =
        const { std::cell::RefCell::new([0; COALESCE_ROOM]) };
}

/// One slice of a vectored write: a range of the copies, or a slice of kawa's buffer.
#[derive(Clone, Copy)]
enum Part<'a> {
    Copied(usize, usize),
    Whole(&'a [u8]),
}

/// The slices of kawa's output (up to its first delimiter) as at most [`MAX_SLICES`] parts,
/// short ones copied together into `room`. Returns how many parts.
fn gather<'a>(
    kawa: &'a Kawa<PoolBuf>,
    room: &mut [u8; COALESCE_ROOM],
    parts: &mut [Part<'a>; MAX_SLICES],
) -> usize {
    let buffer = kawa.storage.buffer();
    let mut count = 0;
    let mut used = 0;
    // The copied run being built: from `run_start` to `used`.
    let mut run_start = 0;
    for block in &kawa.out {
        let kawa::OutBlock::Store(store) = block else {
            break;
        };
        let data = store.data(buffer);
        if data.len() < COALESCE_UNDER {
            if let Some(to) = room.get_mut(used..used + data.len()) {
                to.copy_from_slice(data);
                used += data.len();
                continue;
            }
        }
        // Close the run, then the slice as it is (or stop: no room left for either).
        if used > run_start {
            let Some(slot) = parts.get_mut(count) else {
                return count;
            };
            *slot = Part::Copied(run_start, used);
            count += 1;
            run_start = used;
        }
        if data.len() < COALESCE_UNDER {
            // The copies are full: this slice waits for the next write.
            return count;
        }
        let Some(slot) = parts.get_mut(count) else {
            return count;
        };
        *slot = Part::Whole(data);
        count += 1;
    }
    if used > run_start {
        if let Some(slot) = parts.get_mut(count) {
            *slot = Part::Copied(run_start, used);
            count += 1;
        }
    }
    count
}

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
        // On the stack, not kawa's `as_io_slice` (a Vec allocated, grown and freed per write),
        // and short slices copied together (see [`COALESCE_UNDER`]).
        // The copies' room is the thread's (a worker is one thread): not zeroed per write.
        let written = ROOM.with(|room| {
            let mut room = room.borrow_mut();
            let mut parts = [Part::Whole(&[]); MAX_SLICES];
            let count = gather(kawa, &mut room, &mut parts);
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            for (slot, part) in slices.iter_mut().zip(parts.iter().take(count)) {
                *slot = IoSlice::new(match *part {
                    Part::Copied(from, to) => room.get(from..to).unwrap_or_default(),
                    Part::Whole(data) => data,
                });
            }
            stream.write_vectored(slices.get(..count).unwrap_or_default())
        });
        match written {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;
    use crate::http::{Peer, RequestCallbacks, RequestInfo};
    use crate::pool::BufferPool;
    use kawa::{Buffer, Kind};

    /// A request parsed and converted by kawa, ready to be written.
    fn prepared(pool: &mut BufferPool, input: &[u8]) -> Kawa<PoolBuf> {
        let mut k = Kawa::new(Kind::Request, Buffer::new(pool.checkout().unwrap()));
        k.storage.space()[..input.len()].copy_from_slice(input);
        k.storage.fill(input.len());
        let mut info = RequestInfo::default();
        let mut cb = RequestCallbacks {
            peer: Peer {
                client: "192.0.2.7:5555".parse().unwrap(),
                listener: "127.0.0.1:8080".parse().unwrap(),
                https: false,
            },
            request_id: "rid1",
            client_cert: None,
            info: &mut info,
        };
        kawa::h1::parse(&mut k, &mut cb);
        assert!(!k.is_error());
        crate::http::prepare(&mut k);
        k
    }

    /// Takes at most `step` bytes per write, whatever the slices.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
        writes: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.writes += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.step - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Short slices copied together, long ones as they are, partial writes: the bytes are
    /// kawa's own, in order, whatever the write sizes; and a head goes in one piece.
    #[test]
    fn gathered_writes_give_kawa_s_bytes() {
        let mut pool = BufferPool::new(64 * 1024, 8, 8);
        let mut input = b"POST /upload HTTP/1.1\r\nHost: a.example\r\n".to_vec();
        // Headers worth more than the copies' room, then a body longer than a copied slice.
        // (90 fields: under the cap of 100 on a head.)
        let value = "v".repeat(100);
        for i in 0..90 {
            input.extend_from_slice(format!("X-Field-{i}: {value}\r\n").as_bytes());
        }
        let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        input.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        input.extend_from_slice(&body);
        let reference = prepared(&mut pool, &input);
        let expected: Vec<u8> = reference
            .as_io_slice()
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        assert!(expected.ends_with(&body));
        for step in [1, 7, 1000, 4096, usize::MAX / 2] {
            let mut k = prepared(&mut pool, &input);
            let mut out = Trickle {
                got: Vec::new(),
                step,
                writes: 0,
            };
            let mut writable = true;
            for _ in 0..100_000 {
                match write_kawa(&mut out, &mut writable, &mut k) {
                    WriteOutcome::Wrote(_) => {}
                    WriteOutcome::Nothing => break,
                    _ => panic!("write failed"),
                }
            }
            assert!(out.got == expected, "step {step}: bytes differ");
            if step == usize::MAX / 2 {
                // 8 KiB of copies per write: the ~10 KiB head in two, then the body.
                assert!(out.writes <= 4, "{} writes", out.writes);
            }
        }
    }
}
