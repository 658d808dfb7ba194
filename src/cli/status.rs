//! `status`: who owns which shard, how much work waits where, permits and live workers.

use clap::Args;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;

use crate::relay::adaptive;
use crate::relay::amqp;
use crate::relay::config::ConnConfig;
use crate::relay::redis_link::Replication;
use crate::relay::schedule::Backlog;
use crate::relay::semaphore::Semaphore;
use crate::relay::store::{Store, StoreLost};
use crate::relay::worker::{ReadyReport, READY_TOP};

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: ConnConfig,
    #[arg(long, env = "RELAY_SHARDS", default_value_t = 16)]
    pub shards: u16,
    #[arg(long, env = "RELAY_CONCURRENCY_LIMIT", default_value_t = 10)]
    pub concurrency_limit: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Delete the store-lost record (after dealing with a Redis that lost the relay's state:
    /// docs/operations.md, "Store lost"); the workers' `relay_store_lost` falls to 0 at their
    /// next heartbeat. Then shows the status.
    #[arg(long)]
    pub clear_store_lost: bool,
}

#[derive(Debug, Serialize)]
pub struct ShardStatus {
    pub shard: u16,
    pub owner: Option<String>,
    pub lease_age_ms: Option<u64>,
    /// Tasks with something in their outbox (being sent or retried).
    pub pending_tasks: u64,
    /// Tasks with container/agent changes waiting for a task change or a drain tick.
    pub batched_tasks: u64,
    /// Rejected messages kept in Redis until the dead-letter queue takes them.
    pub held_dead_letters: u64,
    /// Messages ready in the shard queue (not yet delivered).
    pub queue_depth: u32,
    pub consumers: u32,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub exchange: String,
    /// The Redis primary (through Sentinel when configured).
    pub redis_primary: String,
    pub redis: Replication,
    pub shards: Vec<ShardStatus>,
    pub permits_in_use: u64,
    pub permits_limit: u32,
    /// The fleet's effective limit: below `permits_limit` while ECS throttles (adaptive).
    pub effective_limit: u32,
    pub live_workers: Vec<String>,
    /// The producer rules each live worker runs (`off`, or the mode and the ACL file's hash);
    /// "?" for one that has not recorded them yet.
    pub producer_rules: std::collections::BTreeMap<String, String>,
    /// Whether every live worker runs the same producer rules.
    pub producer_rules_agree: bool,
    /// Clusters with a change ready on some live worker (a cluster on two workers counts once
    /// per worker), as the workers last reported (every 2 s).
    pub ready_clusters: usize,
    /// The longest a ready change has waited on any live worker, in ms.
    pub ready_oldest_ms: u64,
    /// The clusters with the most ready changes over the live workers, most first.
    pub busiest_clusters: Vec<(String, usize)>,
    /// The RabbitMQ node each live worker is connected to (as it last reported).
    pub amqp_nodes: std::collections::BTreeMap<String, String>,
    /// Nodes of `RELAY_AMQP_URL` that do not accept a connection (TCP) from here.
    pub amqp_nodes_down: Vec<String>,
    /// Sentinels of `RELAY_REDIS_SENTINELS` that do not accept a connection (TCP) from here.
    pub sentinels_down: Vec<String>,
    /// Set when a worker found that Redis lost the relay's state, until an operator clears it.
    pub store_lost: Option<StoreLost>,
}

