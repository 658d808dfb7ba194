//! Failures the relay recovers from, as typed events: one call writes the log line and
//! counts the metric, so the two cannot drift apart, and a line repeated from one call site is
//! written at most every [`LOG_EVERY`], with how many were held back (an outage of a minute
//! must not write thousands of identical lines).

use std::collections::HashMap;
use std::fmt::Display;
use std::panic::Location;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::relay::metrics::{self as m, Op};

/// How often one call site may write its line.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// A step could not reach Redis (or Redis refused it) and will be tried again. The shard and
/// task come from the spans the step runs in (see `relay::logging`).
pub struct RedisFailed<'a> {
    pub op: Op,
    /// What the step could not do, and what happens next ("cannot read outbox; retrying").
    pub what: &'static str,
    pub error: &'a dyn Display,
}

impl RedisFailed<'_> {
    /// Counts `relay_redis_errors_total{op}` and logs, rate-limited per call site.
    #[track_caller]
    pub fn emit(self) {
        m::redis_error(self.op);
        if let Some(held_back) = admit(Location::caller(), self.op.label(), self.what) {
            tracing::warn!(
                op = self.op.label(),
                error = %self.error,
                held_back,
                "{}",
                self.what
            );
        }
    }
}

/// A sender was ready to start an ECS call and held it back: the Redis gate is closed
/// ([`crate::relay::redis_link::Link::gate`]), so the call's completion could not be recorded.
pub struct GateHeld {
    /// Why the gate is closed (`GateClosed::label`).
    pub why: &'static str,
}

impl GateHeld {
    /// Counts `relay_redis_gate_held_calls_total{why}`, sets `relay_redis_gate_closed`, and
    /// logs why, rate-limited.
    #[track_caller]
    pub fn emit(self) {
        let why = self.why;
        m::redis_gate_held(why);
        m::redis_gate(true);
        if let Some(held_back) = admit(Location::caller(), why, "gate") {
            tracing::warn!(
                why,
                held_back,
                "Redis gate closed: this worker starts no ECS call until Redis answers and takes writes again"
            );
        }
    }
}

/// Whether the line `what` about `op` from `site` may be written now; if so, how many were
/// held back since the last one. Call sites and their lines are few and fixed, so the map
/// stays small.
pub fn admit(
    site: &'static Location<'static>,
    op: &'static str,
    what: &'static str,
) -> Option<u64> {
    type Line = (&'static str, u32, u32, &'static str, &'static str);
    type Sites = HashMap<Line, (Option<Instant>, u64)>;
    static SITES: OnceLock<Mutex<Sites>> = OnceLock::new();
    let mut sites = SITES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let (last, held) = sites
        .entry((site.file(), site.line(), site.column(), op, what))
        .or_default();
    if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
        *held += 1;
        return None;
    }
    *last = Some(now);
    Some(std::mem::take(held))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_call_site_writes_once_per_interval_and_counts_what_it_held_back() {
        let site = |what| admit(Location::caller(), "op", what);
        let other = || admit(Location::caller(), "op", "a line");
        assert_eq!(site("a line"), Some(0), "the first line is written");
        assert_eq!(site("a line"), None);
        assert_eq!(site("a line"), None);
        assert_eq!(
            site("another line"),
            Some(0),
            "another line has its own allowance"
        );
        assert_eq!(other(), Some(0), "another call site has its own allowance");
        assert_eq!(
            admit(Location::caller(), "another op", "a line"),
            Some(0),
            "another op has its own allowance"
        );
    }
}
