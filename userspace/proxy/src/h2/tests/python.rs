//! A connection written by another implementation: Debian's python3-h2 (with its own HPACK
//! encoder, Huffman and dynamic table) plays a client, and every frame it writes is read by
//! the parser, the assembler and the HPACK decoder. Skipped, with a message, where
//! /usr/bin/python3 has no `h2` module (`apt-get install python3-h2`).

use std::process::Command;

use crate::h2::block::{Assembler, BlockLimits};
use crate::h2::fields::{BlockKind, HeaderLimits};
use crate::h2::frame::{check_preface, parse, Frame, Parsed, Preface, Priority, Settings};
use crate::h2::hpack::{Decoder, DEFAULT_TABLE_SIZE};
use crate::h2::ErrorCode;

/// The client's bytes: preface and SETTINGS, a GET, a POST with a prioritised HEADERS, padded
/// DATA and trailers, a GET with a 30,000-octet field (HEADERS + CONTINUATION), window
/// updates, PING, RST_STREAM, new SETTINGS and GOAWAY.
pub(crate) const SCRIPT: &str = r#"
import sys
import h2.connection, h2.config, h2.settings
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
c.initiate_connection()
req = [(":method", "GET"), (":scheme", "https"), (":authority", "example.com"), (":path", "/index.html"),
       ("user-agent", "python-h2"), ("accept", "*/*"), ("cookie", "a=1")]
c.send_headers(1, req, end_stream=True)
c.send_headers(3, [(":method", "POST"), (":scheme", "https"), (":authority", "example.com"), (":path", "/upload"),
                   ("user-agent", "python-h2"), ("content-type", "application/grpc"), ("te", "trailers")],
               priority_weight=32, priority_depends_on=1, priority_exclusive=True)
c.send_data(3, b"hello ", pad_length=10)
c.send_data(3, b"world")
c.send_headers(3, [("grpc-status", "0"), ("x-trailer", "t")], end_stream=True)
c.send_headers(5, req[:4] + [("x-big", "b" * 30000)], end_stream=True)
c.increment_flow_control_window(1000)
c.increment_flow_control_window(500, stream_id=5)
c.ping(b"12345678")
c.reset_stream(5, error_code=8)
c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20, h2.settings.SettingCodes.MAX_FRAME_SIZE: 32768})
c.close_connection(error_code=0, additional_data=b"bye", last_stream_id=0)
sys.stdout.buffer.write(c.data_to_send())
"#;

