//! eBPF connection steering: loads kakehi's `sk_reuseport` program and drives its maps.
//!
//! This module owns the loader side of DESIGN.md's "eBPF socket steering": it loads the
//! program object that `build.rs` built from `ebpf/steer` (embedded in the binary), creates
//! its maps, attaches the program to a listener's SO_REUSEPORT group, fills SOCKETS (slot =
//! worker index) and WORKERS (per-worker state), sets the policy, reads the counters, and
//! hands out the fds of the program and the maps (for the upgrade handoff, and for workers,
//! which mmap WORKERS with [`lb_ebpf_common::mmap::WorkerStates`] to publish their live
//! connection counts). One [`Steering`] serves one reuseport group, since a socket array's
//! slot holds one socket. It leaves to the supervisor when to call what: fill the maps, then
//! attach; mark a worker draining before it stops; keep every listener fd open (closing the
//! last one empties its slot). Map layouts and the policies are `lb-ebpf-common`'s.
//!
//! The program stays attached when this value is dropped (the kernel holds it through the
//! group); [`Steering::detach`] removes it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use aya::maps::{Array, Map, MapData, MapError, PerCpuArray, ReusePortSockArray};
use aya::programs::{ProgramError, SkReuseport};
use aya::{Ebpf, EbpfError, EbpfLoader};
use lb_ebpf_common::mmap::WorkerStates;
use lb_ebpf_common::{counter, names, Control, Policy, WorkerState, MAX_WORKERS};

/// The program object built by `build.rs` (aya-build) from `ebpf/steer`; empty when the
/// build was told to skip it (`AYA_BUILD_SKIP=1`).
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"))
}

