//! Producer identity (contract v1.2): an agent may only report for its own clusters.
//!
//! Every message carries the AMQP `user_id`, which RabbitMQ checks against the publishing
//! connection's user, so it proves who published. `RELAY_PRODUCER_ACL` maps broker users (or
//! `{cluster}` templates of user names) to the cluster name patterns they may publish for. The
//! check runs in memory at intake, before anything is stored; a refusal is dead-lettered with
//! its reason and never reaches ECS.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::relay::arn::{Arn, ClusterRef, Resource};
use crate::relay::config::{AuthMode, WorkerConfig};
use crate::relay::events::RedisFailed;
use crate::relay::metrics::{self as m, Op};
use crate::relay::store::Store;
use crate::relay::wire::{Event, Kind, Reject};

/// The placeholder of user-name templates and cluster patterns.
const CLUSTER: &str = "{cluster}";

/// One allowed cluster pattern. Without a `:` it is matched against the cluster's name; with
/// one it is an ARN pattern (`arn:<partition>:<service>:<region>:<account>:<type>/<name>`, or
/// `*` for the whole resource), matched field by field against the cluster's ARN. In either,
/// `*` matches any run of characters within one field, and `{cluster}` (in a name) the name
/// bound by a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Name(String),
    Arn {
        partition: String,
        service: String,
        region: String,
        account: String,
        kind: String,
        name: String,
    },
}

impl Pattern {
    /// Parses one pattern of the file; a pattern that could never match is a load error.
    fn parse(text: &str) -> Result<Pattern, String> {
        if !text.contains(':') {
            if text.contains('/') {
                return Err(format!(
                    "{text:?}: a cluster name never holds '/' (an ARN pattern has six ':'-separated fields)"
                ));
            }
            return Ok(Pattern::Name(text.into()));
        }
        let fields: Vec<&str> = text.split(':').collect();
        let [arn, partition, service, region, account, resource] = fields[..] else {
            return Err(format!(
                "{text:?}: an ARN pattern has six ':'-separated fields (arn:<partition>:ecs:<region>:<account>:cluster/<name>)"
            ));
        };
        if arn != "arn" {
            return Err(format!("{text:?}: an ARN pattern starts with \"arn:\""));
        }
        let (kind, name) = match resource {
            "*" => ("*", "*"),
            _ => resource.split_once('/').ok_or_else(|| {
                format!("{text:?}: the resource of an ARN pattern is <type>/<name> or *")
            })?,
        };
        let parts = [partition, service, region, account, kind];
        if name.contains('/') || parts.iter().any(|f| f.contains(CLUSTER)) {
            return Err(format!(
                "{text:?}: '/' cannot be in a cluster name, and {CLUSTER} only stands for one"
            ));
        }
        Ok(Pattern::Arn {
            partition: partition.into(),
            service: service.into(),
            region: region.into(),
            account: account.into(),
            kind: kind.into(),
            name: name.into(),
        })
    }

    fn uses_placeholder(&self) -> bool {
        match self {
            Pattern::Name(name) | Pattern::Arn { name, .. } => name.contains(CLUSTER),
        }
    }

    fn allows(&self, bound: Option<&str>, cluster: &Cluster<'_>) -> bool {
        match self {
            Pattern::Name(name) => name_matches(name, bound, cluster.name),
            Pattern::Arn {
                partition,
                service,
                region,
                account,
                kind,
                name,
            } => {
                glob(partition, cluster.partition)
                    && glob(service, "ecs")
                    && glob(region, cluster.region)
                    && glob(account, cluster.account)
                    && glob(kind, "cluster")
                    && name_matches(name, bound, cluster.name)
            }
        }
    }
}

/// A name pattern against a cluster name; the bound value is literal text.
fn name_matches(pattern: &str, bound: Option<&str>, name: &str) -> bool {
    match bound {
        Some(value) if pattern.contains(CLUSTER) => {
            glob(&pattern.replace(CLUSTER, &escape(value)), name)
        }
        _ if pattern.contains(CLUSTER) => false,
        _ => glob(pattern, name),
    }
}

/// A bound value may hold `*`: it stands for itself, so it is kept apart from wildcards.
const LITERAL_STAR: char = '\u{1}';

fn escape(value: &str) -> String {
    value.replace('*', &LITERAL_STAR.to_string())
}

