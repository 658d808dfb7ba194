//! Wire contract v1: decoding and validation of what agents publish, and the stored forms that
//! the intake writes to Redis and the sender turns into ECS requests.
//!
//! Every rule of docs/wire-contract.md is checked here; a message that breaks one is rejected with
//! a stable reason code (metric label, `x-relay-reject-reason` header) and a human detail.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::relay::arn::{Arn, ClusterRef, Resource};

/// Largest message accepted (256 KiB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Most container and managed-agent changes one task change carries; more for a task whose
/// status never comes is rejected (`batch_full`) rather than grown without bound.
pub const MAX_BATCH: usize = 1000;
/// Largest list of network bindings on one container.
pub const MAX_NETWORK_BINDINGS: usize = 1000;
const MAX_EVENT_ID_CHARS: usize = 128;
const MAX_NAME_BYTES: usize = 1024;
/// ECS limits the agent applies when sending (cut, not rejected).
pub const REASON_LIMIT: usize = 1024;
pub const RUNTIME_ID_LIMIT: usize = 255;

/// Task statuses in "already sent?" order.
pub const TASK_STATUSES: [&str; 5] = ["NONE", "MANIFEST_PULLED", "CREATED", "RUNNING", "STOPPED"];
/// Container statuses in order; only MANIFEST_PULLED, RUNNING and STOPPED are reportable.
pub const CONTAINER_STATUSES: [&str; 7] = [
    "NONE",
    "MANIFEST_PULLED",
    "PULLED",
    "CREATED",
    "RUNNING",
    "RESOURCES_PROVISIONED",
    "STOPPED",
];
pub const AGENT_STATUSES: [&str; 4] = ["NONE", "CREATED", "RUNNING", "STOPPED"];
pub const ATTACHMENT_STATUSES: [&str; 3] = ["NONE", "ATTACHED", "DETACHED"];
pub const TASK_STOPPED: u8 = 4;

/// Position of a status in its vocabulary.
pub fn status_index(vocab: &[&str], status: &str) -> Option<u8> {
    vocab.iter().position(|s| *s == status).map(|i| i as u8)
}

/// The `status` ECS expects for a task status: the first three are all "PENDING".
pub fn task_wire_status(status: &str) -> &'static str {
    match status {
        "RUNNING" => "RUNNING",
        "STOPPED" => "STOPPED",
        _ => "PENDING",
    }
}

/// The `status` ECS expects for a reportable container status.
pub fn container_wire_status(status: &str) -> &'static str {
    match status {
        "RUNNING" => "RUNNING",
        "STOPPED" => "STOPPED",
        _ => "PENDING",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Task,
    Container,
    ManagedAgent,
    TaskAttachment,
    Attachment,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Task => "task",
            Kind::Container => "container",
            Kind::ManagedAgent => "managedAgent",
            Kind::TaskAttachment => "taskAttachment",
            Kind::Attachment => "attachment",
        }
    }
}

/// Why a message was rejected: `code` is stable (metrics, alerts), `detail` is for people.
/// The reasons of the producer check (contract v1.2).
pub const IDENTITY_REASONS: [&str; 6] = [
    "producer_missing",
    "producer_unknown",
    "producer_not_allowed",
    "cluster_mismatch",
    "region_mismatch",
    "account_mismatch",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub code: &'static str,
    pub detail: String,
}

impl Reject {
    pub(crate) fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }

    /// Whether the reason is about the producer's identity or what the relay can deliver:
    /// `dlq replay` leaves these alone unless asked for by reason.
    pub fn is_identity(code: &str) -> bool {
        IDENTITY_REASONS.contains(&code)
    }
    pub fn batch_full() -> Self {
        Self::new(
            "batch_full",
            format!("the task already has {MAX_BATCH} container/agent changes waiting for a task change"),
        )
    }

    /// The value of the `x-relay-reject-reason` header.
    pub fn header(&self) -> String {
        format!("{}: {}", self.code, self.detail)
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.header())
    }
}

