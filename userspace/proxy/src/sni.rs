//! The server name (SNI) of a TLS ClientHello, read without terminating TLS.
//!
//! Sans-io: [`parse`] looks at the bytes a client sent so far and says whether they hold a
//! complete ClientHello yet, and if so which `server_name` it carries. It never panics, never
//! reads past the input, and allocates only when the ClientHello is split over several TLS
//! records (then the record payloads are joined, bounded by the input's length). The bytes are
//! left untouched: the TCP session forwards them to the backend as they came.
//!
//! What it accepts is what RFC 8446 §4.1.2 and RFC 6066 §3 allow a client to send first: one or
//! more handshake records (content type 22, legacy version 3.x) whose payloads start with one
//! ClientHello (handshake type 1). The name is the first `host_name` entry of the
//! `server_name` extension, checked to be a plausible DNS name (ASCII letters, digits, `-`,
//! `_`, `.`; at most 255 bytes). Everything else (an SSLv2-style hello, another record type,
//! a truncated or inconsistent length) is an [`SniError`]: the caller decides what a client
//! that does not speak TLS gets. Routing (case, trailing dot) is not this module's business.
//!
//! Fuzzing: `parse` is the whole surface; any byte string is a valid input.

use std::borrow::Cow;

/// TLS record content type "handshake".
const HANDSHAKE: u8 = 22;
/// Handshake message type "client_hello".
const CLIENT_HELLO: u8 = 1;
/// Extension type "server_name".
const SERVER_NAME: u16 = 0;
/// server_name entry type "host_name".
const HOST_NAME: u8 = 0;
/// Largest TLS plaintext record payload (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;
/// Largest DNS name.
const MAX_NAME: usize = 255;

/// What the bytes received so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello may be coming but is not complete yet: wait until the input is at least
    /// `at_least` bytes long (parsing a shorter input again gives the same answer).
    Incomplete { at_least: usize },
    /// A complete ClientHello, with the server name it asked for (None: no SNI extension, or
    /// one with no host_name entry).
    Complete(Option<String>),
}

/// Why the bytes are not a ClientHello kakehi can route by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("not a TLS handshake record")]
    NotTls,
    #[error("the first handshake message is not a ClientHello")]
    NotClientHello,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("the server_name is not a valid host name")]
    BadServerName,
}

/// Reads the ClientHello at the start of `input` (see the module docs).
pub fn parse(input: &[u8]) -> Result<Hello, SniError> {
    let message = match handshake_message(input)? {
        Ok(message) => message,
        Err(at_least) => return Ok(Hello::Incomplete { at_least }),
    };
    let mut r = Reader::new(&message);
    if r.u8()? != CLIENT_HELLO {
        return Err(SniError::NotClientHello);
    }
    let len = r.u24()?;
    let body = r.take(len)?;
    server_name(body).map(Hello::Complete)
}

