//! `demo-service`: a tiny HTTP/1.1 service to put behind meshlet sidecars.
//!
//! It exists for the local demo (`examples/demo.sh`), the end-to-end tests and
//! anyone who wants something to proxy while trying the sidecar. It is plain
//! hyper on purpose: no framework, nothing the mesh could be hiding behind.
//!
//! ```text
//! demo-service --name frontend --port 18080 --version v1 --calls orders
//! ```
//!
//! Routes:
//! - `GET /health` → `{"status":"healthy","service":NAME}`
//! - `GET /`       → `{"service","version","port","headers"}`; `headers` holds
//!   the request headers a mesh adds or forwards (`x-forwarded-for`,
//!   `traceparent`, ...) so you can see what the sidecar did.
//! - `POST /echo`  → streams the request body back.
//! - `GET /work`   → calls `GET http://SERVICE/work` for every `--calls
//!   SERVICE` through the outbound sidecar named by `HTTP_PROXY`
//!   (absolute-form URI, exactly what an HTTP client library does with a
//!   proxy) and answers with its own identity and every downstream status
//!   and body, or the error and the `x-meshlet-reason` header when the mesh
//!   refused. So `frontend --calls orders` and `orders --calls inventory`
//!   make a chain. The incoming `traceparent` is copied onto the downstream
//!   calls. The answer is 200 when every call got a 2xx, 502 otherwise.
//! - `POST /broadcast` → logs the message and answers what it received
//!   (target of `meshctl broadcast`).
//! - `POST /health/fail` and `POST /health/pass` → make `/health` answer
//!   503 or 200 from now on (to watch the mesh react to an unhealthy
//!   instance).
//! - `POST /fail` and `POST /recover` → make `/` and `/work` answer 500
//!   from now on, or normally again (to watch a circuit breaker open).
//!
//! SIGTERM or SIGINT stops accepting and lets in-flight requests finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// Downstream calls give up after this long (connect + response + body).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Downstream bodies larger than this are reported as an error.
const MAX_DOWNSTREAM_BODY: usize = 64 * 1024;
/// Request headers reported back by `GET /` (plus any `x-meshlet-*`).
const SHOWN_HEADERS: &[&str] = &[
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "via",
    "traceparent",
    "tracestate",
    // Set by the demo's gateway Route (examples/policies/gateway/).
    "x-from",
    "x-request-id",
];

type Body = BoxBody<Bytes, hyper::Error>;

/// A demo HTTP service for trying meshlet.
#[derive(Debug, Clone, Parser)]
#[command(name = "demo-service")]
struct Args {
    /// Service name, reported in every answer.
    #[arg(long)]
    name: String,
    /// Port to listen on.
    #[arg(long)]
    port: u16,
    /// Address to listen on: 127.0.0.1 (only the pod itself and its
    /// sidecar's declared app port reach it) or 0.0.0.0 (the pod's
    /// address too: a transparent inbound hands ports other than the app
    /// port to the pod's own address).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Version label, reported by `GET /` (handy for traffic splits).
    #[arg(long, default_value = "v1")]
    version: String,
    /// A service that `GET /work` calls through the sidecar (repeatable).
    #[arg(long = "calls", value_name = "SERVICE")]
    calls: Vec<String>,
}

/// What every request handler gets to see.
struct App {
    args: Args,
    /// `host:port` of the outbound sidecar, from `HTTP_PROXY`.
    proxy: Option<String>,
    /// What `/health` answers (`POST /health/fail|pass` flips it).
    healthy: AtomicBool,
    /// `/` and `/work` answer 500 while set (`POST /fail|recover`).
    failing: AtomicBool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let addr = SocketAddr::new(args.host, args.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let proxy = outbound_proxy();
    eprintln!(
        "demo-service {} ({}) listening on http://{addr}, calls {:?} via {}",
        args.name,
        args.version,
        args.calls,
        proxy.as_deref().unwrap_or("<HTTP_PROXY not set>")
    );

    let app = Arc::new(App {
        args,
        proxy,
        healthy: AtomicBool::new(true),
        failing: AtomicBool::new(false),
    });

    let graceful = GracefulShutdown::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { handle(&app, req).await }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("connection error: {e}");
            }
        });
    }

    drop(listener);
    let name = &app.args.name;
    eprintln!("demo-service {name}: shutting down");
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("demo-service {name}: gave up waiting for connections");
    }
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("cannot install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The outbound sidecar's `host:port`, from `HTTP_PROXY` (or `http_proxy`).
fn outbound_proxy() -> Option<String> {
    let raw = std::env::var("HTTP_PROXY")
        .or_else(|_| std::env::var("http_proxy"))
        .ok()?;
    let uri: Uri = raw.trim().parse().ok()?;
    let authority = uri.authority()?;
    Some(format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    ))
}

