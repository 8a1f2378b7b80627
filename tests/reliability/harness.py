"""What the reliability tests share: the tasks they train, a logger that keeps every call, and state witnesses.

No pytest here: the distributed tests' subprocess scripts import this module too.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from grok_lightning import GrokkingModule, ModularArithmeticDataModule
from reliability.registry import Setting

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ("paper_mlp_mse_gd", "mlp_ce_adamw", "transformer_ce_adamw")
# Smaller than the presets where a measurement would take seconds; the code paths (loss, optimizer, architecture,
# encoding) stay those of the preset.
SHRINK: dict[str, dict[str, dict[str, Any]]] = {
    "paper_mlp_mse_gd": {},
    "mlp_ce_adamw": {"data": {"p": 23}, "model": {"hidden": 32}},
    "transformer_ce_adamw": {"data": {"p": 13}, "model": {"d_model": 16, "n_heads": 2, "d_mlp": 32}},
}

# The tiny task of the distributed and resume tests: (a + b) mod 7 over unordered pairs, 20 training rows and 8
# held out (even: two ranks get equal shards, so DDP's mean of shard gradients is the full-batch gradient), a
# bias-free ReLU MLP of width 32, MSE, full-batch SGD, validation every 10 steps.
TINY_DATA = {
    "p": 7,
    "pairs": "unordered",
    "train_fraction": 0.72,
    "encoding": "one_hot_sum",
    "target": "one_hot",
    "steps_per_epoch": 10,
}
TINY_MODEL = {"hidden": 32, "loss": "mse", "optimizer": "sgd", "lr": 0.5, "weight_decay": 0.01}
TINY_STEPS = 60
# Measured on seed 0 (every check at a multiple of 5, patience 2): the full training loss is ≤ 0.3 from the check
# of step 30 on, so the detector records memorization at 30 and confirms it at 35. val/loss, which rises as the
# tiny model memorizes, passes 1.6 at the validation after step 40: counted at the check of step 45, confirmed
# at 55 (the validation after step 50). Not grokking, but a validation metric crossing a threshold mid-run, which
# is what the detector's bookkeeping sees.
TINY_SETTING = Setting(every_n_steps=5, loss_threshold=0.3, monitor="val/loss", val_threshold=1.6)


def preset(name: str, steps_per_epoch: int | None = None) -> tuple[GrokkingModule, ModularArithmeticDataModule]:
    """The module and data of ``examples/configs/{name}.yaml``, shrunk by :data:`SHRINK`, seeded as the CLI seeds."""
    config = yaml.safe_load((ROOT / "examples" / "configs" / f"{name}.yaml").read_text())
    data = {**config["data"], **SHRINK[name].get("data", {})}
    if steps_per_epoch is not None:
        data["steps_per_epoch"] = steps_per_epoch
    model = {**config["model"], **SHRINK[name].get("model", {})}
    pl.seed_everything(config["seed_everything"], verbose=False)  # LightningCLI seeds before it builds both
    datamodule = ModularArithmeticDataModule(**data)
    module = GrokkingModule(p=data["p"], encoding=data["encoding"], **model)  # the CLI links p and encoding
    return module, datamodule


def tiny_task(
    module_class: type[GrokkingModule] = GrokkingModule,
) -> tuple[GrokkingModule, ModularArithmeticDataModule]:
    """The tiny task (:data:`TINY_DATA`, :data:`TINY_MODEL`), seeded."""
    pl.seed_everything(0, verbose=False)
    datamodule = ModularArithmeticDataModule(**TINY_DATA)
    module = module_class(p=TINY_DATA["p"], encoding=TINY_DATA["encoding"], **TINY_MODEL)
    return module, datamodule


def tiny_trainer(recorder: Logger, callbacks: Iterable[Callback], **overrides: Any) -> pl.Trainer:
    """The Trainer of the tiny task: CPU, ``TINY_STEPS`` steps logged every 2 to ``recorder``, nothing else on."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": TINY_STEPS,
        "logger": recorder,
        "log_every_n_steps": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "callbacks": list(callbacks),
    }
    options.update(overrides)
    return pl.Trainer(**options)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call, on every rank, in order: ``entries`` is a list of (step, key, value)."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[tuple[int, str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.entries.append((int(step), key, float(value)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, prefixes: Iterable[str] = ("grok/",)) -> dict[str, list[tuple[int, float]]]:
        """Every logged value of the keys that start with one of ``prefixes``, by key, in logging order."""
        out: dict[str, list[tuple[int, float]]] = {}
        for step, key, value in self.entries:
            if key.startswith(tuple(prefixes)):
                out.setdefault(key, []).append((step, value))
        return out


