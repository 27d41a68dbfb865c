//! Protocols through the mesh (issue 2, point 3 and the streaming rules):
//! h2c end to end, WebSocket through two sidecars, chunked bodies,
//! trailers, hop-by-hop headers.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Version};
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;
use meshlet_e2e::client::RawConnection;
use meshlet_e2e::inprocess::Sidecar;
use meshlet_e2e::{client, Upstream};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// frontend's sidecar knows `orders`, whose sidecar fronts the orders app.
struct Mesh {
    orders_app: Upstream,
    orders: Sidecar,
    frontend: Sidecar,
    _frontend_app: Upstream,
}

async fn mesh() -> Mesh {
    let orders_app = Upstream::start("orders").await;
    let orders = Sidecar::builder("orders", orders_app.port()).start().await;
    let frontend_app = Upstream::start("frontend").await;
    let config = format!(
        "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: orders}}\nspec:\n  endpoints:\n    - address: {}\n",
        orders.inbound
    );
    let frontend = Sidecar::builder("frontend", frontend_app.port())
        .config(&config)
        .start()
        .await;
    Mesh {
        orders_app,
        orders,
        frontend,
        _frontend_app: frontend_app,
    }
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn h2c_client_through_both_sidecars_to_an_h2c_upstream() {
    let mesh = mesh().await;
    let reply = client::send_h2(mesh.frontend.outbound, get("http://orders/headers"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.version, Version::HTTP_2);
    let json: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(json["upstream"], "orders");
    assert_eq!(json["version"], "HTTP/2.0", "the app was reached over h2c");

    // Many concurrent streams on one client connection, through the inbound side.
    let inbound = mesh.orders.inbound;
    let calls = (0..20).map(|i| async move {
        client::send_h2(inbound, get(&format!("http://orders/slow?ms={}", i % 5)))
            .await
            .unwrap()
            .status
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");

    // h2 trailers arrive end to end.
    let reply = client::send_h2(mesh.frontend.outbound, get("http://orders/trailers"))
        .await
        .unwrap();
    assert_eq!(reply.text(), "body with trailers");
    assert_eq!(reply.trailer("x-checksum"), Some("1234"));
}

#[tokio::test]
async fn websocket_echo_through_both_sidecars() {
    let mesh = mesh().await;
    let stream = tokio::net::TcpStream::connect(mesh.frontend.outbound)
        .await
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("ws://orders/ws", stream)
        .await
        .expect("handshake");
    assert_eq!(response.status(), 101);
    for i in 0..5 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_data().as_ref(), &big[..]);
    ws.close(None).await.unwrap();
    assert_eq!(
        mesh.orders_app.requests(),
        1,
        "one upgrade request, then frames"
    );
}

#[tokio::test]
async fn chunked_request_body_and_http1_trailers_pass_through() {
    let mesh = mesh().await;
    // No Content-Length: the client sends the body chunked, in pieces.
    let pieces = ["hello", " ", "chunked", " world"]
        .map(|p| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(p))));
    let body = StreamBody::new(futures_util::stream::iter(pieces));
    let request = Request::post("http://orders/echo").body(body).unwrap();
    let reply = client::send(mesh.frontend.outbound, request).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "hello chunked world");
    assert_eq!(reply.header("transfer-encoding"), Some("chunked"));

    // A client that accepts trailers (TE: trailers) gets them over HTTP/1.1.
    let request = Request::get("http://orders/trailers")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = client::send(mesh.frontend.outbound, request).await.unwrap();
    assert_eq!(reply.text(), "body with trailers");
    assert_eq!(reply.trailer("x-checksum"), Some("1234"));
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_and_forwarded_headers_added() {
    let mesh = mesh().await;
    let request = Request::get("http://orders/headers")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "10.9.8.7")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = client::send(mesh.frontend.outbound, request).await.unwrap();
    let json: Value = serde_json::from_slice(&reply.body).unwrap();
    let headers = &json["headers"];
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} must not be forwarded: {headers}"
        );
    }
    assert_eq!(headers["x-end-to-end"][0], "kept");
    assert_eq!(headers["x-forwarded-for"][0], "10.9.8.7, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"][0], "http");
}

