//! The HTTP/2 client connection ([`super::conn::H2Conn`]) driven over bytes held in memory:
//! the fuzz target `h2_conn` (`fuzz/` at the repository root) runs the very code a worker
//! runs, with the client socket replaced by a front that reads the given bytes and keeps
//! what kakehi writes.
//!
//! The worker around it is played as `session.rs` and `worker.rs` do: a [`Cx`] of its own (a
//! real mio registry nothing is registered with, a pool of [`Plan::buffers`] buffers, the
//! access log off), edge-triggered readiness (each turn a new piece of the client's bytes
//! arrives and the client makes room for [`Plan::write_size`] more bytes), `drive` until
//! nothing moves, then `timeout` at a time past every deadline, then the client's FIN; the
//! connection's `close` and the wires' `release` at the end, as `Session::close` does.
//!
//! No backend is ever contacted: the listener's routes ([`ROUTES`]) only redirect to https
//! (kakehi's own 301, carrying the request's host and path), and every other request is
//! answered 404 by kakehi itself. The exchanges, the streams' wires, the flow control, the
//! rate limits and the frames written are the shipped ones.

use super::conn::H2Conn;
use crate::accesslog::AccessLog;
use crate::balancer::{ClusterState, Rng};
use crate::cx::Cx;
use crate::http::exchange::{Flow, FrontWire, Http2};
use crate::http::memory::PEER;
use crate::idle_backends::IdlePool;
use crate::pool::BufferPool;
use crate::router::Router;
use crate::session::Wires;
use crate::splice::PipePool;
use crate::stats::Stats;
use lb_config::{AccessLog as AccessLogConfig, Config, LogFormat, LogTarget};
use std::io::{self, ErrorKind, Read, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The listener's configuration: one cluster whose frontends only redirect to https, so that
/// some requests get kakehi's 301 (with their host and path in `location`) and the others
/// its 404. The backend is never contacted.
pub const ROUTES: &str = r#"
[[listeners]]
address = "127.0.0.1:8080"

[clusters.app]
frontends = [
  { address = "127.0.0.1:8080", hostname = "secure.example", redirect_https = true },
  { address = "127.0.0.1:8080", path = "/secure", redirect_https = true },
]
backends = [{ address = "127.0.0.1:1" }]
"#;

/// Turns one call drives at most: a connection still moving after this many is reported
/// ([`Outcome::broken`]).
pub const MAX_TURNS: usize = 200_000;

/// How far the clock jumps before the one `timeout` call: past every deadline.
pub const LATER: Duration = Duration::from_secs(3600);

/// How the network and the worker treat a driven connection.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Client bytes arriving per turn (0 counts as 1).
    pub read_size: usize,
    /// Bytes the client reads from kakehi per turn (0: everything).
    pub write_size: usize,
    /// Buffers in the worker's pool (an exchange takes two per stream).
    pub buffers: usize,
    /// Size of each (`buffer_size` in the configuration).
    pub buffer_size: usize,
    /// The worker starts draining at this turn.
    pub drain_at: Option<usize>,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan {
            read_size: 1 << 20,
            write_size: 0,
            buffers: 64,
            buffer_size: 4096,
            drain_at: None,
        }
    }
}

/// What happened to one driven connection.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Everything kakehi wrote to the client, in order.
    pub written: Vec<u8>,
    /// For each write taken: the length of `written` after it, and how many of the client's
    /// bytes kakehi had read by then (a frame written cannot answer later client bytes).
    pub marks: Vec<(usize, usize)>,
    /// Client bytes kakehi read (or discarded while lingering).
    pub read: usize,
    /// kakehi closed the connection (`drive` or `timeout` returned [`Flow::Close`]); false
    /// when it was still open after the client's FIN and nothing moved.
    pub closed: bool,
    /// The write side was shut (after a connection error's GOAWAY).
    pub shut_write: bool,
    /// Writes attempted after the write side was shut.
    pub writes_after_shutdown: usize,
    /// The one `timeout` call was made (the connection was still open then).
    pub timed_out: bool,
    /// Pool buffers still checked out after `close`.
    pub buffers_in_use: usize,
    /// Every request kakehi logged, with the HTTP/1.1 bytes its exchange read.
    pub logged: Vec<crate::cx::Logged>,
    /// Turns driven.
    pub turns: usize,
    /// The connection still moved after [`MAX_TURNS`] turns.
    pub broken: bool,
}

