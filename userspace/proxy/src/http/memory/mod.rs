//! The exchange machine (`exchange.rs`) driven over bytes held in memory: the unit tests and
//! the fuzz targets (`fuzz/` at the repository root) run the very code the worker runs.
//!
//! Given a byte stream, where the network cuts it into reads ([`Plan::cuts`]), how much each
//! write to the peer takes ([`Plan::writes`]) and the size of the pooled buffers, the driver
//! plays the part of the worker: it delivers readiness the way edge-triggered epoll does (a
//! new event once the machine drained a side and more bytes are there), plays one backend per
//! request, and records what each peer received and how each message ended, from the machine's
//! own log entries. No timer ever fires: a machine that waits for one ends the run
//! ([`End::Waits`]).
//!
//! [`drive_request`] feeds a client stream; the backend answers each request, once it was
//! forwarded whole, with an empty keep-alive 200. [`drive_response`] feeds a backend stream
//! answering one request that the driver sends as a client would.

use crate::balancer::Tried;
use crate::cut::Cut;
use crate::http::exchange::{self, Connect, Exchange, Flow, FrontWire, LogEntry, Opened, Side};
use crate::http::{Peer, RequestInfo, ResponseInfo};
use crate::pool::BufferPool;
use kawa::{Block, Buffer, Kawa, Kind};
use lb_config::model::Timeouts;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// The connection every driven request comes from.
pub const PEER: Peer = Peer {
    client: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 5555)),
    listener: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 8080)),
    https: false,
};

/// The one backend every request goes to.
const BACKEND: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 80), 80));

/// What the backend of [`drive_request`] answers to every request.
const EMPTY_200: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// Most messages one call drives: bounds the work a single input can cause.
pub const MAX_MESSAGES: usize = 64;

/// The write sizes of [`drive_request_stream`] and [`drive_response_stream`]: a peer that takes
/// one byte, then a few, then everything, over and over.
pub const TRICKLE: &[usize] = &[1, 7, 64, usize::MAX];

/// How the network treats a driven stream.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    /// Offsets at which the input is cut: no read returns bytes from both sides of a cut.
    /// Unsorted, repeated or out-of-range offsets are allowed.
    pub cuts: &'a [usize],
    /// Size of the pooled I/O buffer (`buffer_size` in the configuration).
    pub buffer_size: usize,
    /// Successive largest writes the peer accepts, used in a cycle; 0 counts as 1, an empty
    /// list means every write is taken whole.
    pub writes: &'a [usize],
    /// `max_request_body` in the configuration (0: no limit).
    pub max_request_body: u64,
    /// Park the machine whenever it is idle with nothing buffered, and unpark it before the
    /// next drive, as an idle session does (`session.rs`, `PARK_AFTER`).
    pub park_when_idle: bool,
}

impl<'a> Plan<'a> {
    /// A plan without a body limit.
    pub const fn new(cuts: &'a [usize], buffer_size: usize, writes: &'a [usize]) -> Self {
        Plan {
            cuts,
            buffer_size,
            writes,
            max_request_body: 0,
            park_when_idle: false,
        }
    }
}