/// The first handshake message, joined from as many records as it spans; or, while more
/// bytes are needed, how long the input must be at least before the answer can change.
fn handshake_message(input: &[u8]) -> Result<Result<Cow<'_, [u8]>, usize>, SniError> {
    let mut joined: Option<Vec<u8>> = None;
    let mut offset = 0usize;
    loop {
        let rest = input.get(offset..).unwrap_or_default();
        let Some(header) = rest.get(..5) else {
            // Check what can be checked of a partial header, to refuse garbage early.
            check_partial_header(rest)?;
            return Ok(Err(offset + 5));
        };
        let [kind, major, _minor, hi, lo] = [
            byte(header, 0),
            byte(header, 1),
            byte(header, 2),
            byte(header, 3),
            byte(header, 4),
        ];
        if kind != HANDSHAKE || major != 3 {
            return Err(SniError::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len == 0 || len > MAX_RECORD {
            return Err(SniError::Malformed("record length"));
        }
        let end = offset + 5 + len;
        let Some(payload) = input.get(offset + 5..end) else {
            return Ok(Err(end));
        };
        offset = end;
        match joined.as_mut() {
            None => {
                if let Some(n) = complete_message(payload) {
                    return Ok(Ok(Cow::Borrowed(payload.get(..n).unwrap_or_default())));
                }
                joined = Some(payload.to_vec());
            }
            Some(buf) => buf.extend_from_slice(payload),
        }
        if let Some(buf) = joined.as_mut() {
            if let Some(n) = complete_message(buf) {
                buf.truncate(n);
                return Ok(Ok(Cow::Owned(std::mem::take(buf))));
            }
        }
    }
}

/// The length of the first handshake message of `data` (header included) if all of it is
/// there.
fn complete_message(data: &[u8]) -> Option<usize> {
    let header = data.get(..4)?;
    let len = u32::from_be_bytes([0, byte(header, 1), byte(header, 2), byte(header, 3)]) as usize;
    let total = len.checked_add(4)?;
    (data.len() >= total).then_some(total)
}

fn check_partial_header(partial: &[u8]) -> Result<(), SniError> {
    if partial.first().is_some_and(|&k| k != HANDSHAKE) {
        return Err(SniError::NotTls);
    }
    if partial.get(1).is_some_and(|&major| major != 3) {
        return Err(SniError::NotTls);
    }
    Ok(())
}

/// The server name in a ClientHello body (after the handshake header).
fn server_name(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader::new(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let session_id = r.u8()?;
    if session_id > 32 {
        return Err(SniError::Malformed("session id length"));
    }
    r.take(usize::from(session_id))?;
    let suites = r.u16()?;
    if suites < 2 || suites % 2 != 0 {
        return Err(SniError::Malformed("cipher suites length"));
    }
    r.take(usize::from(suites))?;
    let compression = r.u8()?;
    if compression == 0 {
        return Err(SniError::Malformed("compression methods length"));
    }
    r.take(usize::from(compression))?;
    if r.is_empty() {
        // A hello without extensions (TLS 1.2 and older may send one).
        return Ok(None);
    }
    let len = r.u16()?;
    let mut extensions = Reader::new(r.take(usize::from(len))?);
    if !r.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let len = extensions.u16()?;
        let data = extensions.take(usize::from(len))?;
        if kind == SERVER_NAME {
            return host_name(data);
        }
    }
    Ok(None)
}

/// The first host_name of a server_name extension.
fn host_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader::new(data);
    let len = r.u16()?;
    let mut list = Reader::new(r.take(usize::from(len))?);
    if !r.is_empty() {
        return Err(SniError::Malformed("server_name extension length"));
    }
    while !list.is_empty() {
        let kind = list.u8()?;
        let len = list.u16()?;
        let name = list.take(usize::from(len))?;
        if kind == HOST_NAME {
            return valid_name(name).map(Some);
        }
    }
    Ok(None)
}

fn valid_name(name: &[u8]) -> Result<String, SniError> {
    let plausible = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !plausible {
        return Err(SniError::BadServerName);
    }
    String::from_utf8(name.to_vec()).map_err(|_| SniError::BadServerName)
}

fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

