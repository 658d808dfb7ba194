//! The way to Redis: a fixed address, or the primary that Sentinel names (asked again for every
//! new connection, so a failover is followed without a restart); a few long-lived shared
//! connections; and, when replicas must confirm writes, `WAIT` after each write the relay acts on.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use deadpool_redis::{Pool, Runtime};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, FromRedisValue, ScriptInvocation, Value,
};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::relay::config::{mask_url, TlsFiles};
use crate::relay::metrics as m;

/// Why a store call failed: the lease was lost (stop writing this shard), or Redis failed
/// (retry). Each variant keeps its cause as the error's source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("shard lease lost (fenced)")]
    Fenced,
    #[error("redis: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("redis connection pool: {0}")]
    Pool(#[source] Arc<deadpool_redis::PoolError>),
    #[error("redis: unexpected reply: {0}")]
    Reply(#[source] redis::ParsingError),
    #[error("redis: {target}: no answer within {within:?}")]
    NoAnswer { target: String, within: Duration },
    #[error("redis: the link is closed")]
    Closed,
    /// A script answered outside its contract (a count or code it cannot give): a bug or a
    /// version skew between the binary and the scripts it sent; nothing is acked on it.
    #[error("redis: script contract broken: {0}")]
    Contract(String),
    /// Written on the primary but not confirmed by enough replicas: a failover could lose it,
    /// so it counts as not stored (retry; never ack or send on it).
    #[error("redis: write confirmed by {got} of {wanted} replicas")]
    NotReplicated { wanted: u32, got: u32 },
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        // A pipeline reports its commands' errors inside one "Pipeline failure" error, so the
        // code is looked for in the message too.
        if e.code() == Some("FENCED") || e.to_string().contains("\"FENCED\"") {
            StoreError::Fenced
        } else {
            StoreError::Redis(e)
        }
    }
}

impl From<deadpool_redis::PoolError> for StoreError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        StoreError::Pool(Arc::new(e))
    }
}

impl From<redis::ParsingError> for StoreError {
    fn from(e: redis::ParsingError) -> Self {
        StoreError::Reply(e)
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Long-lived connections shared by every step (see [`Link::conn`]).
const SHARED_CONNECTIONS: usize = 4;

/// How long a write waits for its replicas before it counts as not stored.
const WAIT_MS: u64 = 1_000;

/// Bounded waits everywhere: after a network cut or a paused process a connection can hang;
/// an error is retried, a hang would stall the shard silently. Replies get 5 s, not the
/// client's default 0.5 s: Redis runs scripts one after another, and under a full intake load
/// a reply can wait behind many batches on a healthy connection.
const BOUND: Duration = Duration::from_secs(5);

enum Source {
    /// One Redis at a fixed address; the pool creates connections with bounded waits.
    Direct { pool: Pool, client: Client },
    /// The primary Sentinel names for the master; the client checks its ROLE before use.
    Sentinel {
        sentinel: Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
        config: AsyncConnectionConfig,
        /// The primary's address last connected to, to notice a failover.
        primary: Mutex<Option<String>>,
    },
}

pub struct Link {
    source: Source,
    slots: Vec<Mutex<Option<MultiplexedConnection>>>,
    next: AtomicUsize,
    min_replicas: u32,
    failovers: AtomicU64,
    /// Woken when a new primary is seen, so leases are checked again at once.
    failed_over: Notify,
    /// What to name in errors: the URL (masked) or the Sentinel master.
    target: String,
    /// Durable writes' committers, one per lane (see [`Link::run_durable`]).
    lanes: Mutex<HashMap<Lane, Committer>>,
    /// What this worker's round trips say about Redis (see [`Link::reachable`]).
    reach: Reach,
    /// Woken at each sample that finds the gate closed (see [`Link::sample_gate`]).
    gate_closed: Notify,
}

/// How long a reply on a shared connection may be overdue before Redis counts as unreachable:
/// a stalled link (packets dropped, Redis paused) fails no request until its 5 s bound, and
/// calls started meanwhile could not be recorded either.
const STALLED: Duration = Duration::from_millis(300);

/// Whether Redis answers, from this worker's round trips. Each round trip is numbered when it
/// starts, so an old answer cannot overrule a newer one: a reply that was already on its way
/// when a cut began does not make Redis reachable again, and a request sent before a cut
/// healed does not make it unreachable when it times out afterwards.
#[derive(Default)]
struct Reach {
    started: AtomicU64,
    /// The latest-started round trip that went through, and that failed.
    last_ok: AtomicU64,
    last_failed: AtomicU64,
    /// Likewise for the relay's writes alone: a Redis that answers reads but refuses writes
    /// (a replica, `NOREPLICAS`) cannot record a completion either.
    last_write_ok: AtomicU64,
    last_write_refused: AtomicU64,
    /// Shared-connection requests waiting for their reply, by number: when each left.
    waiting: Mutex<BTreeMap<u64, Instant>>,
}

/// A shared-connection request's place among the waiting ones, given up however the request
/// ends: one dropped half-way (a timeout, a cancelled `select!`) must not look stalled for ever.
struct Watched<'a> {
    reach: &'a Reach,
    n: u64,
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.reach.waiting().remove(&self.n);
    }
}

