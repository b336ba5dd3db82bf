//! lb-ebpf: `steer`, the `sk_reuseport` program that picks a worker for each new connection.
//!
//! The kernel runs it for every SYN that reaches a listener's SO_REUSEPORT group. It reads the
//! policy and worker count from CONTROL and the per-worker state from WORKERS (which the
//! workers update through an mmap), picks a worker with `lb_ebpf_common::pick`, and selects
//! that worker's socket from SOCKETS (slot = worker index). When every worker is full, or none
//! is active, it returns SK_DROP: the kernel answers the SYN with a reset, so the client sees
//! ECONNREFUSED and no worker spends anything on it. When the selection itself fails (an empty
//! slot) it returns SK_PASS without one, and the kernel falls back to its own reuseport hash,
//! so a hole in SOCKETS costs balance, not connections. Each outcome bumps a per-CPU counter.
//!
//! Before it picks a worker, it applies the listener's per-client limits (LIMITS, see
//! `lb_ebpf_common::client`): a client with `max_connections` open connections, or one over
//! its connection rate, gets SK_DROP too. The open connections are counted by the second
//! program here, `track`, a `sock_ops` program lbd attaches to its cgroup: it adds one to the
//! client's count in CONNS when a connection to this listener is established, and asks the
//! kernel for that socket's state changes, so that it takes the one off when it closes.
//!
//! The map layouts and the policies are lb-ebpf-common's; loading, attaching and filling the
//! maps is lbd's `steering` module.
//!
//! Built for any other target (the host, as `cargo clippy --workspace` does), it is an
//! ordinary binary that says it is an eBPF program and exits 1: the workspace's features are
//! unified, so on the host lb-ebpf-common comes with std, and a `no_std` panic handler would
//! clash with std's.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::bindings::bpf_hdr_start_off::BPF_HDR_START_NET;
use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::bindings::{
    BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
    BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
};
use aya_ebpf::btf_maps::{Array, LruHashMap, PerCpuArray, ReusePortSockArray};
use aya_ebpf::helpers::{
    bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_skb_load_bytes_relative,
};
use aya_ebpf::macros::{btf_map, sk_reuseport, sock_ops};
use aya_ebpf::programs::{SkReuseportContext, SockOpsContext};
use aya_ebpf::EbpfContext as _;
use lb_ebpf_common::client::{self, ClientKey, Limits};
use lb_ebpf_common::pick::{self, NoWorker};
use lb_ebpf_common::{counter, Control, Policy, WorkerState, BPF_F_MMAPABLE, MAX_WORKERS};

const SLOTS: usize = MAX_WORKERS as usize;

/// Slot = worker index, value = that worker's listening socket (set by the loader).
#[btf_map]
static SOCKETS: ReusePortSockArray<SLOTS> = ReusePortSockArray::new();

/// Per-worker state; mmapable so that workers publish `live` without a syscall.
#[btf_map]
static WORKERS: Array<WorkerState, SLOTS, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Entry 0: the policy and the worker count.
#[btf_map]
static CONTROL: Array<Control, 1> = Array::new();

/// Decisions per worker and the drops, per CPU (see `lb_ebpf_common::counter`).
#[btf_map]
static COUNTERS: PerCpuArray<u64, { counter::LEN as usize }> = PerCpuArray::new();

/// Entry 0: the listener's per-client limits (all zero: none).
#[btf_map]
static LIMITS: Array<Limits, 1> = Array::new();

/// How many clients the per-client maps remember; the least recently seen go first.
const CLIENTS: usize = 65_536;

/// Open connections per client, written by `track`. Read as signed: a count that went below
/// zero (a close counted for a connection opened before counting began) reads as none.
#[btf_map]
static CONNS: LruHashMap<ClientKey, u64, CLIENTS> = LruHashMap::new();

/// Each client's theoretical arrival time for the rate limit (`client::admit`).
#[btf_map]
static RATES: LruHashMap<ClientKey, u64, CLIENTS> = LruHashMap::new();

/// Why a connection was not steered to a worker.
enum Miss {
    /// No worker can take it: SK_DROP.
    NoWorker(NoWorker),
    /// `bpf_sk_select_reuseport` failed for the picked slot: SK_PASS, the kernel picks.
    SelectFailed,
    /// The client is at its open-connection limit: SK_DROP.
    PerIpConnections,
    /// The client is over its connection rate: SK_DROP.
    PerIpRate,
}

#[sk_reuseport]
pub fn steer(ctx: SkReuseportContext) -> u32 {
    match try_steer(&ctx) {
        Ok(worker) => {
            count(counter::DECISIONS + worker);
            SK_PASS
        }
        Err(Miss::NoWorker(NoWorker::AllFull)) => {
            count(counter::DROPS_ALL_FULL);
            SK_DROP
        }
        Err(Miss::NoWorker(NoWorker::NoneActive)) => {
            count(counter::DROPS_NO_WORKER);
            SK_DROP
        }
        Err(Miss::SelectFailed) => {
            count(counter::SELECT_FAILED);
            SK_PASS
        }
        Err(Miss::PerIpConnections) => {
            count(counter::DROPS_PER_IP_CONNECTIONS);
            SK_DROP
        }
        Err(Miss::PerIpRate) => {
            count(counter::DROPS_PER_IP_RATE);
            SK_DROP
        }
    }
}

