#!/usr/bin/env bash
# Debezium's PostgreSQL connector with its outbox EventRouter on Kafka Connect standalone, from
# Maven Central: the relay users would pick instead of ours, run beside it by the benchmark
# (benches/relay/debezium.rs).
#
#   scripts/debezium.sh fetch               resolve Kafka Connect's runtime and Debezium's
#                                           connector (with their dependencies) into the cache
#                                           once (Maven); prints the cache directory
#   scripts/debezium.sh cached              exit 0 (printing the directory) if they are cached,
#                                           1 if fetch still has work to do
#   scripts/debezium.sh run DIR [opts]      write a worker's and a connector's configuration
#                                           into DIR and run Connect standalone in the
#                                           foreground (exec: the caller's process becomes the
#                                           JVM, so signals reach it)
#   scripts/debezium.sh start DIR [opts]    the same in the background (its pid in DIR/pid,
#                                           its log DIR/connect.log); returns once the JVM
#                                           runs, not once it streams ("Processing messages"
#                                           in the log)
#   scripts/debezium.sh stop DIR            stop it (SIGTERM, then SIGKILL after 30 s); the
#                                           replication slot stays, so a later start resumes
#   scripts/debezium.sh teardown DIR        stop it, then drop its replication slot and
#                                           publication from the database
#
# run/start options (--brokers, --database, --table and --slot required):
#   --brokers HOST:PORT,...    the Apache Kafka cluster
#   --database URL             postgres://user@host:port/dbname (a superuser or a replication
#                              role); the server must run with wal_level=logical
#   --table SCHEMA.TABLE       the outbox table, in Debezium's layout (id uuid, aggregatetype,
#                              aggregateid, type, payload)
#   --slot NAME                the replication slot (created on first start, kept after stop)
#   --poll-interval-ms MS      how often the connector hands WAL changes to Connect (Debezium's
#                              default 500)
#   --connector-property K=V   add or override a property of the connector (repeatable): the
#                              EventRouter's as transforms.outbox.*, say
#                              transforms.outbox.table.expand.json.payload=true, or converters
#                              of the connector's own (key.converter=..., with
#                              key.converter.schemas.enable=false)
#   --worker-property K=V      add or override a property of the Connect worker (repeatable)
#
# The properties given are appended to their file after the defaults described below, and a
# Java properties file keeps the last line of a key: a property given overrides a default, and
# of one given twice the last wins. Backslashes are kept as written (doubled in the file).
#
# The connector streams changes from its slot and never snapshots existing rows
# (snapshot.mode=no_data): rows written while it is stopped are read from the slot when it
# starts again, as after an outage. Records: topic the aggregatetype itself
# (route.topic.replacement=${routedByValue}, where Debezium's default prefixes it with
# "outbox.event.", so a benchmark's row names its topic as ours do), key the aggregateid,
# value the payload's text as stored (StringConverter, table.expand.json.payload=false),
# header `id` the row's id.
#
# Environment: DEBEZIUM_VERSION, CONNECT_VERSION (pinned below), OUTBOX_KAFKA_CACHE (default
# ~/.cache/outbox-relay), CONNECT_HEAP (default -Xms512m -Xmx2g: the connector buffers a
# backlog's changes in its queue; this machine has 24 GiB beside PostgreSQL and Kafka), JAVA
# (default java on the PATH). Startup takes 25-45 s on 2 cores.
set -euo pipefail

DEBEZIUM_VERSION="${DEBEZIUM_VERSION:-3.6.1.Final}"
CONNECT_VERSION="${CONNECT_VERSION:-4.1.1}"
LOG4J_VERSION=2.24.3
CACHE="${OUTBOX_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}/debezium-$DEBEZIUM_VERSION"
# Connect's own classpath, and the plugin folder (plugin.path) holding Debezium's connector in
# a folder of its own, as Connect isolates each plugin's class loader.
RUNTIME="$CACHE/connect-$CONNECT_VERSION"
PLUGINS="$CACHE/plugins"
JAVA="${JAVA:-java}"

