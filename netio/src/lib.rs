//! What both servers of the mesh (the sidecar and the control plane) need
//! from the operating system below hyper:
//!
//! - [`write_stall`] — a connection I/O guard both put under hyper (the
//!   sidecar's proxy listeners, `sidecar::listen::server`, and the control
//!   plane's HTTPS API listener, `control_plane::listener`): a client that
//!   takes no response bytes for a limit is cut off: its writes fail with
//!   `TimedOut`, judged by the bytes its kernel acknowledged (`TCP_INFO`),
//!   so a slow steady reader is never cut; pressed (`StallPress`), a
//!   stalled client is judged over one second.
//! - [`memory`] — the memory a burst freed, given back to the system
//!   (`malloc_trim`; glibc keeps it otherwise), above
//!   `--trim-memory-above-mib` of either binary.
//!
//! A leaf crate: it knows sockets, the process and tokio, nothing of HTTP,
//! policies or the API; the arrows point into it only. Its two functions
//! that call C (`write_stall::bytes_acked`, `memory::trim`) are the
//! workspace's only `unsafe` code.

pub mod memory;
pub mod write_stall;

pub use write_stall::{StallPress, WriteStall, WriteStallIo};
