//! HTTP/2 frames (RFC 9113 §4 and §6), sans-io: [`parse`] reads one frame from the front of a
//! byte slice and [`write_frame`] writes one into a slice, plus the client connection preface
//! ([`PREFACE`], [`check_preface`]).
//!
//! The parser enforces what a frame alone can tell: the SETTINGS_MAX_FRAME_SIZE the caller
//! advertised, the stream identifier each type needs, fixed payload lengths, padding, the
//! ranges of SETTINGS values, zero window increments, self-dependency, and PUSH_PROMISE, which
//! kakehi never accepts (it never enables push, as a server or as a client to backends).
//! Errors that the frame header alone reveals are returned as soon as its 9 octets are there,
//! without waiting for the payload. What needs the connection's state is left to the
//! connection: stream states and parity (§5.1), flow-control windows, a SETTINGS_ENABLE_PUSH of
//! 1 sent by a server, CONTINUATION sequencing (see `block`), rates.
//!
//! Frames borrow their payload from the input (no copy). Writers write into a caller's
//! `&mut [u8]` and return the length written, or `None` when it does not fit: kakehi's output
//! buffers are fixed-size pooled slices (`pool`), so a frame goes straight into the free space
//! of the buffer that the socket drains, nothing is allocated per frame, and a full buffer is
//! back-pressure rather than growth. [`FrameHeader::write`] alone lets a DATA payload be read
//! from the other side directly behind its header.

use super::error::{ErrorCode, H2Error, Reason};

/// The client connection preface (RFC 9113 §3.4), followed by a SETTINGS frame.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
pub const HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE before any SETTINGS, and its smallest allowed value.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
/// The largest allowed SETTINGS_MAX_FRAME_SIZE and the largest frame payload there is.
pub const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;
/// The largest flow-control window and window increment (2^31 - 1).
pub const MAX_WINDOW_SIZE: u32 = (1 << 31) - 1;

/// Frame type octets (RFC 9113 §6).
pub mod kind {
    /// DATA (§6.1).
    pub const DATA: u8 = 0x0;
    /// HEADERS (§6.2).
    pub const HEADERS: u8 = 0x1;
    /// PRIORITY (§6.3).
    pub const PRIORITY: u8 = 0x2;
    /// RST_STREAM (§6.4).
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS (§6.5).
    pub const SETTINGS: u8 = 0x4;
    /// PUSH_PROMISE (§6.6).
    pub const PUSH_PROMISE: u8 = 0x5;
    /// PING (§6.7).
    pub const PING: u8 = 0x6;
    /// GOAWAY (§6.8).
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE (§6.9).
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION (§6.10).
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flag bits (RFC 9113 §6).
pub mod flag {
    /// END_STREAM on DATA and HEADERS.
    pub const END_STREAM: u8 = 0x1;
    /// ACK on SETTINGS and PING.
    pub const ACK: u8 = 0x1;
    /// END_HEADERS on HEADERS and CONTINUATION.
    pub const END_HEADERS: u8 = 0x4;
    /// PADDED on DATA and HEADERS.
    pub const PADDED: u8 = 0x8;
    /// PRIORITY on HEADERS.
    pub const PRIORITY: u8 = 0x20;
}

/// SETTINGS parameter identifiers (RFC 9113 §6.5.2).
pub mod setting {
    /// SETTINGS_HEADER_TABLE_SIZE.
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    /// SETTINGS_ENABLE_PUSH.
    pub const ENABLE_PUSH: u16 = 0x2;
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    /// SETTINGS_INITIAL_WINDOW_SIZE.
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    /// SETTINGS_MAX_FRAME_SIZE.
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

const STREAM_ID_MASK: u32 = 0x7fff_ffff;

/// What [`check_preface`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preface {
    /// The input is a prefix of the preface: read at least this many octets in all.
    Incomplete {
        /// How many octets the input must have for an answer.
        at_least: usize,
    },
    /// The input starts with the whole preface ([`PREFACE`]`.len()` octets).
    Complete,
}

/// Whether `input` starts with the client connection preface. Anything else is a connection
/// error PROTOCOL_ERROR (RFC 9113 §3.4), as soon as one octet differs.
pub fn check_preface(input: &[u8]) -> Result<Preface, H2Error> {
    let n = input.len().min(PREFACE.len());
    if input.get(..n) != PREFACE.get(..n) {
        return Err(H2Error::connection(
            ErrorCode::ProtocolError,
            Reason::BadPreface,
        ));
    }
    if n < PREFACE.len() {
        Ok(Preface::Incomplete {
            at_least: PREFACE.len(),
        })
    } else {
        Ok(Preface::Complete)
    }
}

/// The 9-octet frame header (RFC 9113 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length (24 bits).
    pub length: u32,
    /// Frame type ([`kind`]).
    pub kind: u8,
    /// Flags ([`flag`]).
    pub flags: u8,
    /// Stream identifier, reserved bit cleared.
    pub stream_id: u32,
}

