"""Cluster scenarios under load: the RayService with each pod on its own emulated host (tests/test_kuberay_pods.py).

    python -m bench.cluster                       # as root (network namespaces), needs redis-server; ~9 min

Runs the scenarios of tests/test_kuberay_pods.py (the RayJob publishing a new model, autoscaling 2..3 switched to
from num_replicas under load, num_replicas 2 -> 3 -> 2, a serve worker removed gracefully and killed abruptly,
the head restarted with GCS fault tolerance), each under a steady load through an emulated L4 LoadBalancer, and
writes what the clients saw to ``cluster.json`` and ``cluster.md`` (default ``bench/results``): requests sent,
non-2xx, connection errors, the longest gap without a success. Exit status: pytest's (1 if a scenario failed; the
table still shows its numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="(default: bench/results)")
    return p.parse_args(argv)


def markdown(reports: dict[str, dict[str, Any]], outcome: str) -> str:
    """The table of cluster.md."""
    lines = [
        "# Cluster scenarios under load",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `python -m bench.cluster` ({outcome}). The RayService of",
        "kuberay/serving/ with one network namespace per pod (Redis, head, 2 serve workers with 1 Ray CPU each) on",
        "one 2-core machine; the RayJob of kuberay/training/ on its own cluster of pods (head, 1 training worker)",
        "on the same network, started by its submitter pod's command line. 8 clients (unless a note says",
        "otherwise), one fresh connection per `/predict`, through a round-robin L4 balancer over the Ready serve",
        "workers that never retries. Timings are from a shared machine: compare, do not quote.",
        "",
        "| scenario | sent | ok | non-2xx | connection errors | longest gap without a success | seconds | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in reports.items():
        non_2xx = sum(r["non_2xx"].values())
        codes = f" {r['non_2xx']}" if non_2xx else ""
        lines.append(
            f"| {name} | {r['sent']} | {r['ok']} | {non_2xx}{codes} | {r['connection_errors']} "
            f"| {r['longest_gap_s']:.2f} s | {r['seconds']:.0f} | {'; '.join(r.get('notes', []))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, write cluster.json and cluster.md."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "cluster.json"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/test_kuberay_pods.py",
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                "integration",
            ],
            cwd=ROOT,
            env={**os.environ, "KUBERAY_PODS_REPORT": str(report)},
            check=False,
        )
        reports = json.loads(report.read_text()) if report.is_file() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(reports, indent=2) + "\n")
    outcome = "all scenarios passed" if done.returncode == 0 else f"pytest exit status {done.returncode}"
    (args.out / "cluster.md").write_text(markdown(reports, outcome))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