/// A network binding as ECS takes it; every field optional, as in the API.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    #[serde(rename = "bindIP", skip_serializing_if = "Option::is_none")]
    pub bind_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_port_range: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port_range: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// A task change ready to send (status variant of SubmitTaskStateChange).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskChange {
    pub cluster: String,
    pub task: String,
    pub status: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_stopped_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_stopped_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerChange {
    pub container_name: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_bindings: Option<Vec<Binding>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentChange {
    pub container_name: String,
    pub managed_agent_name: String,
    pub status: String,
    pub reason: String,
}

/// A task-ENI attachment (`taskAttachment`) or an instance-level attachment (`attachment`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentChange {
    pub cluster: String,
    /// Set for `taskAttachment` (sent with SubmitTaskStateChange), absent for `attachment`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub attachment_arn: String,
    pub status: String,
    pub expires_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment_type: Option<String>,
}

/// One element of a task's batch, kept in arrival order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BatchItem {
    #[serde(rename = "c")]
    Container(ContainerChange),
    #[serde(rename = "m")]
    Agent(AgentChange),
}

/// The body of an outbox entry (what the sender submits).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change {
    #[serde(rename = "task")]
    Task(TaskChange),
    #[serde(rename = "att")]
    Attachment(AttachmentChange),
}

impl Change {
    pub fn status(&self) -> &str {
        match self {
            Change::Task(t) => &t.status,
            Change::Attachment(a) => &a.status,
        }
    }

    /// The cluster as the producer named it (a name or an ARN).
    pub fn cluster(&self) -> &str {
        match self {
            Change::Task(t) => &t.cluster,
            Change::Attachment(a) => &a.cluster,
        }
    }
}

/// The fair-share flow (rule 12) of a change keyed by `key` in `cluster`: the cluster's full
/// ARN, so same-named clusters of two accounts are two flows. A cluster given by name takes
/// the partition, Region and account of the key's ARN.
pub fn flow(key: &str, cluster: &str) -> String {
    if cluster.starts_with("arn:") {
        return cluster.to_string();
    }
    let mut parts = key.splitn(6, ':');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("arn"), Some(partition), Some(_), Some(region), Some(account)) => {
            format!("arn:{partition}:ecs:{region}:{account}:cluster/{cluster}")
        }
        _ => cluster.to_string(),
    }
}

/// A key's flow when only the key is known (keys resumed after a shard takeover): a task ARN
/// of the long form (`task/<cluster>/<id>`) names its cluster; any other key (an old-form task
/// ARN, an instance attachment) is a flow of its own until its head is read, and the permit,
/// where calls wait, is shared by the head's real cluster.
pub fn flow_of_key(key: &str) -> String {
    let cluster = key
        .splitn(6, ':')
        .nth(5)
        .and_then(|resource| resource.strip_prefix("task/"))
        .and_then(|rest| rest.split_once('/'))
        .map(|(cluster, _)| cluster);
    match cluster {
        Some(cluster) => flow(key, cluster),
        None => key.to_string(),
    }
}

/// An outbox entry as stored: `{"id":…,"e":{…},"t":…,"b":[…]}`; the intake script appends `"b"`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct OutboxEntry {
    /// The shard-wide sequence number the intake (or drain) script gave the entry: unique for
    /// ever, so it names the entry when a completion removes it. Absent on entries written
    /// before sequence names; those are named by `id`.
    #[serde(default)]
    pub n: Option<u64>,
    pub id: String,
    pub e: Change,
    /// The event's `occurredAt` in ms since the epoch, for the end-to-end latency metric
    /// (absent on drained changes, which no single event caused).
    #[serde(default)]
    pub t: Option<i64>,
    #[serde(default)]
    pub b: Vec<BatchItem>,
}

/// A validated event, ready for the intake script.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub event_id: String,
    pub kind: Kind,
    /// Ordering key: the task ARN, or the attachment ARN for `attachment` events.
    pub key: String,
    pub cluster: String,
    /// Task status this event makes known (task status, or `taskStatus`), as an index.
    pub known_task_status: Option<u8>,
    /// Batch item JSON (container, managedAgent) or outbox entry prefix (the others).
    pub stored: String,
    /// A task event's pullStartedAt, pullStoppedAt and executionStoppedAt: kept as the task's
    /// latest, for the drained changes made later (upstream rule: the ticker copies them).
    pub task_times: [Option<String>; 3],
}

