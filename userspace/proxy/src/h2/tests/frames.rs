//! Frames: the preface, each frame type parsed, each parse error with its scope and code,
//! answers stable under cuts, and every writer read back by the parser.

use crate::h2::frame::{
    check_preface, flag, kind, parse, write_frame, write_header_block, Frame, FrameHeader, Parsed,
    Preface, Priority, Settings, DEFAULT_MAX_FRAME_SIZE, PREFACE,
};
use crate::h2::{ErrorCode, H2Error, Reason, Scope};

const MAX: u32 = DEFAULT_MAX_FRAME_SIZE;

/// A frame as raw bytes.
fn raw(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut v = len.to_be_bytes()[1..].to_vec();
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(&stream_id.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn frame(bytes: &[u8]) -> Frame<'_> {
    match parse(bytes, MAX) {
        Ok(Parsed::Frame { frame, len }) => {
            assert_eq!(len, bytes.len());
            frame
        }
        other => panic!("{bytes:02x?}: {other:?}"),
    }
}

fn conn_error(bytes: &[u8]) -> H2Error {
    match parse(bytes, MAX) {
        Err(e) => {
            assert_eq!(e.scope, Scope::Connection);
            e
        }
        other => panic!("{bytes:02x?}: {other:?}"),
    }
}

fn stream_error(bytes: &[u8]) -> H2Error {
    match parse(bytes, MAX) {
        Ok(Parsed::StreamError { error, kind, len }) => {
            assert_eq!(len, bytes.len());
            assert_eq!(kind, bytes[3]);
            error
        }
        other => panic!("{bytes:02x?}: {other:?}"),
    }
}

#[test]
fn preface() {
    assert_eq!(check_preface(PREFACE), Ok(Preface::Complete));
    let mut more = PREFACE.to_vec();
    more.extend_from_slice(&raw(kind::SETTINGS, 0, 0, &[]));
    assert_eq!(check_preface(&more), Ok(Preface::Complete));
    assert_eq!(
        check_preface(&PREFACE[..10]),
        Ok(Preface::Incomplete { at_least: 24 })
    );
    assert_eq!(check_preface(b""), Ok(Preface::Incomplete { at_least: 24 }));
    let e = check_preface(b"GET / HTTP/1.1\r\n").unwrap_err();
    assert_eq!(
        (e.code, e.reason),
        (ErrorCode::ProtocolError, Reason::BadPreface)
    );
    assert!(check_preface(b"PRI * HTTP/2.0\r\n\r\nXX").is_err());
}

#[test]
fn each_frame_type_parses() {
    let data = raw(kind::DATA, flag::END_STREAM, 1, b"hello");
    assert_eq!(
        frame(&data),
        Frame::Data {
            stream_id: 1,
            data: b"hello",
            end_stream: true,
            pad: None
        }
    );
    // Padded: pad length 3, "hi", three octets of padding; all of it counts for flow control.
    let padded = raw(kind::DATA, flag::PADDED, 3, &[3, b'h', b'i', 0, 0, 0]);
    let f = frame(&padded);
    assert_eq!(
        f,
        Frame::Data {
            stream_id: 3,
            data: b"hi",
            end_stream: false,
            pad: Some(3)
        }
    );
    assert_eq!(f.flow_controlled_len(), 6);
    // HEADERS with padding and priority (exclusive, on stream 1, weight 16).
    let headers = raw(
        kind::HEADERS,
        flag::PADDED | flag::PRIORITY | flag::END_HEADERS,
        5,
        &[2, 0x80, 0, 0, 1, 15, 0x82, 0x84, 0, 0],
    );
    assert_eq!(
        frame(&headers),
        Frame::Headers {
            stream_id: 5,
            fragment: &[0x82, 0x84],
            end_stream: false,
            end_headers: true,
            priority: Some(Priority {
                exclusive: true,
                dependency: 1,
                weight: 15
            }),
            pad: Some(2),
        }
    );
    assert_eq!(
        frame(&raw(kind::PRIORITY, 0, 3, &[0, 0, 0, 1, 200])),
        Frame::Priority {
            stream_id: 3,
            priority: Priority {
                exclusive: false,
                dependency: 1,
                weight: 200
            }
        }
    );
    assert_eq!(
        frame(&raw(kind::RST_STREAM, 0, 7, &[0, 0, 0, 8])),
        Frame::RstStream {
            stream_id: 7,
            code: ErrorCode::Cancel
        }
    );
    assert_eq!(
        frame(&raw(kind::RST_STREAM, 0, 7, &[0, 0, 1, 0])),
        Frame::RstStream {
            stream_id: 7,
            code: ErrorCode::Unknown(256)
        }
    );
    // SETTINGS: the last of a repeated parameter wins, unknown ones are ignored.
    let settings = raw(
        kind::SETTINGS,
        0,
        0,
        &[
            0, 1, 0, 0, 0x10, 0, // HEADER_TABLE_SIZE 4096
            0, 2, 0, 0, 0, 0, // ENABLE_PUSH 0
            0, 3, 0, 0, 0, 100, // MAX_CONCURRENT_STREAMS 100
            0, 4, 0x7f, 0xff, 0xff, 0xff, // INITIAL_WINDOW_SIZE 2^31-1
            0, 5, 0, 0xff, 0xff, 0xff, // MAX_FRAME_SIZE 2^24-1
            0, 6, 0, 0, 0x40, 0, // MAX_HEADER_LIST_SIZE 16384
            0, 1, 0, 0, 0, 0, // HEADER_TABLE_SIZE 0 again
            0x12, 0x34, 0xff, 0xff, 0xff, 0xff, // unknown
        ],
    );
    assert_eq!(
        frame(&settings),
        Frame::Settings(Settings {
            header_table_size: Some(0),
            enable_push: Some(false),
            max_concurrent_streams: Some(100),
            initial_window_size: Some((1 << 31) - 1),
            max_frame_size: Some((1 << 24) - 1),
            max_header_list_size: Some(16384),
        })
    );
    assert_eq!(
        frame(&raw(kind::SETTINGS, 0, 0, &[])),
        Frame::Settings(Settings::default())
    );
    assert_eq!(
        frame(&raw(kind::SETTINGS, flag::ACK, 0, &[])),
        Frame::SettingsAck
    );
    assert_eq!(
        frame(&raw(kind::PING, flag::ACK, 0, b"12345678")),
        Frame::Ping {
            ack: true,
            data: *b"12345678"
        }
    );
    // GOAWAY: the reserved bit of the last stream id is ignored.
    assert_eq!(
        frame(&raw(
            kind::GOAWAY,
            0,
            0,
            &[0x80, 0, 0, 9, 0, 0, 0, 0xb, b'x']
        )),
        Frame::GoAway {
            last_stream_id: 9,
            code: ErrorCode::EnhanceYourCalm,
            debug: b"x"
        }
    );
    assert_eq!(
        frame(&raw(kind::WINDOW_UPDATE, 0, 0, &[0x80, 0, 1, 0])),
        Frame::WindowUpdate {
            stream_id: 0,
            increment: 256
        }
    );
    assert_eq!(
        frame(&raw(kind::CONTINUATION, flag::END_HEADERS, 1, &[0x82])),
        Frame::Continuation {
            stream_id: 1,
            fragment: &[0x82],
            end_headers: true
        }
    );
    assert_eq!(
        frame(&raw(0x42, 0xff, 0, b"ext")),
        Frame::Unknown {
            kind: 0x42,
            flags: 0xff,
            stream_id: 0,
            payload: b"ext"
        }
    );
    // The reserved bit of the stream identifier is ignored.
    assert_eq!(
        frame(&raw(kind::RST_STREAM, 0, 0x8000_0001, &[0, 0, 0, 0])).stream_id(),
        1
    );
}

#[test]
fn connection_errors() {
    use ErrorCode::{FlowControlError as Flow, FrameSizeError as Size, ProtocolError as Proto};
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "over max frame size",
            raw(kind::DATA, 0, 1, &[0; 16385]),
            Size,
        ),
        ("DATA on 0", raw(kind::DATA, 0, 0, b"x"), Proto),
        ("HEADERS on 0", raw(kind::HEADERS, 4, 0, &[0x82]), Proto),
        ("PRIORITY on 0", raw(kind::PRIORITY, 0, 0, &[0; 5]), Proto),
        (
            "RST_STREAM on 0",
            raw(kind::RST_STREAM, 0, 0, &[0; 4]),
            Proto,
        ),
        (
            "CONTINUATION on 0",
            raw(kind::CONTINUATION, 4, 0, &[]),
            Proto,
        ),
        ("SETTINGS on 1", raw(kind::SETTINGS, 0, 1, &[]), Proto),
        ("PING on 1", raw(kind::PING, 0, 1, &[0; 8]), Proto),
        ("GOAWAY on 1", raw(kind::GOAWAY, 0, 1, &[0; 8]), Proto),
        (
            "PUSH_PROMISE",
            raw(kind::PUSH_PROMISE, 4, 1, &[0, 0, 0, 2]),
            Proto,
        ),
        (
            "RST_STREAM of 3",
            raw(kind::RST_STREAM, 0, 1, &[0; 3]),
            Size,
        ),
        (
            "RST_STREAM of 5",
            raw(kind::RST_STREAM, 0, 1, &[0; 5]),
            Size,
        ),
        (
            "WINDOW_UPDATE of 5",
            raw(kind::WINDOW_UPDATE, 0, 1, &[0, 0, 0, 1, 0]),
            Size,
        ),
        ("PING of 7", raw(kind::PING, 0, 0, &[0; 7]), Size),
        ("PING of 9", raw(kind::PING, 0, 0, &[0; 9]), Size),
        (
            "SETTINGS ACK of 6",
            raw(kind::SETTINGS, 1, 0, &[0, 1, 0, 0, 0, 0]),
            Size,
        ),
        (
            "SETTINGS of 5",
            raw(kind::SETTINGS, 0, 0, &[0, 1, 0, 0, 0]),
            Size,
        ),
        ("SETTINGS of 7", raw(kind::SETTINGS, 0, 0, &[0; 7]), Size),
        ("GOAWAY of 7", raw(kind::GOAWAY, 0, 0, &[0; 7]), Size),
        (
            "DATA padded, empty",
            raw(kind::DATA, flag::PADDED, 1, &[]),
            Size,
        ),
        (
            "DATA padding = payload",
            raw(kind::DATA, flag::PADDED, 1, &[3, 0, 0]),
            Proto,
        ),
        (
            "DATA padding > payload",
            raw(kind::DATA, flag::PADDED, 1, &[200]),
            Proto,
        ),
        (
            "HEADERS padded, empty",
            raw(kind::HEADERS, flag::PADDED, 1, &[]),
            Size,
        ),
        (
            "HEADERS priority of 4",
            raw(kind::HEADERS, flag::PRIORITY, 1, &[0; 4]),
            Size,
        ),
        (
            "HEADERS padded+priority of 5",
            raw(kind::HEADERS, flag::PADDED | flag::PRIORITY, 1, &[0; 5]),
            Size,
        ),
        (
            "HEADERS padding into the priority",
            raw(
                kind::HEADERS,
                flag::PADDED | flag::PRIORITY,
                1,
                &[3, 0, 0, 0, 0, 0, 0],
            ),
            Proto,
        ),
        (
            "HEADERS padding > fragment",
            raw(kind::HEADERS, flag::PADDED, 1, &[2, 0x82]),
            Proto,
        ),
        (
            "ENABLE_PUSH 2",
            raw(kind::SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 2]),
            Proto,
        ),
        (
            "INITIAL_WINDOW_SIZE 2^31",
            raw(kind::SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0]),
            Flow,
        ),
        (
            "MAX_FRAME_SIZE 16383",
            raw(kind::SETTINGS, 0, 0, &[0, 5, 0, 0, 0x3f, 0xff]),
            Proto,
        ),
        (
            "MAX_FRAME_SIZE 2^24",
            raw(kind::SETTINGS, 0, 0, &[0, 5, 1, 0, 0, 0]),
            Proto,
        ),
        (
            "WINDOW_UPDATE 0 on 0",
            raw(kind::WINDOW_UPDATE, 0, 0, &[0; 4]),
            Proto,
        ),
        (
            "WINDOW_UPDATE 0 (reserved bit set) on 0",
            raw(kind::WINDOW_UPDATE, 0, 0, &[0x80, 0, 0, 0]),
            Proto,
        ),
    ];
    for (what, bytes, code) in cases {
        let e = conn_error(&bytes);
        assert_eq!(e.code, code, "{what}: {e}");
    }
    // A larger advertised maximum lets the same frame through.
    let big = raw(kind::DATA, 0, 1, &[0; 16385]);
    assert!(matches!(parse(&big, 16385), Ok(Parsed::Frame { .. })));
}

