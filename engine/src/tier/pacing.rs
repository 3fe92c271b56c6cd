//! Prefetch pacing: a token bucket over storage bytes, and a cap on prefetch bytes in flight.
//!
//! The rule: a prefetch of `cost` bytes may start when the prefetch bytes in flight plus `cost`
//! fit the burst, or when no prefetch is in flight at all, so a burst smaller than one expert
//! still lets prefetches through one at a time. With a rate, the bucket (which refills at `rate`
//! bytes per second up to the burst) must also hold `min(cost, burst)` tokens; starting takes
//! `cost` tokens, and the balance may go below zero, to be repaid by the refill before the next
//! start. Demand reads never consult the pacer.

use std::time::Instant;

/// The prefetch token bucket.
#[derive(Debug)]
pub(super) struct PrefetchPacer {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: Instant,
    in_flight: u64,
}

impl PrefetchPacer {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: Instant) -> PrefetchPacer {
        PrefetchPacer {
            rate,
            burst,
            tokens: burst as f64,
            last: now,
            in_flight: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst as f64);
    }

    /// Whether a prefetch of `cost` storage bytes may start at `now`.
    pub fn may_start(&mut self, cost: u64, now: Instant) -> bool {
        if self.in_flight > 0 && self.in_flight.saturating_add(cost) > self.burst {
            return false;
        }
        if self.rate > 0 {
            self.refill(now);
            if self.tokens < cost.min(self.burst) as f64 {
                return false;
            }
        }
        true
    }

    /// A prefetch of `cost` bytes started.
    pub fn start(&mut self, cost: u64) {
        self.in_flight = self.in_flight.saturating_add(cost);
        if self.rate > 0 {
            self.tokens -= cost as f64;
        }
    }

    /// A prefetch of `cost` bytes finished (or failed).
    pub fn finish(&mut self, cost: u64) {
        self.in_flight = self.in_flight.saturating_sub(cost);
    }

    /// Prefetch bytes in flight.
    #[cfg(test)]
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn in_flight_cap_lets_one_oversized_prefetch_through_at_a_time() {
        let t = Instant::now();
        let mut p = PrefetchPacer::new(0, 1000, t);
        assert!(p.may_start(5000, t));
        p.start(5000);
        assert!(!p.may_start(1, t));
        p.finish(5000);
        assert!(p.may_start(400, t));
        p.start(400);
        assert!(p.may_start(600, t));
        p.start(600);
        assert!(!p.may_start(1, t));
    }

    #[test]
    fn rate_refills_the_bucket_over_time() {
        let t = Instant::now();
        let mut p = PrefetchPacer::new(1000, 4000, t);
        assert!(p.may_start(3000, t));
        p.start(3000);
        p.finish(3000);
        // 1000 tokens left: a 3000-byte prefetch waits for 2 seconds of refill.
        assert!(!p.may_start(3000, t));
        assert!(!p.may_start(3000, t + Duration::from_millis(1500)));
        assert!(p.may_start(3000, t + Duration::from_secs(2)));
        p.start(3000);
        p.finish(3000);
        // Larger than the burst: it needs a full bucket, then takes the balance negative.
        let t2 = t + Duration::from_secs(100);
        assert!(p.may_start(10_000, t2));
        p.start(10_000);
        p.finish(10_000);
        assert!(!p.may_start(1, t2 + Duration::from_secs(5)));
        assert!(p.may_start(1, t2 + Duration::from_secs(7)));
    }
}
