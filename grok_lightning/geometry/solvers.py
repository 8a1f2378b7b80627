"""Batched LSQR: several least-squares problems with one operator, solved in lockstep.

LSQR (Paige & Saunders, 1982) minimizes ‖A x − b‖² + damp²‖x‖² by Golub–Kahan bidiagonalization. In exact
arithmetic it is CG on the normal equations (AᵀA + damp²I) x = Aᵀb, but its short recurrences are far better
behaved in finite precision, and its residual ‖b − A x_k‖ decreases monotonically to the least-squares
residual even when A is rank deficient (the case here). Every quantity of the recurrence is a (k,) tensor,
one entry per right-hand side; the k products per step go through one batched call of each operator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LSQRResult:
    """Outcome of :func:`batched_lsqr`.

    Attributes:
        x: Solutions, (k, n).
        residual: Residual vectors b − A x (kept by a recurrence, no extra product), (k, m).
        iterations: Bidiagonalization steps taken (the same for every column).
        normal_residual: LSQR's estimate of ‖Aᵀ(b − A x)‖ (damped: of the damped normal residual), (k,).
        converged: Whether each column met its tolerance, (k,) bool.
        scale: The reference of the stopping test, (k,).
        timed_out: Whether the solve stopped at ``stop_at`` with columns still unconverged.
    """

    x: Tensor
    residual: Tensor
    iterations: int
    normal_residual: Tensor
    converged: Tensor
    scale: Tensor
    timed_out: bool = False


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def batched_lsqr(
    matvec: Callable[[Tensor], Tensor],
    rmatvec: Callable[[Tensor], Tensor],
    b: Tensor,
    n: int,
    *,
    damp: float = 0.0,
    tol: Tensor | float = 1e-6,
    scale: Tensor | None = None,
    max_iter: int = 100,
    trace: Callable[[int, Tensor, Tensor], None] | None = None,
    stop_at: float | None = None,
    atol: float = 0.0,
) -> LSQRResult:
    """Solve min ‖A xⱼ − bⱼ‖² + damp²‖xⱼ‖² for k right-hand sides at once, starting from x = 0.

    Args:
        matvec: x (k, n) ↦ A x (k, m).
        rmatvec: y (k, m) ↦ Aᵀ y (k, n).
        b: Right-hand sides, (k, m); its dtype is the dtype of the recurrence (float64 recommended).
        n: Number of unknowns.
        damp: Tikhonov damping (≥ 0).
        tol: Stop column j once ‖Aᵀ rⱼ‖ ≤ tolⱼ · scaleⱼ; a float or a (k,) tensor.
        scale: The reference of the stopping test, (k,); default ‖Aᵀ bⱼ‖ (so the test is relative).
        max_iter: Iteration cap.
        trace: Optional ``trace(iteration, residual_norm, normal_residual)`` called after every step with
            LSQR's (k,) estimates of ‖b − A x‖ and ‖Aᵀ(b − A x)‖ (for convergence studies).
        stop_at: A :func:`time.perf_counter` value: no step starts after it (unconverged columns then
            report ``converged=False`` and ``timed_out`` is set). ``None``: no time limit.
        atol: Also stop column j (converged) once ‖Aᵀrⱼ‖ ≤ atol·‖A‖·‖rⱼ‖, with LSQR's estimates of ‖A‖ (the
            Frobenius norm of the bidiagonal matrix so far) and of ‖rⱼ‖: Paige and Saunders' test for a
            least-squares solution found to the products' precision. Where ``tol · scale`` lies below the
            rounding level of the products (Aᵀb itself rounding noise: b in the null space of Aᵀ to working
            precision), the first test can never be met; LSQR would go on past the exhaustion of its Krylov
            space, where the bidiagonalization runs on rounding noise and its steps corrupt the solution.
            ``0``: off.

    Returns:
        An :class:`LSQRResult`. Columns with b = 0 or Aᵀb = 0 are solved at x = 0 with zero iterations of
        their own (they ride along, frozen).
    """
    k, _m = b.shape
    dtype, device = b.dtype, b.device
    x = torch.zeros(k, n, dtype=dtype, device=device)
    r = b.clone()

    # Bidiagonalization start: β₁u₁ = b, α₁v₁ = Aᵀu₁.
    beta = b.norm(dim=1)
    u = b * _safe_div(torch.ones_like(beta), beta)[:, None]
    v = rmatvec(u)
    alpha = v.norm(dim=1)
    v = v * _safe_div(torch.ones_like(alpha), alpha)[:, None]
    w = v.clone()
    aw = matvec(w)  # A·w, kept by recurrence so that the residual needs no extra product
    phibar, rhobar = beta.clone(), alpha.clone()
    if scale is None:
        scale = alpha * beta
    tol_t = torch.as_tensor(tol, dtype=dtype, device=device).expand(k)
    normal = alpha * beta
    active = normal > tol_t * scale
    anorm = torch.zeros_like(beta)  # ‖A‖ estimate: Frobenius norm of the bidiagonal matrix so far
    iterations = 0
    av = aw.clone()  # A·v for the current v

    timed_out = False
    while bool(active.any()) and iterations < max_iter:
        if stop_at is not None and time.perf_counter() >= stop_at:
            timed_out = True
            break
        iterations += 1
        # Continue the bidiagonalization: β u = A v − α u, α v = Aᵀ u − β v.
        u = av - alpha[:, None] * u
        beta = u.norm(dim=1)
        u = u * _safe_div(torch.ones_like(beta), beta)[:, None]
        anorm = torch.sqrt(anorm**2 + alpha**2 + beta**2 + damp**2)
        if damp > 0:
            rhobar1 = torch.sqrt(rhobar**2 + damp**2)
            cs1 = _safe_div(rhobar, rhobar1)
            phibar = cs1 * phibar
            rhobar = rhobar1
        v_next = rmatvec(u) - beta[:, None] * v
        alpha = v_next.norm(dim=1)
        v = v_next * _safe_div(torch.ones_like(alpha), alpha)[:, None]

        # Givens rotation that eliminates the subdiagonal β.
        rho = torch.sqrt(rhobar**2 + beta**2)
        c, s = _safe_div(rhobar, rho), _safe_div(beta, rho)
        theta = s * alpha
        rhobar = -c * alpha
        phi = c * phibar
        phibar = s * phibar

        # Update x and the residual (frozen columns take no step).
        step = torch.where(active, _safe_div(phi, rho), torch.zeros_like(phi))
        x = x + step[:, None] * w
        r = r - step[:, None] * aw
        av = matvec(v)
        coef = _safe_div(theta, rho)
        w = v - coef[:, None] * w
        aw = av - coef[:, None] * aw
        normal = torch.where(active, (phibar * alpha * c).abs(), normal)
        active = active & (normal > tol_t * scale) & (alpha > 0) & (beta > 0)
        if atol > 0:  # |phibar| is LSQR's estimate of ‖r‖
            active = active & (normal > atol * anorm * phibar.abs())
        if trace is not None:
            trace(iterations, phibar.abs(), normal)

    return LSQRResult(
        x=x,
        residual=r,
        iterations=iterations,
        normal_residual=normal,
        converged=~active,
        scale=scale,
        timed_out=timed_out,
    )
