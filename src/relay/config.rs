//! Configuration: every setting is an environment variable and a CLI flag of the same name
//! (`RELAY_SHARDS` = `--shards`). Defaults are the documented ones (docs/configuration.md).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Room a call needs beyond its timeout: the shard lease or permit must cover now + call
/// timeout + this margin when the request goes out.
pub const CALL_MARGIN: Duration = Duration::from_millis(250);

/// Cover a sender wants beyond a whole call before it takes a permit and builds the request:
/// room for building, signing and connecting, so that the send-time check passes.
pub const PREPARE_SLACK: Duration = Duration::from_millis(200);

/// How much longer than the call timeout a permit lease must be at least.
const PERMIT_SLACK_MS: u64 = 1_000;

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

/// Where the broker and the store are; shared by every subcommand.
#[derive(Clone, PartialEq, Args)]
pub struct ConnConfig {
    #[arg(
        long,
        env = "RELAY_AMQP_URL",
        default_value = defaults::AMQP_URL,
        hide_env_values = true
    )]
    pub amqp_url: String,
    #[arg(
        long,
        env = "RELAY_REDIS_URL",
        default_value = defaults::REDIS_URL,
        hide_env_values = true
    )]
    pub redis_url: String,
    /// Exchange agents publish to; queues, Redis keys and permits are named after it.
    #[arg(long, env = "RELAY_EXCHANGE", default_value = defaults::EXCHANGE)]
    pub exchange: String,
    /// Sentinels (`host:port`, comma-separated) that name the Redis primary; when set, the
    /// relay follows failovers and RELAY_REDIS_URL only supplies credentials, TLS and db.
    #[arg(long, env = "RELAY_REDIS_SENTINELS", default_value = defaults::REDIS_SENTINELS)]
    pub redis_sentinels: String,
    /// The Sentinel master name of the relay's Redis.
    #[arg(long, env = "RELAY_REDIS_SENTINEL_MASTER", default_value = defaults::REDIS_SENTINEL_MASTER)]
    pub redis_sentinel_master: String,
    /// User to AUTH as at the Sentinels (empty: the default user, with a password file).
    #[arg(long, env = "RELAY_REDIS_SENTINEL_USERNAME", default_value = "")]
    pub redis_sentinel_username: String,
    /// File holding the Sentinels' password (`requirepass` / ACL); empty: no AUTH.
    #[arg(long, env = "RELAY_REDIS_SENTINEL_PASSWORD_FILE")]
    pub redis_sentinel_password_file: Option<std::path::PathBuf>,
    /// `on`: TLS to the Sentinels too, with RELAY_REDIS_CA_FILE, _CERT_FILE and _KEY_FILE.
    #[arg(long, env = "RELAY_REDIS_SENTINEL_TLS", default_value = on_off(false), value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub redis_sentinel_tls: bool,
    /// Replicas that must confirm (WAIT) each write the relay acts on before it acks or sends.
    #[arg(long, env = "RELAY_REDIS_MIN_REPLICAS", default_value_t = defaults::REDIS_MIN_REPLICAS)]
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
            amqp_url: defaults::AMQP_URL.into(),
            redis_url: defaults::REDIS_URL.into(),
            exchange: defaults::EXCHANGE.into(),
            redis_sentinels: defaults::REDIS_SENTINELS.into(),
            redis_sentinel_master: defaults::REDIS_SENTINEL_MASTER.into(),
            redis_sentinel_username: String::new(),
            redis_sentinel_password_file: None,
            redis_sentinel_tls: false,
            redis_min_replicas: defaults::REDIS_MIN_REPLICAS,
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

