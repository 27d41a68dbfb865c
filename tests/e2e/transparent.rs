//! Transparent mode end to end (issue 6, points 1 and 2), in network
//! namespaces this test creates: two "pods" A (10.77.0.1) and B
//! (10.77.0.2) joined by a veth pair, each with its app, the nat rules of
//! `sidecar init-iptables` and a sidecar in `--mode transparent` running
//! as UID 1337; the control plane runs in A on its pod IP.
//!
//! ```text
//!  A: curl 10.77.0.2:8080 ─► OUTPUT REDIRECT :15001 ─► A's sidecar (orders: pod IP of an endpoint)
//!       ─► 10.77.0.2:15006 ─► B's sidecar ─► 127.0.0.1:8080 (B's app)
//!  A: curl 10.77.0.3:8081 (no service there) ─► A's sidecar (passthrough) ─► B's sidecar
//!       ─► 10.77.0.3:8081 (the original destination: the pod's own address)
//!  A: curl 10.77.0.3:8082 ─► ... ─► B's sidecar ─► 10.77.0.3:8082: refused, the app
//!       there listens on 127.0.0.1 only (a localhost-only port stays private)
//!  A: tcp-echo 10.77.0.2:9000 ─► A's sidecar (opaque) ─► PREROUTING REDIRECT :15006
//!       ─► B's sidecar (opaque) ─► 10.77.0.2:9000
//! ```
//!
//! Needs root, `ip`, `iptables`, `setpriv`, `curl` (and `promtool`, as
//! the metrics tests do): without them the
//! tests print why and pass, unless `CI` is set (then they fail). The
//! namespaces, and with them every rule, are deleted and the processes
//! killed by Drop guards, also when an assertion fails.

use std::time::Duration;

use meshlet_e2e::metrics::{promtool_check, Scrape};
use meshlet_e2e::netns::{can_run, on_path, Netns, NsProcess};
use meshlet_e2e::process::binary;
use meshlet_e2e::{wait, TempDir};

const TOOLS: &[&str] = &["ip", "iptables", "iptables-save", "setpriv", "curl"];
const A_IP: &str = "10.77.0.1";
const B_IP: &str = "10.77.0.2";
const APP_PORT: &str = "8080";
const ECHO_PORT: &str = "9000";
/// A second address of B that no mesh service has, and an app there that
/// is not in the mesh either.
const OTHER_IP: &str = "10.77.0.3";
const OTHER_PORT: &str = "8081";
/// An app of B that listens on 127.0.0.1 only.
const PRIVATE_PORT: &str = "8082";

fn bin(name: &str) -> String {
    binary(name).display().to_string()
}

/// Two pods and everything running in them. Field order is drop order:
/// processes first, then the namespaces (whose deletion removes the rules
/// and the veth pair), then the directory of logs.
struct Pods {
    processes: Vec<NsProcess>,
    a: Netns,
    b: Netns,
    dir: TempDir,
}

impl Pods {
    fn start(&mut self, ns: Which, name: &str, args: &[&str]) {
        let log = self.dir.path.join(format!("{name}.log"));
        let process = self.ns(ns).spawn(args, &log);
        self.processes.push(process);
    }

    fn ns(&self, which: Which) -> &Netns {
        match which {
            Which::A => &self.a,
            Which::B => &self.b,
        }
    }

    /// Every process's log, for failure messages.
    fn logs(&self) -> String {
        self.processes
            .iter()
            .map(|p| format!("--- {}\n{}", p.log.display(), p.log_text()))
            .collect()
    }

    /// A sidecar's `/metrics`, scraped from inside its namespace.
    async fn metrics(&self, which: Which) -> Scrape {
        let (status, text) = self
            .ns(which)
            .curl("http://127.0.0.1:15020/metrics")
            .await
            .expect("admin answers");
        assert_eq!(status, 200);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Scrape::parse(body)
    }

    async fn wait_metric(&self, which: Which, name: &str, labels: &[(&str, &str)], at_least: f64) {
        let found = wait::within(Duration::from_secs(10), || async {
            let value = self.metrics(which).await.sum(name, labels);
            (value >= at_least).then_some(())
        })
        .await;
        if found.is_none() {
            let scrape = self.metrics(which).await;
            panic!(
                "{which:?}: {name}{labels:?} never reached {at_least}\n{}\n{}",
                scrape.text,
                self.logs()
            );
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    A,
    B,
}

/// A sidecar of `service` in transparent mode as UID 1337, registered with
/// the control plane under its pod IP.
fn sidecar_args<'a>(
    sidecar: &'a str,
    service: &'a str,
    ip: &'a str,
    cp: &'a str,
    token_file: &'a str,
    ca_file: &'a str,
    snapshot: &'a str,
) -> Vec<&'a str> {
    vec![
        "setpriv",
        "--reuid",
        "1337",
        "--regid",
        "1337",
        "--clear-groups",
        "--",
        sidecar,
        "--service",
        service,
        "--app-port",
        APP_PORT,
        "--mode",
        "transparent",
        "--control-plane",
        cp,
        "--token-file",
        token_file,
        "--ca-file",
        ca_file,
        "--advertise-ip",
        ip,
        "--snapshot-file",
        snapshot,
    ]
}

