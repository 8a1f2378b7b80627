"""Eq20AlignmentMonitor: does a trained two-layer network's first layer move as the paper's Eq. 20 predicts?"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property, partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from grok_lightning.callbacks._base import DiagnosticCallback, NanPolicy
from grok_lightning.callbacks._data import (
    LossFn,
    UnpackBatch,
    default_unpack_batch,
    log_now,
    log_pending,
    per_sample_loss,
    preserved_rng,
    strategy_base,
    training_batches,
    training_set_is_complete,
)
from grok_lightning.callbacks._validation import check_callable, check_choice, check_positive_int
from grok_lightning.geometry import (
    FLOW_ACTIVATIONS,
    FlowActivation,
    SingularGramError,
    activation_and_slope,
    eq20_flow,
    evaluation_scope,
    gram_cholesky,
)

__all__ = ["Eq20AlignmentMonitor", "default_two_layer_weights"]

WeightsFn = Callable[[pl.LightningModule], tuple[Tensor, Tensor]]

# Strategies that shard or split the parameters: one rank does not hold the first layer whole.
_REFUSED_STRATEGIES = ("FSDP", "XLAFSDP", "DeepSpeed", "ModelParallel")


def _two_layers(pl_module: pl.LightningModule) -> tuple[nn.Linear, nn.Linear] | None:
    # The reference MLP is `pl_module.net` with `fc1`, `fc2`; a module may also hold them itself.
    for owner in (getattr(pl_module, "net", None), pl_module):
        fc1, fc2 = getattr(owner, "fc1", None), getattr(owner, "fc2", None)
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
            return fc1, fc2
    return None


def default_two_layer_weights(pl_module: pl.LightningModule) -> tuple[Tensor, Tensor]:
    """The first layer E (d_in, width) and the read-out W₂ (width, C) of the reference two-layer networks.

    - :class:`~grok_lightning.reference.GrokkingModule` with ``architecture="mlp"`` (or any module whose ``net``,
      or itself, has ``nn.Linear`` layers ``fc1`` and ``fc2``): ``(fc1.weight.T, fc2.weight.T)``.
    - :class:`~grok_lightning.reference.PredictedDynamicsModule` (a 2-D ``embedding`` and a ``readout()``
      method): ``(embedding, readout())``.

    Raises:
        MisconfigurationException: If the module has neither, or its ``fc1``/``fc2`` carry biases.
    """
    layers = _two_layers(pl_module)
    if layers is not None:
        fc1, fc2 = layers
        if fc1.bias is not None or fc2.bias is not None:
            raise MisconfigurationException(
                f"Eq20AlignmentMonitor needs a bias-free two-layer network σ(x E) W₂ (the paper's Eq. 20 has no "
                f"biases), but {type(pl_module).__name__}'s fc1/fc2 have biases (fc1: {fc1.bias is not None}, fc2: "
                f"{fc2.bias is not None}). Train with bias=False."
            )
        return fc1.weight.T, fc2.weight.T
    embedding, readout = getattr(pl_module, "embedding", None), getattr(pl_module, "readout", None)
    if isinstance(embedding, Tensor) and embedding.dim() == 2 and callable(readout):
        return embedding, readout()
    raise MisconfigurationException(
        f"Eq20AlignmentMonitor can only read bias-free two-layer MLPs σ(x E) W₂, and finds none in "
        f"{type(pl_module).__name__} (no nn.Linear `fc1` and `fc2` on the module or its `net`, no `embedding` with "
        "`readout()`). A transformer is outside Eq. 20; for another two-layer network pass "
        "`weights=lambda module: (E, W2)` with E (d_in, width) and W2 (width, C)."
    )


def _default_activation(pl_module: pl.LightningModule) -> str | None:
    config = getattr(getattr(pl_module, "net", None), "config", None)
    activation = getattr(config, "activation", None)
    if activation is None:
        hparams = getattr(pl_module, "hparams", {})
        activation = hparams.get("activation") if hasattr(hparams, "get") else None
    return activation if isinstance(activation, str) else None


class Eq20AlignmentMonitor(DiagnosticCallback):
    r"""Compare the first-layer update of a trained two-layer MSE network with the paper's Eq. 20 prediction.

    The network is Ŷ = σ(X E) W₂ without biases: E (d_in, width) is the first layer as *inputs times E*, the
    transpose of ``nn.Linear.weight``, and W₂ (width, C) the read-out. Decoupled from the read-out (paper §5–6),
    the theory predicts that on the zero-loss manifold E moves along the flow of paper Eq. 20,

        dE/ds = Xᵀ[(A Y Yᵀ A H) ⊙ σ′(X E)] − E,    H = σ(X E),  A = (H Hᵀ)⁻¹,

    over the training inputs X (n, d_in) and targets Y (n, C) (one-hot rows for class targets), in the rescaled
    time s = 2λt (:func:`~grok_lightning.geometry.eq20_flow`). At a measuring step t this callback takes the
    update the optimizer actually made over the last k = ``update_window`` steps, E_t − E_{t−k}, and the
    prediction dE/ds at E_{t−k}, the network's own first layer at the start of the window, and logs their
    cosine.

    Args:
        every_n_steps: Measuring steps are the multiples of this many optimizer steps (``trainer.global_step``),
            including the step at which fitting starts.
        update_window: k: the update E_t − E_{t−k} is compared with the flow at E_{t−k}. E_{t−k} is copied at step
            t − k only for the coming measuring step (⌈k / every_n_steps⌉ copies of E at most).
        activation: σ, ``"relu"``, ``"quadratic"`` or ``"gelu"`` (exact GELU); ``None`` reads it from the
            module (the reference MLP's ``config.activation``, else ``hparams["activation"]``).
        weights: ``(pl_module) -> (E, W₂)``, E (d_in, width), W₂ (width, C), the tensors as trained (views, not
            copies). ``None`` reads the reference modules (see :func:`default_two_layer_weights`).
        unpack_batch: Turns a training batch into ``(inputs, targets)`` (only when the DataModule has no
            ``train_inputs``/``train_targets``); the default takes the first two items.
        loss_fn: Per-sample losses ``(outputs, targets) -> (N,)``, used only to check that the loss is a squared
            error with its zero at Y; the default is the module's ``per_sample_loss`` when it has one, else the
            callbacks' default loss.
        nan_policy: What to do when E or the prediction is not finite: ``"warn"`` (once) and skip the
            measurement, or ``"error"`` (raise ``RuntimeError``).
        strict: Raise an exception of the monitor's own measurement (e.g. from ``weights``) instead of warning
            once and disabling the monitor for the rest of the run.

    Raises:
        ValueError: If an argument is out of range or an unknown choice, naming it and its value.
        MisconfigurationException: When fitting starts, under a strategy that shards or splits the parameters
            (FSDP, DeepSpeed, model parallel); if the module is not a bias-free two-layer network σ(x E) W₂ it can
            read (no ``fc1``/``fc2`` or ``embedding``/``readout()``, biases, an activation outside Eq. 20's list,
            or outputs on the training inputs that differ from σ(X E) W₂); if the loss is not zero at finite
            targets Y (cross-entropy); if the training set is empty, not a single (n, d_in) input tensor, larger
            than the width (H Hᵀ is then always singular), or, under DDP, only this rank's share.
        RuntimeError: ``NonFiniteError``, with ``nan_policy="error"``, at a measuring step where E or the
            prediction is not finite.

    Logged metrics (at each measuring step, under its ``trainer.global_step``, on every logger and in
    ``trainer.callback_metrics``):

    - ``grok/eq20/update_cos``: cos(E_t − E_{t−k}, dE/ds at E_{t−k}), k = ``update_window``, in [−1, 1]: 1 when the
      first layer moves exactly along the Eq. 20 prediction, ~0 for an unrelated direction (random directions in
      d_in·width dimensions have |cos| ~ (d_in·width)^(−1/2)). Dimensionless; from the first measuring step at or
      after k.
    - ``grok/eq20/readout_gap``: ‖W₂ − W₂*‖ / ‖W₂*‖ at step t (Frobenius norms), with W₂* = Hᵀ(H Hᵀ)⁻¹Y the
      minimum-norm read-out that interpolates the training set at the current E, the read-out Eq. 20 assumes:
      0 when the network's read-out is that one. Dimensionless, ≥ 0.

    Notes:
        - **What the prediction uses.** The flow is evaluated at the network's own E with the minimum-norm
          read-out W₂* of that E, not the network's W₂: the theory treats the read-out as instantly optimal. A
          trained network's W₂ relaxes towards W₂* under weight decay only as fast as E moves, so the prediction
          is an approximation in real training; ``readout_gap`` says how far the assumption is from holding.
          The theory also assumes the network sits on the zero-loss manifold: before memorization the cosine
          is logged but has no claim to be large.
        - **The window.** The prediction is taken at the start of the window, E_{t−k}: a forecast of the next k
          steps, exact for a network that moves by Euler steps of Eq. 20 (cosine 1 to rounding with k = 1).
          :class:`~grok_lightning.TangentGradientMonitor`'s ``update_cos`` compares the same kind of update with
          a direction at the window's end, t; the two choices differ at second order in the window's length.
        - **Loss reduction and time.** The cosine does not depend on how the squared error is reduced over
          samples: scaling the loss by c > 0 changes neither the zero-loss set nor the minimum-norm read-out,
          so the direction of the flow is the same; only the map from optimizer steps to s changes (s = 2λt,
          λ = wd/2 against the loss as reduced; with a mean, λ = n·wd/2 against the paper's sum). Full-batch
          SGD on the mean loss with (lr, wd) and on the summed loss with (lr/n, n·wd) is the same trajectory,
          so it logs the same cosines (tested).
        - **Limits.** Bias-free two-layer networks with a squared-error loss only (Eq. 20 has no biases and no
          cross-entropy); the activations ``FLOW_ACTIVATIONS``; n ≤ width. With ReLU, σ′ is the step function,
          so the prediction ignores hidden units that would switch on or off within the window (the zero-loss
          set is only piecewise smooth there, see ``docs/theory.md`` §5). Where H Hᵀ is singular at a
          measurement (dead units), the cosine is not logged at that step (one warning).
        - **Cost.** One n × n Cholesky factorization and a few (n × d_in)·(d_in × width) products per measurement,
          in float64, on the module's device; the training inputs and Y are read once per fit and kept there.
          No Jacobian: it costs microseconds to milliseconds for the paper's sizes.
        - **Distributed.** Under DDP every rank holds E whole and reads the whole training set, so every rank
          computes and logs the same values, without a collective. Sharding strategies are refused.
        - **Faults.** An exception inside a measurement (other than a configuration error) is reported once, as a
          ``RuntimeWarning`` with its type and message, and disables the monitor for the rest of the fit; training
          goes on. No collectives: under DDP a failure disables it on the failing rank alone.
        - Reads weights only, under ``torch.no_grad()``; the one forward pass (the structure check at fit start)
          runs in eval mode with the global random states restored. No ``.grad`` is written, no random number
          drawn: training with and without the callback gives the same weights bit for bit.

    Example:
        >>> monitor = Eq20AlignmentMonitor(every_n_steps=50, update_window=10)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=10)
        >>> monitor.update_window, monitor.activation is None
        (10, True)
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        update_window: int = 10,
        activation: FlowActivation | None = None,
        weights: WeightsFn | None = None,
        unpack_batch: UnpackBatch | None = None,
        loss_fn: LossFn | None = None,
        nan_policy: NanPolicy = "warn",
        strict: bool = False,
    ) -> None:
        super().__init__(nan_policy=nan_policy, strict=strict)
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("update_window", update_window)
        check_choice("activation", activation, FLOW_ACTIVATIONS, optional=True)
        check_callable("weights", weights)
        check_callable("unpack_batch", unpack_batch)
        check_callable("loss_fn", loss_fn)

        self.every_n_steps = every_n_steps
        self.update_window = update_window
        self.activation = activation
        self.weights = weights or default_two_layer_weights
        self.unpack_batch = unpack_batch or default_unpack_batch
        self.loss_fn = loss_fn

        # Resumable state: the last measured step and the copies of E waiting for their measuring step.
        self._last_measure_step = -1
        self._snapshots: dict[int, Tensor] = {}
        # Per fit.
        self._inputs: Tensor | None = None  # X, (n, d_in) float64
        self._targets: Tensor | None = None  # Y, (n, C) float64
        self._activation: str = "relu"
        self._pending: dict[str, float] = {}

    @cached_property  # read by Lightning at every hook call (profiler names); built once from the arguments
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, update_window=self.update_window)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        base = strategy_base(trainer, _REFUSED_STRATEGIES)
        if base is not None:
            name = type(trainer.strategy).__name__
            name = name if name == base else f"{name} ({base})"
            raise MisconfigurationException(
                f"Eq20AlignmentMonitor does not support the {name} strategy: it shards or splits the parameters, "
                "so no rank holds the first layer whole. Use it on a single device or under DDP."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_architecture(pl_module)
        self._read_training_set(trainer, pl_module)
        self._check_network(pl_module)
        # Lightning allows no step-level `self.log` here: loggers get the values now, callback_metrics at the
        # first batch end.
        self._step(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step(trainer, pl_module)
        if self._pending:
            log_pending(pl_module, self._pending)
            self._pending = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_measure_step": self._last_measure_step, "snapshots": dict(self._snapshots)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_measure_step = state_dict["last_measure_step"]
        self._snapshots = dict(state_dict["snapshots"])

    # ------------------------------------------------------------------ preconditions

    def _read_training_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1 and not training_set_is_complete(trainer):
            raise MisconfigurationException(
                "Eq20AlignmentMonitor needs the whole training set on every rank (Eq. 20's read-out interpolates "
                "all of it), but the training loader shards itself per rank. Give the DataModule `train_inputs` "
                "and `train_targets`, or use a map-style dataset."
            )
        inputs: list[Any] = []
        targets: list[Tensor] = []
        with preserved_rng(pl_module.device):
            for x, y in training_batches(trainer, 1 << 30, self.unpack_batch, shard=False):
                inputs.append(x)
                targets.append(y)
        if not targets or sum(len(y) for y in targets) == 0:
            raise MisconfigurationException(
                "Eq20AlignmentMonitor found no training samples: give the DataModule `train_inputs` and "
                "`train_targets`, or a non-empty training dataloader."
            )
        if not all(isinstance(x, Tensor) and x.dim() == 2 and x.is_floating_point() for x in inputs):
            raise MisconfigurationException(
                "Eq20AlignmentMonitor needs the training inputs as one float tensor X of shape (n, d_in) (the "
                f"network is σ(X E) W₂), but got batches of {type(inputs[0]).__name__}"
                + (f" with shape {tuple(inputs[0].shape)}" if isinstance(inputs[0], Tensor) else "")
                + "."
            )
        self._inputs = torch.cat(inputs).to(pl_module.device, torch.float64)
        self._targets = self._zero_loss_targets(pl_module, torch.cat(targets).to(pl_module.device))

    def _zero_loss_targets(self, pl_module: pl.LightningModule, targets: Tensor) -> Tensor:
        # Y of Eq. 20: the outputs at which the training loss is zero, (n, C): float targets as they are, class
        # indices one-hot.
        with evaluation_scope(pl_module):
            outputs = pl_module(self._inputs[:1].to(self._dtype(pl_module)))
        classes = outputs.shape[-1]
        n = targets.shape[0]
        if targets.is_floating_point() and targets.numel() == n * classes:
            candidate = targets.reshape(n, classes)
        elif not targets.is_floating_point() and targets.dim() == 1:
            candidate = nn.functional.one_hot(targets.long(), classes)
        else:
            candidate = None
        loss = self.loss_fn if self.loss_fn is not None else partial(per_sample_loss, pl_module)
        if candidate is not None:
            with torch.no_grad():
                losses = loss(candidate.to(outputs.dtype), targets)
            if bool((losses.abs() <= 1e-6).all()):  # host sync, once per fit
                return candidate.to(torch.float64)
        raise MisconfigurationException(
            "Eq20AlignmentMonitor needs a squared-error loss whose zero is at finite outputs Y (float or one-hot "
            "targets): Eq. 20 is the flow of the minimum-norm read-out that interpolates Y. The loss here is not "
            "zero at the targets (cross-entropy has its zero at infinity)."
        )

    @staticmethod
    def _dtype(pl_module: pl.LightningModule) -> torch.dtype:
        parameter = next(pl_module.parameters(), None)
        return parameter.dtype if parameter is not None else torch.float32

    def _check_architecture(self, pl_module: pl.LightningModule) -> None:
        with evaluation_scope(pl_module):
            self.weights(pl_module)  # raises when it cannot read a two-layer network
        activation = self.activation or _default_activation(pl_module)
        if activation not in FLOW_ACTIVATIONS:
            raise MisconfigurationException(
                f"Eq20AlignmentMonitor supports the activations {FLOW_ACTIVATIONS}, but "
                f"{type(pl_module).__name__}'s is {activation!r}. Pass `activation=` if the module does not say."
            )
        self._activation = activation

    def _check_network(self, pl_module: pl.LightningModule) -> None:
        activation = self._activation
        with evaluation_scope(pl_module):
            e, w2 = self.weights(pl_module)
            x, y = self._inputs, self._targets
            n, width = x.shape[0], e.shape[1]
            if e.dim() != 2 or w2.dim() != 2 or e.shape[0] != x.shape[1] or w2.shape != (width, y.shape[1]):
                raise MisconfigurationException(
                    f"Eq20AlignmentMonitor expected E of shape (d_in, width) = ({x.shape[1]}, width) and W₂ of shape "
                    f"(width, C) = (width, {y.shape[1]}), but got E {tuple(e.shape)} and W₂ {tuple(w2.shape)}."
                )
            if n > width:
                raise MisconfigurationException(
                    f"Eq20AlignmentMonitor needs at most as many training rows as hidden units (H Hᵀ, n × n, must be "
                    f"invertible for Eq. 20's read-out), but the training set has n={n} rows and the width is {width}."
                )
            # The network must compute σ(X E) W₂: compare with its own outputs on the training inputs.
            h, _ = activation_and_slope(x @ e.double(), activation)
            expected = h @ w2.double()  # (n, C)
            outputs = pl_module(x.to(self._dtype(pl_module))).double().reshape(expected.shape)
            scale = max(float(expected.abs().max()), 1.0)
            if not torch.allclose(outputs, expected, rtol=1e-3, atol=1e-3 * scale):  # host sync, once per fit
                gap = float((outputs - expected).abs().max())
                raise MisconfigurationException(
                    f"Eq20AlignmentMonitor: {type(pl_module).__name__}'s outputs on the training inputs differ from "
                    f"σ(X E) W₂ with σ = {activation!r} (largest difference {gap:.3g}), so it is not the bias-free "
                    "two-layer network Eq. 20 describes, or the activation or `weights` are wrong."
                )

    # ------------------------------------------------------------------ measurement

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step

        # E_{t−k} for the coming measuring step t, copied only ahead of it.
        self._snapshots = {t: s for t, s in self._snapshots.items() if t >= step}
        target = step + self.update_window
        if target % self.every_n_steps == 0 and target not in self._snapshots:
            with torch.no_grad():
                self._snapshots[target] = self.weights(pl_module)[0].detach().clone()

        if step % self.every_n_steps != 0 or step == self._last_measure_step:
            return
        self._last_measure_step = step
        self._pending = self._measure(pl_module, step, self._snapshots.pop(step, None))
        if self._pending:
            log_now(trainer, self._pending, step)

    def _not_finite(self, pl_module: pl.LightningModule, what: str) -> dict[str, float]:
        self._non_finite(pl_module.trainer, what)  # warns once (or raises, with nan_policy="error")
        return {}

    def _measure(self, pl_module: pl.LightningModule, step: int, start: Tensor | None) -> dict[str, float]:
        x, y = self._inputs, self._targets
        with torch.no_grad():
            e, w2 = (t.detach().double() for t in self.weights(pl_module))
            if not bool(torch.isfinite(e).all() and torch.isfinite(w2).all()):  # host sync: skip or go on
                return self._not_finite(pl_module, "the first layer E or the read-out W₂")
            metrics: dict[str, float] = {}
            try:
                # The read-out Eq. 20 assumes at the current E, against the network's own.
                h, _ = activation_and_slope(x @ e, self._activation)
                optimal = h.T @ torch.cholesky_solve(y, gram_cholesky(h))  # W₂* = Hᵀ(H Hᵀ)⁻¹Y, (width, C)
                optimal_norm = float(optimal.norm())
                if optimal_norm > 0:
                    metrics["grok/eq20/readout_gap"] = float((w2 - optimal).norm()) / optimal_norm

                # The update over the window against the flow at its start.
                if start is not None:
                    start = start.to(e.device, torch.float64)
                    flow, _, _ = eq20_flow(start, x, y, self._activation)  # dE/ds at E_{t−k}, (d_in, width)
                    update = e - start
                    if not bool(torch.isfinite(flow).all()):
                        return self._not_finite(pl_module, "the Eq. 20 prediction")
                    denominator = float(update.norm() * flow.norm())
                    if denominator > 0:
                        metrics["grok/eq20/update_cos"] = float((update * flow).sum()) / denominator
            except SingularGramError as error:
                self._warn(
                    "singular",
                    f"Eq20AlignmentMonitor: at step {step} the hidden features of the training rows are linearly "
                    f"dependent (H Hᵀ singular: dead units?), so Eq. 20 has no read-out there; such steps log "
                    f"nothing. ({error})",
                )
                return {}
        return metrics
