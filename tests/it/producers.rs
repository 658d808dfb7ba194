//! Producer identity (contract v1.2) against the real broker, with broker users the tests
//! create (a producer's permissions: configure `^$`, write `^<exchange>$`, read `^$`) and delete.
//! The relay's own user (`guest`) has no `impersonator` tag.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use ecs_state_relay::cli::publish::Publisher;
use ecs_state_relay::relay::config::{AuthMode, ConnConfig, WorkerConfig};

use serde_json::{json, Value};

/// A broker user with a producer's permissions on `exchange`; deleted when dropped.
struct Producer {
    name: String,
}

impl Producer {
    fn create(name: &str, exchange: &str) -> Producer {
        let write = format!("^{}$", exchange.replace('.', "\\."));
        rabbitmqctl(&["add_user", name, "producer-pw"]);
        rabbitmqctl(&["set_permissions", "-p", "/", name, "^$", &write, "^$"]);
        Producer { name: name.into() }
    }

    fn conn(&self, env: &Env) -> ConnConfig {
        ConnConfig {
            amqp_url: format!("amqp://{}:producer-pw@{}/%2f", self.name, amqp_addr()),
            ..env.conn()
        }
    }

    /// Publishes `events` as this user (its `user_id`), with confirms.
    async fn publish(&self, env: &Env, events: &[Value]) {
        let mut publisher = Publisher::connect(&self.conn(env))
            .await
            .expect("a producer may publish without configure rights");
        for (i, ev) in events.iter().enumerate() {
            publisher.send(i + 1, &ev.to_string()).await.expect("sent");
        }
        publisher.close().await.expect("confirmed");
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .stdout(Stdio::null())
            .status();
    }
}

/// Publishes `ev` (routed by its task ARN) through a connection to `url` with `props`, on a
/// confirm channel; the broker's answer.
async fn publish_as(
    url: &str,
    exchange: &str,
    ev: &Value,
    props: lapin::BasicProperties,
) -> Result<lapin::Confirmation, lapin::Error> {
    let c = ecs_state_relay::relay::amqp::connect(url, &Default::default(), "test publisher")
        .await
        .expect("the broker takes the connection");
    let ch = ecs_state_relay::relay::amqp::confirm_channel(&c)
        .await
        .expect("channel");
    let routing_key = ev["taskArn"]
        .as_str()
        .or(ev["attachmentArn"].as_str())
        .unwrap_or_default();
    let answer = async {
        ch.basic_publish(
            exchange.into(),
            routing_key.into(),
            Default::default(),
            ev.to_string().as_bytes(),
            props,
        )
        .await?
        .await
    }
    .await;
    let _ = c.close(200, "done".into()).await;
    answer
}

/// A task change for `task_cluster`'s task, naming `cluster` in the body.
fn task_for(task_cluster: &str, cluster: &str, id: &str) -> Value {
    let arn = format!("arn:aws:ecs:us-east-1:123456789012:task/{task_cluster}/{id}");
    let mut ev = task(&arn, "RUNNING");
    ev["cluster"] = cluster.into();
    ev
}

/// Publishes `ev` without a `user_id` (as the relay's own broker user); the broker takes it.
async fn publish_anonymously(env: &Env, ev: &Value) {
    let props = lapin::BasicProperties::default().with_delivery_mode(2);
    let confirm = publish_as(&amqp_url(), &env.exchange, ev, props)
        .await
        .expect("published");
    assert!(confirm.is_ack(), "the broker did not take it");
}

/// A unique producer user name (`relay-agent-<8 hex>`).
fn agent_name() -> String {
    format!("relay-agent-{:08x}", rand::random::<u32>())
}

/// Waits until `ev` reached ECS.
async fn wait_arrived(env: &Env, ev: &Value, what: &str) {
    eventually!(Duration::from_secs(20), what, arrived(env, ev));
}

fn arrived(env: &Env, ev: &Value) -> bool {
    let key = ev["taskArn"]
        .as_str()
        .or(ev["attachmentArn"].as_str())
        .unwrap_or_default();
    !env.calls_for(key).is_empty()
}

