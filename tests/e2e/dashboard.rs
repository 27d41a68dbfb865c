//! The dashboard in a real browser: headless chromium, driven over the
//! DevTools protocol, against a running demo mesh (control plane;
//! frontend → orders v1 + v2 → inventory, demo-service apps with sidecars
//! reporting stats every 500 ms; the demo's orders circuit breaker).
//!
//! One page session walks every view: services with their instances and
//! rates, the topology edge frontend → orders, a trace's waterfall across
//! three services, and a circuit breaker turning open — shown without a
//! reload, by the server-sent updates — once both orders instances fail.
//! The page never logs an error, and its first load stays under 500 KB.
//! A PNG of each view goes to `target/screenshots/` for a person to look
//! at.

use std::path::PathBuf;
use std::time::Duration;

use meshlet_e2e::browser::{self, Browser};
use meshlet_e2e::demo::DemoService;
use meshlet_e2e::{client, meshctl, wait, ControlPlaneProcess, TempDir};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(20);
/// Sidecars report stats often, so the page catches up quickly.
const SIDECAR_ARGS: &[&str] = &["--stats-interval", "500ms"];
/// Requests sent before the page opens (frontend serves exactly these).
const REQUESTS: usize = 40;
const PAGE_WEIGHT_LIMIT: u64 = 500 * 1024;

/// The demo mesh of `examples/demo.sh`, on free ports.
struct Mesh {
    cp: ControlPlaneProcess,
    frontend: DemoService,
    orders: [DemoService; 2],
    _inventory: DemoService,
    _dir: TempDir,
}

impl Mesh {
    async fn start() -> Mesh {
        let dir = TempDir::new();
        let cp = ControlPlaneProcess::start(&dir.path.join("data"), &[]).await;
        let breaker = workspace().join("examples/policies/demo/orders-breaker.yaml");
        let applied = meshctl(&cp, &["apply", "-f", breaker.to_str().unwrap()]).await;
        assert!(applied.success(), "{applied:?}");
        let inventory = DemoService::start_with(&cp, "inventory", "v1", None, SIDECAR_ARGS).await;
        let orders = [
            DemoService::start_with(&cp, "orders", "v1", Some("inventory"), SIDECAR_ARGS).await,
            DemoService::start_with(&cp, "orders", "v2", Some("inventory"), SIDECAR_ARGS).await,
        ];
        let frontend =
            DemoService::start_with(&cp, "frontend", "v1", Some("orders"), SIDECAR_ARGS).await;
        wait::until(
            "frontend routes to both orders instances",
            PATIENCE,
            || async { (frontend.sidecar.endpoints_of("orders").await.len() == 2).then_some(()) },
        )
        .await;
        for instance in &orders {
            wait::until("orders routes to inventory", PATIENCE, || async {
                (!instance.sidecar.endpoints_of("inventory").await.is_empty()).then_some(())
            })
            .await;
        }
        Mesh {
            cp,
            frontend,
            orders,
            _inventory: inventory,
            _dir: dir,
        }
    }

    /// `GET /work` through frontend's sidecar, as a user would; the status.
    async fn work(&self) -> u16 {
        client::get(self.frontend.sidecar.inbound, "/work")
            .await
            .map_or(0, |reply| reply.status.as_u16())
    }

