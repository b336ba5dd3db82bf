//! One origin connection: reads requests in a keep-alive loop, routes them and
//! writes the responses, streaming bodies in both directions.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::http::{read_head, Body, Fnv1a64, Head, HeadError};
use crate::{RecordedRequest, Shared};

/// Read/write buffer size; also the `/bytes/N` write size.
const IO_BUF: usize = 64 * 1024;
/// Chunk size for `/chunked/N`.
const CHUNK: usize = 8 * 1024;
/// Pattern period: byte `i` of `/bytes/N` is `i % 251`.
const PERIOD: usize = 251;

/// `PERIOD`-periodic pattern long enough for any `IO_BUF` window at any phase.
fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| (0..IO_BUF + PERIOD).map(|i| (i % PERIOD) as u8).collect())
}

/// A reader that counts every byte into the origin's `raw_bytes_received`.
struct Counting<'a> {
    inner: TcpStream,
    count: &'a AtomicUsize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}

/// How a response body is delimited.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// HTTP/1.0 peer and unknown length: delimited by closing.
    Close,
    /// 1xx / 204 / 304: no body and no length header.
    NoBody,
}

#[derive(Clone, Copy)]
enum Route {
    Default,
    Bytes(u64),
    Chunked(u64),
    Echo,
    Digest,
    Headers,
    Status(u16),
    Sleep(u64),
    Close,
    Ws,
    Health,
}

/// The path part of a request target (origin-form or absolute-form).
fn path_of(target: &str) -> &str {
    let t = match target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    t.split(['?', '#']).next().unwrap_or(t)
}

impl Route {
    fn parse(path: &str) -> Route {
        let num = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|s| s.parse::<u64>().ok())
        };
        match path {
            "/echo" => Route::Echo,
            "/digest" => Route::Digest,
            "/headers" => Route::Headers,
            "/close" => Route::Close,
            "/ws" => Route::Ws,
            "/health" => Route::Health,
            _ => {
                if let Some(n) = num("/bytes/") {
                    Route::Bytes(n)
                } else if let Some(n) = num("/chunked/") {
                    Route::Chunked(n)
                } else if let Some(c) = num("/status/").filter(|c| (100..=999).contains(c)) {
                    Route::Status(c as u16)
                } else if let Some(ms) = num("/sleep/") {
                    Route::Sleep(ms)
                } else {
                    Route::Default
                }
            }
        }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

struct Conn<'a> {
    conn_id: usize,
    shared: &'a Shared,
    reader: BufReader<Counting<'a>>,
    writer: BufWriter<TcpStream>,
    buf: Vec<u8>,
}

