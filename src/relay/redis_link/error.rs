//! Why a store call failed ([`StoreError`]), with the Redis, pool and reply errors it keeps as
//! sources.

use std::sync::Arc;
use std::time::Duration;

/// Why a store call failed: the lease was lost (stop writing this shard), or Redis failed
/// (retry). Each variant keeps its cause as the error's source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("shard lease lost (fenced)")]
    Fenced,
    #[error("redis: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("redis connection pool: {0}")]
    Pool(#[source] Arc<deadpool_redis::PoolError>),
    #[error("redis: unexpected reply: {0}")]
    Reply(#[source] redis::ParsingError),
    #[error("redis: {target}: no answer within {within:?}")]
    NoAnswer { target: String, within: Duration },
    #[error("redis: the link is closed")]
    Closed,
    /// A script answered outside its contract (a count or code it cannot give): a bug or a
    /// version skew between the binary and the scripts it sent; nothing is acked on it.
    #[error("redis: script contract broken: {0}")]
    Contract(String),
    /// Written on the primary but not confirmed by enough replicas: a failover could lose it,
    /// so it counts as not stored (retry; never ack or send on it).
    #[error("redis: write confirmed by {got} of {wanted} replicas")]
    NotReplicated { wanted: u32, got: u32 },
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        // A pipeline reports its commands' errors inside one "Pipeline failure" error, so the
        // code is looked for in the message too.
        if e.code() == Some("FENCED") || e.to_string().contains("\"FENCED\"") {
            StoreError::Fenced
        } else {
            StoreError::Redis(e)
        }
    }
}

impl From<deadpool_redis::PoolError> for StoreError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        StoreError::Pool(Arc::new(e))
    }
}

impl From<redis::ParsingError> for StoreError {
    fn from(e: redis::ParsingError) -> Self {
        StoreError::Reply(e)
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
