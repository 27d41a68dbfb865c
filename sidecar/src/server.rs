//! Accept loop shared by all listeners: one hyper connection per accepted
//! socket (HTTP/1.1 or h2c prior knowledge, detected per connection), with
//! the protective limits applied, tracked for graceful shutdown.
//!
//! [`serve`] takes an already bound listener (tests bind port 0) and a
//! shutdown signal. When the signal fires it stops accepting and closes the
//! listener — new connections are refused from then on — and returns the
//! [`GracefulShutdown`] handle with which the caller drains the open ones.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ProxyBody;
use crate::settings::Limits;

/// What a listener does with each request.
pub trait Handler: Clone + Send + Sync + 'static {
    fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<ProxyBody>> + Send;
}

/// Serves `listener` until `shutdown` turns true.
pub async fn serve<H: Handler>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    limits: Arc<Limits>,
    connections: IntGauge,
    mut shutdown: watch::Receiver<bool>,
) -> GracefulShutdown {
    let builder = connection_builder(&limits);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(listener = name, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.handle(request, peer).await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let connections = connections.clone();
        connections.inc();
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(listener = name, %peer, error = %err, "connection closed with an error");
            }
            connections.dec();
        });
    }
    drop(listener);
    tracing::info!(listener = name, "stopped accepting connections");
    graceful
}

fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper answers 431 when the request head exceeds its read buffer.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}