#[tokio::test]
async fn unmodified_clients_reach_the_other_pod_through_both_sidecars() {
    if !can_run(TOOLS) {
        return;
    }
    let id = std::process::id();
    let (a, b) = (
        Netns::create(&format!("meshlet-a-{id}")),
        Netns::create(&format!("meshlet-b-{id}")),
    );
    Netns::link(
        &a,
        &format!("mla{id}"),
        &format!("{A_IP}/24"),
        &b,
        &format!("mlb{id}"),
        &format!("{B_IP}/24"),
    );
    let mut pods = Pods {
        processes: Vec::new(),
        a,
        b,
        dir: TempDir::new(),
    };
    // The sidecars (UID 1337) write their snapshot files here.
    std::os::unix::fs::chown(&pods.dir.path, Some(1337), Some(1337)).expect("chown");
    let (sidecar, demo, echo) = (bin("sidecar"), bin("demo-service"), bin("meshlet-tcp-echo"));
    let cp_url = format!("https://{A_IP}:15010");

    // Control plane in A, on A's pod IP.
    let data = pods.dir.path.join("cp-data");
    let cp_listen = format!("{A_IP}:15010");
    pods.start(
        Which::A,
        "control-plane",
        &[
            &bin("control-plane"),
            "--listen",
            &cp_listen,
            "--data-dir",
            data.to_str().unwrap(),
            // The pod IP is in the certificate and an allowed Host.
            "--advertise-name",
            A_IP,
        ],
    );
    // The sidecars run as UID 1337 and cannot read the control plane's
    // (0700) data dir: the CA is handed out as a copy, as a Secret would.
    let ca_file = pods.dir.path.join("ca.crt").display().to_string();
    let cp_ca = data.join("ca.crt");
    let healthz = format!("{cp_url}/healthz");
    wait::until(
        "control plane https /healthz",
        Duration::from_secs(10),
        || async {
            std::fs::copy(&cp_ca, &ca_file).ok()?;
            let out = pods
                .a
                .exec(&[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "5",
                    "--cacert",
                    &ca_file,
                    &healthz,
                ])
                .await;
            (out.stdout == b"200").then_some(())
        },
    )
    .await;
    let admin_token = std::fs::read_to_string(data.join("admin.token"))
        .expect("admin.token")
        .trim()
        .to_owned();
    let mut token_files = Vec::new();
    for service in ["frontend", "orders"] {
        let body = format!(
            r#"{{"name":"sidecar-{service}","role":"sidecar","namespace":"default","service":"{service}"}}"#
        );
        let out = pods
            .a
            .exec(&[
                "curl",
                "-s",
                "--fail-with-body",
                "--max-time",
                "5",
                "--cacert",
                &ca_file,
                "-H",
                &format!("authorization: Bearer {admin_token}"),
                "-H",
                "content-type: application/json",
                "--data",
                &body,
                &format!("{cp_url}/api/v1/tokens"),
            ])
            .await;
        let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "token for {service}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let path = pods.dir.path.join(format!("{service}.token"));
        meshlet_e2e::access::write_private(&path, created["token"].as_str().expect("token"));
        std::os::unix::fs::chown(&path, Some(1337), Some(1337)).expect("chown token");
        token_files.push(path.display().to_string());
    }

    // Apps: unmodified, they know nothing of the mesh.
    pods.start(
        Which::A,
        "frontend-app",
        &[&demo, "--name", "frontend", "--port", APP_PORT],
    );
    pods.start(
        Which::B,
        "orders-app",
        &[&demo, "--name", "orders", "--port", APP_PORT],
    );
    pods.start(Which::B, "echo", &[&echo, "serve", ECHO_PORT]);
    pods.start(
        Which::B,
        "other-app",
        &[
            &demo, "--name", "outside", "--port", OTHER_PORT, "--host", "0.0.0.0",
        ],
    );
    pods.start(
        Which::B,
        "private-app",
        &[&demo, "--name", "private", "--port", PRIVATE_PORT],
    );
    let other_cidr = format!("{OTHER_IP}/24");
    let b_if = format!("mlb{id}");
    pods.b
        .must(&["ip", "addr", "add", &other_cidr, "dev", &b_if]);

    // The rules, then the sidecars.
    for ns in [&pods.a, &pods.b] {
        ns.must(&[&sidecar, "init-iptables"]);
    }
    let snapshot_a = pods.dir.path.join("a.json").display().to_string();
    let snapshot_b = pods.dir.path.join("b.json").display().to_string();
    pods.start(
        Which::A,
        "frontend-sidecar",
        &sidecar_args(
            &sidecar,
            "frontend",
            A_IP,
            &cp_url,
            &token_files[0],
            &ca_file,
            &snapshot_a,
        ),
    );
    pods.start(
        Which::B,
        "orders-sidecar",
        &sidecar_args(
            &sidecar,
            "orders",
            B_IP,
            &cp_url,
            &token_files[1],
            &ca_file,
            &snapshot_b,
        ),
    );
    for which in [Which::A, Which::B] {
        let ready = wait::within(Duration::from_secs(15), || async {
            matches!(
                pods.ns(which).curl("http://127.0.0.1:15020/ready").await,
                Some((200, _))
            )
            .then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "{which:?}'s sidecar never ready\n{}",
            pods.logs()
        );
    }
    for process in &mut pods.processes {
        assert!(process.is_running(), "{} exited", process.log.display());
    }

    // A's sidecar knows B's as a healthy endpoint of orders (B registers,
    // then reports its app healthy; each change is pushed to A).
    let b_endpoint = format!("{B_IP}:15006");
    let known = wait::within(Duration::from_secs(15), || async {
        let (_, reply) = pods.a.curl("http://127.0.0.1:15020/config_dump").await?;
        let dump: serde_json::Value = serde_json::from_str(reply.split_once("\r\n\r\n")?.1).ok()?;
        let services = dump["snapshot"]["services"].as_array()?;
        let orders = services.iter().find(|s| s["name"] == "orders")?;
        let healthy = orders["endpoints"].as_array()?;
        healthy
            .iter()
            .any(|e| e["address"] == b_endpoint.as_str())
            .then_some(())
    })
    .await;
    assert!(known.is_some(), "A never saw B's endpoint\n{}", pods.logs());

    // 1. A plain curl in A to B's pod IP and app port goes through A's
    // outbound (counted below) and B's inbound (x-forwarded-for). An
    // identity header the client wrote never reaches the app: B's app sees
    // only what B's sidecar verified (nothing, on a plaintext hop).
    let url = format!("http://{B_IP}:{APP_PORT}/");
    let out = pods
        .a
        .exec(&[
            "curl",
            "-s",
            "-i",
            "--max-time",
            "5",
            "-H",
            "x-meshlet-source: evil",
            "-H",
            "x-meshlet-source-identity: spiffe://meshlet.local/ns/default/sa/evil",
            &url,
        ])
        .await;
    let reply = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "{reply}\n{}",
        pods.logs()
    );
    assert!(reply.contains("\"service\":\"orders\""), "{reply}");
    assert!(
        !reply.contains("evil"),
        "a client's identity header: {reply}"
    );
    assert!(
        reply.contains("x-forwarded-for"),
        "B's inbound sidecar forwarded it: {reply}"
    );

    // 2. Both sidecars counted it.
    pods.wait_metric(
        Which::A,
        "request_total",
        &[
            ("direction", "outbound"),
            ("destination", "orders"),
            ("status_code", "200"),
        ],
        1.0,
    )
    .await;
    pods.wait_metric(
        Which::B,
        "request_total",
        &[
            ("direction", "inbound"),
            ("destination", "orders"),
            ("status_code", "200"),
        ],
        1.0,
    )
    .await;

    // 3. An address no service has passes through A's sidecar unchanged
    // and B's sidecar hands it to the original destination (the pod's own
    // address and the port that was called).
    let other_url = format!("http://{OTHER_IP}:{OTHER_PORT}/");
    let (status, reply) = pods.a.curl(&other_url).await.expect("an answer");
    assert_eq!(status, 200, "{reply}\n{}", pods.logs());
    assert!(reply.contains("\"service\":\"outside\""), "{reply}");
    assert!(
        !reply.contains("x-meshlet-source"),
        "not a mesh service: {reply}"
    );
    pods.wait_metric(
        Which::A,
        "request_total",
        &[("direction", "outbound"), ("destination", "passthrough")],
        1.0,
    )
    .await;
    // ... so a port the app bound on 127.0.0.1 only is not reachable
    // through B's inbound (it was, when the inbound forwarded to
    // 127.0.0.1 on the port called).
    let private_url = format!("http://{OTHER_IP}:{PRIVATE_PORT}/");
    let (status, reply) = pods.a.curl(&private_url).await.expect("an answer");
    assert_eq!(status, 502, "{reply}\n{}", pods.logs());
    assert!(!reply.contains("\"service\":\"private\""), "{reply}");
    assert!(
        reply.contains("upstream_connect_failed"),
        "B's inbound could not connect to {OTHER_IP}:{PRIVATE_PORT}: {reply}"
    );
    let (status, reply) = pods
        .b
        .curl(&format!("http://127.0.0.1:{PRIVATE_PORT}/"))
        .await
        .expect("an answer");
    assert_eq!(status, 200, "the app itself is up: {reply}");

    // 4. Opaque TCP (a line echo, client speaks first) still passes.
    let echo_addr = format!("{B_IP}:{ECHO_PORT}");
    let out = pods
        .a
        .exec(&[&echo, "call", &echo_addr, "hello through the mesh"])
        .await;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pods.logs()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello through the mesh"
    );
    pods.wait_metric(
        Which::A,
        "tcp_connections_total",
        &[("direction", "outbound")],
        1.0,
    )
    .await;
    pods.wait_metric(
        Which::B,
        "tcp_connections_total",
        &[("direction", "inbound")],
        1.0,
    )
    .await;
    // Bytes are counted when the connection closes: the line each way.
    let line = "hello through the mesh\n".len() as f64;
    pods.wait_metric(
        Which::A,
        "tcp_sent_bytes_total",
        &[("direction", "outbound")],
        line,
    )
    .await;
    pods.wait_metric(
        Which::B,
        "tcp_received_bytes_total",
        &[("direction", "inbound")],
        line,
    )
    .await;
    for which in [Which::A, Which::B] {
        let scrape = pods.metrics(which).await;
        if let Err(problems) = promtool_check(&scrape.text) {
            panic!("{which:?}: {problems}\n{}", scrape.text);
        }
    }

    // 5. A RateLimitPolicy applied through the control plane refuses.
    let policy = pods.dir.path.join("limit.yaml");
    std::fs::write(
        &policy,
        "apiVersion: meshlet.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: orders-limit}\n\
         spec:\n  targetRef: {service: orders}\n  tokenBucket: {capacity: 1, refillPerSecond: 1}\n",
    )
    .unwrap();
    let applied = pods
        .a
        .exec(&[
            &bin("meshctl"),
            "--server",
            &cp_url,
            "--token",
            &admin_token,
            "--ca-file",
            &ca_file,
            "apply",
            "-f",
            policy.to_str().unwrap(),
        ])
        .await;
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let refused = wait::within(Duration::from_secs(10), || async {
        let (status, reply) = pods.a.curl(&url).await?;
        (status == 429).then_some(reply)
    })
    .await
    .unwrap_or_else(|| panic!("no 429 after the RateLimitPolicy\n{}", pods.logs()));
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("x-meshlet-reason: rate_limited"),
        "{refused}"
    );
}

