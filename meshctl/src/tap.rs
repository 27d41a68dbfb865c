//! `meshctl tap deploy|service NAME`: live requests seen by the matching
//! sidecars, streamed through the control plane.
//!
//! ```text
//! GET /api/v1/tap?service=NAME&path=…&max=N ─► NDJSON TapLines ─► Started (stderr), Event (a line on
//! stdout: text or the event's JSON), Dropped (stderr), Keepalive (nothing) ─► after --max events: exit 0
//! ```
//!
//! Ending meshctl (Ctrl-C, or `--max` reached) closes the stream; the
//! control plane then ends the tap and the sidecars stop within a second
//! or so (see the control plane's `tap` module).

use std::time::{Duration, UNIX_EPOCH};

use bytes::BytesMut;
use http_body_util::BodyExt;
use meshlet_api::tap::{paths, TapDirection, TapEvent, TapLine, TapQuery};

use crate::client::{ClientError, ControlPlane};
use crate::error::CommandError;
use crate::output::{duration_us, emit, Format};

/// What the tap selects and how much of it to print.
#[derive(Debug, Clone)]
pub struct TapRequest {
    pub query: TapQuery,
    pub format: Format,
}

/// Runs the tap until `max` events were printed (`Ok(true)`), or the
/// control plane ends the stream.
pub async fn run(cp: &ControlPlane, request: TapRequest) -> Result<bool, CommandError> {
    request.query.filter().map_err(CommandError::Usage)?;
    let path = format!("{}?{}", paths::TAP, query_string(&request.query));
    let mut body = cp.stream(&path).await?;
    let max = request.query.max;
    let mut printed = 0u64;
    let mut buffer = BytesMut::new();
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Err(e)) => {
                return Err(CommandError::Client(ClientError::Unreachable {
                    server: cp.server().to_owned(),
                    cause: format!("the tap stream broke: {e}"),
                }))
            }
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line = buffer.split_to(end + 1);
            let line = &line[..end];
            let parsed: TapLine = serde_json::from_slice(line).map_err(|e| {
                CommandError::Client(ClientError::Decode {
                    status: http::StatusCode::OK,
                    reason: format!("a tap line: {e}"),
                })
            })?;
            match parsed {
                TapLine::Started { sidecars, .. } => {
                    eprintln!("tapping {sidecars} sidecar(s); Ctrl-C to stop");
                }
                TapLine::Event(event) => {
                    emit(&render(&event, request.format));
                    printed += 1;
                    if max.is_some_and(|max| printed >= max) {
                        return Ok(true);
                    }
                }
                TapLine::Dropped { count } => {
                    eprintln!("meshctl: {count} event(s) dropped (a queue was full)");
                }
                TapLine::Keepalive => {}
            }
        }
    }
    // The control plane ended the stream (shutdown, or its own max).
    Ok(max.is_some_and(|max| printed >= max))
}

/// One event: the JSON object on one line, or a text line.
pub fn render(event: &TapEvent, format: Format) -> String {
    if format != Format::Table {
        let mut line = serde_json::to_string(event).unwrap_or_default();
        line.push('\n');
        return line;
    }
    let at = UNIX_EPOCH + Duration::from_millis(event.at_ms);
    let clock = at
        .duration_since(UNIX_EPOCH)
        .map(|d| {
            let secs = d.as_secs() % 86_400;
            format!(
                "{:02}:{:02}:{:02}.{:03}",
                secs / 3600,
                secs % 3600 / 60,
                secs % 60,
                d.subsec_millis()
            )
        })
        .unwrap_or_default();
    let (arrow, peer_label) = match event.direction {
        TapDirection::Inbound => ("in ", "src"),
        TapDirection::Outbound => ("out", "dst"),
    };
    let mut line = format!(
        "{clock} {arrow} {} {peer_label}={} {} {} {} {}",
        event.instance,
        event.peer,
        event.method,
        event.path,
        event.status,
        duration_us(event.latency_ms * 1000.0),
    );
    if let Some(reason) = &event.reason {
        line.push_str(&format!(" reason={reason}"));
    }
    if let Some(trace) = &event.trace_id {
        line.push_str(&format!(" trace={trace}"));
    }
    for (name, value) in &event.headers {
        line.push_str(&format!(" {name}={value:?}"));
    }
    line.push('\n');
    line
}

/// The query's fields, percent-encoded.
fn query_string(query: &TapQuery) -> String {
    let fields = [
        ("namespace", query.namespace.as_deref()),
        ("service", query.service.as_deref()),
        ("deploy", query.deploy.as_deref()),
        ("path", query.path.as_deref()),
        ("method", query.method.as_deref()),
        ("status", query.status.as_deref()),
    ];
    let mut parts: Vec<String> = fields
        .iter()
        .filter_map(|(key, value)| Some(format!("{key}={}", encode(value.as_ref()?))))
        .collect();
    if let Some(max) = query.max {
        parts.push(format!("max={max}"));
    }
    parts.join("&")
}

fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_encoded() {
        let query = TapQuery {
            service: Some("orders".into()),
            path: Some("/api/a b&c".into()),
            max: Some(20),
            ..TapQuery::default()
        };
        assert_eq!(
            query_string(&query),
            "service=orders&path=/api/a%20b%26c&max=20"
        );
    }

    #[test]
    fn a_text_line_has_every_field() {
        let event = TapEvent {
            at_ms: 3_723_004,
            instance: "orders-1".into(),
            service: "orders".into(),
            direction: TapDirection::Inbound,
            peer: "spiffe://meshlet.local/ns/default/sa/frontend".into(),
            method: "GET".into(),
            path: "/api/x".into(),
            status: 503,
            latency_ms: 1.5,
            reason: Some("rate_limited".into()),
            trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
            headers: vec![("user-agent".into(), "<redacted>".into())],
        };
        let line = render(&event, Format::Table);
        assert_eq!(
            line,
            "01:02:03.004 in  orders-1 src=spiffe://meshlet.local/ns/default/sa/frontend GET /api/x 503 1.50ms reason=rate_limited trace=0af7651916cd43dd8448eb211c80319c user-agent=\"<redacted>\"\n"
        );
        let json: TapEvent = serde_json::from_str(&render(&event, Format::Json)).unwrap();
        assert_eq!(json, event);
    }
}
