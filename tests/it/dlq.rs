//! `dlq list|replay`: listing leaves the dead-letter queue as it was; replay sends messages
//! back through the exchange (by reason, if asked) and removes only what the broker took.

use std::time::Duration;

use crate::common::*;
use ecs_state_relay::cli::dlq;
use ecs_state_relay::relay::amqp;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

/// A valid event dead-lettered as if its task's batch had been full at the time.
async fn dead_letter_valid_event(env: &Env, arn: &str) {
    dead_letter_valid_event_with(env, arn, FieldTable::default()).await
}

/// [`dead_letter_valid_event`] with more headers.
async fn dead_letter_valid_event_with(env: &Env, arn: &str, mut headers: FieldTable) {
    let c = amqp::connect(&amqp_url(), &Default::default(), "test dlq")
        .await
        .expect("amqp");
    let ch = amqp::confirm_channel(&c).await.expect("channel");
    headers.insert(
        amqp::REJECT_HEADER.into(),
        AMQPValue::LongString("batch_full: the task's batch holds 1000 changes".into()),
    );
    let body = task(arn, "RUNNING").to_string();
    let confirm = ch
        .basic_publish(
            amqp::dlx(&env.exchange).as_str().into(),
            arn.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    let _ = c.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_leaves_the_queue_alone_and_replay_sends_back_what_was_asked() {
    let env = Env::with_worker("dlq", 2, |_| {}).await;
    let bad = arn("bad-input");
    let good = arn("was-batch-full");
    env.publish_raw(&bad, b"not json").await;
    dead_letter_valid_event(&env, &good).await;

    let conn = env.conn();
    eventually!(
        Duration::from_secs(10),
        "two dead letters",
        dlq::list(&conn, 100).await.map(|l| l.len()).unwrap_or(0) == 2
    );
    let listed = dlq::list(&conn, 100).await.expect("list");
    let reasons: Vec<&str> = listed.iter().map(|m| m.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("not_json")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("batch_full")),
        "{reasons:?}"
    );
    // Listed messages return to the queue as the listing channel closes (asynchronously).
    eventually!(
        Duration::from_secs(10),
        "listing removed nothing",
        dlq::list(&conn, 100).await.map(|l| l.len()).unwrap_or(0) == 2
    );

    // The CLI prints the same as JSON lines.
    let lines: Vec<serde_json::Value> = env
        .run_cli(&["dlq", "list", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().any(|l| l["routing_key"] == good.as_str()));

    // Only the batch_full one is replayed; it reaches ECS; the other stays.
    eventually!(
        Duration::from_secs(10),
        "both back after the CLI listing",
        dlq::list(&conn, 100).await.map(|l| l.len()).unwrap_or(0) == 2
    );
    let (replayed, left) = dlq::replay(&conn, 100, Some("batch_full"))
        .await
        .expect("replay");
    assert_eq!((replayed, left), (1, 1));
    env.wait_calls(&good, 1).await;
    eventually(
        Duration::from_secs(10),
        "only the bad input left",
        || async {
            dlq::list(&conn, 100)
                .await
                .map(|l| l.len() == 1 && l[0].reason.starts_with("not_json"))
                .unwrap_or(false)
        },
    )
    .await;

    // Replaying still-bad input sends it through the worker again, which rejects it again:
    // nothing is lost either way.
    let (replayed, _) = dlq::replay(&conn, 100, None).await.expect("replay all");
    assert_eq!(replayed, 1);
    eventually(Duration::from_secs(10), "rejected again", || async {
        dlq::list(&conn, 100)
            .await
            .map(|l| l.len() == 1 && l[0].reason.starts_with("not_json"))
            .unwrap_or(false)
    })
    .await;
    env.cleanup().await;
}

/// A replayed message carries a fresh publish time: the queue stage of its change does not
/// count its time in the dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_message_is_published_afresh() {
    use futures_util::StreamExt;

    let env = Env::new("dlq-fresh", 2).await;
    // No worker: the replayed message stays in its shard queue to be looked at.
    let c = env.declared().await;
    let ch = amqp::confirm_channel(&c).await.expect("channel");
    let t = arn("stale-publish-time");
    let an_hour_ago = ecs_state_relay::relay::wire::now_ms() - 3_600_000;
    let mut headers = FieldTable::default();
    headers.insert(
        amqp::PUBLISHED_MS_HEADER.into(),
        AMQPValue::LongLongInt(an_hour_ago),
    );
    dead_letter_valid_event_with(&env, &t, headers).await;
    let conn = env.conn();
    eventually!(
        Duration::from_secs(10),
        "dead-lettered",
        dlq::list(&conn, 10).await.map(|l| l.len()).unwrap_or(0) == 1
    );
    let replay_started = ecs_state_relay::relay::wire::now_ms();
    let (replayed, _) = dlq::replay(&conn, 10, None).await.expect("replay");
    assert_eq!(replayed, 1);
    let mut deliveries = Box::pin(shard_deliveries(&ch, &env).await);
    let (_, delivery) = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
        .await
        .expect("the replayed message arrives")
        .expect("a delivery");
    let delivery = delivery.expect("no error");
    let published = amqp::published_ms(&delivery.properties).expect("a publish time");
    assert!(
        published >= replay_started,
        "publish time {published} is from before the replay ({replay_started})"
    );
    let _ = c.close(200, "done".into()).await;
    env.cleanup().await;
}