impl Reach {
    /// Numbers a round trip (not watched for stalls: the group commits, whose `WAIT` for a
    /// slow replica may take a second by design).
    fn start(&self) -> u64 {
        self.started.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Numbers a shared-connection round trip and watches it for a stall while it waits.
    fn watch(&self) -> Watched<'_> {
        let n = self.start();
        self.waiting().insert(n, Instant::now());
        Watched { reach: self, n }
    }

    fn end(&self, n: u64, ok: bool) {
        let last = if ok { &self.last_ok } else { &self.last_failed };
        last.fetch_max(n, Ordering::SeqCst);
    }

    fn write_ended(&self, n: u64, ok: bool) {
        let last = if ok {
            &self.last_write_ok
        } else {
            &self.last_write_refused
        };
        last.fetch_max(n, Ordering::SeqCst);
    }

    /// A failure outside a round trip (no connection could be made).
    fn failed(&self) {
        let n = self.start();
        self.end(n, false);
    }

    /// Why the gate is closed, if it is (see [`Link::gate`]).
    fn closed(&self) -> Option<GateClosed> {
        if self.last_ok.load(Ordering::SeqCst) < self.last_failed.load(Ordering::SeqCst) {
            return Some(GateClosed::RoundTripFailed);
        }
        if self.last_write_ok.load(Ordering::SeqCst)
            < self.last_write_refused.load(Ordering::SeqCst)
        {
            return Some(GateClosed::WriteRefused);
        }
        let overdue = self
            .waiting()
            .first_key_value()
            .is_some_and(|(_, since)| since.elapsed() >= STALLED);
        overdue.then_some(GateClosed::ReplyOverdue)
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Instant>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a worker's Redis gate is closed: what its latest round trips say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateClosed {
    /// The latest-started round trip that ended failed (an I/O error, a timeout, no
    /// connection).
    RoundTripFailed,
    /// The latest-started write was refused (a replica, `NOREPLICAS`, loading) or not
    /// confirmed by `RELAY_REDIS_MIN_REPLICAS` replicas.
    WriteRefused,
    /// A reply on a shared connection is overdue by [`STALLED`] (a cut, a paused Redis).
    ReplyOverdue,
}

impl GateClosed {
    /// The `why` label of `relay_redis_gate_held_calls_total`.
    pub const fn label(self) -> &'static str {
        match self {
            GateClosed::RoundTripFailed => "round_trip_failed",
            GateClosed::WriteRefused => "write_refused",
            GateClosed::ReplyOverdue => "reply_overdue",
        }
    }
}

/// A reply that says this Redis cannot take the relay's writes now (a replica, loading its
/// data, its replicas gone): as good as unreachable, though the connection answers.
fn refuses_writes(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if write_refusal(e.code()))
}

fn write_refusal(code: &str) -> bool {
    matches!(
        code,
        "READONLY" | "LOADING" | "MASTERDOWN" | "NOREPLICAS" | "MISCONF"
    )
}

/// Which durable writes share a connection and a `WAIT`: each shard's intake and completions,
/// the shard leases, and the permits (with the adaptive limit). A slow replica then delays a
/// lane's own writes, never a lease renewal behind a shard's intake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    Shard(u16),
    Leases,
    Permits,
}

/// Most scripts one group commit sends before its `WAIT`.
const COMMIT_BATCH: usize = 256;

/// One durable write waiting for its lane's next group commit.
struct Job {
    cmd: redis::Cmd,
    reply: oneshot::Sender<StoreResult<(Value, u32)>>,
}

