"""Training throughput: Lightning vs a plain PyTorch loop, and the cost of each callback, as ratios.

Every ratio compares runs made in this one process, interleaved (A, B, A, B, ...) so that a change of machine
load hits both sides; the best of the repeats is kept for each side. The throughput table times the training
loop alone on both sides (Lightning without validation and without its start-up cost). The callback table runs,
per preset and repeat, one fit without callbacks and one with each callback set at its defaults (TangentGradientMonitor:
time_budget 0.1, every 100 steps), and counts the tangent monitor's measurements (skipped steps excluded): alone
it measures from step 0; among "all four" only once the ZeroLossDetector has confirmed memorization. Its
`first (s)` column is the cost of the first measurement, which the budget cannot skip (it has no cost to judge by
yet): a run shorter than ten times that exceeds a 10 % budget whatever the monitor does, so the callback table
runs each preset for long enough (CALLBACK_STEPS) to show the budget at work.

Beside the wall-time ratio, each row prints 1 + (time inside the callbacks' hooks) / (the rest of the same fit),
timed by wrapping the hooks each callback overrides: the cost ratio measured within one fit, which machine noise
cannot skew the way it skews the ratio of two separate best-of-N wall times of millisecond steps. Run::

    python benchmarks/bench_training.py                 # all presets
    python benchmarks/bench_training.py --presets paper_mlp_mse_gd --steps 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from collections.abc import Callable
from functools import partial

import lightning.pytorch as pl
import torch
from _presets import PRESETS, load_preset, quiet_trainer

from grok_lightning import FourierEmbeddingMonitor, NormDescentMonitor, TangentGradientMonitor, ZeroLossDetector

# Steps per timed run: long enough for the presets' own runs to be represented. A time budget is a share of the
# training time, and a tangent monitor's first measurement is paid up front (0.06-1.2 s): only a run ten times longer
# than that can show the budget. The presets' own runs where they fit: paper_mlp_mse_gd's 6 000 steps (memorized
# by ~200) and transformer_ce_adamw's 800 (memorized at 300, generalized at 800); of mlp_ce_adamw's 8 900 steps
# the first 1 500, which include memorization (~1 000), so that among "all four" the detector lets the tangent
# monitor measure.
CALLBACK_STEPS = {"paper_mlp_mse_gd": 6000, "mlp_ce_adamw": 1500, "transformer_ce_adamw": 800}
# The throughput table needs only a few seconds of steady steps per run.
THROUGHPUT_STEPS = {"paper_mlp_mse_gd": 1500, "mlp_ce_adamw": 300, "transformer_ce_adamw": 40}


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


class HookClock:
    """Times every hook of the callbacks it wraps: their own share of a fit, measured inside that one fit."""

    HOOKS = (*(name for name in dir(pl.Callback) if name.startswith("on_")), "setup", "teardown")

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, callback: pl.Callback) -> pl.Callback:
        """Replace the callback's own hooks by timed ones (instance attributes, which Lightning looks up first).

        Only the hooks its class overrides: the inherited ones are `pl.Callback`'s empty methods, whose dispatch
        Lightning pays for any callback (it is in the wall-time ratio), and wrapping them would time the clock.
        """
        for name in self.HOOKS:
            if getattr(type(callback), name) is getattr(pl.Callback, name):
                continue
            hook = getattr(callback, name)

            def timed(*args: object, _hook: Callable[..., object] = hook, **kwargs: object) -> object:
                start = time.perf_counter()
                try:
                    return _hook(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(callback, name, timed)
        return callback


class StepClock(pl.Callback):
    """Wall time of the training loop alone: from the start of the first batch to the end of training."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.seconds = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, *args: object) -> None:
        assert self.start is not None
        self.seconds = time.perf_counter() - self.start


def steady_lightning_loop(preset: str, steps: int) -> float:
    """Seconds per step of Lightning's training loop on the preset, timed like `plain_loop`.

    No validation, and the Trainer's fixed start-up cost (setup, hooks before the first batch) left out: both
    sides time the same forward, loss, backward and optimizer step, plus what Lightning adds around them.
    """
    data, model, config = load_preset(preset)
    clock = StepClock()
    trainer = quiet_trainer(
        steps, [clock], log_every_n_steps=config["trainer"].get("log_every_n_steps", 50), limit_val_batches=0
    )
    trainer.fit(model, data)
    return clock.seconds / steps