#[tokio::test]
async fn hop_by_hop_headers_of_a_response_are_removed() {
    let mesh = mesh().await;
    // One hop (inbound) and two (outbound, then inbound), twice each: the
    // second answer comes over a reused upstream connection.
    for _ in 0..2 {
        for reply in [
            client::get(mesh.orders.inbound, "/hop-by-hop")
                .await
                .unwrap(),
            client::send(mesh.frontend.outbound, get("http://orders/hop-by-hop"))
                .await
                .unwrap(),
        ] {
            assert_eq!(reply.status, 200);
            for gone in ["x-private", "keep-alive"] {
                assert!(
                    reply.headers.get(gone).is_none(),
                    "{gone} must not reach the client: {:?}",
                    reply.headers
                );
            }
            assert_eq!(reply.headers["x-end-to-end"], "kept");
        }
    }
}

#[tokio::test]
async fn keep_alive_connections_are_reused_upstream() {
    let mesh = mesh().await;
    // 20 clients, each on its own connection, one after another: the
    // sidecar serves them all over one pooled connection to the app.
    for _ in 0..20 {
        assert_eq!(
            client::get(mesh.orders.inbound, "/").await.unwrap().status,
            200
        );
    }
    assert_eq!(mesh.orders_app.requests(), 20);
    assert_eq!(
        mesh.orders_app.connections(),
        1,
        "upstream connections were not reused"
    );
    // The same through both sidecars.
    for _ in 0..10 {
        let reply = client::send(mesh.frontend.outbound, get("http://orders/"))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    assert_eq!(mesh.orders_app.connections(), 1);
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let app = Upstream::start("orders").await;
    let sidecar = Sidecar::builder("orders", app.port())
        .arg("--idle-timeout")
        .arg("300ms")
        .start()
        .await;
    assert_eq!(client::get(sidecar.inbound, "/").await.unwrap().status, 200);
    // Nobody uses the pool again: the sweep still closes its connection.
    meshlet_e2e::wait::until(
        "the pooled connection to close",
        Duration::from_secs(5),
        || async { (app.open_connections() == 0).then_some(()) },
    )
    .await;
    // And the next request simply opens a new one.
    assert_eq!(client::get(sidecar.inbound, "/").await.unwrap().status, 200);
    assert_eq!(app.connections(), 2);
}

#[tokio::test]
async fn expect_100_continue_is_honoured_before_the_body_is_sent() {
    let mesh = mesh().await;
    let mut connection = RawConnection::open(mesh.frontend.outbound).await;
    let patience = Duration::from_secs(5);
    connection
        .send(b"POST /upload HTTP/1.1\r\nHost: orders\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        .await;
    // The client waits for the interim response before sending its body.
    let interim = connection.read_until("\r\n\r\n", patience).await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    connection.send(&[b'x'; 5000]).await;
    let response = connection.read_until("5000", patience).await;
    assert!(response.contains("HTTP/1.1 200 OK"), "{response}");
}

#[tokio::test]
async fn an_http_1_0_request_without_host_reaches_the_app_with_one() {
    let mesh = mesh().await;
    let (text, closed) = client::raw(
        mesh.orders.inbound,
        b"GET /headers HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed, "HTTP/1.0 without keep-alive closes");
    assert!(
        text.starts_with("HTTP/1.0 200 OK"),
        "answered in the client's version: {text}"
    );
    let expected_host = format!("\"host\":[\"{}\"]", mesh.orders_app.addr);
    assert!(
        text.contains(&expected_host),
        "the app got a Host header: {text}"
    );
}

#[tokio::test]
async fn a_response_that_stalls_mid_body_is_cut_off_after_the_stream_idle_timeout() {
    let app = Upstream::start("orders").await;
    let sidecar = Sidecar::builder("orders", app.port())
        .arg("--stream-idle-timeout")
        .arg("400ms")
        .start()
        .await;
    let started = std::time::Instant::now();
    let (text, closed) = client::raw(
        sidecar.inbound,
        b"GET /stall HTTP/1.1\r\nHost: orders\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("partial"),
        "the data that came was passed on: {text}"
    );
    assert!(closed, "the stalled response was never cut off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(4),
        "cut off after {took:?}"
    );
    // The sidecar is fine afterwards.
    assert_eq!(client::get(sidecar.inbound, "/").await.unwrap().status, 200);
}

/// What the raw app below answers to every request: the fields a client
/// must get (some twice, in mixed case) among hop-by-hop ones it must not.
const RAW_APP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: raw-app\r\nDate: Sat, 05 Dec 2026 12:00:00 GMT\r\nSet-Cookie: a=1\r\nContent-Length: 5\r\nX-App: One\r\nKeep-Alive: timeout=5\r\nSet-Cookie: b=2\r\nConnection: keep-alive\r\nProxy-Authenticate: Basic\r\n\r\ndone!";

/// An HTTP/1.1 app on loopback that answers every request (its body read
/// by `Content-Length`) with `RAW_APP_RESPONSE`, keeping connections open.
async fn raw_app() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < end + 4 + length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + length);
                    if stream.write_all(RAW_APP_RESPONSE).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A 200 with the raw app's whole body.
fn assert_answered_whole(reply: &client::Reply) {
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "done!"),
        "{:?}",
        reply.headers
    );
}

