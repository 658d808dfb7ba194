//! The fleet-wide limit of ECS calls in flight: a Redis semaphore shared by every worker.
//!
//! Permits are members of one sorted set scored by lease expiry (Redis `TIME`), so a crashed
//! or frozen worker's permits come back after the permit lease. The lease covers a whole call
//! (call timeout + margin, checked when the request goes out), so it is never refreshed: a
//! holder cut off from Redis cannot keep a permit alive, and nothing extends a call's hold.
//! Waiters never poll fast: they sleep until a release is published on a pub/sub channel, at
//! most [`FALLBACK_WAIT`]. A local semaphore of the same size keeps a worker's own waiters from
//! stampeding Redis.
//!
//! Hand-off: a call that ends while another call of this worker waits passes its permit on
//! directly (same id) instead of releasing it and racing for it in Redis, which saves two
//! round trips and a pub/sub hop per call. A permit is handed on only during [`HANDOFF_FOR`]
//! after it was taken from Redis, and only while its lease still covers a whole call; then it
//! goes back, so other workers get their turn.
//!
//! The limit admitted by is the fleet's effective limit (`adaptive`): the configured ceiling,
//! lowered while ECS throttles.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{self, Script};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::relay::adaptive::Adaptive;
use crate::relay::config::CALL_MARGIN;
use crate::relay::events::RedisFailed;
use crate::relay::metrics::{self as m, Op};
use crate::relay::store::{wake_on_publish, Lane, Store, StoreError, StoreResult};

/// How often releases that failed are tried again.
const RELEASE_RETRY_EVERY: Duration = Duration::from_millis(200);

/// How long a permit taken from Redis may be handed from call to call within one worker.
const HANDOFF_FOR: Duration = Duration::from_secs(1);

/// The longest a waiter sleeps before asking Redis again: covers a release whose pub/sub
/// message was lost (the subscription was reconnecting).
const FALLBACK_WAIT: Duration = Duration::from_secs(1);

/// A permit held for one ECS call; give it back with [`Semaphore::release`].
pub struct Permit {
    lease: Lease,
    _local: OwnedSemaphorePermit,
}

impl Permit {
    /// Until when (local monotonic clock) the permit's Redis lease surely lasts.
    pub fn valid_until(&self) -> Instant {
        self.lease.valid_until
    }
}

/// The Redis side of a permit: its id, when it was taken from Redis, and until when its lease
/// surely lasts (counted from the moment the request left, so the estimate errs early).
struct Lease {
    id: String,
    taken: Instant,
    valid_until: Instant,
    /// The adaptive epoch when it was taken (see `Adaptive::epoch`).
    epoch: u64,
}

#[derive(Clone)]
pub struct Semaphore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    key: String,
    channel: String,
    adaptive: Adaptive,
    lease_ms: u64,
    /// What a permit's lease must still cover to be handed to another call.
    handoff_min: Duration,
    /// Prefix of this process's permit ids: the worker id and a random nonce. A restarted
    /// container keeps its pod name (and PID 1), so the worker id alone would re-use the ids
    /// of its dead incarnation's permits that are still valid, and a grant would overwrite
    /// one of them instead of counting beside it.
    id_prefix: String,
    next: AtomicU64,
    local: Arc<tokio::sync::Semaphore>,
    released: Arc<Notify>,
    /// Callers inside `acquire` not yet holding a permit.
    waiting: AtomicUsize,
    /// Permits handed off by ended calls, for the next local waiter.
    spare: Mutex<Vec<Lease>>,
    /// Releases that did not reach Redis, retried until they do or the lease has expired
    /// anyway: after a Redis blip the fleet must not wait out whole permit leases.
    unreleased: Mutex<Vec<Lease>>,
    acquire: Script,
    release: Script,
}

impl Semaphore {
    /// A fixed limit.
    pub fn new(
        store: Store,
        worker: &str,
        limit: u32,
        lease_ms: u64,
        call_timeout: Duration,
    ) -> Semaphore {
        let adaptive = Adaptive::fixed(store.clone(), limit);
        Self::with_limit(store, worker, adaptive, lease_ms, call_timeout)
    }

    /// Admits by `adaptive`'s effective limit; its ceiling sizes the local semaphore.
    pub fn with_limit(
        store: Store,
        worker: &str,
        adaptive: Adaptive,
        lease_ms: u64,
        call_timeout: Duration,
    ) -> Semaphore {
        let limit = adaptive.ceiling();
        let key = store.global_key("permits");
        let channel = store.global_key("permits-released");
        Semaphore {
            inner: Arc::new(Inner {
                store,
                key,
                channel,
                adaptive,
                lease_ms,
                handoff_min: call_timeout + CALL_MARGIN,
                id_prefix: format!("{worker}:{:016x}", rand::random::<u64>()),
                next: AtomicU64::new(0),
                local: Arc::new(tokio::sync::Semaphore::new(limit as usize)),
                released: Arc::new(Notify::new()),
                waiting: AtomicUsize::new(0),
                spare: Mutex::new(Vec::new()),
                unreleased: Mutex::new(Vec::new()),
                acquire: Script::new(include_str!("permit_acquire.lua")),
                release: Script::new(include_str!("permit_release.lua")),
            }),
        }
    }

