//! Every metric the relay exports, by name, in one place (docs/operations.md lists them), and
//! the HTTP listener serving `/metrics`, `/healthz` and `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::Query;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Json;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

pub const EVENTS_CONSUMED: &str = "relay_events_consumed_total";
pub const EVENTS_REJECTED: &str = "relay_events_rejected_total";
pub const EVENTS_DUPLICATE: &str = "relay_events_duplicate_total";
pub const EVENTS_DROPPED: &str = "relay_events_dropped_total";
pub const ECS_CALLS: &str = "relay_ecs_calls_total";
pub const ECS_CALL_SECONDS: &str = "relay_ecs_call_duration_seconds";
pub const BATCH_SIZE: &str = "relay_submission_batched_events";
pub const RETRIES: &str = "relay_retries_total";
pub const PERMITS_IN_USE: &str = "relay_permits_in_use";
pub const PERMITS_LIMIT: &str = "relay_permits_limit";
pub const PERMIT_WAIT_SECONDS: &str = "relay_permit_wait_seconds";
pub const SHARDS_OWNED: &str = "relay_shards_owned";
pub const SENDERS_ACTIVE: &str = "relay_senders_active";
pub const FENCED: &str = "relay_fenced_total";
pub const REDIS_ERRORS: &str = "relay_redis_errors_total";
pub const AMQP_ERRORS: &str = "relay_amqp_errors_total";
pub const BUILD_INFO: &str = "relay_build_info";
pub const SHARD_PENDING_TASKS: &str = "relay_shard_pending_tasks";
pub const SHARD_BATCHED_TASKS: &str = "relay_shard_batched_tasks";
pub const OLDEST_RETRY_SECONDS: &str = "relay_oldest_retry_seconds";
pub const SHARDS_CONFIGURED: &str = "relay_shards_configured";
pub const END_TO_END_SECONDS: &str = "relay_end_to_end_seconds";
pub const RETRY_BACKOFF_SECONDS: &str = "relay_retry_backoff_seconds";
pub const AMQP_RECONNECTS: &str = "relay_amqp_reconnects_total";
pub const REDIS_RECONNECTS: &str = "relay_redis_reconnects_total";
pub const PERMIT_OLDEST_HELD_SECONDS: &str = "relay_permit_oldest_held_seconds";
pub const REDIS_FAILOVERS: &str = "relay_redis_failovers_total";
pub const AMQP_NODE: &str = "relay_amqp_node_info";
pub const STAGE_SECONDS: &str = "relay_stage_seconds";
pub const REDIS_WAIT_SHORTFALLS: &str = "relay_redis_wait_shortfalls_total";
/// The fleet's effective limit of ECS calls in flight (adaptive; `relay_permits_limit` is the
/// ceiling).
pub const CONCURRENCY_LIMIT: &str = "relay_concurrency_limit";
pub const ECS_THROTTLED: &str = "relay_ecs_throttled_total";
/// Rejected messages a shard keeps in Redis until the dead-letter queue takes them.
pub const DEAD_LETTERS_HELD: &str = "relay_dead_letters_held";
/// Rejected messages left unacknowledged because their shard's hold was full.
pub const DEAD_LETTER_HOLD_FULL: &str = "relay_dead_letter_hold_full_total";
/// A shard consumer's prefetch: RELAY_PREFETCH, or fewer while its messages are large.
pub const INTAKE_PREFETCH: &str = "relay_intake_prefetch";
/// Messages `RELAY_PRODUCER_AUTH=audit` forwarded that `acl` would refuse, by reason.
pub const PRODUCER_WOULD_REFUSE: &str = "relay_producer_would_refuse_total";
/// Reads of a changed `RELAY_PRODUCER_ACL` file, by result (`ok`, `failed`).
pub const PRODUCER_ACL_RELOADS: &str = "relay_producer_acl_reloads_total";
/// Which producer rules the worker runs: a hash of the ACL file in force (equal on every
/// worker when all agree).
pub const PRODUCER_ACL_HASH: &str = "relay_producer_acl_hash";
/// Clusters with a change ready on this worker (waiting for a runner or a permit): rule 12's
/// flows. No label per cluster: `status` names the busiest.
pub const READY_CLUSTERS: &str = "relay_ready_clusters";
/// The longest a ready change on this worker has waited for a runner or a permit.
pub const READY_OLDEST_SECONDS: &str = "relay_ready_oldest_seconds";
/// 1 while a store-lost record stands: Redis lost the relay's state under the fleet (restarted
/// empty, failed over to a replica without the data, flushed). Cleared by the operator.
pub const STORE_LOST: &str = "relay_store_lost";
/// 1 while this worker's Redis gate is closed: its round trips say Redis cannot record a
/// call's completion now (a failed round trip, a refused or unconfirmed write, a reply overdue),
/// so its senders start no ECS call.
pub const REDIS_GATE_CLOSED: &str = "relay_redis_gate_closed";
/// ECS calls a sender was ready to start and held back because the Redis gate was closed, by
/// why it was closed.
pub const REDIS_GATE_HELD: &str = "relay_redis_gate_held_calls_total";
/// Time the Redis gate was closed, in ms, by why (sampled every 50 ms): how long a worker's
/// calls could not start, even when none was waiting. (Counters are integers: ms, not s.)
pub const REDIS_GATE_CLOSED_MS: &str = "relay_redis_gate_closed_milliseconds_total";

