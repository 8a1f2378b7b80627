"""Properties of the tangent projector that hold for any network, any constraint set and either method.

``tests/geometry/test_projection.py`` checks P_T against an SVD reference on fixed networks (and random ones for the
output constraints), and parameter-order invariance on one network. Here hypothesis draws the network (depth, widths,
activation, biases, float32 or float64), the constraint kind, the method and the vectors, and checks what a
projector onto null(J) must satisfy without any reference: idempotent, self-adjoint, J·P_T v = 0, P_T(Jᵀw) = 0,
tangent ⟂ normal, linear, a contraction; the same projection whatever order the parameters are listed in; and a
larger tangent space for a coarser constraint set (per-sample losses instead of outputs, a probe subset).

How exact "exact" is depends on J. The dense method is an orthogonal projector to rounding; the iterative one stops
when ‖J·P_T v‖ ≤ tol·‖J v‖, so its error along a direction of singular value σ can reach tol·σ_max/σ: its tolerance
here is scaled by the condition number of J. Networks whose J has a singular value in the band where "zero or not"
is a matter of rounding (between ``ZERO`` and ``SEPARATED`` times σ_max) are discarded: there the two methods may
rightly disagree on the rank, and no projector property is well posed.
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from grok_lightning.geometry import ConstraintOperator, TangentProjector

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
# Relative accuracy of the projection to rounding: the Jacobian's products run in the network's dtype.
ACCURACY = {torch.float64: 1e-7, torch.float32: 2e-4}
SOLVER_TOL = {torch.float64: 1e-11, torch.float32: 1e-7}
# Singular values below ZERO·σ_max are rounding noise (structural zeros), above SEPARATED·σ_max resolved.
ZERO = {torch.float64: 1e-12, torch.float32: 1e-6}
SEPARATED = {torch.float64: 1e-5, torch.float32: 1e-3}


def squared_error(outputs, targets):
    return (outputs - targets).pow(2).sum(dim=-1)


def network(seed, widths, activation, bias, dtype):
    """A random MLP with the given widths, its inputs (n samples) and targets."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(ACTIVATIONS[activation]())
        layer = nn.Linear(a, b, bias=bias)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / a**0.5)
        layers.append(layer)
    return nn.Sequential(*layers).to(dtype)


def data(seed, n, widths, dtype):
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(n, widths[0], generator=generator).to(dtype)
    targets = torch.randn(n, widths[-1], generator=generator).to(dtype)
    return inputs, targets


def accuracy(op, method, dtype):
    """(relative accuracy of the projection, ‖J‖₂); discards the example when J's rank is ambiguous."""
    sigma = torch.linalg.svdvals(op.jacobian())
    top = float(sigma[0])
    if top == 0:
        return ACCURACY[dtype], 0.0
    resolved = sigma[sigma > ZERO[dtype] * top]
    assume(bool((resolved >= SEPARATED[dtype] * top).all()))
    condition = top / float(resolved[-1])
    iterative = 10 * SOLVER_TOL[dtype] * condition if method == "iterative" else 0.0
    return ACCURACY[dtype] + iterative, top


def projector(net, inputs, targets, kind, method, dtype, params=None, probe_size=None):
    op = ConstraintOperator(
        net, inputs, params, kind=kind, targets=targets, loss_fn=squared_error, probe_size=probe_size
    )
    return op, TangentProjector(op, method, tol=SOLVER_TOL[dtype], max_iter=3000)


