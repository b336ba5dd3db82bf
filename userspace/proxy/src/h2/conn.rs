//! One HTTP/2 client connection: frames in and out of the client socket, the streams, flow
//! control, SETTINGS, PING and GOAWAY, and each stream served by one HTTP/1.1 exchange.
//!
//! A session (`session.rs`) hands its connection over here when the client starts with the
//! HTTP/2 preface (cleartext, prior knowledge) or chose `h2` by ALPN. The socket, its token
//! and its registration stay the session's; this holds what HTTP/2 adds:
//!
//! - the bytes read and not yet parsed (at most one frame of kakehi's SETTINGS_MAX_FRAME_SIZE
//!   plus what one read brings), and the frames not yet written (filled only while under
//!   `WRITE_HIGH`);
//! - the HPACK decoder and the header-block assembler (`hpack.rs`, `block.rs`, with their
//!   limits); responses are encoded without the dynamic table, so the encoder has no state;
//! - up to the listener's `h2.max_concurrent_streams` streams (`lb_config::H2Limits`). Each has an [`Exchange`] (the very machine of HTTP/1.1,
//!   with its two pool buffers), wires of its own (its backend connection, registered under
//!   its own token whose events come to this session and are matched by descriptor), and a
//!   [`StreamWire`] that gives the exchange the request as HTTP/1.1 bytes and takes its
//!   response back. A stream that cannot get buffers from the pool is refused
//!   (REFUSED_STREAM): the pool's bound is the worker's.
//!
//! Flow control ties memory to the windows: kakehi grants a stream's window back only as its
//! exchange reads the body (so a stream buffers at most its window), and the connection's
//! window (the listener's `h2.connection_window`) bounds all streams together. Responses wait for the
//! client's windows in the stream's wire ([`super::stream::OUTPUT_CAP`]); past that the
//! exchange stops reading its backend.

use super::block::{Assembler, BlockLimits};
use super::error::{ErrorCode, H2Error, Scope};
use super::fields::{BlockKind, HeaderLimits, HeaderList};
use super::frame::{self, Frame, Parsed, Settings};
use super::hpack::{self, Decoder, DEFAULT_TABLE_SIZE};
use super::request::{self, Framing};
use super::response::{self, Piece, ResponseReader};
use super::stream::StreamWire;
use crate::balancer::ClusterState;
use crate::cx::Cx;
use crate::http::exchange::{Exchange, Flow, FrontWire, Side, State};
use crate::http::Peer;
use crate::session::{Real, Wires};
use lb_config::H2Limits;
use std::io::ErrorKind;
use std::time::Instant;

/// The default initial window of RFC 9113 §6.9.2.
const DEFAULT_WINDOW: i64 = 65_535;
/// Frames kakehi queues for the socket before it stops making more.
const WRITE_HIGH: usize = 64 * 1024;
/// Bytes read from the client and not yet parsed, at most: a whole frame of the size kakehi
/// accepts fits with room to spare.
const READ_CAP: usize = 2 * (frame::DEFAULT_MAX_FRAME_SIZE as usize + frame::HEADER_LEN);
/// A stream's granted window is given back once fewer request bytes than this wait for its
/// exchange.
const CREDIT_BELOW: usize = 16 * 1024;
/// How long a connection with no stream keeps its buffers and spare exchanges.
const PARK_AFTER: std::time::Duration = crate::session::PARK_AFTER;
/// Finished streams' exchanges a connection keeps for its next streams.
const SPARES: usize = 8;
/// The PING that follows a drain's first GOAWAY (RFC 9113 §6.8).
const DRAIN_PING: [u8; 8] = *b"kakehi-d";
/// How long the final GOAWAY waits for that PING's answer.
const DRAIN_PING_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a connection ended by an error keeps reading before it is closed.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// Rounds of reading, serving and writing one `drive` makes before yielding.
const MAX_ROUNDS: usize = 16;

/// A token bucket: what a client may do that costs kakehi work and brings it nothing, per
/// connection, so many at once and so many more each second (the listener's `h2` rates).
/// Past it the connection ends with GOAWAY ENHANCE_YOUR_CALM. Rapid Reset (CVE-2023-44487)
/// is streams opened and reset at once; MadeYouReset (CVE-2025-8671) is frames that make
/// kakehi reset streams itself; the others are the floods of RFC 9113 §10.5.
#[derive(Debug, Clone, Copy)]
struct Budget {
    left: u32,
    burst: u32,
    per_sec: u32,
    since: Instant,
}

impl Budget {
    fn new(rate: lb_config::Rate, now: Instant) -> Budget {
        Budget {
            left: rate.burst,
            burst: rate.burst,
            per_sec: rate.per_second,
            since: now,
        }
    }

    /// Takes one token; false when none is left.
    fn spend(&mut self, now: Instant) -> bool {
        let ms = now.saturating_duration_since(self.since).as_millis();
        let refill = ms.saturating_mul(u128::from(self.per_sec)) / 1000;
        if refill > 0 {
            let refill = u32::try_from(refill).unwrap_or(u32::MAX);
            self.left = self.left.saturating_add(refill).min(self.burst);
            self.since = now;
        }
        match self.left.checked_sub(1) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }
}

/// The connection's budgets (the listener's `h2` rates, [`lb_config::H2Limits`]).
struct Budgets {
    client_resets: Budget,
    own_resets: Budget,
    pings: Budget,
    settings: Budget,
    noise: Budget,
    window_updates: Budget,
}

