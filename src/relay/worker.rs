//! The worker: connects, declares the topology, and runs the shards it owns.
//!
//! Workers announce themselves with heartbeats and divide the shards by rendezvous hashing over
//! the live set; a shard runs only while its Redis lease (with fencing token) is held. A worker
//! hands a shard over by stopping its intake, letting its senders finish the call in flight,
//! then releasing the lease.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Connection;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::relay::adaptive::Adaptive;
use crate::relay::amqp::{self, TopologyError};
use crate::relay::config::AuthMode;
use crate::relay::config::{Validated, WorkerConfig};
use crate::relay::dead_letter;
use crate::relay::ecs::Ecs;
use crate::relay::events::RedisFailed;
use crate::relay::metrics::{self as m, Op, Readiness};
use crate::relay::producers::{self, Producers};
use crate::relay::semaphore::Semaphore;
use crate::relay::sender::{Asked, ReadyWork, ShardCtx, Shared};
use crate::relay::shard::{self, ShardEnd};
use crate::relay::store::{wake_on_publish, Store, StoreLost};

struct Owned {
    ctx: Arc<ShardCtx>,
    handle: JoinHandle<ShardEnd>,
    started: Instant,
}

/// Shards that stopped for an AMQP error (a channel closed by the broker, a consumer
/// cancelled, a queue gone) and when each may be taken again. Taking it again at once would
/// loop: every restart returns the unacknowledged window to the queue and raises each of its
/// messages' delivery count towards the queue's delivery limit.
#[derive(Default)]
struct Restarts(BTreeMap<u16, (u32, Instant)>);

/// First restart delay, doubled per failure in a row up to the last; a shard that ran for
/// [`RESTART_RESET`] starts again from the first.
const RESTART_DELAY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
const RESTART_RESET: Duration = Duration::from_secs(120);

impl Restarts {
    fn failed(&mut self, shard: u16, ran_for: Duration) {
        let streak = match self.0.get(&shard) {
            Some((n, _)) if ran_for < RESTART_RESET => n + 1,
            _ => 1,
        };
        let delay = restart_delay(streak).mul_f64(rand::rng().random_range(1.0..1.2));
        self.0.insert(shard, (streak, Instant::now() + delay));
    }

    /// Whether the shard may be taken now.
    fn allows(&self, shard: u16) -> bool {
        self.0
            .get(&shard)
            .is_none_or(|(_, at)| *at <= Instant::now())
    }

    /// The next moment a waiting shard may be taken.
    fn next_due(&self) -> Option<Instant> {
        let now = Instant::now();
        self.0
            .values()
            .map(|(_, at)| *at)
            .filter(|at| *at > now)
            .min()
    }
}

/// The delay before the `streak`-th restart in a row.
fn restart_delay(streak: u32) -> Duration {
    RESTART_DELAY
        .0
        .saturating_mul(1 << streak.saturating_sub(1).min(16))
        .min(RESTART_DELAY.1)
}

