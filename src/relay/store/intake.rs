//! Intake: a batch of one shard's validated events in one script (`intake.lua`): dedupe by
//! recent event ids, known task status, the task's batch or its outbox.

use super::{Fence, Lane, Store, StoreResult, RECENT_IDS};
use crate::relay::wire::Event;

/// What the intake did with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intake {
    Duplicate,
    Batched,
    Enqueued,
    /// The task's batch already holds `wire::MAX_BATCH` changes: rejected, nothing stored.
    BatchFull,
}

impl Store {
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
            .arg(crate::relay::wire::MAX_BATCH)
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
        let codes: Vec<i64> = self.link.run_durable(Lane::Shard(shard), &inv).await?;
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
}
