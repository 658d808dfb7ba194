//! One owned shard: its intake (consume → validate → one Redis script per event → ack), its
//! senders, its drain ticker and its retention sweep. Runs while the worker holds the lease.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use rand::Rng;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::relay::amqp;
use crate::relay::config::WorkerConfig;
use crate::relay::dead_letter::{self, Letter};
use crate::relay::events::RedisFailed;
use crate::relay::metrics::{self as m, Op};
use crate::relay::sender::{Senders, ShardCtx};
use crate::relay::store::{Intake, StoreError};
use crate::relay::wire::{self, Event, Kind};

/// Why a shard stopped running; a failure keeps its cause as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum ShardEnd {
    /// Cancelled: handover, shutdown or a sender saw the lease lost.
    #[error("stopped")]
    Stopped,
    /// The store fenced us: another worker owns the shard now.
    #[error("fenced: another worker owns the shard")]
    Fenced,
    /// The AMQP channel or connection failed: taken again after a growing delay.
    #[error("amqp: {0}")]
    Amqp(#[source] lapin::Error),
    /// The broker ended the consumer (queue deleted, node lost): like [`ShardEnd::Amqp`].
    #[error("amqp: the broker cancelled the consumer")]
    ConsumerCancelled,
    /// A consumer restart got no cancel-ok in time: like [`ShardEnd::Amqp`].
    #[error("amqp: no cancel-ok from the broker within {0:?}")]
    NoCancelOk(Duration),
    /// Redis did not answer when the shard started: taken again at the next pass (Redis
    /// trouble is paced by the pass itself, and must not grow the AMQP restart delay).
    #[error("{0}")]
    Redis(#[source] StoreError),
}

impl ShardEnd {
    /// Whether the broker side failed: such a shard is taken again after a growing delay.
    pub fn is_broker_failure(&self) -> bool {
        matches!(
            self,
            ShardEnd::Amqp(_) | ShardEnd::ConsumerCancelled | ShardEnd::NoCancelOk(_)
        )
    }
}

/// Runs the shard until cancelled or broken, inside the shard's span (every line it and its
/// tasks log names the shard); on return every sender has finished and no
/// delivery is left unacknowledged-but-stored (unacked ones return to the queue). Everything
/// the shard starts runs on its tracker and stops with its token: joined before it returns.
pub async fn run(ctx: Arc<ShardCtx>, conn: &Connection) -> ShardEnd {
    let tasks = TaskTracker::new();
    tasks.spawn(lease_watchdog(ctx.clone()).in_current_span());
    // Joined before the shard ends: a letter it is publishing is also forgotten before the
    // lease goes to the next owner, whose mover would otherwise publish it again.
    let mover = dead_letter::Mover {
        shard: ctx.shard,
        store: ctx.store.clone(),
        fence: ctx.fence.clone(),
        dead_letters: ctx.dead_letters.clone(),
        held: ctx.held.clone(),
        cancel: ctx.cancel.clone(),
    };
    tasks.spawn(dead_letter::mover(mover).in_current_span());
    let senders = Senders::new(ctx.clone());
    let end = match consume(&ctx, conn, &senders, &tasks).await {
        Ok(end) => end,
        Err(e) => {
            m::amqp_error(Op::Consume);
            ShardEnd::Amqp(e)
        }
    };
    m::intake_prefetch(ctx.shard, 0);
    ctx.cancel.cancel();
    senders.wait().await;
    tasks.close();
    tasks.wait().await;
    end
}

async fn consume(
    ctx: &Arc<ShardCtx>,
    conn: &Connection,
    senders: &Senders,
    tasks: &TaskTracker,
) -> Result<ShardEnd, lapin::Error> {
    let queue = amqp::shard_queue(ctx.store.namespace(), ctx.shard);
    let ch = conn.create_channel().await?;

    // Resume what earlier owners left in Redis before taking new deliveries.
    match ctx.store.pending_keys(ctx.shard).await {
        Ok(keys) => keys.iter().for_each(|k| senders.resume(k)),
        Err(StoreError::Fenced) => return Ok(ShardEnd::Fenced),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list pending tasks");
            return Ok(ShardEnd::Redis(e));
        }
    }
    let tag = format!("{}#{}", ctx.fence.owner, ctx.shard);
    let mut window = Window::new(&ctx.cfg);
    let mut prefetch = ctx.cfg.shard_prefetch();
    let mut consumer = start_consumer(&ch, &queue, &tag, prefetch).await?;
    m::intake_prefetch(ctx.shard, prefetch);
    // A prefetch change under way (see `restart_consumer`): the new size, and the stored
    // deliveries whose acks are withheld until the window is full.
    let mut resize: Option<u16> = None;
    let mut withheld: Vec<u64> = Vec::new();
    tasks.spawn(drain_ticker(ctx.clone(), senders.clone()).in_current_span());
    tasks.spawn(resume_ticker(ctx.clone(), senders.clone()).in_current_span());
    tasks.spawn(retention_sweeper(ctx.clone()).in_current_span());

    // Rejected deliveries whose letter did not fit in the shard's hold: unacknowledged, and
    // held (then acked) as soon as the hold has room again.
    let mut refused: Vec<Refused> = Vec::new();
    let end = loop {
        let first = tokio::select! {
            _ = ctx.cancel.cancelled() => break ShardEnd::Stopped,
            d = consumer.next() => d,
            // Refused ones may fill the prefetch window: they are retried on a timer too.
            _ = tokio::time::sleep(REFUSED_RETRY), if !refused.is_empty() => {
                if let Some(end) = hold_refused(ctx, &ch, &mut refused).await? {
                    break end;
                }
                continue;
            }
            // The queue ran dry before the window filled: no prefetch matters then. The
            // withheld acks go out, and the window sizes itself again when messages come.
            _ = tokio::time::sleep(RESIZE_IDLE), if resize.is_some() => {
                ack_withheld(&ch, &mut withheld, &refused).await?;
                resize = None;
                continue;
            }
        };
        let first = match first {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                m::amqp_error(Op::Consume);
                break ShardEnd::Amqp(e);
            }
            None => {
                m::amqp_error(Op::ConsumerCancelled);
                break ShardEnd::ConsumerCancelled;
            }
        };
        // Take whatever else is already here: one pipelined Redis round trip and one ack for all.
        let mut batch = vec![first];
        while batch.len() < usize::from(prefetch) {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
        window.observe(batch.iter().map(|d| d.data.len()));
        if let Some(end) = hold_refused(ctx, &ch, &mut refused).await? {
            break end;
        }
        let ack = resize.is_none();
        if !ack {
            withheld.extend(batch.iter().map(|d| d.delivery_tag));
        }
        if let Some(end) = intake_batch(ctx, &ch, &queue, batch, senders, &mut refused, ack).await?
        {
            break end;
        }
        if !refused.is_empty() {
            // A refused delivery is not stored, so the consumer must not be cancelled while it
            // holds one: this resize is given up, and what it withheld is acked.
            if resize.take().is_some() {
                ack_withheld(&ch, &mut withheld, &refused).await?;
            }
            continue;
        }
        // Sizes seen while a resize waits count against its target: large messages arriving
        // then must not be let in by the larger window it was going to open.
        match window.resize(resize.unwrap_or(prefetch)) {
            Some(size) if size == prefetch => {
                ack_withheld(&ch, &mut withheld, &refused).await?;
                resize = None;
            }
            Some(size) => resize = Some(size),
            None => {}
        }
        if let Some(size) = resize {
            if withheld.len() >= usize::from(prefetch) {
                match restart_consumer(
                    ctx,
                    &ch,
                    &queue,
                    &tag,
                    consumer,
                    &mut withheld,
                    size,
                    senders,
                    &mut refused,
                )
                .await?
                {
                    Ok(c) => consumer = c,
                    Err(end) => break end,
                }
                prefetch = size;
                resize = None;
                m::intake_prefetch(ctx.shard, prefetch);
                tracing::debug!(prefetch, "prefetch resized");
            }
        }
    };
    // Closing the channel returns unacknowledged deliveries to the queue for the next owner.
    amqp::close_channel(&ch, "shard released").await;
    Ok(end)
}

