//! Sentinel discovery: the primary Sentinel names for the master, asked again for every new
//! connection, and the failovers followed that way.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr};

use super::conn::{connection_config, tcp_settings, tls_certificates};
use super::{Link, Source, StoreError, StoreResult, BOUND};
use crate::relay::config::{mask_url, TlsFiles};
use crate::relay::metrics as m;

/// How to reach the Sentinels themselves (RELAY_REDIS_SENTINEL_USERNAME, _PASSWORD_FILE,
/// _TLS): most production Sentinels ask for a password, many for TLS.
#[derive(Clone, Debug, Default)]
pub struct SentinelAuth {
    pub username: String,
    pub password_file: Option<std::path::PathBuf>,
    /// TLS to the Sentinels, with the Redis TLS files.
    pub tls: bool,
}

impl Link {
    /// The primary of `master` as the Sentinels at `sentinels` (`host:port`) name it, reached
    /// with `auth`. `url`
    /// supplies the data nodes' credentials, TLS (`rediss://`) and database; its host is unused.
    pub fn sentinel(
        sentinels: &[String],
        master: &str,
        url: &str,
        tls: &TlsFiles,
        auth: &SentinelAuth,
        min_replicas: u32,
    ) -> anyhow::Result<Link> {
        let target = format!("Sentinel master {master:?} via {}", sentinels.join(","));
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("redis {target}: {e}");
        let mut addrs = Vec::new();
        for s in sentinels {
            let (host, port) = s
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("RELAY_REDIS_SENTINELS: {s:?} is not host:port"))?;
            // The client wants TLS Sentinels named as such; their TLS settings come below.
            addrs.push(if auth.tls {
                ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host, port)
            });
        }
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| anyhow::anyhow!("RELAY_REDIS_URL {}: {e}", mask_url(url)))?;
        let redis_info = info.redis_settings();
        let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
            .map_err(|e| fail(&e))?
            .set_client_to_redis_db(redis_info.db())
            .set_client_to_redis_tcp_settings(tcp_settings());
        if let Some(user) = redis_info.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = redis_info.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if url.starts_with("rediss://") {
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = tls_certificates(tls)? {
                builder = builder.set_client_to_redis_certificates(certs);
            }
        }
        if !auth.username.is_empty() {
            builder = builder.set_client_to_sentinel_username(&auth.username);
        }
        if let Some(path) = &auth.password_file {
            let password = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read Sentinel password file {}: {e}", path.display())
            })?;
            // An empty file means no AUTH, as no file does.
            let password = password.trim_end_matches(['\r', '\n']);
            if !password.is_empty() {
                builder = builder.set_client_to_sentinel_password(password);
            }
        }
        if auth.tls {
            builder = builder.set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = tls_certificates(tls)? {
                builder = builder.set_client_to_sentinel_certificates(certs);
            }
        }
        let sentinel = builder.build().map_err(|e| fail(&e))?;
        Ok(Link::new(
            Source::Sentinel {
                sentinel: Box::new(tokio::sync::Mutex::new(sentinel)),
                config: connection_config(),
                primary: Mutex::new(None),
            },
            min_replicas,
            target,
        ))
    }

    /// Asks the Sentinels for the primary (and checks its ROLE); counts a changed address as a
    /// failover.
    pub(super) async fn primary_client(
        &self,
        sentinel: &tokio::sync::Mutex<redis::sentinel::SentinelClient>,
        primary: &Mutex<Option<String>>,
    ) -> StoreResult<Client> {
        let client = tokio::time::timeout(BOUND, async {
            sentinel.lock().await.async_get_client().await
        })
        .await
        .map_err(|_| StoreError::NoAnswer {
            target: self.target.clone(),
            within: BOUND,
        })??;
        let addr = client.get_connection_info().addr().to_string();
        let mut last = primary.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref().is_some_and(|a| a != addr) {
            tracing::warn!(primary = %addr, previous = last.as_deref().unwrap_or(""),
                "Redis failover: Sentinel names a new primary");
            m::redis_failover();
            self.failovers.fetch_add(1, Ordering::SeqCst);
            // Connections to the old primary must not serve another step (it may still be up
            // on the far side of a partition).
            for slot in &self.slots {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            self.failed_over.notify_waiters();
        }
        *last = Some(addr);
        Ok(client)
    }

    /// How many failovers this link has followed; a lease renewed before the last one is
    /// checked again before it is counted on.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::SeqCst)
    }

    /// Resolves when the next failover is seen; `enable` it before looking at the state it
    /// guards, so that a failover in between is not missed.
    pub fn failed_over(&self) -> tokio::sync::futures::Notified<'_> {
        self.failed_over.notified()
    }
}
