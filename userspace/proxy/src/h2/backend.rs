//! HTTP/2 to a backend: the clusters with `http2 = true` (h2c with prior knowledge, as gRPC
//! servers speak it). The exchange machine still speaks HTTP/1.1; [`H2Back`] stands between
//! it and the backend socket as one HTTP/2 stream on its own connection:
//!
//! - what the exchange writes (its HTTP/1.1 request, read by `response.rs` in request mode)
//!   goes out as HEADERS (`:method`, `:scheme`, `:authority` from Host, `:path`, and
//!   `te: trailers`), DATA under the backend's windows, and trailers;
//! - what the backend sends (HEADERS, DATA, trailers) is given to the exchange as an
//!   HTTP/1.1 response: with its `content-length` when it declared one, chunked otherwise,
//!   so that trailers (gRPC's `grpc-status`) reach the client.
//!
//! The request waits in a bounded buffer when the backend's window is closed; the
//! response is granted window only as the exchange reads it. A connection serves one
//! exchange and is closed after it (no multiplexing or reuse yet).

use super::block::{Assembler, BlockLimits};
use super::error::ErrorCode;
use super::fields::{BlockKind, HeaderLimits};
use super::frame::{self, Frame, Parsed, Settings};
use super::hpack::{self, Decoder, DEFAULT_TABLE_SIZE};
use super::request::field;
use super::response::{self, Piece, ResponseReader};
use crate::http::exchange::Side;
use std::io::{self, ErrorKind, IoSlice, Read, Write};

/// The one stream of the connection.
const STREAM: u32 = 1;
/// Request bytes held for the backend's window.
const REQUEST_CAP: usize = 64 * 1024;
/// Frames read from the backend and not yet handled, at most (its windows bound the DATA).
const INPUT_CAP: usize = 256 * 1024;
/// Response window given back once this much was read by the exchange.
const CREDIT_AT: u32 = 16 * 1024;
const DEFAULT_WINDOW: i64 = 65_535;

#[derive(Debug)]
pub struct H2Back {
    out: Vec<u8>,
    out_at: usize,
    req: Vec<u8>,
    reader: ResponseReader,
    req_blocked: bool,
    end_sent: bool,
    send_window: i64,
    stream_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    input: Vec<u8>,
    decoder: Decoder,
    assembler: Assembler,
    resp: Vec<u8>,
    resp_at: usize,
    head_done: bool,
    chunked: bool,
    ended: bool,
    eof: bool,
    owed: u32,
    failed: bool,
    /// The request buffer has room again after a write was refused: the exchange may write.
    wake_write: bool,
    scratch: Vec<u8>,
}

impl Default for H2Back {
    fn default() -> Self {
        H2Back::new()
    }
}

impl H2Back {
    /// A connection about to be established: the preface and SETTINGS wait for it.
    pub fn new() -> H2Back {
        let mut back = H2Back {
            out: Vec::new(),
            out_at: 0,
            req: Vec::new(),
            reader: ResponseReader::request(),
            req_blocked: false,
            end_sent: false,
            send_window: DEFAULT_WINDOW,
            stream_window: DEFAULT_WINDOW,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: frame::DEFAULT_MAX_FRAME_SIZE as usize,
            input: Vec::new(),
            decoder: Decoder::new(DEFAULT_TABLE_SIZE, HeaderLimits::default()),
            assembler: Assembler::new(BlockLimits::default()),
            resp: Vec::new(),
            resp_at: 0,
            head_done: false,
            chunked: false,
            ended: false,
            eof: false,
            owed: 0,
            failed: false,
            wake_write: false,
            scratch: Vec::new(),
        };
        back.out.extend_from_slice(frame::PREFACE);
        back.put(&Frame::Settings(Settings {
            enable_push: Some(false),
            ..Settings::default()
        }));
        back
    }

    /// After the exchange's turn: writes what waits for the socket, and says whether the
    /// exchange should be driven again (its request may go on).
    pub fn after_drive(&mut self, stream: &mut impl Write, side: &mut Side) -> bool {
        let mut again = false;
        if side.writable && !self.failed && self.flush(stream).is_err() {
            // The exchange learns it from its next read.
            self.failed = true;
            side.readable = true;
            again = true;
        }
        if std::mem::take(&mut self.wake_write) {
            side.writable = true;
            again = true;
        }
        again
    }

