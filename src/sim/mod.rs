//! ecs-sim: a local stand-in for the Amazon ECS endpoint, speaking the real AWS JSON 1.1
//! protocol so the relay can be driven through the genuine `aws-sdk-ecs` client.
//!
//! It answers `SubmitTaskStateChange`, `SubmitContainerStateChange` and
//! `SubmitAttachmentStateChanges`, records every call, counts concurrency exactly, and can
//! inject failures or hold calls open per key. Tests use [`Sim`] in-process; the `ecs-sim`
//! binary serves the same thing plus an admin API under `/_sim/` for the demo and humans.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

/// `X-Amz-Target` prefix of the ECS service (API version 2014-11-13).
const TARGET_PREFIX: &str = "AmazonEC2ContainerServiceV20141113.";
/// The operations the relay uses; anything else is an `UnknownOperationException`.
const OPERATIONS: [&str; 3] = [
    "SubmitTaskStateChange",
    "SubmitContainerStateChange",
    "SubmitAttachmentStateChanges",
];
const AMZ_JSON: &str = "application/x-amz-json-1.1";
/// Outcome recorded for a call whose connection went away before it was answered.
pub const OUTCOME_CANCELLED: &str = "Cancelled";
/// Outcome recorded for a successful call.
pub const OUTCOME_OK: &str = "ok";

/// Startup settings of a [`Sim`].
#[derive(Clone, Debug, Default)]
pub struct SimConfig {
    /// Delay applied to every ECS call before it is answered (while counted in flight).
    pub latency: Duration,
    /// Capacity mode: a call arriving while this many calls are already in flight is
    /// throttled (`ThrottlingException`), as ECS sheds load. None: unlimited.
    pub capacity: Option<u64>,
}

/// What a matching [`Rule`] does to a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// 400 `InvalidParameterException` (not retryable by the relay).
    InvalidParameter,
    /// 500 `ServerException`.
    ServerError,
    /// 400 `ThrottlingException`.
    Throttle,
    /// 503 `ServiceUnavailable`.
    Unavailable,
    /// Block the call, counted in flight, until [`Sim::release`] (or shutdown); then succeed.
    Hold,
}

/// Fault injection: the first rule whose key matches a call (and has `times` left) applies
/// and is consumed once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rule {
    /// Exact call key (task ARN or attachment ARN), or `"*"` for any call.
    pub key: String,
    pub action: Action,
    /// How many calls the rule applies to.
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

/// One ECS call as the sim saw it. Appended on arrival so held calls are visible.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallRecord {
    /// 0-based arrival order (restarts after a reset).
    pub seq: u64,
    pub operation: String,
    /// Body `task`, else `attachments[0].attachmentArn`, else "".
    pub key: String,
    /// The SDK client's app name (`app/<name>` in the user agent), "" if none: tells which
    /// worker made the call.
    #[serde(default)]
    pub client: String,
    /// Request body; the raw text as a JSON string if it was not valid JSON.
    pub body: Value,
    /// `"ok"` or the error code answered; `None` while in flight.
    pub outcome: Option<String>,
    pub received_at_ms: u64,
    pub finished_at_ms: Option<u64>,
}

/// Counters since the last reset (`in_flight` and `held` are always live values).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SimStats {
    pub calls: u64,
    pub ok: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub max_in_flight: u64,
    pub held: u64,
}

/// Handle to a simulated ECS endpoint; cheap to clone, all clones share state.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    latency: Duration,
    capacity: Option<u64>,
    /// Bumped by reset so calls from before it don't touch the new records or counters.
    epoch: u64,
    calls: Vec<CallRecord>,
    rules: Vec<Rule>,
    held: HashMap<u64, Held>,
    next_hold: u64,
    ok: u64,
    errors: u64,
    in_flight: u64,
    max_in_flight: u64,
    /// Off: calls are counted but not kept (long benchmark runs).
    recording: bool,
}

struct Held {
    key: String,
    release: oneshot::Sender<()>,
}

/// AWS errors the sim can answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    InvalidParameter,
    Server,
    Throttling,
    Unavailable,
    UnknownOperation,
    Serialization,
}

