//! The sidecar's side of the control plane: registration, heartbeats, the
//! watch stream, and the persisted last-good state.
//!
//! Two background tasks, neither on the request path:
//!
//! ```text
//! registration task: POST /api/v1/instances ─► every heartbeatInterval (or
//!     at once when the app's health changes) PUT …/heartbeat ─► 404? register
//!     again ─► on shutdown DELETE …/{id}
//! watch task: GET /api/v1/watch?revision=R ─► NDJSON WatchEvents ─►
//!     MeshState::apply ─► empty-push guard ─► Snapshot::build ─► ArcSwap::store ─► persist file
//!     (Taps events ─► telemetry::tap::Tap::set, the taps that select this sidecar)
//! ```
//!
//! Either task retries a failed control plane with exponential backoff
//! and equal jitter (a ceiling of 200 ms doubling to 5 s; half of it fixed,
//! half random) and never blocks traffic: requests keep
//! reading the last snapshot.
//!
//! Several replicas (`--control-plane URL1,URL2`, see `replicas`): every
//! call goes to the replica [`Replicas::current`] names. When the watch
//! fails (refused, unreachable, an error answer, the stream closed or
//! silent past its idle deadline) the watch task moves on to the next
//! replica ([`Replicas::failed`], counted in
//! `meshlet_control_plane_failovers_total`); the backoff's ceiling then
//! doubles per round of replicas, not per attempt, so each replica is
//! tried once quickly. The watch resumes on the new replica from the
//! held revision and epoch like a reconnection to the same one: replicas
//! of one store share the epoch and the revisions, so it gets deltas (or
//! nothing), not a full snapshot. Registration, heartbeats, certificates
//! and stats follow, since they ask for the current replica per call. Each applied state is written to the snapshot
//! file (`persist`: 0600, temporary file then rename), and a sidecar
//! restarted while the control plane is down starts from that file.
//!
//! The epoch rule: the watch resumes by deltas only from a state that
//! carries the control plane's store epoch and a revision of it
//! (`?revision=R&epoch=E`; the control plane sends a full snapshot for any
//! other epoch or a revision it never had); a state without an epoch asks
//! for the full snapshot (`?revision=0`). So a snapshot file never
//! outlives a newer state of the control plane: its first answer replaces
//! it, and the replacement is persisted.
//!
//! The empty-push guard (issue 16): a pushed state that would remove every
//! endpoint of every service while the published one has endpoints is
//! **held**, not published (`meshlet_config_pushes_held_total` counts each
//! hold): requests keep the last snapshot. A later push that brings
//! endpoints back ends the hold. Otherwise, one heartbeat interval and a
//! second later (time for instances a sick control plane dropped to
//! register again), the client fetches a full state the way a sidecar
//! without state resumes (`watch?revision=0`, first snapshot): if it is
//! empty too, the emptiness is confirmed and published; if it has
//! endpoints, it is published instead and the watch reopens from it; if
//! the resync fails, the hold continues and the resync is retried.
//!
//! Every call goes through the control plane's `meshlet_client::Client`
//! (HTTPS, the mesh CA, the sidecar's bearer token); a 401/403 is logged
//! like any failure, naming the control plane, and retried with backoff.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use meshlet_api::mesh::{
    paths, CertificateReply, CertificateRequest, Heartbeat, MeshState, Registration,
    RegistrationReply, WatchEvent,
};
use serde_json::json;
use tokio::sync::watch;

use meshlet_client::ClientError;

use crate::control::call;
use crate::control::health::AppHealth;
use crate::control::persist::persist;
use crate::control::replicas::{Endpoint, FailoverBackoff, Replicas};
use crate::control::snapshot::{Own, SharedSnapshot, Snapshot};
use crate::identity::{CertificateSource, WorkloadIdentity};
use crate::settings::{ControlPlaneSettings, Limits, Settings};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::tap::Tap;
use meshlet_api::tap::TapDirective;

/// Deadline of one registration, heartbeat or deregistration call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// A watch stream that brings nothing (not even a keepalive) this long is
/// presumed dead and reopened.
const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a resync may take to deliver its snapshot (a control plane
/// warming up after a lost store sends keepalives first).
const RESYNC_TIMEOUT: Duration = Duration::from_secs(15);
/// How long registration waits for the first certificate request to end.
const FIRST_CERTIFICATE_WAIT: Duration = Duration::from_secs(5);
/// Heartbeat period until the control plane says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(3);

/// Why talking to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("watch stream: {0}")]
    Stream(String),
    #[error("control plane sent an invalid {what}: {source}")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Gap(#[from] meshlet_api::mesh::RevisionGap),
}

