//! Outboxes: reading a key's head and state, removing the head once it was sent with the sent
//! statuses advanced in the same step (`complete.lua`), marking a retrying task active
//! (`touch.lua`), and the pending index a new owner resumes from.

use std::collections::HashMap;

use super::{fenced, Fence, Lane, Store, StoreResult, PAGE};

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

impl Store {
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
    /// advances sent statuses, atomically, recording `history` (a JSON object) in the key's
    /// history; returns the outcome with the key's next head and state.
    #[allow(clippy::too_many_arguments)]
    pub async fn complete_prefix(
        &self,
        shard: u16,
        fence: &Fence,
        key: &str,
        head_prefix: &str,
        advances: &[(String, u8)],
        history: &str,
        retention_s: u64,
    ) -> StoreResult<Completed> {
        let keys = self.shard(shard);
        let mut inv = fenced(
            &self.scripts.complete,
            &keys,
            fence,
            &[
                keys.outbox(key),
                keys.state(key),
                keys.pending(),
                keys.active(),
                keys.recent_ids(key),
                keys.batch(key),
                keys.seq(),
            ],
        );
        inv.arg(head_prefix).arg(key).arg(retention_s).arg(history);
        for (f, v) in advances {
            inv.arg(f).arg(*v);
        }
        let (left, head, state): (i64, Option<String>, HashMap<String, String>) =
            self.link.run_durable(Lane::Shard(shard), &inv).await?;
        Ok(Completed {
            left: u64::try_from(left).ok(),
            head,
            state: KeyState(state),
        })
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
        let _: i64 = fenced(
            &self.scripts.touch,
            &keys,
            fence,
            &[
                keys.active(),
                keys.state(key),
                keys.batch(key),
                keys.outbox(key),
                keys.recent_ids(key),
            ],
        )
        .arg(key)
        .arg(retention_s)
        .invoke_async(&mut conn)
        .await?;
        Ok(())
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
}
