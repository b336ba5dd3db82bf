//! A small HTTP/1.1 client: raw writes, response heads and bodies read by their framing.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

/// Read and write timeout of every client socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection with read and write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A response as the client received it.
#[derive(Debug, Clone)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header named `name`.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether a `Connection` header lists `close`.
    pub fn closes(&self) -> bool {
        self.headers_named("connection")
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
    }

    /// Asserts one of kakehi's own answers: a status in `allowed`, an HTML body.
    pub fn assert_html_answer(&self, allowed: &[u16]) {
        assert!(
            allowed.contains(&self.status),
            "expected one of {allowed:?}, got {} {} with body {:?}",
            self.status,
            self.reason,
            self.text()
        );
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.to_ascii_lowercase().contains("text/html"),
            "a {} answer should be HTML, Content-Type is {ct:?}",
            self.status
        );
        assert!(
            self.text().to_ascii_lowercase().contains("<html"),
            "a {} answer should carry an HTML body, got {:?}",
            self.status,
            self.text()
        );
    }
}

/// A response head (status line and headers).
#[derive(Debug, Clone)]
pub struct Head {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

impl Framing {
    /// The framing of a response to a request (HEAD or not), per RFC 9112 §6.3.
    pub fn of(head: &Head, head_request: bool) -> Framing {
        if head_request || head.status < 200 || head.status == 204 || head.status == 304 {
            return Framing::None;
        }
        let te = head.header("transfer-encoding").unwrap_or_default();
        if te
            .split(',')
            .next_back()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
        {
            return Framing::Chunked;
        }
        match head.header("content-length") {
            Some(n) => Framing::Length(
                n.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("bad Content-Length {n:?}")),
            ),
            None => Framing::Close,
        }
    }
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r.by_ref().take(64 * 1024).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "connection closed before a complete line",
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(ErrorKind::InvalidData, "line too long"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|e| io::Error::new(ErrorKind::InvalidData, e))
}

/// Reads a response head.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Head> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default().to_owned();
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
        io::Error::new(
            ErrorKind::InvalidData,
            format!("bad status line {status_line:?}"),
        )
    })?;
    let reason = parts.next().unwrap_or_default().to_owned();
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("bad status line {status_line:?}"),
        ));
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':').ok_or_else(|| {
            io::Error::new(ErrorKind::InvalidData, format!("bad header line {line:?}"))
        })?;
        headers.push((n.to_owned(), v.trim().to_owned()));
    }
    Ok(Head {
        version,
        status,
        reason,
        headers,
    })
}

/// Streams a body of the given framing into `sink`, piece by piece.
pub fn read_body(
    r: &mut impl BufRead,
    framing: Framing,
    sink: &mut dyn FnMut(&[u8]),
) -> io::Result<()> {
    match framing {
        Framing::None => Ok(()),
        Framing::Length(n) => copy_exact(r, n, sink),
        Framing::Close => loop {
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            let k = buf.len();
            sink(buf);
            r.consume(k);
        },
        Framing::Chunked => loop {
            let line = read_line(r)?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(ErrorKind::InvalidData, format!("bad chunk size {line:?}"))
            })?;
            if size == 0 {
                // Trailers, then the empty line.
                while !read_line(r)?.is_empty() {}
                return Ok(());
            }
            copy_exact(r, size, sink)?;
            let end = read_line(r)?;
            if !end.is_empty() {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("chunk not followed by CRLF: {end:?}"),
                ));
            }
        },
    }
}

fn copy_exact(r: &mut impl BufRead, mut n: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
    while n > 0 {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("connection closed with {n} body bytes missing"),
            ));
        }
        let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        sink(&buf[..k]);
        r.consume(k);
        n -= k as u64;
    }
    Ok(())
}

/// One client connection to the proxy: raw writes, parsed responses.
#[derive(Debug)]
pub struct Client {
    pub stream: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = connect(addr);
        let reader = BufReader::with_capacity(64 * 1024, stream.try_clone().unwrap());
        Client { stream, reader }
    }

    /// Writes `bytes` in one `write_all`.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to lbd");
    }

    /// Reads one response head (a `100 Continue` or `101` is returned as it is).
    pub fn head(&mut self) -> Head {
        read_head(&mut self.reader).expect("read a response head")
    }

    /// Reads one complete final response, skipping `100 Continue` interim responses.
    pub fn response(&mut self) -> Response {
        self.response_to(false)
    }

    /// Reads the response to a request; `head_request` for HEAD (no body).
    pub fn response_to(&mut self, head_request: bool) -> Response {
        self.try_response_to(head_request)
            .unwrap_or_else(|e| panic!("read a response: {e}"))
    }

    pub fn try_response_to(&mut self, head_request: bool) -> io::Result<Response> {
        let mut head = read_head(&mut self.reader)?;
        while head.status == 100 {
            head = read_head(&mut self.reader)?;
        }
        let mut body = Vec::new();
        read_body(
            &mut self.reader,
            Framing::of(&head, head_request),
            &mut |b| body.extend_from_slice(b),
        )?;
        Ok(Response {
            version: head.version,
            status: head.status,
            reason: head.reason,
            headers: head.headers,
            body,
        })
    }

    /// `GET path` with `Host: host` on this connection (kept alive).
    pub fn get(&mut self, host: &str, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        self.response()
    }

    /// Reads until the peer closes. Returns the bytes read before the close; panics when the
    /// connection is still open after the read timeout.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return rest,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return rest,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!(
                        "the connection is still open after {IO_TIMEOUT:?} (read so far: {:?})",
                        String::from_utf8_lossy(&rest)
                    )
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Asserts that the peer closes the connection without sending anything more.
    pub fn assert_closed(&mut self) {
        let rest = self.read_to_close();
        assert!(
            rest.is_empty(),
            "expected the connection to close, got more bytes: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// Sends `raw` on a new connection and reads one response.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut c = Client::connect(addr);
    c.send(raw);
    c.response()
}

/// `GET path` with `Host: host` on a new connection.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> Response {
    Client::connect(addr).get(host, path)
}
