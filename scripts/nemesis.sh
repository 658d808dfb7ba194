#!/usr/bin/env bash
# The long nemesis run: every fault at once for --seconds (default 600) from --seed (default: a
# random seed, printed, so the schedule can be replayed), then heal, drain and check what ECS
# received. The test command runs the same nemesis for 30 s on three fixed seeds.
#   scripts/nemesis.sh [--seconds 600] [--seed N]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600
seed=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    *) echo "usage: $0 [--seconds N] [--seed N]" >&2; exit 2 ;;
  esac
done

bash scripts/services.sh
export AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true
export RUST_LOG="${RUST_LOG:-warn}"
export RELAY_NEMESIS_SECONDS="$seconds"
if [ -n "$seed" ]; then
  export RELAY_NEMESIS_SEED="$seed"
fi
exec cargo nextest run --test nemesis --run-ignored ignored-only --no-capture nemesis_long
