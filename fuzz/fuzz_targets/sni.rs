//! Arbitrary bytes through `lb_proxy::sni::parse`, as a TCP passthrough listener that routes by
//! SNI reads them from a client before it picks a backend.
//!
//! Checks: no panic; `Incomplete { at_least }` always asks for more than it was given; a name
//! it returns is a plausible DNS name that appears in the input; the answer is stable under
//! cuts (every prefix is either `Incomplete` or the final answer, once a prefix gets an
//! answer every longer one gets the same one, and a hello is never found in fewer bytes than an
//! earlier `Incomplete` asked for, so the session may parse again whenever bytes arrive); and where rustls (an independent ClientHello parser) also reads a server name from
//! the same bytes, it is the same name.
#![no_main]

use lb_proxy::sni::{parse, Hello};
use libfuzzer_sys::fuzz_target;

/// Longest input checked at every cut (the check costs O(n²)); longer inputs are cut at
/// every 7th byte.
const EVERY_CUT: usize = 2048;

fn check_name(data: &[u8], name: &str) {
    assert!(
        !name.is_empty() && name.len() <= 255,
        "name length {}",
        name.len()
    );
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
        "implausible name {name:?}"
    );
    assert!(
        data.windows(name.len()).any(|w| w == name.as_bytes()),
        "name {name:?} is not in the input"
    );
}

/// The server name rustls reads from `data`, if rustls takes it as a ClientHello.
fn rustls_name(data: &[u8]) -> Option<Option<String>> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = data;
    while !reader.is_empty() {
        match acceptor.read_tls(&mut reader) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(accepted.client_hello().server_name().map(str::to_owned)),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    match &whole {
        Ok(Hello::Incomplete { at_least }) => assert!(*at_least > data.len(), "{whole:?}"),
        Ok(Hello::Complete(Some(name))) => check_name(data, name),
        Ok(Hello::Complete(None)) | Err(_) => {}
    }

    // Stable under cuts.
    let step = if data.len() <= EVERY_CUT { 1 } else { 7 };
    let mut answered: Option<usize> = None;
    let mut waiting_until = 0usize;
    for cut in (0..data.len()).step_by(step) {
        let part = parse(&data[..cut]);
        match part {
            Ok(Hello::Incomplete { at_least }) => {
                assert!(at_least > cut, "cut {cut}: {part:?}");
                assert!(
                    answered.is_none(),
                    "cut {cut}: incomplete after an answer at {answered:?}"
                );
                waiting_until = waiting_until.max(at_least);
            }
            _ => {
                // A refusal may come before the length asked for (a bad first byte of the
                // next record header is seen at once), a hello never does.
                assert!(
                    cut >= waiting_until || part.is_err(),
                    "cut {cut}: a hello before the {waiting_until} bytes it asked for"
                );
                assert_eq!(
                    part, whole,
                    "cut {cut} answers otherwise than the whole input"
                );
                answered.get_or_insert(cut);
            }
        }
    }
    if let Ok(Hello::Incomplete { .. }) = whole {
        assert!(
            answered.is_none(),
            "a prefix answered, the whole input did not"
        );
    }

    // Differential: the same name as rustls where both read one.
    if let (Ok(Hello::Complete(Some(ours))), Some(Some(theirs))) = (&whole, rustls_name(data)) {
        let norm = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
        assert_eq!(
            norm(ours),
            norm(&theirs),
            "rustls reads another server name"
        );
    }
});
