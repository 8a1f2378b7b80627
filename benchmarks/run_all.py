"""Run every benchmark and write what they print to docs/performance.md.

Usage::

    python benchmarks/run_all.py            # all benchmarks, then docs/performance.md
    python benchmarks/run_all.py --no-write # print only

Each benchmark prints ratios measured within its own run; this script only collects the output, with the
machine's state (cores, load average, library versions) next to it, since the figures depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import lightning
import torch

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    ("Training throughput and callback overhead", "bench_training.py"),
    ("Tangent projection solvers", "bench_geometry.py"),
)


def machine() -> str:
    """One line on the machine the numbers were measured on."""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, load average {load} (1/5/15 min) at start, Python "
        f"{platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"{datetime.date.today().isoformat()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only, do not write docs/performance.md")
    args = parser.parse_args()

    sections = [
        "# Performance, measured\n",
        "Written by `python benchmarks/run_all.py`; every ratio below was measured within one run of its "
        "benchmark, the two sides interleaved. Machine: " + machine() + ".\n",
    ]
    for title, script in BENCHMARKS:
        print(f"== {title} ({script})", flush=True)
        result = subprocess.run(
            [sys.executable, str(HERE / script)], capture_output=True, text=True, cwd=HERE, check=False
        )
        print(result.stdout, flush=True)
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{script} failed with exit code {result.returncode}")
        sections.append(f"## {title}\n\n`python benchmarks/{script}`:\n\n```\n{result.stdout.rstrip()}\n```\n")
    if not args.no_write:
        out = HERE.parent / "docs" / "performance.md"
        out.write_text("\n".join(sections))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
