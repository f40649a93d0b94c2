#!/usr/bin/env bash
# Apache Kafka from Maven Central, for the tests, the demo, the benchmark and CI.
#
#   scripts/kafka.sh fetch                  resolve the pinned Kafka and its runtime jars into the
#                                           cache once (Maven); prints the directory of jars
#   scripts/kafka.sh cached                 exit 0 (printing the directory) if they are cached,
#                                           1 if fetch still has work to do
#   scripts/kafka.sh prepare DIR [opts]     write each node's configuration and format its storage
#   scripts/kafka.sh run DIR I              run node I in the foreground (exec: the caller's
#                                           process becomes the JVM, so signals reach it)
#   scripts/kafka.sh start DIR [opts]       prepare (unless DIR is prepared), start every node in
#                                           the background, wait until each serves; prints the
#                                           bootstrap servers
#   scripts/kafka.sh stop DIR [I]           stop every node, or node I (SIGTERM, then SIGKILL
#                                           after 30 s)
#   scripts/kafka.sh kill DIR I             SIGKILL node I
#   scripts/kafka.sh restart DIR I          start node I again (after stop or kill)
#
# prepare/start options:
#   --nodes N          1 (default) or more; every node is both broker and KRaft controller, the
#                      controllers forming one static quorum
#   --ports P,C,...    each node's client and controller port (default: free ports)
#   --set KEY=VALUE    an extra broker property for every node (repeatable)
#
# Nodes with N >= 3 replicate: default replication factor N, min.insync.replicas 2. Topics are
# not created on first use (auto.create.topics.enable=false), as on a production cluster.
#
# Environment: KAFKA_VERSION (pinned below), OUTBOX_KAFKA_CACHE (default
# ~/.cache/outbox-relay), KAFKA_HEAP (default -Xms256m -Xmx512m, sized for 2 cores and a few
# nodes beside PostgreSQL), JAVA (default java on the PATH).
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
LOG4J_VERSION=2.24.3
CACHE="${OUTBOX_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}"
LIB="$CACHE/kafka-$KAFKA_VERSION/lib"
JAVA="${JAVA:-java}"

die() { printf 'kafka.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '==> %s\n' "$*" >&2; }
# shellcheck source=scripts/java-jars.sh
. "$(dirname "${BASH_SOURCE[0]}")/java-jars.sh"

fetch() {
    if [ -f "$LIB/.complete" ]; then
        printf '%s\n' "$LIB"
        return
    fi
    need_java "Apache Kafka $KAFKA_VERSION"
    need_maven "Apache Kafka's jars"
    say "fetching Apache Kafka $KAFKA_VERSION and its runtime dependencies from Maven Central into $LIB"
    # Kafka logs through slf4j 1.x; log4j-slf4j-impl binds it to the log4j2 Kafka already brings.
    maven_copy_dependencies "org.apache.kafka:kafka_2.13:$KAFKA_VERSION" "$LIB" "$(
        maven_dependency org.apache.kafka kafka_2.13 "$KAFKA_VERSION"
        maven_dependency org.apache.logging.log4j log4j-slf4j-impl "$LOG4J_VERSION"
    )"
    touch "$LIB/.complete"
    printf '%s\n' "$LIB"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

prepare() {
    local dir=$1
    shift
    local nodes=1 ports="" extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) nodes=$2; shift 2 ;;
            --ports) ports=$2; shift 2 ;;
            --set) extra+=("$2"); shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
    [ "$nodes" -ge 1 ] 2>/dev/null || die "--nodes must be a positive number, not $nodes"
    fetch >/dev/null
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)

    local -a client controller
    if [ -n "$ports" ]; then
        IFS=, read -r -a given <<<"$ports"
        [ "${#given[@]}" -eq $((2 * nodes)) ] || die "--ports needs $((2 * nodes)) ports (client,controller per node)"
        for ((i = 0; i < nodes; i++)); do
            client[i]=${given[2 * i]}
            controller[i]=${given[2 * i + 1]}
        done
    else
        for ((i = 0; i < nodes; i++)); do
            client[i]=$(free_port)
            controller[i]=$(free_port)
        done
    fi

    local voters="" bootstrap=""
    for ((i = 0; i < nodes; i++)); do
        voters+="${voters:+,}$((i + 1))@127.0.0.1:${controller[i]}"
        bootstrap+="${bootstrap:+,}127.0.0.1:${client[i]}"
    done
    local replicas=$((nodes < 3 ? nodes : 3)) min_isr=$((nodes < 3 ? 1 : 2))

    cat >"$dir/log4j2.properties" <<'EOF'
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.state.name = state.change.logger
logger.state.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
EOF

    local cluster_id
    cluster_id=$("$JAVA" -cp "$LIB/*" kafka.tools.StorageTool random-uuid | tail -n 1)
    for ((i = 0; i < nodes; i++)); do
        local node=$((i + 1)) node_dir="$dir/node-$((i + 1))"
        rm -rf "$node_dir"
        mkdir -p "$node_dir"
        {
            echo "process.roles=broker,controller"
            echo "node.id=$node"
            echo "listeners=PLAINTEXT://127.0.0.1:${client[i]},CONTROLLER://127.0.0.1:${controller[i]}"
            echo "advertised.listeners=PLAINTEXT://127.0.0.1:${client[i]}"
            echo "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
            echo "controller.listener.names=CONTROLLER"
            echo "inter.broker.listener.name=PLAINTEXT"
            echo "controller.quorum.voters=$voters"
            echo "log.dirs=$node_dir/data"
            echo "num.partitions=1"
            echo "default.replication.factor=$replicas"
            echo "min.insync.replicas=$min_isr"
            echo "offsets.topic.replication.factor=$replicas"
            echo "offsets.topic.num.partitions=5"
            echo "transaction.state.log.replication.factor=$replicas"
            echo "transaction.state.log.min.isr=$min_isr"
            echo "transaction.state.log.num.partitions=5"
            echo "share.coordinator.state.topic.replication.factor=$replicas"
            echo "share.coordinator.state.topic.min.isr=$min_isr"
            echo "auto.create.topics.enable=false"
            echo "group.initial.rebalance.delay.ms=0"
            for kv in "${extra[@]}"; do echo "$kv"; done
        } >"$node_dir/server.properties"
        "$JAVA" -cp "$LIB/*" kafka.tools.StorageTool format --ignore-formatted -t "$cluster_id" \
            -c "$node_dir/server.properties" >"$node_dir/format.log" 2>&1 ||
            { cat "$node_dir/format.log" >&2; die "formatting node $node's storage failed"; }
        echo "${client[i]}" >"$node_dir/port"
    done
    echo "$nodes" >"$dir/nodes"
    echo "$bootstrap" >"$dir/bootstrap"
}