/// The sending side of a lane's group-commit task.
#[derive(Clone)]
struct Committer {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Committer {
    /// Starts the lane's task; it ends when the link is dropped.
    fn start(link: Weak<Link>) -> Committer {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(Committer::run(link, rx));
        Committer { jobs }
    }

    /// The script's reply and how many replicas confirmed the write.
    async fn commit(&self, cmd: redis::Cmd) -> StoreResult<(Value, u32)> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { cmd, reply })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn run(link: Weak<Link>, mut rx: mpsc::UnboundedReceiver<Job>) {
        // The lane's own connection, and the failovers seen when it was made: a connection to
        // a former primary must not take another write.
        let mut conn: Option<(MultiplexedConnection, u64)> = None;
        while let Some(first) = rx.recv().await {
            let mut jobs = vec![first];
            while jobs.len() < COMMIT_BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let Some(link) = link.upgrade() else { return };
            let result = link.group_commit(&mut conn, &jobs).await;
            match result {
                Ok((values, got)) => {
                    for (job, value) in jobs.into_iter().zip(values) {
                        let _ = job.reply.send(Ok((value, got)));
                    }
                }
                Err(e) => {
                    m::redis_reconnect();
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// How to reach the Sentinels themselves (RELAY_REDIS_SENTINEL_USERNAME, _PASSWORD_FILE,
/// _TLS): most production Sentinels ask for a password, many for TLS.
#[derive(Clone, Debug, Default)]
pub struct SentinelAuth {
    pub username: String,
    pub password_file: Option<std::path::PathBuf>,
    /// TLS to the Sentinels, with the Redis TLS files.
    pub tls: bool,
}

impl Link {
    /// A fixed Redis. `tls` gives the CA and client certificate for `rediss://` URLs.
    pub fn direct(url: &str, tls: &TlsFiles, min_replicas: u32) -> anyhow::Result<Link> {
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("redis {}: {e}", mask_url(url));
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| fail(&e))?
            .set_tcp_settings(tcp_settings());
        let client = match tls_certificates(tls)? {
            Some(certs) => Client::build_with_tls(info, certs).map_err(|e| fail(&e))?,
            None => Client::open(info).map_err(|e| fail(&e))?,
        };
        // The pool is built on the client's connection info, which carries the TLS material.
        let manager = deadpool_redis::Manager::new_with_config(
            client.get_connection_info().clone(),
            connection_config(),
        )
        .map_err(|e| fail(&e))?;
        let pool = Pool::builder(manager)
            .max_size(32)
            .wait_timeout(Some(BOUND))
            .create_timeout(Some(BOUND))
            .recycle_timeout(Some(BOUND))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| fail(&e))?;
        Ok(Link::new(
            Source::Direct { pool, client },
            min_replicas,
            mask_url(url),
        ))
    }

    /// The primary of `master` as the Sentinels at `sentinels` (`host:port`) name it, reached
    /// with `auth`. `url`
    /// supplies the data nodes' credentials, TLS (`rediss://`) and database; its host is unused.
    pub fn sentinel(
        sentinels: &[String],
        master: &str,
        url: &str,
        tls: &TlsFiles,
        auth: &SentinelAuth,
        min_replicas: u32,
    ) -> anyhow::Result<Link> {
        let target = format!("Sentinel master {master:?} via {}", sentinels.join(","));
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("redis {target}: {e}");
        let mut addrs = Vec::new();
        for s in sentinels {
            let (host, port) = s
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("RELAY_REDIS_SENTINELS: {s:?} is not host:port"))?;
            // The client wants TLS Sentinels named as such; their TLS settings come below.
            addrs.push(if auth.tls {
                ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host, port)
            });
        }
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| anyhow::anyhow!("RELAY_REDIS_URL {}: {e}", mask_url(url)))?;
        let redis_info = info.redis_settings();
        let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
            .map_err(|e| fail(&e))?
            .set_client_to_redis_db(redis_info.db())
            .set_client_to_redis_tcp_settings(tcp_settings());
        if let Some(user) = redis_info.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = redis_info.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if url.starts_with("rediss://") {
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = tls_certificates(tls)? {
                builder = builder.set_client_to_redis_certificates(certs);
            }
        }
        if !auth.username.is_empty() {
            builder = builder.set_client_to_sentinel_username(&auth.username);
        }
        if let Some(path) = &auth.password_file {
            let password = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read Sentinel password file {}: {e}", path.display())
            })?;
            // An empty file means no AUTH, as no file does.
            let password = password.trim_end_matches(['\r', '\n']);
            if !password.is_empty() {
                builder = builder.set_client_to_sentinel_password(password);
            }
        }
        if auth.tls {
            builder = builder.set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = tls_certificates(tls)? {
                builder = builder.set_client_to_sentinel_certificates(certs);
            }
        }
        let sentinel = builder.build().map_err(|e| fail(&e))?;
        Ok(Link::new(
            Source::Sentinel {
                sentinel: Box::new(tokio::sync::Mutex::new(sentinel)),
                config: connection_config(),
                primary: Mutex::new(None),
            },
            min_replicas,
            target,
        ))
    }

    fn new(source: Source, min_replicas: u32, target: String) -> Link {
        Link {
            source,
            slots: (0..SHARED_CONNECTIONS).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            min_replicas,
            failovers: AtomicU64::new(0),
            failed_over: Notify::new(),
            target,
            lanes: Mutex::new(HashMap::new()),
            reach: Reach::default(),
            gate_closed: Notify::new(),
        }
    }

    /// Whether Redis answers: the latest-started round trip that ended went through, so did
    /// the latest-started write (a Redis may answer reads and refuse writes), and no reply on
    /// a shared connection is overdue by [`STALLED`]. Senders start no ECS call
    /// otherwise: a worker cut off from Redis could not record the call's completion, so the
    /// change would be sent again by the shard's next owner; every call started during a cut
    /// is one such duplicate.
    pub fn reachable(&self) -> bool {
        self.gate().is_none()
    }

    /// Why Redis counts as unreachable now (the gate is closed), or None (open).
    pub fn gate(&self) -> Option<GateClosed> {
        self.reach.closed()
    }

    /// [`Link::gate`], waking every call waiting in [`Link::gate_closed`] when it is closed.
    /// The worker samples it on a short period, so waiting calls need no timers of their own.
    pub fn sample_gate(&self) -> Option<GateClosed> {
        let closed = self.gate();
        if closed.is_some() {
            self.gate_closed.notify_waiters();
        }
        closed
    }

    /// Completes at the next sample that finds the gate closed.
    pub fn gate_closed(&self) -> tokio::sync::futures::Notified<'_> {
        self.gate_closed.notified()
    }

    /// The Redis this link talks to, for messages (credentials masked).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The primary's address as last connected to (Sentinel), or the masked URL.
    pub fn primary(&self) -> String {
        match &self.source {
            Source::Direct { .. } => self.target.clone(),
            Source::Sentinel { primary, .. } => primary
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default(),
        }
    }

    fn slot(&self, index: usize) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.slots[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection for one step. A pool checkout costs a round trip (deadpool pings on
    /// recycle), so steps share a few long-lived multiplexed connections, each pipelining
    /// concurrent requests; one that fails at the connection level is replaced on next use.
    pub async fn conn(self: &Arc<Self>) -> StoreResult<Conn> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        if let Some(inner) = self.slot(index).clone() {
            return Ok(Conn {
                inner,
                link: self.clone(),
                index,
            });
        }
        let inner = self.connect().await.inspect_err(|_| self.reach.failed())?;
        *self.slot(index) = Some(inner.clone());
        Ok(Conn {
            inner,
            link: self.clone(),
            index,
        })
    }

    async fn connect(&self) -> StoreResult<MultiplexedConnection> {
        match &self.source {
            Source::Direct { pool, .. } => Ok(deadpool_redis::Connection::take(pool.get().await?)),
            Source::Sentinel {
                sentinel,
                config,
                primary,
            } => Ok(self
                .primary_client(sentinel, primary)
                .await?
                .get_multiplexed_async_connection_with_config(config)
                .await?),
        }
    }

    /// A client for dedicated connections (pub/sub): the fixed address, or the current primary.
    pub async fn client(&self) -> StoreResult<Client> {
        match &self.source {
            Source::Direct { client, .. } => Ok(client.clone()),
            Source::Sentinel {
                sentinel, primary, ..
            } => self.primary_client(sentinel, primary).await,
        }
    }

    /// Asks the Sentinels for the primary (and checks its ROLE); counts a changed address as a
    /// failover.
    async fn primary_client(
        &self,
        sentinel: &tokio::sync::Mutex<redis::sentinel::SentinelClient>,
        primary: &Mutex<Option<String>>,
    ) -> StoreResult<Client> {
        let client = tokio::time::timeout(BOUND, async {
            sentinel.lock().await.async_get_client().await
        })
        .await
        .map_err(|_| StoreError::NoAnswer {
            target: self.target.clone(),
            within: BOUND,
        })??;
        let addr = client.get_connection_info().addr().to_string();
        let mut last = primary.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref().is_some_and(|a| a != addr) {
            tracing::warn!(primary = %addr, previous = last.as_deref().unwrap_or(""),
                "Redis failover: Sentinel names a new primary");
            m::redis_failover();
            self.failovers.fetch_add(1, Ordering::SeqCst);
            // Connections to the old primary must not serve another step (it may still be up
            // on the far side of a partition).
            for slot in &self.slots {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            self.failed_over.notify_waiters();
        }
        *last = Some(addr);
        Ok(client)
    }

    /// How many failovers this link has followed; a lease renewed before the last one is
    /// checked again before it is counted on.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::SeqCst)
    }

    /// Resolves when the next failover is seen; `enable` it before looking at the state it
    /// guards, so that a failover in between is not missed.
    pub fn failed_over(&self) -> tokio::sync::futures::Notified<'_> {
        self.failed_over.notified()
    }

    /// Runs a script whose writes the relay acts on. With replicas required, the script goes
    /// to `lane`'s committer: a connection of its own that sends every script waiting on the
    /// lane in one pipeline followed by one `WAIT` (group commit). So a `WAIT` never holds up
    /// heartbeats, releases or reads on the shared connections, nor another lane's writes, and
    /// many writes share one wait for the replicas. Too few confirmations mean "not stored".
    /// The scripts always write something (if only a sequence number), so the `WAIT` also
    /// covers what an earlier, unconfirmed try of the same step wrote.
    pub async fn run_durable<T: FromRedisValue>(
        self: &Arc<Self>,
        lane: Lane,
        inv: &ScriptInvocation<'_>,
    ) -> StoreResult<T> {
        let n = self.reach.start();
        let result = self.write(lane, inv).await;
        match &result {
            Ok(_) => self.reach.write_ended(n, true),
            // Not confirmed by the replicas is not stored either: a completion written so could
            // be lost to a failover, and the change sent again.
            Err(StoreError::NotReplicated { .. }) => self.reach.write_ended(n, false),
            Err(StoreError::Redis(e)) if e.code().is_some_and(write_refusal) => {
                self.reach.write_ended(n, false)
            }
            Err(_) => {}
        }
        result
    }

    /// [`Link::run_durable`] without the bookkeeping of whether writes go through.
    async fn write<T: FromRedisValue>(
        self: &Arc<Self>,
        lane: Lane,
        inv: &ScriptInvocation<'_>,
    ) -> StoreResult<T> {
        if self.min_replicas == 0 {
            let mut conn = self.conn().await?;
            return Ok(inv.invoke_async(&mut conn).await?);
        }
        let cmd = redis::Cmd::invoke_script(inv);
        let mut loaded = false;
        loop {
            let (value, got) = self.committer(lane).commit(cmd.clone()).await?;
            // Pipelines do not load scripts by themselves (a new primary has none cached).
            if let Value::ServerError(e) = &value {
                if !loaded && e.code() == "NOSCRIPT" {
                    inv.load_async(&mut self.conn().await?).await?;
                    loaded = true;
                    continue;
                }
            }
            let value = value.extract_error()?;
            if got < self.min_replicas {
                m::redis_wait_shortfall();
                return Err(StoreError::NotReplicated {
                    wanted: self.min_replicas,
                    got,
                });
            }
            return Ok(redis::from_redis_value(value)?);
        }
    }

    /// The committer of `lane`, started on first use.
    fn committer(self: &Arc<Self>, lane: Lane) -> Committer {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes
            .entry(lane)
            .or_insert_with(|| Committer::start(Arc::downgrade(self)))
            .clone()
    }

    /// Sends `jobs`' scripts in one pipeline, then `WAIT`; each script's reply (errors as
    /// values) and the replicas that confirmed them all.
    async fn group_commit(
        &self,
        conn: &mut Option<(MultiplexedConnection, u64)>,
        jobs: &[Job],
    ) -> StoreResult<(Vec<Value>, u32)> {
        let failovers = self.failovers();
        let mut c = match conn.take() {
            Some((c, seen)) if seen == failovers => c,
            _ => self.connect().await.inspect_err(|_| self.reach.failed())?,
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for job in jobs {
            pipe.add_command(job.cmd.clone());
        }
        pipe.cmd("WAIT").arg(self.min_replicas).arg(WAIT_MS);
        // A failed round trip drops the connection (the next commit makes a new one).
        let n = self.reach.start();
        let mut values: Vec<Value> = pipe
            .query_async(&mut c)
            .await
            .inspect_err(|_| self.reach.end(n, false))?;
        self.reach.end(n, !values.iter().any(refuses_writes));
        let got = match values.pop() {
            Some(Value::Int(n)) => u32::try_from(n).unwrap_or(0),
            _ => 0,
        };
        // A node that turned replica (a failover behind a fixed address) answers READONLY:
        // the next commit connects afresh, to the current primary.
        let demoted = values
            .iter()
            .any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY"));
        if demoted {
            m::redis_reconnect();
        } else {
            *conn = Some((c, failovers));
        }
        Ok((values, got))
    }

    /// The primary's `INFO replication` (role, replicas, offsets), for `status` and start checks.
    pub async fn replication(self: &Arc<Self>) -> StoreResult<Replication> {
        let mut conn = self.conn().await?;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await?;
        Ok(Replication::parse(&info))
    }
}

