//! The HTTP/1.1 response a stream's exchange machine writes, read back into the pieces of an
//! HTTP/2 response: the head (status and fields), the body's bytes and the trailers.
//!
//! The bytes come from kakehi itself (kawa's HTTP/1.1 converter, or one of kakehi's own
//! answers), so this reader is strict and small: a status line, fields up to the empty line,
//! then the body as the head frames it (`content-length`, chunked, or up to the end of the
//! stream's output); none after a 1xx, a 204 or 304, or for a HEAD request. Anything else is
//! an error and the stream is reset.
//!
//! The same reader reads the HTTP/1.1 request an exchange writes to an HTTP/2 backend
//! ([`ResponseReader::request`], see `backend.rs`): a request line, fields, and a body only
//! when `content-length` or chunked says so.

use std::ops::Range;

/// One piece of the response, as ranges of the buffer given to [`ResponseReader::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A head: its status (0 for a request), the range of its start line, and the range of
    /// its field lines (see [`fields`]). A 1xx head is interim: another head follows.
    Head {
        status: u16,
        line: Range<usize>,
        fields: Range<usize>,
    },
    /// Body bytes.
    Data(Range<usize>),
    /// The trailer field lines of a chunked body.
    Trailers(Range<usize>),
}

/// The output is not an HTTP/1.1 response this reader can follow, or it ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bad;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Length(u64),
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Done,
}

/// Reads one response (and the interim ones before it).
#[derive(Debug, Clone)]
pub struct ResponseReader {
    phase: Phase,
    head_request: bool,
    /// Reads a request rather than a response.
    request: bool,
}

/// Longest head this reader waits for before it calls the output bad.
const MAX_HEAD: usize = 64 * 1024;

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The field lines of a head (or trailers) as (name, value), names as written.
pub fn fields(lines: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    lines
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let colon = l.iter().position(|&b| b == b':')?;
            let name = l.get(..colon)?;
            let value = l.get(colon + 1..)?.trim_ascii();
            Some((name, value))
        })
}

/// Fields HTTP/2 does not carry (RFC 9113 §8.2.2).
pub fn connection_specific(name: &[u8]) -> bool {
    [
        &b"connection"[..],
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    ]
    .iter()
    .any(|n| n.eq_ignore_ascii_case(name))
}

impl ResponseReader {
    /// A reader for the response to a request; `head_request`: a HEAD, whose response has no
    /// body whatever its head says.
    pub fn new(head_request: bool) -> ResponseReader {
        ResponseReader {
            phase: Phase::Head,
            head_request,
            request: false,
        }
    }

    /// A reader for a request (to an HTTP/2 backend).
    pub fn request() -> ResponseReader {
        ResponseReader {
            phase: Phase::Head,
            head_request: false,
            request: true,
        }
    }

    /// The final response was read whole.
    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// A final head was read (the body or its end follows).
    pub fn head_read(&self) -> bool {
        self.phase != Phase::Head
    }

