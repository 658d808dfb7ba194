//! Group commits of durable writes: one committer per [`Lane`], with a connection of its own,
//! sends every script waiting on the lane in one pipeline followed by one `WAIT`.

use std::sync::{Arc, Weak};

use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, ScriptInvocation, Value};
use tokio::sync::{mpsc, oneshot};

use super::gate::{refuses_writes, write_refusal};
use super::{Link, StoreError, StoreResult};
use crate::relay::metrics as m;

/// How long a write waits for its replicas before it counts as not stored.
const WAIT_MS: u64 = 1_000;

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
pub(super) struct Committer {
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

impl Link {
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
}
