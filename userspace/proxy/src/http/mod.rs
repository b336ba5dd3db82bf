//! HTTP/1.1 message handling on top of kawa, without sockets (sans-io).
//!
//! kawa parses a message in place into blocks; this module adds what a reverse proxy needs at
//! the moment a header is complete (`on_headers`): the request-smuggling checks kawa leaves to
//! its user (Content-Length together with Transfer-Encoding, several Host headers, a Host that
//! contradicts an absolute-form target, a missing Host), hop-by-hop headers removed as RFC 9110
//! §7.6.1 says, the forwarding headers added (X-Forwarded-For/-Proto/-Port, Forwarded,
//! X-Request-Id), and the facts the session needs to keep or close each connection.
//! `session.rs` moves the bytes; `answers.rs` holds kakehi's own responses.

pub mod answers;
pub mod exchange;
pub mod memory;
pub mod syntax;

use crate::cut::Cut;
use kawa::{
    AsBuffer, Block, BodySize, Kawa, OutBlock, Pair, ParsingPhase, StatusLine, Store, Version,
};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;

/// Converts the parsed blocks to HTTP/1.1 output, keeping kawa's invariant that the slices
/// in `out` point into the buffer in increasing order.
///
/// kawa frees buffer space up to the first slice in `out` (`Kawa::consume`) and shifts all
/// of them by the same amount (`push_left`); both assume the first slice is the leftmost.
/// Its H1 converter breaks that for a Host moved into the request line (a Host header after
/// other headers, or an absolute-form target) and for cookies gathered from Cookie headers
/// that are apart: after a partial write, `consume` then underflows (a panic in debug builds,
/// freed bytes still referenced in release builds). Any slice that starts before one already
/// in `out` is copied out of the buffer here, so the invariant holds whatever the input.
pub fn prepare<T: AsBuffer>(kawa: &mut Kawa<T>) {
    kawa.prepare(&mut kawa::h1::BlockConverter);
    let buf = kawa.storage.buffer();
    let mut high = 0u32;
    for block in kawa.out.iter_mut() {
        let kawa::OutBlock::Store(store) = block else {
            continue;
        };
        let (start, len) = match store {
            Store::Slice(slice) | Store::Detached(slice) => (slice.start, slice.len),
            _ => continue,
        };
        // Compared with the end of what is already queued: a slice inside an earlier one
        // (an absolute-form target's authority inside the target) is out of order too.
        if start < high {
            let owned = std::mem::replace(store, Store::Empty).capture(buf);
            *store = owned;
        } else {
            high = start.saturating_add(len);
        }
    }
}

/// What the proxy learnt from a request head, kept for routing, the response and the log.
/// The strings are reused from one request to the next.
#[derive(Debug, Default, Clone)]
pub struct RequestInfo {
    pub method: String,
    /// Host without port, lower-case (from the Host header or an absolute-form target).
    pub authority: String,
    /// The request target as sent (origin-form path and query).
    pub target: String,
    pub version_10: bool,
    /// The client asked to close after this request (or spoke HTTP/1.0 without keep-alive).
    pub close: bool,
    /// The client asked for a protocol upgrade (WebSocket).
    pub upgrade: bool,
    pub expect_continue: bool,
    pub is_head: bool,
    /// Why the head was refused, when it was.
    pub refused: Option<Cut>,
    /// The status of that refusal: 400, or 431 for a head over the field or crumb caps.
    pub refused_status: u16,
}

impl RequestInfo {
    /// Clears and frees the strings (an idle connection keeps no allocation).
    pub fn release(&mut self) {
        self.clear();
        self.method = String::new();
        self.authority = String::new();
        self.target = String::new();
    }

    pub fn clear(&mut self) {
        self.method.clear();
        self.authority.clear();
        self.target.clear();
        self.version_10 = false;
        self.close = false;
        self.upgrade = false;
        self.expect_continue = false;
        self.is_head = false;
        self.refused = None;
        self.refused_status = 0;
        // A large request grew these; the next one starts from a small allocation again.
        for s in [&mut self.method, &mut self.authority, &mut self.target] {
            if s.capacity() > RETAINED_STRING {
                *s = String::new();
            }
        }
    }
}