async fn handle(app: &App, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let args = &app.args;
    eprintln!("{} {} {}", args.name, req.method(), req.uri());
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/health") if app.healthy.load(Ordering::Relaxed) => {
            json_response(
                StatusCode::OK,
                &json!({"status": "healthy", "service": args.name}),
            )
        }
        (&Method::GET | &Method::HEAD, "/health") => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "unhealthy", "service": args.name}),
        ),
        (&Method::POST, "/health/fail" | "/health/pass") => {
            let healthy = req.uri().path() == "/health/pass";
            app.healthy.store(healthy, Ordering::Relaxed);
            eprintln!(
                "{}: /health now answers {}",
                args.name,
                if healthy { 200 } else { 503 }
            );
            json_response(
                StatusCode::OK,
                &json!({"service": args.name, "healthy": healthy}),
            )
        }
        (&Method::POST, "/broadcast") => broadcast(args, req).await,
        (&Method::POST, "/fail" | "/recover") => {
            let failing = req.uri().path() == "/fail";
            app.failing.store(failing, Ordering::Relaxed);
            eprintln!(
                "{}: / and /work now answer {}",
                args.name,
                if failing { 500 } else { 200 }
            );
            json_response(
                StatusCode::OK,
                &json!({"service": args.name, "failing": failing}),
            )
        }
        (&Method::GET | &Method::HEAD, "/" | "/work") if app.failing.load(Ordering::Relaxed) => {
            json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"service": args.name, "version": args.version, "port": args.port, "error": "simulated failure (POST /recover to stop)"}),
            )
        }
        (&Method::GET | &Method::HEAD, "/") => json_response(
            StatusCode::OK,
            &json!({
                "service": args.name,
                "version": args.version,
                "port": args.port,
                "headers": shown_headers(req.headers()),
            }),
        ),
        (&Method::POST, "/echo") => {
            let mut response = Response::new(req.into_body().boxed());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        (&Method::GET, "/work") => work(app, req.headers()).await,
        (_, "/health" | "/" | "/echo" | "/work" | "/broadcast") => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method not allowed", "service": args.name}),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not found", "service": args.name}),
        ),
    };
    Ok(response)
}

/// `GET /work`: call every downstream service, one after the other.
async fn work(app: &App, incoming: &HeaderMap) -> Response<Body> {
    let args = &app.args;
    // The trace context travels on: what a traced app does (an
    // OpenTelemetry SDK would do the same).
    let trace_context: Vec<(&str, HeaderValue)> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| Some((name, incoming.get(name)?.clone())))
        .collect();
    let mut calls = Vec::new();
    let mut all_ok = true;
    for service in &args.calls {
        let outcome = match &app.proxy {
            None => Err("HTTP_PROXY is not set: demo-service calls other services \
                         through its sidecar's outbound listener"
                .to_string()),
            Some(proxy) => {
                match tokio::time::timeout(CALL_TIMEOUT, call(proxy, service, &trace_context)).await
                {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
                }
            }
        };
        let entry = match outcome {
            Ok(entry) => entry,
            Err(error) => json!({"service": service, "error": error}),
        };
        let ok = entry["status"]
            .as_u64()
            .is_some_and(|s| (200..300).contains(&s));
        all_ok &= ok;
        calls.push(entry);
    }
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    json_response(
        status,
        &json!({
            "service": args.name,
            "version": args.version,
            "port": args.port,
            "headers": shown_headers(incoming),
            "calls": calls,
        }),
    )
}

/// `POST /broadcast`: log the message and say what arrived.
async fn broadcast(args: &Args, req: Request<Incoming>) -> Response<Body> {
    let bytes = match Limited::new(req.into_body(), MAX_DOWNSTREAM_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("reading the message: {e}")}),
            )
        }
    };
    let message = serde_json::from_slice::<Value>(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    eprintln!(
        "{} ({}) received broadcast: {message}",
        args.name, args.version
    );
    json_response(
        StatusCode::OK,
        &json!({"service": args.name, "version": args.version, "port": args.port, "received": message}),
    )
}

/// One `GET http://SERVICE/work` through the outbound proxy at `proxy`.
async fn call(
    proxy: &str,
    service: &str,
    trace_context: &[(&'static str, HeaderValue)],
) -> Result<Value, String> {
    let mut request =
        meshlet_client::request(Method::GET, service, &format!("http://{service}/work"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("bad service name {service:?}: {e}"))?;
    for (name, value) in trace_context {
        request.headers_mut().insert(*name, value.clone());
    }
    let response = meshlet_client::Client::new()
        .send(proxy, request)
        .await
        .map_err(|e| format!("request via the outbound sidecar at {proxy}: {}", e.cause()))?;
    let status = response.status();
    let reason = response
        .headers()
        .get("x-meshlet-reason")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = Limited::new(response.into_body(), MAX_DOWNSTREAM_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer of {service}: {e}"))?
        .to_bytes();
    let body = serde_json::from_slice::<Value>(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));

    let mut entry = json!({"service": service, "status": status.as_u16(), "body": body});
    if let Some(reason) = reason {
        entry["x-meshlet-reason"] = Value::String(reason);
    }
    if !status.is_success() {
        entry["error"] = Value::String(format!("{service} answered {status}"));
    }
    Ok(entry)
}

fn shown_headers(headers: &HeaderMap) -> Value {
    let mut shown = serde_json::Map::new();
    for (name, value) in headers {
        let name = name.as_str();
        if SHOWN_HEADERS.contains(&name) || name.starts_with("x-meshlet-") {
            let value = String::from_utf8_lossy(value.as_bytes());
            // A repeated header is shown as one comma-separated list.
            let joined = match shown.get(name).and_then(Value::as_str) {
                Some(earlier) => format!("{earlier}, {value}"),
                None => value.into_owned(),
            };
            shown.insert(name.to_owned(), Value::String(joined));
        }
    }
    Value::Object(shown)
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut text = value.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
