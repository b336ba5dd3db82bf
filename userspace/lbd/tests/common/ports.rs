//! Loopback addresses for tests: free ports never handed out twice, a port that refuses, a
//! listener that never answers.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback address whose port was free a moment ago and has not been handed out before in
/// this test binary (so two `lbd` of parallel tests never share one through SO_REUSEPORT).
pub fn free_addr() -> SocketAddr {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let mut ports = handed_out()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ports.insert(addr.port()) {
            return addr;
        }
    }
}

/// A loopback port that refuses connections for as long as this value lives: the port is
/// bound but not listening, so nothing else can take it and a connect gets a reset.
#[derive(Debug)]
pub struct ClosedPort {
    _socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).expect("bind 127.0.0.1:0");
        let addr = socket
            .local_addr()
            .unwrap()
            .as_socket()
            .expect("an inet address");
        ClosedPort {
            _socket: socket,
            addr,
        }
    }
}

/// A loopback listener that never accepts and whose accept queue is full, so a connect to it
/// hangs (the kernel drops the SYNs): a backend that cannot be reached in time.
#[derive(Debug)]
pub struct BlackHole {
    _listener: socket2::Socket,
    _fillers: Vec<socket2::Socket>,
    pub addr: SocketAddr,
}

impl BlackHole {
    pub fn new() -> BlackHole {
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        // Fill the accept queue until a connect no longer completes.
        for _ in 0..16 {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            let hung = match s.connect_timeout(&addr.into(), Duration::from_millis(300)) {
                Ok(()) => false,
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => true,
                Err(e) => panic!("filling the accept queue of {addr}: {e}"),
            };
            fillers.push(s);
            if hung {
                return BlackHole {
                    _listener: listener,
                    _fillers: fillers,
                    addr,
                };
            }
        }
        panic!("could not fill the accept queue of {addr}: connects keep succeeding");
    }
}
