"""Build the reference presets from their LightningCLI configs, for benchmarks that time them outside the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from grok_lightning import GrokkingModule, ModularArithmeticDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
PRESETS = ("paper_mlp_mse_gd", "mlp_ce_adamw", "transformer_ce_adamw")


def load_preset(name: str, seed: int = 0) -> tuple[ModularArithmeticDataModule, GrokkingModule, dict[str, Any]]:
    """The data module and a freshly initialized module of a preset (same seed, same weights), and its config."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    data = ModularArithmeticDataModule(**config["data"])
    torch.manual_seed(seed)
    model = GrokkingModule(p=data.p, encoding=data.encoding, **config["model"])
    return data, model, config


def quiet_trainer(max_steps: int, callbacks: list[pl.Callback] | None = None, **kwargs: Any) -> pl.Trainer:
    """A Trainer with nothing on screen, no checkpoints and no logger unless one is given."""
    options: dict[str, Any] = {
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks or [],
    }
    options.update(kwargs)
    return pl.Trainer(**options)
