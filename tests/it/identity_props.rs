//! The producer check (contract v1.2) against a reference model: a second, deliberately plain
//! implementation of the decision — split every value into its fields, compare field by field —
//! and a property test that generates events of every type, task ARNs of both forms, cluster
//! values that try to smuggle ARN fields (`:`, `/`, `*`, unicode, case changes), and ACLs with
//! templates and ARN patterns, and asks for the relay's verdict (decode, then the check) to
//! equal the model's.

use ecs_state_relay::relay::arn::PARTITIONS;
use ecs_state_relay::relay::config::AuthMode;
use ecs_state_relay::relay::producers::{Acl, Producers};
use ecs_state_relay::relay::wire;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const REGION: &str = "us-east-1";
const OWN: &str = "123456789012";
const FOREIGN: &str = "210987654321";

// ---------------------------------------------------------------- the model

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn region_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// An ARN's fields: partition, region, account, resource type, and the path after the type
/// split at `/`.
struct Fields {
    partition: String,
    region: String,
    account: String,
    kind: String,
    path: Vec<String>,
}

/// Splits at every `:` (exactly six fields) and the resource at every `/`.
fn fields(s: &str) -> Option<Fields> {
    let f: Vec<&str> = s.split(':').collect();
    if f.len() != 6 || f[0] != "arn" || f[2] != "ecs" {
        return None;
    }
    let mut resource = f[5].split('/');
    let kind = resource.next()?.to_string();
    Some(Fields {
        partition: f[1].into(),
        region: f[3].into(),
        account: f[4].into(),
        kind,
        path: resource.map(str::to_string).collect(),
    })
}

/// A key ARN of `kind` (`task`, `attachment`): well formed in every field.
fn key_fields(s: &str, kind: &str) -> Option<Fields> {
    let f = fields(s)?;
    let ok = PARTITIONS.contains(&f.partition.as_str())
        && region_ok(&f.region)
        && f.account.len() == 12
        && f.account.chars().all(|c| c.is_ascii_digit())
        && f.kind == kind
        && (1..=2).contains(&f.path.len())
        && f.path.iter().all(|p| name_ok(p));
    ok.then_some(f)
}

/// `*` matches any run; everything else (a bound name included) stands for itself.
#[derive(Clone, Copy, PartialEq)]
enum Tok {
    Any,
    Char(char),
}

fn tokens(pattern: &str, bound: Option<&str>) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    let mut pieces = pattern.split("{cluster}").peekable();
    while let Some(piece) = pieces.next() {
        out.extend(
            piece
                .chars()
                .map(|c| if c == '*' { Tok::Any } else { Tok::Char(c) }),
        );
        if pieces.peek().is_some() {
            out.extend(bound?.chars().map(Tok::Char));
        }
    }
    Some(out)
}

fn matches(p: &[Tok], t: &[char]) -> bool {
    match p.split_first() {
        None => t.is_empty(),
        Some((Tok::Any, rest)) => (0..=t.len()).any(|i| matches(rest, &t[i..])),
        Some((Tok::Char(c), rest)) => t.first() == Some(c) && matches(rest, &t[1..]),
    }
}

fn glob(pattern: &str, bound: Option<&str>, text: &str) -> bool {
    let t: Vec<char> = text.chars().collect();
    tokens(pattern, bound).is_some_and(|p| matches(&p, &t))
}

/// The cluster a change is for, as the check sees it.
struct Target {
    partition: String,
    region: String,
    account: String,
    name: String,
}

fn allows(pattern: &str, bound: Option<&str>, c: &Target) -> bool {
    if !pattern.contains(':') {
        return glob(pattern, bound, &c.name);
    }
    let f: Vec<&str> = pattern.split(':').collect();
    if f.len() != 6 {
        return false;
    }
    let (kind, name) = if f[5] == "*" {
        ("*", "*")
    } else {
        match f[5].split_once('/') {
            Some(split) => split,
            None => return false,
        }
    };
    glob(f[0], None, "arn")
        && glob(f[1], None, &c.partition)
        && glob(f[2], None, "ecs")
        && glob(f[3], None, &c.region)
        && glob(f[4], None, &c.account)
        && glob(kind, None, "cluster")
        && glob(name, bound, &c.name)
}

