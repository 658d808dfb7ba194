#!/usr/bin/env bash
# The demo: local RabbitMQ and Redis (started or installed if needed), ecs-sim and one worker,
# then a realistic fleet of task lifecycles published and followed to a summary.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
cargo build --quiet --bins

export RELAY_EXCHANGE="${RELAY_EXCHANGE:-demo.state-changes}"
export RELAY_METRICS_ADDR="${RELAY_METRICS_ADDR:-127.0.0.1:9464}"
export RELAY_DRAIN_MIN_MS=1000 RELAY_DRAIN_MAX_MS=3000 RELAY_SHARDS="${RELAY_SHARDS:-16}"
export AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_EC2_METADATA_DISABLED=true
export RUST_LOG="${RUST_LOG:-info}"
LOG_DIR=target/demo
mkdir -p "$LOG_DIR"
SIM_ADDR=127.0.0.1:4566
export AWS_ENDPOINT_URL_ECS="http://$SIM_ADDR"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

./target/debug/ecs-sim --listen "$SIM_ADDR" --latency-ms 20 >"$LOG_DIR/ecs-sim.log" 2>&1 &
pids+=($!)
# The demo publishes as the broker's guest user, which may report for every demo cluster.
# The demo cluster's agent: a broker user of its own with a producer's permissions (publish to
# the exchange, declare and read nothing), and the rules that let each agent report for its own
# cluster only (docs/security.md). Removed when the demo ends.
AGENT=demo-agent-demo
AGENT_PW=$(head -c 18 /dev/urandom | base64 | tr -dc 'a-zA-Z0-9')
rabbitmqctl -q add_user "$AGENT" "$AGENT_PW" >/dev/null 2>&1 || rabbitmqctl -q change_password "$AGENT" "$AGENT_PW" >/dev/null
rabbitmqctl -q set_permissions -p / "$AGENT" '^$' "^${RELAY_EXCHANGE//./\\.}\$" '^$' >/dev/null
trap 'cleanup; rabbitmqctl -q delete_user "$AGENT" >/dev/null 2>&1 || true' EXIT
echo '{"demo-agent-{cluster}": ["{cluster}"]}' >"$LOG_DIR/producer-acl.json"
RELAY_PRODUCER_ACL="$LOG_DIR/producer-acl.json" ./target/debug/ecs-state-relay worker >"$LOG_DIR/worker.log" 2>&1 &
pids+=($!)
echo "demo: ecs-sim and a worker started (logs in $LOG_DIR/)"

RUST_LOG=warn ./target/debug/ecs-state-relay demo --sim-url "http://$SIM_ADDR" --worker-url "http://$RELAY_METRICS_ADDR" --tasks "${DEMO_TASKS:-300}" --capacity "${DEMO_CAPACITY:-0}" \
  --producer-url "amqp://$AGENT:$AGENT_PW@127.0.0.1:5672/%2f"
