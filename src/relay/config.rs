//! Configuration: every setting is an environment variable and a CLI flag of the same name
//! (`RELAY_SHARDS` = `--shards`). Defaults are the documented ones (docs/configuration.md).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Room a call needs beyond its timeout: the shard lease or permit must cover now + call
/// timeout + this margin when the request goes out.
pub const CALL_MARGIN: Duration = Duration::from_millis(250);

/// How much longer than the call timeout a permit lease must be at least.
const PERMIT_SLACK_MS: u64 = 1_000;

/// Settings of a worker. Tests build it with `WorkerConfig::default()` and override fields.
#[derive(Clone, Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub conn: ConnConfig,
    /// Number of shard queues; fixed for a deployment (changing it reorders task keys).
    #[arg(long, env = "RELAY_SHARDS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: u16,
    /// Fleet-wide limit of ECS calls in flight.
    #[arg(long, env = "RELAY_CONCURRENCY_LIMIT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency_limit: u32,
    /// Adaptive concurrency: `on` lowers the fleet's effective limit while ECS throttles (down
    /// to RELAY_CONCURRENCY_MIN) and raises it back to RELAY_CONCURRENCY_LIMIT; `off` keeps
    /// the fixed limit.
    #[arg(long, env = "RELAY_ADAPTIVE", default_value = "on", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub adaptive: bool,
    /// The lowest the adaptive limit goes.
    #[arg(long, env = "RELAY_CONCURRENCY_MIN", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency_min: u32,
    /// The adaptive limit halves at most once per window and grows by one per window of
    /// healthy calls.
    #[arg(long, env = "RELAY_ADAPTIVE_WINDOW_MS", default_value_t = 1_000)]
    pub adaptive_window_ms: u64,
    #[arg(long, env = "RELAY_DRAIN_MIN_MS", default_value_t = 10_000)]
    pub drain_min_ms: u64,
    #[arg(long, env = "RELAY_DRAIN_MAX_MS", default_value_t = 30_000)]
    pub drain_max_ms: u64,
    #[arg(long, env = "RELAY_BACKOFF_MIN_MS", default_value_t = 1_000)]
    pub backoff_min_ms: u64,
    #[arg(long, env = "RELAY_BACKOFF_MAX_MS", default_value_t = 30_000)]
    pub backoff_max_ms: u64,
    /// Per-task state expires after this long without activity.
    #[arg(long, env = "RELAY_TASK_RETENTION_S", default_value_t = 86_400)]
    pub task_retention_s: u64,
    /// Shard lease time; a dead worker's shards move after this long.
    #[arg(long, env = "RELAY_LEASE_MS", default_value_t = 15_000)]
    pub lease_ms: u64,
    /// Lease of one ECS-call permit; a crashed or frozen worker's permits come back after this
    /// long. At least the call timeout + 1 s.
    #[arg(long, env = "RELAY_PERMIT_LEASE_MS", default_value_t = 8_000)]
    pub permit_lease_ms: u64,
    /// Timeout of one ECS call (connect, send, answer); a call starts only while both its
    /// permit and its shard lease cover it.
    #[arg(long, env = "RELAY_CALL_TIMEOUT_MS", default_value_t = 5_000)]
    pub call_timeout_ms: u64,
    /// Unacknowledged deliveries per shard consumer (also the largest intake batch), at most;
    /// RELAY_INTAKE_MAX_BYTES may lower it.
    #[arg(long, env = "RELAY_PREFETCH", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Bytes of message bodies a worker may hold unacknowledged across all shards, a share of
    /// RELAY_SHARDS each. RabbitMQ's prefetch counts messages, not bytes, so a shard's prefetch
    /// follows the sizes it sees (see `shard::Window`), from what fits the largest messages.
    #[arg(long, env = "RELAY_INTAKE_MAX_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub intake_max_bytes: u64,
    /// Bytes of rejected messages a shard keeps in Redis while the dead-letter queue does not
    /// take them (unbound, full, broker alarm); past it a rejected message stays unacknowledged.
    #[arg(long, env = "RELAY_DEAD_LETTER_HOLD_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub dead_letter_hold_bytes: u64,
    /// `/metrics`, `/healthz`, `/readyz`; empty disables the listener.
    #[arg(long, env = "RELAY_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: String,
    /// Unique name of this worker in leases and permits (default: host name + pid).
    #[arg(long, env = "RELAY_WORKER_ID")]
    pub worker_id: Option<String>,
}

