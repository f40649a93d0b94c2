#!/usr/bin/env bash
# Runs the whole test suite. The integration tests start their own PostgreSQL and tansu broker
# on free loopback ports; this script first installs them if this machine lacks them.
# Extra arguments go to cargo nextest (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The inbox test runs the example consumer binary, which `nextest --all-targets` does not link.
cargo build --examples
# failpoints compiles in the fault-injection points the crash tests use.
cargo nextest run --all-targets --features failpoints --no-fail-fast "$@"