/// The ACL as (key, patterns) pairs.
type Rules = Vec<(String, Vec<String>)>;

fn acl_verdict(rules: &Rules, user: &str, c: &Target) -> &'static str {
    let mut candidates: Vec<(usize, &Vec<String>, Option<&str>)> = Vec::new();
    for (key, patterns) in rules {
        match key.split_once("{cluster}") {
            None if key == user => return verdict(patterns, None, c),
            None => {}
            Some((prefix, suffix)) => {
                if let Some(bound) = user
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_suffix(suffix))
                    .filter(|b| !b.is_empty())
                {
                    candidates.push((prefix.len() + suffix.len(), patterns, Some(bound)));
                }
            }
        }
    }
    match candidates.into_iter().max_by_key(|(len, _, _)| *len) {
        Some((_, patterns, bound)) => verdict(patterns, bound, c),
        None => "producer_unknown",
    }
}

fn verdict(patterns: &[String], bound: Option<&str>, c: &Target) -> &'static str {
    if patterns.iter().any(|p| allows(p, bound, c)) {
        "ok"
    } else {
        "producer_not_allowed"
    }
}

/// One generated case.
#[derive(Clone, Debug)]
struct Case {
    kind: &'static str,
    task_arn: String,
    attachment_arn: String,
    cluster: String,
    user: Option<String>,
    rules: Rules,
    accounts: Vec<String>,
}

impl Case {
    fn key(&self) -> &str {
        if self.kind == "attachment" {
            &self.attachment_arn
        } else {
            &self.task_arn
        }
    }
}

/// What the contract says of `case`: "ok" or the reject reason.
fn model(case: &Case) -> &'static str {
    let key = if case.kind == "attachment" {
        match key_fields(&case.attachment_arn, "attachment") {
            Some(f) => f,
            None => return "attachment_arn",
        }
    } else {
        match key_fields(&case.task_arn, "task") {
            Some(f) => f,
            None => return "task_arn",
        }
    };
    if case.kind == "taskAttachment" {
        match key_fields(&case.attachment_arn, "attachment") {
            Some(a)
                if (&a.partition, &a.region, &a.account)
                    == (&key.partition, &key.region, &key.account) => {}
            _ => return "attachment_arn",
        }
    }
    let cluster = if case.cluster.starts_with("arn:") {
        match fields(&case.cluster) {
            Some(f)
                if PARTITIONS.contains(&f.partition.as_str())
                    && region_ok(&f.region)
                    && f.account.len() == 12
                    && f.account.chars().all(|c| c.is_ascii_digit())
                    && f.kind == "cluster"
                    && f.path.len() == 1
                    && name_ok(&f.path[0]) =>
            {
                Some(f)
            }
            _ => return "cluster_invalid",
        }
    } else if name_ok(&case.cluster) {
        None
    } else {
        return "cluster_invalid";
    };
    if key.region != REGION {
        return "region_mismatch";
    }
    if !case.accounts.is_empty() && !case.accounts.contains(&key.account) {
        return "account_mismatch";
    }
    let name = match &cluster {
        Some(f) => {
            if (&f.partition, &f.region, &f.account) != (&key.partition, &key.region, &key.account)
            {
                return "cluster_mismatch";
            }
            f.path[0].clone()
        }
        None => case.cluster.clone(),
    };
    if key.path.len() == 2 && key.path[0] != name {
        return "cluster_mismatch";
    }
    let Some(user) = case.user.as_deref().filter(|u| !u.is_empty()) else {
        return "producer_missing";
    };
    let target = Target {
        partition: key.partition,
        region: key.region,
        account: key.account,
        name,
    };
    acl_verdict(&case.rules, user, &target)
}

// ---------------------------------------------------------------- the relay