    fn flush(&mut self, stream: &mut impl Write) -> io::Result<()> {
        while self.out_at < self.out.len() {
            let rest = self.out.get(self.out_at..).unwrap_or_default();
            match stream.write(rest) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_at = 0;
        Ok(())
    }

    /// Takes request bytes from the exchange.
    pub fn write_request(
        &mut self,
        stream: &mut impl Write,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        if self.failed {
            return Err(ErrorKind::BrokenPipe.into());
        }
        let mut room = REQUEST_CAP.saturating_sub(self.req.len());
        if room == 0 && bufs.iter().any(|b| !b.is_empty()) {
            self.req_blocked = true;
            return Err(ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room);
            self.req
                .extend_from_slice(b.get(..take).unwrap_or_default());
            n += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        if self.frame_request().is_err() {
            self.failed = true;
            return Err(ErrorKind::InvalidData.into());
        }
        self.flush(stream)?;
        Ok(n)
    }

    /// Frames what the request buffer holds, as far as the windows allow.
    fn frame_request(&mut self) -> Result<(), response::Bad> {
        let mut at = 0;
        loop {
            let window = self.send_window.min(self.stream_window).max(0);
            let max = usize::try_from(window)
                .unwrap_or(0)
                .min(self.peer_max_frame);
            let Some(piece) = self.reader.next(&self.req, &mut at, max, false)? else {
                break;
            };
            let end = self.reader.done();
            match piece {
                Piece::Head { line, fields, .. } => {
                    let (method, target) =
                        response::request_line(self.req.get(line).unwrap_or_default());
                    let lines = self.req.get(fields).unwrap_or_default();
                    let host = response::fields(lines)
                        .find(|(n, _)| n.eq_ignore_ascii_case(b"host"))
                        .map(|(_, v)| v)
                        .unwrap_or_default();
                    let mut block = std::mem::take(&mut self.scratch);
                    block.clear();
                    let mut add = |name: &[u8], value: &[u8]| {
                        hpack::append_field(&mut block, name, value);
                    };
                    add(b":method", method);
                    add(b":scheme", b"http");
                    add(b":authority", host);
                    add(b":path", target);
                    for (name, value) in response::fields(lines) {
                        if response::connection_specific(name) || name.eq_ignore_ascii_case(b"host")
                        {
                            continue;
                        }
                        add(name, value);
                    }
                    // gRPC servers want it, and trailers are what HTTP/2 is for here.
                    add(b"te", b"trailers");
                    frame::append_header_block(
                        &mut self.out,
                        STREAM,
                        &block,
                        end,
                        self.peer_max_frame,
                    );
                    self.scratch = block;
                }
                Piece::Data(range) => {
                    let data = self.req.get(range).unwrap_or_default();
                    frame::append_data(&mut self.out, STREAM, data, end);
                    self.send_window -= data.len() as i64;
                    self.stream_window -= data.len() as i64;
                }
                Piece::Trailers(range) => {
                    let lines = self.req.get(range).unwrap_or_default();
                    let mut block = Vec::new();
                    for (name, value) in response::fields(lines) {
                        hpack::append_field(&mut block, name, value);
                    }
                    frame::append_header_block(
                        &mut self.out,
                        STREAM,
                        &block,
                        true,
                        self.peer_max_frame,
                    );
                }
            }
            if end {
                self.end_sent = true;
            }
        }
        self.req.drain(..at);
        if self.reader.done() && !self.end_sent {
            frame::append_data(&mut self.out, STREAM, &[], true);
            self.end_sent = true;
        }
        if self.req_blocked && self.req.len() < REQUEST_CAP {
            self.req_blocked = false;
            self.wake_write = true;
        }
        Ok(())
    }

    /// Gives the exchange response bytes.
    pub fn read_response(
        &mut self,
        stream: &mut (impl Read + Write),
        buf: &mut [u8],
    ) -> io::Result<usize> {
        if !self.failed {
            if let Err(e) = self.take_input(stream) {
                log::debug!("h2 backend: {e}");
                self.failed = true;
            }
        }
        let rest = self.resp.get(self.resp_at..).unwrap_or_default();
        if !rest.is_empty() {
            let n = rest.len().min(buf.len());
            if let (Some(to), Some(from)) = (buf.get_mut(..n), rest.get(..n)) {
                to.copy_from_slice(from);
            }
            self.resp_at += n;
            if self.resp_at == self.resp.len() {
                self.resp.clear();
                self.resp_at = 0;
            }
            self.credit(n, stream);
            return Ok(n);
        }
        if self.failed {
            return Err(ErrorKind::ConnectionReset.into());
        }
        if self.eof {
            return Ok(0);
        }
        Err(ErrorKind::WouldBlock.into())
    }

    /// Gives the backend its window back for what the exchange read.
    fn credit(&mut self, n: usize, stream: &mut impl Write) {
        self.owed = self.owed.saturating_add(n as u32);
        if self.owed < CREDIT_AT || self.ended {
            return;
        }
        let increment = self.owed;
        self.owed = 0;
        for stream_id in [0, STREAM] {
            self.put(&Frame::WindowUpdate {
                stream_id,
                increment,
            });
        }
        if self.flush(stream).is_err() {
            self.failed = true;
        }
    }

    /// Reads and handles what the backend sent.
    fn take_input(&mut self, stream: &mut (impl Read + Write)) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if self.input.len() > INPUT_CAP {
                return Err(io::Error::new(ErrorKind::InvalidData, "backend floods"));
            }
            match stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self
                    .input
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let input = std::mem::take(&mut self.input);
        let mut at = 0;
        let result = loop {
            let rest = input.get(at..).unwrap_or_default();
            match frame::parse(rest, frame::DEFAULT_MAX_FRAME_SIZE) {
                Ok(Parsed::Incomplete { .. }) => break Ok(()),
                Ok(Parsed::Frame { frame, len }) => {
                    at += len;
                    if let Err(e) = self.on_frame(&frame) {
                        break Err(e);
                    }
                }
                Ok(Parsed::StreamError { len, .. }) => at += len,
                Err(e) => break Err(io::Error::new(ErrorKind::InvalidData, e)),
            }
        };
        self.input = input;
        self.input.drain(..at);
        result?;
        if self.frame_request().is_err() {
            return Err(ErrorKind::InvalidData.into());
        }
        self.flush(stream)
    }

    fn on_frame(&mut self, frame: &Frame<'_>) -> io::Result<()> {
        let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, what.to_owned());
        if let Frame::Headers { .. } | Frame::Continuation { .. } = frame {
            let kind = if self.head_done {
                BlockKind::Trailers
            } else {
                BlockKind::Response
            };
            let decoded = match self.assembler.push(frame) {
                Ok(Some(b)) => (
                    b.end_stream,
                    self.decoder.decode(b.block, b.stream_id, kind),
                ),
                Ok(None) => return Ok(()),
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e)),
            };
            let (end_stream, list) = decoded;
            let list = list.map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
            return self.on_head(&list, end_stream);
        }
        self.assembler
            .push(frame)
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        match *frame {
            Frame::Data {
                stream_id,
                data,
                end_stream,
                ..
            } => {
                if stream_id != STREAM || !self.head_done || self.ended {
                    return Err(bad("DATA out of place"));
                }
                let pad = frame.flow_controlled_len() as usize - data.len();
                if self.chunked && !data.is_empty() {
                    let _ = write!(self.resp, "{:x}\r\n", data.len());
                    self.resp.extend_from_slice(data);
                    self.resp.extend_from_slice(b"\r\n");
                } else {
                    self.resp.extend_from_slice(data);
                }
                self.owed = self.owed.saturating_add(pad as u32);
                if end_stream {
                    if self.chunked {
                        self.resp.extend_from_slice(b"0\r\n\r\n");
                    }
                    self.ended = true;
                }
                Ok(())
            }
            Frame::Settings(s) => {
                if let Some(w) = s.initial_window_size {
                    self.stream_window += i64::from(w) - self.peer_initial_window;
                    self.peer_initial_window = i64::from(w);
                }
                if let Some(size) = s.max_frame_size {
                    self.peer_max_frame = size as usize;
                }
                self.put(&Frame::SettingsAck);
                Ok(())
            }
            Frame::Ping { ack: false, data } => {
                self.put(&Frame::Ping { ack: true, data });
                Ok(())
            }
            Frame::WindowUpdate {
                stream_id,
                increment,
            } => {
                if stream_id == 0 {
                    self.send_window += i64::from(increment);
                } else if stream_id == STREAM {
                    self.stream_window += i64::from(increment);
                }
                Ok(())
            }
            Frame::RstStream { stream_id, code } if stream_id == STREAM => {
                if code == ErrorCode::NoError && self.ended {
                    return Ok(());
                }
                Err(io::Error::new(
                    ErrorKind::ConnectionReset,
                    format!("backend reset the stream: {code:?}"),
                ))
            }
            Frame::GoAway {
                last_stream_id,
                code,
                ..
            } if last_stream_id < STREAM && !self.ended => Err(io::Error::new(
                ErrorKind::ConnectionReset,
                format!("backend went away: {code:?}"),
            )),
            _ => Ok(()),
        }
    }

    /// A response head (interim or final) or trailers, written for the exchange.
    fn on_head(&mut self, list: &super::fields::HeaderList, end_stream: bool) -> io::Result<()> {
        if self.head_done {
            // Trailers.
            if self.chunked {
                self.resp.extend_from_slice(b"0\r\n");
                for (name, value) in list.fields() {
                    field(&mut self.resp, name, value);
                }
                self.resp.extend_from_slice(b"\r\n");
            }
            self.ended = true;
            return Ok(());
        }
        let status = list.status().unwrap_or(502);
        let _ = write!(self.resp, "HTTP/1.1 {status} {}\r\n", reason(status));
        let length = list.get(b"content-length").is_some();
        let interim = (100..200).contains(&status);
        for (name, value) in list.fields() {
            field(&mut self.resp, name, value);
        }
        if !interim && !end_stream && !length {
            self.resp
                .extend_from_slice(b"transfer-encoding: chunked\r\n");
            self.chunked = true;
        }
        if !interim && end_stream && !length && status != 204 && status != 304 {
            self.resp.extend_from_slice(b"content-length: 0\r\n");
        }
        self.resp.extend_from_slice(b"\r\n");
        if !interim {
            self.head_done = true;
            self.ended = end_stream;
        }
        Ok(())
    }

    fn put(&mut self, frame: &Frame<'_>) {
        frame::append_frame(&mut self.out, frame);
    }
}

/// The reason phrase of an HTTP/1.1 status line (HTTP/2 has none).
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}