/// Picks a worker under the configured policy and selects its socket; returns the worker.
fn try_steer(ctx: &SkReuseportContext) -> Result<u32, Miss> {
    // An array lookup of index 0 cannot fail; zeroed Limits (none) skip the client checks.
    let limits = LIMITS.get(0).copied().unwrap_or_default();
    if limits.max_connections != 0 || limits.rate_interval_ns != 0 {
        check_client(ctx, &limits)?;
    }
    // An array lookup of index 0 cannot fail; a zeroed Control (no worker) drops.
    let control = CONTROL.get(0).copied().unwrap_or_default();
    let workers = control.workers;
    let worker = match Policy::from_u32(control.policy).unwrap_or_default() {
        Policy::FlowHash => pick::flow_hash(ctx.hash(), workers, worker_state),
        Policy::LeastConnections => pick::least_connections(ctx.hash(), workers, worker_state),
        Policy::PowerOfTwo => pick::power_of_two(random(), random(), workers, worker_state),
    }
    .map_err(Miss::NoWorker)?;
    SOCKETS
        .select_reuseport(ctx, worker)
        .map_err(|_| Miss::SelectFailed)?;
    Ok(worker)
}

/// Applies the per-client limits to the connection's source address. A packet whose address
/// cannot be read passes: the limits never refuse a connection they cannot attribute.
#[inline(always)]
fn check_client(ctx: &SkReuseportContext, limits: &Limits) -> Result<(), Miss> {
    let Some(client) = source_of(ctx) else {
        return Ok(());
    };
    if limits.max_connections != 0 {
        if let Some(open) = CONNS.get_ptr(client) {
            // SAFETY: a pointer from a successful hash lookup points to an aligned u64 of the
            // element, which stays valid during this program run (RCU). `track` updates it
            // with atomic adds; an aligned 8-byte load sees either value whole (the volatile
            // read is BPF's plain load: its `core` has no atomic load the backend selects).
            let open = unsafe { core::ptr::read_volatile(open) };
            if open as i64 >= i64::from(limits.max_connections) {
                return Err(Miss::PerIpConnections);
            }
        }
    }
    if limits.rate_interval_ns != 0 {
        // SAFETY: bpf_ktime_get_ns takes no argument and has no precondition.
        let now = unsafe { bpf_ktime_get_ns() };
        let tat = match RATES.get_ptr(client) {
            // SAFETY: as for CONNS above; two CPUs may race on one client's entry, and the
            // loser's update is lost, which admits at most one connection too many.
            Some(tat) => unsafe { core::ptr::read_volatile(tat) },
            None => 0,
        };
        let next = client::admit(tat, now, limits.rate_interval_ns, limits.rate_tolerance_ns);
        if next == 0 {
            return Err(Miss::PerIpRate);
        }
        // A full LRU map evicts its oldest entry, so this only fails on a kernel error; the
        // connection is admitted then.
        let _ = RATES.insert(client, next, 0);
    }
    Ok(())
}

/// The source address of the SYN, from its IP header.
#[inline(always)]
fn source_of(ctx: &SkReuseportContext) -> Option<ClientKey> {
    // The version nibble, then the source address: bytes 12..16 of an IPv4 header, 8..24 of
    // an IPv6 one, copied into words as they are (ClientKey's words are in memory order).
    let mut first = 0u8;
    load_network(ctx, 0, &mut first)?;
    match first >> 4 {
        4 => {
            let mut word = 0u32;
            load_network(ctx, 12, &mut word)?;
            Some(ClientKey::v4(word))
        }
        6 => {
            let mut words = [0u32; 4];
            load_network(ctx, 8, &mut words)?;
            Some(ClientKey::v6(words))
        }
        _ => None,
    }
}

/// Fills `into` with the bytes at `offset` past the start of the packet's network header.
/// `T` is a plain integer or an array of them: any bytes make a valid value.
#[inline(always)]
fn load_network<T: Copy>(ctx: &SkReuseportContext, offset: u32, into: &mut T) -> Option<()> {
    // SAFETY: the helper writes exactly size_of::<T>() bytes (the length passed) into `into`,
    // a live value of that size on the caller's stack, and T is an integer or an array of
    // them, for which every byte pattern is valid; the context pointer is the program's own.
    let rc = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            offset,
            (into as *mut T).cast(),
            core::mem::size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    (rc == 0).then_some(())
}

