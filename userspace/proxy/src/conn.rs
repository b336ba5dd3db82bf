//! The slab's entry: one client connection, HTTP or TCP passthrough (or an HTTP one still
//! waiting for its PROXY protocol header), and the calls the worker makes on any.

use crate::balancer::ClusterState;
use crate::cx::Cx;
use crate::proxied::AwaitingProxy;
use crate::session::{Flow, Session};
use crate::tcp::TcpSession;
use crate::worker::DRAIN_IDLE_GRACE;
use std::time::Instant;

/// One client connection: an HTTP session or a TCP passthrough one.
// The slab stores sessions inline: a TCP session in an HTTP-sized slot wastes a few hundred
// bytes, where boxing would cost every HTTP connection an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Conn {
    Http(Session),
    Tcp(TcpSession),
    /// An `http`/`https` listener's connection with `accept_proxy = true`, until its PROXY
    /// protocol header is read: then it becomes `Http`.
    Proxied(AwaitingProxy),
}

impl Conn {
    pub(crate) fn id(&self) -> u64 {
        match self {
            Conn::Http(s) => s.id,
            Conn::Tcp(s) => s.id,
            Conn::Proxied(p) => p.id,
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        match self {
            Conn::Http(s) => s.deadline,
            Conn::Tcp(s) => s.deadline,
            Conn::Proxied(p) => p.deadline,
        }
    }

    pub(crate) fn scheduled(&mut self) -> &mut Option<Instant> {
        match self {
            Conn::Http(s) => &mut s.scheduled,
            Conn::Tcp(s) => &mut s.scheduled,
            Conn::Proxied(p) => &mut p.scheduled,
        }
    }

    pub(crate) fn front_event(&mut self, readable: bool, writable: bool, read_closed: bool) {
        match self {
            Conn::Http(s) => s.front_event(readable, writable, read_closed),
            Conn::Tcp(s) => s.front_event(readable, writable, read_closed),
            // It peeks at the socket whenever it is driven.
            Conn::Proxied(_) => {}
        }
    }

    pub(crate) fn back_event(
        &mut self,
        fd: usize,
        readable: bool,
        writable: bool,
        read_closed: bool,
    ) {
        match self {
            Conn::Http(s) => s.back_event(fd, readable, writable, read_closed),
            Conn::Tcp(s) => s.back_event(fd, readable, writable, read_closed),
            Conn::Proxied(_) => {}
        }
    }

    /// Stopped at its step cap with work left: drive it again without waiting for an event
    /// (edge-triggered readiness brings none for bytes already there).
    pub(crate) fn yielded(&self) -> bool {
        match self {
            Conn::Http(s) => s.yielded(),
            Conn::Tcp(s) => s.yielded(),
            Conn::Proxied(_) => false,
        }
    }

    /// Idle long enough to be closed by a draining worker: an HTTP connection idle between
    /// requests for the drain's grace, a TCP one that has received nothing yet.
    pub(crate) fn idle_past_grace(&self, now: Instant) -> bool {
        match self {
            Conn::Http(s) => s
                .idle_since()
                .is_some_and(|since| now >= since + DRAIN_IDLE_GRACE),
            Conn::Tcp(s) => s.is_idle(),
            Conn::Proxied(_) => true,
        }
    }

    pub(crate) fn remap_clusters(&mut self, old: &[ClusterState], new: &[ClusterState]) {
        match self {
            Conn::Http(s) => s.remap_clusters(old, new),
            Conn::Tcp(s) => s.remap_clusters(old, new),
            Conn::Proxied(_) => {}
        }
    }

    pub(crate) fn drive(&mut self, cx: &mut Cx) -> Flow {
        match self {
            Conn::Http(s) => s.drive(cx),
            Conn::Tcp(s) => s.drive(cx),
            Conn::Proxied(p) => match p.advance(cx) {
                Ok(None) => Flow::Continue,
                Ok(Some(session)) => {
                    *self = Conn::Http(session);
                    self.drive(cx)
                }
                Err(flow) => flow,
            },
        }
    }

    pub(crate) fn timeout(&mut self, cx: &mut Cx) -> Flow {
        match self {
            Conn::Http(s) => s.timeout(cx),
            Conn::Tcp(s) => s.timeout(cx),
            // Its header did not come within `timeouts.request_header`.
            Conn::Proxied(_) => Flow::Close,
        }
    }

    pub(crate) fn close(self, cx: &mut Cx) {
        match self {
            Conn::Http(s) => s.close(cx),
            Conn::Tcp(s) => s.close(cx),
            Conn::Proxied(p) => p.close(cx),
        }
    }
}
