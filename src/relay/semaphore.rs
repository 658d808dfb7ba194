//! The fleet-wide limit of ECS calls in flight: a Redis semaphore shared by every worker.
//!
//! Permits are members of one sorted set scored by lease expiry (Redis `TIME`), so a crashed
//! or frozen worker's permits come back after the permit lease. The lease covers a whole call
//! (call timeout + margin, checked when the request goes out), so it is never refreshed: a
//! holder cut off from Redis cannot keep a permit alive, and nothing extends a call's hold.
//!
//! Fair share (rule 12), at two levels:
//! - Between workers, in Redis: a worker that finds no free permit joins a FIFO queue, and a
//!   free permit goes to the queue's first worker. A release wakes that one worker through
//!   pub/sub (not every waiter of the fleet); a waiter asks again at the latest after
//!   [`FALLBACK_WAIT`], in case a message was lost.
//! - Within a worker: calls wait in a [`FairQueue`] by cluster; one pump task takes permits
//!   from Redis while calls wait and the worker holds fewer than the effective limit, and
//!   gives each to the next cluster in turn.
//!
//! Hand-off: a call that ends while another call of this worker waits passes its permit on
//! directly (same id) instead of releasing it and taking it again from Redis, which saves two
//! round trips per call. Only up to this worker's share while other workers wait (each worker
//! that has to wait says so on the channel: with M waiting, a worker keeps at most 1/(M+1) of
//! the limit by hand-off), for [`HANDOFF_FOR`] after the permit was taken from Redis, and while
//! its lease still covers a whole call.
//!
//! The limit admitted by is the fleet's effective limit (`adaptive`): the configured ceiling,
//! lowered while ECS throttles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::{self, Script};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::relay::adaptive::Adaptive;
use crate::relay::config::{CALL_MARGIN, PREPARE_SLACK};
use crate::relay::events::RedisFailed;
use crate::relay::metrics::{self as m, Op};
use crate::relay::schedule::{Backlog, FairQueue};
use crate::relay::store::{listen, Lane, Store, StoreError, StoreResult};

/// How often releases that failed are tried again.
const RELEASE_RETRY_EVERY: Duration = Duration::from_millis(200);

/// How long a permit taken from Redis may be handed from call to call within one worker.
const HANDOFF_FOR: Duration = Duration::from_secs(1);

/// How long another worker counts as waiting (see [`Semaphore::share`]) after it said so. A
/// waiting worker says so on each try, at least every [`FALLBACK_WAIT`].
const CONTENDED_FOR: Duration = Duration::from_millis(1_500);

/// The longest a waiter sleeps before asking Redis again: covers a release whose pub/sub
/// message was lost (the subscription was reconnecting).
const FALLBACK_WAIT: Duration = Duration::from_secs(1);

/// How long a queued worker keeps its place without asking again: a crashed or frozen
/// worker's place is given up after this.
const QUEUE_TTL: Duration = Duration::from_secs(3);

/// A permit held for one ECS call; give it back with [`Semaphore::release`]. One dropped
/// instead (a call abandoned, a grant nobody took) still goes back, in the background.
pub struct Permit {
    /// None once released.
    lease: Option<Lease>,
    owner: Arc<Inner>,
}

impl Permit {
    /// Until when (local monotonic clock) the permit's Redis lease surely lasts.
    pub fn valid_until(&self) -> Instant {
        self.lease
            .as_ref()
            .map_or_else(Instant::now, |l| l.valid_until)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let inner = &self.owner;
            {
                let mut local = inner.local.lock().unwrap_or_else(|e| e.into_inner());
                local.held = local.held.saturating_sub(1);
            }
            inner
                .unreleased
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(lease);
            inner.pump_local.notify_one();
        }
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

/// Calls of this worker waiting for a permit, and the permits it holds.
#[derive(Default)]
struct Local {
    /// Waiting calls by cluster: tickets in the fair queue.
    waiting: FairQueue<u64>,
    /// Where each waiting ticket's permit goes.
    tickets: HashMap<u64, oneshot::Sender<Permit>>,
    next_ticket: u64,
    /// Permits this worker holds (given to calls and not yet released).
    held: u32,
    /// Other workers known to wait in the Redis queue, each until when it counts (it says so
    /// again on each try).
    contenders: HashMap<String, Instant>,
}

struct Inner {
    store: Store,
    key: String,
    queue_key: String,
    alive_key: String,
    channel: String,
    adaptive: Adaptive,
    lease_ms: u64,
    /// What a permit's lease must still cover to be handed to another call.
    handoff_min: Duration,
    /// This worker's name in the Redis queue.
    worker: String,
    /// Prefix of this process's permit ids: the worker id and a random nonce. A restarted
    /// container keeps its pod name (and PID 1), so the worker id alone would re-use the ids
    /// of its dead incarnation's permits that are still valid, and a grant would overwrite
    /// one of them instead of counting beside it.
    id_prefix: String,
    next: AtomicU64,
    local: Mutex<Local>,
    /// Wakes the pump: a call started waiting, or a permit came back.
    pump_local: Notify,
    /// Wakes the pump: Redis says a permit may be free for this worker.
    pump_redis: Notify,
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

