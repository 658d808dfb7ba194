//! [`WorkerConfig::to_env`]: a configuration as the environment a worker reads it from.

use super::{on_off, WorkerConfig};

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
}

#[cfg(test)]
mod tests {
    use super::super::{AuthMode, ConnConfig};
    use super::*;
    use std::path::PathBuf;

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
}
