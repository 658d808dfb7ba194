#!/usr/bin/env bash
# Makes sure the local services the tests and the demo talk to are up:
#   Redis 7   on 127.0.0.1:6379 (nothing kept on disk)
#   RabbitMQ  on 127.0.0.1:5672 (guest/guest) with the consistent-hash exchange,
#             management and prometheus plugins enabled and running.
# Idempotent: a running service is left alone; a stopped one is started; a missing one is
# installed from Debian's packages. Meant to run as root on Debian 12.
set -euo pipefail

log() { echo "services: $*" >&2; }
die() { echo "services: ERROR: $*" >&2; exit 1; }

# Run apt-get update at most once per run, and only when something has to be installed.
APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || die "apt-get update failed"
    APT_UPDATED=1
  fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 || die "apt-get install $* failed"
}

# wait_until SECONDS WHAT CMD...: polls CMD (quietly) until it succeeds or the deadline passes.
wait_until() {
  local secs=$1 what=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "timed out after ${secs}s waiting for $what"
    fi
    sleep 0.2
  done
}

# True when something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp, no extra tools).
port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# Tools only the tests use (`--with-test-tools`, given by scripts/test.sh; the demo needs none):
# openssl makes the TLS tests' certificates; promtool checks the alert rules and dashboard
# queries (tests/it/observability.rs) and comes with Debian's prometheus package, whose server we
# do not start.
# ---------------------------------------------------------------------------------------------
if [ "${1:-}" = "--with-test-tools" ]; then
  command -v openssl >/dev/null || apt_install openssl
  if ! command -v promtool >/dev/null; then
    apt_install --no-install-recommends prometheus
    systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true
  fi
fi

# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------
redis_ping() {
  [ "$(timeout 5 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]
}

# Already answering: nothing to do (also covers a Redis started by something else).
if command -v redis-cli >/dev/null && redis_ping; then
  log "redis up"
else
  # Fresh machine: the server (and redis-cli with it) comes from Debian's redis-server package.
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server
  fi
  # The package may have started its own instance during install (where services may start).
  if redis_ping; then
    log "redis up"
  else
    # The data and log dirs must exist; owned by redis where that user exists (as the package does).
    mkdir -p /var/lib/redis /var/log/redis
    if id redis >/dev/null 2>&1; then
      chown redis: /var/lib/redis /var/log/redis || true
    fi
    log "starting redis"
    # The same command the machine uses at boot: loopback only, no persistence.
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log >&2 || die "redis-server failed to start (see /var/log/redis/ci.log)"
    wait_until 30 "redis to answer PING on 127.0.0.1:6379" redis_ping
    log "redis up"
  fi
fi

# ---------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------
RABBIT_PLUGINS=(rabbitmq_consistent_hash_exchange rabbitmq_management rabbitmq_prometheus)

# The rabbit application on the node is fully booted (not just the Erlang VM).
rabbit_running() {
  timeout 20 rabbitmq-diagnostics -q check_running
}

# Fresh machine: install the broker (it pulls in Erlang).
if ! command -v rabbitmq-server >/dev/null; then
  apt_install rabbitmq-server
fi

# Stopped (or never started, e.g. where the package's install couldn't start it): start it detached.
if timeout 20 rabbitmqctl -q status >/dev/null 2>&1; then
  log "rabbitmq node up"
else
  log "starting rabbitmq"
  rabbitmq-server -detached >&2 || die "rabbitmq-server -detached failed (see /var/log/rabbitmq/)"
fi
wait_until 120 "rabbitmq to boot (see /var/log/rabbitmq/)" rabbit_running

# Plugins: the relay needs the consistent-hash exchange; management and prometheus are for
# operators and the demo. Enable (online) only those not already enabled, so a rerun is a no-op.
enabled="$(timeout 30 rabbitmq-plugins list -e -m 2>/dev/null || true)"
missing=()
for p in "${RABBIT_PLUGINS[@]}"; do
  grep -qx "$p" <<<"$enabled" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "enabling plugins: ${missing[*]}"
  timeout 120 rabbitmq-plugins -q enable "${missing[@]}" >&2 || die "rabbitmq-plugins enable ${missing[*]} failed"
fi
# --online asks the node itself, so this passes only once the plugins are actually running.
wait_until 60 "rabbitmq plugins to run: ${RABBIT_PLUGINS[*]}" \
  timeout 20 rabbitmq-plugins -q is_enabled "${RABBIT_PLUGINS[@]}" --online
log "rabbitmq plugins running: ${RABBIT_PLUGINS[*]}"

# The AMQP listener is the last thing clients need; check it from the client side.
wait_until 60 "rabbitmq to accept connections on 127.0.0.1:5672" port_open 5672
log "rabbitmq up"
