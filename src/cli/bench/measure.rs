//! The measuring helpers: the worker's own metrics, percentiles, CPU and memory from /proc,
//! Redis `INFO` figures and the wall clock.

use std::collections::BTreeMap;

use super::{row, Bench};

impl Bench {
    /// Events the worker has taken into Redis (consumed + duplicates), from its metrics.
    pub(super) async fn taken(&self) -> u64 {
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

    /// The worker's peak RSS so far, as a row.
    pub(super) fn peak_rss_row(&mut self, when: &str) -> anyhow::Result<()> {
        let peak = memory_mb(self.worker.id(), "VmHWM")?;
        self.rows.push(row(
            "cost",
            &format!("worker peak RSS MB ({when})"),
            peak,
            "<= 100",
        ));
        Ok(())
    }

    /// The worker's Redis gate so far: (ms closed, calls held), summed over every `why`.
    pub(super) async fn gate_figures(&self) -> (f64, f64) {
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
    pub(super) async fn stage_buckets(&self) -> BTreeMap<(String, String), f64> {
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
}

/// Per stage, p50 and p99 in ms (the upper bound of the bucket where each is reached) of what
/// was recorded between two bucket snapshots.
pub(super) fn stage_percentiles(
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
pub(super) fn percentiles(mut lat: Vec<u64>) -> [f64; 3] {
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0) as f64
    };
    [pct(0.5), pct(0.99), pct(1.0)]
}

/// CPU seconds (user + system) of a process, from /proc.
pub(super) fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
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
pub(super) fn machine_cpu() -> anyhow::Result<(f64, f64)> {
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
pub(super) fn memory_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Ok(kb / 1024.0)
}

pub(super) async fn used_memory(conn: &mut crate::relay::store::Conn) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Commands Redis has run since its start, scripts' commands included (`INFO commandstats`).
pub(super) async fn redis_commands(conn: &mut crate::relay::store::Conn) -> anyhow::Result<u64> {
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

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
