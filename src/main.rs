//! `ecs-state-relay`: the worker service and its operator commands.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ecs_state_relay::cli::{bench, demo, dlq, inspect, publish, status};
use ecs_state_relay::relay::config::{ConnConfig, WorkerConfig};
use ecs_state_relay::relay::ecs::Ecs;
use ecs_state_relay::relay::logging;
use ecs_state_relay::relay::metrics::{self, Readiness};
use ecs_state_relay::relay::worker;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ecs-state-relay",
    version,
    about = "Relays ECS agent state changes from RabbitMQ to ECS"
)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "RELAY_LOG_FORMAT", default_value = "text", global = true, value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a worker (the service).
    Worker(WorkerConfig),
    /// Publish JSON lines (one event each) from a file or stdin, with publisher confirms.
    Publish {
        #[command(flatten)]
        conn: ConnConfig,
        /// File of JSON lines; stdin when absent or "-".
        file: Option<String>,
    },
    /// Measure ingest against the broker's own limit, and ECS-permit utilisation (release build).
    Bench(bench::BenchArgs),
    /// Show shards, owners, pending work, queue depths, permits and live workers.
    Status(status::StatusArgs),
    /// Where is my task? What the relay holds of one task (or instance attachment) and what its
    /// owning worker is doing with it.
    Inspect(inspect::InspectArgs),
    /// Publish a generated fleet of task lifecycles and follow it through ecs-sim to a summary.
    Demo(demo::DemoArgs),
    /// List dead-lettered messages with their reasons, or replay them to the exchange.
    Dlq(dlq::DlqArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The bench prints a table; its in-process ecs-sim's per-call lines would drown it.
    let level = if matches!(cli.command, Command::Bench(_)) {
        "warn"
    } else {
        "info"
    };
    logging::init(cli.log_format == "json", level);
    let result = match cli.command {
        Command::Worker(cfg) => run_worker(cfg).await,
        Command::Publish { conn, file } => run_publish(conn, file).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Inspect(args) => inspect::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_worker(mut cfg: WorkerConfig) -> anyhow::Result<()> {
    // Installed before anything slow (the AWS configuration takes milliseconds): until then a
    // SIGTERM ends the process by the signal, not by a clean shutdown.
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(signals()?, cancel.clone()));
    cfg.worker_id = Some(cfg.worker_id());
    let cfg = cfg.validate()?;
    let ecs = Ecs::from_env(Duration::from_millis(cfg.call_timeout_ms), &cfg.worker_id()).await?;
    let ready = Readiness::default();
    if !cfg.metrics_addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&cfg.metrics_addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on RELAY_METRICS_ADDR {}: {e}",
                    cfg.metrics_addr
                )
            })?;
        tracing::info!(addr = %cfg.metrics_addr, "serving /metrics, /healthz, /readyz");
        // Installed here, not when the server task first runs: counts made before the recorder
        // exists are lost, and the worker starts counting at once.
        metrics::handle();
        tokio::spawn(metrics::serve(
            listener,
            ready.clone(),
            cfg.inspect,
            cancel.clone(),
        ));
    }
    worker::run(cfg, ecs, ready, cancel).await
}

/// SIGTERM and SIGINT, handled from the moment this returns.
fn signals() -> anyhow::Result<(Signal, Signal)> {
    let handler = |kind| signal(kind).context("cannot install signal handlers");
    Ok((
        handler(SignalKind::terminate())?,
        handler(SignalKind::interrupt())?,
    ))
}

/// SIGTERM or SIGINT starts a clean shutdown; a second one exits at once.
async fn stop_on_signal((mut term, mut int): (Signal, Signal), cancel: CancellationToken) {
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutdown requested: stopping intake, finishing calls in flight");
    cancel.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}

async fn run_publish(conn: ConnConfig, file: Option<String>) -> anyhow::Result<()> {
    let count = match file.as_deref() {
        None | Some("-") => {
            publish::publish_lines(&conn, tokio::io::BufReader::new(tokio::io::stdin())).await?
        }
        Some(path) => {
            let f = tokio::fs::File::open(path)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open {path}: {e}"))?;
            publish::publish_lines(&conn, tokio::io::BufReader::new(f)).await?
        }
    };
    eprintln!("published {count} events (all confirmed)");
    Ok(())
}
