//! `bench`: how fast one worker takes events compared with the broker's own limit on this
//! machine, and how fully it uses the fleet-wide ECS call limit. Runs against the local
//! RabbitMQ and Redis, an in-process ecs-sim, and a worker child process (this binary).

mod events;
mod harness;
mod latency;
mod measure;
mod memory;
mod overload;
mod throughput;

use std::process::{Child, Command};
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use crate::cli::publish::Publisher;
use crate::relay::amqp;
use crate::relay::config::AuthMode;
use crate::relay::config::ConnConfig;
use crate::sim::{Sim, SimConfig};

use events::lifecycles;
use harness::{cleanup, conn, forget_redis, free_port, spawn_worker};
use throughput::baseline;

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
}

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

/// A row measured against a baseline (the ratio is value ÷ baseline).
fn against(
    scenario: &'static str,
    figure: String,
    value: f64,
    baseline: f64,
    target: &'static str,
) -> Row {
    Row {
        scenario,
        figure,
        value,
        baseline: Some(baseline),
        ratio: Some(value / baseline),
        target,
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
