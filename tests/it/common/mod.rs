//! Test harness: a real RabbitMQ and Redis, an in-process ecs-sim reached through aws-sdk-ecs,
//! and workers (in-process, or the real binary for kill tests). Each test gets its own
//! exchange name, which also namespaces every Redis key, so tests run in parallel.
#![allow(dead_code)]

use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ecs_state_relay::cli::publish::{publish_lines, PublishError, Publisher};
use ecs_state_relay::relay::amqp;
use ecs_state_relay::relay::config::{ConnConfig, WorkerConfig};
use ecs_state_relay::relay::ecs::Ecs;
use ecs_state_relay::relay::metrics::Readiness;
use ecs_state_relay::relay::store::Store;
use ecs_state_relay::relay::worker;
use ecs_state_relay::sim::{CallRecord, Sim};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
pub mod ha;
pub mod rabbit_cluster;

/// The shared RabbitMQ (`host:port`, guest/guest): `RELAY_TEST_AMQP_ADDR`, else the local one.
pub fn amqp_addr() -> String {
    std::env::var("RELAY_TEST_AMQP_ADDR").unwrap_or_else(|_| "127.0.0.1:5672".into())
}

/// The shared Redis (`host:port`, db 0): `RELAY_TEST_REDIS_ADDR`, else the local one.
pub fn redis_addr() -> String {
    std::env::var("RELAY_TEST_REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into())
}

pub fn amqp_url() -> String {
    format!("amqp://guest:guest@{}/%2f", amqp_addr())
}

pub fn redis_url() -> String {
    format!("redis://{}/0", redis_addr())
}
pub const CLUSTER: &str = "test-cluster";
/// Test workers' ECS call timeout: fits their 3 s shard lease (see `WorkerConfig::validate`).
pub const TEST_CALL_TIMEOUT_MS: u64 = 1_000;

/// Runs `command` to its end; its standard output, or a panic with its standard error when it
/// failed.
pub fn run_ok(command: &mut Command) -> String {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?} does not run: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `rabbitmqctl` on the local broker; panics with its output if it fails.
pub fn rabbitmqctl(args: &[&str]) {
    run_ok(Command::new("rabbitmqctl").args(args));
}

/// The tests' producer rules: their publishers connect as `guest`.
pub const TEST_ACL: &str = r#"{"guest": ["*"]}"#;

pub fn arn(name: &str) -> String {
    format!("arn:aws:ecs:us-east-1:123456789012:task/{CLUSTER}/{name}")
}

pub struct Env {
    pub exchange: String,
    pub shards: u16,
    pub sim: Sim,
    pub sim_url: String,
    pub store: Store,
    workers: Vec<InProcess>,
    next_worker: usize,
    /// Set by [`Env::cleanup`]; otherwise dropping the `Env` cleans up (see its `Drop`).
    cleaned: bool,
    /// This test's `RELAY_PRODUCER_ACL` file ([`TEST_ACL`], unless the test rewrites it).
    pub acl: std::path::PathBuf,
}

pub struct InProcess {
    pub id: String,
    cancel: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Clean shutdown (SIGTERM path); returns the worker's result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.handle
            .await
            .map_err(|e| anyhow::anyhow!("worker panicked: {e}"))?
    }
}

