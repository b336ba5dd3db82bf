//! HTTP/2 to backends: the clusters with `http2 = true` (h2c with prior knowledge, as gRPC
//! servers speak it), multiplexed over pooled connections.
//!
//! An [`Upstream`] is one HTTP/2 connection to a backend address, shared by the exchanges
//! whose requests it carries, one stream each (an `Rc<RefCell<_>>`: a worker is one thread).
//! The exchange machine still speaks HTTP/1.1, and an upstream stands between it and the
//! socket:
//!
//! - what an exchange writes (its HTTP/1.1 request, read by `response.rs` in request mode)
//!   goes out on its stream as HEADERS (`:method`, `:scheme`, `:authority` from Host, `:path`,
//!   and `te: trailers`), DATA under the backend's windows, and trailers;
//! - what the backend sends on the stream (HEADERS, DATA, trailers) is given to the exchange
//!   as an HTTP/1.1 response: with its `content-length` when it declared one, chunked
//!   otherwise, so that trailers (gRPC's `grpc-status`) reach the client.
//!
//! [`Upstreams`] keeps them by address: a new stream goes on an open connection with room
//! under the backend's SETTINGS_MAX_CONCURRENT_STREAMS (100 until its SETTINGS say), else on
//! a new connection. A connection without streams waits for the next ones, up to the pool's
//! idle time. Its socket is registered once under its own backend token; an event for it is
//! handled here (frames read and sorted to their streams), and the sessions whose streams it
//! moved are woken ([`Upstreams::event`], [`Upstreams::woken`]).
//!
//! Memory is bounded per stream: the request waits in a buffer of [`REQUEST_CAP`], the
//! response by the stream's receive window (64 KiB, given back only as the exchange reads).
//! The connection's receive window is given back as frames arrive: the streams' windows bound
//! what is held. A connection error (a bad frame, a reset socket, the backend's end) fails
//! every stream not ended; a stream reset, or one past a GOAWAY's last stream, fails alone.

use super::block::{Assembler, BlockLimits};
use super::error::ErrorCode;
use super::fields::{BlockKind, HeaderLimits};
use super::frame::{self, Frame, Parsed, Settings};
use super::hpack::{self, Decoder, DEFAULT_TABLE_SIZE};
use super::request::field;
use super::response::{self, Piece, ResponseReader};
use crate::idle_backends::back_token;
use mio::net::TcpStream;
use mio::{Interest, Registry};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// An upstream as the exchanges on it hold it.
pub type Shared = Rc<RefCell<Upstream>>;

/// Request bytes held per stream for the backend's windows.
pub const REQUEST_CAP: usize = 64 * 1024;
/// Frames waiting for the socket, over which streams wait to write.
const OUT_CAP: usize = 256 * 1024;
/// A partial frame read from the backend, at most (a frame is at most 16 KiB here).
const INPUT_CAP: usize = 64 * 1024;
/// Window given back (per stream, and for the connection) once this much was used.
const CREDIT_AT: u32 = 16 * 1024;
const DEFAULT_WINDOW: i64 = 65_535;
/// Streams opened on a connection before the backend's SETTINGS say how many it takes.
const ASSUMED_MAX_STREAMS: usize = 100;
/// Streams on one connection at most, whatever the backend allows.
const MAX_STREAMS: usize = 1000;
const MAX_STREAM_ID: u32 = (1 << 31) - 1;
/// Times a refused stream moves to another connection before it fails.
const MAX_MOVES: u8 = 3;

