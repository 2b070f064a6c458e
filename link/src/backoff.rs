//! Backoff with jitter: one policy for every retry loop on both ends (a
//! gateway redialling a link, the gateway's and the service's accept loops
//! after an error), so each waits the same way and is tested once.
//!
//! The pause starts at `min`, doubles after each failure up to `max`, and
//! goes back to `min` on success. Each pause is jittered down by up to
//! `jitter` of itself (0.5: anywhere in [d/2, d]), so many gateways that lost
//! the same service do not redial it in lockstep.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff from `min` to `max`, jittered.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: f64,
    /// The pause before jitter the next failure gets.
    step: Duration,
}

impl Backoff {
    /// A backoff from `min` to `max` (`max` below `min` is taken as `min`)
    /// that takes up to `jitter` (clamped to 0..=1) off each pause at random.
    pub fn new(min: Duration, max: Duration, jitter: f64) -> Self {
        Self {
            min,
            max: max.max(min),
            jitter: jitter.clamp(0.0, 1.0),
            step: min,
        }
    }

    /// The pause after a failure; the next one is twice as long, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.max);
        let off = self.jitter * rand::rng().random_range(0.0..=1.0);
        step.mul_f64(1.0 - off)
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn without_jitter_pauses_double_up_to_max_and_reset_to_min() {
        let mut b = Backoff::new(10 * MS, 50 * MS, 0.0);
        let pauses: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(pauses, [10 * MS, 20 * MS, 40 * MS, 50 * MS, 50 * MS]);
        b.reset();
        assert_eq!(b.next_delay(), 10 * MS);
    }

    #[test]
    fn jitter_takes_at_most_its_share_off_each_pause() {
        let mut b = Backoff::new(100 * MS, 100 * MS, 0.5);
        let pauses: Vec<_> = (0..200).map(|_| b.next_delay()).collect();
        assert!(pauses.iter().all(|p| (50 * MS..=100 * MS).contains(p)));
        assert!(
            pauses.iter().any(|p| *p != pauses[0]),
            "pauses are spread, not all {:?}",
            pauses[0]
        );
    }

    #[test]
    fn a_max_below_min_is_min() {
        let mut b = Backoff::new(30 * MS, 10 * MS, 0.0);
        assert_eq!(b.next_delay(), 30 * MS);
        assert_eq!(b.next_delay(), 30 * MS);
    }
}
