//! HPACK: the examples of RFC 7541 Appendix C (C.2 to C.6, with and without Huffman), with the
//! headers and dynamic table sizes the RFC lists; compression errors; hostile blocks (an HPACK
//! bomb, huge strings, size updates) staying within the limits; the encoder read back.

use super::hex;
use crate::h2::fields::{BlockKind, HeaderLimits};
use crate::h2::hpack::{encode_field, encode_response, Decoder, Sink, DEFAULT_TABLE_SIZE};
use crate::h2::{ErrorCode, HpackFault, Reason, Scope};

/// Every decoded field, no HTTP rule applied; `too_large` recorded as a field named "!".
#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl Sink for Fields {
    fn push(&mut self, name: &[u8], value: &[u8]) {
        let s = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        self.0.push((s(name), s(value)));
    }
    fn too_large(&mut self) {
        self.0.push(("!".into(), String::new()));
    }
}

fn walk(d: &mut Decoder, block: &str) -> Vec<(String, String)> {
    let mut f = Fields::default();
    d.walk(&hex(block), &mut f).unwrap();
    f.0
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn decoder(table: usize) -> Decoder {
    Decoder::new(table, HeaderLimits::default())
}

#[test]
fn rfc7541_c2_single_representations() {
    // C.2.1 literal with indexing.
    let mut d = decoder(4096);
    let f = walk(
        &mut d,
        "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
    );
    assert_eq!(f, pairs(&[("custom-key", "custom-header")]));
    assert_eq!(d.table_size(), 55);
    assert_eq!(d.entries(), [(&b"custom-key"[..], &b"custom-header"[..])]);
    // C.2.2 literal without indexing.
    let mut d = decoder(4096);
    let f = walk(&mut d, "040c 2f73 616d 706c 652f 7061 7468");
    assert_eq!(f, pairs(&[(":path", "/sample/path")]));
    assert_eq!(d.table_size(), 0);
    // C.2.3 literal never indexed.
    let mut d = decoder(4096);
    let f = walk(&mut d, "1008 7061 7373 776f 7264 0673 6563 7265 74");
    assert_eq!(f, pairs(&[("password", "secret")]));
    assert_eq!(d.table_size(), 0);
    // C.2.4 indexed.
    let mut d = decoder(4096);
    assert_eq!(walk(&mut d, "82"), pairs(&[(":method", "GET")]));
    assert_eq!(d.table_size(), 0);
}

const REQ1: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
];
const REQ2: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
    ("cache-control", "no-cache"),
];
const REQ3: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "https"),
    (":path", "/index.html"),
    (":authority", "www.example.com"),
    ("custom-key", "custom-value"),
];

fn requests(blocks: [&str; 3]) {
    let mut d = decoder(4096);
    for ((block, want), size) in blocks.iter().zip([REQ1, REQ2, REQ3]).zip([57, 110, 164]) {
        assert_eq!(walk(&mut d, block), pairs(want));
        assert_eq!(d.table_size(), size);
    }
    assert_eq!(
        d.entries(),
        [
            (&b"custom-key"[..], &b"custom-value"[..]),
            (b"cache-control", b"no-cache"),
            (b":authority", b"www.example.com"),
        ]
    );
    // The same blocks through the checked path give the same requests.
    let mut d = decoder(4096);
    for (block, want) in blocks.iter().zip([REQ1, REQ2, REQ3]) {
        let list = d.decode(&hex(block), 1, BlockKind::Request).unwrap();
        assert_eq!(list.method(), Some(&b"GET"[..]));
        assert_eq!(list.authority(), Some(&b"www.example.com"[..]));
        assert_eq!(list.len(), want.len() - 4);
        let size: usize = want.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
        assert_eq!(list.list_size(), size);
    }
}

#[test]
fn rfc7541_c3_requests_without_huffman() {
    requests([
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "8286 84be 5808 6e6f 2d63 6163 6865",
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
    ]);
}

#[test]
fn rfc7541_c4_requests_with_huffman() {
    requests([
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ]);
}

