//! The broker beneath per-task order. Workers order a task's changes by their arrival, so a
//! shard queue (quorum, single active consumer) must hand its messages over in publish order,
//! repeats apart, also while nodes are lost. Here one queue of a 3-node cluster (child
//! processes) is fed by a publisher with one unconfirmed message at a time (so the queue holds
//! them in publish order) and consumed the way a worker consumes a shard (a window of
//! deliveries, a batch stored, then one ack for it), while the node leading the queue is
//! SIGKILLed and restarted, and then the consumer's own node. Prints one line of figures.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};

use crate::common::rabbit_cluster::RabbitCluster;
use ecs_state_relay::relay::amqp;

/// Messages published in all; paced so that the faults fall in the middle of the stream.
const MESSAGES: u32 = 4000;
const PACE: Duration = Duration::from_millis(10);
/// The consumer's window, as a worker's shard prefetch.
const PREFETCH: u16 = 32;
/// What storing a batch takes (a Redis round trip under load): the window stays full.
const STORE: Duration = Duration::from_millis(25);

/// Declares the queue with a shard queue's arguments (those workers declare).
async fn declare(cluster: &RabbitCluster, queue: &str) {
    let c = amqp::connect(&cluster.amqp_url(0), &Default::default(), "order declare")
        .await
        .expect("connect to node 0");
    let ch = c.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        amqp::shard_queue_args(queue),
    )
    .await
    .expect("declare the queue");
    amqp::close_connection(&c, "declared").await;
}