    /// Keeps sending requests (until the caller stops polling it).
    async fn traffic(&self) {
        loop {
            self.work().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

/// `target/screenshots/` of the workspace (`MESHLET_SCREENSHOT_DIR`
/// overrides it).
fn screenshot_dir() -> PathBuf {
    std::env::var_os("MESHLET_SCREENSHOT_DIR")
        .map_or_else(|| workspace().join("target/screenshots"), PathBuf::from)
}

async fn screenshot(browser: &Browser, name: &str) {
    let path = screenshot_dir().join(format!("dashboard-{name}.png"));
    browser.screenshot(&path).await.expect("screenshot saved");
    println!("screenshot: {}", path.display());
}

/// Switches the page to a view (no reload) and waits until it has drawn.
async fn open_view(browser: &Browser, view: &str) {
    browser
        .evaluate(&format!("location.hash = '#{view}'"))
        .await
        .expect("hash set");
    browser
        .wait_for(
            &format!("the {view} view"),
            &format!("document.body.dataset.loaded === '{view}'"),
            PATIENCE,
        )
        .await
        .expect("view drawn");
}

/// Chromium with a page, or `None` when browser tests are skipped.
async fn launch_browser() -> Option<Browser> {
    if browser::skipped() {
        eprintln!("skipped: {}=1", browser::SKIP_ENV);
        return None;
    }
    Some(Browser::launch().await.unwrap_or_else(|e| panic!("{e}")))
}

/// Clicks the Service column's header and waits for the rows in `order`.
async fn sort_by_name(browser: &Browser, order: &str) {
    browser
        .click("th[data-sort=name]")
        .await
        .expect("header clicked");
    browser
        .wait_for(
            &format!("services in the order {order}"),
            &format!(
                "[...document.querySelectorAll('tr[data-service]')].map(r => r.dataset.service).join() === '{order}'"
            ),
            PATIENCE,
        )
        .await
        .expect("sorted");
}

fn assert_no_page_errors(browser: &Browser, when: &str) {
    let errors = browser.errors();
    assert!(
        errors.is_empty(),
        "the page reported errors {when}: {errors:#?}"
    );
}

/// What the services table shows, row by row.
const SERVICE_ROWS: &str = "[...document.querySelectorAll('tr[data-service]')].map(r => ({
    service: r.dataset.service,
    versions: [...r.querySelectorAll('[data-instance] .tag')].map(t => t.textContent).sort(),
    instances: r.querySelectorAll('[data-instance]').length,
    rps: Number(r.querySelector('[data-field=rps]').dataset.value),
    requests: Number(r.querySelector('[data-field=requests]').textContent),
}))";

