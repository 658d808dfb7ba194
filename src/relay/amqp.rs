//! RabbitMQ side: connection, the idempotent topology of the wire contract, and dead-lettering.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};

use crate::relay::config::{mask_url, url_list, TlsFiles};

/// Deliveries beyond this count are dead-lettered by the broker: a safety net for a message
/// that keeps a worker from acknowledging it (the relay itself rejects bad input explicitly).
pub const DELIVERY_LIMIT: i64 = 50;
pub const REJECT_HEADER: &str = "x-relay-reject-reason";
/// The shard queue a dead-lettered message came from.
pub const SOURCE_QUEUE_HEADER: &str = "x-relay-source-queue";

/// The longest a worker waits for the broker to confirm a close: a connection that broke
/// meanwhile may never answer, and a stopping shard or worker must not hang on it.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Header a publisher may set to its clock's ms since the epoch at publish time: the relay
/// then measures the `queue` stage (publish → delivery).
pub const PUBLISHED_MS_HEADER: &str = "x-published-ms";

/// The publish time a message carries in [`PUBLISHED_MS_HEADER`], if any.
pub fn published_ms(props: &BasicProperties) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(PUBLISHED_MS_HEADER)? {
        AMQPValue::LongLongInt(ms) => Some(*ms),
        AMQPValue::Timestamp(ms) => i64::try_from(*ms).ok(),
        _ => None,
    }
}

/// The longest a dead-letter publish waits for the broker's confirm.
const CONFIRM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest a connection attempt may take (TCP, TLS and the AMQP handshake).
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Closes a channel (its unacknowledged deliveries go back to their queue), bounded.
pub async fn close_channel(ch: &Channel, why: &str) {
    let _ = tokio::time::timeout(CLOSE_WAIT, ch.close(200, s(why))).await;
}

/// Closes a connection, bounded.
pub async fn close_connection(conn: &Connection, why: &str) {
    let _ = tokio::time::timeout(CLOSE_WAIT, conn.close(200, s(why))).await;
}

pub fn shard_queue(exchange: &str, shard: u16) -> String {
    format!("{exchange}.shard-{shard}")
}
pub fn dlx(exchange: &str) -> String {
    format!("{exchange}.dlx")
}
pub fn dead_queue(exchange: &str) -> String {
    format!("{exchange}.dead")
}

/// Topology problems a worker must not start with.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "RELAY_SHARDS={configured} but the broker has shard queue {found:?}: this deployment was created \
         with more shards. The shard count is fixed for a deployment (changing it moves tasks between \
         shards and breaks per-task order); start workers with the deployment's count"
    )]
    MoreShards { configured: u16, found: String },
    #[error(
        "RELAY_SHARDS={configured} but only {existing} of those shard queues exist: this deployment was \
         created with fewer shards. The shard count is fixed for a deployment (changing it moves tasks \
         between shards and breaks per-task order); start workers with the deployment's count"
    )]
    FewerShards { configured: u16, existing: u16 },
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
}

/// Connects with the CA and client certificate of `tls` (used for `amqps://` URLs).
/// Connects to the first node of `urls` (one URL, or a comma-separated list of a cluster's
/// nodes) that answers.
pub async fn connect(urls: &str, tls: &TlsFiles, name: &str) -> anyhow::Result<Connection> {
    Ok(connect_any(urls, 0, tls, name).await?.0)
}

/// Tries the nodes of `urls` in order, starting with the one at `start` (so a reconnect moves
/// on to the next node); returns the connection and the index of the node that answered.
pub async fn connect_any(
    urls: &str,
    start: usize,
    tls: &TlsFiles,
    name: &str,
) -> anyhow::Result<(Connection, usize)> {
    let nodes = url_list(urls);
    if nodes.is_empty() {
        anyhow::bail!("RELAY_AMQP_URL is empty");
    }
    let mut errors = Vec::new();
    for k in 0..nodes.len() {
        let i = (start + k) % nodes.len();
        match connect_one(nodes[i], tls, name).await {
            Ok(c) => {
                if nodes.len() > 1 {
                    tracing::info!(node = %mask_url(nodes[i]), "connected to RabbitMQ");
                }
                return Ok((c, i));
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    anyhow::bail!("{}", errors.join("; "))
}

/// The `host:port` of the node at `index` of `urls`, for logs and the node metric.
pub fn node_label(urls: &str, index: usize) -> String {
    url_list(urls)
        .get(index)
        .and_then(|u| url::Url::parse(u).ok())
        .map(|u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or(""),
                // The url crate knows no AMQP default ports; lapin's: 5671 with TLS.
                u.port()
                    .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 })
            )
        })
        .unwrap_or_default()
}