impl FrameHeader {
    /// The header at the front of `input`, or None if it has fewer than 9 octets.
    pub fn read(input: &[u8]) -> Option<FrameHeader> {
        let h: &[u8; HEADER_LEN] = input.get(..HEADER_LEN)?.try_into().ok()?;
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = *h;
        Some(FrameHeader {
            length: u32::from_be_bytes([0, l0, l1, l2]),
            kind,
            flags,
            stream_id: u32::from_be_bytes([s0, s1, s2, s3]) & STREAM_ID_MASK,
        })
    }

    /// Writes the header into `out[..9]`; None if `out` is shorter or `length` over 24 bits.
    pub fn write(&self, out: &mut [u8]) -> Option<usize> {
        if self.length > MAX_MAX_FRAME_SIZE {
            return None;
        }
        let [_, l0, l1, l2] = self.length.to_be_bytes();
        let [s0, s1, s2, s3] = (self.stream_id & STREAM_ID_MASK).to_be_bytes();
        out.get_mut(..HEADER_LEN)?
            .copy_from_slice(&[l0, l1, l2, self.kind, self.flags, s0, s1, s2, s3]);
        Some(HEADER_LEN)
    }

    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

/// A stream's priority (RFC 9113 §5.3.2, deprecated but still parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    /// The E flag.
    pub exclusive: bool,
    /// The stream this one depends on.
    pub dependency: u32,
    /// Weight minus one, as on the wire.
    pub weight: u8,
}

/// The parameters of a SETTINGS frame, each checked against its range; None when absent.
/// When a parameter appears twice the last one wins (§6.5.3); unknown ones are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// SETTINGS_HEADER_TABLE_SIZE.
    pub header_table_size: Option<u32>,
    /// SETTINGS_ENABLE_PUSH (0 or 1).
    pub enable_push: Option<bool>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: Option<u32>,
    /// SETTINGS_INITIAL_WINDOW_SIZE (at most 2^31 - 1).
    pub initial_window_size: Option<u32>,
    /// SETTINGS_MAX_FRAME_SIZE (16384 to 2^24 - 1).
    pub max_frame_size: Option<u32>,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list_size: Option<u32>,
}

