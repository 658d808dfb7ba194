//! Scenarios 6 and 8: the worker under pressure — an ECS that throttles calls beyond a
//! capacity (adaptive concurrency off and on), and one cluster's storm beside a quiet cluster
//! (fair share, with 1 and 3 workers).

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::publish::publish_lines;
use crate::relay::store::Store;
use crate::sim::CallRecord;

use super::events::task_running;
use super::harness::{free_port, spawn_worker};
use super::measure::{now_ms, percentiles, redis_commands};
use super::{against, row, Bench};

/// The throttling scenario's ECS: capacity and latency per call.
const THROTTLE_K: u64 = 4;
const THROTTLE_LATENCY_MS: u64 = 20;

impl Bench {
    /// Scenario 6: ECS throttles every call beyond [`THROTTLE_K`] in flight (ecs-sim capacity
    /// mode); accepted calls/s and the throttled share of calls over the whole backlog (with
    /// adaptive on, its convergence from the ceiling included), with adaptive concurrency off
    /// and then on (a worker restarted for each, production timings).
    pub(super) async fn throttling(&mut self) -> anyhow::Result<()> {
        let tasks = self.args.throttle_tasks;
        if tasks == 0 {
            return Ok(());
        }
        self.sim
            .set_latency(Duration::from_millis(THROTTLE_LATENCY_MS));
        self.sim.set_capacity(Some(THROTTLE_K));
        for adaptive in ["off", "on"] {
            eprintln!(
                "bench: throttling — {tasks} tasks, ecs-sim throttling above {THROTTLE_K} in flight \
                 ({THROTTLE_LATENCY_MS} ms per call), adaptive concurrency {adaptive}"
            );
            self.restart_worker(&[("RELAY_ADAPTIVE", adaptive)]).await?;
            let before = self.sim.stats();
            let lines: Vec<String> = (0..tasks)
                .map(|i| task_running(&self.run, &format!("t{adaptive}"), i).1)
                .collect();
            let started = Instant::now();
            self.publish(lines).await?;
            while self.sim.stats().ok < before.ok + tasks as u64 {
                self.ensure_time(2400, "throttling backlog")?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let secs = started.elapsed().as_secs_f64();
            let after = self.sim.stats();
            let calls = (after.calls - before.calls).max(1) as f64;
            let throttled = (after.errors - before.errors) as f64;
            self.rows.push(row(
                "throttling",
                &format!("accepted ECS calls/s, adaptive {adaptive} (K={THROTTLE_K})"),
                tasks as f64 / secs,
                "",
            ));
            self.rows.push(row(
                "throttling",
                &format!("throttled share of calls, adaptive {adaptive}"),
                throttled / calls,
                "",
            ));
        }
        self.sim.set_capacity(None);
        self.sim.set_latency(Duration::ZERO);
        Ok(())
    }

    /// Scenario 8: one cluster's storm of `--storm` task changes at once, then a quiet cluster's
    /// 40 changes at 10/s, against the sim at `--latency-ms`: the quiet cluster's wait from
    /// publish to ECS call, how fast the storm drains, and Redis commands per ECS call (from
    /// `INFO commandstats`, so the bench must have Redis to itself). With 1, then 3 workers.
    pub(super) async fn fair_share(&mut self) -> anyhow::Result<()> {
        if self.args.storm == 0 {
            return Ok(());
        }
        self.sim
            .set_latency(Duration::from_millis(self.args.latency_ms));
        for workers in [1, 3] {
            eprintln!(
                "bench: fair share — {} storm tasks, 40 quiet at 10/s, {workers} worker(s)",
                self.args.storm
            );
            let mut extra = Vec::new();
            for n in 1..workers {
                let port = free_port()?;
                let id = format!("{}-bench-{n}", self.conn.exchange);
                let addr = format!("127.0.0.1:{port}");
                extra.push(spawn_worker(
                    &self.args,
                    &self.conn,
                    &self.sim_url,
                    port,
                    &[("RELAY_WORKER_ID", &id), ("RELAY_METRICS_ADDR", &addr)],
                )?);
            }
            self.wait_for_owners(workers).await?;
            let tag = format!("f{workers}");
            let result = self.storm_and_quiet(&tag, workers).await;
            for mut w in extra {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(w.id().to_string())
                    .status();
                let _ = w.wait();
            }
            result?;
        }
        self.sim.set_latency(Duration::ZERO);
        Ok(())
    }

    /// Waits until `n` workers own the shards between them.
    async fn wait_for_owners(&self, n: usize) -> anyhow::Result<()> {
        let store = Store::open(&self.conn).await?;
        loop {
            let mut owners = std::collections::BTreeSet::new();
            let mut all = true;
            for s in 0..self.args.shards {
                match store.lease_owner(s).await? {
                    Some(o) => {
                        owners.insert(o);
                    }
                    None => all = false,
                }
            }
            if all && owners.len() == n {
                return Ok(());
            }
            self.ensure_time(2400, "workers sharing the shards")?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn storm_and_quiet(&mut self, tag: &str, workers: usize) -> anyhow::Result<()> {
        let arn = |cluster: &str, i: usize| {
            format!(
                "arn:aws:ecs:us-east-1:123456789012:task/{cluster}/{}-{tag}-{i}",
                self.run
            )
        };
        let line = |cluster: &str, task: &str| {
            json!({"schemaVersion":1,"eventId":format!("{task}-r"),"type":"task","cluster":cluster,
                   "taskArn":task,"occurredAt":"2026-12-06T10:00:00Z","status":"RUNNING"})
            .to_string()
        };
        let storm: Vec<String> = (0..self.args.storm).map(|i| arn("storm", i)).collect();
        let quiet: Vec<String> = (0..40).map(|i| arn("quiet", i)).collect();
        let mut redis = Store::open(&self.conn).await?.conn().await?;
        let commands_before = redis_commands(&mut redis).await?;
        let calls_before = self.sim.stats().calls;
        let skip = self.sim.calls().len();
        let storm_lines: Vec<String> = storm.iter().map(|t| line("storm", t)).collect();
        publish_lines(&self.conn, storm_lines.join("\n").as_bytes()).await?;
        let mut published = HashMap::new();
        for t in &quiet {
            published.insert(t.clone(), now_ms());
            publish_lines(&self.conn, line("quiet", t).as_bytes()).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let wanted = storm.len() + quiet.len();
        let calls = loop {
            let calls: Vec<CallRecord> = self.sim.calls().into_iter().skip(skip).collect();
            let ok = calls
                .iter()
                .filter(|c| c.outcome.as_deref() == Some("ok"))
                .count();
            if ok >= wanted {
                break calls;
            }
            self.ensure_time(2400, "fair-share run")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let commands = redis_commands(&mut redis).await? - commands_before;
        let ecs_calls = self.sim.stats().calls - calls_before;
        let first: HashMap<&str, u64> = calls
            .iter()
            .rev()
            .map(|c| (c.key.as_str(), c.received_at_ms))
            .collect();
        let waits: Vec<u64> = quiet
            .iter()
            .filter_map(|t| Some(first.get(t.as_str())?.saturating_sub(published[t])))
            .collect();
        let mut storm_at: Vec<u64> = storm
            .iter()
            .filter_map(|t| first.get(t.as_str()).copied())
            .collect();
        storm_at.sort_unstable();
        let span_s = (storm_at.last().copied().unwrap_or(0)
            - storm_at.first().copied().unwrap_or(0)) as f64
            / 1000.0;
        let ideal = 10.0 / (self.args.latency_ms as f64 / 1000.0);
        let [p50, p99, _] = percentiles(waits);
        let w = if workers == 1 {
            "1 worker"
        } else {
            "3 workers"
        };
        for (p, value, target) in [("p50", p50, ""), ("p99", p99, "<= 1000")] {
            let figure = format!("quiet publish -> call {p} ms ({w})");
            self.rows.push(row("fair share", &figure, value, target));
        }
        let rate = (storm_at.len().max(2) - 1) as f64 / span_s.max(0.001);
        self.rows.push(against(
            "fair share",
            format!("storm calls/s vs limit / latency ({w})"),
            rate,
            ideal,
            ">= 0.9",
        ));
        self.rows.push(row(
            "fair share",
            &format!("Redis commands per ECS call ({w})"),
            commands as f64 / ecs_calls.max(1) as f64,
            "",
        ));
        Ok(())
    }
}
