#!/usr/bin/env python3
"""Draws docs/dashboard.png: the dashboard's key panels, from a local run's /metrics.

Starts PostgreSQL and Apache Kafka (scripts/kafka.sh) on free ports, runs the relay (target/release/outbox-relay, or
target/debug) with a writer inserting 200 rows a second, and scrapes /metrics twice a second
through four phases: healthy; the broker hung for 20 s (SIGSTOP: the backlog and the oldest
pending age grow, deliveries time out); recovery; a row for a topic that does not exist (retried,
then given up on). Needs psycopg2 and matplotlib (pip install psycopg2-binary matplotlib).

    python3 scripts/dashboard_snapshot.py [docs/dashboard.png]
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "dashboard.png")
PHASES = [("healthy", 20), ("broker hung", 20), ("recovering", 15), ("poison row", 20)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(cmd):
    return (["runuser", "-u", "postgres", "--"] + cmd) if os.geteuid() == 0 else cmd


def pg_bindir():
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
    if os.path.exists(os.path.join(out, "postgres")):
        return out
    return sorted(d for d in (f"/usr/lib/postgresql/{v}/bin" for v in os.listdir("/usr/lib/postgresql")))[-1]


def relay_binary():
    for build in ("release", "debug"):
        path = os.path.join(ROOT, "target", build, "outbox-relay")
        if os.path.exists(path):
            return path
    sys.exit("build the relay first: cargo build --release")


def scrape(url):
    text = urllib.request.urlopen(url, timeout=2).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def quantile(buckets_delta, q):
    """A quantile from cumulative histogram bucket deltas, as Prometheus interpolates it."""
    items = sorted((float("inf") if le == "+Inf" else float(le), n) for le, n in buckets_delta.items())
    total = items[-1][1] if items else 0
    if total <= 0:
        return None
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in items:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return prev_le


def main():
    work = tempfile.mkdtemp(prefix="outbox-relay-snapshot-")
    os.chmod(work, 0o755)
    pg_dir = os.path.join(work, "pg")
    os.mkdir(pg_dir)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres", work], check=True)
    bindir, pg_port, kafka_port, metrics_port = pg_bindir(), free_port(), free_port(), free_port()
    procs = []
    try:
        subprocess.run(as_postgres([f"{bindir}/initdb", "-D", pg_dir, "-A", "trust", "-U", "postgres"]),
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(as_postgres([f"{bindir}/pg_ctl", "-D", pg_dir, "-l", f"{work}/pg.log", "-w", "-o",
                                    f"-p {pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''",
                                    "start"]), check=True, stdout=subprocess.DEVNULL)
        # Apache Kafka from Maven Central (scripts/kafka.sh); `run` execs the JVM, so the
        # process below is the broker itself and SIGSTOP freezes it.
        kafka_dir, controller_port = os.path.join(work, "kafka"), free_port()
        kafka_sh = os.path.join(ROOT, "scripts", "kafka.sh")
        subprocess.run([kafka_sh, "prepare", kafka_dir, "--ports", f"{kafka_port},{controller_port}"], check=True,
                       stdout=subprocess.DEVNULL)
        kafka_log = open(os.path.join(work, "kafka.log"), "w")
        broker = subprocess.Popen([kafka_sh, "run", kafka_dir, "1"], stdout=kafka_log, stderr=subprocess.STDOUT)
        procs.append(broker)
        deadline = time.time() + 120
        while "Kafka Server started" not in open(os.path.join(work, "kafka.log")).read():
            if broker.poll() is not None or time.time() > deadline:
                sys.exit(f"Apache Kafka did not start; see {work}/kafka.log")
            time.sleep(0.2)
        subprocess.run(["cargo", "run", "--quiet", "--example", "create_topic", "--",
                        f"127.0.0.1:{kafka_port}", "orders", "3"], check=True, cwd=ROOT)
        env = dict(os.environ,
                   OUTBOX_RELAY_DATABASE__URL=f"postgres://postgres@127.0.0.1:{pg_port}/postgres",
                   OUTBOX_RELAY_KAFKA__BROKERS=f"127.0.0.1:{kafka_port}",
                   OUTBOX_RELAY_METRICS__LISTEN=f"127.0.0.1:{metrics_port}",
                   OUTBOX_RELAY_RELAY__STATS_INTERVAL="500ms",
                   OUTBOX_RELAY_RELAY__MAX_ATTEMPTS="4",
                   OUTBOX_RELAY_RELAY__RETRY_BACKOFF_INITIAL="1s",
                   RUST_LOG="warn")
        subprocess.run([relay_binary(), "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        relay = subprocess.Popen([relay_binary(), "run"], env=env, stderr=open(f"{work}/relay.log", "w"))
        procs.append(relay)

        db = psycopg2.connect(host="127.0.0.1", port=pg_port, user="postgres", dbname="postgres")
        db.autocommit = True
        stop = threading.Event()

        def writer():
            cur, n, start = db.cursor(), 0, time.monotonic()
            while not stop.is_set():
                n += 1
                cur.execute("INSERT INTO outbox (topic, key, payload) VALUES ('orders', %s, %s)",
                            (f"order-{n % 50}", f'{{"n": {n}}}'))
                delay = start + n / 200 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

        threading.Thread(target=writer, daemon=True).start()
        time.sleep(2)
        samples, start, boundaries = [], time.monotonic(), []
        for phase, seconds in PHASES:
            boundaries.append((time.monotonic() - start, phase))
            if phase == "broker hung":
                os.kill(broker.pid, signal.SIGSTOP)
            if phase == "recovering":
                os.kill(broker.pid, signal.SIGCONT)
            if phase == "poison row":
                db.cursor().execute("INSERT INTO outbox (topic, key, payload) VALUES ('billing', 'invoice-7', '{}')")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    samples.append((time.monotonic() - start, scrape(f"http://127.0.0.1:{metrics_port}/metrics")))
                except OSError:
                    pass
                time.sleep(0.5)
        stop.set()
        plot(samples, boundaries)
    finally:
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGCONT)
            except OSError:
                pass
            p.terminate()
            p.wait()
        subprocess.run(as_postgres([f"{bindir}/pg_ctl", "-D", pg_dir, "-m", "immediate", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", work])


def plot(samples, boundaries):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(name):
        return [s.get(name, 0.0) for _, s in samples]

    t = [x for x, _ in samples]
    published = [sum(v for k, v in s.items() if k.startswith("outbox_relay_published_total")) for _, s in samples]
    errors = [sum(v for k, v in s.items() if k.startswith("outbox_relay_publish_errors_total")) for _, s in samples]
    window = 4  # samples: a 2 s rate, as Grafana's rate() over a short range would show
    def rate(values):
        return [(values[i] - values[max(i - window, 0)]) / max(t[i] - t[max(i - window, 0)], 1e-9)
                for i in range(len(values))]
    bucket = re.compile(r'outbox_relay_delivery_latency_seconds_bucket\{le="([^"]+)"\}')
    p50, p99 = [], []
    for i, (_, s) in enumerate(samples):
        prev = samples[max(i - window, 0)][1]
        delta = {m.group(1): v - prev.get(k, 0.0) for k, v in s.items() if (m := bucket.match(k))}
        p50.append((quantile(delta, 0.5) or float("nan")) * 1000)
        p99.append((quantile(delta, 0.99) or float("nan")) * 1000)

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True)
    fig.suptitle("outbox-relay: healthy, broker hung for 20 s, recovering, a poison row (local run, 200 rows/s)")
    panels = [
        (axes[0][0], "Throughput (records/s)", [(rate(published), "published")]),
        (axes[0][1], "Oldest pending age (s)", [(series("outbox_relay_oldest_pending_age_seconds"), "oldest pending")]),
        (axes[0][2], "Pending rows", [(series("outbox_relay_pending_rows"), "pending")]),
        (axes[1][0], "Delivery latency (ms, created to ack)", [(p50, "p50"), (p99, "p99")]),
        (axes[1][1], "Publish errors (per s)", [(rate(errors), "errors")]),
        (axes[1][2], "Failed rows (given up on)", [(series("outbox_relay_failed_rows"), "failed")]),
    ]
    for ax, title, lines in panels:
        for values, label in lines:
            ax.plot(t, values, label=label, linewidth=1.4)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        for start, phase in boundaries[1:]:
            ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("seconds")
    for start, phase in boundaries:
        axes[0][0].annotate(phase, (start + 0.5, 0.95), xycoords=("data", "axes fraction"), fontsize=8, color="grey")
    axes[1][0].set_yscale("log")
    fig.tight_layout()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
