//! The HTTP/1.1 exchange machine: one client connection's requests and the responses to them,
//! over kawa buffers, with no socket in it.
//!
//! The machine owns what HTTP decides: the two kawa buffers (kawa parses in place and forwards
//! as soon as bytes are parsed, so a body of any size uses the same memory), the exchange's
//! state, routing and body-size decisions, retries, kakehi's own answers, the pipe after a 101
//! and the log record of every exchange. Everything outside HTTP comes through [`Io`]: the
//! bytes of the client and of the backend (read and written through `Read`/`Write`, with the
//! readiness the owner last learnt in a [`Side`]), the time, the routes, opening and releasing
//! backend connections, the access log. Requests on one connection are served one after the
//! other, so pipelined requests are answered in order.
//!
//! Two owners drive it: `session.rs` over real sockets (registration, connects, the idle pool,
//! timers stay there), and [`super::memory`] over bytes held in memory for the unit tests and
//! the fuzz targets. Both run this very code.

mod io;
mod wire;

pub use io::{Connect, FrontWire, Http2, Io, LogEntry, Opened, Side};

use crate::balancer::Tried;
use crate::cut::Cut;
use crate::http::answers::Answer;
use crate::http::{Peer, RequestCallbacks, RequestInfo, ResponseCallbacks, ResponseInfo};
use crate::pool::PoolBuf;
use kawa::{Kawa, ParsingPhase};
use lb_config::model::Timeouts;
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use wire::{
    flush_front, linger, read_into, stuck, would_block, write_kawa, ReadOutcome, WriteOutcome,
};

/// How long a closing connection may keep draining what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// Steps one `drive` call may take before yielding to other sessions.
const MAX_STEPS: usize = 256;
/// Connect attempts for one request (the first one and the retries).
pub const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
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

/// What the owner should do with the connection after `drive` or `timeout`.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
    /// The connection speaks HTTP/2: its owner takes it over (with [`Exchange::unparsed_input`]).
    Http2,
}

enum Step {
    Progress,
    Blocked,
    Close,
    Http2,
}

/// One request's progress, for the log and for decisions about reuse.
#[derive(Default)]
struct Progress {
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
    error: Option<Cut>,
    /// The `Strict-Transport-Security` value the response gets (frontend `hsts`, over TLS).
    hsts: Option<std::sync::Arc<str>>,
}

/// The HTTP/1.1 side of one client connection.
pub struct Exchange {
    peer: Peer,
    front_kawa: Kawa<PoolBuf>,
    back_kawa: Kawa<PoolBuf>,
    state: State,
    req: RequestInfo,
    resp: ResponseInfo,
    request_id: String,
    ex: Progress,
    answer: Vec<u8>,
    answer_sent: usize,
    answer_close: bool,
    /// The response being parsed tells the client the connection closes after it.
    close_front_after: bool,
    /// The last drive hit MAX_STEPS (see `yielded`).
    yielded: bool,
    /// When the current state's clock started (accept, first head byte, last progress...).
    since: Instant,
    /// No request began on this connection yet: it may still turn out to be HTTP/2.
    fresh: bool,
    /// The client certificate of the connection, once looked up (`cert_known`).
    client_cert: Option<std::sync::Arc<crate::tls::ClientCert>>,
    cert_known: bool,
}

/// An exchange that ends (its connection closed) hands its parser's queues to the next one
/// (`http::recycle`).
impl Drop for Exchange {
    fn drop(&mut self) {
        crate::http::recycle(&mut self.front_kawa);
        crate::http::recycle(&mut self.back_kawa);
    }
}