/// What `/config_dump` and `/ready` need to know about the connection.
#[derive(Debug, Default)]
pub struct ControlStatus {
    /// The watch stream is open.
    pub connected: AtomicBool,
    /// The instance is registered (the last call succeeded).
    pub registered: AtomicBool,
    /// A state arrived from the control plane or the snapshot file.
    pub has_state: AtomicBool,
    /// Unix milliseconds of the last applied state.
    pub last_update_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl ControlStatus {
    fn failed(&self, error: &ControlError) {
        *self.last_error.lock().unwrap() = Some(error.to_string());
    }

    pub fn to_json(&self, settings: &ControlPlaneSettings) -> serde_json::Value {
        let replicas = &settings.replicas;
        json!({
            "url": settings.url,
            "replicas": replicas.urls().iter().map(|u| &u.url).collect::<Vec<_>>(),
            "current": replicas.current().url,
            "currentEndpoint": replicas.current().describe(),
            "failovers": replicas.failovers(),
            "instanceId": settings.instance_id,
            "advertiseAddress": settings.advertise_addr.to_string(),
            "snapshotFile": settings.snapshot_file,
            "connected": self.connected.load(Ordering::Relaxed),
            "registered": self.registered.load(Ordering::Relaxed),
            "lastUpdateUnixMs": self.last_update_ms.load(Ordering::Relaxed),
            "lastError": *self.last_error.lock().unwrap(),
        })
    }
}

/// Everything the two tasks share.
#[derive(Clone)]
pub struct ControlClient {
    pub settings: Arc<Settings>,
    cp: Arc<ControlPlaneSettings>,
    snapshot: SharedSnapshot,
    limits: Arc<Limits>,
    metrics: Metrics,
    pub status: Arc<ControlStatus>,
    /// The workload certificate: its trust bundle follows the watch, and
    /// registration waits for the first certificate request.
    identity: Option<Arc<WorkloadIdentity>>,
    /// Endpoints (any health) of the last published state: the empty-push
    /// guard's "the current snapshot has endpoints".
    published_endpoints: Arc<AtomicUsize>,
    /// The heartbeat interval the control plane gave at registration (ms):
    /// how long a held empty push waits before its confirming resync.
    heartbeat_ms: Arc<AtomicU64>,
    /// The live taps: set from the watch stream's `Taps` events, cleared
    /// when the stream ends (`telemetry::tap`).
    tap: Arc<Tap>,
}

impl ControlClient {
    pub fn new(
        settings: Arc<Settings>,
        cp: ControlPlaneSettings,
        snapshot: SharedSnapshot,
        limits: Arc<Limits>,
        metrics: Metrics,
        has_state: bool,
    ) -> Self {
        let status = ControlStatus::default();
        status.has_state.store(has_state, Ordering::Relaxed);
        ControlClient {
            settings,
            cp: Arc::new(cp),
            snapshot,
            limits,
            metrics,
            status: Arc::new(status),
            identity: None,
            published_endpoints: Arc::default(),
            heartbeat_ms: Arc::new(AtomicU64::new(DEFAULT_HEARTBEAT.as_millis() as u64)),
            tap: Arc::default(),
        }
    }

    /// The taps this client sets and whose events it sends.
    pub fn with_tap(mut self, tap: Arc<Tap>) -> Self {
        self.tap = tap;
        self
    }

    /// Starts the tap sender (`control::tap_sender`).
    pub fn spawn_tap_sender(&self, stop: watch::Receiver<bool>) {
        crate::control::tap_sender::spawn(Arc::clone(&self.cp), Arc::clone(&self.tap), stop);
    }

    pub fn with_identity(mut self, identity: Option<Arc<WorkloadIdentity>>) -> Self {
        self.identity = identity;
        self
    }

    /// Asks the control plane to sign a workload certificate.
    async fn request_certificate(
        &self,
        request: CertificateRequest,
    ) -> Result<CertificateReply, ControlError> {
        let body = serde_json::to_vec(&request).expect("serializable");
        // A replica that does not answer is failed over at once, as the
        // watch does (once per failure, whoever notices): a sidecar that
        // starts while the first replica of its list is down gets its
        // first certificate from the next one before it registers, so
        // peers that learn of it can reach it over mTLS at once. An
        // answer (any status) is the control plane's word and is final.
        let mut tries_left = self.replicas().len();
        let reply = loop {
            let endpoint = self.replicas().current();
            let client = endpoint.client(&self.cp.client);
            let result = call(
                &client,
                &endpoint.authority,
                Method::POST,
                paths::CERTIFICATES,
                Some(body.clone()),
                CALL_TIMEOUT,
            )
            .await;
            tries_left = tries_left.saturating_sub(1);
            match result {
                Err(error) if error.status().is_none() && tries_left > 0 => {
                    tracing::debug!(control_plane = %endpoint.describe(), %error,
                        "certificate request failed; trying the next replica");
                    self.fail_over(&endpoint).await;
                }
                result => break result?,
            }
        };
        serde_json::from_slice(&reply).map_err(|source| ControlError::Decode {
            what: "certificate reply",
            source,
        })
    }

    pub fn cp_settings(&self) -> &ControlPlaneSettings {
        &self.cp
    }

    fn replicas(&self) -> &Replicas {
        &self.cp.replicas
    }

    /// The client and authority of the replica calls go to now.
    fn target(&self) -> (meshlet_client::Client, String) {
        let endpoint = self.replicas().current();
        (endpoint.client(&self.cp.client), endpoint.authority)
    }

    /// The connection for `/config_dump`, with the live taps' count.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = self.status.to_json(&self.cp);
        value["liveTaps"] = json!(self.tap.taps().len());
        value
    }

