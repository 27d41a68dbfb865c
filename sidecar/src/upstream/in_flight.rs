//! An endpoint's count of outstanding requests and the guard that holds
//! one of them. A leaf: the balancer reads the count, the response body
//! (`body`) carries the guard until its last byte, so neither needs the
//! other's module.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// How many requests an endpoint has outstanding (an atomic, no lock).
#[derive(Debug, Default)]
pub struct InFlightCounter(Arc<AtomicUsize>);

impl InFlightCounter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one outstanding request until the returned guard is dropped.
    pub fn start(&self) -> InFlight {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(&self.0))
    }
}

/// An outstanding request on an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_counts_until_dropped() {
        let counter = InFlightCounter::default();
        let (first, second) = (counter.start(), counter.start());
        assert_eq!(counter.get(), 2);
        drop(first);
        assert_eq!(counter.get(), 1);
        drop(second);
        assert_eq!(counter.get(), 0);
    }
}
