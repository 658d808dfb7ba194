//! The connection settings every subcommand shares: where the broker and the store are, their
//! TLS and password files, and the URL lists they are written as (masked for logs).

use std::path::PathBuf;

use clap::Args;

use super::{defaults, on_off};

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
}
