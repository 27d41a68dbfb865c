//! Waiting on conditions with a deadline instead of sleeping and hoping.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it returns `Some`, or panics with
/// `what` after `patience`.
pub async fn until<T, F, Fut>(what: &str, patience: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(patience, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {patience:?} waiting for {what}"))
}

/// Polls `check` every 20 ms until it returns `Some`, or gives up with
/// `None` after `patience` (for callers that explain the failure
/// themselves).
pub async fn within<T, F, Fut>(patience: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
