//! HPACK (RFC 7541): the [`Decoder`] of the header blocks a peer sends, with its dynamic table
//! capped at the SETTINGS_HEADER_TABLE_SIZE kakehi advertises (4096 octets by default), and
//! the stateless encoder of the blocks kakehi writes ([`encode_field`], [`encode_response`]).
//!
//! Written here rather than taken from `loona-hpack` 0.4.3 (what sōzu 2.x uses): that decoder
//! builds a 257-entry nested `HashMap` for every Huffman-coded string it meets
//! (`decode_string` calls `HuffmanDecoder::new()`) and then walks it with hash lookups bit by
//! bit. Measured on this machine (2 cores, loaded, two runs): 36-45 µs for the 17-octet block of
//! RFC 7541 C.4.1 and 29-37 ms for a 5,000-octet block of 1,000 one-octet Huffman values,
//! against 0.6-0.7 µs and 32-55 µs for this decoder on the same blocks: a CPU amplification any
//! client can trigger and every browser request (Huffman-coded) pays. It also accepts a table
//! size update in the middle of a block (§4.2 wants it at the start), its callback cannot stop
//! or bound what it is handed, and it brings `tracing` and a second major of `thiserror`.
//!
//! Defences: every integer is bounded (at most 2^32 - 1, five continuation octets), every
//! index checked, every Huffman string checked to its end (EOS, padding); nothing is stored
//! past the limits of [`HeaderLimits`] (a string longer than every limit is decoded to check
//! it, not kept), so an HPACK bomb (many references to one big table entry) hits the header
//! list size after a few fields and costs only the walk over the rest of the block, which
//! `block` caps. Decoding errors are connection errors COMPRESSION_ERROR; a list over the
//! limits or malformed (see `fields`) is a stream error once the whole block is decoded, so
//! that the dynamic table stays in step with the peer's.
//!
//! The encoder never inserts into the dynamic table (literals without indexing, static-table
//! names and exact matches): kakehi's blocks are then independent of the peer's
//! SETTINGS_HEADER_TABLE_SIZE and of each other, and need no state.

use std::collections::VecDeque;

use super::error::{ErrorCode, H2Error, HpackFault, Reason};
use super::fields::{BlockKind, HeaderLimits, HeaderList, ListBuilder};
use super::huffman;

/// The SETTINGS_HEADER_TABLE_SIZE kakehi advertises (and the protocol's initial value): the
/// most octets the decoder's dynamic table may hold.
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// Per-entry overhead in the dynamic table size (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// RFC 7541 Appendix A.
#[rustfmt::skip]
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"),
    (b":status", b"200"), (b":status", b"204"), (b":status", b"206"), (b":status", b"304"),
    (b":status", b"400"), (b":status", b"404"), (b":status", b"500"),
    (b"accept-charset", b""), (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""), (b"accept-ranges", b""), (b"accept", b""),
    (b"access-control-allow-origin", b""), (b"age", b""), (b"allow", b""),
    (b"authorization", b""), (b"cache-control", b""), (b"content-disposition", b""),
    (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""),
    (b"cookie", b""), (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""),
    (b"from", b""), (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""),
    (b"if-none-match", b""), (b"if-range", b""), (b"if-unmodified-since", b""),
    (b"last-modified", b""), (b"link", b""), (b"location", b""), (b"max-forwards", b""),
    (b"proxy-authenticate", b""), (b"proxy-authorization", b""), (b"range", b""),
    (b"referer", b""), (b"refresh", b""), (b"retry-after", b""), (b"server", b""),
    (b"set-cookie", b""), (b"strict-transport-security", b""), (b"transfer-encoding", b""),
    (b"user-agent", b""), (b"vary", b""), (b"via", b""), (b"www-authenticate", b""),
];

/// One dynamic table entry: name and value in one allocation.
#[derive(Debug)]
struct Entry {
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn split(&self) -> (&[u8], &[u8]) {
        self.bytes
            .split_at_checked(self.name_len)
            .unwrap_or((&[], &[]))
    }
}