/// Every metric above; dashboards and alert rules may name only these (a test checks).
pub const ALL: &[&str] = &[
    EVENTS_CONSUMED,
    EVENTS_REJECTED,
    EVENTS_DUPLICATE,
    EVENTS_DROPPED,
    ECS_CALLS,
    ECS_CALL_SECONDS,
    BATCH_SIZE,
    RETRIES,
    PERMITS_IN_USE,
    PERMITS_LIMIT,
    PERMIT_WAIT_SECONDS,
    SHARDS_OWNED,
    SENDERS_ACTIVE,
    FENCED,
    REDIS_ERRORS,
    AMQP_ERRORS,
    BUILD_INFO,
    SHARD_PENDING_TASKS,
    SHARD_BATCHED_TASKS,
    OLDEST_RETRY_SECONDS,
    SHARDS_CONFIGURED,
    END_TO_END_SECONDS,
    RETRY_BACKOFF_SECONDS,
    AMQP_RECONNECTS,
    REDIS_RECONNECTS,
    PERMIT_OLDEST_HELD_SECONDS,
    REDIS_FAILOVERS,
    REDIS_WAIT_SHORTFALLS,
    AMQP_NODE,
    STAGE_SECONDS,
    CONCURRENCY_LIMIT,
    ECS_THROTTLED,
    DEAD_LETTERS_HELD,
    DEAD_LETTER_HOLD_FULL,
    INTAKE_PREFETCH,
    PRODUCER_WOULD_REFUSE,
    PRODUCER_ACL_RELOADS,
    PRODUCER_ACL_HASH,
    READY_CLUSTERS,
    READY_OLDEST_SECONDS,
    STORE_LOST,
    REDIS_GATE_CLOSED,
    REDIS_GATE_HELD,
    REDIS_GATE_CLOSED_MS,
];

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
];
/// Finer in the 1–100 ms range, where an event's stages live when the relay is healthy.
const STAGE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];
const COUNT_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

pub fn event_consumed(kind: &'static str) {
    counter!(EVENTS_CONSUMED, "type" => kind).increment(1);
}
pub fn event_rejected(code: &'static str) {
    counter!(EVENTS_REJECTED, "reason" => code).increment(1);
}
pub fn producer_would_refuse(reason: &'static str) {
    counter!(PRODUCER_WOULD_REFUSE, "reason" => reason).increment(1);
}
pub fn producer_acl_reload(result: &'static str) {
    counter!(PRODUCER_ACL_RELOADS, "result" => result).increment(1);
}
pub fn producer_acl_hash(hash: u32) {
    gauge!(PRODUCER_ACL_HASH).set(f64::from(hash));
}
pub fn event_duplicate() {
    counter!(EVENTS_DUPLICATE).increment(1);
}
/// `reason`: redundant, invalid_parameter, retention.
pub fn events_dropped(reason: &'static str, n: u64) {
    counter!(EVENTS_DROPPED, "reason" => reason).increment(n);
}
/// Error codes that get their own `outcome` label; anything else an endpoint answers is
/// counted as `other`, so the label set stays bounded (the log line has the code).
const ECS_OUTCOMES: &[&str] = &[
    "InvalidParameterException",
    "ClientException",
    "ServerException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "ExpiredTokenException",
    "ClusterNotFoundException",
    "Timeout",
    "DispatchFailure",
    "ResponseError",
];

/// The `outcome` label of an ECS call: `ok` (no error code), a known code, or `other`.
pub fn ecs_outcome(error_code: Option<&str>) -> &'static str {
    match error_code {
        None => "ok",
        Some(code) => ECS_OUTCOMES
            .iter()
            .find(|known| **known == code)
            .copied()
            .unwrap_or("other"),
    }
}

