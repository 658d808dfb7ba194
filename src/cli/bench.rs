//! `bench`: how fast one worker takes events compared with the broker's own limit on this
//! machine, and how fully it uses the fleet-wide ECS call limit. Runs against the local
//! RabbitMQ and Redis, an in-process ecs-sim, and a worker child process (this binary).

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::json;

use crate::cli::publish::{publish_lines, Publisher};
use crate::relay::amqp;
use crate::relay::config::AuthMode;
use crate::relay::config::{ConnConfig, WorkerConfig};
use crate::relay::store::Store;
use crate::sim::{CallRecord, Sim, SimConfig};

#[derive(Args)]
pub struct BenchArgs {
    /// Where RabbitMQ and Redis are (the exchange name is ignored: each run makes its own).
    #[command(flatten)]
    pub conn: ConnConfig,
    /// Events of the ingest scenario (10 per task lifecycle).
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Tasks of the utilisation scenario's backlog.
    #[arg(long, default_value_t = 2_000)]
    pub backlog: usize,
    /// ecs-sim latency of the utilisation scenario.
    #[arg(long, default_value_t = 50)]
    pub latency_ms: u64,
    #[arg(long, default_value_t = 16)]
    pub shards: u16,
    /// An extra latency run at this many events/s (0 skips it).
    #[arg(long, default_value_t = 2_000.0)]
    pub steady_rate: f64,
    /// Tasks of the throttling scenario (ecs-sim throttling above 4 calls in flight), run with
    /// adaptive concurrency off and on; 0 skips it.
    #[arg(long, default_value_t = 1_000)]
    pub throttle_tasks: usize,
    /// Distinct tasks (one event and one call each) for the memory-over-time scenario; 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    pub distinct: usize,
    /// Container events of ~250 KiB each (padded with a field the relay ignores) for the
    /// large-message memory scenario; 0 skips it.
    #[arg(long, default_value_t = 4_000)]
    pub large: usize,
    /// RELAY_INTAKE_MAX_BYTES for the worker under test (default: the worker's own), e.g. a
    /// huge value to measure the old, count-only prefetch.
    #[arg(long)]
    pub intake_max_bytes: Option<u64>,
    /// The worker's producer check (RELAY_PRODUCER_AUTH): `acl` as in production (its ACL lets
    /// the bench's publisher report for every cluster), or `off` to measure what the check costs.
    #[arg(long, value_enum, default_value_t = AuthMode::Acl)]
    pub producer_auth: AuthMode,
    /// Tasks of one cluster's storm for the fair-share scenario (a quiet cluster publishes 40
    /// changes at 10/s meanwhile), run with 1 and with 3 workers; 0 skips it.
    #[arg(long, default_value_t = 3_000)]
    pub storm: usize,
    /// Run only the fair-share scenario (after the ingest that every run starts with).
    #[arg(long)]
    pub fair_share_only: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub figure: String,
    pub value: f64,
    pub baseline: Option<f64>,
    pub ratio: Option<f64>,
    pub target: &'static str,
}

/// A task RUNNING event for task `{run}{tag}{i}`; returns (task ARN, JSON line).
fn task_running(run: &str, tag: &str, i: usize) -> (String, String) {
    let arn = task_arn(run, tag, i);
    let line = json!({"schemaVersion":1,"eventId":format!("{run}-{tag}{i}"),"type":"task","cluster":"bench",
        "taskArn":arn,"occurredAt":"2026-11-28T10:00:00Z","status":"RUNNING"})
    .to_string();
    (arn, line)
}

fn task_arn(run: &str, tag: &str, i: usize) -> String {
    format!("arn:aws:ecs:us-east-1:123456789012:task/bench/{run}{tag}{i:010}")
}

