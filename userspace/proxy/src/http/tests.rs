//! Sans-io tests of request and response heads: smuggling vectors, hop-by-hop removal and the
//! forwarding headers, with kawa driven directly over a buffer (no sockets).

use super::*;
use crate::cut::Cut;
use crate::pool::BufferPool;
use kawa::{Buffer, Kind};

fn peer() -> Peer {
    Peer {
        client: "192.0.2.7:5555".parse().unwrap(),
        listener: "127.0.0.1:8080".parse().unwrap(),
        https: false,
    }
}

/// Parses `input` as one request; returns the info and the bytes that would go to a backend.
fn request(input: &[u8]) -> (RequestInfo, Result<String, String>) {
    request_from(peer(), input)
}

/// [`request`] from the client `peer`.
fn request_from(peer: Peer, input: &[u8]) -> (RequestInfo, Result<String, String>) {
    let mut pool = BufferPool::new(16384, 1, 1);
    let mut k = Kawa::new(Kind::Request, Buffer::new(pool.checkout().unwrap()));
    let n = input.len().min(k.storage.space().len());
    k.storage.space()[..n].copy_from_slice(&input[..n]);
    k.storage.fill(n);
    let mut info = RequestInfo::default();
    let mut cb = RequestCallbacks {
        peer,
        request_id: "rid1",
        client_cert: None,
        info: &mut info,
    };
    kawa::h1::parse(&mut k, &mut cb);
    if k.is_error() {
        let why = info
            .refused
            .map_or("kawa parse error", Cut::as_str)
            .to_string();
        return (info, Err(why));
    }
    k.prepare(&mut kawa::h1::BlockConverter);
    let out: Vec<u8> = k
        .as_io_slice()
        .iter()
        .flat_map(|s| s.iter().copied())
        .collect();
    (info, Ok(String::from_utf8_lossy(&out).into_owned()))
}