    /// The next piece in `buf[*at..]`, moving `*at` past the bytes it used; at most
    /// `max_data` bytes of body in one piece. `closed`: nothing more will be written, so what
    /// is missing never comes. `Ok(None)`: wait for more bytes or more room (or [`done`]).
    ///
    /// [`done`]: ResponseReader::done
    pub fn next(
        &mut self,
        buf: &[u8],
        at: &mut usize,
        max_data: usize,
        closed: bool,
    ) -> Result<Option<Piece>, Bad> {
        loop {
            let rest = buf.get(*at..).unwrap_or_default();
            match self.phase {
                Phase::Done => return Ok(None),
                Phase::Head => {
                    let Some(end) = find(rest, b"\r\n\r\n") else {
                        return if closed || rest.len() > MAX_HEAD {
                            Err(Bad)
                        } else {
                            Ok(None)
                        };
                    };
                    let line_end = find(rest, b"\r\n").ok_or(Bad)?;
                    let start_line = rest.get(..line_end).ok_or(Bad)?;
                    let status = if self.request {
                        check_request_line(start_line)?;
                        0
                    } else {
                        parse_status(start_line)?
                    };
                    let lines = *at + line_end + 2..*at + end + 2;
                    let head = buf.get(lines.clone()).ok_or(Bad)?;
                    self.phase = self.body_phase(status, head)?;
                    let line = *at..*at + line_end;
                    *at += end + 4;
                    return Ok(Some(Piece::Head {
                        status,
                        line,
                        fields: lines,
                    }));
                }
                Phase::Length(left) => {
                    return self.counted(
                        rest.len(),
                        at,
                        left,
                        max_data,
                        closed,
                        Phase::Length,
                        Phase::Done,
                    );
                }
                Phase::UntilClose => {
                    let take = rest.len().min(max_data);
                    if take == 0 {
                        if closed && rest.is_empty() {
                            self.phase = Phase::Done;
                        }
                        return Ok(None);
                    }
                    let range = *at..*at + take;
                    *at += take;
                    return Ok(Some(Piece::Data(range)));
                }
                Phase::ChunkSize => {
                    let Some(end) = find(rest, b"\r\n") else {
                        return if closed || rest.len() > 1024 {
                            Err(Bad)
                        } else {
                            Ok(None)
                        };
                    };
                    let line = rest.get(..end).ok_or(Bad)?;
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                    let digits = std::str::from_utf8(digits.trim_ascii()).map_err(|_| Bad)?;
                    let size = u64::from_str_radix(digits, 16).map_err(|_| Bad)?;
                    *at += end + 2;
                    self.phase = if size == 0 {
                        Phase::Trailers
                    } else {
                        Phase::ChunkData(size)
                    };
                }
                Phase::ChunkData(left) => {
                    return self.counted(
                        rest.len(),
                        at,
                        left,
                        max_data,
                        closed,
                        Phase::ChunkData,
                        Phase::ChunkEnd,
                    );
                }
                Phase::ChunkEnd => {
                    if rest.len() < 2 {
                        return if closed { Err(Bad) } else { Ok(None) };
                    }
                    if rest.get(..2) != Some(b"\r\n") {
                        return Err(Bad);
                    }
                    *at += 2;
                    self.phase = Phase::ChunkSize;
                }
                Phase::Trailers => {
                    if rest.starts_with(b"\r\n") {
                        *at += 2;
                        self.phase = Phase::Done;
                        return Ok(None);
                    }
                    let Some(end) = find(rest, b"\r\n\r\n") else {
                        return if closed || rest.len() > MAX_HEAD {
                            Err(Bad)
                        } else {
                            Ok(None)
                        };
                    };
                    let range = *at..*at + end + 2;
                    *at += end + 4;
                    self.phase = Phase::Done;
                    return Ok(Some(Piece::Trailers(range)));
                }
            }
        }
    }

    /// Body bytes of a counted run (a declared length, or one chunk): `left` of them still due,
    /// `available` in the buffer from `*at`; `more(n)` is the phase while `n` are still due,
    /// `then` the one once all came.
    #[allow(clippy::too_many_arguments)]
    fn counted(
        &mut self,
        available: usize,
        at: &mut usize,
        left: u64,
        max_data: usize,
        closed: bool,
        more: fn(u64) -> Phase,
        then: Phase,
    ) -> Result<Option<Piece>, Bad> {
        let take = data_len(available, left, max_data);
        if take == 0 {
            return if closed && available == 0 {
                Err(Bad)
            } else {
                Ok(None)
            };
        }
        let left = left - take as u64;
        self.phase = if left == 0 { then } else { more(left) };
        let range = *at..*at + take;
        *at += take;
        Ok(Some(Piece::Data(range)))
    }

    /// What follows a head with `status` and field lines `head`.
    fn body_phase(&self, status: u16, head: &[u8]) -> Result<Phase, Bad> {
        if !self.request && (100..200).contains(&status) {
            return Ok(Phase::Head);
        }
        if self.head_request || status == 204 || status == 304 {
            return Ok(Phase::Done);
        }
        let mut length = None;
        let mut chunked = false;
        for (name, value) in fields(head) {
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"content-length") {
                let text = std::str::from_utf8(value).map_err(|_| Bad)?;
                length = Some(text.parse::<u64>().map_err(|_| Bad)?);
            }
        }
        Ok(match (chunked, length) {
            (true, _) => Phase::ChunkSize,
            (false, Some(0)) => Phase::Done,
            (false, Some(n)) => Phase::Length(n),
            // A request without a declared body has none (RFC 9112 §6.3).
            (false, None) if self.request => Phase::Done,
            (false, None) => Phase::UntilClose,
        })
    }
}

