//! `inspect <arn>`: "where is my task?" against a live worker process, one test per state the
//! task can be in, each in text and in JSON.

use std::time::Duration;

use ecs_state_relay::relay::config::WorkerConfig;
use ecs_state_relay::sim::{Action, Rule};
use serde_json::Value;

use crate::common::*;

/// A worker process serving its metrics port (where `inspect` asks for live state).
async fn worker(env: &mut Env, mut cfg: WorkerConfig) -> Proc {
    let port = free_port();
    cfg.metrics_addr = format!("127.0.0.1:{port}");
    let proc = env.spawn_process(&cfg);
    env.wait_all_shards_owned().await;
    // The address is announced with the worker's first ready report.
    let owner = cfg.worker_id.clone().expect("test workers have ids");
    eventually!(
        Duration::from_secs(10),
        "address announced",
        env.store.worker_addr(&owner).await.ok().flatten().is_some()
    );
    proc
}

fn inspect(env: &Env, key: &str) -> (String, Value) {
    let shards = env.shards.to_string();
    let text = env.run_cli(&["inspect", "--shards", &shards, key]);
    let json = env.run_cli(&["inspect", "--shards", &shards, "--json", key]);
    let json: Value = serde_json::from_str(&json).expect("inspect --json prints JSON");
    println!("{text}");
    (text, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_the_relay_never_saw_is_said_so_plainly() {
    let mut env = Env::new("inspect-none", 2).await;
    let cfg = env.config();
    let _w = worker(&mut env, cfg).await;
    let (text, json) = inspect(&env, &arn("never-seen"));
    assert!(
        text.contains("no state held: never seen by this relay, or expired"),
        "{text}"
    );
    assert_eq!(json["held"], false);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_container_change_waits_for_its_task_change() {
    let mut env = Env::new("inspect-batched", 2).await;
    let cfg = env.config();
    let _w = worker(&mut env, cfg).await;
    let t = arn("batched");
    env.publish(&[container(&t, "web", "RUNNING")]).await;
    wait_queued(&env, &t, 1, 0).await;
    let (text, json) = inspect(&env, &t);
    assert!(
        text.contains("batch: 1 waiting for a task change"),
        "{text}"
    );
    assert!(text.contains("container web RUNNING"), "{text}");
    assert!(text.contains("now: idle"), "{text}");
    assert_eq!(json["batch"][0]["name"], "web");
    assert_eq!(json["outbox"].as_array().map(Vec::len), Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_waits_in_the_outbox_behind_one_in_flight() {
    let mut env = Env::new("inspect-outbox", 2).await;
    let cfg = env.config();
    let _w = worker(&mut env, cfg).await;
    let t = arn("in-flight");
    env.sim.add_rule(Rule {
        key: t.clone(),
        action: Action::Hold,
        times: 1,
    });
    env.publish(&[
        task(&t, "RUNNING"),
        container(&t, "web", "STOPPED"),
        task(&t, "STOPPED"),
    ])
    .await;
    eventually!(
        Duration::from_secs(10),
        "the first call held in flight",
        env.sim.stats().held == 1
    );
    let (text, json) = inspect(&env, &t);
    assert!(text.contains("now: in flight"), "{text}");
    assert!(text.contains("outbox: 2 waiting"), "{text}");
    assert_eq!(json["live"]["state"], "in flight");
    assert_eq!(json["outbox"][0]["status"], "RUNNING");
    assert_eq!(json["outbox"][1]["status"], "STOPPED");
    assert_eq!(json["outbox"][1]["containers"], 1);
    env.sim.release(None);
    env.wait_calls(&t, 2).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_backing_off_shows_its_attempts_and_ecs_error() {
    let mut env = Env::new("inspect-backoff", 2).await;
    let mut cfg = env.config();
    // Long enough between tries to catch it backing off.
    cfg.backoff_min_ms = 3_000;
    cfg.backoff_max_ms = 3_000;
    let _w = worker(&mut env, cfg).await;
    let t = arn("failing");
    env.sim.add_rule(Rule {
        key: t.clone(),
        action: Action::ServerError,
        times: 100,
    });
    env.publish(&[task(&t, "RUNNING")]).await;
    env.wait_calls(&t, 1).await;
    let mut last = (String::new(), Value::Null);
    eventually(Duration::from_secs(10), "inspect shows the backoff", || {
        last = inspect(&env, &t);
        let backing_off = last.1["live"]["state"] == "backing off";
        async move { backing_off }
    })
    .await;
    let (text, json) = last;
    assert!(text.contains("now: backing off"), "{text}");
    assert!(text.contains("ServerException"), "{text}");
    assert!(
        json["live"]["attempts"].as_u64().unwrap_or(0) >= 1,
        "{json}"
    );
    assert!(
        json["live"]["next_attempt_in_ms"].as_u64().is_some(),
        "{json}"
    );
    assert_eq!(json["outbox"][0]["status"], "RUNNING");
    env.sim.clear_rules();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_task_shows_what_ecs_answered_and_who_sent_it() {
    let mut env = Env::new("inspect-sent", 2).await;
    let cfg = env.config();
    let owner = cfg.worker_id.clone().expect("id");
    let _w = worker(&mut env, cfg).await;
    let t = arn("sent");
    env.publish(&[container(&t, "web", "RUNNING"), task(&t, "RUNNING")])
        .await;
    env.wait_calls(&t, 1).await;
    let mut last = (String::new(), Value::Null);
    eventually(Duration::from_secs(10), "history recorded", || {
        last = inspect(&env, &t);
        let recorded = last.1["history"].as_array().is_some_and(|h| !h.is_empty());
        async move { recorded }
    })
    .await;
    let (text, json) = last;
    assert!(
        text.contains("sent: container web RUNNING, task RUNNING"),
        "{text}"
    );
    assert!(
        text.contains(&format!("RUNNING by {owner}: ok (after 1 call(s))")),
        "{text}"
    );
    let h = &json["history"][0];
    assert_eq!(h["answer"], "ok");
    assert_eq!(h["worker"], owner.as_str());
    assert_eq!(h["containers"], 1);
    assert!(h["at"].as_i64().unwrap_or(0) > 0);
    assert_eq!(json["sent"]["task"], "RUNNING");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_keeps_the_last_three_however_many_changes_a_task_had() {
    let mut env = Env::new("inspect-bounded", 2).await;
    let cfg = env.config();
    let _w = worker(&mut env, cfg).await;
    let t = arn("many");
    let events: Vec<Value> = (0..8)
        .map(|i| container(&t, &format!("c{i}"), "RUNNING"))
        .flat_map(|c| [c, task(&t, "RUNNING")])
        .collect();
    env.publish(&events).await;
    wait_queued(&env, &t, 0, 0).await;
    let (_, json) = inspect(&env, &t);
    assert_eq!(json["history"].as_array().map(Vec::len), Some(3), "{json}");
    // What the full history costs in Redis, beside the bench's bytes per pending task.
    let shard = json["shard"].as_u64().expect("shard") as u16;
    let mut conn = env.store.conn().await.expect("redis");
    let bytes: u64 = redis::cmd("HSTRLEN")
        .arg(env.store.shard(shard).state(&t))
        .arg("h")
        .query_async(&mut conn)
        .await
        .expect("HSTRLEN");
    println!("history of 3 entries: {bytes} bytes in the task's state hash");
    // With the bench's ~1,400-1,500 bytes per pending task, a full history stays within 2,048.
    assert!(bytes <= 400, "{bytes}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_expired_after_the_retention_is_no_longer_held() {
    let mut env = Env::new("inspect-expired", 2).await;
    let mut cfg = env.config();
    cfg.task_retention_s = 1;
    let _w = worker(&mut env, cfg).await;
    let t = arn("expired");
    env.publish(&[task(&t, "RUNNING")]).await;
    env.wait_calls(&t, 1).await;
    eventually(
        Duration::from_secs(15),
        "state dropped after the retention",
        || async {
            env.store
                .key_view(env.shards, &t)
                .await
                .map(|v| v.is_none())
                .unwrap_or(false)
        },
    )
    .await;
    let (text, json) = inspect(&env, &t);
    assert!(text.contains("or expired after the retention"), "{text}");
    assert_eq!(json["held"], false);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_does_not_answer_leaves_the_stored_state_shown() {
    let mut env = Env::new("inspect-silent", 2).await;
    let cfg = env.config();
    let owner = cfg.worker_id.clone().expect("id");
    let w = worker(&mut env, cfg).await;
    let t = arn("silent-owner");
    env.publish(&[container(&t, "web", "RUNNING")]).await;
    wait_queued(&env, &t, 1, 0).await;
    signal(&w, "STOP");
    let (text, json) = inspect(&env, &t);
    signal(&w, "CONT");
    assert!(
        text.contains(&format!("now: unknown — {owner} did not answer")),
        "{text}"
    );
    assert!(
        text.contains("container web RUNNING"),
        "stored state still shown: {text}"
    );
    assert!(json["live"].is_null());
    assert!(json["live_unknown"]
        .as_str()
        .is_some_and(|w| w.contains("did not answer")));
    env.cleanup().await;
}

/// `RELAY_INSPECT=off`: the worker announces no inspect address and its metrics port answers
/// `/inspect` with 404; `inspect` still shows the stored state and says why there is no live
/// view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_off_serves_nothing_and_the_cli_says_why() {
    let mut env = Env::new("inspect-off", 2).await;
    let mut cfg = env.config();
    cfg.inspect = false;
    let port = free_port();
    cfg.metrics_addr = format!("127.0.0.1:{port}");
    let owner = cfg.worker_id.clone().expect("id");
    let _w = env.spawn_process(&cfg);
    env.wait_all_shards_owned().await;
    let t = arn("inspect-off");
    env.publish(&[container(&t, "web", "RUNNING")]).await;
    wait_queued(&env, &t, 1, 0).await;
    let url = format!("http://127.0.0.1:{port}/inspect?key={t}");
    let answer = reqwest::get(&url).await.expect("the metrics port answers");
    assert_eq!(answer.status().as_u16(), 404);
    let body = answer.text().await.unwrap_or_default();
    assert!(body.contains("RELAY_INSPECT=off"), "{body}");
    let (text, json) = inspect(&env, &t);
    assert!(text.contains("container web RUNNING"), "{text}");
    assert!(json["live"].is_null());
    let why = json["live_unknown"].as_str().unwrap_or_default();
    assert!(
        why.contains(&owner) && why.contains("RELAY_INSPECT=off"),
        "{why}"
    );
    env.cleanup().await;
}
