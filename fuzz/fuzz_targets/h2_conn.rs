//! A client's bytes through kakehi's HTTP/2 connection (`lb_proxy::h2::conn::H2Conn`), the
//! way a worker drives it (`lb_proxy::h2::memory::drive_connection`): frames parsed, streams
//! opened, each served by the HTTP/1.1 exchange (kakehi answers 404 itself, or 301 for the
//! routes of `h2::memory::ROUTES`: no backend), flow control, SETTINGS, PING, GOAWAY, the rate
//! limits; the bytes arriving a piece per turn, the client reading a few bytes per turn;
//! `drive` until nothing moves, one `timeout` an hour later, then the client's FIN.
//!
//! Input: byte 0 is the read size (b < 0xC0: b + 1 bytes per turn, else (b - 0xBF) * 512);
//! byte 1 bits 0-1 the bytes the client reads per turn (everything, 9, 100, 4096), bits 2-3
//! the pool's buffers (64, 2, 6, 200), bit 4 a worker that starts draining at the second
//! turn, bit 5 16 KiB buffers (else 4 KiB); the rest is the client's bytes. When they do not
//! start with the connection preface, the preface and an empty SETTINGS are put before them.
//!
//! Checks: no panic; the run ends (no endless progress), and kakehi closes once the client
//! sent its FIN; everything kakehi wrote is a sequence of valid frames (`h2::frame::parse`),
//! its SETTINGS first, then only frames a server sends (no PUSH_PROMISE, PRIORITY, PING
//! without ACK, unknown types), each within the largest frame size the client allowed; a
//! header block is HEADERS then its CONTINUATIONs with nothing between, and decodes with a
//! fresh HPACK decoder (kakehi uses no dynamic table) as a response (`:status` first, lower-case
//! names, no connection-specific field; 1xx heads before one final head), or as trailers
//! with END_STREAM; HEADERS and DATA only on streams the client opened, never after
//! END_STREAM or RST_STREAM on that stream; no DATA beyond the windows the client had
//! granted when kakehi wrote it (65,535 or the largest SETTINGS_INITIAL_WINDOW_SIZE, plus the
//! stream's WINDOW_UPDATEs; 65,535 plus the connection's); no more SETTINGS ACKs than
//! SETTINGS, every PING ACK echoing a PING; RST_STREAM only on streams the client named;
//! GOAWAY's last stream id never grows, and nothing after a GOAWAY with an error; nothing
//! written after the write side is shut; every pool buffer back after `close`. And the
//! differential check ([`check_logged`]): each request kakehi routed and logged is what
//! `httparse` reads in the HTTP/1.1 bytes its exchange was given.
#![no_main]

use std::collections::{HashMap, HashSet};

use lb_proxy::h2::fields::{BlockKind, HeaderLimits};
use lb_proxy::h2::frame::{
    parse, Frame, FrameHeader, Parsed, DEFAULT_MAX_FRAME_SIZE, HEADER_LEN, MAX_MAX_FRAME_SIZE,
    PREFACE,
};
use lb_proxy::h2::hpack::{Decoder, DEFAULT_TABLE_SIZE};
use lb_proxy::h2::memory::{drive_connection, Outcome, Plan};
use lb_proxy::h2::ErrorCode;
use libfuzzer_sys::fuzz_target;

/// The SETTINGS frame (empty) put after the preface when the input has none.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// What a client frame grants or asks, at the offset where the frame ends.
enum Event {
    Settings {
        initial_window: Option<u32>,
        max_frame: Option<u32>,
    },
    WindowUpdate {
        stream_id: u32,
        increment: u32,
    },
    Ping([u8; 8]),
    Headers(u32),
    /// Any other frame naming a stream (refused frames included).
    Names(u32),
}

