//! Credentials: RabbitMQ and Redis ACL users with passwords from files (Kubernetes secrets),
//! and no secret in any log line or error.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

struct Users {
    name: String,
    dir: std::path::PathBuf,
}

impl Users {
    /// A RabbitMQ user and a Redis ACL user, both `name`, password in `<dir>/password`.
    async fn create(password: &str) -> Users {
        let name = format!("relay-{:08x}", rand::random::<u32>());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("password"), format!("{password}\n")).unwrap();
        std::fs::write(dir.join("wrong"), "wrong-Secret-4711\n").unwrap();
        let ok = |args: &[&str]| {
            Command::new("rabbitmqctl")
                .args(args)
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success()
        };
        assert!(ok(&["add_user", &name, password]));
        assert!(ok(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]));
        let store =
            ecs_state_relay::relay::store::Store::connect(&redis_url(), &Default::default(), "acl")
                .await
                .unwrap();
        let mut conn = store.conn().await.unwrap();
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&name)
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~relay:*")
            .arg("&*")
            .arg("+@all")
            .query_async(&mut conn)
            .await
            .unwrap();
        Users { name, dir }
    }

    async fn remove(self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .stdout(Stdio::null())
            .status();
        let store =
            ecs_state_relay::relay::store::Store::connect(&redis_url(), &Default::default(), "acl")
                .await
                .unwrap();
        let mut conn = store.conn().await.unwrap();
        let _: Result<(), _> = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.name)
            .query_async(&mut conn)
            .await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_from_files_work_and_never_show_in_logs_or_errors() {
    let secret = "Tr0ub4dor-3-secret";
    let users = Users::create(secret).await;
    let mut env = Env::new("credentials", 2).await;
    let mut cfg = env.config();
    cfg.conn.amqp_url = format!("amqp://{}@{}/%2f", users.name, amqp_addr());
    cfg.conn.redis_url = format!("redis://{}@{}/0", users.name, redis_addr());
    cfg.conn.amqp_password_file = Some(users.dir.join("password"));
    cfg.conn.redis_password_file = Some(users.dir.join("password"));
    let good = cfg.clone();
    // A worker process with those credentials works end to end, and logs no secret.
    let password_files = |amqp: &str, redis: &str| {
        [
            ("RELAY_AMQP_PASSWORD_FILE", amqp),
            ("RELAY_REDIS_PASSWORD_FILE", redis),
        ]
        .map(|(k, f)| (k.to_string(), users.dir.join(f).display().to_string()))
    };
    let envs = {
        let mut envs = env.process_env(&good);
        envs.extend(password_files("password", "password"));
        envs
    };
    let run = |envs: &[(String, String)]| {
        Command::new(env!("CARGO_BIN_EXE_ecs-state-relay"))
            .arg("worker")
            .envs(envs.iter().cloned())
            .env("RUST_LOG", "info,ecs_state_relay=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let worker = Proc(run(&envs));
    env.wait_all_shards_owned().await;
    let a = arn("with-credentials");
    env.publish(&[task(&a, "RUNNING")]).await;
    env.wait_calls(&a, 1).await;
    let logs = stop_and_read(worker).await;
    assert!(!logs.contains(secret), "secret in the logs");

    // Wrong Redis password: the worker refuses to start, and says so without the secret.
    let with_files = |amqp: &str, redis: &str| {
        let mut envs = env.process_env(&good);
        envs.extend(password_files(amqp, redis));
        envs
    };
    let wrong = with_files("password", "wrong");
    let out = run(&wrong).wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(text.contains("redis://") && text.contains("***"), "{text}");
    assert!(
        !text.contains("wrong-Secret-4711") && !text.contains(secret),
        "{text}"
    );

    // Wrong RabbitMQ password: the worker keeps retrying (credentials may be rotated) and logs
    // the failure with the URL masked.
    let wrong = with_files("wrong", "password");
    let mut proc = Proc(run(&wrong));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert!(
            proc.0.try_wait().unwrap().is_none(),
            "the worker gave up instead of retrying"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = stop_and_read(proc).await;
    assert!(
        text.contains("cannot connect to RabbitMQ") && text.contains("***"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-Secret-4711") && !text.contains(secret),
        "{text}"
    );
    env.cleanup().await;
    users.remove().await;
}

/// SIGTERM, then everything the process wrote.
async fn stop_and_read(mut p: Proc) -> String {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(p.0.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut out = String::new();
    use std::io::Read;
    if let Some(mut e) = p.0.stderr.take() {
        let _ = e.read_to_string(&mut out);
    }
    if let Some(mut o) = p.0.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    out
}

#[test]
fn every_password_of_a_broker_url_list_is_masked_in_errors() {
    // Three nodes, none answering: the error names each one, with no password.
    let secrets = ["node-one-secret", "node-two-secret", "node-three-secret"];
    let urls: Vec<String> = secrets
        .iter()
        .map(|s| {
            let port = free_port();
            format!("amqp://relay:{s}@127.0.0.1:{port}/%2f")
        })
        .collect();
    for command in ["status", "publish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ecs-state-relay"))
            .arg(command)
            .env("RELAY_AMQP_URL", urls.join(","))
            .env("RELAY_REDIS_URL", redis_url())
            .stdin(Stdio::null())
            .output()
            .expect("runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{command}: {text}");
        for s in secrets {
            assert!(!text.contains(s), "{command} shows a password: {text}");
        }
        assert!(text.matches("relay:***@").count() >= 3, "{command}: {text}");
    }
}