    /// Starts the watch task.
    pub fn spawn_watch(&self, initial: MeshState, mut stop: watch::Receiver<bool>) {
        let this = self.clone();
        if self.status.has_state.load(Ordering::Relaxed) {
            self.published_endpoints
                .store(endpoint_count(&initial), Ordering::Relaxed);
        }
        tokio::spawn(async move {
            let mut state = initial;
            let mut backoff = FailoverBackoff::default();
            let mut hold = None;
            // Names with several addresses become one replica each.
            this.replicas().resolve().await;
            this.metrics
                .set_control_plane_current(&this.replicas().current().describe());
            loop {
                let endpoint = this.replicas().current();
                let result = tokio::select! {
                    result = this.watch_once(&endpoint, &mut state, &mut backoff, &mut hold) => result,
                    _ = stop.wait_for(|stop| *stop) => return,
                };
                this.status.connected.store(false, Ordering::Relaxed);
                this.metrics.set_control_plane_connected(false);
                // No control plane, no tap: a tap lives only as long as the
                // stream that announced it.
                this.tap.set(Vec::new());
                if let Err(error) = result {
                    let single = this.replicas().len() == 1;
                    if backoff.attempts == 0 {
                        if single {
                            tracing::warn!(control_plane = %endpoint.url, %error, "watch failed; serving the last known snapshot and retrying");
                        } else {
                            tracing::warn!(control_plane = %endpoint.describe(), %error, "watch failed; serving the last known snapshot and failing over to the next replica");
                        }
                    } else {
                        tracing::debug!(control_plane = %endpoint.describe(), %error, "watch retry failed");
                    }
                    this.status.failed(&error);
                    this.fail_over(&endpoint).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay(this.replicas().len())) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        });
    }

    /// The watch on `failed` ended or failed: on to the next replica (once
    /// per failure, whoever reports it), resolving the names again after
    /// a whole round.
    async fn fail_over(&self, failed: &Endpoint) {
        let replicas = self.replicas();
        if !replicas.failed(failed) {
            return;
        }
        if replicas.round_done() {
            replicas.resolve().await;
        }
        let next = replicas.current();
        if (&next.authority, next.addr) != (&failed.authority, failed.addr) {
            self.metrics.control_plane_failover();
            self.metrics.set_control_plane_current(&next.describe());
            tracing::info!(from = %failed.describe(), to = %next.describe(), "failing over to another control-plane replica");
        }
    }

    /// One watch connection: returns when it ends or fails.
    async fn watch_once(
        &self,
        endpoint: &Endpoint,
        state: &mut MeshState,
        backoff: &mut FailoverBackoff,
        hold: &mut Option<Hold>,
    ) -> Result<(), ControlError> {
        let path = watch_path(state);
        let authority = &endpoint.authority;
        let request = meshlet_client::request(Method::GET, authority, &path)
            .header(meshlet_api::tap::WATCH_TAPS_HEADER, "1")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|source| ClientError::Request {
                authority: authority.clone(),
                source,
            })?;
        // The timeout bounds the answer's head; the stream then has its
        // own idle deadline.
        let response = endpoint
            .client(&self.cp.client)
            .timeout(CALL_TIMEOUT)
            .send(authority, request)
            .await?;
        if response.status() != StatusCode::OK {
            // A refusal says why in a short JSON body (401: the token,
            // 403: its role); give up on the body if it does not come.
            let read = meshlet_client::read_reply(authority, response);
            let error = match tokio::time::timeout(CALL_TIMEOUT, read).await {
                Ok(Ok(reply)) => reply.success(authority).err(),
                _ => None,
            };
            return Err(match error {
                Some(error) => ControlError::Client(error),
                None => ControlError::Stream(format!("{authority} answered a watch without 200")),
            });
        }
        self.status.connected.store(true, Ordering::Relaxed);
        self.metrics.set_control_plane_connected(true);
        let mut body = response.into_body();
        let mut buffer = BytesMut::new();
        loop {
            let next_check = hold.as_ref().map(|h| h.next_check);
            let check_due = async {
                match next_check {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                next = tokio::time::timeout(WATCH_IDLE_TIMEOUT, body.frame()) => next,
                _ = check_due => {
                    if self.confirm_held(state, hold).await {
                        // The state now comes from the resync: reopen the
                        // watch from its revision.
                        return Ok(());
                    }
                    continue;
                }
            };
            let frame = match next {
                Err(_) => {
                    return Err(ControlError::Stream(format!(
                        "nothing received for {WATCH_IDLE_TIMEOUT:?}"
                    )))
                }
                Ok(None) => return Err(ControlError::Stream("closed by the control plane".into())),
                Ok(Some(Err(e))) => return Err(ControlError::Stream(e.to_string())),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            let mut applied = ApplyOutcome::default();
            let result = apply_lines(&mut buffer, state, &mut applied);
            self.metrics
                .control_plane_updates(applied.snapshots, applied.deltas);
            if let Some(taps) = applied.taps.take() {
                self.set_taps(taps);
            }
            // Whatever applied before an error is published: the sidecar
            // must never serve one revision while asking for the next.
            if applied.changed
                || (applied.state_event && !self.status.has_state.load(Ordering::Relaxed))
            {
                self.publish_guarded(state, hold).await;
            }
            result?;
            if applied.state_event || applied.in_sync {
                // Only a stream that delivers state (or confirms the held
                // revision: a resumed watch) counts as recovered; one that
                // answers 200 and then fails must keep backing off.
                if backoff.attempts > 0 {
                    tracing::info!(control_plane = %endpoint.describe(), revision = state.revision, "watch connected again");
                }
                backoff.reset();
            }
        }
    }

    /// Keeps the taps that select this sidecar.
    fn set_taps(&self, taps: Vec<TapDirective>) {
        let settings = &self.settings;
        let mine: Vec<TapDirective> = taps
            .into_iter()
            .filter(|t| {
                t.filter
                    .selects_sidecar(&settings.namespace, &settings.service, &settings.labels)
            })
            .collect();
        let before = self.tap.taps().len();
        if mine.len() != before {
            tracing::info!(taps = mine.len(), "live taps changed");
        }
        self.tap.set(mine);
    }

    /// Publishes `state` unless it would remove every endpoint of every
    /// service while the published state has some: then the push is
    /// held (counted once per hold) until [`ControlClient::confirm_held`]
    /// resyncs. A later push that brings endpoints back ends the hold.
    async fn publish_guarded(&self, state: &MeshState, hold: &mut Option<Hold>) {
        let published = self.published_endpoints.load(Ordering::Relaxed);
        if empties_the_mesh(state, published) {
            if hold.is_none() {
                let wait = self.confirm_delay();
                tracing::warn!(
                    revision = state.revision,
                    endpoints = published,
                    confirm_in = ?wait,
                    "the control plane pushed a state without any endpoint; holding it and \
                     serving the last one until a full resync confirms it"
                );
                self.metrics.config_push_held();
                *hold = Some(Hold {
                    next_check: tokio::time::Instant::now() + wait,
                });
            }
            return;
        }
        if hold.take().is_some() {
            tracing::info!(
                revision = state.revision,
                "endpoints are back; the held empty push is dropped"
            );
        }
        self.publish(state).await;
    }

    /// The held push's check: a full state from the control plane (a fresh
    /// `watch?revision=0`). Empty too: confirmed, published. With
    /// endpoints: it replaces `state` and is published. Either way the
    /// hold ends and `true` says the watch must reopen from the new state.
    /// A failed resync keeps holding and tries again later (`false`).
    async fn confirm_held(&self, state: &mut MeshState, hold: &mut Option<Hold>) -> bool {
        let full = match self.fetch_full_state().await {
            Ok(full) => full,
            Err(error) => {
                tracing::warn!(%error, "cannot resync to confirm an empty push; still holding it");
                *hold = Some(Hold {
                    next_check: tokio::time::Instant::now() + self.confirm_delay(),
                });
                return false;
            }
        };
        *hold = None;
        if endpoint_count(&full) == 0 {
            tracing::warn!(
                revision = full.revision,
                "a full resync confirms that no service has an endpoint; applying it"
            );
        } else {
            tracing::info!(
                revision = full.revision,
                endpoints = endpoint_count(&full),
                "a full resync has endpoints again; the held empty push is dropped"
            );
        }
        *state = full;
        self.publish(state).await;
        true
    }

    /// How long a held empty push waits for its resync: one heartbeat
    /// interval and a second, so that instances a sick control plane
    /// dropped have registered again by then.
    fn confirm_delay(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed)) + Duration::from_secs(1)
    }

