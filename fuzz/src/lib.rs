//! What the fuzz targets share: how a fuzz input is split into a network plan and a byte
//! stream, and the checks run on what `lb_proxy::http::memory` drove.
//!
//! Input layout (both targets):
//!
//! ```text
//! byte 0      buffer size: b < 0xF0 -> 32 + 16*b (32..=3856); else 4096, 8192, 16384, 65536
//! byte 1      low nibble: C, number of cuts; high nibble: W, number of write sizes
//! C bytes     gaps between successive cuts (gap = byte + 1)
//! W bytes     write sizes the peer accepts, in a cycle (0 = everything)
//! 1 byte      http_response only: bit 0 HEAD, bit 1 upgrade asked, bit 2 HTTP/1.0 request,
//!             bit 3 the client connection closes after the response
//! rest        the byte stream (client -> kakehi, or backend -> kakehi)
//! ```
//!
//! `KAKEHI_FUZZ_WHOLE_WRITES=1` in the environment ignores the write sizes (see
//! [`whole_writes`]).
//!
//! A crash is a panic anywhere (kawa, kakehi's callbacks, the driver) or a failed check:
//! no [`End::Broken`]; the same stream cut differently and written in pieces gives the same
//! bytes for every message both runs complete; each complete request forwarded is exactly one
//! well-formed HTTP/1.1 message, and so is each complete final response with a framed body.
//!
//! The differential check ([`independent_check`]): what kakehi forwards for a request it
//! completed must parse, by `httparse` (a parser that shares no code with kawa), into exactly
//! that one request — the method and target kakehi routed, one Host naming the host it routed
//! on, one framing, and a body that ends where the forwarded bytes end. Bytes left after it are
//! a request the backend would read and kakehi never routed (`Connection: content-length` in
//! issue 12 is caught by construction).

use kawa::Kind;
use lb_proxy::http::memory::{decode_message, drive_request, drive_response, End, Plan};
use lb_proxy::http::RequestInfo;

/// A decoded fuzz input.
pub struct Case<'a> {
    pub buffer_size: usize,
    pub cuts: Vec<usize>,
    pub writes: Vec<usize>,
    pub flags: u8,
    pub stream: &'a [u8],
}

/// Splits a fuzz input; `None` when it is too short for its header.
pub fn split(data: &[u8], with_flags: bool) -> Option<Case<'_>> {
    let (&size, rest) = data.split_first()?;
    let (&counts, rest) = rest.split_first()?;
    let buffer_size = match size {
        0..=0xEF => 32 + 16 * usize::from(size),
        _ => [4096, 8192, 16384, 65536][usize::from(size & 3)],
    };
    let (gaps, rest) = rest.split_at_checked(usize::from(counts & 0x0F))?;
    let (writes, rest) = rest.split_at_checked(usize::from(counts >> 4))?;
    let (flags, stream) = if with_flags {
        let (&flags, stream) = rest.split_first()?;
        (flags, stream)
    } else {
        (0, rest)
    };
    let mut at = 0;
    let cuts = gaps
        .iter()
        .map(|&g| {
            at += usize::from(g) + 1;
            at
        })
        .collect();
    let writes = writes
        .iter()
        .map(|&w| if w == 0 { usize::MAX } else { usize::from(w) })
        .collect();
    Some(Case {
        buffer_size,
        cuts,
        writes,
        flags,
        stream,
    })
}

/// Set `KAKEHI_FUZZ_WHOLE_WRITES=1` to take every write whole (the inputs' write sizes are
/// ignored): a way to fuzz past a known crash that needs partial writes, until it is fixed.
fn whole_writes() -> bool {
    static WHOLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WHOLE.get_or_init(|| std::env::var_os("KAKEHI_FUZZ_WHOLE_WRITES").is_some_and(|v| v != "0"))
}

impl Case<'_> {
    fn plan(&self) -> Plan<'_> {
        let writes: &[usize] = if whole_writes() { &[] } else { &self.writes };
        Plan::new(&self.cuts, self.buffer_size, writes)
    }

    /// The same stream in one read, every write taken whole.
    fn reference(&self) -> Plan<'_> {
        Plan::new(&[], self.buffer_size, &[])
    }
}