/// Serves one accepted connection until it closes.
pub(crate) fn serve(conn_id: usize, stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let (Ok(read_half), Ok(write_half)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let mut conn = Conn {
        conn_id,
        shared,
        reader: BufReader::with_capacity(
            IO_BUF,
            Counting {
                inner: read_half,
                count: &shared.bytes_received,
            },
        ),
        writer: BufWriter::with_capacity(IO_BUF, write_half),
        buf: vec![0; IO_BUF],
    };
    loop {
        let keep = match read_head(&mut conn.reader) {
            Ok(head) => conn.handle(&head),
            Err(HeadError::Eof | HeadError::Io) => break,
            Err(HeadError::Bad(msg)) => conn.bad_request(msg).map(|()| false),
        };
        if !matches!(keep, Ok(true)) {
            break;
        }
    }
    let _ = conn.writer.flush();
    let _ = stream.shutdown(Shutdown::Write);
    // Give the peer a moment to read before the close, so unread request
    // bytes do not turn it into a reset that discards our response.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    while matches!(conn.reader.get_mut().inner.read(&mut sink), Ok(n) if n > 0) {}
}

impl Conn<'_> {
    fn record(&self, head: &Head, body_len: u64, body_sha: u64) {
        self.shared.record(RecordedRequest {
            method: head.method.clone(),
            target: head.target.clone(),
            version: head.version.clone(),
            headers: head.headers.clone(),
            body_len,
            body_sha,
            conn_id: self.conn_id,
        });
    }

    fn write_head(
        &mut self,
        code: u16,
        content_type: Option<&str>,
        framing: Framing,
        keep: bool,
        http11: bool,
    ) -> io::Result<()> {
        let w = &mut self.writer;
        write!(w, "HTTP/1.1 {code} {}\r\n", reason(code))?;
        write!(w, "X-Origin: {}\r\n", self.shared.name)?;
        if let Some(ct) = content_type {
            write!(w, "Content-Type: {ct}\r\n")?;
        }
        match framing {
            Framing::Length(n) => write!(w, "Content-Length: {n}\r\n")?,
            Framing::Chunked => w.write_all(b"Transfer-Encoding: chunked\r\n")?,
            Framing::Close | Framing::NoBody => {}
        }
        if !keep {
            w.write_all(b"Connection: close\r\n")?;
        } else if !http11 {
            w.write_all(b"Connection: keep-alive\r\n")?;
        }
        w.write_all(b"\r\n")
    }

    /// A complete small response.
    fn respond(&mut self, head: &Head, code: u16, body: &[u8], keep: bool) -> io::Result<()> {
        let no_body = code < 200 || code == 204 || code == 304;
        let framing = if no_body {
            Framing::NoBody
        } else {
            Framing::Length(body.len() as u64)
        };
        self.write_head(code, Some("text/plain"), framing, keep, head.is_http11())?;
        if !no_body && head.method != "HEAD" {
            self.writer.write_all(body)?;
        }
        self.writer.flush()
    }

    fn bad_request(&mut self, msg: &str) -> io::Result<()> {
        self.write_head(
            400,
            Some("text/plain"),
            Framing::Length(msg.len() as u64 + 1),
            false,
            true,
        )?;
        self.writer.write_all(msg.as_bytes())?;
        self.writer.write_all(b"\n")?;
        self.writer.flush()
    }

    /// Reads (and hashes) the rest of the body; returns `(len, fnv)`.
    fn drain(&mut self, body: &mut Body) -> io::Result<(u64, u64)> {
        let mut hash = Fnv1a64::new();
        let mut len = 0u64;
        loop {
            let n = body.read(&mut self.reader, &mut self.buf)?;
            if n == 0 {
                return Ok((len, hash.finish()));
            }
            hash.update(&self.buf[..n]);
            len += n as u64;
        }
    }

    /// Handles one request; `Ok(true)` to keep the connection open.
    fn handle(&mut self, head: &Head) -> io::Result<bool> {
        let mut body = match head.body() {
            Ok(b) => b,
            Err(msg) => {
                self.bad_request(msg)?;
                return Ok(false);
            }
        };
        let mut keep = head.keep_alive();
        if head.has_token("expect", "100-continue") && head.is_http11() && !body.is_done() {
            self.writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            self.writer.flush()?;
        }
        let route = Route::parse(path_of(&head.target));
        if let Route::Echo = route {
            return self.echo(head, body, keep);
        }
        let (len, sha) = self.drain(&mut body)?;
        self.record(head, len, sha);
        let http11 = head.is_http11();
        let head_only = head.method == "HEAD";
        match route {
            Route::Default => {
                let text = format!(
                    "origin {}: {} {}\n",
                    self.shared.name, head.method, head.target
                );
                self.respond(head, 200, text.as_bytes(), keep)?;
            }
            Route::Health => self.respond(head, 200, b"ok", keep)?,
            Route::Bytes(n) => {
                self.write_head(
                    200,
                    Some("application/octet-stream"),
                    Framing::Length(n),
                    keep,
                    http11,
                )?;
                if !head_only {
                    self.write_pattern(n, false)?;
                }
                self.writer.flush()?;
            }
            Route::Chunked(n) => {
                let framing = if http11 {
                    Framing::Chunked
                } else {
                    keep = false;
                    Framing::Close
                };
                self.write_head(200, Some("application/octet-stream"), framing, keep, http11)?;
                if !head_only {
                    self.write_pattern(n, http11)?;
                }
                self.writer.flush()?;
            }
            Route::Digest => {
                let text = format!("len={len} fnv={sha:016x}\n");
                self.respond(head, 200, text.as_bytes(), keep)?;
            }
            Route::Headers => {
                let mut text = String::new();
                for (n, v) in &head.headers {
                    text.push_str(n);
                    text.push_str(": ");
                    text.push_str(v);
                    text.push('\n');
                }
                self.respond(head, 200, text.as_bytes(), keep)?;
            }
            Route::Status(code) => {
                let text = format!("status {code}\n");
                self.respond(head, code, text.as_bytes(), keep)?;
            }
            Route::Sleep(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                let text = format!("slept {ms}ms\n");
                self.respond(head, 200, text.as_bytes(), keep)?;
            }
            Route::Close => {
                keep = false;
                self.respond(head, 200, b"closing\n", keep)?;
            }
            Route::Ws => {
                if head.has_token("upgrade", "websocket") {
                    return self.websocket();
                }
                self.respond(head, 426, b"websocket upgrade required\n", keep)?;
            }
            Route::Echo => {}
        }
        Ok(keep)
    }

    /// `/bytes/N` and `/chunked/N` bodies.
    fn write_pattern(&mut self, n: u64, chunked: bool) -> io::Result<()> {
        let pat = pattern();
        let step = if chunked { CHUNK } else { IO_BUF };
        let mut off = 0u64;
        while off < n {
            let k = usize::try_from(n - off).unwrap_or(usize::MAX).min(step);
            let phase = (off % PERIOD as u64) as usize;
            let data = &pat[phase..phase + k];
            if chunked {
                write!(self.writer, "{k:x}\r\n")?;
                self.writer.write_all(data)?;
                self.writer.write_all(b"\r\n")?;
            } else {
                self.writer.write_all(data)?;
            }
            off += k as u64;
        }
        if chunked {
            self.writer.write_all(b"0\r\n\r\n")?;
        }
        Ok(())
    }

    /// `/echo`: streams the request body back piece by piece.
    fn echo(&mut self, head: &Head, mut body: Body, mut keep: bool) -> io::Result<bool> {
        let http11 = head.is_http11();
        let framing = match body {
            Body::Length(n) => Framing::Length(n),
            Body::Chunked(_) if http11 => Framing::Chunked,
            Body::Chunked(_) => {
                keep = false;
                Framing::Close
            }
        };
        let write_body = head.method != "HEAD";
        self.write_head(200, Some("application/octet-stream"), framing, keep, http11)?;
        self.writer.flush()?;
        let mut hash = Fnv1a64::new();
        let mut len = 0u64;
        let mut recorded = false;
        if body.is_done() {
            self.record(head, 0, hash.finish());
            recorded = true;
        }
        loop {
            let n = body.read(&mut self.reader, &mut self.buf)?;
            if n == 0 {
                break;
            }
            hash.update(&self.buf[..n]);
            len += n as u64;
            // Record before the last byte goes out, so a client that has the
            // whole response also sees the request in `requests()`.
            if body.is_done() && !recorded {
                self.record(head, len, hash.finish());
                recorded = true;
            }
            if write_body {
                if framing == Framing::Chunked {
                    write!(self.writer, "{n:x}\r\n")?;
                    self.writer.write_all(&self.buf[..n])?;
                    self.writer.write_all(b"\r\n")?;
                } else {
                    self.writer.write_all(&self.buf[..n])?;
                }
                self.writer.flush()?;
            }
        }
        if !recorded {
            self.record(head, len, hash.finish());
        }
        if framing == Framing::Chunked && write_body {
            self.writer.write_all(b"0\r\n\r\n")?;
        }
        self.writer.flush()?;
        Ok(keep)
    }

    /// `/ws` with `Upgrade: websocket`: 101, then echo raw bytes until EOF.
    fn websocket(&mut self) -> io::Result<bool> {
        let w = &mut self.writer;
        write!(w, "HTTP/1.1 101 Switching Protocols\r\n")?;
        write!(w, "X-Origin: {}\r\n", self.shared.name)?;
        w.write_all(b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n")?;
        w.flush()?;
        // Bytes that arrived with the head first, then the socket.
        let pending = self.reader.buffer().to_vec();
        self.reader.consume(pending.len());
        self.writer.write_all(&pending)?;
        self.writer.flush()?;
        loop {
            let n = self.reader.read(&mut self.buf)?;
            if n == 0 {
                return Ok(false);
            }
            self.writer.write_all(&self.buf[..n])?;
            self.writer.flush()?;
        }
    }
}
