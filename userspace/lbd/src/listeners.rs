//! Binding the listeners of the config: TCP sockets with SO_REUSEADDR and SO_REUSEPORT (so
//! that several workers, and the next generation during an upgrade, can share one address),
//! non-blocking, with a deep accept backlog.

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, TcpListener};

const BACKLOG: i32 = 4096;

pub fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    let what = || format!("listener {address}");
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .with_context(what)?;
    socket.set_reuse_address(true).with_context(what)?;
    socket.set_reuse_port(true).with_context(what)?;
    if address.is_ipv6() {
        socket.set_only_v6(true).with_context(what)?;
    }
    socket.set_nonblocking(true).with_context(what)?;
    socket.bind(&address.into()).with_context(|| {
        format!("listener {address}: cannot bind (is another process using it?)")
    })?;
    socket.listen(BACKLOG).with_context(what)?;
    Ok(socket.into())
}
