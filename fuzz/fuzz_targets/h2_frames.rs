//! Arbitrary bytes through lb-proxy's HTTP/2 first layer as a connection will drive it:
//! `h2::frame::parse` frame after frame, every frame through the header-block assembler
//! (`h2::block::Assembler`), every whole block through the HPACK decoder (`h2::hpack::Decoder`,
//! the first block of a stream as a request, later ones as trailers), until a connection
//! error. The whole input is also decoded as one header block by a fresh decoder.
//!
//! Input: byte 0 bits 0-5 are the read size of the re-cut pass minus one, bit 6 picks small
//! header limits (512-octet list, 8 fields) over the defaults, bit 7 a maximum frame size of
//! 2^24 - 1 over 16,384; the rest is the client's bytes (the connection preface, when they
//! start with it, is skipped).
//!
//! Checks: no panic; `Incomplete` asks for more than it has; a frame's length is within the
//! input and its header's; every frame written again by `write_frame` parses back equal, with
//! the same length; the same stream read in pieces of the read size gives the same answers at
//! the same offsets; a decoded header list stays within its limits, its names are lower-case
//! tokens and none is connection-specific, and written again by `encode_field` it decodes
//! (fresh decoder) to the same list.
#![no_main]

use std::collections::HashSet;

use lb_proxy::h2::block::{Assembler, BlockLimits};
use lb_proxy::h2::fields::{BlockKind, HeaderLimits, HeaderList};
use lb_proxy::h2::frame::{
    check_preface, parse, write_frame, FrameHeader, Parsed, Preface, DEFAULT_MAX_FRAME_SIZE,
    HEADER_LEN, MAX_MAX_FRAME_SIZE,
};
use lb_proxy::h2::hpack::{encode_field, Decoder, DEFAULT_TABLE_SIZE};
use lb_proxy::h2::H2Error;
use libfuzzer_sys::fuzz_target;

/// The list as comparable values: pseudo-headers, then the regular fields in order.
type Flat = ([Option<Vec<u8>>; 4], Vec<(Vec<u8>, Vec<u8>)>);

fn flat(list: &HeaderList) -> Flat {
    let own = |v: Option<&[u8]>| v.map(<[u8]>::to_vec);
    (
        [
            own(list.method()),
            own(list.scheme()),
            own(list.authority()),
            own(list.path()),
        ],
        list.fields()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect(),
    )
}

/// The checks on a list the decoder accepted.
fn check_list(list: &HeaderList, limits: HeaderLimits, kind: BlockKind) {
    assert!(
        list.list_size() <= limits.max_list_size as usize,
        "list size"
    );
    assert!(list.len() <= limits.max_fields, "field count");
    let (pseudo, fields) = flat(list);
    let mut size = 0;
    for (n, v) in fields.iter() {
        assert!(
            !n.is_empty()
                && n.iter()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase() && *b != b':'),
            "name {n:?}"
        );
        assert!(
            !matches!(
                n.as_slice(),
                b"connection"
                    | b"keep-alive"
                    | b"proxy-connection"
                    | b"transfer-encoding"
                    | b"upgrade"
            ),
            "connection-specific {n:?}"
        );
        assert!(
            !v.iter().any(|b| matches!(b, 0 | b'\r' | b'\n')),
            "value {v:?}"
        );
        size += n.len() + v.len() + 32;
    }
    let names = [&b":method"[..], b":scheme", b":authority", b":path"];
    for (name, v) in names.iter().zip(&pseudo) {
        if let Some(v) = v {
            size += name.len() + v.len() + 32;
        }
    }
    assert_eq!(size, list.list_size(), "list size counted per §6.5.2");
    if kind == BlockKind::Trailers {
        assert!(
            pseudo.iter().all(Option::is_none),
            "pseudo-header in trailers"
        );
    }
    // Written again by kakehi's encoder, read by a fresh decoder: the same list.
    let mut out = vec![0u8; list.list_size() + 64];
    let mut at = 0;
    for (name, v) in names.iter().zip(&pseudo) {
        if let Some(v) = v {
            at += encode_field(name, v, &mut out[at..]).expect("encode pseudo");
        }
    }
    for (n, v) in fields.iter() {
        at += encode_field(n, v, &mut out[at..]).expect("encode field");
    }
    let again = Decoder::new(DEFAULT_TABLE_SIZE, limits)
        .decode(&out[..at], 1, kind)
        .unwrap_or_else(|e| panic!("re-encoded list refused: {e}"));
    assert_eq!(flat(&again), flat(list), "re-encoded list");
}