#[tokio::test]
async fn the_dashboard_shows_the_demo_mesh_live_in_a_real_browser() {
    let Some(browser) = launch_browser().await else {
        return;
    };
    let mesh = Mesh::start().await;
    for _ in 0..REQUESTS {
        assert_eq!(mesh.work().await, 200);
    }
    wait::until("the API sees the requests", PATIENCE, || async {
        let services = mesh.cp.get_json("/api/v1/dashboard/services").await;
        let frontend = services
            .as_array()?
            .iter()
            .find(|s| s["name"] == "frontend")?;
        (frontend["requests"].as_u64() == Some(REQUESTS as u64)).then_some(())
    })
    .await;

    // Services: first load, page weight, the three services and their instances.
    browser
        .log_in(&format!("{}/", mesh.cp.url()), &mesh.cp.admin_token())
        .await
        .expect("logged in");
    browser
        .navigate(&format!("{}/", mesh.cp.url()))
        .await
        .expect("page opens");
    browser
        .wait_for(
            "the services view",
            "document.body.dataset.loaded === 'services'",
            PATIENCE,
        )
        .await
        .expect("services drawn");
    let page_weight = browser.transferred_bytes();
    println!("first load transferred {page_weight} bytes");
    assert!(
        page_weight > 0 && page_weight < PAGE_WEIGHT_LIMIT,
        "first load {page_weight} bytes"
    );
    browser
        .evaluate("window.meshletSession = 'first load'")
        .await
        .unwrap();
    let rows = browser
        .wait_for(
            "three services with traffic",
            &format!("(() => {{ const rows = {SERVICE_ROWS}; return rows.length === 3 && rows.every(r => r.rps > 0) && rows; }})()"),
            PATIENCE,
        )
        .await
        .expect("services listed");
    let row = |name: &str| -> &Value {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["service"] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {rows:#}"))
    };
    assert_eq!(row("frontend")["instances"], 1, "{rows:#}");
    assert_eq!(row("inventory")["instances"], 1, "{rows:#}");
    assert_eq!(
        row("orders")["versions"],
        serde_json::json!(["v1", "v2"]),
        "{rows:#}"
    );
    assert_eq!(
        row("frontend")["requests"],
        REQUESTS,
        "the count shown is the count sent"
    );
    // Sortable: a second click on a column reverses its order.
    sort_by_name(&browser, "orders,inventory,frontend").await;
    sort_by_name(&browser, "frontend,inventory,orders").await;
    // The identity column: each service's SPIFFE id (issue 14).
    let identities = browser
        .evaluate("[...document.querySelectorAll('tr[data-service] [data-field=identity]')].map(e => e.textContent).join()")
        .await
        .unwrap();
    assert_eq!(
        identities,
        "spiffe://meshlet.local/ns/default/sa/frontend,spiffe://meshlet.local/ns/default/sa/inventory,spiffe://meshlet.local/ns/default/sa/orders"
    );
    assert_no_page_errors(&browser, "on the services view");
    screenshot(&browser, "services").await;

    // Topology: who calls whom.
    open_view(&browser, "topology").await;
    let edges = browser
        .wait_for(
            "the edges frontend → orders → inventory",
            "(() => { const rps = id => Number(document.querySelector(`[data-edge=\"${id}\"]`)?.dataset.rps);
                return rps('default/frontend->default/orders') > 0 && rps('default/orders->default/inventory') > 0
                    && document.querySelectorAll('[data-edge]').length; })()",
            PATIENCE,
        )
        .await
        .expect("edges drawn");
    assert_eq!(edges, 2, "frontend → orders and orders → inventory only");
    // Both ends are certified sidecars: a padlock on each edge (issue 14).
    let padlocks = browser
        .evaluate("[...document.querySelectorAll('[data-edge]')].filter(e => e.dataset.mtls === 'true' && e.querySelector('.padlock')).length")
        .await
        .unwrap();
    assert_eq!(padlocks, 2, "every edge between meshed services is mTLS");
    assert_no_page_errors(&browser, "on the topology view");
    screenshot(&browser, "topology").await;

    // Traces: filter by a service, open one, its waterfall spans three services.
    open_view(&browser, "traces").await;
    browser
        .evaluate("(() => { const s = document.getElementById('trace-service'); s.value = 'inventory'; s.dispatchEvent(new Event('change')); })()")
        .await
        .unwrap();
    browser
        .wait_for(
            "traces through inventory",
            "(() => { const rows = [...document.querySelectorAll('tr[data-trace-id]')];
                return rows.length > 0 && rows.every(r => r.dataset.services.split(' ').includes('inventory')); })()",
            PATIENCE,
        )
        .await
        .expect("filtered trace list");
    browser
        .click("tr[data-trace-id]")
        .await
        .expect("a trace clicked");
    let spans = browser
        .wait_for(
            "the waterfall",
            "(() => { const rows = [...document.querySelectorAll('#waterfall [data-span-service]')];
                return rows.length >= 5 && rows.map(r => [r.dataset.spanService, Number(r.dataset.depth)]); })()",
            PATIENCE,
        )
        .await
        .expect("waterfall drawn");
    let services: Vec<&str> = spans
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_str().unwrap())
        .collect();
    for service in ["frontend", "orders", "inventory"] {
        assert!(services.contains(&service), "{spans}");
    }
    assert_eq!(
        spans[0],
        serde_json::json!(["frontend", 0]),
        "the root first: {spans}"
    );
    assert_eq!(
        spans[4],
        serde_json::json!(["inventory", 4]),
        "the last hop deepest: {spans}"
    );
    assert_no_page_errors(&browser, "on the traces view");
    screenshot(&browser, "traces").await;

    // Policies: the breaker turns open as both orders instances fail, and
    // the page shows it without a reload.
    open_view(&browser, "policies").await;
    browser
        .wait_for(
            "the breaker policy and closed breakers",
            "!!document.querySelector('[data-resource$=\"/orders-breaker\"]') && !!document.querySelector('[data-breaker-state=\"closed\"]')",
            PATIENCE,
        )
        .await
        .expect("policies drawn");
    for instance in &mesh.orders {
        instance.fail().await;
    }
    let open = tokio::select! {
        open = browser.wait_for(
            "a circuit breaker shown open",
            "document.querySelectorAll('[data-breaker-state=\"open\"]').length",
            PATIENCE,
        ) => open.expect("breaker shown open"),
        _ = mesh.traffic() => unreachable!("traffic runs until the wait ends"),
    };
    assert!(open.as_u64() >= Some(1));
    let session = browser.evaluate("window.meshletSession").await.unwrap();
    assert_eq!(session, "first load", "the page was not reloaded");
    assert_no_page_errors(&browser, "on the policies view");
    screenshot(&browser, "policies").await;

    // The failure shows on the other views too: a red edge, a red row.
    open_view(&browser, "topology").await;
    tokio::select! {
        red = browser.wait_for(
            "the edge frontend → orders in red",
            "!!document.querySelector('[data-edge=\"default/frontend->default/orders\"].bad')",
            PATIENCE,
        ) => { red.expect("red edge"); }
        _ = mesh.traffic() => unreachable!(),
    }
    screenshot(&browser, "topology-failing").await;
    open_view(&browser, "services").await;
    browser
        .wait_for(
            "orders in red",
            "!!document.querySelector('tr.bad[data-service=\"orders\"]')",
            PATIENCE,
        )
        .await
        .expect("orders row red");
    screenshot(&browser, "services-failing").await;
    assert_no_page_errors(&browser, "at the end");
}