impl Exchange {
    pub fn new(peer: Peer, front_buf: PoolBuf, back_buf: PoolBuf, now: Instant) -> Exchange {
        let mut front_kawa = Kawa::new(kawa::Kind::Request, kawa::Buffer::new(front_buf));
        let mut back_kawa = Kawa::new(kawa::Kind::Response, kawa::Buffer::new(back_buf));
        crate::http::presize(&mut front_kawa);
        crate::http::presize(&mut back_kawa);
        Exchange {
            peer,
            front_kawa,
            back_kawa,
            state: State::Idle,
            req: RequestInfo::default(),
            resp: ResponseInfo::default(),
            request_id: String::new(),
            ex: Progress::default(),
            answer: Vec::new(),
            answer_sent: 0,
            answer_close: false,
            close_front_after: false,
            yielded: false,
            since: now,
            fresh: true,
            client_cert: None,
            cert_known: false,
        }
    }

    /// What the client sent that was not parsed yet (the start of an HTTP/2 connection, after
    /// [`Flow::Http2`]).
    pub fn unparsed_input(&self) -> &[u8] {
        self.front_kawa.storage.unparsed_data()
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The last `drive` stopped at its step cap with work left: drive it again at the next
    /// turn, since bytes already waiting bring no new edge-triggered event.
    pub fn yielded(&self) -> bool {
        self.yielded
    }

    /// The request being served (or the last one).
    pub fn request(&self) -> &RequestInfo {
        &self.req
    }

    /// The response being received (or the last one).
    pub fn response(&self) -> &ResponseInfo {
        &self.resp
    }

    /// The request was read whole and every byte of it forwarded.
    pub fn request_forwarded(&self) -> bool {
        self.state == State::Forwarding
            && self.front_kawa.is_terminated()
            && self.front_kawa.is_completed()
    }

    /// Idle between requests since the returned instant (its last exchange ended, or it was
    /// accepted): a draining worker may close it once the grace has passed since then.
    pub fn idle_since(&self, handshaking: bool) -> Option<Instant> {
        (self.state == State::Idle && self.front_kawa.storage.is_empty() && !handshaking)
            .then_some(self.since)
    }

    /// After a configuration change: the request's cluster at its new position (by
    /// `cluster_of`), or none when it was removed; backends tried are forgotten.
    pub fn remap_cluster(&mut self, cluster_of: impl Fn(usize) -> Option<usize>) {
        self.ex.cluster = self.ex.cluster.and_then(cluster_of);
        self.ex.tried = Tried::default();
    }

    /// When the current state's clock started (for an idle connection: the end of its last
    /// exchange, or its accept).
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Between requests with nothing buffered either way: the buffers can go back to the pool.
    pub fn parkable(&self) -> bool {
        self.state == State::Idle
            && self.front_kawa.storage.is_empty()
            && self.back_kawa.storage.is_empty()
    }

    /// The buffers went back to the pool ([`Exchange::park`]); [`Exchange::unpark`] before
    /// driving.
    pub fn parked(&self) -> bool {
        self.front_kawa.storage.buffer.is_none()
    }

    /// Gives back the two buffers and frees what the parser and the exchange keep between
    /// requests, so that an idle connection holds nothing but this struct. Only when
    /// [`Exchange::parkable`].
    pub fn park(&mut self) -> (PoolBuf, PoolBuf) {
        for kawa in [&mut self.front_kawa, &mut self.back_kawa] {
            kawa.clear();
            kawa.storage.clear();
            crate::http::recycle(kawa);
            kawa.detached.jar = Default::default();
        }
        self.req.release();
        self.request_id = String::new();
        self.answer = Vec::new();
        let front = std::mem::replace(&mut self.front_kawa.storage.buffer, PoolBuf::none());
        let back = std::mem::replace(&mut self.back_kawa.storage.buffer, PoolBuf::none());
        (front, back)
    }

    /// Gives back the two buffers but keeps the parser's allocations (an HTTP/2 connection's
    /// spare exchange between two bursts of streams); [`Exchange::unpark`] before driving.
    /// Only when [`Exchange::parkable`].
    pub fn lend_buffers(&mut self) -> (PoolBuf, PoolBuf) {
        self.front_kawa.storage.clear();
        self.back_kawa.storage.clear();
        let front = std::mem::replace(&mut self.front_kawa.storage.buffer, PoolBuf::none());
        let back = std::mem::replace(&mut self.back_kawa.storage.buffer, PoolBuf::none());
        (front, back)
    }

    /// Takes two buffers again, after [`Exchange::park`].
    pub fn unpark(&mut self, front: PoolBuf, back: PoolBuf) {
        self.front_kawa.storage.buffer = front;
        self.back_kawa.storage.buffer = back;
        self.front_kawa.storage.clear();
        self.back_kawa.storage.clear();
        crate::http::presize(&mut self.front_kawa);
        crate::http::presize(&mut self.back_kawa);
    }

    /// Serves another stream of an HTTP/2 connection, from `now`: only when
    /// [`Exchange::parkable`] (its last exchange ended cleanly, nothing buffered). Its buffers
    /// and the parser's allocations are kept.
    pub fn reuse(&mut self, now: Instant) {
        self.since = now;
        self.yielded = false;
        self.close_front_after = false;
    }

    /// Gives the two buffers back.
    pub fn into_buffers(mut self) -> (PoolBuf, PoolBuf) {
        (
            std::mem::replace(&mut self.front_kawa.storage.buffer, PoolBuf::none()),
            std::mem::replace(&mut self.back_kawa.storage.buffer, PoolBuf::none()),
        )
    }

    /// Makes every step possible now.
    pub fn drive<I: Io>(&mut self, io: &mut I) -> Flow {
        self.yielded = true;
        for _ in 0..MAX_STEPS {
            if !flush_front(io) {
                return Flow::Close;
            }
            let step = match self.state {
                State::Idle | State::ReadingHead => self.read_head(io),
                State::Connecting => self.finish_connect(io),
                State::Forwarding => self.forward(io),
                State::Pipe => self.pipe(io),
                State::Answering => self.write_answer(io),
                State::Lingering => linger(io),
            };
            match step {
                Step::Progress => continue,
                Step::Blocked => {
                    self.yielded = false;
                    break;
                }
                Step::Close => return Flow::Close,
                Step::Http2 => return Flow::Http2,
            }
        }
        Flow::Continue
    }

    /// When the current state's time runs out.
    pub fn deadline(&self, timeouts: &Timeouts, handshaking: bool, draining: bool) -> Instant {
        let t = timeouts;
        let span = match self.state {
            // A TLS handshake gets the time a request head gets.
            State::Idle if handshaking => t.request_header,
            // Draining: an idle connection is closed after the drain's grace (counted from
            // the end of its last exchange), never at once, so that a request the client is
            // sending now is answered (with `Connection: close`) rather than reset.
            State::Idle if draining => t.front_idle.min(crate::worker::DRAIN_IDLE_GRACE),
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
    pub fn timeout<I: Io>(&mut self, io: &mut I) -> Flow {
        match self.state {
            State::Idle | State::Pipe | State::Answering | State::Lingering => Flow::Close,
            State::ReadingHead => {
                self.ex.error = Some(Cut::RequestHeaderTimeout);
                self.start_answer(io, Answer::RequestTimeout, true);
                self.drive(io)
            }
            State::Connecting => {
                self.ex.error = Some(Cut::ConnectTimeout);
                io.backend_failed(true);
                io.drop_backend();
                self.connect_next(io, Answer::GatewayTimeout);
                self.drive(io)
            }
            State::Forwarding => {
                if self.ex.response_sent {
                    self.ex.error = Some(Cut::BackendTimeoutMidResponse);
                    self.log(io, self.resp.status);
                    return Flow::Close;
                }
                self.ex.error = Some(Cut::BackendResponseTimeout);
                io.backend_failed(false);
                io.drop_backend();
                self.start_answer(io, Answer::GatewayTimeout, true);
                self.drive(io)
            }
        }
    }

    // ---- request head ----------------------------------------------------------------------

    fn read_head<I: Io>(&mut self, io: &mut I) -> Step {
        let pending = !self.front_kawa.storage.unparsed_data().is_empty();
        let mut read_any = false;
        let mut read_bytes = 0;
        if !io.front().1.eof {
            match self.read_front(io) {
                ReadOutcome::Data(n) => {
                    read_any = true;
                    read_bytes = n as u64;
                }
                ReadOutcome::Blocked | ReadOutcome::Full => {}
                ReadOutcome::Eof if pending => {}
                ReadOutcome::Error if io.front().0.refused_plain_http() => {
                    // Answered in clear by the TLS layer; log it and close gently.
                    io.next_request_id(&mut self.request_id);
                    self.ex = Progress {
                        started: Some(io.now()),
                        error: Some(Cut::PlainHttpToTls),
                        bytes_out: crate::http::answers::PLAIN_HTTP_TO_TLS.len() as u64,
                        ..Progress::default()
                    };
                    self.log(io, 400);
                    return self.start_linger(io);
                }
                ReadOutcome::Eof | ReadOutcome::Error => return Step::Close,
            }
        }
        let pipelined = pending && self.state == State::Idle;
        if !read_any && !pipelined {
            // Nothing new to parse (a partial head waits for more bytes).
            return if io.front().1.eof {
                Step::Close
            } else {
                Step::Blocked
            };
        }
        if self.fresh {
            match self.http2_start(io) {
                Some(Step::Http2) => return Step::Http2,
                Some(_) => return Step::Blocked,
                None => {}
            }
        }
        if self.state == State::Idle {
            self.state = State::ReadingHead;
            self.since = io.now();
            self.ex = Progress {
                started: Some(io.now()),
                bytes_in: read_bytes,
                ..Progress::default()
            };
            io.next_request_id(&mut self.request_id);
        }
        if !self.cert_known && self.peer.https {
            // Looked up once per connection (a parse and a hash): the handshake is over by the
            // time a request head is parsed.
            self.client_cert = io.front().0.client_cert();
            self.cert_known = true;
        }
        let mut callbacks = RequestCallbacks {
            peer: self.peer,
            request_id: &self.request_id,
            client_cert: self.client_cert.as_deref(),
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
            self.start_answer(io, answer, true);
            return Step::Progress;
        }
        if !self.front_kawa.is_main_phase() {
            if self.front_kawa.storage.available_space() == 0 {
                let answer = if self.front_kawa.parsing_phase == ParsingPhase::StatusLine {
                    Answer::UriTooLong
                } else {
                    Answer::HeaderTooLarge
                };
                self.ex.error = Some(Cut::RequestHeadTooLarge);
                self.start_answer(io, answer, true);
                return Step::Progress;
            }
            return if read_any {
                Step::Progress
            } else {
                Step::Blocked
            };
        }
        // A complete head: route it, then check the declared body size.
        let route = io.route(
            self.req.authority.as_bytes(),
            self.req.target.as_bytes(),
            self.req.method.as_bytes(),
        );
        if let Some((cluster, true)) = route {
            self.ex.cluster = Some(cluster);
            self.ex.error = Some(Cut::RedirectToHttps);
            let close = !self.front_kawa.is_terminated() || self.req.close;
            self.start_redirect(io, close);
            return Step::Progress;
        }
        let cluster = route.map(|(cluster, _)| cluster);
        let Some(cluster) = cluster else {
            self.ex.error = Some(Cut::NoRoute);
            // The body (if any) is not read: the connection cannot be reused after it.
            let close = !self.front_kawa.is_terminated() || self.req.close;
            self.start_answer(io, Answer::NotFound, close);
            return Step::Progress;
        };
        self.ex.cluster = Some(cluster);
        if io.over_rate(
            self.req.authority.as_bytes(),
            self.req.target.as_bytes(),
            self.req.method.as_bytes(),
        ) {
            self.ex.error = Some(Cut::RateLimited);
            // As for no route: the body is not read.
            let close = !self.front_kawa.is_terminated() || self.req.close;
            self.start_answer(io, Answer::TooManyRequests, close);
            return Step::Progress;
        }
        self.ex.hsts = io.hsts(
            self.req.authority.as_bytes(),
            self.req.target.as_bytes(),
            self.req.method.as_bytes(),
        );
        if self.body_too_large(io.max_request_body(), false) {
            self.ex.error = Some(Cut::RequestBodyTooLarge);
            self.start_answer(io, Answer::PayloadTooLarge, true);
            return Step::Progress;
        }
        self.connect_next(io, Answer::ServiceUnavailable);
        Step::Progress
    }

    /// On the first bytes of a connection: whether it speaks HTTP/2 (`Some(Step::Http2)`), may
    /// still (`Some(Step::Blocked)`: the bytes so far are the start of the client preface),
    /// or does not (`None`, and it never will).
    fn http2_start<I: Io>(&mut self, io: &mut I) -> Option<Step> {
        let data = self.front_kawa.storage.unparsed_data();
        let preface = crate::h2::frame::PREFACE;
        let n = data.len().min(preface.len());
        let verdict = match io.http2() {
            Http2::Alpn => Some(Step::Http2),
            Http2::Preface if data.get(..n) == preface.get(..n) => {
                if n == preface.len() {
                    Some(Step::Http2)
                } else if io.front().1.eof {
                    None
                } else {
                    Some(Step::Blocked)
                }
            }
            Http2::Preface | Http2::Off => None,
        };
        if verdict.is_none() || matches!(verdict, Some(Step::Http2)) {
            self.fresh = false;
        }
        verdict
    }

    /// Compares the request body with the limit. A declared Content-Length over the limit is
    /// refused before any byte of it is read; a chunked body is counted block by block once a
    /// backend is connected (`forwarding`), just before its blocks are converted and sent
    /// (each block is seen once).
    fn body_too_large(&mut self, limit: u64, forwarding: bool) -> bool {
        if limit == 0 {
            return false;
        }
        if let kawa::BodySize::Length(n) = self.front_kawa.body_size {
            return n as u64 > limit;
        }
        if !forwarding {
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
    fn connect_next<I: Io>(&mut self, io: &mut I, fallback: Answer) {
        let Some(cluster) = self.ex.cluster else {
            self.start_answer(io, Answer::BadGateway, true);
            return;
        };
        let key = io
            .hash_key(cluster)
            .and_then(|k| crate::http::hash_key_of(&self.front_kawa, &k));
        while self.ex.attempts < MAX_ATTEMPTS {
            let opened = io.open_backend(cluster, &mut self.ex.tried, self.ex.attempts + 1, key);
            let (address, ready) = match opened {
                Opened::Unavailable => break,
                Opened::Failed => {
                    self.ex.attempts += 1;
                    continue;
                }
                Opened::Ready(address) => (address, true),
                Opened::Connecting(address) => (address, false),
            };
            self.ex.attempts += 1;
            self.ex.backend = Some(address);
            self.since = io.now();
            if ready {
                self.backend_ready(io.now());
            } else {
                self.state = State::Connecting;
            }
            return;
        }
        let answer = if self.ex.attempts == 0 {
            self.ex.error.get_or_insert(Cut::NoBackendAvailable);
            Answer::ServiceUnavailable
        } else {
            self.ex.error.get_or_insert(Cut::BackendConnectFailed);
            if fallback == Answer::ServiceUnavailable {
                Answer::BadGateway
            } else {
                fallback
            }
        };
        self.start_answer(io, answer, true);
    }

    fn backend_ready(&mut self, now: Instant) {
        self.state = State::Forwarding;
        self.since = now;
        self.ex.backend_ready = Some(now);
        self.resp = ResponseInfo::default();
    }

    fn finish_connect<I: Io>(&mut self, io: &mut I) -> Step {
        match io.check_connect() {
            Connect::Missing => {
                self.start_answer(io, Answer::BadGateway, true);
                Step::Progress
            }
            Connect::Pending => Step::Blocked,
            Connect::Failed => {
                io.backend_failed(true);
                io.drop_backend();
                self.connect_next(io, Answer::BadGateway);
                Step::Progress
            }
            Connect::Established => {
                self.backend_ready(io.now());
                Step::Progress
            }
        }
    }

    // ---- forwarding ------------------------------------------------------------------------

    fn forward<I: Io>(&mut self, io: &mut I) -> Step {
        let mut progress = false;

        // Client -> backend.
        if !self.front_kawa.is_terminated() && !io.front().1.eof {
            match self.read_front(io) {
                ReadOutcome::Data(_) => {
                    progress = true;
                    kawa::h1::parse(&mut self.front_kawa, &mut kawa::h1::NoCallbacks);
                    if self.front_kawa.is_error() || crate::http::bad_trailer(&self.front_kawa) {
                        self.ex.error = Some(Cut::MalformedRequestBody);
                        return self.fail_exchange(io, Answer::BadRequest);
                    }
                }
                ReadOutcome::Eof => {
                    self.ex.error = Some(Cut::ClientClosedMidRequest);
                    self.log(io, 499);
                    return Step::Close;
                }
                ReadOutcome::Error => return Step::Close,
                ReadOutcome::Full if stuck(&self.front_kawa) => {
                    // A chunk-size or trailer line longer than the whole buffer: it can never
                    // be parsed, so answer now rather than at the request timeout.
                    self.ex.error = Some(Cut::RequestBodyLineTooLong);
                    if self.ex.response_sent {
                        self.log(io, 400);
                        return Step::Close;
                    }
                    return self.fail_exchange(io, Answer::BadRequest);
                }
                ReadOutcome::Blocked | ReadOutcome::Full => {}
            }
        }
        if self.body_too_large(io.max_request_body(), true) {
            self.ex.error = Some(Cut::RequestBodyTooLarge);
            if self.ex.response_sent {
                self.log(io, 413);
                return Step::Close;
            }
            return self.fail_exchange(io, Answer::PayloadTooLarge);
        }
        let to_back = match io.back() {
            Some((stream, side)) if self.front_kawa.is_main_phase() => {
                write_kawa(stream, &mut side.writable, &mut self.front_kawa)
            }
            _ => WriteOutcome::Nothing,
        };
        match to_back {
            WriteOutcome::Wrote(_) => progress = true,
            WriteOutcome::Blocked | WriteOutcome::Nothing => {}
            WriteOutcome::Error => {
                if !self.ex.response_sent && self.back_kawa.storage.is_empty() {
                    self.ex.error = Some(Cut::BackendClosedMidRequest);
                    return self.fail_exchange(io, Answer::BadGateway);
                }
                // The backend may have answered early and closed: keep reading its answer.
            }
        }

        // Backend -> client.
        let now = io.now();
        let draining = io.draining();
        if let Some((stream, side)) = io.back() {
            if !side.eof && !self.back_kawa.is_terminated() {
                match read_into(stream, side, &mut self.back_kawa) {
                    ReadOutcome::Data(_) => {
                        progress = true;
                        self.ex.first_response_byte.get_or_insert(now);
                        self.close_front_after = self.req.close || draining;
                        self.parse_response();
                        if self.back_kawa.is_error() {
                            self.ex.error = Some(Cut::MalformedResponse);
                            return self.fail_exchange(io, Answer::BadGateway);
                        }
                        if !self.back_kawa.is_main_phase()
                            && self.back_kawa.storage.available_space() == 0
                        {
                            // The buffer is full and the head still incomplete: it can never
                            // fit, so answer now rather than at the backend timeout.
                            self.ex.error = Some(Cut::ResponseHeadTooLarge);
                            return self.fail_exchange(io, Answer::BadGateway);
                        }
                    }
                    ReadOutcome::Eof => {
                        side.eof = true;
                        progress = true;
                        if self.resp.close_delimited
                            && self.back_kawa.parsing_phase == ParsingPhase::Body
                        {
                            self.back_kawa.parsing_phase = ParsingPhase::Terminated;
                        } else if !self.ex.response_sent && !self.back_kawa.is_main_phase() {
                            self.ex.error = Some(Cut::BackendClosedWithoutAnswer);
                            return self.fail_exchange(io, Answer::BadGateway);
                        } else {
                            self.ex.error = Some(Cut::BackendClosedMidResponse);
                        }
                    }
                    ReadOutcome::Error => {
                        if !self.ex.response_sent {
                            self.ex.error =
                                Some(io.back_failure().unwrap_or(Cut::BackendConnectionError));
                            return self.fail_exchange(io, Answer::BadGateway);
                        }
                        self.ex.error = Some(Cut::BackendConnectionErrorMidResponse);
                        self.log(io, self.resp.status);
                        return Step::Close;
                    }
                    ReadOutcome::Full if stuck(&self.back_kawa) => {
                        self.ex.error = Some(Cut::ResponseBodyLineTooLong);
                        if !self.ex.response_sent {
                            return self.fail_exchange(io, Answer::BadGateway);
                        }
                        self.log(io, self.resp.status);
                        return Step::Close;
                    }
                    ReadOutcome::Blocked | ReadOutcome::Full => {}
                }
            }
        }
        if self.back_kawa.is_main_phase() {
            let (front, side) = io.front();
            match write_kawa(front, &mut side.writable, &mut self.back_kawa) {
                WriteOutcome::Wrote(n) => {
                    progress = true;
                    self.ex.response_sent = true;
                    self.ex.bytes_out += n as u64;
                }
                WriteOutcome::Error => {
                    self.ex.error = Some(Cut::ClientConnectionError);
                    self.log(io, self.resp.status);
                    return Step::Close;
                }
                WriteOutcome::Blocked | WriteOutcome::Nothing => {}
            }
        }

        // A response fully delivered?
        if self.back_kawa.is_terminated() && self.back_kawa.is_completed() {
            io.response_done(&self.resp);
            if self.resp.interim {
                // 100 Continue and friends: the real response follows, maybe already read.
                self.back_kawa.clear();
                self.resp = ResponseInfo::default();
                if !self.back_kawa.storage.unparsed_data().is_empty() {
                    self.parse_response();
                    if self.back_kawa.is_error() {
                        self.ex.error = Some(Cut::MalformedResponse);
                        return self.fail_exchange(io, Answer::BadGateway);
                    }
                }
                return Step::Progress;
            }
            if self.resp.switching {
                self.log(io, 101);
                self.state = State::Pipe;
                self.since = io.now();
                return Step::Progress;
            }
            return self.finish_exchange(io);
        }
        if io.back().is_some_and(|(_, side)| side.eof) && !self.back_kawa.is_terminated() {
            // Backend gone mid-response: what was sent is all the client gets.
            self.log(io, self.resp.status);
            return Step::Close;
        }
        if progress {
            self.since = io.now();
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
            hsts: self.ex.hsts.as_deref(),
            info: &mut self.resp,
        };
        kawa::h1::parse(&mut self.back_kawa, &mut callbacks);
    }

    /// The exchange failed: answer it ourselves if the client saw no response byte yet,
    /// otherwise cut the connection (an answer appended to a partial response would be
    /// read as part of it).
    fn fail_exchange<I: Io>(&mut self, io: &mut I, answer: Answer) -> Step {
        // A 502 is the backend's failure (closed without answering, not HTTP...): it counts
        // for passive health like a 5xx it sent itself.
        if answer == Answer::BadGateway {
            io.backend_failed(false);
        }
        if self.ex.response_sent {
            self.log(io, self.resp.status);
            return Step::Close;
        }
        io.drop_backend();
        self.start_answer(io, answer, true);
        Step::Progress
    }

    /// The response is delivered: log, recycle the backend connection, and either wait for the
    /// next request on this connection or close it.
    fn finish_exchange<I: Io>(&mut self, io: &mut I) -> Step {
        let request_done = self.front_kawa.is_terminated() && self.front_kawa.is_completed();
        self.log(io, self.resp.status);
        if let Some((_, side)) = io.back() {
            let reusable = request_done
                && !self.resp.backend_close
                && !side.eof
                && self.back_kawa.storage.is_empty();
            io.release_backend(self.resp.status < 500, reusable);
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
            && (!io.front().1.eof || more_buffered);
        if !keep {
            return self.start_linger(io);
        }
        self.reset_for_next_request(io.now());
        Step::Progress
    }

    fn reset_for_next_request(&mut self, now: Instant) {
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
        self.since = now;
    }

    // ---- kakehi's own answers and closing --------------------------------------------------

    fn start_answer<I: Io>(&mut self, io: &mut I, answer: Answer, close: bool) {
        self.start_answer_with(io, answer.status(), close, |id, keep| {
            answer.render(id, keep)
        });
    }

    /// 301 to the same host and target in https (a frontend with `redirect_https`).
    fn start_redirect<I: Io>(&mut self, io: &mut I, close: bool) {
        let host = crate::router::normalize_host(self.req.authority.as_bytes());
        let target = self.req.target.as_str();
        // An absolute-form target keeps only its path and query.
        let path = match target.split_once("://") {
            Some((_, rest)) => rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/"),
            None if target.starts_with('/') => target,
            None => "/",
        };
        let location = format!("https://{host}{path}");
        self.start_answer_with(io, 301, close, |id, keep| {
            crate::http::answers::render_redirect(&location, id, keep)
        });
    }

    fn start_answer_with<I: Io>(
        &mut self,
        io: &mut I,
        status: u16,
        close: bool,
        render: impl FnOnce(&str, bool) -> Vec<u8>,
    ) {
        io.drop_backend();
        if self.request_id.is_empty() {
            io.next_request_id(&mut self.request_id);
        }
        let close = close || self.req.close || io.draining();
        self.answer = render(&self.request_id, !close);
        self.answer_sent = 0;
        self.answer_close = close;
        self.ex.bytes_out += self.answer.len() as u64;
        self.state = State::Answering;
        self.since = io.now();
        self.log(io, status);
    }

    fn write_answer<I: Io>(&mut self, io: &mut I) -> Step {
        let (front, side) = io.front();
        while self.answer_sent < self.answer.len() {
            if !side.writable {
                return Step::Blocked;
            }
            let rest = self.answer.get(self.answer_sent..).unwrap_or_default();
            match front.write(rest) {
                Ok(0) => return Step::Close,
                Ok(n) => self.answer_sent += n,
                Err(e) if would_block(&e) => {
                    side.writable = false;
                    return Step::Blocked;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
        if self.answer_close {
            return self.start_linger(io);
        }
        // Kept alive: the request was read whole (see read_head); drop its parsed blocks and
        // keep what follows it (a pipelined request).
        self.front_kawa.blocks.clear();
        self.front_kawa.out.clear();
        self.front_kawa.storage.start = self.front_kawa.storage.head;
        self.reset_for_next_request(io.now());
        Step::Progress
    }

    fn start_linger<I: Io>(&mut self, io: &mut I) -> Step {
        // The client said `Connection: close`, nothing of it is left unread and no event
        // says more came: it sends nothing else, so close at once (what was written still
        // goes out before the FIN). Otherwise shut the write side and read until the client
        // closes: closing with unread bytes would reset the connection and could destroy the
        // answer before the client reads it.
        let (front, side) = io.front();
        let quiet = self.req.close
            && self.front_kawa.is_terminated()
            && self.front_kawa.is_completed()
            && !side.readable
            && self.front_kawa.storage.unparsed_data().is_empty()
            && !front.is_tls();
        if quiet && !front.has_pending() {
            return Step::Close;
        }
        front.shutdown_write();
        self.state = State::Lingering;
        Step::Progress
    }

    // ---- helpers ---------------------------------------------------------------------------

    fn log<I: Io>(&mut self, io: &mut I, status: u16) {
        let now = io.now();
        let proto = io.front().0.proto();
        io.log(&LogEntry {
            request_id: &self.request_id,
            req: &self.req,
            resp: &self.resp,
            answered: self.state == State::Answering,
            cluster: self.ex.cluster,
            backend: self.ex.backend,
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
            proto,
            client_cert: self.client_cert.as_deref(),
        });
    }
}
