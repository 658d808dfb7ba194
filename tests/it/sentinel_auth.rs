//! Sentinels that require a password (`requirepass`), in front of a primary that requires one
//! too: the relay reaches both with RELAY_REDIS_SENTINEL_PASSWORD_FILE and the password of
//! RELAY_REDIS_URL. A private primary and Sentinel on free loopback ports, never the shared
//! Redis.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ecs_state_relay::relay::config::ConnConfig;
use ecs_state_relay::relay::store::Store;

use crate::common::*;

const DATA_PASSWORD: &str = "data-secret";
const SENTINEL_PASSWORD: &str = "sentinel-secret";

struct Secured {
    children: Vec<Child>,
    dir: std::path::PathBuf,
    primary: u16,
    sentinel: u16,
}

impl Drop for Secured {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A quiet `redis-server` child.
fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts")
}

async fn answers(port: u16, password: &str) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    matches!(
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .as_deref(),
        Ok("PONG")
    )
}

/// A primary with `requirepass` and one Sentinel (quorum 1) with `requirepass` and the
/// primary's password as `auth-pass`.
async fn secured(master: &str) -> Secured {
    let dir = std::env::temp_dir().join(format!("sentinel-auth-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ports = free_ports(2);
    let (primary, sentinel) = (ports[0], ports[1]);
    let data = spawn(
        Command::new("redis-server")
            .args(["--port", &primary.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--requirepass", DATA_PASSWORD])
            .arg("--dir")
            .arg(&dir),
    );
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\n\
             requirepass {SENTINEL_PASSWORD}\n\
             sentinel resolve-hostnames no\n\
             sentinel monitor {master} 127.0.0.1 {primary} 1\n\
             sentinel auth-pass {master} {DATA_PASSWORD}\n",
            dir = dir.display()
        ),
    )
    .expect("sentinel config");
    let sentinel_child = spawn(Command::new("redis-server").arg(&conf).arg("--sentinel"));
    let s = Secured {
        children: vec![data, sentinel_child],
        dir,
        primary,
        sentinel,
    };
    eventually(Duration::from_secs(10), "the primary answers", || {
        answers(primary, DATA_PASSWORD)
    })
    .await;
    eventually(Duration::from_secs(10), "the Sentinel answers", || {
        answers(sentinel, SENTINEL_PASSWORD)
    })
    .await;
    s
}

fn conn(
    env: &Env,
    s: &Secured,
    master: &str,
    sentinel_password: Option<&std::path::Path>,
) -> ConnConfig {
    ConnConfig {
        amqp_url: amqp_url(),
        redis_url: format!("redis://:{DATA_PASSWORD}@127.0.0.1:{}/0", s.primary),
        exchange: env.exchange.clone(),
        redis_sentinels: format!("127.0.0.1:{}", s.sentinel),
        redis_sentinel_master: master.to_string(),
        redis_sentinel_password_file: sentinel_password.map(std::path::Path::to_path_buf),
        ..ConnConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_and_a_primary_that_require_passwords_are_reached_with_them() {
    let env = Env::new("sentinel-auth", 1).await;
    let master = "relay-auth";
    let s = secured(master).await;
    let password_file = s.dir.join("sentinel-password");
    std::fs::write(&password_file, format!("{SENTINEL_PASSWORD}\n")).expect("password file");

    // Without the Sentinel's password the relay cannot learn the primary, and says so.
    let refused = Store::open(&conn(&env, &s, master, None)).await;
    let err = format!(
        "{:#}",
        refused
            .err()
            .expect("refused without the Sentinel password")
    );
    println!("without RELAY_REDIS_SENTINEL_PASSWORD_FILE: {err}");
    assert!(
        !err.contains(SENTINEL_PASSWORD) && !err.contains(DATA_PASSWORD),
        "{err}"
    );

    // With it, the primary is found and answers (with the URL's password).
    let store = Store::open(&conn(&env, &s, master, Some(&password_file)))
        .await
        .expect("reached through the Sentinel");
    assert_eq!(store.link().primary(), format!("127.0.0.1:{}", s.primary));
    let mut c = store.conn().await.expect("a connection to the primary");
    let pong: String = redis::cmd("PING").query_async(&mut c).await.expect("PING");
    assert_eq!(pong, "PONG");

    // `status` reaches the same way and finds every Sentinel answering.
    let cfg = conn(&env, &s, master, Some(&password_file));
    let broker = env.declared().await;
    let _ = broker.close(200, "declared".into()).await;
    let json = run_ok(
        Command::new(env!("CARGO_BIN_EXE_ecs-state-relay"))
            .args(["status", "--shards", "1", "--json"])
            .envs(cfg.to_env()),
    );
    let json: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(json["redis_primary"], format!("127.0.0.1:{}", s.primary));
    assert_eq!(json["sentinels_down"].as_array().map(Vec::len), Some(0));
    drop(s);
    env.cleanup().await;
}

/// Sentinels and a primary that speak TLS only, with a private CA (the certificates name
/// 127.0.0.1: Sentinels announce IP addresses): RELAY_REDIS_SENTINEL_TLS=on reaches the
/// Sentinel with the Redis TLS files, and `rediss://` the primary it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_over_tls_with_a_private_ca_are_reached() {
    let env = Env::new("sentinel-tls", 1).await;
    let master = "relay-tls";
    let dir = std::env::temp_dir().join(format!("sentinel-tls-{:08x}", rand::random::<u32>()));
    crate::tls::make_certs(&dir);
    let p = |f: &str| dir.join(f).display().to_string();
    let ports = free_ports(2);
    let (primary, sentinel) = (ports[0], ports[1]);
    let tls_args = |port: u16| {
        vec![
            "--port".to_string(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--tls-cert-file".into(),
            p("server.crt"),
            "--tls-key-file".into(),
            p("server.key"),
            "--tls-ca-cert-file".into(),
            p("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
            "--tls-replication".into(),
            "yes".into(),
        ]
    };
    let mut children = Vec::new();
    children.push(spawn(
        Command::new("redis-server").args(tls_args(primary)).args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &p(""),
        ]),
    ));
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "daemonize no\ndir {dir}\nsentinel resolve-hostnames no\n\
             sentinel monitor {master} 127.0.0.1 {primary} 1\n",
            dir = dir.display()
        ),
    )
    .expect("sentinel config");
    children.push(spawn(
        Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .args(tls_args(sentinel)),
    ));
    let secured = Secured {
        children,
        dir: dir.clone(),
        primary,
        sentinel,
    };
    let cfg = ConnConfig {
        amqp_url: amqp_url(),
        redis_url: "rediss://127.0.0.1:1/0".into(),
        exchange: env.exchange.clone(),
        redis_sentinels: format!("127.0.0.1:{sentinel}"),
        redis_sentinel_master: master.to_string(),
        redis_sentinel_tls: true,
        redis_ca_file: Some(dir.join("ca.crt")),
        ..ConnConfig::default()
    };
    let mut reached = None;
    let mut last = String::new();
    for _ in 0..100 {
        match Store::open(&cfg).await {
            Ok(store) => {
                reached = Some(store);
                break;
            }
            Err(e) => {
                last = format!("{e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let store = reached.unwrap_or_else(|| panic!("not reached over TLS: {last}"));
    assert_eq!(store.link().primary(), format!("127.0.0.1:{primary}"));
    // Without TLS to the Sentinel, it is not reached.
    let plain = ConnConfig {
        redis_sentinel_tls: false,
        ..cfg.clone()
    };
    assert!(
        Store::open(&plain).await.is_err(),
        "a TLS-only Sentinel answered plain text"
    );
    drop(secured);
    env.cleanup().await;
}
