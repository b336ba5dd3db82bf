//! Arbitrary bytes through the command protocol's decoder (`lb_config::protocol::Decoder`), as
//! lbd reads them from an lbctl connection (requests) and lbctl from lbd (responses).
//!
//! Input: the first byte is the read size (1 to 255; 0 means 1), the rest is the stream, fed in
//! pieces of that size. Checks: no panic; a fatal error leaves the decoder refusing everything;
//! no more than one frame is ever buffered; every decoded request encodes again and decodes to
//! the same request.
#![no_main]

use lb_config::protocol::{encode, Decoder, ProtocolError, Request, Response, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

/// Feeds `bytes` in pieces of `chunk` to a `Decoder<$message>`, calling `$check` on each message.
macro_rules! drive {
    ($message:ty, $bytes:expr, $chunk:expr, $check:expr) => {{
        let mut decoder = Decoder::<$message>::new();
        'stream: for piece in $bytes.chunks($chunk) {
            let mut next = decoder.feed(piece);
            loop {
                match next {
                    Ok(None) => break,
                    Ok(Some(message)) => $check(message),
                    Err(e) if e.is_fatal() => {
                        assert_eq!(decoder.feed(b"more"), Err(ProtocolError::Failed));
                        break 'stream;
                    }
                    Err(_) => {}
                }
                next = decoder.poll();
            }
            assert!(decoder.buffered() < 4 + MAX_FRAME, "more than a frame buffered");
        }
        let _ = decoder.finish();
    }};
}

fn request_round_trips(request: Request) {
    // Re-encoding may legitimately grow past the limit (escapes written differently).
    if let Ok(frame) = encode(&request) {
        let again = Decoder::<Request>::new().feed(&frame);
        assert_eq!(again, Ok(Some(request)), "a decoded request does not round-trip");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    drive!(Request, bytes, chunk, request_round_trips);
    drive!(Response, bytes, chunk, |response: Response| {
        let _ = encode(&response);
    });
});
