//! A RabbitMQ cluster on loopback for node-loss tests: `n` nodes, each a `rabbitmq-server` child
//! process with its own node name (`relaytest-<rand>-<i>@localhost`), AMQP, distribution,
//! management and Prometheus ports (all free loopback ports), and its own mnesia, log, config
//! and enabled_plugins files in a private temp dir, which is also `HOME` (for the shared Erlang
//! cookie) of the nodes and of the CLI tools run against them. Never the shared node on 5672.
//!
//! The scripts are run from /usr/lib/rabbitmq/bin: the /usr/sbin wrappers switch to the
//! `rabbitmq` user (and its cookie) when run as root. `RABBITMQ_CONF_ENV_FILE` points at an
//! empty file so /etc/rabbitmq/rabbitmq-env.conf (the shared node's `NODENAME`) is not read,
//! and `RABBITMQ_CONFIG_FILE` at the node's own rabbitmq.conf, so /etc/rabbitmq/rabbitmq.conf
//! (the shared node's listener) is not either.
//!
//! `RABBITMQ_ALLOW_INPUT` makes `rabbitmq-server` exec the VM instead of running it under a
//! signal-forwarding shell (`-noinput` is passed back explicitly), so each child's pid is the
//! node's `beam.smp` (checked at boot) and `kill` is a real SIGKILL of the node.
//!
//! Nodes 2..n join node 1 with `rabbitmqctl stop_app` / `join_cluster` / `start_app`, one at a
//! time. A killed node restarts from its mnesia dir and rejoins by itself.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The real scripts, not the /usr/sbin wrappers (see the module doc).
const BIN: &str = "/usr/lib/rabbitmq/bin";
const PLUGINS: &str =
    "[rabbitmq_consistent_hash_exchange,rabbitmq_management,rabbitmq_prometheus].\n";
/// Bound on the first boot of all nodes (they boot at the same time).
const BOOT_WITHIN: Duration = Duration::from_secs(180);
/// Bound on a restarted node's boot.
const RESTART_WITHIN: Duration = Duration::from_secs(120);
/// Bound on one CLI command (a join's `start_app` boots the rabbit application again).
const CTL_WITHIN: Duration = Duration::from_secs(120);
/// Bound on `cluster_status` listing every running node.
const CLUSTER_WITHIN: Duration = Duration::from_secs(60);
/// Bound on one `list_queues` (a queue whose leader just died may make it slow).
const QUERY_WITHIN: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

struct Node {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    mgmt_port: u16,
    prom_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A quorum queue as a running node reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStatus {
    pub leader: Option<String>,
    pub members: Vec<String>,
    pub online: Vec<String>,
}

pub struct RabbitCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

impl RabbitCluster {
    /// Starts `n` nodes at once, joins nodes 2..n to node 1 one by one, and returns once
    /// `cluster_status` on node 1 lists all `n` running. Prints how long it took.
    pub async fn start(n: usize) -> RabbitCluster {
        assert!(n >= 1, "a cluster has at least one node");
        let t = Instant::now();
        let tag = format!("{:08x}", rand::random::<u32>());
        let dir = std::env::temp_dir().join(format!("rabbit-cluster-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(dir.join("home")).expect("create the cluster temp dir");
        write_cookie(&dir.join("home").join(".erlang.cookie"));
        // Empty: keeps the scripts off /etc/rabbitmq/rabbitmq-env.conf.
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");

        let ports = super::free_ports(4 * n);
        let nodes = (0..n)
            .map(|i| {
                let node_dir = dir.join(format!("node{i}"));
                std::fs::create_dir_all(&node_dir).expect("create a node dir");
                let p = &ports[4 * i..4 * i + 4];
                let node = Node {
                    name: format!("relaytest-{tag}-{i}@localhost"),
                    amqp_port: p[0],
                    dist_port: p[1],
                    mgmt_port: p[2],
                    prom_port: p[3],
                    dir: node_dir,
                    child: None,
                };
                std::fs::write(
                    node.dir.join("rabbitmq.conf"),
                    format!(
                        "management.tcp.ip = 127.0.0.1\n\
                         management.tcp.port = {}\n\
                         prometheus.tcp.ip = 127.0.0.1\n\
                         prometheus.tcp.port = {}\n",
                        node.mgmt_port, node.prom_port
                    ),
                )
                .expect("write rabbitmq.conf");
                std::fs::write(node.dir.join("enabled_plugins"), PLUGINS)
                    .expect("write enabled_plugins");
                node
            })
            .collect();
        let mut cluster = RabbitCluster { dir, nodes };

        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_booted(i, BOOT_WITHIN).await;
        }
        let booted = t.elapsed();

        let seed = cluster.nodes[0].name.clone();
        for i in 1..n {
            for args in [
                vec!["stop_app"],
                vec!["join_cluster", seed.as_str()],
                vec!["start_app"],
            ] {
                if let Err(e) = cluster.ctl(i, "rabbitmqctl", &args, CTL_WITHIN).await {
                    cluster.fail(&format!(
                        "rabbitmqctl {} on {} failed: {e}",
                        args.join(" "),
                        cluster.nodes[i].name
                    ));
                }
            }
        }
        cluster.wait_cluster(0, (0..n).collect()).await;
        eprintln!(
            "rabbit cluster: {n} nodes booted in {:.1}s, clustered in {:.1}s ({})",
            booted.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            cluster.dir.display()
        );
        cluster
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (guest may log in over loopback).
    pub fn amqp_url(&self, i: usize) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.nodes[i].amqp_port
        )
    }