/// The client's frames as kakehi parses them (its max frame size), until a connection error
/// or the end.
fn client_events(client: &[u8]) -> Vec<(usize, Event)> {
    let mut events = Vec::new();
    let mut at = PREFACE.len();
    loop {
        let rest = client.get(at..).unwrap_or_default();
        match parse(rest, DEFAULT_MAX_FRAME_SIZE) {
            Err(_) | Ok(Parsed::Incomplete { .. }) => break,
            Ok(Parsed::StreamError { len, .. }) => {
                at += len;
                if let Some(h) = FrameHeader::read(rest) {
                    events.push((at, Event::Names(h.stream_id)));
                }
            }
            Ok(Parsed::Frame { frame, len }) => {
                at += len;
                let event = match frame {
                    Frame::Settings(s) => Event::Settings {
                        initial_window: s.initial_window_size,
                        max_frame: s.max_frame_size,
                    },
                    Frame::WindowUpdate {
                        stream_id,
                        increment,
                    } => Event::WindowUpdate {
                        stream_id,
                        increment,
                    },
                    Frame::Ping { ack: false, data } => Event::Ping(data),
                    Frame::Headers { stream_id, .. } => Event::Headers(stream_id),
                    other => Event::Names(other.stream_id()),
                };
                events.push((at, event));
            }
        }
    }
    events
}

/// What the client had sent when kakehi wrote a frame.
#[derive(Default)]
struct Granted {
    max_frame: u32,
    max_initial_window: u64,
    stream_grants: HashMap<u32, u64>,
    conn_grants: u64,
    pings: HashMap<[u8; 8], usize>,
    settings: usize,
    opened: HashSet<u32>,
    named: HashSet<u32>,
}

impl Granted {
    fn apply(&mut self, event: &Event) {
        match *event {
            Event::Settings {
                initial_window,
                max_frame,
            } => {
                self.settings += 1;
                if let Some(w) = initial_window {
                    self.max_initial_window = self.max_initial_window.max(u64::from(w));
                }
                if let Some(m) = max_frame {
                    self.max_frame = self.max_frame.max(m);
                }
            }
            Event::WindowUpdate {
                stream_id,
                increment,
            } => {
                if stream_id == 0 {
                    self.conn_grants += u64::from(increment);
                } else {
                    *self.stream_grants.entry(stream_id).or_default() += u64::from(increment);
                    self.named.insert(stream_id);
                }
            }
            Event::Ping(data) => *self.pings.entry(data).or_default() += 1,
            Event::Headers(id) => {
                self.opened.insert(id);
                self.named.insert(id);
            }
            Event::Names(id) => {
                self.named.insert(id);
            }
        }
    }
}

/// A stream as kakehi answered it.
#[derive(Default)]
struct Answered {
    final_head: bool,
    ended: bool,
    reset: bool,
    data: u64,
}