/// One benchmark event: its line and, for task events, (task ARN, status) to time its call.
struct BenchEvent {
    id: String,
    line: String,
    task: Option<(String, &'static str)>,
}

/// 10 events per task: 4 containers RUNNING, task RUNNING, 4 containers STOPPED, task STOPPED
/// (all tasks' RUNNING phase first, then all STOPPED phases, as a fleet starting then stopping).
fn lifecycles(run: &str, tag: &str, tasks: usize) -> Vec<BenchEvent> {
    let mut out = Vec::with_capacity(tasks * 10);
    for phase in ["RUNNING", "STOPPED"] {
        for i in 0..tasks {
            let arn = task_arn(run, tag, i);
            for c in ["app", "sidecar", "log", "proxy"] {
                let id = format!("{run}-{tag}{i}-{c}-{phase}");
                let line = json!({"schemaVersion":1,"eventId":id,
                    "type":"container","cluster":"bench","taskArn":arn,"containerName":c,
                    "occurredAt":"2026-11-28T10:00:00Z","status":phase});
                out.push(BenchEvent {
                    id,
                    line: line.to_string(),
                    task: None,
                });
            }
            let id = format!("{run}-{tag}{i}-{phase}");
            let line = json!({"schemaVersion":1,"eventId":id,
                "type":"task","cluster":"bench","taskArn":arn,
                "occurredAt":"2026-11-28T10:00:00Z","status":phase});
            out.push(BenchEvent {
                id,
                line: line.to_string(),
                task: Some((arn, phase)),
            });
        }
    }
    out
}

/// Everything the scenarios share: the sim, the worker under test and how to reach them.
struct Bench {
    args: BenchArgs,
    run: String,
    sim: Sim,
    sim_url: String,
    metrics_port: u16,
    conn: ConnConfig,
    publisher: Publisher,
    worker: Child,
    http: reqwest::Client,
    metrics_url: String,
    started: Instant,
    rows: Vec<Row>,
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    args.conn.resolve_secrets()?;
    let run = format!("{:08x}", rand::random::<u32>());
    let tasks = (args.events / 10).max(1);
    let lines: Vec<String> = lifecycles(&run, "i", tasks)
        .into_iter()
        .map(|e| e.line)
        .collect();

    eprintln!(
        "bench: baseline — a bare consumer acking {} preloaded messages from {} quorum queues",
        lines.len(),
        args.shards
    );
    let baseline = baseline(
        &conn(&args, &format!("bench.base.{run}")),
        args.shards,
        &lines,
    )
    .await?;

    let sim = Sim::new(SimConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", listener.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sim.clone().serve(listener, stop.clone().cancelled_owned()));
    let relay_conn = conn(&args, &format!("bench.relay.{run}"));
    let connection = amqp::connect(&relay_conn.amqp_url, &relay_conn.amqp_tls(), "bench").await?;
    amqp::declare(&connection, &relay_conn.exchange, args.shards).await?;
    let mut publisher = Publisher::connect(&relay_conn).await?;
    // Preloaded before the worker starts, as for the baseline.
    let total = lines.len();
    for (i, line) in lines.iter().enumerate() {
        publisher.send(i + 1, line).await?;
    }
    publisher.flush().await?;
    let metrics_port = free_port()?;
    let worker = spawn_worker(&args, &relay_conn, &sim_url, metrics_port, &[])?;
    let mut bench = Bench {
        run,
        sim,
        sim_url,
        metrics_port,
        conn: relay_conn,
        publisher,
        worker,
        http: reqwest::Client::new(),
        metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
        started: Instant::now(),
        rows: Vec::new(),
        args,
    };
    let result = bench.scenarios(total, baseline).await;

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(bench.worker.id().to_string())
        .status();
    let _ = bench.worker.wait();
    stop.cancel();
    cleanup(&connection, &bench.conn, bench.args.shards).await;
    forget_redis(&bench.conn).await;
    let _ = connection.close(200, "bench done".into()).await;
    result?;
    print(&bench.rows, bench.args.json)
}

impl Bench {
    async fn scenarios(&mut self, total: usize, baseline: f64) -> anyhow::Result<()> {
        let (events_per_sec, calls_per_sec) = self.ingest(total, baseline).await?;
        if self.args.fair_share_only {
            return self.fair_share().await;
        }
        self.utilisation().await?;
        // Half the intake rate, as the target asks; and half of what the ECS side sustains
        // (calls/s × 5 events per call), which is the lower of the two limits here.
        self.latency("l", events_per_sec / 2.0, "half ingest")
            .await?;
        self.latency("c", calls_per_sec * 5.0 / 2.0, "half call capacity")
            .await?;
        if self.args.steady_rate > 0.0 {
            self.latency("s", self.args.steady_rate, "steady").await?;
        }
        self.redis_memory().await?;
        self.distinct_tasks().await?;
        self.throttling().await?;
        self.large_messages().await?;
        self.fair_share().await
    }

