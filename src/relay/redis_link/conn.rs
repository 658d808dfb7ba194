//! Connections: the few shared connections every step uses, the [`Conn`] wrapper that records
//! how each round trip ended, and the TCP, timeout and TLS settings.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};

#[cfg(doc)]
use super::gate::Reach;
use super::gate::{refuses_writes, write_refusal};
use super::{Link, StoreResult, BOUND};
use crate::relay::config::TlsFiles;
use crate::relay::metrics as m;

/// TCP_NODELAY: the redis crate leaves Nagle on, so on a shared connection a request written
/// while an earlier one is unacknowledged waited for that ACK (up to the 40 ms delayed-ACK
/// timer): the tens-of-ms tail of every Redis step under load.
pub(super) fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

pub(super) fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(BOUND))
        .set_response_timeout(Some(BOUND))
}

pub(super) fn tls_certificates(tls: &TlsFiles) -> anyhow::Result<Option<redis::TlsCertificates>> {
    let (ca, identity) = tls.load()?;
    if ca.is_none() && identity.is_none() {
        return Ok(None);
    }
    Ok(Some(redis::TlsCertificates {
        client_tls: identity.map(|(client_cert, client_key)| redis::ClientTlsConfig {
            client_cert,
            client_key,
        }),
        root_cert: ca,
    }))
}

impl Link {
    fn slot(&self, index: usize) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.slots[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection for one step. A pool checkout costs a round trip (deadpool pings on
    /// recycle), so steps share a few long-lived multiplexed connections, each pipelining
    /// concurrent requests; one that fails at the connection level is replaced on next use.
    pub async fn conn(self: &Arc<Self>) -> StoreResult<Conn> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        if let Some(inner) = self.slot(index).clone() {
            return Ok(Conn {
                inner,
                link: self.clone(),
                index,
            });
        }
        let inner = self.connect().await.inspect_err(|_| self.reach.failed())?;
        *self.slot(index) = Some(inner.clone());
        Ok(Conn {
            inner,
            link: self.clone(),
            index,
        })
    }
}

/// A shared connection; a connection-level error (I/O, timeout, dropped), or a primary that
/// turned replica (`READONLY` after a failover), empties its slot so the next step gets a
/// fresh connection to the current primary instead of the broken one.
pub struct Conn {
    inner: MultiplexedConnection,
    link: Arc<Link>,
    index: usize,
}

impl Conn {
    /// Records how round trip `n` ended (see [`Reach`]); a connection-level error, or a primary
    /// that turned replica, also empties the connection's slot.
    fn check(&self, n: u64, result: Result<&[Value], &redis::RedisError>) {
        let (broken, demoted, refused) = match result {
            Ok(values) => (
                false,
                values
                    .iter()
                    .any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY")),
                values.iter().any(refuses_writes),
            ),
            Err(e) => (
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error(),
                e.code() == Some("READONLY"),
                e.code().is_some_and(write_refusal),
            ),
        };
        // A script's own error (FENCED, NOSCRIPT) still came back: Redis is reachable.
        self.link.reach.end(n, !(broken || demoted || refused));
        // Counted once per broken connection, by whichever step saw it first.
        if (broken || demoted) && self.link.slot(self.index).take().is_some() {
            m::redis_reconnect();
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let watched = self.link.reach.watch();
            let result = self.inner.req_packed_command(cmd).await;
            // The outcome first: Redis must not look reachable between the two.
            self.check(watched.n, result.as_ref().map(std::slice::from_ref));
            drop(watched);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let watched = self.link.reach.watch();
            let result = self.inner.req_packed_commands(cmd, offset, count).await;
            self.check(watched.n, result.as_deref());
            drop(watched);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}
