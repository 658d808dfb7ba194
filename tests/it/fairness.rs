//! Fair share between clusters (rule 12): a cluster's storm of changes must not hold another
//! cluster's next change back, wherever its tasks land, and the storm still gets every call
//! nobody else wants. Timing tests: they run in the serial group (see .config/nextest.toml).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ecs_state_relay::relay::amqp;
use ecs_state_relay::sim::CallRecord;
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::{json, Value};

use crate::common::*;

/// The sim's answer time: with the limit of 10, the call capacity is about 200 calls/s.
const CALL: Duration = Duration::from_millis(50);

fn cluster_task(cluster: &str, id: &str) -> String {
    format!("arn:aws:ecs:us-east-1:123456789012:task/{cluster}/{id}")
}

/// `n` tasks of `cluster`, ids `<prefix>0`, `<prefix>1`, …
fn cluster_tasks(cluster: &str, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| cluster_task(cluster, &format!("{prefix}{i}")))
        .collect()
}

fn running(cluster: &str, arn: &str) -> Value {
    json!({"schemaVersion":1,"eventId":format!("{arn}-running"),"type":"task","cluster":cluster,
           "taskArn":arn,"occurredAt":"2026-12-06T10:00:00Z","status":"RUNNING"})
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Nearest-rank percentile of `xs` (sorted here).
fn percentile(xs: &mut [u64], p: f64) -> u64 {
    xs.sort_unstable();
    let rank = ((p * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

/// Two worker processes at the test's settings; returns them once every shard is owned.
async fn two_workers(env: &mut Env) -> (Proc, Proc, [String; 2]) {
    let (c1, c2) = (env.config(), env.config());
    let ids = [c1.worker_id.clone().unwrap(), c2.worker_id.clone().unwrap()];
    let w1 = env.spawn_process(&c1);
    let w2 = env.spawn_process(&c2);
    let shards = env.shards;
    eventually(
        Duration::from_secs(30),
        "both workers own shards",
        || async {
            let owners = owners(env, shards).await;
            owners.iter().all(Option::is_some)
                && ids
                    .iter()
                    .all(|id| owners.iter().any(|o| o.as_deref() == Some(id.as_str())))
        },
    )
    .await;
    (w1, w2, ids)
}

async fn owners(env: &Env, shards: u16) -> Vec<Option<String>> {
    let mut owners = Vec::new();
    for s in 0..shards {
        owners.push(env.store.lease_owner(s).await.ok().flatten());
    }
    owners
}

async fn stop(mut workers: Vec<Proc>) {
    for w in &workers {
        signal(w, "TERM");
    }
    for w in &mut workers {
        assert!(wait_exit(w, Duration::from_secs(20)).await.success());
    }
}

/// The shard queue each of `keys` lands in, learnt before any worker runs: the topology is
/// declared, one probe per key is published, and every shard queue is read empty.
async fn shard_of(env: &Env, keys: &[String]) -> HashMap<String, u16> {
    let conn = env.declared().await;
    let ch = amqp::confirm_channel(&conn).await.expect("channel");
    let mut confirms = Vec::new();
    for key in keys {
        let confirm = ch
            .basic_publish(
                env.exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                b"probe",
                BasicProperties::default(),
            )
            .await
            .expect("publish a probe");
        confirms.push(confirm);
    }
    for confirm in confirms {
        assert!(confirm.await.expect("confirm").is_ack());
    }
    // Quorum queues with a single active consumer refuse basic.get: consume them instead.
    let mut map = HashMap::new();
    let mut deliveries = Box::pin(shard_deliveries(&ch, env).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while map.len() < keys.len() {
        let next = tokio::time::timeout_at(deadline, deliveries.next()).await;
        let (shard, delivery) = match next {
            Ok(Some((shard, Ok(d)))) => (shard, d),
            other => panic!(
                "probes not all back ({} of {}): {other:?}",
                map.len(),
                keys.len()
            ),
        };
        map.insert(delivery.routing_key.to_string(), shard);
    }
    assert_eq!(map.len(), keys.len(), "every probe found");
    let _ = conn.close(200, "probed".into()).await;
    map
}

/// What a storm and a quiet cluster met.
struct StormFigures {
    quiet_p50_ms: u64,
    quiet_p99_ms: u64,
    /// Storm calls that had not yet started when the quiet cluster's last change was called.
    storm_left_at_last_quiet: usize,
    /// Over the middle 80 % of its calls.
    storm_calls_per_s: f64,
    /// The call capacity as the sim served it: the limit ÷ its mean time per call (its timer
    /// rounds each 50 ms up a little).
    capacity_per_s: f64,
}

/// Publishes `storm` at once, then `quiet` at 10/s; waits until every task was sent and checks
/// the audit: one accepted call per task, nothing lost, the limit never exceeded.
async fn storm_then_quiet(env: &Env, storm: &[String], quiet: &[String]) -> StormFigures {
    let events: Vec<Value> = storm.iter().map(|t| running("storm", t)).collect();
    env.publish(&events).await;
    let mut published = HashMap::new();
    for t in quiet {
        published.insert(t.clone(), now_ms());
        env.publish(&[running("quiet", t)]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all: Vec<String> = storm.iter().chain(quiet).cloned().collect();
    eventually!(
        Duration::from_secs(120),
        "every task sent",
        every_one_sent(env, &all)
    );
    let calls = env.sim.calls();
    check_audit(env, &calls, &all);
    let first_call = |t: &String| {
        calls
            .iter()
            .find(|c| &c.key == t)
            .map(|c| c.received_at_ms)
            .expect("sent")
    };
    let mut waits: Vec<u64> = quiet
        .iter()
        .map(|t| first_call(t).saturating_sub(published[t]))
        .collect();
    let last_quiet = quiet.iter().map(first_call).max().expect("quiet tasks");
    let mut storm_at: Vec<u64> = storm.iter().map(first_call).collect();
    storm_at.sort_unstable();
    let storm_left_at_last_quiet = storm_at.iter().filter(|&&t| t > last_quiet).count();
    // The steady state: the middle 80 % of the storm's calls (not the start, where intake
    // takes the CPU, nor the tail).
    let (from, to) = (storm_at.len() / 10, storm_at.len() * 9 / 10);
    let span_s = (storm_at[to] - storm_at[from]) as f64 / 1000.0;
    let held: Vec<u64> = calls
        .iter()
        .filter_map(|c| Some(c.finished_at_ms? - c.received_at_ms))
        .collect();
    let mean_call_s = held.iter().sum::<u64>() as f64 / held.len().max(1) as f64 / 1000.0;
    StormFigures {
        quiet_p50_ms: percentile(&mut waits, 0.50),
        quiet_p99_ms: percentile(&mut waits, 0.99),
        storm_left_at_last_quiet,
        storm_calls_per_s: (to - from) as f64 / span_s.max(0.001),
        capacity_per_s: 10.0 / mean_call_s.max(CALL.as_secs_f64()),
    }
}

/// Every one of `tasks` had a call accepted: one pass over the sim's calls (the test must not
/// take the CPU the workers are measured on).
fn every_one_sent(env: &Env, tasks: &[String]) -> bool {
    if (env.sim.stats().ok as usize) < tasks.len() {
        return false;
    }
    let calls = env.sim.calls();
    let ok: std::collections::HashSet<&str> = calls
        .iter()
        .filter(|c| c.outcome.as_deref() == Some("ok"))
        .map(|c| c.key.as_str())
        .collect();
    tasks.iter().all(|t| ok.contains(t.as_str()))
}

/// No loss, no reordering (one accepted call per task: each has one change), the limit kept.
fn check_audit(env: &Env, calls: &[CallRecord], tasks: &[String]) {
    let mut accepted: HashMap<&str, usize> = HashMap::new();
    for c in calls.iter().filter(|c| c.outcome.as_deref() == Some("ok")) {
        *accepted.entry(c.key.as_str()).or_default() += 1;
    }
    let lost = tasks
        .iter()
        .filter(|t| !accepted.contains_key(t.as_str()))
        .count();
    let extra: usize = accepted.values().map(|n| n - 1).sum();
    assert_eq!(lost, 0, "changes lost");
    assert_eq!(extra, 0, "changes sent twice");
    let max = env.sim.stats().max_in_flight;
    assert!(max <= 10, "the limit was exceeded: {max} calls in flight");
}

fn assert_fair(what: &str, f: &StormFigures) {
    println!(
        "{what}: quiet publish -> call p50 {} ms, p99 {} ms; storm calls not yet started at the last quiet call {}; storm drained at {:.0} calls/s, {:.0} % of the call capacity ({:.0} calls/s: 10 / the sim's mean call time)",
        f.quiet_p50_ms,
        f.quiet_p99_ms,
        f.storm_left_at_last_quiet,
        f.storm_calls_per_s,
        100.0 * f.storm_calls_per_s / f.capacity_per_s,
        f.capacity_per_s,
    );
    assert!(
        f.storm_left_at_last_quiet > 0,
        "the storm must still wait when the quiet cluster is done"
    );
    assert!(
        f.quiet_p99_ms <= 1_000,
        "quiet p99 {} ms > 1 s",
        f.quiet_p99_ms
    );
    assert!(
        f.storm_calls_per_s >= 0.9 * f.capacity_per_s,
        "the storm drained at {:.0} calls/s, under 90 % of the capacity",
        f.storm_calls_per_s
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_one_cluster_does_not_hold_back_a_quiet_one() {
    let mut env = Env::new("fair-storm", 8).await;
    env.sim.set_latency(CALL);
    let (w1, w2, _) = two_workers(&mut env).await;
    let storm = cluster_tasks("storm", "s", 3_000);
    let quiet = cluster_tasks("quiet", "q", 40);
    let figures = storm_then_quiet(&env, &storm, &quiet).await;
    stop(vec![w1, w2]).await;
    assert_fair("storm and quiet over both workers", &figures);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_cluster_on_one_worker_gets_calls_while_the_other_worker_has_only_storm_work() {
    let mut env = Env::new("fair-placed", 8).await;
    env.sim.set_latency(CALL);
    let storm_candidates = cluster_tasks("storm", "s", 5_000);
    let quiet_candidates = cluster_tasks("quiet", "q", 400);
    let all: Vec<String> = storm_candidates
        .iter()
        .chain(&quiet_candidates)
        .cloned()
        .collect();
    let shard = shard_of(&env, &all).await;
    let (w1, w2, ids) = two_workers(&mut env).await;
    let owner = owners(&env, env.shards).await;
    let on = |t: &String, id: &str| owner[shard[t] as usize].as_deref() == Some(id);
    // The storm only on the first worker's shards, the quiet cluster only on the second's.
    let placed = |candidates: &[String], id: &str, n: usize| -> Vec<String> {
        candidates
            .iter()
            .filter(|t| on(t, id))
            .take(n)
            .cloned()
            .collect()
    };
    let storm = placed(&storm_candidates, &ids[0], 2_000);
    let quiet = placed(&quiet_candidates, &ids[1], 40);
    assert!(
        storm.len() >= 1_500 && quiet.len() == 40,
        "placed {} / {}",
        storm.len(),
        quiet.len()
    );
    let figures = storm_then_quiet(&env, &storm, &quiet).await;
    let still = owners(&env, env.shards).await;
    stop(vec![w1, w2]).await;
    assert_eq!(still, owner, "the shards stayed where they were placed");
    assert_fair("storm on one worker, quiet on the other", &figures);
    env.cleanup().await;
}

/// Jain's fairness index of `shares`: 1 when equal, 1/n when one takes everything.
fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    sum * sum / (shares.len() as f64 * squares)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_backlogged_clusters_share_the_calls_evenly() {
    let mut env = Env::new("fair-four", 8).await;
    env.sim.set_latency(CALL);
    let (w1, w2, _) = two_workers(&mut env).await;
    let sizes = [
        ("c100", 100),
        ("c500", 500),
        ("c1000", 1_000),
        ("c2000", 2_000),
    ];
    let mut tasks = Vec::new();
    let mut events = Vec::new();
    // Published biggest first: first come, first served would give the smallest nothing.
    for (cluster, n) in sizes.iter().rev() {
        for i in 0..*n {
            let t = cluster_task(cluster, &format!("t{i}"));
            events.push(running(cluster, &t));
            tasks.push(t);
        }
    }
    env.publish(&events).await;
    let published = now_ms();
    eventually!(
        Duration::from_secs(120),
        "every task sent",
        every_one_sent(&env, &tasks)
    );
    stop(vec![w1, w2]).await;
    let calls = env.sim.calls();
    check_audit(&env, &calls, &tasks);
    // The window in which all four had ready work: from the last cluster's first call (and
    // every change in the broker) to the first cluster's last call.
    let mut by_cluster: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for c in &calls {
        let cluster = c.key.split('/').nth(1).unwrap_or_default();
        by_cluster
            .entry(cluster)
            .or_default()
            .push(c.received_at_ms);
    }
    let start = by_cluster
        .values()
        .map(|v| v[0])
        .max()
        .expect("calls")
        .max(published);
    let end = by_cluster
        .values()
        .map(|v| v[v.len() - 1])
        .min()
        .expect("calls");
    assert!(
        start < end,
        "the four clusters never had calls going at once: one waited for another to finish"
    );
    let shares: Vec<f64> = by_cluster
        .values()
        .map(|v| v.iter().filter(|&&t| t >= start && t <= end).count() as f64)
        .collect();
    let index = jain(&shares);
    println!(
        "four clusters: calls in the {} ms all four had work: {:?} (c100, c1000, c2000, c500 order: {:?}), Jain's index {index:.3}",
        end.saturating_sub(start),
        shares,
        by_cluster.keys().collect::<Vec<_>>()
    );
    assert!(index >= 0.95, "Jain's index {index:.3} < 0.95");
    env.cleanup().await;
}

#[test]
fn jain_is_one_when_equal_and_one_over_n_for_a_monopoly() {
    assert!((jain(&[5.0, 5.0, 5.0, 5.0]) - 1.0).abs() < 1e-9);
    assert!((jain(&[8.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-9);
}