    /// Scenario 8: one cluster's storm of `--storm` task changes at once, then a quiet cluster's
    /// 40 changes at 10/s, against the sim at `--latency-ms`: the quiet cluster's wait from
    /// publish to ECS call, how fast the storm drains, and Redis commands per ECS call (from
    /// `INFO commandstats`, so the bench must have Redis to itself). With 1, then 3 workers.
    async fn fair_share(&mut self) -> anyhow::Result<()> {
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
        self.rows.push(row(
            "fair share",
            &format!("quiet publish -> call p50 ms ({w})"),
            p50,
            "",
        ));
        self.rows.push(row(
            "fair share",
            &format!("quiet publish -> call p99 ms ({w})"),
            p99,
            "<= 1000",
        ));
        let rate = (storm_at.len().max(2) - 1) as f64 / span_s.max(0.001);
        self.rows.push(Row {
            scenario: "fair share",
            figure: format!("storm calls/s vs limit / latency ({w})"),
            value: rate,
            baseline: Some(ideal),
            ratio: Some(rate / ideal),
            target: ">= 0.9",
        });
        self.rows.push(row(
            "fair share",
            &format!("Redis commands per ECS call ({w})"),
            commands as f64 / ecs_calls.max(1) as f64,
            "",
        ));
        Ok(())
    }

