//! `publish`: JSON lines → the exchange, persistent, mandatory, with publisher confirms.
//! Stops at the first line the broker refuses (nack) or returns (unroutable), naming it.

use std::collections::VecDeque;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use lapin::{Confirmation, PublisherConfirm};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::relay::amqp;
use crate::relay::config::ConnConfig;

/// Publishes still waiting for their confirm; bounds memory while keeping the pipe full.
const CONFIRM_WINDOW: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Nacks in a row a publisher answers by publishing again (with a growing pause, about 11 s
/// in all) before it reports the line as refused.
const NACK_RETRIES: u32 = 10;

/// How long a publisher keeps trying to reach a node after its connection was lost.
const RECOVER_FOR: Duration = Duration::from_secs(60);

/// A confirmed publisher: `send` lines, then `flush` to wait for every confirm. Used by
/// `publish` and the benchmark (which publishes in timed chunks). When its node goes away it
/// connects to the next node of `RELAY_AMQP_URL` and publishes again every message not yet
/// confirmed (at least once: the relay drops the repeats by `eventId`). A message published
/// again can land behind a later one that was stored the first time: order across a node loss
/// holds only for a producer with one unconfirmed message per task at a time.
pub struct Publisher {
    conn: ConnConfig,
    /// The broker user it connects as: every message's `user_id`.
    user: String,
    /// Index in RELAY_AMQP_URL of the node connected to.
    node: usize,
    connection: lapin::Connection,
    ch: lapin::Channel,
    waiting: VecDeque<Pending>,
    confirmed: u64,
    /// Nacks in a row, each answered by publishing again; past [`NACK_RETRIES`] a nack is final.
    nacks: u32,
}

/// A message sent but not confirmed yet, kept so it can be sent again after a node loss.
struct Pending {
    line: usize,
    text: String,
    routing_key: String,
    message_id: Option<String>,
    /// None after its connection was lost, until it is published again.
    confirm: Option<PublisherConfirm>,
}

impl Publisher {
    pub async fn connect(conn: &ConnConfig) -> Result<Publisher, PublishError> {
        let mut conn = conn.clone();
        conn.resolve_secrets()?;
        let (connection, ch, node) = open(&conn, 0).await?;
        Ok(Publisher {
            user: amqp::url_user(&conn.amqp_url),
            conn,
            node,
            connection,
            ch,
            waiting: VecDeque::new(),
            confirmed: 0,
            nacks: 0,
        })
    }

    /// Publishes one JSON line (`line_no` names it in errors); waits for the oldest confirm
    /// when the window is full.
    pub async fn send(&mut self, line_no: usize, text: &str) -> Result<(), PublishError> {
        let (routing_key, message_id) = route(text).map_err(|reason| PublishError::Line {
            line: line_no,
            reason,
        })?;
        let published = publish(
            &self.ch,
            &self.conn.exchange,
            &self.user,
            &routing_key,
            &message_id,
            text,
        )
        .await;
        let lost = published.as_ref().err().map(lapin::Error::to_string);
        self.waiting.push_back(Pending {
            line: line_no,
            text: text.to_string(),
            routing_key,
            message_id,
            confirm: published.ok(),
        });
        if let Some(cause) = lost {
            // The connection went: this message goes out again with the unconfirmed ones.
            self.recover(&cause).await?;
        }
        if self.waiting.len() >= CONFIRM_WINDOW {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// Waits for every outstanding confirm; returns how many lines were confirmed so far.
    pub async fn flush(&mut self) -> Result<u64, PublishError> {
        while !self.waiting.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(self.confirmed)
    }

    pub async fn close(mut self) -> Result<u64, PublishError> {
        let confirmed = self.flush().await?;
        amqp::close_connection(&self.connection, "done").await;
        Ok(confirmed)
    }

    /// Waits for the oldest confirm. A refusal (nack, returned) ends the run naming the line;
    /// a lost connection sends everything unconfirmed again through another node.
    async fn settle_oldest(&mut self) -> Result<(), PublishError> {
        loop {
            let Some(p) = self.waiting.pop_front() else {
                return Ok(());
            };
            let Pending {
                line,
                text,
                routing_key,
                message_id,
                confirm,
            } = p;
            let answer = match confirm {
                Some(confirm) => confirm.await,
                None => Err(lapin::Error::from(
                    lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
                )),
            };
            let cause = match answer {
                // A quorum queue without a leader (a node just went) nacks: the message may not
                // be stored, so it goes out again, with everything after it. Some of those may
                // have been stored already and now follow it as repeats (dropped by eventId):
                // the nacked message itself lands after them.
                Ok(Confirmation::Nack(None)) if self.nacks < NACK_RETRIES => {
                    self.nacks += 1;
                    tokio::time::sleep(Duration::from_millis(200) * self.nacks).await;
                    "nacked by the broker".to_string()
                }
                Ok(answer) => {
                    refused(line, answer)?;
                    self.nacks = 0;
                    self.confirmed += 1;
                    return Ok(());
                }
                // Its confirm will never come: it goes out again with the others.
                Err(e) => e.to_string(),
            };
            self.waiting.push_front(Pending {
                line,
                text,
                routing_key,
                message_id,
                confirm: None,
            });
            self.recover(&cause).await?;
        }
    }

    /// Connects to the next node that answers (for up to [`RECOVER_FOR`]) and publishes every
    /// unconfirmed message again, in order.
    async fn recover(
        &mut self,
        cause: &(dyn std::fmt::Display + Sync),
    ) -> Result<(), PublishError> {
        tracing::warn!(error = %cause, unconfirmed = self.waiting.len(),
            "publisher lost its RabbitMQ connection or was nacked; publishing the unconfirmed messages again through the next node");
        let deadline = tokio::time::Instant::now() + RECOVER_FOR;
        let mut pause = Duration::from_millis(200);
        loop {
            match self.reconnect_and_republish().await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "publisher cannot reach RabbitMQ yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    return Err(PublishError::Other(anyhow::anyhow!(
                        "RabbitMQ unreachable for {} s after a lost connection: {e}",
                        RECOVER_FOR.as_secs()
                    )))
                }
            }
        }
    }

    async fn reconnect_and_republish(&mut self) -> anyhow::Result<()> {
        let (connection, ch, node) = open(&self.conn, self.node + 1)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for p in self.waiting.iter_mut() {
            p.confirm = Some(
                publish(
                    &ch,
                    &self.conn.exchange,
                    &self.user,
                    &p.routing_key,
                    &p.message_id,
                    &p.text,
                )
                .await?,
            );
        }
        let old = std::mem::replace(&mut self.connection, connection);
        self.ch = ch;
        self.node = node;
        amqp::close_connection(&old, "replaced").await;
        Ok(())
    }
}