/// The dynamic table (RFC 7541 §2.3.2, §4): newest first.
#[derive(Debug)]
struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Table {
    fn evict_to(&mut self, target: usize) {
        while self.size > target {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.bytes.len() + ENTRY_OVERHEAD,
                None => self.size = 0,
            }
        }
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max {
            // §4.4: an entry larger than the table empties it and is not added.
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max - size);
        let mut bytes = Vec::with_capacity(name.len() + value.len());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(value);
        self.entries.push_front(Entry {
            bytes: bytes.into_boxed_slice(),
            name_len: name.len(),
        });
        self.size += size;
    }

    /// Entry `index` of the static table followed by the dynamic table (1-based, §2.3.3).
    fn get(&self, index: u32) -> Result<(&[u8], &[u8]), HpackFault> {
        let bad = HpackFault::BadIndex(index);
        let i = (index as usize).checked_sub(1).ok_or(bad)?;
        match STATIC_TABLE.get(i) {
            Some(&pair) => Ok(pair),
            None => self
                .entries
                .get(i - STATIC_TABLE.len())
                .map(Entry::split)
                .ok_or(bad),
        }
    }
}

/// Reads an integer with an `n`-bit prefix at `pos` (§5.1); returns it and the next position.
fn read_int(block: &[u8], pos: usize, n: u32) -> Result<(u32, usize), HpackFault> {
    let mask = (1u32 << n) - 1;
    let first = u32::from(*block.get(pos).ok_or(HpackFault::Truncated)?) & mask;
    let mut pos = pos + 1;
    if first < mask {
        return Ok((first, pos));
    }
    let mut value = u64::from(first);
    let mut shift = 0;
    loop {
        let b = *block.get(pos).ok_or(HpackFault::Truncated)?;
        pos += 1;
        value += u64::from(b & 0x7f) << shift;
        if value > u64::from(u32::MAX) {
            return Err(HpackFault::IntegerOverflow);
        }
        if b & 0x80 == 0 {
            return Ok((value as u32, pos));
        }
        shift += 7;
        if shift > 28 {
            return Err(HpackFault::IntegerOverflow);
        }
    }
}

/// Reads a string literal at `pos` (§5.2) into `out` (cleared first), storing at most `cap`
/// octets; returns the next position and whether the whole string was stored.
fn read_string(
    block: &[u8],
    pos: usize,
    out: &mut Vec<u8>,
    cap: usize,
) -> Result<(usize, bool), HpackFault> {
    let huffman = block.get(pos).is_some_and(|b| b & 0x80 != 0);
    let (len, start) = read_int(block, pos, 7)?;
    let end = start
        .checked_add(len as usize)
        .ok_or(HpackFault::Truncated)?;
    let raw = block.get(start..end).ok_or(HpackFault::Truncated)?;
    out.clear();
    let stored = if huffman {
        huffman::decode(raw, out, cap).map_err(|_| HpackFault::BadHuffman)?
    } else if raw.len() <= cap {
        out.extend_from_slice(raw);
        true
    } else {
        false
    };
    Ok((end, stored))
}

/// Where the decoder hands each decoded field.
pub(super) trait Sink {
    /// One field.
    fn push(&mut self, name: &[u8], value: &[u8]);
    /// One field with a string longer than every limit, not kept.
    fn too_large(&mut self);
}

impl Sink for ListBuilder {
    fn push(&mut self, name: &[u8], value: &[u8]) {
        ListBuilder::push(self, name, value)
    }

    fn too_large(&mut self) {
        ListBuilder::too_large(self)
    }
}

/// The decoder of one connection's header blocks (one compression context per direction).
#[derive(Debug)]
pub struct Decoder {
    table: Table,
    /// What was advertised: size updates may lower the table and raise it again up to
    /// this, never beyond.
    advertised: usize,
    limits: HeaderLimits,
}

impl Decoder {
    /// A decoder whose dynamic table may hold `max_table_size` octets (the
    /// SETTINGS_HEADER_TABLE_SIZE advertised: [`DEFAULT_TABLE_SIZE`] unless the connection
    /// advertised another) and whose header lists are capped by `limits`.
    pub fn new(max_table_size: usize, limits: HeaderLimits) -> Decoder {
        Decoder {
            table: Table {
                entries: VecDeque::new(),
                size: 0,
                max: max_table_size,
            },
            advertised: max_table_size,
            limits,
        }
    }