/// The client socket: the given bytes, arriving a piece per turn, and what kakehi writes.
struct MemoryFront<'a> {
    input: &'a [u8],
    /// Bytes arrived so far (readable).
    arrived: usize,
    /// Bytes read by kakehi.
    at: usize,
    /// The client shut its side: after `input`, reads return 0.
    fin: bool,
    /// Room the client made for this turn (`usize::MAX`: everything).
    room: usize,
    out: Vec<u8>,
    marks: Vec<(usize, usize)>,
    shut: bool,
    writes_after_shutdown: usize,
}

impl MemoryFront<'_> {
    fn take(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = self.input.get(self.at..self.arrived).unwrap_or_default();
        if rest.is_empty() {
            return if self.fin && self.at == self.input.len() {
                Ok(0)
            } else {
                Err(ErrorKind::WouldBlock.into())
            };
        }
        let n = rest.len().min(buf.len());
        if let (Some(to), Some(from)) = (buf.get_mut(..n), rest.get(..n)) {
            to.copy_from_slice(from);
        }
        self.at += n;
        Ok(n)
    }
}

impl Read for MemoryFront<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.take(buf)
    }
}

impl Write for MemoryFront<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.shut {
            self.writes_after_shutdown += 1;
            return Err(ErrorKind::BrokenPipe.into());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.room == 0 {
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.room);
        self.out.extend_from_slice(buf.get(..n).unwrap_or_default());
        if self.room != usize::MAX {
            self.room -= n;
        }
        self.marks.push((self.out.len(), self.at));
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FrontWire for MemoryFront<'_> {
    fn has_pending(&self) -> bool {
        false
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn handshaking(&self) -> bool {
        false
    }

    fn refused_plain_http(&self) -> bool {
        false
    }

    fn shutdown_write(&mut self) {
        self.shut = true;
    }

    fn discard(&mut self, scratch: &mut [u8]) -> io::Result<usize> {
        self.take(scratch)
    }

    fn is_tls(&self) -> bool {
        false
    }

    fn http2(&self) -> Http2 {
        Http2::Preface
    }
}

/// The configuration of [`ROUTES`] and the listener's router, read once.
fn routes() -> io::Result<&'static (Config, Router)> {
    static ROUTES_READ: OnceLock<Result<(Config, Router), String>> = OnceLock::new();
    ROUTES_READ
        .get_or_init(|| {
            let config = lb_config::parse_str(ROUTES, std::path::Path::new("h2-memory.toml"))
                .map_err(|e| e.to_string())?;
            let router = Router::for_listener(&config, PEER.listener);
            Ok((config, router))
        })
        .as_ref()
        .map_err(|e| io::Error::other(format!("h2::memory::ROUTES: {e}")))
}

/// A worker's shared state for one connection, in memory.
fn memory_cx(plan: &Plan, now: Instant) -> io::Result<Cx> {
    let (config, router) = routes()?;
    let poll = mio::Poll::new()?;
    let registry = poll.registry().try_clone()?;
    let log = AccessLog::new(&AccessLogConfig {
        format: LogFormat::Logfmt,
        target: LogTarget::Off,
    })?;
    Ok(Cx {
        registry,
        clusters: config.clusters.iter().map(ClusterState::new).collect(),
        routers: vec![router.clone()],
        tcp_routes: Vec::new(),
        tls: vec![None],
        http2: config.listeners.iter().map(|l| l.http2).collect(),
        h2_limits: vec![lb_config::H2Limits::default()],
        pool: BufferPool::new(plan.buffer_size, 0, plan.buffers),
        pipes: PipePool::new(0, 0),
        idle: IdlePool::new(0, config.timeouts.back_idle),
        upstreams: crate::h2::upstream::Upstreams::new(config.timeouts.back_idle),
        transcript: Some(Vec::new()),
        log,
        stats: Stats::default(),
        down: Vec::new(),
        rng: Rng::new(7),
        timeouts: config.timeouts,
        max_request_body: 0,
        now,
        draining: false,
        close_idle: false,
        id_prefix: 0x6832,
        rates: None,
        requests: 0,
    })
}

