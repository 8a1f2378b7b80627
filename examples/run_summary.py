"""A small callback for the example scripts: keep the curves of a run, then write a summary and a figure.

Not part of the library: it records what the reproduction scripts report (``summary.json`` and
``curves.png`` in the run's log directory). The memorization and generalization steps come from the
:class:`~grok_lightning.ZeroLossDetector` when one is attached.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

log = logging.getLogger(__name__)

CURVE_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "grok/weight_norm", "grok/train_acc_full")


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class RunSummary(pl.Callback):
    """Record the curves at every validation, write ``summary.json`` and ``curves.png`` when fitting ends.

    Args:
        output_dir: Where to write; ``None`` uses the trainer's ``log_dir``.
        figure: Also draw the curves (needs matplotlib; skipped with a log line when it is missing).
    """

    def __init__(self, output_dir: str | None = None, figure: bool = True) -> None:
        self.output_dir = output_dir
        self.figure = figure
        self.history: list[dict[str, float]] = []
        self._start = 0.0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"step": float(trainer.global_step)}
        for key in CURVE_KEYS:
            value = _float(trainer.callback_metrics.get(key))
            if value is not None:
                row[key] = value
        self.history.append(row)

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The run in a few numbers: event steps, final metrics, wall time."""
        from grok_lightning.callbacks import find_zero_loss_detector

        detector = find_zero_loss_detector(trainer)
        final = {key: _float(value) for key, value in trainer.callback_metrics.items() if _float(value) is not None}
        return {
            "memorized_step": None if detector is None else detector.memorized_step,
            "generalized_step": None if detector is None else detector.generalized_step,
            "grok_delay": None if detector is None else detector.grok_delay,
            "steps": trainer.global_step,
            "wall_seconds": round(time.perf_counter() - self._start, 2),
            "final": dict(sorted(final.items())),
        }

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(self.output_dir or trainer.log_dir or ".")
        out.mkdir(parents=True, exist_ok=True)
        summary = self.summary(trainer)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "history.json").write_text(json.dumps(self.history) + "\n")
        log.info("summary written to %s", out / "summary.json")
        if self.figure:
            plot_curves(self.history, summary, out / "curves.png")


def plot_curves(history: list[dict[str, float]], summary: dict[str, Any], path: Path) -> None:
    """Train/val accuracy, loss and weight norm over optimizer steps, with the memorization and generalization steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no figure (pip install 'grok-lightning[plot]')")
        return
    if not history:
        return
    steps = [row["step"] for row in history]
    fig, (ax_acc, ax_loss, ax_norm) = plt.subplots(1, 3, figsize=(14, 3.6))
    for key, style in (("train/acc", "-"), ("val/acc", "-")):
        ax_acc.plot(steps, [row.get(key, math.nan) for row in history], style, label=key)
    for key in ("train/loss", "val/loss"):
        ax_loss.plot(steps, [row.get(key, math.nan) for row in history], label=key)
    ax_loss.set_yscale("log")
    ax_norm.plot(steps, [row.get("grok/weight_norm", math.nan) for row in history], color="tab:purple")
    ax_norm.set_ylabel("weight norm ‖θ‖")
    for ax in (ax_acc, ax_loss, ax_norm):
        for name, color in (("memorized_step", "tab:gray"), ("generalized_step", "tab:green")):
            if summary.get(name) is not None:
                ax.axvline(summary[name], color=color, linestyle="--", linewidth=1, label=name.replace("_", " "))
        ax.set_xlabel("optimizer step")
    ax_acc.legend(fontsize=8)
    ax_loss.legend(fontsize=8)
    ax_acc.set_ylabel("accuracy")
    ax_loss.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
