//! Observability: every metric the relay documents shows up in a live worker's `/metrics` and
//! moves; the alert rules pass their promtool unit tests; every query in the dashboards and
//! rules parses and names only metrics that exist (ours, or the broker's rabbitmq_prometheus).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use ecs_state_relay::relay::metrics as m;
use ecs_state_relay::sim::{Action, Rule};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Metrics that only appear once their fault happens: tests/faults.rs asserts the AMQP and
/// Redis error and reconnect counters move during its outages, tests/fencing.rs that
/// `relay_fenced_total` moves when a worker's lease is taken.
const FAULT_ONLY: &[&str] = &[
    m::FENCED,
    m::REDIS_ERRORS,
    m::AMQP_ERRORS,
    m::AMQP_RECONNECTS,
    m::REDIS_RECONNECTS,
    // Shown moving by tests/it/redis_ha.rs.
    m::REDIS_FAILOVERS,
    m::REDIS_WAIT_SHORTFALLS,
    // Shown moving by tests/it/edges.rs (a broken dead-letter route).
    m::DEAD_LETTERS_HELD,
    m::DEAD_LETTER_HOLD_FULL,
    // Shown moving by tests/it/producers.rs (audit mode, an edited ACL).
    m::PRODUCER_WOULD_REFUSE,
    m::PRODUCER_ACL_RELOADS,
    // Shown moving by tests/it/redis_ha.rs (a replica that stops confirming writes).
    m::REDIS_GATE_HELD,
    m::REDIS_GATE_CLOSED_MS,
];

fn promtool() -> &'static str {
    assert!(
        Command::new("promtool").arg("--version").output().is_ok(),
        "promtool not found: scripts/services.sh installs it (Debian package prometheus)"
    );
    "promtool"
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    let dir = Path::new(ROOT).join("deploy/prometheus");
    run(Command::new(promtool())
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir));
    run(Command::new(promtool())
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir));
}