/// Decodes and validates one message. `routing_key` is the AMQP routing key it came with.
pub fn decode(body: &[u8], routing_key: &str) -> Result<Event, Reject> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(Reject::new(
            "too_large",
            format!("message is {} bytes, limit {MAX_MESSAGE_BYTES}", body.len()),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| Reject::new("not_utf8", e.to_string()))?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| Reject::new("not_json", e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(Reject::new("not_object", "message must be a JSON object"));
    };
    let m = Fields(&obj);

    match obj.get("schemaVersion") {
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => {
            return Err(Reject::new(
                "schema_version",
                format!("schemaVersion {v} is not supported (1)"),
            ))
        }
        None => return Err(Reject::new("schema_version", "schemaVersion is required")),
    }
    let event_id = m.req_str("eventId", "event_id")?;
    if event_id.chars().count() > MAX_EVENT_ID_CHARS {
        return Err(Reject::new(
            "event_id",
            "eventId is longer than 128 characters",
        ));
    }
    let kind = match m.req_str("type", "type")? {
        "task" => Kind::Task,
        "container" => Kind::Container,
        "managedAgent" => Kind::ManagedAgent,
        "taskAttachment" => Kind::TaskAttachment,
        "attachment" => Kind::Attachment,
        other => return Err(Reject::new("type", format!("unknown type {other:?}"))),
    };
    let cluster = m.req_str("cluster", "cluster")?;
    let occurred_ms = (m.req_time("occurredAt")?.unix_timestamp_nanos() / 1_000_000) as i64;

    // The task ARN as text and as fields (parsed once: the attachment check reuses them).
    let (task_arn, task_fields) = if kind == Kind::Attachment {
        (None, None)
    } else {
        let arn = m.req_str("taskArn", "task_arn")?;
        let Some(fields) = Arn::parse(arn, Resource::Task) else {
            return Err(Reject::new(
                "task_arn",
                format!("taskArn {arn:?} is not an ECS task ARN (arn:<partition>:ecs:<region>:<account>:task/[<cluster>/]<id>)"),
            ));
        };
        if arn != routing_key {
            return Err(Reject::new(
                "routing_key_mismatch",
                format!("routing key {routing_key:?} differs from taskArn {arn:?}"),
            ));
        }
        (Some(arn), Some(fields))
    };
    let status = m.req_str("status", "status")?;

    let mut known_task_status = None;
    let mut task_times = [None, None, None];
    let (key, stored) = match kind {
        Kind::Task => {
            let idx = vocab_index(&TASK_STATUSES, status, "task")?;
            known_task_status = Some(idx);
            let change = TaskChange {
                cluster: cluster.into(),
                task: task_arn.unwrap_or_default().into(),
                status: status.into(),
                reason: cut(m.opt_str("reason")?.unwrap_or(""), REASON_LIMIT).into(),
                pull_started_at: m.opt_time("pullStartedAt")?,
                pull_stopped_at: m.opt_time("pullStoppedAt")?,
                execution_stopped_at: m.opt_time("executionStoppedAt")?,
            };
            task_times = [
                change.pull_started_at.clone(),
                change.pull_stopped_at.clone(),
                change.execution_stopped_at.clone(),
            ];
            (
                task_arn.unwrap_or_default(),
                entry_prefix(event_id, &Change::Task(change), occurred_ms),
            )
        }
        Kind::Container => {
            vocab_index(&CONTAINER_STATUSES, status, "container")?;
            if !matches!(status, "MANIFEST_PULLED" | "RUNNING" | "STOPPED") {
                return Err(Reject::new(
                    "status",
                    format!("container status {status:?} is not reportable (MANIFEST_PULLED, RUNNING, STOPPED)"),
                ));
            }
            known_task_status = m.opt_task_status()?;
            let exit_code = match obj.get("exitCode") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or_else(
                    || Reject::new("exit_code", format!("exitCode {v} is not an int32")),
                )?),
            };
            let change = ContainerChange {
                container_name: m.req_str("containerName", "container_name")?.into(),
                status: status.into(),
                runtime_id: m
                    .opt_str("runtimeId")?
                    .filter(|s| !s.is_empty())
                    .map(|s| cut(s, RUNTIME_ID_LIMIT).into()),
                image_digest: m
                    .opt_str("imageDigest")?
                    .filter(|s| !s.is_empty())
                    .map(|s| cut(s, RUNTIME_ID_LIMIT).into()),
                reason: m
                    .opt_str("reason")?
                    .filter(|s| !s.is_empty())
                    .map(|s| cut(s, REASON_LIMIT).into()),
                exit_code,
                network_bindings: bindings(obj.get("networkBindings"))?,
            };
            (
                task_arn.unwrap_or_default(),
                batch_json(&BatchItem::Container(change)),
            )
        }
        Kind::ManagedAgent => {
            vocab_index(&AGENT_STATUSES[1..], status, "managedAgent")?;
            known_task_status = m.opt_task_status()?;
            let change = AgentChange {
                container_name: m.req_str("containerName", "container_name")?.into(),
                managed_agent_name: m.req_str("managedAgentName", "managed_agent_name")?.into(),
                status: status.into(),
                reason: cut(m.opt_str("reason")?.unwrap_or(""), REASON_LIMIT).into(),
            };
            (
                task_arn.unwrap_or_default(),
                batch_json(&BatchItem::Agent(change)),
            )
        }
        Kind::TaskAttachment | Kind::Attachment => {
            vocab_index(&ATTACHMENT_STATUSES, status, "attachment")?;
            let attachment_arn = m.req_str("attachmentArn", "attachment_arn")?;
            let Some(att) = Arn::parse(attachment_arn, Resource::Attachment) else {
                return Err(Reject::new(
                    "attachment_arn",
                    format!("attachmentArn {attachment_arn:?} is not an ECS attachment ARN (arn:<partition>:ecs:<region>:<account>:attachment/<id>)"),
                ));
            };
            // A task's attachment lives where the task does: the producer check looks at the
            // task ARN only, so an attachment of another account or Region must not ride on it.
            if task_fields.is_some_and(|t| {
                (t.partition, t.region, t.account) != (att.partition, att.region, att.account)
            }) {
                return Err(Reject::new(
                    "attachment_arn",
                    format!("attachmentArn {attachment_arn:?} is in another partition, account or Region than its task"),
                ));
            }
            let expires_at = m.req_time("expiresAt")?;
            let attachment_type = if kind == Kind::Attachment {
                match m.req_str("attachmentType", "attachment_type")? {
                    t @ ("eni" | "resource") => Some(t.to_string()),
                    other => {
                        return Err(Reject::new(
                            "attachment_type",
                            format!("attachmentType {other:?} is not eni or resource"),
                        ))
                    }
                }
            } else {
                None
            };
            let change = AttachmentChange {
                cluster: cluster.into(),
                task: task_arn.map(str::to_string),
                attachment_arn: attachment_arn.into(),
                status: status.into(),
                expires_at_ms: (expires_at.unix_timestamp_nanos() / 1_000_000) as i64,
                attachment_type,
            };
            // Instance-level attachments are ordered per attachment ARN, which is also the routing key.
            let key = task_arn.unwrap_or(attachment_arn);
            if kind == Kind::Attachment && attachment_arn != routing_key {
                return Err(Reject::new(
                    "routing_key_mismatch",
                    format!(
                        "routing key {routing_key:?} differs from attachmentArn {attachment_arn:?}"
                    ),
                ));
            }
            (
                key,
                entry_prefix(event_id, &Change::Attachment(change), occurred_ms),
            )
        }
    };

    // Checked last, so the ARNs' own reasons come first. A name that may hold `:` or `/` could
    // stand in for another ARN's fields in the producer check.
    if ClusterRef::parse(cluster).is_none() {
        return Err(Reject::new(
            "cluster_invalid",
            format!("cluster {cluster:?} is neither a cluster name (up to 255 letters, digits, hyphens and underscores) nor a cluster ARN"),
        ));
    }

    Ok(Event {
        event_id: event_id.into(),
        kind,
        key: key.into(),
        cluster: cluster.into(),
        known_task_status,
        stored,
        task_times,
    })
}

