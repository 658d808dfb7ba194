//! Redis store: per-shard keys, the intake / complete / drain / sweep scripts and shard leases.
//!
//! Every key of a shard carries the shard's hash tag (`relay:{<exchange>#<i>}:…`), so each
//! step is one atomic script that also checks the shard's fencing token (see `src/lua/`).

use std::collections::HashMap;
use std::sync::Arc;

use redis::{self, Script};

use crate::config::{ConnConfig, TlsFiles};
use crate::redis_link::Link;
use crate::wire::{Event, TASK_STATUSES};

pub use crate::redis_link::{Conn, StoreError, StoreResult};

/// Wakes every waiter on `notify` whenever something is published on `channel`, until
/// `cancel`; reconnects by itself, and wakes everyone when the subscription drops and again
/// once it is back (a message may have been missed meanwhile). Waiters also keep a timeout,
/// so this is a latency aid, not a need.
pub async fn wake_on_publish(
    store: Store,
    channel: String,
    notify: std::sync::Arc<tokio::sync::Notify>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use futures_util::StreamExt;
    while !cancel.is_cancelled() {
        let listened: redis::RedisResult<()> = async {
            // Asked anew each time: after a failover the primary is another node.
            let client = store
                .link
                .client()
                .await
                .map_err(|e| redis::RedisError::from((redis::ErrorKind::Io, "no primary", e.to_string())))?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            // Whatever was published while the subscription was down is lost: wake everyone
            // now that nothing more can be missed, so they look for themselves.
            notify.notify_waiters();
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    msg = messages.next() => match msg {
                        Some(_) => notify.notify_waiters(),
                        None => return Err(redis::RedisError::from((redis::ErrorKind::Io, "pub/sub stream ended"))),
                    },
                }
            }
        }
        .await;
        if let Err(e) = listened {
            tracing::warn!(channel = %channel, error = %e, "pub/sub connection lost; reconnecting");
            crate::metrics::redis_error("pubsub");
        }
        notify.notify_waiters();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

macro_rules! fenced_script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/fence.lua"),
            include_str!(concat!("lua/", $file))
        ))
    };
}

struct Scripts {
    intake: Script,
    complete: Script,
    drain: Script,
    sweep: Script,
    lease_acquire: Script,
    lease_renew: Script,
    lease_release: Script,
    touch: Script,
    heartbeat: Script,
    unlock: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            intake: fenced_script!("intake.lua"),
            complete: fenced_script!("complete.lua"),
            drain: fenced_script!("drain.lua"),
            sweep: fenced_script!("sweep.lua"),
            lease_acquire: Script::new(include_str!("lua/lease_acquire.lua")),
            lease_renew: Script::new(include_str!("lua/lease_renew.lua")),
            lease_release: Script::new(include_str!("lua/lease_release.lua")),
            touch: fenced_script!("touch.lua"),
            heartbeat: Script::new(include_str!("lua/heartbeat.lua")),
            unlock: Script::new(include_str!("lua/unlock.lua")),
        }
    }
}

/// The lease a worker holds on a shard; every write passes it for the fencing check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub owner: String,
    pub token: u64,
}

/// A shard lease just taken.
#[derive(Clone, Debug)]
pub struct Taken {
    pub fence: Fence,
    /// The previous owner's lease lapsed instead of being released: one of its ECS calls may
    /// still be on the wire.
    pub lapsed: bool,
}

/// What the intake did with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intake {
    Duplicate,
    Batched,
    Enqueued,
    /// The task's batch already holds `wire::MAX_BATCH` changes: rejected, nothing stored.
    BatchFull,
}

/// One shard as `status` shows it.
#[derive(Clone, Debug)]
pub struct ShardSummary {
    pub owner: Option<String>,
    pub lease_age_ms: Option<u64>,
    pub pending: u64,
    pub batched: u64,
}

/// Sent and known statuses of one ordering key, as stored in its state hash.
#[derive(Clone, Debug, Default)]
pub struct KeyState(pub HashMap<String, String>);