/// The parts of `INFO replication` an operator needs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Replication {
    pub role: String,
    pub replicas: Vec<ReplicaInfo>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplicaInfo {
    pub addr: String,
    pub state: String,
    /// Replication bytes the replica is behind the primary.
    pub lag_bytes: u64,
    /// Seconds since the replica's last acknowledgement.
    pub lag_s: u64,
}

impl Replication {
    fn parse(info: &str) -> Replication {
        let mut role = String::new();
        let mut offset = 0u64;
        let mut replicas = Vec::new();
        for line in info.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            if k == "role" {
                role = v.to_string();
            } else if k == "master_repl_offset" {
                offset = v.parse().unwrap_or(0);
            } else if k.starts_with("slave") && k[5..].chars().all(|c| c.is_ascii_digit()) {
                // slave0:ip=…,port=…,state=online,offset=…,lag=…
                let field = |name: &str| {
                    v.split(',')
                        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                        .unwrap_or("")
                        .to_string()
                };
                replicas.push(ReplicaInfo {
                    addr: format!("{}:{}", field("ip"), field("port")),
                    state: field("state"),
                    lag_bytes: field("offset").parse::<u64>().unwrap_or(0),
                    lag_s: field("lag").parse().unwrap_or(0),
                });
            }
        }
        for r in &mut replicas {
            r.lag_bytes = offset.saturating_sub(r.lag_bytes);
        }
        Replication { role, replicas }
    }
}

