"""The paper's toy models, where every quantity of the theory has a closed form.

"1+1=2": ŷ = w₁x₁ + w₂x₂ learns the single sample (1, 1) → 2 by gradient descent on the summed squared error
L = Σᵢ (ŷᵢ − yᵢ)² with weight decay. From (−1, 1) it reaches the zero-loss line w₁ + w₂ = 2 within a few
steps (near (0, 2): memorized), then weight decay slides it along the line to the minimum-norm point (1, 1),
which also gets "1 + 0 = 1" right (generalized). Here J = xᵀ = [1, 1], so the tangent projection is
P_T w = ((w₁ − w₂)/2, (w₂ − w₁)/2), and on the line ‖P_T w‖² shrinks by the factor (1 − lr·wd)² per step.
"1+1+1=3" is the same classes with three weights and the sample (1, 1, 1) → 3.

PyTorch's ``weight_decay`` adds ``wd·w`` to the gradient; the paper regularizes with λ‖w‖², whose gradient is
2λw, so the paper's **λ = weight_decay / 2**.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from grok_lightning.reference.data import TensorBatches

__all__ = ["LinearToyModule", "ToyDataModule"]


def _as_matrix(name: str, value: Sequence[Sequence[float]] | Tensor) -> Tensor:
    matrix = torch.as_tensor(value, dtype=torch.float32)
    if matrix.dim() != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ValueError(f"Expected argument `{name}` to be a non-empty (N, d) table of numbers, but got {value!r}.")
    return matrix


def _as_vector(name: str, value: Sequence[float] | Tensor, length: int) -> Tensor:
    vector = torch.as_tensor(value, dtype=torch.float32)
    if vector.dim() != 1 or vector.shape[0] != length:
        raise ValueError(f"Expected argument `{name}` to be a sequence of {length} numbers, but got {value!r}.")
    return vector


class LinearToyModule(pl.LightningModule):
    """A linear model without bias, ŷ = w·x, trained by SGD on the summed squared error.

    Args:
        start: The initial weights, one per input feature (the paper: (−1, 1)).
        lr: SGD learning rate.
        weight_decay: PyTorch's SGD weight decay; the paper's λ is half of it.
        tolerance: A validation prediction within this distance of its target counts as right for ``val/acc``.

    Raises:
        ValueError: If ``start`` is empty, ``lr`` is not positive, ``weight_decay`` is negative or ``tolerance``
            is not positive.

    Example:
        >>> model = LinearToyModule(start=(-1.0, 1.0), lr=0.1, weight_decay=0.1)
        >>> model(torch.tensor([[1.0, 1.0]]))
        tensor([0.], grad_fn=<MvBackward0>)
    """

    def __init__(
        self,
        start: Sequence[float] = (-1.0, 1.0),
        lr: float = 0.1,
        weight_decay: float = 0.1,
        tolerance: float = 0.25,
    ) -> None:
        super().__init__()
        weights = torch.as_tensor(start, dtype=torch.float32)
        if weights.dim() != 1 or weights.numel() < 1:
            raise ValueError(f"Expected argument `start` to be a non-empty sequence of numbers, but got {start!r}.")
        if not lr > 0:
            raise ValueError(f"Expected argument `lr` to be positive, but got {lr!r}.")
        if not weight_decay >= 0:
            raise ValueError(f"Expected argument `weight_decay` to be non-negative, but got {weight_decay!r}.")
        if not tolerance > 0:
            raise ValueError(f"Expected argument `tolerance` to be positive, but got {tolerance!r}.")
        self.save_hyperparameters()
        self.weight = nn.Parameter(weights.clone())  # (d,)

    def forward(self, x: Tensor) -> Tensor:
        """Predictions (N,) for inputs (N, d)."""
        return x @ self.weight

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Squared error of each sample, (N,)."""
        return (outputs - targets).pow(2)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = self.per_sample_loss(self(inputs), targets).sum()  # the paper's L = Σᵢ (ŷᵢ − yᵢ)²
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        outputs = self(inputs)
        self.log("val/loss", self.per_sample_loss(outputs, targets).mean(), sync_dist=True)
        self.log("val/acc", ((outputs - targets).abs() < self.hparams.tolerance).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class ToyDataModule(pl.LightningDataModule):
    """A handful of samples held in memory, served full batch; by default the paper's "1+1=2".

    Args:
        inputs: Training inputs, (N, d).
        targets: Training targets, (N,).
        val_inputs: Validation inputs, (M, d); by default the unit vectors, each summand alone.
        val_targets: Validation targets, (M,); by default the rule ŷ = Σ x applied to ``val_inputs``.
        steps_per_epoch: Full-batch optimizer steps per Lightning epoch (see
            :class:`~grok_lightning.reference.TensorBatches`).

    Raises:
        ValueError: If the shapes do not fit together or ``steps_per_epoch`` is not a positive integer.

    Example:
        >>> dm = ToyDataModule(inputs=[[1.0, 1.0, 1.0]], targets=[3.0])  # "1+1+1=3"
        >>> dm.train_inputs, dm.train_targets, dm.val_targets
        (tensor([[1., 1., 1.]]), tensor([3.]), tensor([1., 1., 1.]))
    """

    def __init__(
        self,
        inputs: Sequence[Sequence[float]] | Tensor = ((1.0, 1.0),),
        targets: Sequence[float] | Tensor = (2.0,),
        val_inputs: Sequence[Sequence[float]] | Tensor | None = None,
        val_targets: Sequence[float] | Tensor | None = None,
        steps_per_epoch: int = 1,
    ) -> None:
        super().__init__()
        self.train_inputs = _as_matrix("inputs", inputs)  # (N, d)
        self.train_targets = _as_vector("targets", targets, self.train_inputs.shape[0])  # (N,)
        d = self.train_inputs.shape[1]
        self.val_inputs = torch.eye(d) if val_inputs is None else _as_matrix("val_inputs", val_inputs)  # (M, d)
        if self.val_inputs.shape[1] != d:
            raise ValueError(f"Expected argument `val_inputs` to have {d} columns, but got {val_inputs!r}.")
        default_val_targets = self.val_inputs.sum(dim=1)
        self.val_targets = (
            default_val_targets
            if val_targets is None
            else _as_vector("val_targets", val_targets, self.val_inputs.shape[0])
        )  # (M,)
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(
                f"Expected argument `steps_per_epoch` to be a positive integer, but got {steps_per_epoch!r}."
            )
        self.steps_per_epoch = steps_per_epoch

    def _ranks(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> TensorBatches:
        rank, world_size = self._ranks()
        return TensorBatches(
            self.train_inputs, self.train_targets, repeats=self.steps_per_epoch, rank=rank, world_size=world_size
        )

    def val_dataloader(self) -> TensorBatches:
        rank, world_size = self._ranks()
        return TensorBatches(self.val_inputs, self.val_targets, rank=rank, world_size=world_size)
