//! The one frame codec of kakehi's three byte streams: lbctl ↔ lbd (the command protocol, the
//! parent module), lbd main ↔ its workers ([`super::channel`]), and the running lbd → the next
//! one in an upgrade (lbd's `handoff.rs`). A frame is a 4-byte big-endian length, then that
//! many bytes, its body; what a body holds (a version byte and JSON, or JSON alone) is each
//! protocol's business, and so is its limit, which the codec enforces on both ends: a length
//! over it is refused before a byte of the body is buffered.
//!
//! Sans-io: [`encode`] makes a frame, [`cut`] finds the first whole frame of a buffer, and
//! [`Frames`] holds the bytes of one stream and gives its frames one by one, never buffering
//! more than one frame beyond what it was fed. Reading and writing sockets (and their
//! deadlines) are left to lbctl, lbd and the worker.

/// Bytes before a frame's body: its length, u32 big-endian.
pub const LENGTH_BYTES: usize = 4;

/// A length over the stream's limit: nothing after it can be read, the stream is out of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes refused: the limit is {max} bytes")]
pub struct TooLarge {
    /// The length announced (or, when encoding, the body's length).
    pub len: u64,
    /// The stream's limit.
    pub max: usize,
}

/// The body length a frame's prefix announces, if it is within `max`.
pub fn body_len(prefix: [u8; LENGTH_BYTES], max: usize) -> Result<usize, TooLarge> {
    let len = u32::from_be_bytes(prefix);
    let too_large = TooLarge {
        len: u64::from(len),
        max,
    };
    let len = usize::try_from(len).map_err(|_| too_large)?;
    if len > max {
        return Err(too_large);
    }
    Ok(len)
}

/// The frame whose body is `parts`, one after the other (a version byte and a JSON message,
/// say), if the body is within `max`.
pub fn encode(parts: &[&[u8]], max: usize) -> Result<Vec<u8>, TooLarge> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let too_large = TooLarge {
        len: len as u64,
        max,
    };
    if len > max {
        return Err(too_large);
    }
    let prefix = u32::try_from(len).map_err(|_| too_large)?;
    let mut out = Vec::with_capacity(LENGTH_BYTES + len);
    out.extend_from_slice(&prefix.to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// The first whole frame of `input`: its body and how many bytes it takes (prefix included),
/// or None while it is not all there.
pub fn cut(input: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, TooLarge> {
    let Some(prefix) = input.first_chunk::<LENGTH_BYTES>() else {
        return Ok(None);
    };
    let len = body_len(*prefix, max)?;
    let end = LENGTH_BYTES + len;
    Ok(input.get(LENGTH_BYTES..end).map(|body| (body, end)))
}

/// The frames of one byte stream, as its bytes arrive.
///
/// [`push`](Frames::push) appends bytes; [`pop`](Frames::pop) gives the first whole frame's
/// body, if any. A length over the limit is refused once, with [`TooLarge`], and for good: the
/// buffer is dropped and every later call returns [`FramesError::Broken`], since the next frame's start
/// is unknown.
#[derive(Debug)]
pub struct Frames {
    buffer: Vec<u8>,
    max: usize,
    broken: bool,
}

/// What [`Frames::pop`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramesError {
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// An earlier frame was refused: the stream is out of step.
    #[error("the stream is unusable after an earlier refused frame")]
    Broken,
}

impl Frames {
    /// A stream whose frames' bodies hold at most `max` bytes.
    pub fn new(max: usize) -> Frames {
        Frames {
            buffer: Vec::new(),
            max,
            broken: false,
        }
    }

    /// Appends bytes read from the stream (ignored once broken).
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.broken {
            self.buffer.extend_from_slice(bytes);
        }
    }

    /// The body of the first whole frame among the bytes pushed, if any.
    pub fn pop(&mut self) -> Result<Option<Vec<u8>>, FramesError> {
        if self.broken {
            return Err(FramesError::Broken);
        }
        let end = match cut(&self.buffer, self.max) {
            Ok(Some((_, end))) => end,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.broken = true;
                self.buffer = Vec::new();
                return Err(e.into());
            }
        };
        Ok(Some(self.buffer.drain(..end).skip(LENGTH_BYTES).collect()))
    }

    /// Bytes received and not yet part of a whole frame.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Whether a length over the limit was refused.
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_at_their_length_however_the_bytes_arrive() {
        let mut wire = encode(&[b"\x01", b"health"], 16).unwrap();
        assert_eq!(wire[..4], 7u32.to_be_bytes());
        wire.extend(encode(&[b"a=1"], 16).unwrap());
        assert_eq!(cut(&wire, 16), Ok(Some((&b"\x01health"[..], 11))));
        assert_eq!(cut(&wire[11..], 16), Ok(Some((&b"a=1"[..], 7))));
        for at in 0..11 {
            assert_eq!(cut(&wire[..at], 16), Ok(None), "cut at {at}");
        }
        assert_eq!(cut(&0u32.to_be_bytes(), 0), Ok(Some((&b""[..], 4))));

        let mut frames = Frames::new(16);
        for b in &wire {
            frames.push(&[*b]);
            if let Some(body) = frames.pop().unwrap() {
                assert!(body == b"\x01health" || body == b"a=1", "{body:?}");
            }
        }
        assert_eq!(frames.buffered(), 0);
    }

    #[test]
    fn a_length_over_the_limit_is_refused_at_once_and_for_good() {
        assert_eq!(
            body_len(17u32.to_be_bytes(), 16),
            Err(TooLarge { len: 17, max: 16 })
        );
        assert_eq!(body_len(16u32.to_be_bytes(), 16), Ok(16));
        let e = encode(&[&[0u8; 10], &[0u8; 7]], 16).unwrap_err();
        assert_eq!(e, TooLarge { len: 17, max: 16 });
        assert_eq!(
            e.to_string(),
            "frame of 17 bytes refused: the limit is 16 bytes"
        );

        let mut frames = Frames::new(16);
        frames.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            frames.pop(),
            Err(FramesError::TooLarge(TooLarge {
                len: u64::from(u32::MAX),
                max: 16
            }))
        );
        assert!(frames.is_broken());
        assert_eq!(frames.buffered(), 0, "nothing of it is kept");
        frames.push(&encode(&[b"ok"], 16).unwrap());
        assert_eq!(frames.pop(), Err(FramesError::Broken));
        assert_eq!(frames.buffered(), 0);
    }
}
