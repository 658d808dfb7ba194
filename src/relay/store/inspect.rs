//! Read-mostly views for `status`, operators and tests; not on a hot path.

use std::collections::HashMap;

use super::{KeyState, Store, StoreResult};

/// One shard as `status` shows it.
#[derive(Clone, Debug)]
pub struct ShardSummary {
    pub owner: Option<String>,
    pub lease_age_ms: Option<u64>,
    pub pending: u64,
    pub batched: u64,
    /// Dead letters held for the dead-letter queue.
    pub held: u64,
}

/// Everything Redis holds of one ordering key, for `inspect`.
#[derive(Clone, Debug, Default)]
pub struct KeyView {
    pub shard: u16,
    pub state: KeyState,
    /// Outbox entries (raw JSON), head first.
    pub outbox: Vec<String>,
    /// Batched container and managed-agent changes (raw JSON), oldest first.
    pub batch: Vec<String>,
    /// The last submissions (JSON objects), newest first.
    pub history: Vec<String>,
    pub owner: Option<String>,
}

impl Store {
    /// What Redis holds of `key`, from the shard that holds it; None when no shard holds any
    /// of it (never seen, or expired after the retention).
    pub async fn key_view(&self, shards: u16, key: &str) -> StoreResult<Option<KeyView>> {
        let mut conn = self.conn().await?;
        for shard in 0..shards {
            let keys = self.shard(shard);
            let (mut state, outbox, batch, owner): (
                HashMap<String, String>,
                Vec<String>,
                Vec<String>,
                Option<String>,
            ) = redis::pipe()
                .cmd("HGETALL")
                .arg(keys.state(key))
                .cmd("LRANGE")
                .arg(keys.outbox(key))
                .arg(0)
                .arg(-1)
                .cmd("LRANGE")
                .arg(keys.batch(key))
                .arg(0)
                .arg(-1)
                .cmd("HGET")
                .arg(keys.lease())
                .arg("owner")
                .query_async(&mut conn)
                .await?;
            let history = state
                .remove(super::field::HISTORY)
                .map(|h| h.lines().map(str::to_string).collect())
                .unwrap_or_default();
            if !(state.is_empty() && outbox.is_empty() && batch.is_empty()) {
                return Ok(Some(KeyView {
                    shard,
                    state: KeyState(state),
                    outbox,
                    batch,
                    history,
                    owner,
                }));
            }
        }
        Ok(None)
    }

    /// Lease owner and age, pending and batched task counts of a shard, in one round trip.
    pub async fn shard_summary(&self, shard: u16) -> StoreResult<ShardSummary> {
        let keys = self.shard(shard);
        let mut conn = self.conn().await?;
        let (owner, since, pending, batched, held, (secs, micros)): (
            Option<String>,
            Option<u64>,
            u64,
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
            .cmd("LLEN")
            .arg(keys.held())
            .cmd("TIME")
            .query_async(&mut conn)
            .await?;
        let now_ms = secs * 1000 + micros / 1000;
        Ok(ShardSummary {
            owner,
            lease_age_ms: since.map(|s| now_ms.saturating_sub(s)),
            pending,
            batched,
            held,
        })
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
