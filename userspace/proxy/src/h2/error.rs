//! The errors of the HTTP/2 layer: the error codes of RFC 9113 §7 as they travel in
//! RST_STREAM and GOAWAY ([`ErrorCode`]), and [`H2Error`], which says what the connection must
//! do about a peer's bytes: end the connection with GOAWAY ([`Scope::Connection`]) or reset
//! one stream ([`Scope::Stream`]), with which code, and why ([`Reason`], one enum for the
//! frame codec, the header-block assembler and HPACK, so that a log line and a metric label
//! come from the same value). Deciding what to send is the connection's job, not this file's.

use std::fmt;

/// An HTTP/2 error code (RFC 9113 §7). Codes this implementation does not know are kept as
/// [`ErrorCode::Unknown`]: RFC 9113 §7 says they must not trigger any special behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 0x0: graceful shutdown, not an error.
    NoError,
    /// 0x1: a protocol error not covered by a more specific code.
    ProtocolError,
    /// 0x2: an unexpected internal error.
    InternalError,
    /// 0x3: the peer broke the flow-control protocol.
    FlowControlError,
    /// 0x4: a SETTINGS frame was not acknowledged in time.
    SettingsTimeout,
    /// 0x5: a frame arrived after the stream was half-closed.
    StreamClosed,
    /// 0x6: a frame of an invalid size.
    FrameSizeError,
    /// 0x7: the stream was refused before any processing (safe to retry).
    RefusedStream,
    /// 0x8: the stream is no longer needed.
    Cancel,
    /// 0x9: the HPACK compression context cannot be kept.
    CompressionError,
    /// 0xa: the connection of a CONNECT request was reset or abnormally closed.
    ConnectError,
    /// 0xb: the peer behaves in a way that may generate excessive load.
    EnhanceYourCalm,
    /// 0xc: the transport does not meet minimum security requirements.
    InadequateSecurity,
    /// 0xd: HTTP/1.1 is required for this request.
    Http11Required,
    /// Any other value (0xe and above).
    Unknown(u32),
}

impl ErrorCode {
    /// The code carried on the wire as `value`.
    pub fn from_u32(value: u32) -> ErrorCode {
        match value {
            0x0 => ErrorCode::NoError,
            0x1 => ErrorCode::ProtocolError,
            0x2 => ErrorCode::InternalError,
            0x3 => ErrorCode::FlowControlError,
            0x4 => ErrorCode::SettingsTimeout,
            0x5 => ErrorCode::StreamClosed,
            0x6 => ErrorCode::FrameSizeError,
            0x7 => ErrorCode::RefusedStream,
            0x8 => ErrorCode::Cancel,
            0x9 => ErrorCode::CompressionError,
            0xa => ErrorCode::ConnectError,
            0xb => ErrorCode::EnhanceYourCalm,
            0xc => ErrorCode::InadequateSecurity,
            0xd => ErrorCode::Http11Required,
            other => ErrorCode::Unknown(other),
        }
    }

    /// The value written on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            ErrorCode::NoError => 0x0,
            ErrorCode::ProtocolError => 0x1,
            ErrorCode::InternalError => 0x2,
            ErrorCode::FlowControlError => 0x3,
            ErrorCode::SettingsTimeout => 0x4,
            ErrorCode::StreamClosed => 0x5,
            ErrorCode::FrameSizeError => 0x6,
            ErrorCode::RefusedStream => 0x7,
            ErrorCode::Cancel => 0x8,
            ErrorCode::CompressionError => 0x9,
            ErrorCode::ConnectError => 0xa,
            ErrorCode::EnhanceYourCalm => 0xb,
            ErrorCode::InadequateSecurity => 0xc,
            ErrorCode::Http11Required => 0xd,
            ErrorCode::Unknown(value) => value,
        }
    }
}

/// What an error ends: the whole connection (GOAWAY) or one stream (RST_STREAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A connection error (RFC 9113 §5.4.1): send GOAWAY with the code, then close.
    Connection,
    /// A stream error (RFC 9113 §5.4.2) on this stream: send RST_STREAM with the code.
    Stream(u32),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Connection => f.write_str("connection"),
            Scope::Stream(id) => write!(f, "stream {id}"),
        }
    }
}