impl Failure {
    fn code(self) -> &'static str {
        match self {
            Failure::InvalidParameter => "InvalidParameterException",
            Failure::Server => "ServerException",
            Failure::Throttling => "ThrottlingException",
            Failure::Unavailable => "ServiceUnavailable",
            Failure::UnknownOperation => "UnknownOperationException",
            Failure::Serialization => "SerializationException",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Failure::Server => StatusCode::INTERNAL_SERVER_ERROR,
            Failure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Failure::InvalidParameter => "ecs-sim: injected invalid parameter",
            Failure::Server => "ecs-sim: injected server error",
            Failure::Throttling => "Rate exceeded",
            Failure::Unavailable => "ecs-sim: injected service unavailable",
            Failure::UnknownOperation => "ecs-sim: unknown or missing X-Amz-Target operation",
            Failure::Serialization => "ecs-sim: request body is not a JSON object",
        }
    }

    fn from_action(action: Action) -> Option<Failure> {
        match action {
            Action::InvalidParameter => Some(Failure::InvalidParameter),
            Action::ServerError => Some(Failure::Server),
            Action::Throttle => Some(Failure::Throttling),
            Action::Unavailable => Some(Failure::Unavailable),
            Action::Hold => None,
        }
    }
}

/// What to do with a call once it has been recorded.
enum Decision {
    Answer(Option<Failure>),
    Hold(oneshot::Receiver<()>),
}

