//! Listeners and connections: everything between an accepted socket and
//! a request handed to a [`server::Handler`].
//!
//! ```text
//! accept (server) ─► transparent listener: original destination (original_dst)
//!                 ─► peek the first bytes (sniff): HTTP/1.1 | h2c | opaque TCP
//!   HTTP/1.1 ─► WriteStallIo (netio) ─► h1_server (requests without a body) ─────────────► Handler (proxy)
//!                 └ first other request ─► FramingGuard (framing) ─► hyper http1 (upgrades) ─► Handler
//!   h2c      ─► WriteStallIo (netio) ─► H2Guard (h2_guard) ─► hyper http2 ──────────────► Handler (proxy)
//!   opaque   ─► Interception::splice (transparent) ─► tunnel::copy_both_ways
//!   TLS (mesh hop, inbound with a certificate) ─► identity::tls::accept ─► Peer.identity
//!       ─► ALPN h2 → H2Guard → hyper http2 | http/1.1 → FramingGuard → hyper http1 | meshlet-tcp → the app
//!   TLS (gateway, --tls-cert) ─► terminate (certificate by SNI) ─► ALPN h2 | http/1.1 as above
//! ```
//!
//! - `server` — the accept loop of every listener, protocol choice,
//!   graceful shutdown ([`server::Drain`]); one `connection` tracing span
//!   per connection and one `request` span per request.
//! - `h1_server` — our own HTTP/1.1 server for the common request (no
//!   body, no upgrade, HTTP/1.1): reads, checks (what the framing guard
//!   would refuse goes to it), answers, and hands the connection to the
//!   guard and hyper at the first request that is anything else.
//! - `framing` — the I/O wrapper that checks HTTP/1.1 message framing
//!   before hyper sees a head (request smuggling, oversized heads).
//! - `h2_guard` — the I/O wrapper that watches the frame headers an
//!   HTTP/2 client sends (rapid reset, CONTINUATION, SETTINGS/PING floods)
//!   and has the connection closed with GOAWAY when it breaks a limit.
//! - `sniff` — protocol detection by peeking.
//! - `stop` — a connection's view of the shutdown signal, polled only
//!   when it has changed.
//! - `original_dst` — `SO_ORIGINAL_DST` of a redirected connection.
//! - `transparent` — what a transparent listener does with opaque TCP, and
//!   which addresses are this sidecar's own (`loops_back`).
//! - `terminate` — a gateway's TLS for external clients: certificate
//!   pairs from PEM files, the pair chosen by SNI, reloaded when the files
//!   change.
//! - `tunnel` — byte splicing for `CONNECT`, upgrades and opaque TCP.
//! - `meshlet_netio::write_stall` (a crate of its own, shared with the
//!   control plane's API listener) — the I/O wrapper under both guards
//!   that fails the writes of a client that takes no response bytes for
//!   `--stream-idle-timeout`, so the connection closes.
//! - `stream_watch` — the same limit per HTTP/2 stream: a response that
//!   waits on the client's flow-control window that long is reset
//!   (hyper's stream tasks run through its executor).
//!
//! **Invariants:** a connection is counted in `active_connections` from
//! accept to close; a refusal below hyper (400, 431) waits until the
//! earlier pipelined requests on the connection are answered; after the
//! shutdown signal no connection is accepted and every open one finishes
//! its in-flight requests. Nothing here knows about routes or policies:
//! the handler does.

pub(crate) mod framing;
pub(crate) mod h1_server;
pub(crate) mod h2_guard;
pub(crate) mod original_dst;
pub(crate) mod server;
pub(crate) mod sniff;
pub(crate) mod stop;
pub(crate) mod stream_watch;
pub(crate) mod terminate;
pub(crate) mod transparent;
pub(crate) mod tunnel;
