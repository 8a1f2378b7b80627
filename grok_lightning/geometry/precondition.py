"""An output-space preconditioner for the iterative tangent projection, from the read-out layer's structure.

The iterative projection solves min_u ‖v − Jᵀu‖ (LSQR with A = Jᵀ); its residual at the minimum is P_T v.
Substituting u = L w for any nonsingular L (m × m) leaves range(Jᵀ L) = range(Jᵀ), hence the same minimal
residual, the same P_T v: preconditioning in *output* space keeps the exact orthogonal projector, unlike
parameter-space preconditioning (which changes the metric). A poor L only costs iterations.

When the constraint outputs are the output of an ``nn.Linear`` layer whose weight is trained, F = H Wᵀ (+ b)
with H (N, h) the layer's inputs, so the Jacobian's read-out block is exactly J_W = H ⊗ I_C (rows sample-
major) and J Jᵀ = (H Hᵀ) ⊗ I_C + (the rest). The read-out block dominates the top of the spectrum (H ≥ 0 after
a ReLU has one large mean direction), so we take

    L = (H Hᵀ + c I)^(-1/2) ⊗ I_C,

with c the mean squared row norm of the rest of J (a Hutchinson estimate from two random probes, one batched
J·v), which balances the read-out directions against the others. Applied through the eigendecomposition of
the small Gram HᵀH (h × h): L w = c^(-1/2) w + Q diag((e + c)^(-1/2) − c^(-1/2)) Qᵀ w per output column,
with Q = H V e^(-1/2) orthonormal; cost about a third of one J·v + Jᵀ·u pair.

On the (a + b) mod 97 preset (m = 3.65·10⁵, P = 7.45·10⁴) this cuts the steps to a 1e-3-accurate tangent
fraction from 66 to 24 (see docs/geometry.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from grok_lightning.geometry.operator import ConstraintOperator, evaluation_scope


class ReadoutPreconditioner:
    """L = (H Hᵀ + c I)^(-1/2) ⊗ I_C for a constraint map whose outputs come straight out of a trained ``nn.Linear``.

    Build with :meth:`from_operator`, which returns ``None`` where the structure is not detected (then the
    solver runs unpreconditioned). Symmetric positive definite, so ``apply`` serves as both L and Lᵀ.

    Attributes:
        features: H (N, h) (a ones column appended when the layer's trained bias is part of θ).
        shift: c.
        layer: Name of the read-out layer.
    """

    def __init__(self, features: Tensor, shift: float, num_outputs: int, dtype: torch.dtype, layer: str = "") -> None:
        if shift <= 0:
            raise ValueError(f"Expected argument `shift` to be positive, but got {shift!r}.")
        h64 = features.detach().to(torch.float64)
        eigenvalues, eigenvectors = torch.linalg.eigh(h64.T @ h64)
        keep = eigenvalues > eigenvalues.max().clamp_min(0) * h64.shape[1] * torch.finfo(torch.float64).eps
        eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
        self.features = features.detach()
        self.shift = float(shift)
        self.layer = layer
        self.num_outputs = num_outputs
        self.dtype = dtype
        self._basis = ((h64 @ eigenvectors) / eigenvalues.sqrt()).to(dtype)  # Q (N, r), orthonormal columns
        self._gain = ((eigenvalues + shift).rsqrt() - shift**-0.5).to(dtype)  # (r,)
        self._base = shift**-0.5

    def apply(self, w: Tensor) -> Tensor:
        """L w for w (k, m) (sample-major, C outputs per sample); returns the dtype of ``w``."""
        k = w.shape[0]
        blocks = w.to(self.dtype).reshape(k, -1, self.num_outputs)  # (k, N, C)
        coef = torch.matmul(self._basis.T, blocks) * self._gain[:, None]  # (k, r, C)
        out = self._base * blocks + torch.matmul(self._basis, coef)
        return out.reshape(k, -1).to(w.dtype)

    @classmethod
    def from_operator(
        cls, operator: ConstraintOperator, probes: int = 2, seed: int = 0
    ) -> ReadoutPreconditioner | None:
        """Detect a trained ``nn.Linear`` read-out that produces the constraint outputs; ``None`` if absent.

        Detection: ``kind="outputs"``, and the tensor the module returns (after ``output_fn``) is, as an object,
        the 2-D output (N, C) of an ``nn.Linear`` submodule with a 2-D input whose weight is a trained
        parameter. Nothing else is assumed; a wrong guess could only slow the solver, never change its answer.
        """
        op = operator
        if op.kind != "outputs":
            return None
        trained = set(op.names)
        prefix = {id(mod): f"{name}." if name else "" for name, mod in op.module.named_modules()}
        linears = {
            id(mod): name
            for name, mod in op.module.named_modules()
            if isinstance(mod, nn.Linear) and f"{prefix[id(mod)]}weight" in trained
        }
        if not linears:
            return None
        seen: dict[int, tuple[str, Tensor, Tensor]] = {}

        def hook(mod: nn.Module, args: tuple, output: object) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                seen[id(output)] = (linears[id(mod)], args[0], output)

        handles = [m.register_forward_hook(hook) for m in op.module.modules() if id(m) in linears]
        try:
            op.value()  # linearized state: frozen parameters and cloned buffers
            state = dict(op._frozen)
            state.update({n: p.detach() for n, p in zip(op.names, op.params, strict=True)})
            with evaluation_scope(op.module):
                out = functional_call(op.module, state, op.inputs)
                if op.output_fn is not None:
                    out = op.output_fn(out)
        finally:
            for handle in handles:
                handle.remove()
        if not isinstance(out, Tensor) or id(out) not in seen:
            return None
        name, features, output = seen[id(out)]
        if output is not out or features.dim() != 2 or out.dim() != 2 or out.shape[0] != op.num_samples:
            return None
        features = features.detach()
        base = f"{name}." if name else ""
        readout = {f"{base}weight"} | ({f"{base}bias"} & trained)
        if f"{base}bias" in trained:
            features = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)

        # c: mean squared row norm of the Jacobian of the other trained parameters (Hutchinson, Rademacher).
        generator = torch.Generator().manual_seed(seed)
        z = torch.randint(0, 2, (probes, op.num_params), generator=generator).to(op.dtype).mul_(2).sub_(1)
        for segment, pname in zip(op.segments(), op.names, strict=True):
            if pname in readout:
                z[:, segment] = 0
        shift = 0.0
        if bool(z.any()):
            shift = float(op.jvp(z.to(op.device)).double().pow(2).sum(dim=1).mean()) / op.num_constraints
        gram_mean = float(features.double().pow(2).sum()) / max(features.shape[0], 1)  # mean ‖hᵢ‖²
        floor = 1e-6 * gram_mean if gram_mean > 0 else 1.0
        return cls(features, max(shift, floor), out.shape[1], op.dtype, layer=name)