/// Runs a worker until `cancel`, then shuts down cleanly (G7). Errors only for what a restart
/// cannot fix: bad configuration or a topology that disagrees with the configuration.
pub async fn run(
    cfg: Validated,
    ecs: Ecs,
    ready: Readiness,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg.with_secrets()?.into_inner());
    // A missing or broken ACL stops the worker here, before it takes any shard.
    let producers = Arc::new(producers::start(&cfg, &ecs.region())?);
    let worker_id = cfg.worker_id();
    // A Redis that does not answer yet (a restart during an outage) is waited for, not fatal:
    // only configuration errors (and refused credentials) stop the worker.
    let store = Store::configure(&cfg.conn)?;
    let mut retry = Duration::from_millis(500);
    while let Err(e) = store.ping().await {
        // Refused credentials are a configuration error: no retry will fix them.
        let text = e.to_string().to_ascii_uppercase();
        if ["WRONGPASS", "NOAUTH", "AUTHENTICATION"]
            .iter()
            .any(|code| text.contains(code))
        {
            return Err(e);
        }
        RedisFailed {
            op: Op::Start,
            what: "Redis does not answer; retrying",
            error: &e,
        }
        .emit();
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(10));
    }
    store.check_replicas(cfg.conn.redis_min_replicas).await;
    let permits = Semaphore::with_limit(
        store.clone(),
        &worker_id,
        Adaptive::new(store.clone(), &cfg),
        cfg.permit_lease_ms,
        cfg.call_timeout(),
    );
    // The worker's own background work outlives `cancel` on purpose: the goodbye below still
    // releases permits through it. It stops after that, and is joined.
    let background = CancellationToken::new();
    let background_tasks = TaskTracker::new();
    background_tasks.spawn(permits.clone().run_background(background.clone()));
    background_tasks.spawn(report_permits(permits.clone(), background.clone()));
    background_tasks.spawn(sample_gate(store.clone(), background.clone()));
    let joined = Arc::new(Notify::new());
    background_tasks.spawn(producers::maintain(
        producers.clone(),
        match cfg.producer_auth {
            AuthMode::Off => None,
            AuthMode::Acl | AuthMode::Audit => cfg.producer_acl.clone(),
        },
        store.clone(),
        worker_id.clone(),
        joined.clone(),
        background.clone(),
    ));
    let rebalance = Arc::new(Notify::new());
    let epoch = Arc::new(EpochWatch::default());
    background_tasks.spawn(wake_on_publish(
        store.clone(),
        store.membership_channel(),
        rebalance.clone(),
        background.clone(),
    ));
    tracing::info!(worker = %worker_id, exchange = %cfg.conn.exchange, shards = cfg.shards, "worker starting");
    m::shards_configured(cfg.shards);

    let dead_letters = dead_letter::Publisher::new(&cfg.conn, &worker_id);
    let ready_work = Arc::new(ReadyWork::default());
    let amqp_node = Arc::new(std::sync::Mutex::new(None));
    ready.set_boards(ready_work.clone());
    let reporter = ReadyReporter {
        ready_work: ready_work.clone(),
        permits: permits.clone(),
        store: store.clone(),
        worker: worker_id.clone(),
        addr: advertised(&cfg.metrics_addr).filter(|_| cfg.inspect),
        amqp_node: amqp_node.clone(),
        joined: joined.clone(),
    };
    background_tasks.spawn(reporter.run(background.clone()));
    let mut retry = Duration::from_millis(500);
    let next_node = Arc::new(AtomicUsize::new(0));
    let result = loop {
        if cancel.is_cancelled() {
            break Ok(());
        }
        let session = Session {
            cfg: cfg.clone(),
            worker_id: worker_id.clone(),
            store: store.clone(),
            ecs: ecs.clone(),
            permits: permits.clone(),
            dead_letters: dead_letters.clone(),
            producers: producers.clone(),
            ready_work: ready_work.clone(),
            rebalance: rebalance.clone(),
            next_node: next_node.clone(),
            amqp_node: amqp_node.clone(),
            epoch: epoch.clone(),
            joined: joined.clone(),
        };
        let began = Instant::now();
        ready.pulse();
        match session.run(&ready, &cancel).await {
            Ok(()) => break Ok(()),
            Err(SessionError::Fatal(e)) => break Err(e),
            Err(SessionError::Retry(e)) => {
                // A connection that held for a while starts the backoff afresh.
                if began.elapsed() > Duration::from_secs(30) {
                    retry = Duration::from_millis(500);
                }
                tracing::warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "connection lost; reconnecting");
                m::amqp_reconnect();
                tokio::select! {
                    _ = cancel.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(10));
            }
        }
    };
    ready.set_amqp(false);
    dead_letters.close().await;
    // Best effort and bounded (G7): with Redis unreachable, permits and the heartbeat expire
    // with their leases instead.
    let goodbye = async {
        permits.flush_releases().await;
        let _ = store.deregister(&worker_id).await;
    };
    if tokio::time::timeout(SHUTDOWN_REDIS_WAIT, goodbye)
        .await
        .is_err()
    {
        tracing::warn!(
            "Redis did not answer at shutdown; permits and membership expire with their leases"
        );
    }
    background.cancel();
    background_tasks.close();
    // Each ends at its next wait; one inside a Redis call with Redis gone takes up to its bound.
    let _ = tokio::time::timeout(SHUTDOWN_REDIS_WAIT, background_tasks.wait()).await;
    tracing::info!(worker = %worker_id, "worker stopped");
    result
}

