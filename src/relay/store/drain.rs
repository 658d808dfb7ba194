//! The drain tick (rule 3, `drain.lua`): batches of tasks with a known status become synthetic
//! task changes.

use super::{fenced, Fence, Store, StoreResult, PAGE};
use crate::relay::wire::TASK_STATUSES;

impl Store {
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
                let mut inv = fenced(
                    &self.scripts.drain,
                    &keys,
                    fence,
                    &[keys.batched(), keys.pending(), keys.seq(), keys.active()],
                );
                inv.arg(retention_s).arg(TASK_STATUSES.len());
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

    /// How many tasks of a shard have a batch waiting for a task status.
    pub async fn batched_count(&self, shard: u16) -> StoreResult<usize> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("SCARD")
            .arg(self.shard(shard).batched())
            .query_async(&mut conn)
            .await?)
    }
}
