//! A small Chrome DevTools Protocol client for browser tests.
//!
//! [`Browser::launch`] starts Debian's headless `chromium` with a fresh
//! profile, reads the `DevTools listening on ws://...` line from its
//! stderr, opens one WebSocket to it and attaches to a new page target
//! (the flat session protocol: commands carry a `sessionId`). A test then
//! navigates, evaluates JavaScript, waits for conditions with a deadline,
//! clicks and takes PNG screenshots, and finally reads what the page
//! reported meanwhile: uncaught exceptions, `console.error` calls and
//! error log entries (failed loads, CSP violations), and the bytes it
//! transferred. Chromium (its whole process group) is killed on drop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::TempDir;

/// Where Debian's `chromium` package puts the browser (`MESHLET_CHROMIUM`
/// overrides it).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Set to `1` to skip browser tests on a machine without chromium.
pub const SKIP_ENV: &str = "MESHLET_SKIP_BROWSER";

const STARTUP_PATIENCE: Duration = Duration::from_secs(30);
const COMMAND_PATIENCE: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(100);
/// The page's viewport (and so the screenshots' width).
const VIEWPORT: (u32, u32) = (1280, 860);
/// Screenshots of long pages are cut at this height.
const MAX_SHOT_HEIGHT: f64 = 4000.0;

#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error(
        "{} not found: install it with `apt-get install chromium` \
         (or set {SKIP_ENV}=1 to skip the browser tests)",
        path.display()
    )]
    NotInstalled { path: PathBuf },
    #[error("cannot start {}: {source}", path.display())]
    Launch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chromium printed no DevTools address within {patience:?}; it said: {output}")]
    NoDevTools { patience: Duration, output: String },
    #[error("DevTools connection to {url}: {source}")]
    Connect {
        url: String,
        source: Box<tungstenite::Error>,
    },
    #[error("sending to DevTools: {0}")]
    Send(#[from] Box<tungstenite::Error>),
    #[error("the DevTools connection closed")]
    Closed,
    #[error("{method}: no answer within {patience:?}")]
    NoAnswer { method: String, patience: Duration },
    #[error("{method} failed: {message}")]
    Protocol { method: String, message: String },
    #[error("the page's script threw: {0}")]
    Script(String),
    #[error("timed out after {patience:?} waiting for {what}; last value: {last}")]
    Timeout {
        what: String,
        patience: Duration,
        last: Value,
    },
    #[error("no element matches {0}")]
    NoElement(String),
    #[error("the screenshot is not valid base64")]
    Screenshot,
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the page reported through events since the browser started.
#[derive(Debug, Default)]
struct PageReport {
    errors: Vec<String>,
    transferred_bytes: u64,
}

impl PageReport {
    fn record(&mut self, method: &str, params: &Value) {
        match method {
            "Runtime.exceptionThrown" => {
                let details = &params["exceptionDetails"];
                let text = details["exception"]["description"]
                    .as_str()
                    .or_else(|| details["text"].as_str())
                    .unwrap_or("?");
                self.errors.push(format!("uncaught exception: {text}"));
            }
            "Runtime.consoleAPICalled"
                if matches!(params["type"].as_str(), Some("error" | "assert")) =>
            {
                let args: Vec<String> = params["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| match (&a["value"], a["description"].as_str()) {
                        (Value::String(s), _) => s.clone(),
                        (Value::Null, Some(d)) => d.to_owned(),
                        (v, _) => v.to_string(),
                    })
                    .collect();
                self.errors
                    .push(format!("console.error: {}", args.join(" ")));
            }
            "Log.entryAdded" if params["entry"]["level"] == "error" => {
                let entry = &params["entry"];
                self.errors.push(format!(
                    "log ({}): {} {}",
                    entry["source"].as_str().unwrap_or("?"),
                    entry["text"].as_str().unwrap_or("?"),
                    entry["url"].as_str().unwrap_or_default()
                ));
            }
            "Network.loadingFinished" => {
                self.transferred_bytes +=
                    params["encodedDataLength"].as_f64().unwrap_or(0.0) as u64;
            }
            _ => {}
        }
    }
}

