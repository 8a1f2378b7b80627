"""The read-out preconditioner: detection, its closed form, and that it leaves the projection unchanged."""

import pytest
import torch
from torch import nn

from grok_lightning.geometry import ConstraintOperator, ReadoutPreconditioner, TangentProjector
from tests.geometry.test_projection import make_mlp, reference_jacobian, reference_tangent


def test_detects_trained_linear_readout():
    """A Sequential MLP's last nn.Linear is found; features are its inputs (with a ones column for the bias)."""
    net, x, _ = make_mlp(0, "tanh", bias=True)
    op = ConstraintOperator(net, x)
    pre = ReadoutPreconditioner.from_operator(op)
    assert pre is not None and pre.layer == "2"
    expected = torch.cat([torch.tanh(net[0](x)), torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    torch.testing.assert_close(pre.features, expected.detach())
    assert pre.shift > 0


@pytest.mark.parametrize(
    "case",
    ["losses", "output_fn", "frozen_readout", "no_linear_last"],
)
def test_not_detected_where_the_structure_is_absent(case):
    """Losses, a transformed output, a frozen read-out or a non-linear last layer: no preconditioner."""
    net, x, y = make_mlp(1, "tanh", bias=False)
    kwargs = {}
    params = None
    if case == "losses":
        kwargs = {"kind": "losses", "targets": y, "loss_fn": lambda o, t: (o - t).pow(2).sum(-1)}
    elif case == "output_fn":
        kwargs = {"output_fn": lambda o: 2 * o}
    elif case == "frozen_readout":
        params = [net[0].weight]
    else:
        net = nn.Sequential(*net, nn.Tanh())
    op = ConstraintOperator(net, x, params, **kwargs)
    assert ReadoutPreconditioner.from_operator(op) is None
    assert TangentProjector(op, "iterative").readout_preconditioner() is None


def test_apply_equals_dense_inverse_square_root():
    """L w = ((H Hᵀ + c I)^(-1/2) ⊗ I_C) w, computed densely from an eigendecomposition of H Hᵀ."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(7, 3, dtype=torch.float64, generator=generator)  # rank 3 < N = 7
    pre = ReadoutPreconditioner(features, 0.7, num_outputs=2, dtype=torch.float64)
    e, v = torch.linalg.eigh(features @ features.T + 0.7 * torch.eye(7, dtype=torch.float64))
    dense = torch.kron((v * e.rsqrt()) @ v.T, torch.eye(2, dtype=torch.float64))  # sample-major rows
    w = torch.randn(3, 14, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(pre.apply(w), w @ dense.T)
    with pytest.raises(ValueError, match="shift"):
        ReadoutPreconditioner(features, 0.0, num_outputs=2, dtype=torch.float64)


@pytest.mark.parametrize(
    ("seed", "activation", "bias", "widths"), [(2, "relu", False, (3, 2, 4)), (3, "gelu", True, (4, 6, 3))]
)
def test_preconditioned_projection_equals_reference_and_plain(seed, activation, bias, widths):
    """Same P_T v as the SVD reference and as plain LSQR (m > P and m < P); exact relative residual."""
    net, x, _ = make_mlp(seed, activation, bias, widths=widths)
    op = ConstraintOperator(net, x)
    jac = reference_jacobian(net, x, op.names)
    v = torch.randn(2, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    pre = TangentProjector(op, "iterative", tol=1e-11, max_iter=1000)
    plain = TangentProjector(op, "iterative", tol=1e-11, max_iter=1000, preconditioner="none")
    result, baseline = pre.project(v), plain.project(v)
    assert result.extras["preconditioner"] == "readout:2" and baseline.extras["preconditioner"] is None
    for i in range(2):
        expected = reference_tangent(jac, v[i])
        torch.testing.assert_close(result.tangent[i], expected, atol=1e-7 * v[i].norm(), rtol=0)
        torch.testing.assert_close(result.tangent[i], baseline.tangent[i], atol=1e-7 * v[i].norm(), rtol=0)
    measured = ((result.tangent @ jac.T).norm(dim=1) / (v @ jac.T).norm(dim=1)).max()
    assert result.relative_residual == pytest.approx(measured.item(), rel=1e-3, abs=1e-12)


def test_damping_bypasses_the_preconditioner():
    net, x, _ = make_mlp(4, "tanh", bias=True)
    projector = TangentProjector(ConstraintOperator(net, x), "iterative", damping=0.1)
    assert projector.readout_preconditioner() is None
    with pytest.raises(ValueError, match="preconditioner"):
        TangentProjector(ConstraintOperator(net, x), "iterative", preconditioner="kfac")
