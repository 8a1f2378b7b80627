"""What every grok_lightning callback shares: a diagnostic never ends the training run it watches.

:class:`DiagnosticCallback` is the base class of the package's callbacks. A subclass gets, for each Lightning hook
it overrides (every ``on_*`` hook except ``on_save_checkpoint``, ``on_load_checkpoint`` and ``on_exception``):

- **Faults.** An exception raised inside the hook is reported once (a rank-zero ``RuntimeWarning`` naming the
  callback, the hook, the step, the exception's type and message; the traceback goes to this module's logger at
  DEBUG) and the callback disables itself for the rest of the fit: its hooks return at once from then on, and
  training goes on. ``strict=True`` raises instead. Two kinds of exception always propagate:
  ``MisconfigurationException`` (a setup the callback cannot measure: raise it when fitting starts) and
  :class:`NonFiniteError` (``nan_policy="error"``).
- **Non-finite values.** :meth:`DiagnosticCallback._non_finite` applies ``nan_policy``: ``"warn"`` warns once and
  the caller skips that measurement; ``"error"`` raises :class:`NonFiniteError`.
- **Distributed runs.** A callback whose measurements run collectives (all-reduce, broadcast) says so through
  :meth:`DiagnosticCallback._collective`. Under DDP a failure on one rank then only marks the callback as failed
  there; it is disabled on every rank together at its next sync point, :meth:`DiagnosticCallback._agree` (one
  all-reduce of a flag), which the subclass calls where every rank arrives alike (its measuring steps), before
  any other collective of the measurement. A rank that failed thus never leaves the others waiting in a
  collective it skips. Code between a sync point and a collective must run under
  :meth:`DiagnosticCallback._guard`, which records the failure and lets the rank go on to the collective.
  Callbacks without collectives disable themselves on the failing rank alone: no other rank waits for them.
- **Fresh per fit.** ``setup(stage="fit")`` re-enables a callback a previous fit disabled.

Setup and teardown are not guarded: configuration errors belong there and must raise.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from grok_lightning.callbacks._data import Warner
from grok_lightning.callbacks._validation import check_choice, check_flag

log = logging.getLogger(__name__)

__all__ = ["NAN_POLICIES", "DiagnosticCallback", "NanPolicy", "NonFiniteError"]

NanPolicy = Literal["warn", "error"]
NAN_POLICIES: tuple[NanPolicy, ...] = ("warn", "error")


class NonFiniteError(RuntimeError):
    """A measurement saw a NaN or infinite value and the callback's ``nan_policy`` is ``"error"``."""


# Exceptions that are never swallowed: configuration errors and the user's request to stop on non-finite values.
_ALWAYS_RAISED = (MisconfigurationException, NonFiniteError)

# Hooks that are not guarded: checkpoints must not be silently incomplete, and on_exception runs while the
# Trainer is already handling an error.
_UNGUARDED = frozenset({"on_save_checkpoint", "on_load_checkpoint", "on_exception"})
GUARDED_HOOKS = frozenset(name for name in vars(Callback) if name.startswith("on_") and name not in _UNGUARDED)


