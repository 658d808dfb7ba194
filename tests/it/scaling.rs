//! Several worker processes sharing the shards: balance, `status`, and churn (join, SIGKILL,
//! SIGTERM, SIGSTOP past the lease) under a steady stream, without loss or reordering.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::*;
use ecs_state_relay::sim::CallRecord;
use serde_json::Value;

async fn owners(env: &Env) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for s in 0..env.shards {
        out.push(env.store.lease_owner(s).await.ok().flatten());
    }
    out
}

fn count(owners: &[Option<String>], id: &str) -> usize {
    owners.iter().filter(|o| o.as_deref() == Some(id)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_twelve_shards_each_own_four_and_status_agrees_with_the_broker() {
    let mut env = Env::new("balance", 12).await;
    let cfgs: Vec<_> = (0..3).map(|_| env.config()).collect();
    let _procs: Vec<Proc> = cfgs.iter().map(|c| env.spawn_process(c)).collect();
    let ids: Vec<String> = cfgs.iter().map(|c| c.worker_id.clone().unwrap()).collect();
    eventually(
        Duration::from_secs(30),
        "each worker owns 4 ± 1 shards",
        || async {
            let o = owners(&env).await;
            o.iter().all(Option::is_some) && ids.iter().all(|id| (3..=5).contains(&count(&o, id)))
        },
    )
    .await;

    // `status --json` agrees with the leases, and with the consumers the broker reports.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: Value =
            serde_json::from_str(&env.run_cli(&["status", "--json", "--shards", "12"]))
                .expect("status JSON");
        let mut agree = status["live_workers"].as_array().map(Vec::len) == Some(3);
        for shard in status["shards"].as_array().expect("shards") {
            let owner = shard["owner"].as_str().unwrap_or_default().to_string();
            let queue = ecs_state_relay::relay::amqp::shard_queue(
                &env.exchange,
                shard["shard"].as_u64().unwrap() as u16,
            );
            // The management API names each consumer by its tag, "<worker>#<shard>".
            let q: Value = http
                .get(format!("http://127.0.0.1:15672/api/queues/%2f/{queue}"))
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .expect("management API")
                .json()
                .await
                .expect("queue JSON");
            let tags: Vec<String> = q["consumer_details"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|d| d["consumer_tag"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let expected = format!("{owner}#{}", shard["shard"]);
            agree &= shard["consumers"] == 1 && tags == vec![expected] && ids.contains(&owner);
        }
        if agree {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never agreed with the broker: {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_join_kill_term_and_pause_lose_nothing_and_reorder_nothing() {
    /// How soon after SIGCONT a call already past its send-time check reaches ECS, at most.
    const RESUMING_MS: u64 = 500;
    let mut env = Env::new("churn", 12).await;
    env.sim.set_latency(Duration::from_millis(5));
    let mut cfg = || {
        let mut c = env.config();
        c.lease_ms = 2_000;
        c.call_timeout_ms = 600; // fits the short lease (see WorkerConfig::validate)
        c.permit_lease_ms = 1_600;
        c
    };
    let (ca, cb, cc, cd) = (cfg(), cfg(), cfg(), cfg());
    let id = |c: &ecs_state_relay::relay::config::WorkerConfig| c.worker_id.clone().unwrap();
    let (a, b, c, d) = (id(&ca), id(&cb), id(&cc), id(&cd));
    let pa = env.spawn_process(&ca);
    let mut pb = env.spawn_process(&cb);
    let pc = env.spawn_process(&cc);
    eventually(Duration::from_secs(30), "3 workers balanced", || async {
        let o = owners(&env).await;
        [&a, &b, &c].iter().all(|w| count(&o, w) == 4)
    })
    .await;

    // A steady stream: every 200 ms, 8 tasks start (containers + RUNNING) and the previous 8 stop.
    let tasks: Vec<String> = (0..360).map(|i| arn(&format!("churn-{i:03}"))).collect();
    let publisher = stream(
        env.conn(),
        lifecycle_rounds(&tasks, 8),
        Duration::from_millis(200),
    );

    eventually!(
        Duration::from_secs(20),
        "stream flowing",
        env.sim.stats().ok >= 40
    );
    let _pd = env.spawn_process(&cd);
    eventually!(
        Duration::from_secs(20),
        "the 4th worker takes its share",
        count(&owners(&env).await, &d) >= 2
    );
    signal(&pa, "KILL");
    eventually(
        Duration::from_secs(20),
        "the killed worker's leases lapse and move",
        || async {
            let o = owners(&env).await;
            count(&o, &a) == 0 && o.iter().all(Option::is_some)
        },
    )
    .await;
    signal(&pb, "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = pb.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGTERMed worker did not exit");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(status.success(), "SIGTERM exits 0");
    eventually!(
        Duration::from_secs(20),
        "C holds shards before the pause",
        count(&owners(&env).await, &c) >= 1
    );
    signal(&pc, "STOP");
    eventually(
        Duration::from_secs(20),
        "the paused worker's leases lapse and move",
        || async {
            let o = owners(&env).await;
            count(&o, &c) == 0 && o.iter().all(Option::is_some)
        },
    )
    .await;
    let t_cont = now_ms();
    signal(&pc, "CONT");
    publisher.await.expect("publisher");

    eventually!(
        Duration::from_secs(90),
        "every task's submissions arrived",
        audit(&env.sim.calls(), &tasks).0 == 0
    );
    let calls = env.sim.calls();
    let (lost, disorder, dups) = audit(&calls, &tasks);
    let stats = env.sim.stats();
    // The paused worker made no ECS call between resuming and taking a lease anew (its Redis
    // writes with the old token are refused by the fencing check in every script).
    eventually!(
        Duration::from_secs(20),
        "C rejoins and takes shards again",
        count(&owners(&env).await, &c) >= 1
    );
    let mut mine = BTreeSet::new();
    let mut conn = env.store.conn().await.unwrap();
    for s in 0..env.shards {
        let (owner, since): (Option<String>, Option<u64>) = redis::pipe()
            .cmd("HGET")
            .arg(env.store.shard(s).lease())
            .arg("owner")
            .cmd("HGET")
            .arg(env.store.shard(s).lease())
            .arg("since")
            .query_async(&mut conn)
            .await
            .unwrap();
        if owner.as_deref() == Some(c.as_str()) {
            mine.insert(since.unwrap_or(0));
        }
    }
    let reacquired = *mine.first().expect("C owns shards");
    // A call whose send-time lease check passed just before the pause reaches ECS as the
    // worker resumes: the one window the relay cannot close (ECS cannot fence; see
    // docs/reliability.md). Any later call would have had to pass that check after the lease
    // lapsed, which it cannot. Seen once in a full test run on 2 busy cores.
    let in_the_window = |r: &CallRecord| r.received_at_ms <= t_cont + RESUMING_MS;
    let (window_calls, stale_calls) = calls
        .iter()
        .filter(|r| r.client == c && r.received_at_ms > t_cont && r.received_at_ms < reacquired)
        .fold((0, 0), |(w, s), r| {
            if in_the_window(r) {
                (w + 1, s)
            } else {
                (w, s + 1)
            }
        });
    println!(
        "churn: events {} calls {} lost {lost} out-of-order {disorder} duplicates {dups} max-in-flight {} \
         calls by the paused worker between resume and new lease {stale_calls} \
         (and {window_calls} within {RESUMING_MS} ms of the resume)",
        tasks.len() * 6,
        calls.len(),
        stats.max_in_flight
    );
    assert_eq!((lost, disorder), (0, 0));
    assert!(
        stats.max_in_flight <= 10,
        "limit exceeded: {}",
        stats.max_in_flight
    );
    assert_eq!(
        stale_calls, 0,
        "the paused worker called ECS after losing its lease"
    );
    drop(pc);
    env.cleanup().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