#[derive(Debug)]
struct Stream {
    /// How its exchange names it.
    handle: u32,
    /// Its stream identifier: 0 until its HEADERS are framed, so that identifiers go out in
    /// increasing order whatever order the exchanges write in (RFC 9113 §5.1.1).
    id: u32,
    /// The key of the session whose exchange this is.
    owner: usize,
    req: Vec<u8>,
    reader: ResponseReader,
    req_blocked: bool,
    end_sent: bool,
    /// The backend's window for this stream.
    window: i64,
    /// What the backend may still send on it before we give window back.
    recv: i64,
    resp: Vec<u8>,
    resp_at: usize,
    head_done: bool,
    chunked: bool,
    ended: bool,
    owed: u32,
    /// Reset by the backend, refused by its GOAWAY, or its request could not be framed.
    failed: bool,
    /// Something for its exchange happened: its session is woken.
    stirred: bool,
    /// The request buffer has room again after a write was refused.
    wake_write: bool,
    /// The request bytes its exchange wrote, kept until the response begins (at most
    /// [`REQUEST_CAP`]; `None` past it): what goes again on another connection when the
    /// backend refuses the stream unprocessed.
    replay: Option<Vec<u8>>,
    /// The backend will not process it (a GOAWAY before it, REFUSED_STREAM), and `replay`
    /// holds the whole request so far: its session moves it to another connection.
    refused: bool,
    /// Times its request was moved so.
    moves: u8,
    /// The backend closed it after a whole response (RST_STREAM NO_ERROR): the rest of the
    /// request is not wanted.
    peer_closed: bool,
}

impl Stream {
    fn new(handle: u32, owner: usize) -> Stream {
        Stream {
            handle,
            id: 0,
            owner,
            req: Vec::new(),
            reader: ResponseReader::request(),
            req_blocked: false,
            end_sent: false,
            window: DEFAULT_WINDOW,
            recv: DEFAULT_WINDOW,
            resp: Vec::new(),
            resp_at: 0,
            head_done: false,
            chunked: false,
            ended: false,
            owed: 0,
            failed: false,
            stirred: false,
            wake_write: false,
            replay: Some(Vec::new()),
            refused: false,
            moves: 0,
            peer_closed: false,
        }
    }
}

/// One HTTP/2 connection to a backend.
#[derive(Debug)]
pub struct Upstream {
    socket: TcpStream,
    fd: usize,
    address: SocketAddr,
    connected: bool,
    /// The connection failed (or ended): every stream not ended fails.
    dead: bool,
    /// The last stream the backend's GOAWAY will process.
    goaway: Option<u32>,
    out: Vec<u8>,
    out_at: usize,
    send_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    peer_max_streams: usize,
    input: Vec<u8>,
    decoder: Decoder,
    assembler: Assembler,
    streams: Vec<Stream>,
    next_id: u32,
    next_handle: u32,
    /// Connection window used since the last WINDOW_UPDATE on stream 0.
    conn_owed: u32,
    /// Since when it has had no stream.
    idle_since: Instant,
    /// The owners of streams stirred by what happened outside an event (see `Upstreams::woken`).
    pending_wake: bool,
    scratch: Vec<u8>,
}

impl Upstream {
    /// Connects to `address` and registers the socket; the preface and SETTINGS wait for it.
    fn connect(address: SocketAddr, registry: &Registry, now: Instant) -> io::Result<Upstream> {
        let mut socket = crate::idle_backends::connect_backend(address)?;
        let token = back_token(&socket);
        registry.register(&mut socket, token, Interest::READABLE | Interest::WRITABLE)?;
        let fd = usize::try_from(socket.as_raw_fd()).unwrap_or(usize::MAX);
        let mut up = Upstream {
            socket,
            fd,
            address,
            connected: false,
            dead: false,
            goaway: None,
            out: Vec::new(),
            out_at: 0,
            send_window: DEFAULT_WINDOW,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: frame::DEFAULT_MAX_FRAME_SIZE as usize,
            peer_max_streams: ASSUMED_MAX_STREAMS,
            input: Vec::new(),
            decoder: Decoder::new(DEFAULT_TABLE_SIZE, HeaderLimits::default()),
            assembler: Assembler::new(BlockLimits::default()),
            streams: Vec::new(),
            next_id: 1,
            next_handle: 0,
            conn_owed: 0,
            idle_since: now,
            pending_wake: false,
            scratch: Vec::new(),
        };
        up.out.extend_from_slice(frame::PREFACE);
        up.put(&Frame::Settings(Settings {
            enable_push: Some(false),
            ..Settings::default()
        }));
        Ok(up)
    }

    /// The socket's descriptor number (its backend token's).
    pub fn fd(&self) -> usize {
        self.fd
    }

