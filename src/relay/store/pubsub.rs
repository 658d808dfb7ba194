//! Wake-ups through Redis pub/sub (permit releases, membership changes).

use super::Store;
use crate::relay::events::RedisFailed;
use crate::relay::metrics::Op;

/// Wakes every waiter on `notify` whenever something is published on `channel`, until
/// `cancel`; see [`listen`].
pub async fn wake_on_publish(
    store: Store,
    channel: String,
    notify: std::sync::Arc<tokio::sync::Notify>,
    cancel: tokio_util::sync::CancellationToken,
) {
    listen(store, channel, cancel, |_| notify.notify_waiters()).await
}

/// Calls `on_message` with each message published on `channel` until `cancel`; reconnects by
/// itself, and calls it with None when the subscription drops and again once it is back (a
/// message may have been missed meanwhile: everyone should look for themselves). Waiters also
/// keep a timeout, so this is a latency aid, not a need.
pub async fn listen(
    store: Store,
    channel: String,
    cancel: tokio_util::sync::CancellationToken,
    on_message: impl Fn(Option<&str>),
) {
    use futures_util::StreamExt;
    while !cancel.is_cancelled() {
        let listened: redis::RedisResult<()> = async {
            // Asked anew each time: after a failover the primary is another node.
            let client = store
                .link
                .client()
                .await
                .map_err(|e| redis::RedisError::from((redis::ErrorKind::Io, "no primary", e.to_string())))?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            on_message(None);
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    msg = messages.next() => match msg {
                        Some(msg) => on_message(std::str::from_utf8(msg.get_payload_bytes()).ok()),
                        None => return Err(redis::RedisError::from((redis::ErrorKind::Io, "pub/sub stream ended"))),
                    },
                }
            }
        }
        .await;
        if let Err(e) = listened {
            tracing::error_span!("pubsub", channel = %channel).in_scope(|| {
                RedisFailed {
                    op: Op::Pubsub,
                    what: "pub/sub connection lost; reconnecting",
                    error: &e,
                }
                .emit()
            });
        }
        on_message(None);
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}
