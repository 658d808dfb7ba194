//! Configuration: every setting is an environment variable and a CLI flag of the same name
//! (`RELAY_SHARDS` = `--shards`). Defaults are the documented ones (docs/configuration.md).
//!
//! One file per concern. Here: the worker's own settings ([`WorkerConfig`]), every default
//! ([`defaults`]) and [`AuthMode`]; `conn.rs`: the connection settings every subcommand shares
//! ([`ConnConfig`], TLS and password files, URL lists and their masking); `env.rs`:
//! [`WorkerConfig::to_env`]; `validate.rs`: the checks behind [`WorkerConfig::validate`]. A new
//! group of settings gets a file of its own like `conn.rs` (a struct flattened into
//! [`WorkerConfig`], with its `Default` and `to_env`), its defaults in [`defaults`] and its
//! checks in `validate.rs`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

mod conn;
mod env;
mod validate;

pub use conn::{mask_url, url_list, ConnConfig, Identity, TlsFiles};
pub use validate::{ConfigErrors, Validated};

/// Room a call needs beyond its timeout: the shard lease or permit must cover now + call
/// timeout + this margin when the request goes out.
pub const CALL_MARGIN: Duration = Duration::from_millis(250);

/// Cover a sender wants beyond a whole call before it takes a permit and builds the request:
/// room for building, signing and connecting, so that the send-time check passes.
pub const PREPARE_SLACK: Duration = Duration::from_millis(200);

/// Every default, defined once: the flags (and so `--help`) and `Default` both read them.
pub mod defaults {
    pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
    pub const EXCHANGE: &str = "ecs.state-changes";
    pub const REDIS_SENTINELS: &str = "";
    pub const REDIS_SENTINEL_MASTER: &str = "mymaster";
    pub const REDIS_MIN_REPLICAS: u32 = 0;
    pub const SHARDS: u16 = 16;
    pub const CONCURRENCY_LIMIT: u32 = 10;
    pub const ADAPTIVE: bool = true;
    pub const CONCURRENCY_MIN: u32 = 1;
    pub const ADAPTIVE_WINDOW_MS: u64 = 1_000;
    pub const DRAIN_MIN_MS: u64 = 10_000;
    pub const DRAIN_MAX_MS: u64 = 30_000;
    pub const BACKOFF_MIN_MS: u64 = 1_000;
    pub const BACKOFF_MAX_MS: u64 = 30_000;
    pub const TASK_RETENTION_S: u64 = 86_400;
    pub const LEASE_MS: u64 = 15_000;
    pub const PERMIT_LEASE_MS: u64 = 8_000;
    pub const CALL_TIMEOUT_MS: u64 = 5_000;
    pub const PREFETCH: u16 = 256;
    pub const INTAKE_MAX_BYTES: u64 = 128 * 1024 * 1024;
    pub const DEAD_LETTER_HOLD_BYTES: u64 = 16 * 1024 * 1024;
    pub const METRICS_ADDR: &str = "0.0.0.0:9464";
    pub const INSPECT: bool = true;
    pub const PRODUCER_AUTH: super::AuthMode = super::AuthMode::Acl;
    pub const ECS_ACCOUNTS: &str = "";
}

/// `RELAY_PRODUCER_AUTH`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Refuse what the ACL does not allow.
    Acl,
    /// Check, count and log what would be refused, but forward it (for rolling the check out).
    Audit,
    /// No identity check (a warning at start).
    Off,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Acl => "acl",
            AuthMode::Audit => "audit",
            AuthMode::Off => "off",
        }
    }
}

