"""Tangent and normal projections onto the zero-loss manifold of a constraint set.

At parameters θ with constraint Jacobian J ∈ R^{m×P} (see :mod:`grok_lightning.geometry.operator`), the
tangent space is T = null(J) and the normal space N = row(J) = range(Jᵀ). For any v ∈ R^P:

    P_N v = Jᵀ (J Jᵀ)⁺ J v = J⁺ J v,        P_T v = v − P_N v,

well defined whether or not J has full row rank (when m > P, row(J) may be almost all of R^P and T small).

Two methods, one answer:

* ``"dense"`` materializes J (m, P) in float64 from chunked, vmapped Jᵀ·eᵢ products and finds an orthonormal
  basis V of row(J) after a rank cut-off: singular values σᵢ ≤ rtol · σ_max count as zero, with
  ``rtol = max(m, P) · eps`` of the dtype J was computed in (the convention of ``numpy.linalg.matrix_rank``; J in
  float32 carries relative noise near 1e-7, so smaller singular values are not resolved), and a floor of
  sqrt(side · eps64) from the Gram matrix the σᵢ² are read from, about 1e-7 for side 1000, that matters only for
  float64 models. If m ≤ P: a Householder QR Jᵀ = Q₀ R₀ (Q₀ kept as reflectors, never formed); full row rank
  is confirmed by one Cholesky of the shifted Gram matrix J Jᵀ = R₀ᵀ R₀ and then V = Q₀; otherwise the Gram
  eigendecomposition gives the rank and the kept eigenvectors U_r, and V = Q₀ Q₁ with R₀ U_r = Q₁ R₁. Either V is
  orthonormal to rounding however ill-conditioned J is. If m > P: V is the kept eigenvectors of Jᵀ J. The
  factorization is cached until θ changes, so projecting more vectors at the same θ costs two products with
  Q₀ (or V) and two with J each.
* ``"iterative"`` never forms J: it solves min_u ‖Jᵀu − v‖ with LSQR (:func:`batched_lsqr`, A = Jᵀ), whose
  residual v − Jᵀu *is* P_T v at convergence, and whose residual norm decreases monotonically to ‖P_T v‖.
  Each step costs one J·v (the transpose of the cached vjp closure) and one Jᵀ·u (the cached
  :func:`torch.func.vjp` closure). Since any u gives Jᵀu ∈ row(J), the previous solution u of the same
  vector key is a valid warm start after θ moves: the solver keeps it and starts from it next time.
  Recurrences run in float64, products in the parameters' dtype.
  When the constraint outputs come straight out of a trained ``nn.Linear`` read-out, LSQR is preconditioned in
  output space, u = L w with L = (H Hᵀ + c I)^(-1/2) ⊗ I_C from the read-out's inputs H
  (:class:`~grok_lightning.geometry.precondition.ReadoutPreconditioner`): range(Jᵀ L) = range(Jᵀ), so the
  answer is the same exact projector, in fewer steps.

The stopping test and the reported ``relative_residual`` are ‖J·P_T v‖ / ‖J v‖: the share of the constraint
violation of v that the projection leaves (0 for the exact projection, 1 for none). Where v lies in row(J),
as the loss gradient does, the projection is 0 and that is what the solver returns.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from grok_lightning.geometry.operator import ConstraintOperator
from grok_lightning.geometry.precondition import ReadoutPreconditioner
from grok_lightning.geometry.solvers import batched_lsqr

Method = Literal["auto", "dense", "iterative"]
METHODS: tuple[str, ...] = ("auto", "dense", "iterative")
PRECONDITIONERS: tuple[str, ...] = ("auto", "none")


@dataclass
class ProjectionResult:
    """Tangent and normal parts of one or more vectors, and how they were obtained.

    Attributes:
        tangent: P_T v, (P,) or (k, P), float64.
        normal: P_N v = v − P_T v, same shape.
        method: ``"dense"`` or ``"iterative"``.
        iterations: LSQR steps (0 for dense).
        relative_residual: max over the vectors of ‖J·P_T v‖ / ‖J v‖ (0 when J v = 0); for ``"iterative"``
            LSQR's estimate, for ``"dense"`` measured.
        rank: Numerical rank of J (dense only, else ``None``).
        converged: Whether every vector met the tolerance within the iteration cap (always True for dense).
        seconds: Wall time of the call (including linearization and factorization when they happened).
    """

    tangent: Tensor
    normal: Tensor
    method: str
    iterations: int
    relative_residual: float
    rank: int | None = None
    converged: bool = True
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)


@dataclass
class MinNormSolution:
    """The minimum-norm solution J⁺r of :meth:`TangentProjector.min_norm_solve`, and how it was obtained.

    Attributes:
        solution: J⁺r, (P,) or (k, P), float64.
        method: ``"dense"`` or ``"iterative"``.
        iterations: LSQR steps (0 for dense).
        converged: Whether every right-hand side met the tolerance (always True for dense).
        timed_out: Whether the iterative solve stopped at its deadline.
        seconds: Wall time of the call (including linearization and factorization when they happened).
    """

    solution: Tensor
    method: str
    iterations: int
    converged: bool = True
    timed_out: bool = False
    seconds: float = 0.0


def _machine_eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# ‖J·P_T v‖ below this many machine epsilons of J's products, relative to ‖J‖·‖P_T v‖, is rounding noise: the
# iterative projection stops there (see ``atol`` of :func:`batched_lsqr`).
_ROUNDING = 10.0


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, float | int) or deadline < 0):
        raise ValueError(
            f"Expected argument `deadline` to be a non-negative number of seconds or None, but got {deadline!r}."
        )


@dataclass
class _DenseFactors:
    """J at one θ and an orthonormal basis V (P, r) of its row space after the rank cut-off.

    m ≤ P: Jᵀ = Q₀ R₀ (``torch.geqrf``: Q₀ as Householder reflectors, R₀ (m, m) in the upper triangle), and
    V = Q₀ Q₁ with Jᵀ U_r = V R₁ (U_r the kept eigenvectors of J Jᵀ, Q₁ (m, r), R₁ (r, r) upper triangular), or
    V = Q₀ when every σᵢ is kept (``inner`` None). m > P: V explicit, the kept eigenvectors of Jᵀ J, with their
    eigenvalues σᵢ².
    """

    jac: Tensor  # (m, P) float64
    rank: int
    reflectors: tuple[Tensor, Tensor] | None = None  # m ≤ P: torch.geqrf(Jᵀ), (P, m) and (m,)
    inner: Tensor | None = None  # (m, r) Q₁; None: V = Q₀
    triangle: Tensor | None = None  # (r, r) R₁, with ``inner``
    basis: Tensor | None = None  # m > P: (P, r) V
    sigma_sq: Tensor | None = None  # m > P: (r,) σᵢ²

    def coordinates(self, x: Tensor) -> Tensor:
        """Vᵀx for x (k, P): (k, r)."""
        if self.reflectors is None:
            return x @ self.basis
        a, tau = self.reflectors
        c = torch.ormqr(a, tau, x.T, transpose=True)[: a.shape[1]].T  # (k, m): Q₀ᵀx
        return c if self.inner is None else c @ self.inner

    def expand(self, c: Tensor) -> Tensor:
        """V c for c (k, r): (k, P)."""
        if self.reflectors is None:
            return c @ self.basis.T
        a, tau = self.reflectors
        if self.inner is not None:
            c = c @ self.inner.T  # (k, m)
        padded = c.new_zeros(a.shape[0], c.shape[0])  # (P, k): [c; 0]
        padded[: a.shape[1]] = c.T
        return torch.ormqr(a, tau, padded).T

    def min_norm(self, rhs: Tensor) -> Tensor:
        """J⁺r for r (k, m) with the kept σᵢ only: (k, P)."""
        if self.rank == 0:
            return rhs.new_zeros(rhs.shape[0], self.jac.shape[1])
        if self.reflectors is None:
            return ((rhs @ self.jac) @ self.basis / self.sigma_sq) @ self.basis.T  # V Σ⁻² Vᵀ Jᵀ r
        a = self.reflectors[0]
        r0 = a[: a.shape[1]].triu()  # (m, m)
        if self.inner is None:
            # J = R₀ᵀ Q₀ᵀ with R₀ nonsingular: J⁺r = Q₀ R₀⁻ᵀ r.
            return self.expand(torch.linalg.solve_triangular(r0.T, rhs.T, upper=False).T)
        # B = Jᵀ U_r = V R₁ has B Bᵀ = V Σ_r² Vᵀ, so J⁺r = (B Bᵀ)⁺ Jᵀ r = V (R₁ R₁ᵀ)⁻¹ Vᵀ Jᵀ r, with Vᵀ Jᵀ r = Q₁ᵀ R₀ r:
        # what the thin SVD of B gave. The shorter V R₁⁻ᵀ U_rᵀ r reads U_r itself, whose errors near eps64·σ_max²/λᵢ
        # it does not filter out (measured 3e-5 against 5e-9 relative to pinv(J)·r at σ_min/σ_max = 1e-6).
        z = (rhs @ r0.T) @ self.inner  # (k, r)
        y = torch.linalg.solve_triangular(self.triangle, z.T, upper=True)  # R₁⁻¹ z
        return self.expand(torch.linalg.solve_triangular(self.triangle.T, y, upper=False).T)


def _factorize_dense(jac: Tensor, rtol: float) -> _DenseFactors:
    """The cached factorization of :class:`TangentProjector` for J (m, P) float64 and the rank cut-off ``rtol``."""
    m, p = jac.shape
    # Eigenvalues of the Gram matrix carry absolute errors near side · eps64 · σ_max², so σᵢ below
    # sqrt(side · eps64) · σ_max cannot be told from zero whatever rtol says: σᵢ² ≤ cut · σ_max² count as zero.
    cut = max(rtol**2, min(m, p) * _machine_eps(torch.float64))
    if m > p:
        gram = jac.T @ jac  # (P, P)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
        keep = _kept(eigenvalues, cut)
        return _DenseFactors(jac, int(keep.sum()), basis=eigenvectors[:, keep], sigma_sq=eigenvalues[keep])

    reflectors = torch.geqrf(jac.T)  # Jᵀ = Q₀ R₀
    r0 = reflectors[0][:m].triu()
    gram = r0.T @ r0  # J Jᵀ, (m, m)
    # Full row rank, the usual case, without an eigendecomposition: if G − 2·cut·‖G‖_F·I is positive definite, then
    # λ_min > 2·cut·‖G‖_F ≥ 2·cut·λ_max, so every σᵢ is kept, with a margin of cut·λ_max ≥ side·eps64·λ_max for
    # the Cholesky's rounding. Otherwise the eigenvalues decide, as for m > P.
    shift = 2 * cut * torch.linalg.matrix_norm(gram)
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    if int(torch.linalg.cholesky_ex(gram - shift * eye).info) == 0:  # host sync: the rank decides what follows
        return _DenseFactors(jac, m, reflectors=reflectors)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    rank = int(_kept(eigenvalues, cut).sum())
    if rank == m:
        return _DenseFactors(jac, m, reflectors=reflectors)
    if rank == 0:
        empty = torch.zeros(m, 0, dtype=jac.dtype, device=jac.device)
        return _DenseFactors(jac, 0, reflectors=reflectors, inner=empty, triangle=empty[:0])

    # row(J) after the cut-off = range(Jᵀ U_r) = Q₀ range(R₀ U_r); its QR gives an orthonormal basis whatever the
    # conditioning. R₀ U_r Λ_r^(-1/2) is the same basis in exact arithmetic, but loses orthogonality as σ_max²/σᵢ²
    # grows (eigenvector errors near eps64·σ_max²/λᵢ, measured 1e-3 at σᵢ/σ_max = 5e-7): P_T would not be idempotent.
    inner, triangle = torch.linalg.qr(r0 @ eigenvectors[:, m - rank :])  # (m, r), (r, r)
    return _DenseFactors(jac, rank, reflectors=reflectors, inner=inner, triangle=triangle)


def _kept(eigenvalues: Tensor, cut: float) -> Tensor:
    """Which Gram eigenvalues (ascending) stand for nonzero σᵢ: λᵢ > cut · λ_max, none if λ_max ≤ 0."""
    top = eigenvalues[-1].clamp_min(0.0)
    return (eigenvalues > cut * top) & (top > 0)


class TangentProjector:
    """Projects parameter-space vectors onto T = null(J) and N = row(J) at the operator's current θ.

    A stateful solver: it caches the dense factorization per θ and, for ``"iterative"``, the last LSQR
    solution of each vector key (``keys`` in :meth:`project`) as the next warm start.

    Args:
        operator: The constraint operator (module, constraint set, trained parameters).
        method: ``"dense"``, ``"iterative"`` or ``"auto"`` (dense when J fits in ``dense_max_bytes`` as
            float64 and its small side is at most ``dense_max_side``, iterative otherwise).
        tol: Iterative stopping tolerance on ‖J·P_T v‖ / ‖J v‖.
        max_iter: Iterative iteration cap.
        damping: Tikhonov damping δ ≥ 0 of the iterative solve: it returns v − Jᵀ(JJᵀ + δ²I)⁻¹Jv, which
            leaves directions with σᵢ ≲ δ partly in the tangent part (biasing tangent norms up) and speeds
            convergence. Default 0 (the exact projector).
        rank_rtol: Dense rank cut-off relative to σ_max; default ``max(m, P) · eps(parameter dtype)``.
        dense_max_bytes: Largest float64 J that ``"auto"`` materializes.
        dense_max_side: Largest Gram matrix side that ``"auto"`` decomposes.
        chunk_size: Rows of J per vmapped batch when materializing it.
        warm_start: Whether iterative solves start from the previous solution of the same key.
        preconditioner: ``"auto"`` (default): when the constraint outputs come straight out of a trained
            ``nn.Linear``, precondition LSQR in output space with the read-out layer's
            :class:`~grok_lightning.geometry.precondition.ReadoutPreconditioner` (u = L w; same exact projector,
            fewer steps; the stopping test then reads ‖L·J·P_T v‖ ≤ tol·‖L·J v‖ and ``relative_residual``
            is measured exactly with one extra batched J·v). ``"none"``: plain LSQR. Never used with damping.

    Raises:
        ValueError: If an argument is out of range or an unknown choice.

    Example:
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[0.0, 2.0]]))
        >>> projector = TangentProjector(ConstraintOperator(net, torch.ones(1, 2)), method="dense")
        >>> projector.project(torch.tensor([0.0, 2.0])).tangent.round(decimals=6)
        tensor([-1.,  1.], dtype=torch.float64)
    """

    def __init__(
        self,
        operator: ConstraintOperator,
        method: Method = "auto",
        *,
        tol: float = 1e-4,
        max_iter: int = 200,
        damping: float = 0.0,
        rank_rtol: float | None = None,
        dense_max_bytes: int = 2**28,
        dense_max_side: int = 6000,
        chunk_size: int = 1024,
        warm_start: bool = True,
        preconditioner: str = "auto",
    ) -> None:
        if not isinstance(operator, ConstraintOperator):
            raise ValueError(
                f"Expected argument `operator` to be a ConstraintOperator, but got {type(operator).__name__}."
            )
        if method not in METHODS:
            raise ValueError(f"Expected argument `method` to be one of {METHODS}, but got {method!r}.")
        if not (isinstance(tol, float | int) and 0 < tol < 1):
            raise ValueError(f"Expected argument `tol` to be in (0, 1), but got {tol!r}.")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"Expected argument `max_iter` to be a positive integer, but got {max_iter!r}.")
        if not (isinstance(damping, float | int) and damping >= 0):
            raise ValueError(f"Expected argument `damping` to be non-negative, but got {damping!r}.")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"Expected argument `preconditioner` to be one of {PRECONDITIONERS}, but got {preconditioner!r}."
            )
        if rank_rtol is not None and not (isinstance(rank_rtol, float | int) and 0 <= rank_rtol < 1):
            raise ValueError(f"Expected argument `rank_rtol` to be in [0, 1) or None, but got {rank_rtol!r}.")
        for name, value in (
            ("dense_max_bytes", dense_max_bytes),
            ("dense_max_side", dense_max_side),
            ("chunk_size", chunk_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected argument `{name}` to be a positive integer, but got {value!r}.")
        self.operator = operator
        self.method = method
        self.tol = float(tol)
        self.max_iter = max_iter
        self.damping = float(damping)
        self.rank_rtol = rank_rtol
        self.dense_max_bytes = dense_max_bytes
        self.dense_max_side = dense_max_side
        self.chunk_size = chunk_size
        self.warm_start = warm_start
        self.preconditioner = preconditioner
        self._precond_key: tuple | None = None
        self._precond: ReadoutPreconditioner | None = None
        self._dense_key: tuple | None = None
        self._dense: _DenseFactors | None = None
        self._warm: dict[str, Tensor] = {}

    @property
    def resolved_method(self) -> str:
        """The method ``"auto"`` resolves to for this operator (or the fixed method)."""
        if self.method != "auto":
            return self.method
        m, p = self.operator.num_constraints, self.operator.num_params
        fits = m * p * 8 <= self.dense_max_bytes and min(m, p) <= self.dense_max_side
        return "dense" if fits else "iterative"

    def reset(self) -> None:
        """Forget warm starts and the cached dense factorization and preconditioner."""
        self._warm.clear()
        self._dense_key = self._dense = None
        self._precond_key = self._precond = None

    def readout_preconditioner(self) -> ReadoutPreconditioner | None:
        """The output-space preconditioner the iterative solve uses at the current θ (``None``: plain LSQR)."""
        if self.preconditioner == "none" or self.damping > 0:
            return None
        op = self.operator
        op.value()  # linearize at the current θ (no-op if cached)
        if self._precond_key != op._key:
            self._precond = ReadoutPreconditioner.from_operator(op)
            self._precond_key = op._key
        return self._precond

    # ------------------------------------------------------------------ entry point

    def project(
        self, vectors: Tensor, keys: Sequence[str] | None = None, *, deadline: float | None = None
    ) -> ProjectionResult:
        """Tangent and normal parts of one vector (P,) or a batch (k, P) at the current parameters.

        Args:
            vectors: Flat parameter-space vectors (see :meth:`ConstraintOperator.flatten`), any float dtype.
            keys: One name per vector (e.g. ``["theta", "grad"]``): the iterative solver warm-starts each
                from the previous solution under the same name. Default: ``"0"``, ``"1"``, … by position.
            deadline: Seconds, from the call, after which the iterative solver stops at its next step and
                returns its current iterate with ``converged=False`` and ``extras["timed_out"]=True`` (the
                solution is still kept as the next warm start, so progress accumulates over calls). The
                dense method is a fixed cost and ignores it. ``None``: no limit.

        Returns:
            A :class:`ProjectionResult` whose tensors have the shape of ``vectors``, in float64.
        """
        start = time.perf_counter()
        _check_deadline(deadline)
        p = self.operator.num_params
        if not isinstance(vectors, Tensor) or vectors.dim() not in (1, 2) or vectors.shape[-1] != p:
            raise ValueError(
                f"Expected argument `vectors` to be a tensor of shape ({p},) or (k, {p}), but got "
                f"{tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__}."
            )
        batch = vectors.reshape(-1, p).to(torch.float64)
        if keys is None:
            keys = [str(i) for i in range(batch.shape[0])]
        if len(keys) != batch.shape[0]:
            raise ValueError(f"Expected argument `keys` to name {batch.shape[0]} vectors, but got {len(keys)}.")

        if self.resolved_method == "dense":
            result = self._project_dense(batch)
        else:
            stop_at = None if deadline is None else start + deadline
            result = self._project_iterative(batch, list(keys), stop_at)
        result.seconds = time.perf_counter() - start
        if vectors.dim() == 1:
            result.tangent, result.normal = result.tangent[0], result.normal[0]
        return result

    # ------------------------------------------------------------------ minimum-norm solve

    def min_norm_solve(self, rhs: Tensor, *, deadline: float | None = None) -> MinNormSolution:
        """J⁺r: the minimum-norm δ with J δ = r (least squares when r is not in range(J)), at the current θ.

        With J = U Σ Vᵀ (after the rank cut-off), J⁺r = V Σ⁻¹ Uᵀ r. The dense method reads it from the cached
        factorization that :meth:`project` uses, so a projection at the same θ costs nothing more (notation of
        ``_DenseFactors``): for m ≤ P, Q₀ R₀⁻ᵀ r at full row rank, else V (R₁ R₁ᵀ)⁻¹ Vᵀ Jᵀ r, by triangular
        solves; for m > P, V Σ⁻² Vᵀ Jᵀ r. The iterative one runs plain LSQR on J from δ = 0 (no warm start: δ is
        not comparable between calls), which converges to the minimum-norm solution, stopping when
        ‖Jᵀ(r − Jδ)‖ ≤ ``tol``·‖Jᵀr‖.

        Args:
            rhs: Constraint-space vector(s) r, (m,) or (k, m), any float dtype.
            deadline: As in :meth:`project` (iterative only).

        Returns:
            A :class:`MinNormSolution` whose ``solution`` has shape (P,) or (k, P), float64.
        """
        start = time.perf_counter()
        _check_deadline(deadline)
        op = self.operator
        m = op.num_constraints
        if not isinstance(rhs, Tensor) or rhs.dim() not in (1, 2) or rhs.shape[-1] != m:
            raise ValueError(
                f"Expected argument `rhs` to be a tensor of shape ({m},) or (k, {m}), but got "
                f"{tuple(rhs.shape) if isinstance(rhs, Tensor) else type(rhs).__name__}."
            )
        batch = rhs.reshape(-1, m).to(torch.float64)
        if self.resolved_method == "dense":
            factors = self._factorize()
            x = factors.min_norm(batch.to(factors.jac.device))  # (k, P)
            result = MinNormSolution(solution=x, method="dense", iterations=0)
        else:
            solved = batched_lsqr(
                op.jvp,
                op.vjp,
                batch,
                op.num_params,
                tol=self.tol,
                max_iter=self.max_iter,
                stop_at=None if deadline is None else start + deadline,
            )
            result = MinNormSolution(
                solution=solved.x,
                method="iterative",
                iterations=solved.iterations,
                converged=bool(solved.converged.all()),
                timed_out=solved.timed_out,
            )
        if rhs.dim() == 1:
            result.solution = result.solution[0]
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------ dense

    def _factorize(self) -> _DenseFactors:
        op = self.operator
        op.value()  # linearize at the current θ (no-op if cached)
        if self._dense is not None and self._dense_key == op._key:
            return self._dense
        jac = op.jacobian(self.chunk_size)  # (m, P) float64
        rtol = self.rank_rtol if self.rank_rtol is not None else max(jac.shape) * _machine_eps(op.dtype)
        self._dense = _factorize_dense(jac, rtol)
        self._dense_key = op._key
        return self._dense

    def _project_dense(self, batch: Tensor) -> ProjectionResult:
        factors = self._factorize()
        jac, rank = factors.jac, factors.rank
        batch = batch.to(jac.device)
        normal = factors.expand(factors.coordinates(batch))  # (k, P): V Vᵀ v
        tangent = batch - normal
        jv = batch @ jac.T  # (k, m)
        residual = (tangent @ jac.T).norm(dim=1) / jv.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        residual = torch.where(jv.norm(dim=1) > 0, residual, torch.zeros_like(residual))
        return ProjectionResult(
            tangent=tangent,
            normal=normal,
            method="dense",
            iterations=0,
            relative_residual=float(residual.max()),
            rank=rank,
        )

    # ------------------------------------------------------------------ iterative

    def _project_iterative(self, batch: Tensor, keys: list[str], stop_at: float | None) -> ProjectionResult:
        op = self.operator
        k, m = batch.shape[0], op.num_constraints
        u0 = torch.zeros(k, m, dtype=torch.float64, device=batch.device)
        warm = [self.warm_start and key in self._warm for key in keys]
        for i, key in enumerate(keys):
            if warm[i]:
                u0[i] = self._warm[key]
        precond = self.readout_preconditioner()

        # With u = u₀ + L w, LSQR solves min_w ‖(v − Jᵀu₀) − Jᵀ L w‖ (L = I unpreconditioned): the same
        # minimal residual P_T v for any nonsingular L. Its stopping test is relative to ‖Aᵀ v‖ = ‖L J v‖,
        # which on a warm start (right-hand side v − Jᵀu₀) needs one J·v of its own.
        if precond is None:
            matvec, rmatvec = op.vjp, op.jvp
        else:

            def matvec(w: Tensor) -> Tensor:
                return op.vjp(precond.apply(w))

            def rmatvec(y: Tensor) -> Tensor:
                return precond.apply(op.jvp(y))

        rhs = batch
        scale = None
        jv = None
        if any(warm):
            rhs = batch - op.vjp(u0)
            jv = op.jvp(batch)
            scale = (jv if precond is None else precond.apply(jv)).norm(dim=1)

        solved = batched_lsqr(
            matvec,
            rmatvec,
            rhs,
            m,
            damp=self.damping,
            tol=self.tol,
            scale=scale,
            max_iter=self.max_iter,
            stop_at=stop_at,
            # A vector tangent to rounding (J v is noise) cannot meet the relative test: stop at the precision of
            # J's products instead of iterating on noise (which corrupts the answer).
            atol=_ROUNDING * _machine_eps(op.dtype),
        )
        u = u0 + (solved.x if precond is None else precond.apply(solved.x))
        for i, key in enumerate(keys):
            self._warm[key] = u[i].clone()

        tangent = solved.residual  # v − Jᵀu: P_T v at convergence
        if precond is None:
            reference, leftover = solved.scale, solved.normal_residual
        else:
            # LSQR's estimates are in the preconditioned norm: measure ‖J·P_T v‖ / ‖J v‖ exactly instead.
            if jv is None:
                both = op.jvp(torch.cat([batch, tangent]))
                jv, jt = both[:k], both[k:]
            else:
                jt = op.jvp(tangent)
            reference, leftover = jv.norm(dim=1), jt.norm(dim=1)
        relative = torch.where(reference > 0, leftover / reference.clamp_min(1e-300), torch.zeros_like(reference))
        return ProjectionResult(
            tangent=tangent,
            normal=batch - tangent,
            method="iterative",
            iterations=solved.iterations,
            relative_residual=float(relative.max()),
            converged=bool(solved.converged.all()),
            extras={
                "preconditioner": None if precond is None else f"readout:{precond.layer}",
                "timed_out": solved.timed_out,
            },
        )
