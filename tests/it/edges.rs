//! Correctness at the edges: a lease that lapses while a call is in flight, a worker cut off
//! from Redis, shutdown during an outage, retention of a task that keeps failing, permits that
//! are handed on or left over, lost pub/sub messages, and what identifies an outbox entry.

use std::time::{Duration, Instant};

use crate::common::*;
use ecs_state_relay::cli::dlq;
use ecs_state_relay::relay::config::CALL_MARGIN;
use ecs_state_relay::relay::semaphore::Semaphore;
use ecs_state_relay::relay::store::Store;
use ecs_state_relay::relay::wire::{self, OutboxEntry};
use ecs_state_relay::sim::{Action, CallRecord, Rule};
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn status(c: &CallRecord) -> &str {
    c.body.get("status").and_then(Value::as_str).unwrap_or("")
}

fn hold(env: &Env, key: &str) {
    env.sim.add_rule(Rule {
        key: key.into(),
        action: Action::Hold,
        times: 1,
    });
}

/// A worker whose Redis goes through `proxy`, so the test can cut it off.
async fn worker_behind(env: &mut Env, proxy: &Proxy) -> String {
    let mut cfg = env.config();
    cfg.conn.redis_url = proxy.redis_url();
    env.start_worker(cfg).await
}

async fn wait_owner(env: &Env, shards: u16, owner: &str) {
    eventually(
        Duration::from_secs(30),
        &format!("{owner} owns every shard"),
        || async {
            for s in 0..shards {
                if env.store.lease_owner(s).await.ok().flatten().as_deref() != Some(owner) {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_when_the_lease_lapses_never_overlaps_the_next_owners_calls() {
    let mut env = Env::new("edge-lapse", 1).await;
    let proxy = Proxy::start(redis_addr()).await;
    worker_behind(&mut env, &proxy).await;
    let x = arn("lapse-x");
    hold(&env, &x);
    env.publish(&[task(&x, "RUNNING")]).await;
    eventually!(
        Duration::from_secs(20),
        "A's call for X held",
        env.sim.stats().held == 1
    );
    // A is cut off from Redis with its call on the wire; B takes the shard once A's lease lapses.
    proxy.cut();
    let cb = env.config();
    let b = cb.worker_id.clone().expect("id");
    env.start_worker(cb).await;
    wait_owner(&env, 1, &b).await;
    env.publish(&[task(&x, "STOPPED")]).await;
    env.sim.release(Some(&x));
    eventually(Duration::from_secs(30), "X's STOPPED accepted", || async {
        env.calls_for(&x)
            .iter()
            .any(|c| c.outcome.as_deref() == Some("ok") && status(c) == "STOPPED")
    })
    .await;

    let calls = env.calls_for(&x);
    for (i, c) in calls.iter().enumerate() {
        for d in &calls[i + 1..] {
            let c_end = c.finished_at_ms.unwrap_or(u64::MAX);
            let d_end = d.finished_at_ms.unwrap_or(u64::MAX);
            assert!(
                c_end <= d.received_at_ms || d_end <= c.received_at_ms,
                "two calls for X at once:\n{c:?}\n{d:?}"
            );
        }
    }
    let mut landed: Vec<&CallRecord> = calls
        .iter()
        .filter(|c| c.outcome.as_deref() == Some("ok"))
        .collect();
    landed.sort_by_key(|c| c.finished_at_ms);
    let first_stop = landed
        .iter()
        .position(|c| status(c) == "STOPPED")
        .expect("STOPPED landed");
    assert!(
        landed[first_stop..].iter().all(|c| status(c) != "RUNNING"),
        "RUNNING landed after STOPPED: {landed:?}"
    );
    proxy.restore();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_redis_lets_the_next_owner_receive_the_shards_messages() {
    let mut env = Env::new("edge-consumer", 2).await;
    let proxy = Proxy::start(redis_addr()).await;
    worker_behind(&mut env, &proxy).await;
    proxy.cut();
    let cb = env.config();
    let b = cb.worker_id.clone().expect("id");
    env.start_worker(cb).await;
    wait_owner(&env, 2, &b).await;
    // Published after the takeover, while the cut lasts: only B can deliver them.
    let tasks: Vec<String> = (0..10).map(|i| arn(&format!("cut-off-{i}"))).collect();
    let events: Vec<Value> = lifecycle_rounds(&tasks, 10).concat();
    env.publish(&events).await;
    eventually!(
        Duration::from_secs(30),
        "every lifecycle sent by the new owner",
        audit(&env.sim.calls(), &tasks).0 == 0
    );
    let (lost, disorder, _) = audit(&env.sim.calls(), &tasks);
    assert_eq!((lost, disorder), (0, 0));
    proxy.restore();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_redis_outage_exits_cleanly_in_bounded_time() {
    let mut env = Env::new("edge-term", 1).await;
    let (proxy, cfg) = env.config_via_redis_proxy().await;
    let mut worker = env.spawn_process(&cfg);
    env.wait_all_shards_owned().await;
    let x = arn("term-x");
    hold(&env, &x);
    env.publish(&[task(&x, "RUNNING")]).await;
    eventually!(
        Duration::from_secs(20),
        "call held",
        env.sim.stats().held == 1
    );
    proxy.cut();
    env.sim.release(Some(&x));
    // The answer arrived; its completion cannot be recorded while Redis is away.
    eventually!(
        Duration::from_secs(10),
        "call answered",
        env.sim.stats().in_flight == 0
    );
    let asked = Instant::now();
    signal(&worker, "TERM");
    let exit = wait_exit(&mut worker, Duration::from_secs(15)).await;
    println!(
        "exit {exit:?} {:.1}s after SIGTERM",
        asked.elapsed().as_secs_f64()
    );
    assert!(exit.success(), "{exit:?}");
    proxy.restore();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_for_longer_than_the_retention_is_kept_and_sent_once_ecs_heals() {
    let metrics = ecs_state_relay::relay::metrics::handle();
    let env = Env::with_worker("edge-retention", 1, |cfg| {
        cfg.task_retention_s = 3;
    })
    .await;
    let x = arn("retry-x");
    env.sim.add_rule(Rule {
        key: x.clone(),
        action: Action::ServerError,
        times: 1_000_000,
    });
    env.publish(&[task(&x, "RUNNING")]).await;
    // ECS fails X for 10 s: more than three retention periods.
    eventually(Duration::from_secs(30), "X failing for 10 s", || async {
        let calls = env.calls_for(&x);
        match (calls.first(), calls.last()) {
            (Some(a), Some(b)) => b.received_at_ms - a.received_at_ms >= 10_000,
            _ => false,
        }
    })
    .await;
    env.sim.clear_rules();
    eventually(Duration::from_secs(10), "X sent once ECS heals", || async {
        env.calls_for(&x)
            .iter()
            .any(|c| c.outcome.as_deref() == Some("ok"))
    })
    .await;
    let text = metrics.render();
    let retention_drops: f64 = text
        .lines()
        .filter(|l| l.starts_with("relay_events_dropped_total") && l.contains("retention"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(retention_drops, 0.0, "{text}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_off_permit_always_covers_a_whole_call() {
    let env = Env::new("edge-handoff", 1).await;
    let call = Duration::from_millis(2_000);
    let permits = Semaphore::new(env.store.clone(), "w", 1, 3_000, call);
    let cancel = CancellationToken::new();
    tokio::spawn(permits.clone().run_background(cancel.clone()));
    let first = permits.acquire("f", &cancel).await.expect("permit");
    let taken = Instant::now();
    let waiter = {
        let (p, c) = (permits.clone(), cancel.clone());
        tokio::spawn(async move { p.acquire("f", &c).await })
    };
    // The first call ends when its permit no longer covers a whole call (3 s lease, 2 s call).
    tokio::time::sleep_until((taken + Duration::from_millis(800)).into()).await;
    permits.release(first).await;
    let second = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("waiter served")
        .expect("no panic")
        .expect("permit");
    assert!(
        second.valid_until() > Instant::now() + call + CALL_MARGIN,
        "the waiter got a permit that may expire during its call"
    );
    permits.release(second).await;
    cancel.cancel();
    env.cleanup().await;
}

/// A restarted container keeps its pod name: two incarnations with the same worker id, one
/// with permits still valid, never hold more than the limit between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_incarnations_of_one_worker_id_never_hold_more_than_the_limit() {
    let env = Env::new("edge-permit-ids", 1).await;
    let call = Duration::from_millis(1_000);
    let dead = Semaphore::new(env.store.clone(), "pod-0", 2, 30_000, call);
    let restarted = Semaphore::new(env.store.clone(), "pod-0", 2, 30_000, call);
    let cancel = CancellationToken::new();
    tokio::spawn(dead.clone().run_background(cancel.clone()));
    tokio::spawn(restarted.clone().run_background(cancel.clone()));
    let _held_by_the_dead_one = dead.acquire("f", &cancel).await.expect("permit");
    let first = restarted.acquire("f", &cancel).await.expect("permit");
    // Two held of two: a third must wait, whoever asks.
    let give_up = CancellationToken::new();
    let third = {
        let (p, g) = (restarted.clone(), give_up.clone());
        tokio::spawn(async move { p.acquire("f", &g).await.is_some() })
    };
    never(
        Duration::from_millis(1_500),
        "a third permit granted with a limit of 2",
        || async { third.is_finished() },
    )
    .await;
    give_up.cancel();
    assert!(!third.await.expect("no panic"), "granted past the limit");
    assert_eq!(restarted.in_use().await.expect("redis"), 2);
    restarted.release(first).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_handed_to_a_waiter_that_gives_up_goes_back_to_redis() {
    let env = Env::new("edge-spares", 1).await;
    let call = Duration::from_millis(1_000);
    // One permit with a long lease: a spare nobody takes would hold it for 30 s.
    let permits = Semaphore::new(env.store.clone(), "a", 1, 30_000, call);
    let cancel = CancellationToken::new();
    tokio::spawn(permits.clone().run_background(cancel.clone()));
    for round in 0..10 {
        let held = permits.acquire("f", &cancel).await.expect("permit");
        let give_up = CancellationToken::new();
        let (asking, asked) = tokio::sync::oneshot::channel();
        let waiter = {
            let (p, g) = (permits.clone(), give_up.clone());
            tokio::spawn(async move {
                let _ = asking.send(());
                if let Some(permit) = p.acquire("f", &g).await {
                    p.release(permit).await;
                }
            })
        };
        asked.await.expect("waiter started");
        tokio::task::yield_now().await;
        // The call ends and hands its permit on; at that very moment the waiter gives up (its
        // shard is handed over): whichever wins, the permit must not stay parked.
        permits.release(held).await;
        give_up.cancel();
        waiter.await.expect("no panic");
        eventually!(
            Duration::from_secs(1),
            &format!("round {round}: no permit held once every call ended"),
            permits.in_use().await.unwrap_or(u64::MAX) == 0
        );
    }
    cancel.cancel();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_published_while_the_subscription_reconnects_is_not_missed() {
    // CLIENT KILL acts on the whole server: this test has a Redis of its own.
    let redis = RedisServer::start().await;
    let store = Store::connect(&redis.url(), &Default::default(), "edge-pubsub")
        .await
        .expect("private redis");
    let call = Duration::from_millis(1_000);
    let a = Semaphore::new(store.clone(), "a", 1, 30_000, call);
    let b = Semaphore::new(store.clone(), "b", 1, 30_000, call);
    let cancel = CancellationToken::new();
    tokio::spawn(a.clone().run_background(cancel.clone()));
    tokio::spawn(b.clone().run_background(cancel.clone()));
    let held = a.acquire("f", &cancel).await.expect("permit");
    let evalsha_calls = || async {
        let mut conn = store.conn().await.expect("conn");
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .expect("info");
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let pubsub_clients = || async {
        let mut conn = store.conn().await.expect("conn");
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .expect("client list");
        list.lines().count()
    };
    eventually!(
        Duration::from_secs(5),
        "a and b subscribed",
        pubsub_clients().await == 2
    );
    let before = evalsha_calls().await;
    let waiter = {
        let (b, c) = (b.clone(), cancel.clone());
        tokio::spawn(async move { b.acquire("f", &c).await.map(|_| Instant::now()) })
    };
    eventually!(
        Duration::from_secs(5),
        "b asked and waits",
        evalsha_calls().await > before
    );
    let before_kill = evalsha_calls().await;
    let mut conn = store.conn().await.expect("conn");
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .expect("client kill");
    // b is woken by the drop and asks again (still held); the release that follows is
    // published while b's subscription is still reconnecting, so b never hears of it.
    eventually!(
        Duration::from_secs(5),
        "b asked again after the drop",
        evalsha_calls().await > before_kill
    );
    assert_eq!(
        pubsub_clients().await,
        0,
        "b resubscribed too early for this test"
    );
    a.release(held).await;
    let released = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("b got the permit within 10 s")
        .expect("no panic")
        .expect("permit");
    let waited = got - released;
    println!(
        "permit taken {:.2}s after the missed release",
        waited.as_secs_f64()
    );
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_task_remembers_a_bounded_number_of_event_ids_and_still_dedupes() {
    let metrics = ecs_state_relay::relay::metrics::handle();
    let env = Env::with_worker("edge-ids", 1, |_| {}).await;
    let x = arn("long-lived");
    let events: Vec<Value> = (0..1_500)
        .map(|i| container(&x, &format!("c{i}"), "RUNNING"))
        .collect();
    // Batches are capped (1000 changes): a task event every 500 flushes them.
    let mut stream = Vec::new();
    for (i, e) in events.iter().enumerate() {
        stream.push(e.clone());
        if i % 500 == 499 {
            stream.push(task(&x, "RUNNING"));
        }
    }
    env.publish(&stream).await;
    let last = stream.last().expect("events").clone();
    let last_id = last["eventId"].as_str().expect("id").to_string();
    eventually!(
        Duration::from_secs(30),
        "every event taken",
        env.store.remembers(1, &x, &last_id).await.unwrap_or(false)
    );
    // Whatever form the per-task id memory has, it holds at most the bound.
    let mut conn = env.store.conn().await.expect("conn");
    let keys = scan_keys(&mut conn, &format!("relay:{{{}#*}}:*:{x}", env.exchange)).await;
    let mut remembered = 0u64;
    for k in &keys {
        let kind: String = redis::cmd("TYPE")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("type");
        let n: u64 = match kind.as_str() {
            "set" => redis::cmd("SCARD")
                .arg(k)
                .query_async(&mut conn)
                .await
                .expect("scard"),
            "zset" => redis::cmd("ZCARD")
                .arg(k)
                .query_async(&mut conn)
                .await
                .expect("zcard"),
            _ => 0,
        };
        remembered = remembered.max(n);
    }
    assert!(
        remembered <= ecs_state_relay::relay::store::RECENT_IDS as u64,
        "{remembered} ids remembered for one task"
    );
    // A redelivery of a recent event is still recognised.
    let duplicates = metric_sum(&metrics.render(), "relay_events_duplicate_total");
    env.publish(&[last]).await;
    eventually!(
        Duration::from_secs(10),
        "redelivery counted as duplicate",
        metric_sum(&metrics.render(), "relay_events_duplicate_total") > duplicates
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_completion_never_removes_a_later_entry_with_the_same_event_id() {
    let env = Env::new("edge-entry-id", 1).await;
    let store = &env.store;
    let fence = store
        .lease_acquire(0, "only", 30_000)
        .await
        .expect("redis")
        .expect("free lease")
        .fence;
    let x = arn("entry-id");
    let decode = |v: Value| wire::decode(v.to_string().as_bytes(), &x).expect("valid");
    let mut c = container(&x, "web", "RUNNING");
    c["taskStatus"] = "RUNNING".into();
    store
        .intake(0, &fence, &[decode(c)], 600)
        .await
        .expect("intake");
    assert_eq!(
        store.drain(0, &fence, 600).await.expect("drain"),
        vec![x.clone()]
    );
    // A producer event whose id is the drained entry's: ids are the producers' to choose.
    let (head, _) = store.peek(0, &x).await.expect("peek");
    let drained: OutboxEntry = serde_json::from_str(&head.expect("head")).expect("entry");
    let mut same_id = task(&x, "STOPPED");
    same_id["eventId"] = drained.id.clone().into();
    store
        .intake(0, &fence, &[decode(same_id)], 600)
        .await
        .expect("intake");
    let done = store
        .complete_prefix(0, &fence, &x, &drained.head_prefix(), &[], "{}", 600)
        .await
        .expect("complete");
    assert_eq!(done.left, Some(1));
    // The same completion again (its first answer was lost): the next entry must stay.
    let again = store
        .complete_prefix(0, &fence, &x, &drained.head_prefix(), &[], "{}", 600)
        .await
        .expect("complete");
    assert_eq!(again.left, None, "a later entry was removed");
    assert_eq!(store.queued(1, &x).await.expect("queued"), (0, 1));
    env.cleanup().await;
}

/// The dead-letter queue's binding, for tests that break the dead-letter route as an operator
/// cleaning up might.
async fn dead_letter_binding(env: &Env, bound: bool) {
    let c =
        ecs_state_relay::relay::amqp::connect(&amqp_url(), &Default::default(), "test dlq binding")
            .await
            .expect("amqp");
    let ch = c.create_channel().await.expect("channel");
    let dead = ecs_state_relay::relay::amqp::dead_queue(&env.exchange);
    let dlx = ecs_state_relay::relay::amqp::dlx(&env.exchange);
    if bound {
        ch.queue_bind(
            dead.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    } else {
        ch.queue_unbind(
            dead.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");
    }
    let _ = c.close(200, "done".into()).await;
}

/// Publishes `bad` and 100 valid events to a one-shard relay whose dead-letter route the caller
/// broke; every valid event reaches ECS meanwhile, and the bad one is held and counted.
async fn valid_traffic_passes_a_broken_route(env: &Env, name: &str) -> Value {
    let metrics = ecs_state_relay::relay::metrics::handle();
    // One pipelined publish: the bad message is delivered with the valid ones behind it.
    let mut bad = task(&arn(&format!("{name}-bad")), "RUNNING");
    bad["schemaVersion"] = 2.into();
    let tasks: Vec<String> = (0..100)
        .map(|i| arn(&format!("{name}-ok-{i:03}")))
        .collect();
    let mut events = vec![bad.clone()];
    events.extend(tasks.iter().map(|t| task(t, "RUNNING")));
    env.publish(&events).await;
    eventually!(
        Duration::from_secs(30),
        "all 100 valid events reached ECS while the route was broken",
        all_sent(env, &tasks)
    );
    let conn = env.conn();
    eventually(
        Duration::from_secs(10),
        "the bad message held, and its failed moves counted",
        || async {
            let text = metrics.render();
            metric_sum(&text, "relay_events_rejected_total") == 1.0
                && metric_sum(&text, "relay_dead_letters_held") == 1.0
                && text
                    .lines()
                    .any(|l| l.starts_with("relay_amqp_errors_total{op=\"dead_letter\"}"))
        },
    )
    .await;
    let held = dlq::held(&conn, 1, 10).await.expect("held letters");
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].reason.starts_with("schema_version"), "{held:?}");
    assert_eq!(held[0].body, bad.to_string());
    bad
}

/// Waits until the relay holds no dead letter any more, then reads `.dead` (at least `n`).
async fn dead_letters_after_heal(env: &Env, n: usize) -> Vec<(Vec<u8>, String)> {
    let conn = env.conn();
    eventually!(
        Duration::from_secs(40),
        "every held dead letter moved",
        dlq::held(&conn, 1, 10).await.is_ok_and(|h| h.is_empty())
    );
    let mut dead = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dead.len() < n {
        assert!(Instant::now() < deadline, "only {} in .dead", dead.len());
        dead.extend(env.dead_letters().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dead.extend(env.dead_letters().await);
    dead
}

/// 1 bad and 100 valid events in one shard while the dead-letter queue is unbound: every valid
/// event reaches ECS; once the route is back the bad one lands in `.dead`, alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_events_flow_while_the_dead_letter_route_is_broken() {
    let env = Env::with_worker("edge-dlq", 1, |_| {}).await;
    dead_letter_binding(&env, false).await;
    let bad = valid_traffic_passes_a_broken_route(&env, "unbound").await;
    dead_letter_binding(&env, true).await;
    let dead = dead_letters_after_heal(&env, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, bad.to_string().as_bytes());
    assert!(dead[0].1.starts_with("schema_version"), "{}", dead[0].1);
    env.cleanup().await;
}

/// A shard whose queue is gone stops for an AMQP error at every try: it is taken again after
/// a growing delay, not at once (each restart would return its unacknowledged window to the
/// queue and raise every delivery count in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_keeps_failing_is_restarted_with_backoff() {
    let metrics = ecs_state_relay::relay::metrics::handle();
    let env = Env::with_worker("edge-restarts", 1, |_| {}).await;
    let consume_errors = || {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("relay_amqp_errors_total{op=\"consume"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let c = ecs_state_relay::relay::amqp::connect(&amqp_url(), &Default::default(), "test delete")
        .await
        .expect("amqp");
    let ch = c.create_channel().await.expect("channel");
    ch.queue_delete(
        ecs_state_relay::relay::amqp::shard_queue(&env.exchange, 0)
            .as_str()
            .into(),
        Default::default(),
    )
    .await
    .expect("delete");
    let _ = c.close(200, "done".into()).await;
    eventually!(
        Duration::from_secs(10),
        "the shard failed",
        consume_errors() >= 1.0
    );
    // Delays of 1, 2, 4 and 8 s (+ up to 20 %): at most 4 more tries in the next 8 s.
    let first = consume_errors();
    never(
        Duration::from_secs(8),
        "more than 4 restarts in 8 s",
        || async { consume_errors() - first > 4.0 },
    )
    .await;
    assert!(consume_errors() - first >= 2.0, "the shard was not retried");
    env.cleanup().await;
}

/// What the broker does when a message reaches a shard queue's delivery limit (queues as the
/// worker declares them): it dead-letters the message itself, to `.dead`, without the relay's
/// reason header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_dead_letters_a_message_past_the_delivery_limit() {
    let env = Env::new("edge-delivery-limit", 1).await;
    let broker = env.declared().await;
    let event = task(&arn("limit"), "RUNNING");
    env.publish(std::slice::from_ref(&event)).await;
    let deliveries = nack_until_dead_lettered(&env.exchange).await;
    assert_eq!(
        deliveries,
        ecs_state_relay::relay::amqp::DELIVERY_LIMIT + 1,
        "delivered once, then once per allowed redelivery"
    );
    let dead = dead_letters_after_heal(&env, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, event.to_string().as_bytes());
    assert_eq!(
        dead[0].1, "",
        "the broker's dead letter has no relay reason"
    );
    let _ = broker.close(200, "done".into()).await;
    env.cleanup().await;
}

/// The hold is bounded: with the route broken, a rejected message that does not fit stays
/// unacknowledged (counted) while valid traffic flows; it is not lost, and reaches `.dead` once
/// the route is back and the hold has room, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_past_a_full_hold_stays_unacked_and_is_not_lost() {
    let metrics = ecs_state_relay::relay::metrics::handle();
    let env = Env::with_worker("edge-hold-full", 1, |cfg| {
        cfg.dead_letter_hold_bytes = 512 * 1024;
    })
    .await;
    dead_letter_binding(&env, false).await;
    // Three bad messages of 250 KiB: two fit in 512 KiB, the third does not.
    let pad = "x".repeat(250 * 1024);
    let bad: Vec<Value> = (0..3)
        .map(|i| {
            let mut b = task(&arn(&format!("hold-bad-{i}")), "RUNNING");
            b["schemaVersion"] = 2.into();
            b["padding"] = pad.clone().into();
            b
        })
        .collect();
    let tasks: Vec<String> = (0..20).map(|i| arn(&format!("hold-ok-{i:02}"))).collect();
    let mut events = bad.clone();
    events.extend(tasks.iter().map(|t| task(t, "RUNNING")));
    env.publish(&events).await;
    eventually(
        Duration::from_secs(30),
        "valid events sent and one rejected message past the hold",
        || async {
            all_sent(&env, &tasks)
                && metric_sum(&metrics.render(), "relay_dead_letter_hold_full_total") == 1.0
        },
    )
    .await;
    let conn = env.conn();
    assert_eq!(dlq::held(&conn, 1, 10).await.expect("held").len(), 2);
    dead_letter_binding(&env, true).await;
    // Once the first two moved, the third is held (and acked) without a restart.
    let dead = dead_letters_after_heal(&env, 3).await;
    // Compared by event id: the bodies are 250 KiB each.
    let id = |body: &[u8]| -> String {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["eventId"].as_str().map(str::to_string))
            .unwrap_or_else(|| "(not an event)".into())
    };
    let mut got: Vec<String> = dead.iter().map(|(b, _)| id(b)).collect();
    got.sort();
    let mut expected: Vec<String> = bad.iter().map(|b| id(b.to_string().as_bytes())).collect();
    expected.sort();
    assert_eq!(got, expected);
    env.cleanup().await;
}

/// A hold retried after its answer was lost (or its write was not confirmed by replicas) adds
/// nothing twice; two identical messages of one batch are two letters (their delivery tags).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_hold_adds_no_letter_twice() {
    use ecs_state_relay::relay::dead_letter::Letter;
    let env = Env::new("edge-hold-retry", 1).await;
    let store = &env.store;
    let fence = store
        .lease_acquire(0, "holder", 30_000)
        .await
        .expect("redis")
        .expect("free lease")
        .fence;
    let letter = |tag| Letter {
        delivery_tag: tag,
        routing_key: arn("retried"),
        reason: "not_json: test".into(),
        source_queue: "q".into(),
        held_at_ms: 1,
        properties: Default::default(),
        body: b"{".to_vec(),
    };
    let batch = vec![letter(1).encode(), letter(2).encode()];
    for _ in 0..3 {
        let held = store.hold(0, &fence, &batch, 1 << 20).await.expect("hold");
        assert_eq!(held, [true, true]);
    }
    let (count, bytes) = store.held_count(0).await.expect("count");
    assert_eq!(count, 2);
    assert_eq!(bytes as usize, batch[0].len() + batch[1].len());
    assert!(store.unhold(0, &fence, &batch[0]).await.expect("unhold"));
    assert_eq!(store.held_count(0).await.expect("count").0, 1);
    env.cleanup().await;
}

/// A worker started while Redis does not answer (a restart during an outage) waits for it, as
/// it would for RabbitMQ, instead of exiting; it takes its shards once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_redis_is_unreachable_waits_for_it() {
    let mut env = Env::new("edge-start-no-redis", 1).await;
    let proxy = Proxy::start(redis_addr()).await;
    proxy.cut();
    let mut cfg = env.config();
    cfg.conn.redis_url = proxy.redis_url();
    let worker = std::sync::Mutex::new(env.spawn_process(&cfg));
    never(
        Duration::from_secs(3),
        "the worker exited while Redis was unreachable",
        || {
            let exited = worker.lock().unwrap().0.try_wait().ok().flatten().is_some();
            async move { exited }
        },
    )
    .await;
    proxy.restore();
    env.wait_all_shards_owned().await;
    let mut worker = worker.into_inner().unwrap();
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(15))
        .await
        .success());
    env.cleanup().await;
}

/// Publishes one filler message straight to the dead-letter exchange; whether it was taken.
async fn fill_dead_queue(env: &Env) -> bool {
    let c = ecs_state_relay::relay::amqp::connect(&amqp_url(), &Default::default(), "test filler")
        .await
        .expect("amqp");
    let ch = ecs_state_relay::relay::amqp::confirm_channel(&c)
        .await
        .expect("channel");
    let confirm = ch
        .basic_publish(
            ecs_state_relay::relay::amqp::dlx(&env.exchange)
                .as_str()
                .into(),
            "filler".into(),
            Default::default(),
            b"filler",
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let _ = c.close(200, "done".into()).await;
    confirm.is_ack()
}

/// The same with a full dead-letter queue (max-length 1, overflow reject-publish, by policy):
/// the broker nacks the dead letter; once there is room it lands there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_events_flow_while_the_dead_letter_queue_is_full() {
    let env = Env::with_worker("edge-dlq-full", 1, |_| {}).await;
    let policy = format!("{}-full", env.exchange);
    let pattern = format!(
        "^{}$",
        ecs_state_relay::relay::amqp::dead_queue(&env.exchange).replace('.', "\\.")
    );
    rabbitmqctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        &policy,
        &pattern,
        r#"{"max-length":1,"overflow":"reject-publish"}"#,
    ]);
    // Full once a second message is refused: the policy is in force.
    assert!(fill_dead_queue(&env).await, "the first filler was refused");
    eventually!(
        Duration::from_secs(10),
        "the policy in force",
        !fill_dead_queue(&env).await
    );
    let bad = valid_traffic_passes_a_broken_route(&env, "full").await;
    rabbitmqctl(&["clear_policy", &policy]);
    let dead = dead_letters_after_heal(&env, 2).await;
    let fillers = dead.iter().filter(|(b, _)| b == b"filler").count();
    assert!(fillers >= 1, "{dead:?}");
    let letters: Vec<_> = dead.iter().filter(|(b, _)| b != b"filler").collect();
    assert_eq!(letters.len(), 1, "{dead:?}");
    assert_eq!(letters[0].0, bad.to_string().as_bytes());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_change_carries_the_tasks_latest_timestamps() {
    let env = Env::with_worker("edge-drain-times", 1, |cfg| {
        cfg.drain_min_ms = 200;
        cfg.drain_max_ms = 300;
    })
    .await;
    let x = arn("drain-times");
    let mut running = task(&x, "RUNNING");
    running["pullStartedAt"] = "2026-11-28T09:59:00Z".into();
    running["pullStoppedAt"] = "2026-11-28T09:59:30Z".into();
    env.publish(&[running]).await;
    env.wait_calls(&x, 1).await;
    env.publish(&[container(&x, "web", "RUNNING")]).await;
    let calls = env.wait_calls(&x, 2).await;
    let drained = &calls[1].body;
    assert_eq!(drained["status"], "RUNNING");
    assert_eq!(drained["containers"][0]["containerName"], "web");
    let pulled = |field: &str| drained.get(field).and_then(Value::as_f64);
    assert_eq!(pulled("pullStartedAt"), Some(1_795_859_940.0), "{drained}");
    assert_eq!(pulled("pullStoppedAt"), Some(1_795_859_970.0), "{drained}");
    assert_eq!(pulled("executionStoppedAt"), None, "{drained}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_index_is_read_in_pages_and_every_task_comes_back_once_in_order() {
    let env = Env::new("edge-pending-pages", 1).await;
    let store = &env.store;
    let fence = store
        .lease_acquire(0, "reader", 30_000)
        .await
        .expect("redis")
        .expect("free lease")
        .fence;
    let tasks: Vec<String> = (0..1_234)
        .map(|i| arn(&format!("pending-{i:04}")))
        .collect();
    let events: Vec<wire::Event> = tasks
        .iter()
        .map(|t| wire::decode(task(t, "RUNNING").to_string().as_bytes(), t).expect("valid"))
        .collect();
    for chunk in events.chunks(200) {
        store.intake(0, &fence, chunk, 600).await.expect("intake");
    }
    // Oldest first, each once, although the read takes several pages.
    assert_eq!(store.pending_keys(0).await.expect("pending"), tasks);
    env.cleanup().await;
}

/// RELAY_INTAKE_MAX_BYTES bounds a window of large messages by lowering the shard consumer's
/// prefetch, and small messages raise it again. Each resize restarts the consumer only when
/// everything it holds is stored: nothing unstored goes back to the queue (no redelivery, so no
/// duplicate), and every task keeps its order, also when sizes alternate all the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_follows_message_sizes_without_redelivery_or_disorder() {
    let mut env = Env::new("edge-prefetch", 1).await;
    let metrics = ecs_state_relay::relay::metrics::handle();
    let mut cfg = env.config();
    // One shard: a window of 4 messages of ~40 KB, or of RELAY_PREFETCH small ones.
    cfg.intake_max_bytes = 160 * 1024;
    env.start_worker(cfg).await;
    let prefetch = || metric_sum(&metrics.render(), "relay_intake_prefetch");
    // Set once the shard's consumer runs, a moment after its lease is taken.
    eventually!(
        Duration::from_secs(10),
        "the shard starts with what fits the largest messages (1)",
        prefetch() == 1.0
    );

    let phase = |name: &str, pad: fn(usize) -> bool| {
        let tasks: Vec<String> = (0..40).map(|i| arn(&format!("{name}-{i:02}"))).collect();
        let mut events: Vec<Value> = lifecycle_rounds(&tasks, 5).concat();
        for e in &mut events {
            let i = tasks.iter().position(|t| e["taskArn"] == t.as_str());
            if i.is_some_and(pad) {
                e["padding"] = "x".repeat(40_000).into();
            }
        }
        (tasks, events)
    };
    let mut all = Vec::new();
    for (name, pad, want) in [
        ("large", (|_| true) as fn(usize) -> bool, Some(4.0)),
        ("small", |_| false, Some(256.0)),
        // Sizes alternate by task within each round: the prefetch keeps changing.
        ("mixed", |i| i % 2 == 0, None),
    ] {
        let (tasks, events) = phase(name, pad);
        env.publish(&events).await;
        eventually!(
            Duration::from_secs(60),
            &format!("the {name} phase reached ECS"),
            audit(&env.sim.calls(), &tasks).0 == 0
        );
        if let Some(want) = want {
            assert_eq!(prefetch(), want, "prefetch after the {name} phase");
        }
        all.extend(tasks);
    }
    let (lost, disorder, duplicates) = audit(&env.sim.calls(), &all);
    assert_eq!((lost, disorder, duplicates), (0, 0, 0));
    assert_eq!(
        metric_sum(&metrics.render(), "relay_events_duplicate_total"),
        0.0,
        "a message came back from the queue"
    );
    env.cleanup().await;
}

/// A worker whose calls follow one another keeps no permit by hand-off from a worker that
/// waits, even with a limit of 1 (its share is then none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_limit_of_one_a_waiting_worker_gets_the_permit_after_the_current_call() {
    let env = Env::new("edge-share-one", 1).await;
    let call = Duration::from_millis(1_000);
    let busy = Semaphore::new(env.store.clone(), "busy", 1, 30_000, call);
    let other = Semaphore::new(env.store.clone(), "other", 1, 30_000, call);
    let cancel = CancellationToken::new();
    tokio::spawn(busy.clone().run_background(cancel.clone()));
    tokio::spawn(other.clone().run_background(cancel.clone()));
    // Two callers on the busy worker: a call of 50 ms always has another waiting behind it.
    for _ in 0..2 {
        let (p, c) = (busy.clone(), cancel.clone());
        tokio::spawn(async move {
            while let Some(permit) = p.acquire("storm", &c).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
                p.release(permit).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..3 {
        let asked = Instant::now();
        let permit = other.acquire("quiet", &cancel).await.expect("permit");
        let waited = asked.elapsed();
        other.release(permit).await;
        println!("round {round}: the waiting worker got the permit after {waited:?}");
        assert!(
            waited < Duration::from_millis(400),
            "round {round}: waited {waited:?} behind hand-offs"
        );
    }
    cancel.cancel();
    env.cleanup().await;
}

/// When the fleet's limit goes up, a worker with calls waiting takes the new permits at once,
/// not when one of its calls ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_fleet_limit_is_used_at_once() {
    let mut env = Env::new("edge-limit-up", 1).await;
    let mut cfg = env.config();
    cfg.adaptive = true;
    cfg.concurrency_limit = 10;
    cfg.concurrency_min = 1;
    cfg.adaptive_window_ms = 200;
    let adaptive = ecs_state_relay::relay::adaptive::Adaptive::new(env.store.clone(), &cfg);
    let limit_key = adaptive.key().expect("adaptive").to_string();
    let mut conn = env.store.conn().await.expect("redis");
    let _: () = redis::cmd("HSET")
        .arg(&limit_key)
        .arg("limit")
        .arg(2)
        .query_async(&mut conn)
        .await
        .expect("hset");
    let permits = Semaphore::with_limit(
        env.store.clone(),
        "w",
        adaptive,
        30_000,
        Duration::from_millis(1_000),
    );
    let cancel = CancellationToken::new();
    tokio::spawn(permits.clone().run_background(cancel.clone()));
    // Twenty calls that hold their permits (a slow ECS).
    let mut held = Vec::new();
    for _ in 0..20 {
        let (p, c) = (permits.clone(), cancel.clone());
        held.push(tokio::spawn(async move {
            let permit = p.acquire("f", &c).await;
            c.cancelled().await;
            drop(permit);
        }));
    }
    eventually!(
        Duration::from_secs(5),
        "two permits held",
        permits.in_use().await.unwrap_or(0) == 2
    );
    // The lowered limit holds while calls wait (and the worker stops asking for more).
    never(
        Duration::from_millis(1_500),
        "more than two permits under a limit of 2",
        || async { permits.in_use().await.unwrap_or(0) > 2 },
    )
    .await;
    let _: () = redis::cmd("HSET")
        .arg(&limit_key)
        .arg("limit")
        .arg(10)
        .query_async(&mut conn)
        .await
        .expect("hset");
    let raised = Instant::now();
    eventually!(
        Duration::from_millis(700),
        "ten permits held",
        permits.in_use().await.unwrap_or(0) == 10
    );
    println!("the raised limit was in use after {:?}", raised.elapsed());
    cancel.cancel();
    env.cleanup().await;
}
