//! Model-based property test: random interleavings of task, container and managed-agent
//! events for a few tasks go through the real intake and sender (RabbitMQ, Redis, ecs-sim);
//! ECS must receive exactly the calls a small reference model of the behaviour rules predicts,
//! in the same order per task.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

const TASK: [&str; 5] = ["NONE", "MANIFEST_PULLED", "CREATED", "RUNNING", "STOPPED"];
const CONTAINER: [&str; 3] = ["MANIFEST_PULLED", "RUNNING", "STOPPED"];
const CONTAINER_ORDER: [u8; 3] = [1, 4, 6];
const AGENT: [&str; 3] = ["CREATED", "RUNNING", "STOPPED"];

#[derive(Clone, Debug)]
enum Ev {
    Task(usize),
    Container(usize, usize),
    Agent(usize),
}

/// One submission as ECS sees it: status, then (container, status) and (agent, status) lists.
type Call = (String, Vec<(String, String)>, Vec<String>);

/// Rules 1, 2, 4, 5, 6 of the behaviour, for one task, with no failures and no drain.
fn model(events: &[Ev]) -> Vec<Call> {
    let (mut sent_task, mut sent_c, mut sent_m) = (0u8, BTreeMap::<usize, u8>::new(), 0u8);
    let mut batch: Vec<Ev> = Vec::new();
    let mut calls = Vec::new();
    for e in events {
        match e {
            Ev::Container(..) | Ev::Agent(_) => batch.push(e.clone()),
            Ev::Task(s) => {
                let status = *s as u8;
                let items = std::mem::take(&mut batch);
                let mut send = sent_task < status;
                for it in &items {
                    match it {
                        Ev::Container(c, cs) => {
                            send |= sent_c.get(c).copied().unwrap_or(0) < CONTAINER_ORDER[*cs]
                        }
                        Ev::Agent(a) => send |= sent_m < *a as u8 + 1,
                        Ev::Task(_) => {}
                    }
                }
                if !send {
                    continue;
                }
                sent_task = sent_task.max(status);
                let mut containers = Vec::new();
                let mut agents = Vec::new();
                for it in &items {
                    match it {
                        Ev::Container(c, cs) => {
                            let e = sent_c.entry(*c).or_insert(0);
                            *e = (*e).max(CONTAINER_ORDER[*cs]);
                            let wire = if *cs == 0 { "PENDING" } else { CONTAINER[*cs] };
                            containers.push((format!("c{c}"), wire.to_string()));
                        }
                        Ev::Agent(a) => {
                            sent_m = sent_m.max(*a as u8 + 1);
                            agents.push(AGENT[*a].to_string());
                        }
                        Ev::Task(_) => {}
                    }
                }
                let wire = if status < 3 { "PENDING" } else { TASK[*s] };
                calls.push((wire.to_string(), containers, agents));
            }
        }
    }
    calls
}

fn observed(call: &ecs_state_relay::sim::CallRecord) -> Call {
    let list = |k: &str| {
        call.body
            .get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    (
        call.body["status"].as_str().unwrap_or_default().to_string(),
        list("containers")
            .iter()
            .map(|c| {
                (
                    c["containerName"].as_str().unwrap_or_default().into(),
                    c["status"].as_str().unwrap_or_default().into(),
                )
            })
            .collect(),
        list("managedAgents")
            .iter()
            .map(|m| m["status"].as_str().unwrap_or_default().to_string())
            .collect(),
    )
}

fn event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        3 => (0..TASK.len()).prop_map(Ev::Task),
        3 => (0..2usize, 0..CONTAINER.len()).prop_map(|(c, s)| Ev::Container(c, s)),
        1 => (0..AGENT.len()).prop_map(Ev::Agent),
    ]
}

#[test]
fn random_interleavings_match_the_reference_model() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut env = rt.block_on(Env::new("model", 2));
    let cfg = env.config();
    rt.block_on(env.start_worker(cfg));
    let mut runner = TestRunner::new(Config {
        cases: 24,
        ..Config::default()
    });
    let case = std::sync::atomic::AtomicU32::new(0);
    let strategy = prop::collection::vec((0..3usize, event()), 1..24);
    let result = runner.run(&strategy, |interleaving| {
        let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tasks: Vec<String> = (0..3).map(|t| arn(&format!("model-{case}-{t}"))).collect();
        let messages: Vec<Value> = interleaving
            .iter()
            .map(|(t, e)| match e {
                Ev::Task(s) => task(&tasks[*t], TASK[*s]),
                Ev::Container(c, s) => container(&tasks[*t], &format!("c{c}"), CONTAINER[*s]),
                Ev::Agent(a) => agent(&tasks[*t], "c0", "ExecuteCommandAgent", AGENT[*a]),
            })
            .collect();
        rt.block_on(async {
            env.publish(&messages).await;
            for (i, t) in tasks.iter().enumerate() {
                let own: Vec<Ev> = interleaving
                    .iter()
                    .filter(|(x, _)| *x == i)
                    .map(|(_, e)| e.clone())
                    .collect();
                let expected = model(&own);
                // All of the task's events are in Redis (their ids are among its recent ids)...
                eventually(Duration::from_secs(20), "events taken", || async {
                    let mut conn = env.store.conn().await.unwrap();
                    let mut taken = 0u64;
                    for s in 0..env.shards {
                        let n: u64 = redis::cmd("ZCARD")
                            .arg(env.store.shard(s).recent_ids(t))
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        taken += n;
                    }
                    taken == own.len() as u64
                })
                .await;
                env.wait_calls(t, expected.len()).await;
                // Every task event has left the outbox (sent or found redundant): nothing more comes.
                eventually(Duration::from_secs(20), "outbox empty", || async {
                    env.store
                        .queued(env.shards, t)
                        .await
                        .map(|(_, o)| o == 0)
                        .unwrap_or(false)
                })
                .await;
                let got: Vec<Call> = env.calls_for(t).iter().map(observed).collect();
                prop_assert_eq!(got, expected, "task {} of {:?}", i, interleaving);
            }
            Ok(())
        })
    });
    rt.block_on(env.cleanup());
    result.unwrap();
}
