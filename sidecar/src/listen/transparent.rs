//! Transparent mode at the connection level: what a listener does with a
//! connection that iptables redirected to it (`sidecar init-iptables`).
//!
//! ```text
//! accept ─► original_dst (where it was going) ─► sniff
//!     HTTP/1.x, h2 ─► the listener's Handler; the original destination
//!                     rides on the connection's Peer (route, proxy)
//!     anything else ─► Interception::splice: TCP to the destination,
//!                     bytes copied both ways (tunnel), counted (tcp_*)
//! ```
//!
//! Destinations: outbound, the original one (a mesh endpoint's pod IP is
//! intercepted again there by its own sidecar's inbound rules; a
//! connection made to the outbound listener itself has none and is
//! closed; one that would come back to this sidecar is refused); inbound,
//! the pod's own address, i.e. the original destination ([`app_address`]):
//! never 127.0.0.1, so a port the app bound only on localhost stays
//! private (as Istio since 1.10). Under `MTLSPolicy strict` the inbound
//! closes plaintext opaque connections, and `AuthorizationPolicy`s apply
//! to opaque connections without HTTP attributes (`Handler::admits_opaque`).
//!
//! Opaque TCP to a mesh endpoint with an identity, from a sidecar with a
//! workload certificate ([`MeshTcp`]), goes over mTLS with ALPN
//! `meshlet-tcp` to that endpoint's sidecar (its inbound listener), with
//! the port the app was calling as a 2-byte preamble; that sidecar checks
//! its zero-trust policies for the caller (`Handler::admits_opaque`) and
//! splices it to its app on that port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshlet_api::identity::SpiffeId;
use tokio::net::TcpStream;

use crate::identity::tls;
use crate::identity::{Hop, WorkloadIdentity};
use crate::listen::tunnel::copy_both_ways;
use crate::telemetry::metrics::TcpMetrics;

/// The app's address for a connection that was going to `original`: the
/// original destination itself (the pod's own IP and the port called), so
/// only what the app exposes on the pod's address is reachable and a port
/// it bound on localhost stays private; the configured app address (the
/// port the app declared with `--app-port`) when the connection was not
/// redirected (another sidecar called the inbound listener directly) or
/// was going to the app port.
pub fn app_address(app: SocketAddr, original: Option<SocketAddr>) -> SocketAddr {
    match original {
        Some(original) if original.port() != app.port() => original,
        _ => app,
    }
}

/// Whether a connection to `addr` would reach one of `own_listeners`.
pub fn loops_back(own_listeners: &[SocketAddr], addr: SocketAddr) -> bool {
    own_listeners.iter().any(|own| {
        own.port() == addr.port()
            && (own.ip() == addr.ip() || own.ip().is_unspecified() || addr.ip().is_loopback())
    })
}

/// The mesh endpoint a connection to an address reaches: its sidecar's
/// inbound address and the identity it must present.
pub type MeshLookup = Box<dyn Fn(SocketAddr) -> Option<(SocketAddr, Arc<SpiffeId>)> + Send + Sync>;

/// Outbound opaque TCP over the mesh hop.
pub struct MeshTcp {
    pub identity: Arc<WorkloadIdentity>,
    pub lookup: MeshLookup,
}

/// One transparent listener's handling of intercepted connections.
pub struct Interception {
    /// Inbound: the app (its host is where every connection goes).
    app: Option<SocketAddr>,
    /// This sidecar's listeners, never a destination.
    own_listeners: Vec<SocketAddr>,
    connect_timeout: Duration,
    metrics: TcpMetrics,
    /// Outbound with a control plane: mTLS to mesh endpoints.
    mesh: Option<MeshTcp>,
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception")
            .field("app", &self.app)
            .field("own_listeners", &self.own_listeners)
            .finish_non_exhaustive()
    }
}

impl Interception {
    /// The inbound listener's: connections go to the app at `app`'s host.
    pub fn inbound(app: SocketAddr, connect_timeout: Duration, metrics: TcpMetrics) -> Self {
        Interception {
            app: Some(app),
            own_listeners: Vec::new(),
            connect_timeout,
            metrics,
            mesh: None,
        }
    }

    /// The outbound listener's: connections go where they were going.
    pub fn outbound(
        own_listeners: Vec<SocketAddr>,
        connect_timeout: Duration,
        metrics: TcpMetrics,
    ) -> Self {
        Interception {
            app: None,
            own_listeners,
            connect_timeout,
            metrics,
            mesh: None,
        }
    }

    /// Opaque TCP to mesh endpoints with an identity goes over mTLS.
    pub fn with_mesh(mut self, mesh: Option<MeshTcp>) -> Self {
        self.mesh = mesh;
        self
    }

    /// Inbound: whether a connection that was going to `original` (`None`:
    /// not redirected) is for the app's HTTP port or this listener's own
    /// port (`own_port`), where only HTTP (or the mesh hop) is spoken.
    pub fn is_http_port(&self, original: Option<SocketAddr>, own_port: Option<u16>) -> bool {
        let Some(app) = self.app else {
            return false;
        };
        match original {
            None => true,
            Some(original) => original.port() == app.port() || Some(original.port()) == own_port,
        }
    }

