#!/usr/bin/env bash
# Runs the benchmark (benches/relay.rs): starts PostgreSQL and Apache Kafka (scripts/kafka.sh) on free ports, measures the
# database and broker ceilings, the relay's drain rate at several backlogs, its latency at fixed
# insert rates, its CPU and memory, and a naive relay; prints a Markdown table and writes
# docs/bench/latest.json, docs/bench/latest.md and docs/bench/latency.png; last, the broker ceiling and
# the headline drain again on three Kafka nodes (RF 3, min.insync.replicas 2, acks=all). The
# `debezium` section runs Debezium's outbox connector on Kafka Connect beside the relay
# (scripts/debezium.sh fetches it from Maven Central once) and draws docs/bench/debezium.png;
# without Java, Maven or the jars, or with OUTBOX_BENCH_DEBEZIUM=off, it says so and the rest
# runs. About 11 minutes on 2 cores, Debezium's section included. `scripts/bench.sh --quick` runs small sizes (under a minute) as a smoke test;
# `--only SECTION,...` runs some sections and writes them to target/bench-partial.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
if [ "${OUTBOX_BENCH_DEBEZIUM:-on}" != off ] && ! scripts/debezium.sh fetch >/dev/null; then
    echo "==> Debezium's jars could not be fetched: the benchmark runs without Debezium" >&2
fi
out=docs/bench
for arg in "$@"; do
    # A quick run is a smoke test, and a partial run (--only) measures some sections: neither
    # replaces the published figures, which are one whole run.
    if [ "$arg" = "--quick" ]; then out=target/bench-quick; fi
    if [ "$arg" = "--only" ] && [ "$out" = docs/bench ]; then out=target/bench-partial; fi
done
# The relay runs as the release binary in its own process, so its CPU and memory are its own.
cargo build --release
cargo bench --bench relay -- --out "$out" "$@"
if ! python3 -c "import matplotlib" 2>/dev/null; then
    python3 -m pip install --quiet matplotlib
fi
python3 scripts/bench_plot.py "$out/latest.json" "$out/latency.png" "$out/debezium.png"