    /// Admits by `adaptive`'s effective limit.
    pub fn with_limit(
        store: Store,
        worker: &str,
        adaptive: Adaptive,
        lease_ms: u64,
        call_timeout: Duration,
    ) -> Semaphore {
        let key = store.global_key("permits");
        let queue_key = store.global_key("permit-queue");
        let alive_key = store.global_key("permit-queue-alive");
        let channel = store.global_key("permits-released");
        let id_prefix = format!("{worker}:{:016x}", rand::random::<u64>());
        Semaphore {
            inner: Arc::new(Inner {
                store,
                key,
                queue_key,
                alive_key,
                channel,
                adaptive,
                lease_ms,
                // What the sender asks of a permit before it builds a request: a permit with
                // less would bounce from waiting call to waiting call without a call going out.
                handoff_min: call_timeout + CALL_MARGIN + PREPARE_SLACK,
                worker: id_prefix.clone(),
                id_prefix,
                next: AtomicU64::new(0),
                local: Mutex::default(),
                pump_local: Notify::new(),
                pump_redis: Notify::new(),
                unreleased: Mutex::new(Vec::new()),
                acquire: Script::new(include_str!("permit_acquire.lua")),
                release: Script::new(include_str!("permit_release.lua")),
            }),
        }
    }

    /// Until `cancel`: takes permits for waiting calls, listens for wakes from other workers
    /// (reconnecting on its own), retries releases that failed, and reports call outcomes for
    /// the adaptive limit.
    pub async fn run_background(self, cancel: CancellationToken) {
        let store = self.inner.store.clone();
        let this = self.clone();
        let listen = listen(
            store,
            self.inner.channel.clone(),
            cancel.clone(),
            move |message| this.heard(message),
        );
        let adaptive = self.inner.adaptive.clone().run(cancel.clone());
        tokio::join!(
            listen,
            self.pump(cancel.clone()),
            self.retry_releases(cancel),
            adaptive
        );
    }

    /// A message on the release channel: a wake for this worker (or a lost subscription,
    /// None), or another worker saying that it waits.
    fn heard(&self, message: Option<&str>) {
        let inner = &self.inner;
        match message.and_then(|m| m.split_once(':')) {
            Some(("wake", worker)) if worker != inner.worker => {}
            Some(("queued", worker)) => {
                if worker != inner.worker {
                    let until = Instant::now() + CONTENDED_FOR;
                    self.local().contenders.insert(worker.to_string(), until);
                }
            }
            // A wake for this worker, a lost subscription, or a message of another version.
            _ => inner.pump_redis.notify_one(),
        }
    }

