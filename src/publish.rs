//! `publish`: JSON lines → the exchange, persistent, mandatory, with publisher confirms.
//! Stops at the first line the broker refuses (nack) or returns (unroutable), naming it.

use std::collections::VecDeque;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use lapin::{Confirmation, PublisherConfirm};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::amqp;
use crate::config::ConnConfig;

/// Publishes still waiting for their confirm; bounds memory while keeping the pipe full.
const CONFIRM_WINDOW: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A confirmed publisher on one connection: `send` lines, then `flush` to wait for every
/// confirm. Used by `publish` and the benchmark (which publishes in timed chunks).
pub struct Publisher {
    connection: lapin::Connection,
    ch: lapin::Channel,
    exchange: String,
    waiting: VecDeque<(usize, PublisherConfirm)>,
    confirmed: u64,
}

impl Publisher {
    pub async fn connect(conn: &ConnConfig) -> Result<Publisher, PublishError> {
        let mut conn = conn.clone();
        conn.resolve_secrets()?;
        let connection =
            amqp::connect(&conn.amqp_url, &conn.amqp_tls(), "ecs-state-relay publish").await?;
        let ch = connection
            .create_channel()
            .await
            .map_err(anyhow::Error::from)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(anyhow::Error::from)?;
        amqp::declare_exchange(&ch, &conn.exchange)
            .await
            .map_err(anyhow::Error::from)?;
        Ok(Publisher {
            connection,
            ch,
            exchange: conn.exchange,
            waiting: VecDeque::new(),
            confirmed: 0,
        })
    }

    /// Publishes one JSON line (`line_no` names it in errors); waits for the oldest confirm
    /// when the window is full.
    pub async fn send(&mut self, line_no: usize, text: &str) -> Result<(), PublishError> {
        let (routing_key, message_id) = route(text).map_err(|reason| PublishError::Line {
            line: line_no,
            reason,
        })?;
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let confirm = self
            .ch
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                text.as_bytes(),
                props,
            )
            .await
            .map_err(|e| PublishError::Line {
                line: line_no,
                reason: e.to_string(),
            })?;
        self.waiting.push_back((line_no, confirm));
        if self.waiting.len() >= CONFIRM_WINDOW {
            if let Some((l, c)) = self.waiting.pop_front() {
                settle(l, c).await?;
                self.confirmed += 1;
            }
        }
        Ok(())
    }

    /// Waits for every outstanding confirm; returns how many lines were confirmed so far.
    pub async fn flush(&mut self) -> Result<u64, PublishError> {
        while let Some((l, c)) = self.waiting.pop_front() {
            settle(l, c).await?;
            self.confirmed += 1;
        }
        Ok(self.confirmed)
    }

    pub async fn close(mut self) -> Result<u64, PublishError> {
        let confirmed = self.flush().await?;
        let _ = self.connection.close(200, "done".into()).await;
        Ok(confirmed)
    }
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

async fn settle(line: usize, confirm: PublisherConfirm) -> Result<(), PublishError> {
    match confirm.await {
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => Err(PublishError::Line {
            line,
            reason: format!(
                "returned by the broker: {} {} (is the exchange bound to shard queues? start a worker first)",
                returned.reply_code, returned.reply_text
            ),
        }),
        Ok(Confirmation::Nack(None)) => Err(PublishError::Line { line, reason: "nacked by the broker".into() }),
        Err(e) => Err(PublishError::Line { line, reason: format!("no confirm: {e}") }),
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
