//! Idle backend connections kept alive between requests, per backend address.
//!
//! A connection goes back here when its response ended cleanly and the backend did not ask to
//! close. Before reuse it is checked with a non-blocking peek (a closed or chatty connection is
//! dropped), and connections older than the idle limit are pruned.

use mio::net::TcpStream;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub struct IdlePool {
    conns: HashMap<SocketAddr, Vec<(TcpStream, Instant)>>,
    per_backend: usize,
    max_idle: Duration,
    /// Connections kept by sessions for their client's next request (see session.rs),
    /// at most `per_backend` of them.
    held: usize,
}

impl IdlePool {
    pub fn new(per_backend: usize, max_idle: Duration) -> IdlePool {
        IdlePool {
            conns: HashMap::new(),
            per_backend,
            max_idle,
            held: 0,
        }
    }

    /// A live idle connection to `addr`, most recently used first.
    pub fn take(&mut self, addr: SocketAddr, now: Instant) -> Option<TcpStream> {
        let list = self.conns.get_mut(&addr)?;
        while let Some((stream, since)) = list.pop() {
            if now.saturating_duration_since(since) >= self.max_idle {
                continue;
            }
            let mut probe = [0u8; 1];
            match stream.peek(&mut probe) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(stream),
                // Closed (Ok(0)), sent unsolicited bytes (Ok(n)), or failed: not reusable.
                _ => continue,
            }
        }
        None
    }

    /// Takes one of the places for kept connections; false when all are taken.
    pub fn hold(&mut self) -> bool {
        if self.held < self.per_backend {
            self.held += 1;
            true
        } else {
            false
        }
    }

    /// Gives a place for a kept connection back.
    pub fn unhold(&mut self) {
        self.held = self.held.saturating_sub(1);
    }

    /// A connection a session kept for itself, if it is still usable: younger than the idle
    /// limit and, when an event came for it while idle (`stirred`), still silent and open.
    pub fn revive(
        &self,
        stream: TcpStream,
        since: Instant,
        stirred: bool,
        now: Instant,
    ) -> Option<TcpStream> {
        if now.saturating_duration_since(since) >= self.max_idle {
            return None;
        }
        if !stirred {
            return Some(stream);
        }
        let mut probe = [0u8; 1];
        match stream.peek(&mut probe) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => Some(stream),
            _ => None,
        }
    }

    /// Keeps `stream` for reuse; drops it when the backend already has enough idle ones.
    pub fn put(&mut self, addr: SocketAddr, stream: TcpStream, now: Instant) {
        let list = self.conns.entry(addr).or_default();
        if list.len() < self.per_backend {
            list.push((stream, now));
        }
    }

    /// Drops connections idle for longer than the limit.
    pub fn prune(&mut self, now: Instant) {
        let max_idle = self.max_idle;
        for list in self.conns.values_mut() {
            list.retain(|(_, since)| now.saturating_duration_since(*since) < max_idle);
        }
    }

    pub fn len(&self) -> usize {
        self.conns.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_connections_are_capped_per_worker() {
        let mut pool = IdlePool::new(2, Duration::from_secs(30));
        assert!(pool.hold());
        assert!(pool.hold());
        assert!(
            !pool.hold(),
            "a third kept connection goes to the pool instead"
        );
        pool.unhold();
        assert!(pool.hold());
        pool.unhold();
        pool.unhold();
        pool.unhold();
        pool.unhold();
        assert!(pool.hold() && pool.hold() && !pool.hold(), "no underflow");
    }
}
