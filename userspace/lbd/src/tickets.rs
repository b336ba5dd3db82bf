//! The TLS session ticket keys every worker shares (lb-proxy's `tickets.rs`): drawn here, in
//! main, written into a memfd each worker maps at start, rotated every
//! `lb_proxy::tickets::ROTATION`, and handed to the next lbd by `lbctl upgrade`, so that a
//! returning client resumes its session whichever worker, and whichever generation of
//! workers, it reaches.

use crate::fds;
use lb_ebpf_common::mmap::SharedWords;
use lb_proxy::tickets::{self, Keys, KEY_BYTES, WORDS};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// A shared mapping, as lb-proxy reads its words (the request rates' table, the ticket keys).
pub(crate) struct Mapped(pub SharedWords);

impl lb_proxy::rate_limit::SharedSlots for Mapped {
    fn word(&self, index: usize) -> Option<&AtomicU64> {
        self.0.word(index)
    }
}

pub(crate) struct TicketKeys {
    file: File,
    words: Mapped,
    keys: Keys,
    rotated: Instant,
}

impl TicketKeys {
    /// The keys `handed` over by the previous lbd, or new ones.
    pub(crate) fn new(handed: Option<Keys>) -> Result<TicketKeys, fds::FdError> {
        let keys = match handed {
            Some(keys) => keys,
            None => Keys {
                current: draw()?,
                previous: [0; KEY_BYTES],
            },
        };
        let file = fds::memfd_with(&[])?;
        let bytes = u64::try_from(WORDS * 8).unwrap_or(u64::MAX);
        file.set_len(bytes).map_err(fds::FdError::Memfd)?;
        let words = Mapped(
            SharedWords::map(file.as_fd(), WORDS)
                .map_err(|e| fds::FdError::Tickets(format!("mapping their memfd: {e}")))?,
        );
        tickets::store(&words, &keys);
        Ok(TicketKeys {
            file,
            words,
            keys,
            rotated: Instant::now(),
        })
    }

    /// The memfd workers map (`--tickets-fd`).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// What the next lbd is handed.
    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A new current key once `ROTATION` has passed since the last one (the current one
    /// becomes the previous: tickets it sealed still open).
    pub(crate) fn rotate_if_due(&mut self, now: Instant) {
        if now.saturating_duration_since(self.rotated) < tickets::ROTATION {
            return;
        }
        match draw() {
            Ok(next) => {
                self.keys = self.keys.rotated(next);
                tickets::store(&self.words, &self.keys);
                self.rotated = now;
                log::info!("session ticket keys rotated");
            }
            Err(e) => log::warn!("cannot rotate the session ticket keys: {e}"),
        }
    }
}

/// A new key: its name and secret from the kernel's random source. Not from AWS-LC: its
/// generator takes ~50 ms to set itself up on first use, which main would spend between
/// binding the listeners and starting the workers.
fn draw() -> Result<[u8; KEY_BYTES], fds::FdError> {
    use std::io::Read as _;
    let mut key = [0u8; KEY_BYTES];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| fds::FdError::Tickets(format!("/dev/urandom: {e}")))?;
    Ok(key)
}