/// Where the broker and the store are; shared by every subcommand.
#[derive(Clone, Args)]
pub struct ConnConfig {
    #[arg(
        long,
        env = "RELAY_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
    #[arg(
        long,
        env = "RELAY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// Exchange agents publish to; queues, Redis keys and permits are named after it.
    #[arg(long, env = "RELAY_EXCHANGE", default_value = "ecs.state-changes")]
    pub exchange: String,
    /// Sentinels (`host:port`, comma-separated) that name the Redis primary; when set, the
    /// relay follows failovers and RELAY_REDIS_URL only supplies credentials, TLS and db.
    #[arg(long, env = "RELAY_REDIS_SENTINELS", default_value = "")]
    pub redis_sentinels: String,
    /// The Sentinel master name of the relay's Redis.
    #[arg(long, env = "RELAY_REDIS_SENTINEL_MASTER", default_value = "mymaster")]
    pub redis_sentinel_master: String,
    /// Replicas that must confirm (WAIT) each write the relay acts on before it acks or sends.
    #[arg(long, env = "RELAY_REDIS_MIN_REPLICAS", default_value_t = 0)]
    pub redis_min_replicas: u32,
    /// File holding the RabbitMQ password (a mounted secret); replaces the URL's password.
    #[arg(long, env = "RELAY_AMQP_PASSWORD_FILE")]
    pub amqp_password_file: Option<std::path::PathBuf>,
    /// File holding the Redis (ACL user's) password; replaces the URL's password.
    #[arg(long, env = "RELAY_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<std::path::PathBuf>,
    /// CA certificates (PEM) that RabbitMQ's certificate must chain to (amqps://).
    #[arg(long, env = "RELAY_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for RabbitMQ servers that ask for one; with the key file.
    #[arg(long, env = "RELAY_AMQP_CERT_FILE")]
    pub amqp_cert_file: Option<PathBuf>,
    /// Private key (PKCS#8 PEM) of the RabbitMQ client certificate.
    #[arg(long, env = "RELAY_AMQP_KEY_FILE")]
    pub amqp_key_file: Option<PathBuf>,
    /// CA certificates (PEM) that Redis's certificate must chain to (rediss://).
    #[arg(long, env = "RELAY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for Redis servers that ask for one; with the key file.
    #[arg(long, env = "RELAY_REDIS_CERT_FILE")]
    pub redis_cert_file: Option<PathBuf>,
    /// Private key (PEM) of the Redis client certificate.
    #[arg(long, env = "RELAY_REDIS_KEY_FILE")]
    pub redis_key_file: Option<PathBuf>,
}

/// TLS material for one connection, read from files at connect time.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// PEM bytes of a client certificate and its key.
pub type Identity = (Vec<u8>, Vec<u8>);

impl TlsFiles {
    /// (CA PEM, client identity); errors name the file.
    pub fn load(&self) -> anyhow::Result<(Option<Vec<u8>>, Option<Identity>)> {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| anyhow::anyhow!("cannot read TLS file {}: {e}", p.display()))
        };
        let ca = self.ca.as_ref().map(read).transpose()?;
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => anyhow::bail!("a client certificate needs both its certificate and its key file"),
        };
        Ok((ca, identity))
    }
}

impl ConnConfig {
    pub fn amqp_tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.amqp_ca_file.clone(),
            cert: self.amqp_cert_file.clone(),
            key: self.amqp_key_file.clone(),
        }
    }

    /// The Sentinel addresses of RELAY_REDIS_SENTINELS (empty: none).
    pub fn sentinels(&self) -> Vec<String> {
        self.redis_sentinels
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    pub fn redis_tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.redis_ca_file.clone(),
            cert: self.redis_cert_file.clone(),
            key: self.redis_key_file.clone(),
        }
    }

    /// Puts the passwords from the password files into the URLs (once, at start). Errors name
    /// the file, never its content.
    pub fn resolve_secrets(&mut self) -> anyhow::Result<()> {
        if let Some(path) = self.amqp_password_file.take() {
            self.amqp_url = with_password(&self.amqp_url, &path)?;
        }
        if let Some(path) = self.redis_password_file.take() {
            self.redis_url = with_password(&self.redis_url, &path)?;
        }
        Ok(())
    }
}