/// An error found in a peer's bytes: its scope, the code to send, and the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{scope} error {code:?}: {reason}")]
pub struct H2Error {
    /// What the error ends.
    pub scope: Scope,
    /// The code to send in GOAWAY or RST_STREAM.
    pub code: ErrorCode,
    /// Why, for the log line and the metric label.
    pub reason: Reason,
}

impl H2Error {
    /// A connection error.
    pub fn connection(code: ErrorCode, reason: Reason) -> H2Error {
        H2Error {
            scope: Scope::Connection,
            code,
            reason,
        }
    }

    /// A stream error on `stream_id`.
    pub fn stream(stream_id: u32, code: ErrorCode, reason: Reason) -> H2Error {
        H2Error {
            scope: Scope::Stream(stream_id),
            code,
            reason,
        }
    }

    /// Whether the whole connection must end.
    pub fn is_connection(&self) -> bool {
        self.scope == Scope::Connection
    }
}

/// Why a peer's bytes were refused. Frame types are named by their type octet (RFC 9113 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// The first 24 octets of a client connection are not the preface (RFC 9113 §3.4).
    #[error("not the HTTP/2 client connection preface")]
    BadPreface,
    /// A frame's length is over the SETTINGS_MAX_FRAME_SIZE we advertised (§4.2).
    #[error("frame of {length} octets over the maximum frame size")]
    FrameTooLarge {
        /// The length the frame header announced.
        length: u32,
    },
    /// A frame's length does not fit its type (§6: RST_STREAM 4, PING 8, ...).
    #[error("frame of type {kind:#x} with a payload of {length} octets")]
    BadLength {
        /// The frame type.
        kind: u8,
        /// The payload length.
        length: u32,
    },
    /// A stream frame (DATA, HEADERS, PRIORITY, RST_STREAM, CONTINUATION) on stream 0.
    #[error("frame of type {kind:#x} on stream 0")]
    StreamIdZero {
        /// The frame type.
        kind: u8,
    },
    /// A connection frame (SETTINGS, PING, GOAWAY) on a stream.
    #[error("frame of type {kind:#x} on stream {stream_id}")]
    StreamIdNonZero {
        /// The frame type.
        kind: u8,
        /// The stream it named.
        stream_id: u32,
    },
    /// The pad length of DATA or HEADERS is at least what is left of the payload (§6.1, §6.2).
    #[error("padding longer than the payload")]
    PaddingTooLong,
    /// A SETTINGS parameter outside its range (§6.5.2).
    #[error("setting {id:#x} = {value} out of range")]
    BadSetting {
        /// The parameter identifier.
        id: u16,
        /// Its value.
        value: u32,
    },
    /// A WINDOW_UPDATE with an increment of 0 (§6.9).
    #[error("window increment of 0")]
    WindowIncrementZero,
    /// A PUSH_PROMISE: kakehi never enables push, in either role (§6.6, §8.4).
    #[error("PUSH_PROMISE received")]
    PushPromise,
    /// A stream that depends on itself (§5.3.1).
    #[error("stream depends on itself")]
    SelfDependency,
    /// A frame other than CONTINUATION on the same stream inside a header block (§6.10).
    #[error("frame of type {kind:#x} on stream {stream_id} inside a header block")]
    ContinuationExpected {
        /// The frame type received.
        kind: u8,
        /// The stream it was on.
        stream_id: u32,
    },
    /// A CONTINUATION outside a header block (§6.10).
    #[error("CONTINUATION outside a header block")]
    UnexpectedContinuation,
    /// More CONTINUATION frames in one header block than allowed (CVE-2024-27316).
    #[error("more than {max} CONTINUATION frames in one header block")]
    TooManyContinuations {
        /// The cap.
        max: u32,
    },
    /// A header block larger than allowed before it is even decoded (CVE-2024-27316).
    #[error("header block over {max} octets")]
    HeaderBlockTooLarge {
        /// The cap.
        max: usize,
    },
    /// The header block cannot be decoded (RFC 7541); the HPACK context is lost.
    #[error("HPACK: {0}")]
    Hpack(HpackFault),
    /// The decoded header list is over SETTINGS_MAX_HEADER_LIST_SIZE (§6.5.2 counting).
    #[error("header list over {max} octets")]
    HeaderListTooLarge {
        /// The cap.
        max: u32,
    },
    /// The decoded header list has more fields than allowed.
    #[error("more than {max} header fields")]
    TooManyFields {
        /// The cap.
        max: usize,
    },
    /// The request is malformed (RFC 9113 §8.1.1, §8.2, §8.3).
    #[error("malformed: {0}")]
    Malformed(Malformed),
}

