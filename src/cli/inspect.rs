//! `inspect <taskArn | attachmentArn>`: "where is my task?" — what Redis holds of it (sent
//! statuses, outbox, batch, its last submissions) and what the worker owning its shard holds
//! in memory (in flight, waiting for a permit, backing off with its last error). Read-only.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::relay::config::ConnConfig;
use crate::relay::schedule::Live;
use crate::relay::store::{KeyView, Store};
use crate::relay::wire::{
    self, BatchItem, Change, OutboxEntry, AGENT_STATUSES, CONTAINER_STATUSES, TASK_STATUSES,
};

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub conn: ConnConfig,
    #[arg(long, env = "RELAY_SHARDS", default_value_t = 16)]
    pub shards: u16,
    /// A task ARN, or the ARN of an instance-level attachment (task attachments show under
    /// their task).
    pub key: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How long `inspect` waits for the owning worker's answer.
const ASK_OWNER_FOR: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
pub struct Report {
    pub key: String,
    /// False: the relay holds no state for it (never seen, or expired after the retention).
    pub held: bool,
    pub shard: Option<u16>,
    pub owner: Option<String>,
    /// Sent statuses: `task`, `container <name>`, `agent <container>/<name>`, `attachment <arn>`.
    pub sent: BTreeMap<String, String>,
    /// The latest task status the relay knows (what drained changes report).
    pub known_status: Option<String>,
    /// Waiting changes, head first.
    pub outbox: Vec<Waiting>,
    /// Container and managed-agent changes waiting for a task change.
    pub batch: Vec<Batched>,
    /// The last submissions, newest first.
    pub history: Vec<Submission>,
    /// The owner's live view; None when it could not be asked (see `live_unknown`).
    pub live: Option<Live>,
    /// Why the live state is unknown, when it is.
    pub live_unknown: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Waiting {
    pub id: String,
    pub status: String,
    /// Since the change occurred (absent on drained changes).
    pub age_ms: Option<u64>,
    pub containers: usize,
}

/// One of a task's last submissions, as the completion script recorded it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Submission {
    /// When it was recorded (Redis TIME, ms since the epoch).
    pub at: i64,
    #[serde(rename(deserialize = "w"))]
    pub worker: String,
    #[serde(rename(deserialize = "s"))]
    pub status: Option<String>,
    #[serde(rename(deserialize = "c"))]
    pub containers: usize,
    /// ECS calls it took (0: none was needed).
    #[serde(rename(deserialize = "n"))]
    pub calls: u32,
    /// ECS's answer, or why no call was needed.
    #[serde(rename(deserialize = "a"))]
    pub answer: String,
}

#[derive(Debug, Serialize)]
pub struct Batched {
    pub kind: &'static str,
    pub name: String,
    pub status: String,
}

fn status_name(vocab: &[&str], index: &str) -> String {
    index
        .parse::<usize>()
        .ok()
        .and_then(|i| vocab.get(i))
        .map_or_else(|| format!("?{index}"), |s| s.to_string())
}

fn sent(view: &KeyView) -> BTreeMap<String, String> {
    let mut sent = BTreeMap::new();
    for (field, value) in &view.state.0 {
        let named = if field == "s" {
            Some(("task".to_string(), status_name(&TASK_STATUSES, value)))
        } else if let Some(name) = field.strip_prefix("c:") {
            Some((
                format!("container {name}"),
                status_name(&CONTAINER_STATUSES, value),
            ))
        } else if let Some(rest) = field.strip_prefix("m:") {
            let rest = rest.replace('\u{1f}', "/");
            Some((format!("agent {rest}"), status_name(&AGENT_STATUSES, value)))
        } else {
            field.strip_prefix("a:").map(|arn| {
                let s = if value == "1" { "sent" } else { value.as_str() };
                (format!("attachment {arn}"), s.to_string())
            })
        };
        if let Some((what, status)) = named {
            sent.insert(what, status);
        }
    }
    sent
}

fn waiting(raw: &str, now_ms: i64) -> Waiting {
    match serde_json::from_str::<OutboxEntry>(raw) {
        Ok(e) => Waiting {
            status: match &e.e {
                Change::Task(t) => t.status.clone(),
                Change::Attachment(a) => format!("attachment {}", a.status),
            },
            age_ms: e.t.map(|t| u64::try_from(now_ms - t).unwrap_or(0)),
            containers: e.b.len(),
            id: e.id,
        },
        Err(e) => Waiting {
            id: "?".into(),
            status: format!("unreadable entry ({e})"),
            age_ms: None,
            containers: 0,
        },
    }
}

fn batched(raw: &str) -> Batched {
    match serde_json::from_str::<BatchItem>(raw) {
        Ok(BatchItem::Container(c)) => Batched {
            kind: "container",
            name: c.container_name,
            status: c.status,
        },
        Ok(BatchItem::Agent(a)) => Batched {
            kind: "managed agent",
            name: format!("{}/{}", a.container_name, a.managed_agent_name),
            status: a.status,
        },
        Err(e) => Batched {
            kind: "unreadable",
            name: e.to_string(),
            status: String::new(),
        },
    }
}

/// Asks the owner's metrics port for its live view of `key`.
async fn ask_owner(store: &Store, owner: &str, key: &str) -> Result<Option<Live>, String> {
    let addr = store
        .worker_addr(owner)
        .await
        .map_err(|e| format!("cannot read the owner's address: {e}"))?
        .ok_or_else(|| {
            format!("{owner} announced no inspect address (RELAY_METRICS_ADDR empty, or RELAY_INSPECT=off)")
        })?;
    let url = format!("http://{addr}/inspect");
    let http = reqwest::Client::builder()
        .timeout(ASK_OWNER_FOR)
        .build()
        .map_err(|e| e.to_string())?;
    let answer: Value = http
        .get(&url)
        .query(&[("key", key)])
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("{owner} did not answer at {addr}: {e}"))?
        .json()
        .await
        .map_err(|e| format!("{owner} answered at {addr} with something else: {e}"))?;
    serde_json::from_value::<Option<LiveAnswer>>(answer["live"].clone())
        .map(|live| live.map(LiveAnswer::into_live))
        .map_err(|e| format!("{owner} answered at {addr} with something else: {e}"))
}