/// Puts the password of `path` into every URL of the (comma-separated) list.
fn with_password(raw: &str, path: &std::path::Path) -> anyhow::Result<String> {
    let secret = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read password file {}: {e}", path.display()))?;
    let secret = secret.trim_end_matches(['\r', '\n']);
    let urls = url_list(raw)
        .into_iter()
        .map(|u| url_with_password(u, secret))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(urls.join(","))
}

fn url_with_password(raw: &str, secret: &str) -> anyhow::Result<String> {
    let mut url =
        url::Url::parse(raw).map_err(|e| anyhow::anyhow!("invalid URL {}: {e}", mask_url(raw)))?;
    if url.username().is_empty() && url.scheme().starts_with("amqp") {
        anyhow::bail!(
            "{}: a password file needs a user name in the URL",
            mask_url(raw)
        );
    }
    url.set_password(Some(secret))
        .map_err(|_| anyhow::anyhow!("{}: cannot carry a password", mask_url(raw)))?;
    Ok(url.to_string())
}

impl Default for ConnConfig {
    fn default() -> Self {
        Self {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/0".into(),
            exchange: "ecs.state-changes".into(),
            redis_sentinels: String::new(),
            redis_sentinel_master: "mymaster".into(),
            redis_min_replicas: 0,
            amqp_password_file: None,
            redis_password_file: None,
            amqp_ca_file: None,
            amqp_cert_file: None,
            amqp_key_file: None,
            redis_ca_file: None,
            redis_cert_file: None,
            redis_key_file: None,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            conn: ConnConfig::default(),
            shards: 16,
            concurrency_limit: 10,
            adaptive: true,
            concurrency_min: 1,
            adaptive_window_ms: 1_000,
            drain_min_ms: 10_000,
            drain_max_ms: 30_000,
            backoff_min_ms: 1_000,
            backoff_max_ms: 30_000,
            task_retention_s: 86_400,
            lease_ms: 15_000,
            permit_lease_ms: 8_000,
            call_timeout_ms: 5_000,
            prefetch: 256,
            intake_max_bytes: 128 * 1024 * 1024,
            dead_letter_hold_bytes: 16 * 1024 * 1024,
            metrics_addr: "0.0.0.0:9464".into(),
            worker_id: None,
        }
    }
}

