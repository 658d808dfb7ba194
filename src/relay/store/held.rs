//! Held dead letters (`hold.lua`, `unhold.lua`): rejected messages the broker could not take
//! into the dead-letter queue yet, kept per shard in arrival order until it can.

use super::{fenced, Fence, Lane, Store, StoreResult};

impl Store {
    /// Keeps encoded letters (in order) within `max_bytes` per shard; one flag per letter,
    /// false when the shard's hold is full. Confirmed by replicas like intake: the original
    /// is acked on it.
    pub async fn hold<L: AsRef<[u8]>>(
        &self,
        shard: u16,
        fence: &Fence,
        letters: &[L],
        max_bytes: u64,
    ) -> StoreResult<Vec<bool>> {
        if letters.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.shard(shard);
        let mut inv = fenced(
            &self.scripts.hold,
            &keys,
            fence,
            &[keys.held(), keys.held_bytes(), keys.seq(), keys.held_ids()],
        );
        inv.arg(max_bytes);
        for letter in letters {
            inv.arg(letter.as_ref());
        }
        let codes: Vec<i64> = self.link.run_durable(Lane::Shard(shard), &inv).await?;
        Ok(codes.into_iter().map(|c| c == 1).collect())
    }

    /// The oldest `n` held letters of a shard.
    pub async fn held_letters(&self, shard: u16, n: usize) -> StoreResult<Vec<Vec<u8>>> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("LRANGE")
            .arg(self.shard(shard).held())
            .arg(0)
            .arg(n.saturating_sub(1))
            .query_async(&mut conn)
            .await?)
    }

    /// Forgets the oldest held letter once the broker has it; false when the head was another.
    pub async fn unhold(&self, shard: u16, fence: &Fence, letter: &[u8]) -> StoreResult<bool> {
        let keys = self.shard(shard);
        let mut conn = self.conn().await?;
        let removed: i64 = fenced(
            &self.scripts.unhold,
            &keys,
            fence,
            &[keys.held(), keys.held_bytes(), keys.held_ids()],
        )
        .arg(letter)
        .invoke_async(&mut conn)
        .await?;
        Ok(removed == 1)
    }

    /// How many letters a shard holds, and their bytes.
    pub async fn held_count(&self, shard: u16) -> StoreResult<(u64, u64)> {
        let keys = self.shard(shard);
        let mut conn = self.conn().await?;
        let (count, bytes): (u64, Option<u64>) = redis::pipe()
            .cmd("LLEN")
            .arg(keys.held())
            .cmd("GET")
            .arg(keys.held_bytes())
            .query_async(&mut conn)
            .await?;
        Ok((count, bytes.unwrap_or(0)))
    }
}