/// A bounds-checked cursor: every read past the end is a `Malformed` error.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SniError> {
        if n > self.data.len() {
            return Err(SniError::Malformed("length past the end"));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, SniError> {
        Ok(byte(self.take(1)?, 0))
    }

    fn u16(&mut self) -> Result<u16, SniError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([byte(b, 0), byte(b, 1)]))
    }

    fn u24(&mut self) -> Result<usize, SniError> {
        let b = self.take(3)?;
        Ok(u32::from_be_bytes([0, byte(b, 0), byte(b, 1), byte(b, 2)]) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello body with the given extensions block (None: no extensions at all).
    fn hello_body(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[7; 32]);
        b.push(32);
        b.extend_from_slice(&[9; 32]);
        b.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        b.extend_from_slice(&[1, 0]);
        if let Some(ext) = extensions {
            b.extend_from_slice(&(ext.len() as u16).to_be_bytes());
            b.extend_from_slice(ext);
        }
        b
    }

    fn sni_extension(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![HOST_NAME];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        let mut ext = SERVER_NAME.to_be_bytes().to_vec();
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    fn handshake(body: &[u8]) -> Vec<u8> {
        let mut m = vec![CLIENT_HELLO];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend_from_slice(body);
        m
    }

    /// `message` in records of at most `chunk` payload bytes.
    fn records(message: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in message.chunks(chunk) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// A whole ClientHello asking for `name`, with a padding extension before the SNI one.
    fn client_hello(name: &str) -> Vec<u8> {
        let mut ext = vec![0, 21, 0, 3, 0, 0, 0]; // padding
        ext.extend_from_slice(&sni_extension(name.as_bytes()));
        records(&handshake(&hello_body(Some(&ext))), MAX_RECORD)
    }

    #[test]
    fn finds_the_name_byte_by_byte() {
        let hello = client_hello("db.example.com");
        for cut in 0..hello.len() {
            match parse(&hello[..cut]) {
                Ok(Hello::Incomplete { at_least }) => assert!(at_least > cut, "cut at {cut}"),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        assert_eq!(
            parse(&hello),
            Ok(Hello::Complete(Some("db.example.com".into())))
        );
        // Application data after the hello changes nothing.
        let mut more = hello.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(
            parse(&more),
            Ok(Hello::Complete(Some("db.example.com".into())))
        );
    }

    #[test]
    fn joins_a_hello_split_over_records() {
        let ext = sni_extension(b"split.example");
        let message = handshake(&hello_body(Some(&ext)));
        for chunk in [1, 2, 5, 17, 60] {
            let wire = records(&message, chunk);
            assert_eq!(
                parse(&wire),
                Ok(Hello::Complete(Some("split.example".into()))),
                "chunk {chunk}"
            );
            assert_eq!(
                parse(&wire[..wire.len() - 1]),
                Ok(Hello::Incomplete {
                    at_least: wire.len()
                })
            );
        }
    }

    #[test]
    fn no_sni() {
        let wire = records(&handshake(&hello_body(None)), MAX_RECORD);
        assert_eq!(parse(&wire), Ok(Hello::Complete(None)));
        let wire = records(&handshake(&hello_body(Some(&[0, 21, 0, 1, 0]))), MAX_RECORD);
        assert_eq!(parse(&wire), Ok(Hello::Complete(None)));
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(SniError::NotTls));
        assert_eq!(parse(b"G"), Err(SniError::NotTls));
        assert_eq!(parse(&[HANDSHAKE, 2]), Err(SniError::NotTls));
        assert_eq!(
            parse(&[HANDSHAKE, 3, 1, 0, 0]),
            Err(SniError::Malformed("record length"))
        );
        // ServerHello instead of ClientHello.
        let mut m = handshake(&hello_body(None));
        m[0] = 2;
        assert_eq!(
            parse(&records(&m, MAX_RECORD)),
            Err(SniError::NotClientHello)
        );
        // A handshake length larger than its body claims bytes that never come: incomplete,
        // and a record in between that is not a handshake is refused.
        let mut m = handshake(&hello_body(None));
        m[3] = m[3].wrapping_add(10);
        let mut wire = records(&m, MAX_RECORD);
        assert_eq!(
            parse(&wire),
            Ok(Hello::Incomplete {
                at_least: wire.len() + 5
            })
        );
        wire.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(parse(&wire), Err(SniError::NotTls));
        // An SNI with a space or a NUL in it.
        for bad in [&b"a b"[..], b"a\0b", b""] {
            let wire = records(
                &handshake(&hello_body(Some(&sni_extension(bad)))),
                MAX_RECORD,
            );
            assert_eq!(parse(&wire), Err(SniError::BadServerName), "{bad:?}");
        }
    }

    #[test]
    fn every_truncation_and_corruption_is_an_answer() {
        let hello = client_hello("x.example.org");
        let body_start = 5 + 4;
        for i in 0..hello.len() {
            for delta in [1u8, 0x7f, 0xff] {
                let mut m = hello.clone();
                m[i] = m[i].wrapping_add(delta);
                let _ = parse(&m);
                let _ = parse(&m[..i]);
                let _ = parse(&m[i..]);
            }
        }
        // Lengths inside the body shortened by one: an error, never a wrong name.
        let mut m = hello.clone();
        m[body_start + 2 + 32] = 33; // session id length over 32
        assert_eq!(parse(&m), Err(SniError::Malformed("session id length")));
    }

    #[test]
    fn pseudo_random_inputs_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let hello = client_hello("fuzz.example");
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 300) as usize;
            let mut data: Vec<u8> = hello.iter().take(len).copied().collect();
            let pos = (x >> 16) as usize % data.len().max(1);
            if let Some(b) = data.get_mut(pos) {
                *b = (x >> 40) as u8;
            }
            if let Ok(Hello::Incomplete { at_least }) = parse(&data) {
                assert!(at_least > data.len(), "{data:?}");
            }
        }
    }
}
