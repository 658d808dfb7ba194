//! `bench`: how fast one worker takes events compared with the broker's own limit on this
//! machine, and how fully it uses the fleet-wide ECS call limit. Runs against the local
//! RabbitMQ and Redis, an in-process ecs-sim, and a worker child process (this binary).

use std::collections::VecDeque;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::json;

use crate::amqp;
use crate::config::ConnConfig;
use crate::publish::publish_lines;
use crate::sim::{Sim, SimConfig};

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
    let arn = format!("arn:aws:ecs:us-east-1:123456789012:task/bench/{run}{tag}{i:010}");
    let line = json!({"schemaVersion":1,"eventId":format!("{run}-{tag}{i}"),"type":"task","cluster":"bench",
        "taskArn":arn,"occurredAt":"2026-11-28T10:00:00Z","status":"RUNNING"})
    .to_string();
    (arn, line)
}

/// 10 events per task: 4 containers RUNNING, task RUNNING, 4 containers STOPPED, task STOPPED.
fn lifecycles(run: &str, tasks: usize) -> Vec<String> {
    let arn = |i: usize| format!("arn:aws:ecs:us-east-1:123456789012:task/bench/{run}{i:010}");
    let ev = |i: usize, n: &str, kind: &str, status: &str, container: Option<&str>| {
        let mut v = json!({"schemaVersion":1,"eventId":format!("{run}-{i}-{n}"),"type":kind,"cluster":"bench",
            "taskArn":arn(i),"occurredAt":"2026-11-28T10:00:00Z","status":status});
        if let Some(c) = container {
            v["containerName"] = json!(c);
        }
        v.to_string()
    };
    let mut out = Vec::with_capacity(tasks * 10);
    for phase in ["RUNNING", "STOPPED"] {
        for i in 0..tasks {
            for c in ["app", "sidecar", "log", "proxy"] {
                out.push(ev(i, &format!("{c}-{phase}"), "container", phase, Some(c)));
            }
            out.push(ev(i, phase, "task", phase, None));
        }
    }
    out
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    args.conn.resolve_secrets()?;
    let run = format!("{:08x}", rand::random::<u32>());
    let tasks = (args.events / 10).max(1);
    let lines = lifecycles(&run, tasks);
    let total = lines.len();
    let mut rows = Vec::new();

    eprintln!(
        "bench: baseline — a bare consumer acking {total} preloaded messages from {} quorum queues",
        args.shards
    );
    let base_conn = conn(&args, &format!("bench.base.{run}"));
    let baseline = baseline(&base_conn, args.shards, &lines).await?;

    eprintln!("bench: ingest — one worker taking the same {total} messages");
    let sim = Sim::new(SimConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", listener.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sim.clone().serve(listener, stop.clone().cancelled_owned()));
    let relay_conn = conn(&args, &format!("bench.relay.{run}"));
    let connection = amqp::connect(&relay_conn.amqp_url, &relay_conn.amqp_tls(), "bench").await?;
    amqp::declare(&connection, &relay_conn.exchange, args.shards).await?;
    publish_lines(&relay_conn, lines.join("\n").as_bytes()).await?;
    let metrics_port = free_port()?;
    let mut worker = spawn_worker(&args, &relay_conn, &sim_url, metrics_port)?;
    let http = reqwest::Client::new();
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let mut first = None;
    let started = Instant::now();
    let ingest_secs = loop {
        let taken = taken(&http, &metrics).await;
        if taken > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if taken >= total as u64 {
            break first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "ingest did not finish: {taken} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let expected_calls = tasks as u64 * 2;
    while sim.stats().ok < expected_calls {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "calls did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls_secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(1.0);
    let (cpu_secs, peak_rss_mb) = process_cost(worker.id())?;
    let events_per_sec = total as f64 / ingest_secs.max(1e-9);
    rows.push(Row {
        scenario: "ingest",
        figure: "events/s, first to last ack".into(),
        value: events_per_sec,
        baseline: Some(baseline),
        ratio: Some(events_per_sec / baseline),
        target: ">= 0.6 x baseline",
    });
    rows.push(row(
        "ingest",
        "ECS calls/s",
        sim.stats().ok as f64 / calls_secs,
        "",
    ));
    rows.push(row(
        "ingest",
        "events per ECS call",
        total as f64 / sim.stats().ok.max(1) as f64,
        "",
    ));
    rows.push(row(
        "cost",
        "worker CPU s per 1000 events",
        cpu_secs * 1000.0 / total as f64,
        "",
    ));
    rows.push(row("cost", "worker peak RSS MB", peak_rss_mb, "<= 100"));

    eprintln!(
        "bench: utilisation — {} tasks waiting, ecs-sim latency {} ms",
        args.backlog, args.latency_ms
    );
    sim.set_latency(Duration::from_millis(args.latency_ms));
    let before = sim.stats().ok;
    let backlog: Vec<String> = (0..args.backlog)
        .map(|i| task_running(&run, "u", i).1)
        .collect();
    publish_lines(&relay_conn, backlog.join("\n").as_bytes()).await?;
    while sim.stats().ok < before + args.backlog as u64 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "backlog did not drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls: Vec<_> = sim.calls().into_iter().skip(before as usize).collect();
    let span_ms = calls
        .iter()
        .filter_map(|c| c.finished_at_ms)
        .max()
        .unwrap_or(0)
        - calls.iter().map(|c| c.received_at_ms).min().unwrap_or(0);
    let achieved = args.backlog as f64 / (span_ms.max(1) as f64 / 1000.0);
    let ideal = 10.0 / (args.latency_ms as f64 / 1000.0);
    rows.push(Row {
        scenario: "utilisation",
        figure: "ECS calls/s vs limit / latency".into(),
        value: achieved,
        baseline: Some(ideal),
        ratio: Some(achieved / ideal),
        target: ">= 0.95",
    });

    eprintln!("bench: latency — task events at half the ingest rate, publish to ECS call");
    sim.set_latency(Duration::ZERO);
    let rate = (events_per_sec / 2.0).max(100.0);
    let per_tick = ((rate / 100.0).ceil() as usize).max(1); // one chunk every 10 ms
    let count = (rate * 5.0) as usize; // about five seconds
    let mut published = std::collections::HashMap::with_capacity(count);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for chunk in (0..count).collect::<Vec<_>>().chunks(per_tick) {
        tick.tick().await;
        let at = now_ms();
        let lines: Vec<String> = chunk
            .iter()
            .map(|i| {
                let (arn, line) = task_running(&run, "l", *i);
                published.insert(arn, at);
                line
            })
            .collect();
        publish_lines(&relay_conn, lines.join("\n").as_bytes()).await?;
    }
    while sim
        .calls()
        .iter()
        .filter(|c| published.contains_key(&c.key))
        .count()
        < count
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1200),
            "latency run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat: Vec<u64> = sim
        .calls()
        .iter()
        .filter_map(|c| {
            published
                .get(&c.key)
                .map(|p| c.received_at_ms.saturating_sub(*p))
        })
        .collect();
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0) as f64
    };
    rows.push(row(
        "latency",
        &format!("p50 ms at {rate:.0} events/s"),
        pct(0.5),
        "",
    ));
    rows.push(row("latency", "p99 ms", pct(0.99), "<= 25"));
    rows.push(row("latency", "max ms", pct(1.0), ""));

    eprintln!("bench: Redis memory — 10000 pending tasks while ECS holds every call");
    let redis =
        crate::store::Store::connect(&relay_conn.redis_url, &relay_conn.redis_tls(), "bench")
            .await?
            .client();
    let mut rconn = redis.get_multiplexed_async_connection().await?;
    let used = |info: String| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let mem_before = used(
        redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut rconn)
            .await?,
    );
    sim.add_rule(crate::sim::Rule {
        key: "*".into(),
        action: crate::sim::Action::Hold,
        times: 10,
    });
    let taken_before = taken(&http, &metrics).await;
    let pending: Vec<String> = (0..10_000).map(|i| task_running(&run, "p", i).1).collect();
    publish_lines(&relay_conn, pending.join("\n").as_bytes()).await?;
    while taken(&http, &metrics).await < taken_before + 10_000 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1200),
            "pending tasks not taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mem_after = used(
        redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut rconn)
            .await?,
    );
    rows.push(row(
        "cost",
        "Redis bytes per pending task",
        (mem_after - mem_before) / 10_000.0,
        "<= 2048",
    ));
    sim.release(None);
    let (_, peak_rss_mb) = process_cost(worker.id())?;
    rows.push(row(
        "cost",
        "worker peak RSS MB (after all)",
        peak_rss_mb,
        "<= 100",
    ));

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(worker.id().to_string())
        .status();
    let _ = worker.wait();
    stop.cancel();
    cleanup(&connection, &relay_conn.exchange, args.shards).await;
    let _ = connection.close(200, "bench done".into()).await;
    print(&rows, args.json)
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
    for shard in 0..shards {
        let ch = connection.create_channel().await?;
        ch.basic_qos(256, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                amqp::shard_queue(&conn.exchange, shard).as_str().into(),
                format!("bench-base-{shard}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(first)) = consumer.next().await {
                let mut batch: VecDeque<_> = VecDeque::from([first]);
                while batch.len() < 256 {
                    match futures_util::FutureExt::now_or_never(consumer.next()) {
                        Some(Some(Ok(d))) => batch.push_back(d),
                        _ => break,
                    }
                }
                if let Some(last) = batch.back() {
                    if ch
                        .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if tx.send((batch.len(), Instant::now())).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let (mut got, mut first, mut last) = (0usize, None, Instant::now());
    while got < total {
        let Some((n, at)) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await? else {
            anyhow::bail!("baseline consumers stopped");
        };
        first.get_or_insert(at);
        got += n;
        last = at;
    }
    cleanup(&connection, &conn.exchange, shards).await;
    let _ = connection.close(200, "baseline done".into()).await;
    let secs = first
        .map(|f| last.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    Ok(total as f64 / secs.max(1e-9))
}

fn spawn_worker(
    args: &BenchArgs,
    conn: &ConnConfig,
    sim_url: &str,
    metrics_port: u16,
) -> anyhow::Result<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .arg("worker")
        .env("RELAY_AMQP_URL", &conn.amqp_url)
        .env("RELAY_REDIS_URL", &conn.redis_url)
        .env("RELAY_EXCHANGE", &conn.exchange)
        .env("RELAY_SHARDS", args.shards.to_string())
        .env("RELAY_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("RELAY_WORKER_ID", format!("{}-bench", conn.exchange))
        .env("AWS_ENDPOINT_URL_ECS", sim_url)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?)
}

/// Events the worker has taken into Redis (consumed + duplicates), from its metrics.
async fn taken(http: &reqwest::Client, url: &str) -> u64 {
    let Ok(resp) = http.get(url).send().await else {
        return 0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with(crate::metrics::EVENTS_CONSUMED)
                || l.starts_with(crate::metrics::EVENTS_DUPLICATE)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// (CPU seconds, peak RSS in MB) of a process, from /proc.
fn process_cost(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    Ok((ticks / 100.0, hwm_kb / 1024.0))
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

async fn cleanup(connection: &lapin::Connection, exchange: &str, shards: u16) {
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
        "{:<12} {:<34} {:>12} {:>12} {:>7}  target",
        "scenario", "figure", "value", "baseline", "ratio"
    );
    for r in rows {
        let opt =
            |v: Option<f64>, p: usize| v.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<12} {:<34} {:>12.2} {:>12} {:>7}  {}",
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
