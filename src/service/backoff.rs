//! Capped exponential backoff with jitter, for reconnecting to the database (the relay loop and
//! the background tasks) and for pausing after a batch the broker could not take.

use std::time::Duration;

/// The wait before the next retry; doubles on each failure up to a cap, resets on success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial`, never waits longer than `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max, next: initial }
    }

    /// The wait for this failure; the following one will be twice as long (capped). Jitter of
    /// up to a quarter keeps several relays from retrying in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = base.mul_f64(0.25 * jitter_fraction());
        (base - base.mul_f64(0.125) + jitter).min(self.max)
    }

    /// Call after a success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A fraction in [0, 1) that varies from call to call; good enough for jitter.
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let n = RandomState::new().hash_one(std::time::Instant::now());
    (n % 10_000) as f64 / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset_after_success() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(87) && first <= Duration::from_millis(113), "{first:?}");
        let second = b.next_delay();
        assert!(second >= Duration::from_millis(175), "{second:?}");
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_millis(400));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(113));
    }
}
