//! The burst-aware debounce: when the next round may start.
//!
//! A round starts when no change arrived for the current delay (starting at
//! `debounce_min`), or when the oldest pending change has waited `debounce_max`, so a
//! constant storm of writes never starves the remote. Changes are counted in one-second
//! buckets: a bucket with more than `burst_threshold` changed files doubles the delay
//! (up to `debounce_max`); once no bursting bucket was seen for as long as the current
//! delay, it returns to `debounce_min`.

use std::time::Duration;

use tokio::time::Instant;

const BUCKET: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Debouncer {
    min: Duration,
    max: Duration,
    threshold: u64,
    delay: Duration,
    /// When the oldest change not yet taken by a round arrived.
    first_pending: Option<Instant>,
    last_change: Option<Instant>,
    bucket_start: Instant,
    bucket_files: u64,
    bucket_doubled: bool,
    last_burst: Option<Instant>,
}

impl Debouncer {
    pub fn new(min: Duration, max: Duration, threshold: u64, now: Instant) -> Self {
        Self {
            min,
            max,
            threshold,
            delay: min,
            first_pending: None,
            last_change: None,
            bucket_start: now,
            bucket_files: 0,
            bucket_doubled: false,
            last_burst: None,
        }
    }

    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.bucket_start) >= BUCKET {
            self.bucket_start = now;
            self.bucket_files = 0;
            self.bucket_doubled = false;
        }
        if let Some(at) = self.last_burst
            && now.duration_since(at) >= self.delay.max(BUCKET)
        {
            self.delay = self.min;
            self.last_burst = None;
        }
    }

    /// A change arrived: `files` newly changed files (0 when only already-pending files
    /// changed again, which still postpones the quiet period).
    pub fn record(&mut self, now: Instant, files: u64) {
        self.roll(now);
        self.bucket_files += files;
        if self.bucket_files > self.threshold && !self.bucket_doubled {
            self.delay = (self.delay * 2).min(self.max);
            self.bucket_doubled = true;
            self.last_burst = Some(now);
        }
        self.first_pending.get_or_insert(now);
        self.last_change = Some(now);
    }

    /// When the pending changes are due for a round, if any are pending.
    pub fn deadline(&self) -> Option<Instant> {
        let first = self.first_pending?;
        let quiet = self.last_change.unwrap_or(first) + self.delay;
        Some(quiet.min(first + self.max))
    }

    pub fn is_due(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| d <= now)
    }

    /// A round took every pending change; returns when the oldest of them arrived, for
    /// [`Debouncer::not_taken`] (None when none was pending).
    pub fn taken(&mut self) -> Option<Instant> {
        self.last_change = None;
        self.first_pending.take()
    }

    /// The round that took the changes pending since `first` failed: they are pending
    /// again, and the lag keeps counting from the oldest.
    pub fn not_taken(&mut self, first: Instant) {
        self.first_pending = Some(self.first_pending.map_or(first, |p| p.min(first)));
        self.last_change.get_or_insert(first);
    }

    /// The current delay (for status and metrics), after calm-down.
    pub fn delay(&mut self, now: Instant) -> Duration {
        self.roll(now);
        self.delay
    }

    pub fn burst(&self) -> bool {
        self.last_burst.is_some()
    }

    /// When the oldest change not taken by a round arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.first_pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(30);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_period_starts_a_round() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(MIN, MAX, 10, t0);
        assert_eq!(d.deadline(), None);
        d.record(t0, 1);
        assert_eq!(d.deadline(), Some(t0 + MIN));
        tokio::time::advance(ms(1500)).await;
        d.record(Instant::now(), 1);
        assert_eq!(
            d.deadline(),
            Some(t0 + ms(1500) + MIN),
            "a change postpones"
        );
        tokio::time::advance(ms(1999)).await;
        assert!(!d.is_due(Instant::now()));
        tokio::time::advance(ms(1)).await;
        assert!(d.is_due(Instant::now()));
        d.taken();
        assert_eq!(d.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn burst_doubles_up_to_max_and_calms_down() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(MIN, MAX, 10, t0);
        // 100 files/s for 6 s: the delay doubles each second up to the max.
        for _ in 0..60 {
            for _ in 0..10 {
                d.record(Instant::now(), 1);
            }
            tokio::time::advance(ms(100)).await;
        }
        assert!(d.burst());
        assert_eq!(d.delay(Instant::now()), MAX);
        // Calm for a whole delay: back to the minimum.
        tokio::time::advance(MAX).await;
        assert_eq!(d.delay(Instant::now()), MIN);
        assert!(!d.burst());
    }

    #[tokio::test(start_paused = true)]
    async fn constant_storm_cannot_starve() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(MIN, MAX, 10, t0);
        let mut fired = None;
        // A write every 100 ms, forever: the quiet period never comes.
        for i in 0..400 {
            let now = Instant::now();
            if d.is_due(now) {
                fired = Some(i);
                break;
            }
            d.record(now, 1);
            tokio::time::advance(ms(100)).await;
        }
        let fired = fired.expect("a round must be forced");
        assert!(
            Instant::now().duration_since(t0) <= MAX + ms(100),
            "forced at debounce_max, after {fired} ticks"
        );
        assert!(Instant::now().duration_since(t0) >= MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_changes_do_not_count_as_burst() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(MIN, MAX, 10, t0);
        for _ in 0..30 {
            for _ in 0..10 {
                d.record(Instant::now(), 1);
            }
            tokio::time::advance(ms(1000)).await;
        }
        assert!(!d.burst(), "10 files/s is not more than the threshold");
        assert_eq!(d.delay(Instant::now()), MIN);
    }
}
