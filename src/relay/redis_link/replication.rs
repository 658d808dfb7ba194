//! What `INFO replication` says about the primary: its role and its replicas with their lag.

use std::sync::Arc;

use super::{Link, StoreResult};

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

impl Link {
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

#[cfg(test)]
mod tests {
    use super::*;

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