/// [`Live`] as it comes over the wire (its state is an owned string there).
#[derive(serde::Deserialize)]
struct LiveAnswer {
    state: String,
    for_ms: Option<u64>,
    attempts: u32,
    last_error: Option<String>,
    next_attempt_in_ms: Option<u64>,
}

impl LiveAnswer {
    fn into_live(self) -> Live {
        let state = [
            "waiting for a runner",
            "reading",
            "waiting for a permit",
            "in flight",
            "backing off",
        ]
        .into_iter()
        .find(|s| *s == self.state)
        .unwrap_or("unknown");
        Live {
            state,
            for_ms: self.for_ms,
            attempts: self.attempts,
            last_error: self.last_error,
            next_attempt_in_ms: self.next_attempt_in_ms,
        }
    }
}

pub async fn collect(args: &InspectArgs) -> anyhow::Result<Report> {
    let mut conn = args.conn.clone();
    conn.resolve_secrets()?;
    let store = Store::open(&conn).await?;
    let Some(view) = store.key_view(args.shards, &args.key).await? else {
        return Ok(Report {
            key: args.key.clone(),
            held: false,
            shard: None,
            owner: None,
            sent: BTreeMap::new(),
            known_status: None,
            outbox: Vec::new(),
            batch: Vec::new(),
            history: Vec::new(),
            live: None,
            live_unknown: Some("the relay holds no state for it".into()),
        });
    };
    let now = wire::now_ms();
    let (live, live_unknown) = match &view.owner {
        None => (None, Some("its shard has no owner right now".to_string())),
        Some(owner) => match ask_owner(&store, owner, &args.key).await {
            Ok(live) => (live, None),
            Err(why) => (None, Some(why)),
        },
    };
    Ok(Report {
        key: args.key.clone(),
        held: true,
        shard: Some(view.shard),
        owner: view.owner.clone(),
        sent: sent(&view),
        known_status: view
            .state
            .known()
            .map(|k| status_name(&TASK_STATUSES, &k.to_string())),
        outbox: view.outbox.iter().map(|raw| waiting(raw, now)).collect(),
        batch: view.batch.iter().map(|raw| batched(raw)).collect(),
        history: view
            .history
            .iter()
            .map(|h| {
                serde_json::from_str(h).unwrap_or_else(|e| Submission {
                    at: 0,
                    worker: "?".into(),
                    status: None,
                    containers: 0,
                    calls: 0,
                    answer: format!("unreadable history entry ({e}): {h}"),
                })
            })
            .collect(),
        live,
        live_unknown,
    })
}

pub async fn run(args: InspectArgs) -> anyhow::Result<()> {
    let report = collect(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{}", report.key);
    if !report.held {
        println!(
            "  no state held: never seen by this relay, or expired after the retention \
             (RELAY_TASK_RETENTION_S without activity)"
        );
        return Ok(());
    }
    println!(
        "  shard {} owned by {}",
        report.shard.unwrap_or_default(),
        report.owner.as_deref().unwrap_or("(nobody)")
    );
    match (&report.live, &report.live_unknown) {
        (Some(live), _) => {
            let mut line = format!("  now: {}", live.state);
            if let Some(ms) = live.for_ms {
                line += &format!(" for {:.1}s", ms as f64 / 1000.0);
            }
            if live.attempts > 0 {
                line += &format!(", {} failed call(s)", live.attempts);
            }
            if let Some(e) = &live.last_error {
                line += &format!(", last error: {e}");
            }
            if let Some(ms) = live.next_attempt_in_ms {
                line += &format!(", next attempt in {:.1}s", ms as f64 / 1000.0);
            }
            println!("{line}");
        }
        (None, None) if report.outbox.is_empty() => println!("  now: idle (nothing to send)"),
        (None, None) => println!(
            "  now: waiting to be picked up (the owner holds no work for it yet: a handover or \
             its resume is under way)"
        ),
        (None, Some(why)) => println!("  now: unknown — {why}"),
    }
    if let Some(k) = &report.known_status {
        println!("  known task status: {k}");
    }
    if report.sent.is_empty() {
        println!("  sent: nothing yet");
    } else {
        println!("  sent: {}", super::pairs(&report.sent));
    }
    println!("  outbox: {} waiting", report.outbox.len());
    for w in &report.outbox {
        let age = w.age_ms.map_or_else(
            || "drained".to_string(),
            |ms| format!("occurred {:.1}s ago", ms as f64 / 1000.0),
        );
        println!(
            "    {} ({age}, {} container change(s)) id {}",
            w.status, w.containers, w.id
        );
    }
    println!("  batch: {} waiting for a task change", report.batch.len());
    for b in &report.batch {
        println!("    {} {} {}", b.kind, b.name, b.status);
    }
    println!("  last submissions (newest first):");
    if report.history.is_empty() {
        println!("    none");
    }
    for h in &report.history {
        println!(
            "    {} {} by {}: {} (after {} call(s))",
            rfc3339(h.at),
            h.status.as_deref().unwrap_or("-"),
            h.worker,
            h.answer,
            h.calls,
        );
    }
    Ok(())
}

/// `ms` since the Unix epoch as RFC 3339 (the number itself if out of range).
pub(crate) fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}