type Socket = WebSocketStream<TcpStream>;
type Reply = Result<Value, BrowserError>;
type Pending = Arc<Mutex<HashMap<u64, (String, oneshot::Sender<Reply>)>>>;

/// A headless chromium with one page attached.
pub struct Browser {
    child: Child,
    sink: tokio::sync::Mutex<SplitSink<Socket, Message>>,
    pending: Pending,
    report: Arc<Mutex<PageReport>>,
    next_id: AtomicU64,
    session: String,
    reader: tokio::task::JoinHandle<()>,
    _profile: TempDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("pid", &self.child.id())
            .field("session", &self.session)
            .finish()
    }
}

/// True when browser tests should be skipped (`MESHLET_SKIP_BROWSER=1`).
pub fn skipped() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|v| v == "1")
}

impl Browser {
    /// Starts chromium and attaches to a fresh page.
    pub async fn launch() -> Result<Browser, BrowserError> {
        let path = std::env::var_os("MESHLET_CHROMIUM")
            .map_or_else(|| PathBuf::from(CHROMIUM), PathBuf::from);
        if !path.exists() {
            return Err(BrowserError::NotInstalled { path });
        }
        let profile = TempDir::new();
        let mut child = Command::new(&path)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--no-first-run",
                "--no-default-browser-check",
                "--no-proxy-server",
                // The control plane's certificate is from the test's own
                // mesh CA, which this throw-away profile does not trust.
                "--ignore-certificate-errors",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--mute-audio",
            ])
            .arg(format!("--user-data-dir={}", profile.path.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that drop ends the renderers too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BrowserError::Launch {
                path: path.clone(),
                source,
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let url = devtools_url(stderr).await?;
        let (socket, _) = connect(&url).await?;
        let (sink, mut stream) = socket.split();
        let pending: Pending = Arc::default();
        let report: Arc<Mutex<PageReport>> = Arc::default();
        let reader = tokio::spawn({
            let (pending, report) = (pending.clone(), report.clone());
            async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Ok(text) = message.to_text() else {
                        continue;
                    };
                    let Ok(value) = serde_json::from_str::<Value>(text) else {
                        continue;
                    };
                    dispatch(value, &pending, &report);
                }
                // Dropping the senders answers every waiting call `Closed`.
                pending.lock().unwrap().clear();
            }
        });
        let mut browser = Browser {
            child,
            sink: tokio::sync::Mutex::new(sink),
            pending,
            report,
            next_id: AtomicU64::new(1),
            session: String::new(),
            reader,
            _profile: profile,
        };
        let target = browser
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let attached = browser
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        for domain in ["Runtime", "Log", "Page", "Network"] {
            browser.page(&format!("{domain}.enable"), json!({})).await?;
        }
        browser
            .page("Network.setCacheDisabled", json!({"cacheDisabled": true}))
            .await?;
        browser
            .page(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": VIEWPORT.0, "height": VIEWPORT.1, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await?;
        Ok(browser)
    }

    /// Sends one command (to the browser, or to a session) and waits for
    /// its answer.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = session.into();
        }
        let (answer, answered) = oneshot::channel();
        self.pending
            .lock()
            .unwrap()
            .insert(id, (method.to_owned(), answer));
        self.sink
            .lock()
            .await
            .send(Message::text(command.to_string()))
            .await
            .map_err(|e| BrowserError::Send(Box::new(e)))?;
        match tokio::time::timeout(COMMAND_PATIENCE, answered).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(BrowserError::Closed),
            Err(_) => Err(BrowserError::NoAnswer {
                method: method.to_owned(),
                patience: COMMAND_PATIENCE,
            }),
        }
    }

    /// A command to the attached page.
    async fn page(&self, method: &str, params: Value) -> Reply {
        self.call(Some(&self.session), method, params).await
    }

    /// Opens `url` and waits until the document has loaded.
    pub async fn navigate(&self, url: &str) -> Result<(), BrowserError> {
        let reply = self.page("Page.navigate", json!({"url": url})).await?;
        if let Some(error) = reply["errorText"].as_str() {
            return Err(BrowserError::Protocol {
                method: format!("Page.navigate {url}"),
                message: error.to_owned(),
            });
        }
        self.wait_for(
            "the document to load",
            "document.readyState === 'complete'",
            COMMAND_PATIENCE,
        )
        .await
        .map(drop)
    }

    /// Opens the dashboard at `url` (which answers a log-in page without a
    /// session), types `token` into `#login-token`, submits `#login-form`,
    /// and waits until the log-in page is gone.
    pub async fn log_in(&self, url: &str, token: &str) -> Result<(), BrowserError> {
        self.navigate(url).await?;
        self.wait_for(
            "the log-in form",
            "!!document.getElementById('login-form')",
            COMMAND_PATIENCE,
        )
        .await?;
        let token = Value::from(token).to_string();
        self.evaluate(&format!(
            "(() => {{ document.getElementById('login-token').value = {token}; \
             document.getElementById('login-form').requestSubmit(); return true; }})()"
        ))
        .await?;
        self.wait_for(
            "the log-in page to go",
            "document.readyState === 'complete' && !document.getElementById('login-form')",
            COMMAND_PATIENCE,
        )
        .await?;
        // The page answered 401 before the log-in, which the browser logs
        // as a failed resource load: expected, not a page error.
        self.clear_errors();
        Ok(())
    }

    /// Makes every request whose URL matches one of `patterns` (`*`
    /// wildcards) fail, as a network outage would.
    pub async fn block_urls(&self, patterns: &[&str]) -> Result<(), BrowserError> {
        self.page("Network.setBlockedURLs", json!({"urls": patterns}))
            .await
            .map(drop)
    }

    /// Evaluates a JavaScript expression in the page (promises awaited)
    /// and returns its value as JSON.
    pub async fn evaluate(&self, expression: &str) -> Result<Value, BrowserError> {
        let reply = self
            .page(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(details) = reply.get("exceptionDetails") {
            let text = details["exception"]["description"]
                .as_str()
                .or_else(|| details["text"].as_str())
                .unwrap_or("?");
            return Err(BrowserError::Script(text.to_owned()));
        }
        Ok(reply["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Evaluates `condition` every 100 ms until it is truthy (not null,
    /// false, 0 or ""), and returns that value.
    pub async fn wait_for(
        &self,
        what: &str,
        condition: &str,
        patience: Duration,
    ) -> Result<Value, BrowserError> {
        let deadline = Instant::now() + patience;
        loop {
            let value = match self.evaluate(condition).await {
                Ok(value) => value,
                // The page is between two documents (a navigation the
                // condition waits for): not yet, ask again.
                Err(BrowserError::Protocol { message, .. }) if navigating(&message) => Value::Null,
                Err(error) => return Err(error),
            };
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(BrowserError::Timeout {
                    what: what.to_owned(),
                    patience,
                    last: value,
                });
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Clicks the first element matching a CSS selector.
    pub async fn click(&self, selector: &str) -> Result<(), BrowserError> {
        let quoted = Value::from(selector).to_string();
        let clicked = self
            .evaluate(&format!(
                "(() => {{ const e = document.querySelector({quoted}); if (!e) return false; e.click(); return true; }})()"
            ))
            .await?;
        match clicked {
            Value::Bool(true) => Ok(()),
            _ => Err(BrowserError::NoElement(selector.to_owned())),
        }
    }

    /// Saves a PNG of the whole page (up to 4000 px high) to `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<(), BrowserError> {
        let metrics = self.page("Page.getLayoutMetrics", json!({})).await?;
        let size = &metrics["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(VIEWPORT.0.into());
        let height = size["height"]
            .as_f64()
            .unwrap_or(VIEWPORT.1.into())
            .min(MAX_SHOT_HEIGHT);
        let shot = self
            .page(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                }),
            )
            .await?;
        let png = decode_base64(shot["data"].as_str().unwrap_or_default())
            .ok_or(BrowserError::Screenshot)?;
        let write = |result: std::io::Result<()>| {
            result.map_err(|source| BrowserError::Write {
                path: path.to_owned(),
                source,
            })
        };
        if let Some(dir) = path.parent() {
            write(std::fs::create_dir_all(dir))?;
        }
        write(std::fs::write(path, png))
    }

    /// Forgets the errors recorded so far (the log-in page's expected 401).
    pub fn clear_errors(&self) {
        self.report.lock().unwrap().errors.clear();
    }

    /// Exceptions, console errors and error log entries so far.
    pub fn errors(&self) -> Vec<String> {
        self.report.lock().unwrap().errors.clone()
    }

    /// Bytes transferred (as encoded on the wire, headers included) by
    /// every finished request so far.
    pub fn transferred_bytes(&self) -> u64 {
        self.report.lock().unwrap().transferred_bytes
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(pid) = self.child.id() {
            let group = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.start_kill();
    }
}

/// Reads chromium's stderr until it names its DevTools address; the rest
/// of its output is drained in the background (a full pipe would stall it).
async fn devtools_url(stderr: ChildStderr) -> Result<String, BrowserError> {
    const MARKER: &str = "DevTools listening on ";
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(STARTUP_PATIENCE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(at) = line.find(MARKER) {
                return Some(line[at + MARKER.len()..].trim().to_owned());
            }
            seen.push(line);
        }
        None
    })
    .await;
    match found {
        Ok(Some(url)) => {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(url)
        }
        _ => Err(BrowserError::NoDevTools {
            patience: STARTUP_PATIENCE,
            output: seen.join("\n"),
        }),
    }
}

async fn connect(
    url: &str,
) -> Result<(Socket, tungstenite::handshake::client::Response), BrowserError> {
    let fail = |source| BrowserError::Connect {
        url: url.to_owned(),
        source: Box::new(source),
    };
    let host = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    let stream = TcpStream::connect(host)
        .await
        .map_err(|e| fail(tungstenite::Error::Io(e)))?;
    tokio_tungstenite::client_async(url, stream)
        .await
        .map_err(fail)
}

/// An answer goes to the call waiting for its id; an event to the report.
fn dispatch(message: Value, pending: &Pending, report: &Mutex<PageReport>) {
    if let Some(id) = message["id"].as_u64() {
        let Some((method, answer)) = pending.lock().unwrap().remove(&id) else {
            return;
        };
        let reply = match message.get("error") {
            Some(error) => Err(BrowserError::Protocol {
                method,
                message: error["message"].as_str().unwrap_or("?").to_owned(),
            }),
            None => Ok(message["result"].clone()),
        };
        let _ = answer.send(reply);
    } else if let Some(method) = message["method"].as_str() {
        report.lock().unwrap().record(method, &message["params"]);
    }
}

/// Standard base64 (with padding), as DevTools sends binary data.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= sextet(c)? << (18 - 6 * i);
        }
        let len = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&n.to_be_bytes()[1..1 + len]);
    }
    Some(out)
}