#[test]
fn an_ipv6_client_is_quoted_in_forwarded_and_bare_in_x_forwarded_for() {
    let client = Peer {
        client: "[2001:db8::7]:5555".parse().unwrap(),
        ..peer()
    };
    let (_, out) = request_from(client, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n");
    let out = out.unwrap();
    assert!(out.contains("X-Forwarded-For: 2001:db8::7\r\n"), "{out}");
    assert!(
        out.contains("Forwarded: for=\"[2001:db8::7]\";proto=http;host=a.example\r\n"),
        "{out}"
    );
}

#[test]
fn forwards_with_headers_added_and_hop_by_hop_removed() {
    let (info, out) = request(
        b"GET /a?b=1 HTTP/1.1\r\nHost: App.Example.com:8080\r\nConnection: keep-alive, X-Secret\r\n\
          X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\n\
          X-Request-Id: forged\r\nUser-Agent: t\r\n\r\n",
    );
    let out = out.unwrap();
    assert_eq!(info.method, "GET");
    assert_eq!(info.authority, "app.example.com");
    assert_eq!(info.target, "/a?b=1");
    assert!(!info.close);
    assert!(
        out.starts_with("GET /a?b=1 HTTP/1.1\r\nHost: App.Example.com:8080\r\n"),
        "{out}"
    );
    for gone in ["Connection:", "X-Secret", "Keep-Alive", "TE:", "forged"] {
        assert!(!out.contains(gone), "{gone} still in {out}");
    }
    assert!(out.contains("User-Agent: t\r\n"));
    assert!(out.contains("X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n"));
    assert!(out.contains("X-Forwarded-Proto: http\r\n"));
    assert!(out.contains("X-Forwarded-Port: 8080\r\n"));
    assert!(out.contains("Forwarded: for=192.0.2.7;proto=http;host=app.example.com\r\n"));
    assert!(out.contains("X-Request-Id: rid1\r\n"));
    assert!(out.ends_with("\r\n\r\n"));
}

#[test]
fn smuggling_vectors_are_refused() {
    let cases: &[(&str, &[u8])] = &[
        (
            "CL+TE",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "TE+CL",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
        ),
        (
            "two different CL",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
        ),
        (
            "CL list",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 5\r\n\r\n",
        ),
        ("CL sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n"),
        (
            "TE not chunked last",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
        ),
        ("bare LF in header", b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n"),
        ("bare LF request line", b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
        (
            "space before colon",
            b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        ),
        ("invalid name", b"GET / HTTP/1.1\r\nHost: a\r\nX(y): z\r\n\r\n"),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("no host", b"GET / HTTP/1.1\r\nX: y\r\n\r\n"),
        (
            "absolute-form vs Host",
            b"GET http://evil.example/ HTTP/1.1\r\nHost: good.example\r\n\r\n",
        ),
        ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
        ("bad version", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
        ("NUL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n"),
    ];
    for (name, input) in cases {
        let (_, out) = request(input);
        assert!(out.is_err(), "{name} was accepted: {out:?}");
    }
}

#[test]
fn absolute_form_with_matching_host_is_accepted() {
    let (info, out) = request(b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n");
    let out = out.unwrap();
    assert_eq!(info.authority, "a.example");
    assert!(
        out.starts_with("GET /x HTTP/1.1\r\nHost: a.example\r\n")
            || out.contains("Host: a.example")
    );
}

#[test]
fn bad_chunk_sizes_are_refused() {
    for body in [
        &b"zz\r\n"[..],
        b"-1\r\n",
        b"fffffffffffffffffff\r\nx",
        b"4 \r\nabcd\r\n",
    ] {
        let mut input =
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        input.extend_from_slice(body);
        let (_, out) = request(&input);
        assert!(out.is_err(), "{:?} accepted", String::from_utf8_lossy(body));
    }
}

#[test]
fn connection_semantics() {
    let (info, _) = request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert!(info.close);
    let (info, _) = request(b"GET / HTTP/1.0\r\n\r\n");
    assert!(info.close && info.version_10);
    let (info, out) = request(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n");
    assert!(!info.close);
    assert!(out.unwrap().contains("Connection: keep-alive\r\n"));
    let (info, out) = request(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    let out = out.unwrap();
    assert!(info.upgrade);
    assert!(out.contains("Upgrade: websocket\r\n") && out.contains("Connection: Upgrade\r\n"));
    let (info, _) =
        request(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
    assert!(info.expect_continue);
}

fn response(req: &RequestInfo, input: &[u8]) -> (ResponseInfo, Kawa<crate::pool::PoolBuf>) {
    let mut pool = BufferPool::new(16384, 1, 1);
    let mut k = Kawa::new(Kind::Response, Buffer::new(pool.checkout().unwrap()));
    let n = input.len();
    k.storage.space()[..n].copy_from_slice(input);
    k.storage.fill(n);
    let mut info = ResponseInfo::default();
    let mut cb = ResponseCallbacks {
        request: req,
        close_front: false,
        request_id: "rid",
        hsts: None,
        info: &mut info,
    };
    kawa::h1::parse(&mut k, &mut cb);
    (info, k)
}

#[test]
fn response_heads() {
    let get = RequestInfo::default();
    let (info, k) = response(
        &get,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    );
    assert!(info.backend_close && !info.close_delimited);
    assert!(k.is_terminated());
    let (info, k) = response(&get, b"HTTP/1.1 200 OK\r\n\r\npartial");
    assert!(info.close_delimited && !k.is_terminated());
    let head = RequestInfo {
        is_head: true,
        ..RequestInfo::default()
    };
    let (info, k) = response(&head, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
    assert!(k.is_terminated() && !info.close_delimited);
    let (info, k) = response(&get, b"HTTP/1.1 100 Continue\r\n\r\n");
    assert!(info.interim && k.is_terminated());
    let (_, k) = response(&get, b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
    assert!(k.is_error(), "unsolicited 101 must be refused");
    let (_, k) = response(
        &get,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    );
    assert!(k.is_error());
}

/// Issue 12, item 1: `Connection` naming a header that frames or routes the request is
/// refused, whatever the case, position or number of Connection headers; other names are
/// removed as before.
#[test]
fn connection_naming_a_relied_on_header_is_refused() {
    for connection in [
        "content-length",
        "Content-Length, close",
        "keep-alive,TRANSFER-ENCODING",
        "host",
        "x, Host ,y",
    ] {
        let input = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: {connection}\r\nContent-Length: 1\r\n\r\nx"
        );
        let (info, out) = request(input.as_bytes());
        assert!(out.is_err(), "{connection}: {out:?}");
        assert!(info.refused.is_some());
    }
    let (_, out) = request(
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\
          Connection: content-length\r\n\r\nx",
    );
    assert!(out.is_err(), "{out:?}");
    let (_, out) =
        request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade, te\r\nTE: x\r\n\r\n");
    let out = out.unwrap();
    assert!(!out.contains("TE:"), "{out}");
}

/// Issue 12, item 2: Transfer-Encoding in an HTTP/1.0 request is faulty framing.
#[test]
fn transfer_encoding_on_http10_is_refused() {
    let (info, out) =
        request(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(out.is_err(), "{out:?}");
    assert_eq!(
        info.refused.map(Cut::as_str),
        Some("Transfer-Encoding in an HTTP/1.0 request")
    );
    let (_, out) = request(b"POST / HTTP/1.0\r\nHost: a\r\nContent-Length: 1\r\n\r\nx");
    assert!(out.is_ok(), "{out:?}");
}

/// Issue 12, item 3: a Host that is not a host is refused; the values kakehi writes into
/// Forwarded are tokens or quoted-strings; a malformed client Forwarded is dropped.
#[test]
fn host_checked_and_forwarded_well_formed() {
    let (_, out) = request(b"GET / HTTP/1.1\r\nHost: x,for=127.0.0.9\r\n\r\n");
    assert!(out.is_err(), "{out:?}");
    let (_, out) = request(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n");
    let out = out.unwrap();
    assert!(
        out.contains("Forwarded: for=192.0.2.7;proto=http;host=\"[::1]\"\r\n"),
        "{out}"
    );
    let (_, out) =
        request(b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=\"x\r\nForwarded: for=y\r\n\r\n");
    let out = out.unwrap();
    assert!(
        out.contains("Forwarded: for=y, for=192.0.2.7;proto=http;host=a\r\n"),
        "{out}"
    );
}

/// Issue 12, item 4: the target is normalized before routing, and the backend gets exactly the
/// normalized target; climbing above the root is refused.
#[test]
fn path_normalized_and_forwarded_as_routed() {
    let (info, out) = request(b"GET /pub/%2e%2e/admin?x=/../y HTTP/1.1\r\nHost: a\r\n\r\n");
    let out = out.unwrap();
    assert_eq!(info.target, "/admin?x=/../y");
    assert!(out.starts_with("GET /admin?x=/../y HTTP/1.1\r\n"), "{out}");
    let (info, out) = request(b"GET /pub/x HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(info.target, "/pub/x");
    assert!(out.unwrap().starts_with("GET /pub/x HTTP/1.1\r\n"));
    let (info, out) = request(b"GET /pub/../../admin HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(out.is_err());
    assert_eq!(
        info.refused.map(Cut::as_str),
        Some("path climbs above the root")
    );
}

fn head_with(fields: usize, crumbs: usize) -> Vec<u8> {
    let mut h = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 1..fields.saturating_sub(usize::from(crumbs > 0)) {
        h.push_str(&format!("X-{i}: v\r\n"));
    }
    if crumbs > 0 {
        let jar: Vec<String> = (0..crumbs).map(|i| format!("c{i}=v")).collect();
        h.push_str(&format!("Cookie: {}\r\n", jar.join("; ")));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// Issue 12, item 5: at most MAX_HEADER_FIELDS fields (Host and each Cookie line count) and
/// MAX_COOKIE_CRUMBS crumbs; over either, 431.
#[test]
fn header_field_and_crumb_caps() {
    let (_, out) = request(&head_with(MAX_HEADER_FIELDS, 0));
    assert!(out.is_ok(), "{out:?}");
    let (info, out) = request(&head_with(MAX_HEADER_FIELDS + 1, 0));
    assert!(out.is_err());
    assert_eq!(info.refused_status, 431);
    let (_, out) = request(&head_with(MAX_HEADER_FIELDS, MAX_COOKIE_CRUMBS));
    assert!(out.is_ok(), "{out:?}");
    let (info, out) = request(&head_with(3, MAX_COOKIE_CRUMBS + 1));
    assert!(out.is_err());
    assert_eq!(info.refused_status, 431);
    // Cookie lines apart count as fields, their crumbs together.
    let mut h = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..=MAX_COOKIE_CRUMBS / 2 {
        h.push_str(&format!("Cookie: a{i}=1; b{i}=2\r\n"));
    }
    h.push_str("\r\n");
    let (info, out) = request(h.as_bytes());
    assert!(out.is_err());
    assert_eq!(info.refused_status, 431);
}

/// A head still arriving is held to the caps after each parse: its metadata never grows past
/// them while the connection waits for the rest, and `forget_head` gives the memory back.
#[test]
fn unfinished_head_over_the_caps() {
    let mut pool = BufferPool::new(16384, 1, 1);
    for input in [
        format!("GET / HTTP/1.1\r\nHost: a\r\n{}", "a:b\r\n".repeat(2000)),
        format!("GET / HTTP/1.1\r\nHost: a\r\nCookie: {}", "a;".repeat(5000)),
    ] {
        let mut k = Kawa::new(Kind::Request, Buffer::new(pool.checkout().unwrap()));
        k.storage.space()[..input.len()].copy_from_slice(input.as_bytes());
        k.storage.fill(input.len());
        let mut info = RequestInfo::default();
        let mut cb = RequestCallbacks {
            peer: peer(),
            request_id: "rid1",
            client_cert: None,
            info: &mut info,
        };
        kawa::h1::parse(&mut k, &mut cb);
        assert!(!k.is_main_phase());
        assert!(matches!(head_refusal(&k, &info), Some((431, _))));
        forget_head(&mut k);
        assert!(k.blocks.capacity() <= RETAINED_BLOCKS * 2);
        assert!(k.detached.jar.capacity() <= RETAINED_CRUMBS * 2);
        pool.checkin(k.storage.buffer);
    }
    let short = b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n";
    let mut k = Kawa::new(Kind::Request, Buffer::new(pool.checkout().unwrap()));
    k.storage.space()[..short.len()].copy_from_slice(short);
    k.storage.fill(short.len());
    kawa::h1::parse(&mut k, &mut kawa::h1::NoCallbacks);
    assert_eq!(head_refusal(&k, &RequestInfo::default()), None);
}

/// The README's bytes-per-connection figure (4 × buffer_size + 40 KiB) counts kawa's queues at
/// the caps with these sizes: 128 blocks, 1,024 output slices and 128 crumbs at most, and the
/// session itself. If kawa or the session grows, the figure must be worked out again.
#[test]
fn sizes_behind_the_memory_figure() {
    assert!(std::mem::size_of::<kawa::Block>() <= 48);
    assert!(std::mem::size_of::<kawa::OutBlock>() <= 24);
    assert!(std::mem::size_of::<kawa::Pair>() <= 48);
    assert!(std::mem::size_of::<crate::session::Session>() <= 2048);
    let metadata = 128 * 48 + 1024 * 24 + 128 * 48 + 2048;
    assert!(metadata <= 40 * 1024, "{metadata}");
}

/// Found by the fuzz target's differential check: kawa parses a request line that starts with
/// a space as an empty method; kakehi forwarded it.
#[test]
fn empty_method_is_refused() {
    let (info, out) = request(b" /index.html HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(out.is_err(), "{out:?}");
    assert_eq!(info.refused.map(Cut::as_str), Some("method is not a token"));
    let (info, out) = request(b"GET  HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(out.is_err(), "{out:?}");
    assert_eq!(info.refused.map(Cut::as_str), Some("empty request target"));
    // And a fragment, which kawa splits an absolute-form target at (found next).
    let (info, out) = request(b"GET ttp://na#:8080/2 HTTP/1.0\r\nHost: na\r\n\r\n");
    assert!(out.is_err(), "{out:?}");
    assert_eq!(
        info.refused.map(Cut::as_str),
        Some("fragment in the request target")
    );
    let (_, out) = request(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(out.is_ok(), "{out:?}");
}

/// Found by the fuzz target's differential check: kawa's name scan lets `/` and `"` through.
#[test]
fn header_name_must_be_a_token() {
    for name in ["Cookie/.", "X\"Foo", "Content-Length/"] {
        let input = format!("GET / HTTP/1.1\r\nHost: a\r\n{name}: 1\r\n\r\n");
        let (info, out) = request(input.as_bytes());
        assert!(out.is_err(), "{name}: {out:?}");
        assert_eq!(info.refused.map(Cut::as_str), Some("invalid header name"));
    }
}

/// Found by the fuzz target's differential check: a trailer name with `/` went to the backend.
#[test]
fn trailer_name_must_be_a_token() {
    let input = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
        1\r\nx\r\n0\r\nX-Fo/o: 1\r\n\r\n";
    let mut pool = BufferPool::new(16384, 1, 1);
    let mut k = Kawa::new(Kind::Request, Buffer::new(pool.checkout().unwrap()));
    k.storage.space()[..input.len()].copy_from_slice(input);
    k.storage.fill(input.len());
    let mut info = RequestInfo::default();
    let mut cb = RequestCallbacks {
        peer: peer(),
        request_id: "rid1",
        client_cert: None,
        info: &mut info,
    };
    kawa::h1::parse(&mut k, &mut cb);
    assert_eq!(
        head_refusal(&k, &info).map(|(s, why)| (s, why.as_str())),
        Some((400, "invalid trailer name"))
    );
    // An empty trailer name (found next by the fuzzer).
    let empty = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
        0\r\n: chunked\r\n\r\n";
    let out = memory::drive_request_stream(empty, &[], 16384);
    assert!(
        matches!(out[0].end, memory::End::Answered { status: 400, .. }),
        "{:?}",
        out[0].end
    );
    // Cut before the trailers: the head goes out, the trailer is caught in the body.
    let out = memory::drive_request_stream(input, &[70], 16384);
    assert!(
        matches!(out[0].end, memory::End::Answered { status: 400, .. }),
        "{:?}",
        out[0].end
    );
}

/// A connection that ends hands its parser's queues to the next one, emptied and with their
/// capacity: the next exchange's `presize` allocates nothing. A pair grown by a large head is
/// freed instead, and a worker keeps at most `SPARE_QUEUES` pairs.
#[test]
fn ended_exchanges_hand_their_queues_to_the_next() {
    let mut pool = BufferPool::new(16384, 2, 2);
    let head = b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n";
    let mut k = Kawa::new(Kind::Request, Buffer::new(pool.checkout().unwrap()));
    presize(&mut k);
    k.storage.space()[..head.len()].copy_from_slice(head);
    k.storage.fill(head.len());
    kawa::h1::parse(&mut k, &mut kawa::h1::NoCallbacks);
    assert!(!k.blocks.is_empty());
    assert_eq!(spare_queues(), 0);
    recycle(&mut k);
    assert_eq!((k.blocks.capacity(), k.out.capacity()), (0, 0));
    assert_eq!(spare_queues(), 1);

    let mut next = Kawa::new(Kind::Request, Buffer::new(pool.checkout().unwrap()));
    presize(&mut next);
    assert_eq!(spare_queues(), 0);
    assert!(next.blocks.is_empty() && next.out.is_empty());
    assert!(next.blocks.capacity() >= INITIAL_BLOCKS && next.out.capacity() >= INITIAL_OUT);

    // Grown past what a connection keeps between requests: freed, not kept.
    next.blocks.reserve(RETAINED_BLOCKS * 4);
    recycle(&mut next);
    assert_eq!(spare_queues(), 0);

    // Bounded, however many connections end at once.
    let mut many: Vec<_> = (0..SPARE_QUEUES + 10)
        .map(|_| {
            let mut k = Kawa::new(Kind::Request, Buffer::new(crate::pool::PoolBuf::none()));
            presize(&mut k);
            k
        })
        .collect();
    for k in &mut many {
        recycle(k);
    }
    assert_eq!(spare_queues(), SPARE_QUEUES);
}