/// Most header fields a request head may have (HAProxy's `tune.http.maxhdr` is 101); over it,
/// 431. Each `Cookie` line counts as one field.
pub const MAX_HEADER_FIELDS: usize = 100;
/// Most cookie crumbs (`name=value` pairs of every Cookie line together) a request may have;
/// over it, 431. kawa keeps each crumb apart, 48 bytes of metadata plus four output slices.
pub const MAX_COOKIE_CRUMBS: usize = 128;
/// String capacity a [`RequestInfo`] keeps from one request to the next.
const RETAINED_STRING: usize = 1024;
/// Capacity of kawa's block, output and cookie queues kept between two requests: what an
/// ordinary request needs, so that only a large head pays for an allocation.
const RETAINED_BLOCKS: usize = 64;
const RETAINED_OUT: usize = 256;
const RETAINED_CRUMBS: usize = 32;
/// Capacity of kawa's block and output queues an exchange starts with (a new connection, or
/// one taken out of parking): one allocation each for an ordinary head, where growing to it by
/// doubling took four or five reallocations per queue. Measured with uprobes on glibc under
/// `Connection: close` load: 16 reallocs per request before.
const INITIAL_BLOCKS: usize = 16;
const INITIAL_OUT: usize = 64;

/// After a parse of a request head: the status to refuse it with and why, or None to go on.
/// A head still arriving is checked against the caps here (each parse adds at most one
/// buffer's worth of blocks, and this runs after each); a complete one in `on_headers`.
pub fn head_refusal<T: AsBuffer>(kawa: &Kawa<T>, info: &RequestInfo) -> Option<(u16, Cut)> {
    if kawa.is_error() {
        let status = if info.refused_status == 0 {
            400
        } else {
            info.refused_status
        };
        return Some((status, info.refused.unwrap_or(Cut::MalformedRequest)));
    }
    if kawa.is_main_phase() {
        // A whole chunked request may have come with the head.
        return bad_trailer(kawa).then_some((400, Cut::InvalidTrailerName));
    }
    // Before the head ends, the blocks are the request line and one per field.
    if kawa.blocks.len() > MAX_HEADER_FIELDS + 1 {
        return Some((431, TOO_MANY_FIELDS));
    }
    if kawa.detached.jar.len() > MAX_COOKIE_CRUMBS {
        return Some((431, TOO_MANY_CRUMBS));
    }
    None
}

const TOO_MANY_FIELDS: Cut = Cut::TooManyHeaderFields;
const TOO_MANY_CRUMBS: Cut = Cut::TooManyCookieCrumbs;

/// Whether a chunked request holds a trailer whose name is not a token. kawa's name scan lets
/// `/` and `"` through; the head's names are checked in `on_headers`, so any such name among
/// the blocks is a trailer's. Only chunked bodies have trailers: nothing is scanned otherwise.
pub fn bad_trailer<T: AsBuffer>(kawa: &Kawa<T>) -> bool {
    if kawa.body_size != BodySize::Chunked {
        return false;
    }
    let buf = kawa.storage.buffer();
    kawa.blocks.iter().any(|b| match b {
        // An elided header is `Store::Empty`; an empty name parsed from the wire is not.
        Block::Header(Pair { key, .. }) if !matches!(key, Store::Empty) => {
            !syntax::is_token(bytes(key, buf))
        }
        _ => false,
    })
}

/// Drops the parsed blocks of a head that will not be forwarded (it was refused) and gives
/// back what it made kawa allocate; the bytes stay in the buffer.
pub fn forget_head<T: AsBuffer>(kawa: &mut Kawa<T>) {
    kawa.blocks.clear();
    kawa.out.clear();
    kawa.detached.jar.clear();
    shrink(kawa);
}

/// A block queue and an output queue that an exchange gave back, empty, with their capacity.
type SpareQueues = (VecDeque<Block>, VecDeque<OutBlock>);

/// Most queue pairs a worker keeps for the next exchanges ([`recycle`]): about 4 KiB each, so
/// at most 256 KiB per worker, whatever the number of connections.
const SPARE_QUEUES: usize = 64;

thread_local! {
    /// The worker's spare queues. A worker is one thread; each thread has its own.
    static SPARES: RefCell<Vec<SpareQueues>> = const { RefCell::new(Vec::new()) };
}

