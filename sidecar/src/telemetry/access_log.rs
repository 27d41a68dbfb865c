//! The access log (`--access-log`): one JSON line per request on standard
//! output, with the trace id and, when the mesh answered itself, the
//! `x-meshlet-reason`.
//!
//! The request path hands a plain [`AccessRecord`] to a bounded queue; a
//! dedicated thread formats and writes the lines, so a slow terminal or
//! pipe never stalls proxying. When the queue is full, lines are dropped
//! and counted (`meshlet_access_log_dropped_total`).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::SystemTime;

use prometheus::IntCounter;
use serde::Serialize;

/// Lines waiting to be written at most.
const QUEUE: usize = 8192;

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct AccessRecord {
    /// RFC 3339 with microseconds, UTC.
    #[serde(serialize_with = "rfc3339")]
    pub timestamp: SystemTime,
    pub direction: &'static str,
    pub service: String,
    pub destination: String,
    pub method: String,
    pub path: String,
    pub route: String,
    pub status: u16,
    pub duration_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// `x-meshlet-reason` when the mesh answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub retries: u32,
    /// Inbound: the caller's verified SPIFFE id and service (absent for a
    /// plaintext caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_service: Option<String>,
    /// The `AuthorizationPolicy` that refused the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz_policy: Option<String>,
    /// An injected fault (`delay 200ms`, `abort 503`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// A dry-run policy that would have refused the request
    /// (`<kind>/<name>:<reason>`); the request went through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_refuse: Option<String>,
}

fn rfc3339<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*at))
}

/// The request path's handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    queue: SyncSender<AccessRecord>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Starts the writer thread on standard output.
    pub fn spawn(dropped: IntCounter) -> Self {
        Self::spawn_to(std::io::stdout(), dropped)
    }

    /// Starts the writer thread on `out`.
    pub fn spawn_to(out: impl Write + Send + 'static, dropped: IntCounter) -> Self {
        let (queue, lines) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(lines, out))
            .expect("can start the access log thread");
        AccessLog { queue, dropped }
    }

    /// Queues one line; never blocks.
    pub fn log(&self, record: AccessRecord) {
        match self.queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Writes lines as they come, flushing whenever the queue runs empty.
fn write_lines(lines: Receiver<AccessRecord>, out: impl Write) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(first) = lines.recv() {
        let mut next = Some(first);
        while let Some(record) = next {
            if serde_json::to_writer(&mut out, &record).is_err() || out.write_all(b"\n").is_err() {
                return; // standard output is gone: nothing more to do
            }
            next = lines.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Where a test's access log writes, read back as `.0` (also used by
    /// `observe`'s tests).
    #[derive(Clone, Default)]
    pub(crate) struct Shared(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_request_is_one_json_line() {
        let out = Shared::default();
        let log = AccessLog::spawn_to(out.clone(), IntCounter::new("d", "d").unwrap());
        for status in [200, 429] {
            log.log(AccessRecord {
                timestamp: SystemTime::UNIX_EPOCH,
                direction: "inbound",
                service: "orders".into(),
                destination: "orders".into(),
                method: "GET".into(),
                path: "/api/1".into(),
                route: "/api".into(),
                status,
                duration_us: 120,
                peer: None,
                upstream: None,
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
                span_id: None,
                reason: (status == 429).then_some("rate_limited"),
                retries: 0,
                source_identity: (status == 429)
                    .then(|| "spiffe://meshlet.local/ns/default/sa/web".into()),
                source_service: (status == 429).then(|| "web".into()),
                authz_policy: None,
                fault: None,
                would_refuse: (status == 200).then(|| "RateLimitPolicy/orders:rate_limited".into()),
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let text = loop {
            let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            if text.lines().count() == 2 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::yield_now();
        };
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(lines[0].get("reason").is_none());
        assert_eq!(lines[1]["reason"], "rate_limited");
        assert_eq!(lines[1]["status"], 429);
        assert!(
            lines[0].get("source_identity").is_none(),
            "plaintext caller"
        );
        assert_eq!(
            lines[1]["source_identity"],
            "spiffe://meshlet.local/ns/default/sa/web"
        );
        assert_eq!(lines[1]["source_service"], "web");
        assert_eq!(
            lines[0]["would_refuse"],
            "RateLimitPolicy/orders:rate_limited"
        );
        assert!(lines[1].get("would_refuse").is_none());
    }
}
