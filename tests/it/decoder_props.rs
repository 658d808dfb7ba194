//! Property tests of the message decoder: whatever the bytes, it returns a value or a reject
//! reason — never a panic — and a message past the size cap is refused before it is parsed.

use ecs_state_relay::relay::wire::{self, MAX_MESSAGE_BYTES};
use proptest::prelude::*;
use serde_json::{json, Value};

const ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/c/abc";

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "schemaVersion",
    "eventId",
    "type",
    "cluster",
    "taskArn",
    "occurredAt",
    "status",
    "reason",
    "containerName",
    "exitCode",
    "networkBindings",
    "managedAgentName",
    "taskStatus",
    "attachmentArn",
    "expiresAt",
    "attachmentType",
    "runtimeId",
    "pullStartedAt",
];

/// A valid message of some type with a few fields replaced by arbitrary JSON.
fn mutated_message() -> impl Strategy<Value = Value> {
    let kinds = prop_oneof![
        Just("task"),
        Just("container"),
        Just("managedAgent"),
        Just("taskAttachment"),
        Just("attachment")
    ];
    (kinds, prop::collection::vec((0..FIELDS.len(), any_json()), 0..4)).prop_map(|(kind, edits)| {
        let mut v = json!({"schemaVersion":1,"eventId":"e","type":kind,"cluster":"c","taskArn":ARN,
            "occurredAt":"2026-11-28T10:00:00Z","status":"RUNNING","containerName":"web","managedAgentName":"a",
            "attachmentArn":"arn:aws:ecs:us-east-1:123456789012:attachment/a","expiresAt":"2099-01-01T00:00:00Z","attachmentType":"eni"});
        for (field, value) in edits {
            v[FIELDS[field]] = value;
        }
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_or_reject_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(r) = wire::decode(&bytes, ARN) {
            prop_assert!(!r.code.is_empty() && !r.detail.is_empty());
        }
    }

    #[test]
    fn mutated_messages_decode_or_reject_with_a_reason(v in mutated_message()) {
        let key = v.get("attachmentArn").filter(|_| v["type"] == "attachment").or(v.get("taskArn"))
            .and_then(Value::as_str).unwrap_or(ARN).to_string();
        match wire::decode(v.to_string().as_bytes(), &key) {
            Ok(ev) => prop_assert!(!ev.stored.is_empty() && !ev.event_id.is_empty()),
            Err(r) => prop_assert!(!r.code.is_empty() && !r.detail.is_empty()),
        }
    }
}

#[test]
fn oversized_and_deeply_nested_input_is_refused_not_crashed() {
    let big = vec![b'['; MAX_MESSAGE_BYTES + 1];
    assert_eq!(wire::decode(&big, ARN).unwrap_err().code, "too_large");
    // Deep nesting within the size cap: the parser's recursion limit refuses it.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(
        wire::decode(deep.as_bytes(), ARN).unwrap_err().code,
        "not_json"
    );
    let mut many = json!({"schemaVersion":1,"eventId":"e","type":"container","cluster":"c","taskArn":ARN,
        "occurredAt":"2026-11-28T10:00:00Z","status":"RUNNING","containerName":"web"});
    many["networkBindings"] = Value::Array(vec![json!({"containerPort": 1}); 1001]);
    assert_eq!(
        wire::decode(many.to_string().as_bytes(), ARN)
            .unwrap_err()
            .code,
        "network_bindings"
    );
}
