//! The soak's constant load: a few HTTP/1.1 keep-alive clients, each on
//! one connection to the caller sidecar's outbound listener, sending
//! `GET http://SERVICE/` (absolute form, as an app behind `HTTP_PROXY`
//! does) at a fixed pace until told to stop.
//!
//! Every request becomes one [`Outcome`]: when it started and ended (the
//! client's clock), the status and `x-meshlet-reason`, and which process
//! answered or failed it, by port: a 200 from `demo-service` carries the
//! app's `port` in its JSON body, and a response the mesh generated names
//! the address it failed on in its one-line body (`meshlet: upstream
//! 127.0.0.1:PORT failed: ...`: the instance's inbound address when the
//! caller's sidecar answered, the app's when the instance's sidecar did).
//! A failed connection to the caller sidecar (which must never happen) is
//! an outcome without a status, and the client reconnects.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A request gives up after this long (well above the sidecar's 15 s
/// upstream timeout, so the mesh always answers first).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How one request of the load ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub start: Instant,
    pub end: Instant,
    /// `None`: no HTTP answer at all (connection to the caller sidecar
    /// failed, or the client's own timeout).
    pub status: Option<u16>,
    /// `x-meshlet-reason`, when the mesh answered itself.
    pub reason: Option<String>,
    /// The port that answered (a 2xx: the app's) or that the mesh names in
    /// its error body.
    pub port: Option<u16>,
    /// For failures: the body's first line or the client's error.
    pub detail: String,
    /// The response's head arrived but its body broke off (the upstream
    /// died mid-response; the sidecar can only cut the connection). The
    /// body named nothing, so only the time says which instance it was.
    pub body_cut: bool,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s)) && !self.body_cut
    }
}

/// The running clients.
pub struct Load {
    stop: watch::Sender<bool>,
    clients: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    /// Starts `clients` clients to `outbound` asking for `service`, at
    /// `rate` requests per second in all.
    pub fn start(outbound: SocketAddr, service: &str, clients: usize, rate: f64) -> Load {
        let (stop, stopped) = watch::channel(false);
        let period = Duration::from_secs_f64(clients as f64 / rate);
        let uri = format!("http://{service}/");
        let clients = (0..clients)
            .map(|i| {
                let stopped = stopped.clone();
                let uri = uri.clone();
                // Spread the clients' ticks over one period.
                let offset = period.mul_f64(i as f64 / clients as f64);
                tokio::spawn(client(outbound, uri, period, offset, stopped))
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients after their current request and returns every
    /// outcome, in no particular order.
    pub async fn finish(self) -> Vec<Outcome> {
        let _ = self.stop.send(true);
        let mut all = Vec::new();
        for client in self.clients {
            all.extend(client.await.expect("load client panicked"));
        }
        all
    }
}

async fn client(
    outbound: SocketAddr,
    uri: String,
    period: Duration,
    offset: Duration,
    mut stopped: watch::Receiver<bool>,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    // A late request does not make the next ones bunch up: the rate stays
    // bounded whatever the latency.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connection: Option<SendRequest<Empty<Bytes>>> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.changed() => break,
        }
        let start = Instant::now();
        let sender = match &mut connection {
            Some(sender) if !sender.is_closed() => sender,
            _ => match connect(outbound).await {
                Ok(sender) => connection.insert(sender),
                Err(error) => {
                    outcomes.push(no_answer(start, format!("connect to {outbound}: {error}")));
                    continue;
                }
            },
        };
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, request(sender, &uri, start)).await;
        match outcome {
            Ok(Ok(outcome)) => {
                if outcome.body_cut {
                    connection = None;
                }
                outcomes.push(outcome);
            }
            Ok(Err(error)) => {
                connection = None;
                outcomes.push(no_answer(start, error));
            }
            Err(_) => {
                connection = None;
                outcomes.push(no_answer(
                    start,
                    format!("no answer in {REQUEST_TIMEOUT:?}"),
                ));
            }
        }
    }
    outcomes
}

async fn connect(outbound: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(outbound)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn request(
    sender: &mut SendRequest<Empty<Bytes>>,
    uri: &str,
    start: Instant,
) -> Result<Outcome, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let request = Request::get(uri).body(Empty::new()).expect("valid request");
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let reason = response
        .headers()
        .get("x-meshlet-reason")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match response.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return Ok(Outcome {
                start,
                end: Instant::now(),
                status: Some(status),
                reason,
                port: None,
                detail: format!("response body: {error}"),
                body_cut: true,
            })
        }
    };
    let end = Instant::now();
    let (port, detail) = if (200..300).contains(&status) {
        (app_port(&body), String::new())
    } else {
        let text = String::from_utf8_lossy(&body);
        let line = text.lines().next().unwrap_or_default().to_owned();
        (named_port(&text).or_else(|| app_port(&body)), line)
    };
    Ok(Outcome {
        start,
        end,
        status: Some(status),
        reason,
        port,
        detail,
        body_cut: false,
    })
}

fn no_answer(start: Instant, detail: String) -> Outcome {
    Outcome {
        start,
        end: Instant::now(),
        status: None,
        reason: None,
        port: None,
        detail,
        body_cut: false,
    }
}

/// `demo-service`'s `{"port": N, ...}`.
fn app_port(body: &[u8]) -> Option<u16> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value["port"].as_u64().and_then(|p| u16::try_from(p).ok())
}

/// The port of the first `127.0.0.1:PORT` in a mesh error body.
fn named_port(text: &str) -> Option<u16> {
    let after = &text[text.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_port_a_mesh_error_names() {
        assert_eq!(
            super::named_port("meshlet: upstream 127.0.0.1:23456 failed: connection error\n"),
            Some(23456)
        );
        assert_eq!(
            super::named_port("meshlet: service \"x\" has no healthy endpoint"),
            None
        );
        assert_eq!(
            super::app_port(br#"{"service":"backend","port":18080}"#),
            Some(18080)
        );
    }
}