impl Env {
    pub async fn new(name: &str, shards: u16) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let exchange = format!("test.{name}.{:08x}", rand::random::<u32>());
        // The producer check stays on in the tests: the test producers (the broker's guest
        // user) may publish for every cluster.
        let acl = std::env::temp_dir().join(format!("{exchange}.acl.json"));
        std::fs::write(&acl, TEST_ACL).expect("write the test ACL");
        let (sim, sim_url) = Sim::spawn_local().await.expect("sim starts");
        let store = Store::connect(&redis_url(), &Default::default(), &exchange)
            .await
            .expect("redis reachable");
        Env {
            exchange,
            shards,
            sim,
            sim_url,
            store,
            workers: Vec::new(),
            next_worker: 0,
            cleaned: false,
            acl,
        }
    }

    /// [`Env::new`] with one in-process worker whose configuration `tweak` adjusts.
    pub async fn with_worker(
        name: &str,
        shards: u16,
        tweak: impl FnOnce(&mut WorkerConfig),
    ) -> Env {
        let mut env = Env::new(name, shards).await;
        let mut cfg = env.config();
        tweak(&mut cfg);
        env.start_worker(cfg).await;
        env
    }

    /// A broker connection (as guest) on which this test's topology (exchange, shard queues,
    /// dead-letter queue) is declared, as a worker would declare it.
    pub async fn declared(&self) -> lapin::Connection {
        let c = ecs_state_relay::relay::amqp::connect(&amqp_url(), &Default::default(), "test")
            .await
            .expect("amqp");
        ecs_state_relay::relay::amqp::declare(&c, &self.exchange, self.shards)
            .await
            .expect("topology");
        c
    }

    /// A proxy to the shared Redis, and a worker configuration that reaches Redis through it.
    pub async fn config_via_redis_proxy(&mut self) -> (Proxy, WorkerConfig) {
        let proxy = Proxy::start(redis_addr()).await;
        let mut cfg = self.config();
        cfg.conn.redis_url = proxy.redis_url();
        (proxy, cfg)
    }

    pub fn conn(&self) -> ConnConfig {
        ConnConfig {
            amqp_url: amqp_url(),
            redis_url: redis_url(),
            exchange: self.exchange.clone(),
            ..ConnConfig::default()
        }
    }

    /// Fast timings; the drain ticker is effectively off unless a test turns it on.
    pub fn config(&mut self) -> WorkerConfig {
        self.next_worker += 1;
        WorkerConfig {
            conn: self.conn(),
            shards: self.shards,
            drain_min_ms: 600_000,
            drain_max_ms: 600_000,
            backoff_min_ms: 50,
            backoff_max_ms: 500,
            lease_ms: 3_000,
            permit_lease_ms: 2_500,
            call_timeout_ms: TEST_CALL_TIMEOUT_MS,
            metrics_addr: String::new(),
            worker_id: Some(format!("{}-w{}", self.exchange, self.next_worker)),
            producer_acl: Some(self.acl.clone()),
            ..WorkerConfig::default()
        }
    }

    /// An ECS client with the test workers' call timeout.
    pub async fn ecs(&self) -> Ecs {
        self.ecs_with_timeout(TEST_CALL_TIMEOUT_MS).await
    }

    pub async fn ecs_with_timeout(&self, call_timeout_ms: u64) -> Ecs {
        self.ecs_for(call_timeout_ms, "test-worker").await
    }

    /// `app_name` goes into the user agent: the sim records it as the calling worker.
    pub async fn ecs_for(&self, call_timeout_ms: u64, app_name: &str) -> Ecs {
        Ecs::for_endpoint(
            &self.sim_url,
            Duration::from_millis(call_timeout_ms),
            app_name,
        )
        .await
    }

    /// Starts an in-process worker and waits until it owns every shard it should.
    pub async fn start_worker(&mut self, cfg: WorkerConfig) -> String {
        let id = cfg.worker_id.clone().expect("test workers have ids");
        let cancel = CancellationToken::new();
        // The worker's safety checks count on the client timing out at the configured time.
        let ecs = self.ecs_for(cfg.call_timeout_ms, &id).await;
        let cfg = cfg.validate().expect("a valid test configuration");
        let handle = tokio::spawn(worker::run(cfg, ecs, Readiness::default(), cancel.clone()));
        self.workers.push(InProcess {
            id: id.clone(),
            cancel,
            handle,
        });
        self.wait_all_shards_owned().await;
        id
    }

    pub fn take_worker(&mut self, id: &str) -> Option<InProcess> {
        let i = self.workers.iter().position(|w| w.id == id)?;
        Some(self.workers.remove(i))
    }

    /// Every shard has a lease holder.
    pub async fn wait_all_shards_owned(&self) {
        wait_shards_owned(&self.store, self.shards, Duration::from_secs(20)).await;
    }

    /// Runs an operator command of the real binary (`status`, `dlq`, …) against this test's
    /// services; its standard output, or a panic with its standard error when it failed.
    pub fn run_cli(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(env!("CARGO_BIN_EXE_ecs-state-relay"))
                .args(args)
                .envs(self.conn().to_env()),
        )
    }

    /// Environment for a worker process (the real binary) against this test's services:
    /// every setting of `cfg` (the relay's own `to_env`) and the way to ecs-sim.
    pub fn process_env(&self, cfg: &WorkerConfig) -> Vec<(String, String)> {
        cfg.to_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain([
                ("AWS_ENDPOINT_URL_ECS".into(), self.sim_url.clone()),
                ("AWS_REGION".into(), "us-east-1".into()),
                ("AWS_ACCESS_KEY_ID".into(), "test".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
                ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ])
            .collect()
    }

    /// Starts a worker process serving /metrics on a free local port; waits until it owns
    /// every shard. Returns the process and the port.
    pub async fn spawn_with_metrics(&mut self) -> (Proc, u16) {
        let mut cfg = self.config();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        cfg.metrics_addr = format!("127.0.0.1:{port}");
        let worker = self.spawn_process(&cfg);
        self.wait_all_shards_owned().await;
        (worker, port)
    }

    pub fn spawn_process(&self, cfg: &WorkerConfig) -> Proc {
        Proc(
            Command::new(env!("CARGO_BIN_EXE_ecs-state-relay"))
                .arg("worker")
                .envs(self.process_env(cfg))
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .spawn()
                .expect("worker binary starts"),
        )
    }

    pub async fn publish(&self, events: &[Value]) {
        let lines: Vec<String> = events.iter().map(Value::to_string).collect();
        publish_lines(&self.conn(), lines.join("\n").as_bytes())
            .await
            .expect("publish confirmed");
    }

    /// Publishes raw bytes with any routing key (for malformed input).
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        let c = amqp::connect(&amqp_url(), &Default::default(), "test raw publish")
            .await
            .expect("amqp");
        let ch = amqp::confirm_channel(&c).await.expect("channel");
        let confirm = ch
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_user_id("guest".into()),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "raw publish not acked");
        let _ = c.close(200, "done".into()).await;
    }

    /// Calls the sim received for a key, in arrival order.
    pub fn calls_for(&self, key: &str) -> Vec<CallRecord> {
        self.sim
            .calls()
            .into_iter()
            .filter(|c| c.key == key)
            .collect()
    }

    pub async fn wait_calls(&self, key: &str, n: usize) -> Vec<CallRecord> {
        let sim = self.sim.clone();
        let key2 = key.to_string();
        eventually(
            Duration::from_secs(20),
            &format!("{n} calls for {key}"),
            || {
                let sim = sim.clone();
                let key = key2.clone();
                async move {
                    sim.calls()
                        .iter()
                        .filter(|c| c.key == key && c.outcome.is_some())
                        .count()
                        >= n
                }
            },
        )
        .await;
        self.calls_for(key)
    }

    /// Messages in the dead-letter queue: (body, x-relay-reject-reason).
    pub async fn dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        self.dead_letters_at(&amqp_url()).await
    }

    /// [`Env::dead_letters`] on the broker(s) at `urls`.
    pub async fn dead_letters_at(&self, urls: &str) -> Vec<(Vec<u8>, String)> {
        let c = amqp::connect(urls, &Default::default(), "test dead reader")
            .await
            .expect("amqp");
        let ch = c.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Ok(Some(msg)) = ch
            .basic_get(
                amqp::dead_queue(&self.exchange).as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
        {
            let reason = msg
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(amqp::REJECT_HEADER).cloned())
                .map(|v| match v {
                    AMQPValue::LongString(s) => s.to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            out.push((msg.delivery.data.clone(), reason));
        }
        let _ = c.close(200, "done".into()).await;
        out
    }

    /// Stops workers cleanly, then deletes the test's queues, exchanges and Redis keys.
    pub async fn cleanup(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.stop().await;
        }
        remove_resources(&self.exchange, self.shards).await;
        let _ = std::fs::remove_file(&self.acl);
        self.cleaned = true;
    }
}