impl Settings {
    fn pairs(&self) -> [(u16, Option<u32>); 6] {
        [
            (setting::HEADER_TABLE_SIZE, self.header_table_size),
            (setting::ENABLE_PUSH, self.enable_push.map(u32::from)),
            (setting::MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
            (setting::INITIAL_WINDOW_SIZE, self.initial_window_size),
            (setting::MAX_FRAME_SIZE, self.max_frame_size),
            (setting::MAX_HEADER_LIST_SIZE, self.max_header_list_size),
        ]
    }

    /// Applies one parameter, checking its range (§6.5.2).
    fn set(&mut self, id: u16, value: u32) -> Result<(), H2Error> {
        let bad = |code| H2Error::connection(code, Reason::BadSetting { id, value });
        match id {
            setting::HEADER_TABLE_SIZE => self.header_table_size = Some(value),
            setting::ENABLE_PUSH => match value {
                0 | 1 => self.enable_push = Some(value == 1),
                _ => return Err(bad(ErrorCode::ProtocolError)),
            },
            setting::MAX_CONCURRENT_STREAMS => self.max_concurrent_streams = Some(value),
            setting::INITIAL_WINDOW_SIZE if value > MAX_WINDOW_SIZE => {
                return Err(bad(ErrorCode::FlowControlError))
            }
            setting::INITIAL_WINDOW_SIZE => self.initial_window_size = Some(value),
            setting::MAX_FRAME_SIZE
                if !(DEFAULT_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&value) =>
            {
                return Err(bad(ErrorCode::ProtocolError))
            }
            setting::MAX_FRAME_SIZE => self.max_frame_size = Some(value),
            setting::MAX_HEADER_LIST_SIZE => self.max_header_list_size = Some(value),
            _ => {}
        }
        Ok(())
    }
}

/// One frame, borrowing its payload from the parsed input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// DATA. The whole payload, padding included, counts against flow control
    /// ([`Frame::flow_controlled_len`]).
    Data {
        /// Stream (not 0).
        stream_id: u32,
        /// The data, padding removed.
        data: &'a [u8],
        /// END_STREAM.
        end_stream: bool,
        /// The pad length when PADDED was set.
        pad: Option<u8>,
    },
    /// HEADERS: the first fragment of a header block (see `block` for the rest).
    Headers {
        /// Stream (not 0).
        stream_id: u32,
        /// The header block fragment, padding and priority removed.
        fragment: &'a [u8],
        /// END_STREAM.
        end_stream: bool,
        /// END_HEADERS: the block is whole.
        end_headers: bool,
        /// The priority when PRIORITY was set. A stream depending on itself is a stream
        /// error that `block::HeaderBlock::check_priority` reports once the block is decoded.
        priority: Option<Priority>,
        /// The pad length when PADDED was set.
        pad: Option<u8>,
    },
    /// PRIORITY.
    Priority {
        /// Stream (not 0).
        stream_id: u32,
        /// Its priority (not on itself).
        priority: Priority,
    },
    /// RST_STREAM.
    RstStream {
        /// Stream (not 0).
        stream_id: u32,
        /// Why.
        code: ErrorCode,
    },
    /// SETTINGS without ACK.
    Settings(Settings),
    /// SETTINGS with ACK (empty).
    SettingsAck,
    /// PING.
    Ping {
        /// ACK: this is the answer to a PING.
        ack: bool,
        /// Opaque data, echoed in the answer.
        data: [u8; 8],
    },
    /// GOAWAY.
    GoAway {
        /// The last stream the sender may have processed.
        last_stream_id: u32,
        /// Why.
        code: ErrorCode,
        /// Additional debug data.
        debug: &'a [u8],
    },
    /// WINDOW_UPDATE on the connection (stream 0) or a stream.
    WindowUpdate {
        /// Stream, or 0 for the connection.
        stream_id: u32,
        /// The increment (1 to 2^31 - 1).
        increment: u32,
    },
    /// CONTINUATION: the next fragment of a header block.
    Continuation {
        /// Stream (not 0).
        stream_id: u32,
        /// The fragment.
        fragment: &'a [u8],
        /// END_HEADERS: the block is whole.
        end_headers: bool,
    },
    /// A frame of a type this codec does not know: to be ignored (§4.1, §5.5), except that
    /// it may not come inside a header block.
    Unknown {
        /// The type octet.
        kind: u8,
        /// The flags.
        flags: u8,
        /// The stream identifier.
        stream_id: u32,
        /// The payload.
        payload: &'a [u8],
    },
}

