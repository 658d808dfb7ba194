//! Key names: every key of a shard carries the shard's hash tag (`relay:{<exchange>#<i>}:…`),
//! so one script touches one Redis Cluster slot.

/// Field names of the state hash.
pub mod field {
    pub const TASK_SENT: &str = "s";
    /// The key's last submissions for `inspect` (see `complete.lua`).
    pub const HISTORY: &str = "h";
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

/// Key names of one shard.
#[derive(Clone, Debug)]
pub struct ShardKeys {
    prefix: String,
}

impl ShardKeys {
    pub(super) fn new(prefix: String) -> ShardKeys {
        ShardKeys { prefix }
    }
    pub(super) fn k(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    pub(super) fn per(&self, kind: &str, key: &str) -> String {
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
    /// Rejected messages waiting for the dead-letter queue (a list, oldest first).
    pub fn held(&self) -> String {
        self.k("held")
    }
    pub(super) fn held_bytes(&self) -> String {
        self.k("held-bytes")
    }
    /// SHA-1s of the held letters: a retried hold adds nothing twice.
    pub(super) fn held_ids(&self) -> String {
        self.k("held-ids")
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
    pub(super) fn fence_counter(&self) -> String {
        self.k("fence")
    }
    pub(super) fn released(&self) -> String {
        self.k("released")
    }
    pub(super) fn seq(&self) -> String {
        self.k("seq")
    }
}
