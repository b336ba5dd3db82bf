//! The buffer pool: fixed-size I/O buffers handed to sessions and taken back when they close.
//!
//! A worker's memory is bounded by `max_buffers × buffer_size` whatever the traffic does: when
//! the pool is empty a new connection is refused instead of allocating. The first buffers are
//! allocated up front; the rest lazily, up to the cap, and every returned buffer is reused.

use kawa::AsBuffer;

/// One I/O buffer owned by a session; give it back with [`BufferPool::checkin`].
pub struct PoolBuf(Box<[u8]>);

impl PoolBuf {
    /// No buffer: what a parked session holds in place of one (no allocation, capacity 0).
    pub fn none() -> PoolBuf {
        PoolBuf(Box::default())
    }

    /// This is [`PoolBuf::none`].
    pub fn is_none(&self) -> bool {
        self.0.is_empty()
    }
}

impl AsBuffer for PoolBuf {
    fn as_buffer(&self) -> &[u8] {
        &self.0
    }
    fn as_mut_buffer(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

pub struct BufferPool {
    free: Vec<Box<[u8]>>,
    buffer_size: usize,
    allocated: usize,
    max_buffers: usize,
}

impl BufferPool {
    /// A pool of at most `max_buffers` buffers of `buffer_size` bytes, `prealloc` of them now.
    pub fn new(buffer_size: usize, prealloc: usize, max_buffers: usize) -> Self {
        let prealloc = prealloc.min(max_buffers);
        let free = (0..prealloc)
            .map(|_| vec![0u8; buffer_size].into_boxed_slice())
            .collect();
        BufferPool {
            free,
            buffer_size,
            allocated: prealloc,
            max_buffers,
        }
    }

    /// A buffer, or None when the cap is reached.
    pub fn checkout(&mut self) -> Option<PoolBuf> {
        if let Some(buf) = self.free.pop() {
            return Some(PoolBuf(buf));
        }
        if self.allocated >= self.max_buffers {
            return None;
        }
        self.allocated += 1;
        Some(PoolBuf(vec![0u8; self.buffer_size].into_boxed_slice()))
    }

    pub fn checkin(&mut self, buf: PoolBuf) {
        // A placeholder (`PoolBuf::none`) was never checked out.
        if buf.0.len() == self.buffer_size {
            self.free.push(buf.0);
        }
    }

    /// Buffers currently held by sessions.
    pub fn in_use(&self) -> usize {
        self.allocated - self.free.len()
    }

    pub fn capacity(&self) -> usize {
        self.max_buffers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_reused() {
        let mut pool = BufferPool::new(1024, 1, 2);
        let a = pool.checkout().unwrap();
        let b = pool.checkout().unwrap();
        assert!(pool.checkout().is_none());
        assert_eq!(pool.in_use(), 2);
        pool.checkin(a);
        assert_eq!(pool.in_use(), 1);
        let c = pool.checkout().unwrap();
        assert_eq!(c.as_buffer().len(), 1024);
        pool.checkin(b);
        pool.checkin(c);
        assert_eq!(pool.in_use(), 0);
        // A placeholder is not a buffer: giving it back changes nothing.
        pool.checkin(PoolBuf::none());
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.free.len(), 2);
    }
}