impl ConnConfig {
    /// Every setting as the environment variable a worker reads it from (files and TLS only
    /// when set). The one way tests, the bench and the demo hand a configuration to a process.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("RELAY_AMQP_URL", self.amqp_url.clone()),
            ("RELAY_REDIS_URL", self.redis_url.clone()),
            ("RELAY_EXCHANGE", self.exchange.clone()),
            ("RELAY_REDIS_SENTINELS", self.redis_sentinels.clone()),
            (
                "RELAY_REDIS_SENTINEL_MASTER",
                self.redis_sentinel_master.clone(),
            ),
            (
                "RELAY_REDIS_MIN_REPLICAS",
                self.redis_min_replicas.to_string(),
            ),
            (
                "RELAY_REDIS_SENTINEL_USERNAME",
                self.redis_sentinel_username.clone(),
            ),
            (
                "RELAY_REDIS_SENTINEL_TLS",
                on_off(self.redis_sentinel_tls).to_string(),
            ),
        ];
        let files = [
            ("RELAY_AMQP_PASSWORD_FILE", &self.amqp_password_file),
            ("RELAY_REDIS_PASSWORD_FILE", &self.redis_password_file),
            (
                "RELAY_REDIS_SENTINEL_PASSWORD_FILE",
                &self.redis_sentinel_password_file,
            ),
            ("RELAY_AMQP_CA_FILE", &self.amqp_ca_file),
            ("RELAY_AMQP_CERT_FILE", &self.amqp_cert_file),
            ("RELAY_AMQP_KEY_FILE", &self.amqp_key_file),
            ("RELAY_REDIS_CA_FILE", &self.redis_ca_file),
            ("RELAY_REDIS_CERT_FILE", &self.redis_cert_file),
            ("RELAY_REDIS_KEY_FILE", &self.redis_key_file),
        ];
        for (name, file) in files {
            if let Some(path) = file {
                env.push((name, path.display().to_string()));
            }
        }
        env
    }
}

/// A configuration that passed [`WorkerConfig::validate`]: the only kind a worker runs on.
#[derive(Clone)]
pub struct Validated(WorkerConfig);

impl Validated {
    /// Puts the password files' secrets into the URLs (read once, at start): they change no
    /// other setting, so the configuration stays valid.
    pub fn with_secrets(mut self) -> anyhow::Result<Validated> {
        self.0.conn.resolve_secrets()?;
        Ok(self)
    }

    pub fn into_inner(self) -> WorkerConfig {
        self.0
    }
}

impl std::ops::Deref for Validated {
    type Target = WorkerConfig;
    fn deref(&self) -> &WorkerConfig {
        &self.0
    }
}

/// Every problem of a configuration, one per line of the message.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