impl Frame<'_> {
    /// The frame's stream identifier (0 for connection frames).
    pub fn stream_id(&self) -> u32 {
        match *self {
            Frame::Data { stream_id, .. }
            | Frame::Headers { stream_id, .. }
            | Frame::Priority { stream_id, .. }
            | Frame::RstStream { stream_id, .. }
            | Frame::WindowUpdate { stream_id, .. }
            | Frame::Continuation { stream_id, .. }
            | Frame::Unknown { stream_id, .. } => stream_id,
            Frame::Settings(_) | Frame::SettingsAck | Frame::Ping { .. } | Frame::GoAway { .. } => {
                0
            }
        }
    }

    /// The frame's type octet.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Data { .. } => kind::DATA,
            Frame::Headers { .. } => kind::HEADERS,
            Frame::Priority { .. } => kind::PRIORITY,
            Frame::RstStream { .. } => kind::RST_STREAM,
            Frame::Settings(_) | Frame::SettingsAck => kind::SETTINGS,
            Frame::Ping { .. } => kind::PING,
            Frame::GoAway { .. } => kind::GOAWAY,
            Frame::WindowUpdate { .. } => kind::WINDOW_UPDATE,
            Frame::Continuation { .. } => kind::CONTINUATION,
            Frame::Unknown { kind, .. } => *kind,
        }
    }

    /// What a DATA frame counts against the flow-control windows: its whole payload, pad
    /// length octet and padding included (§6.9.1); 0 for other frames.
    pub fn flow_controlled_len(&self) -> u32 {
        match *self {
            Frame::Data { data, pad, .. } => {
                let padding = pad.map_or(0, |p| 1 + usize::from(p));
                u32::try_from(data.len().saturating_add(padding)).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }
}

/// What [`parse`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Not a whole frame yet: read until the input has at least this many octets.
    Incomplete {
        /// The input length needed for an answer.
        at_least: usize,
    },
    /// A frame of `len` octets, header included.
    Frame {
        /// The frame.
        frame: Frame<'a>,
        /// Octets to consume.
        len: usize,
    },
    /// A whole frame of `len` octets that is a stream error: consume it and reset the stream
    /// (inside a header block it is a connection error: see `block::Assembler::skipped`).
    StreamError {
        /// The error, [`super::Scope::Stream`].
        error: H2Error,
        /// The frame type (PRIORITY or WINDOW_UPDATE).
        kind: u8,
        /// Octets to consume.
        len: usize,
    },
}

/// Reads the frame at the front of `input`. `max_frame_size` is the SETTINGS_MAX_FRAME_SIZE
/// this endpoint advertised. An `Err` is always a connection error.
pub fn parse(input: &[u8], max_frame_size: u32) -> Result<Parsed<'_>, H2Error> {
    let Some(header) = FrameHeader::read(input) else {
        return Ok(Parsed::Incomplete {
            at_least: HEADER_LEN,
        });
    };
    check_header(&header, max_frame_size)?;
    let len = HEADER_LEN.saturating_add(header.length as usize);
    let Some(payload) = input.get(HEADER_LEN..len) else {
        return Ok(Parsed::Incomplete { at_least: len });
    };
    match parse_payload(&header, payload) {
        Ok(frame) => Ok(Parsed::Frame { frame, len }),
        Err(error) if !error.is_connection() => Ok(Parsed::StreamError {
            error,
            kind: header.kind,
            len,
        }),
        Err(error) => Err(error),
    }
}

