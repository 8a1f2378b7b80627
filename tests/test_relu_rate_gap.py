"""examples/relu_rate_gap.py on a tiny case: the kink-aware projector, and the rates against direct computations."""

import sys
from pathlib import Path

import pytest
import torch
from torch.func import hessian, jacrev

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from relu_rate_gap import Flat, build, kink_tangent, row_basis, run, top_hessian_eigenvalue

TINY_DATA = {"p": 5, "train_fraction": 0.8}  # 15 unordered pairs, 12 trained on: J is 60 × 160
TINY_MODEL = {"hidden": 16}


def _tiny(activation="relu"):
    data, model = build(activation, seed=0, data_overrides=TINY_DATA, model_overrides=TINY_MODEL)
    flat = Flat(model, data.train_inputs, data.train_targets)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    return flat, theta


def _null_projector(matrix):
    """Projector onto null(matrix) from a plain full SVD."""
    _, s, vh = torch.linalg.svd(matrix, full_matrices=True)
    rank = int((s > max(matrix.shape) * torch.finfo(torch.float64).eps * s[0]).sum())
    null = vh[rank:].T
    return null @ null.T, rank


def test_kink_aware_projector_is_the_projector_onto_null_of_the_stacked_rows():
    flat, theta = _tiny()
    jac = jacrev(flat.flat_outputs)(theta)
    z = flat.preactivations(theta)
    mask = z.abs() < z.abs().median()  # half of the pre-activations, so K is far from trivial
    dz = jacrev(flat.preactivations)(theta)[mask]  # the rows ∂z_{j,i}/∂θ, by autodiff, independent of kink_basis
    expected, rank = _null_projector(torch.cat([jac, dz]))
    v_row, _, rank_j = row_basis(jac)
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    projector = kink_tangent(v_row, flat.kink_basis(mask), eye)
    torch.testing.assert_close(projector, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(projector @ projector, projector, atol=1e-10, rtol=0)
    torch.testing.assert_close(projector, projector.T, atol=1e-12, rtol=0)
    assert (jac @ projector).abs().max() < 1e-10 and (dz @ projector).abs().max() < 1e-10
    assert rank > rank_j  # the kink rows do remove tangent directions
    # An empty kink set gives back P_T = I − Jᵀ(JJᵀ)⁺J.
    plain, _ = _null_projector(jac)
    empty = kink_tangent(v_row, flat.kink_basis(torch.zeros_like(mask)), eye)
    torch.testing.assert_close(empty, plain, atol=1e-10, rtol=0)


def _norms_by_hand(steps):
    """‖θ_t‖² for t = 0..steps from a hand-written full-batch SGD loop on the same preset."""
    data, model = build("relu", seed=0, data_overrides=TINY_DATA, model_overrides=TINY_MODEL)
    lr, wd = model.hparams.lr, model.hparams.weight_decay
    x, y = data.train_inputs, data.train_targets
    params = [p.detach().clone() for p in model.parameters()]
    norms = []
    for _ in range(steps + 1):
        norms.append(sum(float(p.double().square().sum()) for p in params))
        w1, w2 = (p.requires_grad_(True) for p in params)
        loss = (torch.relu(x @ w1.T) @ w2.T - y).square().sum(dim=1).mean()
        grads = torch.autograd.grad(loss, [w1, w2])
        params = [(p - lr * (g + wd * p)).detach() for p, g in zip(params, grads, strict=True)]
    return norms, lr, wd


def test_run_rates_and_one_step_budget_match_direct_computation():
    window, step = 4, 30
    result = run(
        "relu",
        [step],
        window=window,
        data_overrides=TINY_DATA,
        model_overrides=TINY_MODEL,
        kink_thresholds=(1e-2, 1e-1),
        power_iterations=30,
    )
    (entry,) = result["steps"]
    norms, lr, wd = _norms_by_hand(step + window + 1)
    half = window // 2
    assert entry["norm_sq"] == pytest.approx(norms[step], rel=1e-6)
    assert entry["measured"]["ctr"] == pytest.approx(-(norms[step + half] - norms[step - half]) / window, rel=1e-3)
    assert entry["measured"]["bwd"] == pytest.approx(-(norms[step] - norms[step - window]) / window, rel=1e-3)
    budget = entry["one_step"]
    assert budget["measured_one_step"] == pytest.approx(-(norms[step + 1] - norms[step]), rel=1e-3)
    assert budget["measured_one_step"] == pytest.approx(budget["first_order"] + budget["second_order"], rel=1e-9)
    assert budget["first_order"] == pytest.approx(budget["first_order_from_gradient"], rel=1e-4)
    assert budget["tangent_term"] + budget["normal_term"] == pytest.approx(
        budget["first_order_from_gradient"], rel=1e-8
    )
    assert entry["predicted"] == pytest.approx(2 * lr * wd * entry["tangent_fraction"] * entry["norm_sq"], rel=1e-12)
    for other in ("tangent_fraction_lstsq", "tangent_fraction_package", "tangent_fraction_f32_cutoff"):
        assert entry[other] == pytest.approx(entry["tangent_fraction"], abs=1e-5)
    kinks = entry["kink_aware"]
    assert kinks["0.01"]["tangent_fraction"] >= kinks["0.1"]["tangent_fraction"] - 1e-12  # more rows, less room
    assert all(k["tangent_fraction"] <= entry["tangent_fraction"] + 1e-12 for k in kinks.values())


def test_top_hessian_eigenvalue_matches_the_dense_hessian():
    flat, theta = _tiny()
    wd = 4e-3
    dense = hessian(flat.loss)(theta) + wd * torch.eye(theta.numel(), dtype=torch.float64)
    start = torch.linalg.svd(jacrev(flat.flat_outputs)(theta))[2][0]
    value = top_hessian_eigenvalue(flat, theta, wd, start, iterations=200)
    assert value == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-4)
