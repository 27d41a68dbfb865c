//! Counts of outstanding work and the guards that hold one unit of it. A
//! leaf: the balancer and the pool read the counts, the response body
//! (`body`) carries the guards until its last byte, and the listener
//! (`listen::server`) makes each downstream connection's allowance, so none
//! of them needs another's module.
//!
//! - [`InFlightCounter`] / [`InFlight`]: an endpoint's outstanding
//!   requests (the balancer's load), and the streams open on one upstream
//!   HTTP/2 connection (the pool's, to open another connection when the
//!   peer's `MAX_CONCURRENT_STREAMS` is reached).
//! - [`ClientStreams`]: one downstream connection's allowance of streams on
//!   shared upstream HTTP/2 connections (`--upstream-streams-per-client`),
//!   put in each of its requests' extensions by the listener; the pool
//!   takes a permit before it opens a stream.
//! - [`StreamSlot`]: one such stream (the connection's count and the
//!   client's permit), held by the response body.
//! - [`ClientPress`]: what the pool presses when every stream slot of an
//!   endpoint is taken ([`Pressable`]: an HTTP/2 client's stream watch, an
//!   HTTP/1.1 client connection's write-stall clock), in the request's
//!   extensions.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use meshlet_netio::StallPress;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::upstream::slot_queue::SlotQueue;

/// How many requests an endpoint has outstanding (an atomic, no lock).
#[derive(Debug, Default)]
pub struct InFlightCounter(Arc<AtomicUsize>);

impl InFlightCounter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one outstanding request until the returned guard is dropped.
    pub fn start(&self) -> InFlight {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(&self.0))
    }
}

/// An outstanding request on an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One stream on a shared upstream HTTP/2 connection: counted on the
/// connection and, for a downstream connection with an allowance, holding
/// one of its permits. Carried by the response body until its last byte.
pub struct StreamSlot {
    // Fields drop in this order: the count and the permit are released
    // before a waiter is woken.
    _stream: InFlight,
    _client: Option<OwnedSemaphorePermit>,
    _freed: Freed,
    /// The request's client side, as the pool's set keeps it (weakly)
    /// for pressing while the stream lasts.
    _pressable: Option<Arc<dyn Pressable>>,
}

impl std::fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSlot")
            .field("client", &self._client)
            .finish_non_exhaustive()
    }
}

impl StreamSlot {
    /// A stream taken on a connection (its count): `queue` is told when
    /// it ends (it wakes the request next in turn), also if the request
    /// never gets an answer (cancelled, timed out, refused).
    pub fn new(stream: InFlight, queue: Option<Arc<SlotQueue>>) -> Self {
        StreamSlot {
            _stream: stream,
            _client: None,
            _freed: Freed(queue),
            _pressable: None,
        }
    }

    /// The stream was answered: it also holds the client connection's
    /// permit and the entry the pool presses (`pressable`) until it ends.
    pub fn answered(
        mut self,
        client: Option<OwnedSemaphorePermit>,
        pressable: Option<Arc<dyn Pressable>>,
    ) -> Self {
        self._client = client;
        self._pressable = pressable;
        self
    }
}

/// Hands the slot to the request waiting for one whose turn it is, when
/// dropped.
#[derive(Debug)]
struct Freed(Option<Arc<SlotQueue>>);

impl Drop for Freed {
    fn drop(&mut self) {
        if let Some(queue) = &self.0 {
            queue.freed();
        }
    }
}

/// The client side of a request, which the upstream pool presses when it
/// is short of HTTP/2 stream slots: judged over one second from then, and
/// by bytes (see `stream_watch`, `meshlet_netio::write_stall`).
pub trait Pressable: Send + Sync {
    /// Presses it; returns whether it waits on its client at all (one that
    /// does not is left alone).
    fn press(&self) -> bool;
}

impl Pressable for ClientPress {
    fn press(&self) -> bool {
        self.0.press()
    }
}

impl Pressable for StallPress {
    fn press(&self) -> bool {
        StallPress::press(self)
    }
}

/// A request's [`Pressable`] client side, in its extensions: put there by
/// the listener (an HTTP/2 client's stream) or by the handler (an HTTP/1.1
/// client's connection, when the request may go to an HTTP/2 upstream),
/// kept (weakly) by the pool's HTTP/2 set that carries the request.
#[derive(Clone)]
pub struct ClientPress(pub Arc<dyn Pressable>);

impl std::fmt::Debug for ClientPress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientPress")
    }
}

/// Numbers downstream connections (for logs and tests).
static CLIENT_IDS: AtomicU64 = AtomicU64::new(1);

/// A downstream connection's id and its allowance of streams on shared
/// upstream HTTP/2 connections: beyond it, its requests wait for one of
/// its own streams to end; other connections are unaffected. Cloned into
/// the extensions of every request of the connection.
#[derive(Debug, Clone)]
pub struct ClientStreams {
    id: u64,
    allowance: Arc<Semaphore>,
}

impl ClientStreams {
    /// A new downstream connection allowed `limit` streams at once (at
    /// least one).
    pub fn new(limit: usize) -> Self {
        ClientStreams {
            id: CLIENT_IDS.fetch_add(1, Ordering::Relaxed),
            allowance: Arc::new(Semaphore::new(limit.clamp(1, Semaphore::MAX_PERMITS))),
        }
    }

    /// The downstream connection's number (per process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for one of the connection's streams (the semaphore is never
    /// closed, so this always ends with a permit).
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.allowance).acquire_owned().await.ok()
    }

    /// Streams the connection may still open now.
    pub fn available(&self) -> usize {
        self.allowance.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_counts_until_dropped() {
        let counter = InFlightCounter::default();
        let (first, second) = (counter.start(), counter.start());
        assert_eq!(counter.get(), 2);
        drop(first);
        assert_eq!(counter.get(), 1);
        drop(second);
        assert_eq!(counter.get(), 0);
    }
}