#[test]
fn header_errors_need_only_the_header() {
    // A frame too large, on the wrong stream or of a fixed wrong length is refused once its 9
    // octets are in, before its payload arrives.
    let mut huge = raw(kind::HEADERS, 0, 1, &[]);
    huge[..3].copy_from_slice(&[0x10, 0, 0]);
    assert_eq!(
        conn_error(&huge).reason,
        Reason::FrameTooLarge { length: 0x100000 }
    );
    let rst = raw(kind::RST_STREAM, 0, 1, &[0; 5]);
    assert_eq!(conn_error(&rst[..9]).code, ErrorCode::FrameSizeError);
}

#[test]
fn stream_errors() {
    let e = stream_error(&raw(kind::PRIORITY, 0, 3, &[0, 0, 0, 1]));
    assert_eq!(
        (e.scope, e.code),
        (Scope::Stream(3), ErrorCode::FrameSizeError)
    );
    let e = stream_error(&raw(kind::PRIORITY, 0, 3, &[0, 0, 0, 3, 0]));
    assert_eq!(
        (e.scope, e.code, e.reason),
        (
            Scope::Stream(3),
            ErrorCode::ProtocolError,
            Reason::SelfDependency
        )
    );
    let e = stream_error(&raw(kind::WINDOW_UPDATE, 0, 5, &[0; 4]));
    assert_eq!(
        (e.scope, e.code, e.reason),
        (
            Scope::Stream(5),
            ErrorCode::ProtocolError,
            Reason::WindowIncrementZero
        )
    );
    // A HEADERS on itself is a frame: its block must still be decoded (see tests::block).
    let h = raw(kind::HEADERS, flag::PRIORITY | 4, 3, &[0, 0, 0, 3, 0, 0x82]);
    assert!(matches!(frame(&h), Frame::Headers { .. }));
}

