//! The upstream task handler's tests (amazon-ecs-agent `agent/eventhandler`), ported as
//! black-box scenarios: events go in through RabbitMQ, state lives in Redis, and the calls are
//! observed at ecs-sim through the real aws-sdk-ecs client. Each test is named after its
//! upstream test; where the port deliberately differs (a documented fix) the test says so.

use std::time::Duration;

use crate::common::*;
use ecs_state_relay::sim::{Action, CallRecord, Rule};
use serde_json::Value;

async fn setup(name: &str) -> Env {
    setup_with(name, |_| {}).await
}

/// A worker whose drain ticker fires every 100–200 ms.
async fn setup_draining(name: &str) -> Env {
    setup_with(name, |c| {
        c.drain_min_ms = 100;
        c.drain_max_ms = 200;
    })
    .await
}

async fn setup_with(
    name: &str,
    tweak: impl FnOnce(&mut ecs_state_relay::relay::config::WorkerConfig),
) -> Env {
    let mut env = Env::new(name, 2).await;
    let mut cfg = env.config();
    tweak(&mut cfg);
    env.start_worker(cfg).await;
    env
}

fn containers(call: &ecs_state_relay::sim::CallRecord) -> Vec<Value> {
    call.body
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn agents(call: &ecs_state_relay::sim::CallRecord) -> Vec<Value> {
    call.body
        .get("managedAgents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Waits until a key's batch and outbox are both empty (everything sent or removed).
async fn wait_idle(env: &Env, key: &str) {
    let store = env.store.clone();
    let shards = env.shards;
    let key = key.to_string();
    eventually(Duration::from_secs(20), &format!("{key} idle"), || {
        let store = store.clone();
        let key = key.clone();
        async move {
            store
                .queued(shards, &key)
                .await
                .map(|(b, o)| b == 0 && o == 0)
                .unwrap_or(false)
        }
    })
    .await;
}

async fn state_field(env: &Env, key: &str, field: &str) -> u8 {
    match env.store.find_state(env.shards, key).await.expect("redis") {
        Some((_, state)) => state.get(field),
        None => 0,
    }
}

async fn no_more_calls(env: &Env, key: &str, n: usize) {
    let sim = env.sim.clone();
    let key = key.to_string();
    never(Duration::from_millis(500), "an extra call", || {
        let sim = sim.clone();
        let key = key.clone();
        async move { sim.calls().iter().filter(|c| c.key == key).count() > n }
    })
    .await;
}

fn event_id(event: &Value) -> &str {
    event["eventId"].as_str().expect("events carry an eventId")
}

/// Whether the intake took every one of `events` for `key`: their eventIds are among the key's
/// recent ids (the redelivery dedupe), written in the same atomic step that batches or
/// enqueues the event.
async fn taken(env: &Env, key: &str, events: &[Value]) -> bool {
    let Ok(mut conn) = env.store.conn().await else {
        return false;
    };
    for event in events {
        let mut found = false;
        for s in 0..env.shards {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(env.store.shard(s).recent_ids(key))
                .arg(event_id(event))
                .query_async(&mut conn)
                .await
                .unwrap_or(None);
            found |= score.is_some();
        }
        if !found {
            return false;
        }
    }
    true
}

/// Waits until the intake took `events` for `key` and the key's (batch, outbox) lengths are
/// `queued`.
async fn wait_queued(env: &Env, key: &str, events: &[Value], queued: (u64, u64)) {
    eventually(
        Duration::from_secs(20),
        &format!("{key}: events taken, then (batch, outbox) = {queued:?}"),
        || async {
            taken(env, key, events).await
                && env.store.queued(env.shards, key).await.ok() == Some(queued)
        },
    )
    .await;
}

/// Waits until `events` are provably processed: the intake took them and the key's batch and
/// outbox are empty, so each was sent, found redundant or dropped. A call is recorded by the
/// sim on arrival, before its entry leaves the outbox: after this, a missing call is missing
/// for good, not merely late. (`wait_idle` alone also holds before the events arrive.)
async fn wait_processed(env: &Env, key: &str, events: &[Value]) {
    wait_queued(env, key, events, (0, 0)).await;
}

/// The sentinel container: no test ever sends anything else for it.
const SENTINEL: &str = "sentinel";

/// A trailing change for task `a` that is sent whatever was sent before: a container change
/// for a container nothing was ever sent for, carried by a task STOPPED. A task's changes
/// share one outbox, handled in order, so once the sentinel's call is seen every change
/// published before it for the task was handled.
fn sentinel(a: &str) -> Vec<Value> {
    vec![container(a, SENTINEL, "RUNNING"), task(a, "STOPPED")]
}

fn is_sentinel(call: &CallRecord) -> bool {
    containers(call)
        .iter()
        .any(|c| c["containerName"] == SENTINEL)
}

/// Waits for the sentinel's call for task `a` (see [`sentinel`]), checks that the intake took
/// `earlier` (published before it), and returns the calls that came before the sentinel's:
/// the calls every earlier change for the task made.
async fn calls_before_sentinel(env: &Env, a: &str, earlier: &[Value]) -> Vec<CallRecord> {
    eventually(
        Duration::from_secs(20),
        &format!("the sentinel's call for {a}"),
        || async {
            env.calls_for(a)
                .iter()
                .any(|c| is_sentinel(c) && c.outcome.is_some())
        },
    )
    .await;
    assert!(
        taken(env, a, earlier).await,
        "{a}: the changes before the sentinel were taken"
    );
    let mut calls = env.calls_for(a);
    let at = calls.iter().position(is_sentinel).expect("sentinel call");
    calls.truncate(at);
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_events_one_container() {
    let env = setup("one-container").await;
    let a = arn("one-container");
    env.publish(&[
        container(&a, "containerName", "RUNNING"),
        container(&a, "containerName", "RUNNING"),
        task(&a, "RUNNING"),
    ])
    .await;
    let calls = env.wait_calls(&a, 1).await;
    no_more_calls(&env, &a, 1).await;
    assert_eq!(calls[0].operation, "SubmitTaskStateChange");
    assert_eq!(calls[0].body["task"], a.as_str());
    assert_eq!(containers(&calls[0]).len(), 2, "duplicates are kept");
    assert!(env
        .sim
        .calls()
        .iter()
        .all(|c| c.operation != "SubmitContainerStateChange"));
    env.cleanup().await;
}

/// Rule 9 measured on the wire: each retry waits base + 0–20 % jitter, the base starting at the
/// minimum, ×1.3 per retry, capped at the maximum, and back to the minimum after a success.
/// The minimum is large next to scheduling noise, so each gap is checked against a window of
/// [base, base × 1.2 + 60 ms]: a wrong base or growth, a missing cap (the 5th retry would wait
/// ≥ 1,142 ms), a missing reset (the retry after the success would wait ≥ 700 ms) or jitter
/// far over 20 % fall outside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_events_one_event_retries() {
    const MIN_MS: u64 = 400;
    const MAX_MS: u64 = 700;
    /// Allowed lateness of a retry: the sender's wake-up, its Redis reads and the HTTP call.
    const SLACK_MS: u64 = 60;
    let env = setup_with("one-event-retries", |c| {
        c.backoff_min_ms = MIN_MS;
        c.backoff_max_ms = MAX_MS;
    })
    .await;
    let a = arn("retries");
    // RUNNING fails 5 times, then succeeds (held until released); STOPPED, queued behind it,
    // fails once right after that success, in the same run of the sender, then succeeds.
    for (action, times) in [
        (Action::ServerError, 5),
        (Action::Hold, 1),
        (Action::ServerError, 1),
    ] {
        env.sim.add_rule(Rule {
            key: a.clone(),
            action,
            times,
        });
    }
    let events = [task(&a, "RUNNING"), task(&a, "STOPPED")];
    env.publish(&events).await;
    eventually!(
        Duration::from_secs(20),
        "6th call held",
        env.sim.stats().held == 1
    );
    // STOPPED is in the outbox before RUNNING succeeds: its failure follows the success.
    wait_queued(&env, &a, &events, (0, 2)).await;
    env.sim.release(Some(&a));
    let calls = env.wait_calls(&a, 8).await;
    no_more_calls(&env, &a, 8).await;
    let outcomes: Vec<&str> = calls
        .iter()
        .map(|c| c.outcome.as_deref().unwrap_or("in flight"))
        .collect();
    let e = "ServerException";
    assert_eq!(outcomes, [e, e, e, e, e, "ok", e, "ok"]);
    assert_eq!(
        statuses(&calls),
        [["RUNNING"; 6].as_slice(), &["STOPPED"; 2]].concat()
    );
    // Bases after failures 1–5 (400, 520, 676, then capped: 700, 700) and after failure 7,
    // the first since a success (400 again).
    let mut bases = Vec::new();
    let mut base = MIN_MS as f64;
    for _ in 0..5 {
        bases.push(base);
        base = (base * 1.3).min(MAX_MS as f64);
    }
    bases.push(MIN_MS as f64);
    let gaps: Vec<u64> = [0, 1, 2, 3, 4, 6]
        .iter()
        .map(|&i| calls[i + 1].received_at_ms - calls[i].finished_at_ms.expect("finished"))
        .collect();
    for (n, (gap, base)) in gaps.iter().zip(&bases).enumerate() {
        // -1 ms: the sim's timestamps are whole milliseconds.
        let low = base.round() as u64 - 1;
        let high = (base * 1.2).round() as u64 + SLACK_MS;
        assert!(
            (low..=high).contains(gap),
            "retry gap {n}: {gap} ms, expected {low}..={high} (gaps {gaps:?}, bases {bases:?})"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_events_invalid_parameters_events_removed() {
    let env = setup("invalid-parameters").await;
    let a = arn("invalid-parameters");
    env.sim.add_rule(Rule {
        key: a.clone(),
        action: Action::InvalidParameter,
        times: 1,
    });
    env.publish(&[container(&a, "web", "RUNNING"), task(&a, "RUNNING")])
        .await;
    env.wait_calls(&a, 1).await;
    // No retry for many backoff periods, the head is gone, and nothing was marked sent.
    never(
        Duration::from_millis(1_000),
        "a retry after InvalidParameterException",
        || async { env.calls_for(&a).len() > 1 },
    )
    .await;
    wait_idle(&env, &a).await;
    assert_eq!(
        state_field(&env, &a, "s").await,
        0,
        "task sent status not advanced"
    );
    assert_eq!(
        state_field(&env, &a, "c:web").await,
        0,
        "container sent status not advanced"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_events_concurrent_limit() {
    let env = setup("concurrent-limit").await;
    env.sim.add_rule(Rule {
        key: "*".into(),
        action: Action::Hold,
        times: 11,
    });
    let arns: Vec<String> = (0..11).map(|i| arn(&format!("limit-{i}"))).collect();
    let events: Vec<Value> = arns.iter().map(|a| task(a, "RUNNING")).collect();
    env.publish(&events).await;
    eventually!(
        Duration::from_secs(20),
        "10 calls in flight",
        env.sim.stats().in_flight == 10
    );
    never(
        Duration::from_millis(500),
        "an 11th call while 10 are held",
        || async { env.sim.calls().len() > 10 },
    )
    .await;
    let first = env.sim.calls()[0].key.clone();
    assert_eq!(env.sim.release(Some(&first)), 1);
    eventually!(
        Duration::from_secs(20),
        "the 11th call starts",
        env.sim.calls().len() == 11
    );
    env.sim.release(None);
    eventually!(
        Duration::from_secs(20),
        "all 11 finish",
        env.sim.stats().ok == 11
    );
    assert_eq!(env.sim.stats().max_in_flight, 10);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_events_container_differences() {
    let env = setup("container-differences").await;
    let a = arn("container-differences");
    env.publish(&[
        container(&a, "containerName", "RUNNING"),
        container(&a, "containerName", "STOPPED"),
        task(&a, "RUNNING"),
    ])
    .await;
    let calls = env.wait_calls(&a, 1).await;
    let c = containers(&calls[0]);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0]["status"], "RUNNING");
    assert_eq!(c[1]["status"], "STOPPED");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_events_task_differences() {
    let env = setup("task-differences").await;
    let (a, b) = (arn("differences-a"), arn("differences-b"));
    let events_b = [
        container(&b, "B1", "RUNNING"),
        container(&b, "B2", "STOPPED"),
    ];
    env.publish(&[
        events_b[0].clone(),
        container(&a, "A1", "RUNNING"),
        events_b[1].clone(),
        task(&a, "RUNNING"),
    ])
    .await;
    let calls_a = env.wait_calls(&a, 1).await;
    assert_eq!(containers(&calls_a[0]).len(), 1);
    assert_eq!(containers(&calls_a[0])[0]["containerName"], "A1");
    wait_queued(&env, &b, &events_b, (2, 0)).await;
    assert!(env.calls_for(&b).is_empty(), "B is only batched");
    env.publish(&[task(&b, "STOPPED")]).await;
    let calls_b = env.wait_calls(&b, 1).await;
    let c = containers(&calls_b[0]);
    assert_eq!(c.len(), 2);
    assert_eq!(
        (c[0]["containerName"].as_str(), c[0]["status"].as_str()),
        (Some("B1"), Some("RUNNING"))
    );
    assert_eq!(
        (c[1]["containerName"].as_str(), c[1]["status"].as_str()),
        (Some("B2"), Some("STOPPED"))
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_events_dedupe() {
    let env = setup("dedupe").await;
    let (a, b) = (arn("dedupe-a"), arn("dedupe-b"));
    // A: task sent RUNNING, container sent RUNNING. B: task sent NONE, container sent RUNNING.
    env.store
        .seed_state(
            env.shards,
            &a,
            &fields(&[("s", "3"), ("c:containerName", "4")]),
        )
        .await
        .unwrap();
    env.store
        .seed_state(
            env.shards,
            &b,
            &fields(&[("s", "0"), ("c:containerName", "4")]),
        )
        .await
        .unwrap();
    let events_a = [
        container(&a, "containerName", "RUNNING"),
        task(&a, "RUNNING"),
    ];
    env.publish(&[events_a.as_slice(), &sentinel(&a)].concat())
        .await;
    env.publish(&[
        container(&b, "containerName", "RUNNING"),
        task(&b, "RUNNING"),
    ])
    .await;
    let calls_b = env.wait_calls(&b, 1).await;
    assert_eq!(
        containers(&calls_b[0]).len(),
        1,
        "the already-sent container stays in the payload"
    );
    assert!(
        calls_before_sentinel(&env, &a, &events_a).await.is_empty(),
        "nothing new for A: no call"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cleanup_task_event_after_submit() {
    // Upstream expects 3 calls because each event carries a fresh Task object; keyed by ARN,
    // the second RUNNING for the same task is redundant: 2 calls.
    let env = setup("cleanup-after-submit").await;
    let (a, b) = (arn("taskarn"), arn("taskarn2"));
    let events_a = [task(&a, "RUNNING"), task(&a, "RUNNING")];
    let events_b = [task(&b, "RUNNING")];
    env.publish(&[
        events_a[0].clone(),
        events_a[1].clone(),
        events_b[0].clone(),
    ])
    .await;
    env.wait_calls(&a, 1).await;
    env.wait_calls(&b, 1).await;
    wait_processed(&env, &a, &events_a).await;
    wait_processed(&env, &b, &events_b).await;
    assert_eq!(env.calls_for(&a).len(), 1);
    let mut conn = env.store.conn().await.unwrap();
    for s in 0..env.shards {
        let pending: Vec<String> = redis::cmd("ZRANGE")
            .arg(env.store.shard(s).pending())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(pending.is_empty(), "no per-task queue left: {pending:?}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_eni_sent_status_change() {
    let env = setup("eni-sent-status").await;
    let a = arn("eni-task");
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/eni-1";
    env.publish(&[task_attachment(
        &a,
        att,
        "ATTACHED",
        Duration::from_secs(60),
    )])
    .await;
    let calls = env.wait_calls(&a, 1).await;
    let body = &calls[0].body;
    assert_eq!(calls[0].operation, "SubmitTaskStateChange");
    assert!(
        body.get("status").is_none() && body.get("containers").is_none(),
        "attachment variant: {body}"
    );
    assert_eq!(body["attachments"][0]["attachmentArn"], att);
    assert_eq!(body["attachments"][0]["status"], "ATTACHED");
    wait_idle(&env, &a).await;
    assert_eq!(
        state_field(&env, &a, &format!("a:{att}")).await,
        1,
        "attachment marked sent"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_get_batched_container_events() {
    let env = setup_draining("batched-container").await;
    let (known, unknown) = (arn("batched-known"), arn("batched-unknown"));
    let mut c1 = container(&known, "web", "RUNNING");
    c1["taskStatus"] = "RUNNING".into();
    let c2 = [container(&unknown, "web", "RUNNING")];
    env.publish(&[c1, c2[0].clone()]).await;
    let calls = env.wait_calls(&known, 1).await;
    assert_eq!(
        calls[0].body["status"], "RUNNING",
        "synthetic change carries the known status"
    );
    assert_eq!(containers(&calls[0]).len(), 1);
    wait_queued(&env, &unknown, &c2, (1, 0)).await;
    never(
        Duration::from_millis(1_000),
        "a drain for a task with no known status",
        || async { !env.calls_for(&unknown).is_empty() },
    )
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_get_batched_container_events_stopped_task() {
    let env = setup_draining("batched-container-stopped").await;
    let a = arn("batched-stopped");
    let mut c1 = container(&a, "web", "STOPPED");
    c1["taskStatus"] = "STOPPED".into();
    let events = [c1];
    env.publish(&events).await;
    wait_queued(&env, &a, &events, (1, 0)).await;
    never(
        Duration::from_millis(1_000),
        "a drain for a STOPPED task",
        || async { !env.calls_for(&a).is_empty() },
    )
    .await;
    assert_eq!(
        env.store.queued(env.shards, &a).await.unwrap(),
        (1, 0),
        "the batch waits for retention"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_submit_task_events_when_submitting_task_running_after_stopped() {
    let env = setup("running-after-stopped").await;
    let a = arn("running-after-stopped");
    // Hold the first call so both events are queued behind it.
    env.sim.add_rule(Rule {
        key: a.clone(),
        action: Action::Hold,
        times: 1,
    });
    let events = [task(&a, "STOPPED"), task(&a, "RUNNING")];
    env.publish(&events).await;
    eventually!(
        Duration::from_secs(20),
        "first call held",
        env.sim.stats().held == 1
    );
    wait_queued(&env, &a, &events, (0, 2)).await;
    env.sim.release(Some(&a));
    wait_processed(&env, &a, &events).await;
    assert_eq!(statuses(&env.calls_for(&a)), vec!["STOPPED"]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_submit_task_events_when_submitting_task_stopped_after_running() {
    let env = setup("stopped-after-running").await;
    let a = arn("stopped-after-running");
    env.publish(&[task(&a, "RUNNING"), task(&a, "STOPPED")])
        .await;
    let calls = env.wait_calls(&a, 2).await;
    assert_eq!(statuses(&calls), vec!["RUNNING", "STOPPED"]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_send_container_and_managed_agent_events() {
    let env = setup("container-and-agent").await;
    let a = arn("container-and-agent");
    env.publish(&[
        agent(&a, "web", "ExecuteCommandAgent", "RUNNING"),
        container(&a, "web", "RUNNING"),
        task(&a, "RUNNING"),
    ])
    .await;
    let calls = env.wait_calls(&a, 1).await;
    assert_eq!(agents(&calls[0]).len(), 1);
    assert_eq!(containers(&calls[0]).len(), 1);
    assert_eq!(
        agents(&calls[0])[0]["managedAgentName"],
        "ExecuteCommandAgent"
    );
    assert_eq!(agents(&calls[0])[0]["status"], "RUNNING");
    wait_idle(&env, &a).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_send_managed_agent_events_task_differences() {
    let env = setup("agent-differences").await;
    let (a, b) = (arn("agent-a"), arn("agent-b"));
    env.publish(&[
        agent(&a, "web", "AgentA", "RUNNING"),
        agent(&b, "web", "AgentB", "RUNNING"),
        task(&a, "RUNNING"),
    ])
    .await;
    let calls_a = env.wait_calls(&a, 1).await;
    assert_eq!(agents(&calls_a[0]).len(), 1);
    assert_eq!(agents(&calls_a[0])[0]["managedAgentName"], "AgentA");
    env.publish(&[task(&b, "STOPPED")]).await;
    let calls_b = env.wait_calls(&b, 1).await;
    assert_eq!(agents(&calls_b[0]).len(), 1);
    assert_eq!(agents(&calls_b[0])[0]["managedAgentName"], "AgentB");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_get_batched_managed_agent_events() {
    let env = setup_draining("batched-agent").await;
    let (known, unknown) = (arn("agent-known"), arn("agent-unknown"));
    let mut m1 = agent(&known, "web", "ExecuteCommandAgent", "RUNNING");
    m1["taskStatus"] = "RUNNING".into();
    let m2 = [agent(&unknown, "web", "ExecuteCommandAgent", "RUNNING")];
    env.publish(&[m1, m2[0].clone()]).await;
    let calls = env.wait_calls(&known, 1).await;
    assert_eq!(calls[0].body["status"], "RUNNING");
    assert_eq!(agents(&calls[0]).len(), 1);
    wait_queued(&env, &unknown, &m2, (1, 0)).await;
    never(
        Duration::from_millis(1_000),
        "a drain for an unknown task",
        || async { !env.calls_for(&unknown).is_empty() },
    )
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_get_batched_managed_agent_events_stopped_task() {
    let env = setup_draining("batched-agent-stopped").await;
    let a = arn("agent-stopped");
    let mut m1 = agent(&a, "web", "ExecuteCommandAgent", "STOPPED");
    m1["taskStatus"] = "STOPPED".into();
    let events = [m1];
    env.publish(&events).await;
    wait_queued(&env, &a, &events, (1, 0)).await;
    never(
        Duration::from_millis(1_000),
        "a drain for a STOPPED task",
        || async { !env.calls_for(&a).is_empty() },
    )
    .await;
    env.cleanup().await;
}

/// Upstream #18 asks the predicates about a container change whose container the agent holds
/// no record of (a nil `Container`, a dead path upstream): the container check says "send",
/// the task check "not a task change". The relay's form: a STOPPED change for a container
/// nothing was sent for makes no call of its own (it is batched), and it makes the task's next
/// change be sent even though that change alone is redundant (the task was sent RUNNING).
/// Against it, the same change for a container already sent STOPPED is redundant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_should_container_event_be_sent() {
    let env = setup("should-container-event").await;
    let (a, b) = (arn("container-unsent"), arn("container-sent"));
    env.store
        .seed_state(env.shards, &a, &fields(&[("s", "3")]))
        .await
        .unwrap();
    env.store
        .seed_state(env.shards, &b, &fields(&[("s", "3"), ("c:web", "6")]))
        .await
        .unwrap();
    let change = [container(&a, "web", "STOPPED")];
    env.publish(&change).await;
    // Taken and batched: processed, and a batched change makes no call (the drain is off).
    wait_queued(&env, &a, &change, (1, 0)).await;
    assert!(
        env.calls_for(&a).is_empty(),
        "a container change is not sent on its own"
    );
    let next = [task(&a, "RUNNING")];
    env.publish(&next).await;
    let calls = env.wait_calls(&a, 1).await;
    assert_eq!(calls[0].body["status"], "RUNNING");
    let c = containers(&calls[0]);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(
        (c[0]["containerName"].as_str(), c[0]["status"].as_str()),
        (Some("web"), Some("STOPPED"))
    );
    wait_processed(&env, &a, &next).await;
    assert_eq!(env.calls_for(&a).len(), 1);
    let events_b = [container(&b, "web", "STOPPED"), task(&b, "RUNNING")];
    env.publish(&events_b).await;
    wait_processed(&env, &b, &events_b).await;
    assert!(env.calls_for(&b).is_empty(), "already sent: redundant");
    env.cleanup().await;
}

/// Upstream case (1), an internal task, has no wire form: producers do not publish them.
/// Every case ends with a sentinel that is sent, so "not sent" is judged after the case's
/// events were handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_should_task_event_be_sent() {
    let env = setup("should-task-event").await;
    struct Case {
        name: &'static str,
        seed: &'static [(&'static str, &'static str)],
        events: fn(&str) -> Vec<Value>,
        sent: Option<&'static str>,
    }
    let cases = [
        Case {
            name: "2-none-none",
            seed: &[],
            events: |a| vec![task(a, "NONE")],
            sent: None,
        },
        Case {
            name: "3-running-sent-none",
            seed: &[],
            events: |a| vec![task(a, "RUNNING")],
            sent: Some("RUNNING"),
        },
        Case {
            name: "4-running-sent-running",
            seed: &[("s", "3")],
            events: |a| vec![task(a, "RUNNING")],
            sent: None,
        },
        Case {
            name: "5-stopped-sent-running",
            seed: &[("s", "3")],
            events: |a| vec![task(a, "STOPPED")],
            sent: Some("STOPPED"),
        },
        Case {
            name: "6-container-behind",
            seed: &[("s", "3"), ("c:web", "4")],
            events: |a| vec![container(a, "web", "STOPPED"), task(a, "RUNNING")],
            sent: Some("RUNNING"),
        },
        Case {
            name: "7-none-container-unsent",
            seed: &[],
            events: |a| vec![container(a, "web", "RUNNING"), task(a, "NONE")],
            sent: Some("PENDING"),
        },
        Case {
            name: "8-agent-unsent",
            seed: &[],
            events: |a| vec![agent(a, "web", "ExecAgent", "RUNNING"), task(a, "NONE")],
            sent: Some("PENDING"),
        },
        // Upstream sends here (agent sent "!=" status); the port is monotonic (FIX): not sent.
        Case {
            name: "9-agent-sent-ahead",
            seed: &[("m:web\u{1f}ExecAgent", "3")],
            events: |a| vec![agent(a, "web", "ExecAgent", "RUNNING"), task(a, "NONE")],
            sent: None,
        },
        Case {
            name: "10-agent-in-sync",
            seed: &[("m:web\u{1f}ExecAgent", "2")],
            events: |a| vec![agent(a, "web", "ExecAgent", "RUNNING"), task(a, "NONE")],
            sent: None,
        },
        Case {
            name: "11-all-in-sync",
            seed: &[("s", "3"), ("c:web", "4")],
            events: |a| vec![container(a, "web", "RUNNING"), task(a, "RUNNING")],
            sent: None,
        },
    ];
    let mut published = Vec::new();
    for case in &cases {
        let a = arn(case.name);
        if !case.seed.is_empty() {
            env.store
                .seed_state(env.shards, &a, &fields(case.seed))
                .await
                .unwrap();
        }
        let events = (case.events)(&a);
        env.publish(&[events.as_slice(), &sentinel(&a)].concat())
            .await;
        published.push(events);
    }
    for (case, events) in cases.iter().zip(&published) {
        let a = arn(case.name);
        let calls = calls_before_sentinel(&env, &a, events).await;
        let expected: Vec<String> = case.sent.iter().map(|s| s.to_string()).collect();
        assert_eq!(statuses(&calls), expected, "case {}", case.name);
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_should_task_attachment_event_be_sent() {
    let env = setup("should-task-attachment").await;
    let att = |n: &str| format!("arn:aws:ecs:us-east-1:123456789012:attachment/{n}");
    // (a) a task status change is sent as a status update.
    let a = arn("att-a");
    env.publish(&[task(&a, "STOPPED")]).await;
    assert!(env.wait_calls(&a, 1).await[0].body.get("status").is_some());
    // (b) no attachment at all: not a valid taskAttachment (rejected at intake instead).
    let b = arn("att-b");
    let mut no_att = task_attachment(&b, &att("b"), "ATTACHED", Duration::from_secs(60));
    no_att.as_object_mut().unwrap().remove("attachmentArn");
    env.publish(&[no_att]).await;
    // (c) expired 1 s ago and unsent: not sent.
    let c = arn("att-c");
    let mut expired = task_attachment(&c, &att("c"), "ATTACHED", Duration::ZERO);
    expired["expiresAt"] = rfc3339_ago(Duration::from_secs(1)).into();
    let events_c = [expired];
    env.publish(&[events_c.as_slice(), &sentinel(&c)].concat())
        .await;
    // (d) valid for 10 s but already sent: not sent.
    let d = arn("att-d");
    env.store
        .seed_state(
            env.shards,
            &d,
            &fields(&[(&format!("a:{}", att("d")), "1")]),
        )
        .await
        .unwrap();
    let events_d = [task_attachment(
        &d,
        &att("d"),
        "ATTACHED",
        Duration::from_secs(10),
    )];
    env.publish(&[events_d.as_slice(), &sentinel(&d)].concat())
        .await;
    // (e) valid and unsent: sent with the attachment variant.
    let e = arn("att-e");
    env.publish(&[task_attachment(
        &e,
        &att("e"),
        "ATTACHED",
        Duration::from_secs(10),
    )])
    .await;
    let calls = env.wait_calls(&e, 1).await;
    assert_eq!(calls[0].body["attachments"][0]["attachmentArn"], att("e"));
    for (key, events) in [(&c, &events_c), (&d, &events_d)] {
        let calls = calls_before_sentinel(&env, key, events).await;
        assert!(calls.is_empty(), "{key} must not be sent: {calls:?}");
    }
    eventually!(
        Duration::from_secs(20),
        "(b) dead-lettered",
        !env.dead_letters().await.is_empty()
    );
    assert!(env.calls_for(&b).is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_set_task_sent_status() {
    // Upstream lets the agent's sent status go back to RUNNING; the port keeps it (FIX).
    let env = setup("set-task-sent").await;
    let a = arn("set-task-sent");
    env.publish(&[
        container(&a, "web", "STOPPED"),
        agent(&a, "web", "ExecAgent", "STOPPED"),
        task(&a, "STOPPED"),
    ])
    .await;
    env.wait_calls(&a, 1).await;
    let second = [
        container(&a, "web", "RUNNING"),
        agent(&a, "web", "ExecAgent", "RUNNING"),
        task(&a, "RUNNING"),
    ];
    env.publish(&second).await;
    wait_processed(&env, &a, &second).await;
    assert_eq!(env.calls_for(&a).len(), 1, "the second batch is redundant");
    assert_eq!(state_field(&env, &a, "s").await, 4, "task sent STOPPED");
    assert_eq!(
        state_field(&env, &a, "c:web").await,
        6,
        "container sent STOPPED"
    );
    assert_eq!(
        state_field(&env, &a, "m:web\u{1f}ExecAgent").await,
        3,
        "agent sent stays STOPPED"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_set_container_sent_status() {
    let env = setup("set-container-sent").await;
    let a = arn("set-container-sent");
    env.publish(&[container(&a, "web", "STOPPED"), task(&a, "RUNNING")])
        .await;
    env.wait_calls(&a, 1).await;
    env.publish(&[container(&a, "web", "RUNNING"), task(&a, "STOPPED")])
        .await;
    env.wait_calls(&a, 2).await;
    wait_idle(&env, &a).await;
    assert_eq!(
        state_field(&env, &a, "c:web").await,
        6,
        "container sent status never goes back"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_set_attachment_sent_status() {
    let env = setup("set-attachment-sent").await;
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/set";
    env.publish(&[attachment(att, "eni", "ATTACHED", Duration::from_secs(100))])
        .await;
    env.wait_calls(att, 1).await;
    wait_idle(&env, att).await;
    assert_eq!(
        state_field(&env, att, &format!("a:{att}")).await,
        1,
        "reads back as sent"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_send_eni_attachment_event() {
    let env = setup("eni-attachment").await;
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/one";
    // ENI attachments are sent whatever their status, NONE included (as upstream).
    env.publish(&[attachment(att, "eni", "NONE", Duration::from_secs(1))])
        .await;
    let calls = env.wait_calls(att, 1).await;
    no_more_calls(&env, att, 1).await;
    assert_eq!(calls[0].operation, "SubmitAttachmentStateChanges");
    assert_eq!(calls[0].body["attachments"][0]["attachmentArn"], att);
    assert_eq!(calls[0].body["attachments"][0]["status"], "NONE");
    assert_eq!(
        calls[0].body["attachments"].as_array().map(Vec::len),
        Some(1)
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_send_res_attachment_event() {
    let env = setup("res-attachment").await;
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/ebs-1";
    let not_attached = "arn:aws:ecs:us-east-1:123456789012:attachment/ebs-2";
    // After the NONE, a sentinel on its key: the same attachment ATTACHED, which is sent
    // (nothing was sent for it before), and only once the NONE was handled (one outbox per key).
    let not_attached_events = [
        attachment(not_attached, "resource", "NONE", Duration::from_secs(10)),
        attachment(
            not_attached,
            "resource",
            "ATTACHED",
            Duration::from_secs(10),
        ),
    ];
    env.publish(&[
        not_attached_events[0].clone(),
        attachment(att, "resource", "ATTACHED", Duration::from_secs(10)),
        not_attached_events[1].clone(),
    ])
    .await;
    let calls = env.wait_calls(att, 1).await;
    assert_eq!(calls[0].body["attachments"][0]["status"], "ATTACHED");
    let calls = env.wait_calls(not_attached, 1).await;
    wait_processed(&env, not_attached, &not_attached_events).await;
    assert_eq!(
        env.calls_for(not_attached).len(),
        1,
        "a resource attachment needs ATTACHED"
    );
    assert_eq!(
        calls[0].body["attachments"][0]["status"], "ATTACHED",
        "only the sentinel was sent"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_send_attachment_event_retries() {
    let env = setup("attachment-retries").await;
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/retry";
    env.sim.add_rule(Rule {
        key: att.into(),
        action: Action::ServerError,
        times: 1,
    });
    env.publish(&[attachment(att, "eni", "ATTACHED", Duration::from_secs(60))])
        .await;
    let calls = env.wait_calls(att, 2).await;
    no_more_calls(&env, att, 2).await;
    assert_eq!(calls[0].outcome.as_deref(), Some("ServerException"));
    assert_eq!(calls[1].outcome.as_deref(), Some("ok"));
    assert_eq!(calls[1].body["attachments"][0]["attachmentArn"], att);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_send_mutiple_attachment_events_mixed_attachments() {
    let env = setup("mixed-attachments").await;
    let eni = "arn:aws:ecs:us-east-1:123456789012:attachment/mixed";
    let r1 = "arn:aws:ecs:us-east-1:123456789012:attachment/mixed-1";
    let r2 = "arn:aws:ecs:us-east-1:123456789012:attachment/mixed-2";
    env.publish(&[
        attachment(eni, "eni", "ATTACHED", Duration::from_secs(60)),
        attachment(r1, "resource", "ATTACHED", Duration::from_secs(60)),
        attachment(r2, "resource", "ATTACHED", Duration::from_secs(60)),
    ])
    .await;
    for key in [eni, r1, r2] {
        env.wait_calls(key, 1).await;
    }
    never(Duration::from_millis(500), "more than 3 calls", || async {
        env.sim.calls().len() > 3
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_submit_attachment_event_succeeds() {
    let env = setup("attachment-succeeds").await;
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/succeeds";
    env.publish(&[attachment(att, "eni", "ATTACHED", Duration::from_secs(60))])
        .await;
    env.wait_calls(att, 1).await;
    wait_idle(&env, att).await;
    no_more_calls(&env, att, 1).await;
    assert_eq!(state_field(&env, att, &format!("a:{att}")).await, 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_submit_attachment_event_attachment_expired() {
    let env = setup("attachment-expired").await;
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/expired";
    let mut e = attachment(att, "eni", "ATTACHED", Duration::ZERO);
    e["expiresAt"] = rfc3339_ago(Duration::from_millis(100)).into();
    let events = [e];
    env.publish(&events).await;
    wait_processed(&env, att, &events).await;
    assert!(env.calls_for(att).is_empty());
    assert_eq!(
        state_field(&env, att, &format!("a:{att}")).await,
        0,
        "stays unsent"
    );
    // Seen from outside: a later, valid change for the attachment is still sent.
    env.publish(&[attachment(att, "eni", "ATTACHED", Duration::from_secs(60))])
        .await;
    env.wait_calls(att, 1).await;
    no_more_calls(&env, att, 1).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_submit_attachment_event_attachment_is_sent() {
    let env = setup("attachment-is-sent").await;
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/is-sent";
    env.store
        .seed_state(env.shards, att, &fields(&[(&format!("a:{att}"), "1")]))
        .await
        .unwrap();
    // No sentinel can be sent for this key (it is already sent): its id among the key's recent
    // ids and the empty outbox prove the change was handled.
    let events = [attachment(
        att,
        "resource",
        "ATTACHED",
        Duration::from_secs(60),
    )];
    env.publish(&events).await;
    wait_processed(&env, att, &events).await;
    assert!(env.calls_for(att).is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_handle_engine_event() {
    let env = setup("handle-engine-event").await;
    let a = arn("engine-event");
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/attachmentARN";
    env.publish(&[
        container(&a, "web", "RUNNING"),
        container(&a, "sidecar", "RUNNING"),
        task(&a, "RUNNING"),
        attachment(att, "eni", "ATTACHED", Duration::from_secs(60)),
    ])
    .await;
    let calls = env.wait_calls(&a, 1).await;
    assert_eq!(containers(&calls[0]).len(), 2);
    let att_calls = env.wait_calls(att, 1).await;
    assert_eq!(att_calls[0].operation, "SubmitAttachmentStateChanges");
    env.cleanup().await;
}
