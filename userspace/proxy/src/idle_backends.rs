//! Backend connections: who their events go to, and the idle ones kept alive between requests,
//! per backend address.
//!
//! A backend connection is registered with the poll once, when it is opened, under a token of
//! its own ([`back_token`], from its descriptor number), and stays registered until it is
//! closed (closing the only descriptor of a socket removes it from the epoll set). Changing
//! hands between sessions, or waiting in the pool, changes only who its events go to
//! ([`IdlePool::event`]): no `epoll_ctl` per request, as nginx keeps its pooled upstream
//! connections registered and changes only their handler.
//!
//! A connection goes back to the pool when its response ended cleanly and the backend did not
//! ask to close. An event while it waits there (bytes, the backend closing, an error) marks it
//! stirred: it is closed instead of reused. A connection that had no event is reused as it is,
//! without a probe (an empty `recv(MSG_PEEK)` per request was what the probe cost).
//!
//! Connections are pooled per backend address and TLS configuration ([`BackStream::tls_id`]:
//! 0 for plain TCP): a TLS connection verified for one cluster's roots and name is reused only
//! by a cluster with the same.

use crate::back_stream::BackStream;
use mio::net::TcpStream;
use mio::Token;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Opens a connection to a backend (non-blocking, in progress) with TCP_NODELAY, as every
/// backend connection is made: a request's head and the body that follows it later go out as
/// they are written. With Nagle's algorithm the body waited for the backend to acknowledge the
/// head, which a Linux backend delays by 40 ms: every request whose body came after its head
/// took 40 ms more through kakehi than straight to the backend.
pub fn connect_backend(address: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The token of a backend connection: odd, from its descriptor number (sessions' client
/// sockets have even tokens). A descriptor number is unique among open sockets; when a closed
/// connection's number is taken again by a new backend connection, the new one's owner is
/// recorded when it is registered.
pub fn back_token(stream: &impl AsRawFd) -> Token {
    Token(fd_index(stream.as_raw_fd()) << 1 | 1)
}

/// The descriptor number of a backend token (see [`back_token`]).
pub fn token_fd(token: usize) -> usize {
    token >> 1
}

fn fd_index(fd: RawFd) -> usize {
    usize::try_from(fd).unwrap_or(usize::MAX >> 2)
}

/// Who a backend connection's events go to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Owner {
    /// No connection known by this descriptor number.
    #[default]
    Nobody,
    /// The session with this key (slab key) uses it, or keeps it for its next request.
    Session(usize),
    /// It waits in the pool; `stirred`: an event came for it meanwhile.
    Pooled { stirred: bool },
}

/// Where idle connections wait: the backend's address and the TLS configuration's id.
type PoolKey = (SocketAddr, u64);

pub struct IdlePool {
    conns: HashMap<PoolKey, Vec<(BackStream, Instant)>>,
    /// By descriptor number.
    owners: Vec<Owner>,
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
            owners: Vec::new(),
            per_backend,
            max_idle,
            held: 0,
        }
    }

    fn set_owner(&mut self, stream: &impl AsRawFd, owner: Owner) {
        let fd = fd_index(stream.as_raw_fd());
        if fd >= self.owners.len() {
            if owner == Owner::Nobody {
                return;
            }
            self.owners.resize(fd + 1, Owner::Nobody);
        }
        if let Some(slot) = self.owners.get_mut(fd) {
            *slot = owner;
        }
    }

    /// The session with key `key` uses `stream` (just opened and registered under
    /// [`back_token`], or taken back): its events go to that session.
    pub fn own(&mut self, stream: &impl AsRawFd, key: usize) {
        self.set_owner(stream, Owner::Session(key));
    }

    /// An event for the backend connection with descriptor number `fd`: the key of the
    /// session it belongs to, or `None` when it waits in the pool (`stirring`: the event
    /// reports bytes, a close or an error, and the connection will not be reused) or is
    /// unknown (an event of a connection closed earlier in the same turn).
    pub fn event(&mut self, fd: usize, stirring: bool) -> Option<usize> {
        match self.owners.get_mut(fd)? {
            Owner::Session(key) => Some(*key),
            Owner::Pooled { stirred } => {
                *stirred |= stirring;
                None
            }
            Owner::Nobody => None,
        }
    }

    /// Forgets `stream`, which is about to be closed.
    pub fn forget(&mut self, stream: &impl AsRawFd) {
        self.set_owner(stream, Owner::Nobody);
    }

    fn stirred(&self, stream: &impl AsRawFd) -> bool {
        let fd = fd_index(stream.as_raw_fd());
        matches!(
            self.owners.get(fd),
            Some(Owner::Pooled { stirred: true }) | None
        )
    }

    /// A live idle connection to `addr` (made with the TLS configuration `tls_id`, 0 for
    /// plain TCP), most recently used first; its events go to the session with key `key` from
    /// now on.
    pub fn take(
        &mut self,
        addr: SocketAddr,
        tls_id: u64,
        now: Instant,
        key: usize,
    ) -> Option<BackStream> {
        loop {
            let (stream, since) = self.conns.get_mut(&(addr, tls_id))?.pop()?;
            if now.saturating_duration_since(since) >= self.max_idle || self.stirred(&stream) {
                // Closed, sent unsolicited bytes, failed, or too old: not reusable.
                self.forget(&stream);
                continue;
            }
            self.own(&stream, key);
            return Some(stream);
        }
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
        &mut self,
        stream: BackStream,
        since: Instant,
        stirred: bool,
        now: Instant,
    ) -> Option<BackStream> {
        let usable = now.saturating_duration_since(since) < self.max_idle
            && (!stirred
                || {
                    let mut probe = [0u8; 1];
                    matches!(stream.sock().peek(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
        if usable {
            Some(stream)
        } else {
            self.forget(&stream);
            None
        }
    }

    /// Keeps `stream` for reuse; closes it when the backend already has enough idle ones.
    pub fn put(&mut self, addr: SocketAddr, stream: BackStream, now: Instant) {
        let key = (addr, stream.tls_id());
        if self.conns.get(&key).map_or(0, Vec::len) < self.per_backend {
            self.set_owner(&stream, Owner::Pooled { stirred: false });
            self.conns.entry(key).or_default().push((stream, now));
        } else {
            self.forget(&stream);
        }
    }

    /// Closes the connections idle for longer than the limit, and those an event came for, at
    /// most `budget` of them: true when some are left for the next call.
    ///
    /// Closing one costs the kernel its FIN (on loopback, the backend's side of it too): tens
    /// of microseconds. A burst leaves up to [`IdlePool::new`]'s `per_backend` connections per
    /// backend idle together, and they expire together; closed in one turn of the event loop,
    /// every busy connection of the worker would wait for all of them (issue 19: 512 took 13 ms).
    pub fn prune(&mut self, now: Instant, budget: usize) -> bool {
        let max_idle = self.max_idle;
        let mut closed = Vec::new();
        let mut more = false;
        'lists: for list in self.conns.values_mut() {
            let mut i = 0;
            while let Some((stream, since)) = list.get(i) {
                let fd = fd_index(stream.as_raw_fd());
                let stirred =
                    !matches!(self.owners.get(fd), Some(Owner::Pooled { stirred: false }));
                if stirred || now.saturating_duration_since(*since) >= max_idle {
                    if closed.len() == budget {
                        more = true;
                        break 'lists;
                    }
                    closed.push(list.remove(i).0);
                } else {
                    i += 1;
                }
            }
        }
        for stream in &closed {
            self.forget(stream);
        }
        more
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

    fn pair(listener: &std::net::TcpListener) -> (BackStream, std::net::TcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        (BackStream::plain(TcpStream::from_std(client)), server)
    }

    fn fd(stream: &BackStream) -> usize {
        token_fd(back_token(stream).0)
    }

    #[test]
    fn backend_connections_are_made_with_nodelay() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = connect_backend(listener.local_addr().unwrap()).unwrap();
        assert!(stream.nodelay().unwrap());
    }

    #[test]
    fn events_go_to_the_owner_and_stir_pooled_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let now = Instant::now();
        let mut pool = IdlePool::new(4, Duration::from_secs(30));
        let (a, _a_server) = pair(&listener);
        let (b, _b_server) = pair(&listener);
        let (fa, fb) = (fd(&a), fd(&b));
        assert_eq!(back_token(&a).0 & 1, 1, "backend tokens are odd");

        pool.own(&a, 7);
        assert_eq!(pool.event(fa, true), Some(7));
        assert_eq!(pool.event(fb, true), None, "unknown descriptor");

        // Pooled: events reach nobody; an event with bytes or a close stirs it.
        pool.put(addr, a, now);
        pool.put(addr, b, now);
        assert_eq!(pool.event(fa, false), None, "a writable edge does not stir");
        assert_eq!(pool.event(fa, true), None);
        // b (most recent) is taken first and now belongs to session 3.
        let taken = pool.take(addr, 0, now, 3).unwrap();
        assert_eq!(fd(&taken), fb);
        assert_eq!(pool.event(fb, true), Some(3));
        // a was stirred: closed instead of reused.
        assert!(pool.take(addr, 0, now, 3).is_none());
        assert_eq!(pool.event(fa, true), None, "forgotten once closed");
        assert!(pool.is_empty());
    }

    #[test]
    fn prune_closes_stirred_and_old_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let now = Instant::now();
        let mut pool = IdlePool::new(4, Duration::from_secs(30));
        let (a, _sa) = pair(&listener);
        let (b, _sb) = pair(&listener);
        let (c, _sc) = pair(&listener);
        let (fa, fc) = (fd(&a), fd(&c));
        pool.put(addr, a, now);
        pool.put(addr, b, now - Duration::from_secs(31));
        pool.put(addr, c, now);
        pool.event(fa, true);
        assert!(!pool.prune(now, 8));
        assert_eq!(pool.len(), 1);
        let kept = pool.take(addr, 0, now, 1).unwrap();
        assert_eq!(fd(&kept), fc);
    }

    /// Issue 19: a burst's worth of expired connections is closed a batch per call, so no
    /// turn of the loop closes them all while busy connections wait.
    #[test]
    fn prune_closes_at_most_its_budget_and_says_when_more_are_left() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let now = Instant::now();
        let mut pool = IdlePool::new(100, Duration::from_secs(30));
        let mut peers = Vec::new();
        for n in 0..70 {
            let (stream, peer) = pair(&listener);
            // 50 expired, then 20 fresh ones.
            let age = if n < 50 { 31 } else { 1 };
            pool.put(addr, stream, now - Duration::from_secs(age));
            peers.push(peer);
        }
        assert!(pool.prune(now, 32), "18 expired ones left");
        assert_eq!(pool.len(), 38);
        assert!(!pool.prune(now, 32), "nothing expired left");
        assert_eq!(pool.len(), 20);
        assert!(!pool.prune(now, 32));
        assert_eq!(pool.len(), 20);
        // The ones closed are the expired ones: their peers read the end of the stream.
        let mut ended = 0;
        for peer in &mut peers {
            peer.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            if matches!(std::io::Read::read(peer, &mut byte), Ok(0)) {
                ended += 1;
            }
        }
        assert_eq!(ended, 50);
    }

    #[test]
    fn a_full_pool_closes_what_it_cannot_keep() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let now = Instant::now();
        let mut pool = IdlePool::new(1, Duration::from_secs(30));
        let (a, _sa) = pair(&listener);
        let (b, _sb) = pair(&listener);
        let fb = fd(&b);
        pool.own(&b, 5);
        pool.put(addr, a, now);
        pool.put(addr, b, now);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.event(fb, true), None, "closed, not its last owner's");
    }

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
