#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL and Apache Kafka on free loopback ports.
# It first installs what this machine lacks (scripts/install-deps.sh test), then starts one Kafka
# node that the tests share (tests that stop or freeze a broker, or need a three-node cluster,
# start their own) and stops it at the end.
# Extra arguments go to cargo nextest (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh test
# The inbox test runs the example consumer binary, which `nextest --all-targets` does not link.
cargo build --examples

kafka_dir=$(mktemp -d -t outbox-relay-test-kafka.XXXXXX)
cleanup() {
    scripts/kafka.sh stop "$kafka_dir" || true
    rm -rf "$kafka_dir"
}
trap cleanup EXIT
OUTBOX_TEST_KAFKA_BROKERS=$(scripts/kafka.sh start "$kafka_dir")
export OUTBOX_TEST_KAFKA_BROKERS
echo "==> Apache Kafka shared by the tests at $OUTBOX_TEST_KAFKA_BROKERS (log: $kafka_dir/node-1/kafka.log)" >&2

# failpoints compiles in the fault-injection points the crash tests use.
cargo nextest run --all-targets --features failpoints --no-fail-fast "$@"
