//! The way to Redis: a fixed address, or the primary that Sentinel names (asked again for every
//! new connection, so a failover is followed without a restart); a few long-lived shared
//! connections; and, when replicas must confirm writes, `WAIT` after each write the relay acts on.

mod commit;
mod conn;
mod error;
mod gate;
mod replication;
mod sentinel;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use redis::aio::MultiplexedConnection;
#[cfg(test)]
use redis::Value;
use redis::{AsyncConnectionConfig, Client};
use tokio::sync::Notify;

use crate::relay::config::{mask_url, TlsFiles};

use commit::Committer;
use conn::{connection_config, tcp_settings, tls_certificates};
use gate::Reach;

pub use commit::Lane;
pub use conn::Conn;
pub use error::{StoreError, StoreResult};
pub use gate::GateClosed;
pub use replication::{ReplicaInfo, Replication};
pub use sentinel::SentinelAuth;

/// Long-lived connections shared by every step (see [`Link::conn`]).
const SHARED_CONNECTIONS: usize = 4;

/// Bounded waits everywhere: after a network cut or a paused process a connection can hang;
/// an error is retried, a hang would stall the shard silently. Replies get 5 s, not the
/// client's default 0.5 s: Redis runs scripts one after another, and under a full intake load
/// a reply can wait behind many batches on a healthy connection.
const BOUND: Duration = Duration::from_secs(5);

enum Source {
    /// One Redis at a fixed address; the pool creates connections with bounded waits.
    Direct { pool: Pool, client: Client },
    /// The primary Sentinel names for the master; the client checks its ROLE before use.
    Sentinel {
        sentinel: Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
        config: AsyncConnectionConfig,
        /// The primary's address last connected to, to notice a failover.
        primary: Mutex<Option<String>>,
    },
}

pub struct Link {
    source: Source,
    slots: Vec<Mutex<Option<MultiplexedConnection>>>,
    next: AtomicUsize,
    min_replicas: u32,
    failovers: AtomicU64,
    /// Woken when a new primary is seen, so leases are checked again at once.
    failed_over: Notify,
    /// What to name in errors: the URL (masked) or the Sentinel master.
    target: String,
    /// Durable writes' committers, one per lane (see [`Link::run_durable`]).
    lanes: Mutex<HashMap<Lane, Committer>>,
    /// What this worker's round trips say about Redis (see [`Link::reachable`]).
    reach: Reach,
    /// Woken at each sample that finds the gate closed (see [`Link::sample_gate`]).
    gate_closed: Notify,
}

impl Link {
    /// A fixed Redis. `tls` gives the CA and client certificate for `rediss://` URLs.
    pub fn direct(url: &str, tls: &TlsFiles, min_replicas: u32) -> anyhow::Result<Link> {
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("redis {}: {e}", mask_url(url));
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| fail(&e))?
            .set_tcp_settings(tcp_settings());
        let client = match tls_certificates(tls)? {
            Some(certs) => Client::build_with_tls(info, certs).map_err(|e| fail(&e))?,
            None => Client::open(info).map_err(|e| fail(&e))?,
        };
        // The pool is built on the client's connection info, which carries the TLS material.
        let manager = deadpool_redis::Manager::new_with_config(
            client.get_connection_info().clone(),
            connection_config(),
        )
        .map_err(|e| fail(&e))?;
        let pool = Pool::builder(manager)
            .max_size(32)
            .wait_timeout(Some(BOUND))
            .create_timeout(Some(BOUND))
            .recycle_timeout(Some(BOUND))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| fail(&e))?;
        Ok(Link::new(
            Source::Direct { pool, client },
            min_replicas,
            mask_url(url),
        ))
    }

    fn new(source: Source, min_replicas: u32, target: String) -> Link {
        Link {
            source,
            slots: (0..SHARED_CONNECTIONS).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            min_replicas,
            failovers: AtomicU64::new(0),
            failed_over: Notify::new(),
            target,
            lanes: Mutex::new(HashMap::new()),
            reach: Reach::default(),
            gate_closed: Notify::new(),
        }
    }

    /// The Redis this link talks to, for messages (credentials masked).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The primary's address as last connected to (Sentinel), or the masked URL.
    pub fn primary(&self) -> String {
        match &self.source {
            Source::Direct { .. } => self.target.clone(),
            Source::Sentinel { primary, .. } => primary
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default(),
        }
    }

    async fn connect(&self) -> StoreResult<MultiplexedConnection> {
        match &self.source {
            Source::Direct { pool, .. } => Ok(deadpool_redis::Connection::take(pool.get().await?)),
            Source::Sentinel {
                sentinel,
                config,
                primary,
            } => Ok(self
                .primary_client(sentinel, primary)
                .await?
                .get_multiplexed_async_connection_with_config(config)
                .await?),
        }
    }

    /// A client for dedicated connections (pub/sub): the fixed address, or the current primary.
    pub async fn client(&self) -> StoreResult<Client> {
        match &self.source {
            Source::Direct { client, .. } => Ok(client.clone()),
            Source::Sentinel {
                sentinel, primary, ..
            } => self.primary_client(sentinel, primary).await,
        }
    }
}

/// The shared test Redis (`RELAY_TEST_REDIS_ADDR`, default 127.0.0.1:6379), for unit tests of
/// the scripts' contracts; `scripts/test.sh` makes sure it runs.
#[cfg(test)]
pub(crate) async fn test_connection() -> MultiplexedConnection {
    let addr = std::env::var("RELAY_TEST_REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    Client::open(format!("redis://{addr}/0"))
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("the test Redis answers")
}

/// Runs `script` with `keys` keys and `args` arguments (placeholders); the error it answers.
#[cfg(test)]
pub(crate) async fn refusal(script: &redis::Script, keys: usize, args: usize) -> String {
    let mut inv = script.prepare_invoke();
    for i in 0..keys {
        inv.key(format!("test.contract.{i}"));
    }
    for i in 0..args {
        inv.arg(i);
    }
    match inv
        .invoke_async::<Value>(&mut test_connection().await)
        .await
    {
        Ok(v) => panic!("the script ran with {keys} keys and {args} arguments: {v:?}"),
        Err(e) => e.to_string(),
    }
}
