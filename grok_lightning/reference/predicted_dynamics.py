"""The paper's predicted first-layer dynamics (its Eq. 20), simulated directly instead of trained.

The first layer E of a two-layer network ``Ŷ = σ(X E) W₂`` follows the flow of the reduced cost
R/λ = ‖E‖² + tr(Yᵀ(H Hᵀ)⁻¹Y) in rescaled time s = 2λt, with the read-out always the minimum-norm interpolant
W₂ = Hᵀ(H Hᵀ)⁻¹Y. The math (derivation, conventions) lives in the Lightning-free
:mod:`grok_lightning.geometry.decoupled`; ``eq20_flow`` and ``reduced_cost`` are re-exported here.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from grok_lightning.geometry.decoupled import activation_and_slope, eq20_flow, gram_cholesky, reduced_cost

__all__ = ["PredictedDynamicsModule", "eq20_flow", "reduced_cost"]

Init = Literal["std", "variance"]
FlowActivation = Literal["relu", "quadratic"]


class PredictedDynamicsModule(pl.LightningModule):
    """A two-layer network whose first layer E follows the paper's Eq. 20 and whose read-out is always optimal.

    Each training step is one explicit Euler step of the flow in rescaled time s = 2λt,

        E ← E + step_size · (Xᵀ[(A Y Yᵀ A H) ⊙ σ′(X E)] − E),    A = (H Hᵀ)⁻¹,  H = σ(X E),

    over the whole training set, and predictions use the minimum-norm interpolating read-out
    W₂ = Hᵀ A Y of the current E. Training predictions therefore equal the targets exactly (up to rounding)
    at every step: the run never leaves the zero-loss manifold, and all its motion is the descent of
    R/λ = ‖E‖² + tr(Yᵀ A Y) = ‖E‖² + ‖W₂‖² along it. The solve runs in float64 (E is stored in float64).

    The Euler step is taken by an SGD optimizer with ``lr=step_size`` on the gradient −dE/ds, so
    ``trainer.global_step`` counts Euler steps (Lightning counts steps through optimizers) and callbacks that
    read the optimizers see E. Its ``weight_decay`` is 0: the decay is the −E term of the flow.

    Feed it full batches (``ModularArithmeticDataModule(batch_size=None, target="one_hot")``): the flow needs
    every training row at once. Class targets (int64) are turned into one-hot rows.

    Args:
        p: Input width (the modulus, for the paper's e_a + e_b inputs) and number of outputs.
        width: Hidden units; at least the number of training rows, or H Hᵀ is singular.
        activation: ``"relu"`` (the paper) or ``"quadratic"`` (σ(z) = z²).
        step_size: Euler step in rescaled time s.
        init: How to read the paper's "E ~ N(0, p^(−1/2))": ``"std"`` (standard deviation p^(−1/2)) or
            ``"variance"`` (variance p^(−1/2), standard deviation p^(−1/4)).

    Raises:
        ValueError: If an argument is out of range or an unknown choice, naming the argument and its value;
            at the first step, if the batch is not the whole training set or the width is below its size.
        RuntimeError: At a step, if H Hᵀ is singular (a
            :class:`~grok_lightning.geometry.decoupled.SingularGramError`).

    Logged metrics (at the start of each step, i.e. for E after ``trainer.global_step`` Euler steps; on the
    steps the Trainer's loggers write, every ``log_every_n_steps``):
        - ``train/acc``: fraction of training rows whose argmax prediction is their class (1.0 by construction).
        - ``grok/eq20/weight_norm_sq``: ‖E‖², squared first-layer units.
        - ``grok/eq20/reduced_cost``: R/λ = ‖E‖² + tr(Yᵀ(H Hᵀ)⁻¹Y), the cost the flow descends (squared
          weight units; non-increasing for small enough ``step_size``).
        - ``val/acc``: fraction of held-out rows classified right by σ(X_val E) W₂, W₂ from the training rows
          (at every validation).

    Notes:
        - The time is rescaled: one step of ``step_size`` in s is ``step_size / (2λ)`` in the paper's t.
        - forward() needs the training set for W₂: it is taken from the DataModule's ``train_inputs`` and
          ``train_targets`` when fitting starts, or from the first training batch.
        - Cost per step: one (n × width)·(width × n) product and an n × n Cholesky factorization (n training
          rows): about 25–40 ms for the paper's n = 492, width = 512 on one CPU core.

    Example:
        >>> from grok_lightning.reference import ModularArithmeticDataModule
        >>> dm = ModularArithmeticDataModule(p=7, pairs="unordered", train_fraction=0.7, encoding="one_hot_sum",
        ...                                  target="one_hot")
        >>> model = PredictedDynamicsModule(p=7, width=32)
        >>> flow, readout, cost = eq20_flow(model.embedding, dm.train_inputs, dm.train_targets)
        >>> flow.shape, readout.shape
        (torch.Size([7, 32]), torch.Size([32, 7]))
    """

    def __init__(
        self,
        p: int = 37,
        width: int = 512,
        activation: FlowActivation = "relu",
        step_size: float = 1e-3,
        init: Init = "std",
    ) -> None:
        super().__init__()
        for name, value in (("p", p), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"Expected argument `{name}` to be an integer of at least 2, but got {value!r}.")
        if activation not in ("relu", "quadratic"):
            raise ValueError(
                f"Expected argument `activation` to be one of ('relu', 'quadratic'), but got {activation!r}."
            )
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 < step_size < 1:
            raise ValueError(f"Expected argument `step_size` to be a number in (0, 1), but got {step_size!r}.")
        if init not in ("std", "variance"):
            raise ValueError(f"Expected argument `init` to be one of ('std', 'variance'), but got {init!r}.")
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.embedding = nn.Parameter(torch.randn(p, width, dtype=torch.float64) * self.init_std)  # E, (p, width)
        self._train_set: tuple[Tensor, Tensor] | None = None  # (X, Y) float64, for the read-out
        self._readout: tuple[int, Tensor] | None = None  # (E's version, W₂) cache

    @property
    def init_std(self) -> float:
        """Standard deviation of the initial E under the chosen reading of N(0, p^(−1/2))."""
        p = self.hparams.p
        return p**-0.5 if self.hparams.init == "std" else p**-0.25

    def _as_float64(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if not targets.is_floating_point():
            targets = nn.functional.one_hot(targets.long(), self.hparams.p)
        return inputs.to(self.embedding.device, torch.float64), targets.to(self.embedding.device, torch.float64)

    def set_training_set(self, inputs: Tensor, targets: Tensor) -> None:
        """Use these training rows (X (n, p), Y (n, p) or classes (n,)) for the read-out W₂."""
        if inputs.shape[0] > self.hparams.width:
            raise ValueError(
                f"Expected argument `width` to be at least the number of training rows ({inputs.shape[0]}), so that "
                f"H Hᵀ can be invertible, but got {self.hparams.width}."
            )
        self._train_set = self._as_float64(inputs, targets)
        self._readout = None

    def readout(self) -> Tensor:
        """The minimum-norm interpolating read-out W₂ = Hᵀ(H Hᵀ)⁻¹Y of the current E, (width, p), float64.

        Raises:
            MisconfigurationException: If no training set is known yet.
        """
        if self._train_set is None:
            raise MisconfigurationException(
                "PredictedDynamicsModule has no training set for its read-out yet: fit it with a DataModule that "
                "has `train_inputs` and `train_targets`, or call `set_training_set(inputs, targets)`."
            )
        version = self.embedding._version
        if self._readout is None or self._readout[0] != version:
            x, y = self._train_set
            with torch.no_grad():
                h, _ = activation_and_slope(x @ self.embedding, self.hparams.activation)
                self._readout = (version, h.T @ torch.cholesky_solve(y, gram_cholesky(h)))
        return self._readout[1]

    def forward(self, x: Tensor) -> Tensor:
        """Outputs σ(x E) W₂, (N, p) float64, for inputs (N, p)."""
        h, _ = activation_and_slope(x.to(torch.float64) @ self.embedding, self.hparams.activation)
        return h @ self.readout()

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Squared error summed over outputs, (N,); zero on the training rows by construction."""
        if not targets.is_floating_point():
            targets = nn.functional.one_hot(targets.long(), self.hparams.p)
        return (outputs - targets.to(outputs.dtype)).pow(2).sum(dim=-1)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        inputs, targets = getattr(datamodule, "train_inputs", None), getattr(datamodule, "train_targets", None)
        if inputs is not None and targets is not None:
            self.set_training_set(inputs, targets)

    def _is_logging_step(self) -> bool:
        if self._trainer is None:
            return True
        return (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        if self._train_set is None:
            self.set_training_set(inputs, targets)
        elif inputs.shape[0] != self._train_set[0].shape[0]:
            raise ValueError(
                f"Expected a full training batch of {self._train_set[0].shape[0]} rows (Eq. 20 needs every training "
                f"row at each step; use batch_size=None), but got {inputs.shape[0]}."
            )
        x, y = self._as_float64(inputs, targets)

        # The flow at E_t, with the read-out and the cost it descends.
        with torch.no_grad():
            flow, readout, cost = eq20_flow(self.embedding, x, y, self.hparams.activation)
            self._readout = (self.embedding._version, readout)
            if self._is_logging_step():
                h, _ = activation_and_slope(x @ self.embedding, self.hparams.activation)
                correct = (h @ readout).argmax(dim=1) == y.argmax(dim=1)
                self.log("train/acc", correct.double().mean(), prog_bar=True)
                self.log("grok/eq20/weight_norm_sq", self.embedding.square().sum())
                self.log("grok/eq20/reduced_cost", cost, prog_bar=True)

        # One Euler step, E ← E + step_size · dE/ds, taken as an SGD step on −dE/ds.
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.embedding.grad = -flow
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        x, y = self._as_float64(inputs, targets)
        correct = self(x).argmax(dim=1) == y.argmax(dim=1)
        self.log("val/acc", correct.double().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.embedding], lr=self.hparams.step_size, weight_decay=0.0)