/// Typed access to the message's fields with reject reasons named after the field.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn req_str(&self, field: &str, code: &'static str) -> Result<&'a str, Reject> {
        match self.0.get(field) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_NAME_BYTES => Ok(s),
            Some(Value::String(s)) if s.is_empty() => {
                Err(Reject::new(code, format!("{field} is empty")))
            }
            Some(Value::String(_)) => Err(Reject::new(
                code,
                format!("{field} is longer than {MAX_NAME_BYTES} bytes"),
            )),
            Some(v) => Err(Reject::new(
                code,
                format!("{field} must be a string, got {}", type_name(v)),
            )),
            None => Err(Reject::new(code, format!("{field} is required"))),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<&'a str>, Reject> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Reject::new(
                "field_type",
                format!("{field} must be a string, got {}", type_name(v)),
            )),
        }
    }

    fn req_time(&self, field: &str) -> Result<OffsetDateTime, Reject> {
        let s = self.req_str(field, "timestamp")?;
        parse_time(field, s)
    }

    fn opt_time(&self, field: &str) -> Result<Option<String>, Reject> {
        match self.opt_str(field)? {
            None => Ok(None),
            Some(s) => parse_time(field, s).map(|_| Some(s.to_string())),
        }
    }

    fn opt_task_status(&self) -> Result<Option<u8>, Reject> {
        match self.opt_str("taskStatus")? {
            None => Ok(None),
            Some(s) => vocab_index(&TASK_STATUSES, s, "task").map(Some),
        }
    }
}