#[tokio::test]
async fn without_the_event_stream_the_page_polls_and_still_updates() {
    let Some(browser) = launch_browser().await else {
        return;
    };
    let dir = TempDir::new();
    let cp = ControlPlaneProcess::start(&dir.path.join("data"), &[]).await;
    browser
        .block_urls(&["*/api/v1/dashboard/events*"])
        .await
        .expect("event stream blocked");
    let viewer = cp
        .create_token(&meshlet_api::access::CreateToken {
            name: "viewer-dashboard".into(),
            role: "viewer".into(),
            namespace: None,
            service: None,
            ttl_seconds: None,
        })
        .await;
    browser
        .log_in(&format!("{}/", cp.url()), &viewer)
        .await
        .expect("logged in as a viewer");
    browser
        .navigate(&format!("{}/", cp.url()))
        .await
        .expect("page opens");
    browser
        .wait_for(
            "the polling badge",
            "document.getElementById('live').dataset.live === 'polling'",
            PATIENCE,
        )
        .await
        .expect("polling");
    let _catalog = DemoService::start(&cp, "catalog", None).await;
    browser
        .wait_for(
            "a service registered after the page opened",
            "!!document.querySelector('tr[data-service=catalog]')",
            PATIENCE,
        )
        .await
        .expect("the page polled");
    let errors = browser.errors();
    assert!(
        errors
            .iter()
            .all(|e| e.contains("/api/v1/dashboard/events")),
        "only the blocked stream fails: {errors:#?}"
    );
}

