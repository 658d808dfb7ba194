//! ecs-sim: a local Amazon ECS endpoint (AWS JSON 1.1) with fault injection and an admin API
//! under `/_sim/`, so the relay and its demo can run without AWS. See `ecs_state_relay::sim`.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ecs_state_relay::sim::{Sim, SimConfig};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "ecs-sim",
    version,
    about = "Local stand-in for the Amazon ECS API"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ECS_SIM_LISTEN", default_value = "127.0.0.1:4566")]
    listen: String,
    /// Delay applied to every ECS call before it is answered.
    #[arg(long, env = "ECS_SIM_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Capacity mode: throttle any call that arrives while this many are in flight (0: off).
    /// Changed at runtime with `POST /_sim/capacity {"max_in_flight": K}`.
    #[arg(long, env = "ECS_SIM_CAPACITY", default_value_t = 0)]
    capacity: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();

    // Register signal handlers before serving so an early SIGTERM is not lost.
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => tracing::info!("SIGINT received, shutting down"),
            _ = sigterm.recv() => tracing::info!("SIGTERM received, shutting down"),
        }
    };

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let sim = Sim::new(SimConfig {
        latency: Duration::from_millis(args.latency_ms),
        capacity: (args.capacity > 0).then_some(args.capacity),
    });
    println!("ecs-sim listening on http://{addr}");
    sim.serve(listener, shutdown).await.context("serving")?;
    Ok(())
}