/// TCP_NODELAY: the redis crate leaves Nagle on, so on a shared connection a request written
/// while an earlier one is unacknowledged waited for that ACK (up to the 40 ms delayed-ACK
/// timer): the tens-of-ms tail of every Redis step under load.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(BOUND))
        .set_response_timeout(Some(BOUND))
}

fn tls_certificates(tls: &TlsFiles) -> anyhow::Result<Option<redis::TlsCertificates>> {
    let (ca, identity) = tls.load()?;
    if ca.is_none() && identity.is_none() {
        return Ok(None);
    }
    Ok(Some(redis::TlsCertificates {
        client_tls: identity.map(|(client_cert, client_key)| redis::ClientTlsConfig {
            client_cert,
            client_key,
        }),
        root_cert: ca,
    }))
}

/// A shared connection; a connection-level error (I/O, timeout, dropped), or a primary that
/// turned replica (`READONLY` after a failover), empties its slot so the next step gets a
/// fresh connection to the current primary instead of the broken one.
pub struct Conn {
    inner: MultiplexedConnection,
    link: Arc<Link>,
    index: usize,
}

impl Conn {
    /// Records how round trip `n` ended (see [`Reach`]); a connection-level error, or a primary
    /// that turned replica, also empties the connection's slot.
    fn check(&self, n: u64, result: Result<&[Value], &redis::RedisError>) {
        let (broken, demoted, refused) = match result {
            Ok(values) => (
                false,
                values
                    .iter()
                    .any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY")),
                values.iter().any(refuses_writes),
            ),
            Err(e) => (
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error(),
                e.code() == Some("READONLY"),
                e.code().is_some_and(write_refusal),
            ),
        };
        // A script's own error (FENCED, NOSCRIPT) still came back: Redis is reachable.
        self.link.reach.end(n, !(broken || demoted || refused));
        // Counted once per broken connection, by whichever step saw it first.
        if (broken || demoted) && self.link.slot(self.index).take().is_some() {
            m::redis_reconnect();
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let watched = self.link.reach.watch();
            let result = self.inner.req_packed_command(cmd).await;
            // The outcome first: Redis must not look reachable between the two.
            self.check(watched.n, result.as_ref().map(std::slice::from_ref));
            drop(watched);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let watched = self.link.reach.watch();
            let result = self.inner.req_packed_commands(cmd, offset, count).await;
            self.check(watched.n, result.as_deref());
            drop(watched);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// The shared test Redis (`RELAY_TEST_REDIS_ADDR`, default 127.0.0.1:6379), for unit tests of
/// the scripts' contracts; `scripts/test.sh` makes sure it runs.
#[cfg(test)]
pub(crate) async fn test_connection() -> MultiplexedConnection {
    let addr = std::env::var("RELAY_TEST_REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    Client::open(format!("redis://{addr}/0"))
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("the test Redis answers")
}

/// Runs `script` with `keys` keys and `args` arguments (placeholders); the error it answers.
#[cfg(test)]
pub(crate) async fn refusal(script: &redis::Script, keys: usize, args: usize) -> String {
    let mut inv = script.prepare_invoke();
    for i in 0..keys {
        inv.key(format!("test.contract.{i}"));
    }
    for i in 0..args {
        inv.arg(i);
    }
    match inv
        .invoke_async::<Value>(&mut test_connection().await)
        .await
    {
        Ok(v) => panic!("the script ran with {keys} keys and {args} arguments: {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_answer_never_overrules_a_newer_one() {
        let reach = Reach::default();
        assert_eq!(reach.closed(), None, "nothing failed yet");
        let (before_cut, failing) = (reach.start(), reach.start());
        reach.end(failing, false);
        reach.end(before_cut, true);
        assert_eq!(
            reach.closed(),
            Some(GateClosed::RoundTripFailed),
            "a reply already on its way when the cut began"
        );
        let (sent_before_heal, after_heal) = (reach.start(), reach.start());
        reach.end(after_heal, true);
        reach.end(sent_before_heal, false);
        assert_eq!(
            reach.closed(),
            None,
            "a request from before the heal timing out later"
        );
    }

    #[test]
    fn a_refused_write_holds_until_a_later_write_goes_through() {
        let reach = Reach::default();
        let write = reach.start();
        reach.write_ended(write, false);
        let read = reach.start();
        reach.end(read, true);
        assert_eq!(
            reach.closed(),
            Some(GateClosed::WriteRefused),
            "reads alone do not clear a refused write"
        );
        let write = reach.start();
        reach.write_ended(write, true);
        assert_eq!(reach.closed(), None);
    }

    #[test]
    fn a_request_dropped_half_way_is_no_longer_waited_for() {
        let reach = Reach::default();
        let watched = reach.watch();
        assert_eq!(reach.waiting().len(), 1);
        drop(watched); // a timeout or a cancelled select dropped the request's future
        assert!(reach.waiting().is_empty());
    }

    #[test]
    fn a_reply_overdue_closes_the_gate_until_it_comes() {
        let reach = Reach::default();
        let watched = reach.watch();
        assert_eq!(reach.closed(), None, "a reply not yet overdue");
        reach.waiting().insert(
            watched.n,
            Instant::now() - STALLED - Duration::from_millis(1),
        );
        assert_eq!(reach.closed(), Some(GateClosed::ReplyOverdue));
        reach.end(watched.n, true);
        drop(watched);
        assert_eq!(reach.closed(), None);
    }

    #[test]
    fn replication_info_gives_role_replicas_and_lag() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\
            slave0:ip=127.0.0.1,port=6380,state=online,offset=90,lag=1\r\n\
            master_repl_offset:100\r\n";
        let r = Replication::parse(info);
        assert_eq!(r.role, "master");
        assert_eq!(r.replicas.len(), 1);
        assert_eq!(r.replicas[0].addr, "127.0.0.1:6380");
        assert_eq!(r.replicas[0].state, "online");
        assert_eq!((r.replicas[0].lag_bytes, r.replicas[0].lag_s), (10, 1));
    }
}
