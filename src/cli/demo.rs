//! `demo`: publishes a realistic fleet of task lifecycles (containers, managed agents,
//! attachments, a few ECS failures to retry, one invalid event), follows the run through
//! ecs-sim's stats, and prints a summary. Used by `scripts/demo.sh`.

use std::time::{Duration, Instant};

use clap::Args;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::{json, Value};

use crate::cli::publish::publish_lines;
use crate::relay::amqp;
use crate::relay::config::ConnConfig;
use crate::sim::{Action, Rule, SimStats};

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub conn: ConnConfig,
    /// Base URL of a running ecs-sim.
    #[arg(long, default_value = "http://127.0.0.1:4566")]
    pub sim_url: String,
    /// Metrics address of the worker, polled on /readyz before publishing.
    #[arg(long, default_value = "http://127.0.0.1:9464")]
    pub worker_url: String,
    /// Tasks in the fleet.
    #[arg(long, default_value_t = 300)]
    pub tasks: usize,
    /// Let ecs-sim throttle every call arriving while this many are in flight (its capacity
    /// mode, for the run only): shows the fleet's adaptive limit coming down. 0: off.
    #[arg(long, default_value_t = 0)]
    pub capacity: u64,
    /// Give up waiting for the run after this many seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout_s: u64,
    /// Publish as this broker user (its URL) instead of RELAY_AMQP_URL's: the demo cluster's
    /// agent, which may report for its own cluster only.
    #[arg(long, hide_env_values = true)]
    pub producer_url: Option<String>,
}

/// Another team's cluster, which the demo agent may not report for.
const SPOOFED_CLUSTER: &str = "payments";

/// The generated fleet: JSON lines in publish order and what ECS should see.
pub struct Fleet {
    pub lines: Vec<String>,
    pub valid_events: usize,
    pub expected_ok_calls: u64,
    pub rules: Vec<Rule>,
}

