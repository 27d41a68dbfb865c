//! Where each policy lives, and the index that finds the ones that apply
//! to a request.
//!
//! ```text
//! Snapshot::build ─► index: per service, each kind's policies by route specificity
//!                    (PolicyState hands unchanged policies' state to the next build)
//! request ─► index::OutboundPolicies::for_request / InboundPolicies::rate_limit
//!         ─► authz (inbound: mTLS mode, authorization), ratelimit (inbound) | fault, breaker, retry, timeouts, split (outbound, used by forward)
//! ```
//!
//! - `index` — the policy index (`OutboundPolicies`, `InboundPolicies`,
//!   `RoutePolicies`), timeouts and the traffic split's plan.
//! - `authz` — zero trust on the inbound side: the caller's verified
//!   identity and service (`Callers`), the effective `MTLSPolicy` mode and
//!   the compiled `AuthorizationPolicy`s (Istio's evaluation, dry run).
//! - `ratelimit` — token bucket and sliding window per key (inbound).
//! - `breaker` — per-endpoint circuit breakers and the target's
//!   concurrency limit.
//! - `retry` — which requests are replayable, backoff, retry budget.
//! - `fault` — `FaultInjectionPolicy`: injected delays and aborts
//!   (outbound, first thing `forward` does).
//! - `dry_run` — `WouldRefuse`: what a `mode: dryRun` policy (rate limit,
//!   breaker, authorization) counts and marks instead of refusing.
//! - `outcome` — `Outcome`, how one try ended (breakers and retries count
//!   it).
//!
//! **Invariants:** policy objects are built at snapshot build, never per
//! request; a policy whose identity and spec did not change keeps its
//! state (buckets, breaker state, budget) across rebuilds; metric handles
//! are resolved once per policy and build.

pub(crate) mod authz;
pub(crate) mod breaker;
pub(crate) mod dry_run;
pub(crate) mod fault;
pub(crate) mod index;
pub(crate) mod outcome;
pub(crate) mod ratelimit;
pub(crate) mod retry;
