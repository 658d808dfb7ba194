//! Recovery after a Redis blip and a frozen permit holder: readiness tells the truth, ECS calls
//! resume at once after Redis is back, and a frozen worker blocks the fleet for at most one
//! permit lease. Each test prints its figures.

use std::time::{Duration, Instant};

use crate::common::*;
use ecs_state_relay::relay::config::WorkerConfig;
use ecs_state_relay::sim::{Action, Rule};

async fn readyz(port: u16) -> Option<u16> {
    let url = format!("http://127.0.0.1:{port}/readyz");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .ok()?;
    Some(client.get(url).send().await.ok()?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_not_ready_while_redis_is_cut_off_and_ready_again_right_after() {
    let mut env = Env::new("ready-redis", 2).await;
    let (proxy, mut cfg) = env.config_via_redis_proxy().await;
    let port = free_port();
    cfg.metrics_addr = format!("127.0.0.1:{port}");
    let _worker = env.spawn_process(&cfg);
    eventually!(
        Duration::from_secs(20),
        "ready",
        readyz(port).await == Some(200)
    );

    proxy.cut();
    let cut = Instant::now();
    eventually!(
        Duration::from_secs(5),
        "not ready within 5 s of the cut",
        readyz(port).await.is_some_and(|s| s != 200)
    );
    let noticed = cut.elapsed();
    // Long enough for the worker to notice everything it can: a 3 s outage.
    while cut.elapsed() < Duration::from_secs(3) {
        assert_ne!(
            readyz(port).await,
            Some(200),
            "ready while Redis is cut off"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.restore();
    let restored = Instant::now();
    eventually!(
        Duration::from_secs(2),
        "ready within 2 s of the restore",
        readyz(port).await == Some(200)
    );
    println!(
        "readyz: not ready {:.2}s after the cut, ready {:.2}s after the restore",
        noticed.as_secs_f64(),
        restored.elapsed().as_secs_f64()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecs_calls_resume_within_two_seconds_of_redis_coming_back() {
    let mut env = Env::new("resume-redis", 2).await;
    let (proxy, mut cfg) = env.config_via_redis_proxy().await;
    // Leases long enough to outlast the 3 s outage: what is measured is the permits.
    cfg.lease_ms = 6_000;
    cfg.permit_lease_ms = 8_000;
    env.start_worker(cfg).await;
    // Ten calls hold every permit when Redis goes; ten more tasks wait for one.
    env.sim.add_rule(Rule {
        key: "*".into(),
        action: Action::Hold,
        times: 10,
    });
    let tasks: Vec<String> = (0..20).map(|i| arn(&format!("blip-{i:02}"))).collect();
    env.publish(&tasks.iter().map(|t| task(t, "RUNNING")).collect::<Vec<_>>())
        .await;
    eventually!(
        Duration::from_secs(20),
        "every permit busy",
        env.sim.stats().held == 10
    );
    proxy.cut();
    let cut = Instant::now();
    // The held calls time out meanwhile: their permits cannot be given back to Redis.
    eventually!(
        Duration::from_secs(10),
        "the calls in flight ended",
        env.sim.stats().in_flight == 0
    );
    tokio::time::sleep_until((cut + Duration::from_secs(3)).into()).await; // the outage
    let calls_before = env.sim.calls().len();
    proxy.restore();
    let restored = Instant::now();
    eventually!(
        Duration::from_secs(10),
        "an ECS call after the restore",
        env.sim.calls().len() > calls_before
    );
    let resumed = restored.elapsed();
    println!(
        "ECS calls resumed {:.2}s after Redis came back",
        resumed.as_secs_f64()
    );
    assert!(resumed < Duration::from_secs(2), "{resumed:?}");
    eventually!(
        Duration::from_secs(30),
        "every task sent",
        all_sent(&env, &tasks)
    );
    assert!(env.sim.stats().max_in_flight <= 10);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_holding_every_permit_blocks_the_fleet_for_at_most_one_permit_lease() {
    let mut env = Env::new("frozen-holder", 2).await;
    // The documented defaults: call timeout 5 s, permit lease 8 s, shard lease 15 s.
    let defaults = WorkerConfig::default();
    let mk = |env: &mut Env| {
        let mut c = env.config();
        c.lease_ms = defaults.lease_ms;
        c.call_timeout_ms = defaults.call_timeout_ms;
        c.permit_lease_ms = defaults.permit_lease_ms;
        c
    };
    let (c1, c2) = (mk(&mut env), mk(&mut env));
    let (id1, id2) = (c1.worker_id.clone().unwrap(), c2.worker_id.clone().unwrap());
    let w1 = env.spawn_process(&c1);
    let _w2 = env.spawn_process(&c2);
    eventually(Duration::from_secs(30), "one shard each", || async {
        let o0 = env.store.lease_owner(0).await.ok().flatten();
        let o1 = env.store.lease_owner(1).await.ok().flatten();
        matches!((o0, o1), (Some(a), Some(b)) if a != b)
    })
    .await;
    // Learn which shard (so which worker) each task lands on.
    let tasks: Vec<String> = (0..60).map(|i| arn(&format!("frozen-{i:02}"))).collect();
    env.publish(&tasks.iter().map(|t| task(t, "RUNNING")).collect::<Vec<_>>())
        .await;
    let mut on = (Vec::new(), Vec::new());
    for t in &tasks {
        env.wait_calls(t, 1).await;
        let client = env.calls_for(t)[0].client.clone();
        if client == id1 {
            on.0.push(t.clone());
        } else if client == id2 {
            on.1.push(t.clone());
        }
    }
    assert!(
        on.0.len() >= 10 && !on.1.is_empty(),
        "{} / {}",
        on.0.len(),
        on.1.len()
    );

    // Worker 1 takes every permit with slow calls, and freezes with them.
    env.sim.set_latency(Duration::from_millis(1_500));
    env.publish(
        &on.0[..10]
            .iter()
            .map(|t| task(t, "STOPPED"))
            .collect::<Vec<_>>(),
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "worker 1 holds every permit",
        || async {
            env.sim
                .calls()
                .iter()
                .filter(|c| c.client == id1 && c.outcome.is_none())
                .count()
                == 10
        },
    )
    .await;
    signal(&w1, "STOP");
    let frozen = Instant::now();
    env.sim.reset_max_in_flight();
    env.publish(&on.1.iter().map(|t| task(t, "STOPPED")).collect::<Vec<_>>())
        .await;
    let first_stop = || {
        env.sim
            .calls()
            .iter()
            .find(|c| c.client == id2 && c.body["status"] == "STOPPED")
            .map(|c| c.received_at_ms)
    };
    // The documented bound: a frozen holder blocks the fleet for at most ~10 s by default.
    let bound = Duration::from_secs(10);
    let deadline = frozen + bound;
    while first_stop().is_none() {
        assert!(
            env.sim.stats().in_flight <= 10,
            "more than the limit in flight"
        );
        assert!(
            Instant::now() < deadline,
            "worker 2 made no call within {bound:?} of the freeze"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let blocked = frozen.elapsed();
    println!(
        "frozen holder: the other worker called ECS {:.1}s after the freeze (permit lease {} ms)",
        blocked.as_secs_f64(),
        defaults.permit_lease_ms
    );
    signal(&w1, "CONT");
    eventually(Duration::from_secs(30), "every change sent", || async {
        tasks.iter().all(|t| {
            let s = statuses(&env.calls_for(t));
            !on.1.contains(t) && !on.0[..10].contains(t) || s.contains(&"STOPPED".to_string())
        })
    })
    .await;
    assert!(env.sim.stats().max_in_flight <= 10);
    env.cleanup().await;
}

/// Nagle's algorithm on a shared connection holds a request written while an earlier one is
/// unacknowledged until that ACK comes (up to the 40 ms delayed-ACK timer): the redis crate
/// leaves it on unless told. Every connection the relay opens to Redis must have it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_to_redis_has_nagle_off() {
    use std::os::fd::{AsRawFd, BorrowedFd};
    let store = ecs_state_relay::relay::store::Store::connect(
        &redis_url(),
        &Default::default(),
        &format!("test.nodelay.{:08x}", rand::random::<u32>()),
    )
    .await
    .expect("redis reachable");
    // Several steps at once open the shared connections.
    let reads = (0..8).map(|shard| store.pending_keys(shard));
    for read in futures_util::future::join_all(reads).await {
        read.expect("redis answers");
    }
    let port = redis_addr()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("port in the Redis address");
    let mut checked = 0;
    for entry in std::fs::read_dir("/proc/self/fd").expect("fd list") {
        let Ok(fd) = entry
            .expect("fd")
            .file_name()
            .to_string_lossy()
            .parse::<i32>()
        else {
            continue;
        };
        // SAFETY: only borrowed for the two reads below, while this test holds every
        // connection open (the store lives to the end of the test).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
        if peer.is_some_and(|p| p.port() == port) {
            assert!(
                sock.tcp_nodelay().expect("a TCP socket"),
                "connection fd {} to Redis has Nagle on",
                fd.as_raw_fd()
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no connection to Redis found");
    drop(store);
}

/// A Redis request given up half-way (a timeout, a cancelled select) must not leave Redis
/// looking stalled: the worker would then start no ECS call again, silently. A paused private
/// Redis makes a PING outlast its 50 ms timeout; once Redis answers, calls may start again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_request_given_up_half_way_does_not_keep_calls_from_starting() {
    let private = RedisServer::start().await;
    let store = ecs_state_relay::relay::store::Store::connect(
        &private.url(),
        &Default::default(),
        "test.given-up",
    )
    .await
    .expect("the private Redis answers");
    let mut admin = redis::Client::open(private.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1000)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .expect("CLIENT PAUSE");
    let mut conn = store.conn().await.expect("a shared connection");
    let ping = redis::cmd("PING");
    let given_up = tokio::time::timeout(
        Duration::from_millis(50),
        ping.query_async::<String>(&mut conn),
    )
    .await;
    assert!(given_up.is_err(), "the PING waits for the pause");
    eventually!(
        Duration::from_secs(10),
        "Redis counts as reachable once it answers",
        store.ping().await.is_ok() && store.link().reachable()
    );
}