/// Keeps a call counted in flight; dropping it (answered or cancelled) finishes the record,
/// so the counters stay exact even when a client disconnects mid-call.
struct InFlight {
    sim: Sim,
    epoch: u64,
    seq: usize,
    hold: Option<u64>,
    outcome: Option<&'static str>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(OUTCOME_CANCELLED);
        let mut st = self.sim.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        if let Some(id) = self.hold {
            st.held.remove(&id);
        }
        if st.epoch != self.epoch {
            return;
        }
        if outcome == OUTCOME_OK {
            st.ok += 1;
        } else {
            st.errors += 1;
        }
        if let Some(rec) = st.calls.get_mut(self.seq) {
            rec.outcome = Some(outcome.to_string());
            rec.finished_at_ms = Some(now_ms());
        }
    }
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        Sim {
            inner: Arc::new(Mutex::new(Inner {
                latency: config.latency,
                capacity: config.capacity,
                epoch: 0,
                calls: Vec::new(),
                rules: Vec::new(),
                held: HashMap::new(),
                next_hold: 0,
                ok: 0,
                errors: 0,
                in_flight: 0,
                max_in_flight: 0,
                recording: true,
            })),
        }
    }

    /// Serves the ECS protocol and the admin API until `shutdown` resolves, then releases
    /// held calls (graceful shutdown would otherwise wait on them forever) and drains.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let router = self.router(stop_rx);
        // Answers go out at once (no Nagle delay), as from a real endpoint.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            })
            .await
    }

    /// Binds 127.0.0.1 on a free port and serves on the current tokio runtime until it ends.
    pub async fn spawn_local() -> std::io::Result<(Sim, String)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let sim = Sim::new(SimConfig::default());
        let server = sim.clone();
        tokio::spawn(async move {
            if let Err(e) = server.serve(listener, std::future::pending()).await {
                tracing::error!(error = %e, "ecs-sim server stopped");
            }
        });
        Ok((sim, url))
    }

    /// Whether calls are kept for [`Sim::calls`]; counters run either way.
    pub fn set_recording(&self, on: bool) {
        self.lock().recording = on;
    }

    pub fn set_latency(&self, d: Duration) {
        self.lock().latency = d;
    }

    /// Capacity mode (see [`SimConfig::capacity`]); settable while calls run.
    pub fn set_capacity(&self, capacity: Option<u64>) {
        self.lock().capacity = capacity;
    }

    pub fn add_rule(&self, rule: Rule) {
        if rule.times > 0 {
            self.lock().rules.push(rule);
        }
    }

    /// Releases held calls: all of them, or those whose call key equals `key`.
    /// Returns how many were released.
    pub fn release(&self, key: Option<&str>) -> usize {
        let mut st = self.lock();
        let ids: Vec<u64> = st
            .held
            .iter()
            .filter(|(_, h)| key.is_none_or(|k| h.key == k))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(h) = st.held.remove(id) {
                // The receiver may be gone if the call was cancelled; it's released either way.
                let _ = h.release.send(());
            }
        }
        ids.len()
    }

    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.clone()
    }

    pub fn stats(&self) -> SimStats {
        let st = self.lock();
        SimStats {
            calls: st.calls.len() as u64,
            ok: st.ok,
            errors: st.errors,
            in_flight: st.in_flight,
            max_in_flight: st.max_in_flight,
            held: st.held.len() as u64,
        }
    }

    /// Restarts the peak from the current concurrency.
    pub fn reset_max_in_flight(&self) {
        let mut st = self.lock();
        st.max_in_flight = st.in_flight;
    }

    /// Forgets calls, rules and counters; calls still in flight stay counted (and held) but
    /// no longer update records or ok/error counts when they finish.
    /// Drops every error-injection rule (e.g. to end a simulated outage).
    pub fn clear_rules(&self) {
        self.lock().rules.clear();
    }

    pub fn reset(&self) {
        let mut st = self.lock();
        st.epoch += 1;
        st.calls.clear();
        st.rules.clear();
        st.ok = 0;
        st.errors = 0;
        st.max_in_flight = st.in_flight;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn router(self, stop: watch::Receiver<bool>) -> Router {
        Router::new()
            .route("/", post(ecs_call))
            .route("/_sim/stats", get(admin_stats))
            .route("/_sim/calls", get(admin_calls))
            .route("/_sim/rules", post(admin_rules))
            .route("/_sim/release", post(admin_release))
            .route("/_sim/latency", post(admin_latency))
            .route("/_sim/capacity", post(admin_capacity))
            .route("/_sim/reset", post(admin_reset))
            .with_state(App { sim: self, stop })
    }

    /// Records an arriving call, counts it in flight and decides its fate, all under one lock
    /// so arrival order, rule consumption and the in-flight peak are consistent.
    fn arrive(
        &self,
        operation: String,
        key: String,
        client: String,
        body: Value,
        invalid: Option<Failure>,
    ) -> (InFlight, Decision) {
        let mut st = self.lock();
        // An unrecorded call's seq points past every record, so finishing it updates none.
        let seq = if st.recording {
            st.calls.len()
        } else {
            usize::MAX
        };
        st.in_flight += 1;
        st.max_in_flight = st.max_in_flight.max(st.in_flight);
        let action = match invalid {
            Some(_) => None,
            None => take_rule(&mut st.rules, &key),
        };
        let mut hold = None;
        let decision = match (invalid, action) {
            (Some(f), _) => Decision::Answer(Some(f)),
            (None, Some(Action::Hold)) => {
                let (tx, rx) = oneshot::channel();
                let id = st.next_hold;
                st.next_hold += 1;
                st.held.insert(
                    id,
                    Held {
                        key: key.clone(),
                        release: tx,
                    },
                );
                hold = Some(id);
                Decision::Hold(rx)
            }
            (None, Some(a)) => Decision::Answer(Failure::from_action(a)),
            // Over capacity: this call makes more than `capacity` in flight.
            (None, None) if st.capacity.is_some_and(|k| st.in_flight > k) => {
                Decision::Answer(Some(Failure::Throttling))
            }
            (None, None) => Decision::Answer(None),
        };
        match &decision {
            Decision::Hold(_) => tracing::info!(seq, %operation, %key, "ecs-sim: holding call"),
            Decision::Answer(Some(f)) => {
                tracing::info!(seq, %operation, %key, code = f.code(), "ecs-sim: failing call")
            }
            Decision::Answer(None) => tracing::debug!(seq, %operation, %key, "ecs-sim: call"),
        }
        if st.recording {
            st.calls.push(CallRecord {
                seq: seq as u64,
                operation,
                key,
                client,
                body,
                outcome: None,
                received_at_ms: now_ms(),
                finished_at_ms: None,
            });
        }
        let guard = InFlight {
            sim: self.clone(),
            epoch: st.epoch,
            seq,
            hold,
            outcome: None,
        };
        (guard, decision)
    }

    /// A held call woken by shutdown (not by release) must stop counting as held.
    fn unhold(&self, id: u64) {
        self.lock().held.remove(&id);
    }

    fn latency(&self) -> Duration {
        self.lock().latency
    }
}

