//! The fleet-wide limit of ECS calls in flight: a Redis semaphore shared by every worker.
//!
//! Permits are members of one sorted set scored by lease expiry (Redis `TIME`), so a crashed
//! worker's permits come back after the permit lease. Waiters never poll: they sleep until a
//! release is published on a pub/sub channel or the earliest lease would expire. A local
//! semaphore of the same size keeps a worker's own waiters from stampeding Redis.
//!
//! Hand-off: a call that ends while another call of this worker waits passes its permit on
//! directly (same id, lease still fresh) instead of releasing it and racing for it in Redis,
//! which saves two round trips and a pub/sub hop per call. A permit is handed on only during
//! [`HANDOFF_FOR`] after it was taken from Redis; then it goes back, so other workers get
//! their turn.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{self, Script};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::store::{wake_on_publish, Store, StoreError, StoreResult};

/// How long a permit taken from Redis may be handed from call to call within one worker.
const HANDOFF_FOR: Duration = Duration::from_secs(1);

/// A permit held for one ECS call; give it back with [`Semaphore::release`].
pub struct Permit {
    lease: Lease,
    _local: OwnedSemaphorePermit,
}

/// The Redis side of a permit: its id, when it was taken from Redis, and when its lease was
/// last extended (taken at the moment the request left, so the estimate errs early).
struct Lease {
    id: String,
    taken: Instant,
    refreshed: Instant,
}

#[derive(Clone)]
pub struct Semaphore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    key: String,
    channel: String,
    limit: u32,
    lease_ms: u64,
    worker: String,
    next: AtomicU64,
    local: Arc<tokio::sync::Semaphore>,
    released: Arc<Notify>,
    /// Callers inside `acquire` not yet holding a permit.
    waiting: AtomicUsize,
    /// Permits handed off by ended calls, for the next local waiter.
    spare: Mutex<Vec<Lease>>,
    acquire: Script,
    refresh: Script,
    release: Script,
}

impl Semaphore {
    pub fn new(store: Store, worker: &str, limit: u32, lease_ms: u64) -> Semaphore {
        let key = store.global_key("permits");
        let channel = store.global_key("permits-released");
        Semaphore {
            inner: Arc::new(Inner {
                store,
                key,
                channel,
                limit,
                lease_ms,
                worker: worker.to_string(),
                next: AtomicU64::new(0),
                local: Arc::new(tokio::sync::Semaphore::new(limit as usize)),
                released: Arc::new(Notify::new()),
                waiting: AtomicUsize::new(0),
                spare: Mutex::new(Vec::new()),
                acquire: Script::new(include_str!("lua/permit_acquire.lua")),
                refresh: Script::new(include_str!("lua/permit_refresh.lua")),
                release: Script::new(include_str!("lua/permit_release.lua")),
            }),
        }
    }

    /// Listens for releases from every worker until `cancel`; reconnects on its own.
    pub async fn run_listener(self, cancel: CancellationToken) {
        let channel = self.inner.channel.clone();
        let client = self.inner.store.client();
        wake_on_publish(client, channel, self.inner.released.clone(), cancel).await;
    }

    /// Waits for a permit; None when cancelled first.
    pub async fn acquire(&self, cancel: &CancellationToken) -> Option<Permit> {
        let started = Instant::now();
        self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let lease = self.wait_for_lease(cancel).await;
        self.inner.waiting.fetch_sub(1, Ordering::SeqCst);
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
        let id = format!(
            "{}:{}",
            self.inner.worker,
            self.inner.next.fetch_add(1, Ordering::Relaxed)
        );
        loop {
            // Register for the release signal before trying, so a release in between is not missed.
            let released = self.inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(lease) = self.take_spare().await {
                return Some((lease, local));
            }
            let asked = Instant::now();
            let wait = match self.try_acquire(&id).await {
                Ok(None) => {
                    let lease = Lease {
                        id,
                        taken: asked,
                        refreshed: asked,
                    };
                    return Some((lease, local));
                }
                Ok(Some(wait_ms)) => Duration::from_millis(wait_ms.min(self.inner.lease_ms)),
                Err(e) => {
                    tracing::warn!(error = %e, "permit acquire failed; retrying");
                    m::redis_error("permit_acquire");
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

    /// A permit handed off by an ended call whose lease is surely still valid for a while;
    /// stale ones go back to Redis.
    async fn take_spare(&self) -> Option<Lease> {
        loop {
            let lease = self
                .inner
                .spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if lease.refreshed.elapsed() < self.lease() / 3 {
                return Some(lease);
            }
            self.release_lease(&lease).await;
        }
    }
    async fn try_acquire(&self, id: &str) -> StoreResult<Option<u64>> {
        let mut conn = self.inner.store.conn().await?;
        let (granted, wait): (i64, i64) = self
            .inner
            .acquire
            .key(&self.inner.key)
            .arg(id)
            .arg(self.inner.limit)
            .arg(self.inner.lease_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        Ok((granted != 1).then_some(wait.max(1) as u64))
    }

    /// Extends the permit's lease; false when it had already expired (the call outlived it).
    pub async fn refresh(&self, permit: &mut Permit) -> StoreResult<bool> {
        let asked = Instant::now();
        let mut conn = self.inner.store.conn().await?;
        let ok: i64 = self
            .inner
            .refresh
            .key(&self.inner.key)
            .arg(&permit.lease.id)
            .arg(self.inner.lease_ms)
            .invoke_async(&mut conn)
            .await?;
        if ok == 1 {
            permit.lease.refreshed = asked;
        }
        Ok(ok == 1)
    }

    /// Hands the permit to a waiting call of this worker, or gives it back to Redis at once.
    pub async fn release(&self, permit: Permit) {
        let Permit { lease, _local } = permit;
        let fresh = lease.refreshed.elapsed() < self.lease() / 3;
        if fresh
            && lease.taken.elapsed() < HANDOFF_FOR
            && self.inner.waiting.load(Ordering::SeqCst) > 0
        {
            self.inner
                .spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(lease);
            // Wake waiters past the local semaphore; dropping `_local` wakes one before it.
            self.inner.released.notify_waiters();
            return;
        }
        drop(_local);
        self.release_lease(&lease).await;
    }

    /// Gives a permit back to Redis. On a Redis error the lease expires it instead.
    async fn release_lease(&self, lease: &Lease) {
        let result: StoreResult<i64> = async {
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
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "permit release failed; it expires with its lease");
            m::redis_error("permit_release");
        }
    }

    /// Gives every handed-off permit nobody took back to Redis (on shutdown).
    pub async fn release_spares(&self) {
        let spares =
            std::mem::take(&mut *self.inner.spare.lock().unwrap_or_else(|e| e.into_inner()));
        for lease in &spares {
            self.release_lease(lease).await;
        }
    }

    /// Permits in use fleet-wide (expired ones not counted).
    pub async fn in_use(&self) -> StoreResult<u64> {
        let mut conn = self.inner.store.conn().await?;
        let t: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_ms = t.0 * 1000 + t.1 / 1000;
        Ok(redis::cmd("ZCOUNT")
            .arg(&self.inner.key)
            .arg(format!("({now_ms}"))
            .arg("+inf")
            .query_async(&mut conn)
            .await?)
    }

    pub fn limit(&self) -> u32 {
        self.inner.limit
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.inner.lease_ms)
    }
}
