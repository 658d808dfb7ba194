//! What the scenarios run on: each run's own exchange, the worker child process (started,
//! restarted), publishing, the time limit, and clearing the run's queues and Redis keys.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lapin::options::QueueDeleteOptions;

use crate::relay::amqp;
use crate::relay::config::{ConnConfig, WorkerConfig};
use crate::relay::store::Store;

use super::{Bench, BenchArgs};

pub(super) fn conn(args: &BenchArgs, exchange: &str) -> ConnConfig {
    ConnConfig {
        exchange: exchange.into(),
        ..args.conn.clone()
    }
}

pub(super) fn spawn_worker(
    args: &BenchArgs,
    conn: &ConnConfig,
    sim_url: &str,
    metrics_port: u16,
    extra: &[(&str, &str)],
) -> anyhow::Result<Child> {
    // The bench's publisher may report for every cluster (the check runs as in production).
    let acl = std::env::temp_dir().join(format!("{}.acl.json", conn.exchange));
    std::fs::write(
        &acl,
        serde_json::json!({ crate::relay::amqp::url_user(&conn.amqp_url): ["*"] }).to_string(),
    )?;
    let defaults = WorkerConfig::default();
    let cfg = WorkerConfig {
        producer_acl: Some(acl),
        producer_auth: args.producer_auth,
        conn: conn.clone(),
        shards: args.shards,
        intake_max_bytes: args.intake_max_bytes.unwrap_or(defaults.intake_max_bytes),
        metrics_addr: format!("127.0.0.1:{metrics_port}"),
        worker_id: Some(format!("{}-bench", conn.exchange)),
        ..defaults
    };
    Ok(Command::new(std::env::current_exe()?)
        .arg("worker")
        .envs(cfg.to_env())
        .envs(extra.iter().copied())
        .env("AWS_ENDPOINT_URL_ECS", sim_url)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?)
}

impl Bench {
    /// Stops the worker (SIGTERM: it releases its shards) and starts another with `extra`
    /// environment; waits until it is ready.
    pub(super) async fn restart_worker(&mut self, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.worker.id().to_string())
            .status();
        let _ = self.worker.wait();
        self.worker = spawn_worker(
            &self.args,
            &self.conn,
            &self.sim_url,
            self.metrics_port,
            extra,
        )?;
        let ready = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        loop {
            let status = self.http.get(&ready).send().await.map(|r| r.status());
            if status.is_ok_and(|s| s.is_success()) {
                return Ok(());
            }
            self.ensure_time(2400, "worker restart")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn ensure_time(&self, limit_s: u64, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.started.elapsed() < Duration::from_secs(limit_s),
            "{what} did not finish in time"
        );
        Ok(())
    }

    pub(super) async fn publish(
        &mut self,
        lines: impl IntoIterator<Item = String>,
    ) -> anyhow::Result<()> {
        for (i, line) in lines.into_iter().enumerate() {
            self.publisher.send(i + 1, &line).await?;
        }
        self.publisher.flush().await?;
        Ok(())
    }
}

pub(super) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(super) async fn cleanup(connection: &lapin::Connection, conn: &ConnConfig, shards: u16) {
    let exchange = conn.exchange.as_str();
    if let Ok(ch) = connection.create_channel().await {
        for s in 0..shards {
            let _ = ch
                .queue_delete(
                    amqp::shard_queue(exchange, s).as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = ch
            .queue_delete(
                amqp::dead_queue(exchange).as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = ch
            .exchange_delete(exchange.into(), Default::default())
            .await;
        let _ = ch
            .exchange_delete(amqp::dlx(exchange).as_str().into(), Default::default())
            .await;
    }
}

/// Deletes the run's Redis keys (they would otherwise live out their retention TTL).
pub(super) async fn forget_redis(conn: &ConnConfig) {
    let Ok(store) = Store::connect(&conn.redis_url, &conn.redis_tls(), "bench").await else {
        return;
    };
    let Ok(mut c) = store.conn().await else {
        return;
    };
    let pattern = format!("relay:{{{}*", conn.exchange);
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<u64> =
                redis::cmd("UNLINK").arg(&keys).query_async(&mut c).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
