//! Fault injection: the [`Rule`]s that fail or hold matching calls, how a call consumes
//! one, and releasing held calls.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::Sim;

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

pub(super) struct Held {
    pub(super) key: String,
    pub(super) release: oneshot::Sender<()>,
}

impl Sim {
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

    /// A held call woken by shutdown (not by release) must stop counting as held.
    pub(super) fn unhold(&self, id: u64) {
        self.lock().held.remove(&id);
    }
}

/// Finds and consumes the first rule matching `key`, dropping it once exhausted.
pub(super) fn take_rule(rules: &mut Vec<Rule>, key: &str) -> Option<Action> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::testing::{ecs, eventually, submit_in_background};
    use serde_json::json;

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
        let a = submit_in_background(&base, "a");
        let b = submit_in_background(&base, "b");
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
}
