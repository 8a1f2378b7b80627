"""Update alignment during grokking (paper §4.6, Fig. 5) on the paper preset, over several seeds.

Usage::

    python examples/reproduce_alignment.py --out runs/alignment
    python examples/reproduce_alignment.py --seeds 0 --max-steps 200 --out /tmp/alignment   # a quick look

For every seed (data split and initialization) the ``paper_mlp_mse_gd`` preset ((a + b) mod 11, ReLU MLP of
width 128, MSE, full-batch SGD lr 0.5, weight decay 4e-3) is trained with a ZeroLossDetector, a
NormDescentMonitor, a TangentGradientMonitor and an Eq20AlignmentMonitor attached. The tangent monitor measures
every ``--tangent-every`` steps from the start (not only after memorization, and without a time budget), so the
peak of ``grok/tangent/update_cos`` can fall anywhere in the run.

The paper's claim: the cosine between the update over k = 10 steps and the tangent decay direction is largest
during the grokking phase. Here the grokking phase of a seed is [memorized_step, generalized_step + margin]
(the ZeroLossDetector's steps), with margin = max(detector period, 20 % of generalized_step − memorized_step):
"shortly after generalization" allows for the detector's resolution and for a peak that trails the last
held-out pair turning right. Target: the peak inside the phase for at least 4 of the 5 seeds, the whole
command within 10 minutes.

Writes ``alignment.json`` (per seed: the peak's step and cosine, memorized_step, generalized_step, whether the
peak is inside the phase, the Eq. 20 cosine, predicted/measured norm descent rates; the count over seeds; the
curves) and ``alignment.png`` (per seed: accuracies, the two update cosines, measured vs predicted norm descent
rate) to ``--out``, and prints a PASS/FAIL line per target.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.loggers.logger import Logger
from typing_extensions import override

from grok_lightning import (
    Eq20AlignmentMonitor,
    GrokkingModule,
    ModularArithmeticDataModule,
    NormDescentMonitor,
    TangentGradientMonitor,
    ZeroLossDetector,
)

UPDATE_WINDOW = 10  # k of both update cosines, as in the paper
MARGIN_SHARE = 0.2  # "shortly after generalization": this share of the grokking delay (or the detector period)
TARGET_SEEDS = 4  # seeds whose peak must fall inside the grokking phase
TARGET_SECONDS = 600.0  # the whole command
RATE_STEPS = (500, 1000, 2000, 4000)  # where predicted/measured norm descent rates are compared
CURVE_KEYS = (
    "grok/train_acc_full",
    "val/acc",
    "grok/tangent/update_cos",
    "grok/eq20/update_cos",
    "grok/eq20/readout_gap",
    "grok/norm_descent_rate",
    "grok/norm_descent_rate_predicted",
    "grok/tangent/weight_fraction",
)


class MemoryLogger(Logger):
    """Keep every logged scalar of the keys in ``CURVE_KEYS`` as ``{key: [(step, value), ...]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.curves: dict[str, list[tuple[int, float]]] = {key: [] for key in CURVE_KEYS}

    @property
    @override
    def name(self) -> str:
        return "memory"

    @property
    @override
    def version(self) -> int:
        return 0

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @override
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if key in self.curves and step is not None:
                self.curves[key].append((int(step), float(value)))


def _value_at(series: list[tuple[int, float]], step: int) -> float | None:
    values = [v for s, v in series if s == step]
    return values[-1] if values else None


def run_one(config: dict[str, Any], seed: int, max_steps: int, tangent_every: int, eq20_every: int) -> dict[str, Any]:
    """Train one seed of the preset with the monitors attached; return its events, peak and curves."""
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    data_cfg, model_cfg = config["data"], config["model"]
    dm = ModularArithmeticDataModule(**data_cfg, seed=seed)
    model = GrokkingModule(p=data_cfg["p"], encoding=data_cfg["encoding"], **model_cfg)
    detector = ZeroLossDetector(**config["detector"])
    callbacks = [
        detector,
        NormDescentMonitor(**config["norm_monitor"]),
        TangentGradientMonitor(
            every_n_steps=tangent_every, time_budget=None, only_when_memorized=False, update_window=UPDATE_WINDOW
        ),
        Eq20AlignmentMonitor(every_n_steps=eq20_every, update_window=UPDATE_WINDOW),
    ]
    logger = MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        log_every_n_steps=config["trainer"]["log_every_n_steps"],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    wall = time.perf_counter() - start

    curves = logger.curves
    memorized, generalized = detector.memorized_step, detector.generalized_step
    cosines = curves["grok/tangent/update_cos"]
    peak_step, peak_cos = max(cosines, key=lambda sv: sv[1]) if cosines else (None, None)
    eq20 = curves["grok/eq20/update_cos"]
    eq20_peak_step, eq20_peak_cos = max(eq20, key=lambda sv: sv[1]) if eq20 else (None, None)

    window, in_phase, position = None, None, None
    if memorized is not None and generalized is not None and peak_step is not None:
        delay = max(generalized - memorized, 0)
        margin = max(detector.every_n_steps, math.ceil(MARGIN_SHARE * delay))
        window = [memorized, generalized + margin]
        in_phase = window[0] <= peak_step <= window[1]
        position = (peak_step - memorized) / delay if delay > 0 else None

    rates = {}
    for step in RATE_STEPS:
        measured = _value_at(curves["grok/norm_descent_rate"], step)
        predicted = _value_at(curves["grok/norm_descent_rate_predicted"], step)
        if measured is not None and predicted is not None:
            rates[str(step)] = {
                "measured": measured,
                "predicted": predicted,
                "ratio": predicted / measured if measured else None,
            }
    return {
        "seed": seed,
        "steps": trainer.global_step,
        "memorized_step": memorized,
        "generalized_step": generalized,
        "peak_step": peak_step,
        "peak_update_cos": peak_cos,
        "grokking_phase": window,
        "peak_in_phase": in_phase,
        "peak_position_in_delay": position,
        "eq20_peak_step": eq20_peak_step,
        "eq20_peak_update_cos": eq20_peak_cos,
        "eq20_update_cos_at_peak": _value_at(eq20, peak_step) if peak_step is not None else None,
        "norm_descent_rates": rates,
        "wall_seconds": round(wall, 1),
        "curves": curves,
    }


def _fmt(value: float | None) -> str:
    return "None" if value is None else f"{value:.3f}"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(runs), 3, figsize=(13, 2.3 * len(runs) + 0.6), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        curves = run["curves"]
        for key, label in (("grok/train_acc_full", "train acc"), ("val/acc", "val acc")):
            if curves[key]:
                row[0].plot(*zip(*curves[key], strict=True), label=label)
        for key, label, color in (
            ("grok/tangent/update_cos", "cos(Δθ, −P_T d)", "tab:red"),
            ("grok/eq20/update_cos", "cos(ΔE, Eq. 20)", "tab:gray"),
        ):
            if curves[key]:
                row[1].plot(*zip(*curves[key], strict=True), label=label, color=color, lw=1)
        if run["peak_step"] is not None:
            row[1].plot([run["peak_step"]], [run["peak_update_cos"]], "kv", ms=6, label="peak")
        if run["grokking_phase"] is not None:
            row[1].axvspan(*run["grokking_phase"], color="tab:green", alpha=0.12, label="grokking phase")
        for key, label in (("grok/norm_descent_rate", "measured"), ("grok/norm_descent_rate_predicted", "predicted")):
            points = [(s, v) for s, v in curves[key] if v > 0]
            if points:
                row[2].plot(*zip(*points, strict=True), label=label)
        row[2].set_yscale("log")
        for ax in row:
            ax.set_xlim(0, run["steps"])
            for name, color in (("memorized_step", "tab:gray"), ("generalized_step", "tab:green")):
                if run[name] is not None:
                    ax.axvline(run[name], color=color, ls="--", lw=1)
        row[0].set_ylabel(f"seed {run['seed']}")
    axes[0][0].set_title("accuracy")
    axes[0][1].set_title(f"update cosine, k = {UPDATE_WINDOW}")
    axes[0][2].set_title("norm descent rate (−Δ‖θ‖² per step)")
    for ax, where in zip(axes[0], ("lower right", "upper right", "center right"), strict=True):
        ax.legend(fontsize=7, loc=where)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(path, dpi=60)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/configs/paper_mlp_mse_gd.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--max-steps", type=int, help="overrides trainer.max_steps")
    parser.add_argument("--tangent-every", type=int, default=50, help="TangentGradientMonitor every_n_steps")
    parser.add_argument("--eq20-every", type=int, default=10, help="Eq20AlignmentMonitor every_n_steps")
    parser.add_argument("--workers", type=int, default=2, help="seeds trained in parallel, one thread each")
    parser.add_argument("--out", default="runs/alignment")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = yaml.safe_load(Path(args.config).read_text())
    max_steps = args.max_steps or config["trainer"]["max_steps"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(config, seed, max_steps, args.tangent_every, args.eq20_every) for seed in args.seeds]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(run_one, *zip(*jobs, strict=True)))
    else:
        runs = [run_one(*job) for job in jobs]
    wall = time.perf_counter() - start

    for run in runs:
        rates = ", ".join(f"{s}: {r['ratio']:.3g}x" for s, r in run["norm_descent_rates"].items() if r["ratio"])
        print(
            f"seed {run['seed']}: memorized {run['memorized_step']}, generalized {run['generalized_step']}, "
            f"peak update_cos {run['peak_update_cos']:.3f} at step {run['peak_step']} (phase {run['grokking_phase']}, "
            f"inside: {run['peak_in_phase']}, at {_fmt(run['peak_position_in_delay'])} of the delay); Eq. 20 cos there "
            f"{_fmt(run['eq20_update_cos_at_peak'])}, Eq. 20 peak "
            f"{run['eq20_peak_update_cos']:.3f} at {run['eq20_peak_step']}; predicted/measured norm rate {rates}; "
            f"{run['wall_seconds']} s",
            flush=True,
        )
    inside = sum(run["peak_in_phase"] is True for run in runs)
    summary = {
        "seeds": len(runs),
        "peak_in_phase": inside,
        "peak_steps": [run["peak_step"] for run in runs],
        "memorized_steps": [run["memorized_step"] for run in runs],
        "generalized_steps": [run["generalized_step"] for run in runs],
        "wall_seconds": round(wall, 1),
        "targets": {
            f"peak_in_phase_ge_{TARGET_SEEDS}_of_5": inside >= TARGET_SEEDS,
            f"wall_le_{TARGET_SECONDS:.0f}_s": wall <= TARGET_SECONDS,
        },
    }
    settings = {
        "max_steps": max_steps,
        "update_window": UPDATE_WINDOW,
        "tangent_every_n_steps": args.tangent_every,
        "eq20_every_n_steps": args.eq20_every,
        "workers": args.workers,
        "grokking_phase": f"[memorized_step, generalized_step + max(detector period, {MARGIN_SHARE} * delay)]",
    }
    result = {"config": config, "settings": settings, "summary": summary, "runs": runs}
    (out / "alignment.json").write_text(json.dumps(result, indent=1))
    plot(runs, out / "alignment.png")
    print(json.dumps(summary, indent=1))
    print(
        f"{'PASS' if inside >= TARGET_SEEDS else 'FAIL'}: peak update alignment inside the grokking phase for "
        f"{inside}/{len(runs)} seeds (target >= {TARGET_SEEDS} of 5)"
    )
    print(f"{'PASS' if wall <= TARGET_SECONDS else 'FAIL'}: wall time {wall:.1f} s (target <= {TARGET_SECONDS:.0f} s)")
    print(f"wrote {out / 'alignment.json'} and {out / 'alignment.png'}")


if __name__ == "__main__":
    main()