fn not_broken(end: End) {
    assert!(!matches!(end, End::Broken { .. }), "driver reached {end:?}");
}

/// The `http_request` target.
pub fn check_request(case: &Case<'_>) {
    let out = drive_request(case.stream, &case.plan());
    let reference = drive_request(case.stream, &case.reference());
    for o in out.iter().chain(&reference) {
        not_broken(o.end);
        if let End::Answered { status, .. } = o.end {
            assert!(matches!(status, 400 | 414 | 431), "answered {status}");
        }
    }
    for (i, (o, r)) in out.iter().zip(&reference).enumerate() {
        if o.end == End::Complete && r.end == End::Complete {
            assert!(
                o.forwarded == r.forwarded,
                "request {i}: cut or partial writes changed the forwarded bytes\n\
                 cut:   {:?}\nwhole: {:?}",
                String::from_utf8_lossy(&o.forwarded),
                String::from_utf8_lossy(&r.forwarded),
            );
        }
    }
    for (i, o) in out.iter().enumerate() {
        if o.end == End::Complete {
            assert!(
                decode_message(Kind::Request, &o.forwarded).is_some(),
                "request {i}: forwarded bytes are not one well-formed request: {:?}",
                String::from_utf8_lossy(&o.forwarded),
            );
            if let Err(why) = independent_check(&o.info, &o.forwarded) {
                panic!(
                    "request {i}: httparse disagrees with what kakehi routed: {why}\n\
                     routed: {} {} (host {:?})\nforwarded: {:?}",
                    o.info.method,
                    o.info.target,
                    o.info.authority,
                    String::from_utf8_lossy(&o.forwarded),
                );
            }
        }
    }
}

/// Parses `forwarded` with `httparse` and checks that it is exactly the request kakehi routed
/// (`info`): same method, same target (the path of an absolute-form target), one Host whose
/// host is the one routed on, at most one framing header, and a body that ends exactly where
/// the bytes end.
pub fn independent_check(info: &RequestInfo, forwarded: &[u8]) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(forwarded) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("head incomplete".into()),
        Err(e) => return Err(format!("head refused: {e}")),
    };
    head_agrees(info, &req)?;
    let named = |name: &'static str| -> Vec<&[u8]> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    let lengths = named("content-length");
    let codings = named("transfer-encoding");
    let body = forwarded.get(head_len..).unwrap_or_default();
    if info.upgrade {
        // Whatever follows a 101 is piped, not parsed: only the head is checked.
        return Ok(());
    }
    body_agrees(&lengths, &codings, body)
}

/// The head `httparse` read is the request kakehi routed (`info`): same method, same target
/// (the path of an absolute-form target), one Host whose host is the one routed on.
pub fn head_agrees(info: &RequestInfo, req: &httparse::Request<'_, '_>) -> Result<(), String> {
    if req.method != Some(info.method.as_str()) {
        return Err(format!("method {:?}", req.method));
    }
    let path = req.path.unwrap_or_default();
    // An absolute-form target is forwarded as sent; kakehi routed on its path.
    let routed_path = match path.split_once("://") {
        Some((_, rest)) if !path.starts_with('/') && path != "*" => {
            rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/")
        }
        _ => path,
    };
    if routed_path != info.target {
        return Err(format!("target {path:?}"));
    }
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = hosts.next().ok_or("no Host")?;
    if hosts.next().is_some() {
        return Err("several Host headers".into());
    }
    if !info.authority.is_empty() && lb_proxy::router::normalize_host(host.value) != info.authority
    {
        return Err(format!("Host {:?}", String::from_utf8_lossy(host.value)));
    }
    Ok(())
}