/// The RabbitMQ node this worker is connected to (`host:port`): 1 for the current node, 0 for
/// nodes it was connected to before.
pub fn amqp_node(node: &str) {
    static CURRENT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(previous) = current.as_deref().filter(|p| *p != node) {
        gauge!(AMQP_NODE, "node" => previous.to_string()).set(0.0);
    }
    gauge!(AMQP_NODE, "node" => node.to_string()).set(1.0);
    *current = Some(node.to_string());
}
pub fn store_lost(lost: bool) {
    gauge!(STORE_LOST).set(if lost { 1.0 } else { 0.0 });
}
pub fn redis_gate(closed: bool) {
    gauge!(REDIS_GATE_CLOSED).set(if closed { 1.0 } else { 0.0 });
}
/// The sum of every series of metric `name` in a Prometheus text exposition (for the bench
/// and the tests, which read a worker's `/metrics`).
pub fn exposition_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One gate sample: `closed` for why, over `span`.
pub fn redis_gate_sample(closed: Option<&'static str>, span: Duration) {
    redis_gate(closed.is_some());
    if let Some(why) = closed {
        counter!(REDIS_GATE_CLOSED_MS, "why" => why).increment(span.as_millis() as u64);
    }
}
pub fn redis_gate_held(why: &'static str) {
    counter!(REDIS_GATE_HELD, "why" => why).increment(1);
}
/// Sentinel named a new Redis primary and this worker followed it.
pub fn redis_failover() {
    counter!(REDIS_FAILOVERS).increment(1);
}
/// A write the relay acts on was confirmed by fewer replicas than RELAY_REDIS_MIN_REPLICAS.
pub fn redis_wait_shortfall() {
    counter!(REDIS_WAIT_SHORTFALLS).increment(1);
}
pub fn ecs_call(operation: &'static str, error_code: Option<&str>, took: Duration) {
    counter!(ECS_CALLS, "operation" => operation, "outcome" => ecs_outcome(error_code))
        .increment(1);
    histogram!(ECS_CALL_SECONDS, "operation" => operation).record(took.as_secs_f64());
    stage("ecs", took);
}
pub fn submission_batch(events: usize) {
    histogram!(BATCH_SIZE).record(events as f64);
}
pub fn retry() {
    counter!(RETRIES).increment(1);
}
/// Where an event's time goes, one histogram per stage: `queue` (publish → delivery, from the
/// publisher's `x-published-ms` header), `intake` (delivery → stored in Redis), `wake` (stored →
/// a sender picks the task), `permit` (waiting for a fleet-wide permit), `ecs` (the call),
/// `complete` (ECS answer → the next head ready).
pub fn stage(stage: &'static str, took: Duration) {
    histogram!(STAGE_SECONDS, "stage" => stage).record(took.as_secs_f64());
}
pub fn permit_acquired(waited: Duration) {
    stage("permit", waited);
    histogram!(PERMIT_WAIT_SECONDS).record(waited.as_secs_f64());
}
pub fn permits(in_use: u64, limit: u32, oldest_held: Duration) {
    gauge!(PERMITS_IN_USE).set(in_use as f64);
    gauge!(PERMITS_LIMIT).set(limit as f64);
    gauge!(PERMIT_OLDEST_HELD_SECONDS).set(oldest_held.as_secs_f64());
}
/// This worker's ready work (rule 12), as read every few seconds.
pub fn ready(clusters: usize, oldest: Duration) {
    gauge!(READY_CLUSTERS).set(clusters as f64);
    gauge!(READY_OLDEST_SECONDS).set(oldest.as_secs_f64());
}
/// The fleet's effective limit as last read (the ceiling is `permits`' `limit`).
pub fn concurrency_limit(effective: u32) {
    gauge!(CONCURRENCY_LIMIT).set(f64::from(effective));
}
/// An ECS call answered with a throttling code.
pub fn ecs_throttled() {
    counter!(ECS_THROTTLED).increment(1);
}
/// RELAY_SHARDS as this worker sees it: with `relay_shards_owned`, tells when a shard has no owner.
pub fn shards_configured(n: u16) {
    gauge!(SHARDS_CONFIGURED).set(f64::from(n));
}
pub fn shards_owned(n: usize) {
    gauge!(SHARDS_OWNED).set(n as f64);
}
/// What an owned shard holds, as read every few seconds; zeroed when the shard is released so
/// the sum over workers counts each shard once.
pub fn shard_state(shard: u16, pending: usize, batched: usize, retry: RetryState) {
    let shard = shard.to_string();
    gauge!(SHARD_PENDING_TASKS, "shard" => shard.clone()).set(pending as f64);
    gauge!(SHARD_BATCHED_TASKS, "shard" => shard.clone()).set(batched as f64);
    gauge!(OLDEST_RETRY_SECONDS, "shard" => shard.clone()).set(retry.oldest.as_secs_f64());
    gauge!(RETRY_BACKOFF_SECONDS, "shard" => shard).set(retry.longest_backoff.as_secs_f64());
}