/// Settings of a worker. Tests build it with `WorkerConfig::default()` and override fields;
/// [`WorkerConfig::validate`] turns it into the [`Validated`] form a worker runs on.
#[derive(Clone, PartialEq, Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub conn: ConnConfig,
    /// Number of shard queues; fixed for a deployment (changing it reorders task keys).
    #[arg(long, env = "RELAY_SHARDS", default_value_t = defaults::SHARDS, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: u16,
    /// Fleet-wide limit of ECS calls in flight.
    #[arg(long, env = "RELAY_CONCURRENCY_LIMIT", default_value_t = defaults::CONCURRENCY_LIMIT, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency_limit: u32,
    /// Adaptive concurrency: `on` lowers the fleet's effective limit while ECS throttles (down
    /// to RELAY_CONCURRENCY_MIN) and raises it back to RELAY_CONCURRENCY_LIMIT; `off` keeps
    /// the fixed limit.
    #[arg(long, env = "RELAY_ADAPTIVE", default_value = on_off(defaults::ADAPTIVE), value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub adaptive: bool,
    /// The lowest the adaptive limit goes.
    #[arg(long, env = "RELAY_CONCURRENCY_MIN", default_value_t = defaults::CONCURRENCY_MIN, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency_min: u32,
    /// The adaptive limit halves at most once per window and grows by one per window of
    /// healthy calls.
    #[arg(long, env = "RELAY_ADAPTIVE_WINDOW_MS", default_value_t = defaults::ADAPTIVE_WINDOW_MS)]
    pub adaptive_window_ms: u64,
    #[arg(long, env = "RELAY_DRAIN_MIN_MS", default_value_t = defaults::DRAIN_MIN_MS)]
    pub drain_min_ms: u64,
    #[arg(long, env = "RELAY_DRAIN_MAX_MS", default_value_t = defaults::DRAIN_MAX_MS)]
    pub drain_max_ms: u64,
    #[arg(long, env = "RELAY_BACKOFF_MIN_MS", default_value_t = defaults::BACKOFF_MIN_MS)]
    pub backoff_min_ms: u64,
    #[arg(long, env = "RELAY_BACKOFF_MAX_MS", default_value_t = defaults::BACKOFF_MAX_MS)]
    pub backoff_max_ms: u64,
    /// Per-task state expires after this long without activity.
    #[arg(long, env = "RELAY_TASK_RETENTION_S", default_value_t = defaults::TASK_RETENTION_S)]
    pub task_retention_s: u64,
    /// Shard lease time; a dead worker's shards move after this long.
    #[arg(long, env = "RELAY_LEASE_MS", default_value_t = defaults::LEASE_MS)]
    pub lease_ms: u64,
    /// Lease of one ECS-call permit; a crashed or frozen worker's permits come back after this
    /// long. At least the call timeout + 1 s.
    #[arg(long, env = "RELAY_PERMIT_LEASE_MS", default_value_t = defaults::PERMIT_LEASE_MS)]
    pub permit_lease_ms: u64,
    /// Timeout of one ECS call (connect, send, answer); a call starts only while both its
    /// permit and its shard lease cover it.
    #[arg(long, env = "RELAY_CALL_TIMEOUT_MS", default_value_t = defaults::CALL_TIMEOUT_MS)]
    pub call_timeout_ms: u64,
    /// Unacknowledged deliveries per shard consumer (also the largest intake batch), at most;
    /// RELAY_INTAKE_MAX_BYTES may lower it.
    #[arg(long, env = "RELAY_PREFETCH", default_value_t = defaults::PREFETCH, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Bytes of message bodies a worker may hold unacknowledged across all shards, a share of
    /// RELAY_SHARDS each. RabbitMQ's prefetch counts messages, not bytes, so a shard's prefetch
    /// follows the sizes it sees (see `shard::Window`), from what fits the largest messages.
    #[arg(long, env = "RELAY_INTAKE_MAX_BYTES", default_value_t = defaults::INTAKE_MAX_BYTES)]
    pub intake_max_bytes: u64,
    /// Bytes of rejected messages a shard keeps in Redis while the dead-letter queue does not
    /// take them (unbound, full, broker alarm); past it a rejected message stays unacknowledged.
    #[arg(long, env = "RELAY_DEAD_LETTER_HOLD_BYTES", default_value_t = defaults::DEAD_LETTER_HOLD_BYTES)]
    pub dead_letter_hold_bytes: u64,
    /// `/metrics`, `/healthz`, `/readyz`, `/inspect?key=`; empty disables the listener.
    #[arg(long, env = "RELAY_METRICS_ADDR", default_value = defaults::METRICS_ADDR)]
    pub metrics_addr: String,
    /// `/inspect?key=` on the metrics port (what `ecs-state-relay inspect` asks): `on` answers
    /// with what this worker holds of a task (its state, attempts, ECS's last error cut to 200
    /// bytes) to anyone who reaches the port; `off` answers 404 and announces no address.
    #[arg(long, env = "RELAY_INSPECT", default_value = on_off(defaults::INSPECT), value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub inspect: bool,
    /// Producer identity: `acl` refuses what RELAY_PRODUCER_ACL does not allow, `audit` counts
    /// and logs it but forwards it, `off` checks nothing (a warning at start).
    #[arg(long, env = "RELAY_PRODUCER_AUTH", value_enum, default_value_t = defaults::PRODUCER_AUTH)]
    pub producer_auth: AuthMode,
    /// JSON file of broker users (or `{cluster}` templates of them) to the cluster patterns
    /// they may publish for; read again when it changes. Required unless RELAY_PRODUCER_AUTH=off.
    #[arg(long, env = "RELAY_PRODUCER_ACL")]
    pub producer_acl: Option<PathBuf>,
    /// Comma-separated 12-digit accounts the relay's ECS identity acts for; empty: not checked.
    #[arg(long, env = "RELAY_ECS_ACCOUNTS", default_value = defaults::ECS_ACCOUNTS)]
    pub ecs_accounts: String,
    /// Unique name of this worker in leases and permits (default: host name + pid).
    #[arg(long, env = "RELAY_WORKER_ID")]
    pub worker_id: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            conn: ConnConfig::default(),
            shards: defaults::SHARDS,
            concurrency_limit: defaults::CONCURRENCY_LIMIT,
            adaptive: defaults::ADAPTIVE,
            concurrency_min: defaults::CONCURRENCY_MIN,
            adaptive_window_ms: defaults::ADAPTIVE_WINDOW_MS,
            drain_min_ms: defaults::DRAIN_MIN_MS,
            drain_max_ms: defaults::DRAIN_MAX_MS,
            backoff_min_ms: defaults::BACKOFF_MIN_MS,
            backoff_max_ms: defaults::BACKOFF_MAX_MS,
            task_retention_s: defaults::TASK_RETENTION_S,
            lease_ms: defaults::LEASE_MS,
            permit_lease_ms: defaults::PERMIT_LEASE_MS,
            call_timeout_ms: defaults::CALL_TIMEOUT_MS,
            prefetch: defaults::PREFETCH,
            intake_max_bytes: defaults::INTAKE_MAX_BYTES,
            dead_letter_hold_bytes: defaults::DEAD_LETTER_HOLD_BYTES,
            metrics_addr: defaults::METRICS_ADDR.into(),
            inspect: defaults::INSPECT,
            producer_auth: defaults::PRODUCER_AUTH,
            producer_acl: None,
            ecs_accounts: defaults::ECS_ACCOUNTS.into(),
            worker_id: None,
        }
    }
}

