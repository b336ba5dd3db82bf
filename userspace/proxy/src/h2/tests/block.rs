//! The header-block assembler: blocks whole in one HEADERS or split over CONTINUATION frames,
//! the CONTINUATION flood caps (CVE-2024-27316), and frames out of sequence.

use crate::h2::block::{Assembler, BlockLimits, HeaderBlock};
use crate::h2::frame::{Frame, Priority};
use crate::h2::{ErrorCode, Reason, Scope};

fn headers(stream_id: u32, fragment: &[u8], end_headers: bool) -> Frame<'_> {
    Frame::Headers {
        stream_id,
        fragment,
        end_stream: true,
        end_headers,
        priority: None,
        pad: None,
    }
}

fn continuation(stream_id: u32, fragment: &[u8], end_headers: bool) -> Frame<'_> {
    Frame::Continuation {
        stream_id,
        fragment,
        end_headers,
    }
}

const PING: Frame<'static> = Frame::Ping {
    ack: false,
    data: [0; 8],
};

#[test]
fn whole_and_split_blocks() {
    let mut a = Assembler::new(BlockLimits::default());
    // Other frames pass through.
    assert_eq!(a.push(&PING), Ok(None));
    let f = headers(1, &[0x82, 0x84], true);
    assert_eq!(
        a.push(&f),
        Ok(Some(HeaderBlock {
            stream_id: 1,
            end_stream: true,
            priority: None,
            block: &[0x82, 0x84],
        }))
    );
    assert_eq!(a.push(&headers(3, &[0x82], false)), Ok(None));
    assert_eq!(a.open_stream(), Some(3));
    assert_eq!(a.push(&continuation(3, &[], false)), Ok(None));
    assert_eq!(a.push(&continuation(3, &[0x86], false)), Ok(None));
    let block = a.push(&continuation(3, &[0x84], true)).unwrap().unwrap();
    assert_eq!((block.stream_id, block.end_stream), (3, true));
    assert_eq!(block.block, [0x82, 0x86, 0x84]);
    assert_eq!(a.open_stream(), None);
    // The next block starts empty.
    assert_eq!(a.push(&headers(5, &[0x87], false)), Ok(None));
    let block = a.push(&continuation(5, &[0x85], true)).unwrap().unwrap();
    assert_eq!(block.block, [0x87, 0x85]);
}

#[test]
fn frames_out_of_sequence() {
    let mut a = Assembler::default();
    let e = a.push(&continuation(1, &[0x82], true)).unwrap_err();
    assert_eq!(
        (e.scope, e.code, e.reason),
        (
            Scope::Connection,
            ErrorCode::ProtocolError,
            Reason::UnexpectedContinuation
        )
    );
    for other in [
        PING,
        continuation(3, &[], true),
        headers(1, &[], true),
        Frame::Data {
            stream_id: 1,
            data: b"",
            end_stream: false,
            pad: None,
        },
        Frame::Unknown {
            kind: 0xee,
            flags: 0,
            stream_id: 1,
            payload: b"",
        },
    ] {
        let mut a = Assembler::default();
        assert_eq!(a.push(&headers(1, &[0x82], false)), Ok(None));
        let e = a.push(&other).unwrap_err();
        assert_eq!(
            (e.scope, e.code, e.reason),
            (
                Scope::Connection,
                ErrorCode::ProtocolError,
                Reason::ContinuationExpected {
                    kind: other.kind(),
                    stream_id: other.stream_id()
                }
            ),
            "{other:?}"
        );
    }
}

#[test]
fn continuation_flood_is_capped() {
    let limits = BlockLimits {
        max_continuations: 3,
        max_block_size: 100,
    };
    // Empty CONTINUATION frames forever: the fourth ends the connection.
    let mut a = Assembler::new(limits);
    a.push(&headers(1, &[0x82], false)).unwrap();
    for _ in 0..3 {
        assert_eq!(a.push(&continuation(1, &[], false)), Ok(None));
    }
    let e = a.push(&continuation(1, &[], false)).unwrap_err();
    assert_eq!(
        (e.scope, e.code, e.reason),
        (
            Scope::Connection,
            ErrorCode::EnhanceYourCalm,
            Reason::TooManyContinuations { max: 3 }
        )
    );
    // The accumulated size: 60 + 40 fits, one more octet does not.
    let mut a = Assembler::new(limits);
    a.push(&headers(1, &[0; 60], false)).unwrap();
    a.push(&continuation(1, &[0; 40], false)).unwrap();
    let e = a.push(&continuation(1, &[0], true)).unwrap_err();
    assert_eq!(
        (e.code, e.reason),
        (
            ErrorCode::EnhanceYourCalm,
            Reason::HeaderBlockTooLarge { max: 100 }
        )
    );
    // A whole block in one HEADERS is held to the same size.
    let mut a = Assembler::new(limits);
    assert!(a.push(&headers(1, &[0; 101], true)).is_err());
    assert!(a.push(&headers(1, &[0; 100], true)).unwrap().is_some());
}

#[test]
fn self_dependency_is_reported_after_the_block() {
    let mut a = Assembler::default();
    let f = Frame::Headers {
        stream_id: 3,
        fragment: &[0x82],
        end_stream: false,
        end_headers: true,
        priority: Some(Priority {
            exclusive: false,
            dependency: 3,
            weight: 0,
        }),
        pad: None,
    };
    let block = a.push(&f).unwrap().unwrap();
    let e = block.check_priority().unwrap_err();
    assert_eq!(
        (e.scope, e.code, e.reason),
        (
            Scope::Stream(3),
            ErrorCode::ProtocolError,
            Reason::SelfDependency
        )
    );
    let ok = headers(5, &[0x82], true);
    assert_eq!(a.push(&ok).unwrap().unwrap().check_priority(), Ok(()));
}

#[test]
fn a_stream_error_frame_inside_a_block() {
    let mut a = Assembler::default();
    assert_eq!(a.skipped(2, 1), Ok(()));
    a.push(&headers(1, &[0x82], false)).unwrap();
    let e = a.skipped(8, 1).unwrap_err();
    assert_eq!(
        (e.scope, e.reason),
        (
            Scope::Connection,
            Reason::ContinuationExpected {
                kind: 8,
                stream_id: 1
            }
        )
    );
}