impl WorkerConfig {
    /// Every setting as the environment variable a worker reads it from; the worker id only
    /// when set. `to_env` then parsing gives the same configuration (tested).
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.conn.to_env();
        env.extend([
            ("RELAY_SHARDS", self.shards.to_string()),
            (
                "RELAY_CONCURRENCY_LIMIT",
                self.concurrency_limit.to_string(),
            ),
            ("RELAY_ADAPTIVE", on_off(self.adaptive).to_string()),
            ("RELAY_CONCURRENCY_MIN", self.concurrency_min.to_string()),
            (
                "RELAY_ADAPTIVE_WINDOW_MS",
                self.adaptive_window_ms.to_string(),
            ),
            ("RELAY_DRAIN_MIN_MS", self.drain_min_ms.to_string()),
            ("RELAY_DRAIN_MAX_MS", self.drain_max_ms.to_string()),
            ("RELAY_BACKOFF_MIN_MS", self.backoff_min_ms.to_string()),
            ("RELAY_BACKOFF_MAX_MS", self.backoff_max_ms.to_string()),
            ("RELAY_TASK_RETENTION_S", self.task_retention_s.to_string()),
            ("RELAY_LEASE_MS", self.lease_ms.to_string()),
            ("RELAY_PERMIT_LEASE_MS", self.permit_lease_ms.to_string()),
            ("RELAY_CALL_TIMEOUT_MS", self.call_timeout_ms.to_string()),
            ("RELAY_PREFETCH", self.prefetch.to_string()),
            ("RELAY_INTAKE_MAX_BYTES", self.intake_max_bytes.to_string()),
            (
                "RELAY_DEAD_LETTER_HOLD_BYTES",
                self.dead_letter_hold_bytes.to_string(),
            ),
            ("RELAY_METRICS_ADDR", self.metrics_addr.clone()),
            ("RELAY_INSPECT", on_off(self.inspect).to_string()),
            ("RELAY_PRODUCER_AUTH", self.producer_auth.as_str().into()),
            ("RELAY_ECS_ACCOUNTS", self.ecs_accounts.clone()),
        ]);
        if let Some(id) = &self.worker_id {
            env.push(("RELAY_WORKER_ID", id.clone()));
        }
        if let Some(acl) = &self.producer_acl {
            env.push(("RELAY_PRODUCER_ACL", acl.display().to_string()));
        }
        env
    }

    /// Checks the combinations that would break a guarantee and reports every one at once,
    /// each naming its settings; the [`Validated`] configuration is what a worker runs on.
    pub fn validate(self) -> Result<Validated, ConfigErrors> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(Validated(self))
        } else {
            Err(ConfigErrors(problems))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.drain_min_ms == 0 || self.drain_min_ms > self.drain_max_ms {
            problems.push("RELAY_DRAIN_MIN_MS must be > 0 and <= RELAY_DRAIN_MAX_MS".into());
        }
        if self.concurrency_min > self.concurrency_limit {
            problems.push("RELAY_CONCURRENCY_MIN must be <= RELAY_CONCURRENCY_LIMIT".into());
        }
        // Shorter than a call, one overload would be halved many times over; the upper bound
        // keeps the hash's expiry (60 windows) in range.
        if !(50..=600_000).contains(&self.adaptive_window_ms) {
            problems.push("RELAY_ADAPTIVE_WINDOW_MS must be between 50 and 600000".into());
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            problems.push("RELAY_BACKOFF_MIN_MS must be > 0 and <= RELAY_BACKOFF_MAX_MS".into());
        }
        if self.call_timeout_ms == 0 {
            problems.push("RELAY_CALL_TIMEOUT_MS must be > 0".into());
        }
        // A call that outlived its permit could run beside a call that took the expired permit;
        // the extra second lets a permit be handed to the next call of the same worker.
        let permit_min = self.call_timeout_ms.saturating_add(PERMIT_SLACK_MS);
        if self.permit_lease_ms < permit_min {
            problems.push(format!(
                "RELAY_PERMIT_LEASE_MS ({}) must be at least RELAY_CALL_TIMEOUT_MS + {PERMIT_SLACK_MS} ({permit_min})",
                self.permit_lease_ms
            ));
        }
        if self.lease_ms < 300 {
            problems.push("RELAY_LEASE_MS must be at least 300".into());
        }
        // A call starts only while the shard lease surely covers it, and the lease is renewed
        // every third of its time: a whole call must fit in what is left just before a renewal.
        let call_max = self.call_window().as_millis() as u64;
        if self.call_timeout_ms > call_max {
            problems.push(format!(
                "RELAY_CALL_TIMEOUT_MS ({}) must fit in the shard lease: at most 7/15 of RELAY_LEASE_MS less {} ms ({call_max} with RELAY_LEASE_MS={})",
                self.call_timeout_ms,
                CALL_MARGIN.as_millis(),
                self.lease_ms
            ));
        }
        // The largest message with its held header must fit, or a hold would refuse it always.
        if self.dead_letter_hold_bytes < 2 * crate::relay::wire::MAX_MESSAGE_BYTES as u64 {
            problems.push(format!(
                "RELAY_DEAD_LETTER_HOLD_BYTES must be at least {} (two of the largest messages)",
                2 * crate::relay::wire::MAX_MESSAGE_BYTES
            ));
        }
        if self.task_retention_s == 0 {
            problems.push("RELAY_TASK_RETENTION_S must be > 0".into());
        }
        // A failing task is marked active at each retry; its longest sleep must not look idle.
        if self.task_retention_s.saturating_mul(1000) < self.backoff_max_ms.saturating_mul(2) {
            problems.push(format!(
                "RELAY_TASK_RETENTION_S ({} s) must be at least twice RELAY_BACKOFF_MAX_MS ({} ms)",
                self.task_retention_s, self.backoff_max_ms
            ));
        }
        if self.producer_auth != AuthMode::Off && self.producer_acl.is_none() {
            problems.push(format!(
                "RELAY_PRODUCER_AUTH={} needs RELAY_PRODUCER_ACL: a JSON file of broker users to the \
                 clusters they may publish for (docs/security.md); RELAY_PRODUCER_AUTH=off turns the \
                 check off",
                self.producer_auth.as_str()
            ));
        }
        if let Some(bad) = self
            .ecs_accounts()
            .into_iter()
            .find(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
        {
            problems.push(format!(
                "RELAY_ECS_ACCOUNTS: {bad:?} is not a 12-digit AWS account id"
            ));
        }
        problems
    }

    /// The accounts of RELAY_ECS_ACCOUNTS (empty: any).
    pub fn ecs_accounts(&self) -> Vec<String> {
        url_list(&self.ecs_accounts)
            .into_iter()
            .map(str::to_string)
            .collect()
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

    /// The messages of a configuration `validate` refuses.
    fn refused(c: WorkerConfig) -> String {
        match c.validate() {
            Ok(_) => panic!("the configuration was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: WorkerConfig,
    }

    /// Parses `env` as the flags of the same names (`RELAY_SHARDS` = `--shards`): what the
    /// worker reads from its environment, without touching this process's environment.
    fn parse_env(env: &[(&'static str, String)]) -> WorkerConfig {
        use clap::Parser;
        let mut args = vec!["worker".to_string()];
        for (name, value) in env {
            let flag = name
                .trim_start_matches("RELAY_")
                .to_ascii_lowercase()
                .replace('_', "-");
            args.push(format!("--{flag}={value}"));
        }
        Cli::try_parse_from(&args)
            .map(|c| c.cfg)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every flag of the CLI by its environment variable.
    fn every_env_name() -> std::collections::BTreeSet<String> {
        use clap::CommandFactory;
        Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect()
    }

    /// An operator's RELAY_* settings would fill what the parsed flags leave out.
    fn operator_env() -> bool {
        let names = every_env_name();
        std::env::vars().any(|(k, _)| names.contains(&k))
    }

    /// Every setting off its default, every optional one set.
    fn changed() -> WorkerConfig {
        let dir = PathBuf::from("/etc/relay");
        WorkerConfig {
            conn: ConnConfig {
                amqp_url: "amqp://u:p@rabbit:5672/%2f".into(),
                redis_url: "redis://redis:6380/2".into(),
                exchange: "x.test".into(),
                redis_sentinels: "s1:26379,s2:26379".into(),
                redis_sentinel_master: "relay".into(),
                redis_sentinel_username: "sentinel-user".into(),
                redis_sentinel_password_file: Some(dir.join("sentinel-pw")),
                redis_sentinel_tls: true,
                redis_min_replicas: 1,
                amqp_password_file: Some(dir.join("amqp-pw")),
                redis_password_file: Some(dir.join("redis-pw")),
                amqp_ca_file: Some(dir.join("amqp-ca")),
                amqp_cert_file: Some(dir.join("amqp-cert")),
                amqp_key_file: Some(dir.join("amqp-key")),
                redis_ca_file: Some(dir.join("redis-ca")),
                redis_cert_file: Some(dir.join("redis-cert")),
                redis_key_file: Some(dir.join("redis-key")),
            },
            shards: 8,
            concurrency_limit: 20,
            adaptive: false,
            concurrency_min: 2,
            adaptive_window_ms: 2_000,
            drain_min_ms: 11_000,
            drain_max_ms: 31_000,
            backoff_min_ms: 900,
            backoff_max_ms: 20_000,
            task_retention_s: 3_600,
            lease_ms: 20_000,
            permit_lease_ms: 9_000,
            call_timeout_ms: 4_000,
            prefetch: 100,
            intake_max_bytes: 64 * 1024 * 1024,
            dead_letter_hold_bytes: 8 * 1024 * 1024,
            metrics_addr: "127.0.0.1:9000".into(),
            inspect: false,
            producer_auth: AuthMode::Audit,
            producer_acl: Some(dir.join("acl.json")),
            ecs_accounts: "123456789012,210987654321".into(),
            worker_id: Some("w-1".into()),
        }
    }

    #[test]
    fn to_env_round_trips_every_setting_and_names_every_one() {
        if operator_env() {
            return;
        }
        for cfg in [WorkerConfig::default(), changed()] {
            let env = cfg.to_env();
            assert!(
                parse_env(&env) == cfg,
                "to_env did not round-trip: {:?}",
                env.iter().map(|(k, _)| *k).collect::<Vec<_>>()
            );
        }
        let named: std::collections::BTreeSet<String> = changed()
            .to_env()
            .into_iter()
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(named, every_env_name(), "to_env must name every setting");
    }

    #[test]
    fn the_flags_default_to_default() {
        if operator_env() {
            return;
        }
        assert!(parse_env(&[]) == WorkerConfig::default());
    }

    #[test]
    fn the_producer_check_needs_an_acl_unless_it_is_off() {
        let err = refused(WorkerConfig::default());
        assert!(
            err.contains("RELAY_PRODUCER_AUTH=acl needs RELAY_PRODUCER_ACL"),
            "{err}"
        );
        let off = WorkerConfig {
            producer_auth: AuthMode::Off,
            ..Default::default()
        };
        assert!(off.validate().is_ok());
        let err = refused(WorkerConfig {
            producer_auth: AuthMode::Off,
            ecs_accounts: "123456789012,12345".into(),
            ..Default::default()
        });
        assert!(err.contains("\"12345\" is not a 12-digit"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = refused(WorkerConfig {
            drain_min_ms: 0,
            concurrency_min: 11,
            task_retention_s: 0,
            ..Default::default()
        });
        for setting in [
            "RELAY_DRAIN_MIN_MS",
            "RELAY_CONCURRENCY_MIN",
            "RELAY_TASK_RETENTION_S",
        ] {
            assert!(err.contains(setting), "{setting} missing: {err}");
        }
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
        let with_acl = WorkerConfig {
            producer_acl: Some(PathBuf::from("/etc/relay/acl.json")),
            ..Default::default()
        };
        assert!(with_acl.validate().is_ok());
        let c = WorkerConfig {
            call_timeout_ms: 7_500,
            ..Default::default()
        };
        let err = refused(c);
        assert!(err.contains("RELAY_PERMIT_LEASE_MS (8000)"), "{err}");
        let c = WorkerConfig {
            call_timeout_ms: 6_000,
            permit_lease_ms: 20_000,
            lease_ms: 10_000,
            ..Default::default()
        };
        let err = refused(c);
        assert!(err.contains("must fit in the shard lease"), "{err}");
        let c = WorkerConfig {
            task_retention_s: 30,
            ..Default::default()
        };
        let err = refused(c);
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
            let err = refused(c);
            assert!(err.contains("RELAY_ADAPTIVE_WINDOW_MS"), "{window}: {err}");
        }
        let c = WorkerConfig {
            concurrency_min: 11,
            ..Default::default()
        };
        let err = refused(c);
        assert!(err.contains("RELAY_CONCURRENCY_MIN"), "{err}");
    }
}
