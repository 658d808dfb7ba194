//! The fleet-wide limit of ECS calls in flight: a Redis semaphore shared by every worker.
//!
//! Permits are members of one sorted set scored by lease expiry (Redis `TIME`), so a crashed
//! worker's permits come back after the permit lease. Waiters never poll: they sleep until a
//! release is published on a pub/sub channel or the earliest lease would expire. A local
//! semaphore of the same size keeps a worker's own waiters from stampeding Redis.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{self, Script};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::store::{wake_on_publish, Store, StoreError, StoreResult};

/// A permit held for one ECS call; give it back with [`Semaphore::release`].
pub struct Permit {
    id: String,
    _local: OwnedSemaphorePermit,
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
            let wait = match self.try_acquire(&id).await {
                Ok(None) => {
                    m::permit_acquired(started.elapsed());
                    return Some(Permit { id, _local: local });
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
    pub async fn refresh(&self, permit: &Permit) -> StoreResult<bool> {
        let mut conn = self.inner.store.conn().await?;
        let ok: i64 = self
            .inner
            .refresh
            .key(&self.inner.key)
            .arg(&permit.id)
            .arg(self.inner.lease_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(ok == 1)
    }

    /// Gives the permit back at once. On a Redis error the lease expires it instead.
    pub async fn release(&self, permit: Permit) {
        let result: StoreResult<i64> = async {
            let mut conn = self.inner.store.conn().await?;
            Ok(self
                .inner
                .release
                .key(&self.inner.key)
                .arg(&permit.id)
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
