//! A real etcd cluster on loopback for the `--store etcd` tests: Debian's
//! `etcd` binary (package `etcd-server`), N members on free ports, their
//! data in a temporary directory.
//!
//! [`EtcdCluster::start`] spawns every member and waits (with a deadline)
//! until each answers `GET /health` with `"health":"true"`; members can be
//! SIGKILLed ([`EtcdCluster::kill`]) and started again on their data
//! ([`EtcdCluster::restart`]); [`EtcdCluster::count_prefix`] asks etcd
//! itself how many keys a prefix has. Every process is killed when the cluster is
//! dropped — also while a failing test unwinds — and the directory is
//! removed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::process::{free_port, ControlPlaneProcess, TempDir};
use crate::wait;

/// How long a cluster may take to elect a leader and answer health.
const START_PATIENCE: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    dir: TempDir,
    members: Vec<Member>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one is healthy.
    pub async fn start(size: usize) -> EtcdCluster {
        let dir = TempDir::new();
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_healthy(i).await;
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let member = &self.members[i];
        let data = self.dir.path.join(&member.name);
        let log = self.dir.path.join(format!("{}.log", member.name));
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--initial-cluster-token",
                &format!("meshlet-e2e-{}", std::process::id()),
            ])
            // A revision (or an expiry of many instances) is one txn.
            .args(["--max-txn-ops", "10000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("etcd log file"),
            )
            .kill_on_drop(true)
            .spawn()
            .expect("spawn etcd (apt-get install etcd-server)");
        self.members[i].child = Some(child);
    }

    async fn wait_healthy(&self, i: usize) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port));
        let what = format!("etcd member {} healthy", self.members[i].name);
        let log = self.dir.path.join(format!("{}.log", self.members[i].name));
        let healthy = wait::within(START_PATIENCE, || async move {
            let reply = crate::client::get(addr, "/health").await.ok()?;
            (reply.status == 200 && reply.text().contains("\"true\"")).then_some(())
        })
        .await;
        if healthy.is_none() {
            panic!(
                "timed out waiting for {what}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }

    /// The client URLs, comma-separated (for `--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A replica's flags for this cluster: `--store etcd`, the endpoints,
    /// `--etcd-prefix prefix`, `--replica-id id`.
    pub fn replica_args(&self, prefix: &str, id: &str) -> Vec<String> {
        [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &self.endpoints(),
            "--etcd-prefix",
            prefix,
            "--replica-id",
            id,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Three control-plane replicas `replica-1..3` on this cluster under
    /// `prefix`, data directories in `dir`, each with `extra` flags,
    /// started one after the other (the first creates the CA and the admin
    /// token, the others copy them from etcd).
    pub async fn start_replicas(
        &self,
        dir: &TempDir,
        prefix: &str,
        extra: &[&str],
    ) -> Vec<ControlPlaneProcess> {
        let mut out = Vec::new();
        for i in 1..=3 {
            let id = format!("replica-{i}");
            let mut args = self.replica_args(prefix, &id);
            args.extend(extra.iter().map(|a| a.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            out.push(ControlPlaneProcess::start(&dir.path.join(&id), &args).await);
        }
        out
    }

    /// SIGKILLs member `i` and waits until it is gone.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts member `i` again on its data directory; waits until it
    /// answers health (which needs a quorum of the cluster).
    pub async fn restart(&mut self, i: usize) {
        self.kill(i).await;
        self.spawn(i);
    }

    /// Waits until member `i` is healthy (after [`EtcdCluster::restart`]
    /// of enough members for a quorum).
    pub async fn wait_member_healthy(&self, i: usize) {
        self.wait_healthy(i).await;
    }

    /// How many keys start with `prefix`, asked of the first running
    /// member through etcd's JSON gateway (`POST /v3/kv/range`); `None`
    /// when no member answers.
    pub async fn count_prefix(&self, prefix: &str) -> Option<u64> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        let body = serde_json::json!({
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&end),
            "count_only": true,
        });
        let member = self.members.iter().find(|m| m.child.is_some())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], member.client_port));
        let reply = crate::client::post_json(addr, "/v3/kv/range", &body).await;
        if reply.status != 200 {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
        // proto3 JSON: an int64 is a string, and a zero is left out.
        Some(
            value["count"]
                .as_str()
                .map_or(0, |c| c.parse().unwrap_or(0)),
        )
    }

    /// Each member's client address (its `/metrics` and `/health` too).
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.members
            .iter()
            .map(|m| SocketAddr::from(([127, 0, 0, 1], m.client_port)))
            .collect()
    }

    /// Each running member's process id (`/proc` figures in benchmarks).
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().and_then(Child::id))
            .collect()
    }

    /// Where the members keep their data and logs.
    pub fn dir(&self) -> PathBuf {
        self.dir.path.clone()
    }
}

/// Standard base64 with padding (the gateway's encoding of bytes).
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | ((*b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(child) = member.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_as_the_gateway_reads_it() {
        assert_eq!(super::b64(b"/m/instances/"), "L20vaW5zdGFuY2VzLw==");
        assert_eq!(super::b64(b"ab"), "YWI=");
        assert_eq!(super::b64(b"abc"), "YWJj");
    }
}
