//! `meshctl get replicas`: the control plane's replicas as the one that
//! answered sees them (`GET /healthz?detail`: with `--store etcd`, the
//! replicas registered under the etcd prefix, each with the URL the others
//! reach it at; the answering one is marked `*`). A redb control plane is
//! one process: it says so.

use std::time::Duration;

use crate::client::ControlPlane;
use crate::error::CommandError;
use crate::output::{age, emit, now_ms, structured, table, Format};

pub async fn get_replicas(cp: &ControlPlane, output: Format) -> Result<bool, CommandError> {
    let detail: serde_json::Value = cp.get("/healthz?detail").await?;
    if let Some(text) = structured(output, &detail["replicas"]) {
        emit(&text);
        return Ok(true);
    }
    let Some(replicas) = detail["replicas"].as_array() else {
        let store = detail["store"].as_str().unwrap_or("unknown");
        emit(&format!(
            "one control plane (store {store}); replicas need --store etcd\n"
        ));
        return Ok(true);
    };
    let answering = detail["replica"].as_str().unwrap_or("");
    let now = now_ms();
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            let id = r["id"].as_str().unwrap_or("?");
            let started = r["startedAtMs"].as_u64().unwrap_or(now);
            vec![
                format!("{}{id}", if id == answering { "*" } else { " " }),
                r["url"].as_str().unwrap_or("?").to_owned(),
                r["version"].as_str().unwrap_or("?").to_owned(),
                age(Duration::from_millis(now.saturating_sub(started))),
            ]
        })
        .collect();
    emit(&table(&["  REPLICA", "URL", "VERSION", "AGE"], &rows));
    Ok(true)
}
