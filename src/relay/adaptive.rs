//! Adaptive concurrency: one effective limit of ECS calls in flight for the whole fleet, kept
//! in Redis beside the semaphore (`limit_update.lua`), which admits by it.
//!
//! AIMD inside [`RELAY_CONCURRENCY_MIN`, `RELAY_CONCURRENCY_LIMIT`]: halved (at most once per
//! window) when ECS throttles, +1 per window of healthy calls back up to the ceiling. Each
//! task still backs off on its own (rule 9): backoff spreads one task's retries, the limit
//! keeps the fleet from overloading ECS while every task retries.
//!
//! Workers count their calls' outcomes locally and report them every quarter window, a
//! throttle at once, so the limit costs one Redis round trip per worker and quarter window,
//! not one per call. A report whose answer is lost is not sent again (at most once: a
//! throttle counted twice would halve the limit twice).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::relay::config::WorkerConfig;
use crate::relay::events::RedisFailed;
use crate::relay::metrics::{self as m, Op};
use crate::relay::store::{Lane, Store, StoreResult};

/// Error codes ECS (and AWS in general) answers when it sheds load; HTTP 429 maps to
/// `TooManyRequests` (see `ecs::classify`).
const THROTTLE_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "TooManyRequests",
    "SlowDown",
];

/// Whether an ECS error code means "slow down".
pub fn is_throttle(code: &str) -> bool {
    THROTTLE_CODES.contains(&code)
}

#[derive(Clone)]
pub struct Adaptive {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    key: String,
    enabled: bool,
    ceiling: u32,
    minimum: u32,
    window: Duration,
    /// Outcomes not reported yet.
    throttled: AtomicU64,
    healthy: AtomicU64,
    /// The effective limit as last read.
    known: AtomicU32,
    /// Bumped by each throttle this worker sees and each decrease it learns of: a permit taken
    /// before is not handed to another call but goes back to Redis, which admits by the
    /// (lower) fleet limit. Otherwise hand-offs would keep the old count in flight.
    epoch: AtomicU64,
    report_now: Notify,
    /// Woken whenever the effective limit as read changes.
    changed: Notify,
    update: Script,
    log: Mutex<ThrottleLog>,
}

/// How often, at most, a worker logs that ECS throttles.
const THROTTLE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Throttled calls are logged as a count, the first at once and then at most once per
/// [`THROTTLE_LOG_EVERY`]: during a mass event thousands of tasks are throttled together, and a
/// line per task would bury everything else in the log.
#[derive(Default)]
struct ThrottleLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl ThrottleLog {
    /// Counts a throttle; Some(throttles since the last line) when a line is due.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        match self.last {
            Some(last) if now.duration_since(last) < THROTTLE_LOG_EVERY => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

impl Adaptive {
    /// As configured: `RELAY_ADAPTIVE`, `RELAY_CONCURRENCY_MIN` … `RELAY_CONCURRENCY_LIMIT`.
    pub fn new(store: Store, cfg: &WorkerConfig) -> Adaptive {
        Self::build(
            store,
            cfg.adaptive,
            cfg.concurrency_limit,
            cfg.concurrency_min,
            Duration::from_millis(cfg.adaptive_window_ms),
        )
    }

    /// A fixed limit (adaptive off).
    pub fn fixed(store: Store, limit: u32) -> Adaptive {
        Self::build(store, false, limit, limit, Duration::from_secs(1))
    }

    fn build(store: Store, enabled: bool, ceiling: u32, minimum: u32, window: Duration) -> Self {
        let key = limit_key(&store);
        Adaptive {
            inner: Arc::new(Inner {
                store,
                key,
                enabled,
                ceiling,
                minimum: minimum.min(ceiling),
                window,
                throttled: AtomicU64::new(0),
                healthy: AtomicU64::new(0),
                known: AtomicU32::new(ceiling),
                epoch: AtomicU64::new(0),
                report_now: Notify::new(),
                changed: Notify::new(),
                update: Script::new(include_str!("limit_update.lua")),
                log: Mutex::default(),
            }),
        }
    }