/// The meshlet lines of `SAVE -t nat` in `ns`.
fn meshlet_rules(ns: &Netns, save: &str) -> Vec<String> {
    let out = ns.must(&[save, "-t", "nat"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("MESHLET"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn init_iptables_twice_leaves_one_set_and_cleanup_leaves_none() {
    if !can_run(TOOLS) {
        return;
    }
    let sidecar = bin("sidecar");
    // Both back ends where both exist (Debian ships both); else the default.
    let flavours: Vec<(Option<&str>, &str)> =
        if on_path("iptables-nft-save") && on_path("iptables-legacy-save") {
            vec![
                (Some("nft"), "iptables-nft-save"),
                (Some("legacy"), "iptables-legacy-save"),
            ]
        } else {
            vec![(None, "iptables-save")]
        };
    for (flavour, save) in flavours {
        let ns = Netns::create(&format!("meshlet-rules-{}", std::process::id()));
        let mut args = vec![
            sidecar.as_str(),
            "init-iptables",
            "--exclude-outbound-cidrs",
            "10.96.0.0/12",
            "--exclude-inbound-ports",
            "22",
        ];
        if let Some(flavour) = flavour {
            args.extend(["--iptables", flavour]);
        }
        ns.must(&args);
        let once = meshlet_rules(&ns, save);
        assert!(
            once.iter().any(|l| l.contains("REDIRECT --to-ports 15001")),
            "{flavour:?}: {once:#?}"
        );
        assert!(once.iter().any(|l| l.contains("10.96.0.0/12")), "{once:#?}");
        ns.must(&args);
        assert_eq!(
            meshlet_rules(&ns, save),
            once,
            "{flavour:?}: a second run changes nothing"
        );
        args.push("--cleanup");
        ns.must(&args);
        assert_eq!(
            meshlet_rules(&ns, save),
            Vec::<String>::new(),
            "{flavour:?}: cleanup leaves nothing"
        );
        ns.must(&args);
    }
}