fn relay(case: &Case) -> &'static str {
    let mut v = json!({"schemaVersion":1,"eventId":"e-1","type":case.kind,"cluster":case.cluster,
        "occurredAt":"2026-12-07T10:00:00Z","status":"RUNNING","containerName":"web",
        "managedAgentName":"ExecuteCommandAgent","attachmentArn":case.attachment_arn,
        "expiresAt":"2099-01-01T00:00:00Z","attachmentType":"eni"});
    match case.kind {
        "attachment" => v["status"] = json!("ATTACHED"),
        "taskAttachment" => v["status"] = json!("ATTACHED"),
        _ => {}
    }
    if case.kind != "attachment" {
        v["taskArn"] = json!(case.task_arn);
    }
    let ev = match wire::decode(v.to_string().as_bytes(), case.key()) {
        Ok(ev) => ev,
        Err(r) => return r.code,
    };
    let acl: Map<String, Value> = case
        .rules
        .iter()
        .map(|(k, p)| (k.clone(), json!(p)))
        .collect();
    let acl = Acl::parse(&Value::Object(acl).to_string()).expect("the generated ACL loads");
    let producers = Producers::new(
        AuthMode::Acl,
        acl,
        "test".into(),
        REGION,
        case.accounts.clone(),
    );
    producers
        .check(case.user.as_deref(), &ev)
        .err()
        .map_or("ok", |r| r.code)
}

// ---------------------------------------------------------------- the generators

/// Cluster names, mostly well formed, else trying to smuggle ARN fields.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["prod", "prod-1", "Prod", "beta_2", "p"]).prop_map(String::from),
        2 => prop::sample::select(vec![
            "x:123456789012:cluster/prod",
            "x:210987654321:cluster/prod",
            "prod/extra",
            "prod*",
            "*",
            "prodé",
            "PROD",
            "prod ",
        ]).prop_map(String::from),
        1 => "[a-zA-Z0-9_:/*é-]{1,12}",
    ]
}

fn partition() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => Just("aws".to_string()),
        1 => Just("aws-cn".to_string()),
        1 => Just("aws-iso-b".to_string()),
        1 => Just("awsx".to_string()),
    ]
}

fn region() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => Just(REGION.to_string()),
        1 => Just("eu-west-1".to_string()),
        1 => Just("US-EAST-1".to_string()),
    ]
}

fn account() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => Just(OWN.to_string()),
        2 => Just(FOREIGN.to_string()),
        1 => Just("1234".to_string()),
    ]
}

/// A task ARN, old form (`task/<id>`) or new (`task/<cluster>/<id>`).
fn task_arn() -> impl Strategy<Value = String> {
    (
        partition(),
        region(),
        account(),
        prop::option::of(name()),
        "[a-f0-9]{1,8}",
    )
        .prop_map(|(p, r, a, cluster, id)| match cluster {
            Some(c) => format!("arn:{p}:ecs:{r}:{a}:task/{c}/{id}"),
            None => format!("arn:{p}:ecs:{r}:{a}:task/{id}"),
        })
}

fn attachment_arn() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (partition(), region(), account(), "[a-f0-9-]{1,12}")
            .prop_map(|(p, r, a, id)| format!("arn:{p}:ecs:{r}:{a}:attachment/{id}")),
        1 => prop::sample::select(vec![
            "x",
            "arn:aws:ec2:us-east-1:123456789012:eni-attachment/a",
            "arn:aws:ecs:us-east-1:123456789012:task/a",
        ]).prop_map(String::from),
    ]
}

/// A cluster value: a name, or a cluster ARN (perhaps another account's, perhaps smuggling).
fn cluster() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => name(),
        2 => (partition(), region(), account(), name())
            .prop_map(|(p, r, a, n)| format!("arn:{p}:ecs:{r}:{a}:cluster/{n}")),
    ]
}

fn pattern() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "*",
        "prod",
        "prod*",
        "Prod",
        "{cluster}",
        "{cluster}-*",
        "arn:aws:ecs:*:123456789012:cluster/prod",
        "arn:aws:ecs:*:123456789012:*",
        "arn:*:ecs:us-east-1:123456789012:cluster/{cluster}",
        "arn:aws:ecs:*:*:cluster/p*",
        "arn:aws:ecs:us-east-1:210987654321:cluster/*",
    ])
    .prop_map(String::from)
}

