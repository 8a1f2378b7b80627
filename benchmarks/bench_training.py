"""Training throughput: Lightning vs a plain PyTorch loop, and the cost of each callback, as ratios.

Every ratio compares runs made in this one process, interleaved (A, B, A, B, ...) so that a change of machine
load hits both sides; the best of the repeats is kept for each side. Run::

    python benchmarks/bench_training.py                 # all presets
    python benchmarks/bench_training.py --presets paper_mlp_mse_gd --steps 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable
from functools import partial

import lightning.pytorch as pl
import torch
from _presets import PRESETS, load_preset, quiet_trainer

from grok_lightning import NormDescentMonitor, ZeroLossDetector

# Steps per timed run: enough for a second or more of training on this 2-core CPU.
DEFAULT_STEPS = {"paper_mlp_mse_gd": 3000, "mlp_ce_adamw": 300, "transformer_ce_adamw": 40}


def plain_loop(preset: str, steps: int) -> float:
    """Seconds per step of a hand-written full-batch loop: forward, loss, backward, optimizer step."""
    data, model, _ = load_preset(preset)
    optimizer = model.configure_optimizers()
    inputs, targets = data.train_inputs, data.train_targets
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def lightning_loop(preset: str, steps: int, callbacks: Callable[[], list[pl.Callback]] = list) -> float:
    """Seconds per step of `Trainer.fit` on the preset (its validation cadence included), with some callbacks."""
    data, model, config = load_preset(preset)
    log_every = config["trainer"].get("log_every_n_steps", 50)
    trainer = quiet_trainer(steps, callbacks(), log_every_n_steps=log_every)
    start = time.perf_counter()
    trainer.fit(model, data)
    return (time.perf_counter() - start) / steps


def best_of(repeats: int, *runs: Callable[[], float]) -> list[float]:
    """Interleave the runs `repeats` times; the fastest time of each."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            best[i] = min(best[i], run())
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run (default: per preset)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats} interleaved runs")
    header = f"{'preset':<22} {'plain ms/step':>13} {'Lightning ms/step':>17} {'ratio (steps/s, L/plain)':>25}"
    print(header)
    rows = []
    for preset in args.presets:
        steps = args.steps or DEFAULT_STEPS[preset]
        plain, light = best_of(args.repeats, partial(plain_loop, preset, steps), partial(lightning_loop, preset, steps))
        rows.append((preset, steps, light))
        print(f"{preset:<22} {plain * 1e3:>13.3f} {light * 1e3:>17.3f} {plain / light:>25.2f}")

    print()
    print(f"{'preset':<22} {'callback':<20} {'without ms/step':>15} {'with ms/step':>12} {'ratio (with/without)':>21}")
    for preset, steps, _ in rows:
        for name, make in (
            ("NormDescentMonitor", lambda: [NormDescentMonitor()]),
            ("ZeroLossDetector", lambda: [ZeroLossDetector()]),
        ):
            without, with_ = best_of(
                args.repeats, partial(lightning_loop, preset, steps), partial(lightning_loop, preset, steps, make)
            )
            print(f"{preset:<22} {name:<20} {without * 1e3:>15.3f} {with_ * 1e3:>12.3f} {with_ / without:>21.3f}")


if __name__ == "__main__":
    main()
