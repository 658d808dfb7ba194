//! A Redis high-availability group on loopback for failover tests: one primary, one replica and
//! three Sentinels (quorum 2), each a `redis-server` child process on a free port, with their
//! configs, logs and data files in a private temp dir. Never the shared instance on 6379.
//!
//! Timings: a primary is subjectively down after 1 s without a PING reply
//! (`down-after-milliseconds`); `failover-timeout` is 2 s, which also sets how long a Sentinel
//! waits before it turns a restarted old primary (reporting itself a master) into a replica, and
//! the 4 s pause before a failover is retried after a split vote.
//!
//! Data nodes have no persistence, so a killed node is restarted the way Redis says a node
//! without persistence must be (replication docs, "Safety of replication when master has
//! persistence turned off"): never as a primary. [`RedisHa::restart`] waits until Sentinel has
//! promoted another node, then starts it as a replica of that one, which it resyncs from. A node
//! restarted empty *as a primary* (as a supervisor restarting a crashed pod at once does) would
//! be taken for the primary again by its replicas and by Sentinel until Sentinel converts it
//! (10 s or more: Sentinel sends INFO to replicas every 10 s and converts a replica that
//! reports itself a master only after `failover-timeout`); a second failover in that window can
//! promote the empty node and the replicas resync from it: the whole data set is gone. Issue 33's
//! nemesis seed lost the relay's state that way (docs/operations.md, "Store lost").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::eventually;

/// Per connection attempt and per command, so a stopped or hung node never stalls a poll.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the initial sync and on Sentinel discovery in `start`.
const START_WITHIN: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

pub struct RedisHa {
    pub master_name: String,
    pub sentinel_ports: Vec<u16>,
    dir: PathBuf,
    children: HashMap<u16, Child>,
    /// Data node ports, the primary at start first.
    data: Vec<u16>,
}

impl RedisHa {
    /// Primary + replica + 3 Sentinels. Returns once the replica is in sync and every Sentinel
    /// names the primary and knows the replica and the two other Sentinels.
    pub async fn start(master_name: &str) -> RedisHa {
        RedisHa::start_with(master_name, 1).await
    }

