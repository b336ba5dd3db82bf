//! One HTTP/2 stream's side of its connection, as the exchange machine sees a client: the
//! request as HTTP/1.1 bytes to read (`request.rs` writes them from HEADERS and DATA), and a
//! place to write the HTTP/1.1 response (which `response.rs` reads back into HEADERS and
//! DATA frames). Both are bounded: the request by the stream's flow-control window (the
//! client may not send more than kakehi granted), the response by [`OUTPUT_CAP`], past which
//! a write would block, so that the backend waits for the client's window like a slow
//! HTTP/1.1 client.

use crate::http::exchange::FrontWire;
use std::io::{self, ErrorKind, IoSlice, Read, Write};

/// Response bytes a stream holds before the exchange is told to wait.
pub const OUTPUT_CAP: usize = 32 * 1024;

#[derive(Debug, Default)]
pub struct StreamWire {
    /// Request bytes (HTTP/1.1) the exchange has not read yet, from `input_at`.
    input: Vec<u8>,
    input_at: usize,
    /// The request ended: once `input` is read, a read returns 0.
    input_end: bool,
    /// Response bytes (HTTP/1.1) the exchange wrote, not yet framed.
    pub output: Vec<u8>,
    /// The exchange shut its side, or ended: no more output comes.
    pub output_closed: bool,
    /// Every request byte the exchange read, kept when the worker keeps a transcript
    /// ([`crate::cx::Cx::transcript`]: the fuzz target's differential check), else `None`.
    pub tap: Option<Vec<u8>>,
    /// The connection's verified client certificate.
    pub client_cert: Option<std::sync::Arc<crate::tls::ClientCert>>,
}

impl StreamWire {
    /// Made ready for another stream, keeping its allocations: returns the request buffer,
    /// empty, for the next head.
    pub fn reset(&mut self) -> &mut Vec<u8> {
        self.input.clear();
        self.input_at = 0;
        self.input_end = false;
        self.output.clear();
        self.output_closed = false;
        if let Some(tap) = self.tap.as_mut() {
            tap.clear();
        }
        &mut self.input
    }

    /// Appends request bytes (`request.rs` wrote them).
    pub fn input(&mut self) -> &mut Vec<u8> {
        if self.input_at > 0 && self.input_at == self.input.len() {
            self.input.clear();
            self.input_at = 0;
        }
        &mut self.input
    }

    /// The request has no more bytes.
    pub fn end_input(&mut self) {
        self.input_end = true;
    }

    /// Request bytes waiting for the exchange.
    pub fn pending_input(&self) -> usize {
        self.input.len() - self.input_at
    }

    /// Room left for response bytes.
    pub fn output_room(&self) -> usize {
        OUTPUT_CAP.saturating_sub(self.output.len())
    }
}

impl Read for StreamWire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = self.input.get(self.input_at..).unwrap_or_default();
        if rest.is_empty() {
            return if self.input_end {
                Ok(0)
            } else {
                Err(ErrorKind::WouldBlock.into())
            };
        }
        let n = rest.len().min(buf.len());
        if let (Some(to), Some(from)) = (buf.get_mut(..n), rest.get(..n)) {
            to.copy_from_slice(from);
            if let Some(tap) = self.tap.as_mut() {
                tap.extend_from_slice(from);
            }
        }
        self.input_at += n;
        if self.input_at == self.input.len() {
            self.input.clear();
            self.input_at = 0;
            if self.input.capacity() > 64 * 1024 {
                self.input = Vec::new();
            }
        }
        Ok(n)
    }
}

impl Write for StreamWire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.output_closed {
            return Err(ErrorKind::BrokenPipe.into());
        }
        let mut room = self.output_room();
        if room == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room);
            self.output
                .extend_from_slice(b.get(..take).unwrap_or_default());
            n += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FrontWire for StreamWire {
    fn has_pending(&self) -> bool {
        false
    }

    fn client_cert(&self) -> Option<std::sync::Arc<crate::tls::ClientCert>> {
        self.client_cert.clone()
    }

    fn take_tap(&mut self) -> Option<Vec<u8>> {
        self.tap.as_mut().map(std::mem::take)
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
        self.output_closed = true;
    }

    fn discard(&mut self, _scratch: &mut [u8]) -> io::Result<usize> {
        // A stream has nothing to linger for: what the client still sends on it is dropped
        // by the connection once the stream ends.
        Ok(0)
    }

    fn is_tls(&self) -> bool {
        false
    }

    fn proto(&self) -> &'static str {
        "h2"
    }
}