/// How long `status` waits for a broker node or Sentinel to accept a connection.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The `host:port`s of `addrs` that do not accept a TCP connection within [`PROBE_WAIT`].
async fn unreachable(addrs: Vec<String>) -> Vec<String> {
    let probes = addrs.into_iter().map(|addr| async move {
        let connected =
            tokio::time::timeout(PROBE_WAIT, tokio::net::TcpStream::connect(addr.as_str())).await;
        (!matches!(connected, Ok(Ok(_)))).then_some(addr)
    });
    futures_util::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

pub async fn collect(args: &StatusArgs) -> anyhow::Result<Status> {
    let mut conn = args.conn.clone();
    conn.resolve_secrets()?;
    let args = &StatusArgs {
        conn,
        shards: args.shards,
        concurrency_limit: args.concurrency_limit,
        json: args.json,
        clear_store_lost: args.clear_store_lost,
    };
    let store = Store::open(&args.conn).await?;
    if args.clear_store_lost {
        let cleared = store.clear_store_lost().await?;
        eprintln!(
            "{}",
            if cleared {
                "store-lost record cleared"
            } else {
                "no store-lost record to clear"
            }
        );
    }
    let permits = Semaphore::new(
        store.clone(),
        "status",
        args.concurrency_limit,
        1,
        std::time::Duration::ZERO,
    );
    let connection = amqp::connect(
        &args.conn.amqp_url,
        &args.conn.amqp_tls(),
        "ecs-state-relay status",
    )
    .await?;
    let mut shards = Vec::with_capacity(usize::from(args.shards));
    for shard in 0..args.shards {
        let s = store.shard_summary(shard).await?;
        // A passive declare reads depth and consumers; a missing queue closes only its channel.
        let ch = connection.create_channel().await?;
        let queue = ch
            .queue_declare(
                amqp::shard_queue(&args.conn.exchange, shard)
                    .as_str()
                    .into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("shard queue {shard}: {e} (is RELAY_SHARDS right?)"))?;
        let _ = ch.close(200, "status".into()).await;
        shards.push(ShardStatus {
            shard,
            owner: s.owner,
            lease_age_ms: s.lease_age_ms,
            pending_tasks: s.pending,
            batched_tasks: s.batched,
            held_dead_letters: s.held,
            queue_depth: queue.message_count(),
            consumers: queue.consumer_count(),
        });
    }
    let _ = connection.close(200, "status".into()).await;
    let redis = store.link().replication().await?;
    let live_workers = store.live_workers().await?;
    let recorded = store.producer_rules().await?;
    let producer_rules: std::collections::BTreeMap<String, String> = live_workers
        .iter()
        .map(|w| {
            (
                w.clone(),
                recorded.get(w).cloned().unwrap_or_else(|| "?".into()),
            )
        })
        .collect();
    let distinct: std::collections::BTreeSet<&String> = producer_rules.values().collect();
    let reports = store.ready_reports().await?;
    let mut amqp_nodes = std::collections::BTreeMap::new();
    let mut busiest = Backlog::default();
    let (mut ready_clusters, mut ready_oldest_ms) = (0, 0);
    for worker in &live_workers {
        let Some(report) = reports.get(worker) else {
            continue;
        };
        let Ok(report) = serde_json::from_str::<ReadyReport>(report) else {
            continue;
        };
        if let Some(node) = &report.amqp_node {
            amqp_nodes.insert(worker.clone(), node.clone());
        }
        ready_clusters += report.clusters;
        ready_oldest_ms = ready_oldest_ms.max(report.oldest_ms);
        busiest.merge(Backlog {
            flows: report.top,
            oldest: std::time::Duration::ZERO,
        });
    }
    busiest.flows.truncate(READY_TOP);
    let urls = &args.conn.amqp_url;
    let nodes = (0..crate::relay::config::url_list(urls).len())
        .map(|i| amqp::node_label(urls, i))
        .filter(|n| !n.is_empty())
        .collect();
    let amqp_nodes_down = unreachable(nodes).await;
    let sentinels_down = unreachable(args.conn.sentinels()).await;
    Ok(Status {
        exchange: args.conn.exchange.clone(),
        redis_primary: store.link().primary(),
        redis,
        shards,
        permits_in_use: permits.in_use().await?,
        permits_limit: args.concurrency_limit,
        effective_limit: adaptive::effective_limit(&store)
            .await?
            .map_or(args.concurrency_limit, |l| l.min(args.concurrency_limit)),
        producer_rules_agree: distinct.len() <= 1 && !distinct.iter().any(|r| *r == "?"),
        producer_rules,
        live_workers,
        ready_clusters,
        ready_oldest_ms,
        busiest_clusters: busiest.flows,
        amqp_nodes,
        amqp_nodes_down,
        sentinels_down,
        store_lost: store.store_lost().await?,
    })
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status = collect(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    if let Some(lost) = &status.store_lost {
        println!(
            "STORE LOST: Redis lost the relay's state (seen by {} at {}; epoch {} found {}). Changes stored before then will not reach ECS; see docs/operations.md, \"Store lost\", then run `status --clear-store-lost`",
            lost.seen_by,
            super::inspect::rfc3339(i64::try_from(lost.at_ms).unwrap_or(i64::MAX)),
            lost.known_epoch,
            lost.found_epoch
        );
    }
    println!(
        "exchange {}   workers {} live   permits {}/{} in use   effective limit {}{}",
        status.exchange,
        status.live_workers.len(),
        status.permits_in_use,
        status.permits_limit,
        status.effective_limit,
        if status.effective_limit < status.permits_limit {
            " (lowered: ECS throttles)"
        } else {
            ""
        }
    );
    println!(
        "redis {} ({}), {} replica(s){}",
        status.redis_primary,
        status.redis.role,
        status.redis.replicas.len(),
        status
            .redis
            .replicas
            .iter()
            .map(|r| format!(
                "; {} {} lag {} B / {} s",
                r.addr, r.state, r.lag_bytes, r.lag_s
            ))
            .collect::<String>()
    );
    println!(
        "{:>5}  {:<40} {:>9} {:>8} {:>8} {:>7} {:>9} {:>5}",
        "SHARD", "OWNER", "LEASE AGE", "PENDING", "BATCHED", "QUEUED", "CONSUMERS", "HELD"
    );
    for s in &status.shards {
        let age = s
            .lease_age_ms
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:>5}  {:<40} {:>9} {:>8} {:>8} {:>7} {:>9} {:>5}",
            s.shard,
            s.owner.as_deref().unwrap_or("(none)"),
            age,
            s.pending_tasks,
            s.batched_tasks,
            s.queue_depth,
            s.consumers,
            s.held_dead_letters
        );
    }
    let held: u64 = status.shards.iter().map(|s| s.held_dead_letters).sum();
    if held > 0 {
        println!(
            "{held} dead letter(s) held in Redis: the dead-letter queue does not take them (see `dlq list`)"
        );
    }
    println!("live workers: {}", status.live_workers.join(", "));
    for (worker, node) in &status.amqp_nodes {
        println!("  {worker} on RabbitMQ node {node}");
    }
    if !status.amqp_nodes_down.is_empty() {
        println!(
            "RabbitMQ nodes NOT ANSWERING: {}",
            status.amqp_nodes_down.join(", ")
        );
    }
    if !status.sentinels_down.is_empty() {
        println!(
            "Sentinels NOT ANSWERING: {}",
            status.sentinels_down.join(", ")
        );
    }
    match status.producer_rules.values().next() {
        Some(rules) if status.producer_rules_agree => {
            println!("producer rules: {rules} on every live worker");
        }
        Some(_) => println!(
            "producer rules DIFFER between workers (an ACL edit not yet everywhere?): {}",
            super::pairs(&status.producer_rules)
        ),
        None => {}
    }
    if status.busiest_clusters.is_empty() {
        println!("ready work: none waiting");
    } else {
        let busiest: Vec<String> = status
            .busiest_clusters
            .iter()
            .map(|(cluster, n)| format!("{cluster} ({n} ready)"))
            .collect();
        println!(
            "ready work: {} cluster(s), oldest waiting {:.1}s; most: {}",
            status.ready_clusters,
            status.ready_oldest_ms as f64 / 1000.0,
            busiest.join(", ")
        );
    }
    Ok(())
}
