//! The sidecar's side of `meshctl tap` on the request path: which taps
//! are live here, and handing a completed request's event to the tap
//! sender without ever waiting.
//!
//! ```text
//! watch stream: WatchEvent::Taps ─► control::client ─► Tap::set (only the taps that select this sidecar)
//! RequestRecord::start  ─► Tap::active()  (one relaxed atomic load: nobody taps → nothing else)
//! RequestRecord::finish ─► Tap::offer: each live tap's filter ─► TapEvent ─► bounded queue (full: dropped, counted)
//! control::tap_sender ─► batches per tap ─► POST /api/v1/tap/{id}/events
//! ```
//!
//! **Invariant:** when no tap is live the request path pays one relaxed
//! atomic load per request and nothing else; when one is, the filters run
//! here (not in the control plane), and the queue never blocks a request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use meshlet_api::tap::{TapDirective, TapEvent};
use tokio::sync::mpsc;

/// Events waiting for the tap sender.
pub const QUEUE: usize = 1024;
/// Request headers copied into one event, at most.
pub const MAX_HEADERS: usize = 32;
/// Bytes of one header value copied, at most.
pub const MAX_HEADER_VALUE: usize = 256;

/// A tapped request's event, for the tap `tap_id`.
pub type Tapped = (Arc<str>, TapEvent);

/// The live taps of this sidecar.
#[derive(Debug)]
pub struct Tap {
    active: AtomicBool,
    headers: AtomicBool,
    taps: ArcSwap<Vec<TapDirective>>,
    queue: mpsc::Sender<Tapped>,
    receiver: Mutex<Option<mpsc::Receiver<Tapped>>>,
    dropped: AtomicU64,
}

impl Default for Tap {
    fn default() -> Tap {
        let (queue, receiver) = mpsc::channel(QUEUE);
        Tap {
            active: AtomicBool::new(false),
            headers: AtomicBool::new(false),
            taps: ArcSwap::from_pointee(Vec::new()),
            queue,
            receiver: Mutex::new(Some(receiver)),
            dropped: AtomicU64::new(0),
        }
    }
}

impl Tap {
    /// Whether any tap is live: the request path's only question when
    /// nobody taps.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether a live tap may see header values (an admin's).
    pub fn wants_headers(&self) -> bool {
        self.headers.load(Ordering::Relaxed)
    }

    /// Replaces the live taps with `taps` (those that select this
    /// sidecar); an empty list ends tapping.
    pub fn set(&self, taps: Vec<TapDirective>) {
        let active = !taps.is_empty();
        let headers = taps.iter().any(|t| t.headers);
        self.taps.store(Arc::new(taps));
        self.headers.store(headers, Ordering::Relaxed);
        self.active.store(active, Ordering::Relaxed);
    }

    /// Ends the tap `id` here (the control plane said it ended).
    pub fn end(&self, id: &str) {
        let mut taps = self.taps.load().as_ref().clone();
        taps.retain(|t| t.id != id);
        self.set(taps);
    }

    /// The live taps.
    pub fn taps(&self) -> Arc<Vec<TapDirective>> {
        self.taps.load_full()
    }

    /// Offers a completed request to every live tap whose filter selects
    /// it; `event` is built once, only if one does.
    pub fn offer(&self, method: &str, path: &str, status: u16, event: impl FnOnce() -> TapEvent) {
        let taps = self.taps.load();
        let mut event = Some(event);
        let mut built: Option<TapEvent> = None;
        for tap in taps
            .iter()
            .filter(|t| t.filter.selects_request(method, path, status))
        {
            let event = match built.as_ref() {
                Some(e) => e.clone(),
                None => {
                    let e = (event.take().expect("built once"))();
                    built = Some(e.clone());
                    e
                }
            };
            let mut event = event;
            if !tap.headers {
                event.headers.clear();
            }
            if self
                .queue
                .try_send((Arc::from(tap.id.as_str()), event))
                .is_err()
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The queue's receiving end, for the one tap sender (`None` after the
    /// first call).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<Tapped>> {
        self.receiver.lock().unwrap().take()
    }

    /// Events dropped because the queue was full, since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_api::tap::{TapDirection, TapFilter};

    fn directive(id: &str, path: &str, headers: bool) -> TapDirective {
        TapDirective {
            id: id.into(),
            filter: TapFilter {
                namespace: "default".into(),
                service: Some("orders".into()),
                path_prefix: Some(path.into()),
                ..TapFilter::default()
            },
            headers,
        }
    }

    fn event() -> TapEvent {
        TapEvent {
            at_ms: 1,
            instance: "o1".into(),
            service: "orders".into(),
            direction: TapDirection::Inbound,
            peer: "127.0.0.1:1".into(),
            method: "GET".into(),
            path: "/api/x".into(),
            status: 200,
            latency_ms: 1.0,
            reason: None,
            trace_id: None,
            headers: vec![("user-agent".into(), "t".into())],
        }
    }

    #[test]
    fn filters_run_here_headers_only_for_admins_and_a_full_queue_drops() {
        let tap = Tap::default();
        assert!(!tap.active());
        let mut rx = tap.take_receiver().unwrap();
        tap.set(vec![
            directive("a", "/api", false),
            directive("b", "/other", true),
        ]);
        assert!(tap.active() && tap.wants_headers());
        tap.offer("GET", "/api/x", 200, event);
        let (id, got) = rx.try_recv().unwrap();
        assert_eq!(&*id, "a");
        assert!(got.headers.is_empty(), "a viewer's tap gets no headers");
        assert!(rx.try_recv().is_err(), "tap b does not select /api/x");
        for _ in 0..QUEUE + 5 {
            tap.offer("GET", "/api/x", 200, event);
        }
        assert_eq!(tap.take_dropped(), 5);
        tap.end("a");
        tap.end("b");
        assert!(!tap.active());
    }
}