    /// The hash the semaphore reads the effective limit from; None when adaptive is off.
    pub fn key(&self) -> Option<&str> {
        self.inner.enabled.then_some(self.inner.key.as_str())
    }

    pub fn ceiling(&self) -> u32 {
        self.inner.ceiling
    }

    /// The fleet's effective limit as last read: how many permits one worker may hold at most.
    pub fn limit(&self) -> u32 {
        self.inner.known.load(Ordering::SeqCst)
    }

    /// Woken whenever [`Self::limit`] changes.
    pub fn changed(&self) -> &Notify {
        &self.inner.changed
    }

    /// See [`Inner::epoch`].
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::SeqCst)
    }

    /// Counts one ECS call's outcome; a throttle is reported at once.
    pub fn record(&self, error_code: Option<&str>) {
        let throttled = error_code.is_some_and(is_throttle);
        if throttled {
            m::ecs_throttled();
            let due = self
                .inner
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .note(Instant::now());
            if let Some(n) = due {
                tracing::warn!(
                    throttled = n,
                    adaptive = self.inner.enabled,
                    "ECS throttles calls; the tasks back off (logged at most every 10 s)"
                );
            }
        }
        if !self.inner.enabled {
            return;
        }
        if throttled {
            self.inner.epoch.fetch_add(1, Ordering::SeqCst);
            self.inner.throttled.fetch_add(1, Ordering::SeqCst);
            self.inner.report_now.notify_one();
        } else if error_code.is_none() {
            self.inner.healthy.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Until `cancel`: reports outcomes and publishes the effective limit as a metric.
    pub async fn run(self, cancel: CancellationToken) {
        m::concurrency_limit(self.inner.known.load(Ordering::SeqCst));
        if !self.inner.enabled {
            return;
        }
        let every = (self.inner.window / 4).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.inner.report_now.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
            self.report().await;
        }
    }

    async fn report(&self) {
        let inner = &self.inner;
        let throttled = inner.throttled.swap(0, Ordering::SeqCst);
        let healthy = inner.healthy.swap(0, Ordering::SeqCst);
        let mut inv = inner.update.prepare_invoke();
        inv.key(&inner.key)
            .arg(inner.ceiling)
            .arg(inner.minimum)
            .arg(inner.window.as_millis() as u64)
            .arg(throttled)
            .arg(healthy);
        match inner
            .store
            .link()
            .run_durable::<u32>(Lane::Permits, &inv)
            .await
        {
            Ok(limit) => {
                let before = inner.known.swap(limit, Ordering::SeqCst);
                if limit != before {
                    inner.changed.notify_waiters();
                }
                if limit < before {
                    inner.epoch.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(
                        limit,
                        before,
                        "ECS throttles: fleet concurrency limit lowered"
                    );
                } else if limit > before && limit == inner.ceiling {
                    tracing::info!(limit, "fleet concurrency limit back at its ceiling");
                }
                m::concurrency_limit(limit);
            }
            Err(e) => {
                // Not reported again: the script may have run (answer lost, or written but not
                // confirmed by replicas), and a throttle counted twice would halve the limit
                // twice. A lost throttle costs nothing: an overload throttles the next call too.
                RedisFailed {
                    op: Op::AdaptiveLimit,
                    what: "cannot report ECS call outcomes for the adaptive limit",
                    error: &e,
                }
                .emit();
            }
        }
    }
}

fn limit_key(store: &Store) -> String {
    store.global_key("concurrency")
}

/// The fleet's effective limit as Redis holds it (None: not lowered, or adaptive is off),
/// for `status` and tests.
pub async fn effective_limit(store: &Store) -> StoreResult<Option<u32>> {
    let mut conn = store.conn().await?;
    Ok(redis::cmd("HGET")
        .arg(limit_key(store))
        .arg("limit")
        .query_async(&mut conn)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_are_logged_as_a_count_at_most_every_ten_seconds() {
        let mut log = ThrottleLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(1), "the first at once");
        for i in 1..=500 {
            assert_eq!(log.note(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(log.note(t0 + THROTTLE_LOG_EVERY), Some(501));
        assert_eq!(log.note(t0 + THROTTLE_LOG_EVERY * 3), Some(1));
    }
}
