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
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

mod admin;
mod protocol;
mod record;
mod rules;
#[cfg(test)]
mod testing;

pub use record::{CallRecord, SimStats, OUTCOME_CANCELLED, OUTCOME_OK};
pub use rules::{Action, Rule};

use admin::{
    admin_calls, admin_capacity, admin_latency, admin_release, admin_reset, admin_rules,
    admin_stats,
};
use protocol::{ecs_call, Failure};
use record::{now_ms, InFlight};
use rules::{take_rule, Held};

/// Startup settings of a [`Sim`].
#[derive(Clone, Debug, Default)]
pub struct SimConfig {
    /// Delay applied to every ECS call before it is answered (while counted in flight).
    pub latency: Duration,
    /// Capacity mode: a call arriving while this many calls are already in flight is
    /// throttled (`ThrottlingException`), as ECS sheds load. None: unlimited.
    pub capacity: Option<u64>,
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

/// What to do with a call once it has been recorded.
enum Decision {
    Answer(Option<Failure>),
    Hold(oneshot::Receiver<()>),
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

    pub fn set_latency(&self, d: Duration) {
        self.lock().latency = d;
    }

    /// Capacity mode (see [`SimConfig::capacity`]); settable while calls run.
    pub fn set_capacity(&self, capacity: Option<u64>) {
        self.lock().capacity = capacity;
    }

    /// Drops every error-injection rule (e.g. to end a simulated outage).
    pub fn clear_rules(&self) {
        self.lock().rules.clear();
    }

    /// Forgets calls, rules and counters; calls still in flight stay counted (and held) but
    /// no longer update records or ok/error counts when they finish.
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

    fn latency(&self) -> Duration {
        self.lock().latency
    }
}

#[derive(Clone)]
struct App {
    sim: Sim,
    /// Flips to true on shutdown so held calls let go.
    stop: watch::Receiver<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::testing::{ecs, eventually, set_capacity, submit_in_background};

    /// Capacity mode: with K calls in flight the next is throttled; set at runtime over the
    /// admin API, and off again with null.
    #[tokio::test]
    async fn capacity_mode_throttles_calls_beyond_k_in_flight() {
        let (sim, base) = Sim::spawn_local().await.unwrap();
        let r = set_capacity(&base, "1").await;
        assert_eq!(r.status, 204);
        sim.add_rule(Rule {
            key: "arn:held".into(),
            action: Action::Hold,
            times: 1,
        });
        let held = submit_in_background(&base, "arn:held");
        eventually("the first call held", || sim.stats().held == 1).await;
        let r = ecs(&base, "SubmitTaskStateChange", r#"{"task":"arn:second"}"#).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["__type"], "ThrottlingException");
        sim.release(None);
        assert_eq!(held.await.unwrap().status, 200);
        // One in flight again is within capacity; then capacity mode off.
        let r = ecs(&base, "SubmitTaskStateChange", r#"{"task":"arn:third"}"#).await;
        assert_eq!(r.status, 200);
        let r = set_capacity(&base, "null").await;
        assert_eq!(r.status, 204);
        assert_eq!(sim.lock().capacity, None);
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
}
