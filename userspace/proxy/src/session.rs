//! One client connection and the backend connection serving its current request.
//!
//! A session is a small state machine driven by readiness: `drive` makes every step it can
//! (read, parse, route, connect, write, in both directions) until nothing moves, then computes
//! its next deadline. Requests on one connection are served one after the other, so pipelined
//! requests are answered in order; bodies stream through two fixed buffers (kawa parses in
//! place and forwards as soon as bytes are parsed), so a body of any size uses the same memory.
//! The worker (`worker.rs`) owns the sockets' registration, the slab and the timers.

use crate::accesslog::Record;
use crate::balancer::{ClusterState, Tried};
use crate::http::answers::Answer;
use crate::http::{Peer, RequestCallbacks, RequestInfo, ResponseCallbacks, ResponseInfo};
use crate::pool::PoolBuf;
use crate::tls::Front;
use crate::worker::Cx;
use kawa::{Kawa, ParsingPhase};
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

/// How long a closing connection may keep draining what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// Steps one `drive` call may take before yielding to other sessions.
const MAX_STEPS: usize = 256;
/// Connect attempts for one request (the first one and the retries).
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the first byte of a request.
    Idle,
    /// Part of a request head received.
    ReadingHead,
    /// The head is routed; the backend connection is being established.
    Connecting,
    /// Request and response flowing.
    Forwarding,
    /// After a 101: raw bytes both ways.
    Pipe,
    /// Writing one of kakehi's own answers.
    Answering,
    /// Write side shut; reading and discarding until the client closes, for a short while.
    Lingering,
}

/// What the worker should do with the session after `drive`.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

enum Step {
    Progress,
    Blocked,
    Close,
}

struct BackConn {
    stream: TcpStream,
    cluster: usize,
    backend: usize,
    address: SocketAddr,
    connected: bool,
    readable: bool,
    writable: bool,
    /// The backend shut its write side (seen in an event).
    hup: bool,
    eof: bool,
}

/// A backend connection this session keeps between its requests (like HAProxy's
/// `http-reuse safe`): the next request that goes to the same backend uses it as it is,
/// still registered under this session's token, with no liveness probe unless an event came
/// for it meanwhile. It goes to the shared idle pool when the next request goes elsewhere or
/// the client connection ends.
struct HeldBack {
    stream: TcpStream,
    address: SocketAddr,
    since: Instant,
    /// An event came while it was idle (bytes, or the backend closing): probe before reuse.
    stirred: bool,
}

/// One request's progress, for the log and for decisions about reuse.
#[derive(Default)]
struct Exchange {
    started: Option<Instant>,
    backend_ready: Option<Instant>,
    first_response_byte: Option<Instant>,
    cluster: Option<usize>,
    /// The backend last tried or used, for the log.
    backend: Option<SocketAddr>,
    tried: Tried,
    attempts: u32,
    bytes_in: u64,
    bytes_out: u64,
    /// Request body bytes parsed so far.
    body_bytes: u64,
    /// Bytes of the response already written to the client.
    response_sent: bool,
    error: Option<&'static str>,
}

pub struct Session {
    pub id: u64,
    key: usize,
    front: Front,
    peer: Peer,
    listener: usize,
    front_kawa: Kawa<PoolBuf>,
    back_kawa: Kawa<PoolBuf>,
    front_readable: bool,
    front_writable: bool,
    front_eof: bool,
    /// The client shut its write side (seen in an event): a short read is not the end.
    front_hup: bool,
    back: Option<BackConn>,
    held: Option<HeldBack>,
    state: State,
    req: RequestInfo,
    resp: ResponseInfo,
    request_id: String,
    ex: Exchange,
    answer: Vec<u8>,
    answer_sent: usize,
    answer_close: bool,
    /// The response being parsed tells the client the connection closes after it.
    close_front_after: bool,
    /// The last drive hit MAX_STEPS (see `yielded`).
    yielded: bool,
    /// The end of the TLS handshake was counted (or the front is plain).
    tls_counted: bool,
    /// When the current state's clock started (accept, first head byte, last progress...).
    since: Instant,
    pub deadline: Instant,
    /// The earliest timer entry the worker holds for this session.
    pub scheduled: Option<Instant>,
}

pub fn front_token(key: usize) -> Token {
    Token(key << 1)
}