impl KeyState {
    /// The stored status index of a field (absent = 0, the NONE of every vocabulary).
    pub fn get(&self, field: &str) -> u8 {
        self.0.get(field).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
    pub fn known(&self) -> Option<u8> {
        self.0.get("k").and_then(|v| v.parse().ok())
    }
}

/// What `complete_prefix` did, and the key's outbox head and state right after it.
#[derive(Debug)]
pub struct Completed {
    /// Entries left in the outbox; None when the head was not the expected entry any more.
    pub left: Option<u64>,
    pub head: Option<String>,
    pub state: KeyState,
}

/// Field names of the state hash.
pub mod field {
    pub const TASK_SENT: &str = "s";
    pub fn container(name: &str) -> String {
        format!("c:{name}")
    }
    pub fn agent(container: &str, agent: &str) -> String {
        format!("m:{container}\u{1f}{agent}")
    }
    pub fn attachment(arn: &str) -> String {
        format!("a:{arn}")
    }
}

#[derive(Clone)]
pub struct Store {
    link: Arc<Link>,
    namespace: String,
    scripts: std::sync::Arc<Scripts>,
}

/// Tasks one drain, sweep or pending-index read looks at per call: bounds how long each call
/// holds Redis, whatever the size of the shard.
const PAGE: usize = 500;

/// Event ids remembered per ordering key for redelivery dedupe. A redelivery comes back within
/// the broker's unacknowledged window (the prefetch, far fewer) and a producer's republish of
/// an unconfirmed message within seconds; a long-lived task's set stays this small.
pub const RECENT_IDS: usize = 1024;

/// Key names of one shard.
#[derive(Clone, Debug)]
pub struct ShardKeys {
    prefix: String,
}

impl ShardKeys {
    fn k(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    fn per(&self, kind: &str, key: &str) -> String {
        format!("{}{kind}:{key}", self.prefix)
    }
    pub fn lease(&self) -> String {
        self.k("lease")
    }
    pub fn pending(&self) -> String {
        self.k("pending")
    }
    pub fn batched(&self) -> String {
        self.k("batched")
    }
    pub fn active(&self) -> String {
        self.k("active")
    }
    pub fn state(&self, key: &str) -> String {
        self.per("t", key)
    }
    pub fn batch(&self, key: &str) -> String {
        self.per("b", key)
    }
    pub fn outbox(&self, key: &str) -> String {
        self.per("o", key)
    }
    /// The most recent event ids of a key (a zset scored by arrival), for redelivery dedupe.
    pub fn recent_ids(&self, key: &str) -> String {
        self.per("i", key)
    }
    fn fence_counter(&self) -> String {
        self.k("fence")
    }
    fn released(&self) -> String {
        self.k("released")
    }
    fn seq(&self) -> String {
        self.k("seq")
    }
}

impl Store {
    /// Connects to one Redis at `url`; `namespace` (the exchange name) separates deployments
    /// sharing one Redis. `tls` gives the CA and client certificate for `rediss://` URLs.
    pub async fn connect(url: &str, tls: &TlsFiles, namespace: &str) -> anyhow::Result<Store> {
        Store::on(Link::direct(url, tls, 0)?, namespace).await
    }

    /// Connects as the configuration says: through Sentinel when `RELAY_REDIS_SENTINELS` is
    /// set, with `RELAY_REDIS_MIN_REPLICAS` confirming every write the relay acts on.
    pub async fn open(conn: &ConnConfig) -> anyhow::Result<Store> {
        let tls = conn.redis_tls();
        let sentinels = conn.sentinels();
        let link = if sentinels.is_empty() {
            Link::direct(&conn.redis_url, &tls, conn.redis_min_replicas)?
        } else {
            Link::sentinel(
                &sentinels,
                &conn.redis_sentinel_master,
                &conn.redis_url,
                &tls,
                conn.redis_min_replicas,
            )?
        };
        let store = Store::on(link, &conn.exchange).await?;
        if conn.redis_min_replicas > 0 {
            let online = store
                .link
                .replication()
                .await
                .map(|r| r.replicas.iter().filter(|r| r.state == "online").count())
                .unwrap_or(0);
            if online < conn.redis_min_replicas as usize {
                tracing::warn!(
                    online,
                    wanted = conn.redis_min_replicas,
                    "fewer Redis replicas online than RELAY_REDIS_MIN_REPLICAS: writes are not confirmed, so nothing is acked or sent until enough replicas are back"
                );
            }
        }
        Ok(store)
    }