/// How many queue pairs this thread keeps ([`recycle`]).
#[cfg(test)]
pub fn spare_queues() -> usize {
    SPARES.with(|spares| spares.borrow().len())
}

/// Gives kawa's queues the capacity an ordinary head needs at once ([`INITIAL_BLOCKS`],
/// [`INITIAL_OUT`]): queues an ended exchange gave back ([`recycle`]) when there are some,
/// else one allocation each.
pub fn presize<T: AsBuffer>(kawa: &mut Kawa<T>) {
    if kawa.blocks.capacity() < INITIAL_BLOCKS
        && kawa.out.capacity() < INITIAL_OUT
        && kawa.blocks.is_empty()
        && kawa.out.is_empty()
    {
        if let Some((blocks, out)) = SPARES.with(|spares| spares.borrow_mut().pop()) {
            kawa.blocks = blocks;
            kawa.out = out;
            return;
        }
    }
    kawa.blocks.reserve(INITIAL_BLOCKS);
    kawa.out.reserve(INITIAL_OUT);
}

/// Takes kawa's block and output queues away (it is left with empty ones, which hold no
/// allocation) and keeps them, emptied, for the next [`presize`], up to [`SPARE_QUEUES`]
/// pairs; a pair a large head grew past the retained capacities is freed instead. A
/// connection that closes or parks so hands its queues to the next one: under `Connection:
/// close` load that saved four allocations and four frees of 1 to 3 KiB per connection, each
/// of which glibc served outside its thread cache (and consolidated its fast bins for).
pub fn recycle<T: AsBuffer>(kawa: &mut Kawa<T>) {
    let mut blocks = std::mem::take(&mut kawa.blocks);
    let mut out = std::mem::take(&mut kawa.out);
    let usable = (INITIAL_BLOCKS..=RETAINED_BLOCKS).contains(&blocks.capacity())
        && (INITIAL_OUT..=RETAINED_OUT).contains(&out.capacity());
    if !usable {
        return;
    }
    blocks.clear();
    out.clear();
    SPARES.with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < SPARE_QUEUES {
            spares.push((blocks, out));
        }
    });
}

/// Gives back the queue capacity a large message grew, down to what an ordinary one needs
/// (between two requests on a connection, so that a connection's metadata does not keep the
/// size of its largest request).
pub fn shrink<T: AsBuffer>(kawa: &mut Kawa<T>) {
    kawa.blocks.shrink_to(RETAINED_BLOCKS);
    kawa.out.shrink_to(RETAINED_OUT);
    kawa.detached.jar.shrink_to(RETAINED_CRUMBS);
}

/// The connection-level facts of the listener a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub client: SocketAddr,
    pub listener: SocketAddr,
    pub https: bool,
}

/// kawa callbacks for a request head.
pub struct RequestCallbacks<'a> {
    pub peer: Peer,
    pub request_id: &'a str,
    /// The client certificate the TLS handshake verified, told to the backend.
    pub client_cert: Option<&'a crate::tls::ClientCert>,
    pub info: &'a mut RequestInfo,
}

/// The bytes of a kawa store; an elided or empty store gives an empty slice (kawa's own
/// `Store::data` panics on `Store::Empty`, which elided headers hold).
/// The Maglev key of a request whose cluster hashes a header or a cookie: the hash of its
/// value (the first header of that name, the first cookie of that name); None when the
/// request has none, or the key is the source IP.
pub fn hash_key_of<T: AsBuffer>(kawa: &Kawa<T>, key: &lb_config::HashKey) -> Option<u64> {
    let buf = kawa.storage.buffer();
    match key {
        lb_config::HashKey::SourceIp => None,
        lb_config::HashKey::Header(name) => kawa.blocks.iter().find_map(|block| match block {
            Block::Header(Pair { key, val }) if eq(bytes(key, buf), name.as_bytes()) => {
                Some(crate::maglev::hash(3, bytes(val, buf)))
            }
            _ => None,
        }),
        lb_config::HashKey::Cookie(name) => kawa
            .detached
            .jar
            .iter()
            .find(|crumb| bytes(&crumb.key, buf) == name.as_bytes())
            .map(|crumb| crate::maglev::hash(4, bytes(&crumb.val, buf))),
    }
}