/// Dead letters a shard holds; zeroed when the shard is released, like [`shard_state`].
pub fn dead_letters_held(shard: u16, n: u64) {
    gauge!(DEAD_LETTERS_HELD, "shard" => shard.to_string()).set(n as f64);
}
/// Zeroed when the shard is released.
pub fn intake_prefetch(shard: u16, prefetch: u16) {
    gauge!(INTAKE_PREFETCH, "shard" => shard.to_string()).set(f64::from(prefetch));
}
pub fn dead_letter_hold_full() {
    counter!(DEAD_LETTER_HOLD_FULL).increment(1);
}

/// The retrying tasks of a shard: the longest failure streak and the longest current backoff.
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryState {
    pub oldest: Duration,
    pub longest_backoff: Duration,
}

/// From the event's `occurredAt` to ECS accepting the change.
pub fn end_to_end(latency: Duration) {
    histogram!(END_TO_END_SECONDS).record(latency.as_secs_f64());
}
pub fn amqp_reconnect() {
    counter!(AMQP_RECONNECTS).increment(1);
}
pub fn redis_reconnect() {
    counter!(REDIS_RECONNECTS).increment(1);
}
pub fn sender_started() {
    gauge!(SENDERS_ACTIVE).increment(1.0);
}
pub fn sender_stopped() {
    gauge!(SENDERS_ACTIVE).decrement(1.0);
}
/// The step that met a failure: the `op` label of `relay_redis_errors_total`,
/// `relay_amqp_errors_total` and `relay_fenced_total` (dashboards and alerts use the values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Start,
    Heartbeat,
    LeaseAcquire,
    LeaseRenew,
    LeaseLapse,
    Intake,
    Hold,
    Drain,
    Pending,
    Sweep,
    Peek,
    Touch,
    Complete,
    Call,
    PermitAcquire,
    PermitRelease,
    AdaptiveLimit,
    DeadLetter,
    Consume,
    ConsumerCancelled,
    Pubsub,
    ProducerRules,
}

impl Op {
    pub const fn label(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Heartbeat => "heartbeat",
            Op::LeaseAcquire => "lease_acquire",
            Op::LeaseRenew => "lease_renew",
            Op::LeaseLapse => "lease_lapse",
            Op::Intake => "intake",
            Op::Hold => "hold",
            Op::Drain => "drain",
            Op::Pending => "pending",
            Op::Sweep => "sweep",
            Op::Peek => "peek",
            Op::Touch => "touch",
            Op::Complete => "complete",
            Op::Call => "call",
            Op::PermitAcquire => "permit_acquire",
            Op::PermitRelease => "permit_release",
            Op::AdaptiveLimit => "adaptive_limit",
            Op::DeadLetter => "dead_letter",
            Op::Consume => "consume",
            Op::ConsumerCancelled => "consumer_cancelled",
            Op::Pubsub => "pubsub",
            Op::ProducerRules => "producer_rules",
        }
    }
}

/// A write (or ECS call) refused because this worker no longer holds the shard's lease.
pub fn fenced(op: Op) {
    counter!(FENCED, "op" => op.label()).increment(1);
}
/// Counted by [`crate::relay::events::RedisFailed`], with its log line.
pub(crate) fn redis_error(op: Op) {
    counter!(REDIS_ERRORS, "op" => op.label()).increment(1);
}
pub fn amqp_error(op: Op) {
    counter!(AMQP_ERRORS, "op" => op.label()).increment(1);
}

/// Installs the Prometheus recorder once per process (tests run several workers in one).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), COUNT_BUCKETS))
            // Full matchers win over the suffix one.
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(STAGE_SECONDS.into()), STAGE_BUCKETS)
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // Another recorder may already be installed (embedding); ours then just renders nothing.
        let _ = metrics::set_global_recorder(recorder);
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle
    })
}

/// What `/readyz` and `/healthz` answer, as the worker reports it. Ready means it can do its
/// job: RabbitMQ connected with the topology declared, Redis answering, and not idle while
/// shards have no owner. Alive means its control loop still turns.
#[derive(Clone)]
pub struct Readiness(Arc<ReadyState>);

/// What `/inspect` asks of the send path (which sits above this module and hands itself down):
/// its live, in-memory view of one ordering key, if a shard of this worker holds it.
pub trait LiveWork: Send + Sync {
    fn live(&self, key: &str) -> Option<crate::relay::schedule::Live>;
}