    /// Scenario 7: `--large` container events of ~250 KiB each over every shard, published to a
    /// fresh worker while Redis refuses writes for a few seconds (`CLIENT PAUSE … WRITE`), so
    /// intake stalls and every shard's prefetch window fills, as in a Redis outage: the
    /// worker's peak RSS shows the intake's byte bound.
    async fn large_messages(&mut self) -> anyhow::Result<()> {
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

    /// Scenario 6: ECS throttles every call beyond [`THROTTLE_K`] in flight (ecs-sim capacity
    /// mode); accepted calls/s and the throttled share of calls over the whole backlog (with
    /// adaptive on, its convergence from the ceiling included), with adaptive concurrency off
    /// and then on (a worker restarted for each, production timings).
    async fn throttling(&mut self) -> anyhow::Result<()> {
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

    /// Stops the worker (SIGTERM: it releases its shards) and starts another with `extra`
    /// environment; waits until it is ready.
    async fn restart_worker(&mut self, extra: &[(&str, &str)]) -> anyhow::Result<()> {
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

    fn ensure_time(&self, limit_s: u64, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.started.elapsed() < Duration::from_secs(limit_s),
            "{what} did not finish in time"
        );
        Ok(())
    }

    async fn publish(&mut self, lines: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
        for (i, line) in lines.into_iter().enumerate() {
            self.publisher.send(i + 1, &line).await?;
        }
        self.publisher.flush().await?;
        Ok(())
    }

    /// Scenario 1: the same messages as the baseline, preloaded, then taken by one worker.
    /// Returns (events/s, ECS calls/s).
    async fn ingest(&mut self, total: usize, baseline: f64) -> anyhow::Result<(f64, f64)> {
        eprintln!("bench: ingest — one worker taking the same {total} preloaded messages");
        let mut first = None;
        let ingest_secs = loop {
            let taken = self.taken().await;
            if taken > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if taken >= total as u64 {
                break first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
            }
            self.ensure_time(600, "ingest")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let expected_calls = total as u64 / 5;
        while self.sim.stats().ok < expected_calls {
            self.ensure_time(600, "ingest calls")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let calls_secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(1.0);
        let cpu_secs = cpu_secs(self.worker.id())?;
        let events_per_sec = total as f64 / ingest_secs.max(1e-9);
        let ok = self.sim.stats().ok;
        let calls_per_sec = ok as f64 / calls_secs;
        self.rows.push(Row {
            scenario: "ingest",
            figure: "events/s, first to last ack".into(),
            value: events_per_sec,
            baseline: Some(baseline),
            ratio: Some(events_per_sec / baseline),
            target: ">= 0.6 x baseline",
        });
        self.rows
            .push(row("ingest", "ECS calls/s", calls_per_sec, ""));
        self.rows.push(row(
            "ingest",
            "events per ECS call",
            total as f64 / ok.max(1) as f64,
            "",
        ));
        self.rows.push(row(
            "cost",
            "worker CPU s per 1000 events",
            cpu_secs * 1000.0 / total as f64,
            "",
        ));
        self.peak_rss_row("ingest")?;
        Ok((events_per_sec, calls_per_sec))
    }

    /// Scenario 2: a backlog of tasks against a slow ECS; how close to limit ÷ latency.
    async fn utilisation(&mut self) -> anyhow::Result<()> {
        let backlog = self.args.backlog;
        eprintln!(
            "bench: utilisation — {backlog} tasks waiting, ecs-sim latency {} ms",
            self.args.latency_ms
        );
        self.sim
            .set_latency(Duration::from_millis(self.args.latency_ms));
        let before = self.sim.stats().calls;
        let lines: Vec<String> = (0..backlog)
            .map(|i| task_running(&self.run, "u", i).1)
            .collect();
        self.publish(lines).await?;
        while self.sim.stats().ok < before + backlog as u64 {
            self.ensure_time(900, "utilisation backlog")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let calls: Vec<_> = self.sim.calls().into_iter().skip(before as usize).collect();
        // Measured from the first call to the last answer: the steady state, not intake.
        let span_ms = calls
            .iter()
            .filter_map(|c| c.finished_at_ms)
            .max()
            .unwrap_or(0)
            - calls.iter().map(|c| c.received_at_ms).min().unwrap_or(0);
        let achieved = backlog as f64 / (span_ms.max(1) as f64 / 1000.0);
        let ideal = 10.0 / (self.args.latency_ms as f64 / 1000.0);
        self.rows.push(Row {
            scenario: "utilisation",
            figure: "ECS calls/s vs limit / latency".into(),
            value: achieved,
            baseline: Some(ideal),
            ratio: Some(achieved / ideal),
            target: ">= 0.95",
        });
        // How long the sim itself held each call (its timer rounds the latency up), and the
        // permits' busy share counted with that: what is left is the relay's own gap per call.
        let held_ms: u64 = calls
            .iter()
            .filter_map(|c| Some(c.finished_at_ms? - c.received_at_ms))
            .sum();
        let mean_held = held_ms as f64 / calls.len().max(1) as f64;
        self.rows.push(row(
            "utilisation",
            "sim time per call ms (mean)",
            mean_held,
            "",
        ));
        self.rows.push(row(
            "utilisation",
            "permits busy in the sim (share)",
            held_ms as f64 / (10.0 * span_ms.max(1) as f64),
            "",
        ));
        self.sim.set_latency(Duration::ZERO);
        Ok(())
    }

    /// Scenario 3: realistic lifecycles at `rate` events/s for about five seconds; for each
    /// task event, publish → the sim receiving its call.
    async fn latency(&mut self, tag: &str, rate: f64, load: &str) -> anyhow::Result<()> {
        let rate = rate.max(100.0);
        eprintln!("bench: latency — lifecycles at {rate:.0} events/s ({load}), task event publish to ECS call");
        let tasks = ((rate * 5.0) as usize / 10).max(1);
        let events = lifecycles(&self.run, tag, tasks);
        let broker = self.broker_latency(tag, &events, rate).await?;
        let stages_before = self.stage_buckets().await;
        let gate_before = self.gate_figures().await;
        let (machine_before, worker_before) = (machine_cpu()?, cpu_secs(self.worker.id())?);
        let started = Instant::now();
        let sent = paced(&mut self.publisher, &events, rate).await?;
        let published: HashMap<(String, &'static str), u64> = sent
            .into_iter()
            .filter_map(|(i, at)| Some((events[i].task.clone()?, at)))
            .collect();
        let call_key = |c: &CallRecord| {
            let status = c.body.get("status").and_then(|s| s.as_str())?;
            let status = ["RUNNING", "STOPPED"].into_iter().find(|s| *s == status)?;
            Some((c.key.clone(), status))
        };
        let lat = loop {
            let lat: Vec<u64> = self
                .sim
                .calls()
                .iter()
                .filter_map(|c| {
                    let p = published.get(&call_key(c)?)?;
                    Some(c.received_at_ms.saturating_sub(*p))
                })
                .collect();
            if lat.len() >= published.len() {
                break lat;
            }
            self.ensure_time(1200, "latency run")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // How busy the machine was meanwhile: above ~0.9 queues build everywhere, the
        // broker's included, whatever the relay does.
        let machine_after = machine_cpu()?;
        let worker_cores =
            (cpu_secs(self.worker.id())? - worker_before) / started.elapsed().as_secs_f64();
        let machine_busy =
            (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1).max(1e-9);
        let (lat, broker) = (percentiles(lat), percentiles(broker));
        let mut latency_row = |figure: String, i: usize, target: &'static str| {
            self.rows.push(Row {
                scenario: "latency",
                figure,
                value: lat[i],
                baseline: Some(broker[i]),
                ratio: Some(lat[i] / broker[i].max(1.0)),
                target,
            })
        };
        latency_row(format!("p50 ms, {load} ({rate:.0} ev/s)"), 0, "");
        latency_row("p99 ms".into(), 1, "<= 25");
        latency_row("max ms".into(), 2, "");
        self.rows.push(row(
            "latency",
            &format!("machine CPU busy, share of all cores ({load})"),
            machine_busy,
            "",
        ));
        self.rows.push(row(
            "latency",
            &format!("worker CPU, cores ({load})"),
            worker_cores,
            "",
        ));
        // The Redis gate on a healthy local Redis: closed time and calls it held back, this
        // row only (0 and 0 unless a reply was overdue or a write refused).
        let gate_after = self.gate_figures().await;
        self.rows.push(row(
            "latency",
            &format!("Redis gate closed, ms ({load})"),
            gate_after.0 - gate_before.0,
            "0",
        ));
        self.rows.push(row(
            "latency",
            &format!("calls held by the Redis gate ({load})"),
            gate_after.1 - gate_before.1,
            "0",
        ));
        // Where the time went during this row: the worker's stage histograms, this row only.
        let stages = stage_percentiles(&stages_before, &self.stage_buckets().await);
        for (stage, [p50, p99]) in stages {
            self.rows
                .push(row("stages", &format!("{stage} p50 ms ({load})"), p50, ""));
            self.rows
                .push(row("stages", &format!("{stage} p99 ms"), p99, ""));
        }
        Ok(())
    }

    /// The worker's Redis gate so far: (ms closed, calls held), summed over every `why`.
    async fn gate_figures(&self) -> (f64, f64) {
        let Ok(resp) = self.http.get(&self.metrics_url).send().await else {
            return (0.0, 0.0);
        };
        let text = resp.text().await.unwrap_or_default();
        use crate::relay::metrics::{exposition_sum, REDIS_GATE_CLOSED_MS, REDIS_GATE_HELD};
        (
            exposition_sum(&text, REDIS_GATE_CLOSED_MS),
            exposition_sum(&text, REDIS_GATE_HELD),
        )
    }

    /// The worker's `relay_stage_seconds` buckets: (stage, upper bound s) → cumulative count.
    async fn stage_buckets(&self) -> BTreeMap<(String, String), f64> {
        let Ok(resp) = self.http.get(&self.metrics_url).send().await else {
            return BTreeMap::new();
        };
        let text = resp.text().await.unwrap_or_default();
        let prefix = format!("{}_bucket{{", crate::relay::metrics::STAGE_SECONDS);
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (labels, value) = rest.split_once("} ")?;
                let label = |name: &str| {
                    labels
                        .split(',')
                        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\""))
                        .map(|v| v.trim_end_matches('"').to_string())
                };
                Some(((label("stage")?, label("le")?), value.parse().ok()?))
            })
            .collect()
    }

    /// The broker alone at the same rate: the same lifecycles through the same kind of queues
    /// to a bare consumer; publish → delivery of each task event, in ms.
    async fn broker_latency(
        &self,
        tag: &str,
        events: &[BenchEvent],
        rate: f64,
    ) -> anyhow::Result<Vec<u64>> {
        let conn = conn(&self.args, &format!("bench.lat.{}{tag}", self.run));
        let connection = amqp::connect(&conn.amqp_url, &conn.amqp_tls(), "bench latency").await?;
        amqp::declare(&connection, &conn.exchange, self.args.shards).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
        bare_consumers(
            &connection,
            &conn.exchange,
            self.args.shards,
            move |batch| {
                let at = now_ms();
                batch.iter().all(|d| {
                    let id = d.properties.message_id().as_ref().map(|m| m.to_string());
                    tx.send((id.unwrap_or_default(), at)).is_ok()
                })
            },
        )
        .await?;
        let mut publisher = Publisher::connect(&conn).await?;
        let sent = paced(&mut publisher, events, rate).await?;
        publisher.close().await?;
        let mut published: HashMap<&str, u64> = sent
            .into_iter()
            .filter(|(i, _)| events[*i].task.is_some())
            .map(|(i, at)| (events[i].id.as_str(), at))
            .collect();
        let mut lat = Vec::with_capacity(published.len());
        while !published.is_empty() {
            let Some((id, at)) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await?
            else {
                anyhow::bail!("latency baseline consumers stopped");
            };
            if let Some(p) = published.remove(id.as_str()) {
                lat.push(at.saturating_sub(p));
            }
        }
        cleanup(&connection, &conn, self.args.shards).await;
        let _ = connection.close(200, "latency baseline done".into()).await;
        Ok(lat)
    }

    /// Scenario 4a: Redis memory per pending task, with every ECS call held.
    async fn redis_memory(&mut self) -> anyhow::Result<()> {
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
    async fn distinct_tasks(&mut self) -> anyhow::Result<()> {
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

    /// The worker's peak RSS so far, as a row.
    fn peak_rss_row(&mut self, when: &str) -> anyhow::Result<()> {
        let peak = memory_mb(self.worker.id(), "VmHWM")?;
        self.rows.push(row(
            "cost",
            &format!("worker peak RSS MB ({when})"),
            peak,
            "<= 100",
        ));
        Ok(())
    }

    /// Events the worker has taken into Redis (consumed + duplicates), from its metrics.
    async fn taken(&self) -> u64 {
        let Ok(resp) = self.http.get(&self.metrics_url).send().await else {
            return 0;
        };
        let text = resp.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| {
                l.starts_with(crate::relay::metrics::EVENTS_CONSUMED)
                    || l.starts_with(crate::relay::metrics::EVENTS_DUPLICATE)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

async fn used_memory(conn: &mut crate::relay::store::Conn) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// How long the large-message scenario keeps Redis from taking writes.
const LARGE_PAUSE_MS: u64 = 8_000;

/// The throttling scenario's ECS: capacity and latency per call.
const THROTTLE_K: u64 = 4;
const THROTTLE_LATENCY_MS: u64 = 20;

fn row(scenario: &'static str, figure: &str, value: f64, target: &'static str) -> Row {
    Row {
        scenario,
        figure: figure.into(),
        value,
        baseline: None,
        ratio: None,
        target,
    }
}

fn conn(args: &BenchArgs, exchange: &str) -> ConnConfig {
    ConnConfig {
        exchange: exchange.into(),
        ..args.conn.clone()
    }
}

/// The broker's limit on this machine: preloaded messages, one consumer per shard queue,
/// prefetch and multiple-acks as the worker uses them, nothing else done.
async fn baseline(conn: &ConnConfig, shards: u16, lines: &[String]) -> anyhow::Result<f64> {
    let connection = amqp::connect(&conn.amqp_url, &conn.amqp_tls(), "bench baseline").await?;
    amqp::declare(&connection, &conn.exchange, shards).await?;
    publish_lines(conn, lines.join("\n").as_bytes()).await?;
    let total = lines.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    bare_consumers(&connection, &conn.exchange, shards, move |batch| {
        tx.send((batch.len(), Instant::now())).is_ok()
    })
    .await?;
    let (mut got, mut first, mut last) = (0usize, None, Instant::now());
    while got < total {
        let Some((n, at)) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await? else {
            anyhow::bail!("baseline consumers stopped");
        };
        first.get_or_insert(at);
        got += n;
        last = at;
    }
    cleanup(&connection, conn, shards).await;
    let _ = connection.close(200, "baseline done".into()).await;
    let secs = first
        .map(|f| last.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    Ok(total as f64 / secs.max(1e-9))
}

/// One consumer per shard queue that only acks (prefetch and multiple-acks as the worker
/// uses them) and reports each batch to `on_batch` (false stops it).
async fn bare_consumers(
    connection: &lapin::Connection,
    exchange: &str,
    shards: u16,
    on_batch: impl Fn(&[Delivery]) -> bool + Clone + Send + 'static,
) -> anyhow::Result<()> {
    for shard in 0..shards {
        let ch = connection.create_channel().await?;
        ch.basic_qos(256, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                amqp::shard_queue(exchange, shard).as_str().into(),
                format!("bench-base-{shard}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let on_batch = on_batch.clone();
        tokio::spawn(async move {
            while let Some(Ok(first)) = consumer.next().await {
                let mut batch = vec![first];
                while batch.len() < 256 {
                    match futures_util::FutureExt::now_or_never(consumer.next()) {
                        Some(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
                if let Some(last) = batch.last() {
                    let acked = ch
                        .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                        .await;
                    if acked.is_err() || !on_batch(&batch) {
                        return;
                    }
                }
            }
        });
    }
    Ok(())
}

/// Publishes `events` at `rate` per second, a chunk every 10 ms; returns (index, publish time
/// in ms) for each event.
async fn paced(
    publisher: &mut Publisher,
    events: &[BenchEvent],
    rate: f64,
) -> anyhow::Result<Vec<(usize, u64)>> {
    let per_tick = ((rate / 100.0).ceil() as usize).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = Vec::with_capacity(events.len());
    for (c, chunk) in events.chunks(per_tick).enumerate() {
        tick.tick().await;
        let at = now_ms();
        for (j, e) in chunk.iter().enumerate() {
            let i = c * per_tick + j;
            publisher.send(i + 1, &e.line).await?;
            sent.push((i, at));
        }
    }
    publisher.flush().await?;
    Ok(sent)
}

/// Per stage, p50 and p99 in ms (the upper bound of the bucket where each is reached) of what
/// was recorded between two bucket snapshots.
fn stage_percentiles(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
) -> Vec<(String, [f64; 2])> {
    let mut by_stage: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for ((stage, le), count) in after {
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        let earlier = before
            .get(&(stage.clone(), le.clone()))
            .copied()
            .unwrap_or(0.0);
        by_stage
            .entry(stage)
            .or_default()
            .push((bound, count - earlier));
    }
    by_stage
        .into_iter()
        .filter_map(|(stage, mut buckets)| {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let total = buckets.last()?.1;
            if total <= 0.0 {
                return None;
            }
            let at = |q: f64| {
                buckets
                    .iter()
                    .find(|(_, c)| *c >= q * total)
                    .map_or(f64::INFINITY, |(b, _)| b * 1000.0)
            };
            Some((stage.to_string(), [at(0.5), at(0.99)]))
        })
        .collect()
}

/// p50, p99 and max of latencies in ms.
fn percentiles(mut lat: Vec<u64>) -> [f64; 3] {
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0) as f64
    };
    [pct(0.5), pct(0.99), pct(1.0)]
}

fn spawn_worker(
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

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((ticks(11) + ticks(12)) / 100.0)
}

/// The machine's (busy, total) CPU time so far, all cores, from /proc/stat (in ticks).
fn machine_cpu() -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: idle and iowait are not busy.
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    Ok((total - idle, total))
}

/// A memory figure of /proc/<pid>/status in MB: `VmRSS` (now) or `VmHWM` (peak).
fn memory_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Ok(kb / 1024.0)
}

/// Commands Redis has run since its start, scripts' commands included (`INFO commandstats`).
async fn redis_commands(conn: &mut crate::relay::store::Conn) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .filter_map(|l| {
            l.split_once("calls=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

/// Deletes the run's Redis keys (they would otherwise live out their retention TTL).
async fn forget_redis(conn: &ConnConfig) {
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn cleanup(connection: &lapin::Connection, conn: &ConnConfig, shards: u16) {
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

fn print(rows: &[Row], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<42} {:>12} {:>12} {:>7}  target",
        "scenario", "figure", "value", "baseline", "ratio"
    );
    for r in rows {
        let opt =
            |v: Option<f64>, p: usize| v.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<12} {:<42} {:>12.2} {:>12} {:>7}  {}",
            r.scenario,
            r.figure,
            r.value,
            opt(r.baseline, 1),
            opt(r.ratio, 2),
            r.target
        );
    }
    Ok(())
}
