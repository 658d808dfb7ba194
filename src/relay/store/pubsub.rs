//! Wake-ups through Redis pub/sub (permit releases, membership changes).

use super::Store;
use crate::relay::events::RedisFailed;
use crate::relay::metrics::Op;

/// Wakes every waiter on `notify` whenever something is published on `channel`, until
/// `cancel`; reconnects by itself, and wakes everyone when the subscription drops and again
/// once it is back (a message may have been missed meanwhile). Waiters also keep a timeout,
/// so this is a latency aid, not a need.
pub async fn wake_on_publish(
    store: Store,
    channel: String,
    notify: std::sync::Arc<tokio::sync::Notify>,
    cancel: tokio_util::sync::CancellationToken,
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
            // Whatever was published while the subscription was down is lost: wake everyone
            // now that nothing more can be missed, so they look for themselves.
            notify.notify_waiters();
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    msg = messages.next() => match msg {
                        Some(_) => notify.notify_waiters(),
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
        notify.notify_waiters();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}