struct Stream {
    id: u32,
    wires: Wires<StreamWire>,
    exchange: Exchange,
    framing: Framing,
    /// Body bytes still due under a declared content-length.
    declared_left: u64,
    /// END_STREAM (or a reset) came from the client.
    request_ended: bool,
    /// What kakehi may still send on the stream.
    send_window: i64,
    /// What the client may still send on the stream.
    recv_window: i64,
    /// Flow-controlled bytes received and not yet granted back.
    owed: u32,
    reader: ResponseReader,
    end_sent: bool,
    /// The exchange ended (closed its side).
    exchange_done: bool,
    /// Response bytes framed so far.
    sent: u64,
    /// Since when response bytes wait for the client (its windows, or its socket), and what
    /// `sent` was then: a stream that does not get [`STALL_PROGRESS`] more bytes out within
    /// the client's idle timeout is reset, however many frames keep coming (a 1-byte
    /// WINDOW_UPDATE drip does not keep it).
    stall: Option<(Instant, u64)>,
}

/// How a stream closed (see [`H2Conn::remember`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    /// kakehi sent RST_STREAM.
    ByKakehi,
    /// The client sent RST_STREAM.
    ByClient,
    /// Both ends sent END_STREAM.
    Ended,
}

/// Closed streams remembered, the most recent ones.
const REMEMBERED_CLOSED: usize = 64;

/// What a stalled stream must send to be counted as moving again.
const STALL_PROGRESS: u64 = 16 * 1024;

/// What went wrong with the connection: the GOAWAY to send, then close.
struct Failed(ErrorCode);

impl From<H2Error> for Failed {
    fn from(e: H2Error) -> Failed {
        Failed(e.code)
    }
}

pub struct H2Conn {
    peer: Peer,
    /// Bytes read from the client: the first `filled` are not parsed yet. Sized once (to
    /// [`READ_CAP`], or more for what the session read before HTTP/2), not per read.
    read: Vec<u8>,
    filled: usize,
    write: Vec<u8>,
    written: usize,
    preface: bool,
    /// The client's first SETTINGS came.
    settings_seen: bool,
    decoder: Decoder,
    assembler: Assembler,
    streams: Vec<Stream>,
    /// The highest stream id the client opened (or tried to).
    last_stream: u32,
    send_window: i64,
    recv_window: i64,
    /// Connection window to grant back.
    conn_owed: u32,
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// GOAWAY was sent with this last stream id: no stream above it is served.
    goaway: Option<u32>,
    /// Exchanges (with their two pool buffers) and wires of finished streams, ready for the
    /// next ones: a busy connection does not allocate an exchange per request. Given back
    /// when the connection goes idle.
    spare: Vec<(Exchange, StreamWire)>,
    /// The connection's verified client certificate, given to every stream's exchange.
    pub client_cert: Option<std::sync::Arc<crate::tls::ClientCert>>,
    /// Idle past [`PARK_AFTER`], its buffers given back.
    parked: bool,
    /// Streams whose response went out whole.
    served: u32,
    /// SETTINGS_MAX_CONCURRENT_STREAMS as advertised.
    max_streams: usize,
    /// A drain began: GOAWAY(2^31-1) and this PING went out at that time; the final GOAWAY
    /// follows its answer (or [`DRAIN_PING_WAIT`]), so that requests in flight meanwhile are
    /// served rather than refused (RFC 9113 §6.8).
    drain_ping: Option<Instant>,
    /// The client sent GOAWAY: it opens no more streams.
    peer_goaway: bool,
    /// The client closed its side.
    eof: bool,
    /// No stream since then.
    idle_since: Instant,
    yielded: bool,
    scratch: Vec<u8>,
    budgets: Budgets,
    /// The streams closed last, and how (see [`Closed`]).
    closed: std::collections::VecDeque<(u32, Closed)>,
    /// After a connection error: GOAWAY sent, the write side shut, reading until then.
    linger_until: Option<Instant>,
    /// While lingering: the queued frames (the GOAWAY last) are written and FIN sent.
    write_shut: bool,
    /// A budget ran out where no error could be returned: end the connection.
    calm: bool,
    /// The time of this turn (for the budgets).
    now: Instant,
}

impl H2Conn {
    /// A connection of a listener with `limits`.
    pub fn new(peer: Peer, limits: H2Limits, cx: &Cx) -> H2Conn {
        let header_limits = HeaderLimits {
            max_list_size: limits.max_header_list_size,
            ..HeaderLimits::default()
        };
        let mut conn = H2Conn {
            peer,
            read: Vec::new(),
            client_cert: None,
            filled: 0,
            write: Vec::new(),
            written: 0,
            preface: false,
            settings_seen: false,
            decoder: Decoder::new(DEFAULT_TABLE_SIZE, header_limits),
            assembler: Assembler::new(BlockLimits::default()),
            streams: Vec::new(),
            last_stream: 0,
            send_window: DEFAULT_WINDOW,
            recv_window: i64::from(limits.connection_window),
            max_streams: limits.max_concurrent_streams as usize,
            spare: Vec::new(),
            parked: false,
            served: 0,
            drain_ping: None,
            conn_owed: 0,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: frame::DEFAULT_MAX_FRAME_SIZE as usize,
            goaway: None,
            peer_goaway: false,
            eof: false,
            idle_since: cx.now,
            yielded: false,
            scratch: Vec::new(),
            budgets: Budgets {
                client_resets: Budget::new(limits.client_resets, cx.now),
                own_resets: Budget::new(limits.own_resets, cx.now),
                pings: Budget::new(limits.pings, cx.now),
                settings: Budget::new(limits.settings, cx.now),
                noise: Budget::new(limits.noise, cx.now),
                window_updates: Budget::new(limits.window_updates, cx.now),
            },
            calm: false,
            linger_until: None,
            write_shut: false,
            closed: std::collections::VecDeque::new(),
            now: cx.now,
        };
        let settings = Settings {
            max_concurrent_streams: Some(limits.max_concurrent_streams),
            max_header_list_size: Some(limits.max_header_list_size),
            ..Settings::default()
        };
        conn.put(&Frame::Settings(settings));
        let more = limits
            .connection_window
            .saturating_sub(DEFAULT_WINDOW as u32);
        if more > 0 {
            conn.put(&Frame::WindowUpdate {
                stream_id: 0,
                increment: more,
            });
        }
        conn
    }