    /// Counts an ECS call's outcome (None = ok) for the adaptive limit.
    pub fn record(&self, error_code: Option<&str>) {
        self.inner.adaptive.record(error_code);
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.inner.local.lock().unwrap_or_else(|e| e.into_inner())
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
                if self.try_release(&lease.id, false).await.is_err() {
                    self.unreleased().push(lease);
                } else {
                    tracing::info!(permit = %lease.id, "permit released after Redis came back");
                }
            }
        }
    }

    fn unreleased(&self) -> MutexGuard<'_, Vec<Lease>> {
        self.inner
            .unreleased
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a permit for a call of `flow` (its cluster), in turn with the other clusters
    /// waiting on this worker; None when cancelled first.
    pub async fn acquire(&self, flow: &str, cancel: &CancellationToken) -> Option<Permit> {
        let started = Instant::now();
        let (tx, mut rx) = oneshot::channel();
        let ticket = {
            let mut local = self.local();
            let ticket = local.next_ticket;
            local.next_ticket += 1;
            local.waiting.push(flow, ticket, started);
            local.tickets.insert(ticket, tx);
            ticket
        };
        self.inner.pump_local.notify_one();
        tokio::select! {
            permit = &mut rx => {
                let permit = permit.ok()?;
                m::permit_acquired(started.elapsed());
                Some(permit)
            }
            _ = cancel.cancelled() => {
                {
                    let mut local = self.local();
                    local.waiting.remove(flow, &ticket);
                    local.tickets.remove(&ticket);
                }
                // Granted just before the cancel: give it back.
                rx.close();
                if let Ok(permit) = rx.try_recv() {
                    self.release(permit).await;
                }
                // The pump may be waiting for Redis on this call's behalf: it leaves the queue
                // when nothing else waits.
                self.inner.pump_local.notify_one();
                self.inner.pump_redis.notify_one();
                None
            }
        }
    }

    /// Gives `lease` to the next waiting call in turn; hands it back when no call waits.
    fn grant(&self, local: &mut Local, mut lease: Lease) -> Option<Lease> {
        while let Some((_, ticket, _)) = local.waiting.pop() {
            let Some(tx) = local.tickets.remove(&ticket) else {
                continue;
            };
            local.held += 1;
            let permit = Permit {
                lease: Some(lease),
                owner: self.inner.clone(),
            };
            match tx.send(permit) {
                Ok(()) => return None,
                Err(mut back) => {
                    // The call gave up in the meantime.
                    local.held -= 1;
                    lease = back.lease.take()?;
                }
            }
        }
        Some(lease)
    }

    /// Takes permits from Redis while calls wait and the worker holds fewer than the effective
    /// limit; each goes to the next cluster in turn. Leaves the Redis queue when it stops
    /// asking, so its place does not hold up the other workers.
    async fn pump(&self, cancel: CancellationToken) {
        let inner = &self.inner;
        let mut queued = false;
        loop {
            let local_event = inner.pump_local.notified();
            tokio::pin!(local_event);
            local_event.as_mut().enable();
            // A higher fleet limit lets this worker hold more: look again.
            let limit_changed = inner.adaptive.changed().notified();
            tokio::pin!(limit_changed);
            limit_changed.as_mut().enable();
            let wants = {
                let local = self.local();
                !local.waiting.is_empty() && local.held < inner.adaptive.limit()
            };
            if cancel.is_cancelled() {
                break;
            }
            if !wants {
                if queued && self.try_release("", true).await.is_ok() {
                    queued = false;
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = &mut local_event => {}
                    _ = &mut limit_changed => {}
                    // Not left yet (Redis did not answer): try again.
                    _ = tokio::time::sleep(FALLBACK_WAIT), if queued => {}
                }
                continue;
            }
            let id = format!(
                "{}:{}",
                inner.id_prefix,
                inner.next.fetch_add(1, Ordering::Relaxed)
            );
            let asked = Instant::now();
            let epoch = inner.adaptive.epoch();
            let wait = match self.try_acquire(&id).await {
                Ok(None) => {
                    queued = false;
                    let lease = self.new_lease(id, asked, epoch);
                    let left = self.grant(&mut self.local(), lease);
                    if let Some(lease) = left {
                        self.release_lease(lease).await;
                    }
                    continue;
                }
                Ok(Some(wait_ms)) => {
                    queued = true;
                    Duration::from_millis(wait_ms).min(FALLBACK_WAIT)
                }
                Err(e) => {
                    RedisFailed {
                        op: Op::PermitAcquire,
                        what: "permit acquire failed; retrying",
                        error: &e,
                    }
                    .emit();
                    // The script may have run with its answer lost: give that id back, and
                    // count this worker as queued, so that it leaves the queue when it stops
                    // asking instead of blocking the others until its place lapses.
                    if !matches!(e, StoreError::NotReplicated { .. }) {
                        let lease = self.new_lease(id, asked, epoch);
                        self.unreleased().push(lease);
                    }
                    queued = true;
                    Duration::from_millis(200)
                }
            };
            // Not woken by calls starting to wait: that would ask Redis once per call while
            // the fleet is at its limit. A call that gives up wakes it, to leave the queue.
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = inner.pump_redis.notified() => {}
                _ = &mut local_event, if self.local().waiting.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if queued {
            let _ = self.try_release("", true).await;
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

    async fn try_acquire(&self, id: &str) -> StoreResult<Option<u64>> {
        let inner = &self.inner;
        let adaptive = &inner.adaptive;
        let mut inv = inner.acquire.prepare_invoke();
        inv.key(&inner.key)
            .key(adaptive.key().unwrap_or(&inner.key))
            .key(&inner.queue_key)
            .key(&inner.alive_key)
            .arg(id)
            .arg(adaptive.ceiling())
            .arg(inner.lease_ms)
            .arg(if adaptive.key().is_some() { "1" } else { "0" })
            .arg(&inner.worker)
            .arg(QUEUE_TTL.as_millis() as u64)
            .arg(&inner.channel);
        // Confirmed by the replicas: a promoted replica must count every permit handed out.
        let (granted, wait): (i64, i64) =
            match inner.store.link().run_durable(Lane::Permits, &inv).await {
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

    /// Hands the permit to the next waiting call of this worker, or gives it back to Redis.
    pub async fn release(&self, mut permit: Permit) {
        let Some(lease) = permit.lease.take() else {
            return;
        };
        let left = {
            let mut local = self.local();
            local.held = local.held.saturating_sub(1);
            let share = self.share(&mut local);
            // Not beyond this worker's share while others wait; not after a throttle or a
            // lowered fleet limit: Redis admits by the lower limit, a hand-off would keep the
            // old count in flight.
            if local.held < share
                && lease.taken.elapsed() < HANDOFF_FOR
                && lease.epoch == self.inner.adaptive.epoch()
                && self.covers_a_call(&lease)
            {
                self.grant(&mut local, lease)
            } else {
                Some(lease)
            }
        };
        if let Some(lease) = left {
            self.release_lease(lease).await;
        }
        self.inner.pump_local.notify_one();
    }

    /// How many permits this worker may keep by hand-off: the effective limit, or while other
    /// workers wait in the Redis queue, an equal part of it (rounded down: with a limit of 1
    /// and a worker waiting, none): beyond that, a finished call's permit goes back to Redis
    /// for the first of them.
    fn share(&self, local: &mut Local) -> u32 {
        let now = Instant::now();
        local.contenders.retain(|_, until| *until > now);
        let workers = 1 + local.contenders.len() as u32;
        self.inner.adaptive.limit() / workers
    }

    /// Calls of this worker waiting for a permit, by cluster.
    pub fn backlog(&self) -> Backlog {
        self.local().waiting.backlog(Instant::now())
    }

    /// Gives a permit back to Redis; on a Redis error it is retried in the background.
    async fn release_lease(&self, lease: Lease) {
        if let Err(e) = self.try_release(&lease.id, false).await {
            RedisFailed {
                op: Op::PermitRelease,
                what: "permit release failed; retrying until Redis answers or the lease expires",
                error: &e,
            }
            .emit();
            self.unreleased().push(lease);
        }
    }

    /// Releases permit `id` ('' for none) and, when `leave`, takes this worker out of the
    /// Redis queue; wakes the worker first in the queue.
    async fn try_release(&self, id: &str, leave: bool) -> StoreResult<i64> {
        let inner = &self.inner;
        let mut conn = inner.store.conn().await?;
        Ok(inner
            .release
            .key(&inner.key)
            .key(&inner.queue_key)
            .key(&inner.alive_key)
            .arg(id)
            .arg(&inner.channel)
            .arg(if leave { inner.worker.as_str() } else { "" })
            .invoke_async(&mut conn)
            .await?)
    }

    /// On shutdown: one last try for the releases Redis has not taken yet.
    pub async fn flush_releases(&self) {
        let pending = std::mem::take(&mut *self.unreleased());
        for lease in pending {
            let _ = self.try_release(&lease.id, false).await;
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
                4,
                7,
            ),
            (
                "permit_release.lua",
                include_str!("permit_release.lua"),
                3,
                3,
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
