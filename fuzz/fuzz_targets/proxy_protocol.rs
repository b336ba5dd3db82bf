//! Arbitrary bytes through `lb_proxy::proxy_protocol::parse` (v1 line or v2 header), as a
//! listener with `accept_proxy = true` reads them before the client's first byte.
//!
//! Checks: no panic; `Incomplete { at_least }` asks for more than it was given; a complete
//! header's length is within the input (v1: ends with CRLF and at most 107 bytes); the answer
//! is stable under cuts (every prefix shorter than the header is `Incomplete`, the header
//! alone gives the same answer as the header plus payload); and a v2 PROXY header re-encoded by
//! `encode_v2` from the addresses read parses back to the same addresses.
#![no_main]

use lb_proxy::proxy_protocol::{encode_v2, parse, Addresses, Parsed, MAX_V1_LEN, SIGNATURE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    let Ok(parsed) = whole else {
        return;
    };
    match parsed {
        Parsed::Incomplete { at_least } => {
            assert!(at_least > data.len(), "{parsed:?} for {} bytes", data.len());
        }
        Parsed::Complete { addresses, len } => {
            assert!(len <= data.len(), "{parsed:?} for {} bytes", data.len());
            let header = &data[..len];
            if header.starts_with(b"PROXY ") {
                assert!(
                    len <= MAX_V1_LEN && header.ends_with(b"\r\n"),
                    "v1 line {header:?}"
                );
            } else {
                assert!(
                    header.starts_with(&SIGNATURE) && len >= 16,
                    "v2 header {header:?}"
                );
            }
            // The header alone says the same; every shorter prefix waits for more.
            assert_eq!(
                parse(header),
                whole,
                "the payload changed the header's meaning"
            );
            for cut in 0..len {
                match parse(&data[..cut]) {
                    Ok(Parsed::Incomplete { at_least }) => {
                        assert!(
                            at_least > cut && at_least <= len,
                            "cut {cut}: at_least {at_least}"
                        )
                    }
                    other => panic!("cut {cut} of a {len}-byte header: {other:?}"),
                }
            }
            if let Addresses::Proxy {
                source,
                destination,
            } = addresses
            {
                let again = encode_v2(source, destination);
                match parse(again.as_bytes()) {
                    Ok(Parsed::Complete {
                        addresses:
                            Addresses::Proxy {
                                source: s,
                                destination: d,
                            },
                        ..
                    }) => {
                        let v6 = |a: std::net::SocketAddr| match a.ip() {
                            std::net::IpAddr::V4(v4) => {
                                std::net::SocketAddr::new(v4.to_ipv6_mapped().into(), a.port())
                            }
                            std::net::IpAddr::V6(_) => a,
                        };
                        // Mixed families are written as IPv6 (IPv4-mapped).
                        if source.is_ipv4() == destination.is_ipv4() {
                            assert_eq!((s, d), (source, destination), "re-encoded header");
                        } else {
                            assert_eq!((s, d), (v6(source), v6(destination)), "re-encoded");
                        }
                    }
                    other => panic!("encode_v2 of {source} -> {destination}: {other:?}"),
                }
            }
        }
    }
});