/// Why a header block cannot be decoded (RFC 7541): a COMPRESSION_ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackFault {
    /// The block ends inside a representation.
    #[error("truncated representation")]
    Truncated,
    /// An integer over 2^32 - 1 or encoded with too many octets.
    #[error("integer too large")]
    IntegerOverflow,
    /// An index of 0 or beyond the static and dynamic tables.
    #[error("index {0} out of the tables")]
    BadIndex(u32),
    /// A Huffman string containing EOS, padded with more than 7 bits or with bits not all 1.
    #[error("bad Huffman string")]
    BadHuffman,
    /// A dynamic table size update over the size we allow.
    #[error("table size update to {0} over our limit")]
    TableSizeOverLimit(u32),
    /// A dynamic table size update after a field, or more than two of them (RFC 7541 §4.2).
    #[error("table size update not at the start of the block")]
    MisplacedSizeUpdate,
}

/// Why a decoded request head is malformed (RFC 9113 §8.2, §8.3): a stream PROTOCOL_ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// A field name with an upper-case letter (§8.2).
    #[error("upper-case field name")]
    UpperCaseName,
    /// A field name that is empty or has a character outside `tchar` (RFC 9110 §5.1).
    #[error("invalid field name")]
    BadName,
    /// A field value with NUL, CR or LF, or with leading or trailing white space (§8.2.1).
    #[error("invalid field value")]
    BadValue,
    /// A connection-specific field: connection, keep-alive, proxy-connection,
    /// transfer-encoding, upgrade (§8.2.2).
    #[error("connection-specific field")]
    ConnectionSpecific,
    /// `te` with a value other than `trailers` (§8.2.2).
    #[error("te other than trailers")]
    BadTe,
    /// A pseudo-header other than :method, :scheme, :authority, :path (:protocol included:
    /// kakehi does not enable extended CONNECT).
    #[error("unknown pseudo-header")]
    UnknownPseudo,
    /// A pseudo-header after a regular field (§8.3).
    #[error("pseudo-header after a regular field")]
    PseudoAfterRegular,
    /// A pseudo-header twice (§8.3.1).
    #[error("repeated pseudo-header")]
    DuplicatePseudo,
    /// A pseudo-header in trailers (§8.1).
    #[error("pseudo-header in trailers")]
    PseudoInTrailers,
    /// A request without :method, :scheme or :path (§8.3.1).
    #[error("missing pseudo-header")]
    MissingPseudo,
    /// An empty :path for an http or https request (§8.3.1).
    #[error("empty :path")]
    EmptyPath,
    /// A CONNECT request with :scheme or :path, or without :authority (§8.5).
    #[error("CONNECT with :scheme or :path, or without :authority")]
    BadConnect,
    /// An :authority with userinfo (`user@host`) for http or https (§8.3.1).
    #[error(":authority with userinfo")]
    AuthorityUserinfo,
    /// A :method that is not a token (RFC 9110 §9.1).
    #[error("invalid :method")]
    BadMethod,
    /// A :path with white space or control characters: it could not be written into an
    /// HTTP/1.1 request line.
    #[error("invalid :path")]
    BadPath,
    /// An :authority with white space or control characters.
    #[error("invalid :authority")]
    BadAuthority,
    /// A `host` field naming another authority than :authority (§8.3.1).
    #[error("host differs from :authority")]
    HostMismatch,
}