pub fn back_token(key: usize) -> Token {
    Token((key << 1) | 1)
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        key: usize,
        front: Front,
        peer: Peer,
        listener: usize,
        front_buf: PoolBuf,
        back_buf: PoolBuf,
        now: Instant,
    ) -> Session {
        Session {
            id,
            key,
            front,
            peer,
            listener,
            front_kawa: Kawa::new(kawa::Kind::Request, kawa::Buffer::new(front_buf)),
            back_kawa: Kawa::new(kawa::Kind::Response, kawa::Buffer::new(back_buf)),
            front_readable: false,
            front_writable: false,
            front_eof: false,
            front_hup: false,
            back: None,
            held: None,
            state: State::Idle,
            req: RequestInfo::default(),
            resp: ResponseInfo::default(),
            request_id: String::new(),
            ex: Exchange::default(),
            answer: Vec::new(),
            answer_sent: 0,
            answer_close: false,
            close_front_after: false,
            yielded: false,
            tls_counted: false,
            since: now,
            deadline: now,
            scheduled: None,
        }
    }

    /// The address of the listener that accepted the connection.
    pub fn listener_addr(&self) -> SocketAddr {
        self.peer.listener
    }

    pub fn front_stream(&mut self) -> &mut TcpStream {
        self.front.stream_mut()
    }

    /// Records readiness from an event on the front (client) socket. `read_closed`: the
    /// peer shut its write side, so reads must go on until they return 0.
    pub fn front_event(&mut self, readable: bool, writable: bool, read_closed: bool) {
        self.front_readable |= readable;
        self.front_writable |= writable;
        self.front_hup |= read_closed;
    }

    /// Records readiness from an event on the back (backend) socket.
    pub fn back_event(&mut self, readable: bool, writable: bool, read_closed: bool) {
        if let Some(back) = self.back.as_mut() {
            back.readable |= readable;
            back.writable |= writable;
            back.hup |= read_closed;
        } else if let Some(held) = self.held.as_mut() {
            held.stirred |= readable || read_closed;
        }
    }

    /// The last `drive` stopped at its step cap with work left: the worker drives it again
    /// at its next turn, since bytes already waiting bring no new edge-triggered event.
    pub fn yielded(&self) -> bool {
        self.yielded
    }

    /// Idle between requests since `since` (its last exchange ended, or it was accepted):
    /// a draining worker may close it once the grace has passed since then.
    pub fn idle_since(&self) -> Option<Instant> {
        (self.state == State::Idle
            && self.front_kawa.storage.is_empty()
            && !self.front.handshaking())
        .then_some(self.since)
    }

    /// After a configuration change: point the request's cluster and backend at their new
    /// positions (by cluster name and backend address), or at nothing when they were removed
    /// (the exchange in flight finishes; it just no longer counts for balancing).
    pub fn remap_clusters(&mut self, old: &[ClusterState], new: &[ClusterState]) {
        let cluster_of = |c: usize| {
            old.get(c)
                .and_then(|oc| new.iter().position(|nc| nc.name == oc.name))
        };
        self.ex.cluster = self.ex.cluster.and_then(cluster_of);
        self.ex.tried = Tried::default();
        if let Some(back) = self.back.as_mut() {
            let address = back.address;
            let found = cluster_of(back.cluster).and_then(|c| {
                new.get(c)
                    .and_then(|nc| nc.backends.iter().position(|b| b.address == address))
                    .map(|b| (c, b))
            });
            (back.cluster, back.backend) = found.unwrap_or((usize::MAX, usize::MAX));
        }
    }

    /// Gives the buffers back and forgets the backend (the worker deregisters the sockets).
    pub fn close(self, cx: &mut Cx) {
        if !self.tls_counted && matches!(self.front, Front::Tls(_)) {
            cx.stats
                .tls_handshake(self.peer.listener, !self.front.handshaking());
        }
        let Session {
            mut back,
            held,
            front_kawa,
            back_kawa,
            front,
            ..
        } = self;
        if let Some(b) = back.as_mut() {
            let _ = cx.registry.deregister(&mut b.stream);
            if let Some(c) = cx.clusters.get_mut(b.cluster) {
                c.release(b.backend);
            }
        }
        if let Some(held) = held {
            cx.idle.unhold();
            // Still registered under this session's token: a stray event reaches whoever
            // holds the token next and only sets a readiness flag (see finish_exchange).
            if !held.stirred {
                cx.idle.put(held.address, held.stream, held.since);
            }
        }
        // No deregistration: closing the socket removes it from the poll (one syscall less
        // per connection).
        drop(front);
        cx.pool.checkin(front_kawa.storage.buffer);
        cx.pool.checkin(back_kawa.storage.buffer);
    }

    /// Makes every step possible now.
    pub fn drive(&mut self, cx: &mut Cx) -> Flow {
        if !self.tls_counted && matches!(self.front, Front::Tls(_)) && !self.front.handshaking() {
            self.tls_counted = true;
            cx.stats.tls_handshake(self.peer.listener, true);
        }
        self.yielded = true;
        for _ in 0..MAX_STEPS {
            if !self.flush_front() {
                return Flow::Close;
            }
            let step = match self.state {
                State::Idle | State::ReadingHead => self.read_head(cx),
                State::Connecting => self.finish_connect(cx),
                State::Forwarding => self.forward(cx),
                State::Pipe => self.pipe(cx),
                State::Answering => self.write_answer(cx),
                State::Lingering => self.linger(),
            };
            match step {
                Step::Progress => continue,
                Step::Blocked => {
                    self.yielded = false;
                    break;
                }
                Step::Close => return Flow::Close,
            }
        }
        self.deadline = self.compute_deadline(cx);
        Flow::Continue
    }

    fn compute_deadline(&self, cx: &Cx) -> Instant {
        let t = &cx.timeouts;
        let span = match self.state {
            // A TLS handshake gets the time a request head gets.
            State::Idle if self.front.handshaking() => t.request_header,
            // Draining: an idle connection is closed after the drain's grace (counted from
            // the end of its last exchange), never at once, so that a request the client is
            // sending now is answered (with `Connection: close`) rather than reset.
            State::Idle if cx.draining => t.front_idle.min(crate::worker::DRAIN_IDLE_GRACE),
            State::Idle => t.front_idle,
            State::ReadingHead => t.request_header,
            State::Connecting => t.connect,
            State::Forwarding => t.back_idle,
            State::Pipe => t.front_idle.max(t.back_idle),
            State::Answering => t.back_idle,
            State::Lingering => LINGER,
        };
        self.since + span
    }

    /// The deadline passed: what the state calls for.
    pub fn timeout(&mut self, cx: &mut Cx) -> Flow {
        match self.state {
            State::Idle | State::Pipe | State::Answering | State::Lingering => Flow::Close,
            State::ReadingHead => {
                self.ex.error = Some("request header timeout");
                self.start_answer(cx, Answer::RequestTimeout, true);
                self.drive(cx)
            }
            State::Connecting => {
                self.ex.error = Some("connect timeout");
                if let Some(b) = self.back.as_ref() {
                    cx.backend_failed(b.cluster, b.backend, true);
                }
                self.drop_backend(cx);
                self.connect_next(cx, Answer::GatewayTimeout);
                self.drive(cx)
            }
            State::Forwarding => {
                if self.ex.response_sent {
                    self.ex.error = Some("backend timeout mid-response");
                    self.log(cx, self.resp.status);
                    return Flow::Close;
                }
                self.ex.error = Some("backend response timeout");
                if let Some(b) = self.back.as_ref() {
                    cx.backend_failed(b.cluster, b.backend, false);
                }
                self.drop_backend(cx);
                self.start_answer(cx, Answer::GatewayTimeout, true);
                self.drive(cx)
            }
        }
    }

    // ---- request head ----------------------------------------------------------------------

    fn read_head(&mut self, cx: &mut Cx) -> Step {
        let pending = !self.front_kawa.storage.unparsed_data().is_empty();
        let mut read_any = false;
        let mut read_bytes = 0;
        if !self.front_eof {
            match self.read_front() {
                ReadOutcome::Data(n) => {
                    read_any = true;
                    read_bytes = n as u64;
                }
                ReadOutcome::Blocked | ReadOutcome::Full => {}
                ReadOutcome::Eof if pending => {}
                ReadOutcome::Error if self.front.refused_plain_http() => {
                    // Answered in clear by the TLS layer; log it and close gently.
                    cx.next_request_id(&mut self.request_id);
                    self.ex = Exchange {
                        started: Some(cx.now),
                        error: Some("plain HTTP sent to the TLS port"),
                        bytes_out: crate::http::answers::PLAIN_HTTP_TO_TLS.len() as u64,
                        ..Exchange::default()
                    };
                    self.log(cx, 400);
                    return self.start_linger();
                }
                ReadOutcome::Eof | ReadOutcome::Error => return Step::Close,
            }
        }
        let pipelined = pending && self.state == State::Idle;
        if !read_any && !pipelined {
            // Nothing new to parse (a partial head waits for more bytes).
            return if self.front_eof {
                Step::Close
            } else {
                Step::Blocked
            };
        }
        if self.state == State::Idle {
            self.state = State::ReadingHead;
            self.since = cx.now;
            self.ex = Exchange {
                started: Some(cx.now),
                bytes_in: read_bytes,
                ..Exchange::default()
            };
            cx.next_request_id(&mut self.request_id);
        }
        let mut callbacks = RequestCallbacks {
            peer: self.peer,
            request_id: &self.request_id,
            info: &mut self.req,
        };
        kawa::h1::parse(&mut self.front_kawa, &mut callbacks);
        if let Some((status, why)) = crate::http::head_refusal(&self.front_kawa, &self.req) {
            self.ex.error = Some(why);
            crate::http::forget_head(&mut self.front_kawa);
            let answer = if status == 431 {
                Answer::HeaderTooLarge
            } else {
                Answer::BadRequest
            };
            self.start_answer(cx, answer, true);
            return Step::Progress;
        }
        if !self.front_kawa.is_main_phase() {
            if self.front_kawa.storage.available_space() == 0 {
                let answer = if self.front_kawa.parsing_phase == ParsingPhase::StatusLine {
                    Answer::UriTooLong
                } else {
                    Answer::HeaderTooLarge
                };
                self.ex.error = Some("request head larger than the buffer");
                self.start_answer(cx, answer, true);
                return Step::Progress;
            }
            return if read_any {
                Step::Progress
            } else {
                Step::Blocked
            };
        }
        // A complete head: route it, then check the declared body size.
        let router = cx.routers.get(self.listener);
        let route = router.and_then(|r| {
            r.lookup_route(
                self.req.authority.as_bytes(),
                self.req.target.as_bytes(),
                self.req.method.as_bytes(),
            )
        });
        if let Some((cluster, true)) = route {
            self.ex.cluster = Some(cluster);
            self.ex.error = Some("redirect to https");
            let close = !self.front_kawa.is_terminated() || self.req.close;
            self.start_redirect(cx, close);
            return Step::Progress;
        }
        let cluster = route.map(|(cluster, _)| cluster);
        let Some(cluster) = cluster else {
            self.ex.error = Some("no route");
            // The body (if any) is not read: the connection cannot be reused after it.
            let close = !self.front_kawa.is_terminated() || self.req.close;
            self.start_answer(cx, Answer::NotFound, close);
            return Step::Progress;
        };
        self.ex.cluster = Some(cluster);
        if self.body_too_large(cx) {
            self.ex.error = Some("request body over max_request_body");
            self.start_answer(cx, Answer::PayloadTooLarge, true);
            return Step::Progress;
        }
        self.connect_next(cx, Answer::ServiceUnavailable);
        Step::Progress
    }

    /// Compares the request body with the limit. A declared Content-Length over the limit is
    /// refused before any byte of it is read; a chunked body is counted block by block just
    /// before its blocks are converted and sent (each block is seen once).
    fn body_too_large(&mut self, cx: &Cx) -> bool {
        let limit = cx.max_request_body;
        if limit == 0 {
            return false;
        }
        if let kawa::BodySize::Length(n) = self.front_kawa.body_size {
            return n as u64 > limit;
        }
        if self.back.is_none() {
            // Counted once, just before the blocks are converted and sent (see forward).
            return false;
        }
        let parsed: usize = self
            .front_kawa
            .blocks
            .iter()
            .map(|b| match b {
                kawa::Block::Chunk(c) => c.data.len(),
                _ => 0,
            })
            .sum();
        self.ex.body_bytes += parsed as u64;
        self.ex.body_bytes > limit
    }

    // ---- backend connection ----------------------------------------------------------------

    /// Connects to the next backend of the request's cluster, or answers `fallback` (503 when
    /// nothing was tried, 502 after failed attempts unless the caller says otherwise).
    fn connect_next(&mut self, cx: &mut Cx, fallback: Answer) {
        let Some(cluster_idx) = self.ex.cluster else {
            self.start_answer(cx, Answer::BadGateway, true);
            return;
        };
        while self.ex.attempts < MAX_ATTEMPTS {
            let Some(cluster) = cx.clusters.get_mut(cluster_idx) else {
                break;
            };
            cluster.revive(cx.now);
            let Some(backend) = cluster.pick(self.ex.tried, &mut cx.rng) else {
                break;
            };
            self.ex.tried.insert(backend);
            self.ex.attempts += 1;
            let Some(address) = cluster.address(backend) else {
                break;
            };
            let held = self.held.take();
            if held.is_some() {
                cx.idle.unhold();
            }
            let kept = match held {
                Some(held) if held.address == address => {
                    cx.idle
                        .revive(held.stream, held.since, held.stirred, cx.now)
                }
                Some(held) => {
                    if !held.stirred {
                        cx.idle.put(held.address, held.stream, held.since);
                    }
                    None
                }
                None => None,
            };
            let same_token = kept.is_some();
            let pooled = match kept {
                Some(s) => Some(s),
                None => cx.idle.take(address, cx.now),
            };
            let (stream, reused) = match pooled {
                Some(s) => (s, true),
                None => match TcpStream::connect(address) {
                    Ok(s) => (s, false),
                    Err(e) => {
                        log::warn!("connect to {address} failed: {e}");
                        cx.note_attempt(cluster_idx, address, self.ex.attempts, true);
                        cx.backend_failed(cluster_idx, backend, true);
                        continue;
                    }
                },
            };
            cx.note_attempt(cluster_idx, address, self.ex.attempts, !reused);
            let Some(cluster) = cx.clusters.get_mut(cluster_idx) else {
                break;
            };
            let mut back = BackConn {
                stream,
                cluster: cluster_idx,
                backend,
                address,
                connected: reused,
                // A pooled connection is re-registered below, which reports what is pending
                // in a new event; a kept one has had no event (or was probed): nothing to
                // read yet either way.
                readable: false,
                writable: reused,
                hup: false,
                eof: false,
            };
            let interest = Interest::READABLE | Interest::WRITABLE;
            let token = back_token(self.key);
            let registered = if same_token {
                Ok(())
            } else if reused {
                cx.registry.reregister(&mut back.stream, token, interest)
            } else {
                cx.registry.register(&mut back.stream, token, interest)
            };
            if registered.is_err() {
                continue;
            }
            let connected = reused;
            cluster.acquire(backend);
            self.ex.backend = Some(address);
            self.back = Some(back);
            self.since = cx.now;
            if connected {
                self.backend_ready(cx);
            } else {
                self.state = State::Connecting;
            }
            return;
        }
        let answer = if self.ex.attempts == 0 {
            self.ex.error.get_or_insert("no backend available");
            Answer::ServiceUnavailable
        } else {
            self.ex.error.get_or_insert("backend connect failed");
            if fallback == Answer::ServiceUnavailable {
                Answer::BadGateway
            } else {
                fallback
            }
        };
        self.start_answer(cx, answer, true);
    }

    fn backend_ready(&mut self, cx: &mut Cx) {
        self.state = State::Forwarding;
        self.since = cx.now;
        self.ex.backend_ready = Some(cx.now);
        self.resp = ResponseInfo::default();
    }

    fn finish_connect(&mut self, cx: &mut Cx) -> Step {
        let Some(back) = self.back.as_mut() else {
            self.start_answer(cx, Answer::BadGateway, true);
            return Step::Progress;
        };
        if !back.writable && !back.readable {
            return Step::Blocked;
        }
        let failed = match back.stream.take_error() {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) => match back.stream.peer_addr() {
                Ok(_) => false,
                Err(e) if e.kind() == ErrorKind::NotConnected => {
                    back.writable = false;
                    back.readable = false;
                    return Step::Blocked;
                }
                Err(_) => true,
            },
        };
        if failed {
            log::warn!("connect to {} failed", back.address);
            let (cluster, backend) = (back.cluster, back.backend);
            cx.backend_failed(cluster, backend, true);
            self.drop_backend(cx);
            self.connect_next(cx, Answer::BadGateway);
            return Step::Progress;
        }
        back.connected = true;
        self.backend_ready(cx);
        Step::Progress
    }

    /// Forgets the backend connection without reusing it.
    fn drop_backend(&mut self, cx: &mut Cx) {
        if let Some(mut b) = self.back.take() {
            let _ = cx.registry.deregister(&mut b.stream);
            if let Some(c) = cx.clusters.get_mut(b.cluster) {
                c.release(b.backend);
            }
        }
    }

    // ---- forwarding ------------------------------------------------------------------------

    fn forward(&mut self, cx: &mut Cx) -> Step {
        let mut progress = false;

        // Client -> backend.
        if !self.front_kawa.is_terminated() && !self.front_eof {
            match self.read_front() {
                ReadOutcome::Data(_) => {
                    progress = true;
                    kawa::h1::parse(&mut self.front_kawa, &mut kawa::h1::NoCallbacks);
                    if self.front_kawa.is_error() || crate::http::bad_trailer(&self.front_kawa) {
                        self.ex.error = Some("malformed request body");
                        return self.fail_exchange(cx, Answer::BadRequest);
                    }
                }
                ReadOutcome::Eof => {
                    self.ex.error = Some("client closed before the request ended");
                    self.log(cx, 499);
                    return Step::Close;
                }
                ReadOutcome::Error => return Step::Close,
                ReadOutcome::Full if stuck(&self.front_kawa) => {
                    // A chunk-size or trailer line longer than the whole buffer: it can never
                    // be parsed, so answer now rather than at the request timeout.
                    self.ex.error = Some("request body line longer than the buffer");
                    if self.ex.response_sent {
                        self.log(cx, 400);
                        return Step::Close;
                    }
                    return self.fail_exchange(cx, Answer::BadRequest);
                }
                ReadOutcome::Blocked | ReadOutcome::Full => {}
            }
        }
        if self.body_too_large(cx) {
            self.ex.error = Some("request body over max_request_body");
            if self.ex.response_sent {
                self.log(cx, 413);
                return Step::Close;
            }
            return self.fail_exchange(cx, Answer::PayloadTooLarge);
        }
        match self.write_kawa_to_back() {
            WriteOutcome::Wrote(_) => progress = true,
            WriteOutcome::Blocked | WriteOutcome::Nothing => {}
            WriteOutcome::Error => {
                if !self.ex.response_sent && self.back_kawa.storage.is_empty() {
                    self.ex.error = Some("backend closed while sending the request");
                    return self.fail_exchange(cx, Answer::BadGateway);
                }
                // The backend may have answered early and closed: keep reading its answer.
            }
        }

        // Backend -> client.
        if let Some(back) = self.back.as_mut() {
            if !back.eof && !self.back_kawa.is_terminated() {
                match read_into(
                    &mut back.stream,
                    &mut back.readable,
                    back.hup,
                    &mut self.back_kawa,
                ) {
                    ReadOutcome::Data(_) => {
                        progress = true;
                        self.ex.first_response_byte.get_or_insert(cx.now);
                        self.close_front_after = self.req.close || cx.draining;
                        self.parse_response();
                        if self.back_kawa.is_error() {
                            self.ex.error = Some("malformed response");
                            return self.fail_exchange(cx, Answer::BadGateway);
                        }
                        if !self.back_kawa.is_main_phase()
                            && self.back_kawa.storage.available_space() == 0
                        {
                            // The buffer is full and the head still incomplete: it can never
                            // fit, so answer now rather than at the backend timeout.
                            self.ex.error = Some("response head larger than the buffer");
                            return self.fail_exchange(cx, Answer::BadGateway);
                        }
                    }
                    ReadOutcome::Eof => {
                        back.eof = true;
                        progress = true;
                        if self.resp.close_delimited
                            && self.back_kawa.parsing_phase == ParsingPhase::Body
                        {
                            self.back_kawa.parsing_phase = ParsingPhase::Terminated;
                        } else if !self.ex.response_sent && !self.back_kawa.is_main_phase() {
                            self.ex.error = Some("backend closed without answering");
                            return self.fail_exchange(cx, Answer::BadGateway);
                        } else {
                            self.ex.error = Some("backend closed mid-response");
                        }
                    }
                    ReadOutcome::Error => {
                        if !self.ex.response_sent {
                            self.ex.error = Some("backend connection error");
                            return self.fail_exchange(cx, Answer::BadGateway);
                        }
                        self.ex.error = Some("backend connection error mid-response");
                        self.log(cx, self.resp.status);
                        return Step::Close;
                    }
                    ReadOutcome::Full if stuck(&self.back_kawa) => {
                        self.ex.error = Some("response body line longer than the buffer");
                        if !self.ex.response_sent {
                            return self.fail_exchange(cx, Answer::BadGateway);
                        }
                        self.log(cx, self.resp.status);
                        return Step::Close;
                    }
                    ReadOutcome::Blocked | ReadOutcome::Full => {}
                }
            }
        }
        if self.back_kawa.is_main_phase() {
            match write_kawa(
                &mut self.front,
                &mut self.front_writable,
                &mut self.back_kawa,
            ) {
                WriteOutcome::Wrote(n) => {
                    progress = true;
                    self.ex.response_sent = true;
                    self.ex.bytes_out += n as u64;
                }
                WriteOutcome::Error => {
                    self.ex.error = Some("client connection error");
                    self.log(cx, self.resp.status);
                    return Step::Close;
                }
                WriteOutcome::Blocked | WriteOutcome::Nothing => {}
            }
        }

        // A response fully delivered?
        if self.back_kawa.is_terminated() && self.back_kawa.is_completed() {
            if self.resp.interim {
                // 100 Continue and friends: the real response follows, maybe already read.
                self.back_kawa.clear();
                self.resp = ResponseInfo::default();
                if !self.back_kawa.storage.unparsed_data().is_empty() {
                    self.parse_response();
                    if self.back_kawa.is_error() {
                        self.ex.error = Some("malformed response");
                        return self.fail_exchange(cx, Answer::BadGateway);
                    }
                }
                return Step::Progress;
            }
            if self.resp.switching {
                self.log(cx, 101);
                self.state = State::Pipe;
                self.since = cx.now;
                return Step::Progress;
            }
            return self.finish_exchange(cx);
        }
        if self.back.as_ref().is_some_and(|b| b.eof) && !self.back_kawa.is_terminated() {
            // Backend gone mid-response: what was sent is all the client gets.
            self.log(cx, self.resp.status);
            return Step::Close;
        }
        if progress {
            self.since = cx.now;
            Step::Progress
        } else {
            Step::Blocked
        }
    }

    fn parse_response(&mut self) {
        let mut callbacks = ResponseCallbacks {
            request: &self.req,
            close_front: self.close_front_after,
            request_id: &self.request_id,
            info: &mut self.resp,
        };
        kawa::h1::parse(&mut self.back_kawa, &mut callbacks);
    }

    fn write_kawa_to_back(&mut self) -> WriteOutcome {
        let Some(back) = self.back.as_mut() else {
            return WriteOutcome::Nothing;
        };
        if !self.front_kawa.is_main_phase() {
            return WriteOutcome::Nothing;
        }
        write_kawa(&mut back.stream, &mut back.writable, &mut self.front_kawa)
    }

    /// The exchange failed: answer it ourselves if the client saw no response byte yet,
    /// otherwise cut the connection (an answer appended to a partial response would be
    /// read as part of it).
    fn fail_exchange(&mut self, cx: &mut Cx, answer: Answer) -> Step {
        // A 502 is the backend's failure (closed without answering, not HTTP...): it counts
        // for passive health like a 5xx it sent itself.
        if answer == Answer::BadGateway {
            if let Some(b) = self.back.as_ref() {
                cx.backend_failed(b.cluster, b.backend, false);
            }
        }
        if self.ex.response_sent {
            self.log(cx, self.resp.status);
            return Step::Close;
        }
        self.drop_backend(cx);
        self.start_answer(cx, answer, true);
        Step::Progress
    }

    /// The response is delivered: log, recycle the backend connection, and either wait for the
    /// next request on this connection or close it.
    fn finish_exchange(&mut self, cx: &mut Cx) -> Step {
        let request_done = self.front_kawa.is_terminated() && self.front_kawa.is_completed();
        self.log(cx, self.resp.status);
        if let Some(mut back) = self.back.take() {
            if self.resp.status >= 500 {
                cx.backend_failed(back.cluster, back.backend, false);
            } else {
                cx.backend_ok(back.cluster, back.backend);
            }
            if let Some(c) = cx.clusters.get_mut(back.cluster) {
                c.release(back.backend);
            }
            let reusable = request_done
                && !self.resp.backend_close
                && !back.eof
                && self.back_kawa.storage.is_empty();
            if reusable {
                // Kept for this client's next request, registered with this session's token;
                // in the shared pool later, a stray event on it only sets a readiness flag
                // that the next read clears, and reuse by another session re-registers it
                // under the new owner's token (one syscall, not two).
                // Past the worker's cap on kept connections, it goes to the pool at once.
                if let Some(old) = self.held.take() {
                    cx.idle.unhold();
                    if !old.stirred {
                        cx.idle.put(old.address, old.stream, old.since);
                    }
                }
                if cx.idle.hold() {
                    self.held = Some(HeldBack {
                        stream: back.stream,
                        address: back.address,
                        since: cx.now,
                        stirred: false,
                    });
                } else {
                    cx.idle.put(back.address, back.stream, cx.now);
                }
            } else {
                let _ = cx.registry.deregister(&mut back.stream);
            }
        }
        // A client that half-closed after pipelining still gets the requests it sent.
        let more_buffered = !self.front_kawa.storage.unparsed_data().is_empty();
        // A draining worker does not close here: the client was told nothing unless the head
        // it got said `Connection: close` (it did when the drain began before that head was
        // read). Otherwise the next request gets that answer, or the idle grace closes it.
        let keep = request_done
            && !self.req.close
            && !self.resp.close_front
            && !self.resp.close_delimited
            && (!self.front_eof || more_buffered);
        if !keep {
            return self.start_linger();
        }
        self.reset_for_next_request(cx);
        Step::Progress
    }

    fn reset_for_next_request(&mut self, cx: &mut Cx) {
        self.front_kawa.clear();
        self.back_kawa.clear();
        self.back_kawa.storage.clear();
        crate::http::shrink(&mut self.front_kawa);
        crate::http::shrink(&mut self.back_kawa);
        // Between requests no block points into the buffer: move what is left to its start,
        // so that the next head has the whole buffer however TCP split the bytes.
        if self.front_kawa.storage.start > 0 {
            let amount = self.front_kawa.storage.shift();
            self.front_kawa.push_left(amount as u32);
        }
        self.req.clear();
        self.resp = ResponseInfo::default();
        self.request_id.clear();
        self.state = State::Idle;
        self.since = cx.now;
    }

    // ---- WebSocket / Upgrade pipe ----------------------------------------------------------

    fn pipe(&mut self, cx: &mut Cx) -> Step {
        let Some(back) = self.back.as_mut() else {
            return Step::Close;
        };
        let mut progress = false;
        // client -> backend
        if !self.front_eof {
            match read_raw(
                &mut self.front,
                &mut self.front_readable,
                self.front_hup,
                &mut self.front_kawa,
            ) {
                ReadOutcome::Data(_) => progress = true,
                ReadOutcome::Eof => {
                    self.front_eof = true;
                    progress = true;
                }
                ReadOutcome::Error => return Step::Close,
                ReadOutcome::Blocked | ReadOutcome::Full => {}
            }
        }
        match write_raw(&mut back.stream, &mut back.writable, &mut self.front_kawa) {
            WriteOutcome::Wrote(_) => progress = true,
            WriteOutcome::Error => return Step::Close,
            WriteOutcome::Blocked | WriteOutcome::Nothing => {}
        }
        if self.front_eof && self.front_kawa.storage.is_empty() {
            let _ = back.stream.shutdown(Shutdown::Write);
        }
        // backend -> client
        if !back.eof {
            match read_raw(
                &mut back.stream,
                &mut back.readable,
                back.hup,
                &mut self.back_kawa,
            ) {
                ReadOutcome::Data(_) => progress = true,
                ReadOutcome::Eof => {
                    back.eof = true;
                    progress = true;
                }
                ReadOutcome::Error => return Step::Close,
                ReadOutcome::Blocked | ReadOutcome::Full => {}
            }
        }
        match write_raw(
            &mut self.front,
            &mut self.front_writable,
            &mut self.back_kawa,
        ) {
            WriteOutcome::Wrote(n) => {
                progress = true;
                self.ex.bytes_out += n as u64;
            }
            WriteOutcome::Error => return Step::Close,
            WriteOutcome::Blocked | WriteOutcome::Nothing => {}
        }
        if back.eof && self.back_kawa.storage.is_empty() {
            self.front.shutdown_write();
            if self.front_eof {
                return Step::Close;
            }
        }
        if progress {
            self.since = cx.now;
            Step::Progress
        } else {
            Step::Blocked
        }
    }

    // ---- kakehi's own answers and closing --------------------------------------------------

    fn start_answer(&mut self, cx: &mut Cx, answer: Answer, close: bool) {
        self.start_answer_with(cx, answer.status(), close, |id, keep| {
            answer.render(id, keep)
        });
    }

    /// 301 to the same host and target in https (a frontend with `redirect_https`).
    fn start_redirect(&mut self, cx: &mut Cx, close: bool) {
        let host = crate::router::normalize_host(self.req.authority.as_bytes());
        let target = self.req.target.as_str();
        // An absolute-form target keeps only its path and query.
        let path = match target.split_once("://") {
            Some((_, rest)) => rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/"),
            None if target.starts_with('/') => target,
            None => "/",
        };
        let location = format!("https://{host}{path}");
        self.start_answer_with(cx, 301, close, |id, keep| {
            crate::http::answers::render_redirect(&location, id, keep)
        });
    }

    fn start_answer_with(
        &mut self,
        cx: &mut Cx,
        status: u16,
        close: bool,
        render: impl FnOnce(&str, bool) -> Vec<u8>,
    ) {
        self.drop_backend(cx);
        if self.request_id.is_empty() {
            cx.next_request_id(&mut self.request_id);
        }
        let close = close || self.req.close || cx.draining;
        self.answer = render(&self.request_id, !close);
        self.answer_sent = 0;
        self.answer_close = close;
        self.ex.bytes_out += self.answer.len() as u64;
        self.state = State::Answering;
        self.since = cx.now;
        self.log(cx, status);
    }

    fn write_answer(&mut self, cx: &mut Cx) -> Step {
        while self.answer_sent < self.answer.len() {
            if !self.front_writable {
                return Step::Blocked;
            }
            let rest = self.answer.get(self.answer_sent..).unwrap_or_default();
            match self.front.write(rest) {
                Ok(0) => return Step::Close,
                Ok(n) => self.answer_sent += n,
                Err(e) if would_block(&e) => {
                    self.front_writable = false;
                    return Step::Blocked;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
        if self.answer_close {
            return self.start_linger();
        }
        // Kept alive: the request was read whole (see read_head); drop its parsed blocks and
        // keep what follows it (a pipelined request).
        self.front_kawa.blocks.clear();
        self.front_kawa.out.clear();
        self.front_kawa.storage.start = self.front_kawa.storage.head;
        self.reset_for_next_request(cx);
        Step::Progress
    }

    fn start_linger(&mut self) -> Step {
        // The client said `Connection: close`, nothing of it is left unread and no event
        // says more came: it sends nothing else, so close at once (what was written still
        // goes out before the FIN). Otherwise shut the write side and read until the client
        // closes: closing with unread bytes would reset the connection and could destroy the
        // answer before the client reads it.
        let quiet = self.req.close
            && self.front_kawa.is_terminated()
            && self.front_kawa.is_completed()
            && !self.front_readable
            && self.front_kawa.storage.unparsed_data().is_empty()
            && matches!(self.front, Front::Plain(_));
        if quiet && !self.front.has_pending() {
            return Step::Close;
        }
        self.front.shutdown_write();
        self.state = State::Lingering;
        Step::Progress
    }

    /// Writes what TLS still holds for the client when the socket takes it; false when the
    /// connection failed.
    fn flush_front(&mut self) -> bool {
        if !self.front_writable || !self.front.has_pending() {
            return true;
        }
        match self.front.flush_pending() {
            Ok(()) => true,
            Err(e) if would_block(&e) => {
                self.front_writable = false;
                true
            }
            Err(_) => false,
        }
    }

    fn linger(&mut self) -> Step {
        let mut scratch = [0u8; 4096];
        loop {
            if !self.front_readable {
                return Step::Blocked;
            }
            match self.front.discard(&mut scratch) {
                Ok(0) => return Step::Close,
                Ok(_) => {}
                Err(e) if would_block(&e) => {
                    self.front_readable = false;
                    return Step::Blocked;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
    }

    // ---- helpers ---------------------------------------------------------------------------

    fn read_front(&mut self) -> ReadOutcome {
        let out = read_into(
            &mut self.front,
            &mut self.front_readable,
            self.front_hup,
            &mut self.front_kawa,
        );
        match out {
            ReadOutcome::Data(n) => self.ex.bytes_in += n as u64,
            ReadOutcome::Eof => self.front_eof = true,
            _ => {}
        }
        out
    }

    fn log(&mut self, cx: &mut Cx, status: u16) {
        let cluster = self
            .ex
            .cluster
            .and_then(|c| cx.clusters.get(c))
            .map_or("", |s| s.name.as_str());
        let backend = self.ex.backend;
        let now = cx.now;
        let record = Record {
            request_id: &self.request_id,
            client: self.peer.client,
            listener: self.peer.listener,
            cluster,
            backend,
            method: &self.req.method,
            host: &self.req.authority,
            path: &self.req.target,
            status,
            bytes_in: self.ex.bytes_in,
            bytes_out: self.ex.bytes_out,
            duration: self
                .ex
                .started
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
            backend_time: self
                .ex
                .backend_ready
                .zip(self.ex.first_response_byte)
                .map(|(a, b)| b.saturating_duration_since(a)),
            error: self.ex.error,
        };
        cx.stats.request(&record, true);
        cx.log.log(&record);
    }
}

enum ReadOutcome {
    Data(usize),
    Blocked,
    /// No room left in the buffer: wait for the other side to drain it.
    Full,
    Eof,
    Error,
}

enum WriteOutcome {
    Wrote(usize),
    Nothing,
    Blocked,
    Error,
}

/// The buffer is full of bytes the parser cannot use yet and nothing parsed waits to be
/// sent: a line longer than the buffer, which no read can complete.
fn stuck(kawa: &Kawa<PoolBuf>) -> bool {
    kawa.storage.available_space() == 0 && kawa.blocks.is_empty() && kawa.out.is_empty()
}

/// Reads what the socket has into the kawa buffer, as far as it has room.
fn read_into(
    stream: &mut impl Read,
    readable: &mut bool,
    hup: bool,
    kawa: &mut Kawa<PoolBuf>,
) -> ReadOutcome {
    if !*readable {
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
                if n < room && !hup {
                    // A short read drained the socket: with edge-triggered readiness the next
                    // bytes bring a new event, so skip the read that would say EAGAIN. Not
                    // after a hang-up, which came in an event already consumed: the next read
                    // must see the end of the stream.
                    *readable = false;
                }
                return ReadOutcome::Data(n);
            }
            Err(e) if would_block(&e) => {
                *readable = false;
                return ReadOutcome::Blocked;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return ReadOutcome::Error,
        }
    }
}

/// Converts parsed blocks to HTTP/1.1 bytes and writes as much as the socket takes.
fn write_kawa(
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
        let slices: Vec<IoSlice<'_>> = kawa.as_io_slice();
        match stream.write_vectored(&slices) {
            Ok(0) => return WriteOutcome::Error,
            Ok(n) => {
                drop(slices);
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
fn read_raw(
    stream: &mut impl Read,
    readable: &mut bool,
    hup: bool,
    kawa: &mut Kawa<PoolBuf>,
) -> ReadOutcome {
    kawa.blocks.clear();
    kawa.out.clear();
    read_into(stream, readable, hup, kawa)
}

/// Pipe mode: write the raw bytes held in the buffer.
fn write_raw(
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