/// `*` matches any run of characters (none included); [`LITERAL_STAR`] matches a `*`. Only
/// ever applied to one field: a field never holds `:` or `/`, so no run crosses into another.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Classic two-pointer wildcard match with backtracking to the last star.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && (p[i] == t[j] || (p[i] == LITERAL_STAR && t[j] == '*')) {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// A user-name template: `<prefix>{cluster}<suffix>`.
#[derive(Clone, Debug)]
struct Template {
    prefix: String,
    suffix: String,
    patterns: Vec<Pattern>,
}

impl Template {
    /// The part of `user` the placeholder covers (never empty), if the user has this shape.
    fn bind<'u>(&self, user: &'u str) -> Option<&'u str> {
        let rest = user.strip_prefix(&self.prefix)?;
        let bound = rest.strip_suffix(&self.suffix)?;
        (!bound.is_empty()).then_some(bound)
    }

    fn literal_len(&self) -> usize {
        self.prefix.len() + self.suffix.len()
    }

    /// Whether some user name has both shapes (equal literal lengths assumed).
    fn overlaps(&self, other: &Template) -> bool {
        (self.prefix.starts_with(&other.prefix) || other.prefix.starts_with(&self.prefix))
            && (self.suffix.ends_with(&other.suffix) || other.suffix.ends_with(&self.suffix))
    }
}

/// The rules of one ACL file.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    exact: HashMap<String, Vec<Pattern>>,
    /// Longest literal part first: the most specific template wins.
    templates: Vec<Template>,
}

/// The cluster a message is for, as the fields of its ARN: the name is matched by name
/// patterns, every field by ARN patterns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster<'a> {
    pub partition: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    pub name: &'a str,
}

/// What the ACL says of a user and a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The user matches no key.
    Unknown,
    /// The user's patterns do not cover the cluster.
    NotAllowed,
}

impl Acl {
    /// Parses the JSON file's text: `{"user or template": ["pattern", …], …}`.
    pub fn parse(text: &str) -> Result<Acl, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(entries) = value else {
            return Err("not a JSON object of user names to lists of cluster patterns".into());
        };
        let mut acl = Acl::default();
        for (key, list) in entries {
            let Value::Array(items) = list else {
                return Err(format!("{key:?}: not a list of cluster patterns"));
            };
            let mut patterns = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(p) if !p.is_empty() => {
                        patterns.push(Pattern::parse(&p).map_err(|e| format!("{key:?}: {e}"))?)
                    }
                    other => return Err(format!("{key:?}: {other} is not a cluster pattern")),
                }
            }
            match key.matches(CLUSTER).count() {
                0 => {
                    if patterns.iter().any(Pattern::uses_placeholder) {
                        return Err(format!(
                            "{key:?}: {CLUSTER} in a pattern needs a template key that binds it"
                        ));
                    }
                    acl.exact.insert(key, patterns);
                }
                1 => {
                    let (prefix, suffix) = key.split_once(CLUSTER).unwrap_or_default();
                    acl.templates.push(Template {
                        prefix: prefix.into(),
                        suffix: suffix.into(),
                        patterns,
                    });
                }
                _ => return Err(format!("{key:?}: a template has one {CLUSTER}")),
            }
        }
        acl.templates
            .sort_by_key(|t| std::cmp::Reverse(t.literal_len()));
        for (i, a) in acl.templates.iter().enumerate() {
            for b in &acl.templates[i + 1..] {
                if a.literal_len() == b.literal_len() && a.overlaps(b) {
                    return Err(format!(
                        "templates {:?} and {:?} could match the same user with equally long literal parts",
                        format!("{}{CLUSTER}{}", a.prefix, a.suffix),
                        format!("{}{CLUSTER}{}", b.prefix, b.suffix)
                    ));
                }
            }
        }
        Ok(acl)
    }

    /// An exact key wins; else the template with the longest literal part that fits.
    pub fn verdict(&self, user: &str, cluster: &Cluster<'_>) -> Verdict {
        let (patterns, bound) = match self.exact.get(user) {
            Some(p) => (p, None),
            None => match self
                .templates
                .iter()
                .find_map(|t| t.bind(user).map(|b| (&t.patterns, Some(b))))
            {
                Some(found) => found,
                None => return Verdict::Unknown,
            },
        };
        if patterns.iter().any(|p| p.allows(bound, cluster)) {
            Verdict::Allowed
        } else {
            Verdict::NotAllowed
        }
    }
}

