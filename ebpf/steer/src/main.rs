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
//! The map layouts and the policies are lb-ebpf-common's; loading, attaching and filling the
//! maps is lbd's `steering` module.
//!
//! Built for any other target (the host, as `cargo clippy --workspace` does), it is an
//! ordinary binary that says it is an eBPF program and exits 1: the workspace's features are
//! unified, so on the host lb-ebpf-common comes with std, and a `no_std` panic handler would
//! clash with std's.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::btf_maps::{Array, PerCpuArray, ReusePortSockArray};
use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::macros::{btf_map, sk_reuseport};
use aya_ebpf::programs::SkReuseportContext;
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

/// Why a connection was not steered to a worker.
enum Miss {
    /// No worker can take it: SK_DROP.
    NoWorker(NoWorker),
    /// `bpf_sk_select_reuseport` failed for the picked slot: SK_PASS, the kernel picks.
    SelectFailed,
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
    }
}

/// Picks a worker under the configured policy and selects its socket; returns the worker.
fn try_steer(ctx: &SkReuseportContext) -> Result<u32, Miss> {
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
/// map lookups) are not GPL-only, so the kernel needs no GPL-compatible string.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
