//! Helpers shared by the sim's unit tests: a minimal HTTP client and polling.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::protocol::{AMZ_JSON, TARGET_PREFIX};

pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) head: String,
    pub(super) body: String,
}

impl Reply {
    pub(super) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Minimal HTTP/1.1 client: one request per connection.
pub(super) async fn http(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

pub(super) async fn ecs(base: &str, op: &str, body: &str) -> Reply {
    let target = format!("{TARGET_PREFIX}{op}");
    http(
        base,
        "POST",
        "/",
        &[
            ("X-Amz-Target", target.as_str()),
            ("Content-Type", AMZ_JSON),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=x"),
        ],
        body,
    )
    .await
}

/// A SubmitTaskStateChange for `task` in the background (for calls the sim holds).
pub(super) fn submit_in_background(base: &str, task: &str) -> tokio::task::JoinHandle<Reply> {
    let (base, body) = (base.to_string(), format!(r#"{{"task":"{task}"}}"#));
    tokio::spawn(async move { ecs(&base, "SubmitTaskStateChange", &body).await })
}

/// Sets the capacity mode over the admin API (`max_in_flight` a number, or `null` for off).
pub(super) async fn set_capacity(base: &str, max_in_flight: &str) -> Reply {
    let body = format!(r#"{{"max_in_flight":{max_in_flight}}}"#);
    http(base, "POST", "/_sim/capacity", &[], &body).await
}

pub(super) async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