fn check(client: &[u8], plan: &Plan, out: &Outcome) {
    assert!(!out.broken, "still moving after {} turns", out.turns);
    assert_eq!(out.buffers_in_use, 0, "pool buffers not given back");
    assert_eq!(
        out.writes_after_shutdown, 0,
        "written after the write side was shut"
    );
    assert!(out.closed, "kakehi did not close after the client's FIN");

    let events = client_events(client);
    let mut next_event = 0;
    let mut granted = Granted {
        max_frame: DEFAULT_MAX_FRAME_SIZE,
        max_initial_window: 65_535,
        ..Granted::default()
    };
    let mut streams: HashMap<u32, Answered> = HashMap::new();
    let mut conn_data = 0u64;
    let mut acks = 0usize;
    let mut drain_pings = 0u32;
    let mut goaway: Option<u32> = None;
    let mut failed = false;
    // An open header block: its stream, its bytes, END_STREAM.
    let mut block: Option<(u32, Vec<u8>, bool)> = None;
    let mut next_mark = 0;

    let written = &out.written;
    let mut at = 0;
    let mut first = true;
    while at < written.len() {
        // What kakehi had read when it wrote this frame's first byte.
        while out.marks.get(next_mark).is_some_and(|&(end, _)| end <= at) {
            next_mark += 1;
        }
        let read = out
            .marks
            .get(next_mark)
            .map_or(client.len(), |&(_, read)| read);
        while let Some((end, event)) = events.get(next_event) {
            if *end > read {
                break;
            }
            granted.apply(event);
            next_event += 1;
        }

        let rest = &written[at..];
        let (frame, len) = match parse(rest, MAX_MAX_FRAME_SIZE) {
            Ok(Parsed::Frame { frame, len }) => (frame, len),
            Ok(Parsed::Incomplete { .. }) if plan.write_size != 0 => {
                // Cut by a client that reads slowly, when the connection closed.
                break;
            }
            other => panic!("kakehi wrote at {at}: {other:?}"),
        };
        assert!(!failed, "a frame after a GOAWAY with an error: {frame:?}");
        assert!(
            (len - HEADER_LEN) as u32 <= granted.max_frame,
            "frame of {} octets over the client's {}",
            len - HEADER_LEN,
            granted.max_frame
        );
        if first {
            assert!(matches!(frame, Frame::Settings(_)), "first frame {frame:?}");
            first = false;
        }
        if let Some((id, _, _)) = &block {
            assert!(
                matches!(frame, Frame::Continuation { stream_id, .. } if stream_id == *id),
                "{frame:?} inside the header block of stream {id}"
            );
        }
        let stream_id = frame.stream_id();
        match frame {
            Frame::Settings(_) | Frame::GoAway { .. } | Frame::Ping { .. } => {
                assert_eq!(stream_id, 0)
            }
            Frame::Headers { .. } | Frame::Data { .. } => {
                assert!(
                    stream_id % 2 == 1 && granted.opened.contains(&stream_id),
                    "{frame:?} on a stream the client did not open"
                );
                let s = streams.entry(stream_id).or_default();
                assert!(!s.ended && !s.reset, "{frame:?} after the stream ended");
            }
            _ => {}
        }
        match frame {
            Frame::Settings(_) => {}
            Frame::SettingsAck => {
                acks += 1;
                assert!(acks <= granted.settings, "more SETTINGS ACKs than SETTINGS");
            }
            Frame::Ping { ack: false, data } => {
                // The one PING kakehi sends: after a drain's first GOAWAY (RFC 9113 §6.8).
                assert_eq!(&data, b"kakehi-d", "kakehi sent a PING");
                drain_pings += 1;
                assert!(drain_pings <= 1, "kakehi sent its drain PING twice");
            }
            Frame::Ping { ack: true, data } => {
                let left = granted.pings.get_mut(&data);
                match left {
                    Some(n) if *n > 0 => *n -= 1,
                    _ => panic!("PING ACK {data:?} answers no PING"),
                }
            }
            Frame::WindowUpdate { stream_id, .. } => {
                assert!(
                    stream_id == 0 || granted.opened.contains(&stream_id),
                    "WINDOW_UPDATE on stream {stream_id} never opened"
                );
            }
            Frame::RstStream { stream_id, .. } => {
                assert!(
                    granted.named.contains(&stream_id),
                    "RST_STREAM on stream {stream_id} the client never named"
                );
                streams.entry(stream_id).or_default().reset = true;
            }
            Frame::GoAway {
                last_stream_id,
                code,
                ..
            } => {
                if let Some(before) = goaway {
                    assert!(last_stream_id <= before, "GOAWAY's last stream id grew");
                }
                goaway = Some(last_stream_id);
                failed = code != ErrorCode::NoError;
            }
            Frame::Headers {
                fragment,
                end_stream,
                end_headers,
                pad,
                priority,
                ..
            } => {
                assert!(pad.is_none() && priority.is_none(), "{frame:?}");
                block = Some((stream_id, fragment.to_vec(), end_stream));
                if end_headers {
                    header_block(&mut block, &mut streams);
                }
            }
            Frame::Continuation {
                fragment,
                end_headers,
                ..
            } => {
                let Some((_, bytes, _)) = block.as_mut() else {
                    panic!("CONTINUATION outside a header block");
                };
                bytes.extend_from_slice(fragment);
                if end_headers {
                    header_block(&mut block, &mut streams);
                }
            }
            Frame::Data {
                end_stream, pad, ..
            } => {
                assert!(pad.is_none(), "{frame:?}");
                let n = u64::from(frame.flow_controlled_len());
                let s = streams.entry(stream_id).or_default();
                assert!(s.final_head, "DATA before the response head");
                s.data += n;
                conn_data += n;
                let window = granted.max_initial_window
                    + granted.stream_grants.get(&stream_id).copied().unwrap_or(0);
                assert!(
                    s.data <= window,
                    "stream {stream_id}: {} octets of DATA, the client granted {window}",
                    s.data
                );
                let window = 65_535 + granted.conn_grants;
                assert!(
                    conn_data <= window,
                    "{conn_data} octets of DATA, the client granted the connection {window}"
                );
                s.ended |= end_stream;
            }
            Frame::Priority { .. } | Frame::Unknown { .. } => {
                panic!("kakehi sent {frame:?}")
            }
        }
        at += len;
    }
    assert!(
        block.is_none() || plan.write_size != 0,
        "header block left open"
    );
}