impl WorkerConfig {
    /// Rejects combinations that would break a guarantee, with a message naming the settings.
    pub fn validate(&self) -> Result<(), String> {
        if self.drain_min_ms == 0 || self.drain_min_ms > self.drain_max_ms {
            return Err("RELAY_DRAIN_MIN_MS must be > 0 and <= RELAY_DRAIN_MAX_MS".into());
        }
        if self.concurrency_min > self.concurrency_limit {
            return Err("RELAY_CONCURRENCY_MIN must be <= RELAY_CONCURRENCY_LIMIT".into());
        }
        // Shorter than a call, one overload would be halved many times over; the upper bound
        // keeps the hash's expiry (60 windows) in range.
        if !(50..=600_000).contains(&self.adaptive_window_ms) {
            return Err("RELAY_ADAPTIVE_WINDOW_MS must be between 50 and 600000".into());
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            return Err("RELAY_BACKOFF_MIN_MS must be > 0 and <= RELAY_BACKOFF_MAX_MS".into());
        }
        if self.call_timeout_ms == 0 {
            return Err("RELAY_CALL_TIMEOUT_MS must be > 0".into());
        }
        // A call that outlived its permit could run beside a call that took the expired permit;
        // the extra second lets a permit be handed to the next call of the same worker.
        let permit_min = self.call_timeout_ms + PERMIT_SLACK_MS;
        if self.permit_lease_ms < permit_min {
            return Err(format!(
                "RELAY_PERMIT_LEASE_MS ({}) must be at least RELAY_CALL_TIMEOUT_MS + {PERMIT_SLACK_MS} ({permit_min})",
                self.permit_lease_ms
            ));
        }
        if self.lease_ms < 300 {
            return Err("RELAY_LEASE_MS must be at least 300".into());
        }
        // A call starts only while the shard lease surely covers it, and the lease is renewed
        // every third of its time: a whole call must fit in what is left just before a renewal.
        let call_max = self.call_window().as_millis() as u64;
        if self.call_timeout_ms > call_max {
            return Err(format!(
                "RELAY_CALL_TIMEOUT_MS ({}) must fit in the shard lease: at most 7/15 of RELAY_LEASE_MS less {} ms ({call_max} with RELAY_LEASE_MS={})",
                self.call_timeout_ms,
                CALL_MARGIN.as_millis(),
                self.lease_ms
            ));
        }
        // The largest message with its held header must fit, or a hold would refuse it always.
        if self.dead_letter_hold_bytes < 2 * crate::relay::wire::MAX_MESSAGE_BYTES as u64 {
            return Err(format!(
                "RELAY_DEAD_LETTER_HOLD_BYTES must be at least {} (two of the largest messages)",
                2 * crate::relay::wire::MAX_MESSAGE_BYTES
            ));
        }
        if self.task_retention_s == 0 {
            return Err("RELAY_TASK_RETENTION_S must be > 0".into());
        }
        // A failing task is marked active at each retry; its longest sleep must not look idle.
        if self.task_retention_s.saturating_mul(1000) < 2 * self.backoff_max_ms {
            return Err(format!(
                "RELAY_TASK_RETENTION_S ({} s) must be at least twice RELAY_BACKOFF_MAX_MS ({} ms)",
                self.task_retention_s, self.backoff_max_ms
            ));
        }
        Ok(())
    }

