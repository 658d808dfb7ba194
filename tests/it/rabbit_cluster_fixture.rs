//! The RabbitMQ cluster fixture itself (three nodes on loopback): a quorum queue keeps a
//! confirmed message when its leader's node is killed, a new leader takes over, and the killed
//! node rejoins as a member when restarted. Prints one line of timings.

use std::time::{Duration, Instant};

use crate::common::rabbit_cluster::{QueueStatus, RabbitCluster};
use ecs_state_relay::relay::amqp;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

/// Polls the queue's status until `cond` holds; panics with the last status past `within`.
async fn wait_queue(
    cluster: &RabbitCluster,
    queue: &str,
    within: Duration,
    what: &str,
    cond: impl Fn(&QueueStatus) -> bool,
) -> QueueStatus {
    let deadline = Instant::now() + within;
    loop {
        let status = cluster.queue_status(queue).await;
        if cond(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}; last status {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One basic.get on a fresh connection to node `i`, bounded; `None` on any error or timeout.
/// Not acknowledged: the message goes back to the queue when the connection closes (so an
/// attempt that times out after the broker delivered cannot lose it).
async fn get_one(cluster: &RabbitCluster, i: usize, queue: &str) -> Option<Vec<u8>> {
    let attempt = async {
        let c = amqp::connect(
            &cluster.amqp_url(i),
            &Default::default(),
            "cluster fixture reader",
        )
        .await
        .ok()?;
        let got = async {
            let ch = c.create_channel().await.ok()?;
            ch.basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .ok()?
                .map(|m| m.delivery.data.clone())
        }
        .await;
        amqp::close_connection(&c, "done").await;
        got
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .flatten()
}

fn mib(rss: &[(usize, u64)]) -> String {
    rss.iter()
        .map(|(i, kib)| format!("node{i} {} MiB", kib / 1024))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rabbitmq_cluster_fixture_runs_three_nodes_and_survives_a_node_loss() {
    let total = Instant::now();
    let mut cluster = RabbitCluster::start(3).await;
    let startup = total.elapsed();
    assert_eq!(cluster.running(), vec![0, 1, 2]);
    assert_eq!(cluster.urls().split(',').count(), 3);
    let rss = cluster.rss_kib();
    let mut names: Vec<String> = (0..3).map(|i| cluster.node_name(i)).collect();
    names.sort();

    let queue = format!("relaytest.qq.{:08x}", rand::random::<u32>());
    let body = b"kept through a node loss".to_vec();
    let c = amqp::connect(
        &cluster.amqp_url(0),
        &Default::default(),
        "cluster fixture publisher",
    )
    .await
    .expect("node 0 takes AMQP connections");
    let ch = amqp::confirm_channel(&c).await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare a quorum queue");
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "publish not acked");
    assert!(
        confirm.take_message().is_none(),
        "the message was returned unroutable"
    );
    amqp::close_connection(&c, "published").await;

    let before = wait_queue(
        &cluster,
        &queue,
        Duration::from_secs(30),
        "a leader and three online members",
        |s| s.leader.is_some() && s.members == names && s.online == names,
    )
    .await;
    let (leader, members) = cluster.queue_members(&queue).await;
    assert_eq!(members, names, "queue_members lists every node");
    let leader = leader.expect("a leader");
    assert_eq!(
        Some(&leader),
        before.leader.as_ref(),
        "no leader change yet"
    );
    let victim = cluster
        .index_of(&leader)
        .expect("the leader is a cluster node");

    cluster.kill(victim);
    let t = Instant::now();
    assert_eq!(cluster.running().len(), 2);
    let other = cluster.running()[0];
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        if let Some(got) = get_one(&cluster, other, &queue).await {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "the message is not readable from {} within 60s",
            cluster.node_name(other)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let readable = t.elapsed();
    assert_eq!(
        got, body,
        "the confirmed message survived its leader's node"
    );

    let after = wait_queue(
        &cluster,
        &queue,
        Duration::from_secs(60),
        "a new leader on a surviving node",
        |s| s.leader.as_ref().is_some_and(|l| *l != leader),
    )
    .await;
    let failover = t.elapsed();
    assert_eq!(after.members, names, "the killed node stays a member");
    assert!(
        !after.online.contains(&leader),
        "the killed node is not online: {after:?}"
    );

    let t = Instant::now();
    cluster.restart(victim).await;
    let restarted = t.elapsed();
    assert_eq!(cluster.running(), vec![0, 1, 2]);
    let back = wait_queue(
        &cluster,
        &queue,
        Duration::from_secs(60),
        "the restarted node online as a member again",
        |s| s.members == names && s.online == names,
    )
    .await;
    let rejoin = t.elapsed();
    assert!(back.leader.is_some(), "a leader after the rejoin: {back:?}");
    let rss_end = cluster.rss_kib();
    let again = get_one(&cluster, victim, &queue).await;
    assert_eq!(
        again.as_deref(),
        Some(body.as_slice()),
        "the message, unacknowledged, is back in the queue and readable from the restarted node"
    );

    println!(
        "rabbit cluster: startup {:.1}s | rss after start {} | killed leader node{victim} | \
         message readable from another node {:.2}s | new leader reported {:.1}s | \
         restart back in the cluster {:.1}s | queue member online {:.1}s | rss at end {} | \
         total {:.1}s",
        startup.as_secs_f64(),
        mib(&rss),
        readable.as_secs_f64(),
        failover.as_secs_f64(),
        restarted.as_secs_f64(),
        rejoin.as_secs_f64(),
        mib(&rss_end),
        total.elapsed().as_secs_f64()
    );
}