    /// Octets the dynamic table holds now, per RFC 7541 §4.1 (32 per entry included).
    pub fn table_size(&self) -> usize {
        self.table.size
    }

    /// The dynamic table's current maximum (lowered by the peer's size updates).
    pub fn table_max(&self) -> usize {
        self.table.max
    }

    /// Decodes the whole header block of `stream_id` and checks it as `kind` asks. A connection
    /// error (COMPRESSION_ERROR) leaves the decoder unusable; a stream error does not.
    pub fn decode(
        &mut self,
        block: &[u8],
        stream_id: u32,
        kind: BlockKind,
    ) -> Result<HeaderList, H2Error> {
        let mut list = ListBuilder::new(kind, self.limits, stream_id);
        self.walk(block, &mut list)
            .map_err(|f| H2Error::connection(ErrorCode::CompressionError, Reason::Hpack(f)))?;
        list.finish()
    }

    /// The dynamic table, newest first.
    #[cfg(test)]
    pub(super) fn entries(&self) -> Vec<(&[u8], &[u8])> {
        self.table.entries.iter().map(Entry::split).collect()
    }

    /// Decodes `block` into `list` without any HTTP rule: the representations of RFC 7541.
    pub(super) fn walk(&mut self, block: &[u8], list: &mut impl Sink) -> Result<(), HpackFault> {
        // Strings longer than this fit neither the list nor the table: checked, not kept.
        let cap = (self.limits.max_list_size as usize).max(self.table.max);
        let (mut name, mut value) = (Vec::new(), Vec::new());
        let mut pos = 0;
        let mut fields_seen = false;
        let mut size_updates = 0;
        while let Some(&first) = block.get(pos) {
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let (index, next) = read_int(block, pos, 7)?;
                let (n, v) = self.table.get(index)?;
                list.push(n, v);
                pos = next;
                fields_seen = true;
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3), only at the start of a block (§4.2).
                if fields_seen || size_updates == 2 {
                    return Err(HpackFault::MisplacedSizeUpdate);
                }
                let (size, next) = read_int(block, pos, 5)?;
                if size as usize > self.advertised {
                    return Err(HpackFault::TableSizeOverLimit(size));
                }
                self.table.max = size as usize;
                self.table.evict_to(self.table.max);
                pos = next;
                size_updates += 1;
            } else {
                // Literal (§6.2): with incremental indexing (01), without (0000) or never
                // indexed (0001).
                let indexing = first & 0x40 != 0;
                let (index, next) = read_int(block, pos, if indexing { 6 } else { 4 })?;
                let (next, name_stored) = if index == 0 {
                    read_string(block, next, &mut name, cap)?
                } else {
                    name.clear();
                    name.extend_from_slice(self.table.get(index)?.0);
                    (next, true)
                };
                let (next, value_stored) = read_string(block, next, &mut value, cap)?;
                if name_stored && value_stored {
                    list.push(&name, &value);
                } else {
                    list.too_large();
                }
                if indexing {
                    if name_stored && value_stored {
                        self.table.insert(&name, &value);
                    } else {
                        self.table.evict_to(0);
                    }
                }
                pos = next;
                fields_seen = true;
            }
        }
        Ok(())
    }
}

/// A cursor over an output slice; every write fails (None) rather than go past the end.
struct Out<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Out<'_> {
    fn byte(&mut self, b: u8) -> Option<()> {
        *self.out.get_mut(self.at)? = b;
        self.at += 1;
        Some(())
    }

    /// An integer with an `n`-bit prefix after the pattern bits `high` (§5.1).
    fn int(&mut self, high: u8, n: u32, value: usize) -> Option<()> {
        let mask = (1usize << n) - 1;
        if value < mask {
            return self.byte(high | value as u8);
        }
        self.byte(high | mask as u8)?;
        let mut rest = value - mask;
        while rest >= 0x80 {
            self.byte((rest & 0x7f) as u8 | 0x80)?;
            rest >>= 7;
        }
        self.byte(rest as u8)
    }

    /// A string literal, Huffman-coded when that is shorter (§5.2); `lower` lower-cases it.
    fn string(&mut self, s: &[u8], lower: bool) -> Option<()> {
        let bytes = || {
            s.iter()
                .map(move |&b| if lower { b.to_ascii_lowercase() } else { b })
        };
        let coded = huffman::encoded_len(bytes());
        if coded < s.len() {
            self.int(0x80, 7, coded)?;
            let n = huffman::encode(bytes(), self.out.get_mut(self.at..)?)?;
            self.at += n;
        } else {
            self.int(0, 7, s.len())?;
            for b in bytes() {
                self.byte(b)?;
            }
        }
        Some(())
    }
}

