//! Connection I/O guards that both servers of the mesh put under hyper:
//! the sidecar's proxy listeners (`sidecar::listen::server`) and the
//! control plane's HTTPS API listener (`control_plane::listener`).
//!
//! - [`write_stall`] — a client that takes no response bytes for a limit
//!   is cut off: its writes fail with `TimedOut`, judged by the bytes its
//!   kernel acknowledged (`TCP_INFO`), so a slow steady reader is never cut;
//!   pressed (`StallPress`), a stalled client is judged over one second.
//!
//! A leaf crate: it knows sockets and tokio, nothing of HTTP, policies or
//! the API; the arrows point into it only.

pub mod write_stall;

pub use write_stall::{StallPress, WriteStall, WriteStallIo};
