//! The call record: what the sim saw of each ECS call, its outcome, and the counters.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Sim;

/// Outcome recorded for a call whose connection went away before it was answered.
pub const OUTCOME_CANCELLED: &str = "Cancelled";
/// Outcome recorded for a successful call.
pub const OUTCOME_OK: &str = "ok";

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

/// Keeps a call counted in flight; dropping it (answered or cancelled) finishes the record,
/// so the counters stay exact even when a client disconnects mid-call.
pub(super) struct InFlight {
    pub(super) sim: Sim,
    pub(super) epoch: u64,
    pub(super) seq: usize,
    pub(super) hold: Option<u64>,
    pub(super) outcome: Option<&'static str>,
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
    /// Whether calls are kept for [`Sim::calls`]; counters run either way.
    pub fn set_recording(&self, on: bool) {
        self.lock().recording = on;
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
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
