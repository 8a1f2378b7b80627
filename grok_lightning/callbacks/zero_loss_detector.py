"""ZeroLossDetector: when did the model reach the zero-loss manifold, and when did it generalize?"""

from __future__ import annotations

import logging
import math
from functools import cached_property
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from grok_lightning.callbacks._base import DiagnosticCallback, NanPolicy
from grok_lightning.callbacks._data import (
    LossFn,
    UnpackBatch,
    default_unpack_batch,
    eval_mode,
    per_sample_loss,
    predictions_correct,
    preserved_rng,
    to_device,
    training_batches,
)
from grok_lightning.callbacks._validation import (
    bad_argument,
    check_callable,
    check_non_empty_str,
    check_number,
    check_positive_int,
)

log = logging.getLogger(__name__)

__all__ = ["ZeroLossDetector", "find_zero_loss_detector"]


class ZeroLossDetector(DiagnosticCallback):
    """Detect when training reaches the zero-loss regime (memorization) and when validation follows (grokking).

    Every ``every_n_steps`` optimizer steps, and once when training starts, the model is evaluated on the whole
    training set: the DataModule's ``train_inputs``/``train_targets`` when it has them, else the training
    dataloader (read through a sequential copy, so training's own iteration is untouched). The model runs in
    eval mode under ``torch.no_grad()`` (its previous modes are restored) and losses are summed in float64.
    Under DDP each rank evaluates every ``world_size``-th sample and the sums are all-reduced, so every rank
    logs and decides the same.

    *Memorized* means: training accuracy ≥ ``acc_threshold`` and mean training loss ≤ ``loss_threshold`` at
    ``patience`` consecutive checks. *Generalized* means: the validation metric ``monitor`` (read from
    ``trainer.callback_metrics`` as each validation run ends) ≥ ``val_threshold`` in ``patience`` consecutive
    validation runs. Each event is recorded at the first check of its streak, once, and stays recorded (it is part
    of the checkpoint, with the streaks, the check schedule and a validation result not yet read: a run resumed
    from it decides and logs as the uninterrupted run would).

    Args:
        every_n_steps: Check every this many optimizer steps (``trainer.global_step``).
        acc_threshold: Minimal training accuracy in [0, 1] to count as memorized; ``None`` to ignore accuracy.
            Regression targets have no accuracy and only the loss decides.
        loss_threshold: Largest mean per-sample training loss to count as memorized; ``None`` to ignore the
            loss. The default 0.05 suits both losses the reference module offers: with cross-entropy it asks
            for a mean probability of about 0.95 on the right class; with squared error summed over one-hot
            outputs it asks for residuals well below the 0.5 that would flip a decision.
        patience: Consecutive qualifying checks (validation runs, for generalization) that confirm an event.
        monitor: Key of the validation metric in ``trainer.callback_metrics``.
        val_threshold: The validation metric at or above which the model counts as generalized.
        unpack_batch: Turns a training batch into ``(inputs, targets)``; the default takes the first two items.
        loss_fn: Per-sample losses ``(outputs, targets) -> (N,)``; the default is the module's own
            ``per_sample_loss`` when it has one, else cross-entropy for integer class targets and squared error
            summed over outputs for float targets.
        batch_size: Samples per forward pass when evaluating from the DataModule's training tensors.
        nan_policy: What to do when the full training loss is not finite: ``"warn"`` (once) and skip that check
            (it does not count towards ``patience``: the streak restarts), or ``"error"`` (raise).
        strict: Raise an exception of the detector's own evaluation (e.g. from ``loss_fn`` or ``unpack_batch``)
            instead of warning once and disabling the detector for the rest of the run.

    Raises:
        ValueError: If an argument is out of range, naming it and its value.
        MisconfigurationException: When fitting starts, if the training set is empty or cannot be read, or if
            ``loss_fn`` does not return one loss per sample.
        RuntimeError: ``NonFiniteError``, with ``nan_policy="error"``, at a check whose full training loss is
            NaN or infinite.

    Logged metrics (at every check, under the check's ``trainer.global_step``; also in
    ``trainer.callback_metrics`` for ``EarlyStopping`` and ``ModelCheckpoint``):

    - ``grok/train_loss_full``: mean per-sample loss over the whole training set, in the loss's units.
    - ``grok/train_acc_full``: fraction of training samples classified right (class or one-hot targets only).
    - ``grok/memorized``: 1 once memorization is confirmed, else 0.
    - ``grok/generalized``: 1 once generalization is confirmed, else 0.
    - ``grok/memorized_step``: optimizer step at which memorization began (logged once known).
    - ``grok/generalized_step``: optimizer step at which generalization began (logged once known).
    - ``grok/grok_delay``: ``generalized_step − memorized_step`` in optimizer steps (once both are known;
      zero or negative when validation caught up without a delay).

    Each event also goes to this module's logger and, with a ``TensorBoardLogger``, to the text entry
    ``grok/events`` at that step.

    Notes:
        - Values reach the loggers directly at each check (under ``trainer.global_step``, independent of
          ``log_every_n_steps``); Lightning's own step-level logging would repeat the last value at every
          logging step until the epoch ends.
        - The validation metric counts once per validation run: checks between two validations do not
          re-count a stale value.
        - To stop at grokking use ``EarlyStopping(monitor="grok/generalized", mode="max",
          stopping_threshold=0.5, patience=10**9)``. Lightning compares the threshold strictly (``1.0 > 1.0``
          is false, so ``stopping_threshold=1.0`` never fires) and its default ``patience=3`` would stop a run
          whose ``grok/generalized`` stays at 0 for three checks.
        - Other callbacks ask :func:`find_zero_loss_detector` for the detector and read :attr:`memorized`.
        - **Faults.** An exception inside a check (other than a configuration error) is reported once, as a
          ``RuntimeWarning`` with its type and message, and disables the detector for the rest of the fit
          (``disabled`` is True; events found so far stay recorded); training goes on. Under DDP the decision is
          collective: the failure flag travels in the check's one all-reduce, so every rank disables the detector
          at the same check and none waits in a collective another skipped. A disabled detector counts as absent
          for ``TangentGradientMonitor(only_when_memorized=True)``.
        - Works with gradient accumulation, several param groups, schedulers, ``precision="bf16-mixed"`` (the
          evaluation runs in the Trainer's precision context, so the loss has bf16 rounding), manual
          optimization, frozen sub-modules and ``torch.compile`` (the no-grad evaluation compiles one more graph
          of ``forward``, once). With ``limit_train_batches`` or minibatches it still evaluates the whole training
          set. See ``docs/limitations.md``.

    Example:
        >>> from lightning.pytorch.callbacks import EarlyStopping
        >>> detector = ZeroLossDetector(every_n_steps=50, monitor="val/acc", val_threshold=0.99)
        >>> stop = EarlyStopping(monitor="grok/generalized", mode="max", stopping_threshold=0.5, patience=10**9)
        >>> trainer = pl.Trainer(callbacks=[detector, stop], max_steps=10)
        >>> find_zero_loss_detector(trainer) is detector, detector.memorized
        (True, False)
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        acc_threshold: float | None = 1.0,
        loss_threshold: float | None = 0.05,
        patience: int = 1,
        monitor: str = "val/acc",
        val_threshold: float = 0.99,
        unpack_batch: UnpackBatch | None = None,
        loss_fn: LossFn | None = None,
        batch_size: int = 4096,
        nan_policy: NanPolicy = "warn",
        strict: bool = False,
    ) -> None:
        super().__init__(nan_policy=nan_policy, strict=strict)
        check_positive_int("every_n_steps", every_n_steps)
        check_number("acc_threshold", acc_threshold, 0.0, 1.0, optional=True)
        check_number("loss_threshold", loss_threshold, 0.0, optional=True)
        if acc_threshold is None and loss_threshold is None:
            bad_argument(
                "acc_threshold", "a number when `loss_threshold` is None (memorization needs a criterion)", None
            )
        check_positive_int("patience", patience)
        check_non_empty_str("monitor", monitor)
        check_number("val_threshold", val_threshold)
        check_callable("unpack_batch", unpack_batch)
        check_callable("loss_fn", loss_fn)
        check_positive_int("batch_size", batch_size)

        self.every_n_steps = every_n_steps
        self.acc_threshold = acc_threshold
        self.loss_threshold = loss_threshold
        self.patience = patience
        self.monitor = monitor
        self.val_threshold = float(val_threshold)
        self.unpack_batch = unpack_batch or default_unpack_batch
        self.loss_fn = loss_fn
        self.batch_size = batch_size

        # Events and streaks: the resumable state.
        self.memorized_step: int | None = None
        self.generalized_step: int | None = None
        self._memorize_streak, self._memorize_start = 0, -1
        self._generalize_streak, self._generalize_start = 0, -1
        self._last_check_step = -1
        # The latest check.
        self.train_loss: float | None = None
        self.train_acc: float | None = None
        self.at_zero_loss = False
        # Per fit.
        self._val_runs = 0
        self._val_runs_seen = 0
        self._val_value: float | None = None  # `monitor` as the latest validation run left it
        self._unread_restored = False  # a checkpoint taken after a validation run that no check had read yet
        self._monitor_seen = False
        self._pending: dict[str, float] = {}

    @cached_property  # read by Lightning at every hook call (profiler names); built once from the arguments
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            acc_threshold=self.acc_threshold,
            loss_threshold=self.loss_threshold,
            patience=self.patience,
            monitor=self.monitor,
            val_threshold=self.val_threshold,
        )

    @property
    def memorized(self) -> bool:
        """Whether the run has reached the zero-loss regime (memorization confirmed)."""
        return self.memorized_step is not None

    @property
    def generalized(self) -> bool:
        """Whether the validation metric has confirmed generalization."""
        return self.generalized_step is not None

    @property
    def grok_delay(self) -> int | None:
        """``generalized_step − memorized_step`` in optimizer steps, once both are known."""
        if self.memorized_step is None or self.generalized_step is None:
            return None
        return self.generalized_step - self.memorized_step

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_runs, self._val_runs_seen = int(self._unread_restored), 0
        self._unread_restored = False
        self._monitor_seen = False
        step = trainer.global_step
        # A fresh detector checks where fitting starts; one restored from a checkpoint only at its own check steps,
        # as the uninterrupted run did (an extra check would count towards `patience`).
        if self._last_check_step < 0 or (step % self.every_n_steps == 0 and step != self._last_check_step):
            # Lightning allows no step-level `self.log` here: loggers get the values now, callback_metrics at the
            # first batch end.
            self._pending = self._check(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_check_step:
            self._pending = self._check(trainer, pl_module)
        if self._pending:
            for key, value in self._pending.items():
                pl_module.log(key, value, on_step=True, on_epoch=False, logger=False, sync_dist=False)
            self._pending = {}

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_runs += 1
            # Read now, not at the next check: a checkpoint taken in between (ModelCheckpoint saves after
            # validation) must carry it, since a resumed run's callback_metrics start empty.
            value = trainer.callback_metrics.get(self.monitor)
            self._val_value = None if value is None else float(value)  # host sync, once per validation run

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self._monitor_seen or self.generalized or self.monitor in trainer.callback_metrics):
            self._warn_missing_monitor(trainer)

    @override
    def _collective(self, trainer: pl.Trainer) -> bool:
        return trainer.world_size > 1  # every check all-reduces its sums

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "memorized_step": self.memorized_step,
            "generalized_step": self.generalized_step,
            "memorize_streak": self._memorize_streak,
            "memorize_start": self._memorize_start,
            "generalize_streak": self._generalize_streak,
            "generalize_start": self._generalize_start,
            "last_check_step": self._last_check_step,
            "train_loss": self.train_loss,
            "train_acc": self.train_acc,
            "at_zero_loss": self.at_zero_loss,
            "unread_validation": self._val_runs > self._val_runs_seen,
            "validation_value": self._val_value,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.memorized_step = state_dict["memorized_step"]
        self.generalized_step = state_dict["generalized_step"]
        self._memorize_streak = state_dict["memorize_streak"]
        self._memorize_start = state_dict["memorize_start"]
        self._generalize_streak = state_dict["generalize_streak"]
        self._generalize_start = state_dict["generalize_start"]
        self._last_check_step = state_dict["last_check_step"]
        self.train_loss = state_dict["train_loss"]
        self.train_acc = state_dict["train_acc"]
        self.at_zero_loss = state_dict["at_zero_loss"]
        self._unread_restored = state_dict.get("unread_validation", False)  # absent from older checkpoints
        self._val_value = state_dict.get("validation_value")

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        step = trainer.global_step
        self._last_check_step = step
        new_validation = self._val_runs > self._val_runs_seen
        evaluation = self._evaluate(trainer, pl_module, new_validation)
        if evaluation is None:  # failed on some rank: the detector is now disabled on every rank
            return {}
        loss, acc, value = evaluation
        if not math.isfinite(loss):
            self._memorize_streak, self.at_zero_loss = 0, False  # a check that saw NaN never qualifies
            self._non_finite(trainer, f"the full training loss ({loss})")
            return {}
        self.train_loss, self.train_acc = loss, acc

        # Memorization: both criteria at `patience` consecutive checks.
        self.at_zero_loss = (self.acc_threshold is None or acc is None or acc >= self.acc_threshold) and (
            self.loss_threshold is None or loss <= self.loss_threshold
        )
        if acc is None and self.loss_threshold is None:
            self.at_zero_loss = False
            self._warn(
                "no_criterion",
                "ZeroLossDetector: the training targets are not classes, so there is no accuracy, and "
                "`loss_threshold=None`: memorization can never be detected. Set `loss_threshold`.",
            )
        if self.at_zero_loss:
            self._memorize_streak += 1
            if self._memorize_streak == 1:
                self._memorize_start = step
        else:
            self._memorize_streak = 0
        if self.memorized_step is None and self._memorize_streak >= self.patience:
            self.memorized_step = self._memorize_start
            self._announce(trainer, f"memorized at step {self.memorized_step} (train loss {loss:.3g})", step)

        # Generalization: each validation run counts once.
        if new_validation:
            self._val_runs_seen = self._val_runs
            if value is None:
                self._warn_missing_monitor(trainer)
            else:
                self._monitor_seen = True
            if value is not None and value >= self.val_threshold:
                self._generalize_streak += 1
                if self._generalize_streak == 1:
                    self._generalize_start = step
            elif value is not None:
                self._generalize_streak = 0
            if self.generalized_step is None and self._generalize_streak >= self.patience:
                self.generalized_step = self._generalize_start
                self._announce(
                    trainer, f"generalized at step {self.generalized_step} ({self.monitor}={value:.4g})", step
                )

        metrics = {"grok/train_loss_full": loss}
        if acc is not None:
            metrics["grok/train_acc_full"] = acc
        metrics["grok/memorized"] = float(self.memorized)
        metrics["grok/generalized"] = float(self.generalized)
        if self.memorized_step is not None:
            metrics["grok/memorized_step"] = float(self.memorized_step)
        if self.generalized_step is not None:
            metrics["grok/generalized_step"] = float(self.generalized_step)
        if self.grok_delay is not None:
            metrics["grok/grok_delay"] = float(self.grok_delay)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        return metrics

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, read_monitor: bool
    ) -> tuple[float, float | None, float | None] | None:
        # (mean loss, accuracy, rank 0's validation metric), or None if the evaluation failed on some rank.
        device = pl_module.device
        # Loss sum, correct, classified, samples; ranks that failed; rank 0's validation metric and whether it has one.
        totals = torch.zeros(7, dtype=torch.float64, device=device)
        with self._guard(trainer, "the evaluation of the training set"):  # a failure here still reaches the reduce
            if self._failure is None:
                self._accumulate(trainer, pl_module, totals)
                if read_monitor and trainer.is_global_zero and self._val_value is not None:
                    totals[5], totals[6] = self._val_value, 1.0
        if self.disabled:  # single process: the guard has reported the failure and disabled the detector
            return None
        totals[4] = float(self._failure is not None)

        # One all-reduce per check carries the sums, the failure flag and rank 0's reading of the validation metric
        # (ranks may log unsynced values: rank 0 decides for all).
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, correct, classified, samples, failed, value, has_value = totals.tolist()  # host sync: decisions
        if failed:
            self._disable_everywhere(trainer)
            return None
        if samples == 0:
            raise MisconfigurationException(
                "ZeroLossDetector found no training samples: give the DataModule `train_inputs` and "
                "`train_targets`, or a non-empty training dataloader."
            )
        return loss_sum / samples, (correct / classified if classified else None), (value if has_value else None)

    def _accumulate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, totals: Tensor) -> None:
        # This rank's share of the training set into totals[0:4], in eval mode, without gradients.
        device = pl_module.device
        precision = trainer.precision_plugin
        with preserved_rng(device), eval_mode(pl_module), torch.no_grad():
            for inputs, targets in training_batches(trainer, self.batch_size, self.unpack_batch):
                inputs, targets = to_device((inputs, targets), device)
                with precision.forward_context():
                    outputs = pl_module(precision.convert_input(inputs))
                losses = self._losses(pl_module, outputs, targets)
                totals[0] += losses.sum(dtype=torch.float64)
                totals[3] += losses.shape[0]
                correct = predictions_correct(outputs, targets)
                if correct is not None:
                    totals[1] += correct.sum()
                    totals[2] += correct.shape[0]

    def _losses(self, pl_module: pl.LightningModule, outputs: Tensor, targets: Tensor) -> Tensor:
        losses = (
            self.loss_fn(outputs, targets) if self.loss_fn is not None else per_sample_loss(pl_module, outputs, targets)
        )
        if losses.dim() != 1 or losses.shape[0] != targets.shape[0]:
            raise MisconfigurationException(
                f"ZeroLossDetector expected per-sample losses of shape ({targets.shape[0]},), but the loss "
                f"function returned shape {tuple(losses.shape)}."
            )
        return losses

    def _warn_missing_monitor(self, trainer: pl.Trainer) -> None:
        available = sorted(k for k in trainer.callback_metrics if not k.startswith("grok/"))
        ran = "after validation ran" if self._val_runs else "(no validation ran)"
        self._warn(
            "missing_monitor",
            f"ZeroLossDetector: `monitor={self.monitor!r}` is not among the logged metrics {ran}, so "
            f"`grok/generalized` stays 0. Metrics that exist: {available}.",
        )

    def _announce(self, trainer: pl.Trainer, text: str, step: int) -> None:
        if not trainer.is_global_zero:
            return
        log.info("ZeroLossDetector: %s", text)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("grok/events", text, global_step=step)


def find_zero_loss_detector(trainer: pl.Trainer) -> ZeroLossDetector | None:
    """The first :class:`ZeroLossDetector` among the trainer's callbacks, or ``None``.

    Other callbacks use it to ask whether the run is in the zero-loss regime::

        detector = find_zero_loss_detector(trainer)
        if detector is not None and detector.memorized:
            ...
    """
    return next((cb for cb in trainer.callbacks if isinstance(cb, ZeroLossDetector)), None)
