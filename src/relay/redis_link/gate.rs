//! The reachability gate: whether Redis answers, from this worker's round trips ([`Reach`]),
//! why it counts as unreachable ([`GateClosed`]), and which replies refuse the relay's writes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::Value;

use super::Link;

/// How long a reply on a shared connection may be overdue before Redis counts as unreachable:
/// a stalled link (packets dropped, Redis paused) fails no request until its 5 s bound, and
/// calls started meanwhile could not be recorded either.
const STALLED: Duration = Duration::from_millis(300);

/// Whether Redis answers, from this worker's round trips. Each round trip is numbered when it
/// starts, so an old answer cannot overrule a newer one: a reply that was already on its way
/// when a cut began does not make Redis reachable again, and a request sent before a cut
/// healed does not make it unreachable when it times out afterwards.
#[derive(Default)]
pub(super) struct Reach {
    started: AtomicU64,
    /// The latest-started round trip that went through, and that failed.
    last_ok: AtomicU64,
    last_failed: AtomicU64,
    /// Likewise for the relay's writes alone: a Redis that answers reads but refuses writes
    /// (a replica, `NOREPLICAS`) cannot record a completion either.
    last_write_ok: AtomicU64,
    last_write_refused: AtomicU64,
    /// Shared-connection requests waiting for their reply, by number: when each left.
    waiting: Mutex<BTreeMap<u64, Instant>>,
}

/// A shared-connection request's place among the waiting ones, given up however the request
/// ends: one dropped half-way (a timeout, a cancelled `select!`) must not look stalled for ever.
pub(super) struct Watched<'a> {
    reach: &'a Reach,
    pub(super) n: u64,
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.reach.waiting().remove(&self.n);
    }
}

impl Reach {
    /// Numbers a round trip (not watched for stalls: the group commits, whose `WAIT` for a
    /// slow replica may take a second by design).
    pub(super) fn start(&self) -> u64 {
        self.started.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Numbers a shared-connection round trip and watches it for a stall while it waits.
    pub(super) fn watch(&self) -> Watched<'_> {
        let n = self.start();
        self.waiting().insert(n, Instant::now());
        Watched { reach: self, n }
    }

    pub(super) fn end(&self, n: u64, ok: bool) {
        let last = if ok { &self.last_ok } else { &self.last_failed };
        last.fetch_max(n, Ordering::SeqCst);
    }

    pub(super) fn write_ended(&self, n: u64, ok: bool) {
        let last = if ok {
            &self.last_write_ok
        } else {
            &self.last_write_refused
        };
        last.fetch_max(n, Ordering::SeqCst);
    }

    /// A failure outside a round trip (no connection could be made).
    pub(super) fn failed(&self) {
        let n = self.start();
        self.end(n, false);
    }

    /// Why the gate is closed, if it is (see [`Link::gate`]).
    fn closed(&self) -> Option<GateClosed> {
        if self.last_ok.load(Ordering::SeqCst) < self.last_failed.load(Ordering::SeqCst) {
            return Some(GateClosed::RoundTripFailed);
        }
        if self.last_write_ok.load(Ordering::SeqCst)
            < self.last_write_refused.load(Ordering::SeqCst)
        {
            return Some(GateClosed::WriteRefused);
        }
        let overdue = self
            .waiting()
            .first_key_value()
            .is_some_and(|(_, since)| since.elapsed() >= STALLED);
        overdue.then_some(GateClosed::ReplyOverdue)
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Instant>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a worker's Redis gate is closed: what its latest round trips say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateClosed {
    /// The latest-started round trip that ended failed (an I/O error, a timeout, no
    /// connection).
    RoundTripFailed,
    /// The latest-started write was refused (a replica, `NOREPLICAS`, loading) or not
    /// confirmed by `RELAY_REDIS_MIN_REPLICAS` replicas.
    WriteRefused,
    /// A reply on a shared connection is overdue by [`STALLED`] (a cut, a paused Redis).
    ReplyOverdue,
}

impl GateClosed {
    /// The `why` label of `relay_redis_gate_held_calls_total`.
    pub const fn label(self) -> &'static str {
        match self {
            GateClosed::RoundTripFailed => "round_trip_failed",
            GateClosed::WriteRefused => "write_refused",
            GateClosed::ReplyOverdue => "reply_overdue",
        }
    }
}

