//! A client that sends requests through a sidecar until stopped and keeps
//! every failure: the "while traffic flows, zero failed requests" half of
//! the failover scenarios (`e2e/failover.rs`, `e2e/etcd_ha.rs`).
//!
//! ```text
//! Traffic::start(sidecar.outbound, "orders") ─► task: GET http://orders/ every 5 ms
//!     200 ─► ok += 1        anything else / an error ─► failures.push(why)
//! traffic.finish().await ─► (ok, failures)
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client;

/// A client sending requests through `via` to a service until stopped;
/// counts answers and keeps every failure.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// Starts sending `GET http://{service}/` through the sidecar
    /// outbound listener `via`, one request at a time, 5 ms apart.
    pub fn start(via: SocketAddr, service: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let uri = format!("http://{service}/");
        let task = tokio::spawn({
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    match client::get_uri(via, &uri).await {
                        Ok(reply) if reply.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(reply) => failures.lock().unwrap().push(format!(
                            "{}: {}",
                            reply.status,
                            reply.text()
                        )),
                        Err(error) => failures.lock().unwrap().push(error.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        Traffic {
            stop,
            ok,
            failures,
            task,
        }
    }

    /// Successful answers so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Failures so far.
    pub fn failed(&self) -> usize {
        self.failures.lock().unwrap().len()
    }

    /// Stops the client; (answers, failures).
    pub async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}