/// Each task: containers web and sidecar (RUNNING then STOPPED), an exec agent, task RUNNING and
/// STOPPED; every 10th task has a task ENI attachment, every 25th an instance ENI attachment;
/// every 20th task's first call fails twice (ServerException), one task is throttled once.
/// `run` makes every ARN and event id unique to this run, so runs never dedupe each other.
pub fn fleet(tasks: usize, cluster: &str, run: u32) -> Fleet {
    let arn =
        |i: usize| format!("arn:aws:ecs:us-east-1:123456789012:task/{cluster}/{run:08x}{i:024x}");
    let at = "2026-11-28T10:00:00Z";
    let expires = "2099-01-01T00:00:00Z";
    let mut phases: Vec<Vec<Value>> = vec![Vec::new(); 5];
    let mut rules = Vec::new();
    let mut expected_ok_calls = 0u64;
    for i in 0..tasks {
        let task = arn(i);
        let id = |n: &str| format!("demo-{run:08x}-{i}-{n}");
        let base = |kind: &str, n: &str, status: &str| json!({"schemaVersion":1,"eventId":id(n),"type":kind,"cluster":cluster,"taskArn":task,"occurredAt":at,"status":status});
        for (c, name) in ["web", "sidecar"].iter().enumerate() {
            let mut e = base("container", &format!("{name}-running"), "RUNNING");
            e["containerName"] = json!(name);
            e["runtimeId"] = json!(format!("{i:08x}{c:056x}"));
            e["taskStatus"] = json!("CREATED");
            e["networkBindings"] = json!([{"bindIP":"0.0.0.0","containerPort":8080+c,"hostPort":32768+c,"protocol":"tcp"}]);
            phases[0].push(e);
        }
        let mut agent = base("managedAgent", "exec-running", "RUNNING");
        agent["containerName"] = json!("web");
        agent["managedAgentName"] = json!("ExecuteCommandAgent");
        phases[0].push(agent);
        phases[1].push(base("task", "running", "RUNNING"));
        expected_ok_calls += 1;
        if i % 10 == 0 {
            let mut a = base("taskAttachment", "eni", "ATTACHED");
            a["attachmentArn"] = json!(format!(
                "arn:aws:ecs:us-east-1:123456789012:attachment/{run:08x}{i:024x}"
            ));
            a["expiresAt"] = json!(expires);
            phases[1].push(a);
            expected_ok_calls += 1;
        }
        for name in ["web", "sidecar"] {
            let mut e = base("container", &format!("{name}-stopped"), "STOPPED");
            e["containerName"] = json!(name);
            e["exitCode"] = json!(0);
            e["reason"] = json!("Essential container in task exited");
            phases[2].push(e);
        }
        let mut stopped = base("task", "stopped", "STOPPED");
        stopped["reason"] = json!("Scaling activity initiated by deployment");
        stopped["executionStoppedAt"] = json!(at);
        phases[3].push(stopped);
        expected_ok_calls += 1;
        if i % 25 == 0 {
            let att = format!("arn:aws:ecs:us-east-1:123456789012:attachment/{run:08x}{i:08x}");
            phases[4].push(json!({"schemaVersion":1,"eventId":id("instance-eni"),"type":"attachment","cluster":cluster,
                "attachmentArn":att,"attachmentType":"eni","occurredAt":at,"status":"ATTACHED","expiresAt":expires}));
            expected_ok_calls += 1;
        }
        if i % 20 == 7 {
            rules.push(Rule {
                key: task.clone(),
                action: Action::ServerError,
                times: 2,
            });
        }
        if i == 3 {
            rules.push(Rule {
                key: task.clone(),
                action: Action::Throttle,
                times: 1,
            });
        }
    }
    let valid_events = phases.iter().map(Vec::len).sum();
    let mut lines: Vec<String> = phases
        .into_iter()
        .flatten()
        .map(|v| v.to_string())
        .collect();
    // One invalid event: a container status ECS cannot take; it must be dead-lettered.
    let invalid = json!({"schemaVersion":1,"eventId":format!("demo-{run:08x}-invalid"),"type":"container","cluster":cluster,
        "taskArn":arn(0),"occurredAt":at,"status":"CREATED","containerName":"web"});
    lines.insert(lines.len() / 2, invalid.to_string());
    // One spoofed change: this cluster's agent reports another team's task STOPPED. The
    // producer check dead-letters it (producer_not_allowed); it never reaches ECS.
    let spoofed = json!({"schemaVersion":1,"eventId":format!("demo-{run:08x}-spoofed"),"type":"task","cluster":SPOOFED_CLUSTER,
        "taskArn":format!("arn:aws:ecs:us-east-1:123456789012:task/{SPOOFED_CLUSTER}/{run:08x}"),"occurredAt":at,"status":"STOPPED"});
    lines.insert(lines.len() / 3, spoofed.to_string());
    Fleet {
        lines,
        valid_events,
        expected_ok_calls,
        rules,
    }
}

