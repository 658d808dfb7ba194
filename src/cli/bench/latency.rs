//! Scenario 3: publish → ECS call latency at a given rate, beside the broker alone at the same
//! rate, with the machine's and the worker's CPU, the Redis gate and the worker's stages.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::cli::publish::Publisher;
use crate::relay::amqp;
use crate::sim::CallRecord;

use super::events::{lifecycles, BenchEvent};
use super::harness::{cleanup, conn};
use super::measure::{cpu_secs, machine_cpu, now_ms, percentiles, stage_percentiles};
use super::throughput::bare_consumers;
use super::{row, Bench, Row};

impl Bench {
    /// Scenario 3: realistic lifecycles at `rate` events/s for about five seconds; for each
    /// task event, publish → the sim receiving its call.
    pub(super) async fn latency(&mut self, tag: &str, rate: f64, load: &str) -> anyhow::Result<()> {
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
        // The Redis gate on a healthy local Redis: closed time and calls it held back, this
        // row only (0 and 0 unless a reply was overdue or a write refused).
        let gate_after = self.gate_figures().await;
        for (figure, value, target) in [
            ("machine CPU busy, share of all cores", machine_busy, ""),
            ("worker CPU, cores", worker_cores, ""),
            ("Redis gate closed, ms", gate_after.0 - gate_before.0, "0"),
            (
                "calls held by the Redis gate",
                gate_after.1 - gate_before.1,
                "0",
            ),
        ] {
            self.rows
                .push(row("latency", &format!("{figure} ({load})"), value, target));
        }
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