/// What the relay can deliver, and who may ask: the check run on every decoded event.
pub struct Producers {
    mode: AuthMode,
    /// The relay's AWS Region: its ECS endpoint takes no other.
    region: String,
    /// `RELAY_ECS_ACCOUNTS`: the accounts the relay's ECS identity acts for (empty: any).
    accounts: Vec<String>,
    acl: RwLock<Arc<Acl>>,
    /// Which rules are in force (see [`Producers::rules`]).
    rules: RwLock<String>,
}

impl Producers {
    /// `rules` names the ACL in force (see [`Producers::rules`]).
    pub fn new(
        mode: AuthMode,
        acl: Acl,
        rules: String,
        region: &str,
        accounts: Vec<String>,
    ) -> Producers {
        Producers {
            mode,
            region: region.into(),
            accounts,
            acl: RwLock::new(Arc::new(acl)),
            rules: RwLock::new(rules),
        }
    }

    /// Which rules this worker runs: `off`, or the mode and a hash of the ACL file
    /// (`acl:1a2b3c4d`). Equal on every worker when all run the same rules.
    pub fn rules(&self) -> String {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    fn acl(&self) -> Arc<Acl> {
        self.acl.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, acl: Acl, rules: String) {
        *self.acl.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(acl);
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    /// Ok when the event may go on; the reject reason otherwise. In `audit` mode an identity
    /// refusal is counted and logged, and the event goes on.
    pub fn check(&self, user: Option<&str>, ev: &Event) -> Result<(), Reject> {
        // Decode checked the key's shape; what does not parse here is refused all the same.
        let (resource, code) = match ev.kind {
            Kind::Attachment => (Resource::Attachment, "attachment_arn"),
            _ => (Resource::Task, "task_arn"),
        };
        let Some(parts) = Arn::parse(&ev.key, resource) else {
            return Err(Reject::new(
                code,
                format!("{:?} is not an ECS {} ARN", ev.key, resource.as_str()),
            ));
        };
        // What the relay can deliver: whatever the mode says.
        if parts.region != self.region {
            return Err(Reject::new(
                "region_mismatch",
                format!(
                    "{} is in {}, the relay sends to {}",
                    ev.key, parts.region, self.region
                ),
            ));
        }
        if !self.accounts.is_empty() && !self.accounts.iter().any(|a| a == parts.account) {
            return Err(Reject::new(
                "account_mismatch",
                format!("account {} is not in RELAY_ECS_ACCOUNTS", parts.account),
            ));
        }
        if self.mode == AuthMode::Off {
            return Ok(());
        }
        match self.identity(user, ev, &parts) {
            Ok(()) => Ok(()),
            Err(reject) if self.mode == AuthMode::Audit => {
                m::producer_would_refuse(reject.code);
                const WHAT: &str =
                    "producer check would refuse this message (RELAY_PRODUCER_AUTH=audit: forwarded)";
                let site = std::panic::Location::caller();
                if let Some(held_back) = crate::relay::events::admit(site, reject.code, WHAT) {
                    tracing::warn!(reason = reject.code, detail = %reject.detail, held_back, "{WHAT}");
                }
                Ok(())
            }
            Err(reject) => Err(reject),
        }
    }

    fn identity(&self, user: Option<&str>, ev: &Event, key: &Arn<'_>) -> Result<(), Reject> {
        let cluster = cluster_of(ev, key)?;
        let Some(user) = user.filter(|u| !u.is_empty()) else {
            return Err(Reject::new(
                "producer_missing",
                "the message has no AMQP user_id",
            ));
        };
        match self.acl().verdict(user, &cluster) {
            Verdict::Allowed => Ok(()),
            Verdict::Unknown => Err(Reject::new(
                "producer_unknown",
                format!("user {user:?} matches no entry of RELAY_PRODUCER_ACL"),
            )),
            Verdict::NotAllowed => Err(Reject::new(
                "producer_not_allowed",
                format!(
                    "user {user:?} may not publish for cluster {:?}",
                    cluster.name
                ),
            )),
        }
    }
}

/// The event's cluster, checked against its key's ARN: a cluster ARN must name the key's
/// partition, Region and account, and a new-form ARN's cluster segment must be the cluster's
/// name. The cluster takes the key's partition, Region and account.
fn cluster_of<'e>(ev: &'e Event, key: &Arn<'e>) -> Result<Cluster<'e>, Reject> {
    let mismatch = |detail: String| Err(Reject::new("cluster_mismatch", detail));
    let Some(cluster) = ClusterRef::parse(&ev.cluster) else {
        return Err(Reject::new(
            "cluster_invalid",
            format!(
                "cluster {:?} is neither a cluster name nor a cluster ARN",
                ev.cluster
            ),
        ));
    };
    if let ClusterRef::Arn(c) = cluster {
        if (c.partition, c.region, c.account) != (key.partition, key.region, key.account) {
            return mismatch(format!(
                "cluster {:?} is in another partition, account or Region than {}",
                ev.cluster, ev.key
            ));
        }
    }
    let name = cluster.name();
    // `task/<cluster>/<id>` names its cluster; the old `task/<id>` form does not.
    if let Some(segment) = key.cluster_segment() {
        if segment != name {
            return mismatch(format!("cluster {name:?} but the ARN names {segment:?}"));
        }
    }
    Ok(Cluster {
        partition: key.partition,
        region: key.region,
        account: key.account,
        name,
    })
}

/// The worker's producer check, from its configuration: the ACL read at start (a missing or
/// broken file is an error), or none with `off` (a warning: anyone may report for anything).
pub fn start(cfg: &WorkerConfig, region: &str) -> anyhow::Result<Producers> {
    let (acl, rules) = match (cfg.producer_auth, &cfg.producer_acl) {
        (AuthMode::Off, _) => {
            tracing::warn!("RELAY_PRODUCER_AUTH=off: any producer may report for any cluster");
            (Acl::default(), "off".to_string())
        }
        (mode, Some(path)) => {
            let (acl, bytes) = load(path)?;
            m::producer_acl_hash(hash(&bytes));
            (acl, rules_id(mode, &bytes))
        }
        (_, None) => anyhow::bail!("RELAY_PRODUCER_AUTH needs RELAY_PRODUCER_ACL"),
    };
    Ok(Producers::new(
        cfg.producer_auth,
        acl,
        rules,
        region,
        cfg.ecs_accounts(),
    ))
}

/// `acl:1a2b3c4d`: the mode and a hash of the file.
fn rules_id(mode: AuthMode, bytes: &[u8]) -> String {
    format!("{}:{:08x}", mode.as_str(), hash(bytes))
}

/// Reads the ACL file (at start an error stops the worker): the rules and the file's bytes.
fn load(path: &Path) -> anyhow::Result<(Acl, Vec<u8>)> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read RELAY_PRODUCER_ACL {}: {e}", path.display()))?;
    let acl = std::str::from_utf8(&bytes)
        .map_err(|e| e.to_string())
        .and_then(Acl::parse)
        .map_err(|e| anyhow::anyhow!("RELAY_PRODUCER_ACL {}: {e}", path.display()))?;
    Ok((acl, bytes))
}

/// How often the file is looked at: a change takes effect within this (well under 10 s).
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Until cancelled: reads `path` (the ACL, unless the check is off) again whenever it changes,
/// and records the rules in force in Redis for `status` (`worker`'s entry) and in the
/// `relay_producer_acl_hash` gauge. A file that does not parse, or is gone, keeps the rules in
/// force (logged and counted).
pub async fn maintain(
    producers: Arc<Producers>,
    path: Option<PathBuf>,
    store: Store,
    worker: String,
    joined: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    // What the file held when last looked at: at first, what `start` loaded (not a second
    // read, which could see a newer file and take it as already applied).
    let mut seen = Some(producers.rules());
    loop {
        // Registered before the write: a heartbeat that makes the worker live meanwhile
        // brings the next write forward (entries are only written while live).
        let rejoined = joined.notified();
        // Recorded on every pass, changed or not: the entry of a worker that was not live for
        // a while (starting, paused, without RabbitMQ) is reaped, and so is one a store lost.
        if let Err(e) = store.set_producer_rules(&worker, &producers.rules()).await {
            RedisFailed {
                op: Op::ProducerRules,
                what: "cannot record the producer rules in force; retrying",
                error: &e,
            }
            .emit();
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
            _ = rejoined => {}
        }
        if let Some(path) = &path {
            reload(&producers, path, &mut seen);
        }
    }
}

/// Reads the file again if it changed since `seen` (its rules id; None while it is unreadable).
fn reload(producers: &Producers, path: &Path, seen: &mut Option<String>) {
    let now = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            if seen.take().is_some() {
                tracing::warn!(path = %path.display(), error = %e,
                    "RELAY_PRODUCER_ACL unreadable; the previous rules stay in force");
                m::producer_acl_reload("failed");
            }
            return;
        }
    };
    let id = rules_id(producers.mode, &now);
    if seen.as_ref() == Some(&id) {
        return;
    }
    let parsed = std::str::from_utf8(&now)
        .map_err(|e| e.to_string())
        .and_then(Acl::parse);
    match parsed {
        Ok(acl) => {
            producers.replace(acl, id.clone());
            m::producer_acl_hash(hash(&now));
            m::producer_acl_reload("ok");
            tracing::info!(path = %path.display(), "RELAY_PRODUCER_ACL reloaded");
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "RELAY_PRODUCER_ACL does not parse; the previous rules stay in force");
            m::producer_acl_reload("failed");
        }
    }
    *seen = Some(id);
}