def lightning_loop(
    preset: str,
    steps: int,
    callbacks: Callable[[], list[pl.Callback]] = list,
    own_shares: list[float] | None = None,
) -> float:
    """Seconds per step of the whole `Trainer.fit` on the preset, with some callbacks: what a user waits for.

    The preset's validation cadence, the Trainer's start-up and the callbacks' start-of-training measurements
    are included.

    With `own_shares`, the callbacks' hooks are timed and their time over the rest of the fit is appended to it.
    """
    data, model, config = load_preset(preset)
    log_every = config["trainer"].get("log_every_n_steps", 50)
    clock = HookClock()
    chosen = [clock.wrap(c) for c in callbacks()] if own_shares is not None else callbacks()
    trainer = quiet_trainer(steps, chosen, log_every_n_steps=log_every)
    start = time.perf_counter()
    trainer.fit(model, data)
    elapsed = time.perf_counter() - start
    if own_shares is not None:
        own_shares.append(clock.seconds / max(elapsed - clock.seconds, 1e-9))
    return elapsed / steps


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
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run (default: per preset and table)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats} interleaved runs")
    header = f"{'preset':<22} {'plain ms/step':>13} {'Lightning ms/step':>17} {'ratio (steps/s, L/plain)':>25}"
    print(header)
    rows = []
    for preset in args.presets:
        steps = args.steps or THROUGHPUT_STEPS[preset]
        plain, light = best_of(
            args.repeats, partial(plain_loop, preset, steps), partial(steady_lightning_loop, preset, steps)
        )
        rows.append(preset)
        print(f"{preset:<22} {plain * 1e3:>13.3f} {light * 1e3:>17.3f} {plain / light:>25.2f}")

    # Per preset, one interleaved round: without callbacks, then each callback set, `repeats` times.
    print()
    print(
        f"{'preset':<22} {'callbacks':<24} {'without ms/step':>15} {'with ms/step':>12} {'ratio (with/without)':>21} "
        f"{'1 + own/rest (min-max)':>23} {'tangent measurements':>21} {'first (s)':>10}"
    )
    for preset in rows:
        steps = args.steps or CALLBACK_STEPS[preset]
        monitors: dict[str, list[CountingTangentMonitor]] = {}
        own: dict[str, list[float]] = {}
        runs = [partial(lightning_loop, preset, steps)]
        for name, make in CALLBACK_SETS:
            monitors[name], own[name] = [], []
            runs.append(partial(lightning_loop, preset, steps, partial(counted, make, monitors[name]), own[name]))
        without, *withs = best_of(args.repeats, *runs)
        for (name, _), with_ in zip(CALLBACK_SETS, withs, strict=True):
            counts = [m.measurements for m in monitors[name]]
            measured = f"{min(counts)}-{max(counts)}" if counts else "-"
            firsts = [m.first_cost for m in monitors[name] if m.first_cost is not None]
            first = f"{min(firsts):.2f}-{max(firsts):.2f}" if firsts else "-"
            own_ratio = f"{1 + min(own[name]):.3f}-{1 + max(own[name]):.3f}"
            print(
                f"{preset:<22} {name:<24} {without * 1e3:>15.3f} {with_ * 1e3:>12.3f} {with_ / without:>21.3f} "
                f"{own_ratio:>23} {measured:>21} {first:>10}"
            )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


class CountingTangentMonitor(TangentGradientMonitor):
    """TangentGradientMonitor at its defaults that counts the measurements it made (skipped steps excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.measurements = 0
        self.first_cost: float | None = None  # seconds of the first measurement, which no budget can skip

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        self.measurements += 1
        metrics = super()._measure(trainer, pl_module)
        if self.first_cost is None:
            self.first_cost = self._last_cost
        return metrics


def counted(make: Callable[[], list[pl.Callback]], monitors: list[CountingTangentMonitor]) -> list[pl.Callback]:
    """The callbacks of `make`, remembering the tangent monitors among them (to count their measurements)."""
    callbacks = make()
    monitors.extend(c for c in callbacks if isinstance(c, CountingTangentMonitor))
    return callbacks


# Each at its defaults; "all four" is the full set a user would run (the detector then gates the tangent monitor).
CALLBACK_SETS: list[tuple[str, Callable[[], list[pl.Callback]]]] = [
    ("NormDescentMonitor", lambda: [NormDescentMonitor()]),
    ("ZeroLossDetector", lambda: [ZeroLossDetector()]),
    ("TangentGradientMonitor", lambda: [CountingTangentMonitor()]),
    ("FourierEmbeddingMonitor", lambda: [FourierEmbeddingMonitor()]),
    (
        "all four",
        lambda: [ZeroLossDetector(), NormDescentMonitor(), CountingTangentMonitor(), FourierEmbeddingMonitor()],
    ),
]

if __name__ == "__main__":
    main()