fn parse_time(field: &str, s: &str) -> Result<OffsetDateTime, Reject> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
        Reject::new(
            "timestamp",
            format!("{field} {s:?} is not an RFC 3339 time"),
        )
    })
}

fn vocab_index(vocab: &[&str], status: &str, kind: &str) -> Result<u8, Reject> {
    status_index(vocab, status).ok_or_else(|| {
        Reject::new(
            "status",
            format!("{status:?} is not a {kind} status ({})", vocab.join(", ")),
        )
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn bindings(v: Option<&Value>) -> Result<Option<Vec<Binding>>, Reject> {
    let list = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(Reject::new(
                "network_bindings",
                format!("networkBindings must be an array, got {}", type_name(other)),
            ))
        }
    };
    if list.len() > MAX_NETWORK_BINDINGS {
        return Err(Reject::new(
            "network_bindings",
            format!(
                "{} network bindings, limit {MAX_NETWORK_BINDINGS}",
                list.len()
            ),
        ));
    }
    let port = |b: &Map<String, Value>, f: &str| -> Result<Option<i32>, Reject> {
        match b.get(f) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|p| *p <= 65_535)
                .map(|p| Some(p as i32))
                .ok_or_else(|| Reject::new("network_bindings", format!("{f} {v} is not a port"))),
        }
    };
    let text = |b: &Map<String, Value>, f: &str| -> Result<Option<String>, Reject> {
        match b.get(f) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= 64 => Ok(Some(s.clone())),
            Some(v) => Err(Reject::new(
                "network_bindings",
                format!("{f} {v} is not a short string"),
            )),
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let Value::Object(b) = item else {
            return Err(Reject::new(
                "network_bindings",
                "each network binding must be an object",
            ));
        };
        let protocol = text(b, "protocol")?;
        if let Some(p) = &protocol {
            if p != "tcp" && p != "udp" {
                return Err(Reject::new(
                    "network_bindings",
                    format!("protocol {p:?} is not tcp or udp"),
                ));
            }
        }
        out.push(Binding {
            bind_ip: text(b, "bindIP")?,
            container_port: port(b, "containerPort")?,
            host_port: port(b, "hostPort")?,
            container_port_range: text(b, "containerPortRange")?,
            host_port_range: text(b, "hostPortRange")?,
            protocol,
        });
    }
    Ok(Some(out))
}