    async fn on(link: Link, namespace: &str) -> anyhow::Result<Store> {
        let store = Store {
            link: Arc::new(link),
            namespace: namespace.to_string(),
            scripts: std::sync::Arc::new(Scripts::new()),
        };
        let fail =
            |e: &dyn std::fmt::Display| anyhow::anyhow!("redis {}: {e}", store.link.target());
        let mut conn = store.conn().await.map_err(|e| fail(&e))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| fail(&e))?;
        Ok(store)
    }

    /// A shared connection for one step (see [`Link::conn`]).
    pub async fn conn(&self) -> StoreResult<Conn> {
        self.link.conn().await
    }

    /// The Redis connections: failovers followed, replication, durable script runs.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn shard(&self, shard: u16) -> ShardKeys {
        ShardKeys {
            prefix: format!("relay:{{{}#{shard}}}:", self.namespace),
        }
    }

    /// Published on when a worker joins or leaves or a shard lease is released, so the others
    /// rebalance at once instead of at their next heartbeat.
    pub fn membership_channel(&self) -> String {
        self.global_key("membership")
    }

    /// Deployment-wide key (outside any shard), e.g. the permit set.
    pub fn global_key(&self, name: &str) -> String {
        format!("relay:{{{}}}:{name}", self.namespace)
    }