/// A confirm channel on the first node (from `start` on) that answers, with the exchange.
async fn open(
    conn: &ConnConfig,
    start: usize,
) -> Result<(lapin::Connection, lapin::Channel, usize), PublishError> {
    let (connection, node) = amqp::connect_any(
        &conn.amqp_url,
        start,
        &conn.amqp_tls(),
        "ecs-state-relay publish",
    )
    .await?;
    // Bounded: a node that accepted the connection but stalls must not hold the publisher.
    let setup = async {
        amqp::ensure_exchange(&connection, &conn.exchange).await?;
        let ch = connection.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok::<_, anyhow::Error>(ch)
    };
    let ch = tokio::time::timeout(RECOVER_FOR, setup)
        .await
        .map_err(|_| anyhow::anyhow!("RabbitMQ did not open a channel in time"))??;
    Ok((connection, ch, node))
}

/// Publishes one message: persistent, mandatory, JSON, message id = eventId, and `user_id` =
/// the connection's user (the broker checks it; the relay's producer check reads it).
async fn publish(
    ch: &lapin::Channel,
    exchange: &str,
    user: &str,
    routing_key: &str,
    message_id: &Option<String>,
    text: &str,
) -> Result<PublisherConfirm, lapin::Error> {
    // The publish time lets the relay measure the time in the shard queue (`queue` stage).
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        amqp::PUBLISHED_MS_HEADER.into(),
        lapin::types::AMQPValue::LongLongInt(crate::relay::wire::now_ms()),
    );
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_user_id(user.into())
        .with_headers(headers);
    if let Some(id) = message_id {
        props = props.with_message_id(id.as_str().into());
    }
    ch.basic_publish(
        exchange.into(),
        routing_key.into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        text.as_bytes(),
        props,
    )
    .await
}

/// Publishes every non-blank line of `input`; returns how many were confirmed.
pub async fn publish_lines<R: AsyncBufRead + Unpin>(
    conn: &ConnConfig,
    mut input: R,
) -> Result<u64, PublishError> {
    let mut publisher = Publisher::connect(conn).await?;
    let mut line_no = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        let n = input
            .read_line(&mut line)
            .await
            .map_err(|e| PublishError::Line {
                line: line_no + 1,
                reason: format!("cannot read: {e}"),
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let text = line.trim();
        if !text.is_empty() {
            publisher.send(line_no, text).await?;
        }
    }
    publisher.close().await
}

/// The broker's answer to one message: an error naming the line if it refused it.
fn refused(line: usize, answer: Confirmation) -> Result<(), PublishError> {
    match answer {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(PublishError::Line {
            line,
            reason: format!(
                "returned by the broker: {} {} (is the exchange bound to shard queues? start a worker first)",
                returned.reply_code, returned.reply_text
            ),
        }),
        Confirmation::Nack(None) => Err(PublishError::Line { line, reason: "nacked by the broker".into() }),
    }
}

/// Routing key (task ARN, or attachment ARN for instance attachments) and message id.
fn route(text: &str) -> Result<(String, Option<String>), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let key = v
        .get("taskArn")
        .and_then(Value::as_str)
        .or_else(|| v.get("attachmentArn").and_then(Value::as_str))
        .ok_or("no taskArn or attachmentArn to route by")?;
    if key.is_empty() || key.len() > 255 {
        return Err("routing key must be 1-255 bytes".into());
    }
    Ok((
        key.to_string(),
        v.get("eventId").and_then(Value::as_str).map(str::to_string),
    ))
}
