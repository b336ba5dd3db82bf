//! Minimal HTTP/1.1 request parsing for the test origin: the request head,
//! request body framing (Content-Length / chunked) as a streaming reader, and
//! the FNV-1a 64 hash used to fingerprint bodies without storing them.

use std::io::{self, BufRead, Read};

/// Longest accepted request head (request line + headers).
const MAX_HEAD: u64 = 64 * 1024;
/// Most accepted header lines.
const MAX_HEADERS: usize = 256;
/// Longest accepted chunk-size or trailer line.
const MAX_LINE: u64 = 8 * 1024;

/// Streaming FNV-1a 64 hasher.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a64(u64);

impl Fnv1a64 {
    /// A hasher over the empty input.
    pub const fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.0;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    /// The hash of everything fed so far.
    pub const fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self::new()
    }
}

/// FNV-1a 64 of `data` (what `/digest` and `RecordedRequest::body_sha` report).
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = Fnv1a64::new();
    h.update(data);
    h.finish()
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) version: String,
    pub(crate) headers: Vec<(String, String)>,
}

impl Head {
    /// Whether any `name` header lists `token` (comma-separated, case-insensitive).
    pub(crate) fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub(crate) fn is_http11(&self) -> bool {
        self.version == "HTTP/1.1"
    }

    /// Keep-alive by default on HTTP/1.1, opt-in on HTTP/1.0.
    pub(crate) fn keep_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            false
        } else if self.is_http11() {
            true
        } else {
            self.has_token("connection", "keep-alive")
        }
    }

    /// Body framing of this request.
    pub(crate) fn body(&self) -> Result<Body, &'static str> {
        let te: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if let Some(last) = te.last() {
            if !last.eq_ignore_ascii_case("chunked") {
                return Err("unsupported transfer-encoding");
            }
            return Ok(Body::Chunked(Chunk::Size));
        }
        let mut len: Option<u64> = None;
        for (_, v) in self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            for part in v.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err("bad content-length");
                }
                let n: u64 = part.parse().map_err(|_| "bad content-length")?;
                if len.is_some_and(|l| l != n) {
                    return Err("conflicting content-length");
                }
                len = Some(n);
            }
        }
        Ok(Body::Length(len.unwrap_or(0)))
    }
}

/// Why no request head could be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// Clean EOF before any byte of a new request.
    Eof,
    /// Transport error or EOF mid-head.
    Io,
    /// Malformed head: answer 400 and close.
    Bad(&'static str),
}

/// Reads one line (up to `limit` bytes, LF included) without the line ending.
/// `Ok(None)` on EOF before any byte.
fn read_line<R: BufRead>(r: &mut R, limit: u64, out: &mut Vec<u8>) -> io::Result<Option<()>> {
    out.clear();
    let n = r.by_ref().take(limit).read_until(b'\n', out)?;
    if n == 0 {
        return Ok(None);
    }
    if out.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            if (n as u64) >= limit {
                "line too long"
            } else {
                "eof mid-line"
            },
        ));
    }
    out.pop();
    if out.last() == Some(&b'\r') {
        out.pop();
    }
    Ok(Some(()))
}

/// Reads and parses a request head.
pub(crate) fn read_head<R: BufRead>(r: &mut R) -> Result<Head, HeadError> {
    let mut line = Vec::with_capacity(256);
    let mut budget = MAX_HEAD;
    let mut next = |line: &mut Vec<u8>, first: bool| -> Result<Option<()>, HeadError> {
        if budget == 0 {
            return Err(HeadError::Bad("head too large"));
        }
        match read_line(r, budget, line) {
            Ok(Some(())) => {
                budget = budget.saturating_sub(line.len() as u64 + 2);
                Ok(Some(()))
            }
            Ok(None) if first => Ok(None),
            Ok(None) => Err(HeadError::Io),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                Err(HeadError::Bad("head too large"))
            }
            Err(_) => Err(HeadError::Io),
        }
    };
    // Request line, ignoring a few stray empty lines before it (RFC 9112 2.2).
    let mut empties = 0;
    loop {
        if next(&mut line, true)?.is_none() {
            return Err(HeadError::Eof);
        }
        if !line.is_empty() {
            break;
        }
        empties += 1;
        if empties > 4 {
            return Err(HeadError::Bad("empty lines"));
        }
    }
    let request_line = String::from_utf8_lossy(&line).into_owned();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Bad("bad request line"));
    };
    if method.is_empty() || target.is_empty() || !version.starts_with("HTTP/1.") {
        return Err(HeadError::Bad("bad request line"));
    }
    let mut headers = Vec::new();
    loop {
        if next(&mut line, false)?.is_none() {
            return Err(HeadError::Io);
        }
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(HeadError::Bad("too many headers"));
        }
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err(HeadError::Bad("obsolete line folding"));
        }
        let text = String::from_utf8_lossy(&line);
        let Some((name, value)) = text.split_once(':') else {
            return Err(HeadError::Bad("header without colon"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(HeadError::Bad("bad header name"));
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.to_owned(),
        headers,
    })
}

/// Chunked body decoder state.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many data bytes left.
    Data(u64),
    /// Last chunk and trailers consumed.
    Done,
}

/// A request body being read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Body {
    /// Content-Length framing with this many bytes left (0 = no body).
    Length(u64),
    Chunked(Chunk),
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Body {
    /// Whether the whole body has been read.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self, Body::Length(0) | Body::Chunked(Chunk::Done))
    }

    /// Reads the next piece of decoded body into `buf`; `Ok(0)` at the end.
    pub(crate) fn read<R: BufRead>(&mut self, r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
        let mut line = Vec::new();
        loop {
            match *self {
                Body::Length(0) | Body::Chunked(Chunk::Done) => return Ok(0),
                Body::Length(left) => {
                    let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let n = r.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    *self = Body::Length(left - n as u64);
                    return Ok(n);
                }
                Body::Chunked(Chunk::Size) => {
                    if read_line(r, MAX_LINE, &mut line)?.is_none() {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let text = std::str::from_utf8(&line).map_err(|_| bad("bad chunk size"))?;
                    let size = text.split(';').next().unwrap_or("").trim();
                    if size.is_empty() || size.len() > 16 {
                        return Err(bad("bad chunk size"));
                    }
                    let size = u64::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
                    if size == 0 {
                        // Trailers up to the empty line.
                        loop {
                            if read_line(r, MAX_LINE, &mut line)?.is_none() {
                                return Err(io::ErrorKind::UnexpectedEof.into());
                            }
                            if line.is_empty() {
                                break;
                            }
                        }
                        *self = Body::Chunked(Chunk::Done);
                    } else {
                        *self = Body::Chunked(Chunk::Data(size));
                    }
                }
                Body::Chunked(Chunk::Data(left)) => {
                    let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let n = r.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let left = left - n as u64;
                    if left == 0 {
                        if read_line(r, 2, &mut line)?.is_none() || !line.is_empty() {
                            return Err(bad("missing CRLF after chunk"));
                        }
                        *self = Body::Chunked(Chunk::Size);
                    } else {
                        *self = Body::Chunked(Chunk::Data(left));
                    }
                    return Ok(n);
                }
            }
        }
    }
}