networks = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "widths": st.lists(st.integers(1, 6), min_size=1, max_size=2).map(lambda hidden: (3, *hidden, 2)),
        "n": st.integers(1, 6),
        "activation": st.sampled_from(sorted(ACTIVATIONS)),
        "bias": st.booleans(),
        "dtype": st.sampled_from([torch.float64, torch.float32]),
        "kind": st.sampled_from(["outputs", "losses"]),
        "method": st.sampled_from(["dense", "iterative"]),
    }
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=networks, a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_projector_is_the_orthogonal_projector_onto_null_j(case, a, b):
    """Idempotent, self-adjoint, J·P_T v = 0, P_T(Jᵀw) = 0, P_T v ⟂ P_N v, linear, a contraction."""
    dtype, widths = case["dtype"], case["widths"]
    net = network(case["seed"], widths, case["activation"], case["bias"], dtype)
    inputs, targets = data(case["seed"], case["n"], widths, dtype)
    op, proj = projector(net, inputs, targets, case["kind"], case["method"], dtype)
    eps, j_norm = accuracy(op, case["method"], dtype)
    generator = torch.Generator().manual_seed(case["seed"] + 2)
    u, v = torch.randn(2, op.num_params, dtype=torch.float64, generator=generator)
    w = torch.randn(op.num_constraints, dtype=torch.float64, generator=generator)
    row = op.vjp(w)  # Jᵀw ∈ row(J)

    result = proj.project(torch.stack([u, v, a * u + b * v, row]))
    tu, tv, tcombined, trow = result.tangent
    nv = result.normal[1]
    norm = float(u.norm() + v.norm())

    assert float((proj.project(tv).tangent - tv).norm()) <= eps * norm  # P_T² = P_T
    assert float((proj.project(nv).tangent).norm()) <= eps * norm  # P_T P_N = 0
    assert abs(float(tu @ v - u @ tv)) <= eps * norm**2  # P_T = P_Tᵀ
    assert abs(float(tv @ nv)) <= eps * norm**2  # T ⟂ N
    assert float(op.jvp(tv).norm()) <= 10 * eps * j_norm * float(v.norm())  # J·P_T v = 0
    assert float(trow.norm()) <= 10 * eps * j_norm * float(w.norm())  # row(J) has no tangent part
    assert float((tcombined - (a * tu + b * tv)).norm()) <= eps * (abs(a) + abs(b) + 1) * norm  # linear
    assert float(tv.norm()) <= float(v.norm()) * (1 + eps)  # ‖P_T v‖ ≤ ‖v‖
    torch.testing.assert_close(result.tangent + result.normal, torch.stack([u, v, a * u + b * v, row]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=networks, order=st.randoms(use_true_random=False))
def test_projection_does_not_depend_on_the_parameter_order(case, order):
    """Any order of the parameter list permutes the blocks of P_T v and leaves ρ = ‖P_Tθ‖²/‖θ‖² unchanged."""
    dtype, widths = case["dtype"], case["widths"]
    net = network(case["seed"], widths, case["activation"], case["bias"], dtype)
    inputs, targets = data(case["seed"], case["n"], widths, dtype)
    params = list(net.parameters())
    permutation = list(range(len(params)))
    order.shuffle(permutation)
    shuffled = [params[i] for i in permutation]
    op, proj = projector(net, inputs, targets, case["kind"], case["method"], dtype, params)
    op_shuffled, proj_shuffled = projector(net, inputs, targets, case["kind"], case["method"], dtype, shuffled)
    eps, _ = accuracy(op, case["method"], dtype)

    generator = torch.Generator().manual_seed(case["seed"] + 3)
    blocks = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in params]
    tangent = op.unflatten(proj.project(op.flatten(blocks)).tangent)
    tangent_shuffled = op_shuffled.unflatten(
        proj_shuffled.project(op_shuffled.flatten([blocks[i] for i in permutation])).tangent
    )
    scale = sum(float(b.norm()) for b in blocks)
    for position, i in enumerate(permutation):
        torch.testing.assert_close(tangent_shuffled[position], tangent[i], atol=eps * scale, rtol=0)

    theta, theta_shuffled = op.parameter_vector().double(), op_shuffled.parameter_vector().double()
    rho = float(proj.project(theta).tangent.norm() ** 2 / theta.norm() ** 2)
    rho_shuffled = float(proj_shuffled.project(theta_shuffled).tangent.norm() ** 2 / theta_shuffled.norm() ** 2)
    assert abs(rho - rho_shuffled) <= 10 * eps


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=networks, probe=st.integers(1, 5))
def test_coarser_constraints_have_a_larger_tangent_space(case, probe):
    """null(J_outputs) ⊆ null(J_losses) and null(J_full) ⊆ null(J_probe): a vector tangent to the finer constraint
    set stays tangent to the coarser one, and the coarser tangent part is never shorter."""
    dtype, widths = case["dtype"], case["widths"]
    net = network(case["seed"], widths, case["activation"], case["bias"], dtype)
    inputs, targets = data(case["seed"], max(case["n"], 2), widths, dtype)
    method = case["method"]
    outputs = projector(net, inputs, targets, "outputs", method, dtype)[1]
    losses = projector(net, inputs, targets, "losses", method, dtype)[1]
    sampled = projector(net, inputs, targets, case["kind"], method, dtype, probe_size=probe)[1]
    full = projector(net, inputs, targets, case["kind"], method, dtype)[1]
    eps = max(accuracy(proj.operator, method, dtype)[0] for proj in (outputs, losses, sampled, full))

    generator = torch.Generator().manual_seed(case["seed"] + 4)
    v = torch.randn(outputs.operator.num_params, dtype=torch.float64, generator=generator)
    for fine, coarse in ((outputs, losses), (full, sampled)):
        tangent = fine.project(v).tangent
        torch.testing.assert_close(coarse.project(tangent).tangent, tangent, atol=eps * float(v.norm()), rtol=0)
        assert float(coarse.project(v).tangent.norm()) >= float(tangent.norm()) - eps * float(v.norm())
