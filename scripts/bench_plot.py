#!/usr/bin/env python3
"""Draws the benchmark's latency percentiles against the insert rate, and, when the run has the
`debezium` section, the relay beside Debezium: drain rates and p99 latency by insert rate.

    python3 scripts/bench_plot.py docs/bench/latest.json docs/bench/latency.png [docs/bench/debezium.png]

Needs matplotlib (pip install matplotlib).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def relay_name(run):
    if run["relay"] == "debezium":
        return f"Debezium, poll.interval.ms={run['poll_interval_ms']}"
    return f"outbox-relay, mark={run['mark']}"


def plot_debezium(report, target):
    """Two panels: the drain's steady and from-start rates per relay, and p99 by insert rate."""
    section = report.get("debezium") or {}
    if section.get("skipped") or not section.get("drain"):
        print(f"no Debezium figures in this run: {target} not drawn")
        return
    fig, (drain_ax, latency_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    drains = section["drain"]
    names = [relay_name(d).replace(", ", "\n") for d in drains]
    positions = range(len(drains))
    width = 0.4
    drain_ax.bar([p - width / 2 for p in positions], [d["steady_rows_per_s"] for d in drains], width, label="steady")
    drain_ax.bar(
        [p + width / 2 for p in positions], [d["from_start_rows_per_s"] for d in drains], width, label="from start"
    )
    drain_ax.set_xticks(list(positions))
    drain_ax.set_xticklabels(names, fontsize=7)
    drain_ax.set_ylabel("rows/s (broker append times)")
    drain_ax.set_title(f"drain of a {drains[0]['rows']:,}-row backlog", fontsize=9)
    drain_ax.grid(True, axis="y", alpha=0.3)
    drain_ax.legend(fontsize=8)
    by_relay = {}
    for run in section["latency"]:
        by_relay.setdefault(relay_name(run), []).append(run)
    for name, runs in by_relay.items():
        runs.sort(key=lambda r: r["rows_per_s"])
        latency_ax.plot([r["rows_per_s"] for r in runs], [r["p99_ms"] for r in runs], "o-", label=name)
    rates = sorted({r["rows_per_s"] for r in section["latency"]})
    latency_ax.set_xticks(rates)
    latency_ax.set_xlabel("insert rate (rows/s, one transaction every 10 ms)")
    latency_ax.set_ylabel("p99 commit to broker append (ms)")
    latency_ax.set_yscale("log")
    latency_ax.grid(True, which="both", alpha=0.3)
    latency_ax.legend(fontsize=8)
    machine = report["machine"]
    versions = section["versions"]
    fig.suptitle(
        f"outbox-relay beside Debezium {versions['debezium']} (Kafka Connect {versions['kafka_connect']}), "
        f"{machine['cpus']} CPUs shared with PostgreSQL and Apache Kafka ({machine['commit']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(target)
    print(f"wrote {target}")


def main():
    source, target = sys.argv[1], sys.argv[2]
    with open(source) as f:
        report = json.load(f)
    if len(sys.argv) > 3:
        plot_debezium(report, sys.argv[3])
    runs = report["latency"]
    rates = [r["rows_per_s"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for field, label, style in [("p50_ms", "p50", "o-"), ("p99_ms", "p99", "s-"), ("max_ms", "max", "^--")]:
        ax.plot(rates, [r[field] for r in runs], style, label=label)
    ax.set_xlabel("insert rate (rows/s, one transaction every 10 ms)")
    ax.set_ylabel("intended insert to marked published (ms)")
    ax.set_yscale("log")
    ax.set_xticks(rates)
    ax.grid(True, which="both", alpha=0.3)
    machine = report["machine"]
    ax.set_title(
        f"outbox-relay latency, {machine['cpus']} CPUs shared with PostgreSQL and Apache Kafka ({machine['commit']})",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
