//! Redis store: the relay's state per shard, one module per concern, each Lua script beside
//! the Rust that calls it (this folder).
//!
//! Every key of a shard carries the shard's hash tag (`relay:{<exchange>#<i>}:…`, see
//! [`keys`]), so each step is one atomic script that also checks the shard's fencing token
//! (`fence.lua`, prepended to every script that writes a shard).

mod drain;
mod held;
mod inspect;
mod intake;
mod keys;
mod leases;
mod outbox;
mod pubsub;
mod retention;

use std::sync::Arc;

use redis::{self, Script};

use crate::relay::config::{ConnConfig, TlsFiles};
use crate::relay::redis_link::Link;

pub use crate::relay::redis_link::{Conn, GateClosed, Lane, StoreError, StoreResult};
pub use inspect::{KeyView, ShardSummary};
pub use intake::Intake;
pub use keys::{field, ShardKeys};
pub use leases::{Beat, StoreLost};
pub use outbox::{Completed, KeyState};
pub use pubsub::{listen, wake_on_publish};

macro_rules! fenced_script {
    ($file:literal) => {
        Script::new(concat!(include_str!("fence.lua"), include_str!($file)))
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
    worker_entries: Script,
    unlock: Script,
    hold: Script,
    unhold: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            intake: fenced_script!("intake.lua"),
            complete: fenced_script!("complete.lua"),
            drain: fenced_script!("drain.lua"),
            sweep: fenced_script!("sweep.lua"),
            lease_acquire: Script::new(include_str!("lease_acquire.lua")),
            lease_renew: Script::new(include_str!("lease_renew.lua")),
            lease_release: Script::new(include_str!("lease_release.lua")),
            touch: fenced_script!("touch.lua"),
            heartbeat: Script::new(include_str!("heartbeat.lua")),
            worker_entries: Script::new(include_str!("worker_entries.lua")),
            unlock: Script::new(include_str!("unlock.lua")),
            hold: fenced_script!("hold.lua"),
            unhold: fenced_script!("unhold.lua"),
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

impl Store {
    /// Connects to one Redis at `url`; `namespace` (the exchange name) separates deployments
    /// sharing one Redis. `tls` gives the CA and client certificate for `rediss://` URLs.
    pub async fn connect(url: &str, tls: &TlsFiles, namespace: &str) -> anyhow::Result<Store> {
        Store::on(Link::direct(url, tls, 0)?, namespace).await
    }

    /// Connects as the configuration says: through Sentinel when `RELAY_REDIS_SENTINELS` is
    /// set, with `RELAY_REDIS_MIN_REPLICAS` confirming every write the relay acts on.
    pub async fn open(conn: &ConnConfig) -> anyhow::Result<Store> {
        let store = Store::configure(conn)?;
        store.ping().await?;
        store.check_replicas(conn.redis_min_replicas).await;
        Ok(store)
    }

    /// The store as configured, not yet reached: errors here are configuration errors (a URL
    /// that does not parse, a Sentinel address that is not host:port, unreadable TLS files).
    pub fn configure(conn: &ConnConfig) -> anyhow::Result<Store> {
        let tls = conn.redis_tls();
        let sentinels = conn.sentinels();
        let link = if sentinels.is_empty() {
            Link::direct(&conn.redis_url, &tls, conn.redis_min_replicas)?
        } else {
            let auth = crate::relay::redis_link::SentinelAuth {
                username: conn.redis_sentinel_username.clone(),
                password_file: conn.redis_sentinel_password_file.clone(),
                tls: conn.redis_sentinel_tls,
            };
            Link::sentinel(
                &sentinels,
                &conn.redis_sentinel_master,
                &conn.redis_url,
                &tls,
                &auth,
                conn.redis_min_replicas,
            )?
        };
        Ok(Store::with_link(link, &conn.exchange))
    }

    /// Logs when fewer replicas are online than writes must be confirmed by.
    pub async fn check_replicas(&self, wanted: u32) {
        if wanted == 0 {
            return;
        }
        let online = self
            .link
            .replication()
            .await
            .map(|r| r.replicas.iter().filter(|r| r.state == "online").count())
            .unwrap_or(0);
        if online < wanted as usize {
            tracing::warn!(
                online,
                wanted,
                "fewer Redis replicas online than RELAY_REDIS_MIN_REPLICAS: writes are not confirmed, so nothing is acked or sent until enough replicas are back"
            );
        }
    }

    fn with_link(link: Link, namespace: &str) -> Store {
        Store {
            link: Arc::new(link),
            namespace: namespace.to_string(),
            scripts: std::sync::Arc::new(Scripts::new()),
        }
    }

    async fn on(link: Link, namespace: &str) -> anyhow::Result<Store> {
        let store = Store::with_link(link, namespace);
        store.ping().await?;
        Ok(store)
    }

    /// Whether Redis answers (PING), with the target named in the error.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("redis {}: {e}", self.link.target());
        let mut conn = self.conn().await.map_err(|e| fail(&e))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| fail(&e))?;
        Ok(())
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
        ShardKeys::new(format!("relay:{{{}#{shard}}}:", self.namespace))
    }
}

/// A call of a script that writes a shard (`fence.lua` prepended): KEYS[1] is the shard's
/// lease and ARGV[1..2] the fence, then the script's own `keys`; the caller adds its arguments.
fn fenced<'a>(
    script: &'a Script,
    shard: &ShardKeys,
    fence: &Fence,
    keys: &[String],
) -> redis::ScriptInvocation<'a> {
    let mut inv = script.prepare_invoke();
    inv.key(shard.lease());
    for key in keys {
        inv.key(key);
    }
    inv.arg(&fence.owner).arg(fence.token);
    inv
}

impl Store {
    /// Published on when a worker joins or leaves or a shard lease is released, so the others
    /// rebalance at once instead of at their next heartbeat.
    pub fn membership_channel(&self) -> String {
        self.global_key("membership")
    }

    /// Deployment-wide key (outside any shard), e.g. the permit set.
    pub fn global_key(&self, name: &str) -> String {
        format!("relay:{{{}}}:{name}", self.namespace)
    }
}