/// How soon the control loop looks again while Redis does not answer.
const UNHEALTHY_TICK: Duration = Duration::from_millis(500);

/// The longest a stopping worker waits for Redis to take back its leases and permits.
const SHUTDOWN_REDIS_WAIT: Duration = Duration::from_secs(3);

enum SessionError {
    Fatal(anyhow::Error),
    Retry(anyhow::Error),
}

/// One AMQP connection's lifetime: reconnecting starts a new session.
struct Session {
    cfg: Arc<WorkerConfig>,
    worker_id: String,
    store: Store,
    ecs: Ecs,
    permits: Semaphore,
    dead_letters: dead_letter::Publisher,
    producers: Arc<Producers>,
    ready_work: Arc<ReadyWork>,
    /// Woken when membership changes or a shard stops, to rebalance before the next tick.
    rebalance: Arc<Notify>,
    /// Index in RELAY_AMQP_URL of the node to try first: the one after the node last lost.
    next_node: Arc<AtomicUsize>,
    /// The RabbitMQ node of the current connection, for `status`.
    amqp_node: Arc<std::sync::Mutex<Option<String>>>,
    /// The store epoch this worker knows, across sessions.
    epoch: Arc<EpochWatch>,
    /// Woken when a heartbeat makes this worker live: the reporters write its entries at once.
    joined: Arc<Notify>,
}

/// The store epoch a worker knows (see `heartbeat.lua`), the epochs it has seen lost, and the
/// store-lost record it last reported: a store that lost the relay's state is said once per
/// record, loudly.
#[derive(Default)]
struct EpochWatch(std::sync::Mutex<Epochs>);

#[derive(Default)]
struct Epochs {
    known: Option<String>,
    /// Epochs this worker saw replaced, newest last (at most [`LOST_EPOCHS_KEPT`]): given back
    /// to the store with every heartbeat, so a loss that also emptied the store's own list is
    /// not raised again by a worker that slept through both.
    lost: Vec<String>,
    reported: Option<StoreLost>,
}

const LOST_EPOCHS_KEPT: usize = 16;

impl EpochWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Epochs> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the heartbeat passes: the known epoch and the epochs seen lost.
    fn known(&self) -> (Option<String>, Vec<String>) {
        let epochs = self.lock();
        (epochs.known.clone(), epochs.lost.clone())
    }

    /// Takes in a heartbeat's epoch and record: sets `relay_store_lost`, logs a new record.
    fn beat(&self, worker: &str, epoch: String, lost: Option<StoreLost>) {
        let mut epochs = self.lock();
        if let Some(known) = epochs.known.take().filter(|k| *k != epoch) {
            tracing::error!(
                worker,
                known_epoch = %known,
                found_epoch = %epoch,
                "Redis lost the relay's state: the store epoch changed under this worker (a Redis restarted empty, a failover to a replica without the data, or a flush). Changes stored before are gone and will not reach ECS; new work goes on. See docs/operations.md, \"Store lost\""
            );
            epochs.lost.push(known);
            let excess = epochs.lost.len().saturating_sub(LOST_EPOCHS_KEPT);
            epochs.lost.drain(..excess);
        }
        epochs.known = Some(epoch);
        m::store_lost(lost.is_some());
        if let Some(l) = lost
            .as_ref()
            .filter(|l| epochs.reported.as_ref() != Some(*l))
        {
            tracing::error!(
                seen_by = %l.seen_by,
                at_ms = l.at_ms,
                "store-lost record stands: relay_store_lost is 1 until an operator runs `ecs-state-relay status --clear-store-lost`"
            );
        }
        epochs.reported = lost;
    }
}

