//! The small grammars kakehi checks in a request head before it trusts a value: a Host (or an
//! absolute-form authority) that must be a host, and the `Forwarded` values of RFC 7239 (a
//! client's list kept only when well-formed, kakehi's own values written as tokens or
//! quoted-strings). Pure functions over bytes, with their unit tests; `mod.rs` decides what a
//! failed check means for the request.

use crate::cut::Cut;

/// `tchar` of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A non-empty run of `tchar`.
pub fn is_token(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(|&b| is_tchar(b))
}

/// An optional `:port` after a host: 1 to 5 digits, at most 65535. An empty port (`host:`)
/// is refused: no client sends it, and backends disagree on what it means.
fn valid_port(rest: &[u8]) -> bool {
    match rest.split_first() {
        None => true,
        Some((b':', digits)) => {
            !digits.is_empty()
                && digits.len() <= 5
                && digits.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse::<u16>().ok())
                    .is_some()
        }
        Some(_) => false,
    }
}

/// Whether a Host value (or an absolute-form target's authority) is a host: a DNS-style name
/// of letters, digits, `-`, `.` and `_` (which covers IPv4 addresses), or an IPv6 literal in
/// brackets, then an optional `:port`. Anything else (a comma, a quote, `@`, `%`, spaces,
/// non-ASCII) is what a request built to confuse the hops after kakehi looks like.
pub fn is_valid_host(authority: &[u8]) -> bool {
    if let Some(rest) = authority.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let (literal, after) = rest.split_at(end);
        let after = after.get(1..).unwrap_or_default();
        let is_v6 = std::str::from_utf8(literal)
            .ok()
            .and_then(|l| l.parse::<std::net::Ipv6Addr>().ok())
            .is_some();
        return is_v6 && valid_port(after);
    }
    let end = authority
        .iter()
        .position(|&b| b == b':')
        .unwrap_or(authority.len());
    let (name, port) = authority.split_at(end);
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && valid_port(port)
}

/// Appends `value` to `out` as a token when it is one, otherwise as a quoted-string
/// (RFC 7239 §4: a value is a token or a quoted-string).
pub fn push_token_or_quoted(out: &mut String, value: &str) {
    if is_token(value.as_bytes()) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Length of the quoted-string at the start of `bytes` (RFC 9110 §5.6.4), or None when it is
/// not one (no opening quote, never closed, a control character inside).
fn quoted_string_len(bytes: &[u8]) -> Option<usize> {
    if bytes.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => return Some(i + 1),
            b'\\' => {
                let next = *bytes.get(i + 1)?;
                if next != b'\t' && !(b' '..=b'~').contains(&next) && next < 0x80 {
                    return None;
                }
                i += 2;
            }
            b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => i += 1,
            _ => return None,
        }
    }
    None
}

/// Whether a client's `Forwarded` value is a well-formed list of forwarded-elements
/// (RFC 7239 §4): `element *( OWS "," OWS element )`, an element being pairs `token=value`
/// (value a token or a quoted-string) separated by `;`, empty pairs and elements allowed. Only
/// then does appending `, <kakehi's element>` keep kakehi's element whole and last.
pub fn is_valid_forwarded(value: &[u8]) -> bool {
    let mut i = 0;
    // At the start of a pair: a token, '=', a value.
    loop {
        // One pair (possibly empty).
        let name_len = value
            .get(i..)
            .unwrap_or_default()
            .iter()
            .take_while(|&&b| is_tchar(b))
            .count();
        if name_len > 0 {
            i += name_len;
            if value.get(i) != Some(&b'=') {
                return false;
            }
            i += 1;
            let rest = value.get(i..).unwrap_or_default();
            let len = match rest.first() {
                Some(b'"') => match quoted_string_len(rest) {
                    Some(len) => len,
                    None => return false,
                },
                _ => rest.iter().take_while(|&&b| is_tchar(b)).count(),
            };
            if len == 0 {
                return false;
            }
            i += len;
        }
        // What follows a pair: the end, ';' (next pair) or OWS ',' OWS (next element).
        match value.get(i) {
            None => return true,
            Some(b';') => i += 1,
            Some(b' ' | b'\t' | b',') => {
                while matches!(value.get(i), Some(b' ' | b'\t')) {
                    i += 1;
                }
                if value.get(i) != Some(&b',') {
                    return false;
                }
                i += 1;
                while matches!(value.get(i), Some(b' ' | b'\t')) {
                    i += 1;
                }
            }
            Some(_) => return false,
        }
    }
}

/// Why a request path cannot be normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    BadPercent,
    /// More `..` segments than segments before them: the path climbs above `/`.
    AboveRoot,
}

impl PathError {
    /// The reason the request is refused with.
    pub fn cut(self) -> Cut {
        match self {
            PathError::BadPercent => Cut::BadPercentEncoding,
            PathError::AboveRoot => Cut::PathAboveRoot,
        }
    }
}

