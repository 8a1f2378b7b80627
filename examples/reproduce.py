"""Train a reference grokking setup from a LightningCLI config and watch it grok.

Usage::

    python examples/reproduce.py fit --config examples/configs/paper_mlp_mse_gd.yaml
    python examples/reproduce.py fit --config examples/configs/mlp_ce_adamw.yaml --trainer.max_steps 2000

TensorBoard logs, the resolved ``config.yaml``, ``summary.json`` (steps to memorize and to generalize,
final metrics, wall time) and ``curves.png`` land in ``runs/<name>/version_<n>/``. A ZeroLossDetector and a
NormDescentMonitor are attached by default (configure them under ``detector.*`` and ``norm_monitor.*``);
add other callbacks with ``--trainer.callbacks+=``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_summary import RunSummary

from grok_lightning import GrokkingModule, ModularArithmeticDataModule, NormDescentMonitor, ZeroLossDetector


class GrokkingCLI(LightningCLI):
    """LightningCLI with the data's modulus and encoding linked into the model, and the monitors attached."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.p", "model.p")
        parser.link_arguments("data.encoding", "model.encoding")
        parser.add_lightning_class_args(ZeroLossDetector, "detector")
        parser.add_lightning_class_args(NormDescentMonitor, "norm_monitor")
        parser.add_lightning_class_args(RunSummary, "summary")


def main(args: list[str] | None = None) -> GrokkingCLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_float32_matmul_precision("high")
    return GrokkingCLI(
        GrokkingModule,
        ModularArithmeticDataModule,
        seed_everything_default=0,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "grokking"},
            },
            "enable_checkpointing": False,
            "enable_model_summary": False,
        },
        args=args,
    )


if __name__ == "__main__":
    main()
