//! Senders: one per ordering key (task ARN, or attachment ARN) in the worker owning its shard.
//!
//! A sender sends its outbox head, and only when the head has left the outbox (sent, redundant
//! or dropped, in one atomic step with the sent flags) the next. Failures back off for this key
//! only; the fleet-wide permit is held just for the HTTP call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::relay::adaptive;
use crate::relay::config::{WorkerConfig, CALL_MARGIN, PREPARE_SLACK};
use crate::relay::dead_letter;
use crate::relay::ecs::{CallError, CallGuard, Ecs};
use crate::relay::events::{GateHeld, RedisFailed};
use crate::relay::metrics::{self as m, Op};
use crate::relay::producers::Producers;
use crate::relay::schedule::{Backlog, Backoff, Board, Live, Next, Phase, Retry};
use crate::relay::semaphore::Semaphore;
use crate::relay::store::{field, Fence, GateClosed, KeyState, Store, StoreError, Taken};
use crate::relay::wire::{
    self, status_index, BatchItem, Change, OutboxEntry, AGENT_STATUSES, ATTACHMENT_STATUSES,
    CONTAINER_STATUSES, TASK_STATUSES,
};

/// What to do with an outbox head given the key's sent statuses.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Send, then advance these state fields (never backwards).
    Send(Vec<(String, u8)>),
    /// Nothing new for ECS: remove without a call (rule 5).
    Redundant,
}

/// The send predicates of rules 5 and 7.
pub fn plan(entry: &OutboxEntry, state: &KeyState, now_ms: i64) -> Plan {
    match &entry.e {
        Change::Task(t) => {
            let status = status_index(&TASK_STATUSES, &t.status).unwrap_or(0);
            let mut send = state.get(field::TASK_SENT) < status;
            let mut advances = vec![(field::TASK_SENT.to_string(), status)];
            for item in &entry.b {
                let (f, s) = match item {
                    BatchItem::Container(c) => (
                        field::container(&c.container_name),
                        status_index(&CONTAINER_STATUSES, &c.status).unwrap_or(0),
                    ),
                    BatchItem::Agent(a) => (
                        field::agent(&a.container_name, &a.managed_agent_name),
                        status_index(&AGENT_STATUSES, &a.status).unwrap_or(0),
                    ),
                };
                send |= state.get(&f) < s;
                advances.push((f, s));
            }
            if send {
                Plan::Send(advances)
            } else {
                Plan::Redundant
            }
        }
        Change::Attachment(a) => {
            let f = field::attachment(&a.attachment_arn);
            let sent = state.get(&f) >= 1;
            let expired = now_ms > a.expires_at_ms;
            let resource_not_attached = a.attachment_type.as_deref() == Some("resource")
                && status_index(&ATTACHMENT_STATUSES, &a.status) != Some(1);
            if sent || expired || resource_not_attached {
                Plan::Redundant
            } else {
                Plan::Send(vec![(f, 1)])
            }
        }
    }
}

/// When a lease request left, and how many Redis failovers the store had followed by then: a
/// renewal that raced a failover is not counted on.
#[derive(Clone, Copy, Debug)]
pub struct Asked {
    pub at: Instant,
    pub failovers: u64,
}

impl Asked {
    pub fn now(store: &Store) -> Asked {
        Asked {
            failovers: store.link().failovers(),
            at: Instant::now(),
        }
    }
}

/// What every shard of a worker shares.
#[derive(Clone)]
pub struct Shared {
    pub store: Store,
    pub ecs: Ecs,
    pub permits: Semaphore,
    pub dead_letters: dead_letter::Publisher,
    pub cfg: Arc<WorkerConfig>,
    pub producers: Arc<Producers>,
    pub ready: Arc<ReadyWork>,
}

