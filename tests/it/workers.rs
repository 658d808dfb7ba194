//! Whole-worker behaviour: crashes, two workers sharing the fleet-wide limit, isolation of a
//! failing task, a shard count that disagrees with the broker, and clean shutdown.

use std::time::{Duration, Instant};

use crate::common::*;
use ecs_state_relay::relay::metrics::Readiness;
use ecs_state_relay::relay::worker;
use ecs_state_relay::sim::{Action, Rule};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A task's lifecycle as events: containers RUNNING, task RUNNING, containers STOPPED, task STOPPED.
fn lifecycle(a: &str) -> Vec<Vec<Value>> {
    vec![
        vec![
            container(a, "web", "RUNNING"),
            container(a, "log", "RUNNING"),
            task(a, "RUNNING"),
        ],
        vec![
            container(a, "web", "STOPPED"),
            container(a, "log", "STOPPED"),
            task(a, "STOPPED"),
        ],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing_and_reorders_nothing() {
    let mut env = Env::new("sigkill", 4).await;
    env.sim.set_latency(Duration::from_millis(15));
    let mut cfg = env.config();
    cfg.lease_ms = 1_500;
    cfg.call_timeout_ms = 400; // fits the short lease (see WorkerConfig::validate)
    cfg.permit_lease_ms = 1_400;
    let mut first = env.spawn_process(&cfg);
    env.wait_all_shards_owned().await;

    let tasks: Vec<String> = (0..80).map(|i| arn(&format!("kill-{i}"))).collect();
    let phases: Vec<Vec<Vec<Value>>> = tasks.iter().map(|t| lifecycle(t)).collect();
    for phase in 0..2 {
        let batch: Vec<Value> = phases.iter().flat_map(|p| p[phase].clone()).collect();
        env.publish(&batch).await;
        if phase == 0 {
            // Kill while calls are flowing: some tasks sent, some queued in Redis, some unacked.
            eventually!(
                Duration::from_secs(20),
                "calls flowing",
                env.sim.stats().ok >= 20
            );
            signal(&first, "KILL");
            wait_exit(&mut first, Duration::from_secs(10)).await;
        }
    }
    let mut second_cfg = env.config();
    second_cfg.lease_ms = 1_500;
    second_cfg.call_timeout_ms = 400;
    second_cfg.permit_lease_ms = 1_400;
    let mut second = env.spawn_process(&second_cfg);
    eventually!(
        Duration::from_secs(60),
        "every task complete",
        audit(&env.sim.calls(), &tasks).0 == 0
    );
    let (lost, disorder, dups) = audit(&env.sim.calls(), &tasks);
    println!(
        "sigkill: events {} calls {} lost {lost} out-of-order {disorder} duplicates {dups}",
        tasks.len() * 6,
        env.sim.calls().len()
    );
    assert_eq!((lost, disorder), (0, 0));
    // Only calls in flight at the kill may be repeated: at most one per task, at most the limit.
    assert!(dups <= 10, "{dups} duplicates");
    signal(&second, "TERM");
    assert!(wait_exit(&mut second, Duration::from_secs(20))
        .await
        .success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_never_exceed_the_limit_and_saturate_it_while_a_backlog_waits() {
    let mut env = Env::new("saturation", 4).await;
    env.sim.set_latency(Duration::from_millis(250));
    let (c1, c2) = (env.config(), env.config());
    let mut w1 = env.spawn_process(&c1);
    let mut w2 = env.spawn_process(&c2);
    // Both workers own shards (2 each) before the backlog arrives.
    let (id1, id2) = (c1.worker_id.clone().unwrap(), c2.worker_id.clone().unwrap());
    eventually(Duration::from_secs(20), "shards split 2/2", || async {
        let mut owners = Vec::new();
        for s in 0..4 {
            owners.push(env.store.lease_owner(s).await.ok().flatten());
        }
        let n1 = owners
            .iter()
            .filter(|o| o.as_deref() == Some(id1.as_str()))
            .count();
        let n2 = owners
            .iter()
            .filter(|o| o.as_deref() == Some(id2.as_str()))
            .count();
        n1 == 2 && n2 == 2
    })
    .await;
    let tasks: Vec<String> = (0..120).map(|i| arn(&format!("sat-{i}"))).collect();
    env.publish(&tasks.iter().map(|t| task(t, "RUNNING")).collect::<Vec<_>>())
        .await;
    let mut saw_full = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.sim.stats().ok < tasks.len() as u64 {
        assert!(Instant::now() < deadline, "backlog not drained");
        let stats = env.sim.stats();
        assert!(stats.in_flight <= 10, "limit exceeded: {}", stats.in_flight);
        if stats.in_flight == 10 {
            saw_full += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = env.sim.stats();
    // Both workers' keys were sent: the limit was shared, not held by one worker.
    println!(
        "saturation: calls {} highest concurrency {} (limit 10), samples at the limit {saw_full}",
        stats.calls, stats.max_in_flight
    );
    assert_eq!(stats.max_in_flight, 10, "exactly the limit at the peak");
    assert!(
        saw_full >= 5,
        "the limit was in use while the backlog waited"
    );
    signal(&w1, "TERM");
    signal(&w2, "TERM");
    assert!(wait_exit(&mut w1, Duration::from_secs(20)).await.success());
    assert!(wait_exit(&mut w2, Duration::from_secs(20)).await.success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_calls_keep_failing_does_not_delay_other_tasks() {
    let env = Env::with_worker("isolation", 2, |_| {}).await;
    let bad = arn("always-failing");
    env.sim.add_rule(Rule {
        key: bad.clone(),
        action: Action::ServerError,
        times: 1_000_000,
    });
    env.publish(&[task(&bad, "RUNNING"), task(&bad, "STOPPED")])
        .await;
    eventually!(
        Duration::from_secs(20),
        "the bad task is retrying",
        env.calls_for(&bad).len() >= 2
    );
    let others: Vec<String> = (0..30).map(|i| arn(&format!("healthy-{i}"))).collect();
    env.publish(
        &others
            .iter()
            .map(|t| task(t, "RUNNING"))
            .collect::<Vec<_>>(),
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "every healthy task sent",
        || async {
            others.iter().all(|t| {
                env.calls_for(t)
                    .iter()
                    .any(|c| c.outcome.as_deref() == Some("ok"))
            })
        },
    )
    .await;
    // The failing task only retries its head; its STOPPED waits behind it.
    assert!(env
        .calls_for(&bad)
        .iter()
        .all(|c| c.body["status"] == "RUNNING"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_failing_tasks_than_a_shard_has_runners_do_not_delay_a_healthy_one() {
    // One shard: every task shares its 16 runners. Tasks waiting out a backoff must give
    // their runner back, or 40 failing tasks would starve the healthy one.
    let env = Env::with_worker("many-failing", 1, |cfg| {
        // Long enough that a runner sleeping through a backoff would miss the deadline below.
        cfg.backoff_min_ms = 30_000;
        cfg.backoff_max_ms = 30_000;
    })
    .await;
    let bad: Vec<String> = (0..40).map(|i| arn(&format!("failing-{i}"))).collect();
    for t in &bad {
        env.sim.add_rule(Rule {
            key: t.clone(),
            action: Action::ServerError,
            times: 1_000_000,
        });
    }
    env.publish(&bad.iter().map(|t| task(t, "RUNNING")).collect::<Vec<_>>())
        .await;
    eventually!(
        Duration::from_secs(20),
        "every failing task has been tried",
        bad.iter().all(|t| !env.calls_for(t).is_empty())
    );
    let healthy = arn("healthy");
    env.publish(&[task(&healthy, "RUNNING")]).await;
    eventually(Duration::from_secs(10), "the healthy task sent", || async {
        env.calls_for(&healthy)
            .iter()
            .any(|c| c.outcome.as_deref() == Some("ok"))
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_and_counts_the_state_of_idle_tasks() {
    let env = Env::with_worker("retention", 2, |cfg| {
        cfg.task_retention_s = 1;
    })
    .await;
    // A batch for a task whose status is never known would stay forever upstream.
    let a = arn("never-known");
    env.publish(&[container(&a, "web", "RUNNING")]).await;
    eventually(Duration::from_secs(10), "batch stored", || async {
        env.store
            .queued(env.shards, &a)
            .await
            .map(|q| q == (1, 0))
            .unwrap_or(false)
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "state dropped after the retention",
        || async {
            env.store
                .queued(env.shards, &a)
                .await
                .map(|q| q == (0, 0))
                .unwrap_or(false)
                && env
                    .store
                    .find_state(env.shards, &a)
                    .await
                    .map(|s| s.is_none())
                    .unwrap_or(false)
        },
    )
    .await;
    assert!(env.calls_for(&a).is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waits_for_another_workers_topology_declaration_instead_of_refusing() {
    // Replicas of a new deployment start together: one is declaring the shard queues while
    // another checks them. The checker must wait, not take the half-declared topology for a
    // deployment with fewer shards.
    let mut env = Env::new("start-together", 4).await;
    let c = ecs_state_relay::relay::amqp::connect(&amqp_url(), &Default::default(), "test")
        .await
        .unwrap();
    let ch = c.create_channel().await.unwrap();
    let cfg = env.config();
    let exchange = env.exchange.clone();
    let declare_shard = |s: u16| {
        let ch = ch.clone();
        let q = ecs_state_relay::relay::amqp::shard_queue(&exchange, s);
        let args = ecs_state_relay::relay::amqp::shard_queue_args(&exchange);
        async move {
            let opts = lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(q.as_str().into(), opts, args)
                .await
                .unwrap();
        }
    };
    assert!(env
        .store
        .topology_lock("another-worker", 30_000)
        .await
        .unwrap());
    declare_shard(0).await;
    declare_shard(1).await;
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(worker::run(
        cfg.validate().expect("valid"),
        env.ecs().await,
        Readiness::default(),
        cancel.clone(),
    ));
    never(
        Duration::from_millis(500),
        "the worker gave up on a topology being declared",
        || async { handle.is_finished() },
    )
    .await;
    declare_shard(2).await;
    declare_shard(3).await;
    env.store.topology_unlock("another-worker").await.unwrap();
    env.wait_all_shards_owned().await;
    assert!(!handle.is_finished(), "the worker runs");
    cancel.cancel();
    handle.await.expect("no panic").expect("clean stop");
    let _ = c.close(200, "done".into()).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_shard_count_that_disagrees_with_the_broker() {
    let mut env = Env::new("shard-count", 3).await;
    let cfg = env.config();
    env.start_worker(cfg.clone()).await;
    for wrong in [2u16, 4] {
        let mut c = env.config();
        c.shards = wrong;
        let err = worker::run(
            c.validate().expect("valid"),
            env.ecs().await,
            Readiness::default(),
            CancellationToken::new(),
        )
        .await
        .expect_err("must refuse");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("RELAY_SHARDS={wrong}"))
                && msg.contains("fixed for a deployment"),
            "{msg}"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_call_in_flight_releases_leases_and_exits_zero() {
    let mut env = Env::new("sigterm", 2).await;
    let mut cfg = env.config();
    cfg.lease_ms = 30_000; // a released lease must not be mistaken for an expired one
    let mut w = env.spawn_process(&cfg);
    env.wait_all_shards_owned().await;
    let a = arn("in-flight-at-shutdown");
    env.sim.add_rule(Rule {
        key: a.clone(),
        action: Action::Hold,
        times: 1,
    });
    env.publish(&[task(&a, "RUNNING")]).await;
    eventually!(
        Duration::from_secs(20),
        "call held",
        env.sim.stats().held == 1
    );
    signal(&w, "TERM");
    // While the call is held the worker must not exit (it finishes work in flight first).
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        assert!(
            w.0.try_wait().unwrap().is_none(),
            "exited before its call in flight finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.sim.release(None);
    let status = wait_exit(&mut w, Duration::from_secs(20)).await;
    assert!(status.success(), "exit 0, got {status}");
    // The finished call was recorded (no re-send by the next owner), leases and permits are back.
    assert_eq!(env.store.queued(env.shards, &a).await.unwrap(), (0, 0));
    for s in 0..env.shards {
        assert_eq!(
            env.store.lease_owner(s).await.unwrap(),
            None,
            "lease {s} released"
        );
    }
    let mut conn = env.store.conn().await.unwrap();
    let permits: u64 = redis::cmd("ZCARD")
        .arg(env.store.global_key("permits"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(permits, 0);
    env.cleanup().await;
}
