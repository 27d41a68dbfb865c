//! Resident memory of the processes that live through the whole soak.
//!
//! A [`Sampler`] task reads each tracked process's VmRSS (`/proc/PID/status`,
//! through the harness's `rss_bytes`) every few seconds into a [`Series`]
//! of (seconds since the start, bytes). [`Series::slope`] fits a
//! least-squares line over the samples from a given time on and gives its
//! slope in MiB per minute: growth that keeps going shows as a slope,
//! while one-off steps (allocator arenas, caches filling up in the first
//! seconds) fall before the fitted window or weigh little in it.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Reads one process's resident memory in bytes.
pub type Reader = Box<dyn Fn() -> u64 + Send + Sync>;

/// A process's samples.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// (seconds since the start, VmRSS bytes).
    pub samples: Vec<(f64, u64)>,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Series {
    /// The least-squares slope of the samples taken at or after `from`
    /// seconds, in MiB per minute (`None` with fewer than 3 samples).
    pub fn slope(&self, from: f64) -> Option<f64> {
        let points: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|(t, _)| *t >= from)
            .map(|(t, bytes)| (t / 60.0, *bytes as f64 / MIB))
            .collect();
        least_squares_slope(&points)
    }

    pub fn first_mib(&self) -> f64 {
        self.samples.first().map_or(0.0, |s| s.1 as f64 / MIB)
    }

    pub fn last_mib(&self) -> f64 {
        self.samples.last().map_or(0.0, |s| s.1 as f64 / MIB)
    }

    pub fn max_mib(&self) -> f64 {
        self.samples.iter().map(|s| s.1).max().unwrap_or(0) as f64 / MIB
    }
}

fn least_squares_slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points
        .iter()
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum();
    let sxx: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// The sampling task.
pub struct Sampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<Series>>,
}

impl Sampler {
    /// Samples every `(name, reader)` every `every`, times relative to
    /// `start`.
    pub fn start(start: Instant, every: Duration, tracked: Vec<(String, Reader)>) -> Sampler {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut series: Vec<Series> = tracked
                .iter()
                .map(|(name, _)| Series {
                    name: name.clone(),
                    samples: Vec::new(),
                })
                .collect();
            let mut ticks = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stopped.changed() => break,
                }
                let t = start.elapsed().as_secs_f64();
                for ((_, read), series) in tracked.iter().zip(&mut series) {
                    series.samples.push((t, read()));
                }
            }
            series
        });
        Sampler { stop, task }
    }

    pub async fn finish(self) -> Vec<Series> {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("RSS sampler (a tracked process died?)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_and_of_a_flat_series() {
        let rising = Series {
            name: "x".into(),
            // 1 MiB every 30 s = 2 MiB/min.
            samples: (0..10)
                .map(|i| (i as f64 * 30.0, (10 + i) as u64 * 1024 * 1024))
                .collect(),
        };
        assert!((rising.slope(0.0).unwrap() - 2.0).abs() < 1e-9);
        let flat = Series {
            name: "y".into(),
            samples: (0..10).map(|i| (i as f64, 5 << 20)).collect(),
        };
        assert_eq!(flat.slope(0.0), Some(0.0));
        assert_eq!(flat.slope(8.5), None);
    }
}
