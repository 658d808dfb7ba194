//! The admin API under `/_sim/` (stats, calls, rules, release, latency, capacity, reset) for
//! the `ecs-sim` binary, the demo and humans.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{App, CallRecord, Rule, SimStats};

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

pub(super) async fn admin_stats(State(app): State<App>) -> Json<SimStats> {
    Json(app.sim.stats())
}

#[derive(Deserialize)]
pub(super) struct CallsQuery {
    key: Option<String>,
}

pub(super) async fn admin_calls(
    State(app): State<App>,
    Query(q): Query<CallsQuery>,
) -> Json<Vec<CallRecord>> {
    let mut calls = app.sim.calls();
    if let Some(key) = q.key {
        calls.retain(|c| c.key == key);
    }
    Json(calls)
}

pub(super) async fn admin_rules(State(app): State<App>, body: Bytes) -> Response {
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

pub(super) async fn admin_release(State(app): State<App>, body: Bytes) -> Response {
    match admin_body::<ReleaseBody>(&body) {
        Ok(b) => Json(json!({"released": app.sim.release(b.key.as_deref())})).into_response(),
        Err(msg) => bad_request(msg),
    }
}

#[derive(Deserialize)]
struct LatencyBody {
    ms: u64,
}

pub(super) async fn admin_latency(State(app): State<App>, body: Bytes) -> Response {
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

pub(super) async fn admin_capacity(State(app): State<App>, body: Bytes) -> Response {
    match admin_body::<CapacityBody>(&body) {
        Ok(b) => {
            app.sim.set_capacity(b.max_in_flight);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(msg) => bad_request(msg),
    }
}

pub(super) async fn admin_reset(State(app): State<App>) -> StatusCode {
    app.sim.reset();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::testing::{ecs, eventually, http, submit_in_background};
    use crate::sim::Sim;

    #[tokio::test]
    async fn admin_api() {
        let (sim, base) = Sim::spawn_local().await.unwrap();
        let rule = r#"{"key":"a","action":"hold"}"#;
        assert_eq!(
            http(&base, "POST", "/_sim/rules", &[], rule).await.status,
            204
        );
        let call = submit_in_background(&base, "a");
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
