//! The API types of changes to applied resources beyond `apply`: delete,
//! diff, rollback, and each resource with the revision that last changed
//! it ([`ResourceInfo`], [`ChangeStamp`]). Only the control plane and
//! meshctl speak them; what sidecars also need (registration, the watch
//! stream, `apply` itself) is in [`crate::mesh`]. They travel as camelCase
//! JSON like the rest of the API.

use serde::{Deserialize, Serialize};

use crate::mesh::{ApplyAction, ApplyFile, RevisionRecord};
use crate::resource::{Resource, ResourceKey};

/// Routes added by the apply pipeline.
pub mod paths {
    /// `POST`: [`super::DeleteRequest`] → [`super::DeleteReply`].
    pub const DELETE: &str = "/api/v1/delete";
    /// `POST`: `ApplyRequest` → [`super::DiffReply`]; changes nothing.
    pub const DIFF: &str = "/api/v1/diff";
    /// `POST`: [`super::RollbackRequest`] → [`super::RollbackReply`].
    pub const ROLLBACK: &str = "/api/v1/rollback";
    /// `GET`: every applied resource with its last change
    /// ([`super::ResourceInfo`]).
    pub const RESOURCE_INFO: &str = "/api/v1/resources/info";
}

/// `POST /api/v1/delete`: the resources of `files` (parsed and validated
/// like an apply) and the `keys`, deleted in one revision.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeleteRequest {
    #[serde(default)]
    pub files: Vec<ApplyFile>,
    #[serde(default)]
    pub keys: Vec<ResourceKey>,
    #[serde(default)]
    pub actor: Option<String>,
    /// Skip keys that do not exist instead of refusing the whole request.
    #[serde(default)]
    pub ignore_not_found: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeleteAction {
    Deleted,
    NotFound,
}

impl std::fmt::Display for DeleteAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeleteAction::Deleted => "deleted",
            DeleteAction::NotFound => "not found",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteOutcome {
    pub key: ResourceKey,
    pub action: DeleteAction,
}

/// The revision the delete created (the current one if nothing was
/// deleted) and one outcome per key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteReply {
    pub revision: u64,
    pub outcomes: Vec<DeleteOutcome>,
}

/// What an apply would do to one resource; for `configured`, a line diff
/// of the YAML (`-` current, `+` applied, two spaces for context), for
/// `created` the whole YAML as added lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiffOutcome {
    pub key: ResourceKey,
    pub action: ApplyAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

/// `POST /api/v1/diff`: the current revision and one outcome per resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiffReply {
    pub revision: u64,
    pub outcomes: Vec<DiffOutcome>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RollbackRequest {
    /// Make the resources what they were right after this revision.
    pub revision: u64,
    /// Who asks (`USER@HOST`); the revision's actor becomes
    /// `rollback to N by ACTOR`.
    #[serde(default)]
    pub actor: Option<String>,
}

/// `rolledBack: false` (and the current revision) when the resources
/// already were as at the requested revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackReply {
    pub revision: u64,
    pub rolled_back: bool,
    pub changes: Vec<String>,
}

/// The revision that last changed a resource, when and by whom. The
/// control plane's store keeps one per resource; the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeStamp {
    pub revision: u64,
    pub at_ms: u64,
    pub actor: String,
}

impl ChangeStamp {
    pub fn of(record: &RevisionRecord) -> ChangeStamp {
        ChangeStamp {
            revision: record.revision,
            at_ms: record.at_ms,
            actor: record.actor.clone(),
        }
    }
}

/// An applied resource and the revision that last changed it (`None` if
/// it was applied before change records existed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub resource: Resource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change: Option<ChangeStamp>,
    /// For a dry-run policy: what it would have refused, from the
    /// sidecars' stats reports (`None`: not a dry-run policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_refuse: Option<WouldRefuseRate>,
}

/// Requests a dry-run policy would have refused, summed over the sidecars
/// that report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WouldRefuseRate {
    /// Per second over [`WouldRefuseRate::rate_window_secs`].
    pub per_second: f64,
    /// The seconds the rate is taken over: the part of the last
    /// [`WouldRefuseRate::RATE_WINDOW_SECS`] the sidecars' reports cover
    /// (shorter right after the policy or the sidecars started). 0 from a
    /// control plane that did not say: read as the whole window.
    #[serde(default)]
    pub rate_window_secs: f64,
    /// In the whole window the control plane keeps
    /// ([`WouldRefuseRate::TOTAL_WINDOW_SECS`]).
    pub total: u64,
}

impl WouldRefuseRate {
    pub const RATE_WINDOW_SECS: u64 = 60;
    pub const TOTAL_WINDOW_SECS: u64 = 300;
}
