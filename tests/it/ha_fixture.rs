//! The Redis HA fixture itself (primary, replica, three Sentinels): a killed primary is failed
//! over to the replica with its acknowledged writes, and comes back as a replica of the new one.
//! Prints one line of timings.

use std::time::{Duration, Instant};

use crate::common::ha::RedisHa;

async fn conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(RedisHa::url(port))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("data node reachable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ha_fixture_fails_over_and_takes_the_old_primary_back_as_a_replica() {
    let t = Instant::now();
    let mut ha = RedisHa::start("relay-ha").await;
    let startup = t.elapsed();
    let [first, second] = ha.data_ports() else {
        panic!("one primary and one replica");
    };
    let (first, second) = (*first, *second);
    assert_eq!(ha.primary_port().await, first);
    assert_eq!(ha.sentinels().split(',').count(), 3);

    let key = format!("ha-fixture-{:08x}", rand::random::<u32>());
    let mut c = conn(first).await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("before failover")
        .query_async(&mut c)
        .await
        .expect("SET on the primary");
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(1000)
        .query_async(&mut c)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica acknowledged the write");
    drop(c);

    ha.kill(first);
    let t = Instant::now();
    let new = ha.wait_failover(first, Duration::from_secs(15)).await;
    let failover = t.elapsed();
    assert_eq!(new, second, "the replica was promoted");
    assert!(
        failover >= Duration::from_millis(1000),
        "failover before down-after-milliseconds: {failover:?}"
    );
    let mut c = conn(new).await;
    let got: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut c)
        .await
        .expect("GET on the new primary");
    assert_eq!(got.as_deref(), Some("before failover"));

    let t = Instant::now();
    ha.restart(first).await;
    ha.wait_replicas(1, Duration::from_secs(20)).await;
    let rejoin = t.elapsed();
    assert_eq!(ha.primary_port().await, new, "no second failover");
    let mut old = conn(first).await;
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut old)
        .await
        .expect("INFO on the old primary");
    assert!(info.contains("role:slave"), "{info}");
    assert!(info.contains(&format!("master_port:{new}")), "{info}");
    let got: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut old)
        .await
        .expect("GET on the old primary");
    assert_eq!(
        got.as_deref(),
        Some("before failover"),
        "resynced from the new primary"
    );

    println!(
        "redis ha: startup {:.1}s | failover {:.1}s | rejoin as replica {:.1}s",
        startup.as_secs_f64(),
        failover.as_secs_f64(),
        rejoin.as_secs_f64()
    );
}
