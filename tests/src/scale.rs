//! The control plane at scale: many simulated watchers, many registered
//! endpoints (issue 17 goal 6). Used by the `cp_scale` benchmark binary
//! (`tests/bench/control-plane-scale.sh`) and the `control_plane_scale`
//! e2e test.
//!
//! A [`Watcher`] speaks the sidecar's watch protocol
//! (`GET /api/v1/watch?revision=0` over HTTPS with a bearer token, then
//! NDJSON: a snapshot, one delta per revision, keepalives) on its own
//! connection, in its own task. It reads only each line's head (`type`,
//! `revision`, `fromRevision`; the rest is skipped by the JSON parser
//! without building it), checks that every delta starts at the revision it
//! holds, and logs when each line's last byte arrived. So the client side
//! stays cheap and what is measured is the control plane: the time from a
//! change's request to the arrival at every watcher.
//!
//! Data flow: [`Fleet::open`] opens watchers a few at a time (a burst of
//! TLS handshakes would be evicted as unproven connections past the API's
//! cap), each waits for its snapshot; a change is made with
//! [`register`] or [`apply_policy`], which return the revision;
//! [`Fleet::arrivals`] waits (with a deadline) until every watcher holds
//! it and returns each one's delay since the change was sent. A fleet
//! can be spread over several replicas ([`Fleet::spread`], `--store
//! etcd`): watcher `i` watches replica `i % replicas`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::Method;
use http_body_util::{BodyExt, Full};
use meshlet_api::mesh::paths;
use meshlet_client::Client;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access::CpAccess;

/// What can go wrong with a simulated watcher or a change.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("watch request to {authority}: {source}")]
    Connect {
        authority: String,
        source: meshlet_client::ClientError,
    },
    #[error("watch answered {status}")]
    Status { status: u16 },
    #[error("watch stream ended after revision {held}")]
    Ended { held: u64 },
    #[error("watch stream failed after revision {held}: {detail}")]
    Read { held: u64, detail: String },
    #[error("watch line is not an event: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("delta from revision {from} while holding {held}")]
    Gap { held: u64, from: u64 },
    #[error("{missing} of {watchers} watchers did not reach revision {revision} within {patience:?}{first_error}")]
    NotReached {
        missing: usize,
        watchers: usize,
        revision: u64,
        patience: Duration,
        first_error: String,
    },
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("{what} answered {status}: {body}")]
    Change {
        what: String,
        status: u16,
        body: String,
    },
}

#[derive(Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Kind {
    Snapshot,
    Delta,
    Keepalive,
}

/// The head of a watch line; every other field is skipped unbuilt.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(rename = "type")]
    kind: Kind,
    revision: u64,
    #[serde(default)]
    from_revision: Option<u64>,
}

/// What a watcher's first line (its snapshot) cost.
#[derive(Debug, Clone, Copy)]
pub struct FirstSnapshot {
    /// From sending the request (TLS handshake included) to the last byte
    /// of the snapshot line.
    pub elapsed: Duration,
    pub bytes: usize,
    pub revision: u64,
}

/// One simulated sidecar holding a watch stream open.
pub struct Watcher {
    held: watch::Receiver<u64>,
    /// `(revision, arrival)` of every snapshot and delta line.
    arrivals: Arc<Mutex<Vec<(u64, Instant)>>>,
    task: JoinHandle<Result<(), ScaleError>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    /// Opens `GET /api/v1/watch?revision=0` with `client` and waits for
    /// the snapshot.
    pub async fn open(
        cp: &CpAccess,
        client: &Client,
    ) -> Result<(Watcher, FirstSnapshot), ScaleError> {
        let authority = cp.authority();
        let started = Instant::now();
        let request = meshlet_client::request(
            Method::GET,
            &authority,
            &format!("{}?revision=0", paths::WATCH),
        )
        .body(Full::new(Bytes::new()))
        .expect("valid request");
        let response =
            client
                .send(&authority, request)
                .await
                .map_err(|source| ScaleError::Connect {
                    authority: authority.clone(),
                    source,
                })?;
        if response.status() != 200 {
            return Err(ScaleError::Status {
                status: response.status().as_u16(),
            });
        }
        let (held_tx, held) = watch::channel(0);
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(read_stream(
            response.into_body(),
            held_tx,
            arrivals.clone(),
            started,
            first_tx,
        ));
        let watcher = Watcher {
            held,
            arrivals,
            task,
        };
        match first_rx.await {
            Ok(first) => Ok((watcher, first)),
            // The task ended before its first line: say why.
            Err(_) => Err(watcher.finish().await),
        }
    }

    /// The revision it holds.
    pub fn revision(&self) -> u64 {
        *self.held.borrow()
    }