/// How one message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Received whole and every byte of it forwarded.
    Complete,
    /// The input ended first: the peer closed mid-message and the session closes.
    Truncated,
    /// kakehi answered this status itself (400, 413, 414, 431 for a request; 502 for a bad
    /// response); `why` is the access log's `error`.
    Answered { status: u16, why: &'static str },
    /// No step can move: a live session would wait until a timer fires.
    Waits { why: &'static str },
    /// A state the machine should never reach (a run that does not end). The fuzz targets
    /// treat it as a failure.
    Broken { why: &'static str },
}

/// One request of a driven stream.
#[derive(Debug, Clone)]
pub struct RequestOutcome {
    /// What the callbacks learnt from the head.
    pub info: RequestInfo,
    /// The bytes written to the backend for this request.
    pub forwarded: Vec<u8>,
    pub end: End,
}

/// One response (interim or final) of a driven stream.
#[derive(Debug, Clone)]
pub struct ResponseOutcome {
    pub info: ResponseInfo,
    /// The bytes written to the client for this response.
    pub sent: Vec<u8>,
    /// For a 101, how the pipe that follows ended.
    pub end: End,
}

/// The responses to one request, then the raw bytes piped after a 101.
#[derive(Debug, Clone, Default)]
pub struct ResponseStream {
    pub responses: Vec<ResponseOutcome>,
    /// What the backend sent after a 101 head, as the client receives it.
    pub piped: Vec<u8>,
}

/// Drives a client byte stream cut at `cuts`, with the [`TRICKLE`] write sizes.
pub fn drive_request_stream(
    input: &[u8],
    cuts: &[usize],
    buffer_size: usize,
) -> Vec<RequestOutcome> {
    drive_request(input, &Plan::new(cuts, buffer_size, TRICKLE))
}

/// Drives a backend byte stream answering `request`, cut at `cuts`, with the [`TRICKLE`] write
/// sizes. The client connection closes after the response when the request asked for it.
pub fn drive_response_stream(
    input: &[u8],
    cuts: &[usize],
    buffer_size: usize,
    request: &RequestInfo,
) -> ResponseStream {
    let plan = Plan::new(cuts, buffer_size, TRICKLE);
    drive_response(input, &plan, request, request.close)
}

/// Drives a client byte stream: every request it holds, in order, until the stream ends, a
/// request is refused, or the connection closes (Connection: close, HTTP/1.0, the client
/// closed its side).
pub fn drive_request(input: &[u8], plan: &Plan<'_>) -> Vec<RequestOutcome> {
    let Some(mut run) = Run::new(Mode::Requests, input, b"", plan, false) else {
        return Vec::new();
    };
    run.run();
    run.io.requests
}

/// Drives a backend byte stream answering `request` (sent by the driver as a client would:
/// method, version, `Connection` and `Upgrade` from its fields): interim responses, the final
/// one, and the raw bytes that follow a 101. `close_front`: the client connection closes after
/// the response (the request asked for it, or the worker drains).
pub fn drive_response(
    input: &[u8],
    plan: &Plan<'_>,
    request: &RequestInfo,
    close_front: bool,
) -> ResponseStream {
    let head = request_head(request);
    let draining = close_front && !request.close;
    let Some(mut run) = Run::new(Mode::Response, &head, input, plan, draining) else {
        return ResponseStream::default();
    };
    run.run();
    run.io.responses
}

/// The head a client sends for `request`.
fn request_head(request: &RequestInfo) -> Vec<u8> {
    let method = if request.is_head { "HEAD" } else { "GET" };
    let version = if request.version_10 { "1.0" } else { "1.1" };
    let mut head = format!("{method} / HTTP/{version}\r\nHost: a.example\r\n");
    match (request.close, request.upgrade) {
        (true, true) => head.push_str("Connection: close, upgrade\r\nUpgrade: websocket\r\n"),
        (false, true) => head.push_str("Connection: upgrade\r\nUpgrade: websocket\r\n"),
        (true, false) => head.push_str("Connection: close\r\n"),
        (false, false) if request.version_10 => head.push_str("Connection: keep-alive\r\n"),
        (false, false) => {}
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Parses `bytes` as exactly one HTTP/1.1 message of `kind` with kawa alone (no callbacks) and
/// returns its body, de-chunked; `None` when the bytes are not one complete, well-formed
/// message with nothing after it. Tests and fuzz targets check forwarded bytes with it.
pub fn decode_message(kind: Kind, bytes: &[u8]) -> Option<Vec<u8>> {
    let buf = BufferPool::new(bytes.len().max(1), 1, 1).checkout()?;
    let mut kawa = Kawa::new(kind, Buffer::new(buf));
    let room = kawa.storage.space().get_mut(..bytes.len())?;
    room.copy_from_slice(bytes);
    kawa.storage.fill(bytes.len());
    kawa::h1::parse(&mut kawa, &mut kawa::h1::NoCallbacks);
    if !kawa.is_terminated() || !kawa.storage.unparsed_data().is_empty() {
        return None;
    }
    let buf = kawa.storage.buffer();
    let mut body = Vec::new();
    for block in kawa.blocks.iter() {
        if let Block::Chunk(chunk) = block {
            body.extend_from_slice(chunk.data.data_opt(buf)?);
        }
    }
    Some(body)
}

// ---- the run -----------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The client stream is the input; the backend answers each request.
    Requests,
    /// The backend stream is the input, answering the driver's one request.
    Response,
}

struct Run<'a> {
    exchange: Exchange,
    /// The pools the client's and the backend's buffers come from and go back to when the
    /// machine parks ([`Plan::park_when_idle`]).
    front_pool: BufferPool,
    back_pool: BufferPool,
    parking: bool,
    io: Memory<'a>,
    /// Calls to the machine left before the run is [`End::Broken`].
    turns_left: usize,
}

impl<'a> Run<'a> {
    fn new(
        mode: Mode,
        client: &'a [u8],
        backend: &'a [u8],
        plan: &Plan<'a>,
        draining: bool,
    ) -> Option<Run<'a>> {
        // The side under test gets the plan's buffer size. The driver's own messages (its
        // request in Mode::Response, its 200 in Mode::Requests) must fit whatever that size:
        // they are not what is under test.
        let (front_size, back_size) = match mode {
            Mode::Requests => (plan.buffer_size, plan.buffer_size.max(EMPTY_200.len())),
            Mode::Response => (plan.buffer_size.max(client.len()), plan.buffer_size),
        };
        let mut front_pool = BufferPool::new(front_size, 1, 1);
        let mut back_pool = BufferPool::new(back_size, 1, 1);
        let front_buf = front_pool.checkout()?;
        let back_buf = back_pool.checkout()?;
        let now = Instant::now();
        let input = if mode == Mode::Requests {
            client
        } else {
            backend
        };
        let (client_cuts, backend_cuts) = match mode {
            Mode::Requests => (plan.cuts, &[][..]),
            Mode::Response => (&[][..], plan.cuts),
        };
        Some(Run {
            exchange: Exchange::new(PEER, front_buf, back_buf, now),
            front_pool,
            back_pool,
            parking: plan.park_when_idle,
            io: Memory {
                mode,
                client: Client {
                    input: Segments::new(client, client_cuts, mode == Mode::Requests),
                    output: Trickle::new(plan.writes),
                    shut: false,
                },
                client_side: Side {
                    writable: true,
                    ..Side::default()
                },
                backend: None,
                back_side: Side::default(),
                backend_script: Segments::new(backend, backend_cuts, true),
                forwarded: Vec::new(),
                now,
                timeouts: Timeouts {
                    connect: Duration::from_secs(3),
                    request_header: Duration::from_secs(10),
                    front_idle: Duration::from_secs(60),
                    back_idle: Duration::from_secs(30),
                    drain: Duration::from_secs(10),
                },
                max_request_body: plan.max_request_body,
                draining,
                writes: plan.writes,
                ids: 0,
                open_request: false,
                requests: Vec::new(),
                responses: ResponseStream::default(),
                final_seen: false,
                switched: false,
            },
            // Every turn moves at least one byte in or out, or delivers one event; what is
            // written is the input plus the headers kakehi adds and the chunk framing, well
            // under 8x plus 1 KiB a message.
            turns_left: input
                .len()
                .saturating_mul(8)
                .saturating_add(1024 * MAX_MESSAGES),
        })
    }

    fn run(&mut self) {
        let closed = loop {
            if self.io.requests.len() >= MAX_MESSAGES
                || self.io.responses.responses.len() >= MAX_MESSAGES
            {
                return;
            }
            self.turns_left = self.turns_left.saturating_sub(1);
            if self.turns_left == 0 {
                self.end(End::Broken { why: "step limit" });
                return;
            }
            if self.parking && self.exchange.parked() {
                let (Some(front), Some(back)) =
                    (self.front_pool.checkout(), self.back_pool.checkout())
                else {
                    self.end(End::Broken {
                        why: "parked buffers were not given back",
                    });
                    return;
                };
                self.exchange.unpark(front, back);
            }
            if self.exchange.drive(&mut self.io) == Flow::Close {
                break true;
            }
            if self.exchange.yielded() {
                continue;
            }
            if self.parking && self.exchange.parkable() {
                let (front, back) = self.exchange.park();
                self.front_pool.checkin(front);
                self.back_pool.checkin(back);
            }
            if !self.deliver_event() {
                break false;
            }
        };
        let end = if closed {
            End::Truncated
        } else {
            End::Waits {
                why: "waits for a timer",
            }
        };
        self.end(end);
    }

    /// What epoll would report now: the backend's answer once the request is forwarded, or
    /// more bytes on a side the machine drained. False when nothing more can happen.
    fn deliver_event(&mut self) -> bool {
        let io = &mut self.io;
        if io.mode == Mode::Requests && self.exchange.request_forwarded() {
            if let Some(back) = io.backend.as_mut() {
                if !back.armed {
                    back.armed = true;
                    back.input = Segments::new(EMPTY_200, &[], false);
                    io.back_side.readable = true;
                    return true;
                }
            }
        }
        if !io.client_side.readable && !io.client_side.eof && io.client.input.has_more() {
            io.client_side.readable = true;
            return true;
        }
        if let Some(back) = io.backend.as_ref() {
            let side = &mut io.back_side;
            if !side.readable && !side.eof && back.input.has_more() {
                side.readable = true;
                return true;
            }
        }
        false
    }

    /// The run is over: the message under way (if any) ended with `end`.
    fn end(&mut self, end: End) {
        let io = &mut self.io;
        match io.mode {
            Mode::Requests => {
                if io.open_request {
                    io.open_request = false;
                    let forwarded = io.take_forwarded();
                    io.requests.push(RequestOutcome {
                        info: self.exchange.request().clone(),
                        forwarded,
                        end,
                    });
                }
            }
            Mode::Response => {
                let pipe_end = if io.client.shut { End::Complete } else { end };
                if io.switched {
                    if let Some(last) = io.responses.responses.last_mut() {
                        last.end = pipe_end;
                    }
                    io.responses.piped = std::mem::take(&mut io.client.output.taken);
                } else if !io.final_seen {
                    let sent = std::mem::take(&mut io.client.output.taken);
                    io.responses.responses.push(ResponseOutcome {
                        info: *self.exchange.response(),
                        sent,
                        end,
                    });
                }
            }
        }
    }
}

/// The worker's part, played in memory.
struct Memory<'a> {
    mode: Mode,
    client: Client<'a>,
    client_side: Side,
    /// The backend connection of the current exchange.
    backend: Option<Backend<'a>>,
    back_side: Side,
    /// In [`Mode::Response`], what the (single) backend sends.
    backend_script: Segments<'a>,
    /// Bytes written to backends since the last exchange ended.
    forwarded: Vec<u8>,
    now: Instant,
    timeouts: Timeouts,
    max_request_body: u64,
    draining: bool,
    writes: &'a [usize],
    ids: u64,
    /// A request id was given and the request is not logged yet.
    open_request: bool,
    requests: Vec<RequestOutcome>,
    responses: ResponseStream,
    /// [`Mode::Response`]: the final response was delivered whole.
    final_seen: bool,
    /// [`Mode::Response`]: a 101 was delivered; what follows is piped.
    switched: bool,
}

