"""Tangent projections checked against an independent float64 SVD reference and closed forms."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev

from grok_lightning.geometry import ConstraintOperator, TangentProjector, batched_lsqr

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def make_mlp(seed, activation="tanh", bias=True, widths=(4, 6, 3), dtype=torch.float64):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(a, b, bias=bias))
    net = nn.Sequential(*layers).to(dtype)
    x = torch.randn(5, widths[0], dtype=dtype)
    y = torch.randn(5, widths[-1], dtype=dtype)
    return net, x, y


def mse_per_sample(outputs, targets):
    return (outputs - targets).pow(2).sum(dim=-1)


def reference_jacobian(net, x, names, kind="outputs", y=None):
    """J by jacrev of a functional_call written here, independent of the operator."""
    params = dict(net.named_parameters())

    def f(*primals):
        out = functional_call(net, {**params, **dict(zip(names, primals, strict=True))}, (x,))
        if kind == "losses":
            out = mse_per_sample(out, y)
        return out.reshape(-1)

    primals = [params[n].detach() for n in names]
    blocks = jacrev(f, argnums=tuple(range(len(names))))(*primals)
    m = blocks[0].shape[0]
    return torch.cat([b.reshape(m, -1) for b in blocks], dim=1).double()


def reference_tangent(jac, v):
    """P_T v = v − V Vᵀ v with V the right singular vectors of J above a float64 cut-off."""
    _, s, vh = torch.linalg.svd(jac, full_matrices=False)
    basis = vh[s > s[0] * max(jac.shape) * torch.finfo(torch.float64).eps].T
    return v - basis @ (basis.T @ v)


def build(seed, activation, bias, kind):
    net, x, y = make_mlp(seed, activation, bias)
    op = ConstraintOperator(net, x, kind=kind, targets=y, loss_fn=mse_per_sample)
    return net, x, y, op


CASES = [
    (s, a, b, k)
    for s, (a, b) in enumerate([("relu", False), ("gelu", True), ("tanh", True), ("tanh", False)])
    for k in ("outputs", "losses")
]


@pytest.mark.parametrize(("seed", "activation", "bias", "kind"), CASES)
@pytest.mark.parametrize("method", ["dense", "iterative"])
def test_projection_matches_svd_reference(seed, activation, bias, kind, method):
    """‖P_T v‖ and P_T v agree with a separately computed SVD projector; the result is a projection."""
    net, x, y, op = build(seed, activation, bias, kind)
    jac = reference_jacobian(net, x, op.names, kind, y)
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(3, op.num_params, dtype=torch.float64, generator=generator)
    projector = TangentProjector(op, method, tol=1e-10, max_iter=500)
    result = projector.project(v)
    for i in range(3):
        expected = reference_tangent(jac, v[i])
        assert abs(result.tangent[i].norm() - expected.norm()) <= 1e-4 * expected.norm()
        torch.testing.assert_close(result.tangent[i], expected, atol=1e-6 * v[i].norm(), rtol=0)
    # J·P_T v ≈ 0, P_T + P_N = I, idempotent.
    assert (result.tangent @ jac.T).norm() <= 1e-6 * (v @ jac.T).norm()
    torch.testing.assert_close(result.tangent + result.normal, v)
    again = projector.project(result.tangent)
    torch.testing.assert_close(again.tangent, result.tangent, atol=1e-6 * v.norm(), rtol=0)
    assert result.converged and result.relative_residual <= 1e-6


def test_analytic_toy_two_weights():
    """ŷ = w₁x₁ + w₂x₂ on the sample (1, 1): J = [1, 1], P_T w = ((w₁−w₂)/2, (w₂−w₁)/2) exactly."""
    net = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[-1.0, 1.0]]))
    op = ConstraintOperator(net, torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(op.jacobian(), torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    w = op.parameter_vector()
    for method in ("dense", "iterative"):
        result = TangentProjector(op, method).project(w)
        torch.testing.assert_close(result.tangent, torch.tensor([-1.0, 1.0], dtype=torch.float64))
        torch.testing.assert_close(result.normal, torch.tensor([0.0, 0.0], dtype=torch.float64))
        assert result.tangent.norm() ** 2 / w.norm() ** 2 == pytest.approx(1.0)  # ρ = 1 here


@pytest.mark.parametrize("method", ["dense", "iterative"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_loss_gradient_has_no_tangent_part(method, activation):
    """The trap: for L = Σ‖f − y‖², ∇L = Jᵀ·2(F − Y) lies in row(J), so P_T(θ)∇L(θ) = 0."""
    net, x, y = make_mlp(3, activation, bias=True)
    loss = (net(x) - y).pow(2).sum()
    grads = torch.autograd.grad(loss, list(net.parameters()))
    op = ConstraintOperator(net, x)
    gradient = op.flatten(grads).double()
    result = TangentProjector(op, method, tol=1e-10, max_iter=500).project(gradient)
    assert result.tangent.norm() <= 1e-6 * gradient.norm()
    assert result.normal.norm() == pytest.approx(gradient.norm().item(), rel=1e-6)


def test_projection_invariant_to_parameter_order():
    """Listing the parameters in another order permutes the blocks of P_T v and changes nothing else."""
    net, x, _ = make_mlp(4, "gelu", bias=True)
    params = list(net.parameters())
    op, op_rev = ConstraintOperator(net, x, params), ConstraintOperator(net, x, params[::-1])
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in params]
    for method in ("dense", "iterative"):
        t = TangentProjector(op, method, tol=1e-10).project(op.flatten(blocks)).tangent
        t_rev = TangentProjector(op_rev, method, tol=1e-10).project(op_rev.flatten(blocks[::-1])).tangent
        for a, b in zip(op.unflatten(t), op_rev.unflatten(t_rev)[::-1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


def test_subset_of_parameters_holds_the_rest_fixed():
    """Projecting over fc2 only equals the SVD projector of the Jacobian's fc2 columns."""
    net, x, _ = make_mlp(5, "tanh", bias=False)
    last = [net[2].weight]
    op = ConstraintOperator(net, x, last)
    jac = reference_jacobian(net, x, ["2.weight"])
    v = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = TangentProjector(op, "dense").project(v)
    torch.testing.assert_close(result.tangent, reference_tangent(jac, v), atol=1e-10, rtol=0)