    /// Applies a shard's events in delivery order with one script call (one round trip).
    pub async fn intake(
        &self,
        shard: u16,
        fence: &Fence,
        events: &[Event],
        retention_s: u64,
    ) -> StoreResult<Vec<Intake>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.shard(shard);
        let mut inv = self.scripts.intake.prepare_invoke();
        inv.key(keys.lease())
            .key(keys.pending())
            .key(keys.batched())
            .key(keys.active())
            .key(keys.seq())
            .arg(&fence.owner)
            .arg(fence.token)
            .arg(retention_s)
            .arg(crate::wire::MAX_BATCH)
            .arg(RECENT_IDS);
        for ev in events {
            inv.key(keys.recent_ids(&ev.key))
                .key(keys.state(&ev.key))
                .key(keys.batch(&ev.key))
                .key(keys.outbox(&ev.key))
                .arg(&ev.event_id)
                .arg(ev.kind.as_str())
                .arg(&ev.key)
                .arg(&ev.stored)
                .arg(
                    ev.known_task_status
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                )
                .arg(&ev.cluster);
            for t in &ev.task_times {
                inv.arg(t.as_deref().unwrap_or_default());
            }
        }
        let codes: Vec<i64> = self.link.run_durable(&inv).await?;
        Ok(codes
            .into_iter()
            .map(|c| match c {
                0 => Intake::Duplicate,
                1 => Intake::Batched,
                3 => Intake::BatchFull,
                _ => Intake::Enqueued,
            })
            .collect())
    }

    /// The head of a key's outbox (raw) and its state, in one round trip.
    pub async fn peek(&self, shard: u16, key: &str) -> StoreResult<(Option<String>, KeyState)> {
        let keys = self.shard(shard);
        let mut conn = self.conn().await?;
        let (head, state): (Option<String>, HashMap<String, String>) = redis::pipe()
            .cmd("LINDEX")
            .arg(keys.outbox(key))
            .arg(0)
            .cmd("HGETALL")
            .arg(keys.state(key))
            .query_async(&mut conn)
            .await?;
        Ok((head, KeyState(state)))
    }

    /// Removes the outbox head starting with `head_prefix` (see `OutboxEntry::head_prefix`) and
    /// advances sent statuses, atomically; returns the outcome with the key's next head and state.
    pub async fn complete_prefix(
        &self,
        shard: u16,
        fence: &Fence,
        key: &str,
        head_prefix: &str,
        advances: &[(String, u8)],
        retention_s: u64,
    ) -> StoreResult<Completed> {
        let keys = self.shard(shard);
        let mut inv = self.scripts.complete.prepare_invoke();
        inv.key(keys.lease())
            .key(keys.outbox(key))
            .key(keys.state(key))
            .key(keys.pending())
            .key(keys.active())
            .key(keys.recent_ids(key))
            .key(keys.batch(key))
            .arg(&fence.owner)
            .arg(fence.token)
            .arg(head_prefix)
            .arg(key)
            .arg(retention_s);
        for (f, v) in advances {
            inv.arg(f).arg(*v);
        }
        let (left, head, state): (i64, Option<String>, HashMap<String, String>) =
            self.link.run_durable(&inv).await?;
        Ok(Completed {
            left: u64::try_from(left).ok(),
            head,
            state: KeyState(state),
        })
    }

    /// One drain tick for a shard; returns the keys that got a synthetic task change. Reads
    /// the batched set a page at a time (SSCAN) and drains each page with one script call.
    pub async fn drain(
        &self,
        shard: u16,
        fence: &Fence,
        retention_s: u64,
    ) -> StoreResult<Vec<String>> {
        let keys = self.shard(shard);
        let mut conn = self.conn().await?;
        let mut woken = Vec::new();
        let mut cursor = "0".to_string();
        loop {
            let (next, page): (String, Vec<String>) = redis::cmd("SSCAN")
                .arg(keys.batched())
                .arg(&cursor)
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await?;
            // The first call runs even on an empty page: every tick checks the fence.
            if !page.is_empty() || cursor == "0" {
                let mut inv = self.scripts.drain.prepare_invoke();
                inv.key(keys.lease())
                    .key(keys.batched())
                    .key(keys.pending())
                    .key(keys.seq())
                    .key(keys.active())
                    .arg(&fence.owner)
                    .arg(fence.token)
                    .arg(retention_s)
                    .arg(TASK_STATUSES.len());
                for s in TASK_STATUSES {
                    inv.arg(s);
                }
                for key in &page {
                    inv.key(keys.state(key))
                        .key(keys.batch(key))
                        .key(keys.outbox(key))
                        .arg(key);
                }
                let drained: Vec<String> = inv.invoke_async(&mut conn).await?;
                woken.extend(drained);
            }
            if next == "0" {
                return Ok(woken);
            }
            cursor = next;
        }
    }

    /// Marks a key active while its calls keep failing, so retention does not drop it.
    pub async fn touch(
        &self,
        shard: u16,
        fence: &Fence,
        key: &str,
        retention_s: u64,
    ) -> StoreResult<()> {
        let keys = self.shard(shard);
        let mut conn = self.conn().await?;
        let _: i64 = self
            .scripts
            .touch
            .key(keys.lease())
            .key(keys.active())
            .key(keys.state(key))
            .key(keys.batch(key))
            .key(keys.outbox(key))
            .key(keys.recent_ids(key))
            .arg(&fence.owner)
            .arg(fence.token)
            .arg(key)
            .arg(retention_s)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Drops tasks idle past the retention, a page at a time; returns (tasks, events) dropped.
    pub async fn sweep(
        &self,
        shard: u16,
        fence: &Fence,
        retention_s: u64,
    ) -> StoreResult<(u64, u64)> {
        let keys = self.shard(shard);
        let mut conn = self.conn().await?;
        let (mut tasks, mut events) = (0, 0);
        loop {
            let (now, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
            let idle: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(keys.active())
                .arg("-inf")
                .arg(now.saturating_sub(retention_s))
                .arg("LIMIT")
                .arg(0)
                .arg(PAGE)
                .query_async(&mut conn)
                .await?;
            // The first call runs even with nothing idle: every tick checks the fence.
            if idle.is_empty() && tasks > 0 {
                return Ok((tasks, events));
            }
            let mut inv = self.scripts.sweep.prepare_invoke();
            inv.key(keys.lease())
                .key(keys.active())
                .key(keys.pending())
                .key(keys.batched())
                .arg(&fence.owner)
                .arg(fence.token)
                .arg(retention_s);
            for key in &idle {
                inv.key(keys.state(key))
                    .key(keys.batch(key))
                    .key(keys.outbox(key))
                    .key(keys.recent_ids(key))
                    .arg(key);
            }
            let (t, e): (u64, u64) = inv.invoke_async(&mut conn).await?;
            tasks += t;
            events += e;
            if idle.len() < PAGE || t == 0 {
                return Ok((tasks, events));
            }
        }
    }

    /// How many tasks of a shard have a batch waiting for a task status.
    pub async fn batched_count(&self, shard: u16) -> StoreResult<usize> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("SCARD")
            .arg(self.shard(shard).batched())
            .query_async(&mut conn)
            .await?)
    }

    /// Keys with a non-empty outbox, oldest first: resumed when a worker takes a shard. Read a
    /// page at a time by score (each entry's sequence number is unique), so no read is long
    /// and entries removed meanwhile do not shift the next page.
    pub async fn pending_keys(&self, shard: u16) -> StoreResult<Vec<String>> {
        let pending = self.shard(shard).pending();
        let mut conn = self.conn().await?;
        let mut keys = Vec::new();
        let mut after = "-inf".to_string();
        loop {
            let page: Vec<(String, u64)> = redis::cmd("ZRANGEBYSCORE")
                .arg(&pending)
                .arg(&after)
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(PAGE)
                .query_async(&mut conn)
                .await?;
            let full = page.len() == PAGE;
            if let Some((_, last)) = page.last() {
                after = format!("({last}");
            }
            keys.extend(page.into_iter().map(|(k, _)| k));
            if !full {
                return Ok(keys);
            }
        }
    }

    /// Whether an event id is among the ids a key remembers for dedupe (operators and tests).
    pub async fn remembers(&self, shards: u16, key: &str, event_id: &str) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        for shard in 0..shards {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(self.shard(shard).recent_ids(key))
                .arg(event_id)
                .query_async(&mut conn)
                .await?;
            if score.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Takes the shard lease if free; None when another worker holds it.
    pub async fn lease_acquire(
        &self,
        shard: u16,
        owner: &str,
        lease_ms: u64,
    ) -> StoreResult<Option<Taken>> {
        let keys = self.shard(shard);
        let mut inv = self.scripts.lease_acquire.prepare_invoke();
        inv.key(keys.lease())
            .key(keys.fence_counter())
            .key(keys.released())
            .arg(owner)
            .arg(lease_ms);
        // Confirmed by the replicas: a promoted replica must know every token granted.
        let (token, lapsed): (u64, u8) = self.link.run_durable(&inv).await?;
        Ok((token > 0).then(|| Taken {
            fence: Fence {
                owner: owner.to_string(),
                token,
            },
            lapsed: lapsed == 1,
        }))
    }

    pub async fn lease_renew(&self, shard: u16, fence: &Fence, lease_ms: u64) -> StoreResult<bool> {
        let mut inv = self.scripts.lease_renew.prepare_invoke();
        inv.key(self.shard(shard).lease())
            .arg(&fence.owner)
            .arg(fence.token)
            .arg(lease_ms);
        let ok: i64 = self.link.run_durable(&inv).await?;
        Ok(ok == 1)
    }

    pub async fn lease_release(&self, shard: u16, fence: &Fence) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let ok: i64 = self
            .scripts
            .lease_release
            .key(self.shard(shard).lease())
            .key(self.shard(shard).released())
            .arg(&fence.owner)
            .arg(fence.token)
            .arg(self.membership_channel())
            .invoke_async(&mut conn)
            .await?;
        Ok(ok == 1)
    }

    /// Takes the deployment's topology lock: workers starting together declare the queues one
    /// after the other, so none sees another's half-declared topology as a wrong shard count.
    pub async fn topology_lock(&self, holder: &str, ttl_ms: u64) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(self.global_key("topology-lock"))
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut conn)
            .await?;
        Ok(set.is_some())
    }

    pub async fn topology_unlock(&self, holder: &str) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .scripts
            .unlock
            .key(self.global_key("topology-lock"))
            .arg(holder)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Announces this worker for `lease_ms`; returns the live workers (this one included).
    pub async fn heartbeat(&self, worker: &str, lease_ms: u64) -> StoreResult<Vec<String>> {
        let mut conn = self.conn().await?;
        Ok(self
            .scripts
            .heartbeat
            .key(self.global_key("workers"))
            .arg(worker)
            .arg(lease_ms)
            .arg(self.membership_channel())
            .invoke_async(&mut conn)
            .await?)
    }

    /// Leaves the live set at once (clean shutdown), so the others rebalance without waiting.
    pub async fn deregister(&self, worker: &str) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        redis::pipe()
            .cmd("ZREM")
            .arg(self.global_key("workers"))
            .arg(worker)
            .cmd("PUBLISH")
            .arg(self.membership_channel())
            .arg("left")
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Lease owner and age, pending and batched task counts of a shard, in one round trip.
    pub async fn shard_summary(&self, shard: u16) -> StoreResult<ShardSummary> {
        let keys = self.shard(shard);
        let mut conn = self.conn().await?;
        let (owner, since, pending, batched, (secs, micros)): (
            Option<String>,
            Option<u64>,
            u64,
            u64,
            (u64, u64),
        ) = redis::pipe()
            .cmd("HGET")
            .arg(keys.lease())
            .arg("owner")
            .cmd("HGET")
            .arg(keys.lease())
            .arg("since")
            .cmd("ZCARD")
            .arg(keys.pending())
            .cmd("SCARD")
            .arg(keys.batched())
            .cmd("TIME")
            .query_async(&mut conn)
            .await?;
        let now_ms = secs * 1000 + micros / 1000;
        Ok(ShardSummary {
            owner,
            lease_age_ms: since.map(|s| now_ms.saturating_sub(s)),
            pending,
            batched,
        })
    }

    /// Workers whose heartbeat has not lapsed.
    pub async fn live_workers(&self) -> StoreResult<Vec<String>> {
        let mut conn = self.conn().await?;
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_ms = secs * 1000 + micros / 1000;
        Ok(redis::cmd("ZRANGEBYSCORE")
            .arg(self.global_key("workers"))
            .arg(format!("({now_ms}"))
            .arg("+inf")
            .query_async(&mut conn)
            .await?)
    }

    /// How many shards have no lease holder, in one round trip.
    pub async fn unowned_shards(&self, shards: u16) -> StoreResult<usize> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        for shard in 0..shards {
            pipe.cmd("EXISTS").arg(self.shard(shard).lease());
        }
        let held: Vec<u8> = pipe.query_async(&mut conn).await?;
        Ok(held.iter().filter(|h| **h == 0).count())
    }

    /// Current owner of a shard's lease (for status and tests).
    pub async fn lease_owner(&self, shard: u16) -> StoreResult<Option<String>> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("HGET")
            .arg(self.shard(shard).lease())
            .arg("owner")
            .query_async(&mut conn)
            .await?)
    }

    /// State of a key in the shard that holds it (operators and tests; not on a hot path).
    pub async fn find_state(&self, shards: u16, key: &str) -> StoreResult<Option<(u16, KeyState)>> {
        let mut conn = self.conn().await?;
        for shard in 0..shards {
            let state: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.shard(shard).state(key))
                .query_async(&mut conn)
                .await?;
            if !state.is_empty() {
                return Ok(Some((shard, KeyState(state))));
            }
        }
        Ok(None)
    }

    /// Lengths of a key's batch and outbox in every shard, summed.
    pub async fn queued(&self, shards: u16, key: &str) -> StoreResult<(u64, u64)> {
        let mut conn = self.conn().await?;
        let (mut batch, mut outbox) = (0, 0);
        for shard in 0..shards {
            let keys = self.shard(shard);
            let (b, o): (u64, u64) = redis::pipe()
                .cmd("LLEN")
                .arg(keys.batch(key))
                .cmd("LLEN")
                .arg(keys.outbox(key))
                .query_async(&mut conn)
                .await?;
            batch += b;
            outbox += o;
        }
        Ok((batch, outbox))
    }

    /// Writes sent/known statuses for a key in every shard: for operators restoring state
    /// after a Redis loss, and for tests that start from a known "already sent" state.
    pub async fn seed_state(
        &self,
        shards: u16,
        key: &str,
        fields: &[(String, String)],
    ) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        for shard in 0..shards {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(self.shard(shard).state(key));
            for (f, v) in fields {
                cmd.arg(f).arg(v);
            }
            pipe.add_command(cmd).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }
}
