//! TLS session tickets any worker can open, whichever worker issued them, and across
//! `lbctl upgrade`.
//!
//! The keys live in memory every worker shares (a memfd lbd's main process creates and every
//! worker maps before its sandbox goes on, as the table of request rates): [`WORDS`] `u64`
//! words, a sequence number then two keys, the current one (it seals new tickets and opens
//! them) and the previous one (it only opens: a ticket issued just before a rotation still
//! resumes). Main draws the keys, rotates them every [`ROTATION`] and hands them to the next
//! lbd on an upgrade; it is the only writer, and writes under the sequence number (odd while
//! it writes), so a worker reading while it writes reads again ([`load`]).
//!
//! A key is a 16-byte name and a 32-byte AES-256-GCM key. A ticket is the key's name, a
//! random 12-byte nonce, then the session state sealed under that key, the name as
//! associated data ([`SharedTicketer`]). A ticket whose name is neither key's, or that does
//! not open, is refused: rustls then makes a full handshake.

use crate::rate_limit::SharedSlots;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

/// Bytes of a key: its name then the AES-256 key.
pub const KEY_BYTES: usize = NAME_BYTES + 32;
const NAME_BYTES: usize = 16;
const KEY_WORDS: usize = KEY_BYTES / 8;
/// The shared words: the sequence number, the current key, the previous key.
pub const WORDS: usize = 1 + 2 * KEY_WORDS;
/// How often main draws a new current key; a ticket opens for up to twice this.
pub const ROTATION: Duration = Duration::from_secs(6 * 3600);
/// The ticket lifetime told to clients (RFC 8446 §4.6.1), in seconds.
const LIFETIME_SECS: u32 = 6 * 3600;
/// Reads of the keys tried while main writes them.
const READ_TRIES: usize = 100;

/// The two keys. An all-zero previous key means none.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub current: [u8; KEY_BYTES],
    pub previous: [u8; KEY_BYTES],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the keys are secrets.
        f.debug_struct("Keys")
            .field("current", &hex(name(&self.current)))
            .field("previous", &hex(name(&self.previous)))
            .finish()
    }
}

impl Keys {
    /// A rotation: `next` becomes the current key, the current one the previous.
    pub fn rotated(&self, next: [u8; KEY_BYTES]) -> Keys {
        Keys {
            current: next,
            previous: self.current,
        }
    }

    /// The keys as bytes (current then previous), for the upgrade handoff.
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.current.as_slice(), self.previous.as_slice()].concat()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Keys> {
        if bytes.len() != 2 * KEY_BYTES {
            return None;
        }
        let (current, previous) = bytes.split_at(KEY_BYTES);
        Some(Keys {
            current: current.try_into().ok()?,
            previous: previous.try_into().ok()?,
        })
    }
}

fn name(key: &[u8; KEY_BYTES]) -> &[u8] {
    key.get(..NAME_BYTES).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `keys` (main only, the single writer).
pub fn store(words: &dyn SharedSlots, keys: &Keys) {
    let Some(seq) = words.word(0) else {
        return;
    };
    let start = seq.load(Ordering::Relaxed);
    seq.store(start | 1, Ordering::Relaxed);
    fence(Ordering::Release);
    let bytes = keys.to_bytes();
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        if let Some(w) = words.word(1 + i) {
            w.store(u64::from_ne_bytes(word), Ordering::Relaxed);
        }
    }
    seq.store((start | 1).wrapping_add(1), Ordering::Release);
}

/// Reads the keys; `None` when main never wrote any, or kept writing while this read.
pub fn load(words: &dyn SharedSlots) -> Option<Keys> {
    let seq = words.word(0)?;
    for _ in 0..READ_TRIES {
        let before = seq.load(Ordering::Acquire);
        if before & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let mut bytes = [0u8; 2 * KEY_BYTES];
        for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
            let word = words.word(1 + i)?.load(Ordering::Relaxed);
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        fence(Ordering::Acquire);
        if seq.load(Ordering::Relaxed) == before {
            return if before == 0 {
                None
            } else {
                Keys::from_bytes(&bytes)
            };
        }
    }
    None
}

/// rustls's ticket producer over the shared keys.
pub struct SharedTicketer {
    words: Box<dyn SharedSlots + Sync>,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedTicketer")
    }
}