impl Session {
    async fn run(&self, ready: &Readiness, cancel: &CancellationToken) -> Result<(), SessionError> {
        let urls = &self.cfg.conn.amqp_url;
        let (conn, node) = amqp::connect_any(
            urls,
            self.next_node.load(Ordering::Relaxed),
            &self.cfg.conn.amqp_tls(),
            &format!("ecs-state-relay {}", self.worker_id),
        )
        .await
        .map_err(SessionError::Retry)?;
        // Losing this node moves the next connection on to the following one.
        self.next_node.store(node + 1, Ordering::Relaxed);
        let label = amqp::node_label(urls, node);
        m::amqp_node(&label);
        *self.amqp_node.lock().unwrap_or_else(|e| e.into_inner()) = Some(label);
        let declared = self.declare_topology(&conn, cancel).await;
        match declared {
            Ok(()) => {}
            Err(e @ (TopologyError::MoreShards { .. } | TopologyError::FewerShards { .. })) => {
                return Err(SessionError::Fatal(e.into()))
            }
            Err(e) => return Err(SessionError::Retry(e.into())),
        }
        ready.set_amqp(true);
        let conn = Arc::new(conn);
        // The parent of this session's shards: cancelled with the worker, or when the session ends.
        let shards = cancel.child_token();
        let mut owned: BTreeMap<u16, Owned> = BTreeMap::new();
        let mut restarts = Restarts::default();
        // A pass starts every tenth of the lease time (or as soon as the last one ended, if it
        // took longer), though the call window is computed for renewals every third: the
        // difference is room for renewals that wait on a replica (WAIT), so that calls are not
        // held back between two renewals.
        let tick = (self.cfg.lease() / 10).max(Duration::from_millis(100));
        let outcome = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            if !conn.status().connected() {
                break Err(SessionError::Retry(anyhow::anyhow!(
                    "RabbitMQ connection closed"
                )));
            }
            // Registered before balancing, so a wake-up during it is not lost.
            let woken = self.rebalance.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // Likewise a failover seen during the pass: leases are renewed on the new primary
            // at once (calls wait for that).
            let failed_over = self.store.link().failed_over();
            tokio::pin!(failed_over);
            failed_over.as_mut().enable();
            let pass = Instant::now();
            let healthy = self
                .balance(&conn, &shards, &mut owned, &mut restarts, ready)
                .await;
            ready.pulse();
            // While Redis fails, look again soon: readiness and work resume right after it is back.
            let mut next = if healthy {
                tick
            } else {
                tick.min(UNHEALTHY_TICK)
            }
            .saturating_sub(pass.elapsed());
            if let Some(due) = restarts.next_due() {
                next = next.min(due.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                _ = tokio::time::sleep(next) => {}
                _ = woken => {}
                _ = failed_over => {}
            }
        };
        ready.set_amqp(false);
        // Hand every shard back: stop intake, let senders finish, release the lease.
        shards.cancel();
        let mut stopped = Vec::new();
        for (shard, o) in owned {
            let _ = o.handle.await;
            stopped.push((shard, o.ctx));
        }
        let releases = futures_util::future::join_all(
            stopped
                .iter()
                .map(|(shard, ctx)| self.store.lease_release(*shard, &ctx.fence)),
        );
        if tokio::time::timeout(SHUTDOWN_REDIS_WAIT, releases)
            .await
            .is_err()
        {
            tracing::warn!("Redis did not answer; the shard leases lapse instead");
        }
        m::shards_owned(0);
        amqp::close_connection(&conn, "worker stopping").await;
        outcome
    }

