//! The binary's operator-facing surface: `publish` exit codes and the worker's metrics listener.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn publish_cmd(env: &Env, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ecs-state-relay"))
        .arg("publish")
        .env("RELAY_AMQP_URL", amqp_url())
        .env("RELAY_EXCHANGE", &env.exchange)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("publish starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    child.wait_with_output().expect("publish ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_exits_non_zero_naming_the_line_the_broker_returned() {
    // No worker yet: the exchange has no bound queue, so a mandatory publish is returned.
    let env = Env::new("publish-returned", 2).await;
    let a = arn("unroutable");
    let out = publish_cmd(&env, &format!("\n{}\n", task(&a, "RUNNING")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {stderr}");
    assert!(
        stderr.contains("line 2") && stderr.contains("returned"),
        "{stderr}"
    );
    let bad = publish_cmd(&env, "{\"no\":\"routing key\"}\n");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("line 1"),
        "{stderr}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_succeeds_and_the_worker_serves_metrics_health_and_readiness() {
    let mut env = Env::new("metrics", 2).await;
    let (_worker, port) = env.spawn_with_metrics().await;
    let a = arn("metrics");
    let lines = [
        container(&a, "web", "RUNNING").to_string(),
        task(&a, "RUNNING").to_string(),
    ];
    let out = publish_cmd(&env, &lines.join("\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.publish_raw(&a, b"not json").await;
    env.wait_calls(&a, 1).await;

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    for path in ["/healthz", "/readyz"] {
        let answer = http.get(format!("{base}{path}")).send().await.unwrap();
        assert!(answer.status().is_success(), "{path}: {}", answer.status());
    }
    let wanted = [
        "relay_events_consumed_total{type=\"container\"} 1",
        "relay_events_consumed_total{type=\"task\"} 1",
        "relay_events_rejected_total{reason=\"not_json\"} 1",
        "relay_ecs_calls_total{operation=\"SubmitTaskStateChange\",outcome=\"ok\"} 1",
        "relay_permits_in_use ",
        "relay_permits_limit 10",
        "relay_shards_owned 2",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|m| !text.contains(m))
            .collect();
        if missing.is_empty() {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics missing {missing:?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        body.contains("relay_ecs_call_duration_seconds_bucket"),
        "histograms have buckets"
    );
    env.cleanup().await;
}
