"""Launched by ``test_distributed.py``: the tiny task with every callback under 2-process CPU DDP (gloo), then with
the callbacks that support sharding under FSDP2 (``fully_shard`` through Lightning's ``ModelParallelStrategy``).

Usage: ``python ddp_run.py OUT_DIR``. Each rank writes ``OUT_DIR/{ddp,fsdp}_rank{r}.json``: every ``log_metrics``
call it made, the ``grok/`` entries of ``trainer.callback_metrics`` after every batch, the detector's events, the final
weights, and under DDP every collective it called, with the callback whose hook called it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy

from grok_lightning import GrokkingModule, ZeroLossDetector
from reliability.harness import TINY_SETTING, RecordingLogger, disabled, tiny_task, tiny_trainer
from reliability.registry import CALLBACKS

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter_tensor",
    "scatter",
    "all_to_all",
)
OWNER = ["lightning"]  # whose hook is running: set by the Owner markers between the callbacks
CALLS: list[tuple[str, str]] = []
SHARDED: dict[str, list[bool]] = {}  # by callback: whether the weights were DTensors when its hooks began


def _counted(name: str, collective: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        CALLS.append((OWNER[0], name))
        return collective(*args, **kwargs)

    return call


for _name in COLLECTIVES:
    setattr(dist, _name, _counted(_name, getattr(dist, _name)))


class Owner(Callback):
    """Marks the callback whose hooks run next (``"lightning"`` after the last callback)."""

    def __init__(self, name: str) -> None:
        self.name = name


def _marker(hook: str) -> Any:
    def mark(self: Owner, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        OWNER[0] = self.name
        if hook in ("on_train_start", "on_train_batch_end"):  # where the callbacks measure
            sharded = all(hasattr(p, "full_tensor") for p in pl_module.parameters())
            SHARDED.setdefault(self.name, []).append(sharded)

    return mark


for _hook in [name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown")]:
    setattr(Owner, _hook, _marker(_hook))


class Dump(Callback):
    """``grok/`` values in ``callback_metrics`` after every batch; everything to JSON at the end of the fit."""

    def __init__(self, out: Path, kind: str, recorder: RecordingLogger, callbacks: list[Callback]) -> None:
        self.out, self.kind, self.recorder, self.callbacks = out, kind, recorder, callbacks
        self.metrics: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.metrics[trainer.global_step] = {k: float(v) for k, v in metrics.items() if k.startswith("grok/")}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():  # the whole weights: DTensors gather theirs on every rank
            weights = [(p.full_tensor() if hasattr(p, "full_tensor") else p).tolist() for p in pl_module.parameters()]
        detector = next(c for c in self.callbacks if isinstance(c, ZeroLossDetector))
        record = {
            "entries": self.recorder.entries,
            "metrics": self.metrics,
            "events": [detector.memorized_step, detector.generalized_step],
            "weights": weights,
            "sharded": SHARDED,
            "disabled": disabled(self.callbacks),
            "calls": CALLS,
        }
        (self.out / f"{self.kind}_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class ShardedTiny(GrokkingModule):
    """The tiny task's MLP, its layers sharded over the data-parallel ranks by FSDP2."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def fit(out: Path, kind: str) -> None:
    module, data = tiny_task(GrokkingModule if kind == "ddp" else ShardedTiny)
    specs = [spec for spec in CALLBACKS if spec.applies(module) and (kind == "ddp" or spec.sharded)]
    if kind == "fsdp":
        # The detector last: its no-grad forward leaves FSDP2's root module unsharded until the next backward, so
        # callbacks after it would read whole tensors; before it they read the shards.
        specs.sort(key=lambda spec: spec.cls is ZeroLossDetector)
    callbacks = [spec.make(TINY_SETTING) for spec in specs]
    recorder = RecordingLogger()
    interleaved: list[Callback] = []
    for callback in callbacks:
        interleaved += [Owner(type(callback).__name__), callback]
    strategy = "ddp" if kind == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = tiny_trainer(
        recorder,
        [*interleaved, Owner("lightning"), Dump(out, kind, recorder, callbacks)],
        devices=2,
        strategy=strategy,
    )
    CALLS.clear()
    SHARDED.clear()
    trainer.fit(module, data)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    fit(out, "ddp")
    fit(out, "fsdp")
