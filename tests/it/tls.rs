//! `amqps://` and `rediss://` with a private CA and client certificates, against a TLS listener
//! the test opens on the local RabbitMQ and a Redis it starts with TLS only.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use ecs_state_relay::relay::config::TlsFiles;
use ecs_state_relay::relay::store::Store;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sh(cmd: &str, args: &[&str], dir: &Path) {
    let ok = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        ok.map(|s| s.success()).unwrap_or(false),
        "{cmd} {args:?} failed"
    );
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate (PEM, X.509
/// v3 as rustls requires), made with the openssl command line.
pub(crate) fn make_certs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let script = r#"
        set -e
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
        printf 'extendedKeyUsage=clientAuth\n' > client.ext
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=relay-test-ca
        for n in server client; do
          openssl req -newkey rsa:2048 -nodes -keyout $n.key -out $n.csr -subj /CN=$n
          openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $n.crt -days 2 -extfile $n.ext
        done
        # The broker runs as its own user: let it read the test's files.
        chmod 644 ca.crt server.crt server.key
    "#;
    sh("bash", &["-c", script], dir);
}

fn client_tls(dir: &Path, with_cert: bool) -> TlsFiles {
    TlsFiles {
        ca: Some(dir.join("ca.crt")),
        cert: with_cert.then(|| dir.join("client.crt")),
        key: with_cert.then(|| dir.join("client.key")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_and_rediss_with_a_private_ca_and_client_certificates() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("relay-tls-{:08x}", rand::random::<u32>()));
    make_certs(&dir);
    let p = |f: &str| dir.join(f).display().to_string();

    // RabbitMQ: an extra TLS listener on the running broker that demands a client certificate.
    let amqps_port = free_port();
    let listener = format!(
        "rabbit_networking:start_ssl_listener({amqps_port}, [{{cacertfile,\"{}\"}},{{certfile,\"{}\"}},{{keyfile,\"{}\"}},{{verify,verify_peer}},{{fail_if_no_peer_cert,true}}], 1).",
        p("ca.crt"), p("server.crt"), p("server.key")
    );
    sh("rabbitmqctl", &["eval", &listener], &dir);
    // Redis: TLS only (no plain port), client certificates required.
    let rediss_port = free_port();
    sh(
        "redis-server",
        &[
            "--port",
            "0",
            "--tls-port",
            &rediss_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            &p("server.crt"),
            "--tls-key-file",
            &p("server.key"),
            "--tls-ca-cert-file",
            &p("ca.crt"),
            "--tls-auth-clients",
            "yes",
            "--save",
            "",
            "--daemonize",
            "yes",
            "--dir",
            &p(""),
            "--logfile",
            &p("redis.log"),
        ],
        &dir,
    );
    let amqps = format!("amqps://guest:guest@localhost:{amqps_port}/%2f");
    let rediss = format!("rediss://localhost:{rediss_port}/0");

    let mut env = Env::new("tls", 2).await;
    let mut store = None;
    for _ in 0..100 {
        match Store::connect(&rediss, &client_tls(&dir, true), &env.exchange).await {
            Ok(s) => {
                store = Some(s);
                break;
            }
            Err(e) => {
                eprintln!("rediss: {e:#}");
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    }
    env.store = store.expect("Redis over TLS with a client certificate");

    // Without the private CA the server is not trusted; without a client certificate the
    // servers refuse us. Both say so without leaking the URL's password.
    let no_ca = TlsFiles {
        ca: None,
        ..client_tls(&dir, true)
    };
    assert!(
        Store::connect(&rediss, &no_ca, "x").await.is_err(),
        "untrusted Redis accepted"
    );
    assert!(
        Store::connect(&rediss, &client_tls(&dir, false), "x")
            .await
            .is_err(),
        "Redis without client cert"
    );
    let refused =
        ecs_state_relay::relay::amqp::connect(&amqps, &client_tls(&dir, false), "test").await;
    let err = match refused {
        Ok(_) => panic!("RabbitMQ accepted a client without a certificate"),
        Err(e) => e.to_string(),
    };
    assert!(!err.contains("guest:guest"), "{err}");
    assert!(
        ecs_state_relay::relay::amqp::connect(&amqps, &no_ca, "test")
            .await
            .is_err(),
        "untrusted RabbitMQ accepted"
    );

    // A worker on amqps:// and rediss:// relays end to end.
    let mut cfg = env.config();
    cfg.conn.amqp_url = amqps.clone();
    cfg.conn.redis_url = rediss.clone();
    let files = (
        Some(dir.join("ca.crt")),
        Some(dir.join("client.crt")),
        Some(dir.join("client.key")),
    );
    (
        cfg.conn.amqp_ca_file,
        cfg.conn.amqp_cert_file,
        cfg.conn.amqp_key_file,
    ) = files.clone();
    (
        cfg.conn.redis_ca_file,
        cfg.conn.redis_cert_file,
        cfg.conn.redis_key_file,
    ) = files;
    env.start_worker(cfg).await;
    let a = arn("over-tls");
    env.publish(&[container(&a, "web", "RUNNING"), task(&a, "RUNNING")])
        .await;
    let calls = env.wait_calls(&a, 1).await;
    assert_eq!(
        calls[0].body["containers"].as_array().map(Vec::len),
        Some(1)
    );

    env.cleanup().await;
    sh(
        "rabbitmqctl",
        &[
            "eval",
            &format!("rabbit_networking:stop_tcp_listener({amqps_port})."),
        ],
        &dir,
    );
    let _ = Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &p("ca.crt"),
            "--cert",
            &p("client.crt"),
            "--key",
            &p("client.key"),
        ])
        .args(["-p", &rediss_port.to_string(), "shutdown", "nosave"])
        .output();
    let _ = std::fs::remove_dir_all(&dir);
}