/// A short, stable fingerprint of the file (FNV-1a), for the rules-in-force gauge.
fn hash(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "123456789012";

    fn expect(acl: &Acl, user: &str, name: &str, verdict: Verdict) {
        assert_eq!(
            acl.verdict(user, &cluster(name)),
            verdict,
            "{user} for {name}"
        );
    }

    fn cluster(name: &str) -> Cluster<'_> {
        Cluster {
            partition: "aws",
            region: "us-east-1",
            account: ACCOUNT,
            name,
        }
    }

    fn event(task_cluster: &str, cluster: &str) -> Event {
        Event {
            event_id: "e-1".into(),
            kind: Kind::Task,
            key: format!("arn:aws:ecs:us-east-1:{ACCOUNT}:task/{task_cluster}/abc"),
            cluster: cluster.into(),
            known_task_status: None,
            stored: String::new(),
            task_times: [None, None, None],
        }
    }

    fn producers(mode: AuthMode, acl: &str, accounts: &[&str]) -> Producers {
        Producers::new(
            mode,
            Acl::parse(acl).expect("a valid ACL"),
            "test".into(),
            "us-east-1",
            accounts.iter().map(|a| a.to_string()).collect(),
        )
    }

    fn reason(p: &Producers, user: Option<&str>, ev: &Event) -> &'static str {
        p.check(user, ev).err().map_or("ok", |r| r.code)
    }

    #[test]
    fn exact_keys_templates_and_globs() {
        let acl = Acl::parse(
            r#"{"ecs-agent-{cluster}": ["{cluster}"], "agent-batch": ["batch-*"], "ops": ["*"]}"#,
        )
        .unwrap();
        expect(&acl, "ecs-agent-alpha", "alpha", Verdict::Allowed);
        expect(&acl, "ecs-agent-alpha", "beta-1", Verdict::NotAllowed);
        expect(&acl, "agent-batch", "batch-7", Verdict::Allowed);
        expect(&acl, "agent-batch", "alpha", Verdict::NotAllowed);
        expect(&acl, "ops", "anything", Verdict::Allowed);
        expect(&acl, "nobody", "alpha", Verdict::Unknown);
        expect(&acl, "ecs-agent-", "", Verdict::Unknown);
    }

    #[test]
    fn the_longest_literal_template_wins_and_a_tie_is_a_load_error() {
        let acl =
            Acl::parse(r#"{"agent-{cluster}": ["*"], "agent-prod-{cluster}": ["prod-{cluster}"]}"#)
                .unwrap();
        expect(&acl, "agent-prod-x", "prod-x", Verdict::Allowed);
        expect(&acl, "agent-prod-x", "other", Verdict::NotAllowed);
        let err = Acl::parse(r#"{"a{cluster}bc": ["*"], "ab{cluster}c": ["*"]}"#).unwrap_err();
        assert!(err.contains("could match the same user"), "{err}");
    }

    #[test]
    fn an_exact_key_wins_over_a_template() {
        let acl =
            Acl::parse(r#"{"agent-{cluster}": ["{cluster}"], "agent-ops": ["ops-*"]}"#).unwrap();
        expect(&acl, "agent-ops", "ops-1", Verdict::Allowed);
        expect(&acl, "agent-ops", "ops", Verdict::NotAllowed);
    }

    #[test]
    fn a_star_in_a_user_name_is_bound_literally() {
        let acl = Acl::parse(r#"{"agent-{cluster}": ["{cluster}"]}"#).unwrap();
        expect(&acl, "agent-*", "*", Verdict::Allowed);
        expect(&acl, "agent-*", "alpha", Verdict::NotAllowed);
        expect(&acl, "agent-a*", "abc", Verdict::NotAllowed);
    }

    #[test]
    fn arn_patterns_tell_apart_same_named_clusters_of_two_accounts() {
        let acl = Acl::parse(r#"{"agent": ["arn:aws:ecs:*:123456789012:cluster/prod"]}"#).unwrap();
        expect(&acl, "agent", "prod", Verdict::Allowed);
        let other = Cluster {
            account: "210987654321",
            ..cluster("prod")
        };
        assert_eq!(acl.verdict("agent", &other), Verdict::NotAllowed);
    }

    #[test]
    fn broken_files_are_refused_with_a_reason() {
        for (text, says) in [
            ("not json", "not JSON"),
            ("[]", "not a JSON object"),
            (r#"{"a": "x"}"#, "not a list"),
            (r#"{"a": [1]}"#, "not a cluster pattern"),
            (r#"{"a": ["{cluster}"]}"#, "needs a template key"),
            (r#"{"{cluster}-{cluster}": ["*"]}"#, "one {cluster}"),
        ] {
            let err = Acl::parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn every_reason_of_the_check() {
        let acl = r#"{"ecs-agent-{cluster}": ["{cluster}"]}"#;
        let p = producers(AuthMode::Acl, acl, &[ACCOUNT]);
        let alpha = event("alpha", "alpha");
        assert_eq!(reason(&p, Some("ecs-agent-alpha"), &alpha), "ok");
        assert_eq!(reason(&p, None, &alpha), "producer_missing");
        assert_eq!(reason(&p, Some(""), &alpha), "producer_missing");
        assert_eq!(reason(&p, Some("stranger"), &alpha), "producer_unknown");
        assert_eq!(
            reason(&p, Some("ecs-agent-alpha"), &event("beta-1", "beta-1")),
            "producer_not_allowed"
        );
        assert_eq!(
            reason(&p, Some("ecs-agent-alpha"), &event("beta-1", "alpha")),
            "cluster_mismatch"
        );
        let arn_cluster = format!("arn:aws:ecs:us-east-1:{ACCOUNT}:cluster/alpha");
        assert_eq!(
            reason(&p, Some("ecs-agent-alpha"), &event("alpha", &arn_cluster)),
            "ok",
            "a cluster ARN in `cluster`"
        );
        let foreign = "arn:aws:ecs:us-east-1:210987654321:cluster/alpha";
        assert_eq!(
            reason(&p, Some("ecs-agent-alpha"), &event("alpha", foreign)),
            "cluster_mismatch"
        );
        let mut elsewhere = event("alpha", "alpha");
        elsewhere.key = elsewhere.key.replace("us-east-1", "eu-west-1");
        assert_eq!(
            reason(&p, Some("ecs-agent-alpha"), &elsewhere),
            "region_mismatch"
        );
        let mut other_account = event("alpha", "alpha");
        other_account.key = other_account.key.replace(ACCOUNT, "210987654321");
        assert_eq!(
            reason(&p, Some("ecs-agent-alpha"), &other_account),
            "account_mismatch"
        );
    }

    #[test]
    fn audit_forwards_and_off_checks_only_what_the_relay_can_deliver() {
        let acl = r#"{"ecs-agent-{cluster}": ["{cluster}"]}"#;
        let beta = event("beta-1", "beta-1");
        let audit = producers(AuthMode::Audit, acl, &[]);
        assert_eq!(reason(&audit, Some("ecs-agent-alpha"), &beta), "ok");
        assert_eq!(reason(&audit, None, &beta), "ok");
        let off = producers(AuthMode::Off, "{}", &[ACCOUNT]);
        assert_eq!(reason(&off, None, &beta), "ok");
        let mut elsewhere = beta.clone();
        elsewhere.key = elsewhere.key.replace("us-east-1", "eu-west-1");
        assert_eq!(reason(&off, None, &elsewhere), "region_mismatch");
    }
}
