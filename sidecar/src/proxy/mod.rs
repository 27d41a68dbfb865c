//! The request path of the inbound and outbound listeners: from a request
//! handed over by `listen` to a response, each side readable top to bottom
//! in one function (`handlers::Inbound::proxy`, `handlers::Outbound::proxy`).
//!
//! ```text
//! inbound:  RequestRecord ─► path normalised (path) ─► route label ─► caller (Peer.identity, policy::authz)
//!           ─► mTLS ─► authorization ─► rate limit (policy)
//!           ─► header rules, identity headers from the verified caller (headers)
//!           ─► forward to the local app (upstream) ─► response
//! outbound: RequestRecord ─► CONNECT? tunnel ─► destination (route: service | passthrough)
//!           ─► route label ─► mesh routes of the service (http_routes: rule → backend, filters, mirrors)
//!           ─► the target's policies for method and path (policy::index)
//!           ─► header rules, client identity headers removed, traceparent ─► forward (upstream)
//!           ─► response (101: splice the upgraded connections)
//! gateway:  RequestRecord (inbound) ─► path normalised ─► admit (authorization, rate limit by clientIP)
//!           ─► the gateway's Routes (host, path, headers, ...; none: 404 no_route)
//!           ─► RequestRecord (outbound) ─► header rules as outbound, x-forwarded-* ─► forward (upstream)
//! redirect: any request ─► 308 https://HOST[:PORT]PATH?QUERY
//! ```
//!
//! - `handlers` — `Inbound` and `Outbound` (the listeners' `Handler`s),
//!   the local app's target(s), and the one call that turns a
//!   `ProxyError` into the response and counts it.
//! - `gateway` — `Gateway`, the inbound handler of `--mode gateway`:
//!   external clients routed by the `Route`s naming the gateway to mesh
//!   services, through the same admission and forwarding as the inbound
//!   and outbound.
//! - `redirect` — `Redirect`, the gateway's `--redirect-port` handler
//!   (308 to https).
//! - `route` — outbound destination: absolute URI or `Host` → a service of
//!   the snapshot, or a passthrough address (DNS through a small cache),
//!   transparent mode's original destination, loop refusal.
//! - `path` — the inbound's path normalisation before authorization
//!   (unreserved escapes decoded, `//` merged, dot segments removed;
//!   `%2F`, `%5C`, `%00`, a backslash refused: 400 `bad_path`).
//! - `headers` — hop-by-hop removal, `x-forwarded-*`, the identity headers
//!   (`x-meshlet-source`, `x-meshlet-source-identity`: never a client's).
//! - `http_routes` — `Route`s compiled per parent (a gateway, or a service
//!   for its callers): precedence, matching, filters, backend choice.
//!
//! **Invariants:** the request path reads the configuration only through
//! the current snapshot pointer, never waits for it; every response the
//! mesh generates goes through `ProxyError::into_response` (in `error`,
//! which this folder calls and nothing below it does), so it carries
//! `x-meshlet-reason`; every request has exactly one `RequestRecord`.

pub(crate) mod gateway;
pub(crate) mod handlers;
pub(crate) mod headers;
pub(crate) mod http_routes;
pub(crate) mod path;
pub(crate) mod redirect;
pub(crate) mod route;
