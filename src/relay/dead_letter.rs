//! Dead letters: a rejected message goes to `<exchange>.dead` with its reason, and its loss is
//! never the price of a broken dead-letter route.
//!
//! Intake never publishes a dead letter itself. It keeps the rejected message in Redis, on the
//! shard's hash tag (`store::hold`, bounded per shard), and acks it with the valid deliveries
//! around it. Each shard's [`mover`] then publishes what its shard holds, oldest first, on the
//! worker's own dead-letter connection, and forgets each one once the broker has confirmed it.
//! So a dead-letter queue that is unbound, full, or behind a memory alarm (which stops the
//! broker reading from every connection that publishes) delays only the dead letters, never
//! the shard's valid traffic nor its acks; and a restart loses nothing, since a letter leaves
//! Redis only after the broker has it.

use std::sync::Arc;
use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection};
use serde::{Deserialize, Serialize};

use crate::relay::amqp::{self, DeadLetterError};
use crate::relay::config::ConnConfig;
use crate::relay::events::{self, RedisFailed};
use crate::relay::metrics::{self as m, Op};
use crate::relay::store::{Fence, Store, StoreError};

/// A rejected message as held in Redis: a JSON header line, then the body as received.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Letter {
    /// The delivery's tag on its shard channel: makes two identical messages of one intake
    /// batch two letters (the hold drops a letter it already has).
    pub delivery_tag: u64,
    pub routing_key: String,
    /// The `x-relay-reject-reason` header: `code: detail`.
    pub reason: String,
    pub source_queue: String,
    /// When it was held (ms since the epoch, this worker's clock; shown, never acted on).
    pub held_at_ms: i64,
    pub properties: BasicProperties,
    #[serde(skip)]
    pub body: Vec<u8>,
}