    /// Why the reading task ended (it only ends on an error).
    async fn finish(mut self) -> ScaleError {
        match (&mut self.task).await {
            Ok(Err(err)) => err,
            Ok(Ok(())) => ScaleError::Ended {
                held: self.revision(),
            },
            Err(err) => ScaleError::Read {
                held: self.revision(),
                detail: err.to_string(),
            },
        }
    }

    /// When the first line carrying `revision` or a later one arrived.
    fn arrival_of(&self, revision: u64) -> Option<Instant> {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals
            .iter()
            .find(|(r, _)| *r >= revision)
            .map(|(_, at)| *at)
    }
}

/// Reads the NDJSON stream until it ends or breaks the protocol.
async fn read_stream(
    mut body: hyper::body::Incoming,
    held_tx: watch::Sender<u64>,
    arrivals: Arc<Mutex<Vec<(u64, Instant)>>>,
    started: Instant,
    first_tx: tokio::sync::oneshot::Sender<FirstSnapshot>,
) -> Result<(), ScaleError> {
    let mut first_tx = Some(first_tx);
    let mut buffer: Vec<u8> = Vec::new();
    // Bytes of `buffer` already searched for a newline.
    let mut scanned = 0;
    let mut held = 0u64;
    loop {
        let frame = match body.frame().await {
            None => return Err(ScaleError::Ended { held }),
            Some(Err(err)) => {
                return Err(ScaleError::Read {
                    held,
                    detail: err.to_string(),
                })
            }
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        let mut consumed = 0;
        while let Some(end) = buffer[scanned..].iter().position(|b| *b == b'\n') {
            let end = scanned + end;
            let arrived = Instant::now();
            let head: Head = serde_json::from_slice(&buffer[consumed..end])?;
            let bytes = end + 1 - consumed;
            consumed = end + 1;
            scanned = consumed;
            match head.kind {
                Kind::Keepalive => continue,
                Kind::Delta if head.from_revision != Some(held) => {
                    return Err(ScaleError::Gap {
                        held,
                        from: head.from_revision.unwrap_or(0),
                    })
                }
                Kind::Delta | Kind::Snapshot => {}
            }
            held = head.revision;
            arrivals.lock().unwrap().push((held, arrived));
            held_tx.send_replace(held);
            if let Some(tx) = first_tx.take() {
                let _ = tx.send(FirstSnapshot {
                    elapsed: arrived - started,
                    bytes,
                    revision: held,
                });
            }
        }
        buffer.drain(..consumed);
        // What is left is the start of a line without its newline.
        scanned = buffer.len();
    }
}

/// Many watchers of one control plane, or spread evenly over several
/// replicas (watcher `i` watches replica `i % replicas`).
pub struct Fleet {
    /// Each replica and a client carrying the watchers' token for it.
    targets: Vec<(CpAccess, Client)>,
    watchers: Vec<Watcher>,
}

impl Fleet {
    /// A fleet without watchers; `client` carries the watchers' token.
    pub fn new(cp: &CpAccess, client: Client) -> Fleet {
        Fleet::spread(vec![(cp.clone(), client)])
    }

    /// A fleet without watchers whose watchers are spread round-robin
    /// over `targets` (at least one).
    pub fn spread(targets: Vec<(CpAccess, Client)>) -> Fleet {
        assert!(!targets.is_empty(), "a fleet watches at least one replica");
        Fleet {
            targets,
            watchers: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.watchers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watchers.is_empty()
    }

    /// Opens `count` more watchers, `parallel` at a time; returns what each
    /// one's snapshot cost.
    pub async fn open(
        &mut self,
        count: usize,
        parallel: usize,
    ) -> Result<Vec<FirstSnapshot>, ScaleError> {
        let (targets, first) = (&self.targets, self.watchers.len());
        let opened: Vec<Result<(Watcher, FirstSnapshot), ScaleError>> = stream::iter(0..count)
            .map(|i| {
                let (cp, client) = &targets[(first + i) % targets.len()];
                Watcher::open(cp, client)
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        let mut firsts = Vec::with_capacity(count);
        for result in opened {
            let (watcher, first) = result?;
            self.watchers.push(watcher);
            firsts.push(first);
        }
        Ok(firsts)
    }

    /// Drops every watcher past the first `keep` (their connections close).
    pub fn truncate(&mut self, keep: usize) {
        self.watchers.truncate(keep);
    }

    /// Waits until every watcher holds `revision` (or a later one), at most
    /// `patience`; returns each watcher's delay from `sent` to the arrival
    /// of the first line that carried it.
    pub async fn arrivals(
        &self,
        revision: u64,
        sent: Instant,
        patience: Duration,
    ) -> Result<Vec<Duration>, ScaleError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut missing = 0;
        let mut first_error = String::new();
        for watcher in &self.watchers {
            let mut held = watcher.held.clone();
            let reached = tokio::time::timeout_at(deadline, held.wait_for(|r| *r >= revision));
            if !matches!(reached.await, Ok(Ok(_))) {
                missing += 1;
                if first_error.is_empty() && watcher.task.is_finished() {
                    first_error = format!(" (a watcher's stream ended at {})", watcher.revision());
                }
            }
        }
        if missing > 0 {
            return Err(ScaleError::NotReached {
                missing,
                watchers: self.watchers.len(),
                revision,
                patience,
                first_error,
            });
        }
        Ok(self
            .watchers
            .iter()
            .map(|w| {
                w.arrival_of(revision)
                    .map(|at| at.saturating_duration_since(sent))
                    .unwrap_or_default()
            })
            .collect())
    }

    /// The revisions the watchers hold (one entry per distinct revision).
    pub fn revisions(&self) -> std::collections::BTreeSet<u64> {
        self.watchers.iter().map(Watcher::revision).collect()
    }
}

/// `service`'s instance `index`: id `SERVICE-INDEX`, address
/// `127.0.0.1:PORT` (unique per index, nothing listens there).
pub fn registration(service: &str, index: usize, port: u16) -> serde_json::Value {
    serde_json::json!({
        "id": format!("{service}-{index}"),
        "service": service,
        "address": format!("127.0.0.1:{port}"),
        "labels": {"version": "v1", "zone": format!("z{}", index % 3)},
        "healthy": true,
    })
}

/// Sends one change; returns the revision it made.
async fn change(
    cp: &CpAccess,
    client: &Client,
    what: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<u64, ScaleError> {
    let reply = cp.call(client, Method::POST, path, Some(body)).await;
    if reply.status != 200 {
        return Err(ScaleError::Change {
            what: what.to_owned(),
            status: reply.status.as_u16(),
            body: reply.text(),
        });
    }
    let json: serde_json::Value = serde_json::from_slice(&reply.body)?;
    Ok(json["revision"].as_u64().unwrap_or(0))
}

/// Registers one instance (admin token); returns the revision.
pub async fn register(
    cp: &CpAccess,
    client: &Client,
    registration: &serde_json::Value,
) -> Result<u64, ScaleError> {
    change(cp, client, "registration", paths::INSTANCES, registration).await
}

/// One heartbeat of instance `id` as a sidecar sends it (a fresh HTTPS
/// connection, `PUT /api/v1/instances/{id}/heartbeat`); returns the status.
pub async fn heartbeat(cp: &CpAccess, client: &Client, id: &str) -> Result<u16, ScaleError> {
    let authority = cp.authority();
    let request = meshlet_client::request(Method::PUT, &authority, &paths::heartbeat(id))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"healthy\":true}")))
        .expect("valid request");
    client
        .fetch(&authority, request)
        .await
        .map(|reply| reply.status.as_u16())
        .map_err(|source| ScaleError::Connect { authority, source })
}

/// Registers `per_service` instances of each of `services` (ports from
/// `first_port` on, instance indexes from `from`), `parallel` requests in
/// flight; returns the last revision.
pub async fn register_many(
    cp: &CpAccess,
    client: &Client,
    services: &[String],
    indexes: std::ops::Range<usize>,
    parallel: usize,
) -> Result<u64, ScaleError> {
    let mut all = Vec::new();
    for index in indexes {
        for (s, service) in services.iter().enumerate() {
            let port = 20_000 + (s * 1000 + index) as u32 % 40_000;
            all.push(registration(service, index, port as u16));
        }
    }
    let results: Vec<Result<u64, ScaleError>> = stream::iter(all.iter())
        .map(|r| register(cp, client, r))
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let mut last = 0;
    for result in results {
        last = last.max(result?);
    }
    Ok(last)
}

/// Applies a `HealthCheckPolicy` named `name` for `service` with an
/// interval of `seconds` (a new value configures it); returns the revision.
pub async fn apply_policy(
    cp: &CpAccess,
    client: &Client,
    name: &str,
    service: &str,
    seconds: u32,
) -> Result<u64, ScaleError> {
    let text = format!(
        "apiVersion: meshlet.dev/v1alpha1\nkind: HealthCheckPolicy\nmetadata: {{name: {name}}}\n\
         spec: {{targetRef: {{service: {service}}}, interval: {seconds}s}}\n"
    );
    let body = serde_json::json!({
        "files": [{"name": "scale.yaml", "text": text}],
        "actor": "scale",
    });
    change(cp, client, "apply", paths::APPLY, &body).await
}

/// The `q` quantile (0..=1) of sorted `values` (nearest rank).
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