async fn connect_one(url: &str, tls: &TlsFiles, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let (ca, identity) = tls.load()?;
    let config = OwnedTLSConfig {
        identity: identity.map(|(pem, key)| OwnedIdentity::PKCS8 { pem, key }),
        cert_chain: ca.map(|pem| String::from_utf8_lossy(&pem).into_owned()),
    };
    let runtime = lapin::runtime::default_runtime()?;
    // Bounded: a broker behind a black-holed network would otherwise hang the caller.
    let connecting = Connection::connect_with_config(url, props, config, runtime);
    match tokio::time::timeout(CONNECT_WAIT, connecting).await {
        Ok(result) => result
            .map_err(|e| anyhow::anyhow!("cannot connect to RabbitMQ at {}: {e}", mask_url(url))),
        Err(_) => anyhow::bail!(
            "cannot connect to RabbitMQ at {}: no answer within {} s",
            mask_url(url),
            CONNECT_WAIT.as_secs()
        ),
    }
}

fn s(v: &str) -> ShortString {
    v.into()
}

/// The exchange producers publish to (also declared by `publish`).
pub async fn declare_exchange(ch: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        s(exchange),
        ExchangeKind::Custom("x-consistent-hash".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Makes sure the exchange exists for a publisher: looks for it passively first, which needs no
/// configure permission (a producer has none), and declares it only if it is missing (which a
/// producer's user may not; the error then says to start a worker, which declares it).
pub async fn ensure_exchange(conn: &Connection, exchange: &str) -> anyhow::Result<()> {
    // A failed passive declare closes its channel: a throwaway one.
    let probe = conn.create_channel().await?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = probe
        .exchange_declare(
            s(exchange),
            ExchangeKind::Custom("x-consistent-hash".into()),
            passive,
            FieldTable::default(),
        )
        .await;
    if found.is_ok() {
        let _ = probe.close(200, "found".into()).await;
        return Ok(());
    }
    let ch = conn.create_channel().await?;
    match declare_exchange(&ch, exchange).await {
        Ok(()) => {
            let _ = ch.close(200, "declared".into()).await;
            Ok(())
        }
        Err(e) => anyhow::bail!(
            "exchange {exchange:?} does not exist and this user may not declare it ({e}): start a worker, which declares the topology"
        ),
    }
}

/// Declares everything idempotently; refuses a shard count that disagrees with the broker.
pub async fn declare(conn: &Connection, exchange: &str, shards: u16) -> Result<(), TopologyError> {
    check_shard_count(conn, exchange, shards).await?;
    let ch = conn.create_channel().await?;
    declare_exchange(&ch, exchange).await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        s(&dlx(exchange)),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await?;
    let queue_opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut dead_args = FieldTable::default();
    dead_args.insert(s("x-queue-type"), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(s(&dead_queue(exchange)), queue_opts, dead_args)
        .await?;
    ch.queue_bind(
        s(&dead_queue(exchange)),
        s(&dlx(exchange)),
        s(""),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    for shard in 0..shards {
        let q = shard_queue(exchange, shard);
        ch.queue_declare(s(&q), queue_opts, shard_queue_args(exchange))
            .await?;
        // Weight "1": every shard takes an equal part of the hash ring.
        ch.queue_bind(
            s(&q),
            s(exchange),
            s("1"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let _ = ch.close(200, s("topology declared")).await;
    Ok(())
}

pub fn shard_queue_args(exchange: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(s("x-queue-type"), AMQPValue::LongString("quorum".into()));
    args.insert(s("x-single-active-consumer"), AMQPValue::Boolean(true));
    args.insert(
        s("x-delivery-limit"),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    args.insert(
        s("x-dead-letter-exchange"),
        AMQPValue::LongString(dlx(exchange).into()),
    );
    args
}

/// Shard queues 0..N-1 must all exist or none (a new deployment), and queue N must not.
async fn check_shard_count(
    conn: &Connection,
    exchange: &str,
    shards: u16,
) -> Result<(), TopologyError> {
    let beyond = shard_queue(exchange, shards);
    if queue_exists(conn, &beyond).await? {
        return Err(TopologyError::MoreShards {
            configured: shards,
            found: beyond,
        });
    }
    let mut existing = 0;
    for shard in 0..shards {
        if queue_exists(conn, &shard_queue(exchange, shard)).await? {
            existing += 1;
        }
    }
    if existing != 0 && existing != shards {
        return Err(TopologyError::FewerShards {
            configured: shards,
            existing,
        });
    }
    Ok(())
}

/// Passive declare; the broker closes the channel on "not found", so each probe gets its own.
async fn queue_exists(conn: &Connection, queue: &str) -> Result<bool, lapin::Error> {
    let ch = conn.create_channel().await?;
    let probe = ch
        .queue_declare(
            s(queue),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match probe {
        Ok(_) => {
            let _ = ch.close(200, s("probe done")).await;
            Ok(true)
        }
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND") || e.to_string().contains("404")
}

/// A channel in confirm mode: dead-letter publishes are confirmed before the original is acked.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Why a dead-letter publish failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The broker answered and refused it (nothing bound, the queue full and rejecting
    /// publishes): the channel is fine, the route is not.
    #[error("{0}")]
    Refused(String),
    /// No answer in time (a memory or disk alarm blocks publishers) or the channel broke.
    #[error("{0}")]
    Broken(String),
}

/// The header that keeps a dead-lettered message's producer (its AMQP `user_id`) visible.
pub const PRODUCER_HEADER: &str = "x-relay-producer";

/// The relay's own headers start so. What a producer set under this prefix (or as the broker's
/// `x-death`) is dropped when the relay dead-letters a message, and never believed on a message
/// the broker dead-lettered (`dlq`): a dead letter's reason and producer are the relay's word,
/// or the broker's.
const RELAY_HEADER_PREFIX: &str = "x-relay-";

/// A header that says who dead-lettered a message and why: the relay's own (see
/// [`RELAY_HEADER_PREFIX`]) or the broker's (`x-death` and its `x-first-death-*` /
/// `x-last-death-*` summaries). On a message that reaches intake, any of them was set by its
/// producer (replay strips them), so none is kept.
fn is_dead_letter_header(name: &str) -> bool {
    name.starts_with(RELAY_HEADER_PREFIX)
        || name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// `headers` without any dead-lettering header (see [`is_dead_letter_header`]).
pub fn without_dead_letter_headers(headers: Option<&FieldTable>) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in headers.map(|h| h.inner().iter()).into_iter().flatten() {
        if !is_dead_letter_header(k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// `props` with `headers` and without `user_id`: RabbitMQ refuses a publish whose `user_id` is
/// not the connection's user unless that user has the `impersonator` tag, which neither the
/// relay's user nor an operator's needs. The producer is kept in [`PRODUCER_HEADER`].
pub fn without_producer(props: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut out = BasicProperties::default().with_headers(headers);
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = props.expiration() {
        out = out.with_expiration(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = props.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

/// The user of the first URL of a RELAY_AMQP_URL list (`guest` when it names none, as the
/// AMQP client assumes): the `user_id` a connection may publish under.
pub fn url_user(urls: &str) -> String {
    crate::relay::config::url_list(urls)
        .first()
        .and_then(|u| url::Url::parse(u).ok())
        .map(|u| u.username().to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "guest".into())
}

/// Publishes a rejected message to the dead-letter exchange, unchanged but for the reason
/// headers, and waits for the broker's confirm.
pub async fn dead_letter(
    ch: &Channel,
    exchange: &str,
    source_queue: &str,
    routing_key: &str,
    body: &[u8],
    props: &BasicProperties,
    reason: &str,
) -> Result<(), DeadLetterError> {
    let mut headers = without_dead_letter_headers(props.headers().as_ref());
    headers.insert(s(REJECT_HEADER), AMQPValue::LongString(reason.into()));
    headers.insert(
        s(SOURCE_QUEUE_HEADER),
        AMQPValue::LongString(source_queue.into()),
    );
    if let Some(user) = props.user_id() {
        headers.insert(
            s(PRODUCER_HEADER),
            AMQPValue::LongString(user.as_str().into()),
        );
    }
    let props = without_producer(props, headers).with_delivery_mode(2);
    // Mandatory: with nothing bound to the dead-letter exchange the broker would confirm and
    // drop the message, and the original would be forgotten: lost. A return is a failure.
    // Bounded: a broker in a memory or disk alarm blocks publishers.
    let publishing = async {
        ch.basic_publish(
            s(&dlx(exchange)),
            s(routing_key),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await?
        .await
    };
    let confirm = tokio::time::timeout(CONFIRM_WAIT, publishing)
        .await
        .map_err(|_| {
            DeadLetterError::Broken(format!(
                "the broker did not confirm within {} s (a memory or disk alarm blocks publishers?)",
                CONFIRM_WAIT.as_secs()
            ))
        })?
        .map_err(|e| DeadLetterError::Broken(e.to_string()))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => Err(DeadLetterError::Refused(format!(
            "returned by the broker ({} {}): the dead-letter exchange {} routes to no queue (is {} bound?)",
            r.reply_code,
            r.reply_text,
            dlx(exchange),
            dead_queue(exchange)
        ))),
        Confirmation::Nack(None) => Err(DeadLetterError::Refused(format!(
            "nacked by the broker: is {} full (max-length with overflow reject-publish)?",
            dead_queue(exchange)
        ))),
        Confirmation::NotRequested => Err(DeadLetterError::Broken(
            "the channel is not in confirm mode".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::node_label;

    #[test]
    fn node_labels_use_the_amqp_default_ports() {
        let urls = "amqp://u:p@rabbit-0/%2f,amqps://u:p@rabbit-1/%2f,amqps://u:p@rabbit-2:7000/%2f";
        assert_eq!(node_label(urls, 0), "rabbit-0:5672");
        assert_eq!(node_label(urls, 1), "rabbit-1:5671");
        assert_eq!(node_label(urls, 2), "rabbit-2:7000");
        assert_eq!(node_label(urls, 3), "", "no such node");
    }
}
