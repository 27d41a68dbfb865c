//! A client that hangs up while its change is being committed must not
//! leave the store and the published state apart (axum drops a handler's
//! future when its client disconnects). A unit test: it builds the router
//! with the crate's own access state around a store that holds commits.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshlet_api::mesh::RevisionRecord;

use crate::access::{Access, AllowedHosts};
use crate::api::router;
use crate::auth::{Role, TokenRecord, Tokens};
use crate::controller::Controller;
use crate::error::StoreError;
use crate::state::AppState;
use crate::store::{AccessRecords, Commit, Loaded, MemoryStore, OwnerChanges, Rewind, Store};
use crate::traces::{TraceLimits, TraceStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A store whose commits wait until the test lets them go.
struct GatedStore {
    inner: MemoryStore,
    /// Told when a commit starts.
    started: Mutex<std::sync::mpsc::Sender<()>>,
    /// Waited on before the commit proceeds.
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Store for GatedStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        self.inner.load()
    }

    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let _ = self.started.lock().unwrap().send(());
        let _ = self
            .release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
        self.inner.commit(commit)
    }

    fn history(&self, limit: usize) -> Result<Vec<RevisionRecord>, StoreError> {
        self.inner.history(limit)
    }

    fn rewind(&self, revision: u64) -> Result<Rewind, StoreError> {
        self.inner.rewind(revision)
    }

    fn load_access(&self) -> Result<AccessRecords, StoreError> {
        self.inner.load_access()
    }

    fn save_tokens(&self, tokens: &[TokenRecord]) -> Result<(), StoreError> {
        self.inner.save_tokens(tokens)
    }

    fn save_owner_changes(&self, changes: &OwnerChanges) -> Result<(), StoreError> {
        self.inner.save_owner_changes(changes)
    }
}

fn registration_request(id: &str, port: u16, token: &str) -> String {
    let body = format!(
        r#"{{"id":"{id}","service":"orders","address":"127.0.0.1:{port}","healthy":true}}"#
    );
    format!(
        "POST /api/v1/instances HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         authorization: Bearer {token}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_client_hung_up_is_still_applied_and_published() {
    let (started_tx, started) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let store = Arc::new(GatedStore {
        inner: MemoryStore::new(),
        started: Mutex::new(started_tx),
        release: Mutex::new(release_rx),
    });
    let controller = Arc::new(Controller::load(store.clone(), Duration::from_secs(60)).unwrap());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut tokens = Tokens::new();
    let (token, _) = tokens.create("test", Role::Admin, None).unwrap();
    let token = token.into_string();
    let access = Access::new(
        Arc::new(std::sync::RwLock::new(tokens)),
        AllowedHosts::new(["localhost"]),
    );
    let app = router(AppState {
        controller: controller.clone(),
        keepalive: Duration::from_secs(5),
        shutdown,
        traces: Arc::new(TraceStore::new(TraceLimits::default())),
        stats: Default::default(),
        activity: Default::default(),
        access,
        store: store.clone(),
        token_writer: Default::default(),
        workload: Arc::new(crate::workload::Workload::for_tests()),
        connections: Default::default(),
        inject: Default::default(),
        taps: Default::default(),
        peers: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The client sends a registration and hangs up while it commits.
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client
        .write_all(registration_request("a", 8081, &token).as_bytes())
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || started.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the commit started");
    drop(client);
    release.send(()).unwrap();

    // The change lands in memory (published) as well as on disk.
    let deadline = Instant::now() + Duration::from_secs(10);
    while controller.published().revision != 1 {
        assert!(Instant::now() < deadline, "revision 1 never published");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(controller.published().instances.contains_key("a"));

    // The next change gets the next revision and both are kept.
    release.send(()).unwrap();
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client
        .write_all(registration_request("b", 8082, &token).as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let disk = store.load().unwrap();
    let published = controller.published();
    assert_eq!((disk.revision, published.revision), (2, 2));
    let on_disk: Vec<_> = disk
        .instances
        .iter()
        .map(|i| i.registration.id.as_str())
        .collect();
    assert_eq!(on_disk, ["a", "b"]);
    assert_eq!(published.instances.keys().collect::<Vec<_>>(), ["a", "b"]);
    let history = store.history(10).unwrap();
    assert_eq!(
        history.iter().map(|r| r.revision).collect::<Vec<_>>(),
        [2, 1]
    );
}
