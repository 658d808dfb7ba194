//! Deployment files, checked offline (there is no Docker engine or cluster here): the validators
//! of scripts/validate-deploy.sh, and the properties an operator relies on that a schema does
//! not check (non-root image, AOF, plugins by config, health checks and start order).

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn compose_prometheus_and_kubernetes_files_pass_their_validators() {
    let out = Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/validate-deploy.sh"))
        .output()
        .expect("validate-deploy.sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for rendered in ["base:", "overlays/dev:", "overlays/prod:"] {
        assert!(text.contains(rendered), "{rendered} not validated:\n{text}");
    }
}

#[test]
fn the_image_is_multi_stage_and_runs_as_non_root() {
    let docker = read("Dockerfile");
    assert!(docker.matches("\nFROM ").count() + usize::from(docker.starts_with("FROM ")) >= 2);
    assert!(docker.contains("--locked"), "builds from Cargo.lock");
    let user = docker
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "USER {user}"
    );
    assert!(
        docker.contains("debian:bookworm-slim"),
        "small runtime base"
    );
}

#[test]
fn compose_runs_the_whole_stack_with_health_checks_and_start_order() {
    let compose = read("docker-compose.yml");
    for service in [
        "rabbitmq:",
        "redis:",
        "redis-replica:",
        "sentinel-1:",
        "sentinel-2:",
        "sentinel-3:",
        "ecs-sim:",
        "worker-1:",
        "worker-2:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(
            compose.contains(&format!("\n  {service}")),
            "service {service} missing"
        );
    }
    assert!(
        compose.contains("--appendonly\", \"yes\""),
        "Redis keeps an AOF"
    );
    for needle in [
        "RELAY_REDIS_SENTINELS: sentinel-1:26379,sentinel-2:26379,sentinel-3:26379",
        "RELAY_REDIS_MIN_REPLICAS: \"1\"",
        "\"--replicaof\", \"redis\", \"6379\"",
        "\"--min-replicas-to-write\", \"1\"",
    ] {
        assert!(compose.contains(needle), "Redis HA shape: {needle} missing");
    }
    assert!(
        compose.contains("condition: service_healthy"),
        "workers wait for healthy services"
    );
    assert_eq!(
        compose.matches("healthcheck:").count(),
        3,
        "rabbitmq, redis and the workers"
    );
    let plugins = read("deploy/rabbitmq/enabled_plugins");
    for p in ["rabbitmq_consistent_hash_exchange", "rabbitmq_prometheus"] {
        assert!(plugins.contains(p), "{p} not enabled by config");
    }
    let prometheus = read("deploy/prometheus/prometheus.yml");
    for target in ["worker-1:9464", "worker-2:9464", "rabbitmq:15692"] {
        assert!(
            prometheus.contains(target),
            "Prometheus does not scrape {target}"
        );
    }
}

#[test]
fn the_deployment_is_hardened_and_probed() {
    let deployment = read("k8s/base/deployment.yaml");
    for needle in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "path: /healthz",
        "path: /readyz",
        "configMapRef:",
        "secretName: ecs-state-relay-credentials",
        "fieldPath: metadata.name",
    ] {
        assert!(deployment.contains(needle), "deployment lacks {needle}");
    }
    let config = read("k8s/base/configmap.yaml");
    assert!(
        !config.contains(":relay@") && !config.to_lowercase().contains("password:"),
        "no credentials in the ConfigMap"
    );
}
