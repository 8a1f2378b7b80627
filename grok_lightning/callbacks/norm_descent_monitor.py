"""NormDescentMonitor: how fast does weight decay drive the weight norm down?"""

from __future__ import annotations

import math
from collections import deque
from functools import cached_property
from typing import Any, NamedTuple

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from grok_lightning.callbacks._base import DiagnosticCallback, NanPolicy
from grok_lightning.callbacks._data import (
    decay_groups,
    is_publishing_step,
    log_pending,
    may_shard_parameters,
    next_publishing_step,
    optimizer_parameters,
    squared_norms,
)
from grok_lightning.callbacks._validation import check_flag, check_positive_int

__all__ = ["NormDescentMonitor"]


class _Sample(NamedTuple):
    step: int  # trainer.global_step of the measurement
    total: float  # ‖θ‖²
    groups: list[float]  # ‖θ_g‖² per param group
    unconstrained: float  # 2·Σ_g c_g·‖θ_g‖²
    group_unconstrained: list[float]  # 2·c_g·‖θ_g‖² per param group


class NormDescentMonitor(DiagnosticCallback):
    """Measure the descent of the squared weight norm ‖θ‖² and compare it with what weight decay alone would do.

    θ is every parameter the optimizers train (frozen ones, ``requires_grad=False``, are left out). Once the model
    sits on the zero-loss manifold, the loss gradient has no component along it and weight decay is the only force
    left: the norm shrinks at the rate ``2·Σ_g c_g·⟨θ_g, P_T θ_g⟩`` with ``c_g`` the decay per step of param group
    ``g`` (``lr·wd``). Unconstrained, with the whole of θ free to shrink, it would shrink at ``2·Σ_g c_g·‖θ_g‖²``.
    Their ratio estimates, without a Jacobian, the share of the weight that the manifold lets weight decay remove.

    Args:
        every_n_steps: The measuring grid: measure at multiples of this many optimizer steps
            (``trainer.global_step``), on those of them whose values can be published (see "Logged metrics").
        window: Steps over which the descent rate is measured: the rate at step t compares ‖θ‖² with the latest
            measurement at or before step ``t − window``.
        log_param_groups: Also log the norm, unconstrained rate and measured rate of each param group.
        nan_policy: What to do when ‖θ‖ is not finite at a measurement: ``"warn"`` (once) and skip it (the rates
            then span the last finite measurements), or ``"error"`` (raise).
        strict: Raise an exception of the monitor's own measurement instead of warning once and disabling the
            monitor for the rest of the run.

    Raises:
        ValueError: If an argument is not a positive integer (or a bool, for ``log_param_groups`` and ``strict``,
            or not a known ``nan_policy``), naming it and its value.
        MisconfigurationException: When fitting starts, if no optimizer holds trained parameters.
        RuntimeError: ``NonFiniteError``, with ``nan_policy="error"``, at a measurement where ‖θ‖ is not finite.

    Logged metrics (published to the loggers at the start of training, and to the loggers and
    ``trainer.callback_metrics`` on the Trainer's logging steps: every ``log_every_n_steps``, at ``max_steps``
    and where training stops (``trainer.should_stop``). A logging step t publishes the measurement at the latest
    multiple of ``every_n_steps`` at or before t, under the step it was taken at, unless it is published already.
    Measured on the steps it publishes and at the bases of their windows, and at the start of a fresh fit: the same
    values, at the same steps, as measuring at every multiple of ``every_n_steps``. Rates are per optimizer step and
    positive when the norm shrinks):

    - ``grok/weight_norm``: ‖θ‖, in the parameters' units.
    - ``grok/decay_rate_unconstrained``: ``2·Σ_g c_g·‖θ_g‖²``, the decrease of ‖θ‖² per step that weight decay
      alone would cause, with ``lr`` and ``weight_decay`` read from the param groups when the step is measured
      (a per-step scheduler has then already set the next step's ``lr``).
    - ``grok/norm_descent_rate``: ``−Δ‖θ‖² / Δt`` over the last ``window`` steps, in squared units per step
      (from the first full window on).
    - ``grok/norm_descent_rate_relative``: ``grok/norm_descent_rate / ‖θ‖²``, in 1/step.
    - ``grok/effective_tangent_fraction``: the measured rate divided by the unconstrained rate averaged over the
      window's two ends (dimensionless; ≈ ‖P_Tθ‖²/‖θ‖² on the manifold; not logged without weight decay).
    - ``grok/norm_timescale``: ``‖θ‖² / grok/norm_descent_rate``, in steps, only while the norm shrinks.
    - With ``log_param_groups``: ``grok/weight_norm/{group}``, ``grok/decay_rate_unconstrained/{group}``,
      ``grok/norm_descent_rate/{group}``, where ``{group}`` is the group's ``"name"`` or ``pg{i}``
      (``opt{j}/pg{i}`` with several optimizers).

    With a ``TensorBoardLogger`` a custom-scalars chart ("grok" → "norm descent rate") draws the measured, the
    unconstrained and (when a monitor logs one) the predicted rate together.

    Notes:
        - ``c_g = lr·wd`` for AdamW's decoupled decay and for SGD (``lr·wd/(1 − momentum)`` with momentum, the
          heavy-ball steady state). The comparison with the theory is exact to first order in ``lr·wd`` for SGD;
          under AdamW the loss steps are preconditioned, which the theory does not cover: approximate there.
        - ``torch.optim.Adam`` (and other adaptive optimizers) with ``weight_decay > 0`` apply L2 through the
          preconditioner: the unconstrained rate does not describe them (one warning; values still logged).
        - Without weight decay anywhere: one warning; norm and measured rate are still logged.
        - Parameters sharded across ranks (FSDP, DeepSpeed, DTensor) are reduced across ranks, so every rank
          logs the norm of the whole model.
        - One host sync per measurement, and about two measurements per logging step (its value and its window's
          base): with ``log_every_n_steps=50`` and the defaults, 4 measurements per 100 steps. Between them a step
          costs a few integer comparisons.
        - The schedule is known in advance on the logging steps and at ``max_steps``. An epoch-bound run
          (``max_steps=-1``) publishes its last step only when it is a logging step, as Lightning's own step
          metrics. Where training stops (``trainer.should_stop``) on a multiple of ``every_n_steps``, the monitor
          measures too, its rate spanning back to the latest measurement at or before ``t − window`` (which can be
          more than ``window`` steps back); not under a strategy that shards the parameters, where every rank must
          measure alike (Lightning does not synchronize ``should_stop``). Otherwise the stop publishes what is
          pending: the latest measurement not yet published, if any.
        - A non-finite measurement that is skipped leaves the previous measurement pending, and a rate whose base
          was skipped spans back to the measurement before: both further back than with a measurement at every
          step. A run resumed with a larger ``max_steps`` than the checkpointed run had may likewise lack the exact
          base of its last step's window.
        - **Faults.** An exception inside a measurement (other than a configuration error) is reported once, as a
          ``RuntimeWarning`` with its type and message, and disables the monitor for the rest of the fit; training
          goes on. It has no collective under DDP, so a failure disables it on the failing rank alone; under a
          strategy that shards the parameters (FSDP, FSDP2, DeepSpeed), whose norms are all-reduced, the ranks
          agree on disabling it at its next measuring step (one extra all-reduce of a flag per measurement).
        - Works with gradient accumulation (at most one measurement per optimizer step), several param groups,
          schedulers, ``precision="bf16-mixed"``, manual optimization, frozen sub-modules (left out of θ),
          ``torch.compile``, ``limit_train_batches`` and minibatches. See ``docs/limitations.md``.

    Example:
        >>> monitor = NormDescentMonitor(every_n_steps=1, window=10)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=10)
    """

    RATE_CHART_TAGS: tuple[str, ...] = (
        r"grok/norm_descent_rate$",
        r"grok/decay_rate_unconstrained$",
        r"grok/.*predicted",
    )

    def __init__(
        self,
        every_n_steps: int = 1,
        window: int = 10,
        log_param_groups: bool = False,
        nan_policy: NanPolicy = "warn",
        strict: bool = False,
    ) -> None:
        super().__init__(nan_policy=nan_policy, strict=strict)
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("window", window)
        check_flag("log_param_groups", log_param_groups)
        self.every_n_steps = every_n_steps
        self.window = window
        self.log_param_groups = log_param_groups
        self._history: deque[_Sample] = deque()
        self._pending: dict[str, float] = {}  # the latest measurement, not yet published
        self._pending_step = -1
        self._published_steps: tuple[int, ...] = ()

    @cached_property  # read by Lightning at every hook call (profiler names); built once from the arguments
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, window=self.window)

    def _publishes(self, step: int, trainer: pl.Trainer) -> bool:
        # Whether a logging step publishes the measurement at `step`: one in [step, step + every_n_steps).
        upcoming = next_publishing_step(trainer, step)
        return upcoming is not None and upcoming < step + self.every_n_steps

    def _scheduled(self, step: int, trainer: pl.Trainer) -> bool:
        """Whether a measurement at ``step`` can be published, or is the base of a published rate's window.

        Almost every measurement at every multiple of ``every_n_steps`` would be thrown away: only the latest before
        a logging step is published, and only the latest at or before ``t − window`` serves as the base of the rate
        at t. The schedule depends on ``global_step``, ``log_every_n_steps`` and ``max_steps`` alone, the same on
        every rank, as the all-reduces of sharded norms need.
        """
        if step % self.every_n_steps:
            return False
        if self._publishes(step, trainer):
            return True
        # The base of the rate at the one multiple m of every_n_steps with m − window in [step, step + every_n_steps).
        later = -(-(step + self.window) // self.every_n_steps) * self.every_n_steps
        return self._publishes(later, trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not optimizer_parameters(trainer):
            raise MisconfigurationException(
                "NormDescentMonitor needs an optimizer to know which parameters are trained, but the trainer's "
                f"optimizers {[type(o).__name__ for o in trainer.optimizers]} hold no trained parameters (with "
                "requires_grad=True). Return one from `configure_optimizers`."
            )
        self._check_optimizers(trainer)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                layout = {"grok": {"norm descent rate": ["Multiline", list(self.RATE_CHART_TAGS)]}}
                logger.experiment.add_custom_scalars(layout)
        # A fresh start measures θ where training begins; a resumed run (its history restored) keeps the schedule
        # of the uninterrupted run, which has measured its resume step already when that step was needed.
        step = trainer.global_step
        due = not self._history or (self._history[-1].step != step and self._scheduled(step, trainer))
        if due and self._agree(trainer):
            self._measure_into_pending(trainer)
            if self._pending:
                self._publish(trainer, None)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._history or self._history[-1].step != step:
            # trainer.should_stop may be set on one rank alone (Lightning does not synchronize it): it adds a
            # measurement only where no rank waits for the others in a collective.
            due = self._scheduled(step, trainer) or (
                trainer.should_stop and step % self.every_n_steps == 0 and not self._collective(trainer)
            )
            if due:
                if not self._agree(trainer):  # a sync point under sharding strategies
                    return
                self._measure_into_pending(trainer)
        if self._pending and is_publishing_step(trainer):
            self._publish(trainer, pl_module)

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None) -> None:
        # Values are published on the steps the Trainer's loggers write, like the module's own `self.log` values;
        # into callback_metrics directly (log_pending: ~0.14 ms where six `pl_module.log` calls take ~3 ms).
        if self._pending_step not in self._published_steps:
            for logger in trainer.loggers:
                logger.log_metrics(self._pending, step=self._pending_step)
            self._published_steps = (self._pending_step,)
        if pl_module is None:  # on_train_start: loggers only (callback_metrics get the next logging step's values)
            return
        log_pending(pl_module, self._pending)
        self._pending = {}

    @override
    def _collective(self, trainer: pl.Trainer) -> bool:
        return may_shard_parameters(trainer)  # sharded norms are all-reduced

    def _measure_into_pending(self, trainer: pl.Trainer) -> None:
        metrics = self._measure(trainer)
        if metrics is not None:  # None: not finite, skipped; an earlier unpublished measurement stays pending
            self._pending = metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [tuple(sample) for sample in self._history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = deque(_Sample(*sample) for sample in state_dict["history"])

    def _check_optimizers(self, trainer: pl.Trainer) -> None:
        groups = decay_groups(trainer)
        for g in groups:
            if g.weight_decay <= 0:
                continue
            name = type(g.optimizer).__name__
            if g.coupling == "preconditioned":
                self._warn(
                    f"preconditioned/{name}",
                    f"NormDescentMonitor: {name} with weight_decay > 0 applies L2 decay through its adaptive "
                    "preconditioner, so `grok/decay_rate_unconstrained` (and the tangent fraction built on it) "
                    "does not apply; both are still logged. Use AdamW for decoupled weight decay.",
                )
            elif g.coupling == "unknown":
                self._warn(
                    f"unknown/{name}",
                    f"NormDescentMonitor: unknown optimizer {name}; its weight decay is assumed decoupled "
                    "(θ ← θ·(1 − lr·wd) per step) for `grok/decay_rate_unconstrained`.",
                )
        if all(g.weight_decay <= 0 for g in groups):
            self._warn(
                "no_weight_decay",
                "NormDescentMonitor: no param group has weight decay, so nothing drives the norm down along the "
                "zero-loss manifold. Norms and measured rates are still logged; "
                "`grok/effective_tangent_fraction` is not.",
            )

    def _measure(self, trainer: pl.Trainer) -> dict[str, float] | None:
        step = trainer.global_step
        groups = decay_groups(trainer)
        squares = squared_norms([g.params for g in groups], trainer).tolist()  # host sync: values to log
        if not math.isfinite(sum(squares)):
            self._non_finite(trainer, "the weight norm ‖θ‖")
            return None
        group_unconstrained = [2.0 * g.decay_per_step * s for g, s in zip(groups, squares, strict=True)]
        sample = _Sample(step, sum(squares), squares, sum(group_unconstrained), group_unconstrained)

        metrics = {"grok/weight_norm": math.sqrt(sample.total), "grok/decay_rate_unconstrained": sample.unconstrained}
        if self.log_param_groups:
            for g, s, u in zip(groups, squares, group_unconstrained, strict=True):
                metrics[f"grok/weight_norm/{g.name}"] = math.sqrt(s)
                metrics[f"grok/decay_rate_unconstrained/{g.name}"] = u

        # The window: the latest earlier measurement at least `window` steps back.
        base = None
        for earlier in self._history:
            if earlier.step <= step - self.window:
                base = earlier
        if base is not None:
            span = step - base.step
            rate = -(sample.total - base.total) / span
            metrics["grok/norm_descent_rate"] = rate
            if sample.total > 0:
                metrics["grok/norm_descent_rate_relative"] = rate / sample.total
            mean_unconstrained = 0.5 * (base.unconstrained + sample.unconstrained)
            if mean_unconstrained > 0:
                metrics["grok/effective_tangent_fraction"] = rate / mean_unconstrained
            if rate > 0:
                metrics["grok/norm_timescale"] = sample.total / rate
            if self.log_param_groups and len(base.groups) == len(squares):
                for g, now, before in zip(groups, squares, base.groups, strict=True):
                    metrics[f"grok/norm_descent_rate/{g.name}"] = -(now - before) / span

        # Keep the base of the next windows, drop what is older. A later measurement is at step + every_n_steps or
        # after (however sparse the schedule): its base is the latest sample at or before step + every_n_steps −
        # window, or a later one. The history thus spans about `window` steps: at most window / every_n_steps + 2
        # samples.
        while len(self._history) > 1 and self._history[1].step <= step + self.every_n_steps - self.window:
            self._history.popleft()
        self._history.append(sample)
        self._pending_step = step
        return metrics