    /// The connection is established (`Some(true)`), failed (`Some(false)`), or connecting.
    pub fn connect_state(&self) -> Option<bool> {
        if self.dead {
            Some(false)
        } else if self.connected {
            Some(true)
        } else {
            None
        }
    }

    /// Another stream may open on it.
    fn has_room(&self) -> bool {
        !self.dead
            && self.goaway.is_none()
            && self.streams.len() < self.peer_max_streams.min(MAX_STREAMS)
            && self.next_id <= MAX_STREAM_ID
    }

    /// A stream for the session with key `owner`: its handle.
    fn open_stream(&mut self, owner: usize) -> u32 {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        self.streams.push(Stream::new(handle, owner));
        handle
    }

    /// The stream its exchange calls `handle`.
    fn stream(&mut self, handle: u32) -> Option<&mut Stream> {
        self.streams.iter_mut().find(|s| s.handle == handle)
    }

    /// The stream with identifier `id` on the wire (never 0: the connection's).
    fn wire(&mut self, id: u32) -> Option<&mut Stream> {
        self.streams.iter_mut().find(|s| s.id == id && id != 0)
    }

    fn put(&mut self, frame: &Frame<'_>) {
        frame::append_frame(&mut self.out, frame);
    }

    fn fail(&mut self, why: &dyn std::fmt::Display) {
        if !self.dead {
            log::debug!("h2 backend {}: {why}", self.address);
        }
        self.dead = true;
        for s in &mut self.streams {
            s.stirred = true;
        }
    }

    /// Writes what waits for the socket; an error fails the connection.
    fn flush(&mut self) {
        if !self.connected || self.dead {
            return;
        }
        let was_full = self.out.len() - self.out_at >= OUT_CAP;
        while self.out_at < self.out.len() {
            let rest = self.out.get(self.out_at..).unwrap_or_default();
            match self.socket.write(rest) {
                Ok(0) => return self.fail(&"the socket takes no more"),
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.fail(&e),
            }
        }
        if self.out_at == self.out.len() {
            self.out.clear();
            self.out_at = 0;
        } else if self.out_at >= OUT_CAP {
            self.out.drain(..self.out_at);
            self.out_at = 0;
        }
        if was_full && self.out.len() - self.out_at < OUT_CAP {
            // Streams that could not write may now.
            for s in &mut self.streams {
                if s.req_blocked {
                    s.req_blocked = false;
                    s.wake_write = true;
                    s.stirred = true;
                }
            }
            self.pending_wake = true;
        }
    }

