//! Unit tests of the HTTP/2 layer: frames (`frames`), HPACK against RFC 7541 Appendix C and
//! hostile blocks (`hpack`), the request rules of RFC 9113 §8 (`fields`), the header-block
//! assembler (`block`), and frames written by Debian's python3-h2 (`python`).

mod block;
mod fields;
mod frames;
mod hpack;
mod python;

/// Bytes from hex, spaces ignored: `hex("8286 84")`.
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}