/// A reply that says this Redis cannot take the relay's writes now (a replica, loading its
/// data, its replicas gone): as good as unreachable, though the connection answers.
pub(super) fn refuses_writes(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if write_refusal(e.code()))
}

pub(super) fn write_refusal(code: &str) -> bool {
    matches!(
        code,
        "READONLY" | "LOADING" | "MASTERDOWN" | "NOREPLICAS" | "MISCONF"
    )
}

impl Link {
    /// Whether Redis answers: the latest-started round trip that ended went through, so did
    /// the latest-started write (a Redis may answer reads and refuse writes), and no reply on
    /// a shared connection is overdue by [`STALLED`]. Senders start no ECS call
    /// otherwise: a worker cut off from Redis could not record the call's completion, so the
    /// change would be sent again by the shard's next owner; every call started during a cut
    /// is one such duplicate.
    pub fn reachable(&self) -> bool {
        self.gate().is_none()
    }

    /// Why Redis counts as unreachable now (the gate is closed), or None (open).
    pub fn gate(&self) -> Option<GateClosed> {
        self.reach.closed()
    }

    /// [`Link::gate`], waking every call waiting in [`Link::gate_closed`] when it is closed.
    /// The worker samples it on a short period, so waiting calls need no timers of their own.
    pub fn sample_gate(&self) -> Option<GateClosed> {
        let closed = self.gate();
        if closed.is_some() {
            self.gate_closed.notify_waiters();
        }
        closed
    }

    /// Completes at the next sample that finds the gate closed.
    pub fn gate_closed(&self) -> tokio::sync::futures::Notified<'_> {
        self.gate_closed.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_answer_never_overrules_a_newer_one() {
        let reach = Reach::default();
        assert_eq!(reach.closed(), None, "nothing failed yet");
        let (before_cut, failing) = (reach.start(), reach.start());
        reach.end(failing, false);
        reach.end(before_cut, true);
        assert_eq!(
            reach.closed(),
            Some(GateClosed::RoundTripFailed),
            "a reply already on its way when the cut began"
        );
        let (sent_before_heal, after_heal) = (reach.start(), reach.start());
        reach.end(after_heal, true);
        reach.end(sent_before_heal, false);
        assert_eq!(
            reach.closed(),
            None,
            "a request from before the heal timing out later"
        );
    }

    #[test]
    fn a_refused_write_holds_until_a_later_write_goes_through() {
        let reach = Reach::default();
        let write = reach.start();
        reach.write_ended(write, false);
        let read = reach.start();
        reach.end(read, true);
        assert_eq!(
            reach.closed(),
            Some(GateClosed::WriteRefused),
            "reads alone do not clear a refused write"
        );
        let write = reach.start();
        reach.write_ended(write, true);
        assert_eq!(reach.closed(), None);
    }

    #[test]
    fn a_request_dropped_half_way_is_no_longer_waited_for() {
        let reach = Reach::default();
        let watched = reach.watch();
        assert_eq!(reach.waiting().len(), 1);
        drop(watched); // a timeout or a cancelled select dropped the request's future
        assert!(reach.waiting().is_empty());
    }

    #[test]
    fn a_reply_overdue_closes_the_gate_until_it_comes() {
        let reach = Reach::default();
        let watched = reach.watch();
        assert_eq!(reach.closed(), None, "a reply not yet overdue");
        reach.waiting().insert(
            watched.n,
            Instant::now() - STALLED - Duration::from_millis(1),
        );
        assert_eq!(reach.closed(), Some(GateClosed::ReplyOverdue));
        reach.end(watched.n, true);
        drop(watched);
        assert_eq!(reach.closed(), None);
    }
}
