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
//!
//! Per-client limits ([`Steering::set_limits`]) use three more maps (LIMITS, CONNS, RATES)
//! and a second program, `track`, which counts each client's open connections. `track` is a
//! `sock_ops` program: it runs for the TCP sockets of a cgroup, so it is linked to the cgroup
//! (v2) lbd runs in, the first time a listener asks for a connection limit. The link is an fd
//! this value owns: dropping it detaches `track`, and the upgrade hands it over with the maps
//! so that counting never stops nor runs twice.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, ReusePortSockArray};
use aya::programs::{ProgramError, SkReuseport, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};
use lb_ebpf_common::client::{ClientKey, Limits};
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
    /// Per-client limits asked of a program handed over by an lbd that had none.
    #[error(
        "per-client limits (max_connections_per_ip, max_connection_rate_per_ip) need the \
         steering program of this version, and the running one was handed over by an older \
         lbd: restart lbd to load it"
    )]
    NoPerIp,
    /// Linking `track` to lbd's cgroup failed.
    #[error("counting connections per client: {what}: {source}")]
    Track {
        /// What was being done.
        what: String,
        /// The system's error.
        #[source]
        source: io::Error,
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
    /// The per-client limits' maps and program; `None` when the program was handed over by
    /// an lbd from before them.
    per_ip: Option<PerIp>,
}

/// The maps of the per-client limits, the `track` program and its cgroup link.
#[derive(Debug)]
struct PerIp {
    /// `track`'s fd when the program was handed over (a loaded one lives in the Ebpf).
    adopted_track: Option<OwnedFd>,
    /// Why `track` is not loaded, if it is not: connection limits cannot be counted then.
    track_error: Option<String>,
    limits_map: Map,
    conns_map: Map,
    rates_map: Map,
    /// `track` linked to lbd's cgroup, once a listener asked for a connection limit.
    link: Option<OwnedFd>,
    /// What LIMITS holds.
    limits: Limits,
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

/// BPF_PROG_TYPE_SOCK_OPS.
pub const PROG_TYPE_SOCK_OPS: u32 = 13;
/// BPF_MAP_TYPE_LRU_HASH.
pub const MAP_TYPE_LRU_HASH: u32 = 9;

/// Owned fds of the program and its maps, as received from the previous lbd.
#[derive(Debug)]
pub struct OwnedSteeringFds {
    pub program: OwnedFd,
    pub sockets: OwnedFd,
    pub workers: OwnedFd,
    pub control: OwnedFd,
    pub counters: OwnedFd,
    /// Absent when the previous lbd predates per-client limits.
    pub per_ip: Option<OwnedPerIpFds>,
}

/// Owned fds of the per-client limits, as received from the previous lbd.
#[derive(Debug)]
pub struct OwnedPerIpFds {
    /// Absent when the previous lbd could not load it (no CAP_NET_ADMIN).
    pub track: Option<OwnedFd>,
    pub limits: OwnedFd,
    pub conns: OwnedFd,
    pub rates: OwnedFd,
    /// `track`'s cgroup link, if the previous lbd had made it.
    pub link: Option<OwnedFd>,
}

/// Borrowed fds of the per-client limits, for handing them to another process.
#[derive(Debug, Clone, Copy)]
pub struct PerIpFds<'a> {
    /// The `sock_ops` program `track`, if it is loaded.
    pub track: Option<BorrowedFd<'a>>,
    /// LIMITS (array of one Limits).
    pub limits: BorrowedFd<'a>,
    /// CONNS (LRU hash).
    pub conns: BorrowedFd<'a>,
    /// RATES (LRU hash).
    pub rates: BorrowedFd<'a>,
    /// `track`'s cgroup link, once made.
    pub link: Option<BorrowedFd<'a>>,
}

