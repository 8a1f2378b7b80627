"""The paper's toy manifolds, trained by Lightning with the callbacks attached.

"1+1=2": ŷ = w₁x₁ + w₂x₂ fits the single sample (1, 1) → 2 by gradient descent on (ŷ − 2)² + λ‖w‖² from
(−1, 1), for the paper's λ ∈ {0.01, 0.1, 0.2} (PyTorch ``weight_decay = 2λ``: the toys sum the squared error
over samples, the paper's loss, and SGD adds ``weight_decay·w`` to its gradient). The run reaches the zero-loss
line w₁ + w₂ = 2 near (0, 2) within a few steps (memorized: "1 + 0 = 0", "0 + 1 = 2"), then weight decay slides it
along the line to (1, 1) (generalized). "1+1+1=3" does the same with three weights from several starts and ends
at (1, 1, 1).

With λ > 0 the end point is the minimizer of the regularized loss, c·(1, …, 1) with c = d/(d + λ) (d weights),
not exactly (1, …, 1): the script prints both.

Usage::

    python examples/toy_manifolds.py --out runs/toys
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from grok_lightning import NormDescentMonitor, ZeroLossDetector
from grok_lightning.reference import LinearToyModule, ToyDataModule

LAMBDAS_2D = (0.01, 0.1, 0.2)
STARTS_3D = ((-1.0, 1.0, 0.0), (2.0, -1.0, 0.5), (0.0, 0.0, 3.0), (3.0, 3.0, -3.0))


class Trajectory(pl.Callback):
    """The weights before the first step and after every step, (steps + 1, d)."""

    def __init__(self) -> None:
        self.points: list[list[float]] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.points = [pl_module.weight.detach().tolist()]

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.points.append(pl_module.weight.detach().tolist())


def steps_to_settle(lam: float, lr: float = 0.1, e_folds: float = 7.0) -> int:
    """Steps after which the slide along the manifold, shrinking by (1 − 2·lr·λ) per step, is e^(−e_folds) done."""
    return math.ceil(e_folds / (2 * lr * lam))


def run_toy(
    start: tuple[float, ...], lam: float, lr: float = 0.1, steps: int | None = None, val_every: int = 25
) -> dict[str, Any]:
    """Train the toy "1+…+1=d" from ``start`` with the paper's λ (``weight_decay = 2λ``) and report the path.

    ``steps`` defaults to :func:`steps_to_settle`.

    Returns:
        The trajectory, the detector's memorization and generalization steps, the point at memorization, the
        end point, the regularized fixed point c·(1, …, 1), and the last NormDescentMonitor values.
    """
    d = len(start)
    steps = steps or steps_to_settle(lam, lr)
    model = LinearToyModule(start=start, lr=lr, weight_decay=2 * lam)
    data = ToyDataModule(inputs=[[1.0] * d], targets=[float(d)], steps_per_epoch=val_every)
    # Regression targets have no accuracy: memorized = loss ≤ 0.05, i.e. |Σw − d| ≤ 0.22 (with λ > 0 the loss
    # settles at (d·λ/(d + λ))², above any much smaller threshold).
    detector = ZeroLossDetector(every_n_steps=1, acc_threshold=None, loss_threshold=0.05, monitor="val/acc")
    norms = NormDescentMonitor(every_n_steps=1, window=10)
    path = Trajectory()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        log_every_n_steps=val_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[detector, norms, path],
    )
    trainer.fit(model, data)
    memorized = detector.memorized_step
    fixed = d / (d + lam)  # argmin of (Σw − d)² + λ‖w‖² is c·(1, …, 1) with c·d·(d + λ) = d²
    return {
        "start": list(start),
        "lambda": lam,
        "weight_decay": 2 * lam,
        "lr": lr,
        "steps": trainer.global_step,
        "memorized_step": memorized,
        "generalized_step": detector.generalized_step,
        "at_memorization": None if memorized is None else path.points[memorized],
        "end": path.points[-1],
        "fixed_point": [fixed] * d,
        "effective_tangent_fraction": float(trainer.callback_metrics.get("grok/effective_tangent_fraction", "nan")),
        "trajectory": path.points,
    }


def plot(runs_2d: list[dict[str, Any]], runs_3d: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    grid = torch.linspace(-1.5, 2.5, 200)
    w1, w2 = torch.meshgrid(grid, grid, indexing="xy")
    loss = (w1 + w2 - 2) ** 2
    contours = left.contour(w1.numpy(), w2.numpy(), loss.numpy(), levels=[0.05, 0.25, 1, 2, 4, 8], colors="0.75")
    left.clabel(contours, fontsize=7)
    left.plot([-1.5, 2.5], [3.5, -0.5], "k-", lw=1, label="zero-loss line w₁ + w₂ = 2")
    for run, color in zip(runs_2d, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        points = torch.tensor(run["trajectory"])
        left.plot(points[:, 0], points[:, 1], ".-", color=color, ms=2, lw=1, label=f"λ = {run['lambda']}")
        if run["at_memorization"] is not None:
            left.plot(*run["at_memorization"], "s", color=color, ms=6)
        left.plot(*run["end"], "*", color=color, ms=11)
    left.plot(-1, 1, "ko", ms=5)
    left.set(xlabel="w₁", ylabel="w₂", title="1+1=2 from (−1, 1): ■ memorized, ★ end", aspect="equal")
    left.set(xlim=(-1.5, 2.5), ylim=(-0.5, 2.5))
    left.legend(loc="upper right", fontsize=8)

    for run in runs_3d:
        points = torch.tensor(run["trajectory"])
        distance = (points - 1.0).norm(dim=1)
        right.semilogy(distance, label=f"start {tuple(run['start'])}")
    right.axhline(
        3**0.5 * (1 - runs_3d[0]["fixed_point"][0]), color="0.5", ls="--", lw=1, label="fixed point c·(1,1,1)"
    )
    right.set(xlabel="optimizer step", ylabel="‖w − (1, 1, 1)‖", title=f"1+1+1=3, λ = {runs_3d[0]['lambda']}")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _fmt(point: list[float] | None) -> str:
    return "—" if point is None else "(" + ", ".join(f"{x:.3f}" for x in point) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/toys")
    parser.add_argument("--lambda-3d", type=float, default=0.1)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    runs_2d = [run_toy((-1.0, 1.0), lam) for lam in LAMBDAS_2D]
    runs_3d = [run_toy(s, args.lambda_3d) for s in STARTS_3D]
    wall = time.perf_counter() - start
    print("1+1=2 from (−1, 1), lr 0.1, weight_decay = 2λ:")
    for run in runs_2d:
        print(
            f"  λ={run['lambda']:<5} memorized at step {run['memorized_step']} at {_fmt(run['at_memorization'])}; "
            f"generalized (val/acc ≥ 0.99) at step {run['generalized_step']}; end after {run['steps']} steps "
            f"{_fmt(run['end'])}; regularized fixed point {_fmt(run['fixed_point'])}"
        )
    print(f"1+1+1=3, λ={args.lambda_3d}, lr 0.1:")
    for run in runs_3d:
        print(
            f"  start {_fmt(run['start'])}: memorized at step {run['memorized_step']} at "
            f"{_fmt(run['at_memorization'])}; end after {run['steps']} steps {_fmt(run['end'])}; "
            f"fixed point {_fmt(run['fixed_point'])}"
        )
    print(f"wall time {wall:.1f} s")
    (out / "toys.json").write_text(json.dumps({"2d": runs_2d, "3d": runs_3d, "wall_seconds": round(wall, 1)}))
    plot(runs_2d, runs_3d, out / "toy_manifolds.png")
    print(f"wrote {out / 'toys.json'} and {out / 'toy_manifolds.png'}")


if __name__ == "__main__":
    main()