die() { printf 'debezium.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '==> %s\n' "$*" >&2; }
# shellcheck source=scripts/java-jars.sh
. "$(dirname "${BASH_SOURCE[0]}")/java-jars.sh"

fetch() {
    if [ -f "$CACHE/.complete" ]; then
        printf '%s\n' "$CACHE"
        return
    fi
    need_java "Kafka Connect $CONNECT_VERSION"
    need_maven "Kafka Connect's and Debezium's jars"
    say "fetching Kafka Connect $CONNECT_VERSION and Debezium $DEBEZIUM_VERSION's PostgreSQL connector from Maven Central into $CACHE"
    rm -rf "$CACHE"
    # Connect logs through slf4j 1.x (kafka-clients' API); log4j-slf4j-impl binds it to log4j2.
    maven_copy_dependencies "Kafka Connect $CONNECT_VERSION" "$RUNTIME" "$(
        maven_dependency org.apache.kafka connect-runtime "$CONNECT_VERSION"
        maven_dependency org.apache.kafka connect-json "$CONNECT_VERSION"
        maven_dependency org.apache.logging.log4j log4j-slf4j-impl "$LOG4J_VERSION"
    )"
    maven_copy_dependencies "Debezium $DEBEZIUM_VERSION's PostgreSQL connector" "$PLUGINS/debezium-connector-postgres" "$(
        maven_dependency io.debezium debezium-connector-postgres "$DEBEZIUM_VERSION"
    )"
    # The plugin must not carry its own copy of the API Connect provides (Connect loads the
    # plugin's classes first, and two copies of an interface do not match).
    rm -f "$PLUGINS"/debezium-connector-postgres/{connect-api,kafka-clients,slf4j-api}-*.jar
    touch "$CACHE/.complete"
    printf '%s\n' "$CACHE"
}

