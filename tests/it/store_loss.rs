//! The store's own losses: a Redis that comes back without the relay's state is noticed and
//! said (`relay_store_lost`, an error log, `status`), new work goes on; and workers that died
//! without a goodbye leave nothing behind in the per-worker hashes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::*;
use ecs_state_relay::sim::{Action, Rule};
use serde_json::Value;

/// `relay_store_lost` on a worker's /metrics, if it answers.
async fn store_lost_gauge(port: u16) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.contains("relay_store_lost ")
        .then(|| metric_sum(&text, "relay_store_lost"))
}

/// Deletes every key of this test's deployment, as a FLUSHDB (or a primary restarted empty)
/// would, without touching the other tests' keys on the shared Redis.
async fn flush_relay_keys(env: &Env) -> usize {
    let mut conn = env.store.conn().await.expect("redis");
    let keys = scan_keys(&mut conn, &format!("relay:{{{}*", env.exchange)).await;
    for k in &keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("DEL");
    }
    keys.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_the_relays_state_raises_the_alarm_and_new_work_goes_on() {
    let mut env = Env::new("store-lost", 2).await;
    let (_worker, port) = env.spawn_with_metrics().await;
    eventually!(
        Duration::from_secs(10),
        "the gauge reads 0",
        store_lost_gauge(port).await == Some(0.0)
    );

    // Tasks pending behind ECS calls that do not return.
    env.sim.add_rule(Rule {
        key: "*".into(),
        action: Action::Hold,
        times: u32::MAX,
    });
    let stuck: Vec<String> = (0..6).map(|i| arn(&format!("stuck-{i}"))).collect();
    env.publish(&stuck.iter().map(|t| task(t, "RUNNING")).collect::<Vec<_>>())
        .await;
    env.publish(&stuck.iter().map(|t| task(t, "STOPPED")).collect::<Vec<_>>())
        .await;
    eventually!(
        Duration::from_secs(20),
        "calls held in flight",
        env.sim.stats().held >= 2
    );

    let flushed = flush_relay_keys(&env).await;
    assert!(flushed > 0, "the relay had keys to lose");
    let at = Instant::now();
    // Within one lease time (3 s in the tests): the heartbeat runs every tenth of it.
    eventually!(
        Duration::from_millis(3_000),
        "relay_store_lost at 1 within one lease time",
        store_lost_gauge(port).await == Some(1.0)
    );
    println!(
        "store lost: relay_store_lost 1 {:.2}s after the flush of {flushed} keys",
        at.elapsed().as_secs_f64()
    );
    let status: Value =
        serde_json::from_str(&env.run_cli(&["status", "--json", "--shards", "2"])).expect("json");
    assert!(
        status["store_lost"]["seen_by"]
            .as_str()
            .is_some_and(|w| w.starts_with(&env.exchange)),
        "status names the loss: {}",
        status["store_lost"]
    );
    let text = env.run_cli(&["status", "--shards", "2"]);
    assert!(text.contains("STORE LOST"), "{text}");

    // New work goes on: the held calls end, and a lifecycle published now arrives in order.
    env.sim.clear_rules();
    env.sim.release(None);
    let fresh = arn("after-the-loss");
    env.publish(&[
        task(&fresh, "RUNNING"),
        container(&fresh, "web", "STOPPED"),
        task(&fresh, "STOPPED"),
    ])
    .await;
    let calls = env.wait_calls(&fresh, 2).await;
    let ok: Vec<_> = calls
        .into_iter()
        .filter(|c| c.outcome.as_deref() == Some("ok"))
        .collect();
    assert_eq!(statuses(&ok), ["RUNNING", "STOPPED"], "{ok:?}");
    assert_eq!(
        ok.last().map(|c| c.body["containers"][0]["status"].clone()),
        Some(Value::from("STOPPED")),
        "the container change goes with the task's STOPPED"
    );
    // The alarm stands until an operator clears it.
    assert_eq!(store_lost_gauge(port).await, Some(1.0));
    let cleared = env.run_cli(&["status", "--json", "--shards", "2", "--clear-store-lost"]);
    let cleared: Value = serde_json::from_str(&cleared).expect("json");
    assert!(cleared["store_lost"].is_null(), "{}", cleared["store_lost"]);
    eventually!(
        Duration::from_secs(3),
        "the gauge back at 0",
        store_lost_gauge(port).await == Some(0.0)
    );
    env.cleanup().await;
}

