//! The request and trailer rules of RFC 9113 §8 applied to decoded lists, and the field
//! count cap: each violation is a stream error PROTOCOL_ERROR on the block's stream.

use crate::h2::fields::{BlockKind, HeaderLimits};
use crate::h2::hpack::{encode_field, Decoder};
use crate::h2::{ErrorCode, H2Error, Malformed, Reason, Scope};

/// A block of literal fields, written by kakehi's encoder (which lower-cases names, so
/// upper-case names are written by hand).
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0u8; 64 * 1024];
    let mut at = 0;
    for (n, v) in fields {
        if n.bytes().any(|b| b.is_ascii_uppercase()) {
            out[at] = 0;
            out[at + 1] = n.len() as u8;
            out[at + 2..at + 2 + n.len()].copy_from_slice(n.as_bytes());
            at += 2 + n.len();
            out[at] = v.len() as u8;
            out[at + 1..at + 1 + v.len()].copy_from_slice(v.as_bytes());
            at += 1 + v.len();
        } else {
            at += encode_field(n.as_bytes(), v.as_bytes(), &mut out[at..]).unwrap();
        }
    }
    out.truncate(at);
    out
}

fn decode(fields: &[(&str, &str)], kind: BlockKind) -> Result<Vec<(String, String)>, H2Error> {
    let mut d = Decoder::new(4096, HeaderLimits::default());
    let list = d.decode(&block(fields), 5, kind)?;
    let s = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    Ok(list.fields().map(|(n, v)| (s(n), s(v))).collect())
}

const GET: [(&str, &str); 4] = [
    (":method", "GET"),
    (":scheme", "https"),
    (":authority", "example.com"),
    (":path", "/a?b"),
];

