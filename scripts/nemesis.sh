#!/usr/bin/env bash
# The long nemesis run: every fault at once for --seconds (default 600) from --seed (default: a
# random seed, printed, so the schedule can be replayed), then heal, drain and check what ECS
# received. It runs against a private HA setup that the test starts on free loopback ports (a
# Redis primary with two replicas under three Sentinels, RELAY_REDIS_MIN_REPLICAS=1, and a
# three-node RabbitMQ cluster) and adds Redis primary kills (Sentinel failover) and RabbitMQ node
# kills to the faults. The test command runs the nemesis for 30 s on four fixed seeds against
# the shared local Redis and RabbitMQ.
# --min-replicas N sets the HA workers' RELAY_REDIS_MIN_REPLICAS (default 1; 2 = both replicas).
# --local runs against the shared local Redis and RabbitMQ instead, as the test command's seeds do
# (a seed then draws the same schedule as there: replay a test-command failure with it).
#   scripts/nemesis.sh [--seconds 600] [--seed N] [--min-replicas N] [--local]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600
seed=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --local) export RELAY_NEMESIS_LOCAL=1; shift ;;
    --min-replicas) export RELAY_NEMESIS_MIN_REPLICAS=$2; shift 2 ;;
    *) echo "usage: $0 [--seconds N] [--seed N] [--min-replicas N] [--local]" >&2; exit 2 ;;
  esac
done

bash scripts/services.sh
export AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true
export RUST_LOG="${RUST_LOG:-warn}"
export RELAY_NEMESIS_SECONDS="$seconds"
if [ -n "$seed" ]; then
  export RELAY_NEMESIS_SEED="$seed"
fi
exec cargo nextest run --test it --run-ignored ignored-only --no-capture nemesis::nemesis_long
