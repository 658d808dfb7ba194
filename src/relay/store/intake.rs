//! Intake: a batch of one shard's validated events in one script (`intake.lua`): dedupe by
//! recent event ids, known task status, the task's batch or its outbox.

use super::{fenced, Fence, Lane, ShardKeys, Store, StoreError, StoreResult, RECENT_IDS};
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

impl Intake {
    /// The script's code for one event; an unknown one is an error, never a guess.
    fn from_code(code: i64) -> StoreResult<Intake> {
        match code {
            0 => Ok(Intake::Duplicate),
            1 => Ok(Intake::Batched),
            2 => Ok(Intake::Enqueued),
            3 => Ok(Intake::BatchFull),
            _ => Err(StoreError::Contract(format!(
                "intake.lua answered code {code}"
            ))),
        }
    }
}

/// One event's keys, in the order `intake.lua` reads them (its KEYS header): a fixed-size
/// array, so an event cannot bring one key more or less.
fn event_keys(keys: &ShardKeys, ev: &Event) -> [String; 4] {
    [
        keys.recent_ids(&ev.key),
        keys.state(&ev.key),
        keys.batch(&ev.key),
        keys.outbox(&ev.key),
    ]
}

/// One event's arguments, in the order `intake.lua` reads them (its ARGV header);
/// `status` is the known task status index as text, or empty.
fn event_args<'a>(ev: &'a Event, status: &'a str) -> [&'a str; 9] {
    let [ps, pt, es] = &ev.task_times;
    [
        &ev.event_id,
        ev.kind.as_str(),
        &ev.key,
        &ev.stored,
        status,
        &ev.cluster,
        ps.as_deref().unwrap_or_default(),
        pt.as_deref().unwrap_or_default(),
        es.as_deref().unwrap_or_default(),
    ]
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
        let mut inv = fenced(
            &self.scripts.intake,
            &keys,
            fence,
            &[keys.pending(), keys.batched(), keys.active(), keys.seq()],
        );
        inv.arg(retention_s)
            .arg(crate::relay::wire::MAX_BATCH)
            .arg(RECENT_IDS);
        for ev in events {
            for key in event_keys(&keys, ev) {
                inv.key(key);
            }
            let status = ev
                .known_task_status
                .map(|s| s.to_string())
                .unwrap_or_default();
            for arg in event_args(ev, &status) {
                inv.arg(arg);
            }
        }
        let codes: Vec<i64> = self.link.run_durable(Lane::Shard(shard), &inv).await?;
        if codes.len() != events.len() {
            return Err(StoreError::Contract(format!(
                "intake.lua answered {} codes for {} events",
                codes.len(),
                events.len()
            )));
        }
        codes.into_iter().map(Intake::from_code).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_code_is_an_error() {
        assert_eq!(Intake::from_code(2).ok(), Some(Intake::Enqueued));
        assert!(matches!(Intake::from_code(4), Err(StoreError::Contract(_))));
        assert!(matches!(
            Intake::from_code(-1),
            Err(StoreError::Contract(_))
        ));
    }

    #[tokio::test]
    async fn the_script_refuses_a_call_that_does_not_make_whole_events() {
        use crate::relay::redis_link::refusal;
        let script = super::super::Scripts::new().intake;
        // One event with a key or an argument short or over, and a fixed part cut short.
        for (keys, args) in [(9, 13), (8, 14), (9, 15), (10, 14), (4, 4)] {
            let err = refusal(&script, keys, args).await;
            assert!(
                err.contains("intake.lua"),
                "{keys} keys, {args} args: {err}"
            );
        }
    }
}