    /// Primary + `replicas` replicas + 3 Sentinels, ready as with [`RedisHa::start`].
    pub async fn start_with(master_name: &str, replicas: usize) -> RedisHa {
        let dir = std::env::temp_dir().join(format!(
            "redis-ha-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create the HA temp dir");
        let ports = super::free_ports(replicas + 4);
        let mut ha = RedisHa {
            master_name: master_name.to_string(),
            sentinel_ports: ports[replicas + 1..].to_vec(),
            dir,
            children: HashMap::new(),
            data: ports[..=replicas].to_vec(),
        };
        let primary = ha.data[0];
        let replica_ports = ha.data[1..].to_vec();

        ha.spawn_data(primary, None);
        ha.wait_ping(primary).await;
        for &replica in &replica_ports {
            ha.spawn_data(replica, Some(primary));
            ha.wait_ping(replica).await;
        }
        for &replica in &replica_ports {
            eventually(
                START_WITHIN,
                "the replicas in sync with the primary",
                || async {
                    info_field(replica, "replication", "master_link_status").await
                        == Some("up".into())
                        && online_replicas(primary).await >= replica_ports.len()
                },
            )
            .await;
        }

        for p in ha.sentinel_ports.clone() {
            ha.spawn_sentinel(p, primary);
        }
        for p in ha.sentinel_ports.clone() {
            ha.wait_ping(p).await;
        }
        let name = ha.master_name.clone();
        let sentinels = ha.sentinel_ports.clone();
        eventually(
            START_WITHIN,
            "every sentinel knows the primary, the replicas and the other sentinels",
            || {
                let (name, sentinels) = (name.clone(), sentinels.clone());
                let replica_ports = replica_ports.clone();
                async move {
                    for &s in &sentinels {
                        if master_addr(s, &name).await != Some(primary) {
                            return false;
                        }
                        let replicas = sentinel_list(s, "REPLICAS", &name).await;
                        let known = |port| {
                            replicas
                                .iter()
                                .any(|r| port_of(r) == Some(port) && healthy(r))
                        };
                        if !replica_ports.iter().all(|&p| known(p)) {
                            return false;
                        }
                        let others = sentinel_list(s, "SENTINELS", &name).await;
                        if others.iter().filter(|o| healthy(o)).count() != sentinels.len() - 1 {
                            return false;
                        }
                    }
                    true
                }
            },
        )
        .await;
        ha
    }

    /// `127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`
    pub fn sentinels(&self) -> String {
        self.sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The data node ports, primary first at start.
    pub fn data_ports(&self) -> &[u16] {
        &self.data
    }

    /// The primary's port as the Sentinels report it, asking each in turn until one answers.
    pub async fn primary_port(&self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for &s in &self.sentinel_ports {
                if let Some(p) = master_addr(s, &self.master_name).await {
                    return p;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no sentinel names a primary for {}",
                self.master_name
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILLs the redis-server on that data port.
    pub fn kill(&mut self, port: u16) {
        assert!(self.data.contains(&port), "{port} is not a data port");
        let mut child = self
            .children
            .remove(&port)
            .unwrap_or_else(|| panic!("no redis-server runs on {port}"));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGSTOPs (`pause`) or SIGCONTs the redis-server on that data port: a node that holds
    /// its connections open and answers nothing (a hung host, a long GC-like stall).
    pub fn signal(&self, port: u16, sig: &str) {
        let child = self
            .children
            .get(&port)
            .unwrap_or_else(|| panic!("no redis-server runs on {port}"));
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{sig} {port}");
    }

    /// The primary's replication offset and each replica's acknowledged offset, as the primary
    /// reports them (`INFO replication`): which replica a failover right now could promote
    /// without the latest writes.
    pub async fn offsets(&self, primary: u16) -> String {
        let Some(info) = query::<String>(primary, redis::cmd("INFO").arg("replication")).await
        else {
            return format!("{primary}: no answer");
        };
        let mut out = vec![];
        for line in info.lines() {
            if let Some(v) = line.strip_prefix("master_repl_offset:") {
                out.insert(0, format!("primary {primary} at {}", v.trim()));
            } else if line.starts_with("slave") && line.contains(":ip=") {
                let field = |name: &str| {
                    line.split([':', ','])
                        .find_map(|kv| kv.strip_prefix(name))
                        .unwrap_or("?")
                        .to_string()
                };
                out.push(format!(
                    "replica {} {} at {} (lag {} s)",
                    field("port="),
                    field("state="),
                    field("offset="),
                    field("lag=")
                ));
            }
        }
        out.join(", ")
    }

    /// Starts the node on that data port again, empty, as a replica of the primary Sentinel
    /// names once it has failed over from this node (waited for, up to 60 s): an empty node
    /// must never come back as a primary (see the module docs). Waits for PING; returns the
    /// primary it follows.
    pub async fn restart(&mut self, port: u16) -> u16 {
        assert!(self.data.contains(&port), "{port} is not a data port");
        if let Some(mut old) = self.children.remove(&port) {
            let _ = old.kill();
            let _ = old.wait();
        }
        let primary = self.wait_failover(port, Duration::from_secs(60)).await;
        let _ = std::fs::remove_file(self.dir.join(format!("dump-{port}.rdb")));
        self.spawn_data(port, Some(primary));
        self.wait_ping(port).await;
        primary
    }

    /// Waits until every Sentinel names the same primary other than `old`, and that node says
    /// it is a master; returns its port. Panics past `within`.
    pub async fn wait_failover(&self, old: u16, within: Duration) -> u16 {
        let deadline = Instant::now() + within;
        loop {
            let mut named = Vec::new();
            for &s in &self.sentinel_ports {
                named.push(master_addr(s, &self.master_name).await);
            }
            if let Some(Some(new)) = named.first().copied() {
                if new != old
                    && named.iter().all(|n| *n == Some(new))
                    && info_field(new, "replication", "role").await == Some("master".into())
                {
                    return new;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no failover from {old} within {within:?}: sentinels name {named:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the current primary reports at least `n` connected replicas with
    /// `state=online`. Panics past `within`.
    pub async fn wait_replicas(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let primary = self.primary_port().await;
            let online = online_replicas(primary).await;
            if online >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "primary {primary} has {online} online replicas, not {n}, after {within:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// `redis://127.0.0.1:<port>/0` for a data port.
    pub fn url(port: u16) -> String {
        format!("redis://127.0.0.1:{port}/0")
    }

    fn spawn_data(&mut self, port: u16, replica_of: Option<u16>) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--dbfilename", &format!("dump-{port}.rdb")])
            .arg("--logfile")
            .arg(self.dir.join(format!("redis-{port}.log")))
            .args(["--repl-diskless-sync", "yes"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--repl-diskless-load", "on-empty-db"])
            .args(["--rdb-del-sync-files", "yes"]);
        if let Some(primary) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        self.spawn(port, cmd);
    }

    fn spawn_sentinel(&mut self, port: u16, primary: u16) {
        let name = &self.master_name;
        let conf = self.dir.join(format!("sentinel-{port}.conf"));
        let text = format!(
            "port {port}\n\
             bind 127.0.0.1\n\
             daemonize no\n\
             dir {dir}\n\
             logfile {log}\n\
             sentinel resolve-hostnames no\n\
             sentinel announce-hostnames no\n\
             sentinel monitor {name} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 2000\n\
             sentinel parallel-syncs {name} 1\n",
            dir = self.dir.display(),
            log = self.dir.join(format!("sentinel-{port}.log")).display(),
        );
        std::fs::write(&conf, text).expect("write a sentinel config");
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf).arg("--sentinel");
        self.spawn(port, cmd);
    }

    fn spawn(&mut self, port: u16, mut cmd: Command) {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.children.insert(port, child);
    }

    /// Waits for PING on a child's port; panics with its log if it exits (a port taken since
    /// `free_ports`, a bad option).
    async fn wait_ping(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = self.children.get_mut(&port) {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("redis-server on {port} exited ({status}) at start");
                }
            }
            if query::<String>(port, &redis::cmd("PING")).await.as_deref() == Some("PONG") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} does not answer PING"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last lines of every log in the temp dir (printed by `drop` when a test fails).
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|f| f.extension().is_some_and(|x| x == "log"));
        files.sort();
        for f in files {
            out.push_str(&format!("--- {}\n", file_name(&f)));
            // Enough to cover a long run's last minutes of failovers.
            out.push_str(&super::log_tail(&f, 400));
        }
        out
    }
}

impl Drop for RedisHa {
    fn drop(&mut self) {
        for (_, mut child) in self.children.drain() {
            // SIGKILL ends a stopped process too; no SIGCONT needed.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("redis HA logs ({}):\n{}", self.dir.display(), self.logs());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One command on a fresh connection; `None` on any error or timeout.
async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = tokio::time::timeout(IO_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .ok()?
        .ok()?;
    tokio::time::timeout(IO_TIMEOUT, cmd.query_async::<T>(&mut conn))
        .await
        .ok()?
        .ok()
}

/// A field of an INFO section, e.g. `replication` / `role`.
async fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let info: String = query(port, redis::cmd("INFO").arg(section)).await?;
    info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// Replicas the node lists as `state=online` in INFO replication (0 if it does not answer).
async fn online_replicas(port: u16) -> usize {
    let Some(info) = query::<String>(port, redis::cmd("INFO").arg("replication")).await else {
        return 0;
    };
    info.lines()
        .filter(|l| l.starts_with("slave") && l.contains(":ip=") && l.contains(",state=online,"))
        .count()
}

/// SENTINEL get-master-addr-by-name, as a port.
async fn master_addr(sentinel: u16, name: &str) -> Option<u16> {
    let addr: Option<(String, u16)> = query(
        sentinel,
        redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(name),
    )
    .await?;
    addr.map(|(_, port)| port)
}

/// SENTINEL REPLICAS|SENTINELS <name>: one field map per instance (empty on error).
async fn sentinel_list(sentinel: u16, what: &str, name: &str) -> Vec<HashMap<String, String>> {
    query(sentinel, redis::cmd("SENTINEL").arg(what).arg(name))
        .await
        .unwrap_or_default()
}

fn port_of(instance: &HashMap<String, String>) -> Option<u16> {
    instance.get("port")?.parse().ok()
}

/// Not subjectively/objectively down, not disconnected.
fn healthy(instance: &HashMap<String, String>) -> bool {
    instance.get("flags").is_some_and(|f| {
        !f.split(',')
            .any(|x| matches!(x, "s_down" | "o_down" | "disconnected"))
    })
}