/// The connection errors the header alone shows.
fn check_header(h: &FrameHeader, max_frame_size: u32) -> Result<(), H2Error> {
    let proto = |reason| Err(H2Error::connection(ErrorCode::ProtocolError, reason));
    let size = || {
        Err(H2Error::connection(
            ErrorCode::FrameSizeError,
            Reason::BadLength {
                kind: h.kind,
                length: h.length,
            },
        ))
    };
    if h.length > max_frame_size {
        return Err(H2Error::connection(
            ErrorCode::FrameSizeError,
            Reason::FrameTooLarge { length: h.length },
        ));
    }
    match h.kind {
        kind::PUSH_PROMISE => return proto(Reason::PushPromise),
        kind::DATA | kind::HEADERS | kind::PRIORITY | kind::RST_STREAM | kind::CONTINUATION
            if h.stream_id == 0 =>
        {
            return proto(Reason::StreamIdZero { kind: h.kind })
        }
        kind::SETTINGS | kind::PING | kind::GOAWAY if h.stream_id != 0 => {
            return proto(Reason::StreamIdNonZero {
                kind: h.kind,
                stream_id: h.stream_id,
            })
        }
        _ => {}
    }
    let min_len = match h.kind {
        kind::DATA => u32::from(h.has(flag::PADDED)),
        kind::HEADERS => u32::from(h.has(flag::PADDED)) + 5 * u32::from(h.has(flag::PRIORITY)),
        kind::GOAWAY => 8,
        _ => 0,
    };
    let ok = match h.kind {
        kind::RST_STREAM | kind::WINDOW_UPDATE => h.length == 4,
        kind::PING => h.length == 8,
        kind::SETTINGS if h.has(flag::ACK) => h.length == 0,
        kind::SETTINGS => h.length.is_multiple_of(6),
        _ => h.length >= min_len,
    };
    if ok {
        Ok(())
    } else {
        size()
    }
}

/// A big-endian u32 at `at`.
fn be32(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// Splits off the pad length octet and the padding when PADDED is set: (rest, pad).
fn unpad<'a>(h: &FrameHeader, payload: &'a [u8]) -> Result<(&'a [u8], Option<u8>), H2Error> {
    if !h.has(flag::PADDED) {
        return Ok((payload, None));
    }
    let too_long = || H2Error::connection(ErrorCode::ProtocolError, Reason::PaddingTooLong);
    let (&pad, rest) = payload.split_first().ok_or_else(too_long)?;
    let keep = rest
        .len()
        .checked_sub(usize::from(pad))
        .ok_or_else(too_long)?;
    Ok((rest.get(..keep).ok_or_else(too_long)?, Some(pad)))
}

/// The 5 octets of a priority (E bit, dependency, weight); None if shorter.
fn read_priority(b: &[u8]) -> Option<Priority> {
    let word = be32(b, 0)?;
    Some(Priority {
        exclusive: word & !STREAM_ID_MASK != 0,
        dependency: word & STREAM_ID_MASK,
        weight: *b.get(4)?,
    })
}