/// Starts the shard's consumer again with a new prefetch (a consumer's prefetch is fixed when it
/// starts). The caller withheld the acks of stored deliveries until the window was full, so the
/// broker has nothing more on the way and every delivery this consumer holds is in Redis. Only
/// then is it cancelled: RabbitMQ 3.10 activates the queue's next consumer at a cancel and gives
/// the cancelled one's unacknowledged messages back only later, behind what that consumer took
/// first. Messages that are already stored come back as duplicates, which intake drops, so no
/// task's order can change whatever happens next. The acks go out after the cancel, and the new
/// consumer starts once they are sent (they settle before it, on the same channel).
#[allow(clippy::too_many_arguments)]
async fn restart_consumer(
    ctx: &ShardCtx,
    ch: &Channel,
    queue: &str,
    tag: &str,
    mut old: Consumer,
    withheld: &mut Vec<u64>,
    prefetch: u16,
    senders: &Senders,
    refused: &mut Vec<Refused>,
) -> Result<Result<Consumer, ShardEnd>, lapin::Error> {
    let cancelled = async {
        ch.basic_cancel(tag.into(), BasicCancelOptions::default())
            .await?;
        // The stream ends at the cancel-ok. Nothing should come before it (the window was
        // full); whatever does is stored like any delivery, its ack withheld with the others.
        let mut late = Vec::new();
        while let Some(d) = old.next().await {
            late.push(d?);
        }
        Ok::<_, lapin::Error>(late)
    };
    let late = match tokio::time::timeout(CANCEL_WAIT, cancelled).await {
        Ok(late) => late?,
        Err(_) => {
            m::amqp_error(Op::Consume);
            return Ok(Err(ShardEnd::NoCancelOk(CANCEL_WAIT)));
        }
    };
    if !late.is_empty() {
        withheld.extend(late.iter().map(|d| d.delivery_tag));
        if let Some(end) = intake_batch(ctx, ch, queue, late, senders, refused, false).await? {
            return Ok(Err(end));
        }
    }
    ack_withheld(ch, withheld, refused).await?;
    Ok(Ok(start_consumer(ch, queue, tag, prefetch).await?))
}

