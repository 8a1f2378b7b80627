"""TangentGradientMonitor: how much of the weight, and of the gradient, lies along the zero-loss manifold?"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cached_property, partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.func import functional_call
from typing_extensions import override

from grok_lightning.callbacks._base import DiagnosticCallback, NanPolicy
from grok_lightning.callbacks._data import (
    LossFn,
    UnpackBatch,
    decay_groups,
    default_unpack_batch,
    log_now,
    log_pending,
    optimizer_parameters,
    per_sample_loss,
    preserved_rng,
    strategy_base,
    to_device,
    training_batches,
    training_set_is_complete,
)
from grok_lightning.callbacks._validation import (
    check_callable,
    check_choice,
    check_flag,
    check_integer,
    check_number,
    check_positive_int,
)
from grok_lightning.callbacks.zero_loss_detector import find_zero_loss_detector
from grok_lightning.geometry import (
    CONSTRAINT_KINDS,
    METHODS,
    ConstraintKind,
    ConstraintOperator,
    Method,
    TangentProjector,
    evaluation_scope,
)

log = logging.getLogger(__name__)

__all__ = ["TangentGradientMonitor"]

Reduction = Literal["mean", "sum"]

# Strategies that shard or split the parameters: one rank does not hold θ, so it cannot form J.
_REFUSED_STRATEGIES = ("FSDP", "XLAFSDP", "DeepSpeed", "ModelParallel")


# The least time a measurement may take under a time budget: at fit start no training time has elapsed yet.
_MIN_ALLOWANCE = 1.0


def _remaining(stop_at: float | None) -> float | None:
    return None if stop_at is None else max(stop_at - time.perf_counter(), 0.0)


class _ParameterCopy(nn.Module):
    """``module``'s function at parameters held here, as copies: moving them never touches ``module``.

    The copies are the only parameters of this wrapper (``p0``, ``p1``, …, one per trained parameter of
    ``module``, by ``names``); the others and the buffers are ``module``'s own, read, never written. The
    wrapped module is not a submodule, so put it in eval mode around calls.
    """

    def __init__(self, module: nn.Module, names: list[str], values: list[Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "target", module)  # not registered: its parameters are not ours
        self.names = names
        for i, value in enumerate(values):
            self.register_parameter(f"p{i}", nn.Parameter(value.detach().clone(), requires_grad=False))

    def forward(self, *inputs: Tensor) -> Tensor:
        state = {name: getattr(self, f"p{i}") for i, name in enumerate(self.names)}
        return functional_call(self.target, state, inputs)  # type: ignore[attr-defined]


class TangentGradientMonitor(DiagnosticCallback):
    r"""Decompose the weight and the gradient into their parts tangent and normal to the zero-loss manifold.

    At a measuring step the constraint set is the training set (or a fixed ``probe_size`` subset of it), with
    the training loss there and its Jacobian J = ∂F/∂θ over the parameters the optimizers train. The tangent
    space of the zero-loss manifold Z = {F(θ) = Y} is T = null(J), P_T its orthogonal projector, computed by
    :class:`~grok_lightning.geometry.TangentProjector` (dense for small problems, matrix-free LSQR with warm
    starts for large ones). From the optimizers' param groups g it reads the decay gradient g = (wd_g·θ_g) and
    the decay displacement per step d = (c_g·θ_g), with c_g = lr_g·wd_g (SGD with momentum: lr·wd/(1 − momentum),
    as :class:`~grok_lightning.NormDescentMonitor` does). ∇L, the gradient of the unregularized training loss on
    the constraint set, is computed with ``torch.func`` on copies: the model's ``.grad`` is never touched.

    Args:
        every_n_steps: Measuring steps are the multiples of this many optimizer steps (``trainer.global_step``),
            including the step at which fitting starts.
        time_budget: Largest time the callback may spend, as a share of the training's own wall time (from fit
            start, the callback's time excluded), in (0, 1]: with the default 0.1 a run takes at most about 1.10×
            its time without the callback once it has trained ten times as long as one measurement takes (the
            first measurement is paid before there is a cost to judge by). A measuring step is skipped when
            measuring it, at the cost of the previous measurement, would exceed the share, and iterative solves
            stop at a deadline (see Notes). ``None`` measures every time, without deadlines.
        only_when_memorized: With a :class:`~grok_lightning.ZeroLossDetector` among the callbacks, measure only
            once it has confirmed memorization (the zero-loss regime, where the theory applies). Without a
            detector, or with one that has disabled itself after a failure, it has no effect: the monitor measures
            from the start.
        update_window: k of ``grok/tangent/update_cos``: the update θ_t − θ_{t−k} is compared with the
            tangent decay direction at t. θ_{t−k} is copied at step t − k only for the coming measuring step
            (⌈k / every_n_steps⌉ copies of θ at most).
        projected_reference: Also find the nearest point θ′ of Z and log ``grok/tangent/loss_grad_cos`` and
            ``grok/tangent/distance_to_manifold``. Needs a loss with its minimum at finite outputs Y (squared
            error against float or one-hot targets, or class indices one-hot encoded under such a loss).
        reference_steps: Gauss–Newton steps from θ towards Z that find θ′ (see Notes).
        constraint: ``"outputs"`` (every output of every sample: the paper's Z) or ``"losses"`` (one
            constraint per sample: cheaper, coarser, larger tangent space; see ``docs/geometry.md``).
        method: ``"auto"``, ``"dense"`` or ``"iterative"`` (see :class:`~grok_lightning.geometry.TangentProjector`).
        probe_size: Use this fixed random subset of the training samples as the constraint set (fewer
            constraints: larger tangent space, tangent fractions overestimated); ``None`` for all of them.
        seed: Seed of the probe subset (a private generator; the global RNG is never drawn from).
        tol: Stopping tolerance of the iterative solver, on ‖J·P_T v‖ / ‖J v‖.
        max_iter: Iteration cap of the iterative solver.
        unpack_batch: Turns a training batch into ``(inputs, targets)`` (only when the DataModule has no
            ``train_inputs``/``train_targets``); the default takes the first two items.
        loss_fn: Per-sample losses ``(outputs, targets) -> (N,)``; the default is the module's
            ``per_sample_loss`` when it has one, else cross-entropy for class targets and squared error summed
            over outputs for float targets (as :class:`~grok_lightning.ZeroLossDetector`).
        loss_reduction: How the training step combines the per-sample losses into L, ``"mean"`` or ``"sum"``
            (the paper's). It sets the scale of ∇L against the decay gradient, hence ``grad_fraction``.
        nan_policy: What to do when θ or ∇L is not finite: ``"warn"`` (once) and skip the measurement, or
            ``"error"`` (raise ``RuntimeError``).
        strict: Raise an exception of the monitor's own measurement (e.g. from ``loss_fn``, ``unpack_batch`` or a
            solver) instead of warning once and disabling the monitor for the rest of the run.

    Raises:
        ValueError: If an argument is out of range or an unknown choice, naming it and its value.
        MisconfigurationException: When fitting starts, under a strategy that shards or splits the parameters
            (FSDP, DeepSpeed, model parallel), if no optimizer holds parameters, if the trained parameters are
            not float32 or float64 (``precision="bf16-true"``, ``"16-true"``), if the training set is empty, or if
            ``projected_reference=True`` and the loss has no zero at finite outputs.
        RuntimeError: ``NonFiniteError``, with ``nan_policy="error"``, at a measuring step where θ or ∇L is not
            finite.

    Logged metrics (at each measuring step, under its ``trainer.global_step``, on every logger and in
    ``trainer.callback_metrics``; rates per optimizer step and positive when the norm shrinks):

    - ``grok/tangent/weight_fraction``: ρ = ‖P_Tθ‖²/‖θ‖² in [0, 1], the share of ‖θ‖² that weight decay can
      still remove without leaving Z. Dimensionless.
    - ``grok/tangent/grad_norm``: ‖P_T(∇L + g)‖, the part of the regularized gradient along Z, in gradient
      units (loss units per parameter unit). Equals ‖P_T g‖: see Notes.
    - ``grok/tangent/grad_fraction``: ‖P_T(∇L + g)‖ / ‖∇L + g‖ in [0, 1]: small while the loss gradient
      dominates, rising towards 1 once ∇L only balances the normal part of the decay (the zero-loss regime).
    - ``grok/tangent/update_cos``: cos(θ_t − θ_{t−k}, −P_T d), k = ``update_window``, in [−1, 1]: the
      paper's test (its §4.6), largest while the model groks. From the first measuring step at or after k.
    - ``grok/norm_descent_rate_predicted``: 2⟨θ, P_T d⟩, the decrease of ‖θ‖² per optimizer step that the
      theory predicts (squared parameter units per step); on the same TensorBoard chart as
      :class:`~grok_lightning.NormDescentMonitor`'s measured ``grok/norm_descent_rate``.
    - ``grok/tangent/loss_grad_cos`` (``projected_reference``): ‖P_T(θ′)∇L(θ)‖ / ‖∇L(θ)‖, the cosine between
      the loss gradient and the tangent space at the nearest point θ′ of Z (the paper's Thm 4.14 bounds it by
      C·dist(θ, Z)). Dimensionless.
    - ``grok/tangent/distance_to_manifold`` (``projected_reference``): ‖θ − θ′‖, in parameter units.
    - ``grok/tangent/solver_residual``: max over the projected vectors of ‖J·P_T v‖ / ‖J v‖ at θ (0: exact).
    - ``grok/tangent/solver_iterations``: LSQR steps of the projection at θ (0 for dense).
    - ``grok/tangent/seconds``: wall time of the measurement, in seconds.

    Notes:
        - **The trap.** Any loss that sees θ only through the training outputs has ∇L = Jᵀ·∂ℓ/∂F, in the row
          space of J(θ), so P_T(θ)∇L(θ) = 0 exactly and ``grad_norm`` = ‖P_T g‖ = wd·‖P_Tθ‖ (one group): it
          holds at every θ, memorized or not, and is a built-in check of the solver. The loss gradient's
          tangent part is only non-zero against the tangent space at another point, which is what
          ``projected_reference`` measures.
        - **Rates and units.** ``grok/norm_descent_rate_predicted`` is per optimizer step, first order in
          c_g = lr_g·wd_g: Δ‖θ‖² ≈ −2⟨θ, P_T d⟩. In the paper's continuous time t (θ̇ = −∇L − 2λθ) the rate is
          4λ⟨θ, P_Tθ⟩ per unit time, with PyTorch's wd = 2λ (the paper regularizes with λ‖θ‖², no ½) and one
          step = lr units of time. lr and wd are read from the param groups when the step is measured (a
          per-step scheduler has then already set the next step's lr).
        - **θ′.** Gauss–Newton on the output constraints F(θ′) = Y, θ′ ← θ′ − J(θ′)⁺(F(θ′) − Y), from θ, keeping
          the iterate of least residual. Each step is the minimum-norm move onto the linearized manifold, so it
          is the nearest point of Z to first order, exact in one step for a linear model, and the point that
          unregularized gradient descent from θ (the paper's appendix D) tends to at its small-step limit,
          reached in a few steps instead of thousands (a few GD steps at the training lr stop short along the
          directions of small singular values of J, underestimating the distance). θ′ and its Jacobian live on
          a copy of the parameters; the tangent space at θ′ is always that of the output constraints (with
          ``constraint="losses"`` and squared error, the loss Jacobian vanishes on Z). Costs
          ``reference_steps`` + 1 solves, counted against the time budget. Where no step reduces the residual
          (far from Z, where the linearization fails), the two keys are not logged at that step (one warning).
        - **ReLU.** The prediction assumes a smooth manifold. Measured on the paper-style MLP (p = 7, MSE,
          full-batch SGD, after memorization, float64 dense reference): with GELU the predicted rate is within
          1–3 % of the measured one; with ReLU it exceeds it by 25–40 % however small wd·lr, and on the paper
          preset (p = 11, width 128, seed 0) by 3.6× at step 500 up to 123× at step 4 000. There 12–20 % of the
          pre-activations change sign within 20 steps; holding them fixed as extra constraints brings the
          prediction to 0.98–1.05 of the measured rate (``examples/relu_rate_gap.py``, ``docs/theory.md`` §5).
        - **Approximate** under AdamW (the loss steps are preconditioned, outside the theorem) and with
          cross-entropy (Z is at infinity; the tangent decomposition is still well defined, the rate prediction
          approximate). ``torch.optim.Adam`` and other adaptive optimizers with ``weight_decay > 0`` apply L2
          through the preconditioner, so d does not describe them (one warning, values still logged).
        - **Cost and the time budget.** Each measurement costs one forward and backward over the constraint
          set for ∇L and one projection of 2 vectors (3 with param groups of different decay): dense, J is
          materialized; iterative, up to ``max_iter`` LSQR steps of one J·v and one Jᵀ·u each. A measuring step
          is skipped when measuring it at the previous measurement's cost would take the callback's time over
          ``time_budget`` times the training's own time. Each iterative solve also gets a deadline: the time that
          keeps it within, at least 1 s (at fit start no training time has elapsed); a solve cut there logs its
          current values (tangent fractions too large, one warning) and the next measurement warm-starts from it.
          The dense method is a fixed cost, bounded only by skipping. The first measurement is never skipped, so
          a run shorter than about ten times its cost (measured: 0.06–0.07 s dense on the paper preset,
          1.05–1.19 s iterative on the mod-97 presets, whose first solve stops at a 1 s deadline) spends more
          than the budget's share. Under DDP the deadline is off (ranks' clocks would stop them at different
          iterates), and skipping alone bounds the cost. Measured overhead: ``docs/performance.md``
          (``benchmarks/bench_training.py``).
        - **Memory.** The constraint set is read once per fit and kept on the module's device; the constraint
          operator and its warm starts are kept between measurements; a dense J (at most 256 MB, see ``"auto"``)
          stays cached until the next measurement.
        - **Distributed.** Under DDP every rank measures the whole constraint set itself, identically, so every
          rank logs the same values (no collective in the measurement; with a time budget rank 0 decides which
          steps are measured and broadcasts it). From an iterable training loader that shards itself per rank,
          rank 0's share is broadcast as the constraint set (a warning says so). FSDP, DeepSpeed and
          model-parallel strategies are refused at fit start; :class:`~grok_lightning.NormDescentMonitor`
          works there.
        - **Faults.** An exception inside a measurement (other than a configuration error) is reported once, as a
          ``RuntimeWarning`` with its type and message, and disables the monitor for the rest of the fit; training
          goes on. Under DDP the ranks agree on it at each measuring step (one all-reduce of a flag, before the
          time-budget broadcast), so a failure on one rank disables the monitor on every rank at the next
          measuring step and no rank is left waiting in a broadcast.
        - **Training setups.** Works with gradient accumulation (one measurement per optimizer step), several
          param groups and schedulers (lr and wd read at each measurement), manual optimization,
          ``torch.compile`` and minibatch training (the constraint set is always the whole training set, also
          under ``limit_train_batches``). Frozen parameters (``requires_grad=False``) are not part of θ: J, P_T
          and the decay are taken over the trained parameters only; the trained set is read once per fit.
          ``precision="bf16-mixed"``: the measurement runs in the parameters' float32, without autocast, so it
          describes the float32 model the bf16 forward approximates; ``"bf16-true"``/``"16-true"`` (half
          parameters) are refused at fit start. See ``docs/limitations.md``.
        - Evaluation is in eval mode (no dropout, no BatchNorm statistics updates), without mixed-precision
          autocast, with the global random states restored: training with and without the callback gives the
          same weights bit for bit.

    Example:
        >>> from grok_lightning import ZeroLossDetector
        >>> monitor = TangentGradientMonitor(every_n_steps=50, projected_reference=True)
        >>> trainer = pl.Trainer(callbacks=[ZeroLossDetector(every_n_steps=50), monitor], max_steps=10)
        >>> monitor.time_budget, monitor.only_when_memorized
        (0.1, True)
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        time_budget: float | None = 0.1,
        only_when_memorized: bool = True,
        update_window: int = 10,
        projected_reference: bool = False,
        reference_steps: int = 3,
        constraint: ConstraintKind = "outputs",
        method: Method = "auto",
        probe_size: int | None = None,
        seed: int = 0,
        tol: float = 1e-4,
        max_iter: int = 200,
        unpack_batch: UnpackBatch | None = None,
        loss_fn: LossFn | None = None,
        loss_reduction: Reduction = "mean",
        nan_policy: NanPolicy = "warn",
        strict: bool = False,
    ) -> None:
        super().__init__(nan_policy=nan_policy, strict=strict)
        check_positive_int("every_n_steps", every_n_steps)
        check_number("time_budget", time_budget, 0.0, 1.0, low_open=True, optional=True)
        check_flag("only_when_memorized", only_when_memorized)
        check_positive_int("update_window", update_window)
        check_flag("projected_reference", projected_reference)
        check_positive_int("reference_steps", reference_steps)
        check_choice("constraint", constraint, CONSTRAINT_KINDS)
        check_choice("method", method, METHODS)
        check_positive_int("probe_size", probe_size, optional=True)
        check_integer("seed", seed)
        check_number("tol", tol, 0.0, 1.0, low_open=True, high_open=True)
        check_positive_int("max_iter", max_iter)
        check_callable("unpack_batch", unpack_batch)
        check_callable("loss_fn", loss_fn)
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))

        self.every_n_steps = every_n_steps
        self.time_budget = None if time_budget is None else float(time_budget)
        self.only_when_memorized = only_when_memorized
        self.update_window = update_window
        self.projected_reference = projected_reference
        self.reference_steps = reference_steps
        self.constraint = constraint
        self.method = method
        self.probe_size = probe_size
        self.seed = seed
        self.tol = float(tol)
        self.max_iter = max_iter
        self.unpack_batch = unpack_batch or default_unpack_batch
        self.loss_fn = loss_fn
        self.loss_reduction = loss_reduction

        # Resumable state: the last measured step and the copies of θ waiting for their measuring step.
        self._last_measure_step = -1
        self._snapshots: dict[int, Tensor] = {}
        # Per fit.
        self._inputs: tuple[Tensor, ...] | None = None
        self._targets: Tensor | None = None
        self._outputs_target: Tensor | None = None  # Y, flat, for θ′
        self._operator: ConstraintOperator | None = None
        self._projector: TangentProjector | None = None
        self._reference: tuple[_ParameterCopy, ConstraintOperator, TangentProjector, Tensor] | None = None
        self._fit_start = 0.0
        self._spent = 0.0
        self._last_cost: float | None = None
        self._pending: dict[str, float] = {}

    @cached_property  # read by Lightning at every hook call (profiler names); built once from the arguments
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            update_window=self.update_window,
            constraint=self.constraint,
            probe_size=self.probe_size,
            projected_reference=self.projected_reference,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        base = strategy_base(trainer, _REFUSED_STRATEGIES)
        if base is not None:
            name = type(trainer.strategy).__name__
            name = name if name == base else f"{name} ({base})"
            raise MisconfigurationException(
                f"TangentGradientMonitor does not support the {name} strategy: it shards or splits the "
                "parameters, so no rank holds θ to form the Jacobian of the training outputs. Use it on a single "
                "device or under DDP; NormDescentMonitor still works under this strategy."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        self._fit_start, self._spent, self._last_cost = start, 0.0, None
        self._operator = self._projector = self._reference = None
        if not optimizer_parameters(trainer):
            raise MisconfigurationException(
                "TangentGradientMonitor needs an optimizer to know which parameters are trained, but the "
                f"trainer's optimizers {[type(o).__name__ for o in trainer.optimizers]} hold no parameters. "
                "Return one from `configure_optimizers`."
            )
        low = sorted({str(p.dtype) for p in optimizer_parameters(trainer)} - {"torch.float32", "torch.float64"})
        if low:
            raise MisconfigurationException(
                f"TangentGradientMonitor needs float32 or float64 parameters to form J and project onto its null "
                f"space, but the trained parameters are {', '.join(low)} (precision={trainer.precision!r}). Train "
                "with a '-mixed' precision, which keeps float32 parameters, or leave this monitor out."
            )
        self._check_optimizers(trainer)
        if not self._read_constraint_set(trainer, pl_module):
            return  # failed on some rank: disabled on every rank
        # Lightning allows no step-level `self.log` here: loggers get the values now, callback_metrics at the
        # first batch end.
        self._step(trainer, pl_module)
        self._spent += time.perf_counter() - start

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        start = time.perf_counter()
        self._step(trainer, pl_module)
        if self._pending:
            log_pending(pl_module, self._pending)
            self._pending = {}
        self._spent += time.perf_counter() - start

    @override
    def _collective(self, trainer: pl.Trainer) -> bool:
        return trainer.world_size > 1  # the constraint set and the time budget are broadcast from rank 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_measure_step": self._last_measure_step, "snapshots": dict(self._snapshots)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_measure_step = state_dict["last_measure_step"]
        self._snapshots = dict(state_dict["snapshots"])

    # ------------------------------------------------------------------ scheduling

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step

        # θ_{t−k} for update_cos, copied only ahead of a measuring step t.
        self._snapshots = {t: s for t, s in self._snapshots.items() if t >= step}
        target = step + self.update_window
        if target % self.every_n_steps == 0 and target not in self._snapshots:
            with torch.no_grad():
                self._snapshots[target] = torch.cat([p.detach().reshape(-1) for p in optimizer_parameters(trainer)])

        if step % self.every_n_steps != 0 or step == self._last_measure_step:
            return
        if not self._agree(trainer):  # the sync point: every rank reaches it at the same steps
            return
        if self._may_measure(trainer):
            self._pending = self._measure(trainer, pl_module)
            if self._pending:
                log_now(trainer, self._pending, step)
        self._snapshots.pop(step, None)

    def _may_measure(self, trainer: pl.Trainer) -> bool:
        if self.only_when_memorized:
            detector = find_zero_loss_detector(trainer)
            if detector is not None and not detector.disabled and not detector.memorized:
                return False  # the same on every rank: the detector all-reduces its evaluation, disables collectively
        if self.time_budget is None:
            return True
        allowed = True
        if self._last_cost is not None:
            elapsed = time.perf_counter() - self._fit_start
            allowed = self._spent + self._last_cost <= self.time_budget * (elapsed - self._spent)
        if trainer.world_size > 1:
            allowed = bool(trainer.strategy.broadcast(allowed, src=0))  # ranks' clocks differ: rank 0 decides
        if not allowed:
            log.debug("TangentGradientMonitor: step %d skipped to stay within the time budget", trainer.global_step)
        return allowed

    # ------------------------------------------------------------------ preconditions

    def _check_optimizers(self, trainer: pl.Trainer) -> None:
        groups = decay_groups(trainer)
        for g in groups:
            name = type(g.optimizer).__name__
            if g.weight_decay > 0 and g.coupling == "preconditioned":
                self._warn(
                    f"preconditioned/{name}",
                    f"TangentGradientMonitor: {name} with weight_decay > 0 applies L2 decay through its adaptive "
                    "preconditioner, so the decay displacement d = lr·wd·θ, and `grok/norm_descent_rate_predicted` "
                    "and `grok/tangent/update_cos` built on it, do not describe it; they are still logged. Use AdamW "
                    "for decoupled weight decay.",
                )
        if all(g.weight_decay <= 0 for g in groups):
            self._warn(
                "no_weight_decay",
                "TangentGradientMonitor: no param group has weight decay, so nothing moves θ along the zero-loss "
                "manifold: the predicted rate and `grad_fraction` are 0 and `update_cos` is not logged.",
            )

    def _loss(self, pl_module: pl.LightningModule) -> Callable[[Tensor, Tensor], Tensor]:
        return self.loss_fn if self.loss_fn is not None else partial(per_sample_loss, pl_module)

    def _read_constraint_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        # False when reading failed on some rank (the monitor is then disabled on every rank).
        device = pl_module.device
        complete = training_set_is_complete(trainer)
        inputs: list[Any] = []
        targets: list[Tensor] = []
        with self._guard(trainer, "reading the training set"), preserved_rng(device):  # failing, still broadcast
            for x, y in training_batches(trainer, 1 << 30, self.unpack_batch, shard=False):
                inputs.append(x)
                targets.append(y)
        if trainer.world_size > 1 and not complete:
            self._warn(
                "rank_zero_share",
                "TangentGradientMonitor: the training loader shards itself per rank, so the constraint set is rank "
                "0's share, broadcast to every rank. Give the DataModule `train_inputs` and `train_targets` (or use "
                "a map-style dataset) to measure on the whole training set.",
            )
            shared = trainer.strategy.broadcast(None if self._failure else (inputs, targets), src=0)
            if shared is not None:  # None: rank 0 failed to read it, and the agreement below disables the monitor
                inputs, targets = shared
        if not self._agree(trainer):
            return False
        if not targets or sum(len(y) for y in targets) == 0:
            raise MisconfigurationException(
                "TangentGradientMonitor found no training samples: give the DataModule `train_inputs` and "
                "`train_targets`, or a non-empty training dataloader."
            )
        if isinstance(inputs[0], Tensor):
            self._inputs = (torch.cat(inputs),)
        else:
            self._inputs = tuple(torch.cat(parts) for parts in zip(*inputs, strict=True))
        self._inputs = to_device(self._inputs, device)
        self._targets = to_device(torch.cat(targets), device)
        if self.projected_reference:
            self._outputs_target = self._zero_loss_outputs(pl_module)
        return True

    def _zero_loss_outputs(self, pl_module: pl.LightningModule) -> Tensor:
        # Y of Z = {F = Y}: the float targets as outputs, or class indices one-hot, where the loss is zero.
        with evaluation_scope(pl_module):
            outputs = pl_module(*self._inputs)
        targets = self._targets
        candidates = []
        if targets.is_floating_point() and targets.numel() == outputs.numel():
            candidates.append(targets.reshape(outputs.shape).to(outputs.dtype))
        if not targets.is_floating_point() and outputs.dim() == 2 and targets.dim() == 1:
            candidates.append(nn.functional.one_hot(targets.long(), outputs.shape[1]).to(outputs.dtype))
        loss = self._loss(pl_module)
        for candidate in candidates:
            with torch.no_grad():
                losses = loss(candidate, targets)
            if bool((losses.abs() <= 1e-6).all()):
                return candidate.reshape(-1)
        raise MisconfigurationException(
            "TangentGradientMonitor(projected_reference=True) needs a loss whose minimum is at finite outputs Y "
            "(squared error against float or one-hot targets), to find the nearest point of the zero-loss manifold "
            "F(θ) = Y; the loss is not zero at the targets here (cross-entropy has its zero at infinity). Use "
            "projected_reference=False."
        )

    # ------------------------------------------------------------------ measurement

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[ConstraintOperator, TangentProjector]:
        if self._operator is None or self._projector is None:
            self._operator = ConstraintOperator(
                pl_module,
                self._inputs,
                optimizer_parameters(trainer),
                kind=self.constraint,
                targets=self._targets,
                loss_fn=self._loss(pl_module),
                probe_size=self.probe_size,
                seed=self.seed,
            )
            self._projector = TangentProjector(self._operator, self.method, tol=self.tol, max_iter=self.max_iter)
        return self._operator, self._projector

    def _allowance(self, now: float) -> float | None:
        # Seconds this measurement may take and keep the callback's time within the budget's share of the
        # training's own time: spent + t ≤ budget·(elapsed − spent), at least _MIN_ALLOWANCE (at fit start no
        # training time has elapsed yet).
        if self.time_budget is None:
            return None
        elapsed = now - self._fit_start
        allowance = self.time_budget * (elapsed - self._spent) - self._spent
        return max(allowance, _MIN_ALLOWANCE)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        # Under DDP every rank must stop at the same iterate: no deadline (ranks' clocks differ).
        allowance = self._allowance(start) if trainer.world_size == 1 else None
        stop_at = None if allowance is None else start + allowance
        step = trainer.global_step
        self._last_measure_step = step
        with evaluation_scope(pl_module):
            op, projector = self._build(trainer, pl_module)
            theta = op.parameter_vector().double()
            loss_grad = self._loss_gradient(pl_module, op).double()
            finite = bool(torch.isfinite(theta).all() and torch.isfinite(loss_grad).all())  # host sync
            if not finite:
                op.refresh()
                self._non_finite(trainer, "θ or the loss gradient")
                return {}

            # Decay gradient g = (wd_g·θ_g) and displacement d = (c_g·θ_g), element by element.
            wd, c = self._decay_vectors(trainer, op, theta)
            full_grad = loss_grad + wd * theta
            decay = c * theta
            uniform = bool((c == c[0]).all())
            vectors, keys = [theta, full_grad], ["theta", "gradient"]
            if not uniform:
                vectors.append(decay)
                keys.append("decay")
            result = projector.project(torch.stack(vectors), keys=keys, deadline=_remaining(stop_at))
            tangent_theta, tangent_grad = result.tangent[0], result.tangent[1]
            tangent_decay = result.tangent[2] if not uniform else c[0] * tangent_theta

            theta_sq = float(theta @ theta)
            grad_norm = float(tangent_grad.norm())
            full_norm = float(full_grad.norm())
            metrics = {
                "grok/tangent/weight_fraction": float(tangent_theta @ tangent_theta) / theta_sq if theta_sq else 0.0,
                "grok/tangent/grad_norm": grad_norm,
                "grok/tangent/grad_fraction": grad_norm / full_norm if full_norm > 0 else 0.0,
                "grok/norm_descent_rate_predicted": 2.0 * float(theta @ tangent_decay),
            }

            # The paper's test: the update over the last k steps against the tangent decay direction.
            snapshot = self._snapshots.pop(step, None)
            if snapshot is not None:
                update = theta - snapshot.to(theta.device, torch.float64)
                denominator = float(update.norm() * tangent_decay.norm())
                if denominator > 0:
                    metrics["grok/tangent/update_cos"] = -float(update @ tangent_decay) / denominator

            if self.projected_reference and _remaining(stop_at) == 0.0:
                log.debug("TangentGradientMonitor: step %d: no time left for the projected reference", step)
            elif self.projected_reference:
                distance, cosine = self._projected_reference(pl_module, op, theta, loss_grad, stop_at)
                if distance is not None:
                    metrics["grok/tangent/distance_to_manifold"] = distance
                if cosine is not None:
                    metrics["grok/tangent/loss_grad_cos"] = cosine
            op.refresh()  # drop the linearization (its saved activations) until the next measuring step

        metrics["grok/tangent/solver_residual"] = result.relative_residual
        metrics["grok/tangent/solver_iterations"] = float(result.iterations)
        self._last_cost = time.perf_counter() - start
        metrics["grok/tangent/seconds"] = self._last_cost
        if not result.converged and result.extras.get("timed_out"):
            self._warn(
                "timed_out",
                f"TangentGradientMonitor: the iterative projection stopped at the time budget's deadline after "
                f"{result.iterations} steps with relative residual {result.relative_residual:.2g} > tol={self.tol:g} "
                f"(step {step}); values are logged as they are (tangent fractions too large) and the next "
                "measurement continues from this solution. Raise `time_budget` or `tol` for converged values.",
            )
        elif not result.converged:
            self._warn(
                "not_converged",
                f"TangentGradientMonitor: the iterative projection stopped at max_iter={self.max_iter} with relative "
                f"residual {result.relative_residual:.2g} > tol={self.tol:g} (step {step}); values are logged as "
                "they are. Raise `max_iter` or `tol`.",
            )
        return metrics

    def _decay_vectors(self, trainer: pl.Trainer, op: ConstraintOperator, theta: Tensor) -> tuple[Tensor, Tensor]:
        by_id = {}
        for g in decay_groups(trainer):
            for p in g.params:
                by_id[id(p)] = (g.weight_decay, g.decay_per_step)
        wd = torch.empty_like(theta)
        c = torch.empty_like(theta)
        for p, segment in zip(op.params, op.segments(), strict=True):
            wd[segment], c[segment] = by_id[id(p)]
        return wd, c

    def _loss_gradient(self, pl_module: pl.LightningModule, op: ConstraintOperator) -> Tensor:
        # ∇L on the constraint set (the probe subset, if any), on copies of θ: no `.grad` is written.
        trained = {id(p) for p in op.params}
        frozen = {n: p.detach() for n, p in pl_module.named_parameters() if id(p) not in trained}
        frozen.update({n: b.detach().clone() for n, b in pl_module.named_buffers()})
        loss_fn = self._loss(pl_module)

        def loss(primals: tuple[Tensor, ...]) -> Tensor:
            state = dict(frozen)
            state.update(zip(op.names, primals, strict=True))
            losses = loss_fn(functional_call(pl_module, state, op.inputs), op.targets)
            return losses.sum() if self.loss_reduction == "sum" else losses.mean()

        primals = tuple(p.detach().clone() for p in op.params)
        grads = torch.func.grad(loss)(primals)  # computes its gradient even under the enclosing no_grad
        return torch.cat([g.reshape(-1) for g in grads])

    def _projected_reference(
        self,
        pl_module: pl.LightningModule,
        op: ConstraintOperator,
        theta: Tensor,
        loss_grad: Tensor,
        stop_at: float | None,
    ) -> tuple[float | None, float | None]:
        if self._reference is None:
            copy = _ParameterCopy(pl_module, op.names, [p.detach() for p in op.params])
            # The constraint set of `op` (the probe subset, if any), as output constraints.
            index = op.sample_index
            targets = self._outputs_target
            if index is not None:
                rows = targets.reshape(len(self._targets), -1)[index.to(targets.device)]
                targets = rows.reshape(-1)
            reference_op = ConstraintOperator(copy, op.inputs, list(copy.parameters()), kind="outputs")
            projector = TangentProjector(reference_op, self.method, tol=self.tol, max_iter=self.max_iter)
            self._reference = (copy, reference_op, projector, targets.double())
        copy, reference_op, projector, targets = self._reference

        # Gauss–Newton towards F(θ′) = Y from θ, on the copy; keep the iterate of least residual, stop when the
        # residual is at the parameters' rounding level or no longer halves.
        floor = 100 * torch.finfo(reference_op.dtype).eps * max(float(targets.norm()), 1.0)
        current = theta.clone()
        self._load(copy, reference_op, current)
        residual = reference_op.value().double() - targets
        best, best_residual = current, float(residual.norm())
        theta_start = current
        for _ in range(self.reference_steps):
            if best_residual <= floor:
                break
            # δ = J⁺r, the minimum-norm solution of J δ = r (least squares if r ∉ range J); dense: from the
            # factorization that the projection at θ′ below reuses.
            current = current - projector.min_norm_solve(residual, deadline=_remaining(stop_at)).solution
            self._load(copy, reference_op, current)
            residual = reference_op.value().double() - targets
            residual_norm = float(residual.norm())  # host sync: the loop decides on it
            if residual_norm < best_residual:
                best, best_residual, progress = current, residual_norm, residual_norm <= 0.5 * best_residual
            else:
                progress = False
            if not progress:
                break
        if best is not current:
            self._load(copy, reference_op, best)
        if best is theta_start and best_residual > floor:
            self._warn(
                "no_nearest_point",
                "TangentGradientMonitor: Gauss–Newton found no point nearer the zero-loss manifold than θ (the "
                "linearization does not hold that far from it); `grok/tangent/distance_to_manifold` and "
                "`grok/tangent/loss_grad_cos` are not logged at such steps.",
            )
            reference_op.refresh()
            return None, None

        distance = float((theta - best).norm())
        grad_norm = float(loss_grad.norm())
        cosine = None
        if grad_norm > 0:
            tangent = projector.project(loss_grad, keys=["loss_grad"], deadline=_remaining(stop_at)).tangent
            cosine = float(tangent.norm()) / grad_norm
        reference_op.refresh()
        return distance, cosine

    @staticmethod
    def _load(copy: _ParameterCopy, op: ConstraintOperator, vector: Tensor) -> None:
        with torch.no_grad():
            for p, value in zip(copy.parameters(), op.unflatten(vector), strict=True):
                p.copy_(value)