    /// The bytes the session read before it knew the connection speaks HTTP/2.
    pub fn take_input(&mut self, bytes: &[u8]) {
        self.read.truncate(self.filled);
        self.read.extend_from_slice(bytes);
        self.filled = self.read.len();
    }

    pub fn yielded(&self) -> bool {
        self.yielded
    }

    /// No stream open and nothing received unparsed: a draining worker may close it.
    pub fn idle_since(&self) -> Option<Instant> {
        (self.streams.is_empty() && self.filled == 0).then_some(self.idle_since)
    }

    pub fn back_event(&mut self, fd: usize, readable: bool, writable: bool, read_closed: bool) {
        // Several streams may share one HTTP/2 backend connection: each is told.
        for s in &mut self.streams {
            s.wires.back_event(fd, readable, writable, read_closed);
        }
    }

    pub fn remap_clusters(&mut self, old: &[ClusterState], new: &[ClusterState]) {
        for s in &mut self.streams {
            s.exchange
                .remap_cluster(|c| crate::balancer::remap_cluster(old, new, c));
            s.wires.remap_clusters(old, new);
        }
    }

    /// Ends every stream and gives their buffers and backend connections back.
    pub fn close(mut self, cx: &mut Cx) {
        self.drop_spares(cx);
        for s in self.streams {
            release(s, cx);
        }
    }

    /// The earliest deadline: a stream's exchange, or the idle connection's.
    pub fn deadline(&self, cx: &Cx) -> Instant {
        if let Some(until) = self.linger_until {
            return until;
        }
        if let (Some(since), None) = (self.drain_ping, self.goaway) {
            return since + DRAIN_PING_WAIT;
        }
        let idle = if cx.draining {
            cx.timeouts.front_idle.min(crate::worker::DRAIN_IDLE_GRACE)
        } else {
            cx.timeouts.front_idle
        };
        let mut at = if self.streams.is_empty() && !self.parked {
            (self.idle_since + idle).min(self.idle_since + PARK_AFTER)
        } else if self.streams.is_empty() {
            self.idle_since + idle
        } else {
            self.idle_since + cx.timeouts.front_idle.max(cx.timeouts.back_idle)
        };
        for s in &self.streams {
            if !s.exchange_done {
                at = at.min(s.exchange.deadline(&cx.timeouts, false, cx.draining));
            }
            if let Some((since, _)) = s.stall {
                at = at.min(since + cx.timeouts.front_idle);
            }
        }
        at
    }

    /// Time ran out: for the streams whose deadline passed, or for an idle connection.
    pub(crate) fn timeout<F: FrontWire>(&mut self, wires: &mut Wires<F>, cx: &mut Cx) -> Flow {
        let now = cx.now;
        self.now = now;
        if self.linger_until.is_some_and(|until| until <= now) {
            return Flow::Close;
        }
        if self.park_due(now) && self.linger_until.is_none() {
            self.park(cx);
            if self.deadline(cx) > now {
                return Flow::Continue;
            }
        }
        let peer = self.peer;
        let stalled: Vec<u32> = self
            .streams
            .iter()
            .filter(|s| {
                s.stall
                    .is_some_and(|(t, _)| t + cx.timeouts.front_idle <= now)
            })
            .map(|s| s.id)
            .collect();
        for id in stalled {
            self.reset_stream(id, ErrorCode::Cancel, cx);
        }
        for s in &mut self.streams {
            if s.exchange_done || s.exchange.deadline(&cx.timeouts, false, cx.draining) > now {
                continue;
            }
            let flow = s.exchange.timeout(&mut Real {
                wires: &mut s.wires,
                peer,
                cx,
            });
            if flow == Flow::Close {
                s.exchange_done = true;
                s.wires.front.output_closed = true;
            }
        }
        if self.streams.is_empty() && self.deadline(cx) <= now {
            self.send_goaway(ErrorCode::NoError);
            let _ = self.flush(wires);
            return Flow::Close;
        }
        self.drive(wires, cx)
    }

    /// Reads, serves and writes as far as the sockets allow.
    pub(crate) fn drive<F: FrontWire>(&mut self, wires: &mut Wires<F>, cx: &mut Cx) -> Flow {
        self.yielded = true;
        self.now = cx.now;
        if self.linger_until.is_some() {
            self.yielded = false;
            return self.linger(wires);
        }
        if cx.draining && self.goaway.is_none() && self.drain_ping.is_none() {
            self.put(&Frame::GoAway {
                last_stream_id: frame::MAX_WINDOW_SIZE,
                code: ErrorCode::NoError,
                debug: &[],
            });
            self.put(&Frame::Ping {
                ack: false,
                data: DRAIN_PING,
            });
            self.drain_ping = Some(cx.now);
        }
        for _ in 0..MAX_ROUNDS {
            if !self.flush(wires) {
                return Flow::Close;
            }
            let mut progress = self.read_front(wires);
            match self.parse_frames(wires.key(), wires.listener(), cx) {
                Ok(p) => progress |= p,
                Err(Failed(code)) => {
                    self.send_goaway(code);
                    for s in std::mem::take(&mut self.streams) {
                        release(s, cx);
                    }
                    if !self.flush(wires) {
                        return Flow::Close;
                    }
                    // FIN after the GOAWAY (in `linger`, once it is written), then read what
                    // the client still sends for a moment: closing with unread bytes would
                    // reset the connection, and the reset could destroy the GOAWAY before the
                    // client reads it.
                    self.linger_until = Some(cx.now + LINGER);
                    return self.linger(wires);
                }
            }
            // No answer to the drain's PING in time: the final GOAWAY, once what the client
            // sent before it was read (those streams are served, not refused).
            if self.goaway.is_none()
                && self
                    .drain_ping
                    .is_some_and(|since| cx.now >= since + DRAIN_PING_WAIT)
            {
                self.send_goaway(ErrorCode::NoError);
            }
            progress |= self.serve_streams(cx);
            progress |= self.frame_responses(cx);
            self.grant_windows();
            if !self.flush(wires) {
                return Flow::Close;
            }
            if self.eof {
                // The client cannot read what its streams would get: closing the session ends
                // them (`close`).
                return Flow::Close;
            }
            if self.goaway.is_some() && self.streams.is_empty() {
                // FIN once the GOAWAY is out, then read what still comes for a moment, as
                // after an error: a close with unread bytes could reset the GOAWAY away.
                self.linger_until = Some(cx.now + LINGER);
                return self.linger(wires);
            }
            if !progress {
                if self.streams.is_empty() {
                    // No stream left: the spare exchanges' buffers go back to the pool at
                    // once (other connections' streams may need them); the exchanges keep
                    // their allocations until the connection parks.
                    for (exchange, _) in &mut self.spare {
                        if !exchange.parked() {
                            let (front, back) = exchange.lend_buffers();
                            cx.pool.checkin(front);
                            cx.pool.checkin(back);
                        }
                    }
                }
                // A stream whose exchange ended keeps the stale mark of its last drive.
                self.yielded = self
                    .streams
                    .iter()
                    .any(|s| !s.exchange_done && s.exchange.yielded());
                return Flow::Continue;
            }
        }
        Flow::Continue
    }

