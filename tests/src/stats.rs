//! Bounds for tests of random choices (traffic splits, fault percentages):
//! a count is checked against its binomial standard deviation, so a bound
//! says how unlikely a false failure is instead of being a guessed margin.
//!
//! At 5 sigmas a correct mesh fails about once in 1.7 million runs; what
//! such a bound still catches depends on the sample: 3000 draws at 10 %
//! (sigma 0.55 points) catch a split off by 4 points in ~98 % of runs,
//! 800 at 50 % (sigma 1.8 points) one off by 10.

/// Whether `count` of `n` is within `sigmas` binomial standard deviations
/// of `n · p`.
pub fn within_sigmas(count: usize, n: usize, p: f64, sigmas: f64) -> bool {
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - n as f64 * p).abs() <= sigmas * sigma
}

#[cfg(test)]
mod tests {
    use super::within_sigmas;

    #[test]
    fn five_sigmas_of_3000_at_10_percent_is_about_2_7_points() {
        // sigma = sqrt(3000 · 0.1 · 0.9) = 16.4; 5 sigmas = 82.
        assert!(within_sigmas(300, 3000, 0.1, 5.0));
        assert!(within_sigmas(381, 3000, 0.1, 5.0));
        assert!(within_sigmas(219, 3000, 0.1, 5.0));
        assert!(!within_sigmas(383, 3000, 0.1, 5.0));
        assert!(!within_sigmas(217, 3000, 0.1, 5.0));
        // A 20 % split is far outside.
        assert!(!within_sigmas(600, 3000, 0.1, 5.0));
    }
}
