//! The events the scenarios publish: single task RUNNING changes and full task lifecycles.

use serde_json::json;

/// A task RUNNING event for task `{run}{tag}{i}`; returns (task ARN, JSON line).
pub(super) fn task_running(run: &str, tag: &str, i: usize) -> (String, String) {
    let arn = task_arn(run, tag, i);
    let line = json!({"schemaVersion":1,"eventId":format!("{run}-{tag}{i}"),"type":"task","cluster":"bench",
        "taskArn":arn,"occurredAt":"2026-11-28T10:00:00Z","status":"RUNNING"})
    .to_string();
    (arn, line)
}

pub(super) fn task_arn(run: &str, tag: &str, i: usize) -> String {
    format!("arn:aws:ecs:us-east-1:123456789012:task/bench/{run}{tag}{i:010}")
}

/// One benchmark event: its line and, for task events, (task ARN, status) to time its call.
pub(super) struct BenchEvent {
    pub(super) id: String,
    pub(super) line: String,
    pub(super) task: Option<(String, &'static str)>,
}

/// 10 events per task: 4 containers RUNNING, task RUNNING, 4 containers STOPPED, task STOPPED
/// (all tasks' RUNNING phase first, then all STOPPED phases, as a fleet starting then stopping).
pub(super) fn lifecycles(run: &str, tag: &str, tasks: usize) -> Vec<BenchEvent> {
    let mut out = Vec::with_capacity(tasks * 10);
    for phase in ["RUNNING", "STOPPED"] {
        for i in 0..tasks {
            let arn = task_arn(run, tag, i);
            for c in ["app", "sidecar", "log", "proxy"] {
                let id = format!("{run}-{tag}{i}-{c}-{phase}");
                let line = json!({"schemaVersion":1,"eventId":id,
                    "type":"container","cluster":"bench","taskArn":arn,"containerName":c,
                    "occurredAt":"2026-11-28T10:00:00Z","status":phase});
                out.push(BenchEvent {
                    id,
                    line: line.to_string(),
                    task: None,
                });
            }
            let id = format!("{run}-{tag}{i}-{phase}");
            let line = json!({"schemaVersion":1,"eventId":id,
                "type":"task","cluster":"bench","taskArn":arn,
                "occurredAt":"2026-11-28T10:00:00Z","status":phase});
            out.push(BenchEvent {
                id,
                line: line.to_string(),
                task: Some((arn, phase)),
            });
        }
    }
    out
}
