//! Membership and ownership: worker heartbeats, shard leases with fencing tokens
//! (`lease_*.lua`, `heartbeat.lua`) and the topology lock (`unlock.lua`).

use serde::{Deserialize, Serialize};

use super::{Fence, Lane, Store, StoreResult, Taken};

/// One heartbeat's answer.
#[derive(Debug)]
pub struct Beat {
    /// The live workers, this one included.
    pub live: Vec<String>,
    /// The store epoch now: the worker remembers the first it saw.
    pub epoch: String,
    /// The store-lost record, while one stands.
    pub lost: Option<StoreLost>,
    /// This heartbeat made the worker live (it was not in the live set).
    pub joined: bool,
}

/// A worker found the store epoch changed or gone: Redis lost the relay's state (written by
/// `heartbeat.lua`, deleted by the operator).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreLost {
    pub seen_by: String,
    /// Redis TIME, ms since the epoch.
    pub at_ms: u64,
    pub known_epoch: String,
    pub found_epoch: String,
}

impl StoreLost {
    fn parse(record: &str) -> Option<StoreLost> {
        if record.is_empty() {
            return None;
        }
        // A record this version cannot read still means the store was lost.
        Some(serde_json::from_str(record).unwrap_or_else(|_| StoreLost {
            seen_by: "?".into(),
            at_ms: 0,
            known_epoch: "?".into(),
            found_epoch: record.chars().take(200).collect(),
        }))
    }
}

impl Store {
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
        let (token, lapsed): (u64, u8) = self.link.run_durable(Lane::Leases, &inv).await?;
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
        let ok: i64 = self.link.run_durable(Lane::Leases, &inv).await?;
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

    /// Announces this worker for `lease_ms`, reaps dead workers' entries, and checks the store
    /// epoch against the known one (None on the first heartbeat), passing the epochs this
    /// worker has seen lost (see `heartbeat.lua`).
    pub async fn heartbeat(
        &self,
        worker: &str,
        lease_ms: u64,
        (known_epoch, lost_epochs): &(Option<String>, Vec<String>),
    ) -> StoreResult<Beat> {
        let mut conn = self.conn().await?;
        let mut inv = self.scripts.heartbeat.prepare_invoke();
        inv.key(self.global_key("workers"))
            .key(self.global_key("epoch"))
            .key(self.global_key("store-lost"))
            .key(self.global_key("ready"))
            .key(self.global_key("addrs"))
            .key(self.global_key("producer-rules"))
            .key(self.global_key("lost-epochs"))
            .arg(worker)
            .arg(lease_ms)
            .arg(self.membership_channel())
            .arg(known_epoch.as_deref().unwrap_or(""))
            .arg(lost_epochs);
        let (live, epoch, lost, joined): (Vec<String>, String, String, u8) =
            inv.invoke_async(&mut conn).await?;
        Ok(Beat {
            live,
            epoch,
            lost: StoreLost::parse(&lost),
            joined: joined == 1,
        })
    }

    /// The store-lost record, if a worker has recorded one (for `status`).
    pub async fn store_lost(&self) -> StoreResult<Option<StoreLost>> {
        let mut conn = self.conn().await?;
        let record: Option<String> = redis::cmd("GET")
            .arg(self.global_key("store-lost"))
            .query_async(&mut conn)
            .await?;
        Ok(record.as_deref().and_then(StoreLost::parse))
    }

    /// Deletes the store-lost record (the operator has dealt with the loss); whether there was
    /// one. Workers' `relay_store_lost` gauges fall back to 0 at their next heartbeat.
    pub async fn clear_store_lost(&self) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let deleted: u64 = redis::cmd("DEL")
            .arg(self.global_key("store-lost"))
            .query_async(&mut conn)
            .await?;
        Ok(deleted == 1)
    }

    /// Leaves the live set at once (clean shutdown), so the others rebalance without waiting.
    pub async fn deregister(&self, worker: &str) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(self.global_key("workers")).arg(worker);
        for entries in ["producer-rules", "ready", "addrs"] {
            pipe.cmd("HDEL").arg(self.global_key(entries)).arg(worker);
        }
        pipe.cmd("PUBLISH")
            .arg(self.membership_channel())
            .arg("left")
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Records which producer rules `worker` runs (`relay::producers::Producers::rules`), for
    /// `status` to show whether every worker runs the same (only while `worker` is live).
    pub async fn set_producer_rules(&self, worker: &str, rules: &str) -> StoreResult<()> {
        self.worker_entries(worker, &[("producer-rules", rules)])
            .await
            .map(drop)
    }

    /// Writes `worker`'s entries in the per-worker hashes if it is live (`worker_entries.lua`);
    /// returns the store-lost record.
    async fn worker_entries(
        &self,
        worker: &str,
        entries: &[(&str, &str)],
    ) -> StoreResult<Option<StoreLost>> {
        let mut conn = self.conn().await?;
        let mut inv = self.scripts.worker_entries.prepare_invoke();
        inv.key(self.global_key("workers"))
            .key(self.global_key("store-lost"))
            .arg(worker);
        for (hash, value) in entries {
            inv.key(self.global_key(hash)).arg(*value);
        }
        let lost: String = inv.invoke_async(&mut conn).await?;
        Ok(StoreLost::parse(&lost))
    }

    /// The producer rules each worker last recorded, by worker (dead ones included).
    pub async fn producer_rules(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        self.per_worker("producer-rules").await
    }

    /// One of the per-worker hashes (`ready`, `addrs`, `producer-rules`), whole.
    async fn per_worker(
        &self,
        hash: &str,
    ) -> StoreResult<std::collections::BTreeMap<String, String>> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("HGETALL")
            .arg(self.global_key(hash))
            .query_async(&mut conn)
            .await?)
    }

    /// Records `worker`'s ready work (JSON, see `relay::worker::ReadyReport`), for `status`,
    /// and where its metrics port answers `/inspect` (only while `worker` is live); returns
    /// the store-lost record.
    pub async fn set_ready(
        &self,
        worker: &str,
        report: &str,
        addr: Option<&str>,
    ) -> StoreResult<Option<StoreLost>> {
        self.worker_entries(
            worker,
            &[("ready", report), ("addrs", addr.unwrap_or_default())],
        )
        .await
    }

    /// Where `worker` answers `/inspect` (its metrics port), if it has one.
    pub async fn worker_addr(&self, worker: &str) -> StoreResult<Option<String>> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("HGET")
            .arg(self.global_key("addrs"))
            .arg(worker)
            .query_async(&mut conn)
            .await?)
    }

    /// The ready work each worker last recorded, by worker (dead ones included).
    pub async fn ready_reports(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        self.per_worker("ready").await
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
}