/// Cuts `s` to at most `limit` bytes without splitting a character (upstream cut bytes).
pub fn cut(s: &str, limit: usize) -> &str {
    if s.len() <= limit {
        return s;
    }
    let mut end = limit;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn batch_json(item: &BatchItem) -> String {
    serde_json::to_string(item).unwrap_or_default()
}

/// `{"id":"…","e":{…},"t":…` — the intake script closes it with `,"b":[…]}`.
pub fn entry_prefix(event_id: &str, change: &Change, occurred_ms: i64) -> String {
    let id = serde_json::to_string(event_id).unwrap_or_default();
    let e = serde_json::to_string(change).unwrap_or_default();
    format!("{{\"id\":{id},\"e\":{e},\"t\":{occurred_ms}")
}

/// This machine's clock in ms since the epoch (expiry checks, publish times, end-to-end latency).
pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl OutboxEntry {
    /// How the stored entry starts: the complete script removes the head only if it starts so.
    pub fn head_prefix(&self) -> String {
        match self.n {
            Some(n) => format!("{{\"n\":{n},"),
            None => format!(
                "{{\"id\":{},",
                serde_json::to_string(&self.id).unwrap_or_default()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/prod/0123456789abcdef";

    fn base(kind: &str) -> Value {
        json!({"schemaVersion":1,"eventId":"e1","type":kind,"cluster":"prod","taskArn":ARN,
               "occurredAt":"2026-11-28T10:00:00Z","status":"RUNNING"})
    }

    fn code(v: &Value, rk: &str) -> &'static str {
        decode(v.to_string().as_bytes(), rk).unwrap_err().code
    }

    #[test]
    fn accepts_a_task_event_and_stores_the_prefix() {
        let e = decode(base("task").to_string().as_bytes(), ARN).unwrap();
        assert_eq!(e.kind, Kind::Task);
        assert_eq!(e.known_task_status, Some(3));
        let full = format!("{},\"b\":[]}}", e.stored);
        let entry: OutboxEntry = serde_json::from_str(&full).unwrap();
        assert_eq!(entry.id, "e1");
        assert!(full.starts_with(&entry.head_prefix()));
        match entry.e {
            Change::Task(t) => {
                assert_eq!(t.status, "RUNNING");
                assert_eq!(t.reason, "");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_each_rule_with_its_code() {
        let mut v = base("container");
        v["containerName"] = json!("web");
        v["status"] = json!("CREATED");
        assert_eq!(code(&v, ARN), "status");
        v["status"] = json!("RUNNING");
        v["exitCode"] = json!(1u64 << 40);
        assert_eq!(code(&v, ARN), "exit_code");
        assert_eq!(code(&base("task"), "other"), "routing_key_mismatch");
        let mut v = base("task");
        v["schemaVersion"] = json!(2);
        assert_eq!(code(&v, ARN), "schema_version");
        let mut v = base("task");
        v["occurredAt"] = json!("yesterday");
        assert_eq!(code(&v, ARN), "timestamp");
        assert_eq!(decode(b"[1]", ARN).unwrap_err().code, "not_object");
        assert_eq!(decode(b"{", ARN).unwrap_err().code, "not_json");
        assert_eq!(decode(&[0xff, 0xfe], ARN).unwrap_err().code, "not_utf8");
        assert_eq!(
            decode(&vec![b' '; MAX_MESSAGE_BYTES + 1], ARN)
                .unwrap_err()
                .code,
            "too_large"
        );
    }

    #[test]
    fn cuts_at_char_boundaries() {
        let s = "é".repeat(600); // 1200 bytes
        let c = cut(&s, REASON_LIMIT);
        assert_eq!(c.len(), 1024);
        let s = format!("a{}", "é".repeat(600));
        assert_eq!(cut(&s, REASON_LIMIT).len(), 1023);
    }

    #[test]
    fn flows_are_full_cluster_arns() {
        let full = "arn:aws:ecs:us-east-1:123456789012:cluster/prod";
        assert_eq!(flow(ARN, "prod"), full);
        assert_eq!(flow(ARN, full), full);
        assert_eq!(flow_of_key(ARN), full);
        let other_account = "arn:aws:ecs:us-east-1:210987654321:task/prod/0123456789abcdef";
        assert_ne!(
            flow_of_key(other_account),
            full,
            "same name, another account"
        );
        let old_form = "arn:aws:ecs:us-east-1:123456789012:task/0123456789abcdef";
        assert_eq!(flow_of_key(old_form), old_form);
    }
}
