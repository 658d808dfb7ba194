//! One owned shard: its intake (consume → validate → one Redis script per event → ack), its
//! senders, its drain ticker and its retention sweep. Runs while the worker holds the lease.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use rand::Rng;

use crate::relay::amqp;
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
    /// The AMQP channel or connection failed.
    Amqp(String),
}

/// Runs the shard until cancelled or broken; on return every sender has finished and no
/// delivery is left unacknowledged-but-stored (unacked ones return to the queue).
pub async fn run(ctx: Arc<ShardCtx>, conn: &Connection) -> ShardEnd {
    tokio::spawn(lease_watchdog(ctx.clone()));
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
    end
}

async fn consume(
    ctx: &Arc<ShardCtx>,
    conn: &Connection,
    senders: &Senders,
) -> Result<ShardEnd, lapin::Error> {
    let queue = amqp::shard_queue(ctx.store.namespace(), ctx.shard);
    let ch = amqp::confirm_channel(conn).await?;
    ch.basic_qos(ctx.cfg.prefetch, BasicQosOptions::default())
        .await?;

    // Resume what earlier owners left in Redis before taking new deliveries.
    match ctx.store.pending_keys(ctx.shard).await {
        Ok(keys) => keys.iter().for_each(|k| senders.wake(k)),
        Err(StoreError::Fenced) => return Ok(ShardEnd::Fenced),
        Err(e) => {
            tracing::warn!(shard = ctx.shard, error = %e, "cannot list pending tasks");
            return Ok(ShardEnd::Amqp(format!("redis: {e}")));
        }
    }
    let tag = format!("{}#{}", ctx.fence.owner, ctx.shard);
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(drain_ticker(ctx.clone(), senders.clone()));
    tokio::spawn(resume_ticker(ctx.clone(), senders.clone()));
    tokio::spawn(retention_sweeper(ctx.clone()));

    let max_batch = usize::from(ctx.cfg.prefetch);
    let end = loop {
        let first = tokio::select! {
            _ = ctx.cancel.cancelled() => break ShardEnd::Stopped,
            d = consumer.next() => d,
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
        while batch.len() < max_batch {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
        if let Some(end) = intake_batch(ctx, &ch, &queue, batch, senders).await? {
            break end;
        }
    };
    // Closing the channel returns unacknowledged deliveries to the queue for the next owner.
    amqp::close_channel(&ch, "shard released").await;
    Ok(end)
}

/// Stores a batch of deliveries in order, dead-letters the invalid ones, then acks them all.
/// Returns Some(end) when the shard must stop (nothing of the batch is acked then).
async fn intake_batch(
    ctx: &ShardCtx,
    ch: &Channel,
    queue: &str,
    batch: Vec<Delivery>,
    senders: &Senders,
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
    for d in &batch {
        match wire::decode(&d.data, d.routing_key.as_str()) {
            Ok(ev) => {
                events.push(ev);
                origin.push(d);
            }
            Err(reject) => {
                if let Some(end) = dead_letter(ctx, ch, queue, d, &reject).await {
                    return Ok(Some(end));
                }
            }
        }
    }

    let mut delay = Duration::from_millis(100);
    let outcomes = loop {
        match ctx
            .store
            .intake(ctx.shard, &ctx.fence, &events, ctx.cfg.task_retention_s)
            .await
        {
            Ok(o) => {
                m::stage("intake", received.elapsed());
                break o;
            }
            Err(StoreError::Fenced) => {
                m::fenced("intake");
                return Ok(Some(ShardEnd::Fenced));
            }
            Err(e) => {
                // Never ack what Redis does not have: hold the batch and retry.
                tracing::warn!(shard = ctx.shard, error = %e, "intake cannot reach Redis; retrying");
                m::redis_error("intake");
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return Ok(Some(ShardEnd::Stopped)),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };

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
            Intake::BatchFull => {
                let reject = wire::Reject::batch_full();
                if let Some(end) = dead_letter(ctx, ch, queue, d, &reject).await {
                    return Ok(Some(end));
                }
            }
        }
    }
    if let Some(last) = batch.last() {
        ch.basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
            .await?;
    }
    Ok(None)
}

/// Publishes a rejected delivery to the dead-letter queue with its reason (confirmed), so the
/// ack that follows loses nothing. Some(end) when the broker could not take it.
async fn dead_letter(
    ctx: &ShardCtx,
    ch: &Channel,
    queue: &str,
    d: &Delivery,
    reject: &wire::Reject,
) -> Option<ShardEnd> {
    tracing::warn!(shard = ctx.shard, routing_key = %d.routing_key, reason = %reject, "message rejected to the dead-letter queue");
    m::event_rejected(reject.code);
    let published = amqp::dead_letter(
        ch,
        ctx.store.namespace(),
        queue,
        d.routing_key.as_str(),
        &d.data,
        &d.properties,
        reject,
    )
    .await;
    match published {
        Ok(()) => None,
        Err(e) => {
            // Not acked: the message comes back and is rejected again.
            m::amqp_error("dead_letter");
            Some(ShardEnd::Amqp(format!("dead-letter publish failed: {e}")))
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
                return;
            }
            _ = tokio::time::sleep(RESUME_EVERY) => {}
        }
        let read = async {
            let keys = ctx.store.pending_keys(ctx.shard).await?;
            let batched = ctx.store.batched_count(ctx.shard).await?;
            Ok::<_, StoreError>((keys, batched))
        };
        match read.await {
            Ok((keys, batched)) => {
                keys.iter().for_each(|k| senders.wake(k));
                m::shard_state(ctx.shard, keys.len(), batched, senders.retry_state());
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