fn request(extra: &[(&str, &str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = GET.to_vec();
    for &(n, v2) in extra {
        // Leak for 'static: test data only.
        v.push((
            Box::leak(n.to_string().into_boxed_str()),
            Box::leak(v2.to_string().into_boxed_str()),
        ));
    }
    v
}

fn malformed(fields: &[(&str, &str)], kind: BlockKind) -> Malformed {
    let e = decode(fields, kind).unwrap_err();
    assert_eq!(
        (e.scope, e.code),
        (Scope::Stream(5), ErrorCode::ProtocolError)
    );
    match e.reason {
        Reason::Malformed(m) => m,
        other => panic!("{other:?}"),
    }
}

#[test]
fn good_requests() {
    let mut d = Decoder::new(4096, HeaderLimits::default());
    let list = d
        .decode(
            &block(&request(&[
                ("accept", "*/*"),
                ("te", "trailers"),
                ("cookie", "a=1"),
            ])),
            1,
            BlockKind::Request,
        )
        .unwrap();
    assert_eq!(list.method(), Some(&b"GET"[..]));
    assert_eq!(list.scheme(), Some(&b"https"[..]));
    assert_eq!(list.authority(), Some(&b"example.com"[..]));
    assert_eq!(list.path(), Some(&b"/a?b"[..]));
    assert_eq!(list.get(b"te"), Some(&b"trailers"[..]));
    assert_eq!(list.len(), 3);
    // CONNECT: :authority only.
    assert!(decode(
        &[(":method", "CONNECT"), (":authority", "example.com:443")],
        BlockKind::Request
    )
    .is_ok());
    // OPTIONS * and a non-web scheme with an empty path.
    assert!(decode(
        &[(":method", "OPTIONS"), (":scheme", "https"), (":path", "*")],
        BlockKind::Request
    )
    .is_ok());
    assert!(decode(
        &[(":method", "GET"), (":scheme", "foo"), (":path", "")],
        BlockKind::Request
    )
    .is_ok());
    // host equal to :authority (case aside) is fine; host alone too.
    assert!(decode(&request(&[("host", "Example.COM")]), BlockKind::Request).is_ok());
    assert!(decode(
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            ("host", "h")
        ],
        BlockKind::Request
    )
    .is_ok());
    // Trailers.
    assert_eq!(
        decode(&[("grpc-status", "0")], BlockKind::Trailers).unwrap(),
        [("grpc-status".to_string(), "0".to_string())]
    );
    assert!(decode(&[], BlockKind::Trailers).unwrap().is_empty());
}

#[test]
fn malformed_requests() {
    use BlockKind::{Request as R, Trailers as T};
    use Malformed::*;
    type Case = (
        &'static str,
        Vec<(&'static str, &'static str)>,
        BlockKind,
        Malformed,
    );
    let cases: Vec<Case> = vec![
        (
            "upper-case name",
            request(&[("Accept", "x")]),
            R,
            UpperCaseName,
        ),
        ("space in name", request(&[("a b", "x")]), R, BadName),
        ("colon in name", request(&[("a:b", "x")]), R, BadName),
        ("empty name", request(&[("", "x")]), R, BadName),
        ("NUL in value", request(&[("a", "x\0y")]), R, BadValue),
        ("LF in value", request(&[("a", "x\ny")]), R, BadValue),
        ("CR in value", request(&[("a", "x\ry")]), R, BadValue),
        ("leading space", request(&[("a", " x")]), R, BadValue),
        ("trailing tab", request(&[("a", "x\t")]), R, BadValue),
        (
            "connection",
            request(&[("connection", "close")]),
            R,
            ConnectionSpecific,
        ),
        (
            "keep-alive",
            request(&[("keep-alive", "5")]),
            R,
            ConnectionSpecific,
        ),
        (
            "proxy-connection",
            request(&[("proxy-connection", "x")]),
            R,
            ConnectionSpecific,
        ),
        (
            "transfer-encoding",
            request(&[("transfer-encoding", "chunked")]),
            R,
            ConnectionSpecific,
        ),
        (
            "upgrade",
            request(&[("upgrade", "h2c")]),
            R,
            ConnectionSpecific,
        ),
        ("te: gzip", request(&[("te", "gzip")]), R, BadTe),
        (
            "te: trailers, gzip",
            request(&[("te", "trailers, gzip")]),
            R,
            BadTe,
        ),
        (
            "unknown pseudo",
            request(&[]).into_iter().chain([(":foo", "x")]).collect(),
            R,
            UnknownPseudo,
        ),
        (
            "unknown pseudo first",
            vec![(":foo", "x"), (":method", "GET")],
            R,
            UnknownPseudo,
        ),
        (
            "response pseudo",
            vec![(":status", "200")],
            R,
            UnknownPseudo,
        ),
        (
            "extended CONNECT",
            vec![(":method", "CONNECT"), (":protocol", "websocket")],
            R,
            UnknownPseudo,
        ),
        (
            "pseudo after regular",
            vec![(":method", "GET"), ("a", "b"), (":path", "/")],
            R,
            PseudoAfterRegular,
        ),
        (
            "duplicate :path",
            vec![(":method", "GET"), (":path", "/"), (":path", "/")],
            R,
            DuplicatePseudo,
        ),
        (
            "duplicate :method",
            vec![(":method", "GET"), (":method", "GET")],
            R,
            DuplicatePseudo,
        ),
        (
            "no :method",
            vec![(":scheme", "https"), (":path", "/")],
            R,
            MissingPseudo,
        ),
        (
            "no :scheme",
            vec![(":method", "GET"), (":path", "/")],
            R,
            MissingPseudo,
        ),
        (
            "no :path",
            vec![(":method", "GET"), (":scheme", "https")],
            R,
            MissingPseudo,
        ),
        (
            "empty :path",
            vec![(":method", "GET"), (":scheme", "http"), (":path", "")],
            R,
            EmptyPath,
        ),
        (
            "CONNECT with :path",
            vec![
                (":method", "CONNECT"),
                (":authority", "a:1"),
                (":path", "/"),
            ],
            R,
            BadConnect,
        ),
        (
            "CONNECT with :scheme",
            vec![
                (":method", "CONNECT"),
                (":authority", "a:1"),
                (":scheme", "https"),
            ],
            R,
            BadConnect,
        ),
        (
            "CONNECT without :authority",
            vec![(":method", "CONNECT")],
            R,
            BadConnect,
        ),
        (
            "space in :path",
            vec![(":method", "GET"), (":scheme", "https"), (":path", "/a b")],
            R,
            BadPath,
        ),
        (
            "tab in :path",
            vec![(":method", "GET"), (":scheme", "https"), (":path", "/a\tb")],
            R,
            BadPath,
        ),
        (
            "space in :method",
            vec![(":method", "G T"), (":scheme", "https"), (":path", "/")],
            R,
            BadMethod,
        ),
        (
            "empty :method",
            vec![(":method", ""), (":scheme", "https"), (":path", "/")],
            R,
            BadMethod,
        ),
        (
            "space in :authority",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", "a b"),
            ],
            R,
            BadAuthority,
        ),
        (
            "userinfo",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", "u@a"),
            ],
            R,
            AuthorityUserinfo,
        ),
        (
            "host differs",
            request(&[("host", "other.example")]),
            R,
            HostMismatch,
        ),
        (
            "pseudo in trailers",
            vec![(":path", "/")],
            T,
            PseudoInTrailers,
        ),
        (
            "connection in trailers",
            vec![("connection", "x")],
            T,
            ConnectionSpecific,
        ),
    ];
    for (what, fields, kind, want) in cases {
        assert_eq!(malformed(&fields, kind), want, "{what}");
    }
}

#[test]
fn field_count_and_list_size() {
    let many: Vec<(String, String)> = (0..101).map(|i| (format!("x-{i}"), "v".into())).collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let e = decode(&request(&refs), BlockKind::Request).unwrap_err();
    assert_eq!(
        (e.scope, e.reason),
        (Scope::Stream(5), Reason::TooManyFields { max: 100 })
    );
    assert_eq!(
        decode(&request(&refs[..100]), BlockKind::Request)
            .unwrap()
            .len(),
        100
    );

    // The list size counts name + value + 32 for every field, pseudo-headers included.
    let base: usize = GET.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
    let limits = HeaderLimits {
        max_list_size: (base + 1 + 3 + 32) as u32,
        max_fields: 100,
    };
    let fits = block(&request(&[("a", "bcd")]));
    let over = block(&request(&[("a", "bcde")]));
    let mut d = Decoder::new(4096, limits);
    assert_eq!(
        d.decode(&fits, 1, BlockKind::Request).unwrap().list_size(),
        base + 36
    );
    let e = d.decode(&over, 3, BlockKind::Request).unwrap_err();
    assert_eq!(
        e.reason,
        Reason::HeaderListTooLarge {
            max: limits.max_list_size
        }
    );
}
