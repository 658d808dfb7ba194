//! Retention (rule 11, `sweep.lua`): the state of tasks idle past the retention is dropped and
//! counted.

use super::{fenced, Fence, Store, StoreResult, PAGE};

impl Store {
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
            let mut inv = fenced(
                &self.scripts.sweep,
                &keys,
                fence,
                &[keys.active(), keys.pending(), keys.batched()],
            );
            inv.arg(retention_s);
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
}