/// The body ends exactly where the bytes end, as the one framing header says.
fn body_agrees(lengths: &[&[u8]], codings: &[&[u8]], body: &[u8]) -> Result<(), String> {
    match (lengths, codings) {
        ([], []) if body.is_empty() => Ok(()),
        ([], []) => Err(format!(
            "{} bytes after a request without a body",
            body.len()
        )),
        ([length], []) => {
            let n: usize = std::str::from_utf8(length)
                .ok()
                .filter(|l| l.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|l| l.parse().ok())
                .ok_or("bad Content-Length")?;
            if n == body.len() {
                Ok(())
            } else {
                Err(format!("Content-Length {n}, {} bytes follow", body.len()))
            }
        }
        ([], [_, ..]) => {
            let last = codings
                .last()
                .and_then(|c| c.rsplit(|&b| b == b',').next())
                .map(|c| c.trim_ascii());
            if !last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
                return Err("Transfer-Encoding not ending in chunked".into());
            }
            let end = chunked_end(body)?;
            if end == body.len() {
                Ok(())
            } else {
                Err(format!("{} bytes after the chunked body", body.len() - end))
            }
        }
        _ => Err(format!(
            "{} Content-Length and {} Transfer-Encoding headers",
            lengths.len(),
            codings.len()
        )),
    }
}

/// Where a chunked body (with its trailers) ends, by `httparse`'s chunk-size parser.
fn chunked_end(body: &[u8]) -> Result<usize, String> {
    let mut at = 0;
    loop {
        let rest = body.get(at..).unwrap_or_default();
        let (len, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(found)) => found,
            _ => return Err(format!("bad chunk size at {at}")),
        };
        at += len;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).map_err(|_| "chunk too large")?;
        at += size;
        if body.get(at..at + 2) != Some(b"\r\n") {
            return Err(format!("no CRLF after the chunk ending at {at}"));
        }
        at += 2;
    }
    // Trailers, then the empty line.
    let rest = body.get(at..).unwrap_or_default();
    // As many slots as lines: kakehi does not cap the number of trailers.
    let lines = rest.iter().filter(|&&b| b == b'\n').count();
    let mut trailers = vec![httparse::EMPTY_HEADER; lines + 1];
    match httparse::parse_headers(rest, &mut trailers) {
        Ok(httparse::Status::Complete((len, _))) => Ok(at + len),
        _ => Err(format!("bad trailers at {at}")),
    }
}

/// The `http_response` target.
pub fn check_response(case: &Case<'_>) {
    let request = RequestInfo {
        method: if case.flags & 1 != 0 { "HEAD" } else { "GET" }.to_owned(),
        is_head: case.flags & 1 != 0,
        upgrade: case.flags & 2 != 0,
        version_10: case.flags & 4 != 0,
        close: case.flags & 8 != 0,
        ..RequestInfo::default()
    };
    let out = drive_response(case.stream, &case.plan(), &request, request.close);
    let reference = drive_response(case.stream, &case.reference(), &request, request.close);
    for r in out.responses.iter().chain(&reference.responses) {
        not_broken(r.end);
        if let End::Answered { status, .. } = r.end {
            assert_eq!(status, 502, "answered {status}");
        }
    }
    for (i, (o, r)) in out.responses.iter().zip(&reference.responses).enumerate() {
        if o.end == End::Complete && r.end == End::Complete {
            assert!(
                o.sent == r.sent,
                "response {i}: cut or partial writes changed the bytes sent\n\
                 cut:   {:?}\nwhole: {:?}",
                String::from_utf8_lossy(&o.sent),
                String::from_utf8_lossy(&r.sent),
            );
        }
    }
    let switched = |s: &lb_proxy::http::memory::ResponseStream| {
        s.responses
            .last()
            .is_some_and(|r| r.info.switching && r.end == End::Complete)
    };
    if switched(&out) && switched(&reference) {
        assert!(out.piped == reference.piped, "piped bytes differ");
    }
    for (i, r) in out.responses.iter().enumerate() {
        let framed = !request.is_head && !r.info.close_delimited && !r.info.switching;
        if r.end == End::Complete && framed {
            assert!(
                decode_message(Kind::Response, &r.sent).is_some(),
                "response {i}: bytes sent are not one well-formed response: {:?}",
                String::from_utf8_lossy(&r.sent),
            );
        }
    }
}