/// Writes one field at the front of `out` and returns its length, or None if it does not
/// fit. The name is lower-cased as written (HTTP/2 names are lower-case, §8.2; an HTTP/1.1
/// backend's need not be). An exact static-table match is written as an index; otherwise a
/// literal without indexing, with a static-table name index when there is one.
pub fn encode_field(name: &[u8], value: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut o = Out { out, at: 0 };
    // One pass: the entries of one name are next to each other in the static table.
    let mut named = None;
    for (i, &(n, v)) in STATIC_TABLE.iter().enumerate() {
        if n.len() != name.len() || !n.eq_ignore_ascii_case(name) {
            if named.is_some() {
                break;
            }
            continue;
        }
        if v == value {
            o.int(0x80, 7, i + 1)?;
            return Some(o.at);
        }
        named.get_or_insert(i);
    }
    match named {
        Some(i) => o.int(0, 4, i + 1)?,
        None => {
            o.byte(0)?;
            o.string(name, true)?;
        }
    }
    o.string(value, false)?;
    Some(o.at)
}

/// Appends one field to a header block being built (see [`encode_field`]).
pub fn append_field(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let start = block.len();
    // A field takes at most its name and value and 12 octets of prefixes.
    block.resize(start + name.len() + value.len() + 16, 0);
    let n = block
        .get_mut(start..)
        .and_then(|o| encode_field(name, value, o))
        .unwrap_or(0);
    block.truncate(start + n);
}

/// Writes a response head: `:status` then `fields`, at the front of `out`; returns the block's
/// length, or None if it does not fit. Connection-specific fields are the caller's to drop.
pub fn encode_response<'f>(
    status: u16,
    fields: impl IntoIterator<Item = (&'f [u8], &'f [u8])>,
    out: &mut [u8],
) -> Option<usize> {
    let mut digits = [0u8; 5];
    let mut n = digits.len();
    let mut rest = status;
    loop {
        n = n.checked_sub(1)?;
        *digits.get_mut(n)? = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut at = encode_field(b":status", digits.get(n..)?, out)?;
    for (name, value) in fields {
        at += encode_field(name, value, out.get_mut(at..)?)?;
    }
    Some(at)
}

#[cfg(test)]
mod static_table_tests {
    use super::*;

    /// `encode_field` stops at the end of the first run of entries with the field's name:
    /// right only if every name's entries are next to each other.
    #[test]
    fn each_name_s_entries_are_next_to_each_other() {
        for (i, (name, _)) in STATIC_TABLE.iter().enumerate() {
            let last = STATIC_TABLE
                .iter()
                .rposition(|(n, _)| n == name)
                .unwrap_or(i);
            let first = STATIC_TABLE
                .iter()
                .position(|(n, _)| n == name)
                .unwrap_or(i);
            assert!(
                STATIC_TABLE
                    .get(first..=last)
                    .is_some_and(|run| run.iter().all(|(n, _)| n == name)),
                "{:?} is not in one run",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn fields_encode_to_the_static_index_or_name() {
        let mut out = [0u8; 64];
        // :status 200 is index 8; :status 418 a literal with name index 8; accept-encoding
        // "gzip, deflate" index 16.
        assert_eq!(encode_field(b":status", b"200", &mut out), Some(1));
        assert_eq!(out.first(), Some(&(0x80 | 8)));
        let n = encode_field(b":status", b"418", &mut out).unwrap();
        assert_eq!(out.first(), Some(&8));
        assert!(n > 1);
        assert_eq!(
            encode_field(b"Accept-Encoding", b"gzip, deflate", &mut out),
            Some(1)
        );
        assert_eq!(out.first(), Some(&(0x80 | 16)));
        // No such name: a literal name.
        let n = encode_field(b"x-kakehi", b"1", &mut out).unwrap();
        assert_eq!(out.first(), Some(&0));
        assert!(n > 3);
    }
}