/// The fields of one raw HTTP/1.1 response (names in lower case, in
/// order) and whether every name arrived in lower case.
fn raw_fields(response: &str) -> (Vec<(String, String)>, bool) {
    let head = response.split("\r\n\r\n").next().unwrap();
    let mut lower = true;
    let fields = head
        .lines()
        .skip(1)
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            lower &= name == name.to_ascii_lowercase();
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    (fields, lower)
}

/// The upstream's end-to-end fields, whatever the client and whichever
/// server answers it: our own HTTP/1.1 server (which writes a plain head's
/// fields as they came, without a header map), hyper after a request
/// asking for trailers took the connection over, and hyper's HTTP/2
/// server; and a
/// route's response header edit applies to them.
#[tokio::test]
async fn an_apps_response_fields_reach_every_kind_of_client() {
    let app = raw_app().await;
    let orders = Sidecar::builder("orders", app.port())
        .arg("--app-protocol")
        .arg("http1")
        .start()
        .await;
    let want = |get: &dyn Fn(&str) -> Vec<String>| {
        assert_eq!(get("server"), ["raw-app"]);
        assert_eq!(
            get("date"),
            ["Sat, 05 Dec 2026 12:00:00 GMT"],
            "the app's date, once"
        );
        assert_eq!(get("set-cookie"), ["a=1", "b=2"]);
        assert_eq!(get("x-app"), ["One"]);
        for gone in ["keep-alive", "proxy-authenticate"] {
            assert!(get(gone).is_empty(), "{gone} is hop-by-hop");
        }
    };

    // HTTP/1.1: a GET and a POST with its body (our server), then a GET
    // asking for trailers (hyper from then on), then a GET on the same
    // connection (hyper).
    let mut conn = RawConnection::open(orders.inbound).await;
    for request in [
        &b"GET /a HTTP/1.1\r\nHost: orders\r\n\r\n"[..],
        b"POST /b HTTP/1.1\r\nHost: orders\r\nContent-Length: 2\r\n\r\nhi",
        b"GET /b HTTP/1.1\r\nHost: orders\r\nTE: trailers\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: orders\r\n\r\n",
    ] {
        conn.send(request).await;
        let response = conn.read_until("done!", Duration::from_secs(10)).await;
        let (fields, lower_case) = raw_fields(&response);
        assert!(lower_case, "{response}");
        want(&|name: &str| {
            fields
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect()
        });
        let lengths: Vec<_> = fields
            .iter()
            .filter(|(n, _)| n == "content-length")
            .collect();
        assert_eq!(lengths.len(), 1, "{response}");
        assert_eq!(lengths[0].1, "5");
        assert!(response.ends_with("\r\n\r\ndone!"), "{response}");
    }

    let values = |reply: &client::Reply| {
        let headers = reply.headers.clone();
        move |name: &str| -> Vec<String> {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        }
    };
    let reply = client::send_h2(orders.inbound, get("http://orders/d"))
        .await
        .unwrap();
    assert_answered_whole(&reply);
    want(&values(&reply));

    // A caller whose route edits the response: `orders` is the app itself
    // (no sidecar, plain HTTP/1.1 from the caller's outbound side).
    let config = meshlet_e2e::config::service("orders", &[(app, "v1")])
        + &meshlet_e2e::config::doc(
            "Route",
            "orders-edit",
            "parentRefs: [{service: orders}]\nrules:\n  - backends: [{service: orders}]\n    filters:\n      - responseHeaderModifier: {set: [{name: x-app, value: Two}], remove: [server]}\n",
        );
    let frontend_app = Upstream::start("frontend").await;
    let frontend = Sidecar::builder("frontend", frontend_app.port())
        .config(&config)
        .start()
        .await;
    for _ in 0..2 {
        let reply = client::send(frontend.outbound, get("http://orders/e"))
            .await
            .unwrap();
        assert_answered_whole(&reply);
        let get = values(&reply);
        assert_eq!(get("x-app"), ["Two"], "{:?}", reply.headers);
        assert!(get("server").is_empty(), "{:?}", reply.headers);
        assert_eq!(get("set-cookie"), ["a=1", "b=2"]);
        assert_eq!(get("date"), ["Sat, 05 Dec 2026 12:00:00 GMT"]);
    }
}

