//! A decoded header list ([`HeaderList`]: the request pseudo-headers apart, the regular fields
//! in order, all in one allocation) and the rules a request or trailer block must follow
//! (RFC 9113 §8.1, §8.2, §8.3), applied field by field as HPACK decodes them.
//!
//! The limits ([`HeaderLimits`]) are checked while decoding: the header list size counted as
//! SETTINGS_MAX_HEADER_LIST_SIZE says (name + value + 32 octets per field, §6.5.2) and a cap
//! on regular fields. Past the first violation nothing more is stored, so a hostile block
//! costs no memory beyond the limits; HPACK still decodes the rest of the block, because the
//! compression context must stay in step with the peer's (the violation is a stream error).
//! Turning the list into an HTTP/1.1 request for a backend is the connection's job; so are
//! cookie crumbs (§8.2.3) and checks against the body (content-length).

use super::error::{ErrorCode, H2Error, Malformed, Reason};

/// Default SETTINGS_MAX_HEADER_LIST_SIZE: what an HTTP/1.1 head may be in kakehi's default
/// 16 KiB buffer.
pub const DEFAULT_MAX_LIST_SIZE: u32 = 16_384;
/// Default cap on regular fields in one list, as for HTTP/1.1 (`http::MAX_HEADER_FIELDS`).
pub const DEFAULT_MAX_FIELDS: usize = crate::http::MAX_HEADER_FIELDS;
/// What each field adds to the header list size besides its name and value (§6.5.2).
pub const FIELD_OVERHEAD: usize = 32;

/// Caps on a decoded header list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimits {
    /// SETTINGS_MAX_HEADER_LIST_SIZE as advertised: name + value + 32 per field, all fields.
    pub max_list_size: u32,
    /// Most regular (non-pseudo) fields.
    pub max_fields: usize,
}

impl Default for HeaderLimits {
    fn default() -> Self {
        HeaderLimits {
            max_list_size: DEFAULT_MAX_LIST_SIZE,
            max_fields: DEFAULT_MAX_FIELDS,
        }
    }
}

/// What a header block is for, which decides the rules it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// A request head: the request pseudo-headers first, then regular fields.
    Request,
    /// Trailers: regular fields only.
    Trailers,
    /// A response head (from an HTTP/2 backend): `:status`, then regular fields.
    Response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: usize,
    name_end: usize,
    end: usize,
}

const METHOD: usize = 0;
const SCHEME: usize = 1;
const AUTHORITY: usize = 2;
const PATH: usize = 3;
const STATUS: usize = 4;
const PSEUDO: [&[u8]; 5] = [b":method", b":scheme", b":authority", b":path", b":status"];

/// A decoded and checked header list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderList {
    bytes: Vec<u8>,
    fields: Vec<Span>,
    pseudo: [Option<Span>; 5],
    size: usize,
}

impl HeaderList {
    fn name(&self, s: Span) -> &[u8] {
        self.bytes.get(s.start..s.name_end).unwrap_or_default()
    }

    fn value(&self, s: Span) -> &[u8] {
        self.bytes.get(s.name_end..s.end).unwrap_or_default()
    }

    fn pseudo(&self, which: usize) -> Option<&[u8]> {
        let span = self.pseudo.get(which).copied().flatten()?;
        Some(self.value(span))
    }

    /// `:method`.
    pub fn method(&self) -> Option<&[u8]> {
        self.pseudo(METHOD)
    }

    /// `:scheme`.
    pub fn scheme(&self) -> Option<&[u8]> {
        self.pseudo(SCHEME)
    }

    /// `:authority`.
    pub fn authority(&self) -> Option<&[u8]> {
        self.pseudo(AUTHORITY)
    }

    /// `:path`.
    pub fn path(&self) -> Option<&[u8]> {
        self.pseudo(PATH)
    }

    /// `:status` of a response, as a number.
    pub fn status(&self) -> Option<u16> {
        let v = self.pseudo(STATUS)?;
        if v.len() != 3 || !v.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(v).ok()?.parse().ok()
    }

    /// The regular fields, in order, as (name, value); names are lower-case.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.fields.iter().map(|&s| (self.name(s), self.value(s)))
    }

    /// The value of the first regular field named `name` (lower-case).
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// How many regular fields.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// No regular field.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The header list size of §6.5.2: name + value + 32 for each field, pseudo-headers
    /// included.
    pub fn list_size(&self) -> usize {
        self.size
    }
}

/// Builds a [`HeaderList`] from decoded fields, checking each; the first violation is kept
/// and everything after it is only counted.
pub(super) struct ListBuilder {
    list: HeaderList,
    kind: BlockKind,
    limits: HeaderLimits,
    stream_id: u32,
    regular_seen: bool,
    error: Option<H2Error>,
}

/// RFC 9110 §5.6.2 `tchar`, upper-case letters excluded (HTTP/2 field names are lower-case).
fn is_name_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*'
        | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// §8.2.1: no NUL, CR or LF; no white space at either end.
fn value_ok(v: &[u8]) -> bool {
    let ws = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    !v.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) && !ws(v.first()) && !ws(v.last())
}

/// Visible octets only: what a request target or authority may hold when it is written into
/// an HTTP/1.1 request line or Host field (no white space, no control characters).
fn visible(v: &[u8]) -> bool {
    v.iter().all(|&b| b > b' ' && b != 0x7f)
}

const CONNECTION_SPECIFIC: [&[u8]; 5] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
];