pub async fn run(mut args: DemoArgs) -> anyhow::Result<()> {
    args.conn.resolve_secrets()?;
    // Bounded requests: a worker or sim that stops answering must not hang the demo.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let sim = args.sim_url.trim_end_matches('/').to_string();
    let stats = || async {
        let s: SimStats = http
            .get(format!("{sim}/_sim/stats"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::Ok(s)
    };
    // Both just started: wait (bounded) until the sim answers and the worker is ready.
    let ready_url = format!("{}/readyz", args.worker_url.trim_end_matches('/'));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sim_up = stats().await.is_ok();
        let worker_ready =
            matches!(http.get(&ready_url).send().await, Ok(r) if r.status().is_success());
        if sim_up && worker_ready {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("not ready after 60 s: ecs-sim at {sim} up: {sim_up}, worker {ready_url} ready: {worker_ready}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = stats().await?;
    let dead_before = dead_count(&args.conn).await?;

    let fleet = fleet(args.tasks, "demo", rand::random());
    for rule in &fleet.rules {
        http.post(format!("{sim}/_sim/rules"))
            .json(rule)
            .send()
            .await?
            .error_for_status()?;
    }
    if args.capacity > 0 {
        set_capacity(&http, &sim, Some(args.capacity)).await?;
        println!(
            "demo: ecs-sim throttles calls beyond {} in flight",
            args.capacity
        );
    }
    println!(
        "demo: publishing {} events for {} tasks ({} failures injected, 1 invalid event, 1 spoofed)",
        fleet.lines.len(),
        args.tasks,
        fleet.rules.len()
    );
    let started = Instant::now();
    let input = fleet.lines.join("\n");
    let publisher = ConnConfig {
        amqp_url: args
            .producer_url
            .clone()
            .unwrap_or_else(|| args.conn.amqp_url.clone()),
        ..args.conn.clone()
    };
    publish_lines(&publisher, input.as_bytes()).await?;
    println!(
        "demo: all {} events confirmed by RabbitMQ in {:.1}s",
        fleet.lines.len(),
        started.elapsed().as_secs_f64()
    );

    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let mut last = before.clone();
    loop {
        let now = stats().await?;
        let ok = now.ok - before.ok;
        if ok != last.ok - before.ok || now.calls != last.calls {
            println!(
                "demo: {:>5.1}s  ECS calls ok {ok:>4}/{}  failed {:>3}  in flight {:>2}  highest {:>2}  limit {}",
                started.elapsed().as_secs_f64(),
                fleet.expected_ok_calls,
                now.errors - before.errors,
                now.in_flight,
                now.max_in_flight,
                effective_limit(&http, &args.worker_url).await
            );
        }
        last = now.clone();
        if ok >= fleet.expected_ok_calls && now.in_flight == 0 {
            break;
        }
        if Instant::now() > deadline {
            if args.capacity > 0 {
                // Leave the sim as it was found, also when the run failed.
                let _ = set_capacity(&http, &sim, None).await;
            }
            anyhow::bail!(
                "timed out: {ok} of {} ECS calls succeeded",
                fleet.expected_ok_calls
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if args.capacity > 0 {
        set_capacity(&http, &sim, None).await?;
    }
    let dead = dead_count(&args.conn).await? - dead_before;
    let calls = last.calls - before.calls;
    let ok = last.ok - before.ok;
    println!();
    println!("summary");
    println!("  events published        {}", fleet.lines.len());
    println!("  valid events            {}", fleet.valid_events);
    println!(
        "  ECS calls               {calls} ({ok} ok, {} failed and retried)",
        calls - ok
    );
    println!(
        "  events per call         {:.2}",
        fleet.valid_events as f64 / ok.max(1) as f64
    );
    println!(
        "  highest concurrency     {} (limit 10)",
        last.max_in_flight
    );
    println!("  dead-lettered           {dead}");
    println!(
        "  spoofed changes refused {} (another cluster's task, producer_not_allowed)",
        rejected(&http, &args.worker_url, "producer_not_allowed").await
    );
    println!(
        "  elapsed                 {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn set_capacity(
    http: &reqwest::Client,
    sim: &str,
    capacity: Option<u64>,
) -> anyhow::Result<()> {
    http.post(format!("{sim}/_sim/capacity"))
        .json(&json!({ "max_in_flight": capacity }))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// The fleet's effective limit as the worker exports it ("?" when it cannot be read).
async fn effective_limit(http: &reqwest::Client, worker_url: &str) -> String {
    let url = format!("{}/metrics", worker_url.trim_end_matches('/'));
    let Ok(resp) = http.get(url).send().await else {
        return "?".into();
    };
    let text = resp.text().await.unwrap_or_default();
    let prefix = format!("{} ", crate::relay::metrics::CONCURRENCY_LIMIT);
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or_else(|| "?".into(), |v| v.trim().to_string())
}

/// `relay_events_rejected_total{reason}` as the worker exports it ("?" when it cannot be read).
async fn rejected(http: &reqwest::Client, worker_url: &str, reason: &str) -> String {
    let url = format!("{}/metrics", worker_url.trim_end_matches('/'));
    let Ok(text) = http
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
    else {
        return "?".into();
    };
    let series = format!("relay_events_rejected_total{{reason=\"{reason}\"}} ");
    text.text()
        .await
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(&series).map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "0".into())
}

async fn dead_count(conn: &ConnConfig) -> anyhow::Result<i64> {
    let c = amqp::connect(&conn.amqp_url, &conn.amqp_tls(), "ecs-state-relay demo").await?;
    let ch = c.create_channel().await?;
    let q = ch
        .queue_declare(
            amqp::dead_queue(&conn.exchange).as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = c.close(200, "done".into()).await;
    Ok(i64::from(q.message_count()))
}
