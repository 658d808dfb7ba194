#!/usr/bin/env bash
# The project's one test command: formatting, clippy, then every unit and integration test
# against the real local RabbitMQ and Redis (started, or installed, by scripts/services.sh).
# Extra arguments go to the test runner, e.g. `scripts/test.sh schema` or `scripts/test.sh -E 'test(rejects)'`.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "test.sh: $*" >&2; }

# The integration tests talk to RabbitMQ and Redis on 127.0.0.1.
bash scripts/services.sh --with-test-tools

# nextest runs test binaries in parallel processes and prints one clear summary; install it if
# the machine lacks it, and fall back to `cargo test` if that fails.
runner=nextest
if ! cargo nextest --version >/dev/null 2>&1; then
  log "cargo-nextest not found; installing it"
  if ! cargo install cargo-nextest --locked; then
    log "could not install cargo-nextest; falling back to cargo test"
    runner=cargo-test
  fi
fi

# Fail fast on style before spending time on the test build.
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --all-targets -- -D warnings

# The AWS SDK must never look for real credentials or an instance metadata service: the tests
# point it at local fakes.
export AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true
export RUST_LOG="${RUST_LOG:-warn}"

# The timing tests (the seeded nemesis runs, the fair-share bounds, the Sentinel fixture's own
# failover timings) measure latency, throughput or failover times on two cores: they run after
# the others, one at a time, with the machine to themselves. Extra arguments select tests in one
# run instead.
timing='test(/^nemesis::/) | test(/^fairness::/) | test(/^ha_fixture::/)'
if [ "$runner" = nextest ] && [ $# -gt 0 ]; then
  log "cargo nextest run $*"
  cargo nextest run --no-fail-fast "$@"
elif [ "$runner" = nextest ]; then
  log "cargo nextest run (all but the timing tests)"
  status=0
  cargo nextest run --no-fail-fast -E "not ($timing)" || status=$?
  log "cargo nextest run (the timing tests, one at a time)"
  cargo nextest run --no-fail-fast -j 1 -E "$timing" || status=$?
  exit "$status"
else
  log "cargo test"
  cargo test --no-fail-fast "$@"
fi
