//! `dlq list|replay`: what was dead-lettered and why, and sending it back once the cause is
//! fixed (a producer bug, a relay upgrade, a task whose batch was full).
//!
//! `list` reads without removing: it takes up to `--limit` messages unacknowledged and closes
//! the channel, which returns them to the queue in their order. `replay` republishes each
//! message to the exchange with its original routing key and properties (minus the relay's
//! reject headers), waits for the broker's confirm, and only then acks it from the dead queue,
//! so a crash in between duplicates a message (intake dedupes it by eventId) but loses none.

use clap::{Args, Subcommand};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use serde::Serialize;
use std::time::Duration;

use crate::relay::amqp::{self, PRODUCER_HEADER, REJECT_HEADER, SOURCE_QUEUE_HEADER};
use crate::relay::config::ConnConfig;
use crate::relay::dead_letter::Letter;
use crate::relay::store::Store;
use crate::relay::wire::Reject;

#[derive(Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Show dead-lettered messages with their reasons, leaving them in the queue; first those
    /// still held in Redis because the dead-letter queue did not take them yet.
    List {
        #[command(flatten)]
        conn: ConnConfig,
        #[arg(long, env = "RELAY_SHARDS", default_value_t = 16)]
        shards: u16,
        /// At most this many messages.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead-lettered messages to the exchange again, then remove them from the queue.
    /// Without --reason: only what the relay refused for a reason other than identity. Messages
    /// the broker dead-lettered (x-death, e.g. `delivery_limit`) and identity refusals go back
    /// only when asked for by --reason.
    Replay {
        #[command(flatten)]
        conn: ConnConfig,
        /// At most this many messages.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Only messages rejected for this reason code (e.g. `batch_full`, or the broker's
        /// x-death reason such as `delivery_limit`); others stay.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// One dead-lettered message as `list` shows it.
#[derive(Debug, Serialize)]
pub struct DeadLetter {
    /// `code: detail` as the relay wrote it; for a message the broker dead-lettered, the
    /// broker's reason (`delivery_limit: …`).
    pub reason: String,
    pub source_queue: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    /// Who published it: its AMQP `user_id` (kept in a header once dead-lettered).
    pub producer: Option<String>,
    /// The body as text (lossy for non-UTF-8), cut at 2,000 bytes.
    pub body: String,
    /// Still held in Redis: the relay moves it to the dead-letter queue once the broker
    /// takes it (replay does not see it until then).
    pub held: bool,
}

/// How long to wait for the next message before deciding the queue has no more ready ones.
const IDLE: Duration = Duration::from_millis(500);

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List {
            conn,
            shards,
            limit,
            json,
        } => {
            let mut all = held(&conn, shards, limit).await?;
            all.extend(list(&conn, limit.saturating_sub(all.len())).await?);
            for m in all {
                if json {
                    println!("{}", serde_json::to_string(&m)?);
                } else {
                    println!(
                        "{}{}  {}  key={}  id={}  producer={}\n  {}",
                        if m.held { "(held in Redis) " } else { "" },
                        m.source_queue,
                        m.reason,
                        m.routing_key,
                        m.message_id.as_deref().unwrap_or("-"),
                        m.producer.as_deref().unwrap_or("-"),
                        m.body
                    );
                }
            }
            Ok(())
        }
        DlqCommand::Replay {
            conn,
            limit,
            reason,
        } => {
            let (replayed, kept) = replay(&conn, limit, reason.as_deref()).await?;
            println!("replayed {replayed} message(s); {kept} left in the dead-letter queue");
            Ok(())
        }
    }
}

/// Up to `limit` dead-lettered messages, oldest first; the queue is left as it was.
pub async fn list(conn: &ConnConfig, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let (connection, ch) = open(conn).await?;
    let (deliveries, _) = take(&ch, &conn.exchange, limit).await?;
    let out = deliveries.iter().map(describe).collect();
    // Closing the channel returns every unacked delivery to the queue, in order.
    let _ = ch.close(200, "listed".into()).await;
    let _ = connection.close(200, "dlq list done".into()).await;
    Ok(out)
}

/// Up to `limit` dead letters still held in Redis (the broker did not take them yet), oldest
/// first per shard.
pub async fn held(conn: &ConnConfig, shards: u16, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let mut conn = conn.clone();
    conn.resolve_secrets()?;
    let store = Store::open(&conn).await?;
    let mut out = Vec::new();
    for shard in 0..shards {
        if out.len() >= limit {
            break;
        }
        let source = amqp::shard_queue(&conn.exchange, shard);
        for raw in store.held_letters(shard, limit - out.len()).await? {
            let l = Letter::decode(&raw, &source);
            out.push(DeadLetter {
                reason: l.reason,
                source_queue: l.source_queue,
                routing_key: l.routing_key,
                message_id: l.properties.message_id().as_ref().map(|m| m.to_string()),
                producer: l.properties.user_id().as_ref().map(|u| u.to_string()),
                body: String::from_utf8_lossy(&l.body[..l.body.len().min(2000)]).into_owned(),
                held: true,
            });
        }
    }
    Ok(out)
}

