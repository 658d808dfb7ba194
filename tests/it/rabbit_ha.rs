//! RabbitMQ cluster: two workers and the agents' publisher are given every node of a 3-node
//! cluster (run by the test as child processes); the node leading the most shard queues is
//! SIGKILLed mid-stream. Nothing is lost or reordered, the workers keep running, and the node
//! rejoins its queues when it comes back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::rabbit_cluster::RabbitCluster;
use crate::common::*;
use ecs_state_relay::cli::publish::publish_lines;
use ecs_state_relay::relay::amqp;
use ecs_state_relay::relay::config::ConnConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_node_that_leads_most_shard_queues_loses_nothing() {
    let started = Instant::now();
    let mut cluster = RabbitCluster::start(3).await;
    let fixture = started.elapsed();
    let mut env = Env::new("rmq-cluster", 4).await;
    env.sim.set_latency(Duration::from_millis(5));
    let conn = ConnConfig {
        amqp_url: cluster.urls(),
        ..env.conn()
    };
    for _ in 0..2 {
        let mut cfg = env.config();
        cfg.conn.amqp_url = cluster.urls();
        env.start_worker(cfg).await;
    }
    let queues: Vec<String> = (0..env.shards)
        .map(|s| amqp::shard_queue(&env.exchange, s))
        .collect();
    for q in &queues {
        let (_, members) = cluster.queue_members(q).await;
        assert_eq!(
            members.len(),
            3,
            "{q} is not replicated on every node: {members:?}"
        );
    }

    // The node leading the most shard queues: its loss moves the most leaders.
    let mut leads: BTreeMap<String, usize> = BTreeMap::new();
    for q in &queues {
        if let (Some(leader), _) = cluster.queue_members(q).await {
            *leads.entry(leader).or_default() += 1;
        }
    }
    let (victim_name, led) = leads
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(n, c)| (n.clone(), *c))
        .expect("queue leaders");
    let victim = (0..3)
        .find(|i| cluster.node_name(*i) == victim_name)
        .expect("leader is a cluster node");
    let tasks: Vec<String> = (0..160).map(|i| arn(&format!("rmq-{i:03}"))).collect();
    let publisher = flowing_stream(&env, conn.clone(), &tasks, Duration::from_millis(300)).await;
    cluster.kill(victim);
    let killed = Instant::now();
    publisher
        .await
        .expect("the publisher carried on through the other nodes");
    eventually!(
        Duration::from_secs(90),
        "every task's changes arrived",
        audit(&env.sim.calls(), &tasks).0 == 0
    );
    let done = killed.elapsed();
    let (lost, disorder, duplicates) = audit(&env.sim.calls(), &tasks);
    println!(
        "node loss | events {} | lost {lost} | out of order {disorder} | duplicates {duplicates} | done {:.1}s after the kill | node led {led} of {} shard queues | cluster fixture {:.1}s",
        tasks.len() * 6,
        done.as_secs_f64(),
        queues.len(),
        fixture.as_secs_f64()
    );
    assert_eq!((lost, disorder), (0, 0));
    assert!(env.sim.stats().max_in_flight <= 10);

    // The workers kept running: a change published now still arrives.
    let late = arn("rmq-after-loss");
    publish_lines(&conn, task(&late, "RUNNING").to_string().as_bytes())
        .await
        .expect("publish through the remaining nodes");
    env.wait_calls(&late, 1).await;

    let back = Instant::now();
    cluster.restart(victim).await;
    for q in &queues {
        let q = q.clone();
        let name = victim_name.clone();
        let cluster = &cluster;
        eventually(
            Duration::from_secs(60),
            &format!("{q} has its replica on the restarted node"),
            || {
                let (q, name) = (q.clone(), name.clone());
                async move {
                    let (leader, members) = cluster.queue_members(&q).await;
                    leader.is_some() && members.len() == 3 && members.contains(&name)
                }
            },
        )
        .await;
    }
    println!(
        "node {victim_name} rejoined, every shard queue has 3 replicas again {:.1}s after the restart",
        back.elapsed().as_secs_f64()
    );
    env.cleanup().await;
}
