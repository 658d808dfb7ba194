//! Scenarios 1 and 2: how fast one worker takes events beside the broker's own limit (a bare
//! consumer on the same queues), and how fully it uses the ECS call limit against a slow ECS.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use crate::cli::publish::publish_lines;
use crate::relay::amqp;
use crate::relay::config::ConnConfig;

use super::events::task_running;
use super::harness::cleanup;
use super::measure::cpu_secs;
use super::{against, row, Bench};

/// The broker's limit on this machine: preloaded messages, one consumer per shard queue,
/// prefetch and multiple-acks as the worker uses them, nothing else done.
pub(super) async fn baseline(
    conn: &ConnConfig,
    shards: u16,
    lines: &[String],
) -> anyhow::Result<f64> {
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
pub(super) async fn bare_consumers(
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

impl Bench {
    /// Scenario 1: the same messages as the baseline, preloaded, then taken by one worker.
    /// Returns (events/s, ECS calls/s).
    pub(super) async fn ingest(
        &mut self,
        total: usize,
        baseline: f64,
    ) -> anyhow::Result<(f64, f64)> {
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
        self.rows.push(against(
            "ingest",
            "events/s, first to last ack".into(),
            events_per_sec,
            baseline,
            ">= 0.6 x baseline",
        ));
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
    pub(super) async fn utilisation(&mut self) -> anyhow::Result<()> {
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
        self.rows.push(against(
            "utilisation",
            "ECS calls/s vs limit / latency".into(),
            achieved,
            ideal,
            ">= 0.95",
        ));
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
}