/// A listener's per-client limits, as the config gives them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientLimits {
    /// `max_connections_per_ip` (0: none).
    pub max_connections: u32,
    /// `max_connection_rate_per_ip`, connections per second (0: none).
    pub rate_per_second: u32,
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
    /// The per-client limits' program and maps (absent: handed over by an older lbd).
    pub per_ip: Option<PerIpFds<'a>>,
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
        // `track` is a sock_ops program, which the kernel loads only with CAP_NET_ADMIN: without
        // it lbd steers as before, and only a connection limit fails, saying why.
        let track_error = match track_mut(&mut ebpf)?.load() {
            Ok(()) => None,
            Err(ProgramError::LoadError {
                io_error,
                verifier_log,
            }) => Some(match io_error.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => format!(
                    "the kernel loads its sock_ops program only with CAP_NET_ADMIN, which lbd \
                     lacks ({io_error})"
                ),
                _ => format!(
                    "the kernel refused its sock_ops program: {io_error}\nverifier log:\n{verifier_log}"
                ),
            }),
            Err(other) => Some(format!("loading its sock_ops program failed: {other}")),
        };
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(SteeringError::Missing { what: "map", name })
        };
        let sockets = take(names::SOCKETS)?;
        let workers_map = take(names::WORKERS)?;
        let control_map = take(names::CONTROL)?;
        let counters_map = take(names::COUNTERS)?;
        let per_ip = PerIp {
            adopted_track: None,
            track_error,
            limits_map: take(names::LIMITS)?,
            conns_map: take(names::CONNS)?,
            rates_map: take(names::RATES)?,
            link: None,
            limits: Limits::default(),
        };
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
            per_ip: Some(per_ip),
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
        let per_ip = match fds.per_ip {
            None => None,
            Some(per_ip) => {
                let limits_map = open(per_ip.limits, names::LIMITS)?;
                let limits = Array::<_, Limits>::try_from(&limits_map)
                    .map_err(map_error(names::LIMITS, "opening"))?
                    .get(&0, 0)
                    .map_err(map_error(names::LIMITS, "reading"))?;
                Some(PerIp {
                    track_error: per_ip.track.is_none().then(|| {
                        "the lbd that loaded the steering program could not load its sock_ops \
                         program (no CAP_NET_ADMIN); a restart with it loads one"
                            .to_owned()
                    }),
                    adopted_track: per_ip.track,
                    limits_map,
                    conns_map: open(per_ip.conns, names::CONNS)?,
                    rates_map: open(per_ip.rates, names::RATES)?,
                    link: per_ip.link,
                    limits,
                })
            }
        };
        Ok(Self {
            program: Program::Adopted(fds.program),
            sockets,
            workers_map,
            control_map,
            counters_map,
            control,
            per_ip,
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
    /// ([`counter::LEN`] of them: decisions per worker, then the drops). A program handed
    /// over by an lbd from before per-client limits has no per-client drops: they read 0.
    pub fn counters(&self) -> Result<Vec<u64>> {
        let counters = PerCpuArray::<_, u64>::try_from(&self.counters_map)
            .map_err(map_error(names::COUNTERS, "opening"))?;
        (0..counter::LEN)
            .map(|index| {
                match counters.get(&index, 0) {
                    Ok(per_cpu) => Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add)),
                    Err(_) if index >= counter::LEN_WITHOUT_PER_IP => Ok(0),
                    Err(error) => Err(error),
                }
                .map_err(map_error(names::COUNTERS, "reading"))
            })
            .collect()
    }

    /// Sets the per-client limits of `listener`, the listener this program steers: LIMITS
    /// is written (the next SYN sees it), and the first time a connection limit is asked
    /// for, `track` is linked to lbd's cgroup, so that connections count from then on.
    pub fn set_limits(&mut self, wanted: ClientLimits, listener: impl AsFd) -> Result<()> {
        if self.per_ip.is_none() {
            return if wanted == ClientLimits::default() {
                Ok(())
            } else {
                Err(SteeringError::NoPerIp)
            };
        }
        let needs_link = wanted.max_connections != 0
            && self
                .per_ip
                .as_ref()
                .is_some_and(|per_ip| per_ip.link.is_none());
        let link = if needs_link {
            Some(cgroup::link_sock_ops(self.track_fd()?)?)
        } else {
            None
        };
        let Some(per_ip) = self.per_ip.as_mut() else {
            return Err(SteeringError::NoPerIp);
        };
        // With max_connections 0, `track` counts no new connection; the ones it counted
        // still count down when they close (it asked for their state changes).
        let limits = per_ip_limits(wanted, listener.as_fd())?;
        if link.is_some() {
            per_ip.link = link;
        }
        let mut map = Array::<_, Limits>::try_from(&mut per_ip.limits_map)
            .map_err(map_error(names::LIMITS, "opening"))?;
        map.set(0, limits, 0)
            .map_err(map_error(names::LIMITS, "writing"))?;
        per_ip.limits = limits;
        Ok(())
    }

    /// The fd of `track`, or why there is none.
    fn track_fd(&self) -> Result<BorrowedFd<'_>> {
        let Some(per_ip) = &self.per_ip else {
            return Err(SteeringError::NoPerIp);
        };
        let missing = || {
            track_error(
                per_ip
                    .track_error
                    .as_deref()
                    .unwrap_or("its sock_ops program is not loaded"),
                io::Error::from(io::ErrorKind::Unsupported),
            )
        };
        if per_ip.track_error.is_some() {
            return Err(missing());
        }
        match (&self.program, &per_ip.adopted_track) {
            (_, Some(fd)) => Ok(fd.as_fd()),
            (Program::Loaded(ebpf), None) => Ok(track(ebpf)?
                .fd()
                .map_err(|source| SteeringError::Program {
                    action: "getting the fd of track,",
                    source,
                })?
                .as_fd()),
            (Program::Adopted(_), None) => Err(missing()),
        }
    }

    /// What LIMITS holds (zeroed: none, or no per-client limits in this program).
    pub fn limits(&self) -> Limits {
        self.per_ip
            .as_ref()
            .map(|per_ip| per_ip.limits)
            .unwrap_or_default()
    }

    /// The open connections `track` counts for the client at `ip` (0 for one not seen).
    pub fn client_connections(&self, ip: std::net::IpAddr) -> Result<i64> {
        let Some(per_ip) = &self.per_ip else {
            return Ok(0);
        };
        let conns = HashMap::<_, ClientKey, u64>::try_from(&per_ip.conns_map)
            .map_err(map_error(names::CONNS, "opening"))?;
        match conns.get(&ClientKey::of(ip), 0) {
            Ok(open) => Ok(i64::from_ne_bytes(open.to_ne_bytes())),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(error) => Err(map_error(names::CONNS, "reading")(error)),
        }
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
        let per_ip = match &self.per_ip {
            None => None,
            Some(per_ip) => Some(PerIpFds {
                track: self.track_fd().ok(),
                limits: map_fd(&per_ip.limits_map, names::LIMITS)?,
                conns: map_fd(&per_ip.conns_map, names::CONNS)?,
                rates: map_fd(&per_ip.rates_map, names::RATES)?,
                link: per_ip.link.as_ref().map(AsFd::as_fd),
            }),
        };
        Ok(SteeringFds {
            program,
            sockets: map_fd(&self.sockets, names::SOCKETS)?,
            workers: map_fd(&self.workers_map, names::WORKERS)?,
            control: map_fd(&self.control_map, names::CONTROL)?,
            counters: map_fd(&self.counters_map, names::COUNTERS)?,
            per_ip,
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

fn track(ebpf: &Ebpf) -> Result<&SockOps> {
    ebpf.program(names::TRACK)
        .and_then(|program| program.try_into().ok())
        .ok_or(SteeringError::Missing {
            what: "sock_ops program",
            name: names::TRACK,
        })
}

fn track_mut(ebpf: &mut Ebpf) -> Result<&mut SockOps> {
    ebpf.program_mut(names::TRACK)
        .and_then(|program| program.try_into().ok())
        .ok_or(SteeringError::Missing {
            what: "sock_ops program",
            name: names::TRACK,
        })
}

fn track_error(what: &str, source: io::Error) -> SteeringError {
    SteeringError::Track {
        what: what.to_owned(),
        source,
    }
}

/// LIMITS for `wanted` on the listener behind `listener`: its port, address and network
/// namespace, which `track` checks a connection against.
fn per_ip_limits(wanted: ClientLimits, listener: BorrowedFd<'_>) -> Result<Limits> {
    let local = socket2::SockRef::from(&listener)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| track_error("reading the listener's address", io::Error::last_os_error()))?;
    let (rate_interval_ns, rate_tolerance_ns) = Limits::rate(wanted.rate_per_second);
    Ok(Limits {
        max_connections: wanted.max_connections,
        port: u32::from(local.port()),
        netns_cookie: cgroup::netns_cookie(listener)
            .map_err(|source| track_error("reading the listener's SO_NETNS_COOKIE", source))?,
        local: ClientKey::of(local.ip()),
        bind_any: u32::from(local.ip().is_unspecified()),
        reserved: 0,
        rate_interval_ns,
        rate_tolerance_ns,
    })
}

/// The kernel calls `track` needs that aya does not expose: a cgroup link whose fd this
/// process owns (aya keeps its links' fds to itself, and the upgrade must hand this one
/// over), and a socket's network namespace cookie.
mod cgroup {
    #![allow(unsafe_code)]

    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    /// BPF_LINK_CREATE.
    const BPF_LINK_CREATE: libc::c_long = 28;
    /// BPF_CGROUP_SOCK_OPS.
    const BPF_CGROUP_SOCK_OPS: u32 = 3;
    /// SO_NETNS_COOKIE (Linux 5.14).
    const SO_NETNS_COOKIE: libc::c_int = 71;

    /// The link_create part of `union bpf_attr`, padded to a size the kernel accepts.
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        rest: [u64; 6],
    }

    /// Links the `sock_ops` program `program` to the cgroup (v2) this process is in: from
    /// now on it runs for every TCP socket of that cgroup and its descendants, until the
    /// returned fd (and every duplicate of it) is closed.
    pub fn link_sock_ops(program: BorrowedFd<'_>) -> super::Result<OwnedFd> {
        let path = own_cgroup()
            .map_err(|source| super::track_error("finding lbd's cgroup (v2)", source))?;
        let dir = std::fs::File::open(&path).map_err(|source| {
            super::track_error(&format!("opening cgroup {}", path.display()), source)
        })?;
        let attr = LinkCreate {
            prog_fd: fd_u32(program.as_raw_fd()),
            target_fd: fd_u32(dir.as_raw_fd()),
            attach_type: BPF_CGROUP_SOCK_OPS,
            flags: 0,
            rest: [0; 6],
        };
        // SAFETY: bpf(BPF_LINK_CREATE) reads `size` bytes of `attr`, a live, initialised
        // struct of that size; both fds are open for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_LINK_CREATE,
                &attr as *const LinkCreate,
                std::mem::size_of::<LinkCreate>(),
            )
        };
        let fd = i32::try_from(rc).unwrap_or(-1);
        if fd < 0 {
            return Err(super::track_error(
                &format!("linking track to cgroup {}", path.display()),
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: a non-negative return of BPF_LINK_CREATE is a new fd this process owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The network namespace cookie of `socket`'s namespace.
    pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64, and
        // updates `len`; the fd is open for the call.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }

    fn fd_u32(fd: i32) -> u32 {
        u32::try_from(fd).unwrap_or(u32::MAX)
    }

    /// The directory of this process's cgroup in the cgroup v2 hierarchy: the mount point
    /// of the `cgroup2` filesystem (from /proc/self/mountinfo) joined with the `0::` line of
    /// /proc/self/cgroup.
    fn own_cgroup() -> io::Result<std::path::PathBuf> {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
        let own = cgroups
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or_else(|| io::Error::other("/proc/self/cgroup has no cgroup v2 line (0::)"))?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mount = mounts
            .lines()
            .find_map(|line| {
                // ... mount-point ... - fstype source options
                let (fields, fs) = line.split_once(" - ")?;
                fs.starts_with("cgroup2 ")
                    .then(|| fields.split(' ').nth(4))
                    .flatten()
            })
            .ok_or_else(|| io::Error::other("no cgroup2 filesystem is mounted"))?;
        Ok(std::path::Path::new(mount).join(own.trim_start_matches('/')))
    }
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(data)
        | Map::PerCpuArray(data)
        | Map::ReusePortSockArray(data)
        | Map::LruHashMap(data) => Some(data),
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