/// `dlq list --json`: (reason code, producer) of each dead letter, the queue left as it was.
fn dead_letters(env: &Env) -> Vec<(String, String)> {
    env.run_cli(&["dlq", "list", "--json"])
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .map(|l| {
            let code = l["reason"].as_str().unwrap_or_default();
            let code = code.split(':').next().unwrap_or_default().to_string();
            (code, l["producer"].as_str().unwrap_or("-").to_string())
        })
        .collect()
}

/// Waits until the dead-letter queue holds `n` letters; their (reason code, producer), sorted.
async fn dead_lettered(env: &Env, n: usize, what: &str) -> Vec<(String, String)> {
    eventually!(Duration::from_secs(20), what, dead_letters(env).len() == n);
    let mut letters = dead_letters(env);
    letters.sort();
    letters
}

fn write_acl(env: &Env, acl: Value) {
    std::fs::write(&env.acl, acl.to_string()).expect("write the ACL");
}

/// A test environment whose producer rules are `acl`, with one in-process worker; `tweak`
/// adjusts the worker's configuration.
async fn started(name: &str, acl: Value, tweak: impl FnOnce(&mut WorkerConfig)) -> Env {
    let mut env = Env::new(name, 1).await;
    write_acl(&env, acl);
    let mut cfg = env.config();
    tweak(&mut cfg);
    env.start_worker(cfg).await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_reports_only_for_its_clusters_and_refusals_are_replayed_only_by_reason() {
    let prefix = agent_name();
    let acl = json!({"guest": ["*"], format!("{prefix}-{{cluster}}"): ["{cluster}"]});
    let env = started("producers", acl, |_| {}).await;
    let agent = Producer::create(&format!("{prefix}-alpha"), &env.exchange);

    let own = task_for("alpha", "alpha", "own");
    let foreign = task_for("beta-1", "beta-1", "foreign");
    let disguised = task_for("beta-1", "alpha", "disguised");
    agent
        .publish(&env, &[own.clone(), foreign.clone(), disguised.clone()])
        .await;

    wait_arrived(&env, &own, "its own cluster's change").await;
    let letters = dead_lettered(&env, 2, "both refusals dead-lettered").await;
    assert_eq!(
        letters,
        vec![
            ("cluster_mismatch".to_string(), agent.name.clone()),
            ("producer_not_allowed".to_string(), agent.name.clone()),
        ],
        "dead-lettered by the relay's user (no impersonator tag), the producer kept visible"
    );
    assert!(!arrived(&env, &foreign) && !arrived(&env, &disguised));

    // A plain replay leaves identity refusals alone; asked for by reason, the operator (guest,
    // allowed every cluster) replays one under its own name, and it goes through.
    let out = env.run_cli(&["dlq", "replay"]);
    assert!(out.contains("replayed 0"), "{out}");
    let out = env.run_cli(&["dlq", "replay", "--reason", "producer_not_allowed"]);
    assert!(out.contains("replayed 1"), "{out}");
    wait_arrived(&env, &foreign, "the replayed change").await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_user_id_is_refused_by_the_broker() {
    let env = started("producers-forged", json!({"guest": ["*"]}), |_| {}).await;
    let agent = Producer::create(&agent_name(), &env.exchange);
    let ev = task_for("alpha", "alpha", "forged");
    let answer = publish_as(
        &agent.conn(&env).amqp_url,
        &env.exchange,
        &ev,
        lapin::BasicProperties::default().with_user_id("guest".into()),
    )
    .await;
    assert!(
        answer.is_err() || answer.as_ref().is_ok_and(|c| c.is_nack()),
        "the broker took a message whose user_id is not its connection's user: {answer:?}"
    );
    env.cleanup().await;
}

/// GET `path` on a worker's metrics port: (status, body).
async fn scrape(port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_edit_takes_effect_without_a_restart_and_a_broken_one_keeps_the_rules() {
    let mut env = Env::new("producers-reload", 1).await;
    let prefix = agent_name();
    let user = format!("{prefix}-alpha");
    write_acl(&env, json!({"guest": ["*"], user.clone(): ["alpha"]}));
    // A worker process, to watch its /metrics and /readyz.
    let (_worker, port) = env.spawn_with_metrics().await;
    let agent = Producer::create(&user, &env.exchange);
    let reloads = |result: &'static str| async move {
        let (_, text) = scrape(port, "/metrics").await;
        text.contains(&format!(
            "relay_producer_acl_reloads_total{{result=\"{result}\"}}"
        ))
    };

    let status = |env: &Env| -> Value {
        serde_json::from_str(&env.run_cli(&["status", "--json", "--shards", "1"]))
            .expect("status JSON")
    };
    let rules_of = |s: &Value| -> String {
        s["producer_rules"]
            .as_object()
            .and_then(|r| r.values().next())
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    eventually(Duration::from_secs(10), "the rules recorded", || async {
        let s = status(&env);
        s["producer_rules_agree"] == true && rules_of(&s).starts_with("acl:")
    })
    .await;
    let before = rules_of(&status(&env));

    // A broken edit, then the file gone: the rules in force stay (beta-1 still refused, alpha
    // still allowed), and the worker stays ready.
    std::fs::write(&env.acl, "{ not json").expect("write");
    eventually!(
        Duration::from_secs(15),
        "the broken file noticed",
        reloads("failed").await
    );
    std::fs::remove_file(&env.acl).expect("remove");
    assert_eq!(scrape(port, "/readyz").await.0, 200, "not ready any more");
    let (alpha, beta) = (
        task_for("alpha", "alpha", "a1"),
        task_for("beta-1", "beta-1", "b1"),
    );
    agent.publish(&env, &[alpha.clone(), beta.clone()]).await;
    eventually!(
        Duration::from_secs(20),
        "alpha through, beta refused",
        arrived(&env, &alpha) && dead_letters(&env).len() == 1
    );
    assert_eq!(scrape(port, "/readyz").await.0, 200, "not ready any more");

    // An edit that allows beta-1: within 10 s of the write, without a restart.
    write_acl(
        &env,
        json!({"guest": ["*"], user.clone(): ["alpha", "beta-*"]}),
    );
    let written = Instant::now();
    eventually!(
        Duration::from_secs(15),
        "the new rules loaded",
        reloads("ok").await
    );
    let took = written.elapsed();
    assert!(took <= Duration::from_secs(10), "took {took:?}");
    // `status` shows every live worker on the new rules.
    eventually(
        Duration::from_secs(10),
        "status: all workers agree",
        || async {
            let s = status(&env);
            s["producer_rules_agree"] == true && rules_of(&s) != before
        },
    )
    .await;
    let beta_again = task_for("beta-1", "beta-1", "b2");
    agent.publish(&env, std::slice::from_ref(&beta_again)).await;
    wait_arrived(&env, &beta_again, "beta-1 allowed now").await;
    env.cleanup().await;
}

/// An ARN pattern tells apart two accounts' clusters of the same name, and a cluster ARN in
/// `cluster` is matched by its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arn_pattern_tells_apart_two_accounts_clusters_of_one_name() {
    let user = agent_name();
    let env = started(
        "producers-arn",
        json!({"guest": ["*"], user.clone(): ["arn:aws:ecs:us-east-1:123456789012:cluster/prod"]}),
        |_| {},
    )
    .await;
    let agent = Producer::create(&user, &env.exchange);
    let ours = task_for(
        "prod",
        "arn:aws:ecs:us-east-1:123456789012:cluster/prod",
        "ours",
    );
    let mut theirs = task_for("prod", "prod", "theirs");
    theirs["taskArn"] = theirs["taskArn"]
        .as_str()
        .unwrap_or_default()
        .replace("123456789012", "210987654321")
        .into();
    agent.publish(&env, &[ours.clone(), theirs.clone()]).await;
    eventually!(
        Duration::from_secs(20),
        "ours through, theirs refused",
        arrived(&env, &ours) && dead_letters(&env).len() == 1
    );
    assert_eq!(dead_letters(&env)[0].0, "producer_not_allowed");
    assert!(!arrived(&env, &theirs));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_forwards_what_acl_would_refuse_and_counts_it() {
    let metrics = ecs_state_relay::relay::metrics::handle();
    let user = format!("relay-agent-{:08x}-alpha", rand::random::<u32>());
    let acl = json!({"guest": ["*"], user.clone(): ["alpha"]});
    let env = started("producers-audit", acl, |c| {
        c.producer_auth = AuthMode::Audit
    })
    .await;
    let agent = Producer::create(&user, &env.exchange);
    let foreign = task_for("beta-1", "beta-1", "audited");
    agent.publish(&env, std::slice::from_ref(&foreign)).await;
    wait_arrived(&env, &foreign, "forwarded all the same").await;
    assert!(
        metric_sum(&metrics.render(), "relay_producer_would_refuse_total") >= 1.0,
        "not counted as a would-be refusal"
    );
    assert!(dead_letters(&env).is_empty());
    env.cleanup().await;
}

#[test]
fn a_worker_without_an_acl_refuses_to_start_and_says_what_to_set() {
    let out = Command::new(env!("CARGO_BIN_EXE_ecs-state-relay"))
        .arg("worker")
        .env_remove("RELAY_PRODUCER_ACL")
        .env("RELAY_PRODUCER_AUTH", "acl")
        .env("RELAY_METRICS_ADDR", "")
        .stdin(Stdio::null())
        .output()
        .expect("the relay binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("RELAY_PRODUCER_AUTH=acl needs RELAY_PRODUCER_ACL"),
        "{err}"
    );
}

/// What the relay could never deliver is refused whatever the mode: another account than
/// RELAY_ECS_ACCOUNTS (with the check off), and another Region than the relay's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_for_another_account_or_region_are_refused_even_with_the_check_off() {
    let env = started("producers-accounts", json!({}), |c| {
        c.producer_auth = AuthMode::Off;
        c.ecs_accounts = "210987654321".into();
    })
    .await;
    let ours = task_for("alpha", "alpha", "ours");
    let mut other_region = task_for("alpha", "alpha", "elsewhere");
    other_region["taskArn"] = other_region["taskArn"]
        .as_str()
        .unwrap_or_default()
        .replace("us-east-1", "eu-west-1")
        .into();
    env.publish(&[ours.clone(), other_region.clone()]).await;
    eventually!(
        Duration::from_secs(20),
        "both refused",
        dead_letters(&env).len() == 2
    );
    let mut codes: Vec<String> = dead_letters(&env).into_iter().map(|(c, _)| c).collect();
    codes.sort();
    assert_eq!(codes, ["account_mismatch", "region_mismatch"]);
    assert!(!arrived(&env, &ours) && !arrived(&env, &other_region));
    env.cleanup().await;
}

/// Every identity reason, from real publishes: no `user_id`, an unknown user, a cluster the
/// user may not report for, a `cluster` that disagrees with its task ARN, another Region, and
/// another account than RELAY_ECS_ACCOUNTS. Prints the table of reasons the dead-letter queue
/// holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_reason_is_dead_lettered_and_none_reaches_ecs() {
    let prefix = agent_name();
    let acl = json!({"guest": ["*"], format!("{prefix}-{{cluster}}"): ["{cluster}"]});
    let env = started("producers-reasons", acl, |c| {
        c.ecs_accounts = "123456789012".into();
    })
    .await;
    let agent = Producer::create(&format!("{prefix}-alpha"), &env.exchange);
    let stranger = Producer::create(
        &format!("relay-stranger-{:08x}", rand::random::<u32>()),
        &env.exchange,
    );

    // No user_id at all: a raw publish without the property.
    let anonymous = task_for("alpha", "alpha", "anonymous");
    let key = anonymous["taskArn"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    publish_anonymously(&env, &anonymous).await;

    let unknown = task_for("alpha", "alpha", "unknown");
    stranger.publish(&env, std::slice::from_ref(&unknown)).await;
    let mut elsewhere = task_for("alpha", "alpha", "elsewhere");
    elsewhere["taskArn"] = key
        .replace("us-east-1", "eu-west-1")
        .replace("anonymous", "elsewhere")
        .into();
    let mut other_account = task_for("alpha", "alpha", "other-account");
    other_account["taskArn"] = key
        .replace("123456789012", "210987654321")
        .replace("anonymous", "other-account")
        .into();
    let refused = [
        task_for("beta-1", "beta-1", "not-allowed"),
        task_for("beta-1", "alpha", "mismatch"),
        elsewhere,
        other_account,
    ];
    agent.publish(&env, &refused).await;

    eventually!(
        Duration::from_secs(20),
        "six refusals dead-lettered",
        dead_letters(&env).len() == 6
    );
    let mut table = std::collections::BTreeMap::<String, usize>::new();
    for (code, _) in dead_letters(&env) {
        *table.entry(code).or_default() += 1;
    }
    println!("rejected reasons (dead-letter queue):");
    for (code, n) in &table {
        println!("  {code:<22} {n}");
    }
    let codes: Vec<&str> = table.keys().map(String::as_str).collect();
    assert_eq!(
        codes,
        [
            "account_mismatch",
            "cluster_mismatch",
            "producer_missing",
            "producer_not_allowed",
            "producer_unknown",
            "region_mismatch"
        ]
    );
    assert!(table.values().all(|n| *n == 1), "{table:?}");
    assert!(env.sim.calls().is_empty(), "a refused change reached ECS");
    env.cleanup().await;
}

/// The two holes beside the task path, from real publishes: instance-level attachment changes
/// (a non-ARN key, a foreign cluster, no `user_id`, another account) and cluster values that
/// smuggle another account's ARN fields past an ARN pattern (old- and new-form task ARNs).
/// Before the fix, the non-ARN attachment and the smuggled old-form task reached ECS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_and_smuggled_cluster_names_are_refused_and_allowed_ones_go_through() {
    const OWN: &str = "123456789012";
    const FOREIGN: &str = "210987654321";
    let user = agent_name();
    let acl = json!({ user.as_str(): [format!("arn:aws:ecs:*:{OWN}:cluster/prod")] });
    let env = started("producers-edges", acl, |_| {}).await;
    let agent = Producer::create(&user, &env.exchange);
    let id = rand::random::<u32>();
    let att = |account: &str, cluster: &str, name: &str| {
        let mut ev = attachment(
            &format!("arn:aws:ecs:us-east-1:{account}:attachment/{name}-{id:08x}"),
            "eni",
            "ATTACHED",
            Duration::from_secs(120),
        );
        ev["cluster"] = cluster.into();
        ev
    };
    let task_of = |arn: String, cluster: &str| {
        let mut ev = task(&arn, "RUNNING");
        ev["cluster"] = cluster.into();
        ev
    };
    let smuggled = format!("x:{OWN}:cluster/prod");

    let mut not_an_arn = att(OWN, "prod", "not-an-arn");
    not_an_arn["attachmentArn"] = format!("x-{id:08x}").into();
    let refused = [
        ("attachment_arn", not_an_arn),
        (
            "cluster_mismatch",
            att(
                OWN,
                &format!("arn:aws:ecs:us-east-1:{FOREIGN}:cluster/prod"),
                "foreign-cluster",
            ),
        ),
        (
            "producer_not_allowed",
            att(FOREIGN, "prod", "other-account"),
        ),
        (
            "cluster_invalid",
            task_of(
                format!("arn:aws:ecs:us-east-1:{FOREIGN}:task/{id:08x}0a"),
                &smuggled,
            ),
        ),
        (
            "task_arn",
            task_of(
                format!("arn:aws:ecs:us-east-1:{FOREIGN}:task/{smuggled}/{id:08x}0b"),
                &smuggled,
            ),
        ),
    ];
    let allowed = [
        att(OWN, "prod", "allowed"),
        att(
            OWN,
            &format!("arn:aws:ecs:us-east-1:{OWN}:cluster/prod"),
            "allowed-arn",
        ),
        task_of(
            format!("arn:aws:ecs:us-east-1:{OWN}:task/prod/{id:08x}0c"),
            "prod",
        ),
    ];
    let events: Vec<Value> = refused
        .iter()
        .map(|(_, ev)| ev.clone())
        .chain(allowed.iter().cloned())
        .collect();
    agent.publish(&env, &events).await;
    // No user_id: a raw publish without the property.
    let anonymous = att(OWN, "prod", "anonymous");
    publish_anonymously(&env, &anonymous).await;

    for ev in &allowed {
        eventually!(
            Duration::from_secs(20),
            "an allowed change",
            arrived(&env, ev)
        );
    }
    let got = dead_lettered(&env, 6, "six refusals dead-lettered").await;
    let mut want: Vec<(String, String)> = refused
        .iter()
        .map(|(code, _)| (code.to_string(), user.clone()))
        .chain([("producer_missing".to_string(), "-".to_string())])
        .collect();
    want.sort();
    assert_eq!(got, want, "(reason, producer) of each dead letter");
    for ev in refused.iter().map(|(_, ev)| ev).chain([&anonymous]) {
        assert!(!arrived(&env, ev), "a refused change reached ECS: {ev}");
    }
    env.cleanup().await;
}

/// Headers a producer sets under `x-relay-` to pass a refusal off as something a plain
/// `dlq replay` would send back as the operator: a harmless reason, another producer.
fn forged_headers() -> lapin::types::FieldTable {
    use lapin::types::{AMQPValue, FieldTable};
    let mut h = FieldTable::default();
    h.insert(
        "x-relay-reject-reason".into(),
        AMQPValue::LongString("batch_full: forged by the producer".into()),
    );
    h.insert(
        "x-relay-producer".into(),
        AMQPValue::LongString("guest".into()),
    );
    h
}

/// [`forged_headers`] and a well-formed `x-death` entry, as the broker writes one when it drops
/// a message past the delivery limit: a refusal passed off as the broker's drop.
fn forged_death(queue: &str) -> lapin::types::FieldTable {
    use lapin::types::{AMQPValue, FieldArray, FieldTable};
    let mut death = FieldTable::default();
    for (k, v) in [
        ("reason", "delivery_limit"),
        ("queue", queue),
        ("exchange", ""),
    ] {
        death.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    let mut h = forged_headers();
    h.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    h
}

/// `dlq replay` cannot launder identity: a message the broker dead-lettered (here after the
/// delivery limit, carrying a producer's forged `x-relay-*` headers) is listed with the broker's
/// reason and its real producer and is replayed only when asked for by that reason; a
/// producer's forged headers never survive the relay's own dead-lettering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_cannot_launder_identity_and_forged_relay_headers_are_ignored() {
    let user = agent_name();
    let mut env = Env::new("producers-launder", 1).await;
    write_acl(&env, json!({"guest": ["*"], user.as_str(): ["alpha"]}));
    let agent = Producer::create(&user, &env.exchange);
    let admin = env.declared().await;

    // 1. The broker dead-letters a message after the delivery limit; no worker runs yet.
    let poisoned = task_for("beta-1", "beta-1", "poisoned");
    let props = lapin::BasicProperties::default()
        .with_user_id(user.as_str().into())
        .with_headers(forged_headers());
    let confirm = publish_as(&agent.conn(&env).amqp_url, &env.exchange, &poisoned, props)
        .await
        .expect("published");
    assert!(confirm.is_ack());
    // Each nack with requeue is one more delivery; past the limit the broker dead-letters it.
    let deliveries = nack_until_dead_lettered(&env.exchange).await;
    assert!(deliveries > 1, "delivered {deliveries} times");
    let _ = admin.close(200, "done".into()).await;
    assert_eq!(
        dead_letters(&env),
        vec![("delivery_limit".to_string(), user.clone())],
        "the broker's reason and the real producer, not the forged headers"
    );

    // 2. The relay's own refusals drop whatever x-relay-* headers the producer set.
    let cfg = env.config();
    env.start_worker(cfg).await;
    let refused = task_for("beta-1", "beta-1", "refused");
    let props = lapin::BasicProperties::default()
        .with_user_id(user.as_str().into())
        .with_headers(forged_headers());
    publish_as(&agent.conn(&env).amqp_url, &env.exchange, &refused, props)
        .await
        .expect("published");
    let anonymous = task_for("alpha", "alpha", "anonymous");
    let props = lapin::BasicProperties::default().with_headers(forged_headers());
    publish_as(&amqp_url(), &env.exchange, &anonymous, props)
        .await
        .expect("published");
    // A refusal dressed as the broker's drop (a forged x-death) is the relay's refusal still.
    let disguised = task_for("beta-1", "beta-1", "disguised");
    let shard_queue = ecs_state_relay::relay::amqp::shard_queue(&env.exchange, 0);
    let props = lapin::BasicProperties::default()
        .with_user_id(user.as_str().into())
        .with_headers(forged_death(&shard_queue));
    publish_as(&agent.conn(&env).amqp_url, &env.exchange, &disguised, props)
        .await
        .expect("published");
    let letters = dead_lettered(&env, 4, "four dead letters").await;
    assert_eq!(
        letters,
        vec![
            ("delivery_limit".to_string(), user.clone()),
            ("producer_missing".to_string(), "-".to_string()),
            ("producer_not_allowed".to_string(), user.clone()),
            ("producer_not_allowed".to_string(), user.clone()),
        ]
    );

    // 3. A plain replay sends none of them back; the broker's drop goes back only by name.
    let out = env.run_cli(&["dlq", "replay"]);
    assert!(out.contains("replayed 0"), "{out}");
    assert_eq!(dead_letters(&env).len(), 4);
    let out = env.run_cli(&["dlq", "replay", "--reason", "delivery_limit"]);
    assert!(out.contains("replayed 1"), "{out}");
    wait_arrived(&env, &poisoned, "the replayed change").await;
    for ev in [&refused, &anonymous, &disguised] {
        assert!(!arrived(&env, ev), "a refused change reached ECS: {ev}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_checks_no_producer_and_says_so_at_start() {
    use std::io::BufRead;
    let mut env = Env::new("producers-off", 1).await;
    let mut cfg = env.config();
    cfg.producer_auth = AuthMode::Off;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ecs-state-relay"))
        .arg("worker")
        .envs(env.process_env(&cfg))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let warned = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("RELAY_PRODUCER_AUTH=off") => break true,
            _ if Instant::now() > deadline => break false,
            _ => {}
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "no warning about RELAY_PRODUCER_AUTH=off");
    env.cleanup().await;
}

/// Of two templates that fit a user, the one with the longer literal part decides; a `*` in a
/// user name is bound literally, never as a wildcard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_template_decides_and_a_star_in_a_user_name_is_literal() {
    let tag = format!("{:08x}", rand::random::<u32>());
    let env = started(
        "producers-templates",
        json!({
            "guest": ["*"],
            format!("relay-{tag}-{{cluster}}"): ["*"],
            format!("relay-{tag}-prod-{{cluster}}"): ["prod-{cluster}"],
        }),
        |_| {},
    )
    .await;
    let prod = Producer::create(&format!("relay-{tag}-prod-a"), &env.exchange);
    let star = Producer::create(&format!("relay-{tag}-prod-a*"), &env.exchange);
    let own = task_for("prod-a", "prod-a", "own");
    let other = task_for("other", "other", "other");
    prod.publish(&env, &[own.clone(), other.clone()]).await;
    // As a wildcard, `prod-a*` would allow `prod-abc`.
    let wildcard = task_for("prod-abc", "prod-abc", "wildcard");
    star.publish(&env, std::slice::from_ref(&wildcard)).await;
    eventually!(
        Duration::from_secs(20),
        "own through, two refused",
        arrived(&env, &own) && dead_letters(&env).len() == 2
    );
    let letters = dead_letters(&env);
    assert!(
        letters
            .iter()
            .all(|(code, _)| code == "producer_not_allowed"),
        "{letters:?}"
    );
    assert!(!arrived(&env, &other) && !arrived(&env, &wildcard));
    env.cleanup().await;
}