    /// The control plane's whole current state, through the same path a
    /// sidecar without state resumes by: `watch?revision=0`, whose first
    /// state event is a full snapshot (keepalives before it, while the
    /// control plane warms up, are skipped).
    async fn fetch_full_state(&self) -> Result<MeshState, ControlError> {
        let path = watch_path(&MeshState::default());
        let (client, authority) = self.target();
        let request = meshlet_client::request(Method::GET, &authority, &path)
            .header(meshlet_api::tap::WATCH_TAPS_HEADER, "1")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|source| ClientError::Request {
                authority: authority.clone(),
                source,
            })?;
        let response = client
            .timeout(CALL_TIMEOUT)
            .send(&authority, request)
            .await?;
        if response.status() != StatusCode::OK {
            return Err(ControlError::Stream(format!(
                "{authority} answered a resync with {}",
                response.status()
            )));
        }
        let mut body = response.into_body();
        let mut buffer = BytesMut::new();
        let mut full = MeshState::default();
        loop {
            let frame = tokio::time::timeout(RESYNC_TIMEOUT, body.frame()).await;
            let data = match frame {
                Err(_) => return Err(ControlError::Stream("resync: no snapshot in time".into())),
                Ok(None) => return Err(ControlError::Stream("resync: stream closed".into())),
                Ok(Some(Err(e))) => return Err(ControlError::Stream(e.to_string())),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            buffer.extend_from_slice(&data);
            let mut outcome = ApplyOutcome::default();
            // Keepalives of revision 0 (warm-up) apply as nothing; the
            // first snapshot is the answer.
            let applied = apply_lines(&mut buffer, &mut full, &mut outcome);
            self.metrics
                .control_plane_updates(outcome.snapshots, outcome.deltas);
            applied?;
            if outcome.state_event {
                return Ok(full);
            }
        }
    }

    /// Swaps in a snapshot built from `state` and persists the state.
    async fn publish(&self, state: &MeshState) {
        self.published_endpoints
            .store(endpoint_count(state), Ordering::Relaxed);
        if let Some(identity) = &self.identity {
            identity.set_bundle(&state.trust_roots);
        }
        let previous = self.snapshot.load_full();
        let snapshot = Snapshot::build(
            state,
            format!("control plane {}", self.replicas().current().url),
            Some(&previous),
            Own {
                namespace: &self.settings.namespace,
                service: &self.settings.service,
                identity: self.identity.as_ref(),
            },
            &self.limits,
            &self.metrics,
        );
        self.snapshot.store(Arc::new(snapshot));
        self.metrics.set_config_revision(state.revision);
        self.status.has_state.store(true, Ordering::Relaxed);
        self.status
            .last_update_ms
            .store(unix_ms(), Ordering::Relaxed);
        tracing::debug!(revision = state.revision, "applied control plane revision");
        let (path, state) = (self.cp.snapshot_file.clone(), state.clone());
        let written = tokio::task::spawn_blocking(move || persist(&path, &state)).await;
        if let Ok(Err(error)) = written {
            tracing::warn!(%error, "cannot persist the snapshot; a restart without the control plane will start empty");
        }
    }