def test_rank_deficient_more_constraints_than_parameters():
    """m > P (as on the mod-97 preset): ReLU rescaling directions stay tangent and are found."""
    net, x, _ = make_mlp(6, "relu", bias=False, widths=(3, 2, 4))  # P = 14 < m = 20
    x = x.abs() + 0.1  # keep every hidden unit alive
    with torch.no_grad():
        net[0].weight.abs_()
    op = ConstraintOperator(net, x)
    assert op.num_constraints > op.num_params
    jac = reference_jacobian(net, x, op.names)
    theta = op.parameter_vector()
    expected = reference_tangent(jac, theta)
    # Closed form lower bound: each hidden unit's rescaling (W₁ⱼ, −W₂ⱼ) lies in null(J).
    w1, w2 = net[0].weight.detach(), net[2].weight.detach()
    a, b = (w1**2).sum(1), (w2**2).sum(0)
    assert expected.norm() ** 2 >= ((a - b) ** 2 / (a + b)).sum() - 1e-10
    for method in ("dense", "iterative"):
        result = TangentProjector(op, method, tol=1e-10, max_iter=500).project(theta)
        torch.testing.assert_close(result.tangent, expected, atol=1e-7, rtol=0)


def test_iterative_warm_start_reuses_previous_solution():
    """A second solve of a slightly moved θ under the same key converges in fewer steps, same answer."""
    net, x, _ = make_mlp(7, "tanh", bias=True, widths=(4, 16, 3))
    op = ConstraintOperator(net, x)
    projector = TangentProjector(op, "iterative", tol=1e-9, max_iter=500)
    cold = projector.project(op.parameter_vector(), keys=["theta"])
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.999)  # in place: invalidates the operator's cache
    warm = projector.project(op.parameter_vector(), keys=["theta"])
    fresh = TangentProjector(op, "iterative", tol=1e-9, max_iter=500).project(op.parameter_vector())
    assert warm.iterations < fresh.iterations
    torch.testing.assert_close(warm.tangent, fresh.tangent, atol=1e-7, rtol=0)
    assert cold.iterations == fresh.iterations


def test_damping_matches_regularized_formula():
    """With damping δ the iterative result is v − Jᵀ(JJᵀ + δ²I)⁻¹Jv."""
    net, x, _ = make_mlp(8, "tanh", bias=True)
    op = ConstraintOperator(net, x)
    jac = reference_jacobian(net, x, op.names)
    v = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    delta = 0.3
    expected = v - jac.T @ torch.linalg.solve(jac @ jac.T + delta**2 * torch.eye(jac.shape[0]), jac @ v)
    result = TangentProjector(op, "iterative", tol=1e-12, max_iter=500, damping=delta).project(v)
    torch.testing.assert_close(result.tangent, expected, atol=1e-7, rtol=0)