    /// After a connection error: reads and drops what comes until the client closes.
    fn linger<F: FrontWire>(&mut self, wires: &mut Wires<F>) -> Flow {
        if !self.write_shut {
            if !self.flush(wires) {
                return Flow::Close;
            }
            if self.pending_write() == 0 {
                wires.front.shutdown_write();
                self.write_shut = true;
            }
        }
        let side = &mut wires.front_side;
        let mut scratch = [0u8; 4096];
        while side.readable {
            match wires.front.discard(&mut scratch) {
                Ok(0) => return Flow::Close,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => side.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Flow::Close,
            }
        }
        Flow::Continue
    }

    fn pending_write(&self) -> usize {
        self.write.len() - self.written
    }

    // ---- the client socket ---------------------------------------------------------------

    /// Writes what is queued; false when the connection failed.
    fn flush<F: FrontWire>(&mut self, wires: &mut Wires<F>) -> bool {
        let (front, side) = (&mut wires.front, &mut wires.front_side);
        while self.written < self.write.len() {
            if !side.writable {
                return true;
            }
            let rest = self.write.get(self.written..).unwrap_or_default();
            match front.write(rest) {
                Ok(0) => return false,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    side.writable = false;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.written == self.write.len() {
            self.write.clear();
            self.written = 0;
            if self.write.capacity() > 4 * WRITE_HIGH {
                self.write = Vec::new();
            }
        }
        if side.writable && front.has_pending() {
            match front.flush_pending() {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => side.writable = false,
                Err(_) => return false,
            }
        }
        true
    }

    /// Reads what the client sent, as far as the read buffer has room; true when bytes came.
    fn read_front<F: FrontWire>(&mut self, wires: &mut Wires<F>) -> bool {
        let side: &mut Side = &mut wires.front_side;
        let mut progress = false;
        if self.read.len() < READ_CAP {
            self.read.resize(READ_CAP, 0);
        }
        while side.readable && !self.eof && self.filled < self.read.len() {
            let room = self.read.len() - self.filled;
            let got = match self.read.get_mut(self.filled..) {
                Some(space) => wires.front.read(space),
                None => Ok(0),
            };
            match got {
                Ok(0) => {
                    self.eof = true;
                    progress = true;
                }
                Ok(n) => {
                    self.filled += n;
                    progress = true;
                    if n < room && !side.hup {
                        side.readable = false;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => side.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.eof = true;
                    progress = true;
                }
            }
        }
        progress
    }

    // ---- frames in -----------------------------------------------------------------------

    /// Handles every whole frame read; true when one was.
    fn parse_frames(&mut self, key: usize, listener: usize, cx: &mut Cx) -> Result<bool, Failed> {
        let input = std::mem::take(&mut self.read);
        let result = self.parse_from(
            input.get(..self.filled).unwrap_or_default(),
            key,
            listener,
            cx,
        );
        self.read = input;
        let used = result?;
        self.read.copy_within(used..self.filled, 0);
        self.filled -= used;
        Ok(used > 0)
    }

    fn parse_from(
        &mut self,
        input: &[u8],
        key: usize,
        listener: usize,
        cx: &mut Cx,
    ) -> Result<usize, Failed> {
        let mut at = 0;
        if !self.preface {
            match frame::check_preface(input)? {
                frame::Preface::Incomplete { .. } => return Ok(0),
                frame::Preface::Complete => {
                    self.preface = true;
                    at = frame::PREFACE.len();
                }
            }
        }
        loop {
            let rest = input.get(at..).unwrap_or_default();
            match frame::parse(rest, frame::DEFAULT_MAX_FRAME_SIZE)? {
                Parsed::Incomplete { .. } => return Ok(at),
                Parsed::Frame { frame, len } => {
                    at += len;
                    self.on_frame(&frame, key, listener, cx)?;
                    if self.calm {
                        return Err(Failed(ErrorCode::EnhanceYourCalm));
                    }
                }
                Parsed::StreamError { error, kind, len } => {
                    at += len;
                    if !self.settings_seen {
                        return Err(Failed(ErrorCode::ProtocolError));
                    }
                    self.assembler.skipped(kind, stream_of(&error))?;
                    self.reset_stream(stream_of(&error), error.code, cx);
                    if self.calm {
                        return Err(Failed(ErrorCode::EnhanceYourCalm));
                    }
                }
            }
        }
    }

    fn on_frame(
        &mut self,
        frame: &Frame<'_>,
        key: usize,
        listener: usize,
        cx: &mut Cx,
    ) -> Result<(), Failed> {
        if !self.settings_seen {
            // The preface's SETTINGS comes first (RFC 9113 §3.4).
            if !matches!(frame, Frame::Settings(_)) {
                return Err(Failed(ErrorCode::ProtocolError));
            }
            self.settings_seen = true;
        }
        if let Frame::Headers { .. } | Frame::Continuation { .. } = frame {
            let (meta, decoded) = match self.assembler.push(frame)? {
                None => return Ok(()),
                Some(b) => {
                    // Decode whatever happens next: the compression context must follow
                    // the client's.
                    let kind = if self.streams.iter().any(|s| s.id == b.stream_id) {
                        BlockKind::Trailers
                    } else {
                        BlockKind::Request
                    };
                    let decoded = self.decoder.decode(b.block, b.stream_id, kind);
                    ((b.stream_id, b.end_stream, b.check_priority()), decoded)
                }
            };
            return self.on_header_block(meta, decoded, key, listener, cx);
        }
        // Any other frame inside an open block is a connection error.
        self.assembler.push(frame)?;
        let now = self.now;
        let in_flight = |id: u32| self.streams.iter().any(|s| s.id == id);
        let b = &mut self.budgets;
        let within = match *frame {
            Frame::Ping { ack: false, .. } => b.pings.spend(now),
            Frame::Settings(_) => b.settings.spend(now),
            Frame::Priority { .. } | Frame::Unknown { .. } => b.noise.spend(now),
            Frame::Data {
                data, end_stream, ..
            } if data.is_empty() && !end_stream => b.noise.spend(now),
            Frame::WindowUpdate { .. } => b.window_updates.spend(now),
            Frame::RstStream { stream_id, .. } if in_flight(stream_id) => {
                b.client_resets.spend(now)
            }
            _ => true,
        };
        if !within {
            return Err(Failed(ErrorCode::EnhanceYourCalm));
        }
        match *frame {
            Frame::Data {
                stream_id,
                data,
                end_stream,
                ..
            } => self.on_data(stream_id, data, end_stream, frame.flow_controlled_len(), cx),
            Frame::Settings(s) => self.on_settings(&s),
            Frame::SettingsAck | Frame::Priority { .. } | Frame::Unknown { .. } => Ok(()),
            Frame::Ping { ack, data } => {
                if !ack {
                    self.put(&Frame::Ping { ack: true, data });
                } else if data == DRAIN_PING && self.drain_ping.is_some() {
                    // A round trip since the first GOAWAY: what the client sent before it
                    // learnt of the drain has arrived.
                    self.send_goaway(ErrorCode::NoError);
                }
                Ok(())
            }
            Frame::GoAway { .. } => {
                self.peer_goaway = true;
                Ok(())
            }
            Frame::WindowUpdate {
                stream_id,
                increment,
            } => self.on_window_update(stream_id, increment, cx),
            Frame::RstStream { stream_id, .. } => {
                if stream_id > self.last_stream {
                    return Err(Failed(ErrorCode::ProtocolError));
                }
                if let Some(i) = self.index(stream_id) {
                    let s = self.streams.swap_remove(i);
                    self.remember(stream_id, Closed::ByClient);
                    release(s, cx);
                }
                Ok(())
            }
            Frame::Headers { .. } | Frame::Continuation { .. } => Ok(()),
        }
    }

    fn index(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    /// A whole header block for `stream_id`, encoded in the assembler's buffer.
    fn on_header_block(
        &mut self,
        (stream_id, end_stream, priority): (u32, bool, Result<(), H2Error>),
        decoded: Result<HeaderList, H2Error>,
        key: usize,
        listener: usize,
        cx: &mut Cx,
    ) -> Result<(), Failed> {
        if stream_id % 2 == 0 {
            return Err(Failed(ErrorCode::ProtocolError));
        }
        let existing = self.index(stream_id);
        let list = match decoded {
            Err(e) if e.is_connection() => return Err(e.into()),
            other => other,
        };
        if let Some(i) = existing {
            let Some(s) = self.streams.get_mut(i) else {
                return Ok(());
            };
            if s.request_ended {
                self.reset_stream(stream_id, ErrorCode::StreamClosed, cx);
                return Ok(());
            }
            let list = match list {
                Ok(l) if end_stream => l,
                Ok(_) => {
                    self.reset_stream(stream_id, ErrorCode::ProtocolError, cx);
                    return Ok(());
                }
                Err(e) => {
                    self.reset_stream(stream_id, e.code, cx);
                    return Ok(());
                }
            };
            if s.framing == Framing::Length(s.declared_left) && s.declared_left > 0 {
                self.reset_stream(stream_id, ErrorCode::ProtocolError, cx);
                return Ok(());
            }
            request::write_end(s.framing, Some(&list), s.wires.front.input());
            s.wires.front.end_input();
            s.wires.front_side.readable = true;
            s.request_ended = true;
            return Ok(());
        }
        if stream_id <= self.last_stream {
            return match self.closed_how(stream_id) {
                // Frames may still come on a stream kakehi reset: ignored (§5.1).
                Some(Closed::ByKakehi) => Ok(()),
                // Closed by the client or at both ends: STREAM_CLOSED (§5.1).
                Some(Closed::ByClient | Closed::Ended) => Err(Failed(ErrorCode::StreamClosed)),
                // Never opened: stream ids only grow (§5.1.1).
                None => Err(Failed(ErrorCode::ProtocolError)),
            };
        }
        self.last_stream = stream_id;
        if self.goaway.is_some() || self.peer_goaway {
            self.refuse(stream_id);
            return Ok(());
        }
        if let Err(e) = priority {
            self.put_rst(stream_id, e.code);
            return Ok(());
        }
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                self.put_rst(stream_id, e.code);
                return Ok(());
            }
        };
        if self.streams.len() >= self.max_streams {
            self.put_rst(stream_id, ErrorCode::RefusedStream);
            return Ok(());
        }
        // A finished stream's exchange and wire when there is one (their allocations kept),
        // else new ones with two buffers from the pool.
        let spare = match self.spare.pop() {
            Some((mut exchange, wire)) if exchange.parked() => {
                match (cx.pool.checkout(), cx.pool.checkout()) {
                    (Some(front), Some(back)) => {
                        exchange.unpark(front, back);
                        Some((exchange, wire))
                    }
                    (front, back) => {
                        front.into_iter().for_each(|b| cx.pool.checkin(b));
                        back.into_iter().for_each(|b| cx.pool.checkin(b));
                        self.spare.push((exchange, wire));
                        self.refuse(stream_id);
                        return Ok(());
                    }
                }
            }
            other => other,
        };
        let (mut exchange, mut wire) = match spare {
            Some((mut exchange, wire)) => {
                exchange.reuse(cx.now);
                (exchange, wire)
            }
            None => {
                let Some(front_buf) = cx.pool.checkout() else {
                    self.refuse(stream_id);
                    return Ok(());
                };
                let Some(back_buf) = cx.pool.checkout() else {
                    cx.pool.checkin(front_buf);
                    self.refuse(stream_id);
                    return Ok(());
                };
                let exchange = Exchange::new(self.peer, front_buf, back_buf, cx.now);
                (exchange, StreamWire::default())
            }
        };
        if cx.transcript.is_some() && wire.tap.is_none() {
            wire.tap = Some(Vec::new());
        }
        wire.client_cert.clone_from(&self.client_cert);
        let framing = match request::write_head(&list, end_stream, wire.reset()) {
            Ok(f) => f,
            Err(_) => {
                self.spare.push((exchange, wire));
                self.put_rst(stream_id, ErrorCode::ProtocolError);
                return Ok(());
            }
        };
        exchange.reuse(cx.now);
        if end_stream {
            wire.end_input();
        }
        let mut wires = Wires::new(key, listener, wire);
        wires.front_side.readable = true;
        wires.front_side.writable = true;
        let is_head = list.method() == Some(b"HEAD");
        self.streams.push(Stream {
            id: stream_id,
            wires,
            exchange,
            framing,
            declared_left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            request_ended: end_stream,
            send_window: self.peer_initial_window,
            recv_window: DEFAULT_WINDOW,
            owed: 0,
            reader: ResponseReader::new(is_head),
            end_sent: false,
            exchange_done: false,
            sent: 0,
            stall: None,
        });
        Ok(())
    }

    fn on_data(
        &mut self,
        stream_id: u32,
        data: &[u8],
        end_stream: bool,
        flow_len: u32,
        cx: &mut Cx,
    ) -> Result<(), Failed> {
        let len = i64::from(flow_len);
        if len > self.recv_window {
            return Err(Failed(ErrorCode::FlowControlError));
        }
        self.recv_window -= len;
        // Given back when its exchange has read it (padding with it).
        let Some(i) = self.index(stream_id) else {
            if stream_id > self.last_stream {
                return Err(Failed(ErrorCode::ProtocolError));
            }
            // A stream already closed: what kakehi reset may still get frames in flight
            // (ignored); any other is STREAM_CLOSED (§5.1, §6.1).
            self.conn_owed = self.conn_owed.saturating_add(flow_len);
            if self.closed_how(stream_id) != Some(Closed::ByKakehi) {
                self.put_rst(stream_id, ErrorCode::StreamClosed);
            }
            return Ok(());
        };
        let Some(s) = self.streams.get_mut(i) else {
            return Ok(());
        };
        if s.request_ended {
            self.conn_owed = self.conn_owed.saturating_add(flow_len);
            self.reset_stream(stream_id, ErrorCode::StreamClosed, cx);
            return Ok(());
        }
        if len > s.recv_window {
            self.conn_owed = self.conn_owed.saturating_add(flow_len);
            self.reset_stream(stream_id, ErrorCode::FlowControlError, cx);
            return Ok(());
        }
        s.recv_window -= len;
        s.owed = s.owed.saturating_add(flow_len);
        let too_long = match s.framing {
            Framing::Length(_) => {
                let n = data.len() as u64;
                if n > s.declared_left {
                    true
                } else {
                    s.declared_left -= n;
                    end_stream && s.declared_left > 0
                }
            }
            Framing::None => !data.is_empty(),
            Framing::Chunked => false,
        };
        if too_long {
            // The body does not match its content-length (§8.1.1).
            self.reset_stream(stream_id, ErrorCode::ProtocolError, cx);
            return Ok(());
        }
        request::write_data(s.framing, data, s.wires.front.input());
        if end_stream {
            request::write_end(s.framing, None, s.wires.front.input());
            s.wires.front.end_input();
            s.request_ended = true;
        }
        s.wires.front_side.readable = true;
        Ok(())
    }

    fn on_settings(&mut self, settings: &Settings) -> Result<(), Failed> {
        if let Some(w) = settings.initial_window_size {
            let delta = i64::from(w) - self.peer_initial_window;
            self.peer_initial_window = i64::from(w);
            for s in &mut self.streams {
                s.send_window += delta;
                if s.send_window > i64::from(frame::MAX_WINDOW_SIZE) {
                    return Err(Failed(ErrorCode::FlowControlError));
                }
            }
        }
        if let Some(size) = settings.max_frame_size {
            self.peer_max_frame = size as usize;
        }
        self.put(&Frame::SettingsAck);
        Ok(())
    }

    fn on_window_update(
        &mut self,
        stream_id: u32,
        increment: u32,
        cx: &mut Cx,
    ) -> Result<(), Failed> {
        let max = i64::from(frame::MAX_WINDOW_SIZE);
        if stream_id == 0 {
            self.send_window += i64::from(increment);
            if self.send_window > max {
                return Err(Failed(ErrorCode::FlowControlError));
            }
            return Ok(());
        }
        let Some(i) = self.index(stream_id) else {
            if stream_id > self.last_stream {
                return Err(Failed(ErrorCode::ProtocolError));
            }
            return Ok(());
        };
        if let Some(s) = self.streams.get_mut(i) {
            s.send_window += i64::from(increment);
            if s.send_window > max {
                self.reset_stream(stream_id, ErrorCode::FlowControlError, cx);
            }
        }
        Ok(())
    }

    /// Ends a stream with RST_STREAM `code`.
    fn reset_stream(&mut self, stream_id: u32, code: ErrorCode, cx: &mut Cx) {
        self.put_rst(stream_id, code);
        if let Some(i) = self.index(stream_id) {
            let s = self.streams.swap_remove(i);
            release(s, cx);
        }
    }

    // ---- the streams' exchanges ----------------------------------------------------------

    /// Drives every stream's exchange; true when one moved bytes.
    fn serve_streams(&mut self, cx: &mut Cx) -> bool {
        let peer = self.peer;
        let mut progress = false;
        for s in &mut self.streams {
            if s.exchange_done {
                continue;
            }
            let before = (s.wires.front.pending_input(), s.wires.front.output.len());
            let mut flow = s.exchange.drive(&mut Real {
                wires: &mut s.wires,
                peer,
                cx,
            });
            // An HTTP/2 backend may have more to write, or room again for the request.
            for _ in 0..4 {
                if flow != Flow::Continue || !s.wires.after_drive(cx) {
                    break;
                }
                flow = s.exchange.drive(&mut Real {
                    wires: &mut s.wires,
                    peer,
                    cx,
                });
            }
            if flow == Flow::Close {
                s.exchange_done = true;
                s.wires.front.output_closed = true;
                progress = true;
            }
            let after = (s.wires.front.pending_input(), s.wires.front.output.len());
            progress |= before != after;
        }
        progress
    }

    /// Turns what the exchanges wrote into HEADERS and DATA frames, as far as the windows and
    /// the write queue allow, and ends the streams that are done; true when one moved.
    fn frame_responses(&mut self, cx: &mut Cx) -> bool {
        let mut progress = false;
        let mut i = 0;
        while i < self.streams.len() {
            let verdict = self.frame_stream(i);
            match verdict {
                StreamEnd::Going(moved) => {
                    progress |= moved;
                    i += 1;
                }
                StreamEnd::Done => {
                    progress = true;
                    let s = self.streams.swap_remove(i);
                    if s.request_ended {
                        self.remember(s.id, Closed::Ended);
                    } else {
                        // Answered before the client finished its request (§8.1).
                        self.put_rst(s.id, ErrorCode::NoError);
                    }
                    self.retire(s, cx);
                }
                StreamEnd::Broken => {
                    progress = true;
                    let s = self.streams.swap_remove(i);
                    self.put_rst(s.id, ErrorCode::InternalError);
                    release(s, cx);
                }
            }
        }
        if self.streams.is_empty() && progress {
            self.idle_since = cx.now;
        }
        if !self.streams.is_empty() {
            self.parked = false;
        }
        progress
    }

    fn frame_stream(&mut self, i: usize) -> StreamEnd {
        let mut moved = false;
        let Some(s) = self.streams.get_mut(i) else {
            return StreamEnd::Going(false);
        };
        let mut at = 0;
        let result = loop {
            if self.write.len() - self.written >= WRITE_HIGH {
                break Ok(());
            }
            let window = s.send_window.min(self.send_window).max(0);
            let max = usize::try_from(window)
                .unwrap_or(0)
                .min(self.peer_max_frame);
            let wire = &s.wires.front;
            let piece = match s
                .reader
                .next(&wire.output, &mut at, max, wire.output_closed)
            {
                Ok(Some(p)) => p,
                Ok(None) => break Ok(()),
                Err(_) => break Err(()),
            };
            moved = true;
            let end = s.reader.done();
            match piece {
                Piece::Head { status, fields, .. } => {
                    let lines = wire.output.get(fields).unwrap_or_default();
                    let kept =
                        response::fields(lines).filter(|(n, _)| !response::connection_specific(n));
                    // HPACK writes a field in at most its HTTP/1.1 line's length + 12 octets.
                    self.scratch.resize(3 * lines.len() + 64, 0);
                    let Some(n) = hpack::encode_response(status, kept, &mut self.scratch) else {
                        break Err(());
                    };
                    let block = self.scratch.get(..n).unwrap_or_default();
                    frame::append_header_block(
                        &mut self.write,
                        s.id,
                        block,
                        end,
                        self.peer_max_frame,
                    );
                }
                Piece::Data(range) => {
                    let data = wire.output.get(range).unwrap_or_default();
                    frame::append_data(&mut self.write, s.id, data, end);
                    s.send_window -= data.len() as i64;
                    self.send_window -= data.len() as i64;
                    s.sent += data.len() as u64;
                }
                Piece::Trailers(range) => {
                    let lines = wire.output.get(range).unwrap_or_default();
                    self.scratch.resize(3 * lines.len() + 64, 0);
                    let mut n = 0;
                    for (name, value) in response::fields(lines) {
                        if response::connection_specific(name) {
                            continue;
                        }
                        let Some(k) = self
                            .scratch
                            .get_mut(n..)
                            .and_then(|out| hpack::encode_field(name, value, out))
                        else {
                            break;
                        };
                        n += k;
                    }
                    let block = self.scratch.get(..n).unwrap_or_default();
                    frame::append_header_block(
                        &mut self.write,
                        s.id,
                        block,
                        true,
                        self.peer_max_frame,
                    );
                }
            }
            if end {
                s.end_sent = true;
            }
        };
        s.wires.front.output.drain(..at);
        if at > 0 {
            s.wires.front_side.writable = true;
        }
        if self.scratch.capacity() > 4096 {
            self.scratch = Vec::new();
        }
        s.stall = match s.stall {
            _ if s.wires.front.output.is_empty() => None,
            None => Some((self.now, s.sent)),
            Some((_, then)) if s.sent >= then + STALL_PROGRESS => Some((self.now, s.sent)),
            kept => kept,
        };
        if result.is_err() {
            return StreamEnd::Broken;
        }
        if s.reader.done() && !s.end_sent {
            frame::append_data(&mut self.write, s.id, &[], true);
            s.end_sent = true;
            moved = true;
        }
        if s.end_sent && (s.exchange_done || s.exchange.state() == State::Idle) {
            return StreamEnd::Done;
        }
        if s.exchange_done && s.wires.front.output.is_empty() && !s.end_sent {
            return StreamEnd::Broken;
        }
        StreamEnd::Going(moved)
    }

    /// A stream whose response went out whole: its exchange and wire wait for the next
    /// stream when they can serve it as they are (see [`SPARES`]), else go.
    fn retire(&mut self, s: Stream, cx: &mut Cx) {
        self.served = self.served.saturating_add(1);
        // A connection that served one stream may well serve no other: keeping its exchange
        // would cost an idle connection (the allocator's holes) for nothing.
        if self.served < 2 || self.spare.len() >= SPARES || !s.exchange.parkable() {
            release(s, cx);
            return;
        }
        let Stream {
            wires, exchange, ..
        } = s;
        let wire = wires.release(cx);
        self.spare.push((exchange, wire));
    }

    /// Idle for [`PARK_AFTER`]: keeps no buffer (see the README's memory figures). Not at
    /// once, so that a busy connection does not give back and take again its buffers between
    /// two bursts of streams.
    fn park(&mut self, cx: &mut Cx) {
        self.drop_spares(cx);
        self.spare = Vec::new();
        if self.filled == 0 {
            self.read = Vec::new();
        }
        if self.write.is_empty() {
            self.write = Vec::new();
        }
        self.parked = true;
    }

    fn park_due(&self, now: Instant) -> bool {
        self.streams.is_empty() && !self.parked && now >= self.idle_since + PARK_AFTER
    }

    /// Gives the spare exchanges' buffers back to the pool.
    fn drop_spares(&mut self, cx: &mut Cx) {
        for (exchange, _) in self.spare.drain(..) {
            if !exchange.parked() {
                let (front, back) = exchange.into_buffers();
                cx.pool.checkin(front);
                cx.pool.checkin(back);
            }
        }
    }

    /// Gives back the windows of the request bytes the exchanges read.
    fn grant_windows(&mut self) {
        let mut frames = Vec::new();
        for s in &mut self.streams {
            let owed = s.owed;
            if owed == 0 || s.wires.front.pending_input() > CREDIT_BELOW {
                continue;
            }
            s.owed = 0;
            self.conn_owed = self.conn_owed.saturating_add(owed);
            if !s.request_ended {
                s.recv_window += i64::from(owed);
                frames.push((s.id, owed));
            }
        }
        for (id, owed) in frames {
            self.put(&Frame::WindowUpdate {
                stream_id: id,
                increment: owed,
            });
        }
        if self.conn_owed > 0 {
            self.recv_window += i64::from(self.conn_owed);
            self.put(&Frame::WindowUpdate {
                stream_id: 0,
                increment: self.conn_owed,
            });
            self.conn_owed = 0;
        }
    }

    // ---- frames out ----------------------------------------------------------------------

    fn put(&mut self, frame: &Frame<'_>) {
        frame::append_frame(&mut self.write, frame);
    }

    /// Notes how a stream closed, for the frames that may still come on it.
    fn remember(&mut self, stream_id: u32, how: Closed) {
        if let Some(entry) = self.closed.iter_mut().find(|(id, _)| *id == stream_id) {
            entry.1 = how;
            return;
        }
        if self.closed.len() >= REMEMBERED_CLOSED {
            self.closed.pop_front();
        }
        self.closed.push_back((stream_id, how));
    }

    fn closed_how(&self, stream_id: u32) -> Option<Closed> {
        self.closed
            .iter()
            .find(|(id, _)| *id == stream_id)
            .map(|&(_, how)| how)
    }

    /// REFUSED_STREAM for a stream kakehi cannot take now (its buffers ran out, or it is
    /// going away): not the client's doing, so not charged to its budget.
    fn refuse(&mut self, stream_id: u32) {
        self.remember(stream_id, Closed::ByKakehi);
        self.put(&Frame::RstStream {
            stream_id,
            code: ErrorCode::RefusedStream,
        });
    }

    fn put_rst(&mut self, stream_id: u32, code: ErrorCode) {
        self.remember(stream_id, Closed::ByKakehi);
        // Resets the client's frames caused count against its budget (MadeYouReset); an early
        // answer (NO_ERROR) or kakehi's own failure (INTERNAL_ERROR) do not.
        let caused = !matches!(code, ErrorCode::NoError | ErrorCode::InternalError);
        if caused && !self.budgets.own_resets.spend(self.now) {
            self.calm = true;
        }
        self.put(&Frame::RstStream { stream_id, code });
    }

    fn send_goaway(&mut self, code: ErrorCode) {
        // A later GOAWAY never names a higher stream than an earlier one (RFC 9113 §6.8): the
        // streams opened since were refused.
        let last = self.goaway.unwrap_or(self.last_stream);
        if self.goaway.is_some() && code == ErrorCode::NoError {
            return;
        }
        self.goaway = Some(last);
        self.put(&Frame::GoAway {
            last_stream_id: last,
            code,
            debug: &[],
        });
    }
}

enum StreamEnd {
    /// Still going; true when it moved.
    Going(bool),
    /// Its response went out whole: the stream ends.
    Done,
    /// Its exchange ended without a whole response: reset it.
    Broken,
}

fn stream_of(error: &H2Error) -> u32 {
    match error.scope {
        Scope::Stream(id) => id,
        Scope::Connection => 0,
    }
}

/// Gives a stream's buffers and backend connection back.
fn release(s: Stream, cx: &mut Cx) {
    let Stream {
        wires, exchange, ..
    } = s;
    drop(wires.release(cx));
    if !exchange.parked() {
        let (front, back) = exchange.into_buffers();
        cx.pool.checkin(front);
        cx.pool.checkin(back);
    }
}
