//! Adaptive concurrency (issue 16): when ECS throttles above K calls in flight, the fleet's
//! effective limit comes down until throttling all but stops, and returns to the ceiling once
//! ECS has room again. Each test prints its figures.

use std::time::{Duration, Instant};

use crate::common::*;
use ecs_state_relay::cli::status;
use ecs_state_relay::relay::adaptive::effective_limit;
use ecs_state_relay::relay::config::WorkerConfig;
use ecs_state_relay::sim::CallRecord;

/// The adaptive window of these tests (production default 1 s).
const WINDOW_MS: u64 = 200;
/// The limit halves at the first throttle (10 → 5), then at most once per window: five
/// windows after the first throttle it is in its cycle below K + 1.
const CONVERGED_AFTER_MS: u64 = 5 * WINDOW_MS;
/// From ceiling/2 back to the ceiling is +1 per window; twice that covers the reports'
/// quarter-window lag and a slow machine.
const RECOVERY_BOUND: Duration = Duration::from_millis(2 * 10 * WINDOW_MS + 2_000);

/// A worker with the ceiling 10 and this file's window.
async fn start_worker(env: &mut Env, adaptive: bool) {
    let cfg = WorkerConfig {
        concurrency_limit: 10,
        adaptive,
        adaptive_window_ms: WINDOW_MS,
        ..env.config()
    };
    env.start_worker(cfg).await;
}

fn throttled(c: &CallRecord) -> bool {
    c.outcome.as_deref() == Some("ThrottlingException")
}

/// For each call, how many calls were in flight when it arrived (itself included).
fn in_flight_at_arrival(calls: &[CallRecord]) -> Vec<usize> {
    calls
        .iter()
        .map(|c| {
            calls
                .iter()
                .filter(|d| {
                    d.received_at_ms <= c.received_at_ms
                        && d.finished_at_ms.is_none_or(|f| f > c.received_at_ms)
                })
                .count()
        })
        .collect()
}