def test_auto_method_picks_by_size():
    """Small problems go dense, problems whose J exceeds the byte budget go iterative."""
    net, x, _ = make_mlp(9, "tanh", bias=True)
    op = ConstraintOperator(net, x)
    assert TangentProjector(op).resolved_method == "dense"
    assert TangentProjector(op, dense_max_bytes=8).resolved_method == "iterative"
    assert TangentProjector(op, dense_max_side=2).resolved_method == "iterative"


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    hidden=st.integers(1, 8),
    n=st.integers(1, 6),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    bias=st.booleans(),
)
def test_random_models_dense_and_iterative_agree_with_reference(seed, hidden, n, activation, bias):
    """Random widths and sample counts, both regimes m ≤ P and m > P."""
    torch.manual_seed(seed)
    net, _, _ = make_mlp(seed, activation, bias, widths=(3, hidden, 2))
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    op = ConstraintOperator(net, x)
    jac = reference_jacobian(net, x, op.names)
    v = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    expected = reference_tangent(jac, v)
    for method in ("dense", "iterative"):
        result = TangentProjector(op, method, tol=1e-11, max_iter=1000).project(v)
        err = (result.tangent - expected).norm()
        assert err <= 1e-5 * max(v.norm(), 1e-12), (method, err.item())
        assert math.isclose(result.tangent.norm().item(), expected.norm().item(), rel_tol=1e-4, abs_tol=1e-8)


def test_batched_lsqr_least_squares():
    """LSQR on a plain random overdetermined system matches torch.linalg.lstsq, column by column."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(30, 8, dtype=torch.float64, generator=generator)
    b = torch.randn(2, 30, dtype=torch.float64, generator=generator)
    out = batched_lsqr(lambda x: x @ a.T, lambda y: y @ a, b, 8, tol=1e-14, max_iter=100)
    expected = torch.linalg.lstsq(a, b.T).solution.T
    torch.testing.assert_close(out.x, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.residual, b - expected @ a.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("widths", [(4, 6, 3), (4, 2, 3)])  # m = 15 < P, and m = 15 > P = 14 (rank deficient)
def test_min_norm_solve_matches_pseudo_inverse(widths):
    """J⁺r from the dense factorization equals pinv(J)·r by SVD; LSQR's agrees where J is well conditioned."""
    net, x, _ = make_mlp(3, "tanh", False, widths)
    op = ConstraintOperator(net, x)
    jac = reference_jacobian(net, x, op.names)
    generator = torch.Generator().manual_seed(0)
    r = torch.randn(2, op.num_constraints, dtype=torch.float64, generator=generator)
    expected = (torch.linalg.pinv(jac, rtol=max(jac.shape) * torch.finfo(torch.float64).eps) @ r.T).T
    projector = TangentProjector(op, "dense")
    dense = projector.min_norm_solve(r)
    torch.testing.assert_close(dense.solution, expected, rtol=1e-8, atol=1e-10)
    assert projector.min_norm_solve(r[0]).solution.shape == (op.num_params,)
    # The projection at the same θ reuses the factorization.
    cached = projector._dense
    projector.project(op.parameter_vector())
    assert projector._dense is cached
    if widths[1] > 2:
        iterative = TangentProjector(op, "iterative", tol=1e-12, max_iter=1000).min_norm_solve(r)
        assert iterative.converged and iterative.iterations > 0
        torch.testing.assert_close(iterative.solution, expected, rtol=1e-6, atol=1e-8)


def test_deadline_stops_the_iterative_solve():
    """A spent deadline stops LSQR before its first step: not converged, timed out; dense ignores it."""
    net, x, _ = make_mlp(0, "tanh", True)
    op = ConstraintOperator(net, x)
    v = op.parameter_vector()
    cut = TangentProjector(op, "iterative", tol=1e-12, max_iter=1000).project(v, deadline=0.0)
    assert (cut.iterations, cut.converged, cut.extras["timed_out"]) == (0, False, True)
    full = TangentProjector(op, "iterative", tol=1e-12, max_iter=1000).project(v, deadline=60.0)
    assert full.converged and not full.extras["timed_out"] and full.iterations > 0
    assert TangentProjector(op, "dense").project(v, deadline=0.0).converged
    solve = TangentProjector(op, "iterative").min_norm_solve(op.value(), deadline=0.0)
    assert (solve.iterations, solve.converged, solve.timed_out) == (0, False, True)
    with pytest.raises(ValueError, match="`deadline`"):
        TangentProjector(op, "iterative").project(v, deadline=-1.0)