impl Memory<'_> {
    fn take_forwarded(&mut self) -> Vec<u8> {
        if let Some(back) = self.backend.as_mut() {
            self.forwarded.append(&mut back.output.taken);
        }
        std::mem::take(&mut self.forwarded)
    }

    fn close_backend(&mut self) {
        if let Some(mut back) = self.backend.take() {
            self.forwarded.append(&mut back.output.taken);
        }
    }
}

/// The client.
struct Client<'a> {
    input: Segments<'a>,
    output: Trickle<'a>,
    /// The machine shut its write side.
    shut: bool,
}

/// One backend connection.
struct Backend<'a> {
    input: Segments<'a>,
    output: Trickle<'a>,
    /// [`Mode::Requests`]: its answer was given.
    armed: bool,
}

impl<'a> exchange::Io for Memory<'a> {
    type Front = Client<'a>;
    type Back = Backend<'a>;

    fn front(&mut self) -> (&mut Client<'a>, &mut Side) {
        (&mut self.client, &mut self.client_side)
    }

    fn back(&mut self) -> Option<(&mut Backend<'a>, &mut Side)> {
        self.backend.as_mut().map(|b| (b, &mut self.back_side))
    }

    fn now(&self) -> Instant {
        self.now
    }

    fn draining(&self) -> bool {
        self.draining
    }

    fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    fn max_request_body(&self) -> u64 {
        self.max_request_body
    }

    fn next_request_id(&mut self, out: &mut String) {
        out.clear();
        out.push_str(&format!("memory-{}", self.ids));
        self.ids += 1;
        self.open_request = true;
    }

    fn route(&self, _host: &[u8], _path: &[u8], _method: &[u8]) -> Option<(usize, bool)> {
        Some((0, false))
    }

    fn open_backend(
        &mut self,
        _cluster: usize,
        tried: &mut Tried,
        _attempt: u32,
        _key: Option<u64>,
    ) -> Opened {
        if tried.contains(0) {
            return Opened::Unavailable;
        }
        tried.insert(0);
        self.close_backend();
        let input = match self.mode {
            // Armed with its answer once the request is forwarded.
            Mode::Requests => Segments::new(b"", &[], false),
            Mode::Response => {
                std::mem::replace(&mut self.backend_script, Segments::new(b"", &[], true))
            }
        };
        self.backend = Some(Backend {
            input,
            output: Trickle::new(self.writes),
            armed: false,
        });
        self.back_side = Side {
            writable: true,
            ..Side::default()
        };
        Opened::Ready(BACKEND)
    }

    fn check_connect(&mut self) -> Connect {
        if self.backend.is_some() {
            Connect::Established
        } else {
            Connect::Missing
        }
    }

    fn backend_failed(&mut self, _connect: bool) {}

    fn drop_backend(&mut self) {
        self.close_backend();
    }

    fn release_backend(&mut self, _ok: bool, _reusable: bool) {
        self.close_backend();
    }

    fn shutdown_back_write(&mut self) {}