fn data_len(available: usize, left: u64, max: usize) -> usize {
    let left = usize::try_from(left).unwrap_or(usize::MAX);
    available.min(left).min(max)
}

/// `METHOD target HTTP/1.1`, as kakehi writes it to a backend.
fn check_request_line(line: &[u8]) -> Result<(), Bad> {
    let mut parts = line.split(|&b| b == b' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None)
            if !m.is_empty() && !t.is_empty() && v.starts_with(b"HTTP/1.") =>
        {
            Ok(())
        }
        _ => Err(Bad),
    }
}

/// The method and target of a request line checked by [`ResponseReader::request`].
pub fn request_line(line: &[u8]) -> (&[u8], &[u8]) {
    let mut parts = line.split(|&b| b == b' ');
    (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    )
}

/// `HTTP/1.x SSS reason` → SSS.
fn parse_status(line: &[u8]) -> Result<u16, Bad> {
    let rest = line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))
        .ok_or(Bad)?;
    let digits = rest.get(..3).ok_or(Bad)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(Bad);
    }
    let text = std::str::from_utf8(digits).map_err(|_| Bad)?;
    text.parse().map_err(|_| Bad)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn all(reader: &mut ResponseReader, buf: &[u8], max: usize) -> Vec<(String, Vec<u8>)> {
        let mut at = 0;
        let mut out = Vec::new();
        while let Some(p) = reader.next(buf, &mut at, max, true).unwrap() {
            match p {
                Piece::Head { status, fields, .. } => {
                    out.push((format!("head {status}"), buf[fields].to_vec()))
                }
                Piece::Data(r) => out.push(("data".into(), buf[r].to_vec())),
                Piece::Trailers(r) => out.push(("trailers".into(), buf[r].to_vec())),
            }
        }
        out
    }

    #[test]
    fn length_chunked_interim_and_trailers() {
        let mut r = ResponseReader::new(false);
        let out = all(
            &mut r,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            3,
        );
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].1, b"hel");
        assert_eq!(out[2].1, b"lo");
        assert!(r.done());

        let mut r = ResponseReader::new(false);
        let out = all(
            &mut r,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\ngrpc-status: 0\r\n\r\n",
            100,
        );
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["head 100", "head 200", "data", "data", "trailers"]);
        assert_eq!(
            fields(&out[4].1).collect::<Vec<_>>(),
            [(&b"grpc-status"[..], &b"0"[..])]
        );
        assert!(r.done());
    }

    #[test]
    fn no_body_cases_and_until_close() {
        let mut r = ResponseReader::new(true);
        all(&mut r, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 10);
        assert!(r.done(), "HEAD has no body");
        let mut r = ResponseReader::new(false);
        all(&mut r, b"HTTP/1.1 304 Not Modified\r\n\r\n", 10);
        assert!(r.done());
        let mut r = ResponseReader::new(false);
        let out = all(&mut r, b"HTTP/1.1 200 OK\r\n\r\nall of it", 100);
        assert_eq!(out[1].1, b"all of it");
        assert!(r.done(), "closed output ends a close-delimited body");
    }

    #[test]
    fn truncated_or_garbled_output_is_bad() {
        let mut r = ResponseReader::new(false);
        let mut at = 0;
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe";
        assert!(matches!(r.next(buf, &mut at, 10, true), Ok(Some(_))));
        assert!(matches!(r.next(buf, &mut at, 10, true), Ok(Some(_))));
        assert_eq!(r.next(buf, &mut at, 10, true), Err(Bad));
        let mut r = ResponseReader::new(false);
        assert_eq!(r.next(b"SSH-2.0\r\n\r\n", &mut 0, 10, false), Err(Bad));
        let mut r = ResponseReader::new(false);
        let buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        let mut at = 0;
        assert!(matches!(r.next(buf, &mut at, 10, false), Ok(Some(_))));
        assert_eq!(r.next(buf, &mut at, 10, false), Err(Bad));
    }
}