#[test]
fn every_prefix_is_incomplete() {
    let mut stream = raw(kind::HEADERS, flag::END_HEADERS, 1, &[0x82, 0x86, 0x84]);
    let first = stream.len();
    stream.extend_from_slice(&raw(kind::PING, 0, 0, b"abcdefgh"));
    for cut in 0..first {
        match parse(&stream[..cut], MAX) {
            Ok(Parsed::Incomplete { at_least }) => {
                assert!(at_least > cut && at_least <= first, "{cut}: {at_least}")
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    let Ok(Parsed::Frame { len, .. }) = parse(&stream, MAX) else {
        panic!()
    };
    assert_eq!(len, first);
    assert!(matches!(
        parse(&stream[len..], MAX),
        Ok(Parsed::Frame {
            frame: Frame::Ping { .. },
            ..
        })
    ));
}

fn all_frames() -> Vec<Frame<'static>> {
    let p = Priority {
        exclusive: true,
        dependency: 7,
        weight: 255,
    };
    vec![
        Frame::Data {
            stream_id: 1,
            data: b"body",
            end_stream: true,
            pad: None,
        },
        Frame::Data {
            stream_id: 0x7fff_ffff,
            data: b"",
            end_stream: false,
            pad: Some(0),
        },
        Frame::Data {
            stream_id: 3,
            data: b"x",
            end_stream: false,
            pad: Some(255),
        },
        Frame::Headers {
            stream_id: 1,
            fragment: &[0x82, 0x87],
            end_stream: true,
            end_headers: true,
            priority: None,
            pad: None,
        },
        Frame::Headers {
            stream_id: 9,
            fragment: &[],
            end_stream: false,
            end_headers: false,
            priority: Some(p),
            pad: Some(4),
        },
        Frame::Priority {
            stream_id: 5,
            priority: p,
        },
        Frame::RstStream {
            stream_id: 5,
            code: ErrorCode::RefusedStream,
        },
        Frame::RstStream {
            stream_id: 5,
            code: ErrorCode::Unknown(0xdead),
        },
        Frame::Settings(Settings::default()),
        Frame::Settings(Settings {
            header_table_size: Some(4096),
            enable_push: Some(false),
            max_concurrent_streams: Some(100),
            initial_window_size: Some(65535),
            max_frame_size: Some(16384),
            max_header_list_size: Some(16384),
        }),
        Frame::SettingsAck,
        Frame::Ping {
            ack: false,
            data: [1, 2, 3, 4, 5, 6, 7, 8],
        },
        Frame::Ping {
            ack: true,
            data: [0; 8],
        },
        Frame::GoAway {
            last_stream_id: 41,
            code: ErrorCode::NoError,
            debug: b"",
        },
        Frame::GoAway {
            last_stream_id: 0,
            code: ErrorCode::EnhanceYourCalm,
            debug: b"reset flood",
        },
        Frame::WindowUpdate {
            stream_id: 0,
            increment: (1 << 31) - 1,
        },
        Frame::WindowUpdate {
            stream_id: 3,
            increment: 1,
        },
        Frame::Continuation {
            stream_id: 9,
            fragment: &[0x84],
            end_headers: true,
        },
        Frame::Unknown {
            kind: 0xfa,
            flags: 0x12,
            stream_id: 3,
            payload: b"?",
        },
    ]
}

#[test]
fn every_writer_round_trips() {
    for f in all_frames() {
        let mut out = [0u8; 512];
        let n = write_frame(&f, &mut out).unwrap();
        assert_eq!(
            parse(&out[..n], MAX),
            Ok(Parsed::Frame { frame: f, len: n })
        );
        // A buffer one octet short is refused, not overrun.
        assert_eq!(write_frame(&f, &mut out[..n - 1]), None, "{f:?}");
        let h = FrameHeader::read(&out).unwrap();
        assert_eq!((h.kind, h.stream_id), (f.kind(), f.stream_id()));
    }
}

#[test]
fn header_block_is_split_into_continuations() {
    let block: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
    let mut out = vec![0u8; 41_000];
    let n = write_header_block(3, &block, true, MAX, &mut out).unwrap();
    assert_eq!(n, block.len() + 3 * 9);
    let mut at = 0;
    let mut joined = Vec::new();
    let mut kinds = Vec::new();
    while at < n {
        let Ok(Parsed::Frame { frame, len }) = parse(&out[at..n], MAX) else {
            panic!()
        };
        match frame {
            Frame::Headers {
                fragment,
                end_stream,
                end_headers,
                ..
            } => {
                assert!(end_stream && !end_headers);
                joined.extend_from_slice(fragment);
            }
            Frame::Continuation {
                fragment,
                end_headers,
                ..
            } => {
                assert_eq!(end_headers, at + len == n);
                joined.extend_from_slice(fragment);
            }
            other => panic!("{other:?}"),
        }
        kinds.push(frame.kind());
        at += len;
    }
    assert_eq!(
        kinds,
        [kind::HEADERS, kind::CONTINUATION, kind::CONTINUATION]
    );
    assert_eq!(joined, block);
    assert_eq!(
        write_header_block(3, &block, true, MAX, &mut out[..40_000]),
        None
    );
    // A small block is a single HEADERS with END_HEADERS.
    let n = write_header_block(1, &[0x82], false, MAX, &mut out).unwrap();
    assert_eq!(
        frame(&out[..n]),
        Frame::Headers {
            stream_id: 1,
            fragment: &[0x82],
            end_stream: false,
            end_headers: true,
            priority: None,
            pad: None
        }
    );
}