    /// Starts the registration and heartbeat task; it deregisters when
    /// `stop` fires. Await the handle to know deregistration finished.
    pub fn spawn_registration(
        &self,
        mut health: watch::Receiver<AppHealth>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(identity) = &this.identity {
                let first =
                    tokio::time::timeout(FIRST_CERTIFICATE_WAIT, identity.first_attempt_done());
                tokio::select! {
                    _ = first => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
            let mut backoff = FailoverBackoff::default();
            let mut heartbeat = DEFAULT_HEARTBEAT;
            let mut registered = false;
            loop {
                if !registered {
                    let healthy = health.borrow_and_update().healthy;
                    match this.register(healthy).await {
                        Ok(reply) => {
                            registered = true;
                            backoff.reset();
                            heartbeat = Duration::from_millis(reply.heartbeat_interval_ms.max(50));
                            this.heartbeat_ms
                                .store(heartbeat.as_millis() as u64, Ordering::Relaxed);
                            tracing::info!(instance = %this.cp.instance_id, revision = reply.revision, healthy, "registered with the control plane");
                        }
                        Err(error) => {
                            if backoff.attempts == 0 {
                                tracing::warn!(control_plane = %this.replicas().current().describe(), %error, "cannot register; retrying");
                            }
                            this.status.failed(&error);
                        }
                    }
                    this.status.registered.store(registered, Ordering::Relaxed);
                }
                let wait = if registered {
                    heartbeat
                } else {
                    // The watch task moves to another replica; registration
                    // follows it at its next attempt.
                    backoff.next_delay(this.replicas().len())
                };
                let stopping = tokio::select! {
                    _ = tokio::time::sleep(wait) => false,
                    Ok(()) = health.changed() => false,
                    _ = stop.wait_for(|stop| *stop) => true,
                };
                if stopping {
                    if registered {
                        this.deregister().await;
                    }
                    return;
                }
                if registered {
                    let healthy = health.borrow_and_update().healthy;
                    match this.heartbeat(healthy).await {
                        Ok(()) => {}
                        Err(ControlError::Client(e))
                            if e.status() == Some(StatusCode::NOT_FOUND) =>
                        {
                            tracing::info!("control plane does not know this instance (expired or restarted empty); registering again");
                            registered = false;
                        }
                        Err(error) => {
                            tracing::debug!(%error, "heartbeat failed");
                            this.status.failed(&error);
                            this.status.registered.store(false, Ordering::Relaxed);
                        }
                    }
                }
            }
        })
    }

    async fn register(&self, healthy: bool) -> Result<RegistrationReply, ControlError> {
        let registration = Registration {
            id: self.cp.instance_id.clone(),
            service: self.settings.service.clone(),
            namespace: self.settings.namespace.clone(),
            address: self.cp.advertise_addr,
            labels: self.settings.labels.clone(),
            healthy,
            app_protocol: self.settings.app_protocol,
            role: self.settings.role(),
        };
        let body = serde_json::to_vec(&registration).expect("serializable");
        let (client, authority) = self.target();
        let reply = call(
            &client,
            &authority,
            Method::POST,
            paths::INSTANCES,
            Some(body),
            CALL_TIMEOUT,
        )
        .await?;
        serde_json::from_slice(&reply).map_err(|source| ControlError::Decode {
            what: "registration reply",
            source,
        })
    }