/// How `RELAY_ADAPTIVE` is written.
const fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

impl WorkerConfig {
    /// The accounts of RELAY_ECS_ACCOUNTS (empty: any).
    pub fn ecs_accounts(&self) -> Vec<String> {
        url_list(&self.ecs_accounts)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// A shard consumer's first prefetch: RELAY_PREFETCH, lowered so that a window of the
    /// largest messages fits in the shard's share of RELAY_INTAKE_MAX_BYTES (a worker may own
    /// every shard).
    pub fn shard_prefetch(&self) -> u16 {
        let per_shard = self.intake_max_bytes
            / (u64::from(self.shards) * crate::relay::wire::MAX_MESSAGE_BYTES as u64);
        u16::try_from(per_shard)
            .unwrap_or(u16::MAX)
            .clamp(1, self.prefetch)
    }

    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        })
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefetch_fits_the_intake_budget() {
        let mut c = WorkerConfig::default();
        assert_eq!(
            c.shard_prefetch(),
            32,
            "128 MiB over 16 shards of 256 KiB messages"
        );
        c.shards = 1;
        assert_eq!(c.shard_prefetch(), 256, "never above RELAY_PREFETCH");
        c.shards = 1024;
        assert_eq!(c.shard_prefetch(), 1, "never below one");
        c.shards = 16;
        c.intake_max_bytes = u64::MAX;
        assert_eq!(c.shard_prefetch(), 256);
    }
}
