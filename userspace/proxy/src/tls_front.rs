//! The TLS side of an https client connection, over rustls' unbuffered API.
//!
//! rustls' buffered `ServerConnection` keeps a 4 KiB read buffer for the life of the
//! connection (its deframer resizes the buffer to 4 KiB before every read and has no call to
//! give it back): on an idle keep-alive connection that was almost half of what it cost (issue
//! 16). With `UnbufferedServerConnection` the caller owns the bytes: [`TlsFront`] reads
//! records into a buffer taken from the worker's spares ([`Spares`]) and gives it back as soon
//! as it holds no partial record, and encrypts into another one that goes back once the socket
//! took it. An idle connection keeps only rustls' state (keys and the handshake's remains).
//!
//! Reads keep the contract of a socket under edge-triggered readiness: `read` fills the
//! caller's buffer as far as the socket allows, so a short read means the socket is drained;
//! a short read from the socket says the same here, and then no read is spent on `EAGAIN`.

use crate::http::answers::PLAIN_HTTP_TO_TLS;
use mio::net::TcpStream;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use rustls::ServerConfig;
use std::cell::RefCell;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

/// What one read from the socket may bring: a whole record of the largest size rustls accepts
/// (16 KiB of plaintext plus 2 KiB of expansion and the header), so that a buffer holding a
/// partial record always has room for the rest of it.
const READ_BUFFER: usize = 20 * 1024;
/// The most a connection keeps of a partial record while the client sends nothing more.
const PARKED: usize = 4 * 1024;
/// A handshake message may span records (a ClientHello with many extensions, a client
/// certificate chain): the read buffer grows to hold it, up to this.
const HANDSHAKE_BUFFER_LIMIT: usize = 80 * 1024;
/// Plaintext one `write` encrypts at most; the session writes the rest when the socket took
/// this (bounded memory, as the buffered API's send limit was).
const WRITE_LIMIT: usize = 64 * 1024;
/// Slices shorter than this (the pieces of an HTTP head) are gathered and encrypted as one
/// record; longer ones are encrypted where they are.
const GATHER_BELOW: usize = 2 * 1024;
/// Spare buffers a worker keeps between connections, and the largest it keeps.
const SPARES: usize = 32;
const SPARE_LIMIT: usize = 96 * 1024;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The worker's spare byte buffers, shared by every TLS connection of its thread.
struct Spares;

impl Spares {
    /// A buffer of at least `size` initialised bytes (its `len` is its usable size).
    fn take(size: usize) -> Vec<u8> {
        let mut buf = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
        if buf.len() < size {
            buf.resize(size, 0);
        }
        buf
    }

    /// Gives `buf` back (kept if there is room and it is not outsized) and leaves an empty,
    /// unallocated buffer in its place.
    fn give(buf: &mut Vec<u8>) {
        let buf = std::mem::take(buf);
        if buf.capacity() == 0 || buf.capacity() > SPARE_LIMIT {
            return;
        }
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARES {
                spare.push(buf);
            }
        });
    }

    /// Grows `buf` (taken from the spares if it has no allocation yet) to hold `size` bytes.
    fn reserve(buf: &mut Vec<u8>, size: usize) {
        if buf.capacity() == 0 {
            *buf = Spares::take(size);
        } else if buf.len() < size {
            buf.resize(size, 0);
        }
    }
}

/// A TLS connection over its socket.
pub struct TlsFront {
    sock: TcpStream,
    conn: UnbufferedServerConnection,
    /// Records read from the socket and not yet processed: `incoming[..in_len]`. Unallocated
    /// while it holds none.
    incoming: Vec<u8>,
    in_len: usize,
    /// Records for the socket.
    outgoing: Outgoing,
    /// Plaintext decrypted and not yet read (the reader's buffer was full, or a write had to
    /// take it out of rustls): `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    /// The first byte was looked at (TLS or plain HTTP?).
    sniffed: bool,
    /// Plain HTTP arrived: answered in clear with 400; the session closes.
    plain_http: bool,
    /// Shut the socket's write side once the pending records are out.
    shutdown_after_flush: bool,
    /// The socket's end was read.
    eof: bool,
    /// The client's close_notify arrived: the end of its stream.
    peer_closed: bool,
    /// rustls failed (its alert is queued): every later read and write reports it.
    failed: Option<rustls::Error>,
}

