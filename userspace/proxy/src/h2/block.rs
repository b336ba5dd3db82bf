//! The header-block assembler: joins a HEADERS frame and its CONTINUATION frames into one
//! header block for HPACK (RFC 9113 §4.3, §6.10), and is the connection's guard against
//! the CONTINUATION flood (CVE-2024-27316): the number of CONTINUATION frames per block and
//! the accumulated block size are capped ([`BlockLimits`]), and exceeding either ends the
//! connection with ENHANCE_YOUR_CALM before anything is decoded.
//!
//! Every frame the connection reads goes through [`Assembler::push`]: while a block is open,
//! any frame other than a CONTINUATION on the same stream is a connection PROTOCOL_ERROR, and
//! so is a CONTINUATION when no block is open. A block whole in its HEADERS frame (the usual
//! case) is handed back borrowed from the frame, without a copy; only a block split across
//! frames is copied, into a buffer that never grows past the cap. What a block means (HPACK,
//! `hpack::Decoder`) and what the stream does with it is the connection's business.

use super::error::{ErrorCode, H2Error, Reason};
use super::frame::{Frame, Priority};

/// Default cap on CONTINUATION frames in one header block (nghttp2 also allows 8).
pub const DEFAULT_MAX_CONTINUATIONS: u32 = 8;
/// Default cap on a header block's encoded size: twice the default header list size, so that
/// a list just over its limit is answered with a stream error rather than a GOAWAY.
pub const DEFAULT_MAX_BLOCK_SIZE: usize = 2 * super::fields::DEFAULT_MAX_LIST_SIZE as usize;

/// Capacity of the join buffer kept from one split block to the next: a larger one is freed.
const RETAINED: usize = 4096;

/// Caps on one header block before it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    /// Most CONTINUATION frames after one HEADERS.
    pub max_continuations: u32,
    /// Most octets of encoded header block, all fragments together.
    pub max_block_size: usize,
}

impl Default for BlockLimits {
    fn default() -> Self {
        BlockLimits {
            max_continuations: DEFAULT_MAX_CONTINUATIONS,
            max_block_size: DEFAULT_MAX_BLOCK_SIZE,
        }
    }
}

/// A whole header block, ready for HPACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderBlock<'a> {
    /// The stream it opens or continues.
    pub stream_id: u32,
    /// END_STREAM was set on the HEADERS frame.
    pub end_stream: bool,
    /// The priority the HEADERS frame carried.
    pub priority: Option<Priority>,
    /// The encoded block, all fragments joined.
    pub block: &'a [u8],
}

impl HeaderBlock<'_> {
    /// A HEADERS frame whose priority names its own stream is a stream error (RFC 9113
    /// §5.3.1); report it after decoding the block, which the HPACK context needs.
    pub fn check_priority(&self) -> Result<(), H2Error> {
        match self.priority {
            Some(p) if p.dependency == self.stream_id => Err(H2Error::stream(
                self.stream_id,
                ErrorCode::ProtocolError,
                Reason::SelfDependency,
            )),
            _ => Ok(()),
        }
    }
}

/// The open block, between a HEADERS without END_HEADERS and the CONTINUATION that ends it.
#[derive(Debug, Clone, Copy)]
struct Open {
    stream_id: u32,
    end_stream: bool,
    priority: Option<Priority>,
    continuations: u32,
}

/// Joins HEADERS and CONTINUATION frames; one per connection and direction.
#[derive(Debug, Default)]
pub struct Assembler {
    limits: BlockLimits,
    open: Option<Open>,
    buf: Vec<u8>,
}

impl Assembler {
    /// An assembler with these caps.
    pub fn new(limits: BlockLimits) -> Assembler {
        Assembler {
            limits,
            open: None,
            buf: Vec::new(),
        }
    }

    /// The stream whose block is open (awaiting CONTINUATION), if any.
    pub fn open_stream(&self) -> Option<u32> {
        self.open.map(|o| o.stream_id)
    }

    fn append(&mut self, fragment: &[u8]) -> Result<(), H2Error> {
        let max = self.limits.max_block_size;
        if self.buf.len().saturating_add(fragment.len()) > max {
            return Err(H2Error::connection(
                ErrorCode::EnhanceYourCalm,
                Reason::HeaderBlockTooLarge { max },
            ));
        }
        self.buf.extend_from_slice(fragment);
        Ok(())
    }

    /// Takes a frame that `frame::parse` answered with `Parsed::StreamError` (a PRIORITY or
    /// WINDOW_UPDATE, never a CONTINUATION): fine between blocks, a connection PROTOCOL_ERROR
    /// inside one.
    pub fn skipped(&mut self, kind: u8, stream_id: u32) -> Result<(), H2Error> {
        match self.open.take() {
            None => Ok(()),
            Some(_) => Err(H2Error::connection(
                ErrorCode::ProtocolError,
                Reason::ContinuationExpected { kind, stream_id },
            )),
        }
    }

    /// Takes the next frame the connection read. Returns the header block it completes, or
    /// None: for a fragment of a block still open, and for every frame that is not HEADERS or
    /// CONTINUATION (which the connection then handles itself). `Err` is a connection error.
    pub fn push<'a>(&'a mut self, frame: &Frame<'a>) -> Result<Option<HeaderBlock<'a>>, H2Error> {
        let proto = |reason| Err(H2Error::connection(ErrorCode::ProtocolError, reason));
        match (self.open, *frame) {
            (
                Some(open),
                Frame::Continuation {
                    stream_id,
                    fragment,
                    end_headers,
                },
            ) if stream_id == open.stream_id => {
                let continuations = open.continuations.saturating_add(1);
                let max = self.limits.max_continuations;
                if continuations > max {
                    self.open = None;
                    return Err(H2Error::connection(
                        ErrorCode::EnhanceYourCalm,
                        Reason::TooManyContinuations { max },
                    ));
                }
                if let Err(e) = self.append(fragment) {
                    self.open = None;
                    return Err(e);
                }
                if !end_headers {
                    self.open = Some(Open {
                        continuations,
                        ..open
                    });
                    return Ok(None);
                }
                self.open = None;
                Ok(Some(HeaderBlock {
                    stream_id,
                    end_stream: open.end_stream,
                    priority: open.priority,
                    block: &self.buf,
                }))
            }
            (Some(_), other) => {
                self.open = None;
                proto(Reason::ContinuationExpected {
                    kind: other.kind(),
                    stream_id: other.stream_id(),
                })
            }
            (None, Frame::Continuation { .. }) => proto(Reason::UnexpectedContinuation),
            (
                None,
                Frame::Headers {
                    stream_id,
                    fragment,
                    end_stream,
                    end_headers,
                    priority,
                    ..
                },
            ) => {
                if self.buf.capacity() > RETAINED {
                    self.buf = Vec::new();
                } else {
                    self.buf.clear();
                }
                if end_headers {
                    let max = self.limits.max_block_size;
                    if fragment.len() > max {
                        return Err(H2Error::connection(
                            ErrorCode::EnhanceYourCalm,
                            Reason::HeaderBlockTooLarge { max },
                        ));
                    }
                    return Ok(Some(HeaderBlock {
                        stream_id,
                        end_stream,
                        priority,
                        block: fragment,
                    }));
                }
                self.append(fragment)?;
                self.open = Some(Open {
                    stream_id,
                    end_stream,
                    priority,
                    continuations: 0,
                });
                Ok(None)
            }
            (None, _) => Ok(None),
        }
    }
}