/// The metric names a PromQL expression selects (each written as
/// `name{...}` in the Grafana dashboard).
fn selected_metrics(expr: &str) -> Vec<&str> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.match_indices('{')
        .filter_map(|(at, _)| {
            let before = &expr[..at];
            let start = before.rfind(|c| !is_name(c)).map_or(0, |i| i + 1);
            let name = &before[start..];
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[tokio::test]
async fn the_grafana_dashboard_is_valid_and_queries_only_metrics_the_sidecar_exports() {
    let path = workspace().join("manifests/grafana/meshlet-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("the Grafana dashboard exists");
    let dashboard: Value = serde_json::from_str(&text).expect("valid JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus data source variable"
    );
    // Every source file of the sidecar, in all its folders.
    fn sources(dir: &std::path::Path, text: &mut String) {
        for entry in std::fs::read_dir(dir).expect("sidecar sources").flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, text);
            } else if let Ok(source) = std::fs::read_to_string(&path) {
                text.push_str(&source);
            }
        }
    }
    let mut sidecar_source = String::new();
    sources(&workspace().join("sidecar/src"), &mut sidecar_source);
    assert!(sidecar_source.contains("\"request_total\""));
    let exported = |name: &str| {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        sidecar_source.contains(&format!("\"{base}\""))
    };
    let mut rules = String::from("groups:\n  - name: meshlet-dashboard\n    rules:\n");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(
        panels.len() >= 6,
        "RPS, success, latency, edges, breakers, rate limits"
    );
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has a query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let metrics = selected_metrics(expr);
            assert!(!metrics.is_empty(), "{expr}");
            for metric in metrics {
                assert!(
                    exported(metric),
                    "{metric} (in {expr:?}) is not a sidecar metric"
                );
            }
            // Grafana's variables, as Grafana would substitute them.
            let concrete = expr
                .replace("$__rate_interval", "1m")
                .replace("$service", ".*");
            rules.push_str(&format!(
                "      - record: meshlet:panel_{}_{}\n        expr: {}\n",
                panel["id"],
                target["refId"].as_str().unwrap_or("A"),
                Value::from(concrete)
            ));
        }
    }
    let dir = TempDir::new();
    let rules_file = dir.path.join("dashboard-rules.yaml");
    std::fs::write(&rules_file, rules).expect("rules written");
    meshlet_e2e::metrics::promtool_check_rules(&rules_file).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn metric_names_are_read_from_selectors() {
    assert_eq!(
        selected_metrics(
            r#"histogram_quantile(0.5, sum by (le) (rate(a_bucket{x="{"}[1m]))) / b{}"#
        ),
        ["a_bucket", "b"]
    );
}

/// Serves one HTML page on a loopback port of its own: another origin than
/// the control plane's. Ends with the returned task.
async fn other_origin_page() -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let page = "<!doctype html><title>elsewhere</title><p>another origin</p>";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    (port, task)
}

/// Issue 13: logged in to the dashboard, the user visits a page of another
/// origin that posts a delete to the control plane with `no-cors` and the
/// session cookie. Nothing changes.
#[tokio::test]
async fn a_page_of_another_origin_cannot_change_anything_with_the_session() {
    let Some(browser) = launch_browser().await else {
        return;
    };
    let dir = TempDir::new();
    let cp = ControlPlaneProcess::start(&dir.path.join("data"), &[]).await;
    cp.apply(
        &dir.path,
        "policy.yaml",
        "apiVersion: meshlet.dev/v1alpha1\nkind: TimeoutPolicy\nmetadata: {name: orders-timeout}\n\
         spec: {targetRef: {service: orders}, request: 2s}\n",
    )
    .await;
    browser
        .log_in(&format!("{}/", cp.url()), &cp.admin_token())
        .await
        .expect("logged in");
    let (port, server) = other_origin_page().await;
    browser
        .navigate(&format!("http://127.0.0.1:{port}/"))
        .await
        .expect("the other page opens");
    let body = serde_json::json!({"keys": [{"kind": "TimeoutPolicy", "namespace": "default", "name": "orders-timeout"}]});
    let target = Value::from(format!("{}/api/v1/delete", cp.url())).to_string();
    let body = Value::from(body.to_string()).to_string();
    let sent = browser
        .evaluate(&format!(
            "fetch({target}, {{method: 'POST', mode: 'no-cors', credentials: 'include', body: {body}}})\
             .then(r => 'sent: ' + r.type, e => 'failed: ' + e)"
        ))
        .await
        .expect("the page's script ran");
    println!("cross-origin post: {sent}");
    let resources = cp.get_json("/api/v1/resources").await;
    assert!(
        resources.to_string().contains("orders-timeout"),
        "the cross-origin post deleted it: {resources}"
    );
    let history = cp.get_json("/api/v1/revisions").await;
    assert!(
        !history.to_string().contains("deleted"),
        "a revision was made: {history}"
    );
    server.abort();
}