fn rules() -> impl Strategy<Value = Rules> {
    let key = prop::sample::select(vec!["agent", "ops", "ecs-agent-{cluster}", "ecs-{cluster}"]);
    prop::collection::btree_map(key, prop::collection::vec(pattern(), 1..3), 1..4).prop_map(|m| {
        m.into_iter()
            .map(|(k, patterns)| {
                // `{cluster}` in a pattern needs a template key that binds it.
                let patterns = if k.contains("{cluster}") {
                    patterns
                } else {
                    patterns
                        .into_iter()
                        .map(|p| p.replace("{cluster}", "prod"))
                        .collect()
                };
                (k.to_string(), patterns)
            })
            .collect()
    })
}

fn user() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.9,
        prop_oneof![
            prop::sample::select(vec![
                "agent",
                "ops",
                "stranger",
                "",
                "ecs-agent-",
                "ecs-agent-*"
            ])
            .prop_map(String::from),
            name().prop_map(|n| format!("ecs-agent-{n}")),
            name().prop_map(|n| format!("ecs-{n}")),
        ],
    )
}

fn case() -> impl Strategy<Value = Case> {
    let kind = prop::sample::select(vec![
        "task",
        "container",
        "managedAgent",
        "taskAttachment",
        "attachment",
    ]);
    let accounts = prop::sample::select(vec![vec![], vec![OWN.to_string()]]);
    (
        kind,
        task_arn(),
        attachment_arn(),
        cluster(),
        user(),
        rules(),
        accounts,
    )
        .prop_map(
            |(kind, task_arn, attachment_arn, cluster, user, rules, accounts)| Case {
                kind,
                task_arn,
                attachment_arn,
                cluster,
                user,
                rules,
                accounts,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn the_relay_decides_as_the_model_on_every_event_type(case in case()) {
        prop_assert_eq!(relay(&case), model(&case), "{:?}", case);
    }
}

/// The two defects of issue 34, as fixed cases (the property test finds them too).
#[test]
fn a_non_arn_attachment_key_and_a_smuggled_cluster_name_are_refused() {
    let attachment = Case {
        kind: "attachment",
        task_arn: String::new(),
        attachment_arn: "x".into(),
        cluster: format!("arn:aws:ecs:{REGION}:{FOREIGN}:cluster/prod"),
        user: None,
        rules: vec![("agent".into(), vec!["prod".into()])],
        accounts: vec![OWN.into()],
    };
    assert_eq!(relay(&attachment), "attachment_arn");
    let smuggled = Case {
        kind: "task",
        task_arn: format!("arn:aws:ecs:{REGION}:{FOREIGN}:task/0123abcd"),
        attachment_arn: String::new(),
        cluster: format!("x:{OWN}:cluster/prod"),
        user: Some("agent".into()),
        rules: vec![(
            "agent".into(),
            vec![format!("arn:aws:ecs:*:{OWN}:cluster/prod")],
        )],
        accounts: vec![],
    };
    assert_eq!(relay(&smuggled), "cluster_invalid");
    assert_eq!(model(&attachment), "attachment_arn");
    assert_eq!(model(&smuggled), "cluster_invalid");
}

/// The generators reach every verdict, and allowed changes of every type: a property that only
/// ever saw refusals would prove nothing about what goes through.
#[test]
fn the_generated_cases_reach_every_verdict_and_every_type_is_allowed_somewhere() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut seen = std::collections::BTreeMap::<(&str, &str), usize>::new();
    for _ in 0..4000 {
        let case = case().new_tree(&mut runner).expect("a case").current();
        *seen.entry((model(&case), case.kind)).or_default() += 1;
    }
    let by_verdict = |v: &str| -> usize {
        seen.iter()
            .filter(|((verdict, _), _)| *verdict == v)
            .map(|(_, n)| n)
            .sum()
    };
    println!("{seen:?}");
    for verdict in [
        "ok",
        "task_arn",
        "attachment_arn",
        "cluster_invalid",
        "region_mismatch",
        "account_mismatch",
        "cluster_mismatch",
        "producer_missing",
        "producer_unknown",
        "producer_not_allowed",
    ] {
        assert!(
            by_verdict(verdict) >= 20,
            "{verdict}: {}",
            by_verdict(verdict)
        );
    }
    for kind in [
        "task",
        "container",
        "managedAgent",
        "taskAttachment",
        "attachment",
    ] {
        let allowed = seen.get(&("ok", kind)).copied().unwrap_or(0);
        assert!(allowed >= 10, "{kind} allowed {allowed} times");
    }
}