/// Finds and consumes the first rule matching `key`, dropping it once exhausted.
fn take_rule(rules: &mut Vec<Rule>, key: &str) -> Option<Action> {
    let i = rules
        .iter()
        .position(|r| r.times > 0 && (r.key == "*" || r.key == key))?;
    let rule = &mut rules[i];
    rule.times -= 1;
    let action = rule.action;
    if rule.times == 0 {
        rules.remove(i);
    }
    Some(action)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The call key: body `task`, else `attachments[0].attachmentArn`, else "".
fn key_of(body: &Value) -> String {
    body.get("task")
        .and_then(Value::as_str)
        .or_else(|| {
            body.pointer("/attachments/0/attachmentArn")
                .and_then(Value::as_str)
        })
        .unwrap_or("")
        .to_string()
}

#[derive(Clone)]
struct App {
    sim: Sim,
    /// Flips to true on shutdown so held calls let go.
    stop: watch::Receiver<bool>,
}

fn aws_response(failure: Option<Failure>) -> Response {
    let content_type = (header::CONTENT_TYPE, HeaderValue::from_static(AMZ_JSON));
    match failure {
        None => (
            StatusCode::OK,
            [content_type],
            json!({"acknowledgment": "ACK"}).to_string(),
        )
            .into_response(),
        Some(f) => (
            f.status(),
            [
                content_type,
                (
                    HeaderName::from_static("x-amzn-errortype"),
                    HeaderValue::from_static(f.code()),
                ),
            ],
            json!({"__type": f.code(), "message": f.message()}).to_string(),
        )
            .into_response(),
    }
}

/// `POST /`: one AWS JSON 1.1 call. The signature is not checked.
/// `NAME` of the `app/NAME` token the AWS SDKs put in their user agent headers.
fn app_name(headers: &HeaderMap) -> String {
    ["x-amz-user-agent", "user-agent"]
        .iter()
        .filter_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .flat_map(str::split_whitespace)
        .find_map(|token| token.strip_prefix("app/"))
        .unwrap_or_default()
        .to_string()
}

async fn ecs_call(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let operation = target.strip_prefix(TARGET_PREFIX).unwrap_or(target);
    let known = target.starts_with(TARGET_PREFIX) && OPERATIONS.contains(&operation);
    // AWS JSON 1.1 treats an empty body as an empty input structure.
    let parsed: Result<Value, ()> = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(json!({}))
    } else {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(Value::is_object)
            .ok_or(())
    };
    let invalid = if !known {
        Some(Failure::UnknownOperation)
    } else if parsed.is_err() {
        Some(Failure::Serialization)
    } else {
        None
    };
    let (key, recorded) = match parsed {
        Ok(v) => (key_of(&v), v),
        Err(()) => (
            String::new(),
            Value::String(String::from_utf8_lossy(&body).into_owned()),
        ),
    };
    let client = app_name(&headers);
    let (mut call, decision) =
        app.sim
            .arrive(operation.to_string(), key, client, recorded, invalid);
    let failure = match decision {
        Decision::Answer(f) => f,
        Decision::Hold(released) => {
            let mut stop = app.stop.clone();
            tokio::select! {
                _ = released => {}
                // Err means the server is gone; either way the call must not stay blocked.
                _ = stop.wait_for(|s| *s) => {}
            }
            if let Some(id) = call.hold.take() {
                app.sim.unhold(id);
            }
            None
        }
    };
    let latency = app.sim.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    call.outcome = Some(failure.map_or(OUTCOME_OK, Failure::code));
    drop(call);
    aws_response(failure)
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg}))).into_response()
}

/// Parses an admin body leniently (any content type; empty means `{}`).
fn admin_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(text).map_err(|e| format!("invalid body: {e}"))
}

async fn admin_stats(State(app): State<App>) -> Json<SimStats> {
    Json(app.sim.stats())
}