const RESP1: &[(&str, &str)] = &[
    (":status", "302"),
    ("cache-control", "private"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("location", "https://www.example.com"),
];
const RESP2: &[(&str, &str)] = &[
    (":status", "307"),
    ("cache-control", "private"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("location", "https://www.example.com"),
];
const RESP3: &[(&str, &str)] = &[
    (":status", "200"),
    ("cache-control", "private"),
    ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
    ("location", "https://www.example.com"),
    ("content-encoding", "gzip"),
    (
        "set-cookie",
        "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
    ),
];

fn responses(blocks: [&str; 3]) {
    // Appendix C.5 and C.6 run with a 256-octet table, so entries get evicted.
    let mut d = decoder(256);
    for ((block, want), size) in blocks
        .iter()
        .zip([RESP1, RESP2, RESP3])
        .zip([222, 222, 215])
    {
        assert_eq!(walk(&mut d, block), pairs(want));
        assert_eq!(d.table_size(), size);
    }
    assert_eq!(
        d.entries(),
        [
            (
                &b"set-cookie"[..],
                &b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"[..]
            ),
            (b"content-encoding", b"gzip"),
            (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
        ]
    );
}

#[test]
fn rfc7541_c5_responses_without_huffman() {
    responses([
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
         2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
         6c65 2e63 6f6d",
        "4803 3330 37c1 c0bf",
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d \
         54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 \
         5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
         3d31",
    ]);
}

#[test]
fn rfc7541_c6_responses_with_huffman() {
    responses([
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
         2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        "4883 640e ffc1 c0bf",
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab \
         77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f \
         9587 3160 65c0 03ed 4ee5 b106 3d50 07",
    ]);
}

fn fault(d: &mut Decoder, block: &[u8]) -> HpackFault {
    let e = d.decode(block, 1, BlockKind::Request).unwrap_err();
    assert_eq!(
        (e.scope, e.code),
        (Scope::Connection, ErrorCode::CompressionError)
    );
    match e.reason {
        Reason::Hpack(f) => f,
        other => panic!("{other:?}"),
    }
}

#[test]
fn compression_errors() {
    let mut d = decoder(4096);
    assert_eq!(fault(&mut d, &[0x80]), HpackFault::BadIndex(0));
    assert_eq!(fault(&mut d, &[0xbe]), HpackFault::BadIndex(62));
    assert_eq!(fault(&mut d, &[0x7f, 0x80]), HpackFault::Truncated); // name index, cut
    assert_eq!(fault(&mut d, &[0x00, 0x05, b'a']), HpackFault::Truncated); // name string cut
    assert_eq!(fault(&mut d, &[0x04]), HpackFault::Truncated); // :path without a value
                                                               // Integers: 2^32 overflows, six octets of continuation too many.
    assert_eq!(
        fault(&mut d, &[0xff, 0x81, 0xff, 0xff, 0xff, 0x0f]),
        HpackFault::IntegerOverflow
    );
    assert_eq!(
        fault(&mut d, &[0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]),
        HpackFault::IntegerOverflow
    );
    // Huffman: EOS inside, padding of 8 bits or not all ones.
    assert_eq!(
        fault(&mut d, &[0x04, 0x84, 0xff, 0xff, 0xff, 0xff]),
        HpackFault::BadHuffman
    );
    assert_eq!(
        fault(&mut d, &[0x04, 0x82, 0x1f, 0xff]),
        HpackFault::BadHuffman
    );
    assert_eq!(fault(&mut d, &[0x04, 0x81, 0x18]), HpackFault::BadHuffman);
    // Size updates: over the advertised 4096, after a field, three in a row.
    assert_eq!(
        fault(&mut d, &[0x3f, 0xe2, 0x1f]),
        HpackFault::TableSizeOverLimit(4097)
    );
    assert_eq!(
        fault(&mut d, &[0x82, 0x20]),
        HpackFault::MisplacedSizeUpdate
    );
    assert_eq!(
        fault(&mut d, &[0x20, 0x20, 0x20, 0x82]),
        HpackFault::MisplacedSizeUpdate
    );
}

#[test]
fn size_updates_at_the_start() {
    let mut d = decoder(4096);
    walk(
        &mut d,
        "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
    );
    assert_eq!(d.table_size(), 55);
    // Down to 0 (evicts), then back up to 4096: allowed, at the start of a block.
    let f = walk(&mut d, "20 3fe1 1f 82");
    assert_eq!(f, pairs(&[(":method", "GET")]));
    assert_eq!((d.table_size(), d.table_max()), (0, 4096));
    assert_eq!(
        fault(&mut d, &[0xbe]),
        HpackFault::BadIndex(62),
        "the evicted entry is gone"
    );
}

#[test]
fn hpack_bomb_stops_at_the_list_size() {
    // One 4,000-octet entry in the dynamic table, then 16,000 one-octet references to it:
    // 64 MB of header list if it were kept.
    let limits = HeaderLimits {
        max_list_size: 16_384,
        max_fields: 100,
    };
    let mut d = Decoder::new(DEFAULT_TABLE_SIZE, limits);
    let mut block = vec![0x40, 0x01, b'x', 0x7f];
    // Value length 4000 with a 7-bit prefix: 127 then 3873 = 0xa1 0x1e.
    block.extend_from_slice(&[0xa1, 0x1e]);
    block.extend(std::iter::repeat_n(b'v', 4000));
    // The regular field comes after the pseudo-headers so that only the size limit is hit.
    let mut head = vec![0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
    head.extend_from_slice(&block);
    head.extend(std::iter::repeat_n(0xbe, 16_000));
    let e = d.decode(&head, 1, BlockKind::Request).unwrap_err();
    assert_eq!(
        (e.scope, e.code, e.reason),
        (
            Scope::Stream(1),
            ErrorCode::ProtocolError,
            Reason::HeaderListTooLarge { max: 16_384 }
        )
    );
    // The walk counted how far it got before refusing to keep more: the sink saw every
    // reference, the list builder stopped storing after the fourth.
    let mut seen = Fields::default();
    d.walk(&head, &mut seen).unwrap();
    assert_eq!(seen.0.len(), 3 + 1 + 1 + 16_000);
    // The context stays usable: a stream error, not a connection error.
    let ok = d
        .decode(&hex("8286 84 41 0161"), 3, BlockKind::Request)
        .unwrap();
    assert_eq!(ok.authority(), Some(&b"a"[..]));
}

/// A string literal header: H bit and length with a 7-bit prefix.
fn string_len(huffman: bool, len: usize) -> Vec<u8> {
    let h = if huffman { 0x80 } else { 0 };
    if len < 127 {
        return vec![h | len as u8];
    }
    let mut out = vec![h | 0x7f];
    let mut v = len - 127;
    while v >= 0x80 {
        out.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

#[test]
fn huge_strings_are_checked_not_kept() {
    // A 100,000-octet raw value: past every limit, a stream error.
    let mut d = decoder(4096);
    let mut block = vec![0x82, 0x86, 0x84, 0x0f, 0x04]; // accept (index 19), no indexing
    block.extend(string_len(false, 100_000));
    block.extend(std::iter::repeat_n(b'a', 100_000));
    let e = d.decode(&block, 1, BlockKind::Request).unwrap_err();
    assert_eq!(
        (e.scope, e.reason),
        (Scope::Stream(1), Reason::HeaderListTooLarge { max: 16_384 })
    );

    // A 50,000-octet Huffman value (79,999 '0's) inserted with indexing: decoded to its end
    // to check it, not kept, and its insertion empties the table (RFC 7541 §4.4).
    walk(&mut d, "4003 6b65 7901 76"); // key: v
    assert_eq!(d.table_size(), 36);
    let mut block = vec![0x41]; // :authority, with indexing
    block.extend(string_len(true, 50_000));
    block.extend(std::iter::repeat_n(0x00, 49_999));
    // 49,999 zero octets are 79,998 '0's and two bits; the last octet 00011110 ends a '0'
    // with those two bits and pads with 11110: not all ones.
    block.push(0x1e);
    let mut f = Fields::default();
    assert_eq!(d.walk(&block, &mut f), Err(HpackFault::BadHuffman));
    // Padded with 11111: valid.
    *block.last_mut().unwrap() = 0x1f;
    let mut d = decoder(4096);
    walk(&mut d, "4003 6b65 7901 76");
    let mut f = Fields::default();
    d.walk(&block, &mut f).unwrap();
    assert_eq!(f.0, pairs(&[("!", "")]));
    assert_eq!(d.table_size(), 0);
}

/// Every decoded field as bytes.
struct Raw(Vec<(Vec<u8>, Vec<u8>)>);

impl Sink for Raw {
    fn push(&mut self, n: &[u8], v: &[u8]) {
        self.0.push((n.to_vec(), v.to_vec()));
    }
    fn too_large(&mut self) {
        panic!("too large");
    }
}

#[test]
fn encoder_round_trips() {
    let fields: &[(&[u8], &[u8])] = &[
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"content-length", b"1234"),
        (b"X-Custom", b"\x80\xff binary\tok"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"set-cookie", b"a=b; Path=/"),
        (b"x-empty", b""),
    ];
    for status in [200u16, 204, 304, 404, 500, 101, 999, 7] {
        let mut out = [0u8; 512];
        let n = encode_response(status, fields.iter().copied(), &mut out).unwrap();
        let mut d = decoder(4096);
        let mut got = Raw(Vec::new());
        d.walk(&out[..n], &mut got).unwrap();
        let mut want = vec![(b":status".to_vec(), status.to_string().into_bytes())];
        for (name, value) in fields {
            want.push((name.to_ascii_lowercase(), value.to_vec()));
        }
        assert_eq!(got.0, want);
        assert_eq!(d.table_size(), 0, "the encoder never indexes");
        // One octet short: refused.
        assert_eq!(
            encode_response(status, fields.iter().copied(), &mut out[..n - 1]),
            None
        );
    }
    // An exact static match is one octet; Huffman is used when shorter.
    let mut out = [0u8; 64];
    assert_eq!(encode_field(b":status", b"200", &mut out), Some(1));
    assert_eq!(out[0], 0x88);
    let n = encode_field(b"cache-control", b"no-cache", &mut out).unwrap();
    assert_eq!(&out[..n], hex("0f09 86a8 eb10 649c bf"));
}