/// The payload of a frame whose header passed [`check_header`].
fn parse_payload<'a>(h: &FrameHeader, payload: &'a [u8]) -> Result<Frame<'a>, H2Error> {
    let stream_id = h.stream_id;
    let size = |length| {
        H2Error::connection(
            ErrorCode::FrameSizeError,
            Reason::BadLength {
                kind: h.kind,
                length,
            },
        )
    };
    let frame = match h.kind {
        kind::DATA => {
            let (data, pad) = unpad(h, payload)?;
            Frame::Data {
                stream_id,
                data,
                end_stream: h.has(flag::END_STREAM),
                pad,
            }
        }
        kind::HEADERS => {
            // The pad length octet comes first, then the priority, then the fragment and the
            // padding: the padding may not eat into the priority.
            let (pad, rest) = match (h.has(flag::PADDED), payload.split_first()) {
                (true, Some((&pad, rest))) => (Some(pad), rest),
                (true, None) => return Err(size(h.length)),
                (false, _) => (None, payload),
            };
            let (priority, rest) = if h.has(flag::PRIORITY) {
                let (p, rest) = rest.split_at_checked(5).ok_or_else(|| size(h.length))?;
                // A HEADERS depending on its own stream is reported after the block is
                // decoded (the HPACK context needs it): see Frame::Headers.
                let priority = read_priority(p).ok_or_else(|| size(h.length))?;
                (Some(priority), rest)
            } else {
                (None, rest)
            };
            let keep = rest
                .len()
                .checked_sub(usize::from(pad.unwrap_or(0)))
                .ok_or_else(|| {
                    H2Error::connection(ErrorCode::ProtocolError, Reason::PaddingTooLong)
                })?;
            Frame::Headers {
                stream_id,
                fragment: rest.get(..keep).unwrap_or_default(),
                end_stream: h.has(flag::END_STREAM),
                end_headers: h.has(flag::END_HEADERS),
                priority,
                pad,
            }
        }
        kind::PRIORITY => {
            if payload.len() != 5 {
                return Err(H2Error::stream(
                    stream_id,
                    ErrorCode::FrameSizeError,
                    Reason::BadLength {
                        kind: h.kind,
                        length: h.length,
                    },
                ));
            }
            let priority = read_priority(payload).ok_or_else(|| size(h.length))?;
            if priority.dependency == stream_id {
                return Err(H2Error::stream(
                    stream_id,
                    ErrorCode::ProtocolError,
                    Reason::SelfDependency,
                ));
            }
            Frame::Priority {
                stream_id,
                priority,
            }
        }
        kind::RST_STREAM => Frame::RstStream {
            stream_id,
            code: ErrorCode::from_u32(be32(payload, 0).ok_or_else(|| size(h.length))?),
        },
        kind::SETTINGS if h.has(flag::ACK) => Frame::SettingsAck,
        kind::SETTINGS => {
            let mut settings = Settings::default();
            for pair in payload.chunks_exact(6) {
                let id = u16::from_be_bytes([
                    pair.first().copied().unwrap_or(0),
                    pair.get(1).copied().unwrap_or(0),
                ]);
                settings.set(id, be32(pair, 2).ok_or_else(|| size(h.length))?)?;
            }
            Frame::Settings(settings)
        }
        kind::PING => Frame::Ping {
            ack: h.has(flag::ACK),
            data: payload.try_into().map_err(|_| size(h.length))?,
        },
        kind::GOAWAY => Frame::GoAway {
            last_stream_id: be32(payload, 0).ok_or_else(|| size(h.length))? & STREAM_ID_MASK,
            code: ErrorCode::from_u32(be32(payload, 4).ok_or_else(|| size(h.length))?),
            debug: payload.get(8..).unwrap_or_default(),
        },
        kind::WINDOW_UPDATE => {
            let increment = be32(payload, 0).ok_or_else(|| size(h.length))? & STREAM_ID_MASK;
            if increment == 0 {
                let (code, reason) = (ErrorCode::ProtocolError, Reason::WindowIncrementZero);
                return Err(if stream_id == 0 {
                    H2Error::connection(code, reason)
                } else {
                    H2Error::stream(stream_id, code, reason)
                });
            }
            Frame::WindowUpdate {
                stream_id,
                increment,
            }
        }
        kind::CONTINUATION => Frame::Continuation {
            stream_id,
            fragment: payload,
            end_headers: h.has(flag::END_HEADERS),
        },
        other => Frame::Unknown {
            kind: other,
            flags: h.flags,
            stream_id,
            payload,
        },
    };
    Ok(frame)
}

/// A cursor over an output slice; every put fails (None) rather than go past the end.
struct Out<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Out<'_> {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.at.checked_add(bytes.len())?;
        self.out.get_mut(self.at..end)?.copy_from_slice(bytes);
        self.at = end;
        Some(())
    }

    fn zeros(&mut self, n: usize) -> Option<()> {
        let end = self.at.checked_add(n)?;
        self.out.get_mut(self.at..end)?.fill(0);
        self.at = end;
        Some(())
    }

    fn header(&mut self, length: usize, kind: u8, flags: u8, stream_id: u32) -> Option<()> {
        let header = FrameHeader {
            length: u32::try_from(length).ok()?,
            kind,
            flags,
            stream_id,
        };
        let end = self.at.checked_add(HEADER_LEN)?;
        header.write(self.out.get_mut(self.at..end)?)?;
        self.at = end;
        Some(())
    }
}