    /// Checks and declares the topology under the deployment's topology lock.
    async fn declare_topology(
        &self,
        conn: &Connection,
        cancel: &CancellationToken,
    ) -> Result<(), TopologyError> {
        const LOCK_TTL_MS: u64 = 30_000;
        let deadline = Instant::now() + Duration::from_millis(2 * LOCK_TTL_MS);
        // Without the lock (Redis trouble, or a holder that died: its lock expires) go ahead
        // after the deadline: declaring is idempotent, only the shard-count check can misfire.
        let mut locked = false;
        while Instant::now() < deadline && !cancel.is_cancelled() {
            match self.store.topology_lock(&self.worker_id, LOCK_TTL_MS).await {
                Ok(true) => {
                    locked = true;
                    break;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "topology lock unavailable"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let result = amqp::declare(conn, &self.cfg.conn.exchange, self.cfg.shards).await;
        if locked {
            let _ = self.store.topology_unlock(&self.worker_id).await;
        }
        result
    }

    /// One membership round: heartbeat, renew or hand over owned shards, take free ones.
    /// Updates readiness; returns whether Redis answered every step.
    async fn balance(
        &self,
        conn: &Arc<Connection>,
        shards: &CancellationToken,
        owned: &mut BTreeMap<u16, Owned>,
        restarts: &mut Restarts,
        ready: &Readiness,
    ) -> bool {
        let mut healthy = true;
        // Without an answer, keep what we own (renewing below keeps trying) and take nothing.
        let desired: Option<BTreeSet<u16>> = match self
            .store
            .heartbeat(&self.worker_id, self.cfg.lease_ms, &self.epoch.known())
            .await
        {
            Ok(beat) => Some({
                self.epoch.beat(&self.worker_id, beat.epoch, beat.lost);
                // Live again (or for the first time): its entries for `status` and `inspect`
                // are written now, not at the reporters' next pass.
                if beat.joined {
                    self.joined.notify_waiters();
                }
                assignment(&beat.live, self.cfg.shards)
                    .into_iter()
                    .zip(0..)
                    .filter(|(owner, _)| *owner == Some(self.worker_id.as_str()))
                    .map(|(_, shard)| shard)
                    .collect()
            }),
            Err(e) => {
                RedisFailed {
                    op: Op::Heartbeat,
                    what: "heartbeat failed",
                    error: &e,
                }
                .emit();
                healthy = false;
                None
            }
        };

        let finished: Vec<u16> = owned
            .iter()
            .filter(|(_, o)| o.handle.is_finished())
            .map(|(s, _)| *s)
            .collect();
        for shard in finished {
            if let Some(o) = owned.remove(&shard) {
                match o.handle.await {
                    Ok(end) => {
                        tracing::info!(shard, end = %end, "shard stopped");
                        if end.is_broker_failure() {
                            restarts.failed(shard, o.started.elapsed());
                        }
                        let _ = self.store.lease_release(shard, &o.ctx.fence).await;
                    }
                    Err(e) => {
                        // A panic skipped the shard's own shutdown: its senders may still be
                        // calling. Stop them, and let the lease lapse instead of releasing it,
                        // so the next owner waits out a call still on the wire.
                        tracing::error!(shard, error = %e, "shard task panicked; its lease is left to lapse");
                        o.ctx.cancel.cancel();
                        restarts.failed(shard, o.started.elapsed());
                    }
                }
            }
        }
        // Keep renewing while a handover finishes its calls: the lease is ours until released.
        // All at once: one round trip (pipelined on the shared connections, or one group commit
        // on the lease lane), so a slow replica costs one wait per pass, not one per shard.
        let renewing = Asked::now(&self.store);
        let renewals = futures_util::future::join_all(owned.iter().map(|(shard, o)| async move {
            let renewed = self
                .store
                .lease_renew(*shard, &o.ctx.fence, self.cfg.lease_ms)
                .await;
            (*shard, &o.ctx, renewed)
        }))
        .await;
        for (shard, ctx, renewed) in renewals {
            match renewed {
                Ok(true) => {
                    // With the log's time (answered), what a lease investigation needs.
                    tracing::trace!(
                        shard,
                        token = ctx.fence.token,
                        round_trip_ms = renewing.at.elapsed().as_millis(),
                        "lease renewed"
                    );
                    ctx.lease_renewed(renewing)
                }
                Ok(false) => {
                    tracing::warn!(shard, "shard lease lost; stopping the shard");
                    ctx.cancel.cancel();
                }
                Err(e) => {
                    tracing::error_span!("shard", shard).in_scope(|| {
                        RedisFailed {
                            op: Op::LeaseRenew,
                            what: "lease renewal failed",
                            error: &e,
                        }
                        .emit()
                    });
                    healthy = false;
                }
            }
            let handed_over = desired.as_ref().is_some_and(|d| !d.contains(&shard));
            if handed_over && !ctx.cancel.is_cancelled() {
                tracing::info!(shard, "handing shard over");
                ctx.cancel.cancel();
            }
        }
        let heard = desired.is_some();
        // Acquired all at once too (one round trip), each counted from when it was asked.
        let wanted: Vec<u16> = desired
            .unwrap_or_default()
            .into_iter()
            .filter(|shard| !owned.contains_key(shard) && restarts.allows(*shard))
            .collect();
        let acquiring = Asked::now(&self.store);
        let acquired = futures_util::future::join_all(wanted.iter().map(|shard| async move {
            let taken = self
                .store
                .lease_acquire(*shard, &self.worker_id, self.cfg.lease_ms)
                .await;
            (*shard, taken)
        }))
        .await;
        for (shard, taken) in acquired {
            match taken {
                Ok(Some(taken)) => {
                    tracing::info!(
                        shard,
                        token = taken.fence.token,
                        lapsed = taken.lapsed,
                        round_trip_ms = acquiring.at.elapsed().as_millis(),
                        "shard taken"
                    );
                    let ctx = Arc::new(ShardCtx::new(
                        shard,
                        taken,
                        acquiring,
                        Shared {
                            store: self.store.clone(),
                            ecs: self.ecs.clone(),
                            permits: self.permits.clone(),
                            dead_letters: self.dead_letters.clone(),
                            cfg: self.cfg.clone(),
                            producers: self.producers.clone(),
                            ready: self.ready_work.clone(),
                        },
                        shards,
                    ));
                    let conn = conn.clone();
                    let run_ctx = ctx.clone();
                    let rebalance = self.rebalance.clone();
                    // An ERROR-level span, so that its field is on every line whatever the
                    // log level (a span below the level is not recorded at all).
                    let span = tracing::error_span!("shard", shard);
                    let handle = tokio::spawn(
                        async move {
                            let end = shard::run(run_ctx, &conn).await;
                            rebalance.notify_waiters();
                            end
                        }
                        .instrument(span),
                    );
                    owned.insert(
                        shard,
                        Owned {
                            ctx,
                            handle,
                            started: Instant::now(),
                        },
                    );
                }
                Ok(None) => {} // still held by its previous owner: taken once released or lapsed
                Err(e) => {
                    tracing::error_span!("shard", shard).in_scope(|| {
                        RedisFailed {
                            op: Op::LeaseAcquire,
                            what: "lease acquire failed",
                            error: &e,
                        }
                        .emit()
                    });
                    healthy = false;
                }
            }
        }
        m::shards_owned(owned.len());
        // Idle is fine when every shard has an owner (more workers than shards); idle while a
        // shard has none means this worker cannot take its share.
        let has_work = !owned.is_empty()
            || (heard
                && match self.store.unowned_shards(self.cfg.shards).await {
                    Ok(n) => n == 0,
                    Err(_) => {
                        healthy = false;
                        false
                    }
                });
        ready.set_redis(healthy);
        ready.set_shards(has_work);
        healthy
    }
}

/// Which live worker owns each shard: rendezvous hashing with bounded load. Every worker
/// computes the same map from the same live set; each worker gets N/M or N/M + 1 shards, and a
/// membership change moves few shards because each shard keeps its highest-scoring worker
/// whenever that worker has room.
pub fn assignment(live: &[String], shards: u16) -> Vec<Option<&str>> {
    let mut workers: Vec<&str> = live.iter().map(String::as_str).collect();
    workers.sort_unstable();
    workers.dedup();
    if workers.is_empty() {
        return vec![None; usize::from(shards)];
    }
    let (base, extra) = (
        usize::from(shards) / workers.len(),
        usize::from(shards) % workers.len(),
    );
    let capacity: Vec<usize> = (0..workers.len())
        .map(|i| base + usize::from(i < extra))
        .collect();
    let mut load = vec![0usize; workers.len()];
    (0..shards)
        .map(|shard| {
            let mut ranked: Vec<usize> = (0..workers.len()).collect();
            ranked.sort_unstable_by_key(|&i| std::cmp::Reverse(score(workers[i], shard)));
            let pick = ranked.into_iter().find(|&i| load[i] < capacity[i])?;
            load[pick] += 1;
            Some(workers[pick])
        })
        .collect()
}

/// FNV-1a then a splitmix64 finaliser: stable across builds, unlike std's hasher.
fn score(worker: &str, shard: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in worker.bytes().chain(shard.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// What `status` shows of a worker: its ready work (rule 12) and its broker node, recorded in
/// Redis every few seconds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ReadyReport {
    /// Clusters with a change ready (waiting for a runner or a permit).
    pub clusters: usize,
    /// The longest a ready change has waited, in ms.
    pub oldest_ms: u64,
    /// The clusters with the most ready changes, most first (at most [`READY_TOP`]).
    pub top: Vec<(String, usize)>,
    /// The RabbitMQ node (`host:port`) the worker is connected to, or was last.
    #[serde(default)]
    pub amqp_node: Option<String>,
}

/// How many clusters a worker's ready report names.
pub const READY_TOP: usize = 5;

/// Where other hosts reach this worker's metrics port (for `inspect`): the listen address,
/// with an unspecified host (`0.0.0.0`, `[::]`) replaced by `POD_IP` (Kubernetes, from the
/// downward API) or else the host name. None without a listener.
fn advertised(metrics_addr: &str) -> Option<String> {
    let host = std::env::var("POD_IP")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok();
    advertise(metrics_addr, host)
}

/// [`advertised`] with this host's name or address given.
fn advertise(metrics_addr: &str, host: Option<String>) -> Option<String> {
    let (listen, port) = metrics_addr.rsplit_once(':')?;
    if !matches!(listen, "0.0.0.0" | "[::]" | "") {
        return Some(metrics_addr.to_string());
    }
    let host = host.unwrap_or_else(|| "127.0.0.1".into());
    // An IPv6 address goes in brackets, or the port would read as part of it.
    if host.contains(':') && !host.starts_with('[') {
        return Some(format!("[{host}]:{port}"));
    }
    Some(format!("{host}:{port}"))
}

/// What the ready-work reporter works with (see [`ReadyReporter::run`]).
struct ReadyReporter {
    ready_work: Arc<ReadyWork>,
    permits: Semaphore,
    store: Store,
    worker: String,
    /// Where this worker answers `/inspect`, if anywhere.
    addr: Option<String>,
    amqp_node: Arc<std::sync::Mutex<Option<String>>>,
    /// Woken when a heartbeat makes the worker live: it reports at once.
    joined: Arc<Notify>,
}

impl ReadyReporter {
    /// Every [`READY_EVERY`] (and when the worker becomes live): this worker's ready work as
    /// metrics and, for `status`, in Redis, with the address where `inspect` asks it for live
    /// state.
    async fn run(self, cancel: CancellationToken) {
        let ReadyReporter {
            ready_work,
            permits,
            store,
            worker,
            addr,
            amqp_node,
            joined,
        } = self;
        loop {
            // Registered before the write, so a join during it is not missed.
            let rejoined = joined.notified();
            let mut backlog = ready_work.backlog();
            backlog.merge(permits.backlog());
            m::ready(backlog.flows.len(), backlog.oldest);
            let report = ReadyReport {
                clusters: backlog.flows.len(),
                oldest_ms: backlog.oldest.as_millis() as u64,
                top: backlog.flows.into_iter().take(READY_TOP).collect(),
                amqp_node: amqp_node.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            };
            if let Ok(json) = serde_json::to_string(&report) {
                match store.set_ready(&worker, &json, addr.as_deref()).await {
                    // Also here, not only with the heartbeat: a worker without a RabbitMQ session
                    // sends none, and must still follow the alarm and its clearing.
                    Ok(lost) => m::store_lost(lost.is_some()),
                    Err(e) => RedisFailed {
                        op: Op::Heartbeat,
                        what: "cannot record the ready work for status",
                        error: &e,
                    }
                    .emit(),
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(READY_EVERY) => {}
                _ = rejoined => {}
            }
        }
    }
}

/// How often a worker reports its ready work.
const READY_EVERY: Duration = Duration::from_secs(2);

/// Every [`GATE_SAMPLE`]: whether the Redis gate is closed (`relay_redis_gate_closed`) and for
/// how long (`relay_redis_gate_closed_milliseconds_total`). Calls held by it are counted where
/// they wait.
async fn sample_gate(store: Store, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(GATE_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        m::redis_gate_sample(store.link().sample_gate().map(|g| g.label()), GATE_SAMPLE);
    }
}

const GATE_SAMPLE: Duration = Duration::from_millis(50);

async fn report_permits(permits: Semaphore, cancel: CancellationToken) {
    loop {
        if let Ok((n, oldest)) = permits.usage().await {
            m::permits(n, permits.limit(), oldest);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inspect_address_names_this_host_when_listening_on_every_interface() {
        let ip = |s: &str| Some(s.to_string());
        assert_eq!(advertise("", ip("10.0.0.5")), None);
        assert_eq!(
            advertise("127.0.0.1:9464", ip("10.0.0.5")).as_deref(),
            Some("127.0.0.1:9464")
        );
        assert_eq!(
            advertise("0.0.0.0:9464", ip("10.0.0.5")).as_deref(),
            Some("10.0.0.5:9464")
        );
        assert_eq!(
            advertise("[::]:9464", ip("fd00::5")).as_deref(),
            Some("[fd00::5]:9464")
        );
        assert_eq!(
            advertise("0.0.0.0:9464", None).as_deref(),
            Some("127.0.0.1:9464")
        );
    }

    #[test]
    fn restarts_back_off_and_a_long_run_starts_afresh() {
        let delays: Vec<u64> = (1..=9).map(|n| restart_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(restart_delay(u32::MAX), RESTART_DELAY.1);
        let mut r = Restarts::default();
        assert!(r.allows(3));
        r.failed(3, Duration::ZERO);
        r.failed(3, Duration::ZERO);
        assert!(!r.allows(3) && r.allows(4));
        assert_eq!(r.0[&3].0, 2);
        let due = r.next_due().expect("a shard waits");
        let wait = due - Instant::now();
        assert!(
            wait > Duration::from_millis(1_900) && wait <= Duration::from_millis(2_400),
            "{wait:?}"
        );
        r.failed(3, RESTART_RESET);
        assert_eq!(
            r.0[&3].0, 1,
            "a shard that ran long starts its streak afresh"
        );
    }

    #[test]
    fn assignment_is_balanced_and_stable() {
        let live: Vec<String> = (0..3).map(|i| format!("worker-{i}")).collect();
        let map = assignment(&live, 12);
        for w in &live {
            assert_eq!(
                map.iter().filter(|o| **o == Some(w.as_str())).count(),
                4,
                "{map:?}"
            );
        }
        let five: Vec<String> = (0..5).map(|i| format!("worker-{i}")).collect();
        let map5 = assignment(&five, 12);
        for w in &five {
            let n = map5.iter().filter(|o| **o == Some(w.as_str())).count();
            assert!((2..=3).contains(&n), "{map5:?}");
        }
        // Same live set in another order: same answer on every worker.
        let mut shuffled = live.clone();
        shuffled.reverse();
        assert_eq!(assignment(&shuffled, 12), map);
        assert_eq!(assignment(&[], 3), vec![None, None, None]);
    }
}