/// Acks the withheld deliveries and forgets them: all at once, or one by one past the refused
/// ones (a multiple ack would also ack a refused delivery, unstored and its letter not held).
async fn ack_withheld(
    ch: &Channel,
    withheld: &mut Vec<u64>,
    refused: &[Refused],
) -> Result<(), lapin::Error> {
    if refused.is_empty() {
        if let Some(&last) = withheld.iter().max() {
            ch.basic_ack(last, BasicAckOptions { multiple: true })
                .await?;
        }
    } else {
        for &t in withheld
            .iter()
            .filter(|&&t| refused.iter().all(|r| r.tag != t))
        {
            ch.basic_ack(t, BasicAckOptions::default()).await?;
        }
    }
    withheld.clear();
    Ok(())
}

/// Starts consuming the shard queue with `prefetch` unacknowledged deliveries at most.
async fn start_consumer(
    ch: &Channel,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> Result<Consumer, lapin::Error> {
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// The shard consumer's prefetch, sized by the bytes it sees. RabbitMQ counts prefetch in
/// messages, and each shard's share of RELAY_INTAKE_MAX_BYTES bounds its unacknowledged bytes.
/// A consumer starts with the prefetch that bounds even messages of the largest size
/// (`WorkerConfig::shard_prefetch`); it shrinks as soon as a batch holds larger messages than
/// its window fits, and grows to what the largest message seen fits (at most RELAY_PREFETCH)
/// after a whole window of smaller ones. The bound holds at every size but while messages grow:
/// a window of the current prefetch may then hold large ones.
struct Window {
    most: u16,
    budget: u64,
    /// Deliveries and the largest body seen since counting last started.
    seen: u64,
    largest: u64,
}

impl Window {
    fn new(cfg: &WorkerConfig) -> Window {
        Window {
            most: cfg.prefetch,
            budget: cfg.intake_max_bytes / u64::from(cfg.shards),
            seen: 0,
            largest: 0,
        }
    }

    /// Counts a batch by its bodies' sizes.
    fn observe(&mut self, sizes: impl Iterator<Item = usize>) {
        for size in sizes {
            self.seen += 1;
            self.largest = self.largest.max(size as u64);
        }
    }

    /// The prefetch to change to from `current`, if any. Counting starts again after a change
    /// and after each whole window, so that growth follows the sizes of recent messages only.
    fn resize(&mut self, current: u16) -> Option<u16> {
        let fitting = (self.budget / self.largest.max(1)).clamp(1, u64::from(self.most)) as u16;
        let whole = self.seen >= u64::from(current);
        let next = (fitting < current || (whole && fitting > current)).then_some(fitting);
        if next.is_some() || whole {
            self.seen = 0;
            self.largest = 0;
        }
        next
    }
}

/// Stores a batch of deliveries in order, holds the rejected ones for the dead-letter queue
/// (see `dead_letter`), then acks (unless `ack` is false: the caller acks later). Returns
/// Some(end) when the shard must stop (nothing of the batch is acked then).
async fn intake_batch(
    ctx: &ShardCtx,
    ch: &Channel,
    queue: &str,
    batch: Vec<Delivery>,
    senders: &Senders,
    refused: &mut Vec<Refused>,
    ack: bool,
) -> Result<Option<ShardEnd>, lapin::Error> {
    let received = Instant::now();
    let now = wire::now_ms();
    for d in &batch {
        if let Some(published) = amqp::published_ms(&d.properties) {
            let ms = u64::try_from(now - published).unwrap_or(0);
            m::stage("queue", Duration::from_millis(ms));
        }
    }
    let mut events: Vec<Event> = Vec::with_capacity(batch.len());
    // Which delivery each event came from, to dead-letter what the store refuses.
    let mut origin: Vec<&Delivery> = Vec::with_capacity(batch.len());
    let mut rejected: Vec<(&Delivery, wire::Reject)> = Vec::new();
    for d in &batch {
        let user = d.properties.user_id().as_ref().map(|u| u.as_str());
        let checked = wire::decode(&d.data, d.routing_key.as_str())
            .and_then(|ev| ctx.producers.check(user, &ev).map(|()| ev));
        match checked {
            Ok(ev) => {
                events.push(ev);
                origin.push(d);
            }
            Err(reject) => rejected.push((d, reject)),
        }
    }

    let outcomes = match retry_store(ctx, Op::Intake, || {
        ctx.store
            .intake(ctx.shard, &ctx.fence, &events, ctx.cfg.task_retention_s)
    })
    .await
    {
        Ok(o) => o,
        Err(end) => return Ok(Some(end)),
    };
    m::stage("intake", received.elapsed());

    let mut woken = HashSet::new();
    for ((ev, outcome), d) in events.iter().zip(outcomes).zip(origin) {
        // The arrival order of a key's changes, and whether a change came back from another
        // consumer: what an order investigation needs (RUST_LOG=ecs_state_relay::relay::shard=trace).
        tracing::trace!(event = %ev.event_id, key = %ev.key, owner = %ctx.fence.owner,
            token = ctx.fence.token, tag = d.delivery_tag,
            redelivered = d.redelivered, published_ms = ?amqp::published_ms(&d.properties),
            outcome = ?outcome, "delivery taken");
        match outcome {
            Intake::Duplicate => {
                m::event_duplicate();
                // A retried batch whose first try reached Redis comes back as duplicates: its
                // outbox entries exist, so their senders must run all the same.
                if ev.kind != Kind::Container
                    && ev.kind != Kind::ManagedAgent
                    && woken.insert(ev.key.as_str())
                {
                    senders.wake(&ev.key, &wire::flow(&ev.key, &ev.cluster));
                }
            }
            Intake::Batched => m::event_consumed(ev.kind.as_str()),
            Intake::Enqueued => {
                m::event_consumed(ev.kind.as_str());
                if woken.insert(ev.key.as_str()) {
                    senders.wake(&ev.key, &wire::flow(&ev.key, &ev.cluster));
                }
            }
            Intake::BatchFull => rejected.push((d, wire::Reject::batch_full())),
        }
    }

    // Deliveries whose letter did not fit in the shard's hold stay unacknowledged.
    let mut unacked: HashSet<u64> = HashSet::new();
    if !rejected.is_empty() {
        let letters: Vec<Vec<u8>> = rejected
            .iter()
            .map(|(d, reject)| letter(d, reject, queue, now).encode())
            .collect();
        let held = match hold(ctx, &letters).await {
            Ok(h) => h,
            Err(end) => return Ok(Some(end)),
        };
        for (((d, reject), held), letter) in rejected.iter().zip(held).zip(letters) {
            m::event_rejected(reject.code);
            if held {
                tracing::warn!(routing_key = %d.routing_key, reason = %reject, "message rejected to the dead-letter queue");
            } else {
                m::dead_letter_hold_full();
                tracing::warn!(routing_key = %d.routing_key, reason = %reject,
                    "message rejected, but the shard's held dead letters are at RELAY_DEAD_LETTER_HOLD_BYTES: left unacknowledged until the hold has room");
                unacked.insert(d.delivery_tag);
                refused.push(Refused {
                    tag: d.delivery_tag,
                    letter,
                });
            }
        }
        ctx.held.notify_one();
    }

    if !ack {
        return Ok(None);
    }
    // A multiple ack would also ack a refused delivery still waiting below this batch.
    if refused.is_empty() {
        if let Some(last) = batch.last() {
            ch.basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
    } else {
        for d in batch.iter().filter(|d| !unacked.contains(&d.delivery_tag)) {
            ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await?;
        }
    }
    Ok(None)
}

/// A rejected delivery left unacknowledged because its letter did not fit in the hold.
struct Refused {
    tag: u64,
    letter: Vec<u8>,
}

/// How long a resize waits for its window to fill before it gives up (see `restart_consumer`).
const RESIZE_IDLE: Duration = Duration::from_millis(100);
/// How long a consumer restart waits for the broker's cancel-ok.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// How often refused letters are offered to the hold again while no delivery comes.
const REFUSED_RETRY: Duration = Duration::from_secs(1);

/// Offers the refused letters to the hold again; acks each one it takes.
async fn hold_refused(
    ctx: &ShardCtx,
    ch: &Channel,
    refused: &mut Vec<Refused>,
) -> Result<Option<ShardEnd>, lapin::Error> {
    if refused.is_empty() {
        return Ok(None);
    }
    let letters: Vec<&[u8]> = refused.iter().map(|r| r.letter.as_slice()).collect();
    let held = match hold(ctx, &letters).await {
        Ok(h) => h,
        Err(end) => return Ok(Some(end)),
    };
    let mut still = Vec::new();
    let mut any = false;
    for (r, held) in std::mem::take(refused).into_iter().zip(held) {
        if held {
            ch.basic_ack(r.tag, BasicAckOptions::default()).await?;
            any = true;
        } else {
            still.push(r);
        }
    }
    *refused = still;
    if any {
        ctx.held.notify_one();
    }
    Ok(None)
}

/// Holds encoded letters in the shard's hold until Redis has them; one flag per letter (false:
/// the hold is full).
async fn hold<L: AsRef<[u8]>>(ctx: &ShardCtx, letters: &[L]) -> Result<Vec<bool>, ShardEnd> {
    let max = ctx.cfg.dead_letter_hold_bytes;
    retry_store(ctx, Op::Hold, || {
        ctx.store.hold(ctx.shard, &ctx.fence, letters, max)
    })
    .await
}

/// The held form of a rejected delivery.
fn letter(d: &Delivery, reject: &wire::Reject, queue: &str, now_ms: i64) -> Letter {
    Letter {
        delivery_tag: d.delivery_tag,
        routing_key: d.routing_key.to_string(),
        reason: reject.header(),
        source_queue: queue.to_string(),
        held_at_ms: now_ms,
        properties: d.properties.clone(),
        body: d.data.clone(),
    }
}

/// Runs a shard write until Redis has it: a Redis error is retried with backoff (never ack
/// what Redis does not have); Err(end) when the shard must stop (fenced or cancelled).
async fn retry_store<T, F, Fut>(ctx: &ShardCtx, op: Op, mut step: F) -> Result<T, ShardEnd>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match step().await {
            Ok(v) => return Ok(v),
            Err(StoreError::Fenced) => {
                m::fenced(op);
                return Err(ShardEnd::Fenced);
            }
            Err(e) => {
                RedisFailed {
                    op,
                    what: "cannot write to Redis; retrying",
                    error: &e,
                }
                .emit();
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return Err(ShardEnd::Stopped),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A worker that cannot renew its lease (cut off from Redis, paused) stops the shard before
/// the lease can lapse: intake stops and the consumer is cancelled, so unacknowledged
/// deliveries go back to the queue and the next owner receives the shard's messages (as
/// single-active-consumer, this worker would otherwise keep them from it).
async fn lease_watchdog(ctx: Arc<ShardCtx>) {
    loop {
        let until = ctx.lease_valid_until();
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = tokio::time::sleep_until(until.into()) => {}
        }
        if Instant::now() >= ctx.lease_valid_until() {
            tracing::warn!("shard lease not renewed in time; stopping the shard");
            m::fenced(Op::LeaseLapse);
            ctx.cancel.cancel();
            return;
        }
    }
}

/// A periodic step's Redis failure. Fenced: the lease is gone, so the shard stops (true).
/// Anything else is logged and counted, and the next tick tries again.
fn tick_failed(ctx: &ShardCtx, op: Op, what: &'static str, e: &StoreError) -> bool {
    if matches!(e, StoreError::Fenced) {
        m::fenced(op);
        ctx.cancel.cancel();
        return true;
    }
    RedisFailed { op, what, error: e }.emit();
    false
}

/// Rule 3: at random intervals in [min, max), flush batches of tasks with a known status.
async fn drain_ticker(ctx: Arc<ShardCtx>, senders: Senders) {
    loop {
        let wait = rand::rng()
            .random_range(ctx.cfg.drain_min_ms..=ctx.cfg.drain_max_ms.max(ctx.cfg.drain_min_ms));
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
        match ctx
            .store
            .drain(ctx.shard, &ctx.fence, ctx.cfg.task_retention_s)
            .await
        {
            Ok(keys) => keys.iter().for_each(|k| senders.resume(k)),
            Err(e) => {
                if tick_failed(&ctx, Op::Drain, "drain tick failed", &e) {
                    return;
                }
            }
        }
    }
}

/// Safety net: every few seconds, make sure every task with an outbox has a running sender.
/// A reply lost to a timeout (the script ran, the answer did not arrive) must not leave work
/// waiting for the next owner. The same read reports the shard's pending and batched tasks.
async fn resume_ticker(ctx: Arc<ShardCtx>, senders: Senders) {
    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => {
                m::shard_state(ctx.shard, 0, 0, m::RetryState::default());
                m::dead_letters_held(ctx.shard, 0);
                return;
            }
            _ = tokio::time::sleep(RESUME_EVERY) => {}
        }
        let read = async {
            let keys = ctx.store.pending_keys(ctx.shard).await?;
            let batched = ctx.store.batched_count(ctx.shard).await?;
            let (held, _) = ctx.store.held_count(ctx.shard).await?;
            Ok::<_, StoreError>((keys, batched, held))
        };
        // Three reads of up to 5 s each while Redis stalls: a stopping shard does not wait.
        let read = tokio::select! {
            _ = ctx.cancel.cancelled() => continue,
            read = read => read,
        };
        match read {
            Ok((keys, batched, held)) => {
                keys.iter().for_each(|k| senders.resume(k));
                m::shard_state(ctx.shard, keys.len(), batched, senders.retry_state());
                m::dead_letters_held(ctx.shard, held);
            }
            Err(e) => {
                RedisFailed {
                    op: Op::Pending,
                    what: "cannot list pending tasks",
                    error: &e,
                }
                .emit();
            }
        }
    }
}

const RESUME_EVERY: Duration = Duration::from_secs(5);

/// Rule 11: drop (and count) the state of tasks idle past the retention.
async fn retention_sweeper(ctx: Arc<ShardCtx>) {
    let every = Duration::from_secs((ctx.cfg.task_retention_s / 10).clamp(1, 60));
    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match ctx
            .store
            .sweep(ctx.shard, &ctx.fence, ctx.cfg.task_retention_s)
            .await
        {
            Ok((tasks, events)) if tasks > 0 => {
                tracing::info!(tasks, events, "dropped state of idle tasks (retention)");
                m::events_dropped("retention", events);
            }
            Ok(_) => {}
            Err(e) => {
                if tick_failed(&ctx, Op::Sweep, "retention sweep failed", &e) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefetch_follows_the_sizes_seen_and_shrinks_at_once_on_large_ones() {
        // 128 MiB over 16 shards: 8 MiB a shard, 32 messages of the largest size.
        let cfg = WorkerConfig::default();
        assert_eq!(cfg.shard_prefetch(), 32);
        let mut w = Window::new(&cfg);
        let mut after = |current: u16, n: usize, size: usize| {
            w.observe(std::iter::repeat_n(size, n));
            w.resize(current)
        };
        assert_eq!(after(32, 31, 1_000), None, "not a whole window seen yet");
        assert_eq!(after(32, 1, 1_000), Some(256), "never above RELAY_PREFETCH");
        assert_eq!(after(256, 256, 1_000), None);
        assert_eq!(after(256, 1, 250 * 1024), Some(32), "at once");
        // 100 KiB messages: 8 MiB holds 81 of them.
        assert_eq!(after(32, 32, 100 * 1024), Some(81));
        assert_eq!(after(81, 200, 100 * 1024), None);
        assert_eq!(
            after(81, 80, 1_000),
            None,
            "not a whole window of small ones yet"
        );
        assert_eq!(
            after(81, 1, 1_000),
            Some(256),
            "earlier windows' sizes forgotten"
        );
    }
}
