"""Shared helpers for the callback tests: tiny Trainers and reading back what loggers received."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger


@pytest.fixture
def tiny_trainer(tmp_path: Path):
    """A factory of small CPU Trainers that log every step to a CSV file under ``tmp_path``."""

    def make(callbacks=(), max_steps: int = 20, csv_logger: bool = True, **kwargs) -> pl.Trainer:
        options = {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "logger": CSVLogger(tmp_path, name="csv") if csv_logger else False,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "num_sanity_val_steps": 0,
            "callbacks": list(callbacks),
        }
        options.update(kwargs)
        return pl.Trainer(**options)

    return make


def _logged_by_step(trainer: pl.Trainer, key: str) -> dict[int, float]:
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    values = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get(key):
                values[int(row["step"])] = float(row[key])
    return values


def _toy_trajectory(start, lr: float, wd: float, steps: int, x=(1.0, 1.0), y: float = 2.0) -> torch.Tensor:
    w = torch.tensor(start, dtype=torch.float64)
    x = torch.tensor(x, dtype=torch.float64)
    trajectory = [w.clone()]
    for _ in range(steps):
        w = w - lr * (2 * (w @ x - y) * x + wd * w)
        trajectory.append(w.clone())
    return torch.stack(trajectory)


@pytest.fixture
def logged_by_step():
    """``logged_by_step(trainer, key)``: every value of ``key`` the trainer's CSVLogger wrote, by logged step."""
    return _logged_by_step


@pytest.fixture
def toy_trajectory():
    """``toy_trajectory(start, lr, wd, steps)``: SGD on (w·x − y)² with weight decay, by hand in float64.

    Returns the weights after 0, 1, …, ``steps`` steps, (steps + 1, d).
    """
    return _toy_trajectory
