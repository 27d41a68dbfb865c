//! The wall clock in Unix milliseconds: revision times, registration
//! times and the stats window. Everything below the handlers takes the
//! time as a parameter, so tests drive it.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
