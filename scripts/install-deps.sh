#!/usr/bin/env bash
# Installs what the demo and the test suite need on a fresh machine, skipping what is there:
#   - a PostgreSQL server (Debian's postgresql package) when no server binaries are found;
#   - a Java 17 JDK and Maven (Debian's openjdk-17-jdk-headless, maven) when absent, and Apache
#     Kafka's jars from Maven Central into ~/.cache/outbox-relay (scripts/kafka.sh fetch, about
#     45 MB, seconds); a JDK rather than a runtime, because tests/java_consumer.rs runs a Java
#     source file (Java's source launcher compiles it);
#   - OpenSSL's headers and pkg-config (Debian's libssl-dev, pkg-config), which librdkafka's TLS
#     and SASL and the PostgreSQL TLS connector build against;
#   - cargo-nextest, the test runner.
set -euo pipefail

say() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
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
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

if ! pkg-config --exists openssl 2>/dev/null; then
    say "installing OpenSSL's development files (Debian packages libssl-dev, pkg-config)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config >/dev/null
fi

if ! command -v javac >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    say "installing a Java JDK and Maven (Debian packages openjdk-17-jdk-headless, maven) for Apache Kafka"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless maven >/dev/null
fi
"$(dirname "$0")/kafka.sh" fetch >/dev/null

if ! cargo nextest --version >/dev/null 2>&1; then
    say "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