# Writes DIR/worker.properties, DIR/connector.properties and DIR/log4j2.properties.
configure() {
    local dir=$1
    shift
    local brokers="" database="" table="" slot="" poll_ms=500
    local connector_properties=() worker_properties=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --brokers) brokers=$2; shift 2 ;;
            --database) database=$2; shift 2 ;;
            --table) table=$2; shift 2 ;;
            --slot) slot=$2; shift 2 ;;
            --poll-interval-ms) poll_ms=$2; shift 2 ;;
            --connector-property) connector_properties+=("$(property "$1" "${2-}")"); shift 2 ;;
            --worker-property) worker_properties+=("$(property "$1" "${2-}")"); shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
    [ -n "$brokers" ] && [ -n "$database" ] && [ -n "$table" ] && [ -n "$slot" ] ||
        die "run and start need --brokers, --database, --table and --slot"
    [[ "$table" == *.* ]] || die "--table must be SCHEMA.TABLE, not $table"
    [ -f "$CACHE/.complete" ] || die "Debezium is not fetched yet: run scripts/debezium.sh fetch"
    need_java "Kafka Connect $CONNECT_VERSION"
    # postgres://user[:password]@host:port/dbname, as the benchmark's harness writes them.
    [[ "$database" =~ ^postgres(ql)?://([^:@/]+)(:([^@/]*))?@([^:/]+):([0-9]+)/([^?]+) ]] ||
        die "--database must be postgres://user[:password]@host:port/dbname, not $database"
    local user=${BASH_REMATCH[2]} password=${BASH_REMATCH[4]} host=${BASH_REMATCH[5]}
    local port=${BASH_REMATCH[6]} dbname=${BASH_REMATCH[7]}
    mkdir -p "$dir"
    cat >"$dir/worker.properties" <<EOF
bootstrap.servers=$brokers
plugin.path=$PLUGINS
offset.storage.file.filename=$dir/offsets
offset.flush.interval.ms=1000
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
# Connect's REST API on a free port: two workers on one machine must not collide on 8083.
listeners=http://127.0.0.1:$(free_port)
EOF
    [ ${#worker_properties[@]} -eq 0 ] || printf '%s\n' "${worker_properties[@]}" >>"$dir/worker.properties"
    cat >"$dir/connector.properties" <<EOF
name=outbox-$slot
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
database.hostname=$host
database.port=$port
database.user=$user
database.password=$password
database.dbname=$dbname
topic.prefix=$slot
slot.name=$slot
publication.name=$slot
publication.autocreate.mode=filtered
table.include.list=$table
snapshot.mode=no_data
poll.interval.ms=$poll_ms
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
transforms.outbox.table.expand.json.payload=false
transforms.outbox.route.topic.replacement=\${routedByValue}
EOF
    [ ${#connector_properties[@]} -eq 0 ] || printf '%s\n' "${connector_properties[@]}" >>"$dir/connector.properties"
    cat >"$dir/log4j2.properties" <<'EOF'
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
EOF
    echo "$database" >"$dir/database"
    echo "$slot" >"$dir/slot"
}

# OPTION's KEY=VALUE as a properties line. Java reads a backslash as an escape, so each is
# doubled and the value is read as written; a line break would end the property.
property() {
    local option=$1 pair=$2
    [[ "$pair" == ?*=* ]] || die "$option takes KEY=VALUE, not '$pair'"
    [[ "$pair" != *$'\n'* ]] || die "$option $pair: a property is one line"
    printf '%s\n' "${pair//\\/\\\\}"
}

run() {
    local dir=$1
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    shift
    configure "$dir" "$@"
    # shellcheck disable=SC2086 # CONNECT_HEAP is a list of JVM options
    exec "$JAVA" ${CONNECT_HEAP:--Xms512m -Xmx2g} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$RUNTIME/*" org.apache.kafka.connect.cli.ConnectStandalone \
        "$dir/worker.properties" "$dir/connector.properties"
}

start() {
    local dir=$1
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    shift
    [ ! -f "$dir/pid" ] || ! kill -0 "$(cat "$dir/pid")" 2>/dev/null ||
        die "Connect already runs from $dir (pid $(cat "$dir/pid"))"
    # Check the options here, where the error reaches the caller, not only the log.
    configure "$dir" "$@"
    nohup "$0" run "$dir" "$@" >"$dir/connect.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    cat "$dir/pid"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop() {
    local dir=$1 pid
    [ -f "$dir/pid" ] || return 0
    pid=$(cat "$dir/pid")
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    rm -f "$dir/pid"
}

teardown() {
    local dir=$1
    stop "$dir"
    [ -f "$dir/database" ] || return 0
    local database slot
    database=$(cat "$dir/database")
    slot=$(cat "$dir/slot")
    local psql
    psql=$(command -v psql || echo "$(pg_config --bindir)/psql")
    # A slot keeps every WAL segment from its position on: one left behind fills the disk.
    "$psql" "$database" -X -q -o /dev/null -v ON_ERROR_STOP=1 -v slot="$slot" <<'EOF' ||
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = :'slot';
DROP PUBLICATION IF EXISTS :"slot";
EOF
        die "could not drop replication slot and publication $(cat "$dir/slot") from $database"
    rm -f "$dir/database" "$dir/slot"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    fetch) fetch ;;
    cached) [ -f "$CACHE/.complete" ] && printf '%s\n' "$CACHE" ;;
    run) [ $# -ge 1 ] || die "usage: debezium.sh run DIR --brokers B --database URL --table S.T --slot NAME [--poll-interval-ms MS] [--connector-property K=V]... [--worker-property K=V]..."; run "$@" ;;
    start) [ $# -ge 1 ] || die "usage: debezium.sh start DIR --brokers B --database URL --table S.T --slot NAME [--poll-interval-ms MS] [--connector-property K=V]... [--worker-property K=V]..."; start "$@" ;;
    stop) [ $# -eq 1 ] || die "usage: debezium.sh stop DIR"; stop "$1" ;;
    teardown) [ $# -eq 1 ] || die "usage: debezium.sh teardown DIR"; teardown "$1" ;;
    *) sed -n '2,55s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