/// Publishes RUNNING for `tasks` and waits until the effective limit is back at the ceiling.
async fn flow_until_ceiling(env: &Env, tasks: &[String], what: &str) {
    env.publish(&tasks.iter().map(|t| task(t, "RUNNING")).collect::<Vec<_>>())
        .await;
    eventually!(
        RECOVERY_BOUND,
        what,
        effective_limit(&env.store).await.expect("redis") == Some(10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_backs_off_when_ecs_throttles_and_returns_to_the_ceiling() {
    let mut env = Env::new("adaptive", 4).await;
    env.sim.set_latency(Duration::from_millis(20));
    env.sim.set_capacity(Some(4));
    for _ in 0..2 {
        start_worker(&mut env, true).await;
    }

    // A backlog of 500 tasks, each RUNNING then STOPPED.
    let tasks: Vec<String> = (0..500).map(|i| arn(&format!("adaptive-{i:03}"))).collect();
    let events: Vec<_> = ["RUNNING", "STOPPED"]
        .iter()
        .flat_map(|s| tasks.iter().map(move |t| task(t, s)))
        .collect();
    env.publish(&events).await;
    eventually!(
        Duration::from_secs(90),
        "the backlog is sent",
        env.sim.stats().ok >= 1_000 && all_stopped(&env, &tasks)
    );

    let calls = env.sim.calls();
    let (lost, disorder, _dups) = audit(&calls, &tasks);
    assert_eq!((lost, disorder), (0, 0), "lost / out of order");
    assert!(
        env.sim.stats().max_in_flight <= 10,
        "the ceiling was exceeded: {} in flight",
        env.sim.stats().max_in_flight
    );
    let first_throttle = calls
        .iter()
        .find(|c| throttled(c))
        .map(|c| c.received_at_ms)
        .expect("ECS throttled at first");
    let converged = first_throttle + CONVERGED_AFTER_MS;
    let after: Vec<CallRecord> = calls
        .iter()
        .filter(|c| c.received_at_ms >= converged)
        .cloned()
        .collect();
    let load = in_flight_at_arrival(&calls);
    let settled: Vec<usize> = calls
        .iter()
        .zip(&load)
        .filter(|(c, _)| c.received_at_ms >= converged)
        .map(|(_, n)| *n)
        .collect();
    let within = settled.iter().filter(|n| **n <= 5).count() as f64 / settled.len() as f64;
    let throttled_share = after.iter().filter(|c| throttled(c)).count() as f64 / after.len() as f64;
    let span_s = (after
        .iter()
        .filter_map(|c| c.finished_at_ms)
        .max()
        .unwrap_or(converged)
        - converged) as f64
        / 1000.0;
    println!(
        "K=4: {} calls after convergence ({converged_ms} ms after the first throttle), \
         {:.1} % of them arrived with <= 5 in flight, {:.1} % throttled, {:.0} ok calls/s",
        after.len(),
        within * 100.0,
        throttled_share * 100.0,
        after
            .iter()
            .filter(|c| c.outcome.as_deref() == Some("ok"))
            .count() as f64
            / span_s,
        converged_ms = CONVERGED_AFTER_MS,
    );
    assert!(
        after.len() > 100,
        "too few calls after convergence to judge"
    );
    assert!(within >= 0.9, "in flight above 5 too often: {within:.3}");
    assert!(
        throttled_share < 0.10,
        "throttled share {throttled_share:.3}"
    );
    let low = effective_limit(&env.store).await.expect("redis");
    assert!(low.is_some_and(|l| l <= 5), "effective limit {low:?}");
    // What an operator sees.
    let status = status::collect(&status::StatusArgs {
        conn: env.conn(),
        shards: 4,
        concurrency_limit: 10,
        json: true,
        clear_store_lost: false,
    })
    .await
    .expect("status");
    assert!(
        status.effective_limit <= 5,
        "status: {}",
        status.effective_limit
    );
    assert_eq!(status.permits_limit, 10);

    // ECS has room again: the limit climbs back to the ceiling while calls flow.
    env.sim.set_capacity(Some(20));
    let changed = Instant::now();
    let more = arns("adaptive-more", 1_000);
    flow_until_ceiling(&env, &more, "the limit is back at the ceiling").await;
    println!(
        "K=20: the effective limit was back at 10 after {:.2} s (bound {:.1} s)",
        changed.elapsed().as_secs_f64(),
        RECOVERY_BOUND.as_secs_f64()
    );
    eventually!(
        Duration::from_secs(60),
        "the second backlog is sent",
        all_sent(&env, &more)
    );
    assert!(
        env.sim.stats().max_in_flight <= 10,
        "the ceiling was exceeded"
    );
    env.cleanup().await;
}

/// Every task's STOPPED was accepted.
fn all_stopped(env: &Env, tasks: &[String]) -> bool {
    let stopped: std::collections::HashSet<String> = env
        .sim
        .calls()
        .into_iter()
        .filter(|c| {
            c.outcome.as_deref() == Some("ok")
                && c.body.get("status").and_then(|s| s.as_str()) == Some("STOPPED")
        })
        .map(|c| c.key)
        .collect();
    tasks.iter().all(|t| stopped.contains(t))
}

/// `RELAY_ADAPTIVE=off`: throttling changes nothing about the limit; the fixed limit stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_adaptive_off_the_fixed_limit_stays_under_throttling() {
    let mut env = Env::new("adaptive-off", 4).await;
    env.sim.set_latency(Duration::from_millis(20));
    env.sim.set_capacity(Some(4));
    start_worker(&mut env, false).await;
    let tasks: Vec<String> = (0..200).map(|i| arn(&format!("fixed-{i:03}"))).collect();
    env.publish(&tasks.iter().map(|t| task(t, "RUNNING")).collect::<Vec<_>>())
        .await;
    eventually!(
        Duration::from_secs(60),
        "the backlog is sent",
        all_sent(&env, &tasks)
    );
    let calls = env.sim.calls();
    let throttled_share = calls.iter().filter(|c| throttled(c)).count() as f64 / calls.len() as f64;
    println!(
        "adaptive off, K=4: {} calls, {:.1} % throttled, up to {} in flight",
        calls.len(),
        throttled_share * 100.0,
        env.sim.stats().max_in_flight
    );
    assert!(
        env.sim.stats().max_in_flight > 5,
        "the fixed limit should keep more than K calls in flight"
    );
    assert_eq!(effective_limit(&env.store).await.expect("redis"), None);
    env.cleanup().await;
}

/// After a failover to a Redis host whose clock is behind, the stored times lie in the future:
/// they must not freeze the limit below its ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_times_from_a_clock_ahead_do_not_freeze_the_limit() {
    let mut env = Env::new("adaptive-clock", 2).await;
    let an_hour_ahead = (std::time::SystemTime::now() + Duration::from_secs(3_600))
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let mut conn = env.store.conn().await.expect("redis");
    let _: () = redis::cmd("HSET")
        .arg(env.store.global_key("concurrency"))
        .arg("limit")
        .arg(3)
        .arg("changed")
        .arg(an_hour_ahead)
        .arg("decreased")
        .arg(an_hour_ahead)
        .arg("throttled")
        .arg(an_hour_ahead)
        .query_async(&mut conn)
        .await
        .expect("hset");
    env.sim.set_latency(Duration::from_millis(20));
    start_worker(&mut env, true).await;
    let tasks = arns("clock", 1_000);
    flow_until_ceiling(&env, &tasks, "the limit climbs back to the ceiling").await;
    env.cleanup().await;
}