/// What can go wrong while loading or driving the steering program.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    /// The binary carries no program: it was built with `AYA_BUILD_SKIP=1`.
    #[error(
        "this lbd was built without its eBPF program (AYA_BUILD_SKIP was set): rebuild it \
         after `cargo xtask setup`, or set steering = \"kernel\""
    )]
    NotBuilt,
    /// The worker count is outside 1..=MAX_WORKERS.
    #[error("{workers} workers: eBPF steering handles 1 to {MAX_WORKERS}")]
    WorkerCount {
        /// The count asked for.
        workers: u32,
    },
    /// A worker index at or beyond the configured worker count.
    #[error("worker index {index} is out of range: the program steers {workers} workers")]
    WorkerIndex {
        /// The index given.
        index: u32,
        /// The configured worker count.
        workers: u32,
    },
    /// Parsing the object or creating its maps failed (EPERM here means no CAP_BPF).
    #[error("loading the eBPF object (BTF, maps) failed: {source}")]
    Object {
        /// aya's error.
        #[source]
        source: EbpfError,
    },
    /// The object lacks a program or map this module needs (an object/loader mismatch).
    #[error("the eBPF object has no {what} named {name}")]
    Missing {
        /// "program" or "map".
        what: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// The kernel refused the program; the verifier's log says why.
    #[error("the kernel refused the steering program: {io_error}\nverifier log:\n{verifier_log}")]
    Load {
        /// The BPF_PROG_LOAD error.
        #[source]
        io_error: io::Error,
        /// The verifier's log.
        verifier_log: String,
    },
    /// A program operation (load, attach, detach, info) failed.
    #[error("{action} the steering program failed: {source}")]
    Program {
        /// What was being done.
        action: &'static str,
        /// aya's error.
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("{action} map {map} failed: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What was being done.
        action: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// Mapping WORKERS into this process failed.
    #[error("mmap of map WORKERS failed: {source}")]
    Mmap {
        /// The mmap error.
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, SteeringError>;

/// The loaded steering program of one reuseport group, and its maps.
#[derive(Debug)]
pub struct Steering {
    /// Owns the program (and its fd): loaded here, or adopted from the previous lbd.
    program: Program,
    sockets: Map,
    workers_map: Map,
    control_map: Map,
    counters_map: Map,
    /// What CONTROL holds.
    control: Control,
}

/// The steering program: loaded by this process, or only its fd, handed over by the lbd
/// this one replaced (the program is attached to the group already and stays so).
#[derive(Debug)]
enum Program {
    Loaded(Box<Ebpf>),
    Adopted(OwnedFd),
}

/// BPF_PROG_TYPE_SK_REUSEPORT.
pub const PROG_TYPE_SK_REUSEPORT: u32 = 21;
/// BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY.
pub const MAP_TYPE_ARRAY: u32 = 2;
pub const MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;

/// Owned fds of the program and its maps, as received from the previous lbd.
#[derive(Debug)]
pub struct OwnedSteeringFds {
    pub program: OwnedFd,
    pub sockets: OwnedFd,
    pub workers: OwnedFd,
    pub control: OwnedFd,
    pub counters: OwnedFd,
}

/// Borrowed fds of the program and its maps, for handing them to another process.
#[derive(Debug, Clone, Copy)]
pub struct SteeringFds<'a> {
    /// The `sk_reuseport` program.
    pub program: BorrowedFd<'a>,
    /// SOCKETS (REUSEPORT_SOCKARRAY).
    pub sockets: BorrowedFd<'a>,
    /// WORKERS (mmapable array of WorkerState).
    pub workers: BorrowedFd<'a>,
    /// CONTROL (array of one Control).
    pub control: BorrowedFd<'a>,
    /// COUNTERS (per-CPU array of u64).
    pub counters: BorrowedFd<'a>,
}

/// What the kernel reports about the loaded program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    /// Instructions after the verifier's rewrites (xlated length / 8).
    pub instructions: u32,
    /// Instructions the verifier walked to prove the program safe, if the kernel says.
    pub verified_instructions: Option<u32>,
    /// Bytes of JIT-compiled machine code (0 without the JIT).
    pub jited_bytes: u32,
}

impl Steering {
    /// Loads the program with `policy` over `workers` workers (1..=64). Every worker starts
    /// inactive with no socket, so a connection is refused until the supervisor has set the
    /// states ([`Steering::set_worker_state`]) and sockets; attach after that.
    pub fn load(policy: Policy, workers: u32) -> Result<Self> {
        if workers == 0 || workers > MAX_WORKERS {
            return Err(SteeringError::WorkerCount { workers });
        }
        if object().is_empty() {
            return Err(SteeringError::NotBuilt);
        }
        let mut ebpf = EbpfLoader::new()
            .load(object())
            .map_err(|source| SteeringError::Object { source })?;
        let program = program_mut(&mut ebpf)?;
        program.load().map_err(|error| match error {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => SteeringError::Load {
                io_error,
                verifier_log: verifier_log.to_string(),
            },
            source => SteeringError::Program {
                action: "loading",
                source,
            },
        })?;
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(SteeringError::Missing { what: "map", name })
        };
        let sockets = take(names::SOCKETS)?;
        let workers_map = take(names::WORKERS)?;
        let control_map = take(names::CONTROL)?;
        let counters_map = take(names::COUNTERS)?;
        let mut steering = Self {
            program: Program::Loaded(Box::new(ebpf)),
            sockets,
            workers_map,
            control_map,
            counters_map,
            control: Control {
                policy: policy.as_u32(),
                workers,
                generation: 0,
            },
        };
        steering.write_control()?;
        Ok(steering)
    }

    /// Takes over a program and maps that another lbd loaded and attached (the upgrade
    /// handoff). Each map's type and name is checked; the policy, worker count and
    /// generation are read back from CONTROL.
    pub fn adopt(fds: OwnedSteeringFds) -> Result<Self> {
        let open = |fd: OwnedFd, name: &'static str| -> Result<Map> {
            let data = MapData::from_fd(fd).map_err(map_error(name, "adopting"))?;
            let info = data
                .info()
                .map_err(map_error(name, "reading the info of"))?;
            if info.name_as_str() != Some(name) {
                return Err(SteeringError::Missing { what: "map", name });
            }
            Map::from_map_data(data).map_err(map_error(name, "adopting"))
        };
        let sockets = open(fds.sockets, names::SOCKETS)?;
        let workers_map = open(fds.workers, names::WORKERS)?;
        let control_map = open(fds.control, names::CONTROL)?;
        let counters_map = open(fds.counters, names::COUNTERS)?;
        for (map, name) in [
            (&sockets, names::SOCKETS),
            (&workers_map, names::WORKERS),
            (&control_map, names::CONTROL),
            (&counters_map, names::COUNTERS),
        ] {
            if map_data(map).is_none() {
                return Err(SteeringError::Missing {
                    what: "array map",
                    name,
                });
            }
        }
        let control = Array::<_, Control>::try_from(&control_map)
            .map_err(map_error(names::CONTROL, "opening"))?
            .get(&0, 0)
            .map_err(map_error(names::CONTROL, "reading"))?;
        if control.workers == 0 || control.workers > MAX_WORKERS {
            return Err(SteeringError::WorkerCount {
                workers: control.workers,
            });
        }
        Ok(Self {
            program: Program::Adopted(fds.program),
            sockets,
            workers_map,
            control_map,
            counters_map,
            control,
        })
    }

    /// Attaches the program to the SO_REUSEPORT group of `listener` (any socket of the group:
    /// SO_ATTACH_REUSEPORT_EBPF applies to the whole group).
    pub fn attach(&self, listener: impl AsFd) -> Result<()> {
        program(self.loaded()?)?
            .attach(listener)
            .map_err(|source| SteeringError::Program {
                action: "attaching",
                source,
            })
    }

    /// Removes whatever reuseport program is attached to `listener`'s group: the kernel goes
    /// back to its own hash.
    pub fn detach(listener: impl AsFd) -> Result<()> {
        SkReuseport::detach(listener).map_err(|source| SteeringError::Program {
            action: "detaching",
            source,
        })
    }

    /// Puts `socket` (a listening SO_REUSEPORT socket of this group) in worker `index`'s slot.
    /// The map holds the socket itself, not the fd: closing the fd later does not empty the
    /// slot while another fd of the socket stays open.
    pub fn set_worker_socket(&mut self, index: u32, socket: impl AsFd) -> Result<()> {
        self.check_index(index)?;
        let mut sockets = ReusePortSockArray::try_from(&mut self.sockets)
            .map_err(map_error(names::SOCKETS, "opening"))?;
        sockets
            .set(index, &socket.as_fd(), 0)
            .map_err(map_error(names::SOCKETS, "setting a slot of"))
    }

    /// Empties worker `index`'s slot: the program's selection of it fails and the kernel
    /// picks by hash, so mark the worker inactive or draining first.
    pub fn clear_worker_socket(&mut self, index: u32) -> Result<()> {
        self.check_index(index)?;
        let mut sockets = ReusePortSockArray::try_from(&mut self.sockets)
            .map_err(map_error(names::SOCKETS, "opening"))?;
        sockets
            .clear_index(&index)
            .map_err(map_error(names::SOCKETS, "clearing a slot of"))
    }

    /// Writes worker `index`'s whole state (flags, live, limit) with one syscall. A worker
    /// that updates `live` through its mmap races with this write: set `live` here only
    /// before the worker starts, or for tests.
    pub fn set_worker_state(&mut self, index: u32, state: WorkerState) -> Result<()> {
        self.check_index(index)?;
        let mut workers = Array::<_, WorkerState>::try_from(&mut self.workers_map)
            .map_err(map_error(names::WORKERS, "opening"))?;
        workers
            .set(index, state, 0)
            .map_err(map_error(names::WORKERS, "writing"))
    }

    /// Worker `index`'s state as the program sees it now.
    pub fn worker_state(&self, index: u32) -> Result<WorkerState> {
        self.check_index(index)?;
        let workers = Array::<_, WorkerState>::try_from(&self.workers_map)
            .map_err(map_error(names::WORKERS, "opening"))?;
        workers
            .get(&index, 0)
            .map_err(map_error(names::WORKERS, "reading"))
    }

    /// Switches the policy; the next connection uses it.
    pub fn set_policy(&mut self, policy: Policy) -> Result<()> {
        self.control.policy = policy.as_u32();
        self.write_control()
    }

    /// Changes how many workers (slots 0..workers) the program picks from.
    pub fn set_workers(&mut self, workers: u32) -> Result<()> {
        if workers == 0 || workers > MAX_WORKERS {
            return Err(SteeringError::WorkerCount { workers });
        }
        self.control.workers = workers;
        self.write_control()
    }

    /// Records the supervisor generation in CONTROL (the program ignores it).
    pub fn set_generation(&mut self, generation: u32) -> Result<()> {
        self.control.generation = generation;
        self.write_control()
    }

    /// What CONTROL holds.
    pub fn control(&self) -> Control {
        self.control
    }

    /// The counters summed over every CPU, indexed by `lb_ebpf_common::counter`
    /// ([`counter::LEN`] of them: decisions per worker, then the drops).
    pub fn counters(&self) -> Result<Vec<u64>> {
        let counters = PerCpuArray::<_, u64>::try_from(&self.counters_map)
            .map_err(map_error(names::COUNTERS, "opening"))?;
        (0..counter::LEN)
            .map(|index| {
                counters
                    .get(&index, 0)
                    .map(|per_cpu| per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
                    .map_err(map_error(names::COUNTERS, "reading"))
            })
            .collect()
    }

    /// The fds of the program and its maps, borrowed from this value.
    pub fn fds(&self) -> Result<SteeringFds<'_>> {
        let program = match &self.program {
            Program::Adopted(fd) => fd.as_fd(),
            Program::Loaded(ebpf) => program(ebpf)?
                .fd()
                .map_err(|source| SteeringError::Program {
                    action: "getting the fd of",
                    source,
                })?
                .as_fd(),
        };
        Ok(SteeringFds {
            program,
            sockets: map_fd(&self.sockets, names::SOCKETS)?,
            workers: map_fd(&self.workers_map, names::WORKERS)?,
            control: map_fd(&self.control_map, names::CONTROL)?,
            counters: map_fd(&self.counters_map, names::COUNTERS)?,
        })
    }

    /// The fd of WORKERS, which a worker maps (see [`WorkerStates::map`]); dup it
    /// (`try_clone_to_owned`) to pass it on.
    pub fn workers_fd(&self) -> Result<BorrowedFd<'_>> {
        map_fd(&self.workers_map, names::WORKERS)
    }

    /// Maps WORKERS into this process (what a worker does with [`Steering::workers_fd`]).
    pub fn map_workers(&self) -> Result<WorkerStates> {
        WorkerStates::map(self.workers_fd()?).map_err(|source| SteeringError::Mmap { source })
    }

    /// What the kernel says about the loaded program: its size and the verifier's work.
    pub fn program_stats(&self) -> Result<ProgramStats> {
        let info = program(self.loaded()?)?
            .info()
            .map_err(|source| SteeringError::Program {
                action: "reading the info of",
                source,
            })?;
        Ok(ProgramStats {
            instructions: info.size_translated().unwrap_or(0) / 8,
            verified_instructions: info.verified_instruction_count(),
            jited_bytes: info.size_jitted(),
        })
    }

    fn loaded(&self) -> Result<&Ebpf> {
        match &self.program {
            Program::Loaded(ebpf) => Ok(ebpf),
            Program::Adopted(_) => Err(SteeringError::Missing {
                what: "loaded program (it was handed over by the previous lbd)",
                name: names::PROGRAM,
            }),
        }
    }

    fn check_index(&self, index: u32) -> Result<()> {
        if index >= self.control.workers {
            return Err(SteeringError::WorkerIndex {
                index,
                workers: self.control.workers,
            });
        }
        Ok(())
    }

    fn write_control(&mut self) -> Result<()> {
        let mut control = Array::<_, Control>::try_from(&mut self.control_map)
            .map_err(map_error(names::CONTROL, "opening"))?;
        control
            .set(0, self.control, 0)
            .map_err(map_error(names::CONTROL, "writing"))
    }
}

fn program(ebpf: &Ebpf) -> Result<&SkReuseport> {
    ebpf.program(names::PROGRAM)
        .and_then(|program| program.try_into().ok())
        .ok_or(SteeringError::Missing {
            what: "sk_reuseport program",
            name: names::PROGRAM,
        })
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut SkReuseport> {
    ebpf.program_mut(names::PROGRAM)
        .and_then(|program| program.try_into().ok())
        .ok_or(SteeringError::Missing {
            what: "sk_reuseport program",
            name: names::PROGRAM,
        })
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(data) | Map::PerCpuArray(data) | Map::ReusePortSockArray(data) => Some(data),
        _ => None,
    }
}

fn map_fd<'a>(map: &'a Map, name: &'static str) -> Result<BorrowedFd<'a>> {
    map_data(map)
        .map(|data| data.fd().as_fd())
        .ok_or(SteeringError::Missing {
            what: "array map",
            name,
        })
}

fn map_error(map: &'static str, action: &'static str) -> impl Fn(MapError) -> SteeringError {
    move |source| SteeringError::Map {
        map,
        action,
        source,
    }
}