/// A test that panicked before [`Env::cleanup`] still leaves nothing behind: its in-process
/// workers are cancelled and its queues, exchanges and keys deleted, on a runtime of its own
/// (the test's may be unwinding).
impl Drop for Env {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        for w in &self.workers {
            w.cancel.cancel();
        }
        let _ = std::fs::remove_file(&self.acl);
        let (exchange, shards) = (self.exchange.clone(), self.shards);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup");
            rt.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    remove_resources(&exchange, shards),
                )
                .await;
            });
        })
        .join();
    }
}

/// Deletes a test's shard and dead-letter queues, its exchanges, and every Redis key of its
/// namespace (found with `SCAN`, which never blocks the shared Redis as `KEYS` does).
async fn remove_resources(exchange: &str, shards: u16) {
    if let Ok(c) = amqp::connect(&amqp_url(), &Default::default(), "test cleanup").await {
        if let Ok(ch) = c.create_channel().await {
            let queues = (0..=shards)
                .map(|s| amqp::shard_queue(exchange, s))
                .chain([amqp::dead_queue(exchange)]);
            for q in queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for x in [exchange.to_string(), amqp::dlx(exchange)] {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = c.close(200, "done".into()).await;
    }
    let Ok(client) = redis::Client::open(redis_url()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys = scan_keys(&mut conn, &format!("relay:{{{exchange}*")).await;
    for chunk in keys.chunks(1000) {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
}

/// The keys matching `pattern`, found with `SCAN` (which, unlike `KEYS`, never blocks the
/// shared Redis for the other tests); empty if Redis fails.
pub async fn scan_keys(conn: &mut impl redis::aio::ConnectionLike, pattern: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
        else {
            return found;
        };
        found.extend(keys);
        if next == 0 {
            return found;
        }
        cursor = next;
    }
}

/// A TCP proxy the test controls, to cut a worker off RabbitMQ or Redis: `cut` closes every
/// proxied connection and refuses new ones until `restore`; `stall` keeps every connection
/// open but forwards nothing (packets dropped, a peer paused) until `restore`.
pub struct Proxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    stalled: std::sync::atomic::AtomicBool,
    conns: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl ProxyState {
    fn stalled(&self) -> bool {
        self.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Proxy {
    /// A Redis URL (db 0) through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A RabbitMQ URL (guest, vhost /) through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub async fn start(target: String) -> Proxy {
        Proxy::delayed(target, Duration::ZERO).await
    }

    /// Each byte reaches the other side `delay` after it arrived, in order, in both directions,
    /// however many are on the way (a slow link, not a narrow one).
    pub async fn delayed(target: String, delay: Duration) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let state = std::sync::Arc::new(ProxyState::default());
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if st.cut.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed at once
                }
                let target = target.clone();
                let gate = st.clone();
                let task = tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (in_r, in_w) = inbound.into_split();
                    let (out_r, out_w) = outbound.into_split();
                    tokio::join!(
                        delayed_copy(in_r, out_w, delay, gate.clone()),
                        delayed_copy(out_r, in_w, delay, gate)
                    );
                });
                st.conns.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { port, state }
    }

    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.state.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn stall(&self) {
        self.state
            .stalled
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.state
            .stalled
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read and held while the
/// proxy is stalled; reading never waits for writing, so the delay adds latency, never a
/// throughput cap.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    gate: std::sync::Arc<ProxyState>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until((at + delay).into()).await;
            while gate.stalled() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// A worker process that is killed if the test ends (or fails) while it still runs.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits until each of `shards` has a lease holder in `store`.
pub async fn wait_shards_owned(store: &Store, shards: u16, within: Duration) {
    eventually(within, "every shard owned", || async {
        for s in 0..shards {
            if store.lease_owner(s).await.ok().flatten().is_none() {
                return false;
            }
        }
        true
    })
    .await;
}

/// `eventually!(within, "what", condition)`: [`eventually`] with the condition written as an
/// expression (it may `.await`), polled until it holds; panics naming `what` after `within`.
macro_rules! eventually {
    ($within:expr, $what:expr, $cond:expr $(,)?) => {
        $crate::common::eventually($within, $what, || async { $cond }).await
    };
}

/// Polls `cond` until it holds or the deadline passes (then panics with `what`).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Asserts `cond` stays false for the whole window (absence of an effect).
pub async fn never<F, Fut>(window: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(!cond().await, "unexpected: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn next_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

const AT: &str = "2026-11-28T10:00:00Z";

/// Consumes shard 0 of `exchange` on a connection of its own, nacking with requeue every
/// delivery until the broker dead-letters the message past the delivery limit and the
/// consumer goes quiet (3 s); returns how many times it was delivered.
pub async fn nack_until_dead_lettered(exchange: &str) -> i64 {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
    let c = ecs_state_relay::relay::amqp::connect(&amqp_url(), &Default::default(), "test nacker")
        .await
        .expect("amqp");
    let ch = c.create_channel().await.expect("channel");
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let queue = ecs_state_relay::relay::amqp::shard_queue(exchange, 0);
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "test-nacker".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        deliveries += 1;
        assert!(deliveries <= 100, "the broker never gave up on the message");
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        ch.basic_nack(d.delivery_tag, requeue).await.expect("nack");
    }
    let _ = c.close(200, "done".into()).await;
    deliveries
}

/// `n` task ARNs `<prefix>-000`, `<prefix>-001`, …
pub fn arns(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| arn(&format!("{prefix}-{i:03}"))).collect()
}

pub fn task(arn: &str, status: &str) -> Value {
    json!({"schemaVersion":1,"eventId":next_id("t"),"type":"task","cluster":CLUSTER,"taskArn":arn,"occurredAt":AT,"status":status})
}

pub fn container(arn: &str, name: &str, status: &str) -> Value {
    json!({"schemaVersion":1,"eventId":next_id("c"),"type":"container","cluster":CLUSTER,"taskArn":arn,"occurredAt":AT,
           "status":status,"containerName":name})
}

pub fn agent(arn: &str, container: &str, name: &str, status: &str) -> Value {
    json!({"schemaVersion":1,"eventId":next_id("m"),"type":"managedAgent","cluster":CLUSTER,"taskArn":arn,"occurredAt":AT,
           "status":status,"containerName":container,"managedAgentName":name})
}

pub fn task_attachment(arn: &str, attachment: &str, status: &str, expires_in: Duration) -> Value {
    json!({"schemaVersion":1,"eventId":next_id("ta"),"type":"taskAttachment","cluster":CLUSTER,"taskArn":arn,"occurredAt":AT,
           "status":status,"attachmentArn":attachment,"expiresAt":rfc3339_in(expires_in)})
}

pub fn attachment(attachment: &str, kind: &str, status: &str, expires_in: Duration) -> Value {
    json!({"schemaVersion":1,"eventId":next_id("a"),"type":"attachment","cluster":CLUSTER,"occurredAt":AT,
           "status":status,"attachmentArn":attachment,"attachmentType":kind,"expiresAt":rfc3339_in(expires_in)})
}

pub fn rfc3339_in(d: Duration) -> String {
    let t = time::OffsetDateTime::now_utc() + d;
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("formats")
}

pub fn rfc3339_ago(d: Duration) -> String {
    let t = time::OffsetDateTime::now_utc() - d;
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("formats")
}

/// Audits tasks whose lifecycle is RUNNING then STOPPED: per task, the statuses ECS accepted in
/// arrival order, back-to-back repeats (the one allowed duplicate) folded.
/// Returns (lost submissions, tasks out of order, duplicates).
pub fn audit(calls: &[CallRecord], tasks: &[String]) -> (usize, usize, usize) {
    let mut by_task: std::collections::BTreeMap<&str, Vec<&str>> =
        std::collections::BTreeMap::new();
    for c in calls.iter().filter(|c| c.outcome.as_deref() == Some("ok")) {
        if let Some(s) = c.body.get("status").and_then(Value::as_str) {
            by_task.entry(c.key.as_str()).or_default().push(s);
        }
    }
    let (mut lost, mut disorder, mut dups) = (0, 0, 0);
    for t in tasks {
        let mut seen = by_task.get(t.as_str()).cloned().unwrap_or_default();
        let before = seen.len();
        seen.dedup();
        dups += before - seen.len();
        match seen.as_slice() {
            ["RUNNING", "STOPPED"] => {}
            [] => lost += 2,
            ["RUNNING"] | ["STOPPED"] => lost += 1,
            _ => disorder += 1,
        }
    }
    (lost, disorder, dups)
}

/// Events of full lifecycles for `tasks`, in rounds: per round, `per_round` tasks start
/// (containers and RUNNING) and the previous round's tasks stop.
pub fn lifecycle_rounds(tasks: &[String], per_round: usize) -> Vec<Vec<Value>> {
    let chunks: Vec<&[String]> = tasks.chunks(per_round).collect();
    (0..=chunks.len())
        .map(|round| {
            let mut events = Vec::new();
            if let Some(chunk) = chunks.get(round) {
                for t in *chunk {
                    events.extend([
                        container(t, "web", "RUNNING"),
                        container(t, "log", "RUNNING"),
                        task(t, "RUNNING"),
                    ]);
                }
            }
            if round > 0 {
                for t in chunks[round - 1] {
                    events.extend([
                        container(t, "web", "STOPPED"),
                        container(t, "log", "STOPPED"),
                        task(t, "STOPPED"),
                    ]);
                }
            }
            events
        })
        .collect()
}

/// Publishes rounds in the background, one every `every`, as the wire contract asks of an
/// agent: over one kept connection, and a task's next change only once its previous one is
/// confirmed. A round goes out in waves (a task at most once per wave), each confirmed before
/// the next. (A change the broker nacked is published again behind the ones sent after it:
/// pipelining a task's changes would reorder them on a RabbitMQ node loss.) A wave the
/// broker has not taken within 60 s fails the test.
pub fn stream(conn: ConnConfig, rounds: Vec<Vec<Value>>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut publisher: Option<Publisher> = None;
        for round in rounds {
            for wave in waves(&round) {
                let deadline = Instant::now() + Duration::from_secs(60);
                while let Err(e) = publish_wave(&mut publisher, &conn, &wave).await {
                    // The publisher gave up reconnecting: a fresh one sends the whole wave.
                    publisher = None;
                    assert!(Instant::now() < deadline, "publishing failed for 60 s: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            tokio::time::sleep(every).await;
        }
        if let Some(p) = publisher {
            let _ = p.close().await;
        }
    })
}

/// Splits a round into waves in which each routing key appears at most once, keeping each
/// key's changes in their order.
fn waves(round: &[Value]) -> Vec<Vec<String>> {
    let mut waves: Vec<Vec<String>> = Vec::new();
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for event in round {
        let key = event
            .get("taskArn")
            .or_else(|| event.get("attachmentArn"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let n = seen.entry(key).or_default();
        if waves.len() <= *n {
            waves.push(Vec::new());
        }
        waves[*n].push(event.to_string());
        *n += 1;
    }
    waves
}

/// Sends a wave through the kept publisher (connecting it first if needed) and waits for its
/// confirms.
async fn publish_wave(
    publisher: &mut Option<Publisher>,
    conn: &ConnConfig,
    wave: &[String],
) -> Result<(), PublishError> {
    if publisher.is_none() {
        *publisher = Some(Publisher::connect(conn).await?);
    }
    let p = publisher.as_mut().expect("connected above");
    for (i, line) in wave.iter().enumerate() {
        p.send(i + 1, line).await?;
    }
    p.flush().await.map(|_| ())
}

/// [`stream`]s the lifecycles of `tasks` to `conn` (8 tasks a round, a round every `every`) and
/// returns once ECS has accepted 20 calls, so a fault injected next hits a flowing stream.
pub async fn flowing_stream(
    env: &Env,
    conn: ConnConfig,
    tasks: &[String],
    every: Duration,
) -> JoinHandle<()> {
    let publisher = stream(conn, lifecycle_rounds(tasks, 8), every);
    eventually(Duration::from_secs(30), "calls flowing", || async {
        env.sim.stats().ok >= 20
    })
    .await;
    publisher
}

/// Whether the sim got a body with `status` for the key (status variant).
pub fn statuses(calls: &[CallRecord]) -> Vec<String> {
    calls
        .iter()
        .filter_map(|c| {
            c.body
                .get("status")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

pub fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Sends a signal to a worker process (`kill -SIG pid`).
pub fn signal(child: &Proc, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.0.id().to_string())
        .status();
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "kill -{sig} failed"
    );
}

/// Waits for a worker process to exit; panics past `within`.
pub async fn wait_exit(child: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "worker did not exit in time");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The sum of every series of a metric in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    ecs_state_relay::relay::metrics::exposition_sum(text, name)
}

/// A shard queue's ready messages and consumers (a passive declare on `ch`).
pub async fn shard_queue_counts(
    ch: &lapin::Channel,
    exchange: &str,
    shard: u16,
) -> Result<(u32, u32), lapin::Error> {
    let q = ch
        .queue_declare(
            ecs_state_relay::relay::amqp::shard_queue(exchange, shard)
                .as_str()
                .into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

/// A private `redis-server` on a free loopback port, for tests that act on the whole server
/// (CLIENT KILL, restarts); killed when dropped. Never the shared instance on 6379.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&[]).await
    }

    /// With extra arguments, e.g. `--replicaof`. Its files (a replica's synced RDB) go to a
    /// temp dir of its own, never the working directory.
    pub async fn start_with(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("relay-redis-{port}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = RedisServer { port, child, dir };
        let url = server.url();
        eventually(Duration::from_secs(10), "private redis answers", || {
            let url = url.clone();
            async move {
                let Ok(client) = redis::Client::open(url) else {
                    return false;
                };
                match client.get_multiplexed_async_connection().await {
                    Ok(mut c) => redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// The last `n` lines of a log file (empty if unreadable), for a failing fixture's report.
pub fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

/// `n` distinct free loopback ports: every listener is held until all are picked.
///
/// Taken below the kernel's ephemeral range: a port the kernel hands out (`bind :0`) is free
/// only until the fixture's server binds it, and meanwhile any outgoing connection of a test
/// running in parallel may get it as its local port (seen: a RabbitMQ node failing with
/// `eaddrinuse`). Below that range only another fixture's random pick can collide.
pub fn free_ports(n: usize) -> Vec<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let range = 10_000..ephemeral_low.max(10_001);
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    while listeners.len() < n {
        let port = rand::random_range(range.clone());
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// Every one of `tasks` had at least one ECS call accepted.
pub fn all_sent(env: &Env, tasks: &[String]) -> bool {
    tasks.iter().all(|t| {
        env.calls_for(t)
            .iter()
            .any(|c| c.outcome.as_deref() == Some("ok"))
    })
}

/// Every delivery of this test's shard queues, tagged with its shard: consumed (no ack) on
/// `ch`. Quorum queues with a single active consumer refuse `basic.get`, hence consumers.
pub async fn shard_deliveries(
    ch: &lapin::Channel,
    env: &Env,
) -> impl futures_util::Stream<Item = (u16, Result<lapin::message::Delivery, lapin::Error>)> {
    use futures_util::StreamExt;
    let mut consumers = Vec::new();
    for shard in 0..env.shards {
        let consumer = ch
            .basic_consume(
                amqp::shard_queue(&env.exchange, shard).as_str().into(),
                format!("look-{shard}").as_str().into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("consume a shard queue");
        consumers.push(consumer.map(move |d| (shard, d)));
    }
    futures_util::stream::select_all(consumers)
}

/// Waits until `key` has `batched` changes in its batch and `waiting` in its outbox.
pub async fn wait_queued(env: &Env, key: &str, batched: u64, waiting: u64) {
    eventually(
        Duration::from_secs(10),
        &format!("{key}: {batched} batched, {waiting} waiting"),
        || async {
            env.store
                .queued(env.shards, key)
                .await
                .is_ok_and(|q| q == (batched, waiting))
        },
    )
    .await;
}