impl SharedTicketer {
    pub fn new(words: Box<dyn SharedSlots + Sync>) -> SharedTicketer {
        SharedTicketer { words }
    }
}

fn aead(key: &[u8; KEY_BYTES]) -> Option<LessSafeKey> {
    let secret = key.get(NAME_BYTES..)?;
    UnboundKey::new(&AES_256_GCM, secret)
        .ok()
        .map(LessSafeKey::new)
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = load(self.words.as_ref())?;
        let sealing = aead(&keys.current)?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_BYTES + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(name(&keys.current));
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name(&keys.current)),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let ticket_name = ticket.get(..NAME_BYTES)?;
        let nonce: [u8; NONCE_LEN] = ticket
            .get(NAME_BYTES..NAME_BYTES + NONCE_LEN)?
            .try_into()
            .ok()?;
        let sealed = ticket.get(NAME_BYTES + NONCE_LEN..)?;
        let keys = load(self.words.as_ref())?;
        let key = [&keys.current, &keys.previous]
            .into_iter()
            .find(|k| name(k) == ticket_name && k.iter().any(|b| *b != 0))?;
        let mut body = sealed.to_vec();
        let plain = aead(key)?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ticket_name),
                &mut body,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Words in this process, shared by several ticketers as the memfd is by workers.
    #[derive(Clone)]
    struct Words(Arc<Vec<AtomicU64>>);

    impl SharedSlots for Words {
        fn word(&self, index: usize) -> Option<&AtomicU64> {
            self.0.get(index)
        }
    }

    fn words() -> Words {
        Words(Arc::new((0..WORDS).map(|_| AtomicU64::new(0)).collect()))
    }

    fn key(n: u8) -> [u8; KEY_BYTES] {
        let mut k = [n; KEY_BYTES];
        k[0] = n.wrapping_add(1);
        k
    }

    #[test]
    fn tickets_open_in_every_worker_and_across_one_rotation() {
        let shared = words();
        let (a, b) = (
            SharedTicketer::new(Box::new(shared.clone())),
            SharedTicketer::new(Box::new(shared.clone())),
        );
        assert!(a.encrypt(b"state").is_none(), "no keys yet: no ticket");
        let first = Keys {
            current: key(1),
            previous: [0; KEY_BYTES],
        };
        store(&shared, &first);
        assert_eq!(load(&shared), Some(first.clone()));
        let t1 = a.encrypt(b"session one").unwrap();
        assert_eq!(b.decrypt(&t1).as_deref(), Some(&b"session one"[..]));
        assert_ne!(
            a.encrypt(b"session one").unwrap(),
            t1,
            "a fresh nonce per ticket"
        );

        // One rotation: old tickets still open, new ones use the new key.
        let second = first.rotated(key(2));
        store(&shared, &second);
        assert_eq!(b.decrypt(&t1).as_deref(), Some(&b"session one"[..]));
        let t2 = b.encrypt(b"session two").unwrap();
        assert_eq!(&t2[..NAME_BYTES], name(&key(2)));
        assert_eq!(a.decrypt(&t2).as_deref(), Some(&b"session two"[..]));

        // Two rotations: the first key is gone.
        store(&shared, &second.rotated(key(3)));
        assert!(a.decrypt(&t1).is_none());
        assert!(a.decrypt(&t2).is_some());

        // Tampered, truncated or foreign tickets are refused.
        let mut bad = t2.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(a.decrypt(&bad).is_none());
        assert!(a.decrypt(&t2[..20]).is_none());
        let other = words();
        store(
            &other,
            &Keys {
                current: key(9),
                previous: [0; KEY_BYTES],
            },
        );
        assert!(SharedTicketer::new(Box::new(other)).decrypt(&t2).is_none());
    }

    #[test]
    fn keys_survive_the_handoff_encoding() {
        let keys = Keys {
            current: key(4),
            previous: key(5),
        };
        assert_eq!(Keys::from_bytes(&keys.to_bytes()), Some(keys.clone()));
        assert!(Keys::from_bytes(&keys.to_bytes()[1..]).is_none());
        assert!(!format!("{keys:?}").contains(&hex(&keys.current[NAME_BYTES..])));
    }
}
