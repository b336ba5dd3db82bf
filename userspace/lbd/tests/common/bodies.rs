//! The test origin's byte pattern: making it, checking a stream against it, digests.

use std::io::{self, Write};

/// Period of the test origin's `/bytes/N` pattern: byte `i` is `i % 251`.
pub const PERIOD: usize = 251;

/// `len` bytes of the origin's pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % PERIOD) as u8).collect()
}

/// Checks a stream of bytes against the pattern without storing it.
#[derive(Debug)]
pub struct PatternCheck {
    window: Vec<u8>,
    pub len: u64,
    pub first_mismatch: Option<u64>,
}

impl Default for PatternCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl PatternCheck {
    const STEP: usize = 64 * 1024;

    pub fn new() -> PatternCheck {
        PatternCheck {
            window: pattern(Self::STEP + PERIOD),
            len: 0,
            first_mismatch: None,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let k = data.len().min(Self::STEP);
            let phase = (self.len % PERIOD as u64) as usize;
            if self.first_mismatch.is_none() && data[..k] != self.window[phase..phase + k] {
                let at = data[..k]
                    .iter()
                    .zip(&self.window[phase..phase + k])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                self.first_mismatch = Some(self.len + at as u64);
            }
            self.len += k as u64;
            data = &data[k..];
        }
    }
}

/// Writes `len` pattern bytes to `w` in 64 KiB writes, hashing them as it goes; returns the
/// FNV-1a 64 of what was written.
pub fn write_pattern(w: &mut impl Write, len: u64) -> io::Result<u64> {
    let window = pattern(64 * 1024 + PERIOD);
    let mut hash = lb_testkit::Fnv1a64::new();
    let mut off = 0u64;
    while off < len {
        let k = usize::try_from(len - off)
            .unwrap_or(usize::MAX)
            .min(64 * 1024);
        let phase = (off % PERIOD as u64) as usize;
        let data = &window[phase..phase + k];
        hash.update(data);
        w.write_all(data)?;
        off += k as u64;
    }
    Ok(hash.finish())
}

/// The `/digest` answer for `data`.
pub fn digest_line(data: &[u8]) -> String {
    format!(
        "len={} fnv={:016x}\n",
        data.len(),
        lb_testkit::fnv1a64(data)
    )
}
