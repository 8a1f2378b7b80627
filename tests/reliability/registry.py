"""Every grok_lightning callback, with settings that make it measure often in a short run.

The reliability tests (no side effects, distributed, resume) run over :data:`CALLBACKS`: a callback added to the
package is covered by adding one :class:`CallbackSpec` here. This module imports no pytest, so the scripts that the
distributed tests launch in subprocesses can import it too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from grok_lightning import (
    Eq20AlignmentMonitor,
    FourierEmbeddingMonitor,
    GrokkingModule,
    NormDescentMonitor,
    TangentGradientMonitor,
    ZeroLossDetector,
)


@dataclass(frozen=True)
class Setting:
    """What a test asks of every callback."""

    every_n_steps: int = 5  # cadence of every callback that measures at one
    squared_error: bool = True  # the loss has its zero at finite outputs (enables the tangent monitor's θ′)
    embedding: Callable[[pl.LightningModule], Any] | None = None  # residue rows for FourierEmbeddingMonitor
    monitor: str = "val/acc"  # the detector's validation metric
    val_threshold: float = 0.99  # the detector's generalization threshold
    loss_threshold: float = 0.05  # the detector's memorization threshold
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # extra arguments, by callback name


@dataclass(frozen=True)
class CallbackSpec:
    """How to build one callback for a test, and which modules it can watch."""

    cls: type[Callback]
    arguments: Callable[[Setting], dict[str, Any]]  # the constructor's arguments for a setting
    keys: tuple[str, ...]  # keys it logs in any run long enough (a check that it measured)
    prefixes: tuple[str, ...]  # every key it logs starts with one of these
    applies: Callable[[pl.LightningModule], bool] = lambda module: True  # modules it does not refuse
    sharded: bool = False  # works under strategies that shard the parameters (FSDP)
    volatile: tuple[str, ...] = ()  # keys whose values are wall times: compared by step only

    @property
    def name(self) -> str:
        return self.cls.__name__

    def make(self, setting: Setting) -> Callback:
        """The callback for ``setting``, with the setting's overrides for it."""
        return self.cls(**{**self.arguments(setting), **setting.overrides.get(self.name, {})})


def _two_layer_mse(module: pl.LightningModule) -> bool:
    # Eq. 20 describes bias-free two-layer MLPs under a squared error only.
    hparams = getattr(module, "hparams", {})
    return (
        isinstance(module, GrokkingModule)
        and hparams.get("architecture") == "mlp"
        and hparams.get("loss") == "mse"
        and not hparams.get("bias")
    )


CALLBACKS: tuple[CallbackSpec, ...] = (
    CallbackSpec(
        ZeroLossDetector,
        lambda s: {
            "every_n_steps": s.every_n_steps,
            "loss_threshold": s.loss_threshold,
            "patience": 2,  # streaks of two checks: a resume may fall inside one
            "monitor": s.monitor,
            "val_threshold": s.val_threshold,
        },
        keys=("grok/train_loss_full", "grok/memorized", "grok/generalized"),
        prefixes=("grok/train_", "grok/memorized", "grok/generalized", "grok/grok_delay"),
        sharded=True,
    ),
    CallbackSpec(
        NormDescentMonitor,
        lambda s: {"every_n_steps": 1, "window": 4, "log_param_groups": True},
        keys=("grok/weight_norm", "grok/decay_rate_unconstrained", "grok/norm_descent_rate"),
        prefixes=(
            "grok/weight_norm",
            "grok/decay_rate_unconstrained",
            "grok/norm_descent_rate",  # not grok/norm_descent_rate_predicted: TangentGradientMonitor's
            "grok/effective_tangent_fraction",
            "grok/norm_timescale",
        ),
        sharded=True,
    ),
    CallbackSpec(
        TangentGradientMonitor,
        lambda s: {
            "every_n_steps": s.every_n_steps,
            "time_budget": None,  # measure at every measuring step: runs must be deterministic
            "update_window": 3,
            "projected_reference": s.squared_error,
            "probe_size": 8,  # a small dense J keeps each measurement cheap
        },
        keys=("grok/tangent/weight_fraction", "grok/tangent/grad_fraction", "grok/norm_descent_rate_predicted"),
        prefixes=("grok/tangent/", "grok/norm_descent_rate_predicted"),
        volatile=("grok/tangent/seconds",),
    ),
    CallbackSpec(
        FourierEmbeddingMonitor,
        lambda s: {"every_n_steps": s.every_n_steps, "top_k": 2, "embedding": s.embedding},
        keys=("grok/fourier/circle_roundness", "grok/fourier/top_power_fraction"),
        prefixes=("grok/fourier/",),
        sharded=True,
    ),
    CallbackSpec(
        Eq20AlignmentMonitor,
        lambda s: {"every_n_steps": s.every_n_steps, "update_window": 2},
        keys=("grok/eq20/readout_gap", "grok/eq20/update_cos"),
        prefixes=("grok/eq20/",),
        applies=_two_layer_mse,
    ),
)


def callbacks_for(module: pl.LightningModule, setting: Setting) -> list[Callback]:
    """Every registered callback that can watch ``module``, built for ``setting``, in registry order."""
    return [spec.make(setting) for spec in CALLBACKS if spec.applies(module)]


def specs_for(module: pl.LightningModule) -> list[CallbackSpec]:
    """The registered callbacks that can watch ``module``."""
    return [spec for spec in CALLBACKS if spec.applies(module)]


VOLATILE: frozenset[str] = frozenset(key for spec in CALLBACKS for key in spec.volatile)