fn bytes<'a>(store: &'a Store, buf: &'a [u8]) -> &'a [u8] {
    store.data_opt(buf).unwrap_or_default()
}

fn eq(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy Proxy-Connection.
fn is_hop_by_hop(name: &[u8]) -> bool {
    [
        &b"connection"[..],
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
    ]
    .iter()
    .any(|h| eq(name, h))
}

/// Headers that frame or route the request: a `Connection` header naming one of them is
/// refused, since removing it (RFC 9110 §7.6.1) would change how the backend reads the bytes
/// that follow, and keeping it would disobey the client. `Upgrade` is handled as a token of
/// its own.
fn is_relied_on(name: &[u8]) -> bool {
    [&b"host"[..], b"content-length", b"transfer-encoding"]
        .iter()
        .any(|h| eq(name, h))
}

/// Headers kakehi sets itself and so removes from what the client sent.
fn is_forwarding_header(name: &[u8]) -> bool {
    [
        &b"x-forwarded-proto"[..],
        b"x-forwarded-port",
        b"x-forwarded-host",
        b"x-request-id",
        b"x-client-cert-subject",
        b"x-client-cert-fingerprint",
    ]
    .iter()
    .any(|h| eq(name, h))
}

/// What [`check_raw_head`] found in the raw head.
struct RawHead<'a> {
    host_headers: usize,
    host_value: &'a [u8],
    transfer_encoding: bool,
}

/// Checks over the raw head that kawa's representation no longer shows (it elides a
/// Content-Length that a Transfer-Encoding overrides, and every Host header).
fn check_raw_head(raw: &[u8]) -> Result<RawHead<'_>, Cut> {
    let mut hosts = 0;
    let mut host_value: &[u8] = &[];
    let mut content_length = false;
    let mut transfer_encoding = false;
    // Skip the request line; kawa already checked it and every line's CRLF.
    for line in raw.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line.get(..colon).unwrap_or_default();
        if name.is_empty() {
            return Err(Cut::EmptyHeaderName);
        }
        if !syntax::is_token(name) {
            // kawa's SIMD name scan lets `/` and `"` through (its own note): a name a backend
            // might read otherwise.
            return Err(Cut::InvalidHeaderName);
        }
        if eq(name, b"host") {
            hosts += 1;
            host_value = line.get(colon + 1..).unwrap_or_default().trim_ascii();
        } else if eq(name, b"content-length") {
            content_length = true;
        } else if eq(name, b"transfer-encoding") {
            transfer_encoding = true;
        }
    }
    if content_length && transfer_encoding {
        return Err(Cut::ContentLengthAndTransferEncoding);
    }
    if hosts > 1 {
        return Err(Cut::SeveralHostHeaders);
    }
    Ok(RawHead {
        host_headers: hosts,
        host_value,
        transfer_encoding,
    })
}

fn refuse<T: AsBuffer>(kawa: &mut Kawa<T>, info: &mut RequestInfo, why: Cut) {
    refuse_with(kawa, info, 400, why);
}

fn refuse_with<T: AsBuffer>(kawa: &mut Kawa<T>, info: &mut RequestInfo, status: u16, why: Cut) {
    info.refused = Some(why);
    info.refused_status = status;
    kawa.parsing_phase.error(why.as_str().into());
}

