#!/usr/bin/env python3
"""Draws the benchmark's latency percentiles against the insert rate.

    python3 scripts/bench_plot.py docs/bench/latest.json docs/bench/latency.png

Needs matplotlib (pip install matplotlib).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    source, target = sys.argv[1], sys.argv[2]
    with open(source) as f:
        report = json.load(f)
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
