//! One SO_REUSEPORT listener per worker on the same address: the kernel spreads new connections
//! across them, and no worker ever touches another's accept queue.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use super::ServerError;

/// Pending connections the kernel queues per listener before refusing more.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds `count` listeners on `addr`. With port 0 the first one picks the port and the others
/// join it.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<mio::net::TcpListener>, ServerError> {
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let err = |source| ServerError::Listen { addr, source };
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&bound.into()).map_err(err)?;
        socket.listen(LISTEN_BACKLOG).map_err(err)?;
        let std_listener: std::net::TcpListener = socket.into();
        bound = std_listener.local_addr().map_err(err)?;
        out.push(mio::net::TcpListener::from_std(std_listener));
    }
    Ok(out)
}