    async fn heartbeat(&self, healthy: bool) -> Result<(), ControlError> {
        let snapshot = self.snapshot.load();
        let heartbeat = Heartbeat {
            healthy,
            revision: self
                .status
                .has_state
                .load(Ordering::Relaxed)
                .then_some(snapshot.revision),
            watching: Some(self.status.connected.load(Ordering::Relaxed)),
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            sent_at_ms: Some(unix_ms()),
            cert_not_after_ms: self
                .identity
                .as_ref()
                .and_then(|identity| identity.leaf())
                .and_then(|leaf| leaf.not_after.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64),
        };
        let body = serde_json::to_vec(&heartbeat).expect("serializable");
        let (client, authority) = self.target();
        call(
            &client,
            &authority,
            Method::PUT,
            &paths::heartbeat(&self.cp.instance_id),
            Some(body),
            CALL_TIMEOUT,
        )
        .await?;
        self.status.registered.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn deregister(&self) {
        let (client, authority) = self.target();
        let result = call(
            &client,
            &authority,
            Method::DELETE,
            &paths::instance(&self.cp.instance_id),
            None,
            CALL_TIMEOUT,
        )
        .await;
        match result {
            Ok(_) => {
                tracing::info!(instance = %self.cp.instance_id, "deregistered from the control plane")
            }
            Err(error) => {
                tracing::warn!(%error, "cannot deregister; the control plane will expire this instance after its TTL")
            }
        }
        self.status.registered.store(false, Ordering::Relaxed);
    }
}

impl CertificateSource for ControlClient {
    fn sign(
        &self,
        request: CertificateRequest,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<CertificateReply, String>> + Send + '_>,
    > {
        Box::pin(async move {
            self.request_certificate(request)
                .await
                .map_err(|error| error.to_string())
        })
    }
}

/// The watch request for the held `state`. Only a state that carries the
/// control plane's epoch (a store identity, never 0 for a control plane)
/// may be resumed by deltas from its revision: the control plane answers a
/// revision of another epoch (a store that was lost or replaced) with a
/// full snapshot, never a delta. A state without an epoch (a snapshot
/// file of an older sidecar, or none) asks for the full snapshot itself.
fn watch_path(state: &MeshState) -> String {
    if state.epoch == 0 || state.revision == 0 {
        return format!("{}?revision=0", paths::WATCH);
    }
    format!(
        "{}?revision={}&epoch={}",
        paths::WATCH,
        state.revision,
        state.epoch
    )
}

/// A push held by the empty-push guard, and when to check it.
#[derive(Debug)]
struct Hold {
    next_check: tokio::time::Instant,
}

/// Endpoints of every service in `state`, whatever their health.
fn endpoint_count(state: &MeshState) -> usize {
    state.services.iter().map(|s| s.endpoints.len()).sum()
}

/// The empty-push guard's rule: `state` removes every endpoint of every
/// service while the published state (with `published` endpoints) has
/// some.
fn empties_the_mesh(state: &MeshState, published: usize) -> bool {
    published > 0 && endpoint_count(state) == 0
}

/// What one batch of watch lines did.
#[derive(Debug, Default)]
struct ApplyOutcome {
    /// The state changed.
    changed: bool,
    /// A snapshot or delta arrived (not just keepalives).
    state_event: bool,
    /// A keepalive confirmed the held revision (a resumed watch in step).
    in_sync: bool,
    /// Snapshots and deltas received (`meshlet_control_plane_updates_total`).
    snapshots: u64,
    deltas: u64,
    /// The live taps, when a `Taps` event arrived (the last one wins).
    taps: Option<Vec<TapDirective>>,
}

/// Applies every complete line in `buffer` to `state`, stopping at the
/// first bad one. A keepalive naming a revision other than the held one
/// means the two sides disagree: the watch must be reopened.
fn apply_lines(
    buffer: &mut BytesMut,
    state: &mut MeshState,
    outcome: &mut ApplyOutcome,
) -> Result<(), ControlError> {
    while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
        let line = buffer.split_to(end + 1);
        let line = &line[..end];
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let event: WatchEvent =
            serde_json::from_slice(line).map_err(|source| ControlError::Decode {
                what: "watch event",
                source,
            })?;
        match &event {
            // Revision 0: the control plane is still warming up.
            WatchEvent::Keepalive { revision } if *revision != 0 && *revision != state.revision => {
                return Err(ControlError::Stream(format!(
                    "control plane is at revision {revision}, this sidecar at {}; resyncing",
                    state.revision
                )));
            }
            WatchEvent::Keepalive { revision } => {
                outcome.in_sync |= *revision != 0 && *revision == state.revision;
            }
            WatchEvent::Snapshot(_) => {
                outcome.state_event = true;
                outcome.snapshots += 1;
            }
            WatchEvent::Delta(_) => {
                outcome.state_event = true;
                outcome.deltas += 1;
            }
            WatchEvent::Taps { taps } => {
                outcome.taps = Some(taps.clone());
                continue;
            }
        }
        outcome.changed |= state.apply(event)?;
    }
    Ok(())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_resumes_only_within_the_control_planes_epoch() {
        let held = |epoch, revision| MeshState {
            epoch,
            revision,
            ..Default::default()
        };
        assert_eq!(
            watch_path(&held(5, 7)),
            format!("{}?revision=7&epoch=5", paths::WATCH)
        );
        // No epoch (an older snapshot file, a standalone state): full snapshot.
        assert_eq!(
            watch_path(&held(0, 7)),
            format!("{}?revision=0", paths::WATCH)
        );
        assert_eq!(
            watch_path(&held(0, 0)),
            format!("{}?revision=0", paths::WATCH)
        );
    }

    #[test]
    fn a_snapshot_of_another_epoch_replaces_the_held_state() {
        // A persisted state of epoch 5 at revision 9; the control plane's
        // store is new (epoch 6) and only at revision 3: its snapshot wins,
        // and a delta of the old numbering no longer applies.
        let mut state = MeshState {
            epoch: 5,
            revision: 9,
            ..Default::default()
        };
        let mut outcome = ApplyOutcome::default();
        let mut buffer = lines(concat!(
            r#"{"type":"snapshot","epoch":6,"revision":3,"services":[],"resources":[]}"#,
            "\n",
        ));
        apply_lines(&mut buffer, &mut state, &mut outcome).unwrap();
        assert_eq!((state.epoch, state.revision), (6, 3));
        assert!(outcome.changed && outcome.state_event);
        assert_eq!(
            watch_path(&state),
            format!("{}?revision=3&epoch=6", paths::WATCH)
        );
        let mut stale = lines(concat!(
            r#"{"type":"delta","fromRevision":9,"revision":10}"#,
            "\n"
        ));
        assert!(matches!(
            apply_lines(&mut stale, &mut state, &mut outcome),
            Err(ControlError::Gap(_))
        ));
    }