def linear_model(singular_values, duplicates=0, width=8, outputs=3, seed=0):
    """A bias-free float64 linear model on inputs X with the given singular values: J = X ⊗ I_C, σ(J) = σ(X)."""
    generator = torch.Generator().manual_seed(seed)
    rows = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64, generator=generator))
    w, _ = torch.linalg.qr(torch.randn(width, rows, dtype=torch.float64, generator=generator))
    base = (u * torch.tensor(singular_values, dtype=torch.float64)) @ w.T
    x = torch.cat([base, base[:duplicates]])
    net = nn.Linear(width, outputs, bias=False).double()
    return net, x


@pytest.mark.parametrize("duplicates", [0, 2])  # full row rank, and rank < m ≤ P (repeated samples)
def test_dense_ill_conditioned_jacobian(duplicates):
    """σ spread over 1e-6 (float64, all above the cut-off): P_T matches the SVD projector, is idempotent to
    rounding, keeps the rank of the SVD, and J⁺r matches pinv(J)·r."""
    rows = 6 - duplicates
    net, x = linear_model(torch.logspace(0, -6, rows).tolist(), duplicates)
    op = ConstraintOperator(net, x)
    jac = reference_jacobian(net, x, op.names)
    assert op.num_constraints <= op.num_params
    sigma = torch.linalg.svdvals(jac)
    rank = int((sigma > 1e-9 * sigma[0]).sum())
    assert rank == rows * 3 and sigma[rank - 1] < 1e-5 * sigma[0]

    generator = torch.Generator().manual_seed(1)
    v = torch.randn(3, op.num_params, dtype=torch.float64, generator=generator)
    projector = TangentProjector(op, "dense")
    result = projector.project(v)
    assert result.rank == rank
    expected = torch.stack([reference_tangent(jac, row) for row in v])
    torch.testing.assert_close(result.tangent, expected, atol=1e-10 * v.norm(), rtol=0)
    again = projector.project(result.tangent).tangent
    torch.testing.assert_close(again, result.tangent, atol=1e-13 * v.norm(), rtol=0)
    assert (result.tangent @ jac.T).norm() <= 1e-13 * (v @ jac.T).norm()

    r = torch.randn(2, op.num_constraints, dtype=torch.float64, generator=generator)
    pinv = (torch.linalg.pinv(jac, rtol=1e-9) @ r.T).T
    solution = projector.min_norm_solve(r).solution
    assert ((solution - pinv).norm(dim=1) / pinv.norm(dim=1)).max() <= 1e-7


@pytest.mark.parametrize(("smallest", "kept"), [(1e-2, 4), (1.2e-3, 4), (0.8e-3, 3), (0.0, 3)])
def test_dense_rank_cut_off_near_the_threshold(smallest, kept):
    """With rank_rtol = 1e-3, σ_min/σ_max = 1e-2, 1.2e-3 (kept), 0.8e-3 and 0 (dropped): the rank and P_T of an SVD
    projector with the same cut-off, whether or not full row rank is clear from the shifted Gram matrix alone."""
    net, x = linear_model([1.0, 0.5, 0.2, smallest])
    op = ConstraintOperator(net, x)
    jac = reference_jacobian(net, x, op.names)
    _, sigma, vh = torch.linalg.svd(jac, full_matrices=False)
    basis = vh[sigma > 1e-3 * sigma[0]].T
    assert basis.shape[1] == kept * 3
    v = torch.randn(2, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    projector = TangentProjector(op, "dense", rank_rtol=1e-3)
    result = projector.project(v)
    assert result.rank == kept * 3
    torch.testing.assert_close(result.tangent, v - (v @ basis) @ basis.T, atol=1e-12 * v.norm(), rtol=0)
    r = torch.randn(op.num_constraints, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.linalg.pinv(jac, rtol=1e-3) @ r
    torch.testing.assert_close(projector.min_norm_solve(r).solution, expected, atol=1e-10 * expected.norm(), rtol=0)


def test_dense_zero_jacobian():
    """J = 0 (all inputs zero): rank 0, every vector tangent, J⁺r = 0."""
    net = nn.Linear(3, 2, bias=False).double()
    op = ConstraintOperator(net, torch.zeros(4, 3, dtype=torch.float64))
    v = torch.randn(2, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    projector = TangentProjector(op, "dense")
    result = projector.project(v)
    assert result.rank == 0 and result.relative_residual == 0
    torch.testing.assert_close(result.tangent, v, atol=0, rtol=0)
    assert projector.min_norm_solve(torch.ones(op.num_constraints)).solution.abs().max() == 0
