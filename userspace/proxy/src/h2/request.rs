//! An HTTP/2 request written as HTTP/1.1 bytes, for the exchange machine of its stream.
//!
//! Each stream is served by one HTTP/1.1 exchange (`http/exchange/`), so that routing, the
//! smuggling checks, the forwarding headers, the answers and the log are the very ones of
//! HTTP/1.1. The stream feeds that machine a request line and head built from the decoded
//! header list ([`write_head`]), then the DATA frames as the body: as they are when the
//! request declared a `content-length`, in chunks otherwise ([`write_data`]), ended by
//! [`write_end`] with the trailers when chunked. The header list was checked already
//! (`fields.rs`: no connection-specific field, no CR, LF or NUL, pseudo-headers right).

use super::error::Malformed;
use super::fields::HeaderList;
use std::io::Write as _;

/// How the request body goes to the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (END_STREAM came with the head).
    None,
    /// The declared `content-length`: DATA is passed as it is, and must add up to it.
    Length(u64),
    /// No length declared: DATA goes in chunks, and trailers after the last one.
    Chunked,
}

/// The declared content-length: every `content-length` field must say the same number.
fn content_length(list: &HeaderList) -> Result<Option<u64>, Malformed> {
    let mut found: Option<u64> = None;
    for (name, value) in list.fields() {
        if name != b"content-length" {
            continue;
        }
        let text = std::str::from_utf8(value).map_err(|_| Malformed::BadValue)?;
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Malformed::BadValue);
        }
        let n: u64 = text.parse().map_err(|_| Malformed::BadValue)?;
        match found {
            Some(m) if m != n => return Err(Malformed::BadValue),
            _ => found = Some(n),
        }
    }
    Ok(found)
}

/// Writes the request line and head for `list` into `out`; `end_stream`: no body follows.
pub fn write_head(
    list: &HeaderList,
    end_stream: bool,
    out: &mut Vec<u8>,
) -> Result<Framing, Malformed> {
    let method = list.method().ok_or(Malformed::MissingPseudo)?;
    let declared = content_length(list)?;
    let framing = match declared {
        // A body of declared length that cannot come (RFC 9113 §8.1.1).
        Some(n) if end_stream && n > 0 => return Err(Malformed::BadValue),
        _ if end_stream => Framing::None,
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    };
    out.extend_from_slice(method);
    out.push(b' ');
    if method == b"CONNECT" {
        out.extend_from_slice(list.authority().unwrap_or_default());
    } else {
        out.extend_from_slice(list.path().unwrap_or(b"/"));
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Host first, from :authority (a host field then says the same: fields.rs checked it).
    let host = list.authority().or_else(|| list.get(b"host"));
    if let Some(host) = host {
        field(out, b"host", host);
    }
    let mut cookies = 0usize;
    for (name, value) in list.fields() {
        match name {
            b"host" | b"content-length" | b"te" => {}
            // Cookie crumbs are joined into one field for HTTP/1.1 (§8.2.3).
            b"cookie" => cookies += 1,
            _ => field(out, name, value),
        }
    }
    if cookies > 0 {
        out.extend_from_slice(b"cookie: ");
        let mut first = true;
        for (_, value) in list.fields().filter(|(n, _)| *n == b"cookie") {
            if !first {
                out.extend_from_slice(b"; ");
            }
            first = false;
            out.extend_from_slice(value);
        }
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None => {
            if declared == Some(0) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(framing)
}

/// Appends `name: value` and its line end (an HTTP/1.1 field line).
pub(super) fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends the payload of one DATA frame as the body goes.
pub fn write_data(framing: Framing, data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    match framing {
        Framing::Chunked => {
            let _ = write!(out, "{:x}\r\n", data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length(_) | Framing::None => out.extend_from_slice(data),
    }
}

/// Ends the body: the last chunk and the trailers when chunked (trailers cannot follow a body
/// of declared length in HTTP/1.1: they are dropped then).
pub fn write_end(framing: Framing, trailers: Option<&HeaderList>, out: &mut Vec<u8>) {
    if framing != Framing::Chunked {
        return;
    }
    out.extend_from_slice(b"0\r\n");
    if let Some(list) = trailers {
        for (name, value) in list.fields() {
            field(out, name, value);
        }
    }
    out.extend_from_slice(b"\r\n");
}