    /// The longest call the shard lease can cover between two renewals: a lease is counted on
    /// for 8/10 of its time (clock drift), renewed every third, and a call needs a margin.
    fn call_window(&self) -> Duration {
        let lease = self.lease();
        (lease.mul_f64(0.8) - lease / 3).saturating_sub(CALL_MARGIN)
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

/// Hides the password of a URL (`amqp://user:***@host`), or of each URL of a comma-separated
/// list (`RELAY_AMQP_URL` may name every node of a cluster), for logs and errors.
pub fn mask_url(raw: &str) -> String {
    raw.split(',').map(mask_one).collect::<Vec<_>>().join(",")
}

/// The URLs of a comma-separated list, in order.
pub fn url_list(raw: &str) -> Vec<&str> {
    raw.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

fn mask_one(raw: &str) -> String {
    let raw = raw.trim();
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        // Unparseable: show only the scheme, the rest may hold a secret.
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://<unparseable>"),
            None => "<unparseable url>".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_password_of_a_url_list() {
        let list = "amqp://relay:one@n1:5672/%2f,amqp://relay:two@n2:5672/%2f, amqp://relay:three@n3:5672/%2f";
        let masked = mask_url(list);
        for secret in ["one", "two", "three"] {
            assert!(!masked.contains(secret), "{masked}");
        }
        assert_eq!(masked.matches("relay:***@").count(), 3, "{masked}");
        assert_eq!(url_list(list).len(), 3);
    }

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(mask_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(mask_url("redis://h:6379/0"), "redis://h:6379/0");
        assert!(!mask_url("amqp://u:p@ss@[bad").contains("p@ss"));
    }

    /// The flags' defaults and `Default` are written twice; they must agree.
    #[test]
    fn cli_defaults_match_default() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            cfg: WorkerConfig,
        }
        if std::env::vars().any(|(k, _)| k.starts_with("RELAY_")) {
            return; // an operator's environment would change the parsed values
        }
        let parsed = Cli::parse_from(["worker"]).cfg;
        let d = WorkerConfig::default();
        assert_eq!(parsed.conn.amqp_url, d.conn.amqp_url);
        assert_eq!(parsed.conn.redis_url, d.conn.redis_url);
        assert_eq!(parsed.conn.exchange, d.conn.exchange);
        assert_eq!(
            (
                parsed.shards,
                parsed.concurrency_limit,
                parsed.drain_min_ms,
                parsed.drain_max_ms
            ),
            (
                d.shards,
                d.concurrency_limit,
                d.drain_min_ms,
                d.drain_max_ms
            )
        );
        assert_eq!(
            (
                parsed.backoff_min_ms,
                parsed.backoff_max_ms,
                parsed.task_retention_s,
                parsed.lease_ms
            ),
            (
                d.backoff_min_ms,
                d.backoff_max_ms,
                d.task_retention_s,
                d.lease_ms
            )
        );
        assert_eq!(
            (
                parsed.permit_lease_ms,
                parsed.call_timeout_ms,
                parsed.prefetch
            ),
            (d.permit_lease_ms, d.call_timeout_ms, d.prefetch)
        );
        assert_eq!(
            (
                parsed.adaptive,
                parsed.concurrency_min,
                parsed.adaptive_window_ms
            ),
            (d.adaptive, d.concurrency_min, d.adaptive_window_ms)
        );
        assert_eq!(parsed.dead_letter_hold_bytes, d.dead_letter_hold_bytes);
        assert_eq!(parsed.intake_max_bytes, d.intake_max_bytes);
        assert_eq!(parsed.metrics_addr, d.metrics_addr);
        assert_eq!(parsed.worker_id, d.worker_id);
    }

    #[test]
    fn password_files_fill_the_urls() {
        let dir = std::env::temp_dir().join(format!("relay-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("amqp"), "s3cr3t/with@chars\n").unwrap();
        std::fs::write(dir.join("redis"), "r3d1s\n").unwrap();
        let mut c = ConnConfig {
            amqp_url: "amqp://relay@rabbit:5672/%2f".into(),
            redis_url: "redis://default@redis:6379/0".into(),
            amqp_password_file: Some(dir.join("amqp")),
            redis_password_file: Some(dir.join("redis")),
            ..ConnConfig::default()
        };
        c.resolve_secrets().unwrap();
        let amqp = url::Url::parse(&c.amqp_url).unwrap();
        assert_eq!(amqp.password(), Some("s3cr3t%2Fwith%40chars"));
        assert_eq!(
            url::Url::parse(&c.redis_url).unwrap().password(),
            Some("r3d1s")
        );
        assert!(!mask_url(&c.amqp_url).contains("s3cr3t"));
        let mut missing = ConnConfig {
            amqp_password_file: Some(dir.join("nope")),
            ..ConnConfig::default()
        };
        let err = missing.resolve_secrets().unwrap_err().to_string();
        assert!(
            err.contains("nope") && !err.contains("guest:guest"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn timings_that_would_let_a_call_outlive_its_permit_or_lease_are_refused() {
        assert!(WorkerConfig::default().validate().is_ok());
        let c = WorkerConfig {
            call_timeout_ms: 7_500,
            ..Default::default()
        };
        let err = c.validate().unwrap_err();
        assert!(err.contains("RELAY_PERMIT_LEASE_MS (8000)"), "{err}");
        let c = WorkerConfig {
            call_timeout_ms: 6_000,
            permit_lease_ms: 20_000,
            lease_ms: 10_000,
            ..Default::default()
        };
        let err = c.validate().unwrap_err();
        assert!(err.contains("must fit in the shard lease"), "{err}");
        let c = WorkerConfig {
            task_retention_s: 30,
            ..Default::default()
        };
        let err = c.validate().unwrap_err();
        assert!(err.contains("RELAY_TASK_RETENTION_S"), "{err}");
    }

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

    #[test]
    fn adaptive_settings_out_of_range_are_refused() {
        for window in [0, 49, 600_001] {
            let c = WorkerConfig {
                adaptive_window_ms: window,
                ..Default::default()
            };
            let err = c.validate().unwrap_err();
            assert!(err.contains("RELAY_ADAPTIVE_WINDOW_MS"), "{window}: {err}");
        }
        let c = WorkerConfig {
            concurrency_min: 11,
            ..Default::default()
        };
        let err = c.validate().unwrap_err();
        assert!(err.contains("RELAY_CONCURRENCY_MIN"), "{err}");
    }
}