    fn state_with(epoch: u64, revision: u64, ports: &[u16]) -> MeshState {
        use meshlet_api::mesh::{EndpointEntry, ServiceEntry};
        MeshState {
            epoch,
            revision,
            services: if ports.is_empty() {
                Vec::new()
            } else {
                vec![ServiceEntry {
                    name: "orders".into(),
                    namespace: "default".into(),
                    endpoints: ports
                        .iter()
                        .map(|port| EndpointEntry {
                            address: ([127, 0, 0, 1], *port).into(),
                            labels: Default::default(),
                            healthy: false,
                            instance_id: None,
                            identity: None,
                        })
                        .collect(),
                }]
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_guard_holds_only_a_push_that_empties_a_mesh_with_endpoints() {
        let empty = state_with(1, 2, &[]);
        let one = state_with(1, 2, &[9001]);
        assert_eq!(endpoint_count(&one), 1, "unhealthy endpoints count");
        assert!(empties_the_mesh(&empty, 1));
        assert!(!empties_the_mesh(&empty, 0), "nothing to lose");
        assert!(!empties_the_mesh(&one, 3), "one endpoint left");
        // A service with an empty endpoint list is no endpoint either.
        let mut hollow = one.clone();
        hollow.services[0].endpoints.clear();
        assert!(empties_the_mesh(&hollow, 1));
    }

    /// A fake control plane on plain HTTP: each connection gets the next
    /// script (NDJSON lines, then the stream stays open) and its request
    /// line is recorded.
    async fn fake_control_plane(
        scripts: Vec<Vec<WatchEvent>>,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        fake_control_plane_then(scripts, false).await
    }

    /// [`fake_control_plane`], whose streams close after their script
    /// when `close` (a replica that goes away).
    async fn fake_control_plane_then(
        scripts: Vec<Vec<WatchEvent>>,
        close: bool,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for script in scripts {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    head.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&head);
                log.lock()
                    .unwrap()
                    .push(text.lines().next().unwrap().to_owned());
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                // One event at a time, so each is applied on its own; then
                // the stream stays open (the client drops it when done).
                tokio::spawn(async move {
                    for event in script {
                        let line = format!("{}\n", serde_json::to_string(&event).unwrap());
                        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                        if stream.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    if close {
                        let _ = stream.write_all(b"0\r\n\r\n").await;
                        return;
                    }
                    let _ = stream.read(&mut buf).await;
                });
            }
        });
        (authority, seen)
    }

    fn client_for(authority: &str, dir: &std::path::Path) -> ControlClient {
        use clap::Parser;
        let settings = crate::cli::Args::try_parse_from([
            "sidecar",
            "--service",
            "frontend",
            "--app-port",
            "8080",
        ])
        .unwrap()
        .settings()
        .unwrap();
        let url = crate::control::replicas::ControlPlaneUrl {
            url: format!("http://{authority}"),
            authority: authority.to_owned(),
        };
        let cp = ControlPlaneSettings {
            url: format!("http://{authority}"),
            authority: authority.to_owned(),
            replicas: Arc::new(Replicas::new(vec![url])),
            ca_file: Default::default(),
            token_file: None,
            client: meshlet_client::Client::new(),
            instance_id: "frontend-1".into(),
            advertise_addr: ([127, 0, 0, 1], 15006).into(),
            snapshot_file: dir.join("snapshot.json"),
            stats_interval: None,
        };
        let client = ControlClient::new(
            Arc::new(settings),
            cp,
            Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::default())),
            Arc::new(Limits::default()),
            Metrics::new("frontend"),
            false,
        );
        // Confirm after 0.1 s + 1 s.
        client.heartbeat_ms.store(100, Ordering::Relaxed);
        client
    }

