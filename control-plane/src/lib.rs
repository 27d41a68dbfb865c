//! meshlet's control plane and its command-line client, `meshctl`.
//!
//! Today this crate holds `meshctl validate`, which checks resource files
//! offline with the same parser the sidecar and (later) the control plane
//! use. The registry, policy store, push to sidecars and the `control-plane`
//! binary arrive with the control-plane issue; see ARCHITECTURE.md.

pub mod validate;