/// Publishes 0..MESSAGES with one unconfirmed message at a time; a message nacked or whose
/// connection was lost goes out again (through the next node) before the next one.
fn publisher(
    urls: String,
    queue: String,
    published: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut node = 1;
        let mut ch: Option<(lapin::Connection, lapin::Channel)> = None;
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut seq = 0u32;
        while seq < MESSAGES {
            assert!(Instant::now() < deadline, "publishing took over 300 s");
            if ch.is_none() {
                let opened = async {
                    let (c, n) =
                        amqp::connect_any(&urls, node, &Default::default(), "order publisher")
                            .await?;
                    let ch = c.create_channel().await?;
                    ch.confirm_select(ConfirmSelectOptions::default()).await?;
                    Ok::<_, anyhow::Error>((c, ch, n))
                };
                match tokio::time::timeout(Duration::from_secs(10), opened).await {
                    Ok(Ok((c, chan, n))) => {
                        node = n;
                        ch = Some((c, chan));
                    }
                    _ => {
                        node += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let (_, chan) = ch.as_ref().expect("opened above");
            let sent = async {
                chan.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    seq.to_string().as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await
            };
            match tokio::time::timeout(Duration::from_secs(10), sent).await {
                Ok(Ok(Confirmation::Ack(_))) => {
                    seq += 1;
                    published.store(seq as usize, Ordering::SeqCst);
                    tokio::time::sleep(PACE).await;
                }
                // Nacked (no leader yet), or the connection lost: the same message again
                // through another node. (A RabbitMQ 3.10 channel whose first publish found the
                // queue's first member down nacks every publish after it: a new channel it is.)
                other => {
                    eprintln!("publisher: message {seq} via node {node}: {other:?}");
                    if let Some((c, _)) = ch.take() {
                        amqp::close_connection(&c, "lost").await;
                    }
                    node += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if let Some((c, _)) = ch.take() {
            amqp::close_connection(&c, "done").await;
        }
    })
}

/// What the consumer saw: every delivery's number in arrival order, and the node it reads from.
#[derive(Default)]
struct Seen {
    arrivals: Mutex<Vec<u32>>,
    node: AtomicUsize,
    done: AtomicBool,
}

/// Consumes like a shard: takes what the window holds, "stores" it, acks it with one multiple
/// ack; on any channel or connection error it reconnects through the next node.
fn consumer(urls: String, queue: String, seen: Arc<Seen>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut node = 0;
        while !seen.done.load(Ordering::SeqCst) {
            let started = async {
                let (c, n) =
                    amqp::connect_any(&urls, node, &Default::default(), "order consumer").await?;
                let ch = c.create_channel().await?;
                ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
                let stream = ch
                    .basic_consume(
                        queue.as_str().into(),
                        "order".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, anyhow::Error>((c, ch, stream, n))
            };
            let Ok(Ok((c, ch, mut stream, n))) =
                tokio::time::timeout(Duration::from_secs(10), started).await
            else {
                node += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            node = n;
            seen.node.store(n, Ordering::SeqCst);
            while !seen.done.load(Ordering::SeqCst) {
                let first =
                    match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
                        Err(_) => continue,
                        Ok(Some(Ok(d))) => d,
                        Ok(_) => break,
                    };
                let mut batch = vec![first];
                while batch.len() < usize::from(PREFETCH) {
                    match stream.next().now_or_never() {
                        Some(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
                tokio::time::sleep(STORE).await;
                seen.arrivals.lock().expect("arrivals").extend(
                    batch
                        .iter()
                        .filter_map(|d| std::str::from_utf8(&d.data).ok()?.parse::<u32>().ok()),
                );
                let last = batch.last().expect("one at least").delivery_tag;
                if ch
                    .basic_ack(last, BasicAckOptions { multiple: true })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            amqp::close_connection(&c, "consumer restarts").await;
            node += 1;
        }
    })
}

/// Numbers first seen after a higher one, and repeats.
fn audit(arrivals: &[u32]) -> (Vec<(u32, u32)>, usize, usize) {
    let mut first = HashSet::new();
    let mut highest: Option<u32> = None;
    let mut late = Vec::new();
    let mut repeats = 0;
    for &x in arrivals {
        if !first.insert(x) {
            repeats += 1;
            continue;
        }
        match highest {
            Some(h) if x < h => late.push((x, h)),
            _ => highest = Some(x),
        }
    }
    (late, repeats, first.len())
}

/// Waits until the consumer has seen `more` new numbers; past the deadline, fails with what
/// the publisher and the consumer were doing.
async fn progress(seen: &Seen, published: &AtomicUsize, more: usize, within: Duration) {
    let arrived = || seen.arrivals.lock().expect("arrivals").len();
    let from = arrived();
    let deadline = Instant::now() + within;
    while arrived() < from + more {
        assert!(
            Instant::now() < deadline,
            "the consumer took {} of {more} deliveries in {within:?} (on node {}; {} published)",
            arrived() - from,
            seen.node.load(Ordering::SeqCst),
            published.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_queue_delivers_in_publish_order_while_its_nodes_are_lost() {
    let mut cluster = RabbitCluster::start(3).await;
    let queue = format!("order-{:08x}", rand::random::<u32>());
    declare(&cluster, &queue).await;
    let seen = Arc::new(Seen::default());
    let published = Arc::new(AtomicUsize::new(0));
    let pub_task = publisher(cluster.urls(), queue.clone(), published.clone());
    let con_task = consumer(cluster.urls(), queue.clone(), seen.clone());
    eventually!(
        Duration::from_secs(60),
        "the stream is under way",
        published.load(Ordering::SeqCst) >= 200
    );

    // The leader's node, three times; then the consumer's node (if it does not lead).
    let mut killed = Vec::new();
    for round in 0..4 {
        let victim = if round < 3 {
            let leader = cluster.queue_status(&queue).await.leader.expect("a leader");
            (0..3)
                .find(|&i| cluster.node_name(i) == leader)
                .expect("the leader is a node")
        } else {
            seen.node.load(Ordering::SeqCst)
        };
        eprintln!(
            "round {round}: killing node {victim}; consumer on node {}, {} arrivals, {} published",
            seen.node.load(Ordering::SeqCst),
            seen.arrivals.lock().expect("arrivals").len(),
            published.load(Ordering::SeqCst)
        );
        cluster.kill(victim);
        killed.push(victim);
        progress(&seen, &published, 100, Duration::from_secs(60)).await;
        cluster.restart(victim).await;
        eventually!(
            Duration::from_secs(60),
            "the queue has 3 online members again",
            cluster.queue_status(&queue).await.online.len() == 3
        );
        progress(&seen, &published, 50, Duration::from_secs(60)).await;
    }
    pub_task.await.expect("the publisher ended");
    eventually!(
        Duration::from_secs(60),
        "every message arrived",
        audit(&seen.arrivals.lock().expect("arrivals")).2 == MESSAGES as usize
    );
    seen.done.store(true, Ordering::SeqCst);
    con_task.await.expect("the consumer ended");
    let (late, repeats, distinct) = audit(&seen.arrivals.lock().expect("arrivals"));
    println!(
        "shard queue order | messages {MESSAGES} | nodes killed {killed:?} (3 leaders, then the consumer's) | arrived {distinct} | repeats {repeats} | first seen after a higher one {} {:?}",
        late.len(),
        &late[..late.len().min(10)]
    );
    assert!(late.is_empty(), "the queue reordered: {late:?}");
}
