"""Simulate the paper's Eq. 20 (its §7) for several seeds and both readings of its initialization.

Usage::

    python examples/reproduce_eq20.py --config examples/configs/paper_eq20.yaml
    python examples/reproduce_eq20.py --config examples/configs/paper_eq20.yaml --inits variance --max-steps 3000

For every (init, seed) a :class:`~grok_lightning.reference.PredictedDynamicsModule` is fitted on the
DataModule split of that seed, with a :class:`~grok_lightning.FourierEmbeddingMonitor` attached. The run
writes ``summary.json`` (per seed and aggregated: validation accuracy at steps 1000 / 2500 / 3000, the first
step at 0.99, the smallest training accuracy, the largest increase of R/λ, the Fourier statistics before and
after generalization, wall time) and ``eq20.png`` to ``--out`` (default ``runs/eq20``), and prints the
targets of the paper with pass/fail.

The runs are independent: ``--workers`` (default 2) simulates that many at once, each in its own process on one
thread. In ``summary.json`` each run's ``wall_seconds`` is its own fit time, each init's is the sum over its
seeds (compute time, larger than the wall time when runs overlap), and the top-level ``wall_seconds`` is the
wall time of the whole command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from typing_extensions import override

from grok_lightning import FourierEmbeddingMonitor, ModularArithmeticDataModule
from grok_lightning.reference import PredictedDynamicsModule

FOURIER_KEYS = (
    "grok/fourier/circle_roundness",
    "grok/fourier/re_im_cos",
    "grok/fourier/circle_roundness_weighted",
    "grok/fourier/re_im_cos_weighted",
    "grok/fourier/top_power_fraction",
)


class Recorder(pl.Callback):
    """Keep R/λ, ‖E‖², train/acc on logging steps, val/acc at validations, Fourier metrics at measurements."""

    def __init__(self, fourier: FourierEmbeddingMonitor) -> None:
        self.fourier = fourier
        self.train: list[tuple[int, float, float, float]] = []  # (step, train/acc, R/λ, ‖E‖²)
        self.val: list[tuple[int, float]] = []
        self.spectra: list[dict[str, float]] = []
        self._fourier_step = -1

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        metrics = trainer.callback_metrics
        if "grok/eq20/reduced_cost" in metrics and trainer.global_step % trainer.log_every_n_steps == 0:
            step = trainer.global_step - 1  # the values describe E before this step's update
            self.train.append(
                (
                    step,
                    float(metrics["train/acc"]),
                    float(metrics["grok/eq20/reduced_cost"]),
                    float(metrics["grok/eq20/weight_norm_sq"]),
                )
            )
        if self.fourier._last_step != self._fourier_step:
            self._fourier_step = self.fourier._last_step
            self.spectra.append({"step": self._fourier_step, **self.fourier.last})

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val/acc"])))


def _at(series: list[tuple[int, float]], step: int) -> float | None:
    values = [v for s, v in series if s <= step]
    return values[-1] if values else None


def run_one(config: dict[str, Any], init: str, seed: int, max_steps: int) -> dict[str, Any]:
    trainer_cfg = config["trainer"]
    pl.seed_everything(seed, verbose=False)
    dm = ModularArithmeticDataModule(**config["data"], seed=seed, steps_per_epoch=trainer_cfg["val_every_n_steps"])
    model = PredictedDynamicsModule(p=config["data"]["p"], init=init, **config["model"])
    fourier = FourierEmbeddingMonitor(**config["fourier"])
    recorder = Recorder(fourier)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        log_every_n_steps=trainer_cfg["log_every_n_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[fourier, recorder],
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    wall = time.perf_counter() - start

    costs = [r[2] for r in recorder.train]
    generalized = next((s for s, v in recorder.val if v >= 0.99), None)
    before = [m for m in recorder.spectra if generalized is None or m["step"] < generalized]
    return {
        "init": init,
        "seed": seed,
        "steps": trainer.global_step,
        "wall_seconds": round(wall, 1),
        "min_train_acc": min(r[1] for r in recorder.train),
        "max_cost_increase": max(b - a for a, b in itertools.pairwise(costs)),
        # Where R/λ first rose, and by how much relative to its value there: Euler steps can overshoot a kink of
        # the ReLU flow, which the continuous flow never does.
        "first_cost_increase_step": next(
            (r[0] for q, r in itertools.pairwise(recorder.train) if r[2] > q[2]),
            None,
        ),
        "max_cost_increase_relative": max((b - a) / a for a, b in itertools.pairwise(costs)),
        "reduced_cost": {"first": costs[0], "last": costs[-1]},
        "weight_norm_sq": {"first": recorder.train[0][3], "last": recorder.train[-1][3]},
        "val_acc_at": {str(s): _at(recorder.val, s) for s in (500, 1000, 1500, 2000, 2500, 3000, max_steps)},
        "first_step_val_acc_0.99": generalized,
        "fourier_before": before[-1] if before else None,
        "fourier_last": recorder.spectra[-1],
        "curves": {"val": recorder.val, "train": recorder.train[::5], "fourier": recorder.spectra},
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for init in sorted({r["init"] for r in runs}):
        group = [r for r in runs if r["init"] == init]

        def median(step: int, group: list[dict[str, Any]] = group) -> float:
            return statistics.median(r["val_acc_at"][str(step)] for r in group)

        out[init] = {
            "median_val_acc_1000": median(1000),
            "median_val_acc_2500": median(2500),
            "min_val_acc_3000": min(r["val_acc_at"]["3000"] for r in group),
            "first_step_0.99": [r["first_step_val_acc_0.99"] for r in group],
            "min_train_acc": min(r["min_train_acc"] for r in group),
            "max_cost_increase": max(r["max_cost_increase"] for r in group),
            "max_cost_increase_relative": max(r["max_cost_increase_relative"] for r in group),
            "first_cost_increase_step": min(
                (r["first_cost_increase_step"] for r in group if r["first_cost_increase_step"] is not None),
                default=None,
            ),
            "fourier_last_median": {
                k: statistics.median(r["fourier_last"][k] for r in group)
                for k in FOURIER_KEYS
                if k in group[0]["fourier_last"]
            },
            "fourier_before_median": {
                k: statistics.median(r["fourier_before"][k] for r in group if r["fourier_before"])
                for k in FOURIER_KEYS
                if group[0]["fourier_before"] and k in group[0]["fourier_before"]
            },
            "wall_seconds": round(sum(r["wall_seconds"] for r in group), 1),
        }
        s = out[init]
        s["targets"] = {
            "train_acc_1_throughout": s["min_train_acc"] == 1.0,
            "median_val_le_0.05_at_1000": s["median_val_acc_1000"] <= 0.05,
            "median_val_ge_0.99_at_2500": s["median_val_acc_2500"] >= 0.99,
            "every_seed_ge_0.99_at_3000": s["min_val_acc_3000"] >= 0.99,
            "reduced_cost_non_increasing": s["max_cost_increase"] <= 0.0,
        }
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colors = {"std": "tab:blue", "variance": "tab:orange"}
    for r in runs:
        color = colors.get(r["init"], "k")
        label = f"init={r['init']}" if r["seed"] == runs[0]["seed"] else None
        steps, val = zip(*r["curves"]["val"], strict=True)
        axes[0].plot(steps, val, color=color, alpha=0.7, label=label)
        train = r["curves"]["train"]
        axes[1].plot([t[0] for t in train], [t[2] for t in train], color=color, alpha=0.7, label=label)
        fourier = [m for m in r["curves"]["fourier"] if "grok/fourier/circle_roundness" in m]
        axes[2].plot([m["step"] for m in fourier], [m["grok/fourier/circle_roundness"] for m in fourier], color=color)
        axes[2].plot([m["step"] for m in fourier], [m["grok/fourier/re_im_cos"] for m in fourier], color=color, ls="--")
    axes[0].set(xlabel="Euler step", ylabel="validation accuracy", title="held-out pairs")
    axes[1].set(xlabel="Euler step", ylabel="R/λ", yscale="log", title="reduced cost ‖E‖² + tr(Yᵀ(HHᵀ)⁻¹Y)")
    axes[2].set(xlabel="Euler step", ylim=(0, 1.02), title="Fourier: roundness (—), |cos(Re,Im)| (--)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _run_job(job: tuple[dict[str, Any], str, int, int]) -> dict[str, Any]:
    return run_one(*job)


def _report(run: dict[str, Any]) -> dict[str, Any]:
    print(
        f"init={run['init']} seed={run['seed']}: val@1000={run['val_acc_at']['1000']:.3f} "
        f"val@2500={run['val_acc_at']['2500']:.3f} val@3000={run['val_acc_at']['3000']:.3f} "
        f"first 0.99 at {run['first_step_val_acc_0.99']}, min train acc {run['min_train_acc']}, "
        f"max R increase {run['max_cost_increase']:.3g} ({run['max_cost_increase_relative']:.2g} relative, first "
        f"at step {run['first_cost_increase_step']}), R {run['reduced_cost']['first']:.1f} -> "
        f"{run['reduced_cost']['last']:.1f}, fourier last {run['fourier_last']}, {run['wall_seconds']} s",
        flush=True,
    )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/configs/paper_eq20.yaml")
    parser.add_argument("--inits", nargs="+", choices=("std", "variance"), help="overrides the config's `inits`")
    parser.add_argument("--seeds", nargs="+", type=int, help="overrides the config's `seeds`")
    parser.add_argument("--max-steps", type=int, help="overrides trainer.max_steps")
    parser.add_argument("--out", default="runs/eq20")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs simulated at once, one process and one thread each (default: 2, or 1 on a single core)",
    )
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    torch.set_num_threads(1)

    config = yaml.safe_load(Path(args.config).read_text())
    inits, seeds = args.inits or config["inits"], args.seeds or config["seeds"]
    max_steps = args.max_steps or config["trainer"]["max_steps"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(config, init, seed, max_steps) for init in inits for seed in seeds]
    runs = []
    if args.workers == 1:
        for job in jobs:
            runs.append(_report(run_one(*job)))
    else:  # seeds are independent: one process per run, each on one thread (spawned: no forked OpenMP state)
        with multiprocessing.get_context("spawn").Pool(
            args.workers, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            for run in pool.imap_unordered(_run_job, jobs):
                runs.append(_report(run))
    runs.sort(key=lambda r: (inits.index(r["init"]), seeds.index(r["seed"])))
    summary = {"config": config, "max_steps": max_steps, "summary": summarize(runs), "runs": runs}
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(runs, out / "eq20.png")
    print(json.dumps(summary["summary"], indent=1))
    print(f"total wall time {summary['wall_seconds']} s; wrote {out / 'summary.json'} and {out / 'eq20.png'}")


if __name__ == "__main__":
    main()