# ---------------------------------------------------------------------------------------------- training state


def capture(trainer: pl.Trainer, module: nn.Module) -> dict[str, Any]:
    """Everything a callback must leave as it found it: weights, gradients, buffers, modes, optimizer, RNG."""
    state: dict[str, Any] = {}
    for name, p in module.named_parameters():
        state[f"param/{name}"] = p.detach().clone()
        state[f"grad/{name}"] = None if p.grad is None else p.grad.detach().clone()
        state[f"requires_grad/{name}"] = p.requires_grad
    for name, b in module.named_buffers():
        state[f"buffer/{name}"] = b.detach().clone()
    state["training_modes"] = tuple(m.training for m in module.modules())
    state["grad_enabled"] = torch.is_grad_enabled()
    state["rng/torch"] = torch.get_rng_state()
    state["rng/python"] = random.getstate()
    state["rng/numpy"] = pickle.dumps(np.random.get_state())
    for i, optimizer in enumerate(trainer.optimizers):
        saved = optimizer.state_dict()
        for index, entries in saved["state"].items():
            for key, value in entries.items():
                state[f"optimizer{i}/state/{index}/{key}"] = value.clone() if isinstance(value, Tensor) else value
        for j, group in enumerate(saved["param_groups"]):
            state[f"optimizer{i}/group{j}"] = {k: v for k, v in group.items() if k != "params"}
    return state


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of tensors (dtype, shape, values), plain equality otherwise."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The keys whose values differ, or that only one side has."""
    return sorted(
        k for k in before.keys() | after.keys() if k not in before or k not in after or not same(before[k], after[k])
    )


def disabled(callbacks: Iterable[Callback]) -> list[str]:
    """The callbacks a fault disabled (a swallowed exception would otherwise pass unnoticed)."""
    return [type(c).__name__ for c in callbacks if getattr(c, "disabled", False)]


def overridden_hooks(callback: Callback) -> set[str]:
    """The Lightning hooks ``callback``'s class defines itself (or inherits from a class other than Callback)."""
    hooks = {name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown")}
    return {name for name in hooks if getattr(type(callback), name) is not getattr(Callback, name)}


class Witnesses:
    """State witnesses placed between the callbacks of a Trainer: each callback's hooks run between two of them.

    ``Witnesses(callbacks).interleaved`` is ``[w0, c1, w1, c2, w2, …]``. Lightning calls a hook on callbacks in
    list order, so any change between two witnesses at one hook call is the doing of the callback between them;
    each one is listed in ``changes`` as (callback name, hook, global_step, changed key). Witnesses look at the hooks
    some watched callback overrides.
    """

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks
        self.hooks = set().union(*(overridden_hooks(c) for c in callbacks)) if callbacks else set()
        self.changes: list[tuple[str, str, int, str]] = []
        self.observed: dict[str, int] = {}  # hook → calls observed, to show the witnesses saw something
        self._previous: dict[str, Any] | None = None
        witnesses = [_Witness(self, i) for i in range(len(callbacks) + 1)]
        self.interleaved: list[Callback] = [witnesses[0]]
        for callback, witness in zip(callbacks, witnesses[1:], strict=True):
            self.interleaved += [callback, witness]

    def observe(self, index: int, hook: str, trainer: pl.Trainer, module: nn.Module) -> None:
        if hook not in self.hooks:
            return
        state = capture(trainer, module)
        if index > 0 and self._previous is not None:
            name = type(self.callbacks[index - 1]).__name__
            self.changes += [(name, hook, trainer.global_step, key) for key in differences(self._previous, state)]
        else:
            self.observed[hook] = self.observed.get(hook, 0) + 1
        self._previous = state


class _Witness(Callback):
    def __init__(self, witnesses: Witnesses, index: int) -> None:
        self.witnesses = witnesses
        self.index = index


def _observer(hook: str) -> Any:
    def observe(self: _Witness, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self.witnesses.observe(self.index, hook, trainer, pl_module)

    return observe


for _hook in [name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown")]:
    if _hook not in ("on_exception", "on_save_checkpoint", "on_load_checkpoint"):
        setattr(_Witness, _hook, _observer(_hook))