impl Letter {
    pub fn encode(&self) -> Vec<u8> {
        // The header never holds a raw newline (JSON escapes it), so the first one ends it.
        let mut out = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    /// A held letter; one that cannot be read (written by something else) is still moved,
    /// whole, as its body, so nothing is dropped.
    pub fn decode(raw: &[u8], source_queue: &str) -> Letter {
        let split = raw.iter().position(|b| *b == b'\n');
        let parsed = split.and_then(|i| serde_json::from_slice::<Letter>(&raw[..i]).ok());
        match (parsed, split) {
            (Some(mut letter), Some(i)) => {
                letter.body = raw[i + 1..].to_vec();
                letter
            }
            _ => Letter {
                delivery_tag: 0,
                routing_key: String::new(),
                reason: "unreadable_held_letter: the relay could not read this held entry".into(),
                source_queue: source_queue.to_string(),
                held_at_ms: 0,
                properties: BasicProperties::default(),
                body: raw.to_vec(),
            },
        }
    }
}

/// The worker's dead-letter publisher: a connection of its own, made when first needed and
/// again after it broke, so a publisher blocked by a broker alarm is never the connection the
/// shards consume and ack on.
#[derive(Clone)]
pub struct Publisher {
    conn: ConnConfig,
    name: String,
    open: Arc<tokio::sync::Mutex<Option<(Connection, Channel)>>>,
}

impl Publisher {
    pub fn new(conn: &ConnConfig, worker_id: &str) -> Publisher {
        Publisher {
            conn: conn.clone(),
            name: format!("ecs-state-relay {worker_id} dead letters"),
            open: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Publishes one letter to the dead-letter exchange and waits for the broker's confirm.
    pub async fn publish(&self, letter: &Letter) -> Result<(), DeadLetterError> {
        let mut open = self.open.lock().await;
        let usable = open
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !usable {
            if let Some((c, _)) = open.take() {
                amqp::close_connection(&c, "dead-letter connection replaced").await;
            }
            let c = amqp::connect(&self.conn.amqp_url, &self.conn.amqp_tls(), &self.name)
                .await
                .map_err(|e| DeadLetterError::Broken(e.to_string()))?;
            let ch = amqp::confirm_channel(&c)
                .await
                .map_err(|e| DeadLetterError::Broken(e.to_string()))?;
            *open = Some((c, ch));
        }
        let Some((c, ch)) = open.as_ref() else {
            return Err(DeadLetterError::Broken("no dead-letter connection".into()));
        };
        let published = amqp::dead_letter(
            ch,
            &self.conn.exchange,
            &letter.source_queue,
            &letter.routing_key,
            &letter.body,
            &letter.properties,
            &letter.reason,
        )
        .await;
        if published.is_err() {
            // The next try starts afresh: a blocked connection stays blocked, and a quorum
            // queue that refused a publish keeps refusing that channel even after it has room.
            amqp::close_connection(c, "dead-letter publish failed").await;
            *open = None;
        }
        published
    }

    /// Closes the connection (worker shutdown), bounded.
    pub async fn close(&self) {
        if let Some((c, _)) = self.open.lock().await.take() {
            amqp::close_connection(&c, "worker stopping").await;
        }
    }
}

/// Letters one mover pass reads from Redis at a time (up to 256 KiB each, per shard).
const MOVE_PAGE: usize = 4;
/// How often a mover looks at its shard's hold when nothing woke it.
const MOVE_IDLE: Duration = Duration::from_secs(5);
/// Retry delays after a failed move: from the first, doubling to the last.
const MOVE_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// What a shard's mover works with: handed down by the shard, which owns the lease.
pub struct Mover {
    pub shard: u16,
    pub store: Store,
    pub fence: Fence,
    /// The worker's dead-letter publisher.
    pub dead_letters: Publisher,
    /// Woken when intake holds new dead letters, so the mover moves them at once.
    pub held: Arc<tokio::sync::Notify>,
    /// The shard's token: cancelled when the shard stops (and by the mover when fenced).
    pub cancel: tokio_util::sync::CancellationToken,
}

/// Moves the shard's held letters to the dead-letter queue until the shard stops: woken by
/// intake after it holds some, else every few seconds; backs off while the broker refuses.
pub async fn mover(ctx: Mover) {
    let mut retry = MOVE_RETRY.0;
    let mut failures = Failures::default();
    loop {
        let wait = match move_held(&ctx).await {
            Moved::All => {
                retry = MOVE_RETRY.0;
                failures.healed(ctx.shard);
                MOVE_IDLE
            }
            Moved::Failed(e) => {
                m::amqp_error(Op::DeadLetter);
                failures.failed(ctx.shard, &e);
                let wait = retry;
                retry = (retry * 2).min(MOVE_RETRY.1);
                wait
            }
            Moved::RedisFailed => MOVE_RETRY.0,
            Moved::Fenced => {
                m::fenced(Op::DeadLetter);
                ctx.cancel.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = ctx.held.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

enum Moved {
    All,
    Failed(DeadLetterError),
    RedisFailed,
    Fenced,
}

async fn move_held(ctx: &Mover) -> Moved {
    let source = amqp::shard_queue(ctx.store.namespace(), ctx.shard);
    loop {
        if ctx.cancel.is_cancelled() {
            return Moved::All;
        }
        let page = match ctx.store.held_letters(ctx.shard, MOVE_PAGE).await {
            Ok(page) if page.is_empty() => return Moved::All,
            Ok(page) => page,
            Err(e) => {
                RedisFailed {
                    op: Op::DeadLetter,
                    what: "cannot read held dead letters",
                    error: &e,
                }
                .emit();
                return Moved::RedisFailed;
            }
        };
        for raw in page {
            let letter = Letter::decode(&raw, &source);
            // A stopping shard does not wait for the broker (an alarm holds a publish for
            // 10 s, and other shards' movers queue for the one connection): a letter whose
            // publish is abandoned stays held, for the next owner.
            let published = tokio::select! {
                _ = ctx.cancel.cancelled() => return Moved::All,
                p = ctx.dead_letters.publish(&letter) => p,
            };
            if let Err(e) = published {
                return Moved::Failed(e);
            }
            match ctx.store.unhold(ctx.shard, &ctx.fence, &raw).await {
                Ok(_) => {}
                Err(StoreError::Fenced) => return Moved::Fenced,
                Err(e) => {
                    // Published but still held: the next pass publishes it again (a duplicate
                    // in the dead-letter queue, never a loss).
                    RedisFailed {
                        op: Op::DeadLetter,
                        what: "cannot forget a moved dead letter",
                        error: &e,
                    }
                    .emit();
                    return Moved::RedisFailed;
                }
            }
        }
    }
}

/// Failed moves of one shard: each logged with the broker's reason, at most every
/// [`events::LOG_EVERY`] for all shards, and the recovery once.
#[derive(Default)]
struct Failures {
    failing: bool,
}

impl Failures {
    fn failed(&mut self, shard: u16, e: &DeadLetterError) {
        self.failing = true;
        const WHAT: &str = "dead letters held in Redis: the broker does not take them; retrying";
        if let Some(held_back) = events::admit(std::panic::Location::caller(), "dead_letter", WHAT)
        {
            tracing::warn!(
                shard,
                error = %e,
                held_back,
                "{WHAT}"
            );
        }
    }

    fn healed(&mut self, shard: u16) {
        if std::mem::take(&mut self.failing) {
            tracing::info!(shard, "held dead letters moved to the dead-letter queue");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_survives_its_encoding_and_a_foreign_entry_is_kept_whole() {
        let letter = Letter {
            delivery_tag: 3,
            routing_key: "arn:aws:ecs:us-east-1:1:task/c/t".into(),
            reason: "not_json: line 1\ncolumn 2".into(),
            source_queue: "x.shard-3".into(),
            held_at_ms: 7,
            properties: BasicProperties::default().with_message_id("e-1".into()),
            body: b"{\nnot json\n".to_vec(),
        };
        let back = Letter::decode(&letter.encode(), "x.shard-3");
        assert_eq!(back.body, letter.body);
        assert_eq!(back.reason, letter.reason);
        assert_eq!(back.routing_key, letter.routing_key);
        assert_eq!(back.properties, letter.properties);
        let foreign = Letter::decode(b"something else", "x.shard-3");
        assert_eq!(foreign.body, b"something else");
        assert!(foreign.reason.starts_with("unreadable_held_letter"));
    }
}
