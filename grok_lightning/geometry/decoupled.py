"""The decoupled dynamics of a two-layer network on the zero-loss manifold: the paper's Eq. 20, in pure torch.

Decoupling (paper §5–6): treat the read-out of a two-layer network ``Ŷ = σ(X E) W₂`` as instantly optimal.
On the zero-loss manifold with weight decay λ, the read-out is then the minimum-norm interpolant
``W₂ = Hᵀ (H Hᵀ)⁻¹ Y`` with ``H = σ(X E)`` (training rows only), whose squared norm is ``tr(Yᵀ (H Hᵀ)⁻¹ Y)``,
and the first layer E follows gradient flow on the reduced cost

    R(E) = λ‖E‖² + λ·tr(Yᵀ (H Hᵀ)⁻¹ Y).

Differentiating (with A = (H Hᵀ)⁻¹ and d tr(Yᵀ A Y) = −2 tr(Hᵀ A Y Yᵀ A dH)) gives

    ∇_E (R/λ) = 2E − 2 Xᵀ[(A Y Yᵀ A H) ⊙ σ′(X E)],

so in the rescaled time s = 2λt the flow dE/dt = −∇R is

    dE/ds = −½ ∇_E (R/λ) = Xᵀ[(A Y Yᵀ A H) ⊙ σ′(X E)] − E        (paper Eq. 20)

(the factor ½ is checked against finite differences of R/λ in ``tests/test_predicted_dynamics.py`` and
``tests/geometry/test_decoupled.py``).

Conventions: E is the first layer as a (d_in, width) matrix, inputs times E, i.e. the *transpose* of an
``nn.Linear(d_in, width).weight``; W₂ is (width, C), the transpose of the read-out ``nn.Linear.weight``. No
biases. The scale of the loss drops out: multiplying the squared error by any c > 0 (mean instead of sum over
samples) changes neither Z nor the minimum-norm read-out, only how λ maps onto time, so the *direction* of the
flow is the same for every reduction.

Nothing here imports Lightning: :class:`~grok_lightning.reference.PredictedDynamicsModule` simulates the flow
and :class:`~grok_lightning.Eq20AlignmentMonitor` compares it with a trained network's first-layer updates.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "FLOW_ACTIVATIONS",
    "FlowActivation",
    "SingularGramError",
    "activation_and_slope",
    "eq20_flow",
    "gram_cholesky",
    "reduced_cost",
]

FlowActivation = Literal["relu", "quadratic", "gelu"]
FLOW_ACTIVATIONS: tuple[str, ...] = ("relu", "quadratic", "gelu")


class SingularGramError(RuntimeError):
    """The Gram matrix H Hᵀ of the training rows' hidden features is singular: no minimum-norm read-out."""


def activation_and_slope(z: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """σ(z) and σ′(z), elementwise, for ``"relu"`` (σ′ = 1 where z > 0, else 0), ``"quadratic"`` (z²) or ``"gelu"``.

    ``"gelu"`` is the exact one, z·Φ(z) (PyTorch's default), with σ′(z) = Φ(z) + z·φ(z).

    Raises:
        ValueError: If ``activation`` is none of these.
    """
    if activation == "relu":
        return z.clamp_min(0.0), (z > 0).to(z.dtype)
    if activation == "quadratic":
        return z * z, 2.0 * z
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))  # Φ(z)
        density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)  # φ(z)
        return z * cdf, cdf + z * density
    raise ValueError(f"Expected argument `activation` to be one of {FLOW_ACTIVATIONS}, but got {activation!r}.")


def gram_cholesky(h: Tensor) -> Tensor:
    """Cholesky factor of the Gram matrix H Hᵀ, (n, n), of hidden features H (n, width).

    Raises:
        SingularGramError: If H Hᵀ is not positive definite (the rows of H are linearly dependent).
    """
    gram = h @ h.T  # (n, n)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:  # host sync: a singular Gram matrix must stop the computation, not produce NaNs
        raise SingularGramError(
            f"The Gram matrix H Hᵀ of the {h.shape[0]} training rows is singular (its leading minor of order "
            f"{int(info)} is not positive definite), so the minimum-norm read-out Hᵀ(H Hᵀ)⁻¹Y does not exist. The "
            f"hidden features of the training rows are linearly dependent: too many hidden units are dead or the "
            f"width ({h.shape[1]}) is too small for the training set."
        )
    return factor


def reduced_cost(embedding: Tensor, inputs: Tensor, targets: Tensor, activation: str = "relu") -> Tensor:
    """R/λ = ‖E‖² + tr(Yᵀ (H Hᵀ)⁻¹ Y) with H = σ(X E), a float64 scalar.

    Args:
        embedding: E, (d_in, width).
        inputs: X, the training inputs, (n, d_in).
        targets: Y, the training targets, (n, C).
        activation: ``"relu"``, ``"quadratic"`` or ``"gelu"``.

    Raises:
        SingularGramError: If H Hᵀ is singular.
    """
    e, x, y = embedding.double(), inputs.double(), targets.double()
    h, _ = activation_and_slope(x @ e, activation)
    readout_coefficients = torch.cholesky_solve(y, gram_cholesky(h))  # A Y, (n, C)
    return e.square().sum() + (y * readout_coefficients).sum()


def eq20_flow(
    embedding: Tensor, inputs: Tensor, targets: Tensor, activation: str = "relu"
) -> tuple[Tensor, Tensor, Tensor]:
    """The velocity of paper Eq. 20 at E, with the read-out and the reduced cost at the same E.

    Args:
        embedding: E, (d_in, width).
        inputs: X, the training inputs, (n, d_in).
        targets: Y, the training targets, (n, C).
        activation: ``"relu"``, ``"quadratic"`` or ``"gelu"``.

    Returns:
        ``(dE/ds, W₂, R/λ)``: the flow Xᵀ[(A Y Yᵀ A H) ⊙ σ′(X E)] − E, (d_in, width); the minimum-norm
        read-out Hᵀ A Y, (width, C); and ‖E‖² + tr(Yᵀ A Y), a scalar. All float64, with A = (H Hᵀ)⁻¹ applied
        through a Cholesky solve, never formed.

    Raises:
        SingularGramError: If H Hᵀ is singular.
    """
    e, x, y = embedding.double(), inputs.double(), targets.double()
    pre = x @ e  # (n, width)
    h, slope = activation_and_slope(pre, activation)
    b = torch.cholesky_solve(y, gram_cholesky(h))  # A Y, (n, C)
    readout = h.T @ b  # W₂ = Hᵀ A Y, (width, C)
    pull = b @ readout.T  # A Y Yᵀ A H = (A Y)(Hᵀ A Y)ᵀ, (n, width)
    flow = x.T @ (pull * slope) - e  # (d_in, width)
    cost = e.square().sum() + (y * b).sum()
    return flow, readout, cost