/// Every PromQL expression of the dashboards and the alert rules, with Grafana's variables
/// replaced by a plain range.
fn queries() -> Vec<String> {
    let mut out = Vec::new();
    let dashboards = std::fs::read_dir(Path::new(ROOT).join("dashboards")).expect("dashboards/");
    for entry in dashboards {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("dashboard");
            let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
            for panel in dash["panels"].as_array().expect("panels") {
                for target in panel["targets"].as_array().expect("targets") {
                    let expr = target["expr"].as_str().expect("expr");
                    out.push(expr.replace("$__rate_interval", "5m"));
                }
            }
        }
    }
    let rules = std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml");
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let mut expr = rest.trim().trim_start_matches(">-").trim().to_string();
        // A folded block continues while lines are indented deeper than `expr:`.
        while let Some(next) = lines.peek() {
            if next.len() - next.trim_start().len() > indent && !next.trim().is_empty() {
                expr.push(' ');
                expr.push_str(next.trim());
                lines.next();
            } else {
                break;
            }
        }
        out.push(expr);
    }
    out
}

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// Metric names in a PromQL expression: identifiers not followed by `(` and not label names,
/// keywords or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let (mut i, mut in_braces, mut in_string) = (0, false, false);
    while i < bytes.len() {
        let c = bytes[i] as char;
        if in_string {
            in_string = c != '"';
            i += 1;
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => in_braces = true,
            '}' => in_braces = false,
            '[' => {
                while i < bytes.len() && bytes[i] != b']' {
                    i += 1;
                }
            }
            _ if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let word = &expr[start..i];
                let after = expr[i..].trim_start();
                if ["by", "without", "on", "ignoring"].contains(&word) {
                    // A grouping list of label names follows: skip it.
                    while i < bytes.len() && bytes[i] != b')' {
                        i += 1;
                    }
                    continue;
                }
                let keyword =
                    AGGREGATIONS.contains(&word) || ["and", "or", "unless"].contains(&word);
                if !in_braces && !keyword && !after.starts_with('(') {
                    names.insert(word.to_string());
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_queries_parse_and_name_only_existing_metrics() {
    let queries = queries();
    assert!(queries.len() >= 20, "found {} queries", queries.len());

    // promtool parses rule expressions: check each query as a recording rule.
    let mut rules = String::from("groups:\n  - name: queries\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: query_{i}\n        expr: {}\n",
            serde_json::to_string(q).expect("quoted")
        ));
    }
    let file = std::env::temp_dir().join(format!("relay-queries-{}.yml", std::process::id()));
    std::fs::write(&file, rules).expect("write rules");
    run(Command::new(promtool()).args(["check", "rules"]).arg(&file));
    let _ = std::fs::remove_file(&file);

    // The broker's names come from its own exporter (rabbitmq_prometheus on port 15692).
    let broker = reqwest::get("http://127.0.0.1:15692/metrics")
        .await
        .expect("rabbitmq_prometheus answers (scripts/services.sh enables it)")
        .text()
        .await
        .expect("broker metrics");
    let histogram = |n: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .is_some_and(|base| m::ALL.contains(&base))
    };
    for q in &queries {
        for name in metric_names(q) {
            let known = if name.starts_with("relay_") {
                m::ALL.contains(&name.as_str()) || histogram(&name)
            } else if name.starts_with("rabbitmq_") {
                broker.lines().any(|l| {
                    l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{"))
                })
            } else {
                name == "up"
            };
            assert!(known, "{name} (in `{q}`) is not a metric that exists");
        }
    }
}

#[test]
fn every_metric_is_documented() {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/operations.md")).expect("docs");
    for name in m::ALL {
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} missing from docs/operations.md"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_worker_exports_every_metric_and_they_move() {
    let mut env = Env::new("observability", 2).await;
    let (_worker, port) = env.spawn_with_metrics().await;

    // Intake, a batch flushed by a task event, a duplicate, a redundant change, a rejected
    // message, a throttled and then failing call that is retried, and a task left waiting with
    // its batch.
    let a = arn("observed");
    let flaky = arn("flaky");
    // Throttled once first (the adaptive limit's counter), then failing for good.
    env.sim.add_rule(Rule {
        key: flaky.clone(),
        action: Action::Throttle,
        times: 1,
    });
    env.sim.add_rule(Rule {
        key: flaky.clone(),
        action: Action::ServerError,
        times: 1_000_000,
    });
    let first = task(&a, "RUNNING");
    env.publish(&[container(&a, "web", "RUNNING"), first.clone()])
        .await;
    env.publish(&[first]).await;
    env.wait_calls(&a, 1).await;
    let mut again = task(&a, "RUNNING");
    again["eventId"] = "a-second-id-for-the-same-status".into();
    env.publish(&[again, task(&flaky, "RUNNING")]).await;
    env.publish(&[container(&arn("waiting"), "web", "RUNNING")])
        .await;
    env.publish_raw(&a, b"not json").await;

    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| {
                let rest = &l[name.len()..];
                rest.starts_with(' ') || rest.starts_with('{')
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let moving = |name: &str| {
        // Histograms move by their count; the flaky task keeps a retry streak open.
        match name {
            n if [
                m::ECS_CALL_SECONDS,
                m::PERMIT_WAIT_SECONDS,
                m::BATCH_SIZE,
                m::END_TO_END_SECONDS,
                m::STAGE_SECONDS,
            ]
            .contains(&n) =>
            {
                format!("{name}_count")
            }
            _ => name.to_string(),
        }
    };
    let wanted: Vec<&str> = m::ALL
        .iter()
        .copied()
        .filter(|n| {
            !FAULT_ONLY.contains(n)
                && *n != m::PERMITS_IN_USE
                && *n != m::SENDERS_ACTIVE
                && *n != m::PERMIT_OLDEST_HELD_SECONDS
                && *n != m::READY_CLUSTERS
                && *n != m::READY_OLDEST_SECONDS
                && *n != m::REDIS_GATE_CLOSED
                && *n != m::STORE_LOST
        })
        .collect();
    let mut missing = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let text = http
            .get(&url)
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        missing = wanted
            .iter()
            .filter(|n| value(&text, &moving(n)) <= 0.0)
            .map(|n| n.to_string())
            .collect();
        // Gauges that may be 0 at any instant must at least be exported.
        for n in [
            m::PERMITS_IN_USE,
            m::SENDERS_ACTIVE,
            m::PERMIT_OLDEST_HELD_SECONDS,
            m::READY_CLUSTERS,
            m::READY_OLDEST_SECONDS,
            // 0 on a healthy worker; tests/it/redis_ha.rs and store_loss.rs show them at 1.
            m::REDIS_GATE_CLOSED,
            m::STORE_LOST,
        ] {
            if !text.contains(&format!("\n{n} ")) {
                missing.push(n.to_string());
            }
        }
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        missing.is_empty(),
        "metrics absent or not moving: {missing:?}"
    );
    env.cleanup().await;
}

/// Rule 12's operator view: while one cluster has a backlog, the worker's ready gauges show it
/// and `status` names the busiest cluster first (its full ARN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_work_shows_in_the_metrics_and_status_names_the_busiest_cluster() {
    let mut env = Env::new("ready-work", 2).await;
    // Slow calls: 300 tasks take 6 s at the limit of 10.
    env.sim.set_latency(Duration::from_millis(200));
    let (_worker, port) = env.spawn_with_metrics().await;
    let busy: Vec<String> = (0..300).map(|i| arn(&format!("busy-{i}"))).collect();
    env.publish(&busy.iter().map(|t| task(t, "RUNNING")).collect::<Vec<_>>())
        .await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let http = reqwest::Client::new();
    eventually(
        Duration::from_secs(10),
        "ready gauges show the backlog",
        || async {
            let Ok(r) = http.get(&url).send().await else {
                return false;
            };
            let text = r.text().await.unwrap_or_default();
            metric_sum(&text, m::READY_CLUSTERS) == 1.0
                && metric_sum(&text, m::READY_OLDEST_SECONDS) > 0.0
        },
    )
    .await;
    let cluster = format!("arn:aws:ecs:us-east-1:123456789012:cluster/{CLUSTER}");
    let text = env.run_cli(&["status", "--shards", "2"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("ready work:"))
        .unwrap_or_else(|| panic!("no ready-work line in\n{text}"));
    assert!(line.contains(&cluster), "{line}");
    let json: serde_json::Value =
        serde_json::from_str(&env.run_cli(&["status", "--shards", "2", "--json"])).expect("json");
    assert_eq!(json["busiest_clusters"][0][0], cluster.as_str(), "{json}");
    assert!(json["ready_oldest_ms"].as_u64().unwrap_or(0) > 0, "{json}");
    println!("{line}");
    env.cleanup().await;
}

/// `status` shows the broker side: which RabbitMQ node each worker is connected to, and the
/// nodes of the URL list that do not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_each_workers_broker_node_and_the_nodes_that_do_not_answer() {
    let mut env = Env::new("status-nodes", 2).await;
    let cfg = env.config();
    let id = cfg.worker_id.clone().expect("id");
    env.start_worker(cfg).await;
    let dead = free_port();
    let urls = format!("{},amqp://guest:guest@127.0.0.1:{dead}/%2f", amqp_url());
    let status = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ecs-state-relay"));
        cmd.args(["status", "--shards", "2"])
            .envs(env.conn().to_env())
            .env("RELAY_AMQP_URL", &urls);
        if json {
            cmd.arg("--json");
        }
        run_ok(&mut cmd)
    };
    let node = amqp_addr();
    eventually(
        Duration::from_secs(10),
        "the worker's node reported",
        || {
            let text = status(false);
            let shown = text.contains(&format!("{id} on RabbitMQ node {node}"));
            async move { shown }
        },
    )
    .await;
    let text = status(false);
    println!("{text}");
    assert!(
        text.contains(&format!("RabbitMQ nodes NOT ANSWERING: 127.0.0.1:{dead}")),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&status(true)).expect("json");
    assert_eq!(json["amqp_nodes"][id.as_str()], node.as_str(), "{json}");
    assert_eq!(
        json["amqp_nodes_down"][0],
        format!("127.0.0.1:{dead}"),
        "{json}"
    );
    env.cleanup().await;
}