/// Where processing the buffered records stopped.
enum Stop {
    /// Everything buffered was processed; more input is needed.
    NeedInput,
    /// The reader's buffer is full.
    Full,
    /// The handshake is done and nothing waits to be read: application data may be encrypted.
    Writable,
}

impl TlsFront {
    pub(crate) fn new(sock: TcpStream, config: &Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(TlsFront {
            sock,
            conn: UnbufferedServerConnection::new(Arc::clone(config))?,
            incoming: Vec::new(),
            in_len: 0,
            outgoing: Outgoing::default(),
            plain: Vec::new(),
            plain_at: 0,
            sniffed: false,
            plain_http: false,
            shutdown_after_flush: false,
            eof: false,
            peer_closed: false,
            failed: None,
        })
    }

    pub(crate) fn sock_mut(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.outgoing.sent < self.outgoing.len || self.shutdown_after_flush
    }

    pub(crate) fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    pub(crate) fn refused_plain_http(&self) -> bool {
        self.plain_http
    }

    pub(crate) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    pub(crate) fn peer_certificates(
        &self,
    ) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Bytes held for this connection beyond rustls' own state (for tests and stats).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.incoming.capacity() + self.outgoing.buf.capacity() + self.plain.capacity()
    }

    /// Writes the pending records; `WouldBlock` when the socket is full. Then the FIN if one
    /// was asked for.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        let out = &mut self.outgoing;
        while out.sent < out.len {
            let pending = out.buf.get(out.sent..out.len).unwrap_or_default();
            match self.sock.write(pending) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => out.sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        out.len = 0;
        out.sent = 0;
        Spares::give(&mut out.buf);
        if self.shutdown_after_flush {
            let _ = self.sock.shutdown(Shutdown::Write);
            self.shutdown_after_flush = false;
        }
        Ok(())
    }

    /// Flushes as far as the socket allows; a full socket is not an error here (the rest goes
    /// at the next write or flush).
    fn flush_some(&mut self) -> io::Result<()> {
        match self.flush() {
            Err(e) if e.kind() != ErrorKind::WouldBlock => Err(e),
            _ => Ok(()),
        }
    }

    /// Ends the sending side: close_notify (once the handshake is done) then FIN, once the
    /// pending records are out.
    pub(crate) fn shutdown_write(&mut self) {
        if !self.plain_http && self.failed.is_none() {
            let _ = self.process(&mut [], &mut 0, |out, mut w| {
                out.encode_with(|o| w.queue_close_notify(o).map_err(encrypt_size));
            });
        }
        self.shutdown_after_flush = true;
        let _ = self.flush();
    }

    /// Looks at the first byte: a TLS record starts with 22 (handshake); an upper-case letter
    /// is an HTTP method, answered in clear.
    fn sniff(&mut self) -> io::Result<()> {
        let mut first = [0u8; 1];
        let n = loop {
            match self.sock.peek(&mut first) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(());
        }
        self.sniffed = true;
        if first.first().is_some_and(u8::is_ascii_uppercase) {
            self.plain_http = true;
            let _ = self.sock.write(PLAIN_HTTP_TO_TLS);
            let _ = self.sock.shutdown(Shutdown::Write);
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "plain HTTP sent to the TLS port",
            ));
        }
        Ok(())
    }

    fn failure(&self) -> io::Result<()> {
        match &self.failed {
            Some(e) => Err(io::Error::new(ErrorKind::InvalidData, e.clone())),
            None => Ok(()),
        }
    }

    /// Runs rustls over the buffered records: handshake records are encoded for the socket,
    /// application data goes to `buf` from `*filled` on (the rest, once it is full, to
    /// `plain`). `on_writable` gets the state once the handshake is done and nothing is left
    /// to read. A TLS failure is recorded, its alert queued, and reported.
    fn process(
        &mut self,
        buf: &mut [u8],
        filled: &mut usize,
        mut on_writable: impl FnMut(&mut Outgoing, WriteTraffic<'_, ServerConnectionData>),
    ) -> io::Result<Stop> {
        // After a failure rustls is not called again: it may still hold offsets into records
        // that were given up.
        self.failure()?;
        loop {
            // The record buffer is moved out while rustls borrows it, so that the state can be
            // handed `self`.
            let mut incoming = std::mem::take(&mut self.incoming);
            let records = incoming.get_mut(..self.in_len).unwrap_or_default();
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(records);
            let stop = match state {
                // rustls queued an alert: encoded below; the records left are not looked at
                // again (rustls would fail on them once more).
                Err(e) => {
                    self.failed = Some(e);
                    Some(Stop::NeedInput)
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    self.outgoing.encode_handshake(&mut e);
                    None
                }
                // The records are in `outgoing`, ahead of anything encrypted later.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    None
                }
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    while let Some(record) = r.next_record() {
                        match record {
                            Ok(record) => {
                                let payload = record.payload;
                                let room = buf.get_mut(*filled..).unwrap_or_default();
                                let n = copy_into(room, payload);
                                *filled += n;
                                if let Some(rest) = payload.get(n..).filter(|r| !r.is_empty()) {
                                    if self.plain_at == self.plain.len() {
                                        self.plain.clear();
                                        self.plain_at = 0;
                                    }
                                    self.plain.extend_from_slice(rest);
                                }
                            }
                            Err(e) => {
                                self.failed = Some(e);
                                break;
                            }
                        }
                    }
                    (*filled == buf.len() && !buf.is_empty()).then_some(Stop::Full)
                }
                // Writing stays possible after the client's close_notify.
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    None
                }
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    Some(Stop::NeedInput)
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Stop::NeedInput),
                Ok(ConnectionState::WriteTraffic(w)) => {
                    on_writable(&mut self.outgoing, w);
                    Some(Stop::Writable)
                }
                // 0-RTT is not enabled: rustls refuses early data before it gets here.
                Ok(_) => {
                    self.failed = Some(rustls::Error::General("unexpected TLS state".into()));
                    None
                }
            };
            // rustls never discards more than it was given; bounded all the same.
            let discard = discard.min(self.in_len);
            if discard > 0 {
                incoming.copy_within(discard..self.in_len, 0);
                self.in_len -= discard;
            }
            self.incoming = incoming;
            if self.failed.is_some() {
                self.encode_alert();
                self.in_len = 0;
                Spares::give(&mut self.incoming);
                return self.failure().map(|()| Stop::NeedInput);
            }
            if let Some(stop) = stop {
                if self.in_len == 0 {
                    Spares::give(&mut self.incoming);
                }
                return Ok(stop);
            }
        }
    }

    /// Encodes what rustls queued when it failed (its alert, when the failure has one). Only
    /// while it has queued records: rustls hands those out before it looks at the buffer
    /// again, and looking at the failed records again would fail twice. The buffer is the one
    /// rustls saw (it keeps offsets into it).
    fn encode_alert(&mut self) {
        while self.conn.wants_write() {
            let records = self.incoming.get_mut(..self.in_len).unwrap_or_default();
            let status = self.conn.process_tls_records(records);
            let Ok(ConnectionState::EncodeTlsData(mut e)) = status.state else {
                return;
            };
            self.outgoing.encode_handshake(&mut e);
        }
    }

    /// The socket is drained with part of a record read: a small part moves to a buffer of its
    /// size, and the read buffer goes back to the spares, so that a client that stalls in
    /// the middle of a record holds [`PARKED`] bytes, not [`READ_BUFFER`].
    fn park_partial(&mut self) {
        if self.in_len == 0 || self.in_len > PARKED || self.incoming.len() <= PARKED {
            return;
        }
        let mut parked = vec![0u8; PARKED];
        copy_into(
            &mut parked,
            self.incoming.get(..self.in_len).unwrap_or_default(),
        );
        Spares::give(&mut self.incoming);
        self.incoming = parked;
    }

    /// Hands out plaintext kept in `plain` first.
    fn take_plain(&mut self, buf: &mut [u8]) -> usize {
        let rest = self.plain.get(self.plain_at..).unwrap_or_default();
        let n = copy_into(buf, rest);
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
        n
    }

    /// Reads from the socket into the record buffer; `Ok(true)` when the socket is drained
    /// (short read, end, or `EAGAIN`).
    fn fill(&mut self) -> io::Result<bool> {
        Spares::reserve(&mut self.incoming, READ_BUFFER);
        if self.in_len == self.incoming.len() {
            // A handshake message larger than the buffer: grow, within bounds.
            let size = (self.incoming.len() * 2).min(HANDSHAKE_BUFFER_LIMIT);
            if size <= self.in_len {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "TLS handshake message too large",
                ));
            }
            self.incoming.resize(size, 0);
        }
        loop {
            let room = self.incoming.get_mut(self.in_len..).unwrap_or_default();
            let asked = room.len();
            match self.sock.read(room) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(true);
                }
                Ok(n) => {
                    self.in_len += n;
                    return Ok(n < asked);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if self.in_len == 0 {
                        Spares::give(&mut self.incoming);
                    }
                    return Err(e);
                }
            }
        }
    }

    pub(crate) fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.plain_http {
            return Err(ErrorKind::InvalidData.into());
        }
        if !self.sniffed {
            self.sniff()?;
        }
        self.failure()?;
        let mut filled = self.take_plain(buf);
        let mut drained = false;
        loop {
            if filled == buf.len() {
                return Ok(filled);
            }
            let stop = self.process(buf, &mut filled, |_, _| {});
            // Handshake records and alerts go out as soon as they are made.
            let flushed = self.flush_some();
            match stop {
                Err(e) => return if filled > 0 { Ok(filled) } else { Err(e) },
                Ok(Stop::Full) => return Ok(filled),
                Ok(_) => {}
            }
            flushed?;
            // The peer's close_notify, or its FIN without one (an end all the same for
            // HTTP/1.1, whose messages delimit themselves).
            if self.peer_closed || self.eof {
                return Ok(filled);
            }
            if drained {
                self.park_partial();
                return if filled > 0 {
                    Ok(filled)
                } else {
                    Err(ErrorKind::WouldBlock.into())
                };
            }
            match self.fill() {
                Ok(d) => drained = d,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.park_partial();
                    return if filled > 0 { Ok(filled) } else { Err(e) };
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.failure()?;
        self.flush()?;
        let mut accepted = 0;
        let stop = self.process(&mut [], &mut 0, |out, mut w| {
            accepted = out.encrypt(bufs, |data, o| w.encrypt(data, o).map_err(encrypt_size));
        });
        if let Some(e) = self.outgoing.refused.take() {
            // rustls refused to encrypt more (its keys are used up) and queued close_notify.
            self.failed = Some(e);
            self.encode_alert();
        }
        // What was encrypted, and an alert if rustls failed, go out before any error.
        let flushed = self.flush_some();
        if accepted > 0 {
            return Ok(accepted);
        }
        if !matches!(stop?, Stop::Writable) {
            // The handshake is not done: nothing can be encrypted yet.
            return Err(ErrorKind::WouldBlock.into());
        }
        self.failure()?;
        flushed?;
        if bufs.iter().any(|b| !b.is_empty()) {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(0)
    }
}

/// Copies what fits of `src` to the start of `dst`; returns how much.
fn copy_into(dst: &mut [u8], src: &[u8]) -> usize {
    let n = dst.len().min(src.len());
    if let (Some(d), Some(s)) = (dst.get_mut(..n), src.get(..n)) {
        d.copy_from_slice(s);
    }
    n
}

/// How much room rustls asked for, from an encryption error (`None`: not a size error, and
/// nothing was written).
fn encrypt_size(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        _ => None,
    }
}