#[derive(Deserialize)]
struct CallsQuery {
    key: Option<String>,
}

async fn admin_calls(State(app): State<App>, Query(q): Query<CallsQuery>) -> Json<Vec<CallRecord>> {
    let mut calls = app.sim.calls();
    if let Some(key) = q.key {
        calls.retain(|c| c.key == key);
    }
    Json(calls)
}

async fn admin_rules(State(app): State<App>, body: Bytes) -> Response {
    match admin_body::<Rule>(&body) {
        Ok(rule) => {
            app.sim.add_rule(rule);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(msg) => bad_request(msg),
    }
}

#[derive(Deserialize)]
struct ReleaseBody {
    key: Option<String>,
}

async fn admin_release(State(app): State<App>, body: Bytes) -> Response {
    match admin_body::<ReleaseBody>(&body) {
        Ok(b) => Json(json!({"released": app.sim.release(b.key.as_deref())})).into_response(),
        Err(msg) => bad_request(msg),
    }
}

#[derive(Deserialize)]
struct LatencyBody {
    ms: u64,
}

async fn admin_latency(State(app): State<App>, body: Bytes) -> Response {
    match admin_body::<LatencyBody>(&body) {
        Ok(b) => {
            app.sim.set_latency(Duration::from_millis(b.ms));
            StatusCode::NO_CONTENT.into_response()
        }
        Err(msg) => bad_request(msg),
    }
}

#[derive(Deserialize)]
struct CapacityBody {
    /// None (null or absent) turns capacity mode off.
    #[serde(default)]
    max_in_flight: Option<u64>,
}

async fn admin_capacity(State(app): State<App>, body: Bytes) -> Response {
    match admin_body::<CapacityBody>(&body) {
        Ok(b) => {
            app.sim.set_capacity(b.max_in_flight);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(msg) => bad_request(msg),
    }
}

async fn admin_reset(State(app): State<App>) -> StatusCode {
    app.sim.reset();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body).unwrap_or(Value::Null)
        }
    }

    /// Minimal HTTP/1.1 client: one request per connection.
    async fn http(
        base: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let addr = base.trim_start_matches("http://");
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Reply {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_string(),
        }
    }

    async fn ecs(base: &str, op: &str, body: &str) -> Reply {
        let target = format!("{TARGET_PREFIX}{op}");
        http(
            base,
            "POST",
            "/",
            &[
                ("X-Amz-Target", target.as_str()),
                ("Content-Type", AMZ_JSON),
                ("Authorization", "AWS4-HMAC-SHA256 Credential=x"),
            ],
            body,
        )
        .await
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Capacity mode: with K calls in flight the next is throttled; set at runtime over the
    /// admin API, and off again with null.
    #[tokio::test]
    async fn capacity_mode_throttles_calls_beyond_k_in_flight() {
        let (sim, base) = Sim::spawn_local().await.unwrap();
        let r = http(
            &base,
            "POST",
            "/_sim/capacity",
            &[],
            r#"{"max_in_flight":1}"#,
        )
        .await;
        assert_eq!(r.status, 204);
        sim.add_rule(Rule {
            key: "arn:held".into(),
            action: Action::Hold,
            times: 1,
        });
        let held = tokio::spawn({
            let base = base.clone();
            async move { ecs(&base, "SubmitTaskStateChange", r#"{"task":"arn:held"}"#).await }
        });
        eventually("the first call held", || sim.stats().held == 1).await;
        let r = ecs(&base, "SubmitTaskStateChange", r#"{"task":"arn:second"}"#).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["__type"], "ThrottlingException");
        sim.release(None);
        assert_eq!(held.await.unwrap().status, 200);
        // One in flight again is within capacity; then capacity mode off.
        let r = ecs(&base, "SubmitTaskStateChange", r#"{"task":"arn:third"}"#).await;
        assert_eq!(r.status, 200);
        let r = http(
            &base,
            "POST",
            "/_sim/capacity",
            &[],
            r#"{"max_in_flight":null}"#,
        )
        .await;
        assert_eq!(r.status, 204);
        assert_eq!(sim.lock().capacity, None);
    }

    #[tokio::test]
    async fn success_shape_and_protocol_errors() {
        let (sim, base) = Sim::spawn_local().await.unwrap();
        let r = ecs(
            &base,
            "SubmitTaskStateChange",
            r#"{"task":"arn:t1","status":"RUNNING"}"#,
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.head.contains("content-type: application/x-amz-json-1.1"));
        assert_eq!(r.json(), json!({"acknowledgment": "ACK"}));

        let att = r#"{"attachments":[{"attachmentArn":"arn:att","status":"ATTACHED"}]}"#;
        assert_eq!(
            ecs(&base, "SubmitAttachmentStateChanges", att).await.status,
            200
        );

        let r = ecs(&base, "DescribeTasks", "{}").await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["__type"], "UnknownOperationException");
        let r = ecs(&base, "SubmitContainerStateChange", "{nope").await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["__type"], "SerializationException");
        assert!(r.head.contains("x-amzn-errortype: serializationexception"));

        let calls = sim.calls();
        assert_eq!(calls.len(), 4);
        assert_eq!(calls[0].seq, 0);
        assert_eq!(calls[0].operation, "SubmitTaskStateChange");
        assert_eq!(calls[0].key, "arn:t1");
        assert_eq!(calls[0].body["status"], "RUNNING");
        assert_eq!(calls[0].outcome.as_deref(), Some("ok"));
        assert!(calls[0].finished_at_ms >= Some(calls[0].received_at_ms));
        assert_eq!(calls[1].key, "arn:att");
        assert_eq!(
            calls[2].outcome.as_deref(),
            Some("UnknownOperationException")
        );
        assert_eq!(calls[3].body, json!("{nope"));
        let s = sim.stats();
        assert_eq!((s.calls, s.ok, s.errors, s.in_flight), (4, 2, 2, 0));
    }

    #[tokio::test]
    async fn invalid_parameter_once_then_ok() {
        let (sim, base) = Sim::spawn_local().await.unwrap();
        sim.add_rule(Rule {
            key: "arn:t".into(),
            action: Action::InvalidParameter,
            times: 1,
        });
        let body = r#"{"task":"arn:t"}"#;
        let r = ecs(&base, "SubmitTaskStateChange", body).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["__type"], "InvalidParameterException");
        assert!(r
            .head
            .contains("x-amzn-errortype: invalidparameterexception"));
        assert_eq!(ecs(&base, "SubmitTaskStateChange", body).await.status, 200);
        // Other failure kinds map to their statuses.
        for (action, status, code) in [
            (Action::ServerError, 500, "ServerException"),
            (Action::Throttle, 400, "ThrottlingException"),
            (Action::Unavailable, 503, "ServiceUnavailable"),
        ] {
            sim.add_rule(Rule {
                key: "*".into(),
                action,
                times: 1,
            });
            let r = ecs(&base, "SubmitTaskStateChange", body).await;
            assert_eq!(
                (r.status, r.json()["__type"].clone()),
                (status, json!(code))
            );
        }
        let outcomes: Vec<_> = sim.calls().into_iter().filter_map(|c| c.outcome).collect();
        assert_eq!(
            outcomes,
            [
                "InvalidParameterException",
                "ok",
                "ServerException",
                "ThrottlingException",
                "ServiceUnavailable"
            ]
        );
        let s = sim.stats();
        assert_eq!((s.ok, s.errors), (1, 4));
    }

    #[tokio::test]
    async fn hold_and_release() {
        let (sim, base) = Sim::spawn_local().await.unwrap();
        sim.add_rule(Rule {
            key: "*".into(),
            action: Action::Hold,
            times: 2,
        });
        let a = tokio::spawn({
            let base = base.clone();
            async move { ecs(&base, "SubmitTaskStateChange", r#"{"task":"a"}"#).await }
        });
        let b = tokio::spawn({
            let base = base.clone();
            async move { ecs(&base, "SubmitTaskStateChange", r#"{"task":"b"}"#).await }
        });
        eventually("two held calls", || sim.stats().held == 2).await;
        let s = sim.stats();
        assert_eq!((s.in_flight, s.max_in_flight, s.ok), (2, 2, 0));
        assert!(sim.calls().iter().all(|c| c.outcome.is_none()));

        assert_eq!(sim.release(Some("a")), 1);
        assert_eq!(a.await.unwrap().status, 200);
        eventually("a finished", || sim.stats().in_flight == 1).await;
        assert_eq!(sim.stats().held, 1);
        assert_eq!(sim.release(Some("a")), 0);

        sim.reset_max_in_flight();
        assert_eq!(sim.stats().max_in_flight, 1);
        assert_eq!(sim.release(None), 1);
        assert_eq!(b.await.unwrap().status, 200);
        eventually("all finished", || sim.stats().in_flight == 0).await;
        let s = sim.stats();
        assert_eq!((s.ok, s.errors, s.held, s.max_in_flight), (2, 0, 0, 1));
        // The rule is used up: the next call goes straight through.
        assert_eq!(
            ecs(&base, "SubmitTaskStateChange", r#"{"task":"c"}"#)
                .await
                .status,
            200
        );
    }

    #[tokio::test]
    async fn latency_is_applied() {
        let (sim, base) = Sim::spawn_local().await.unwrap();
        sim.set_latency(Duration::from_millis(150));
        let started = std::time::Instant::now();
        assert_eq!(
            ecs(&base, "SubmitTaskStateChange", r#"{"task":"a"}"#)
                .await
                .status,
            200
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn shutdown_releases_held_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let sim = Sim::new(SimConfig::default());
        sim.add_rule(Rule {
            key: "a".into(),
            action: Action::Hold,
            times: 1,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(sim.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        let call =
            tokio::spawn(
                async move { ecs(&base, "SubmitTaskStateChange", r#"{"task":"a"}"#).await },
            );
        eventually("held call", || sim.stats().held == 1).await;
        stop.send(()).unwrap();
        assert_eq!(call.await.unwrap().status, 200);
        server.await.unwrap().unwrap();
        let s = sim.stats();
        assert_eq!((s.ok, s.held, s.in_flight), (1, 0, 0));
    }

    #[tokio::test]
    async fn admin_api() {
        let (sim, base) = Sim::spawn_local().await.unwrap();
        let rule = r#"{"key":"a","action":"hold"}"#;
        assert_eq!(
            http(&base, "POST", "/_sim/rules", &[], rule).await.status,
            204
        );
        let call = tokio::spawn({
            let base = base.clone();
            async move { ecs(&base, "SubmitTaskStateChange", r#"{"task":"a"}"#).await }
        });
        eventually("held call", || sim.stats().held == 1).await;
        let stats = http(&base, "GET", "/_sim/stats", &[], "").await.json();
        assert_eq!(
            (stats["held"].clone(), stats["in_flight"].clone()),
            (json!(1), json!(1))
        );
        let r = http(&base, "POST", "/_sim/release", &[], r#"{"key":"a"}"#).await;
        assert_eq!(r.json(), json!({"released": 1}));
        assert_eq!(call.await.unwrap().status, 200);
        assert_eq!(
            http(&base, "POST", "/_sim/release", &[], "").await.json()["released"],
            0
        );

        let r = http(
            &base,
            "POST",
            "/_sim/rules",
            &[],
            r#"{"key":"a","action":"explode"}"#,
        )
        .await;
        assert_eq!(r.status, 400);
        assert_eq!(
            http(&base, "POST", "/_sim/latency", &[], r#"{"ms":5}"#)
                .await
                .status,
            204
        );
        assert_eq!(sim.latency(), Duration::from_millis(5));
        ecs(&base, "SubmitTaskStateChange", r#"{"task":"b"}"#).await;
        let calls = http(&base, "GET", "/_sim/calls?key=b", &[], "")
            .await
            .json();
        assert_eq!(calls.as_array().map(Vec::len), Some(1));
        assert_eq!(calls[0]["key"], "b");
        assert_eq!(calls[0]["seq"], 1);

        assert_eq!(
            http(&base, "POST", "/_sim/reset", &[], "").await.status,
            204
        );
        let s = sim.stats();
        assert_eq!((s.calls, s.ok, s.errors, s.max_in_flight), (0, 0, 0, 0));
        assert!(sim.calls().is_empty());
    }
}
