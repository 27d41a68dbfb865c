//! Mesh-wide reads: this replica's part plus every other live replica's,
//! merged (`merge.rs`, `StatsStore::merged`), for the trace API and the
//! dashboard's data.
//!
//! ```text
//! GET /api/traces ─► TraceStore::list (here) + Peers::gather(/api/v1/peer/traces?...) ─► merge::trace_lists
//! GET /api/traces/{id} ─► TraceStore::get (here) + gather(/api/v1/peer/traces/{id}) ─► merge::trace_details
//! dashboard services/topology/policies/series, resources/info
//!   ─► StatsStore::dump (here) + gather(/api/v1/peer/stats) ─► StatsStore::merged ─► the same aggregations
//! ```
//!
//! Cost: one request to each other live replica per read, each bounded by
//! `--peer-timeout`; a replica that does not answer in time is left out
//! and named in `x-meshlet-partial` (the answer is still 200), and
//! `x-meshlet-merged: ANSWERED/LIVE` says how many parts it has. Without
//! peers (redb, or alone on etcd) nothing is asked and no header is added:
//! the answer is exactly the local one.

use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderValue;
use axum::response::Response;
use meshlet_api::mesh::{MERGED_HEADER, PARTIAL_HEADER};
use meshlet_api::traces::{TraceDetail, TraceSummary};

use super::{merge, paths, Gathered, Missing};
use crate::state::AppState;
use crate::stats::{InstanceDump, StatsStore};
use crate::traces::model::TraceId;
use crate::traces::TraceQuery;

/// Which replicas an answer covers.
#[derive(Debug, Clone, Default)]
pub struct Coverage {
    /// Whether other replicas were asked (false: a local answer, no headers).
    fanned_out: bool,
    live: usize,
    missing: Vec<Missing>,
}

impl Coverage {
    fn of<T>(gathered: &Gathered<T>) -> Coverage {
        Coverage {
            fanned_out: true,
            live: 1 + gathered.answers.len() + gathered.missing.len(),
            missing: gathered.missing.clone(),
        }
    }

    /// Whether some replica's part is missing.
    pub fn is_partial(&self) -> bool {
        !self.missing.is_empty()
    }

    /// Adds `x-meshlet-merged` and, when partial, `x-meshlet-partial`.
    pub fn apply(&self, mut response: Response) -> Response {
        if !self.fanned_out {
            return response;
        }
        let answered = self.live - self.missing.len();
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&format!("{answered}/{}", self.live)) {
            headers.insert(MERGED_HEADER, value);
        }
        if self.is_partial() {
            let names: Vec<&str> = self.missing.iter().map(|m| m.replica.as_str()).collect();
            if let Ok(value) = HeaderValue::from_str(&names.join(",")) {
                headers.insert(PARTIAL_HEADER, value);
            }
            for missing in &self.missing {
                tracing::warn!(replica = %missing.replica, reason = %missing.reason,
                    "mesh-wide read without this replica's part");
            }
        }
        response
    }
}

/// `GET /api/traces` over every live replica.
pub async fn traces(state: &AppState, query: &TraceQuery) -> (Vec<TraceSummary>, Coverage) {
    let local = state.traces.list(query, Instant::now());
    let Some(peers) = &state.peers else {
        return (local, Coverage::default());
    };
    if peers.others().is_empty() {
        return (local, Coverage::default());
    }
    let gathered = peers
        .gather::<Vec<TraceSummary>>(&trace_list_path(query))
        .await;
    let coverage = Coverage::of(&gathered);
    let mut parts = vec![local];
    parts.extend(gathered.answers.into_iter().filter_map(|(_, part)| part));
    (merge::trace_lists(parts, query.limit), coverage)
}

/// `GET /api/traces/{id}` over every live replica.
pub async fn trace(state: &AppState, id: TraceId) -> (Option<TraceDetail>, Coverage) {
    let local = state.traces.get(id, Instant::now());
    let Some(peers) = &state.peers else {
        return (local, Coverage::default());
    };
    if peers.others().is_empty() {
        return (local, Coverage::default());
    }
    let gathered = peers
        .gather::<TraceDetail>(&paths::trace(&id.to_string()))
        .await;
    let coverage = Coverage::of(&gathered);
    let parts: Vec<TraceDetail> = local
        .into_iter()
        .chain(gathered.answers.into_iter().filter_map(|(_, part)| part))
        .collect();
    (merge::trace_details(parts), coverage)
}

/// The stats reports of every live replica, as one store (this replica's
/// own store when it has no peers).
pub async fn stats(state: &AppState) -> (Arc<StatsStore>, Coverage) {
    let Some(peers) = &state.peers else {
        return (state.stats.clone(), Coverage::default());
    };
    if peers.others().is_empty() {
        return (state.stats.clone(), Coverage::default());
    }
    let gathered = peers.gather::<Vec<InstanceDump>>(paths::STATS).await;
    let coverage = Coverage::of(&gathered);
    let parts = state.stats.dump().into_iter().chain(
        gathered
            .answers
            .into_iter()
            .filter_map(|(_, part)| part)
            .flatten(),
    );
    (Arc::new(StatsStore::merged(parts)), coverage)
}

/// The peer route's query for `query`.
fn trace_list_path(query: &TraceQuery) -> String {
    let mut path = format!("{}?limit={}", paths::TRACES, query.limit);
    if let Some(service) = &query.service {
        path.push_str("&service=");
        path.push_str(&percent_encode(service));
    }
    if let Some(min) = query.min_duration {
        path.push_str(&format!("&minDurationMicros={}", min.as_micros()));
    }
    path
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_query_carries_every_filter() {
        let query = TraceQuery {
            service: Some("orders.shop/é".into()),
            min_duration: Some(std::time::Duration::from_millis(15)),
            limit: 7,
        };
        assert_eq!(
            trace_list_path(&query),
            "/api/v1/peer/traces?limit=7&service=orders.shop%2F%C3%A9&minDurationMicros=15000"
        );
    }
}
