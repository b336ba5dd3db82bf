//! The WORKERS map mapped into a process (feature `mmap`): live counts without a syscall.
//!
//! WORKERS is a BPF array created with `BPF_F_MMAPABLE`, so its values sit in pages that a
//! process holding the map's fd can map shared. A worker maps them before its sandbox goes on
//! and then bumps its own `live` count with one atomic add per connection, which the kernel
//! program reads at the next SYN. This module owns that mapping and nothing else: the map is
//! created by the loader (lbd's `steering`), the fd reaches the worker through the supervisor.
//! All of this crate's unsafe code besides the `aya::Pod` impls is here, in small functions.
//!
//! The whole page is writable by whoever maps it: a worker could rewrite another worker's
//! entry. That costs at most a skewed or refused distribution, never memory safety, and is the
//! price of one map for all workers.

#![allow(unsafe_code)]

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::{WorkerState, MAX_WORKERS};

/// A shared, read-write mapping of the WORKERS map's [`MAX_WORKERS`] entries.
#[derive(Debug)]
pub struct WorkerStates {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access through this type is an atomic
// load or store of an aligned u32, so using it from several threads is as sound as using
// `&[AtomicU32]`.
unsafe impl Send for WorkerStates {}
// SAFETY: as for Send: only atomic accesses, no interior references handed out but
// `&AtomicU32`, which is Sync.
unsafe impl Sync for WorkerStates {}

impl WorkerStates {
    /// Maps the WORKERS map behind `fd` (a map created with `BPF_F_MMAPABLE` and at least
    /// [`MAX_WORKERS`] entries of [`WorkerState::SIZE`] bytes). The mapping stays valid after
    /// `fd` is closed, until this value is dropped.
    pub fn map(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let len = mapping_len(page_size()?);
        let base = mmap_shared(fd, len)?;
        Ok(Self { base, len })
    }

    /// Worker `index`'s live connection count, to add to and subtract from atomically.
    pub fn live(&self, index: u32) -> Option<&AtomicU32> {
        self.field(index, WorkerState::LIVE_OFFSET)
    }

    /// Worker `index`'s whole entry, each field read atomically (the entry as a whole is not
    /// a snapshot).
    pub fn state(&self, index: u32) -> Option<WorkerState> {
        let load = |offset| self.field(index, offset).map(|f| f.load(Ordering::Relaxed));
        Some(WorkerState {
            flags: load(0)?,
            live: load(WorkerState::LIVE_OFFSET)?,
            limit: load(8)?,
            reserved: load(12)?,
        })
    }

    /// The `u32` at `offset` inside entry `index`, if the entry is in the mapping.
    fn field(&self, index: u32, offset: usize) -> Option<&AtomicU32> {
        if index >= MAX_WORKERS || offset + 4 > WorkerState::SIZE {
            return None;
        }
        let at = usize::try_from(index).ok()? * WorkerState::SIZE + offset;
        if at + 4 > self.len {
            return None;
        }
        // SAFETY: `at + 4 <= len`, so the 4 bytes are inside the live mapping, which lasts as
        // long as `&self`; the base is page-aligned and `at` a multiple of 4, so the pointer
        // is aligned for AtomicU32; the memory is shared with the kernel and other processes,
        // which only access it atomically or by aligned word loads, so an AtomicU32 view is
        // the right one.
        Some(unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(at).cast::<u32>()) })
    }
}

impl Drop for WorkerStates {
    fn drop(&mut self) {
        munmap(self.base, self.len);
    }
}

/// A shared, read-write mapping of `u64` words from any mappable fd (a memfd): lbd's table of
/// request rates, which every worker maps (lb-proxy's `rate_limit`). Only atomic accesses.
#[derive(Debug)]
pub struct SharedWords {
    base: NonNull<u8>,
    len: usize,
    words: usize,
}

// SAFETY: as for WorkerStates: plain shared memory, every access an atomic one on an aligned
// u64.
unsafe impl Send for SharedWords {}
// SAFETY: as for Send: only `&AtomicU64` is handed out.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Maps `words` words of the file behind `fd`, which must be at least that long (a
    /// shorter one is refused: touching a page past its end would be SIGBUS; the mapping is
    /// rounded up to whole pages, but no word past the file's end is ever handed out).
    pub fn map(fd: BorrowedFd<'_>, words: usize) -> io::Result<Self> {
        let bytes = words
            .checked_mul(8)
            .ok_or_else(|| io::Error::other("too many words"))?;
        let page = page_size()?;
        let len = bytes.div_ceil(page).max(1) * page;
        let size = file_size(fd)?;
        if size < bytes as u64 {
            return Err(io::Error::other(std::format!(
                "the file is {size} bytes, {bytes} are needed"
            )));
        }
        let base = mmap_shared(fd, len)?;
        Ok(Self { base, len, words })
    }

    /// Word `index`, if it is mapped.
    pub fn word(&self, index: usize) -> Option<&core::sync::atomic::AtomicU64> {
        if index >= self.words {
            return None;
        }
        // SAFETY: index < words and words * 8 <= len, so the 8 bytes are inside the live
        // mapping, which lasts as long as `&self`; the base is page-aligned and the offset a
        // multiple of 8, so the pointer is aligned for AtomicU64; every process sharing the
        // memory accesses it only atomically.
        Some(unsafe {
            core::sync::atomic::AtomicU64::from_ptr(self.base.as_ptr().add(index * 8).cast::<u64>())
        })
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        munmap(self.base, self.len);
    }
}

fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(std::fs::File::from(fd.try_clone_to_owned()?)
        .metadata()?
        .len())
}

/// The byte length to map: every entry, rounded up to whole pages (the kernel refuses less).
fn mapping_len(page: usize) -> usize {
    let bytes = MAX_WORKERS as usize * WorkerState::SIZE;
    bytes.div_ceil(page) * page
}

fn page_size() -> io::Result<usize> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page)
        .ok()
        .filter(|&page| page > 0)
        .ok_or_else(io::Error::last_os_error)
}

fn mmap_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no Rust object; the fd
    // is valid for the call (borrowed); failure is reported as MAP_FAILED and checked.
    let ptr = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

fn munmap(base: NonNull<u8>, len: usize) {
    // SAFETY: `base`/`len` are exactly a mapping made by `mmap_shared` and owned by the value
    // being dropped; no reference into it outlives that value (they borrow `&self`).
    let _ = unsafe { libc::munmap(base.as_ptr().cast(), len) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_whole_pages() {
        assert_eq!(mapping_len(4096), 4096);
        assert_eq!(mapping_len(512), 1024);
    }
}
