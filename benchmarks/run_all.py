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


READING = """How to read the tables, and the targets they are held to:

- *Lightning vs plain loop* (target: ratio of steps per second ≥ 0.5): the same model, optimizer and full batch,
  timed over the training loop alone on both sides (`Trainer.fit` without validation and without its start-up).
- *Callback overhead*: `ratio (with/without)` divides best-of-N wall times of separate fits (validation at the
  preset's cadence included); on a shared CPU it swings by ±20 % for millisecond steps. `1 + own/rest` is measured
  inside each fit, from the time spent in the hooks each callback overrides, and is the figure to compare with the
  targets: NormDescentMonitor ≤ 1.02 (issue 3: 2 % of the MLP preset's step), ZeroLossDetector ≤ 1.05,
  TangentGradientMonitor ≤ 1.10 at the default time budget, all four (with FourierEmbeddingMonitor) together
  ≤ 1.15 (issue 6). Each fit runs the preset for 6 000 (paper), 1 500 (mlp) or 800 (transformer) steps, so that a
  tangent monitor's first measurement, which no budget can skip (`first (s)`), is a small part of the run, and
  "all four" includes memorization.
- *Tangent projection* (issue 4): dense path ≥ 2× faster than `jacrev` + `pinv` with the same answer to 1e-6;
  iterative path on the mod-97 MLP: ρ within 1e-3 of its converged value, cold ≤ 3 s, warm ≤ 1 s, ≤ 1 GB extra.
"""


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
        READING,
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