    /// Handles readiness of the socket: the connect's outcome, frames read and sorted to
    /// their streams, frames written. The owners of stirred streams are added to `wake`.
    fn event(&mut self, readable: bool, writable: bool, wake: &mut Vec<usize>) {
        if !self.connected && !self.dead && (readable || writable) {
            match self.socket.take_error() {
                Ok(None) => match self.socket.peer_addr() {
                    Ok(_) => {
                        self.connected = true;
                        for s in &mut self.streams {
                            s.stirred = true;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::NotConnected => {}
                    Err(e) => self.fail(&e),
                },
                Ok(Some(e)) | Err(e) => self.fail(&format!("connect: {e}")),
            }
        }
        if self.connected && !self.dead {
            if readable {
                if let Err(e) = self.take_input() {
                    self.fail(&e);
                }
            }
            self.frame_all();
            self.flush();
        }
        self.collect(wake);
    }

    /// The owners of the streams stirred since the last time.
    fn collect(&mut self, wake: &mut Vec<usize>) {
        self.pending_wake = false;
        for s in &mut self.streams {
            if std::mem::take(&mut s.stirred) {
                wake.push(s.owner);
            }
        }
    }

    /// Takes request bytes for stream `handle` from its exchange.
    pub fn write(&mut self, handle: u32, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let dead = self.dead;
        let out_full = self.out.len() - self.out_at >= OUT_CAP;
        let Some(s) = self.stream(handle) else {
            return Err(ErrorKind::BrokenPipe.into());
        };
        if s.refused {
            // Taken again on the connection it moves to.
            return Err(ErrorKind::WouldBlock.into());
        }
        if s.ended && (dead || s.peer_closed) {
            // The response is whole and the backend wants no more of the request (RFC 9113
            // §8.1): the rest is dropped, and the exchange goes on to give the response.
            s.req.clear();
            return Ok(bufs.iter().map(|b| b.len()).sum());
        }
        if dead || s.failed {
            return Err(ErrorKind::BrokenPipe.into());
        }
        let mut room = REQUEST_CAP.saturating_sub(s.req.len());
        if (room == 0 || out_full) && bufs.iter().any(|b| !b.is_empty()) {
            s.req_blocked = true;
            return Err(ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room);
            let taken = b.get(..take).unwrap_or_default();
            s.req.extend_from_slice(taken);
            if let Some(replay) = s.replay.as_mut() {
                if replay.len() + taken.len() <= REQUEST_CAP {
                    replay.extend_from_slice(taken);
                } else {
                    s.replay = None;
                }
            }
            n += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        self.frame_stream(handle);
        self.flush();
        Ok(n)
    }

    /// Frames what every stream's request buffer holds, as far as the windows allow.
    fn frame_all(&mut self) {
        let ids: Vec<u32> = self
            .streams
            .iter()
            .filter(|s| !s.refused && !s.failed && !s.peer_closed)
            .filter(|s| !s.req.is_empty() || (s.reader.done() && !s.end_sent))
            .map(|s| s.handle)
            .collect();
        for handle in ids {
            self.frame_stream(handle);
        }
    }

    /// Frames what stream `handle`'s request buffer holds, as far as the windows allow; a
    /// request that cannot be framed fails the stream.
    fn frame_stream(&mut self, handle: u32) {
        let Some(index) = self
            .streams
            .iter()
            .position(|s| s.handle == handle && !s.refused && !s.failed && !s.peer_closed)
        else {
            return;
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        let max_frame = self.peer_max_frame;
        let mut send_window = self.send_window;
        let mut next_id = self.next_id;
        let Some(s) = self.streams.get_mut(index) else {
            return;
        };
        let out = &mut self.out;
        let mut conn = Framing {
            block: &mut scratch,
            send_window: &mut send_window,
            next_id: &mut next_id,
            max_frame,
        };
        let result = frame_request(s, out, &mut conn);
        self.send_window = send_window;
        self.next_id = next_id;
        self.scratch = scratch;
        if result.is_err() {
            s.failed = true;
            s.stirred = true;
            self.pending_wake = true;
            if s.id != 0 {
                frame::append_frame(
                    &mut self.out,
                    &Frame::RstStream {
                        stream_id: s.id,
                        code: ErrorCode::InternalError,
                    },
                );
            }
        }
    }

    /// Gives stream `handle`'s exchange response bytes.
    pub fn read(&mut self, handle: u32, buf: &mut [u8]) -> io::Result<usize> {
        let dead = self.dead;
        let Some(s) = self.stream(handle) else {
            return Err(ErrorKind::ConnectionReset.into());
        };
        let rest = s.resp.get(s.resp_at..).unwrap_or_default();
        if !rest.is_empty() {
            let n = rest.len().min(buf.len());
            if let (Some(to), Some(from)) = (buf.get_mut(..n), rest.get(..n)) {
                to.copy_from_slice(from);
            }
            s.resp_at += n;
            if s.resp_at == s.resp.len() {
                s.resp.clear();
                s.resp_at = 0;
            }
            self.credit(handle, n);
            return Ok(n);
        }
        if s.ended {
            return Ok(0);
        }
        if s.refused {
            return Err(ErrorKind::WouldBlock.into());
        }
        if s.failed || dead {
            return Err(ErrorKind::ConnectionReset.into());
        }
        Err(ErrorKind::WouldBlock.into())
    }

    /// Gives the backend stream `handle`'s window back for what its exchange read.
    fn credit(&mut self, handle: u32, n: usize) {
        let Some(s) = self.stream(handle) else {
            return;
        };
        s.owed = s.owed.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        if s.owed < CREDIT_AT || s.ended {
            return;
        }
        let increment = std::mem::take(&mut s.owed);
        s.recv += i64::from(increment);
        let stream_id = s.id;
        self.put(&Frame::WindowUpdate {
            stream_id,
            increment,
        });
        self.flush();
    }

    /// Stream `handle`, refused by the backend unprocessed, leaves this connection: its
    /// request so far and how many times it moved, for a stream on another connection.
    pub fn take_refused(&mut self, handle: u32) -> Option<(Vec<u8>, u8)> {
        let s = self.stream(handle).filter(|s| s.refused)?;
        s.failed = true;
        Some((s.replay.take().unwrap_or_default(), s.moves + 1))
    }

    /// A new stream `handle` takes over a refused one's request (see [`take_refused`]).
    ///
    /// [`take_refused`]: Upstream::take_refused
    pub fn resume(&mut self, handle: u32, request: Vec<u8>, moves: u8) {
        let Some(s) = self.stream(handle) else {
            return;
        };
        s.moves = moves;
        s.req.extend_from_slice(&request);
        s.replay = Some(request);
        self.frame_stream(handle);
        self.flush();
    }

    /// After stream `handle`'s exchange was driven: writes what waits, and says whether the
    /// exchange may write again (its request buffer made room).
    pub fn after_drive(&mut self, handle: u32) -> bool {
        self.flush();
        self.stream(handle)
            .is_some_and(|s| std::mem::take(&mut s.wake_write))
    }

    /// Ends stream `handle` for its exchange: reset when it was opened on the wire and did
    /// not end both ways (a stream whose HEADERS never went out is not on the wire).
    fn close_stream(&mut self, handle: u32, now: Instant) {
        let Some(index) = self.streams.iter().position(|s| s.handle == handle) else {
            return;
        };
        let s = self.streams.swap_remove(index);
        let finished = s.ended && s.end_sent;
        if !(finished || s.failed || s.peer_closed || self.dead || s.id == 0) {
            self.put(&Frame::RstStream {
                stream_id: s.id,
                code: ErrorCode::Cancel,
            });
            self.flush();
        }
        if self.streams.is_empty() {
            self.idle_since = now;
        }
    }

    /// Reads and handles what the backend sent.
    fn take_input(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = match self.socket.read(&mut chunk) {
                Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "closed")),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.input
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
            let input = std::mem::take(&mut self.input);
            let mut at = 0;
            let result = loop {
                let rest = input.get(at..).unwrap_or_default();
                match frame::parse(rest, frame::DEFAULT_MAX_FRAME_SIZE) {
                    Ok(Parsed::Incomplete { .. }) => break Ok(()),
                    Ok(Parsed::Frame { frame, len }) => {
                        at += len;
                        if let Err(e) = self.on_frame(&frame) {
                            break Err(e);
                        }
                    }
                    Ok(Parsed::StreamError { len, .. }) => at += len,
                    Err(e) => break Err(io::Error::new(ErrorKind::InvalidData, e)),
                }
            };
            self.input = input;
            self.input.drain(..at);
            result?;
            if self.input.len() > INPUT_CAP {
                return Err(io::Error::new(ErrorKind::InvalidData, "a frame too long"));
            }
        }
    }

    fn on_frame(&mut self, frame: &Frame<'_>) -> io::Result<()> {
        let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, what.to_owned());
        if let Frame::Headers { .. } | Frame::Continuation { .. } = frame {
            let (end_stream, stream_id, list) = match self.assembler.push(frame) {
                Ok(Some(b)) => {
                    let kind = match self
                        .streams
                        .iter()
                        .find(|s| s.id == b.stream_id && s.id != 0)
                    {
                        Some(s) if s.head_done => BlockKind::Trailers,
                        _ => BlockKind::Response,
                    };
                    // Decoded even for a stream gone: the table must follow the backend's.
                    let list = self.decoder.decode(b.block, b.stream_id, kind);
                    (b.end_stream, b.stream_id, list)
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e)),
            };
            let list = list.map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
            if let Some(s) = self.wire(stream_id) {
                on_head(s, &list, end_stream);
                s.stirred = true;
            }
            return Ok(());
        }
        self.assembler
            .push(frame)
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        match *frame {
            Frame::Data {
                stream_id,
                data,
                end_stream,
                ..
            } => {
                let flow = frame.flow_controlled_len();
                // The connection's window back at once: the streams' windows bound what is held.
                self.conn_owed = self.conn_owed.saturating_add(flow);
                if self.conn_owed >= CREDIT_AT {
                    let increment = std::mem::take(&mut self.conn_owed);
                    self.put(&Frame::WindowUpdate {
                        stream_id: 0,
                        increment,
                    });
                }
                let Some(s) = self.wire(stream_id) else {
                    // A stream its exchange ended (and reset): dropped.
                    return Ok(());
                };
                if !s.head_done || s.ended {
                    return Err(bad("DATA out of place"));
                }
                s.recv -= i64::from(flow);
                if s.recv < 0 {
                    return Err(bad("DATA over the stream's window"));
                }
                let pad = flow as usize - data.len();
                if s.chunked && !data.is_empty() {
                    let _ = write!(s.resp, "{:x}\r\n", data.len());
                    s.resp.extend_from_slice(data);
                    s.resp.extend_from_slice(b"\r\n");
                } else {
                    s.resp.extend_from_slice(data);
                }
                s.owed = s.owed.saturating_add(pad as u32);
                if end_stream {
                    if s.chunked {
                        s.resp.extend_from_slice(b"0\r\n\r\n");
                    }
                    s.ended = true;
                }
                s.stirred = true;
                Ok(())
            }
            Frame::Settings(settings) => {
                if let Some(w) = settings.initial_window_size {
                    let delta = i64::from(w) - self.peer_initial_window;
                    self.peer_initial_window = i64::from(w);
                    for s in &mut self.streams {
                        s.window += delta;
                    }
                }
                if let Some(size) = settings.max_frame_size {
                    self.peer_max_frame = size as usize;
                }
                if let Some(n) = settings.max_concurrent_streams {
                    self.peer_max_streams = usize::try_from(n).unwrap_or(MAX_STREAMS);
                }
                self.put(&Frame::SettingsAck);
                Ok(())
            }
            Frame::Ping { ack: false, data } => {
                self.put(&Frame::Ping { ack: true, data });
                Ok(())
            }
            Frame::WindowUpdate {
                stream_id,
                increment,
            } => {
                if stream_id == 0 {
                    self.send_window += i64::from(increment);
                } else if let Some(s) = self.wire(stream_id) {
                    s.window += i64::from(increment);
                }
                Ok(())
            }
            Frame::RstStream { stream_id, code } => {
                if let Some(s) = self.wire(stream_id) {
                    // NO_ERROR after a whole response: the backend needs no more request.
                    if code == ErrorCode::RefusedStream {
                        refuse(s);
                    } else if code == ErrorCode::NoError && s.ended {
                        s.peer_closed = true;
                    } else {
                        log::debug!("h2 backend reset stream {stream_id}: {code:?}");
                        s.failed = true;
                    }
                    s.stirred = true;
                }
                Ok(())
            }
            Frame::GoAway {
                last_stream_id,
                code,
                ..
            } => {
                log::debug!(
                    "h2 backend {} goes away ({code:?}, last stream {last_stream_id})",
                    self.address
                );
                self.goaway = Some(last_stream_id);
                for s in &mut self.streams {
                    // Past its last stream, or not sent yet: never processed.
                    if (s.id == 0 || s.id > last_stream_id) && !s.ended {
                        refuse(s);
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The backend will not process stream `s` (RFC 9113 §8.7): it moves to another connection
/// when its whole request was kept and no response began, else it fails.
fn refuse(s: &mut Stream) {
    if s.replay.is_some() && !s.head_done && s.resp.is_empty() && s.moves < MAX_MOVES {
        s.refused = true;
    } else {
        s.failed = true;
    }
    s.stirred = true;
}

/// What framing a stream's request takes from its connection.
struct Framing<'a> {
    /// Scratch for a header block.
    block: &'a mut Vec<u8>,
    send_window: &'a mut i64,
    /// The identifier the next stream opened on the wire gets.
    next_id: &'a mut u32,
    max_frame: usize,
}

/// Frames what stream `s`'s request buffer holds into `out`, as far as the windows allow.
fn frame_request(
    s: &mut Stream,
    out: &mut Vec<u8>,
    conn: &mut Framing<'_>,
) -> Result<(), response::Bad> {
    let Framing {
        block,
        send_window,
        next_id,
        max_frame,
    } = conn;
    let max_frame = *max_frame;
    let mut at = 0;
    loop {
        let window = (**send_window).min(s.window).max(0);
        let max = usize::try_from(window).unwrap_or(0).min(max_frame);
        let Some(piece) = s.reader.next(&s.req, &mut at, max, false)? else {
            break;
        };
        let end = s.reader.done();
        match piece {
            Piece::Head { line, fields, .. } => {
                if **next_id > MAX_STREAM_ID {
                    return Err(response::Bad);
                }
                s.id = **next_id;
                **next_id += 2;
                let (method, target) = response::request_line(s.req.get(line).unwrap_or_default());
                let lines = s.req.get(fields).unwrap_or_default();
                let host = response::fields(lines)
                    .find(|(n, _)| n.eq_ignore_ascii_case(b"host"))
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                block.clear();
                let mut add = |name: &[u8], value: &[u8]| {
                    hpack::append_field(block, name, value);
                };
                add(b":method", method);
                add(b":scheme", b"http");
                add(b":authority", host);
                add(b":path", target);
                for (name, value) in response::fields(lines) {
                    if response::connection_specific(name) || name.eq_ignore_ascii_case(b"host") {
                        continue;
                    }
                    add(name, value);
                }
                // gRPC servers want it, and trailers are what HTTP/2 is for here.
                add(b"te", b"trailers");
                frame::append_header_block(out, s.id, block, end, max_frame);
            }
            Piece::Data(range) => {
                let data = s.req.get(range).unwrap_or_default();
                frame::append_data(out, s.id, data, end);
                **send_window -= data.len() as i64;
                s.window -= data.len() as i64;
            }
            Piece::Trailers(range) => {
                let lines = s.req.get(range).unwrap_or_default();
                block.clear();
                for (name, value) in response::fields(lines) {
                    hpack::append_field(block, name, value);
                }
                frame::append_header_block(out, s.id, block, true, max_frame);
            }
        }
        if end {
            s.end_sent = true;
        }
    }
    s.req.drain(..at);
    if s.reader.done() && !s.end_sent {
        frame::append_data(out, s.id, &[], true);
        s.end_sent = true;
    }
    if s.req_blocked && s.req.len() < REQUEST_CAP {
        s.req_blocked = false;
        s.wake_write = true;
        s.stirred = true;
    }
    Ok(())
}

/// A response head (interim or final) or trailers, written for stream `s`'s exchange.
fn on_head(s: &mut Stream, list: &super::fields::HeaderList, end_stream: bool) {
    if s.head_done {
        // Trailers.
        if s.chunked {
            s.resp.extend_from_slice(b"0\r\n");
            for (name, value) in list.fields() {
                field(&mut s.resp, name, value);
            }
            s.resp.extend_from_slice(b"\r\n");
        }
        s.ended = true;
        return;
    }
    s.replay = None;
    let status = list.status().unwrap_or(502);
    let _ = write!(s.resp, "HTTP/1.1 {status} {}\r\n", reason(status));
    let length = list.get(b"content-length").is_some();
    let interim = (100..200).contains(&status);
    for (name, value) in list.fields() {
        field(&mut s.resp, name, value);
    }
    if !interim && !end_stream && !length {
        s.resp.extend_from_slice(b"transfer-encoding: chunked\r\n");
        s.chunked = true;
    }
    if !interim && end_stream && !length && status != 204 && status != 304 {
        s.resp.extend_from_slice(b"content-length: 0\r\n");
    }
    s.resp.extend_from_slice(b"\r\n");
    if !interim {
        s.head_done = true;
        s.ended = end_stream;
    }
}

/// The HTTP/2 connections to backends of one worker, by address and by descriptor.
pub struct Upstreams {
    by_fd: HashMap<usize, Shared>,
    /// The open ones that may take streams, by backend address.
    by_addr: HashMap<SocketAddr, Vec<Shared>>,
    max_idle: Duration,
}

impl Upstreams {
    /// A connection without streams is closed after `max_idle`.
    pub fn new(max_idle: Duration) -> Upstreams {
        Upstreams {
            by_fd: HashMap::new(),
            by_addr: HashMap::new(),
            max_idle,
        }
    }

    /// A stream to `address` for the session with key `owner`: on an open connection with
    /// room, else on a new one. Returns the connection, the stream's id, and whether the
    /// connection was already open.
    pub fn open(
        &mut self,
        address: SocketAddr,
        owner: usize,
        registry: &Registry,
        now: Instant,
    ) -> io::Result<(Shared, u32, bool)> {
        let open = self.by_addr.entry(address).or_default();
        open.retain(|up| {
            let up = up.borrow();
            !up.dead && up.goaway.is_none()
        });
        if let Some(up) = open.iter().find(|up| up.borrow().has_room()) {
            let handle = up.borrow_mut().open_stream(owner);
            return Ok((Rc::clone(up), handle, true));
        }
        let up = Rc::new(RefCell::new(Upstream::connect(address, registry, now)?));
        let handle = up.borrow_mut().open_stream(owner);
        let fd = up.borrow().fd;
        open.push(Rc::clone(&up));
        self.by_fd.insert(fd, Rc::clone(&up));
        Ok((up, handle, false))
    }

    /// An event for the backend socket with descriptor number `fd`: false when it is no
    /// HTTP/2 connection's; else handled, and the sessions to drive are added to `wake`.
    pub fn event(
        &mut self,
        fd: usize,
        readable: bool,
        writable: bool,
        wake: &mut Vec<usize>,
    ) -> bool {
        let Some(up) = self.by_fd.get(&fd) else {
            return false;
        };
        let mut up = up.borrow_mut();
        up.event(readable, writable, wake);
        let gone = up.dead && up.streams.is_empty();
        drop(up);
        if gone {
            self.remove(fd);
        }
        true
    }

    /// The sessions whose streams were stirred outside an event (a write that made room for
    /// others, a stream that failed), with the descriptor of their connection.
    pub fn woken(&mut self, wake: &mut Vec<(usize, usize)>) {
        let mut keys = Vec::new();
        for (fd, up) in &self.by_fd {
            let mut up = up.borrow_mut();
            if up.pending_wake {
                keys.clear();
                up.collect(&mut keys);
                wake.extend(keys.iter().map(|&k| (k, *fd)));
            }
        }
    }

    /// Stream `id` of `up` is done with (its exchange ended or gave it up).
    pub fn release(&mut self, up: &Shared, id: u32, now: Instant) {
        let mut u = up.borrow_mut();
        u.close_stream(id, now);
        let gone = (u.dead || u.goaway.is_some()) && u.streams.is_empty();
        let fd = u.fd;
        drop(u);
        if gone {
            self.remove(fd);
        }
    }

    fn remove(&mut self, fd: usize) {
        if let Some(up) = self.by_fd.remove(&fd) {
            let address = up.borrow().address;
            if let Some(open) = self.by_addr.get_mut(&address) {
                open.retain(|u| !Rc::ptr_eq(u, &up));
                if open.is_empty() {
                    self.by_addr.remove(&address);
                }
            }
        }
    }

    /// Closes the connections without streams idle past the pool's time, or dead.
    pub fn prune(&mut self, now: Instant) {
        let max_idle = self.max_idle;
        let gone: Vec<usize> = self
            .by_fd
            .iter()
            .filter(|(_, up)| {
                let up = up.borrow();
                up.streams.is_empty()
                    && (up.dead
                        || up.goaway.is_some()
                        || now.saturating_duration_since(up.idle_since) >= max_idle)
            })
            .map(|(fd, _)| *fd)
            .collect();
        for fd in gone {
            self.remove(fd);
        }
    }

    /// Connections open (for tests and metrics).
    pub fn len(&self) -> usize {
        self.by_fd.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_fd.is_empty()
    }
}

/// The reason phrase of an HTTP/1.1 status line (HTTP/2 has none).
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}