/// Drives one HTTP/2 connection whose client sends `client` (the preface included: nothing
/// is added), as [`Plan`] says, and reports what kakehi wrote and how it ended. Fails only
/// when the worker's state cannot be set up (no mio poll).
pub fn drive_connection(client: &[u8], plan: &Plan) -> io::Result<Outcome> {
    let start = Instant::now();
    let mut cx = memory_cx(plan, start)?;
    let read_size = plan.read_size.max(1);
    let room = match plan.write_size {
        0 => usize::MAX,
        n => n,
    };
    let front = MemoryFront {
        input: client,
        arrived: 0,
        at: 0,
        fin: false,
        room: 0,
        out: Vec::new(),
        marks: Vec::new(),
        shut: false,
        writes_after_shutdown: 0,
    };
    let mut wires = Wires::new(0, 0, front);
    let mut conn = H2Conn::new(PEER, lb_config::H2Limits::default(), &cx);
    let mut out = Outcome::default();

    // One turn of the worker: new bytes arrive, the client reads, then `drive` (`timeout`).
    let turn = |conn: &mut H2Conn,
                wires: &mut Wires<MemoryFront<'_>>,
                cx: &mut Cx,
                out: &mut Outcome,
                timeout: bool|
     -> (Flow, bool) {
        out.turns += 1;
        if plan.drain_at.is_some_and(|at| out.turns >= at) {
            cx.draining = true;
        }
        let front = &mut wires.front;
        let before = (front.arrived, front.at, front.out.len());
        front.arrived = front.arrived.saturating_add(read_size).min(client.len());
        front.room = room;
        wires.front_side.readable = true;
        wires.front_side.writable = true;
        if wires.front.fin {
            wires.front_side.hup = true;
        }
        let flow = if timeout {
            conn.timeout(wires, cx)
        } else {
            conn.drive(wires, cx)
        };
        // Not something the test asks of it, but called by the worker after every turn.
        let _ = (conn.deadline(cx), conn.idle_since());
        let front = &wires.front;
        let moved = before != (front.arrived, front.at, front.out.len()) || conn.yielded();
        (flow, moved)
    };

    let mut closed = false;
    // The client's bytes, then time passing, then the client's FIN.
    for phase in 0..3 {
        if phase == 1 {
            cx.now = start + LATER;
            out.timed_out = true;
        }
        if phase == 2 {
            wires.front.fin = true;
        }
        let mut timeout = phase == 1;
        loop {
            if out.turns >= MAX_TURNS {
                out.broken = true;
                break;
            }
            let (flow, moved) = turn(&mut conn, &mut wires, &mut cx, &mut out, timeout);
            timeout = false;
            if flow == Flow::Close {
                closed = true;
                break;
            }
            if !moved && wires.front.arrived == client.len() {
                break;
            }
        }
        if closed || out.broken {
            break;
        }
    }

    conn.close(&mut cx);
    let front = wires.release(&mut cx);
    out.closed = closed;
    out.read = front.at;
    out.shut_write = front.shut;
    out.writes_after_shutdown = front.writes_after_shutdown;
    out.written = front.out;
    out.marks = front.marks;
    out.buffers_in_use = cx.pool.in_use();
    out.logged = cx.transcript.take().unwrap_or_default();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{drive_connection, Plan};
    use crate::h2::fields::{BlockKind, HeaderLimits};
    use crate::h2::frame::{self, Frame, Parsed, Settings, PREFACE};
    use crate::h2::hpack::{self, Decoder, DEFAULT_TABLE_SIZE};
    use crate::h2::ErrorCode;

    fn settings(settings: Settings) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        let n = frame::write_frame(&Frame::Settings(settings), &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn headers(stream_id: u32, fields: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
        let mut block = vec![0u8; 4096];
        let mut n = 0;
        for (name, value) in fields {
            n += hpack::encode_field(name.as_bytes(), value.as_bytes(), &mut block[n..]).unwrap();
        }
        let mut out = vec![0u8; n + 64];
        let len = frame::write_header_block(
            stream_id,
            &block[..n],
            end_stream,
            frame::DEFAULT_MAX_FRAME_SIZE,
            &mut out,
        )
        .unwrap();
        out.truncate(len);
        out
    }

    fn data(stream_id: u32, bytes: &[u8], end_stream: bool) -> Vec<u8> {
        let mut out = vec![0u8; bytes.len() + 64];
        let frame = Frame::Data {
            stream_id,
            data: bytes,
            end_stream,
            pad: None,
        };
        let n = frame::write_frame(&frame, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn get(stream_id: u32, authority: &str, path: &str) -> Vec<u8> {
        let fields = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", authority),
            (":path", path),
        ];
        headers(stream_id, &fields, true)
    }

    /// Every frame of `bytes`, which must be whole frames.
    fn frames(bytes: &[u8]) -> Vec<Frame<'_>> {
        let mut at = 0;
        let mut all = Vec::new();
        while at < bytes.len() {
            match frame::parse(&bytes[at..], frame::MAX_MAX_FRAME_SIZE) {
                Ok(Parsed::Frame { frame, len }) => {
                    all.push(frame);
                    at += len;
                }
                other => panic!("at {at}: {other:?}"),
            }
        }
        all
    }

    fn status(fragment: &[u8]) -> u16 {
        let limits = HeaderLimits::default();
        let list = Decoder::new(DEFAULT_TABLE_SIZE, limits)
            .decode(fragment, 1, BlockKind::Response)
            .unwrap();
        list.status().unwrap()
    }

    #[test]
    fn a_get_is_answered_404_and_a_redirect_301() {
        let client = [
            &PREFACE[..],
            &settings(Settings::default()),
            &get(1, "example.com", "/"),
            &get(3, "secure.example", "/x"),
        ]
        .concat();
        let out = drive_connection(&client, &Plan::default()).unwrap();
        assert!(out.closed && !out.broken && out.buffers_in_use == 0);
        let frames = frames(&out.written);
        assert!(matches!(frames[0], Frame::Settings(_)));
        assert!(frames.contains(&Frame::SettingsAck));
        let heads: Vec<(u32, u16)> = frames
            .iter()
            .filter_map(|f| match *f {
                Frame::Headers {
                    stream_id,
                    fragment,
                    ..
                } => Some((stream_id, status(fragment))),
                _ => None,
            })
            .collect();
        assert_eq!(heads, [(1, 404), (3, 301)]);

        // The transcript the fuzz target's differential check reads: each logged request
        // with the HTTP/1.1 bytes its exchange read.
        let logged: Vec<(u16, &str, &str, String)> = out
            .logged
            .iter()
            .map(|l| {
                let read = l.read.as_deref().unwrap_or_default();
                (
                    l.status,
                    l.req.authority.as_str(),
                    l.req.target.as_str(),
                    String::from_utf8_lossy(read).into_owned(),
                )
            })
            .collect();
        assert_eq!(logged.len(), 2, "{logged:?}");
        assert_eq!(
            logged[0],
            (
                404,
                "example.com",
                "/",
                "GET / HTTP/1.1\r\nhost: example.com\r\n\r\n".to_owned()
            )
        );
        assert_eq!(
            (logged[1].0, logged[1].1, logged[1].2),
            (301, "secure.example", "/x")
        );
        assert!(logged[1]
            .3
            .starts_with("GET /x HTTP/1.1\r\nhost: secure.example\r\n"));
    }

    /// A stream whose exchange ended while its answer waits for the client's window does not
    /// keep the connection "yielded" (the worker would drive it again at once, forever): the
    /// run stops, and the stall timeout resets the stream.
    #[test]
    fn an_ended_stream_waiting_for_the_window_does_not_spin() {
        let post = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "example.com"),
            (":path", "/upload"),
            ("content-length", "10"),
        ];
        let client = [
            &PREFACE[..],
            &settings(Settings {
                initial_window_size: Some(0),
                ..Settings::default()
            }),
            &headers(1, &post, false),
            &data(1, b"abc", false),
        ]
        .concat();
        let plan = Plan {
            read_size: 1,
            ..Plan::default()
        };
        let out = drive_connection(&client, &plan).unwrap();
        assert!(!out.broken, "still moving after {} turns", out.turns);
        assert!(out.closed && out.timed_out && out.buffers_in_use == 0);
        assert!(frames(&out.written).contains(&Frame::RstStream {
            stream_id: 1,
            code: ErrorCode::Cancel,
        }));
    }

    /// After a connection error, a client that reads slowly gets every queued frame, the
    /// GOAWAY last, before the FIN.
    #[test]
    fn the_goaway_is_written_whole_before_the_fin() {
        // A frame longer than SETTINGS_MAX_FRAME_SIZE: FRAME_SIZE_ERROR.
        let client = [
            &PREFACE[..],
            &settings(Settings::default()),
            &[0x0a, 0x5b, 0x01, 0xe7, 0x01, 0x00, 0xe7, 0x00, 0xe7],
        ]
        .concat();
        let plan = Plan {
            read_size: 1,
            write_size: 9,
            ..Plan::default()
        };
        let out = drive_connection(&client, &plan).unwrap();
        assert!(out.shut_write && out.writes_after_shutdown == 0);
        let frames = frames(&out.written);
        assert!(matches!(
            frames.last(),
            Some(Frame::GoAway {
                code: ErrorCode::FrameSizeError,
                ..
            })
        ));
    }

    /// A worker that drains sends GOAWAY (NO_ERROR) with the last stream it took; a later
    /// GOAWAY (an error) does not name the streams refused since.
    #[test]
    fn a_later_goaway_does_not_name_a_higher_stream() {
        // DATA on stream 0: a connection error (PROTOCOL_ERROR).
        let client = [
            &PREFACE[..],
            &settings(Settings::default()),
            &get(1, "example.com", "/"),
            &[0, 0, 1, 0, 0, 0, 0, 0, 0, b'x'],
        ]
        .concat();
        // A client that reads slowly keeps the drained connection open (its frames wait).
        let plan = Plan {
            read_size: 16,
            write_size: 9,
            drain_at: Some(1),
            ..Plan::default()
        };
        let out = drive_connection(&client, &plan).unwrap();
        let frames = frames(&out.written);
        let goaways: Vec<(u32, ErrorCode)> = frames
            .iter()
            .filter_map(|f| match *f {
                Frame::GoAway {
                    last_stream_id,
                    code,
                    ..
                } => Some((last_stream_id, code)),
                _ => None,
            })
            .collect();
        // The drain's first GOAWAY names 2^31-1 (stream 1, sent before the client could
        // know, is served); the error's names no more than any before it.
        assert_eq!(goaways.first(), Some(&(0x7fff_ffff, ErrorCode::NoError)));
        assert_eq!(goaways.last().map(|g| g.1), Some(ErrorCode::ProtocolError));
        assert!(
            goaways.windows(2).all(|w| w[1].0 <= w[0].0),
            "a GOAWAY named a higher stream than an earlier one: {goaways:?}"
        );
    }
}