impl ListBuilder {
    pub(super) fn new(kind: BlockKind, limits: HeaderLimits, stream_id: u32) -> ListBuilder {
        ListBuilder {
            list: HeaderList::default(),
            kind,
            limits,
            stream_id,
            regular_seen: false,
            error: None,
        }
    }

    /// A field too large to be stored at all (a string longer than any limit).
    pub(super) fn too_large(&mut self) {
        let max = self.limits.max_list_size;
        self.list.size = usize::MAX;
        self.fail(ErrorCode::ProtocolError, Reason::HeaderListTooLarge { max });
    }

    fn fail(&mut self, code: ErrorCode, reason: Reason) {
        if self.error.is_none() {
            self.error = Some(H2Error::stream(self.stream_id, code, reason));
        }
    }

    fn malformed(&mut self, m: Malformed) {
        self.fail(ErrorCode::ProtocolError, Reason::Malformed(m));
    }

    /// One decoded field.
    pub(super) fn push(&mut self, name: &[u8], value: &[u8]) {
        if self.error.is_some() {
            return;
        }
        let size = name.len() + value.len() + FIELD_OVERHEAD;
        self.list.size = self.list.size.saturating_add(size);
        if self.list.size > self.limits.max_list_size as usize {
            let max = self.limits.max_list_size;
            return self.fail(ErrorCode::ProtocolError, Reason::HeaderListTooLarge { max });
        }
        if !value_ok(value) {
            return self.malformed(Malformed::BadValue);
        }
        let slot = match name.split_first() {
            None => return self.malformed(Malformed::BadName),
            Some((b':', _)) => {
                if self.kind == BlockKind::Trailers {
                    return self.malformed(Malformed::PseudoInTrailers);
                }
                if self.regular_seen {
                    return self.malformed(Malformed::PseudoAfterRegular);
                }
                let Some(which) = PSEUDO.iter().position(|p| *p == name) else {
                    return self.malformed(Malformed::UnknownPseudo);
                };
                // A response has :status and nothing else; a request anything but it.
                if (which == STATUS) != (self.kind == BlockKind::Response) {
                    return self.malformed(Malformed::UnknownPseudo);
                }
                if self.list.pseudo.get(which).copied().flatten().is_some() {
                    return self.malformed(Malformed::DuplicatePseudo);
                }
                Some(which)
            }
            Some(_) => {
                if let Some(&b) = name.iter().find(|&&b| !is_name_char(b)) {
                    let m = if b.is_ascii_uppercase() {
                        Malformed::UpperCaseName
                    } else {
                        Malformed::BadName
                    };
                    return self.malformed(m);
                }
                if CONNECTION_SPECIFIC.contains(&name) {
                    return self.malformed(Malformed::ConnectionSpecific);
                }
                if name == b"te" && value != b"trailers" {
                    return self.malformed(Malformed::BadTe);
                }
                if self.list.fields.len() >= self.limits.max_fields {
                    let max = self.limits.max_fields;
                    return self.fail(ErrorCode::ProtocolError, Reason::TooManyFields { max });
                }
                self.regular_seen = true;
                None
            }
        };
        let start = self.list.bytes.len();
        self.list.bytes.extend_from_slice(name);
        self.list.bytes.extend_from_slice(value);
        let span = Span {
            start,
            name_end: start + name.len(),
            end: self.list.bytes.len(),
        };
        match slot.and_then(|w| self.list.pseudo.get_mut(w)) {
            Some(p) => *p = Some(span),
            None => self.list.fields.push(span),
        }
    }

    /// The list once the whole block is decoded, after the checks on the list as a whole.
    pub(super) fn finish(mut self) -> Result<HeaderList, H2Error> {
        if self.error.is_none() && self.kind == BlockKind::Response && self.list.status().is_none()
        {
            self.malformed(Malformed::MissingPseudo);
        }
        if self.error.is_none() && self.kind == BlockKind::Request {
            if let Err(m) = check_request(&self.list) {
                self.malformed(m);
            }
        }
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.list),
        }
    }
}

/// §8.3.1 and §8.5, plus what an HTTP/1.1 request line needs of :method and :path.
fn check_request(list: &HeaderList) -> Result<(), Malformed> {
    let method = list.method().ok_or(Malformed::MissingPseudo)?;
    if method.is_empty()
        || !method
            .iter()
            .all(|&b| is_name_char(b) || b.is_ascii_uppercase())
    {
        return Err(Malformed::BadMethod);
    }
    if let Some(authority) = list.authority() {
        if !visible(authority) {
            return Err(Malformed::BadAuthority);
        }
    }
    if method == b"CONNECT" {
        if list.scheme().is_some() || list.path().is_some() || list.authority().is_none() {
            return Err(Malformed::BadConnect);
        }
        return Ok(());
    }
    let (Some(scheme), Some(path)) = (list.scheme(), list.path()) else {
        return Err(Malformed::MissingPseudo);
    };
    let web = scheme == b"http" || scheme == b"https";
    if web && path.is_empty() {
        return Err(Malformed::EmptyPath);
    }
    if !visible(path) {
        return Err(Malformed::BadPath);
    }
    if web && list.authority().is_some_and(|a| a.contains(&b'@')) {
        return Err(Malformed::AuthorityUserinfo);
    }
    if let (Some(authority), Some(host)) = (list.authority(), list.get(b"host")) {
        if !authority.eq_ignore_ascii_case(host) {
            return Err(Malformed::HostMismatch);
        }
    }
    Ok(())
}