/// Everything a shard's senders share.
pub struct ShardCtx {
    pub shard: u16,
    pub fence: Fence,
    pub store: Store,
    pub ecs: Ecs,
    pub permits: Semaphore,
    pub cfg: Arc<WorkerConfig>,
    /// The worker's dead-letter publisher, for the shard's held letters.
    pub dead_letters: dead_letter::Publisher,
    /// The producer check intake runs on every decoded message.
    pub producers: Arc<Producers>,
    /// The worker's ready-work registry, where the shard's board is listed.
    pub ready: Arc<ReadyWork>,
    /// Woken when intake holds new dead letters, so the mover moves them at once.
    pub held: Arc<Notify>,
    /// Cancelled when the shard is handed over, its lease is lost, or the worker stops.
    pub cancel: CancellationToken,
    /// Until when (local monotonic clock) the lease is surely still ours; set on each renewal,
    /// with the Redis failovers seen by then (a renewal from before a failover is not counted
    /// on until the new primary confirms the lease).
    lease_valid_until: Mutex<(Instant, u64)>,
    /// Woken on each renewal, for senders waiting for the lease to cover a call.
    renewed: Notify,
    /// No ECS call for this shard before then: when the previous owner's lease lapsed, one of
    /// its calls may still be on the wire for one call timeout.
    calls_from: Instant,
}

impl ShardCtx {
    /// A shard just taken at `taken_at` (when the acquire request left); `lapsed` when the
    /// previous owner did not release it. Its token is a child of `parent` (the worker's
    /// session): stopping the session stops the shard, whatever else is going on.
    pub fn new(
        shard: u16,
        taken: Taken,
        asked: Asked,
        shared: Shared,
        parent: &CancellationToken,
    ) -> ShardCtx {
        let Shared {
            store,
            ecs,
            permits,
            dead_letters,
            cfg,
            producers,
            ready,
        } = shared;
        let Taken { fence, lapsed } = taken;
        let taken_at = asked.at;
        let calls_from = if lapsed {
            taken_at + cfg.call_timeout() + CALL_MARGIN
        } else {
            taken_at
        };
        let ctx = ShardCtx {
            shard,
            fence,
            store,
            ecs,
            permits,
            cancel: parent.child_token(),
            lease_valid_until: Mutex::new((taken_at, 0)),
            renewed: Notify::new(),
            calls_from,
            cfg,
            dead_letters,
            producers,
            ready,
            held: Arc::new(Notify::new()),
        };
        ctx.lease_renewed(asked);
        ctx
    }

