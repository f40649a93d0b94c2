#!/usr/bin/env bash
# Runs outbox-relay end to end on this machine: starts a PostgreSQL server and an Apache Kafka
# node (scripts/kafka.sh) on free loopback ports, migrates the outbox table, inserts sample
# events, relays them to Kafka, shows them consumed, then an operator's loop (a poison row,
# `status`, the fix, `retry`, `audit`), and stops everything again. The relay's log
# is kept at the path printed at the end. Each step waits for the condition it shows (a row
# published, a failure reported) and fails, saying which, if it does not come in time.
set -euo pipefail
cd "$(dirname "$0")/.."

# Only what the demo runs: no JDK, no test runner.
scripts/install-deps.sh demo
# The first build compiles the relay and librdkafka: minutes, with cargo's progress shown.
printf '==> %s\n' "compiling the relay and two small examples (the first time takes a few minutes)"
cargo build --bin outbox-relay --example tail --example create_topic
target_dir=${CARGO_TARGET_DIR:-target}
relay_bin=$target_dir/debug/outbox-relay
tail_bin=$target_dir/debug/examples/tail
create_topic_bin=$target_dir/debug/examples/create_topic
pg_bindir=$(pg_config --bindir 2>/dev/null || true)
if [ ! -x "$pg_bindir/postgres" ]; then
    pg_bindir=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/postgres | sort -V | tail -1)")
fi

say() { printf '\n==> %s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# PostgreSQL refuses to run as root; as root, run it as the postgres OS user.
as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

work=$(mktemp -d /tmp/outbox-relay-demo.XXXXXX)
chmod 755 "$work"
relay_pid=""
kept_log=/tmp/outbox-relay-demo-relay.log
cleanup() {
    [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null || true
    scripts/kafka.sh stop "$work/kafka" >/dev/null 2>&1 || true
    as_postgres "$pg_bindir/pg_ctl" -D "$work/pg" -m fast stop >/dev/null 2>&1 || true
    [ -f "$work/relay.log" ] && cp "$work/relay.log" "$kept_log" && echo "the relay's log is kept at $kept_log"
    rm -rf "$work"
}
trap cleanup EXIT

pg_port=$(free_port)
metrics_port=$(free_port)

say "starting PostgreSQL on 127.0.0.1:$pg_port"
mkdir "$work/pg"
[ "$(id -u)" -eq 0 ] && chown postgres "$work/pg"
as_postgres "$pg_bindir/initdb" -D "$work/pg" -A trust -U postgres -E UTF8 --locale=C >/dev/null
as_postgres "$pg_bindir/pg_ctl" -D "$work/pg" -l "$work/pg/server.log" -w \
    -o "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" start >/dev/null

say "starting Apache Kafka (one KRaft node, scripts/kafka.sh)"
brokers=$(scripts/kafka.sh start "$work/kafka")
echo "listening on $brokers"
"$create_topic_bin" "$brokers" orders 3

export OUTBOX_RELAY_DATABASE__URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export OUTBOX_RELAY_KAFKA__BROKERS="$brokers"
export OUTBOX_RELAY_METRICS__LISTEN="127.0.0.1:$metrics_port"
export OUTBOX_RELAY_RELAY__STATS_INTERVAL=1s
psql_demo() { psql -X -q -v ON_ERROR_STOP=1 "$OUTBOX_RELAY_DATABASE__URL" "$@"; }
# wait_for WHAT SECONDS COMMAND...: runs COMMAND every 0.1 s until it succeeds; after SECONDS,
# stops the demo saying what did not happen.
wait_for() {
    local what=$1 seconds=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do
        "$@" >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "demo: gave up after ${seconds}s waiting for $what (the relay's log: $work/relay.log)" >&2
    exit 1
}
all_published() { [ "$(psql_demo -At -c "SELECT count(*) FROM outbox WHERE published_at IS NULL")" -eq 0 ]; }
metric_is() { curl -s "http://127.0.0.1:$metrics_port/metrics" | grep -q "^$1 $2\$"; }
failing_reported() {
    local failing
    failing=$(curl -s "http://127.0.0.1:$metrics_port/metrics" | sed -n 's/^outbox_relay_failing_rows //p')
    [ "${failing:-0}" != "0" ] && grep -q "a row failed with an error of its own" "$work/relay.log"
}

say "outbox-relay migrate"
"$relay_bin" migrate

say "the application writes events in its own transactions"
psql_demo <<'SQL'
BEGIN;
-- ... the business change would be here ...
INSERT INTO outbox (topic, key, payload, headers) VALUES
  ('orders', 'order-1', '{"type": "OrderPlaced", "total": 42.50}', '{"type": "OrderPlaced"}'),
  ('orders', 'order-2', '{"type": "OrderPlaced", "total": 7.00}',  '{"type": "OrderPlaced"}');
COMMIT;
BEGIN;
INSERT INTO outbox (topic, key, payload, headers) VALUES
  ('orders', 'order-1', '{"type": "OrderPaid"}',    '{"type": "OrderPaid"}'),
  ('orders', 'order-1', '{"type": "OrderShipped"}', '{"type": "OrderShipped"}'),
  ('orders', 'order-2', '{"type": "OrderCancelled"}', '{"type": "OrderCancelled"}'),
  ('orders', 'order-2', NULL, NULL);  -- a tombstone
COMMIT;
SELECT id, key, payload, published_at FROM outbox ORDER BY id;
SQL

say "outbox-relay run"
"$relay_bin" run >"$work/relay.log" 2>&1 &
relay_pid=$!
wait_for "every row to be published" 60 all_published
psql_demo -c "SELECT id, key, event_id, published_at FROM outbox ORDER BY id"

say "consumed from Kafka (topic orders): one partition per key, in order, with the event_id header"
timeout 60 "$tail_bin" "$brokers" orders 6

say "a few of the relay's metrics (http://127.0.0.1:$metrics_port/metrics)"
wait_for "the pending-rows gauge to reach 0" 30 metric_is outbox_relay_pending_rows 0
curl -s "http://127.0.0.1:$metrics_port/metrics" | grep -E '^outbox_relay_(published_total|pending_rows|oldest_pending_age_seconds|batch_duration_seconds_count)'

say "the operator's loop: an event for a topic nobody created (a poison row)"
poison_id=$(psql_demo -At -c "INSERT INTO outbox (topic, key, payload) VALUES ('payments', 'order-1', '{\"type\": \"PaymentCaptured\"}') RETURNING id")
wait_for "the relay to report the poison row" 60 failing_reported
echo "the relay reported it at its first failure (its log):"
grep "a row failed with an error of its own" "$work/relay.log" | tail -n 1 | cut -c1-400
echo "/readyz: $(curl -s "http://127.0.0.1:$metrics_port/readyz")"

say "outbox-relay status"
"$relay_bin" status

say "the fix: create the topic, then outbox-relay retry --id $poison_id (no need to wait out the backoff)"
"$create_topic_bin" "$brokers" payments 1
# The relay may have retried the row on its own by now: retry then says it is already published.
"$relay_bin" retry --id "$poison_id"
wait_for "row $poison_id to be published" 60 all_published
psql_demo -c "SELECT id, topic, key, attempts, published_at FROM outbox WHERE id = $poison_id"

say "outbox-relay audit --topic orders: the table against what the topic holds"
"$relay_bin" audit --topic orders

say "SIGTERM: the relay finishes its batch and exits"
kill -TERM "$relay_pid"
status=0
wait "$relay_pid" || status=$?
relay_pid=""
echo "outbox-relay exited with status $status"
exit "$status"