node_dir() {
    local dir=$1 node=$2
    [ -f "$dir/node-$node/server.properties" ] || die "$dir has no node $node: run prepare first"
    printf '%s\n' "$dir/node-$node"
}

run() {
    local dir node_dir
    dir=$(cd "$1" && pwd)
    node_dir=$(node_dir "$dir" "$2")
    need_java "Apache Kafka $KAFKA_VERSION"
    # shellcheck disable=SC2086 # KAFKA_HEAP is a list of JVM options
    exec "$JAVA" ${KAFKA_HEAP:--Xms256m -Xmx512m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$LIB/*" kafka.Kafka "$node_dir/server.properties"
}

start_node() {
    local dir=$1 node=$2 node_dir
    node_dir=$(node_dir "$dir" "$node")
    : >"$node_dir/kafka.log"
    nohup "$0" run "$dir" "$node" >>"$node_dir/kafka.log" 2>&1 </dev/null &
    echo $! >"$node_dir/pid"
}

wait_serving() {
    local dir=$1 node=$2 node_dir deadline
    node_dir=$(node_dir "$dir" "$node")
    deadline=$((SECONDS + 120))
    until grep -q "Kafka Server started" "$node_dir/kafka.log" 2>/dev/null; do
        if ! kill -0 "$(cat "$node_dir/pid")" 2>/dev/null; then
            tail -n 30 "$node_dir/kafka.log" >&2
            die "node $node exited while starting (its log: $node_dir/kafka.log)"
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "node $node did not start within 120 s (its log: $node_dir/kafka.log)"
        sleep 0.2
    done
}

start() {
    local dir=$1
    shift
    if [ ! -f "$dir/bootstrap" ]; then
        prepare "$dir" "$@"
    fi
    dir=$(cd "$dir" && pwd)
    local nodes
    nodes=$(cat "$dir/nodes")
    for ((node = 1; node <= nodes; node++)); do start_node "$dir" "$node"; done
    for ((node = 1; node <= nodes; node++)); do wait_serving "$dir" "$node"; done
    cat "$dir/bootstrap"
}

signal_node() {
    local signal=$1 dir=$2 node=$3 node_dir pid
    node_dir=$(node_dir "$dir" "$node")
    [ -f "$node_dir/pid" ] || return 0
    pid=$(cat "$node_dir/pid")
    kill "-$signal" "$pid" 2>/dev/null || true
    if [ "$signal" = TERM ]; then
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    rm -f "$node_dir/pid"
}

stop() {
    local dir=$1
    if [ $# -ge 2 ]; then
        signal_node TERM "$dir" "$2"
        return
    fi
    [ -f "$dir/nodes" ] || return 0
    local nodes
    nodes=$(cat "$dir/nodes")
    # All at once: nodes stopped one by one leave the last ones without a controller quorum,
    # and their controlled shutdown then waits out its timeout.
    for ((node = 1; node <= nodes; node++)); do signal_node TERM "$dir" "$node" & done
    wait
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    fetch) fetch ;;
    cached) [ -f "$LIB/.complete" ] && printf '%s\n' "$LIB" ;;
    prepare) [ $# -ge 1 ] || die "usage: kafka.sh prepare DIR [--nodes N] [--ports P,C,...] [--set K=V]"; prepare "$@" ;;
    run) [ $# -eq 2 ] || die "usage: kafka.sh run DIR NODE"; run "$@" ;;
    start) [ $# -ge 1 ] || die "usage: kafka.sh start DIR [--nodes N] [--ports P,C,...] [--set K=V]"; start "$@" ;;
    stop) [ $# -ge 1 ] || die "usage: kafka.sh stop DIR [NODE]"; stop "$@" ;;
    kill) [ $# -eq 2 ] || die "usage: kafka.sh kill DIR NODE"; signal_node KILL "$1" "$2" ;;
    restart) [ $# -eq 2 ] || die "usage: kafka.sh restart DIR NODE"; start_node "$(cd "$1" && pwd)" "$2"; wait_serving "$(cd "$1" && pwd)" "$2" ;;
    *) sed -n '2,29s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
