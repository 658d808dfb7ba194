//! Every rejection rule of the wire contract: the message lands in `<exchange>.dead` with
//! `x-relay-reject-reason`, is acked (the queue does not block), and later valid events flow.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

fn valid_container(a: &str) -> Value {
    container(a, "web", "RUNNING")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_rule_dead_letters_with_its_reason_and_valid_events_still_flow() {
    let env = Env::with_worker("rejects", 2, |_| {}).await;
    let a = arn("rejects");

    // (expected reason code, routing key, body)
    let mut cases: Vec<(&str, String, Vec<u8>)> = Vec::new();
    let mut json_case = |code: &'static str, edit: &dyn Fn(&mut Value)| {
        let mut v = valid_container(&a);
        edit(&mut v);
        cases.push((code, a.clone(), v.to_string().into_bytes()));
    };
    json_case("schema_version", &|v| v["schemaVersion"] = json!(2));
    json_case("schema_version", &|v| {
        v.as_object_mut().unwrap().remove("schemaVersion");
    });
    json_case("event_id", &|v| {
        v.as_object_mut().unwrap().remove("eventId");
    });
    json_case("event_id", &|v| v["eventId"] = json!("x".repeat(129)));
    json_case("event_id", &|v| v["eventId"] = json!(""));
    json_case("type", &|v| v["type"] = json!("volume"));
    json_case("cluster", &|v| {
        v.as_object_mut().unwrap().remove("cluster");
    });
    json_case("timestamp", &|v| v["occurredAt"] = json!("28/11/2026"));
    json_case("status", &|v| v["status"] = json!("CREATED")); // not reportable for containers
    json_case("status", &|v| v["status"] = json!("FLYING"));
    json_case("status", &|v| v["taskStatus"] = json!("DONE"));
    json_case("container_name", &|v| v["containerName"] = json!(""));
    json_case("exit_code", &|v| v["exitCode"] = json!(3_000_000_000u64));
    json_case("network_bindings", &|v| {
        v["networkBindings"] = json!([{"containerPort": 70000}])
    });
    json_case("network_bindings", &|v| {
        v["networkBindings"] = json!([{"protocol": "sctp"}])
    });
    json_case("network_bindings", &|v| {
        v["networkBindings"] = json!(vec![json!({"containerPort": 1}); 1001])
    });
    json_case("field_type", &|v| v["reason"] = json!(42));
    json_case("task_arn", &|v| v["taskArn"] = json!("not-an-arn"));
    json_case("managed_agent_name", &|v| {
        v["type"] = json!("managedAgent");
        v["managedAgentName"] = json!("");
    });
    json_case("attachment_arn", &|v| {
        v["type"] = json!("taskAttachment");
        v["status"] = json!("ATTACHED");
        v["expiresAt"] = json!("2099-01-01T00:00:00Z");
    });
    json_case("timestamp", &|v| {
        v["type"] = json!("taskAttachment");
        v["status"] = json!("ATTACHED");
        v["attachmentArn"] = json!("arn:aws:ecs:us-east-1:123456789012:attachment/x");
    });
    let att = "arn:aws:ecs:us-east-1:123456789012:attachment/rejects";
    let mut bad_type = attachment(att, "eni", "ATTACHED", Duration::from_secs(60));
    bad_type["attachmentType"] = json!("volume");
    cases.push((
        "attachment_type",
        att.to_string(),
        bad_type.to_string().into_bytes(),
    ));
    cases.push((
        "routing_key_mismatch",
        arn("someone-else"),
        valid_container(&a).to_string().into_bytes(),
    ));
    cases.push(("not_json", a.clone(), b"{\"schemaVersion\":1,".to_vec()));
    cases.push(("not_object", a.clone(), b"[1,2,3]".to_vec()));
    cases.push(("not_utf8", a.clone(), vec![0xc3, 0x28, 0xff]));
    let mut big = valid_container(&a);
    big["padding"] = json!("x".repeat(300 * 1024));
    cases.push(("too_large", a.clone(), big.to_string().into_bytes()));

    for (_, key, body) in &cases {
        env.publish_raw(key, body).await;
    }
    // A valid lifecycle after all the bad input still reaches ECS.
    env.publish(&[valid_container(&a), task(&a, "RUNNING")])
        .await;
    let calls = env.wait_calls(&a, 1).await;
    assert_eq!(
        calls[0].body["containers"].as_array().map(Vec::len),
        Some(1),
        "bad events never reach a batch"
    );

    let mut dead = Vec::new();
    let expected = cases.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while dead.len() < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {expected} dead-lettered",
            dead.len()
        );
        dead.extend(env.dead_letters().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead.len(), expected, "exactly the bad messages");
    let mut want: BTreeMap<Vec<u8>, &str> = BTreeMap::new();
    for (code, _, body) in &cases {
        want.insert(body.clone(), code);
    }
    for (body, reason) in &dead {
        let code = want
            .get(body)
            .unwrap_or_else(|| panic!("unexpected dead letter: {reason}"));
        assert!(
            reason.starts_with(&format!("{code}: ")),
            "expected {code}, got {reason:?}"
        );
    }
    // Everything was acked: nothing is left in the shard queues.
    let c = ecs_state_relay::relay::amqp::connect(&amqp_url(), &Default::default(), "test")
        .await
        .unwrap();
    let ch = c.create_channel().await.unwrap();
    for s in 0..env.shards {
        let (ready, _) = shard_queue_counts(&ch, &env.exchange, s).await.unwrap();
        assert_eq!(ready, 0, "shard {s} drained");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_batch_is_capped_and_the_change_past_the_cap_is_dead_lettered() {
    let env = Env::with_worker("batch-cap", 2, |_| {}).await;
    let a = arn("batch-cap");
    let cap = ecs_state_relay::relay::wire::MAX_BATCH;
    let events: Vec<Value> = (0..=cap)
        .map(|i| container(&a, &format!("c{i}"), "RUNNING"))
        .collect();
    env.publish(&events).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut dead = Vec::new();
    while dead.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing dead-lettered"
        );
        dead.extend(env.dead_letters().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.starts_with("batch_full: "), "{}", dead[0].1);
    let last: Value = serde_json::from_slice(&dead[0].0).unwrap();
    assert_eq!(
        last["containerName"],
        format!("c{cap}"),
        "the change past the cap"
    );
    env.publish(&[task(&a, "RUNNING")]).await;
    let calls = env.wait_calls(&a, 1).await;
    assert_eq!(
        calls[0].body["containers"].as_array().map(Vec::len),
        Some(cap)
    );
    env.cleanup().await;
}