    fn log(&mut self, entry: &LogEntry<'_>) {
        self.open_request = false;
        let own = entry.answered;
        match self.mode {
            Mode::Requests => {
                let end = if own {
                    End::Answered {
                        status: entry.status,
                        why: entry.error.map_or("", Cut::as_str),
                    }
                } else if entry.error.is_some() {
                    End::Truncated
                } else {
                    End::Complete
                };
                let forwarded = self.take_forwarded();
                self.requests.push(RequestOutcome {
                    info: entry.req.clone(),
                    forwarded,
                    end,
                });
            }
            Mode::Response => {
                if self.final_seen || self.switched {
                    return;
                }
                let end = if own {
                    End::Answered {
                        status: entry.status,
                        why: entry.error.map_or("", Cut::as_str),
                    }
                } else {
                    End::Truncated
                };
                self.final_seen = true;
                self.responses.responses.push(ResponseOutcome {
                    info: *entry.resp,
                    sent: std::mem::take(&mut self.client.output.taken),
                    end,
                });
            }
        }
    }

    fn response_done(&mut self, info: &ResponseInfo) {
        if self.mode != Mode::Response || self.final_seen || self.switched {
            return;
        }
        if info.switching {
            self.switched = true;
        } else if !info.interim {
            self.final_seen = true;
        }
        self.responses.responses.push(ResponseOutcome {
            info: *info,
            sent: std::mem::take(&mut self.client.output.taken),
            end: End::Complete,
        });
    }
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.output.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FrontWire for Client<'_> {
    fn has_pending(&self) -> bool {
        false
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn handshaking(&self) -> bool {
        false
    }

    fn refused_plain_http(&self) -> bool {
        false
    }

    fn shutdown_write(&mut self) {
        self.shut = true;
    }

    fn discard(&mut self, scratch: &mut [u8]) -> io::Result<usize> {
        self.input.read(scratch)
    }

    fn is_tls(&self) -> bool {
        false
    }
}

impl Read for Backend<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Backend<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.output.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The input as a socket delivers it: no read crosses a cut; at the end, 0 (the peer closed)
/// or `WouldBlock` (it stays open).
struct Segments<'a> {
    input: &'a [u8],
    pos: usize,
    /// Sorted, inside the input.
    cuts: Vec<usize>,
    next_cut: usize,
    /// The peer closes after its input.
    closes: bool,
    /// The 0 of the end was read.
    closed: bool,
}

impl<'a> Segments<'a> {
    fn new(input: &'a [u8], cuts: &[usize], closes: bool) -> Self {
        let mut cuts: Vec<usize> = cuts
            .iter()
            .copied()
            .filter(|&c| c > 0 && c < input.len())
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        Segments {
            input,
            pos: 0,
            cuts,
            next_cut: 0,
            closes,
            closed: false,
        }
    }

    /// A read would return bytes or the end.
    fn has_more(&self) -> bool {
        self.pos < self.input.len() || (self.closes && !self.closed)
    }
}

impl Read for Segments<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.input.len() {
            if self.closes {
                self.closed = true;
                return Ok(0);
            }
            return Err(ErrorKind::WouldBlock.into());
        }
        while self.cuts.get(self.next_cut).is_some_and(|&c| c <= self.pos) {
            self.next_cut += 1;
        }
        let segment_end = self
            .cuts
            .get(self.next_cut)
            .copied()
            .unwrap_or(self.input.len());
        let segment = self.input.get(self.pos..segment_end).unwrap_or_default();
        let n = segment.len().min(buf.len());
        if let (Some(to), Some(from)) = (buf.get_mut(..n), segment.get(..n)) {
            to.copy_from_slice(from);
        }
        self.pos += n;
        Ok(n)
    }
}

/// A peer that takes at most the next limit of its cycle on each write, and keeps it all.
struct Trickle<'a> {
    taken: Vec<u8>,
    limits: &'a [usize],
    next: usize,
}

impl<'a> Trickle<'a> {
    fn new(limits: &'a [usize]) -> Self {
        Trickle {
            taken: Vec::new(),
            limits,
            next: 0,
        }
    }

    fn next_limit(&mut self) -> usize {
        let limit = self
            .next
            .checked_rem(self.limits.len())
            .and_then(|i| self.limits.get(i))
            .copied()
            .unwrap_or(usize::MAX);
        self.next = self.next.wrapping_add(1);
        limit.max(1)
    }
}

impl Write for Trickle<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut room = self.next_limit();
        let mut written = 0;
        for buf in bufs {
            let take = buf.len().min(room);
            self.taken
                .extend_from_slice(buf.get(..take).unwrap_or_default());
            written += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
