//! One owned shard: its intake (consume → validate → one Redis script per event → ack), its
//! senders, its drain ticker and its retention sweep. Runs while the worker holds the lease.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use rand::Rng;

use crate::relay::amqp;
use crate::relay::dead_letter::{self, Letter};
use crate::relay::metrics as m;
use crate::relay::sender::{Senders, ShardCtx};
use crate::relay::store::{Intake, StoreError};
use crate::relay::wire::{self, Event, Kind};

/// Why a shard stopped running.
#[derive(Debug)]
pub enum ShardEnd {
    /// Cancelled: handover, shutdown or a sender saw the lease lost.
    Stopped,
    /// The store fenced us: another worker owns the shard now.
    Fenced,
    /// The AMQP channel or connection failed: taken again after a growing delay.
    Amqp(String),
    /// Redis did not answer when the shard started: taken again at the next pass (Redis
    /// trouble is paced by the pass itself, and must not grow the AMQP restart delay).
    Redis(String),
}

/// Runs the shard until cancelled or broken; on return every sender has finished and no
/// delivery is left unacknowledged-but-stored (unacked ones return to the queue).
pub async fn run(ctx: Arc<ShardCtx>, conn: &Connection) -> ShardEnd {
    tokio::spawn(lease_watchdog(ctx.clone()));
    // Joined before the shard ends: a letter it is publishing is also forgotten before the
    // lease goes to the next owner, whose mover would otherwise publish it again.
    let mover = tokio::spawn(dead_letter::mover(ctx.clone()));
    let senders = Senders::new(ctx.clone());
    let end = match consume(&ctx, conn, &senders).await {
        Ok(end) => end,
        Err(e) => {
            m::amqp_error("consume");
            ShardEnd::Amqp(e.to_string())
        }
    };
    ctx.cancel.cancel();
    senders.wait().await;
    let _ = mover.await;
    end
}

async fn consume(
    ctx: &Arc<ShardCtx>,
    conn: &Connection,
    senders: &Senders,
) -> Result<ShardEnd, lapin::Error> {
    let queue = amqp::shard_queue(ctx.store.namespace(), ctx.shard);
    let ch = conn.create_channel().await?;

    // Resume what earlier owners left in Redis before taking new deliveries.
    match ctx.store.pending_keys(ctx.shard).await {
        Ok(keys) => keys.iter().for_each(|k| senders.wake(k)),
        Err(StoreError::Fenced) => return Ok(ShardEnd::Fenced),
        Err(e) => {
            tracing::warn!(shard = ctx.shard, error = %e, "cannot list pending tasks");
            return Ok(ShardEnd::Redis(e.to_string()));
        }
    }
    let tag = format!("{}#{}", ctx.fence.owner, ctx.shard);
    let prefetch = ctx.cfg.shard_prefetch();
    let mut consumer = start_consumer(&ch, &queue, &tag, prefetch).await?;
    tokio::spawn(drain_ticker(ctx.clone(), senders.clone()));
    tokio::spawn(resume_ticker(ctx.clone(), senders.clone()));
    tokio::spawn(retention_sweeper(ctx.clone()));

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
        };
        let first = match first {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                m::amqp_error("consume");
                break ShardEnd::Amqp(e.to_string());
            }
            None => {
                m::amqp_error("consumer_cancelled");
                break ShardEnd::Amqp("consumer cancelled by the broker".into());
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
        if let Some(end) = hold_refused(ctx, &ch, &mut refused).await? {
            break end;
        }
        if let Some(end) = intake_batch(ctx, &ch, &queue, batch, senders, &mut refused).await? {
            break end;
        }
    };
    // Closing the channel returns unacknowledged deliveries to the queue for the next owner.
    amqp::close_channel(&ch, "shard released").await;
    Ok(end)
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

/// Stores a batch of deliveries in order, holds the rejected ones for the dead-letter queue
/// (see `dead_letter`), then acks. Returns Some(end) when the shard must stop (nothing of the
/// batch is acked then).
async fn intake_batch(
    ctx: &ShardCtx,
    ch: &Channel,
    queue: &str,
    batch: Vec<Delivery>,
    senders: &Senders,
    refused: &mut Vec<Refused>,
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
        match wire::decode(&d.data, d.routing_key.as_str()) {
            Ok(ev) => {
                events.push(ev);
                origin.push(d);
            }
            Err(reject) => rejected.push((d, reject)),
        }
    }

    let outcomes = match retry_store(ctx, "intake", || {
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
        match outcome {
            Intake::Duplicate => {
                m::event_duplicate();
                // A retried batch whose first try reached Redis comes back as duplicates: its
                // outbox entries exist, so their senders must run all the same.
                if ev.kind != Kind::Container
                    && ev.kind != Kind::ManagedAgent
                    && woken.insert(ev.key.as_str())
                {
                    senders.wake(&ev.key);
                }
            }
            Intake::Batched => m::event_consumed(ev.kind.as_str()),
            Intake::Enqueued => {
                m::event_consumed(ev.kind.as_str());
                if woken.insert(ev.key.as_str()) {
                    senders.wake(&ev.key);
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
                tracing::warn!(shard = ctx.shard, routing_key = %d.routing_key, reason = %reject, "message rejected to the dead-letter queue");
            } else {
                m::dead_letter_hold_full();
                tracing::warn!(shard = ctx.shard, routing_key = %d.routing_key, reason = %reject,
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
    retry_store(ctx, "hold", || {
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
async fn retry_store<T, F, Fut>(
    ctx: &ShardCtx,
    op: &'static str,
    mut step: F,
) -> Result<T, ShardEnd>
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
                tracing::warn!(shard = ctx.shard, error = %e, op, "cannot write to Redis; retrying");
                m::redis_error(op);
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
            tracing::warn!(
                shard = ctx.shard,
                "shard lease not renewed in time; stopping the shard"
            );
            m::fenced("lease_lapse");
            ctx.cancel.cancel();
            return;
        }
    }
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
            Ok(keys) => keys.iter().for_each(|k| senders.wake(k)),
            Err(StoreError::Fenced) => {
                m::fenced("drain");
                ctx.cancel.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(shard = ctx.shard, error = %e, "drain tick failed");
                m::redis_error("drain");
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
        match read.await {
            Ok((keys, batched, held)) => {
                keys.iter().for_each(|k| senders.wake(k));
                m::shard_state(ctx.shard, keys.len(), batched, senders.retry_state());
                m::dead_letters_held(ctx.shard, held);
            }
            Err(e) => {
                tracing::warn!(shard = ctx.shard, error = %e, "cannot list pending tasks");
                m::redis_error("pending");
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
                tracing::info!(
                    shard = ctx.shard,
                    tasks,
                    events,
                    "dropped state of idle tasks (retention)"
                );
                m::events_dropped("retention", events);
            }
            Ok(_) => {}
            Err(StoreError::Fenced) => {
                m::fenced("sweep");
                ctx.cancel.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(shard = ctx.shard, error = %e, "retention sweep failed");
                m::redis_error("sweep");
            }
        }
    }
}
