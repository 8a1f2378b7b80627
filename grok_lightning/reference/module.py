"""The reference LightningModule for grokking runs on modular arithmetic.

Conventions (they matter for every rate the callbacks report):

* ``loss="mse"`` is the squared error **summed over the output units** and, with the default
  ``mse_reduction="mean"``, **averaged over samples**: ``L = (1/n) Σᵢ ‖f(θ, xᵢ) − yᵢ‖²``. With
  ``mse_reduction="sum"`` it is the paper's ``Σᵢ ‖f(θ, xᵢ) − yᵢ‖²``.
* ``weight_decay`` is PyTorch's: SGD adds ``weight_decay · θ`` to the gradient, AdamW multiplies θ by
  ``1 − lr · weight_decay`` each step. The paper regularizes with ``λ‖θ‖²`` (no ½), whose gradient is
  ``2λθ``, so **λ = weight_decay / 2** against the same loss. With ``mse_reduction="mean"`` the loss is the
  paper's divided by n, so full-batch SGD on it is the paper's gradient descent with learning rate
  ``lr / n`` and ``λ = n · weight_decay / 2``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from grok_lightning.reference.data import encoding_width
from grok_lightning.reference.networks import MLP, Activation, MLPConfig, Transformer, TransformerConfig

Architecture = Literal["mlp", "transformer"]
Loss = Literal["mse", "cross_entropy"]
Reduction = Literal["mean", "sum"]
Optimizer = Literal["sgd", "adamw"]


def _choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected argument `{name}` to be one of {choices}, but got {value!r}.")


class GrokkingModule(pl.LightningModule):
    """A two-layer MLP or a one-block transformer trained on ``a ∘ b mod p``.

    Targets may be class indices (int64) or one-hot rows (float): each loss converts what it needs, and
    accuracy is always the argmax of the outputs against the class.

    Logged metrics:
        - ``train/loss``, ``train/acc``: the training batch's loss and accuracy, on the steps the Trainer's
          loggers write (every ``log_every_n_steps``), to keep tiny full-batch steps cheap.
        - ``val/loss``, ``val/acc``: loss and accuracy on the held-out pairs, at every validation.

    Args:
        p: The modulus; the number of output classes.
        encoding: Input encoding of the data module: ``"one_hot_sum"``, ``"one_hot_concat"`` (MLP) or
            ``"tokens"`` (transformer).
        architecture: ``"mlp"`` or ``"transformer"``.
        hidden: MLP hidden width.
        activation: MLP nonlinearity: ``"relu"``, ``"quadratic"`` or ``"gelu"``.
        bias: MLP biases on or off.
        d_model: Transformer residual width.
        n_heads: Transformer attention heads.
        d_mlp: Transformer MLP width.
        init_scale: Multiplies the initialization scale.
        loss: ``"mse"`` (against one-hot targets, summed over outputs) or ``"cross_entropy"``.
        mse_reduction: How the MSE combines samples: ``"mean"`` or ``"sum"`` (the paper's).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adamw"`` (with ``betas``).
        lr: Learning rate.
        weight_decay: PyTorch's weight decay (the paper's λ is half of it, see the module docstring).
        momentum: SGD momentum.
        betas: AdamW betas.

    Raises:
        ValueError: If a choice is unknown, a size is not positive, or the architecture does not fit the
            encoding.

    Example:
        >>> model = GrokkingModule(p=11, encoding="one_hot_sum", hidden=16, loss="mse")
        >>> model(torch.eye(11)[:3]).shape
        torch.Size([3, 11])
    """

    def __init__(
        self,
        p: int = 97,
        encoding: Literal["one_hot_sum", "one_hot_concat", "tokens"] = "one_hot_concat",
        architecture: Architecture = "mlp",
        hidden: int = 256,
        activation: Activation = "relu",
        bias: bool = False,
        d_model: int = 128,
        n_heads: int = 4,
        d_mlp: int = 512,
        init_scale: float = 1.0,
        loss: Loss = "cross_entropy",
        mse_reduction: Reduction = "mean",
        optimizer: Optimizer = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1.0,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
    ) -> None:
        super().__init__()
        _choice("architecture", architecture, ("mlp", "transformer"))
        _choice("loss", loss, ("mse", "cross_entropy"))
        _choice("mse_reduction", mse_reduction, ("mean", "sum"))
        _choice("optimizer", optimizer, ("sgd", "adamw"))
        for name, value in (("p", p), ("hidden", hidden), ("d_model", d_model), ("n_heads", n_heads), ("d_mlp", d_mlp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected argument `{name}` to be a positive integer, but got {value!r}.")
        for name, value in (("lr", lr), ("init_scale", init_scale)):
            if not value > 0:
                raise ValueError(f"Expected argument `{name}` to be positive, but got {value!r}.")
        if not weight_decay >= 0:
            raise ValueError(f"Expected argument `weight_decay` to be non-negative, but got {weight_decay!r}.")
        if (architecture == "transformer") != (encoding == "tokens"):
            raise ValueError(
                f"Expected argument `encoding` to be 'tokens' exactly when architecture='transformer', "
                f"but got encoding={encoding!r} with architecture={architecture!r}."
            )
        self.save_hyperparameters()

        if architecture == "mlp":
            self.net: nn.Module = MLP(MLPConfig(encoding_width(p, encoding), hidden, p, activation, bias, init_scale))
        else:
            self.net = Transformer(TransformerConfig(p + 1, 3, d_model, n_heads, d_mlp, p, init_scale))
        self.train_acc = MulticlassAccuracy(num_classes=p, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=p, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Outputs (N, p) for a batch of encoded inputs."""
        return self.net(x)

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss of each sample, (N,): squared error summed over outputs, or cross-entropy.

        The diagnostics callbacks use this method when a module has it, so they measure the same loss the
        module trains on.
        """
        p = self.hparams.p
        if self.hparams.loss == "mse":
            if targets.dtype in (torch.int64, torch.int32):
                targets = nn.functional.one_hot(targets, p).to(outputs.dtype)
            return (outputs - targets).pow(2).sum(dim=-1)
        if targets.is_floating_point():
            targets = targets.argmax(dim=-1)
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The training loss: per-sample losses averaged (or, for ``mse_reduction="sum"``, summed)."""
        losses = self.per_sample_loss(outputs, targets)
        if self.hparams.loss == "mse" and self.hparams.mse_reduction == "sum":
            return losses.sum()
        return losses.mean()

    @staticmethod
    def _classes(targets: Tensor) -> Tensor:
        return targets.argmax(dim=-1) if targets.is_floating_point() else targets

    def _is_logging_step(self) -> bool:
        # `self.log` costs about a millisecond, as much as a whole step of the paper's model: log the
        # training metrics only on the steps whose values the Trainer's loggers will write.
        if self._trainer is None:
            return True
        return (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        outputs = self(inputs)
        loss = self.loss(outputs, targets)
        if self._is_logging_step():
            self.train_acc(outputs.detach(), self._classes(targets))
            self.log("train/loss", loss.detach(), prog_bar=True)
            self.log("train/acc", self.train_acc, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        outputs = self(inputs)
        self.val_acc(outputs, self._classes(targets))
        self.log("val/loss", self.loss(outputs, targets), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