/// Counts the open connections of a listener's clients: one more when a connection to the
/// listener is established, one less when it closes. Runs for every TCP socket of lbd's
/// cgroup (lbd attaches it there), so it first checks that the socket is the listener's (its
/// local port, address and network namespace); for those it asks the kernel for state
/// changes, which is how it sees the close. Always returns 1 (the kernel ignores the value
/// for these two operations).
#[sock_ops]
pub fn track(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        let limits = LIMITS.get(0).copied().unwrap_or_default();
        if limits.max_connections != 0 && is_listeners(&ctx, &limits) {
            let client = remote_of(&ctx);
            add(&client, 1);
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB {
        // Only sockets this program flagged above get here; each closes once.
        if ctx.arg(1) == BPF_TCP_CLOSE && ctx.arg(0) != BPF_TCP_CLOSE {
            let client = remote_of(&ctx);
            add(&client, u64::MAX);
        }
    }
    1
}

/// Whether the socket is a connection accepted on the listener LIMITS describes.
#[inline(always)]
fn is_listeners(ctx: &SockOpsContext, limits: &Limits) -> bool {
    if ctx.local_port() != limits.port {
        return false;
    }
    // SAFETY: the helper takes the program's own context and has no other precondition.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != limits.netns_cookie {
        return false;
    }
    limits.bind_any != 0 || local_of(ctx) == limits.local
}

#[inline(always)]
fn remote_of(ctx: &SockOpsContext) -> ClientKey {
    let ops = ctx.ops;
    if ctx.family() == AF_INET {
        ClientKey::v4(ctx.remote_ip4())
    } else {
        // SAFETY: `ops` is the program's context; each word is read on its own at a constant
        // offset, the only way the verifier allows context reads (copying the array whole
        // makes LLVM step a pointer through the context, which it refuses).
        unsafe {
            ClientKey::v6([
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ])
        }
    }
}

#[inline(always)]
fn local_of(ctx: &SockOpsContext) -> ClientKey {
    let ops = ctx.ops;
    if ctx.family() == AF_INET {
        ClientKey::v4(ctx.local_ip4())
    } else {
        // SAFETY: as in `remote_of`.
        unsafe {
            ClientKey::v6([
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ])
        }
    }
}

/// AF_INET, as `bpf_sock_ops.family` holds it.
const AF_INET: u32 = 2;

/// Adds `delta` (wrapping: `u64::MAX` takes one off) to the client's count in CONNS, making
/// the entry when there is none. Taking one off a client not in the map does nothing.
#[inline(always)]
fn add(client: &ClientKey, delta: u64) {
    if let Some(open) = CONNS.get_ptr_mut(client) {
        // SAFETY: a pointer from a successful hash lookup points to the element's aligned
        // u64, valid during this run; every writer updates it with atomic adds.
        unsafe { atomic_add(open, delta) };
        return;
    }
    if delta != 1 {
        return;
    }
    if CONNS.insert(client, 1u64, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU made the entry in between: add to it.
        if let Some(open) = CONNS.get_ptr_mut(client) {
            // SAFETY: as above.
            unsafe { atomic_add(open, 1) };
        }
    }
}

/// `*at += delta`, atomically (BPF_ATOMIC BPF_ADD).
///
/// # Safety
/// `at` points to an aligned u64 that every other writer also updates atomically.
#[inline(always)]
unsafe fn atomic_add(at: *mut u64, delta: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's promise.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            at, delta,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's promise.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(at) }
        .fetch_add(delta, core::sync::atomic::Ordering::Relaxed);
}

/// Worker `index`'s state as it is now (workers write `live` through their mmap at any
/// time); an index the map does not have reads as an inactive worker.
#[inline(always)]
fn worker_state(index: u32) -> WorkerState {
    match WORKERS.get_ptr(index) {
        // SAFETY: the pointer comes from a successful lookup in an array map, so it points to
        // a whole, aligned WorkerState that lives as long as the map; the read is volatile
        // because userspace writes the same memory concurrently (aligned u32 stores).
        Some(entry) => unsafe { core::ptr::read_volatile(entry) },
        None => WorkerState::default(),
    }
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: bpf_get_prandom_u32 takes no argument and has no precondition.
    unsafe { bpf_get_prandom_u32() }
}

/// Adds one to counter `index` on this CPU.
#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it is this
        // CPU's aligned u64 slot; the program is not preempted on this CPU while it runs, so
        // nothing else writes the slot during the increment.
        unsafe { *slot = (*slot).wrapping_add(1) };
    }
}

/// Nothing here can panic today. If a panic path ever appears, this endless loop makes the
/// verifier refuse the program at load time instead of letting it run.
#[cfg(target_arch = "bpf")]
#[panic_handler]
#[allow(clippy::empty_loop)]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() -> std::process::ExitCode {
    eprintln!(
        "lb-ebpf is an eBPF program for bpfel-unknown-none: lbd's build script builds it and \
         lbd loads it; it does not run on {}",
        std::env::consts::ARCH
    );
    std::process::ExitCode::FAILURE
}

/// The project's licence. The helpers used (bpf_sk_select_reuseport, bpf_get_prandom_u32,
/// bpf_skb_load_bytes_relative, bpf_ktime_get_ns, bpf_get_netns_cookie,
/// bpf_sock_ops_cb_flags_set, map operations) are not GPL-only, so the kernel needs no
/// GPL-compatible string.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