/// One pass over the stream as a connection reads it: every answer with its offset, ending
/// with the connection error or the final `Incomplete`.
fn whole_pass<'a>(
    stream: &'a [u8],
    max_frame_size: u32,
    limits: HeaderLimits,
) -> Vec<(usize, Result<Parsed<'a>, H2Error>)> {
    let mut answers = Vec::new();
    let mut assembler = Assembler::new(BlockLimits::default());
    let mut decoder = Decoder::new(DEFAULT_TABLE_SIZE, limits);
    let mut streams = HashSet::new();
    let mut at = 0;
    loop {
        let rest = &stream[at..];
        let answer = parse(rest, max_frame_size);
        answers.push((at, answer));
        let (len, connection_error) = match answer {
            Err(e) => {
                assert!(e.is_connection(), "{e}");
                break;
            }
            Ok(Parsed::Incomplete { at_least }) => {
                assert!(
                    at_least > rest.len(),
                    "Incomplete({at_least}) for {}",
                    rest.len()
                );
                break;
            }
            Ok(Parsed::StreamError { error, kind, len }) => {
                assert!(!error.is_connection() && len >= HEADER_LEN && len <= rest.len());
                assert_eq!(FrameHeader::read(rest).map(|h| h.kind), Some(kind));
                let stream_id = FrameHeader::read(rest).map_or(0, |h| h.stream_id);
                (len, assembler.skipped(kind, stream_id).is_err())
            }
            Ok(Parsed::Frame { frame, len }) => {
                assert!(len >= HEADER_LEN && len <= rest.len());
                let header = FrameHeader::read(rest).expect("header");
                assert_eq!(header.length as usize, len - HEADER_LEN);
                assert_eq!(
                    (header.kind, header.stream_id),
                    (frame.kind(), frame.stream_id())
                );
                // Written again, read back the same.
                let mut out = vec![0u8; len];
                let n = write_frame(&frame, &mut out)
                    .unwrap_or_else(|| panic!("write_frame refused {frame:?}"));
                assert!(n <= len, "rewritten longer: {n} > {len}");
                assert_eq!(
                    parse(&out[..n], max_frame_size),
                    Ok(Parsed::Frame { frame, len: n }),
                    "rewritten {frame:?}"
                );
                let error = match assembler.push(&frame) {
                    Err(e) => {
                        assert!(e.is_connection());
                        true
                    }
                    Ok(None) => false,
                    Ok(Some(block)) => {
                        let kind = if streams.insert(block.stream_id) {
                            BlockKind::Request
                        } else {
                            BlockKind::Trailers
                        };
                        match decoder.decode(block.block, block.stream_id, kind) {
                            Ok(list) => {
                                check_list(&list, limits, kind);
                                false
                            }
                            Err(e) => e.is_connection(),
                        }
                    }
                };
                (len, error)
            }
        };
        if connection_error {
            break;
        }
        at += len;
    }
    answers
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, mut stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(control & 0x3f) + 1;
    let limits = if control & 0x40 != 0 {
        HeaderLimits {
            max_list_size: 512,
            max_fields: 8,
        }
    } else {
        HeaderLimits::default()
    };
    let max_frame_size = if control & 0x80 != 0 {
        MAX_MAX_FRAME_SIZE
    } else {
        DEFAULT_MAX_FRAME_SIZE
    };
    if let Ok(Preface::Complete) = check_preface(stream) {
        stream = &stream[24..];
    }

    // The whole input as one header block.
    for kind in [BlockKind::Request, BlockKind::Trailers] {
        if let Ok(list) = Decoder::new(DEFAULT_TABLE_SIZE, limits).decode(stream, 1, kind) {
            check_list(&list, limits, kind);
        }
    }

    let whole = whole_pass(stream, max_frame_size, limits);

    // The same answers when the bytes arrive `chunk` at a time (parse only: the blocks are
    // the same bytes, decoded by the same code).
    let mut fed = 0;
    let mut i = 0;
    let mut at = 0;
    loop {
        let end = fed.min(stream.len());
        let answer = parse(&stream[at..end], max_frame_size);
        if let Ok(Parsed::Incomplete { at_least }) = answer {
            assert!(at_least > end - at);
            if end < stream.len() {
                fed += chunk;
                continue;
            }
        }
        assert_eq!(
            Some(&(at, answer)),
            whole.get(i),
            "answer {i} when cut by {chunk}"
        );
        i += 1;
        match answer {
            Ok(Parsed::Frame { len, .. }) | Ok(Parsed::StreamError { len, .. })
                if i < whole.len() =>
            {
                at += len
            }
            _ => break,
        }
    }
    assert_eq!(i, whole.len(), "the cut pass stopped early");
});