/// Republishes up to `limit` messages (those with `reason`, if given); returns how many were
/// replayed and how many of those ready at the start are left.
pub async fn replay(
    conn: &ConnConfig,
    limit: usize,
    reason: Option<&str>,
) -> anyhow::Result<(usize, usize)> {
    let (connection, ch) = open(conn).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (deliveries, ready) = take(&ch, &conn.exchange, limit).await?;
    let operator: lapin::types::ShortString = amqp::url_user(&conn.amqp_url).as_str().into();
    let mut replayed = 0;
    for d in &deliveries {
        let origin = Origin::of(d);
        if reason.is_some_and(|r| r != origin.code) {
            continue; // returned to the queue when the channel closes
        }
        // An operator's broad rights must not launder a refused producer's changes: identity
        // refusals, and whatever the broker dead-lettered (its reason unknown to the relay, a
        // producer's own `x-relay-*` headers on it not believed), go back only when asked for.
        if reason.is_none() && (!origin.by_relay || Reject::is_identity(&origin.code)) {
            continue;
        }
        // Republished clean: nothing of an earlier dead-lettering (the relay's headers, the
        // broker's x-death) rides along into the next one.
        let mut headers = amqp::without_dead_letter_headers(d.properties.headers().as_ref());
        // Published now: the relay's queue stage (publish → delivery) must not count the time
        // the message spent in the dead-letter queue.
        headers.insert(
            amqp::PUBLISHED_MS_HEADER.into(),
            AMQPValue::LongLongInt(crate::relay::wire::now_ms()),
        );
        let confirm = ch
            .basic_publish(
                conn.exchange.as_str().into(),
                d.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &d.data,
                // Republished as the operator: the operator's ACL entry decides what it may
                // replay. (The original producer is not carried along: a refused replay's
                // dead letter names the operator.)
                amqp::without_producer(&d.properties, headers).with_user_id(operator.clone()),
            )
            .await?
            .await?;
        if confirm.is_nack() || confirm.take_message().is_some() {
            anyhow::bail!(
                "the broker did not take a replayed message (routing key {}); it stays in the \
                 dead-letter queue",
                d.routing_key
            );
        }
        ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await?;
        replayed += 1;
    }
    // Closing the channel returns what was not replayed to the queue, for a later run.
    let _ = ch.close(200, "replayed".into()).await;
    let _ = connection.close(200, "dlq replay done".into()).await;
    // Those taken count as ready at the start even if the count missed them (see `take`).
    Ok((replayed, ready.max(deliveries.len()) - replayed))
}

async fn open(conn: &ConnConfig) -> anyhow::Result<(Connection, Channel)> {
    let mut conn = conn.clone();
    conn.resolve_secrets()?;
    let connection = amqp::connect(&conn.amqp_url, &conn.amqp_tls(), "ecs-state-relay dlq").await?;
    let ch = connection.create_channel().await?;
    Ok((connection, ch))
}

/// Takes up to `limit` ready messages from the dead queue without acknowledging them; also
/// returns how many were ready.
async fn take(
    ch: &Channel,
    exchange: &str,
    limit: usize,
) -> anyhow::Result<(Vec<Delivery>, usize)> {
    let queue = amqp::dead_queue(exchange);
    let ready = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("dead-letter queue {queue}: {e} (is RELAY_EXCHANGE right?)"))?
        .message_count() as usize;
    // Not bounded by `ready`: messages another consumer (a `dlq list` a moment ago) has just
    // handed back are not counted ready yet, and would be skipped. The idle wait ends it.
    let want = limit;
    if want == 0 {
        return Ok((Vec::new(), ready));
    }
    ch.basic_qos(
        want.min(u16::MAX as usize) as u16,
        BasicQosOptions::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "ecs-state-relay-dlq".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        match tokio::time::timeout(IDLE, consumer.next()).await {
            Ok(Some(Ok(d))) => out.push(d),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => break,
        }
    }
    Ok((out, ready))
}

fn header(d: &Delivery, name: &str) -> Option<String> {
    text(d.properties.headers().as_ref()?.inner().get(name)?)
}

/// A header value that is a string.
fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Who dead-lettered a message, and why.
struct Origin {
    /// The relay's reason code, or the broker's x-death reason.
    code: String,
    /// What `list` shows as the reason.
    text: String,
    /// Dead-lettered by the relay: its `x-relay-*` headers are its own (it drops a
    /// producer's when it dead-letters).
    by_relay: bool,
    producer: Option<String>,
}

impl Origin {
    fn of(d: &Delivery) -> Origin {
        let user_id = d.properties.user_id().as_ref().map(|u| u.to_string());
        match (death_reason(d), header(d, REJECT_HEADER)) {
            // The broker adds x-death when it dead-letters; the relay publishes its refusals
            // itself and never adds one. With x-death, any x-relay-* header is a producer's.
            (None, Some(text)) => Origin {
                code: text.split(':').next().unwrap_or("").trim().to_string(),
                text,
                by_relay: true,
                producer: header(d, PRODUCER_HEADER).or(user_id),
            },
            (death, _) => {
                let code = death.unwrap_or_else(|| "unknown".into());
                Origin {
                    text: format!("{code}: dead-lettered by the broker, not refused by the relay"),
                    code,
                    by_relay: false,
                    producer: user_id,
                }
            }
        }
    }
}

/// The reason of the latest x-death entry, if the broker dead-lettered the message.
fn death_reason(d: &Delivery) -> Option<String> {
    let headers = d.properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return Some("unknown".into());
    };
    let reason = deaths.as_slice().first().and_then(|death| match death {
        AMQPValue::FieldTable(t) => t.inner().get("reason").and_then(text),
        _ => None,
    });
    Some(reason.unwrap_or_else(|| "unknown".into()))
}

fn describe(d: &Delivery) -> DeadLetter {
    let body = &d.data[..d.data.len().min(2000)];
    let origin = Origin::of(d);
    DeadLetter {
        reason: origin.text,
        source_queue: header(d, SOURCE_QUEUE_HEADER)
            .filter(|_| origin.by_relay)
            .unwrap_or_default(),
        routing_key: d.routing_key.as_str().to_string(),
        message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
        producer: origin.producer,
        body: String::from_utf8_lossy(body).into_owned(),
        held: false,
    }
}