def _guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(hook)
    def run(self: DiagnosticCallback, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return None
        with self._guard(trainer, hook.__name__):
            return hook(self, trainer, *args, **kwargs)
        return None  # the guard swallowed a failure

    run._grok_guarded = True  # type: ignore[attr-defined]
    return run


def _fresh_each_fit(setup: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(setup)
    def run(self: DiagnosticCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Any:
        if stage == "fit":
            DiagnosticCallback._reset_faults(self)
        return setup(self, trainer, pl_module, stage)

    run._grok_guarded = True  # type: ignore[attr-defined]
    return run


class DiagnosticCallback(Callback):
    """Base class of the grok_lightning callbacks: a failing diagnostic reports once and steps aside.

    See this module's docstring for the whole contract. Subclasses call ``super().__init__(nan_policy=...,
    strict=...)``, document both arguments, call :meth:`_non_finite` where a measurement can see NaN or inf, and
    override :meth:`_collective` (and call :meth:`_agree` at their sync points) when a measurement runs collectives.

    Args:
        nan_policy: ``"warn"``: a measurement that sees a non-finite value warns once and is skipped, training goes
            on. ``"error"``: raise :class:`NonFiniteError` (a ``RuntimeError``).
        strict: Raise any exception of the callback's hooks instead of warning and disabling the callback.

    Raises:
        ValueError: If ``nan_policy`` or ``strict`` is not one of its allowed values, naming it and its value.

    Attributes:
        disabled: Whether a failure has disabled the callback for the rest of this fit.
    """

    # Class-level defaults, so that a subclass which forgets to call this __init__ still behaves.
    nan_policy: NanPolicy = "warn"
    strict: bool = False
    disabled: bool = False
    _failure: str | None = None  # a failure on this rank not yet agreed on (collective callbacks under DDP)

    def __init__(self, nan_policy: NanPolicy = "warn", strict: bool = False) -> None:
        super().__init__()
        check_choice("nan_policy", nan_policy, NAN_POLICIES)
        check_flag("strict", strict)
        self.nan_policy = nan_policy
        self.strict = strict
        self.disabled = False
        self._failure = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, member in list(vars(cls).items()):
            if not callable(member) or getattr(member, "_grok_guarded", False):
                continue
            if name in GUARDED_HOOKS:
                setattr(cls, name, _guarded(member))
            elif name == "setup":
                setattr(cls, name, _fresh_each_fit(member))

    @cached_property
    def _warn(self) -> Warner:
        return Warner()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset_faults()

    def _reset_faults(self) -> None:
        self.disabled = False
        self._failure = None

    def _collective(self, trainer: pl.Trainer) -> bool:
        """Whether this callback's measurements run collectives under ``trainer`` (then failures are agreed on)."""
        return False

    @contextlib.contextmanager
    def _guard(self, trainer: pl.Trainer, where: str) -> Iterator[None]:
        """Run a block; a failure in it is reported and disables the callback (or raises, see the module docs).

        Under DDP, for a collective callback, the failure is only recorded: the rank carries on to the collectives
        that follow and :meth:`_agree` disables the callback on every rank.
        """
        try:
            yield
        except _ALWAYS_RAISED:
            raise
        except Exception as error:
            if self.strict:
                raise
            self._fail(trainer, where, error)

    def _fail(self, trainer: pl.Trainer, where: str, error: Exception) -> None:
        name = type(self).__name__
        step = trainer.global_step
        log.debug("%s failed in %s at step %d", name, where, step, exc_info=error)
        reason = f"{type(error).__name__}: {error}"
        if trainer.world_size > 1 and self._collective(trainer):
            if self._failure is None:
                self._failure = reason
                self._report(
                    trainer,
                    f"{name} failed on rank {trainer.global_rank} in {where} at step {step}: {reason}. It is disabled "
                    "on every rank at its next measurement, for the rest of this run; training goes on. Pass "
                    "strict=True to raise instead.",
                )
            return
        self.disabled = True
        where_rank = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
        self._report(
            trainer,
            f"{name} failed{where_rank} in {where} at step {step}: {reason}. It is disabled for the rest of this run; "
            "training goes on. Pass strict=True to raise instead.",
        )

    def _agree(self, trainer: pl.Trainer) -> bool:
        """Whether the callback still runs; a collective under DDP when :meth:`_collective` says so.

        Call it where every rank arrives alike (a measuring step), before the measurement's own collectives: if
        any rank has failed since the last call, the callback is disabled on every rank and this returns False.
        """
        if self.disabled:
            return False
        failed = self._failure is not None
        if trainer.world_size > 1 and self._collective(trainer):
            failed = bool(trainer.strategy.reduce_boolean_decision(failed, all=False))
        if failed:
            self._disable_everywhere(trainer)
        return not failed

    def _disable_everywhere(self, trainer: pl.Trainer) -> None:
        """Disable the callback after every rank has agreed that one of them failed."""
        self.disabled = True
        if self._failure is None:  # the failing rank has reported its own error
            self._report(
                trainer,
                f"{type(self).__name__} is disabled on every rank for the rest of this run: it failed on another "
                "rank (see that rank's warning). Training goes on.",
            )

    def _non_finite(self, trainer: pl.Trainer, what: str) -> None:
        """Apply ``nan_policy`` to a non-finite ``what`` at this step; with ``"warn"`` the caller skips the step.

        Raises:
            NonFiniteError: With ``nan_policy="error"``.
        """
        message = (
            f"{type(self).__name__}: {what} is not finite at step {trainer.global_step}; the measurement is skipped "
            "and training goes on."
        )
        if self.nan_policy == "error":
            raise NonFiniteError(message)
        self._warn("not_finite", message + " (Warned once; set nan_policy='error' to stop instead.)")

    @staticmethod
    def _report(trainer: pl.Trainer, message: str) -> None:
        # Rank zero warns; another rank, whose warnings rank_zero_warn would drop, logs the message instead.
        if trainer.global_rank != 0:
            log.warning(message)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("always", RuntimeWarning)  # once per failure here, not once per call site
            rank_zero_warn(message, category=RuntimeWarning)