    /// Where an opaque connection that was going to `original` goes.
    pub fn opaque_destination(&self, original: Option<SocketAddr>) -> Option<SocketAddr> {
        match self.app {
            Some(app) => Some(app_address(app, original)),
            None => original.filter(|dst| !loops_back(&self.own_listeners, *dst)),
        }
    }

    /// Splices an opaque connection to its destination until either side
    /// closes (a destination that cannot be reached closes the client's
    /// connection: a TCP client sees what it would without the mesh).
    ///
    /// Log lines inherit the listener and the peer from the connection's
    /// span (`server`).
    pub async fn splice(&self, client: TcpStream, original: Option<SocketAddr>) {
        let Some(destination) = self.opaque_destination(original) else {
            tracing::debug!("opaque connection with no destination; closed");
            return;
        };
        if let Some(mesh) = &self.mesh {
            if let Some((endpoint, identity)) = (mesh.lookup)(destination) {
                match mesh.identity.hop(Some(&identity)) {
                    Hop::Mtls(identity) => {
                        return self
                            .splice_mtls(client, mesh, endpoint, &identity, destination.port())
                            .await
                    }
                    Hop::Expired(_) => {
                        tracing::debug!(%destination, "opaque connection to a meshed endpoint while our certificate expired; closed");
                        return;
                    }
                    Hop::Plain => {}
                }
            }
        }
        let upstream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(destination)).await
            {
                Ok(Ok(upstream)) => upstream,
                Ok(Err(error)) => {
                    tracing::debug!(%destination, %error, "opaque connection: cannot connect");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%destination, "opaque connection: connect timed out");
                    return;
                }
            };
        let _ = upstream.set_nodelay(true);
        self.metrics.connections.inc();
        tracing::debug!(%destination, "opaque TCP spliced");
        let (sent, received) = copy_both_ways(client, upstream).await;
        self.metrics.sent.inc_by(sent);
        self.metrics.received.inc_by(received);
    }
}

impl Interception {
    /// Splices `client` to `upstream` (connected) until either side
    /// closes, counted on this listener's `tcp_*` metrics.
    pub async fn splice_counted<C, U>(&self, client: C, upstream: U)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.metrics.connections.inc();
        let (sent, received) = copy_both_ways(client, upstream).await;
        self.metrics.sent.inc_by(sent);
        self.metrics.received.inc_by(received);
    }

    /// Opaque TCP over the mesh hop: mTLS (ALPN `meshlet-tcp`) to the
    /// endpoint's sidecar, which splices it to its app.
    async fn splice_mtls(
        &self,
        client: TcpStream,
        mesh: &MeshTcp,
        endpoint: SocketAddr,
        identity: &Arc<SpiffeId>,
        port: u16,
    ) {
        let connect = async {
            let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(endpoint))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            let _ = stream.set_nodelay(true);
            let mut tls = tls::connect(
                &mesh.identity,
                stream,
                endpoint,
                identity,
                tls::ALPN_TCP,
                self.connect_timeout,
            )
            .await?;
            tls::write_opaque_port(&mut tls, port).await?;
            Ok::<_, std::io::Error>(tls)
        };
        let upstream = match connect.await {
            Ok(upstream) => upstream,
            Err(error) => {
                tracing::warn!(%endpoint, %error, "opaque connection over mTLS failed; closed");
                return;
            }
        };
        self.metrics.connections.inc();
        tracing::debug!(%endpoint, %identity, "opaque TCP spliced over mTLS");
        let (sent, received) = copy_both_ways(client, upstream).await;
        self.metrics.sent.inc_by(sent);
        self.metrics.received.inc_by(received);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::direction::Direction;
    use crate::telemetry::metrics::Metrics;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn inbound_goes_to_the_pods_own_address_never_localhost() {
        let app = addr("127.0.0.1:8080");
        assert_eq!(app_address(app, None), app);
        assert_eq!(
            app_address(app, Some(addr("10.0.0.2:9090"))),
            addr("10.0.0.2:9090"),
            "a port bound only on 127.0.0.1 is not reachable"
        );
        assert_eq!(
            app_address(app, Some(addr("10.0.0.2:8080"))),
            app,
            "the declared app port"
        );
        let inbound = Interception::inbound(
            app,
            Duration::from_secs(1),
            Metrics::new("orders").tcp(Direction::Inbound),
        );
        assert_eq!(inbound.opaque_destination(None), Some(app));
    }

    #[test]
    fn outbound_goes_to_the_original_destination_never_back_here() {
        let outbound = Interception::outbound(
            vec![addr("127.0.0.1:15001"), addr("0.0.0.0:15006")],
            Duration::from_secs(1),
            Metrics::new("orders").tcp(Direction::Outbound),
        );
        assert_eq!(outbound.opaque_destination(None), None);
        assert_eq!(
            outbound.opaque_destination(Some(addr("10.0.0.2:5432"))),
            Some(addr("10.0.0.2:5432"))
        );
        assert_eq!(
            outbound.opaque_destination(Some(addr("10.0.0.9:15006"))),
            None
        );
        assert_eq!(
            outbound.opaque_destination(Some(addr("127.0.0.1:15001"))),
            None
        );
    }
}