struct ReadyState {
    amqp: AtomicBool,
    redis: AtomicBool,
    shards: AtomicBool,
    /// Last turn of the control loop, in ms since `started`.
    pulse_ms: AtomicU64,
    started: Instant,
    /// The worker's live view of its keys, for `/inspect` (set once the worker runs).
    boards: std::sync::OnceLock<Arc<dyn LiveWork>>,
}

/// A control loop silent for this long is wedged: `/healthz` fails so the process is restarted.
/// Its longest legitimate pause is a reconnect backoff (10 s) plus bounded Redis waits.
const WEDGED_AFTER: Duration = Duration::from_secs(60);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(ReadyState {
            amqp: AtomicBool::new(false),
            redis: AtomicBool::new(false),
            shards: AtomicBool::new(false),
            pulse_ms: AtomicU64::new(0),
            started: Instant::now(),
            boards: std::sync::OnceLock::new(),
        }))
    }
}

impl Readiness {
    /// RabbitMQ connected and topology declared.
    /// Lets `/inspect` answer from the worker's boards.
    pub fn set_boards(&self, boards: Arc<dyn LiveWork>) {
        let _ = self.0.boards.set(boards);
    }

    pub fn set_amqp(&self, ok: bool) {
        self.0.amqp.store(ok, Ordering::Relaxed);
    }
    /// The last heartbeat and lease renewals reached Redis.
    pub fn set_redis(&self, ok: bool) {
        self.0.redis.store(ok, Ordering::Relaxed);
    }
    /// Owns a shard, or no shard lacks an owner.
    pub fn set_shards(&self, ok: bool) {
        self.0.shards.store(ok, Ordering::Relaxed);
    }
    /// The control loop turned.
    pub fn pulse(&self) {
        let ms = self.0.started.elapsed().as_millis() as u64;
        self.0.pulse_ms.store(ms, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.not_ready_because().is_none()
    }
    /// Why the worker is not ready, for the `/readyz` body; None when ready.
    pub fn not_ready_because(&self) -> Option<&'static str> {
        let s = &self.0;
        if !s.amqp.load(Ordering::Relaxed) {
            Some("RabbitMQ not connected")
        } else if !s.redis.load(Ordering::Relaxed) {
            Some("Redis unreachable")
        } else if !s.shards.load(Ordering::Relaxed) {
            Some("no shard owned while shards have no owner")
        } else {
            None
        }
    }
    pub fn alive(&self) -> bool {
        let last = Duration::from_millis(self.0.pulse_ms.load(Ordering::Relaxed));
        self.0.started.elapsed().saturating_sub(last) < WEDGED_AFTER
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` and, with `inspect` (`RELAY_INSPECT`),
/// `/inspect?key=` (for `ecs-state-relay inspect`) until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ready: Readiness,
    inspect: bool,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let handle = handle();
    // Histograms keep raw samples until upkeep folds them into buckets; without a scraper
    // (or with a slow one) they would grow with every call, so fold them regularly.
    let upkeep = cancel.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep.cancelled() => return,
                _ = every.tick() => handle.run_upkeep(),
            }
        }
    });
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || async move {
                handle.run_upkeep();
                handle.render()
            }),
        )
        .route(
            "/healthz",
            get({
                let ready = ready.clone();
                move || async move {
                    if ready.alive() {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "control loop stalled")
                    }
                }
            }),
        )
        .route(
            "/inspect",
            get({
                let ready = ready.clone();
                // `?key=<task or attachment ARN>`: what this worker holds of it in memory.
                move |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    if !inspect {
                        return (
                            StatusCode::NOT_FOUND,
                            Json(serde_json::json!({"error": "inspect is off on this worker (RELAY_INSPECT=off)"})),
                        );
                    }
                    let Some(key) = q.get("key") else {
                        return (
                            StatusCode::BAD_REQUEST,
                            Json(serde_json::json!({"error": "key= is required"})),
                        );
                    };
                    let live = ready.0.boards.get().and_then(|b| b.live(key));
                    (
                        StatusCode::OK,
                        Json(serde_json::json!({ "key": key, "live": live })),
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready.not_ready_because() {
                        None => (StatusCode::OK, "ready".to_string()),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ecs_outcome_label_takes_only_known_values() {
        assert_eq!(ecs_outcome(None), "ok");
        assert_eq!(
            ecs_outcome(Some("ThrottlingException")),
            "ThrottlingException"
        );
        assert_eq!(ecs_outcome(Some("SomethingAnEndpointMadeUp")), "other");
        assert_eq!(ecs_outcome(Some("")), "other");
    }
}