fn flags(pairs: &[(bool, u8)]) -> u8 {
    pairs
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |f, (_, b)| f | b)
}

fn priority_bytes(p: &Priority) -> [u8; 5] {
    let word = (p.dependency & STREAM_ID_MASK) | if p.exclusive { 1 << 31 } else { 0 };
    let [a, b, c, d] = word.to_be_bytes();
    [a, b, c, d, p.weight]
}

/// Writes `frame` at the front of `out` and returns its length, or None if it does not fit
/// (or its payload is over 2^24 - 1 octets). Padding is written as zeros. The caller keeps
/// payloads within the peer's SETTINGS_MAX_FRAME_SIZE; [`write_header_block`] splits a block.
pub fn write_frame(frame: &Frame<'_>, out: &mut [u8]) -> Option<usize> {
    let mut o = Out { out, at: 0 };
    let padded = |pad: Option<u8>| pad.map_or(0, |p| 1 + usize::from(p));
    match *frame {
        Frame::Data {
            stream_id,
            data,
            end_stream,
            pad,
        } => {
            let f = flags(&[
                (end_stream, flag::END_STREAM),
                (pad.is_some(), flag::PADDED),
            ]);
            o.header(data.len() + padded(pad), kind::DATA, f, stream_id)?;
            if let Some(p) = pad {
                o.put(&[p])?;
            }
            o.put(data)?;
            o.zeros(usize::from(pad.unwrap_or(0)))?;
        }
        Frame::Headers {
            stream_id,
            fragment,
            end_stream,
            end_headers,
            priority,
            pad,
        } => {
            let f = flags(&[
                (end_stream, flag::END_STREAM),
                (end_headers, flag::END_HEADERS),
                (pad.is_some(), flag::PADDED),
                (priority.is_some(), flag::PRIORITY),
            ]);
            let p_len = if priority.is_some() { 5 } else { 0 };
            o.header(
                fragment.len() + padded(pad) + p_len,
                kind::HEADERS,
                f,
                stream_id,
            )?;
            if let Some(p) = pad {
                o.put(&[p])?;
            }
            if let Some(p) = priority {
                o.put(&priority_bytes(&p))?;
            }
            o.put(fragment)?;
            o.zeros(usize::from(pad.unwrap_or(0)))?;
        }
        Frame::Priority {
            stream_id,
            priority,
        } => {
            o.header(5, kind::PRIORITY, 0, stream_id)?;
            o.put(&priority_bytes(&priority))?;
        }
        Frame::RstStream { stream_id, code } => {
            o.header(4, kind::RST_STREAM, 0, stream_id)?;
            o.put(&code.to_u32().to_be_bytes())?;
        }
        Frame::Settings(settings) => {
            let pairs = settings.pairs();
            let count = pairs.iter().filter(|(_, v)| v.is_some()).count();
            o.header(6 * count, kind::SETTINGS, 0, 0)?;
            for (id, value) in pairs {
                if let Some(value) = value {
                    o.put(&id.to_be_bytes())?;
                    o.put(&value.to_be_bytes())?;
                }
            }
        }
        Frame::SettingsAck => o.header(0, kind::SETTINGS, flag::ACK, 0)?,
        Frame::Ping { ack, data } => {
            o.header(8, kind::PING, flags(&[(ack, flag::ACK)]), 0)?;
            o.put(&data)?;
        }
        Frame::GoAway {
            last_stream_id,
            code,
            debug,
        } => {
            o.header(8 + debug.len(), kind::GOAWAY, 0, 0)?;
            o.put(&(last_stream_id & STREAM_ID_MASK).to_be_bytes())?;
            o.put(&code.to_u32().to_be_bytes())?;
            o.put(debug)?;
        }
        Frame::WindowUpdate {
            stream_id,
            increment,
        } => {
            o.header(4, kind::WINDOW_UPDATE, 0, stream_id)?;
            o.put(&(increment & STREAM_ID_MASK).to_be_bytes())?;
        }
        Frame::Continuation {
            stream_id,
            fragment,
            end_headers,
        } => {
            let f = flags(&[(end_headers, flag::END_HEADERS)]);
            o.header(fragment.len(), kind::CONTINUATION, f, stream_id)?;
            o.put(fragment)?;
        }
        Frame::Unknown {
            kind,
            flags,
            stream_id,
            payload,
        } => {
            o.header(payload.len(), kind, flags, stream_id)?;
            o.put(payload)?;
        }
    }
    Some(o.at)
}

