//! Byte tunnels for connections that stop being HTTP: a `101 Switching
//! Protocols` upgrade (WebSocket) and an HTTP `CONNECT`. Each tunnel is a
//! spawned task copying both ways until either side closes. Transparent
//! mode's opaque TCP (`transparent`) copies with [`copy_both_ways`] too.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Joins the client's upgraded connection with the upstream's.
pub fn splice_upgrade(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                copy_both_ways(TokioIo::new(down), TokioIo::new(up)).await;
            }
            Err(err) => tracing::debug!(error = %err, "upgrade did not complete"),
        }
    });
}

/// Joins the client's CONNECT connection with a TCP stream to the target.
pub fn splice_connect(downstream: OnUpgrade, upstream: TcpStream) {
    tokio::spawn(async move {
        match downstream.await {
            Ok(down) => {
                copy_both_ways(TokioIo::new(down), upstream).await;
            }
            Err(err) => tracing::debug!(error = %err, "CONNECT upgrade did not complete"),
        }
    });
}

/// Copies until either side closes; the bytes `a` → `b` and `b` → `a`
/// (both 0 when the copy ended with an error).
pub async fn copy_both_ways<A, B>(mut a: A, mut b: B) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut a, &mut b).await {
        Ok((sent, received)) => {
            tracing::debug!(sent, received, "tunnel closed");
            (sent, received)
        }
        Err(err) => {
            tracing::debug!(error = %err, "tunnel closed with an error");
            (0, 0)
        }
    }
}