/// Request bodies reach the app byte for byte whichever server reads them:
/// our own HTTP/1.1 server (a sized body that came whole with its head),
/// or hyper (a body split over writes, chunked, or larger than is read
/// ahead), before and after a connection passes to hyper, pipelined or
/// not, one hop (inbound) and two (outbound, then inbound); and the
/// request bytes are counted once, exactly.
#[tokio::test]
async fn request_bodies_reach_the_app_whole_whichever_server_reads_them() {
    let mesh = mesh().await;
    let body = |n: usize, seed: u8| -> String {
        (0..n)
            .map(|i| char::from(b'a' + (i as u8).wrapping_add(seed) % 26))
            .collect()
    };
    let posted = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: orders\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut sent_bytes = 0;
    for entry in [mesh.orders.inbound, mesh.frontend.outbound] {
        let mut conn = RawConnection::open(entry).await;
        // Whole with its head, one after the other, a bodiless one between.
        for (n, seed) in [(5, 0), (1, 1), (3000, 2)] {
            let sent = body(n, seed);
            conn.send(posted("/echo", &sent).as_bytes()).await;
            let reply = conn.read_response(Duration::from_secs(10)).await;
            assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
            assert!(reply.ends_with(&format!("\r\n\r\n{sent}")), "{n}: {reply}");
            sent_bytes += n;
            conn.send(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n").await;
            assert!(conn
                .read_response(Duration::from_secs(10))
                .await
                .ends_with("hello from orders"));
        }
        // Pipelined: two bodies and a bodiless request in one write.
        let (first, second) = (body(700, 3), body(20, 4));
        let pipelined = posted("/echo", &first)
            + &posted("/upload", &second)
            + "GET / HTTP/1.1\r\nHost: orders\r\n\r\n";
        conn.send(pipelined.as_bytes()).await;
        assert!(conn
            .read_response(Duration::from_secs(10))
            .await
            .ends_with(&first));
        assert!(conn
            .read_response(Duration::from_secs(10))
            .await
            .ends_with("\r\n\r\n20"));
        assert!(conn
            .read_response(Duration::from_secs(10))
            .await
            .ends_with("hello from orders"));
        sent_bytes += 720;
        // A body split over two writes, then one larger than is read
        // ahead, then a chunked one; then a whole one again (hyper's by now).
        let split = body(1000, 5);
        let request = posted("/echo", &split);
        let (start, end) = request.split_at(request.len() - 400);
        conn.send(start.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        conn.send(end.as_bytes()).await;
        assert!(conn
            .read_response(Duration::from_secs(10))
            .await
            .ends_with(&split));
        let large = body(100_000, 6);
        conn.send(posted("/upload", &large).as_bytes()).await;
        assert!(conn
            .read_response(Duration::from_secs(10))
            .await
            .ends_with("\r\n\r\n100000"));
        conn.send(b"POST /echo HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").await;
        assert!(conn
            .read_response(Duration::from_secs(10))
            .await
            .ends_with("\r\n\r\nabcde"));
        let last = body(10, 7);
        conn.send(posted("/echo", &last).as_bytes()).await;
        assert!(conn
            .read_response(Duration::from_secs(10))
            .await
            .ends_with(&last));
        sent_bytes += 1000 + 100_000 + 5 + 10;
    }
    // The inbound sidecar saw every request body once (both entries end
    // there); the frontend's outbound side the second entry's.
    let inbound = meshlet_e2e::metrics::Scrape::of(mesh.orders.admin)
        .await
        .sum("request_bytes_total", &[("direction", "inbound")]);
    assert_eq!(inbound as usize, sent_bytes, "inbound request bytes");
    let outbound = meshlet_e2e::metrics::Scrape::of(mesh.frontend.admin)
        .await
        .sum("request_bytes_total", &[("direction", "outbound")]);
    assert_eq!(outbound as usize, sent_bytes / 2, "outbound request bytes");
}
