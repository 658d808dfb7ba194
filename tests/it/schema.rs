//! The JSON Schema producers use agrees with the examples, and with the worker's own decoder.

use std::path::Path;

use ecs_state_relay::relay::wire;
use serde_json::Value;

fn load(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("readable")).expect("JSON")
}

fn examples(dir: &str) -> Vec<(String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&root)
        .expect("examples dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                load(&p),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn validator() -> jsonschema::Validator {
    let schema = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/state-change.v1.json"));
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

fn routing_key(v: &Value) -> String {
    v.get("taskArn")
        .or_else(|| v.get("attachmentArn"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn valid_examples_pass_the_schema_and_the_decoder() {
    let validator = validator();
    let valid = examples("examples");
    assert!(valid.len() >= 8, "one example per kind");
    for (name, v) in &valid {
        let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
        wire::decode(v.to_string().as_bytes(), &routing_key(v))
            .unwrap_or_else(|r| panic!("{name}: {r}"));
    }
}

#[test]
fn invalid_examples_fail_the_schema_and_the_decoder() {
    let validator = validator();
    let invalid = examples("examples/invalid");
    assert!(!invalid.is_empty());
    for (name, v) in &invalid {
        assert!(!validator.is_valid(v), "{name} should fail the schema");
        assert!(
            wire::decode(v.to_string().as_bytes(), &routing_key(v)).is_err(),
            "{name} should be rejected"
        );
    }
}