    /// Until when the lease is surely still ours.
    pub fn lease_valid_until(&self) -> Instant {
        self.lease_valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Records a successful renewal (or the acquisition) asked at `asked`; a margin covers
    /// clock drift.
    pub fn lease_renewed(&self, asked: Asked) {
        let valid = asked.at + self.cfg.lease().mul_f64(0.8);
        *self
            .lease_valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (valid, asked.failovers);
        self.renewed.notify_waiters();
    }

    /// Redis fences every write, but an ECS call is outside Redis: a call may go out only if
    /// it ends (by its timeout) before the shard lease and its permit (`permit_until`) can
    /// lapse, so no change of a task is ever in flight from two workers, and the fleet-wide
    /// limit holds even if the call runs its full time. Nor while Redis is unreachable
    /// ([`crate::relay::redis_link::Link::reachable`]): the completion could not be recorded.
    pub fn may_call(&self, permit_until: Instant) -> bool {
        self.may_call_within(permit_until, Duration::ZERO)
    }

    /// [`Self::may_call`] with `slack` to spare: what a sender checks before it builds a
    /// request, so that the send-time check (without slack) a moment later does not refuse it.
    fn may_call_within(&self, permit_until: Instant, slack: Duration) -> bool {
        !self.cancel.is_cancelled()
            && self.lease_covers_a_call(slack)
            && self.store.link().reachable()
            && self.call_ends_by() + slack < permit_until
    }

    /// Counts a call held by the closed Redis gate, once per call.
    fn gate_held(&self, why: GateClosed, counted: &mut bool) {
        if !std::mem::replace(counted, true) {
            GateHeld { why: why.label() }.emit();
        }
    }

    /// When a call starting now ends at the latest (its timeout), with the margin.
    fn call_ends_by(&self) -> Instant {
        Instant::now() + self.cfg.call_timeout() + CALL_MARGIN
    }

    fn lease_covers_a_call(&self, slack: Duration) -> bool {
        let (valid_until, failovers) = *self
            .lease_valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Instant::now() >= self.calls_from
            && self.call_ends_by() + slack < valid_until
            && failovers == self.store.link().failovers()
    }

    /// Waits until the lease covers a whole call (after a renewal, or after the wait that
    /// follows a lapsed takeover) and Redis is reachable to record its completion; false when
    /// the shard stops first.
    /// A call held while the gate is closed is counted once (`counted`, kept by the caller
    /// across the tries of one call), whatever else holds it: while Redis takes no writes the
    /// lease cannot be renewed either, and the gate is the cause an operator can act on.
    async fn wait_for_call_window(&self, counted: &mut bool) -> bool {
        loop {
            let renewed = self.renewed.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            if self.cancel.is_cancelled() {
                return false;
            }
            match self.store.link().gate() {
                None if self.lease_covers_a_call(PREPARE_SLACK) => return true,
                None => {}
                Some(why) => self.gate_held(why, counted),
            }
            let until = self
                .calls_from
                .max(Instant::now() + Duration::from_millis(100));
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = renewed => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }
}

/// How many keys of one shard are worked on at once. A key waiting for a runner costs a queue
/// entry, not a task, so worker memory follows this bound and not the number of pending
/// tasks; a key in backoff gives its runner back, so failing tasks never hold up the others.
const RUNNERS_PER_SHARD: usize = 16;

/// The boards of every shard this worker runs, for its ready-work report (rule 12). Weak: a
/// shard's board goes with its senders.
#[derive(Default)]
pub struct ReadyWork {
    boards: Mutex<HashMap<u16, Weak<Mutex<Board>>>>,
}

impl ReadyWork {
    fn boards(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Weak<Mutex<Board>>>> {
        self.boards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes waiting for a runner, by cluster, over every shard.
    pub fn backlog(&self) -> Backlog {
        let now = Instant::now();
        let mut total = Backlog::default();
        for board in self.boards().values().filter_map(Weak::upgrade) {
            let backlog = board.lock().unwrap_or_else(|e| e.into_inner()).backlog(now);
            total.merge(backlog);
        }
        total
    }
}

/// How one turn on a key ended.
enum Turn {
    /// Its outbox is empty.
    Done,
    /// Try again after this delay (the key's backoff, or a pause after a Redis error).
    Retry(Duration),
    /// Cancelled or fenced: the shard is going away; its work stays in Redis.
    Stop,
    /// More work, but another cluster's task waits for a runner: go to the back.
    Yield,
}

/// The senders of one shard: one ordering key at a time per runner, each key's outbox in
/// order, never two runners on one key. `wake` after the intake appended to a key's outbox.
#[derive(Clone)]
pub struct Senders {
    ctx: Arc<ShardCtx>,
    board: Arc<Mutex<Board>>,
    tasks: TaskTracker,
    /// The shard's span (made in `shard::run`), for the runners whoever wakes them.
    span: tracing::Span,
}

impl Senders {
    /// Senders for the shard whose span is the current one.
    pub fn new(ctx: Arc<ShardCtx>) -> Self {
        let board = Arc::new(Mutex::new(Board::new(RUNNERS_PER_SHARD)));
        ctx.ready.boards().insert(ctx.shard, Arc::downgrade(&board));
        Self {
            ctx,
            board,
            tasks: TaskTracker::new(),
            span: tracing::Span::current(),
        }
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key` (of cluster `flow`, see [`wire::flow`]) has new work in its outbox.
    pub fn wake(&self, key: &str, flow: &str) {
        let key = key.to_string();
        if self.board().wake(&key, flow, Instant::now()) {
            self.spawn_runner();
        }
    }

    /// Wakes a key whose cluster is not known here (resumed from the pending index).
    pub fn resume(&self, key: &str) {
        self.wake(key, &wire::flow_of_key(key));
    }

    /// Starts a runner the board asked for.
    fn spawn_runner(&self) {
        let this = self.clone();
        let span = self.span.clone();
        self.tasks.spawn(
            async move {
                m::sender_started();
                this.runner().await;
                m::sender_stopped();
            }
            .instrument(span),
        );
    }

    /// The longest failure streak of a task waiting to retry and the longest current backoff
    /// (zero if none): for the "task retrying for minutes" alert and the dashboard.
    pub fn retry_state(&self) -> m::RetryState {
        let board = self.board();
        let mut state = m::RetryState::default();
        for retry in board.retries() {
            state.oldest = state.oldest.max(retry.since.elapsed());
            state.longest_backoff = state.longest_backoff.max(retry.backoff.current());
        }
        state
    }

    /// Keys of this shard waiting for a runner, by cluster.
    pub fn backlog(&self) -> Backlog {
        self.board().backlog(Instant::now())
    }

    /// Waits until every runner has finished its in-flight call and exited (after cancel).
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        let mut boards = self.ctx.ready.boards();
        if boards
            .get(&self.ctx.shard)
            .is_some_and(|b| std::ptr::eq(b.as_ptr(), Arc::as_ptr(&self.board)))
        {
            boards.remove(&self.ctx.shard);
        }
    }

    /// Takes queued keys one after another until the queue is empty or the shard stops.
    async fn runner(&self) {
        loop {
            let next = self.board().next(self.ctx.cancel.is_cancelled());
            let Some(Next {
                key,
                flow,
                queued,
                retry,
            }) = next
            else {
                return;
            };
            m::stage("wake", queued.elapsed());
            let (mut backoff, mut attempt, failing_since) = match retry {
                Some(r) => (r.backoff, r.attempts, Some(r.since)),
                None => {
                    let cfg = &self.ctx.cfg;
                    let min = Duration::from_millis(cfg.backoff_min_ms);
                    let max = Duration::from_millis(cfg.backoff_max_ms);
                    (Backoff::new(min, max), 0, None)
                }
            };
            // Every line of the turn names its task (see `relay::logging`).
            let turn = self
                .turn(&key, &flow, &mut backoff, &mut attempt)
                .instrument(tracing::error_span!("turn", key = %key));
            match turn.await {
                Turn::Done => {}
                Turn::Retry(delay) => {
                    // A streak restarts when the failing call is the first since a success.
                    let since = failing_since
                        .filter(|_| attempt > 1)
                        .unwrap_or_else(Instant::now);
                    let retry = Retry {
                        backoff,
                        attempts: attempt,
                        since,
                    };
                    self.board().back_off(&key, retry);
                    let this = self.clone();
                    self.tasks.spawn(async move {
                        if this.sleep(delay).await
                            && this.board().backoff_over(&key, Instant::now())
                        {
                            this.spawn_runner();
                        }
                    });
                }
                Turn::Stop => {
                    self.board().stop(&key);
                    return;
                }
                Turn::Yield => self.board().requeue(&key, Instant::now()),
            }
        }
    }

    /// True when the key is done: nothing woke it since it last read the outbox.
    fn finish(&self, key: &str) -> bool {
        self.board().finish(key)
    }

    /// Sends a key's outbox head after head until it is empty, a call fails or the shard stops.
    async fn turn(&self, key: &str, flow: &str, backoff: &mut Backoff, attempt: &mut u32) -> Turn {
        let ctx = &self.ctx;
        // The outbox head and state, when the last completion brought them along.
        let mut read: Option<(Option<String>, KeyState)> = None;
        loop {
            if ctx.cancel.is_cancelled() {
                return Turn::Stop;
            }
            let (head, state) = match read.take() {
                Some(r) => r,
                None => {
                    self.clear_wake(key);
                    match ctx.store.peek(ctx.shard, key).await {
                        Ok(x) => x,
                        Err(e) => {
                            RedisFailed {
                                op: Op::Peek,
                                what: "cannot read outbox; retrying",
                                error: &e,
                            }
                            .emit();
                            return Turn::Retry(Duration::from_millis(500));
                        }
                    }
                }
            };
            let Some(raw) = head else {
                if self.finish(key) {
                    return Turn::Done;
                }
                continue;
            };
            let entry: OutboxEntry = match serde_json::from_str(&raw) {
                Ok(e) => e,
                Err(e) => {
                    // Written by this program, so this means manual edits or a version skew:
                    // drop it (counted, logged whole) rather than block the task forever.
                    tracing::error!(error = %e, entry = %raw, "unreadable outbox entry dropped");
                    m::events_dropped("unreadable", 1);
                    let history = self.history(None, 0, "unreadable entry dropped");
                    match self.complete(key, &raw, &[], &history).await {
                        Some(next) => read = Some(next),
                        None => return Turn::Stop,
                    }
                    continue;
                }
            };
            let id_prefix = entry.head_prefix();
            let advances = match plan(&entry, &state, wire::now_ms()) {
                Plan::Redundant => {
                    tracing::debug!(id = %entry.id, "redundant change removed");
                    m::events_dropped("redundant", 1);
                    let history = self.history(Some(&entry), 0, "redundant: nothing new for ECS");
                    match self.complete(key, &id_prefix, &[], &history).await {
                        Some(next) => read = Some(next),
                        None => return Turn::Stop,
                    }
                    continue;
                }
                Plan::Send(advances) => advances,
            };
            // The permit is shared by the head's own cluster (a resumed key's flow was a guess).
            let call_flow = match entry.e.cluster() {
                "" => flow.to_string(),
                cluster => wire::flow(key, cluster),
            };
            let Some(result) = self.call(key, &entry, &call_flow).await else {
                // Cancelled while waiting for a permit: the entry stays for the next owner.
                return Turn::Stop;
            };
            *attempt += 1;
            tracing::debug!(id = %entry.id, status = entry.e.status(),
                attempt = *attempt, outcome = result.as_ref().map_or_else(|e| e.code(), |_| "ok"),
                "ECS submission");
            let (record, history): (&[(String, u8)], String) = match result {
                Ok(()) => {
                    m::submission_batch(entry.b.len());
                    if let Some(occurred) = entry.t {
                        let ms = u64::try_from(wire::now_ms() - occurred).unwrap_or(0);
                        m::end_to_end(Duration::from_millis(ms));
                    }
                    (&advances, self.history(Some(&entry), *attempt, "ok"))
                }
                Err(CallError::InvalidParameter(msg)) => {
                    tracing::warn!(id = %entry.id, error = %msg, request = %raw,
                        "ECS rejected the change as invalid; dropped");
                    m::events_dropped("invalid_parameter", 1 + entry.b.len() as u64);
                    let answer = format!("InvalidParameterException (dropped): {msg}");
                    (&[], self.history(Some(&entry), *attempt, &answer))
                }
                Err(e) => {
                    m::retry();
                    let delay = backoff.next_delay();
                    self.board()
                        .failed(&key.to_string(), *attempt, shorten(&e.to_string()), delay);
                    // Rule 8 retries for ever: keep the task from looking idle to retention.
                    match ctx
                        .store
                        .touch(ctx.shard, &ctx.fence, key, ctx.cfg.task_retention_s)
                        .await
                    {
                        Ok(()) => {}
                        Err(StoreError::Fenced) => {
                            m::fenced(Op::Touch);
                            ctx.cancel.cancel();
                            return Turn::Stop;
                        }
                        Err(e) => {
                            RedisFailed {
                                op: Op::Touch,
                                what: "cannot mark a retrying task active",
                                error: &e,
                            }
                            .emit();
                        }
                    }
                    // First failure and then every tenth: a long outage must not flood the log.
                    // A first throttle is counted in the adaptive limit's log line instead.
                    let first = *attempt == 1 && !adaptive::is_throttle(e.code());
                    if first || attempt.is_multiple_of(10) {
                        tracing::warn!(id = %entry.id, attempt = *attempt, error = %e,
                            retry_in_ms = delay.as_millis() as u64, "ECS call failed; retrying");
                    }
                    return Turn::Retry(delay);
                }
            };
            backoff.reset();
            *attempt = 0;
            self.board().succeeded(key);
            let answered = Instant::now();
            match self.complete(key, &id_prefix, record, &history).await {
                Some(next) => {
                    m::stage("complete", answered.elapsed());
                    if next.0.is_some() && self.board().others_wait(flow) {
                        return Turn::Yield;
                    }
                    read = Some(next)
                }
                None => return Turn::Stop,
            }
        }
    }

    /// One ECS call under a fleet-wide permit; None when the shard stops before a call went out.
    async fn call(
        &self,
        key: &str,
        entry: &OutboxEntry,
        flow: &str,
    ) -> Option<Result<(), CallError>> {
        let ctx = &self.ctx;
        let mut gate_counted = false;
        loop {
            // Also after a refused try: it waits for the lease or Redis, then a permit again.
            self.board().phase(key, Phase::Permit);
            if !ctx.wait_for_call_window(&mut gate_counted).await {
                return None;
            }
            // A call waiting for a permit while the gate closes is held by it as well (the
            // permit itself cannot be taken while Redis refuses writes): counted once.
            let acquire = ctx.permits.acquire(flow, &ctx.cancel);
            tokio::pin!(acquire);
            let permit = if gate_counted {
                acquire.await?
            } else {
                let closed = ctx.store.link().gate_closed();
                tokio::select! {
                    permit = &mut acquire => permit?,
                    _ = closed => {
                        if let Some(why) = ctx.store.link().gate() {
                            ctx.gate_held(why, &mut gate_counted);
                        }
                        acquire.await?
                    }
                }
            };
            // Waiting for the permit may have used up the lease's cover (renewals wait on a
            // slow replica): wait for the next renewal rather than build a request that the
            // send-time guard would refuse.
            if !ctx.may_call_within(permit.valid_until(), PREPARE_SLACK) {
                ctx.permits.release(permit).await;
                continue;
            }
            self.board().phase(key, Phase::Call);
            let started = Instant::now();
            // Checked by the SDK right before the request goes on the wire: a long permit wait
            // or a paused process must not send a call that could outlive lease or permit.
            let refused = Arc::new(AtomicBool::new(false));
            let guard = {
                let ctx = ctx.clone();
                let refused = refused.clone();
                let permit_until = permit.valid_until();
                CallGuard::new(move || {
                    let ok = ctx.may_call(permit_until);
                    refused.store(!ok, Ordering::SeqCst);
                    ok
                })
            };
            let (operation, result) = match &entry.e {
                Change::Task(t) => (
                    "SubmitTaskStateChange",
                    ctx.ecs.submit_task(t, &entry.b, guard).await,
                ),
                Change::Attachment(a) if a.task.is_some() => (
                    "SubmitTaskStateChange",
                    ctx.ecs.submit_task_attachment(a, guard).await,
                ),
                Change::Attachment(a) => (
                    "SubmitAttachmentStateChanges",
                    ctx.ecs.submit_attachment(a, guard).await,
                ),
            };
            if refused.load(Ordering::SeqCst) {
                ctx.permits.release(permit).await;
                // Nothing reached ECS: wait until a renewal covers a call and Redis answers (or
                // the shard stops).
                tracing::debug!(
                    "lease or permit too short for a call, or Redis unreachable; waiting"
                );
                match ctx.store.link().gate() {
                    Some(why) => ctx.gate_held(why, &mut gate_counted),
                    None => m::fenced(Op::Call),
                }
                continue;
            }
            let error_code = result.as_ref().err().map(CallError::code);
            m::ecs_call(operation, error_code, started.elapsed());
            // Before the release: a throttled call's permit must go back to Redis, not on to
            // the next call of this worker.
            ctx.permits.record(error_code);
            ctx.permits.release(permit).await;
            return Some(result);
        }
    }

    /// Clears the wake flag before the outbox is read, so a wake after that read is not lost.
    fn clear_wake(&self, key: &str) {
        self.board().reading(key);
    }

    /// A history entry (see `complete.lua`, read by `inspect`): which worker removed the head
    /// (`w`), its status (`s`) and container changes (`c`), after how many calls (`n`), and
    /// ECS's answer or why no call was needed (`a`). Short names: it is kept per task.
    fn history(&self, entry: Option<&OutboxEntry>, calls: u32, answer: &str) -> String {
        let answer = shorten(answer);
        serde_json::json!({
            "w": self.ctx.fence.owner,
            "s": entry.map(|e| e.e.status()),
            "c": entry.map_or(0, |e| e.b.len()),
            "n": calls,
            "a": answer,
        })
        .to_string()
    }

    /// Removes the head, recording `history`; retries Redis errors (never re-sends). Returns
    /// the key's next head and state, read in the same step; None when the shard is lost.
    async fn complete(
        &self,
        key: &str,
        id_prefix: &str,
        advances: &[(String, u8)],
        history: &str,
    ) -> Option<(Option<String>, KeyState)> {
        let ctx = &self.ctx;
        let id = id_prefix.to_string();
        loop {
            self.clear_wake(key);
            match ctx
                .store
                .complete_prefix(
                    ctx.shard,
                    &ctx.fence,
                    key,
                    &id,
                    advances,
                    history,
                    ctx.cfg.task_retention_s,
                )
                .await
            {
                Ok(done) => return Some((done.head, done.state)),
                Err(StoreError::Fenced) => {
                    tracing::warn!("shard lease lost; sender stops");
                    m::fenced(Op::Complete);
                    ctx.cancel.cancel();
                    return None;
                }
                Err(e) => {
                    // Shutdown or a lost lease must not wait for Redis: the entry stays at the
                    // head and its next owner sends it again (the one allowed duplicate).
                    let stopping = ctx.cancel.is_cancelled();
                    RedisFailed {
                        op: Op::Complete,
                        what: if stopping {
                            "shard stopping with a completion not recorded; the change will be sent again"
                        } else {
                            "cannot record completion; retrying"
                        },
                        error: &e,
                    }
                    .emit();
                    if stopping {
                        return None;
                    }
                    tokio::select! {
                        _ = ctx.cancel.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }

    /// Sleeps unless cancelled first; false when cancelled.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.ctx.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

impl m::LiveWork for ReadyWork {
    /// What the worker can tell about `key` (live state, memory only), from whichever of its
    /// shards holds it; None when none does.
    fn live(&self, key: &str) -> Option<Live> {
        let now = Instant::now();
        let key = key.to_string();
        self.boards()
            .values()
            .filter_map(Weak::upgrade)
            .find_map(|b| b.lock().unwrap_or_else(|e| e.into_inner()).live(&key, now))
    }
}

/// ECS's answers can be long (and echo input): what the history and `/inspect` keep of one is
/// at most this many bytes, control characters (escaped six times as long in JSON) as spaces.
const MAX_ANSWER: usize = 200;

fn shorten(answer: &str) -> String {
    // Kept at a character boundary: a cut never splits a UTF-8 sequence.
    let mut short = String::new();
    for c in answer.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if short.len() + c.len_utf8() > MAX_ANSWER {
            break;
        }
        short.push(c);
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ecs_answer_is_kept_short_and_on_one_line() {
        let long = format!(
            "InvalidParameterException: {}\n{}",
            "é".repeat(300),
            "x".repeat(500)
        );
        let short = shorten(&long);
        assert!(short.len() <= MAX_ANSWER, "{}", short.len());
        assert!(short.starts_with("InvalidParameterException: é"));
        assert!(!short.chars().any(char::is_control));
        assert_eq!(shorten("ServerException:\tbusy"), "ServerException: busy");
    }
}