/// A whole header block kakehi sent: a response head or trailers.
fn header_block(block: &mut Option<(u32, Vec<u8>, bool)>, streams: &mut HashMap<u32, Answered>) {
    let Some((id, bytes, end_stream)) = block.take() else {
        return;
    };
    let s = streams.entry(id).or_default();
    let kind = if s.final_head {
        BlockKind::Trailers
    } else {
        BlockKind::Response
    };
    let limits = HeaderLimits {
        max_list_size: u32::MAX,
        max_fields: usize::MAX,
    };
    let list = Decoder::new(DEFAULT_TABLE_SIZE, limits)
        .decode(&bytes, id, kind)
        .unwrap_or_else(|e| panic!("stream {id}: {kind:?} block refused: {e}: {bytes:?}"));
    match kind {
        BlockKind::Response => {
            let status = list.status().expect(":status");
            assert!((100..=999).contains(&status), "status {status}");
            if status >= 200 {
                s.final_head = true;
            } else {
                assert!(!end_stream, "END_STREAM on an interim response");
            }
        }
        _ => assert!(end_stream, "trailers without END_STREAM"),
    }
    s.ended |= end_stream;
}

fuzz_target!(|data: &[u8]| {
    let [read, control, rest @ ..] = data else {
        return;
    };
    let read_size = match *read {
        b @ 0..0xC0 => usize::from(b) + 1,
        b => usize::from(b - 0xBF) * 512,
    };
    let plan = Plan {
        read_size,
        write_size: [0, 9, 100, 4096][usize::from(control & 3)],
        buffers: [64, 2, 6, 200][usize::from((control >> 2) & 3)],
        buffer_size: if control & 0x20 != 0 { 16_384 } else { 4096 },
        drain_at: (control & 0x10 != 0).then_some(2),
    };
    let client: Vec<u8> = if rest.starts_with(PREFACE) {
        rest.to_vec()
    } else {
        [&PREFACE[..], &EMPTY_SETTINGS, rest].concat()
    };
    let out = drive_connection(&client, &plan).expect("the in-memory worker");
    check(&client, &plan, &out);
    check_logged(&out);
});

/// The differential check: every request kakehi routed (its own 301 or 404 here) is, for
/// `httparse`, the HTTP/1.1 request its exchange read (which `h2/request.rs` wrote from the
/// client's HEADERS): the same method, target and Host as kakehi parsed, routed on and
/// logged. What the exchange then forwards to a backend is the HTTP/1.1 machine's, which the
/// `http_request` target checks the same way.
fn check_logged(out: &Outcome) {
    for (i, logged) in out.logged.iter().enumerate() {
        if !(logged.answered && matches!(logged.status, 301 | 404)) {
            continue;
        }
        let read = logged.read.as_deref().expect("an HTTP/2 stream keeps what it read");
        let mut headers = [httparse::EMPTY_HEADER; 256];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(read) {
            Ok(httparse::Status::Complete(_)) => {}
            other => panic!(
                "request {i}: httparse cannot read the head kakehi routed ({other:?}): {:?}",
                String::from_utf8_lossy(read)
            ),
        }
        if let Err(why) = kakehi_fuzz::head_agrees(&logged.req, &req) {
            panic!(
                "request {i}: httparse disagrees with what kakehi routed and logged: {why}\n\
                 logged: {} {} (host {:?})\nread: {:?}",
                logged.req.method,
                logged.req.target,
                logged.req.authority,
                String::from_utf8_lossy(read)
            );
        }
    }
}