impl<T: AsBuffer> kawa::h1::ParserCallbacks<T> for RequestCallbacks<'_> {
    fn on_headers(&mut self, kawa: &mut Kawa<T>) {
        let info = &mut *self.info;
        // The caps, before anything is added: one block per field (a Cookie line is a
        // `Cookies` block, its crumbs in the jar).
        let fields = kawa
            .blocks
            .iter()
            .filter(|b| matches!(b, Block::Header(_) | Block::Cookies))
            .count();
        if fields > MAX_HEADER_FIELDS {
            return refuse_with(kawa, info, 431, TOO_MANY_FIELDS);
        }
        if kawa.detached.jar.len() > MAX_COOKIE_CRUMBS {
            return refuse_with(kawa, info, 431, TOO_MANY_CRUMBS);
        }
        let buf = kawa.storage.buffer();
        let raw = buf
            .get(kawa.storage.start..kawa.storage.head)
            .unwrap_or_default();
        let RawHead {
            host_headers,
            host_value,
            transfer_encoding,
        } = match check_raw_head(raw) {
            Ok(found) => found,
            Err(why) => return refuse(kawa, info, why),
        };

        let StatusLine::Request {
            version,
            method,
            uri,
            authority,
            path,
        } = &kawa.detached.status_line
        else {
            return refuse(kawa, info, Cut::NoRequestLine);
        };
        info.version_10 = matches!(version, Version::V10);
        if info.version_10 && transfer_encoding {
            // RFC 9112 §6.1: the framing is faulty; an HTTP/1.0 hop behind kakehi may ignore
            // Transfer-Encoding and read the chunks as requests.
            return refuse(kawa, info, Cut::TransferEncodingInHttp10);
        }
        let method = bytes(method, buf);
        if !syntax::is_token(method) {
            // kawa takes a request line that starts with a space as an empty method.
            return refuse(kawa, info, Cut::MethodNotToken);
        }
        info.method.push_str(&String::from_utf8_lossy(method));
        info.is_head = eq(method, b"HEAD");
        if eq(method, b"CONNECT") {
            return refuse(kawa, info, Cut::ConnectMethod);
        }
        let uri = bytes(uri, buf);
        if uri.is_empty() {
            // kawa takes `GET  HTTP/1.1` as an empty target (and routes it as `/`).
            return refuse(kawa, info, Cut::EmptyTarget);
        }
        if uri.contains(&b'#') {
            // No fragment in a request target (RFC 9112 §3.2); kawa splits an absolute-form
            // target at it differently from other parsers (`http://a#:80/x`).
            return refuse(kawa, info, Cut::FragmentInTarget);
        }
        let absolute_form = !uri.starts_with(b"/") && uri != b"*";
        if absolute_form && host_headers == 1 {
            // RFC 9112 §3.2.2: the target's authority wins; a Host that disagrees is a
            // request built to confuse one hop or the other.
            if !eq(host_value, bytes(authority, buf)) {
                return refuse(kawa, info, Cut::TargetHostMismatch);
            }
        }
        if host_headers == 0 && !info.version_10 {
            return refuse(kawa, info, Cut::MissingHost);
        }
        let authority = bytes(authority, buf);
        if authority.is_empty() && !info.version_10 {
            return refuse(kawa, info, Cut::EmptyHost);
        }
        let missing_authority = authority.is_empty();
        if !missing_authority && !syntax::is_valid_host(authority) {
            return refuse(kawa, info, Cut::InvalidHost);
        }
        info.authority
            .push_str(&crate::router::normalize_host(authority));
        let path = bytes(path, buf);
        if !path.starts_with(b"/") && path != b"*" {
            return refuse(kawa, info, Cut::TargetWithoutPath);
        }
        if path.starts_with(b"/") && syntax::needs_normalizing(path) {
            // Route on the normalized path and forward exactly that path (origin-form), so no
            // backend can read `/pub/../admin` as something other than what was routed.
            let normal = match syntax::normalize_path(path) {
                Ok(normal) => normal,
                Err(e) => return refuse(kawa, info, e.cut()),
            };
            info.target.push_str(&String::from_utf8_lossy(&normal));
            if let StatusLine::Request { uri, .. } = &mut kawa.detached.status_line {
                *uri = Store::from_vec(normal);
            }
        } else {
            info.target.push_str(&String::from_utf8_lossy(path));
        }
        if missing_authority {
            // HTTP/1.0 without Host: name the listener, so the backend still gets a Host line
            // (kawa cannot write an empty one).
            if let StatusLine::Request { authority, .. } = &mut kawa.detached.status_line {
                *authority = Store::from_string(self.peer.listener.to_string());
            }
        }

        // Connection tokens, hop-by-hop removal and the headers kakehi replaces.
        let mut upgrade_token = false;
        let mut keep_alive_token = false;
        let mut close_token = false;
        let mut connection_named: Vec<Vec<u8>> = Vec::new();
        let mut names_relied_on = false;
        let mut has_upgrade_header = false;
        let mut prior_xff: Option<String> = None;
        let mut prior_forwarded: Option<String> = None;
        for block in kawa.blocks.iter() {
            if let Block::Header(Pair { key, val }) = block {
                let name = bytes(key, buf);
                let value = bytes(val, buf);
                if eq(name, b"connection") {
                    for t in tokens(value) {
                        if eq(t, b"close") {
                            close_token = true;
                        } else if eq(t, b"keep-alive") {
                            keep_alive_token = true;
                        } else if eq(t, b"upgrade") {
                            upgrade_token = true;
                        } else if is_relied_on(t) {
                            names_relied_on = true;
                        } else {
                            connection_named.push(t.to_ascii_lowercase());
                        }
                    }
                } else if eq(name, b"upgrade") {
                    has_upgrade_header = true;
                } else if eq(name, b"expect") && eq(value, b"100-continue") {
                    info.expect_continue = true;
                } else if eq(name, b"x-forwarded-for") {
                    let v = String::from_utf8_lossy(value);
                    prior_xff = Some(match prior_xff {
                        Some(p) => format!("{p}, {v}"),
                        None => v.into_owned(),
                    });
                } else if eq(name, b"forwarded")
                    && !value.is_empty()
                    && syntax::is_valid_forwarded(value)
                {
                    // A malformed value (an unclosed quote...) is dropped: appended to, it
                    // could swallow kakehi's own element.
                    let v = String::from_utf8_lossy(value);
                    prior_forwarded = Some(match prior_forwarded {
                        Some(p) => format!("{p}, {v}"),
                        None => v.into_owned(),
                    });
                }
            }
        }
        if names_relied_on {
            // Removing it as hop-by-hop while the body still goes out would let the backend
            // read the body as a request kakehi never routed.
            return refuse(kawa, info, Cut::ConnectionNamesReliedOnHeader);
        }
        info.upgrade = upgrade_token && has_upgrade_header && kawa.body_size != BodySize::Chunked;
        info.close = close_token || (info.version_10 && !keep_alive_token);

        let upgrade = info.upgrade;
        for block in kawa.blocks.iter_mut() {
            if let Block::Header(pair) = block {
                let name = bytes(&pair.key, buf);
                let keep_for_upgrade = upgrade && eq(name, b"upgrade");
                let drop = (is_hop_by_hop(name) && !keep_for_upgrade)
                    || is_forwarding_header(name)
                    || eq(name, b"x-forwarded-for")
                    || eq(name, b"forwarded")
                    || connection_named.iter().any(|n| eq(name, n));
                if drop {
                    pair.elide();
                }
            }
        }

        // The client's address formatted once, for both headers.
        let client_ip = self.peer.client.ip().to_string();
        let proto: &'static [u8] = if self.peer.https { b"https" } else { b"http" };
        let mut element = String::with_capacity(64);
        element.push_str("for=");
        if self.peer.client.is_ipv6() {
            element.push_str("\"[");
            element.push_str(&client_ip);
            element.push_str("]\"");
        } else {
            element.push_str(&client_ip);
        }
        element.push_str(if self.peer.https {
            ";proto=https"
        } else {
            ";proto=http"
        });
        let xff = match prior_xff {
            Some(p) => format!("{p}, {client_ip}"),
            None => client_ip,
        };
        if !info.authority.is_empty() {
            // A valid host is a token, except an IPv6 literal (brackets, colons).
            element.push_str(";host=");
            syntax::push_token_or_quoted(&mut element, &info.authority);
        }
        let forwarded = match prior_forwarded {
            Some(p) => format!("{p}, {element}"),
            None => element,
        };
        let port = self.peer.listener.port().to_string();
        let mut add = |key: &'static [u8], val: Store| {
            kawa.blocks.push_back(Block::Header(Pair {
                key: Store::Static(key),
                val,
            }));
        };
        add(b"X-Forwarded-For", Store::from_string(xff));
        add(b"X-Forwarded-Proto", Store::Static(proto));
        add(b"X-Forwarded-Port", Store::from_string(port));
        add(b"Forwarded", Store::from_string(forwarded));
        add(
            b"X-Request-Id",
            Store::from_slice(self.request_id.as_bytes()),
        );
        if let Some(cert) = self.client_cert {
            add(
                b"X-Client-Cert-Subject",
                Store::from_slice(cert.subject.as_bytes()),
            );
            add(
                b"X-Client-Cert-Fingerprint",
                Store::from_slice(cert.fingerprint.as_bytes()),
            );
        }
        if upgrade {
            add(b"Connection", Store::Static(b"Upgrade"));
        } else if info.version_10 {
            add(b"Connection", Store::Static(b"keep-alive"));
        }
    }
}