    /// Until `cancel`: listens for releases from every worker (reconnecting on its own),
    /// retries releases that failed, and reports call outcomes for the adaptive limit.
    pub async fn run_background(self, cancel: CancellationToken) {
        let channel = self.inner.channel.clone();
        let store = self.inner.store.clone();
        let listen = wake_on_publish(store, channel, self.inner.released.clone(), cancel.clone());
        let adaptive = self.inner.adaptive.clone().run(cancel.clone());
        tokio::join!(listen, self.retry_releases(cancel), adaptive);
    }

    /// Counts an ECS call's outcome (None = ok) for the adaptive limit.
    pub fn record(&self, error_code: Option<&str>) {
        self.inner.adaptive.record(error_code);
    }

    async fn retry_releases(&self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RELEASE_RETRY_EVERY) => {}
            }
            let now = Instant::now();
            let due: Vec<Lease> = std::mem::take(&mut *self.unreleased())
                .into_iter()
                .filter(|l| l.valid_until > now)
                .collect();
            for lease in due {
                if self.try_release(&lease).await.is_err() {
                    self.unreleased().push(lease);
                } else {
                    tracing::info!(permit = %lease.id, "permit released after Redis came back");
                }
            }
        }
    }

    fn unreleased(&self) -> std::sync::MutexGuard<'_, Vec<Lease>> {
        self.inner
            .unreleased
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a permit; None when cancelled first.
    pub async fn acquire(&self, cancel: &CancellationToken) -> Option<Permit> {
        let started = Instant::now();
        self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let lease = self.wait_for_lease(cancel).await;
        // Spares parked for waiters while this one took a Redis permit (or gave up) must not
        // hold fleet slots when nobody is left to take them.
        if self.inner.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.release_spares().await;
        }
        let (lease, local) = lease?;
        m::permit_acquired(started.elapsed());
        Some(Permit {
            lease,
            _local: local,
        })
    }

    async fn wait_for_lease(
        &self,
        cancel: &CancellationToken,
    ) -> Option<(Lease, OwnedSemaphorePermit)> {
        let local = tokio::select! {
            p = self.inner.local.clone().acquire_owned() => p.ok()?,
            _ = cancel.cancelled() => return None,
        };
        loop {
            // A fresh id for every try: a try whose answer was lost may still have been granted,
            // and is given back by id in the background; that must never hit a later grant.
            let id = format!(
                "{}:{}",
                self.inner.id_prefix,
                self.inner.next.fetch_add(1, Ordering::Relaxed)
            );
            // Register for the release signal before trying, so a release in between is not missed.
            let released = self.inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(lease) = self.take_spare().await {
                return Some((lease, local));
            }
            let asked = Instant::now();
            let epoch = self.inner.adaptive.epoch();
            let wait = match self.try_acquire(&id).await {
                Ok(None) => {
                    let lease = self.new_lease(id, asked, epoch);
                    return Some((lease, local));
                }
                Ok(Some(wait_ms)) => Duration::from_millis(wait_ms).min(FALLBACK_WAIT),
                Err(e) => {
                    RedisFailed {
                        op: Op::PermitAcquire,
                        what: "permit acquire failed; retrying",
                        error: &e,
                    }
                    .emit();
                    // The script may have run with its answer lost: give that id back.
                    if !matches!(e, StoreError::NotReplicated { .. }) {
                        let lease = self.new_lease(id, asked, epoch);
                        self.unreleased().push(lease);
                    }
                    Duration::from_millis(200)
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = released => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn new_lease(&self, id: String, asked: Instant, epoch: u64) -> Lease {
        Lease {
            id,
            taken: asked,
            valid_until: asked + self.lease(),
            epoch,
        }
    }

    /// Whether a permit's lease still covers a whole call with its margin.
    fn covers_a_call(&self, lease: &Lease) -> bool {
        Instant::now() + self.inner.handoff_min < lease.valid_until
    }

    /// A permit handed off by an ended call whose lease still covers a whole call; stale ones
    /// go back to Redis.
    async fn take_spare(&self) -> Option<Lease> {
        loop {
            let lease = self
                .inner
                .spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if self.covers_a_call(&lease) && lease.epoch == self.inner.adaptive.epoch() {
                return Some(lease);
            }
            self.release_lease(lease).await;
        }
    }

    async fn try_acquire(&self, id: &str) -> StoreResult<Option<u64>> {
        let adaptive = &self.inner.adaptive;
        let mut inv = self.inner.acquire.prepare_invoke();
        inv.key(&self.inner.key)
            .key(adaptive.key().unwrap_or(&self.inner.key))
            .arg(id)
            .arg(adaptive.ceiling())
            .arg(self.inner.lease_ms)
            .arg(if adaptive.key().is_some() { "1" } else { "0" });
        // Confirmed by the replicas: a promoted replica must count every permit handed out.
        let (granted, wait): (i64, i64) = match self
            .inner
            .store
            .link()
            .run_durable(Lane::Permits, &inv)
            .await
        {
            Ok(answer) => answer,
            Err(e @ StoreError::NotReplicated { .. }) => {
                // Taken on the primary only: give the slot back rather than hold it unused.
                let lease = self.new_lease(id.to_string(), Instant::now(), 0);
                self.release_lease(lease).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        Ok((granted != 1).then_some(wait.max(1) as u64))
    }

    /// Hands the permit to a waiting call of this worker, or gives it back to Redis at once.
    pub async fn release(&self, permit: Permit) {
        let Permit { lease, _local } = permit;
        // Not after a throttle or a lowered fleet limit: Redis admits by the lower limit, a
        // hand-off would keep the old count in flight.
        if lease.taken.elapsed() < HANDOFF_FOR
            && lease.epoch == self.inner.adaptive.epoch()
            && self.covers_a_call(&lease)
            && self.inner.waiting.load(Ordering::SeqCst) > 0
        {
            self.inner
                .spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(lease);
            // Wake waiters past the local semaphore; dropping `_local` wakes one before it.
            self.inner.released.notify_waiters();
            drop(_local);
            // The last waiter may have left (with a Redis permit, or cancelled) meanwhile.
            if self.inner.waiting.load(Ordering::SeqCst) == 0 {
                self.release_spares().await;
            }
            return;
        }
        drop(_local);
        self.release_lease(lease).await;
    }

    /// Gives a permit back to Redis; on a Redis error it is retried in the background.
    async fn release_lease(&self, lease: Lease) {
        if let Err(e) = self.try_release(&lease).await {
            RedisFailed {
                op: Op::PermitRelease,
                what: "permit release failed; retrying until Redis answers or the lease expires",
                error: &e,
            }
            .emit();
            self.unreleased().push(lease);
        }
    }

    async fn try_release(&self, lease: &Lease) -> StoreResult<i64> {
        let mut conn = self.inner.store.conn().await?;
        Ok(self
            .inner
            .release
            .key(&self.inner.key)
            .arg(&lease.id)
            .arg(&self.inner.channel)
            .invoke_async(&mut conn)
            .await?)
    }

    /// Gives every handed-off permit nobody took back to Redis (no waiter left, or shutdown),
    /// and on shutdown the releases still being retried.
    pub async fn release_spares(&self) {
        let spares =
            std::mem::take(&mut *self.inner.spare.lock().unwrap_or_else(|e| e.into_inner()));
        for lease in spares {
            self.release_lease(lease).await;
        }
    }

    /// On shutdown: one last try for the releases Redis has not taken yet.
    pub async fn flush_releases(&self) {
        let pending = std::mem::take(&mut *self.unreleased());
        for lease in pending {
            let _ = self.try_release(&lease).await;
        }
    }

    /// Permits in use fleet-wide (expired ones not counted).
    pub async fn in_use(&self) -> StoreResult<u64> {
        Ok(self.usage().await?.0)
    }

    /// Permits in use fleet-wide, and how long ago the oldest of them was taken (zero when
    /// none): a permit older than a call timeout belongs to a stuck (frozen, cut-off) holder.
    /// Ages assume every worker runs with this worker's permit lease.
    pub async fn usage(&self) -> StoreResult<(u64, Duration)> {
        let mut conn = self.inner.store.conn().await?;
        let t: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_ms = t.0 * 1000 + t.1 / 1000;
        let live = format!("({now_ms}");
        let (count, first): (u64, Vec<(String, u64)>) = redis::pipe()
            .cmd("ZCOUNT")
            .arg(&self.inner.key)
            .arg(&live)
            .arg("+inf")
            .cmd("ZRANGEBYSCORE")
            .arg(&self.inner.key)
            .arg(&live)
            .arg("+inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(1)
            .query_async(&mut conn)
            .await?;
        let oldest = first.first().map_or(0, |(_, expiry)| {
            now_ms.saturating_sub(expiry.saturating_sub(self.inner.lease_ms))
        });
        Ok((count, Duration::from_millis(oldest)))
    }

    /// The ceiling: the limit when adaptive is off.
    pub fn limit(&self) -> u32 {
        self.inner.adaptive.ceiling()
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.inner.lease_ms)
    }
}

#[cfg(test)]
mod tests {
    use crate::relay::redis_link::refusal;
    use redis::Script;

    #[tokio::test]
    async fn the_permit_scripts_refuse_another_layout() {
        let scripts = [
            (
                "permit_acquire.lua",
                include_str!("permit_acquire.lua"),
                2,
                4,
            ),
            (
                "permit_release.lua",
                include_str!("permit_release.lua"),
                1,
                2,
            ),
            ("limit_update.lua", include_str!("limit_update.lua"), 1, 5),
        ];
        for (name, text, keys, args) in scripts {
            let script = Script::new(text);
            for (k, a) in [(keys, args - 1), (keys, args + 1), (keys - 1, args)] {
                let err = refusal(&script, k, a).await;
                assert!(err.contains(name), "{name} with {k} keys, {a} args: {err}");
            }
        }
    }
}