    /// Every node's AMQP URL, comma-separated, in node order.
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.amqp_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_name(&self, i: usize) -> String {
        self.nodes[i].name.clone()
    }

    /// The node index of a node name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn amqp_port(&self, i: usize) -> u16 {
        self.nodes[i].amqp_port
    }

    pub fn dist_port(&self, i: usize) -> u16 {
        self.nodes[i].dist_port
    }

    pub fn management_port(&self, i: usize) -> u16 {
        self.nodes[i].mgmt_port
    }

    pub fn prometheus_port(&self, i: usize) -> u16 {
        self.nodes[i].prom_port
    }

    /// The pid of the node's `beam.smp`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Resident memory (VmRSS, KiB) of each running node's VM, by node index.
    pub fn rss_kib(&self) -> Vec<(usize, u64)> {
        self.running()
            .into_iter()
            .filter_map(|i| {
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", self.pid(i)?)).ok()?;
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()?;
                Some((i, kib))
            })
            .collect()
    }

    /// SIGKILLs the node's VM (the child is `beam.smp` itself, checked at boot).
    pub fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.nodes[i].name));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the node again with the same environment and data; returns once it is booted
    /// and `cluster_status` on another running node lists every running node, it included.
    pub async fn restart(&mut self, i: usize) {
        if let Some(mut old) = self.nodes[i].child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.spawn(i);
        self.wait_booted(i, RESTART_WITHIN).await;
        let from = self.running().into_iter().find(|&j| j != i).unwrap_or(i);
        self.wait_cluster(from, self.running()).await;
    }

    /// Indices of the nodes that run (not killed).
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .collect()
    }

    /// Leader and members (node names) of a quorum queue in the default vhost, from the first
    /// running node that answers; `(None, [])` if none knows the queue.
    pub async fn queue_members(&self, queue: &str) -> (Option<String>, Vec<String>) {
        let s = self.queue_status(queue).await;
        (s.leader, s.members)
    }

    /// Leader, members and online members of a quorum queue (`rabbitmqctl list_queues`), from
    /// the first running node that answers; the default if none knows the queue.
    pub async fn queue_status(&self, queue: &str) -> QueueStatus {
        for i in self.running() {
            let args = [
                "list_queues",
                "-q",
                "--formatter",
                "json",
                "name",
                "leader",
                "members",
                "online",
            ];
            let Ok(out) = self.ctl(i, "rabbitmqctl", &args, QUERY_WITHIN).await else {
                continue;
            };
            let Ok(rows) = serde_json::from_str::<Vec<serde_json::Value>>(out.trim()) else {
                continue;
            };
            let Some(row) = rows.iter().find(|r| r["name"] == queue) else {
                continue;
            };
            let names = |key: &str| -> Vec<String> {
                let mut v: Vec<String> = row[key]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                v.sort();
                v
            };
            return QueueStatus {
                leader: row["leader"]
                    .as_str()
                    .filter(|l| l.contains('@'))
                    .map(str::to_string),
                members: names("members"),
                online: names("online"),
            };
        }
        QueueStatus::default()
    }

    /// Runs a CLI tool (`rabbitmqctl`, `rabbitmq-queues`, ...) against node `i` with the
    /// cluster's cookie, bounded by `within`; its stdout, or its status and output.
    pub async fn ctl(
        &self,
        i: usize,
        tool: &str,
        args: &[&str],
        within: Duration,
    ) -> Result<String, String> {
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=5")
            .arg(within.as_secs().max(1).to_string())
            .arg(Path::new(BIN).join(tool))
            .arg("-n")
            .arg(&self.nodes[i].name)
            .args(args);
        self.common_env(&mut cmd);
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        tokio::task::spawn_blocking(move || {
            let out = cmd.output().map_err(|e| format!("cannot run: {e}"))?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() {
                Ok(stdout)
            } else {
                Err(format!(
                    "{} ({}): {}{}",
                    out.status,
                    if out.status.code() == Some(124) {
                        "timed out"
                    } else {
                        "failed"
                    },
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        })
        .await
        .expect("the CLI task runs")
    }

    fn common_env(&self, cmd: &mut Command) {
        cmd.env("HOME", self.dir.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env_remove("ERL_FLAGS")
            .env_remove("RABBITMQ_NODENAME");
    }

    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("stdout.log"))
            .expect("open the node's stdout log");
        let err = out.try_clone().expect("clone a file handle");
        let mut cmd = Command::new(Path::new(BIN).join("rabbitmq-server"));
        self.common_env(&mut cmd);
        cmd.env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                node.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", node.dir.join("rabbitmq.pid"))
            .env(
                "ERL_CRASH_DUMP",
                node.dir.join("log").join("erl_crash.dump"),
            )
            // exec the VM (no signal-forwarding shell), without an Erlang shell on stdin;
            // distribution on loopback only.
            .env("RABBITMQ_ALLOW_INPUT", "true")
            .env(
                "RABBITMQ_SERVER_START_ARGS",
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}",
            )
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().expect("rabbitmq-server starts");
        self.nodes[i].child = Some(child);
    }

    /// Waits until node `i` accepts AMQP connections and `await_startup` succeeds on it;
    /// panics with the logs if its VM exits first or `within` passes. Checks that the child is
    /// the VM itself.
    async fn wait_booted(&mut self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.nodes[i].amqp_port));
        loop {
            let exited = match self.nodes[i].child.as_mut() {
                Some(c) => c.try_wait().ok().flatten(),
                None => panic!("{} was not started", self.nodes[i].name),
            };
            if let Some(status) = exited {
                self.nodes[i].child = None;
                self.fail(&format!(
                    "{} exited ({status}) while booting",
                    self.nodes[i].name
                ));
            }
            // The AMQP listener is up near the end of the boot: only then ask the CLI, whose
            // every run costs about a CPU-second.
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = left.as_secs().max(1).to_string();
                match self
                    .ctl(
                        i,
                        "rabbitmqctl",
                        &["await_startup", "--timeout", &timeout],
                        left + Duration::from_secs(5),
                    )
                    .await
                {
                    Ok(_) => break,
                    Err(e) if Instant::now() >= deadline => self.fail(&format!(
                        "{} did not finish booting within {within:?}: {e}",
                        self.nodes[i].name
                    )),
                    Err(_) => {}
                }
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "{} does not accept AMQP connections on {addr} within {within:?}",
                    self.nodes[i].name
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        let pid = self.pid(i).expect("running");
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        assert!(
            exe.ends_with("beam.smp"),
            "the child of {} is {} (pid {pid}), not the VM",
            self.nodes[i].name,
            exe.display()
        );
    }

    /// Waits until `cluster_status` on node `from` lists exactly the nodes `expected` as
    /// running; panics with the last answer and the logs past `CLUSTER_WITHIN`.
    async fn wait_cluster(&self, from: usize, expected: Vec<usize>) {
        let mut want: Vec<String> = expected.iter().map(|&i| self.node_name(i)).collect();
        want.sort();
        let deadline = Instant::now() + CLUSTER_WITHIN;
        let mut last;
        loop {
            match self
                .ctl(
                    from,
                    "rabbitmqctl",
                    &["cluster_status", "--formatter", "json"],
                    CLUSTER_WITHIN,
                )
                .await
            {
                Ok(out) => {
                    let running: Option<Vec<String>> =
                        serde_json::from_str::<serde_json::Value>(out.trim())
                            .ok()
                            .and_then(|v| {
                                let mut r: Vec<String> = v["running_nodes"]
                                    .as_array()?
                                    .iter()
                                    .filter_map(|n| n.as_str().map(str::to_string))
                                    .collect();
                                r.sort();
                                Some(r)
                            });
                    if running.as_ref() == Some(&want) {
                        return;
                    }
                    last = format!("running_nodes {running:?}");
                }
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "cluster_status on {} does not list {want:?} as running within \
                     {CLUSTER_WITHIN:?}; last: {last}",
                    self.nodes[from].name
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Panics with `what`; `drop` then prints the tail of every node's logs.
    fn fail(&self, what: &str) -> ! {
        panic!("{what} (node logs below)");
    }

    /// The last lines of every node's logs.
    fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let mut files = vec![node.dir.join("stdout.log")];
            if let Ok(rd) = std::fs::read_dir(node.dir.join("log")) {
                let mut logs: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect();
                logs.sort();
                files.extend(logs);
            }
            for f in files {
                out.push_str(&format!("--- {}: {}\n", node.name, f.display()));
                out.push_str(&super::log_tail(&f, 30));
            }
        }
        out
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "rabbit cluster logs ({}):\n{}",
                self.dir.display(),
                self.logs()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A random cookie, readable by its owner only (Erlang refuses a cookie others can read).
fn write_cookie(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let cookie: String = (0..32)
        .map(|_| char::from(b'A' + rand::random_range(0..26u8)))
        .collect();
    std::fs::write(path, cookie).expect("write the erlang cookie");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400))
        .expect("chmod the erlang cookie");
}
