//! Where was this connection going? In transparent mode iptables
//! `REDIRECT` rewrote the destination of every intercepted connection to
//! one of the sidecar's listeners; conntrack remembers the original one,
//! which the socket option `SO_ORIGINAL_DST` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6) reads back for an accepted socket.
//!
//! Called once per accepted connection on a transparent listener (by
//! `server`); the answer travels with the connection's `Peer` to the
//! request path (`route`, `proxy`) and to the opaque TCP splice
//! (`transparent`).

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt, SockaddrIn, SockaddrIn6};
use tokio::net::TcpStream;

/// Why the original destination could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OriginalDstError {
    #[error("cannot read the local address of the connection: {0}")]
    LocalAddr(std::io::Error),
    #[error("SO_ORIGINAL_DST failed for a connection to {local} (no conntrack entry?): {errno}")]
    Getsockopt {
        local: SocketAddr,
        errno: nix::Error,
    },
}

/// The destination the client connected to before iptables redirected the
/// connection here; `None` when it was not redirected (the client
/// connected to this listener itself: the original destination is the
/// local address).
pub fn original_destination(stream: &TcpStream) -> Result<Option<SocketAddr>, OriginalDstError> {
    let local = stream.local_addr().map_err(OriginalDstError::LocalAddr)?;
    let original = match local {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst)
            .map(|raw| SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(raw)))),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst)
            .map(|raw| SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(raw)))),
    }
    .map_err(|errno| OriginalDstError::Getsockopt { local, errno })?;
    Ok(redirected(local, original))
}

/// `Some(original)` only when it differs from where the connection landed.
fn redirected(local: SocketAddr, original: SocketAddr) -> Option<SocketAddr> {
    (original != local).then_some(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_to_the_listener_itself_was_not_redirected() {
        let local: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let away: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        assert_eq!(redirected(local, local), None);
        assert_eq!(redirected(local, away), Some(away));
    }

    #[tokio::test]
    async fn an_unredirected_loopback_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        // Without conntrack the kernel answers ENOENT; with it, the local
        // address. Either way: not redirected.
        match original_destination(&accepted) {
            Ok(original) => assert_eq!(original, None),
            Err(OriginalDstError::Getsockopt { local, .. }) => assert_eq!(local, addr),
            Err(other) => panic!("{other}"),
        }
    }
}