    #[tokio::test]
    async fn the_watch_fails_over_and_resumes_from_its_revision_on_the_next_replica() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let mut first = state_with(7, 3, &[9001]);
        first.services[0].endpoints[0].healthy = true;
        let mut more = first.clone();
        more.revision = 4;
        more.services[0].endpoints[0].address = ([127, 0, 0, 1], 9002).into();
        // Replica A sends the state, then goes away; replica B knows the
        // same store (epoch 7) and sends only what came after revision 3.
        let (a, _) = fake_control_plane_then(vec![vec![WatchEvent::Snapshot(first)]], true).await;
        let (b, seen_b) = fake_control_plane(vec![vec![WatchEvent::Delta(
            meshlet_api::mesh::MeshDelta {
                from_revision: 3,
                revision: 4,
                services: more.services.clone(),
                removed_services: Vec::new(),
                resources: Vec::new(),
                removed_resources: Vec::new(),
                trust_roots: None,
            },
        )]])
        .await;
        let dir = tempfile::tempdir().unwrap();
        let mut client = client_for(&dead, dir.path());
        let urls = [&dead, &a, &b]
            .iter()
            .map(|authority| crate::control::replicas::ControlPlaneUrl {
                url: format!("http://{authority}"),
                authority: authority.to_string(),
            })
            .collect();
        let mut cp = (*client.cp).clone();
        cp.replicas = Arc::new(Replicas::new(urls));
        client.cp = Arc::new(cp);
        let (_stop, stopped) = watch::channel(false);
        client.spawn_watch(MeshState::default(), stopped);
        eventually("the state from replica A", || has_orders(&client)).await;
        eventually("revision 4 from replica B", || {
            client.metrics.config_revision() == 4
        })
        .await;
        let seen = seen_b.lock().unwrap().clone();
        assert!(seen[0].contains("revision=3&epoch=7"), "resumed: {seen:?}");
        assert_eq!(client.replicas().current().authority, b);
        assert_eq!(client.replicas().failovers(), 2, "dead → A → B");
        let text = String::from_utf8(client.metrics.render(&[])).unwrap();
        assert!(
            text.contains("meshlet_control_plane_updates_total{type=\"snapshot\"} 1"),
            "{text}"
        );
        assert!(text.contains("meshlet_control_plane_updates_total{type=\"delta\"} 1"));
        assert!(text.contains("meshlet_control_plane_failovers_total 2"));
        assert!(text.contains(&format!(
            "meshlet_control_plane_current{{url=\"http://{b}\"}} 1"
        )));
    }

    fn has_orders(client: &ControlClient) -> bool {
        client.snapshot.load().service("orders").is_some()
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn delta_removing_orders(from: u64) -> WatchEvent {
        WatchEvent::Delta(meshlet_api::mesh::MeshDelta {
            from_revision: from,
            revision: from + 1,
            services: Vec::new(),
            removed_services: vec![meshlet_api::mesh::ServiceKey {
                namespace: "default".into(),
                name: "orders".into(),
            }],
            resources: Vec::new(),
            removed_resources: Vec::new(),
            trust_roots: None,
        })
    }

    #[tokio::test]
    async fn an_empty_push_is_held_until_a_full_resync_confirms_it() {
        let mut healthy = state_with(7, 3, &[9001]);
        healthy.services[0].endpoints[0].healthy = true;
        let mut back = state_with(7, 5, &[9001, 9002]);
        for ep in &mut back.services[0].endpoints {
            ep.healthy = true;
        }
        let (authority, seen) = fake_control_plane(vec![
            // The watch: a state with orders, then a delta removing it.
            vec![WatchEvent::Snapshot(healthy), delta_removing_orders(3)],
            // The resync: orders is back (the push was a fluke).
            vec![WatchEvent::Snapshot(back)],
            // The watch again from revision 5: every endpoint goes again.
            vec![delta_removing_orders(5)],
            // The resync confirms it.
            vec![WatchEvent::Snapshot(state_with(7, 6, &[]))],
            // The watch from revision 6.
            vec![],
        ])
        .await;
        let dir = tempfile::tempdir().unwrap();
        let client = client_for(&authority, dir.path());
        let (_stop, stopped) = watch::channel(false);
        client.spawn_watch(MeshState::default(), stopped);
        eventually("first state", || has_orders(&client)).await;
        eventually("the empty push held", || {
            client.metrics.config_pushes_held() == 1
        })
        .await;
        assert!(has_orders(&client), "held: the last snapshot still serves");
        // The resync has endpoints: published, no emptiness applied.
        eventually("the resync's state", || {
            client.snapshot.load().endpoints().count() == 2
        })
        .await;
        // The second empty push is held, then confirmed and applied.
        eventually("held again", || client.metrics.config_pushes_held() == 2).await;
        eventually("confirmed emptiness applied", || !has_orders(&client)).await;
        eventually("the watch reopened", || seen.lock().unwrap().len() == 5).await;
        let seen = seen.lock().unwrap().clone();
        assert!(seen[1].contains("revision=0"), "a full resync: {seen:?}");
        assert!(seen[2].contains("revision=5&epoch=7"), "{seen:?}");
        assert!(seen[3].contains("revision=0"), "{seen:?}");
        assert!(seen[4].contains("revision=6&epoch=7"), "{seen:?}");
    }

    #[tokio::test]
    async fn a_push_that_brings_endpoints_back_ends_the_hold() {
        let mut healthy = state_with(7, 3, &[9001]);
        healthy.services[0].endpoints[0].healthy = true;
        let mut again = healthy.clone();
        again.revision = 5;
        let back = WatchEvent::Delta(meshlet_api::mesh::MeshDelta {
            from_revision: 4,
            revision: 5,
            services: again.services.clone(),
            removed_services: Vec::new(),
            resources: Vec::new(),
            removed_resources: Vec::new(),
            trust_roots: None,
        });
        let (authority, seen) = fake_control_plane(vec![vec![
            WatchEvent::Snapshot(healthy),
            delta_removing_orders(3),
            back,
        ]])
        .await;
        let dir = tempfile::tempdir().unwrap();
        let client = client_for(&authority, dir.path());
        // Confirm after 2 s + 1 s: the push that ends the hold comes 300 ms
        // after the empty one, so a busy machine cannot let the
        // confirmation come first.
        client.heartbeat_ms.store(2000, Ordering::Relaxed);
        let (_stop, stopped) = watch::channel(false);
        client.spawn_watch(MeshState::default(), stopped);
        eventually("the empty push held", || {
            client.metrics.config_pushes_held() == 1
        })
        .await;
        let held = client.snapshot.load_full();
        eventually("revision 5 applied", || {
            !Arc::ptr_eq(&client.snapshot.load_full(), &held)
        })
        .await;
        assert!(has_orders(&client));
        // No resync was needed: past the confirmation delay, still one
        // connection and orders still there.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(has_orders(&client));
    }

    fn lines(text: &str) -> BytesMut {
        BytesMut::from(text)
    }

    #[test]
    fn lines_apply_until_a_bad_one_and_keep_what_applied() {
        let mut state = MeshState::default();
        let mut outcome = ApplyOutcome::default();
        let mut buffer = lines(concat!(
            r#"{"type":"snapshot","epoch":5,"revision":3,"services":[],"resources":[]}"#,
            "\n",
            r#"{"type":"delta","fromRevision":3,"revision":4}"#,
            "\n",
            "not json\n",
            r#"{"type":"delta","fromRevision":4,"revision":5}"#,
            "\n",
        ));
        let result = apply_lines(&mut buffer, &mut state, &mut outcome);
        assert!(
            matches!(result, Err(ControlError::Decode { .. })),
            "{result:?}"
        );
        assert_eq!(
            (state.epoch, state.revision),
            (5, 4),
            "the good lines applied"
        );
        assert!(outcome.changed && outcome.state_event);
    }

    #[test]
    fn a_keepalive_for_another_revision_forces_a_resync() {
        let mut state = MeshState {
            revision: 4,
            ..Default::default()
        };
        let mut outcome = ApplyOutcome::default();
        let mut same = lines(
            "{\"type\":\"keepalive\",\"revision\":4}\n{\"type\":\"keepalive\",\"revision\":0}\n",
        );
        apply_lines(&mut same, &mut state, &mut outcome).unwrap();
        assert!(!outcome.changed && !outcome.state_event);
        let mut other = lines("{\"type\":\"keepalive\",\"revision\":6}\n");
        assert!(matches!(
            apply_lines(&mut other, &mut state, &mut outcome),
            Err(ControlError::Stream(_))
        ));
        // A partial line waits for the rest.
        let mut partial = lines("{\"type\":\"keepalive\"");
        apply_lines(&mut partial, &mut state, &mut outcome).unwrap();
        assert_eq!(&partial[..], b"{\"type\":\"keepalive\"");
    }
}
