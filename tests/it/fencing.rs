//! Fencing at the store: once a shard's lease has passed to another worker, every write of
//! the former owner (intake, completion, drain, sweep) is refused and changes nothing. Also
//! the drain's paging, which runs under the same lease checks.

use std::time::Duration;

use crate::common::*;
use ecs_state_relay::relay::store::{Fence, Intake, Store, StoreError};
use ecs_state_relay::relay::wire;

/// Takes shard 0's lease for `owner`; `what` says why it must be free.
async fn take(store: &Store, owner: &str, lease_ms: u64, what: &str) -> Fence {
    store
        .lease_acquire(0, owner, lease_ms)
        .await
        .unwrap()
        .expect(what)
        .fence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_cannot_write() {
    let env = Env::new("fencing", 1).await;
    let store = &env.store;
    let a = arn("fenced");
    let event =
        |status: &str| wire::decode(task(&a, status).to_string().as_bytes(), &a).expect("valid");

    let old = take(store, "old-owner", 200, "free lease").await;
    assert_eq!(
        store
            .intake(0, &old, &[event("RUNNING")], 60)
            .await
            .unwrap(),
        vec![Intake::Enqueued]
    );
    // The old owner pauses past its lease; a new owner takes the shard with a larger token.
    eventually!(
        Duration::from_secs(5),
        "lease lapses",
        store.lease_owner(0).await.unwrap().is_none()
    );
    let new = take(store, "new-owner", 30_000, "lease taken over").await;
    assert!(new.token > old.token);

    let before = store.queued(1, &a).await.unwrap();
    let (head, _) = store.peek(0, &a).await.unwrap();
    let head = head.expect("outbox head");
    let head_prefix = serde_json::from_str::<wire::OutboxEntry>(&head)
        .unwrap()
        .head_prefix();
    let refused = store.intake(0, &old, &[event("STOPPED")], 60).await;
    assert!(matches!(refused, Err(StoreError::Fenced)), "{refused:?}");
    let complete = store
        .complete_prefix(0, &old, &a, &head_prefix, &[("s".into(), 3)], "{}", 60)
        .await;
    assert!(matches!(complete, Err(StoreError::Fenced)));
    assert!(matches!(
        store.drain(0, &old, 60).await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        store.sweep(0, &old, 60).await,
        Err(StoreError::Fenced)
    ));
    assert!(
        !store.lease_renew(0, &old, 30_000).await.unwrap(),
        "cannot renew a lost lease"
    );
    assert!(
        !store.lease_release(0, &old).await.unwrap(),
        "cannot release another's lease"
    );

    assert_eq!(
        store.queued(1, &a).await.unwrap(),
        before,
        "nothing changed"
    );
    assert_eq!(
        store
            .find_state(1, &a)
            .await
            .unwrap()
            .map(|(_, s)| s.get("s")),
        Some(0),
        "not marked sent"
    );
    assert_eq!(
        store.lease_owner(0).await.unwrap().as_deref(),
        Some("new-owner")
    );
    // The new owner goes on where the old one stopped.
    assert_eq!(
        store
            .complete_prefix(0, &new, &a, &head_prefix, &[("s".into(), 3)], "{}", 60)
            .await
            .unwrap()
            .left,
        Some(0)
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_whose_lease_was_taken_stores_nothing_and_counts_it() {
    let metrics = ecs_state_relay::relay::metrics::handle();
    let env = Env::with_worker("fenced-worker", 1, |cfg| {
        // Renewals are rare, so the intake, not the heartbeat, is first to meet the new owner.
        cfg.lease_ms = 60_000;
    })
    .await;
    let lease = env.store.shard(0).lease();
    let mut conn = env.store.conn().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&lease)
        .arg("owner")
        .arg("another-worker")
        .arg("token")
        .arg(u64::MAX.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let a = arn("after-takeover");
    env.publish(&[task(&a, "RUNNING")]).await;
    eventually(
        Duration::from_secs(10),
        "the refused intake counted",
        || async {
            metrics
                .render()
                .lines()
                .any(|l| l.starts_with("relay_fenced_total{op=\"intake\"}"))
        },
    )
    .await;
    assert_eq!(
        env.store.queued(1, &a).await.unwrap(),
        (0, 0),
        "nothing stored for the fenced worker"
    );
    assert!(env.calls_for(&a).is_empty(), "no ECS call");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_drain_covers_more_batched_tasks_than_a_page_in_several_short_scripts() {
    // The drain script takes the batched set a page (500) at a time so a big shard never
    // blocks Redis for long; the caller's loop must still reach every task.
    let env = Env::new("drain-pages", 1).await;
    let store = &env.store;
    let fence = take(store, "drainer", 30_000, "free lease").await;
    let tasks: Vec<String> = (0..1_234).map(|i| arn(&format!("paged-{i}"))).collect();
    let events: Vec<wire::Event> = tasks
        .iter()
        .map(|t| {
            let mut c = container(t, "web", "RUNNING");
            c["taskStatus"] = "RUNNING".into();
            wire::decode(c.to_string().as_bytes(), t).expect("valid")
        })
        .collect();
    for chunk in events.chunks(200) {
        store.intake(0, &fence, chunk, 600).await.unwrap();
    }
    let mut woken = store.drain(0, &fence, 600).await.unwrap();
    woken.sort();
    let mut expected = tasks.clone();
    expected.sort();
    assert_eq!(woken, expected, "every batched task drained once");
    assert!(
        store.drain(0, &fence, 600).await.unwrap().is_empty(),
        "nothing left to drain"
    );
    env.cleanup().await;
}
