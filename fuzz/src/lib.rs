//! What the fuzz targets share: how a fuzz input is split into a network plan and a byte
//! stream, and the checks run on what `lb_proxy::http::sansio` drove.
//!
//! Input layout (both targets):
//!
//! ```text
//! byte 0      buffer size: b < 0xF0 -> 32 + 16*b (32..=3856); else 4096, 8192, 16384, 65536
//! byte 1      low nibble: C, number of cuts; high nibble: W, number of write sizes
//! C bytes     gaps between successive cuts (gap = byte + 1)
//! W bytes     write sizes the peer accepts, in a cycle (0 = everything)
//! 1 byte      http_response only: bit 0 HEAD, bit 1 upgrade asked, bit 2 HTTP/1.0 request,
//!             bit 3 the client connection closes after the response
//! rest        the byte stream (client -> kakehi, or backend -> kakehi)
//! ```
//!
//! `KAKEHI_FUZZ_WHOLE_WRITES=1` in the environment ignores the write sizes (see
//! [`whole_writes`]).
//!
//! A crash is a panic anywhere (kawa, kakehi's callbacks, the driver) or a failed check:
//! no [`End::Broken`]; the same stream cut differently and written in pieces gives the same
//! bytes for every message both runs complete; each complete request forwarded is exactly one
//! well-formed HTTP/1.1 message, and so is each complete final response with a framed body.

use kawa::Kind;
use lb_proxy::http::sansio::{decode_message, drive_request, drive_response, End, Plan};
use lb_proxy::http::RequestInfo;

/// A decoded fuzz input.
pub struct Case<'a> {
    pub buffer_size: usize,
    pub cuts: Vec<usize>,
    pub writes: Vec<usize>,
    pub flags: u8,
    pub stream: &'a [u8],
}

/// Splits a fuzz input; `None` when it is too short for its header.
pub fn split(data: &[u8], with_flags: bool) -> Option<Case<'_>> {
    let (&size, rest) = data.split_first()?;
    let (&counts, rest) = rest.split_first()?;
    let buffer_size = match size {
        0..=0xEF => 32 + 16 * usize::from(size),
        _ => [4096, 8192, 16384, 65536][usize::from(size & 3)],
    };
    let (gaps, rest) = rest.split_at_checked(usize::from(counts & 0x0F))?;
    let (writes, rest) = rest.split_at_checked(usize::from(counts >> 4))?;
    let (flags, stream) = if with_flags {
        let (&flags, stream) = rest.split_first()?;
        (flags, stream)
    } else {
        (0, rest)
    };
    let mut at = 0;
    let cuts = gaps
        .iter()
        .map(|&g| {
            at += usize::from(g) + 1;
            at
        })
        .collect();
    let writes = writes
        .iter()
        .map(|&w| if w == 0 { usize::MAX } else { usize::from(w) })
        .collect();
    Some(Case {
        buffer_size,
        cuts,
        writes,
        flags,
        stream,
    })
}

/// Set `KAKEHI_FUZZ_WHOLE_WRITES=1` to take every write whole (the inputs' write sizes are
/// ignored): a way to fuzz past a known crash that needs partial writes, until it is fixed.
fn whole_writes() -> bool {
    static WHOLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WHOLE.get_or_init(|| std::env::var_os("KAKEHI_FUZZ_WHOLE_WRITES").is_some_and(|v| v != "0"))
}

impl Case<'_> {
    fn plan(&self) -> Plan<'_> {
        let writes: &[usize] = if whole_writes() { &[] } else { &self.writes };
        Plan::new(&self.cuts, self.buffer_size, writes)
    }

    /// The same stream in one read, every write taken whole.
    fn reference(&self) -> Plan<'_> {
        Plan::new(&[], self.buffer_size, &[])
    }
}

fn not_broken(end: End) {
    assert!(!matches!(end, End::Broken { .. }), "driver reached {end:?}");
}

/// The `http_request` target.
pub fn check_request(case: &Case<'_>) {
    let out = drive_request(case.stream, &case.plan());
    let reference = drive_request(case.stream, &case.reference());
    for o in out.iter().chain(&reference) {
        not_broken(o.end);
        if let End::Answered { status, .. } = o.end {
            assert!(matches!(status, 400 | 414 | 431), "answered {status}");
        }
    }
    for (i, (o, r)) in out.iter().zip(&reference).enumerate() {
        if o.end == End::Complete && r.end == End::Complete {
            assert!(
                o.forwarded == r.forwarded,
                "request {i}: cut or partial writes changed the forwarded bytes\n\
                 cut:   {:?}\nwhole: {:?}",
                String::from_utf8_lossy(&o.forwarded),
                String::from_utf8_lossy(&r.forwarded),
            );
        }
    }
    for (i, o) in out.iter().enumerate() {
        if o.end == End::Complete {
            assert!(
                decode_message(Kind::Request, &o.forwarded).is_some(),
                "request {i}: forwarded bytes are not one well-formed request: {:?}",
                String::from_utf8_lossy(&o.forwarded),
            );
        }
    }
}

/// The `http_response` target.
pub fn check_response(case: &Case<'_>) {
    let request = RequestInfo {
        method: if case.flags & 1 != 0 { "HEAD" } else { "GET" }.to_owned(),
        is_head: case.flags & 1 != 0,
        upgrade: case.flags & 2 != 0,
        version_10: case.flags & 4 != 0,
        close: case.flags & 8 != 0,
        ..RequestInfo::default()
    };
    let out = drive_response(case.stream, &case.plan(), &request, request.close);
    let reference = drive_response(case.stream, &case.reference(), &request, request.close);
    for r in out.responses.iter().chain(&reference.responses) {
        not_broken(r.end);
        if let End::Answered { status, .. } = r.end {
            assert_eq!(status, 502, "answered {status}");
        }
    }
    for (i, (o, r)) in out.responses.iter().zip(&reference.responses).enumerate() {
        if o.end == End::Complete && r.end == End::Complete {
            assert!(
                o.sent == r.sent,
                "response {i}: cut or partial writes changed the bytes sent\n\
                 cut:   {:?}\nwhole: {:?}",
                String::from_utf8_lossy(&o.sent),
                String::from_utf8_lossy(&r.sent),
            );
        }
    }
    let switched = |s: &lb_proxy::http::sansio::ResponseStream| {
        s.responses
            .last()
            .is_some_and(|r| r.info.switching && r.end == End::Complete)
    };
    if switched(&out) && switched(&reference) {
        assert!(out.piped == reference.piped, "piped bytes differ");
    }
    for (i, r) in out.responses.iter().enumerate() {
        let framed = !request.is_head && !r.info.close_delimited && !r.info.switching;
        if r.end == End::Complete && framed {
            assert!(
                decode_message(Kind::Response, &r.sent).is_some(),
                "response {i}: bytes sent are not one well-formed response: {:?}",
                String::from_utf8_lossy(&r.sent),
            );
        }
    }
}