/// Whether a DevTools error only says that the page is navigating (its
/// JavaScript context went away under an evaluation).
fn navigating(message: &str) -> bool {
    [
        "navigated or closed",
        "Execution context was destroyed",
        "Cannot find context",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert!(decode_base64("a").is_none());
        assert!(decode_base64("a*==").is_none());
    }

    #[test]
    fn the_report_keeps_errors_and_counts_bytes() {
        let mut report = PageReport::default();
        report.record(
            "Network.loadingFinished",
            &json!({"encodedDataLength": 1200.0}),
        );
        report.record(
            "Network.loadingFinished",
            &json!({"encodedDataLength": 300}),
        );
        report.record(
            "Runtime.consoleAPICalled",
            &json!({"type": "log", "args": [{"value": "fine"}]}),
        );
        report.record(
            "Runtime.consoleAPICalled",
            &json!({"type": "error", "args": [{"value": "bad"}, {"value": 2}]}),
        );
        report.record(
            "Log.entryAdded",
            &json!({"entry": {"level": "error", "source": "network", "text": "404", "url": "/x"}}),
        );
        report.record(
            "Log.entryAdded",
            &json!({"entry": {"level": "warning", "text": "meh"}}),
        );
        report.record(
            "Runtime.exceptionThrown",
            &json!({"exceptionDetails": {"text": "Uncaught", "exception": {"description": "TypeError: x"}}}),
        );
        assert_eq!(report.transferred_bytes, 1500);
        assert_eq!(
            report.errors,
            [
                "console.error: bad 2",
                "log (network): 404 /x",
                "uncaught exception: TypeError: x"
            ]
        );
    }
}