/// The bytes python3-h2 writes, or None (with a message) when it is not installed.
pub(crate) fn python_h2_bytes() -> Option<Vec<u8>> {
    let has_h2 = Command::new("/usr/bin/python3")
        .args(["-c", "import h2"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_h2 {
        eprintln!("SKIPPED: /usr/bin/python3 has no h2 module (apt-get install -y python3-h2)");
        return None;
    }
    let out = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out.stdout)
}

#[derive(Debug, PartialEq)]
enum Event {
    Settings(Settings),
    Head(u32, bool, Vec<(String, String)>),
    Data(u32, Vec<u8>, u32, bool),
    Window(u32, u32),
    Ping([u8; 8]),
    Reset(u32, ErrorCode),
    GoAway(u32, ErrorCode, Vec<u8>),
}

#[test]
fn python_h2_client_frames_parse() {
    let Some(bytes) = python_h2_bytes() else {
        return;
    };
    assert_eq!(check_preface(&bytes), Ok(Preface::Complete));
    let mut input = &bytes[24..];
    let big = HeaderLimits {
        max_list_size: 64 * 1024,
        max_fields: 100,
    };
    let mut decoder = Decoder::new(DEFAULT_TABLE_SIZE, big);
    let mut assembler = Assembler::new(BlockLimits {
        max_continuations: 8,
        max_block_size: 64 * 1024,
    });
    let mut events = Vec::new();
    let mut heads_seen = 0;
    let mut priorities = Vec::new();
    let mut continuations = 0;
    let mut table_sizes = Vec::new();
    while !input.is_empty() {
        let (frame, len) = match parse(input, 16_384).unwrap() {
            Parsed::Frame { frame, len } => (frame, len),
            other => panic!("{other:?}"),
        };
        if let Frame::Continuation { .. } = frame {
            continuations += 1;
        }
        if let Some(block) = assembler.push(&frame).unwrap() {
            // Stream 3's second block is its trailers.
            let kind = if block.stream_id == 3 && heads_seen == 2 {
                BlockKind::Trailers
            } else {
                BlockKind::Request
            };
            heads_seen += 1;
            priorities.push(block.priority);
            let list = decoder.decode(block.block, block.stream_id, kind).unwrap();
            table_sizes.push(decoder.table_size());
            let s = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
            let mut fields = Vec::new();
            for (n, v) in [
                (":method", list.method()),
                (":scheme", list.scheme()),
                (":authority", list.authority()),
                (":path", list.path()),
            ] {
                if let Some(v) = v {
                    fields.push((n.to_string(), s(v)));
                }
            }
            fields.extend(list.fields().map(|(n, v)| (s(n), s(v))));
            events.push(Event::Head(block.stream_id, block.end_stream, fields));
        } else {
            match frame {
                Frame::Settings(s) => events.push(Event::Settings(s)),
                Frame::Data {
                    stream_id,
                    data,
                    end_stream,
                    ..
                } => events.push(Event::Data(
                    stream_id,
                    data.to_vec(),
                    frame.flow_controlled_len(),
                    end_stream,
                )),
                Frame::WindowUpdate {
                    stream_id,
                    increment,
                } => events.push(Event::Window(stream_id, increment)),
                Frame::Ping { ack: false, data } => events.push(Event::Ping(data)),
                Frame::RstStream { stream_id, code } => events.push(Event::Reset(stream_id, code)),
                Frame::GoAway {
                    last_stream_id,
                    code,
                    debug,
                } => events.push(Event::GoAway(last_stream_id, code, debug.to_vec())),
                Frame::Headers { .. } | Frame::Continuation { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        input = &input[len..];
    }
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    };
    let get = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "example.com"),
        (":path", "/index.html"),
    ];
    let mut first = get.to_vec();
    first.extend([
        ("user-agent", "python-h2"),
        ("accept", "*/*"),
        ("cookie", "a=1"),
    ]);
    let big_value = "b".repeat(30_000);
    let mut fifth = get.to_vec();
    fifth.push(("x-big", &big_value));
    let want = vec![
        Event::Settings(Settings {
            header_table_size: Some(4096),
            enable_push: Some(true),
            max_concurrent_streams: Some(100),
            initial_window_size: Some(65535),
            max_frame_size: Some(16384),
            max_header_list_size: Some(65536),
        }),
        Event::Head(1, true, pairs(&first)),
        Event::Head(
            3,
            false,
            pairs(&[
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "example.com"),
                (":path", "/upload"),
                ("user-agent", "python-h2"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]),
        ),
        Event::Data(3, b"hello ".to_vec(), 6 + 1 + 10, false),
        Event::Data(3, b"world".to_vec(), 5, false),
        Event::Head(3, true, pairs(&[("grpc-status", "0"), ("x-trailer", "t")])),
        Event::Head(5, true, pairs(&fifth)),
        Event::Window(0, 1000),
        Event::Window(5, 500),
        Event::Ping(*b"12345678"),
        Event::Reset(5, ErrorCode::Cancel),
        Event::Settings(Settings {
            initial_window_size: Some(1 << 20),
            max_frame_size: Some(32768),
            ..Settings::default()
        }),
        Event::GoAway(0, ErrorCode::NoError, b"bye".to_vec()),
    ];
    assert_eq!(events, want);
    assert!(
        continuations >= 1,
        "the 30,000-octet field needs CONTINUATION"
    );
    // python3-h2 sends the weight minus one, as the wire does.
    assert_eq!(
        priorities[1],
        Some(Priority {
            exclusive: true,
            dependency: 1,
            weight: 31
        })
    );
    // Its encoder indexes fields: the table grew with the first blocks, and the 30,000-octet
    // field, larger than the table, emptied it (RFC 7541 §4.4).
    assert!(
        table_sizes[0] > 0 && table_sizes[1] > table_sizes[0],
        "{table_sizes:?}"
    );
    assert_eq!(table_sizes[3], 0);
}