/// What the proxy learnt from a response head.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResponseInfo {
    pub status: u16,
    /// The backend will close after this response (or framed it by closing).
    pub backend_close: bool,
    /// The body ends when the backend closes: the client connection cannot be reused either.
    pub close_delimited: bool,
    /// 101: the connection becomes a byte pipe.
    pub switching: bool,
    /// 1xx other than 101: another response head follows.
    pub interim: bool,
    /// The head sent to the client said `Connection: close`: the proxy closes after it.
    pub close_front: bool,
}

/// kawa callbacks for a response head.
pub struct ResponseCallbacks<'a> {
    pub request: &'a RequestInfo,
    /// The proxy will close the client connection after this response.
    pub close_front: bool,
    pub request_id: &'a str,
    /// `Strict-Transport-Security` to set (the backend's own is replaced).
    pub hsts: Option<&'a str>,
    pub info: &'a mut ResponseInfo,
}

impl<T: AsBuffer> kawa::h1::ParserCallbacks<T> for ResponseCallbacks<'_> {
    fn on_headers(&mut self, kawa: &mut Kawa<T>) {
        let buf = kawa.storage.buffer();
        let (code, version_10) = match &kawa.detached.status_line {
            StatusLine::Response { code, version, .. } => (*code, matches!(version, Version::V10)),
            _ => (0, false),
        };
        let info = &mut *self.info;
        info.status = code;
        info.switching = code == 101 && self.request.upgrade;
        info.interim = (100..200).contains(&code) && !info.switching;
        if code == 101 && !self.request.upgrade {
            // A 101 nobody asked for cannot be honoured: treat it as a broken backend.
            kawa.parsing_phase.error("unsolicited 101".into());
            return;
        }

        let mut close_token = false;
        let mut keep_alive_token = false;
        for block in kawa.blocks.iter_mut() {
            if let Block::Header(pair) = block {
                let name = bytes(&pair.key, buf);
                if eq(name, b"connection") {
                    for t in tokens(bytes(&pair.val, buf)) {
                        close_token |= eq(t, b"close");
                        keep_alive_token |= eq(t, b"keep-alive");
                    }
                }
                let keep = info.switching && (eq(name, b"upgrade") || eq(name, b"connection"));
                let replaced = self.hsts.is_some() && eq(name, b"strict-transport-security");
                if (is_hop_by_hop(name) && !keep) || replaced {
                    pair.elide();
                }
            }
        }
        info.backend_close = close_token || (version_10 && !keep_alive_token);

        if self.request.is_head && !info.interim && !info.switching {
            kawa.body_size = BodySize::Length(0);
            kawa.parsing_phase = ParsingPhase::Terminated;
        }
        info.close_delimited = kawa.body_size == BodySize::Empty && !kawa.is_terminated();
        if info.close_delimited {
            info.backend_close = true;
        }
        if info.interim || info.switching {
            return;
        }
        kawa.blocks.push_back(Block::Header(Pair {
            key: Store::Static(b"X-Request-Id"),
            val: Store::from_slice(self.request_id.as_bytes()),
        }));
        if let Some(hsts) = self.hsts {
            kawa.blocks.push_back(Block::Header(Pair {
                key: Store::Static(b"Strict-Transport-Security"),
                val: Store::from_slice(hsts.as_bytes()),
            }));
        }
        if self.close_front || info.close_delimited {
            info.close_front = true;
            kawa.blocks.push_back(Block::Header(Pair {
                key: Store::Static(b"Connection"),
                val: Store::Static(b"close"),
            }));
        } else if self.request.version_10 {
            kawa.blocks.push_back(Block::Header(Pair {
                key: Store::Static(b"Connection"),
                val: Store::Static(b"keep-alive"),
            }));
        }
    }
}

#[cfg(test)]
mod tests;