/// Each loss is raised once, and every worker follows its clearing: one whose RabbitMQ session
/// is down (no heartbeats) drops its gauge too, and one that was paused through losses does not
/// raise a cleared alarm again when it resumes with the old epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_is_raised_once_and_every_worker_follows_its_clearing() {
    let mut env = Env::new("store-lost-once", 2).await;
    let (_w1, p1) = env.spawn_with_metrics().await;
    let proxy = Proxy::start(amqp_addr()).await;
    let mut cfg = env.config();
    cfg.conn.amqp_url = proxy.amqp_url();
    let p2 = free_port();
    cfg.metrics_addr = format!("127.0.0.1:{p2}");
    let w2 = env.spawn_process(&cfg);
    let store = &env.store;
    let live = |n: usize, what: &'static str| {
        eventually(Duration::from_secs(20), what, move || async move {
            store.live_workers().await.is_ok_and(|l| l.len() == n)
        })
    };
    let both = |want: f64| async move {
        store_lost_gauge(p1).await == Some(want) && store_lost_gauge(p2).await == Some(want)
    };
    eventually(Duration::from_secs(20), "both workers at 0", || both(0.0)).await;
    // Both have heartbeaten: each knows the epoch.
    live(2, "both workers live").await;

    flush_relay_keys(&env).await;
    eventually(Duration::from_secs(3), "both workers at 1", || both(1.0)).await;
    // Worker 2 loses its RabbitMQ session, and with it its heartbeats.
    proxy.cut();
    live(1, "worker 2 no longer live").await;
    env.run_cli(&["status", "--json", "--shards", "2", "--clear-store-lost"]);
    eventually(
        Duration::from_secs(5),
        "both workers back at 0, the one without heartbeats too",
        || both(0.0),
    )
    .await;
    proxy.restore();
    live(2, "both workers live again").await;

    // Worker 2 sleeps through two more losses (the second empties the store's list of lost
    // epochs too); worker 1 raises each, and each is cleared.
    signal(&w2, "STOP");
    for _ in 0..2 {
        flush_relay_keys(&env).await;
        eventually!(
            Duration::from_secs(3),
            "worker 1 at 1",
            store_lost_gauge(p1).await == Some(1.0)
        );
        env.run_cli(&["status", "--json", "--shards", "2", "--clear-store-lost"]);
        eventually!(
            Duration::from_secs(3),
            "worker 1 back at 0",
            store_lost_gauge(p1).await == Some(0.0)
        );
    }
    signal(&w2, "CONT");
    live(2, "worker 2 live again").await;
    never(
        Duration::from_secs(3),
        "the cleared loss raised again by the worker that slept through it",
        || async { store_lost_gauge(p1).await == Some(1.0) },
    )
    .await;
    env.cleanup().await;
}

/// The per-worker hashes `status` and `inspect` read: ready work, inspect addresses, producer
/// rules, each keyed by worker id.
async fn hash_workers(env: &Env) -> [BTreeSet<String>; 3] {
    let mut conn = env.store.conn().await.expect("redis");
    let mut out: [BTreeSet<String>; 3] = Default::default();
    for (i, name) in ["ready", "addrs", "producer-rules"].iter().enumerate() {
        out[i] = redis::cmd("HKEYS")
            .arg(env.store.global_key(name))
            .query_async::<Vec<String>>(&mut conn)
            .await
            .expect("HKEYS")
            .into_iter()
            .collect();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_workers_leave_no_entries_behind() {
    let mut env = Env::new("reap", 2).await;
    let mut live_cfg = env.config();
    live_cfg.metrics_addr = format!("127.0.0.1:{}", free_port());
    let live = live_cfg.worker_id.clone().expect("id");
    let _live = env.spawn_process(&live_cfg);
    // Twenty workers, five at a time: each records its entries, then is SIGKILLed.
    let mut killed = BTreeSet::new();
    for _round in 0..4 {
        let mut batch = Vec::new();
        for _ in 0..5 {
            let mut cfg = env.config();
            cfg.metrics_addr = format!("127.0.0.1:{}", free_port());
            batch.push((cfg.worker_id.clone().expect("id"), env.spawn_process(&cfg)));
        }
        eventually(
            Duration::from_secs(30),
            "the round's workers in every hash",
            || async {
                let hashes = hash_workers(&env).await;
                batch
                    .iter()
                    .all(|(id, _)| hashes.iter().all(|h| h.contains(id)))
            },
        )
        .await;
        for (id, p) in batch {
            signal(&p, "KILL");
            killed.insert(id);
        }
    }
    let want: BTreeSet<String> = [live.clone()].into();
    eventually!(
        Duration::from_secs(20),
        "the hashes hold the live worker only",
        hash_workers(&env).await.iter().all(|h| *h == want)
    );
    println!(
        "reaped the entries of {} SIGKILLed workers; left: {live}",
        killed.len()
    );
    env.cleanup().await;
}

/// A worker's entries are written only while it is live, and at once when it becomes live: a
/// worker that just joined shows in `status` with its producer rules, not as "?" until its
/// reporters' next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_shows_in_status_as_soon_as_it_is_live() {
    let mut env = Env::new("entries-at-join", 1).await;
    let mut cfg = env.config();
    cfg.metrics_addr = format!("127.0.0.1:{}", free_port());
    let id = cfg.worker_id.clone().expect("id");
    let _worker = env.spawn_process(&cfg);
    eventually(Duration::from_secs(30), "the worker live", || async {
        env.store
            .live_workers()
            .await
            .is_ok_and(|l| l.contains(&id))
    })
    .await;
    let live = Instant::now();
    eventually!(
        Duration::from_millis(1_000),
        "its entries within a second of going live",
        hash_workers(&env).await.iter().all(|h| h.contains(&id))
    );
    println!(
        "entries of a new worker written {:.0} ms after it went live",
        live.elapsed().as_secs_f64() * 1000.0
    );
    env.cleanup().await;
}
