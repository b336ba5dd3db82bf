//! eBPF steering against the real kernel: lbd's loader, the real program, real sockets.
//!
//! Each test runs on a thread of its own that first moves into a fresh network namespace
//! (unshare(CLONE_NEWNET) changes only the calling thread) and brings its loopback up, so the
//! listeners and the attached program cannot disturb the machine or another test. It binds
//! four SO_REUSEPORT listeners on 127.0.0.1 (one per "worker"), loads and attaches the program
//! with `steering.rs`, and connects real clients: which listener's accept queue a connection
//! lands in is the program's decision. They need root (network namespace, BPF) and fail,
//! saying so, without it. `verifier_accepts_the_program` is also what `cargo xtask
//! build-ebpf` runs to prove the kernel accepts the object and to report its size.

// Test helpers outside #[test] functions: a broken invariant fails the test with a message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
#[allow(dead_code)]
#[path = "../src/steering.rs"]
mod steering;

use common::in_fresh_netns;

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lb_ebpf_common::{counter, Policy, WorkerState, BPF_F_MMAPABLE, MAX_WORKERS};
use socket2::{Domain, Socket, Type};
use steering::Steering;

const WORKERS: u32 = 4;
const CONNECTIONS: usize = 2000;

/// One reuseport group of `WORKERS` listeners with the program loaded and attached.
struct Group {
    listeners: Vec<TcpListener>,
    addr: SocketAddr,
    steering: Steering,
}

impl Group {
    /// Listeners on one port, every worker active with `limit`, their sockets in SOCKETS,
    /// the program attached.
    fn new(policy: Policy, limit: u32) -> Self {
        let mut steering = match Steering::load(policy, WORKERS) {
            Ok(steering) => steering,
            Err(error) => panic!(
                "loading the steering program failed: {error}\n(these tests need root and a \
                 kernel with BPF)"
            ),
        };
        let mut listeners = Vec::new();
        let mut addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        for _ in 0..WORKERS {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.set_reuse_port(true).unwrap();
            socket.bind(&addr.into()).unwrap();
            socket.listen(1024).unwrap();
            addr = socket.local_addr().unwrap().as_socket().unwrap();
            socket.set_nonblocking(true).unwrap();
            listeners.push(TcpListener::from(socket));
        }
        for (index, listener) in (0..).zip(&listeners) {
            steering.set_worker_socket(index, listener).unwrap();
            steering
                .set_worker_state(index, WorkerState::active(limit))
                .unwrap();
        }
        steering.attach(&listeners[0]).unwrap();
        Self {
            listeners,
            addr,
            steering,
        }
    }

    fn set_live(&mut self, lives: [u32; WORKERS as usize]) {
        for (index, live) in (0..).zip(lives) {
            let state = self.steering.worker_state(index).unwrap();
            self.steering
                .set_worker_state(index, state.with_live(live))
                .unwrap();
        }
    }

    /// Connects a client and returns it with the index of the listener that accepted it and
    /// the accepted stream.
    fn connect(&self) -> (TcpStream, usize, TcpStream) {
        let client = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
            .expect("connect to the reuseport group");
        let (worker, accepted) = self.accepted(&client);
        (client, worker, accepted)
    }

    /// Connects from the fixed local port `port`; the client resets on close (SO_LINGER 0),
    /// so the same 4-tuple can connect again at once.
    fn connect_from(&self, port: u16) -> (TcpStream, usize, TcpStream) {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.set_linger(Some(Duration::ZERO)).unwrap();
        let local = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        socket.bind(&local.into()).unwrap();
        socket
            .connect_timeout(&self.addr.into(), Duration::from_secs(2))
            .expect("connect from a fixed port");
        let client = TcpStream::from(socket);
        let (worker, accepted) = self.accepted(&client);
        (client, worker, accepted)
    }