/// Appends `frame` to `out` (a frame of at most 64 octets of payload: the control frames).
pub fn append_frame(out: &mut Vec<u8>, frame: &Frame<'_>) {
    let start = out.len();
    out.resize(start + HEADER_LEN + 64, 0);
    let n = out
        .get_mut(start..)
        .and_then(|o| write_frame(frame, o))
        .unwrap_or(0);
    out.truncate(start + n);
}

/// Appends a DATA frame of `data` (at most the peer's SETTINGS_MAX_FRAME_SIZE) to `out`.
pub fn append_data(out: &mut Vec<u8>, stream_id: u32, data: &[u8], end_stream: bool) {
    let header = FrameHeader {
        length: u32::try_from(data.len()).unwrap_or(u32::MAX),
        kind: kind::DATA,
        flags: if end_stream { flag::END_STREAM } else { 0 },
        stream_id,
    };
    let mut bytes = [0u8; HEADER_LEN];
    header.write(&mut bytes);
    out.extend_from_slice(&bytes);
    out.extend_from_slice(data);
}

/// Appends a whole header block to `out` as HEADERS and CONTINUATION frames (see
/// [`write_header_block`]).
pub fn append_header_block(
    out: &mut Vec<u8>,
    stream_id: u32,
    block: &[u8],
    end_stream: bool,
    max_frame_size: usize,
) {
    let start = out.len();
    let frames = block.len() / max_frame_size.max(1) + 1;
    out.resize(start + block.len() + frames * HEADER_LEN, 0);
    let max = u32::try_from(max_frame_size).unwrap_or(MAX_MAX_FRAME_SIZE);
    let n = out
        .get_mut(start..)
        .and_then(|o| write_header_block(stream_id, block, end_stream, max, o))
        .unwrap_or(0);
    out.truncate(start + n);
}

/// Writes a whole header block as one HEADERS frame followed by as many CONTINUATION frames
/// as `max_frame_size` (the peer's SETTINGS_MAX_FRAME_SIZE) requires; returns the length
/// written, or None if it does not fit in `out`.
pub fn write_header_block(
    stream_id: u32,
    block: &[u8],
    end_stream: bool,
    max_frame_size: u32,
    out: &mut [u8],
) -> Option<usize> {
    let max =
        usize::try_from(max_frame_size.clamp(DEFAULT_MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE)).ok()?;
    let mut at = 0;
    let mut chunks = block.chunks(max).peekable();
    let first = chunks.next().unwrap_or_default();
    let headers = Frame::Headers {
        stream_id,
        fragment: first,
        end_stream,
        end_headers: chunks.peek().is_none(),
        priority: None,
        pad: None,
    };
    at += write_frame(&headers, out)?;
    while let Some(fragment) = chunks.next() {
        let continuation = Frame::Continuation {
            stream_id,
            fragment,
            end_headers: chunks.peek().is_none(),
        };
        at += write_frame(&continuation, out.get_mut(at..)?)?;
    }
    Some(at)
}
