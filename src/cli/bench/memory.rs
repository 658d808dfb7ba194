//! Scenarios 4a, 4b and 7: what the relay costs in memory — Redis bytes per pending task,
//! worker RSS over many distinct tasks, and its peak with large messages while Redis stalls.

use std::time::Duration;

use serde_json::json;

use crate::relay::store::Store;

use super::events::{task_arn, task_running};
use super::measure::{memory_mb, used_memory};
use super::{row, Bench};

/// How long the large-message scenario keeps Redis from taking writes.
const LARGE_PAUSE_MS: u64 = 8_000;

impl Bench {
    /// Scenario 4a: Redis memory per pending task, with every ECS call held.
    pub(super) async fn redis_memory(&mut self) -> anyhow::Result<()> {
        eprintln!("bench: Redis memory — 10000 pending tasks while ECS holds every call");
        let redis = Store::connect(&self.conn.redis_url, &self.conn.redis_tls(), "bench").await?;
        let mut rconn = redis.conn().await?;
        let mem_before = used_memory(&mut rconn).await?;
        self.sim.add_rule(crate::sim::Rule {
            key: "*".into(),
            action: crate::sim::Action::Hold,
            times: 10,
        });
        let taken_before = self.taken().await;
        let pending: Vec<String> = (0..10_000)
            .map(|i| task_running(&self.run, "p", i).1)
            .collect();
        self.publish(pending).await?;
        while self.taken().await < taken_before + 10_000 {
            self.ensure_time(1200, "pending tasks intake")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mem_after = used_memory(&mut rconn).await?;
        self.rows.push(row(
            "cost",
            "Redis bytes per pending task",
            (mem_after - mem_before) / 10_000.0,
            "<= 2048",
        ));
        self.peak_rss_row("10k pending")?;
        // Counted before the release: the held calls are among the 10,000 to wait for.
        let ok_before = self.sim.stats().ok;
        self.sim.release(None);
        while self.sim.stats().ok < ok_before + 10_000 {
            self.ensure_time(1200, "pending tasks sending")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Scenario 4b: worker RSS while `--distinct` tasks pass through (one event and one call
    /// each); it must level off, not grow with the tasks seen.
    pub(super) async fn distinct_tasks(&mut self) -> anyhow::Result<()> {
        let total = self.args.distinct;
        if total == 0 {
            return Ok(());
        }
        eprintln!("bench: {total} distinct tasks through the worker (RSS must not grow)");
        self.sim.set_recording(false);
        let ok_before = self.sim.stats().ok;
        const CHUNK: usize = 20_000;
        let mut rss_at_tenth = None;
        let mut sent = 0;
        while sent < total {
            let n = CHUNK.min(total - sent);
            let lines: Vec<String> = (sent..sent + n)
                .map(|i| task_running(&self.run, "d", i).1)
                .collect();
            self.publish(lines).await?;
            sent += n;
            // Keep at most two chunks queued: steady flow, not one huge backlog.
            while self.sim.stats().ok + ((2 * CHUNK) as u64) < ok_before + sent as u64 {
                self.ensure_time(3600, "distinct tasks")?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if rss_at_tenth.is_none() && sent >= total / 10 {
                rss_at_tenth = Some((sent, memory_mb(self.worker.id(), "VmRSS")?));
            }
            eprint!("\rbench: {sent}/{total} tasks published");
        }
        while self.sim.stats().ok < ok_before + total as u64 {
            self.ensure_time(3600, "distinct tasks")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!();
        if let Some((n, rss)) = rss_at_tenth {
            self.rows.push(row(
                "cost",
                &format!("worker RSS MB after {n} tasks"),
                rss,
                "<= 100",
            ));
        }
        self.rows.push(row(
            "cost",
            &format!("worker RSS MB after {total} tasks"),
            memory_mb(self.worker.id(), "VmRSS")?,
            "<= 100, flat",
        ));
        self.peak_rss_row("whole run")?;
        Ok(())
    }

    /// Scenario 7: `--large` container events of ~250 KiB each over every shard, published to a
    /// fresh worker while Redis refuses writes for a few seconds (`CLIENT PAUSE … WRITE`), so
    /// intake stalls and every shard's prefetch window fills, as in a Redis outage: the
    /// worker's peak RSS shows the intake's byte bound.
    pub(super) async fn large_messages(&mut self) -> anyhow::Result<()> {
        let n = self.args.large;
        if n == 0 {
            return Ok(());
        }
        eprintln!(
            "bench: large messages — {n} container events of ~250 KiB while Redis pauses writes"
        );
        self.restart_worker(&[]).await?;
        let pad = "x".repeat(250 * 1024);
        let lines = (0..n).map(|i| {
            json!({"schemaVersion":1,"eventId":format!("{}-big{i}", self.run),
                "type":"container","cluster":"bench","taskArn":task_arn(&self.run, "big", i),
                "containerName":"app","occurredAt":"2026-11-28T10:00:00Z","status":"RUNNING",
                "padding":pad})
            .to_string()
        });
        let lines: Vec<String> = lines.collect();
        let redis = Store::connect(&self.conn.redis_url, &self.conn.redis_tls(), "bench").await?;
        let mut rconn = redis.conn().await?;
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(LARGE_PAUSE_MS)
            .arg("WRITE")
            .query_async(&mut rconn)
            .await?;
        self.publish(lines).await?;
        while self.taken().await < n as u64 {
            self.ensure_time(3000, "large messages")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.rows.push(row(
            "cost",
            &format!(
                "worker peak RSS MB ({n} events of 250 KiB, Redis paused {} s)",
                LARGE_PAUSE_MS / 1000
            ),
            memory_mb(self.worker.id(), "VmHWM")?,
            "<= 256",
        ));
        Ok(())
    }
}