    /// Which listener's queue holds `client`'s connection (polling the non-blocking
    /// listeners until a deadline: the handshake may finish just after connect returns).
    fn accepted(&self, client: &TcpStream) -> (usize, TcpStream) {
        let local = client.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            for (index, listener) in self.listeners.iter().enumerate() {
                match listener.accept() {
                    Ok((stream, peer)) if peer == local => return (index, stream),
                    Ok((_, peer)) => panic!("listener {index} accepted a stray {peer}"),
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                    Err(error) => panic!("accept on listener {index}: {error}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "no listener accepted {local} within 2s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn counters(&self) -> Vec<u64> {
        self.steering.counters().unwrap()
    }
}

fn decisions(counters: &[u64]) -> Vec<u64> {
    counters[..WORKERS as usize].to_vec()
}

#[test]
fn verifier_accepts_the_program() {
    in_fresh_netns(|| {
        let group = Group::new(Policy::FlowHash, 0);
        let stats = group.steering.program_stats().unwrap();
        assert!(stats.instructions > 0, "{stats:?}");
        let fds = group.steering.fds().unwrap();
        use std::os::fd::AsRawFd as _;
        let raw = [
            fds.program,
            fds.sockets,
            fds.workers,
            fds.control,
            fds.counters,
        ]
        .map(|fd| fd.as_raw_fd());
        assert!(raw.iter().all(|&fd| fd > 2), "{raw:?}");
        // WORKERS was created mmapable (the kernel says so), and maps.
        let workers_info = aya::maps::MapData::from_fd(fds.workers.try_clone_to_owned().unwrap())
            .unwrap()
            .info()
            .unwrap();
        assert_ne!(workers_info.map_flags() & BPF_F_MMAPABLE, 0);
        let workers = group.steering.map_workers().unwrap();
        assert_eq!(workers.state(0), Some(WorkerState::active(0)));
        let report = format!(
            "kernel: {} instructions after verification (xlated), {} verified instructions, \
             {} bytes JIT-compiled\nmaps: SOCKETS, WORKERS (map_flags {:#x}: BPF_F_MMAPABLE, \
             mmap'ed), CONTROL, COUNTERS; {} workers at most\n",
            stats.instructions,
            stats
                .verified_instructions
                .map_or("?".to_string(), |n| n.to_string()),
            stats.jited_bytes,
            workers_info.map_flags(),
            MAX_WORKERS,
        );
        print!("{report}");
        if let Some(path) = std::env::var_os("KAKEHI_EBPF_LOAD_REPORT") {
            std::fs::write(path, report).unwrap();
        }
        // One connection through the attached program, to see it run.
        let (_client, _worker, _accepted) = group.connect();
        let total: u64 = decisions(&group.counters()).iter().sum();
        assert_eq!(total, 1);
    });
}

#[test]
fn flow_hash_spreads_over_every_worker() {
    in_fresh_netns(|| {
        let group = Group::new(Policy::FlowHash, 0);
        let mut seen = [0u64; WORKERS as usize];
        for _ in 0..CONNECTIONS {
            let (_client, worker, _accepted) = group.connect();
            seen[worker] += 1;
        }
        println!("flow-hash over {CONNECTIONS} connections: {seen:?}");
        // Each expects 500 (a binomial standard deviation of ~19): 400 is 5 sigmas off.
        for (worker, &count) in seen.iter().enumerate() {
            assert!(count >= 400, "worker {worker} got {count}: {seen:?}");
        }
        assert_eq!(decisions(&group.counters()), seen.to_vec());
    });
}

#[test]
fn flow_hash_is_stable_for_a_4_tuple() {
    in_fresh_netns(|| {
        let group = Group::new(Policy::FlowHash, 0);
        let mut used = [false; WORKERS as usize];
        for port in 40_000..40_040u16 {
            let (client, first, accepted) = group.connect_from(port);
            drop((client, accepted));
            used[first] = true;
            for _ in 0..5 {
                let (client, again, accepted) = group.connect_from(port);
                assert_eq!(again, first, "source port {port} moved");
                drop((client, accepted));
            }
        }
        assert!(used.iter().all(|&u| u), "40 tuples used only {used:?}");
    });
}

#[test]
fn least_connections_picks_the_fewest_live() {
    in_fresh_netns(|| {
        let mut group = Group::new(Policy::LeastConnections, 0);
        // Set through the map (syscall): the fewest is worker 2, then worker 1.
        group.set_live([5, 3, 0, 7]);
        let (_c, worker, _a) = group.connect();
        assert_eq!(worker, 2);
        group.set_live([5, 3, 9, 7]);
        let (_c, worker, _a) = group.connect();
        assert_eq!(worker, 1);

        // Held connections counted through the mmap, as workers will: every new connection
        // goes to a worker with the fewest, so the counts never drift apart by more than 1.
        group.set_live([0; WORKERS as usize]);
        let live = group.steering.map_workers().unwrap();
        let mut seen = [0u64; WORKERS as usize];
        for n in 0..CONNECTIONS {
            let before: Vec<u32> = (0..WORKERS).map(|i| live.state(i).unwrap().live).collect();
            let fewest = *before.iter().min().unwrap();
            let (_client, worker, _accepted) = group.connect();
            assert_eq!(
                before[worker], fewest,
                "connection {n} went to worker {worker} with {before:?} live"
            );
            live.live(worker as u32)
                .unwrap()
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            seen[worker] += 1;
        }
        println!("least-connections over {CONNECTIONS} connections: {seen:?}");
        assert!(
            seen.iter().all(|&n| n == (CONNECTIONS / 4) as u64),
            "{seen:?}"
        );
    });
}

#[test]
fn power_of_two_balances_and_prefers_the_lower() {
    in_fresh_netns(|| {
        let group = Group::new(Policy::PowerOfTwo, 0);
        let live = group.steering.map_workers().unwrap();
        let mut seen = [0u64; WORKERS as usize];
        for _ in 0..CONNECTIONS {
            let (_client, worker, _accepted) = group.connect();
            live.live(worker as u32)
                .unwrap()
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            seen[worker] += 1;
        }
        println!("power-of-two over {CONNECTIONS} connections (held): {seen:?}");
        let (min, max) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(max - min <= 10, "{seen:?}");
        // The most loaded worker never wins a draw: with 3 at 0 live and one at 1000, two
        // distinct picks always include a 0.
        for (index, n) in (0..).zip([1000, 0, 0, 0]) {
            live.live(index)
                .unwrap()
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
        for _ in 0..200 {
            let (_client, worker, _accepted) = group.connect();
            assert_ne!(worker, 0);
        }
    });
}

#[test]
fn a_draining_worker_receives_nothing() {
    for policy in [
        Policy::FlowHash,
        Policy::LeastConnections,
        Policy::PowerOfTwo,
    ] {
        in_fresh_netns(move || {
            let mut group = Group::new(policy, 0);
            let state = group.steering.worker_state(2).unwrap();
            group
                .steering
                .set_worker_state(2, state.draining())
                .unwrap();
            let mut seen = [0u64; WORKERS as usize];
            for _ in 0..CONNECTIONS / 2 {
                let (_client, worker, _accepted) = group.connect();
                seen[worker] += 1;
            }
            println!("{policy:?} with worker 2 draining: {seen:?}");
            assert_eq!(seen[2], 0, "{policy:?}: {seen:?}");
            assert!(
                seen.iter().enumerate().all(|(i, &n)| i == 2 || n > 0),
                "{policy:?}: {seen:?}"
            );
        });
    }
}

#[test]
fn all_full_is_refused_in_the_kernel_and_accepted_again_below_the_limit() {
    const LIMIT: u32 = 3;
    in_fresh_netns(|| {
        let group = Group::new(Policy::FlowHash, LIMIT);
        let live = group.steering.map_workers().unwrap();
        // Fill every worker to its limit with real, held connections.
        let mut held = Vec::new();
        for _ in 0..WORKERS * LIMIT {
            let (client, worker, accepted) = group.connect();
            live.live(worker as u32)
                .unwrap()
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            held.push((client, worker, accepted));
        }
        for worker in 0..WORKERS {
            assert_eq!(live.state(worker).unwrap().live, LIMIT);
        }

        // The (workers x limit + 1)-th: refused by the kernel, at once.
        let started = Instant::now();
        let refused = TcpStream::connect_timeout(&group.addr, Duration::from_secs(3));
        let waited = started.elapsed();
        match refused {
            Err(error) => {
                println!(
                    "all full: connect failed after {waited:?} with {error} ({:?})",
                    error.kind()
                );
                assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
            }
            Ok(stream) => panic!(
                "connect succeeded while every worker was full ({:?})",
                stream.local_addr()
            ),
        }
        for listener in &group.listeners {
            assert_eq!(
                listener.accept().map(|_| ()).unwrap_err().kind(),
                ErrorKind::WouldBlock,
                "a refused connection reached an accept queue"
            );
        }
        assert_eq!(group.counters()[counter::DROPS_ALL_FULL as usize], 1);

        // The held ones keep working.
        for (client, _, accepted) in &mut held {
            client.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            accepted.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
        }

        // One closes: its worker is below the limit again and gets the next connection.
        let (client, worker, accepted) = held.remove(5);
        drop((client, accepted));
        live.live(worker as u32)
            .unwrap()
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let (_client, next, _accepted) = group.connect();
        assert_eq!(next, worker);
        assert_eq!(group.counters()[counter::DROPS_ALL_FULL as usize], 1);
    });
}

#[test]
fn no_active_worker_is_refused_and_counted() {
    in_fresh_netns(|| {
        let mut group = Group::new(Policy::LeastConnections, 0);
        for index in 0..WORKERS {
            let state = group.steering.worker_state(index).unwrap();
            group
                .steering
                .set_worker_state(index, state.draining())
                .unwrap();
        }
        let error = TcpStream::connect_timeout(&group.addr, Duration::from_secs(3)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
        let counters = group.counters();
        assert_eq!(counters[counter::DROPS_NO_WORKER as usize], 1);
        assert_eq!(counters[counter::DROPS_ALL_FULL as usize], 0);
    });
}

#[test]
fn an_empty_slot_falls_back_to_the_kernel_hash() {
    in_fresh_netns(|| {
        let mut group = Group::new(Policy::LeastConnections, 0);
        // Worker 3 has the fewest live but no socket in its slot.
        group.set_live([1, 1, 1, 0]);
        group.steering.clear_worker_socket(3).unwrap();
        let (_client, _worker, _accepted) = group.connect();
        let counters = group.counters();
        assert_eq!(counters[counter::SELECT_FAILED as usize], 1);
        assert_eq!(decisions(&counters).iter().sum::<u64>(), 0);
    });
}

#[test]
fn the_policy_can_change_at_runtime() {
    in_fresh_netns(|| {
        let mut group = Group::new(Policy::FlowHash, 0);
        group.set_live([4, 4, 1, 4]);
        group.steering.set_policy(Policy::LeastConnections).unwrap();
        assert_eq!(group.steering.control().policy, 1);
        for _ in 0..20 {
            let (_c, worker, _a) = group.connect();
            assert_eq!(worker, 2);
        }
    });
}

#[test]
fn worker_indexes_and_counts_are_checked() {
    in_fresh_netns(|| {
        assert!(matches!(
            Steering::load(Policy::FlowHash, 0),
            Err(steering::SteeringError::WorkerCount { workers: 0 })
        ));
        assert!(matches!(
            Steering::load(Policy::FlowHash, MAX_WORKERS + 1),
            Err(steering::SteeringError::WorkerCount { .. })
        ));
        let mut group = Group::new(Policy::FlowHash, 0);
        assert!(matches!(
            group
                .steering
                .set_worker_state(WORKERS, WorkerState::active(0)),
            Err(steering::SteeringError::WorkerIndex {
                index: 4,
                workers: 4
            })
        ));
    });
}
