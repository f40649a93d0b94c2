#!/usr/bin/env bash
# Installs what the demo or the test suite needs on a fresh machine, skipping what is there.
#
#   scripts/install-deps.sh demo    what scripts/demo.sh runs, nothing more
#   scripts/install-deps.sh test    what scripts/test.sh runs (the default)
#
# Both:
#   - a PostgreSQL server (Debian's postgresql package) when no server binaries are found;
#   - OpenSSL's headers and pkg-config (Debian's libssl-dev, pkg-config), which librdkafka's TLS
#     and SASL and the PostgreSQL TLS connector build against;
#   - Apache Kafka's jars from Maven Central into ~/.cache/outbox-relay (scripts/kafka.sh fetch,
#     about 45 MB, seconds), with Maven to fetch them when they are not cached yet.
# The demo needs only a Java runtime for Kafka (Debian's openjdk-17-jre-headless). The tests
# need more:
#   - a Java 17 JDK (openjdk-17-jdk-headless): tests/it/java_consumer.rs runs a Java source file,
#     which Java's source launcher compiles;
#   - Kafka Connect's and Debezium's PostgreSQL connector's jars from Maven Central into the
#     same cache (scripts/debezium.sh fetch, about 60 MB): tests/it/debezium_compare.rs checks
#     our records against Debezium's outbox EventRouter's;
#   - cargo-nextest, the test runner, built from source (about 11 minutes on 2 cores).
set -euo pipefail

for_what="${1:-test}"
case "$for_what" in
demo | test) ;;
*)
    echo "usage: scripts/install-deps.sh [demo|test]" >&2
    exit 2
    ;;
esac

say() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

have_postgres_server() {
    local bindir
    bindir=$(pg_config --bindir 2>/dev/null || true)
    if [ -n "$bindir" ] && [ -x "$bindir/postgres" ] && [ -x "$bindir/initdb" ]; then
        return 0
    fi
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

if ! have_postgres_server; then
    say "installing the PostgreSQL server (Debian package postgresql)"
    apt_install postgresql
fi

if ! pkg-config --exists openssl 2>/dev/null; then
    say "installing OpenSSL's development files (Debian packages libssl-dev, pkg-config)"
    apt_install libssl-dev pkg-config
fi

kafka_cached() { "$(dirname "$0")/kafka.sh" cached >/dev/null 2>&1; }
debezium_cached() { [ "$for_what" != test ] || "$(dirname "$0")/debezium.sh" cached >/dev/null 2>&1; }

if [ "$for_what" = test ]; then
    if ! command -v javac >/dev/null 2>&1; then
        say "installing a Java JDK (Debian package openjdk-17-jdk-headless) for Apache Kafka and the Java consumer test"
        apt_install openjdk-17-jdk-headless
    fi
elif ! command -v java >/dev/null 2>&1; then
    say "installing a Java runtime (Debian package openjdk-17-jre-headless) for Apache Kafka"
    apt_install openjdk-17-jre-headless
fi
if ! { kafka_cached && debezium_cached; } && ! command -v mvn >/dev/null 2>&1; then
    say "installing Maven (Debian package maven) to fetch Apache Kafka's (and Debezium's) jars"
    apt_install maven
fi
"$(dirname "$0")/kafka.sh" fetch >/dev/null
# After Kafka's, with the same Maven: the Debezium comparison test runs Debezium's connector on
# Kafka Connect, whose jars come from Maven Central too.
if [ "$for_what" = test ]; then
    "$(dirname "$0")/debezium.sh" fetch >/dev/null
fi

if [ "$for_what" = test ] && ! cargo nextest --version >/dev/null 2>&1; then
    say "installing cargo-nextest (built from source: about 11 minutes on 2 cores)"
    cargo install cargo-nextest --locked
fi