/// Records waiting for the socket: `buf[sent..len]`. Unallocated while none wait.
#[derive(Default)]
pub(crate) struct Outgoing {
    buf: Vec<u8>,
    len: usize,
    sent: usize,
    /// rustls refused to encrypt (its keys are used up): the connection ends.
    refused: Option<rustls::Error>,
}

impl Outgoing {
    /// Encodes records with `encode` after the pending ones, growing the buffer when rustls
    /// says how much it needs (`Err(Some(size))`). `false`: rustls encoded nothing.
    fn encode_with(
        &mut self,
        mut encode: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
    ) -> bool {
        Spares::reserve(&mut self.buf, self.len + 1024);
        loop {
            match encode(self.buf.get_mut(self.len..).unwrap_or_default()) {
                Ok(n) => {
                    self.len += n;
                    return true;
                }
                Err(Some(required)) => {
                    let size = self.len + required;
                    self.buf.resize(size, 0);
                }
                Err(None) => return false,
            }
        }
    }

    /// Encodes the handshake (or alert) record rustls hands out.
    fn encode_handshake(&mut self, record: &mut EncodeTlsData<'_, ServerConnectionData>) {
        self.encode_with(|out| match record.encode(out) {
            Ok(n) => Ok(n),
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                Err(Some(required_size))
            }
            Err(_) => Err(None),
        });
    }

    /// Encrypts up to [`WRITE_LIMIT`] bytes of `bufs` with `encrypt` after the pending
    /// records: short slices (the pieces of an HTTP head) gathered into one record, long ones
    /// where they are. Returns how much was taken.
    fn encrypt(
        &mut self,
        bufs: &[IoSlice<'_>],
        mut encrypt: impl FnMut(&[u8], &mut [u8]) -> Result<usize, Option<usize>>,
    ) -> usize {
        GATHER.with(|g| {
            let mut gathered = g.borrow_mut();
            gathered.clear();
            let mut taken = 0;
            let mut sealed = 0;
            let mut refused = false;
            for slice in bufs {
                let slice = slice.get(..WRITE_LIMIT - taken).unwrap_or(slice);
                if slice.len() < GATHER_BELOW {
                    gathered.extend_from_slice(slice);
                } else {
                    if !gathered.is_empty() {
                        if !self.encode_with(|out| encrypt(&gathered, out)) {
                            refused = true;
                            break;
                        }
                        sealed += gathered.len();
                        gathered.clear();
                    }
                    if !self.encode_with(|out| encrypt(slice, out)) {
                        refused = true;
                        break;
                    }
                    sealed += slice.len();
                }
                taken += slice.len();
                if taken == WRITE_LIMIT {
                    break;
                }
            }
            if !refused && !gathered.is_empty() {
                if self.encode_with(|out| encrypt(&gathered, out)) {
                    sealed += gathered.len();
                } else {
                    refused = true;
                }
            }
            if gathered.capacity() > 4 * GATHER_BELOW {
                *gathered = Vec::new();
            }
            if refused {
                self.refused = Some(rustls::Error::EncryptError);
            }
            sealed
        })
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        Spares::give(&mut self.incoming);
        Spares::give(&mut self.outgoing.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turns::{client_config, pending, plaintext, receive};
    use rustls::pki_types::ServerName;
    use rustls::ClientConnection;
    use std::net::TcpListener;

    fn server_config() -> Arc<ServerConfig> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/examples/certs/");
        let read = |name: &str| std::fs::read_to_string(format!("{dir}{name}")).unwrap();
        let cert =
            lb_config::certs::check(&read("site.pem"), &read("site.key"), None, None).unwrap();
        crate::tls::TlsContext::new(None)
            .unwrap()
            .server_config(&[cert], false, None)
            .unwrap()
    }

    /// A client socket and connection, and the server's front over the accepted socket.
    fn pair() -> (std::net::TcpStream, ClientConnection, TlsFront) {
        pair_with(client_config())
    }

    /// [`pair`] with the client's configuration.
    fn pair_with(
        config: Arc<rustls::ClientConfig>,
    ) -> (std::net::TcpStream, ClientConnection, TlsFront) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_nonblocking(true).unwrap();
        // Writes in parts go out at once (Nagle would hold the second for the first's ACK).
        client.set_nodelay(true).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let front = TlsFront::new(TcpStream::from_std(accepted), &server_config()).unwrap();
        let name = ServerName::try_from("site.example.com").unwrap();
        let conn = ClientConnection::new(config, name).unwrap();
        (client, conn, front)
    }

    /// Reads the front until it would block (loopback delivers at once); what it read.
    fn read_all(front: &mut TlsFront, chunk: usize) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; chunk];
        for _ in 0..10_000 {
            std::thread::sleep(std::time::Duration::from_micros(200));
            match front.read_plain(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(got),
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// What the client can read now, one record read at a time (the client's own buffer is
    /// bounded).
    fn client_reads(client: &mut std::net::TcpStream, conn: &mut ClientConnection) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            match conn.read_tls(client) {
                Ok(0) => return got,
                Ok(_) => {
                    conn.process_new_packets().unwrap();
                    got.extend(plaintext(conn));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return got,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Hands the client what its socket holds, unprocessed.
    fn receive_raw(client: &mut std::net::TcpStream, conn: &mut ClientConnection) {
        while let Ok(n) = conn.read_tls(client) {
            if n == 0 {
                return;
            }
        }
    }

    fn handshake(
        client: &mut std::net::TcpStream,
        conn: &mut ClientConnection,
        front: &mut TlsFront,
    ) {
        for _ in 0..20 {
            if !conn.is_handshaking() && !front.handshaking() {
                return;
            }
            let out = pending(conn);
            if !out.is_empty() {
                client.write_all(&out).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            assert!(read_all(front, 4096).unwrap().is_empty());
            std::thread::sleep(std::time::Duration::from_millis(2));
            receive(client, conn);
        }
        panic!("the handshake did not end");
    }

    /// Issue 16: an idle https connection holds no buffer of its own between requests, only
    /// rustls' state (the buffered API kept a 4 KiB read buffer for the connection's life).
    #[test]
    fn an_idle_connection_holds_no_buffer() {
        let (mut client, mut conn, mut front) = pair();
        handshake(&mut client, &mut conn, &mut front);
        conn.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        client.write_all(&pending(&mut conn)).unwrap();
        assert_eq!(
            read_all(&mut front, 4096).unwrap(),
            b"GET / HTTP/1.1\r\n\r\n"
        );
        let n = front
            .write_plain(&[IoSlice::new(b"HTTP/1.1 200 OK\r\n"), IoSlice::new(b"\r\n")])
            .unwrap();
        assert_eq!(n, 19);
        assert!(!front.has_pending());
        assert_eq!(front.held(), 0);
        std::thread::sleep(std::time::Duration::from_millis(5));
        receive(&mut client, &mut conn);
        assert_eq!(plaintext(&mut conn), b"HTTP/1.1 200 OK\r\n\r\n");
    }

    /// Records larger than the reader's buffer come out whole over several reads, and a write
    /// larger than the limit is taken in parts, in order.
    #[test]
    fn plaintext_crosses_small_reads_and_large_writes_intact() {
        let (mut client, mut conn, mut front) = pair();
        handshake(&mut client, &mut conn, &mut front);
        let upload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut uploaded = 0;
        let mut got = Vec::new();
        for _ in 0..200 {
            uploaded += conn.writer().write(&upload[uploaded..]).unwrap();
            client.write_all(&pending(&mut conn)).unwrap();
            got.extend(read_all(&mut front, 1000).unwrap());
            if got.len() == upload.len() {
                break;
            }
        }
        assert!(
            got == upload,
            "{} bytes of {} arrived intact",
            got.len(),
            upload.len()
        );
        assert_eq!(front.held(), 0);

        let head = [
            IoSlice::new(b"HTTP/1.1 200 OK\r\n"),
            IoSlice::new(b"a: b\r\n\r\n"),
        ];
        let body: Vec<u8> = (0..150_000u32).map(|i| (i % 241) as u8).collect();
        let mut sent = 0;
        let total = 17 + 8 + body.len();
        let mut received = Vec::new();
        for _ in 0..1000 {
            if sent == total {
                break;
            }
            let bufs: Vec<IoSlice<'_>> = if sent < 25 {
                let mut v = head.to_vec();
                v.push(IoSlice::new(&body));
                v
            } else {
                vec![IoSlice::new(&body[sent - 25..])]
            };
            match front.write_plain(&bufs) {
                Ok(n) => {
                    assert!(n <= WRITE_LIMIT);
                    sent += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            received.extend(client_reads(&mut client, &mut conn));
        }
        while front.has_pending() {
            let _ = front.flush();
            received.extend(client_reads(&mut client, &mut conn));
        }
        // What the server's socket still holds reaches the client as it reads.
        for _ in 0..200 {
            if received.len() == total {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            received.extend(client_reads(&mut client, &mut conn));
        }
        assert_eq!(sent, total);
        assert!(received.starts_with(b"HTTP/1.1 200 OK\r\na: b\r\n\r\n"));
        assert!(
            received[25..] == body[..],
            "{} body bytes",
            received.len() - 25
        );
        assert_eq!(front.held(), 0);
    }

    /// The client's close_notify ends the stream (a read of 0); ours goes out on shutdown.
    #[test]
    fn close_notify_ends_the_stream_both_ways() {
        let (mut client, mut conn, mut front) = pair();
        handshake(&mut client, &mut conn, &mut front);
        conn.send_close_notify();
        client.write_all(&pending(&mut conn)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut buf = [0u8; 100];
        assert_eq!(front.read_plain(&mut buf).unwrap(), 0);
        front.shutdown_write();
        std::thread::sleep(std::time::Duration::from_millis(5));
        receive(&mut client, &mut conn);
        conn.process_new_packets().unwrap();
        let mut plain = [0u8; 10];
        assert_eq!(
            conn.reader().read(&mut plain).unwrap(),
            0,
            "close_notify came"
        );
    }

    /// A record that fails to decrypt is a read error; the client gets rustls' alert.
    #[test]
    fn a_corrupt_record_is_an_error_and_an_alert() {
        let (mut client, mut conn, mut front) = pair();
        handshake(&mut client, &mut conn, &mut front);
        conn.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut record = pending(&mut conn);
        let last = record.len() - 1;
        record[last] ^= 0x55;
        client.write_all(&record).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let err = read_all(&mut front, 4096).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidData);
        let mut buf = [0u8; 100];
        let again = front.read_plain(&mut buf).unwrap_err();
        assert_eq!(again.kind(), ErrorKind::InvalidData);
        std::thread::sleep(std::time::Duration::from_millis(5));
        receive_raw(&mut client, &mut conn);
        assert_eq!(
            conn.process_new_packets().unwrap_err(),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
        );
    }

    /// A ClientHello whose header claims more than rustls accepts: the read fails, and so does
    /// every read after it, without rustls being run again over records it gave up (it kept
    /// offsets into them: a second run panicked on an empty buffer).
    #[test]
    fn a_failed_handshake_stays_failed() {
        let (mut client, _conn, mut front) = pair();
        client
            .write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x00, 0x00])
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut buf = [0u8; 100];
        for _ in 0..3 {
            let err = front.read_plain(&mut buf).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidData, "{err}");
        }
        assert_eq!(
            front.write_plain(&[IoSlice::new(b"x")]).unwrap_err().kind(),
            ErrorKind::InvalidData
        );
    }

    /// One TLS 1.3 record sealed with the client's traffic keys (`seq`: its sequence number).
    fn seal(
        secrets: &rustls::ConnectionTrafficSecrets,
        seq: u64,
        inner: &[u8],
        typ: u8,
    ) -> Vec<u8> {
        use aws_lc_rs::aead::CHACHA20_POLY1305;
        use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
        use rustls::ConnectionTrafficSecrets::{Aes128Gcm, Aes256Gcm, Chacha20Poly1305};
        let (alg, key, iv) = match secrets {
            Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => panic!("a cipher suite this test does not seal"),
        };
        let key = LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).unwrap());
        let mut nonce: [u8; 12] = iv.as_ref().try_into().unwrap();
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        let mut data = inner.to_vec();
        data.push(typ);
        let len = data.len() + 16;
        let header = [0x17, 0x03, 0x03, (len >> 8) as u8, len as u8];
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(header),
            &mut data,
        )
        .unwrap();
        let mut record = header.to_vec();
        record.extend(data);
        record
    }

    /// A request then, in the same read, a handshake record rustls refuses (a KeyUpdate whose
    /// header claims 64 KiB): the request is read, then the failure is reported at the next
    /// read, and no read runs rustls again.
    #[test]
    fn a_failure_after_a_request_in_the_same_read_is_reported_next() {
        let provider = Arc::new(lb_config::certs::provider());
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::turns::AnyCertificate(provider)))
            .with_no_client_auth();
        config.enable_secret_extraction = true;
        let (mut client, mut conn, mut front) = pair_with(Arc::new(config));
        handshake(&mut client, &mut conn, &mut front);
        let (seq, keys) = conn.dangerous_extract_secrets().unwrap().tx;
        let mut wire = seal(&keys, seq, b"GET / HTTP/1.1\r\n\r\n", 0x17);
        wire.extend(seal(&keys, seq + 1, &[0x18, 0x01, 0x00, 0x00], 0x16));
        client.write_all(&wire).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut buf = [0u8; 4096];
        let n = front.read_plain(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        for _ in 0..2 {
            let err = front.read_plain(&mut buf).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidData, "{err}");
        }
    }

    /// A client that stops in the middle of a record: the connection keeps 4 KiB for the part
    /// it has, not a whole read buffer; the record completes when the rest comes.
    #[test]
    fn a_stalled_partial_record_holds_a_small_buffer() {
        let (mut client, mut conn, mut front) = pair();
        handshake(&mut client, &mut conn, &mut front);
        conn.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let record = pending(&mut conn);
        client.write_all(&record[..10]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut buf = [0u8; 4096];
        let err = front.read_plain(&mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
        assert_eq!(front.held(), PARKED);
        client.write_all(&record[10..]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(
            read_all(&mut front, 4096).unwrap(),
            b"GET / HTTP/1.1\r\n\r\n"
        );
        assert_eq!(front.held(), 0);
    }

    /// Reads until the front blocks, fails or ends; panics only if the front does.
    fn read_until_stopped(front: &mut TlsFront) {
        let mut buf = [0u8; 700];
        for _ in 0..1000 {
            match front.read_plain(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    /// Never a panic, whatever bytes come: client flights (a ClientHello; after a handshake,
    /// requests and a close_notify) with bytes flipped, cut or added, written in pieces of
    /// random sizes, each piece read at once, for 300 seeded cases. A failed connection
    /// stays failed.
    #[test]
    fn mangled_client_flights_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |bound: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % bound as u64) as usize
        };
        for case in 0..300 {
            let (mut client, mut conn, mut front) = pair();
            let mut flight = if case % 2 == 0 {
                pending(&mut conn)
            } else {
                handshake(&mut client, &mut conn, &mut front);
                for _ in 0..1 + next(3) {
                    conn.writer()
                        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                        .unwrap();
                }
                if next(2) == 0 {
                    conn.send_close_notify();
                }
                pending(&mut conn)
            };
            for _ in 0..1 + next(4) {
                match next(3) {
                    0 => {
                        let at = next(flight.len());
                        flight[at] ^= 1 << next(8);
                    }
                    1 => flight.truncate(next(flight.len() + 1)),
                    _ => {
                        let at = next(flight.len() + 1);
                        let junk: Vec<u8> = (0..1 + next(40)).map(|_| next(256) as u8).collect();
                        flight.splice(at..at, junk);
                    }
                }
            }
            let mut at = 0;
            while at < flight.len() {
                let n = (1 + next(600)).min(flight.len() - at);
                if client.write_all(&flight[at..at + n]).is_err() {
                    break;
                }
                at += n;
                std::thread::sleep(std::time::Duration::from_micros(300));
                read_until_stopped(&mut front);
            }
            if next(2) == 0 {
                let _ = client.shutdown(std::net::Shutdown::Write);
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
            read_until_stopped(&mut front);
            let _ = front.write_plain(&[IoSlice::new(b"HTTP/1.1 400 Bad Request\r\n\r\n")]);
            front.shutdown_write();
            if front.failed.is_some() {
                let mut buf = [0u8; 10];
                assert!(front.read_plain(&mut buf).is_err(), "case {case}");
            }
        }
    }
}