/// Whether [`normalize_path`] could change `target`: it has a `%` or a `/.` before its query.
/// A scan without allocation, so that ordinary paths cost nothing more.
pub fn needs_normalizing(target: &[u8]) -> bool {
    let path = crate::router::path_of(target);
    path.contains(&b'%') || path.windows(2).any(|w| w == b"/.")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Normalizes an origin-form target's path as RFC 3986 §6.2.2 says: percent-encoded unreserved
/// characters are decoded, the other percent-encodings get upper-case hex digits (so `%2f`
/// becomes `%2F` and stays encoded), and dot-segments are removed (§5.2.4). The query (after
/// `?` or `#`) is kept as it is. A path that climbs above `/` is an error, as in nginx (where
/// §5.2.4 would silently stop at the root, a backend might not).
pub fn normalize_path(target: &[u8]) -> Result<Vec<u8>, PathError> {
    let path = crate::router::path_of(target);
    let query = target.get(path.len()..).unwrap_or_default();
    // Percent-decoding of unreserved characters.
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = path.get(i) {
        if b != b'%' {
            decoded.push(b);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (
            path.get(i + 1).copied().and_then(hex),
            path.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadPercent);
        };
        let value = (h << 4) | l;
        if is_unreserved(value) {
            decoded.push(value);
        } else {
            decoded.push(b'%');
            decoded.extend_from_slice(format!("{value:02X}").as_bytes());
        }
        i += 3;
    }
    // Dot-segment removal over the segments after the leading '/'.
    let rest = decoded.strip_prefix(b"/").unwrap_or(&decoded);
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for segment in rest.split(|&b| b == b'/') {
        trailing_slash = false;
        match segment {
            b"." => trailing_slash = true,
            b".." => {
                if kept.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = true;
            }
            _ => kept.push(segment),
        }
    }
    let mut out = Vec::with_capacity(decoded.len() + query.len() + 1);
    for segment in &kept {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(query);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for good in [
            "localhost",
            "LocalHost:8080",
            "a.b-c_d.example",
            "127.0.0.1",
            "127.0.0.1:65535",
            "[::1]",
            "[::1]:80",
            "[2001:db8::7]",
            "[::ffff:192.0.2.1]:1",
            "example.com.",
        ] {
            assert!(is_valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            ":80",
            "x,for=127.0.0.9",
            "x;for=1",
            "x\"y",
            "a=b",
            "a%2eb",
            "a\\b",
            "a b",
            "user@host",
            "a/b",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[a.b]",
            "[fe80::1%25eth0]",
            "a:",
            "a:b",
            "a:65536",
            "a:123456",
            "a:1:2",
            "a:+1",
            "é.example",
            "*",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn token_or_quoted() {
        let mut out = String::new();
        push_token_or_quoted(&mut out, "example.com");
        out.push(';');
        push_token_or_quoted(&mut out, "[::1]");
        out.push(';');
        push_token_or_quoted(&mut out, "a\"b\\c");
        out.push(';');
        push_token_or_quoted(&mut out, "");
        assert_eq!(out, r#"example.com;"[::1]";"a\"b\\c";"""#);
        assert!(is_valid_forwarded(
            format!("host={out}").replace(';', ";host=").as_bytes()
        ));
    }

    #[test]
    fn forwarded_lists() {
        for good in [
            "for=192.0.2.1",
            "for=192.0.2.1;proto=https",
            "for=\"[2001:db8::1]:4711\", for=unknown",
            "for=a,for=b",
            "for=a ,\tfor=b",
            "for=1;;",
            "",
            ";",
            "for=\"a\\\"b\"",
            "host=\"x,for=y\"",
        ] {
            assert!(is_valid_forwarded(good.as_bytes()), "{good}");
        }
        for bad in [
            "for=\"unterminated",
            "for=a b",
            "=x",
            "for=",
            "for",
            "for=1;x",
            "for = 1",
            "for=1 ; proto=http",
            "for=\"a\"b",
            "for=\"a\\",
            "for=a,\"b\"",
            "for=\"a\x01\"",
        ] {
            assert!(!is_valid_forwarded(bad.as_bytes()), "{bad}");
        }
    }

    fn norm(path: &str) -> Result<String, PathError> {
        normalize_path(path.as_bytes()).map(|p| String::from_utf8(p).unwrap())
    }

    #[test]
    fn paths() {
        for (raw, normal) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("/a//b", "/a//b"),
            ("/a//..", "/a/"),
            ("/pub/%2e%2e/admin", "/admin"),
            ("/pub/%2E./admin", "/admin"),
            ("/%7Euser/%41%62%2d", "/~user/Ab-"),
            ("/a%2fb/%2F..", "/a%2Fb/%2F.."),
            ("/%c3%a9", "/%C3%A9"),
            ("/a/./b?x=/../y", "/a/b?x=/../y"),
            ("/a/..?", "/?"),
            ("/a/.hidden", "/a/.hidden"),
            ("/a/..b", "/a/..b"),
            ("/a/b#/../c", "/a/b#/../c"),
        ] {
            assert_eq!(norm(raw), Ok(normal.to_owned()), "{raw}");
            assert_eq!(
                norm(normal),
                Ok(normal.to_owned()),
                "idempotent on {normal}"
            );
        }
        for raw in ["/..", "/../a", "/a/../..", "/%2e%2e", "/a/%2E%2E/%2e%2e/b"] {
            assert_eq!(norm(raw), Err(PathError::AboveRoot), "{raw}");
        }
        for raw in ["/%", "/%2", "/%zz", "/a%g0", "/%%41"] {
            assert_eq!(norm(raw), Err(PathError::BadPercent), "{raw}");
        }
        assert!(!needs_normalizing(b"/a/b.c/d?x=/./%41"));
        assert!(needs_normalizing(b"/a/./b"));
        assert!(needs_normalizing(b"/a%41"));
    }
}
