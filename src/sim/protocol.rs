//! The AWS JSON 1.1 side of the sim: `X-Amz-Target` operations, the call handler, and the
//! success and error bodies it answers with.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::record::OUTCOME_OK;
use super::rules::Action;
use super::{App, Decision};

/// `X-Amz-Target` prefix of the ECS service (API version 2014-11-13).
pub(super) const TARGET_PREFIX: &str = "AmazonEC2ContainerServiceV20141113.";
/// The operations the relay uses; anything else is an `UnknownOperationException`.
const OPERATIONS: [&str; 3] = [
    "SubmitTaskStateChange",
    "SubmitContainerStateChange",
    "SubmitAttachmentStateChanges",
];
pub(super) const AMZ_JSON: &str = "application/x-amz-json-1.1";

/// AWS errors the sim can answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    InvalidParameter,
    Server,
    Throttling,
    Unavailable,
    UnknownOperation,
    Serialization,
}

impl Failure {
    pub(super) fn code(self) -> &'static str {
        match self {
            Failure::InvalidParameter => "InvalidParameterException",
            Failure::Server => "ServerException",
            Failure::Throttling => "ThrottlingException",
            Failure::Unavailable => "ServiceUnavailable",
            Failure::UnknownOperation => "UnknownOperationException",
            Failure::Serialization => "SerializationException",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Failure::Server => StatusCode::INTERNAL_SERVER_ERROR,
            Failure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Failure::InvalidParameter => "ecs-sim: injected invalid parameter",
            Failure::Server => "ecs-sim: injected server error",
            Failure::Throttling => "Rate exceeded",
            Failure::Unavailable => "ecs-sim: injected service unavailable",
            Failure::UnknownOperation => "ecs-sim: unknown or missing X-Amz-Target operation",
            Failure::Serialization => "ecs-sim: request body is not a JSON object",
        }
    }

    pub(super) fn from_action(action: Action) -> Option<Failure> {
        match action {
            Action::InvalidParameter => Some(Failure::InvalidParameter),
            Action::ServerError => Some(Failure::Server),
            Action::Throttle => Some(Failure::Throttling),
            Action::Unavailable => Some(Failure::Unavailable),
            Action::Hold => None,
        }
    }
}

/// The call key: body `task`, else `attachments[0].attachmentArn`, else "".
fn key_of(body: &Value) -> String {
    body.get("task")
        .and_then(Value::as_str)
        .or_else(|| {
            body.pointer("/attachments/0/attachmentArn")
                .and_then(Value::as_str)
        })
        .unwrap_or("")
        .to_string()
}

fn aws_response(failure: Option<Failure>) -> Response {
    let content_type = (header::CONTENT_TYPE, HeaderValue::from_static(AMZ_JSON));
    match failure {
        None => (
            StatusCode::OK,
            [content_type],
            json!({"acknowledgment": "ACK"}).to_string(),
        )
            .into_response(),
        Some(f) => (
            f.status(),
            [
                content_type,
                (
                    HeaderName::from_static("x-amzn-errortype"),
                    HeaderValue::from_static(f.code()),
                ),
            ],
            json!({"__type": f.code(), "message": f.message()}).to_string(),
        )
            .into_response(),
    }
}

/// `NAME` of the `app/NAME` token the AWS SDKs put in their user agent headers.
fn app_name(headers: &HeaderMap) -> String {
    ["x-amz-user-agent", "user-agent"]
        .iter()
        .filter_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .flat_map(str::split_whitespace)
        .find_map(|token| token.strip_prefix("app/"))
        .unwrap_or_default()
        .to_string()
}

/// `POST /`: one AWS JSON 1.1 call. The signature is not checked.
pub(super) async fn ecs_call(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let operation = target.strip_prefix(TARGET_PREFIX).unwrap_or(target);
    let known = target.starts_with(TARGET_PREFIX) && OPERATIONS.contains(&operation);
    // AWS JSON 1.1 treats an empty body as an empty input structure.
    let parsed: Result<Value, ()> = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(json!({}))
    } else {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(Value::is_object)
            .ok_or(())
    };
    let invalid = if !known {
        Some(Failure::UnknownOperation)
    } else if parsed.is_err() {
        Some(Failure::Serialization)
    } else {
        None
    };
    let (key, recorded) = match parsed {
        Ok(v) => (key_of(&v), v),
        Err(()) => (
            String::new(),
            Value::String(String::from_utf8_lossy(&body).into_owned()),
        ),
    };
    let client = app_name(&headers);
    let (mut call, decision) =
        app.sim
            .arrive(operation.to_string(), key, client, recorded, invalid);
    let failure = match decision {
        Decision::Answer(f) => f,
        Decision::Hold(released) => {
            let mut stop = app.stop.clone();
            tokio::select! {
                _ = released => {}
                // Err means the server is gone; either way the call must not stay blocked.
                _ = stop.wait_for(|s| *s) => {}
            }
            if let Some(id) = call.hold.take() {
                app.sim.unhold(id);
            }
            None
        }
    };
    let latency = app.sim.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    call.outcome = Some(failure.map_or(OUTCOME_OK, Failure::code));
    drop(call);
    aws_response(failure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::testing::ecs;
    use crate::sim::Sim;

    #[tokio::test]
    async fn success_shape_and_protocol_errors() {
        let (sim, base) = Sim::spawn_local().await.unwrap();
        let r = ecs(
            &base,
            "SubmitTaskStateChange",
            r#"{"task":"arn:t1","status":"RUNNING"}"#,
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.head.contains("content-type: application/x-amz-json-1.1"));
        assert_eq!(r.json(), json!({"acknowledgment": "ACK"}));

        let att = r#"{"attachments":[{"attachmentArn":"arn:att","status":"ATTACHED"}]}"#;
        assert_eq!(
            ecs(&base, "SubmitAttachmentStateChanges", att).await.status,
            200
        );

        let r = ecs(&base, "DescribeTasks", "{}").await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["__type"], "UnknownOperationException");
        let r = ecs(&base, "SubmitContainerStateChange", "{nope").await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["__type"], "SerializationException");
        assert!(r.head.contains("x-amzn-errortype: serializationexception"));

        let calls = sim.calls();
        assert_eq!(calls.len(), 4);
        assert_eq!(calls[0].seq, 0);
        assert_eq!(calls[0].operation, "SubmitTaskStateChange");
        assert_eq!(calls[0].key, "arn:t1");
        assert_eq!(calls[0].body["status"], "RUNNING");
        assert_eq!(calls[0].outcome.as_deref(), Some("ok"));
        assert!(calls[0].finished_at_ms >= Some(calls[0].received_at_ms));
        assert_eq!(calls[1].key, "arn:att");
        assert_eq!(
            calls[2].outcome.as_deref(),
            Some("UnknownOperationException")
        );
        assert_eq!(calls[3].body, json!("{nope"));
        let s = sim.stats();
        assert_eq!((s.calls, s.ok, s.errors, s.in_flight), (4, 2, 2, 0));
    }
}
