"""Why the predicted norm descent rate overshoots with ReLU: a direct test of the "kink" hypothesis.

Usage::

    python examples/relu_rate_gap.py --out runs/relu_rate_gap               # ReLU and GELU, 6000 steps, about a minute
    python examples/relu_rate_gap.py --activation relu --steps 2000         # measure at 500, 1000, 2000 only
    python examples/relu_rate_gap.py --activation relu --steps 4000 --lr 0.1 --weight-decay 0.02  # far from EoS

The paper preset (``examples/configs/paper_mlp_mse_gd.yaml``: (a + b) mod 11, 59 training pairs, inputs
e_a + e_b, one-hot targets, bias-free two-layer MLP of width 128, mean MSE, full-batch SGD lr 0.5, weight decay
4e-3) is trained in a plain PyTorch loop in float32, seed 0 as in ``benchmarks/_presets.py``. At each measuring
step t (500, 1000, 2000, 4000, 6000, up to ``--steps``) the script computes, in float64 from the dense Jacobian
J (59·11 × 2816, :func:`torch.func.jacrev`, thin SVD, rank cut-off max(m, P)·eps64·σ_max):

1. Rates, per step, positive when ‖θ‖² shrinks. ``meas`` is −(‖θ_{t+5}‖² − ‖θ_{t−5}‖²)/10 (centred window;
   ``bwd`` is the window [t−10, t] of NormDescentMonitor); ``pred`` = 2·lr·wd·‖P_Tθ‖², ρ = ‖P_Tθ‖²/‖θ‖².
   ``ρ_f32`` is ρ with the rank cut-off the package uses for a float32 model (max(m, P)·eps32), and ``pkg`` the
   package's own dense TangentProjector on the float32 model (both must match ρ for the comparison to be fair).
2. First-layer pre-activations z_{j,i} = (W₁x_i)_j (= W₁[j,a] + W₁[j,b]): how many are within τ·median|z| of
   zero, and how many change sign within [t−10, t+10] (``flips``).
3. Kink-aware predictions: the rows ∂z_{j,i}/∂θ of every near-zero pre-activation (|z| < τ·median|z|, or the
   ones that flip sign in the window) are stacked under J; P_T' projects onto null(J) ∩ null(K) and the
   prediction becomes 2·lr·wd·‖P_T'θ‖². ``random`` stacks as many rows as ``flips`` has, for pre-activations drawn
   at random: the control for "any extra rows would lower the prediction". Read ``pred'/meas``: the hypothesis
   says it is ≈ 1 for the kink sets (the sign-change set has no free parameter; the τ sets fall monotonically in
   τ, so one of them always comes close) and stays ≫ 1 for ``random``; with GELU few rows qualify and the plain
   prediction already agrees.
4. The exact one-step budget, −Δ‖θ‖² = −2⟨θ, Δθ⟩ − ‖Δθ‖² with Δθ = θ_{t+1} − θ_t = −lr·g, g = ∇L + wd·θ, and the
   first-order term split into 2·lr·wd·‖P_Tθ‖² (the prediction) + 2·lr·⟨P_Nθ, r⟩ with r = P_N g (the part
   of the total gradient the loss leaves in the normal space; the prediction assumes r ≈ 0, "quasi-static").
   ``|r|/|wd·P_Nθ|`` measures how far from quasi-static; ``cos`` is the mean cosine of consecutive updates
   over [t, t+10] (< 0: oscillation); ``lr·λ/2`` is lr/2 times the top eigenvalue of ∇²(L + wd/2·‖θ‖²) (power
   iteration on Hessian-vector products): ≥ 1 is the edge of stability of gradient descent.

The JSON written to ``--out`` holds every number printed and more (singular-value counts, the share of
‖P_Tθ‖² in the ReLU unit-rescaling directions, window means of the first- and second-order terms).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.func import functional_call, grad, jacrev, jvp

from grok_lightning import GrokkingModule, ModularArithmeticDataModule
from grok_lightning.geometry import ConstraintOperator, TangentProjector

CONFIG = Path(__file__).resolve().parent / "configs" / "paper_mlp_mse_gd.yaml"
MEASURE_STEPS = (500, 1000, 2000, 4000, 6000)
WINDOW = 10  # steps of the measured rate, as NormDescentMonitor's default
STAT_THRESHOLDS = (1e-6, 1e-4, 1e-3, 1e-2)  # near-zero pre-activation counts, relative to median |z|
KINK_THRESHOLDS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # kink-aware predictions, relative to median |z|
POWER_ITERATIONS = 100


def build(
    activation: str, seed: int = 0, data_overrides: dict | None = None, model_overrides: dict | None = None
) -> tuple[ModularArithmeticDataModule, GrokkingModule]:
    """The preset's data module and a freshly initialized module (torch.manual_seed(seed) first, as the benchmarks)."""
    config = yaml.safe_load(CONFIG.read_text())
    data = ModularArithmeticDataModule(**{**config["data"], **(data_overrides or {})})
    torch.manual_seed(seed)
    model_config = {**config["model"], "activation": activation, **(model_overrides or {})}
    model = GrokkingModule(p=data.p, encoding=data.encoding, **model_config)
    if model.net.config.bias or [name for name, _ in model.net.named_parameters()] != ["fc1.weight", "fc2.weight"]:
        raise ValueError("Expected a bias-free two-layer MLP (parameters fc1.weight, fc2.weight).")
    return data, model


class Flat:
    """The network as functions of one flat float64 parameter vector θ = [vec W₁; vec W₂] (row-major)."""

    def __init__(self, model: GrokkingModule, inputs: Tensor, targets: Tensor) -> None:
        self.model = model
        self.net = copy.deepcopy(model.net).double()
        self.shapes = {name: p.shape for name, p in self.net.named_parameters()}
        self.hidden, self.width = self.shapes["fc1.weight"]
        self.x = inputs.double()
        self.y = targets.double()

    def params(self, theta: Tensor) -> dict[str, Tensor]:
        w1_size = self.hidden * self.width
        return {
            "fc1.weight": theta[:w1_size].reshape(self.shapes["fc1.weight"]),
            "fc2.weight": theta[w1_size:].reshape(self.shapes["fc2.weight"]),
        }

    def outputs(self, theta: Tensor) -> Tensor:
        return functional_call(self.net, self.params(theta), (self.x,))

    def flat_outputs(self, theta: Tensor) -> Tensor:
        return self.outputs(theta).reshape(-1)

    def preactivations(self, theta: Tensor) -> Tensor:
        """Pre-activations z (n, hidden): z[i, j] = (W₁ x_i)_j."""
        return self.x @ self.params(theta)["fc1.weight"].T

    def loss(self, theta: Tensor) -> Tensor:
        return self.model.loss(self.outputs(theta), self.y)

    def kink_basis(self, mask: Tensor) -> Tensor:
        """An orthonormal basis (P, q) of the span of the rows ∂z_{j,i}/∂θ for mask[i, j] (only W₁[j, :] moves)."""
        p = sum(math.prod(shape) for shape in self.shapes.values())
        columns = []
        for j in range(self.hidden):
            rows = self.x[mask[:, j]]  # the inputs x_i whose z_{j,i} is constrained
            if rows.shape[0] == 0:
                continue
            _, s, vh = torch.linalg.svd(rows, full_matrices=False)
            keep = s > max(rows.shape) * torch.finfo(torch.float64).eps * s[0]
            block = torch.zeros(int(keep.sum()), p, dtype=torch.float64)
            block[:, j * self.width : (j + 1) * self.width] = vh[keep]
            columns.append(block)
        if not columns:
            return torch.zeros(p, 0, dtype=torch.float64)
        return torch.cat(columns).T


def row_basis(matrix: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor, int]:
    """Thin SVD of ``matrix`` (m, P): an orthonormal basis (P, r) of its row space, all σ, and the rank r."""
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if rtol is None:
        rtol = max(matrix.shape) * torch.finfo(torch.float64).eps
    rank = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return vh[:rank].T, s, rank


def kink_tangent(v_row: Tensor, kink: Tensor, vectors: Tensor) -> Tensor:
    """P_T' applied to the columns of ``vectors`` (P, b): the projector onto null(J) ∩ null(K).

    ``v_row`` (P, r) is an orthonormal basis of row(J), ``kink`` (P, q) a basis of row(K). Since
    row([J; K]) = row(J) ⊕ range(P_T Kᵀ), P_T' v = P_T v − Q Qᵀ P_T v with Q an orthonormal basis of
    range(P_T Kᵀ) (left singular vectors of P_T K with σ > max(P, q)·eps64, σ ≤ 1 being cosines of angles).
    """
    tangent = vectors - v_row @ (v_row.T @ vectors)
    if kink.shape[1] == 0:
        return tangent
    a = kink - v_row @ (v_row.T @ kink)
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    q = u[:, s > max(a.shape) * torch.finfo(torch.float64).eps]
    return tangent - q @ (q.T @ tangent)


def top_hessian_eigenvalue(flat: Flat, theta: Tensor, wd: float, start: Tensor, iterations: int) -> float:
    """Largest eigenvalue of ∇²(L + wd/2·‖θ‖²) at θ, by power iteration on Hessian-vector products."""
    gradient = grad(flat.loss)
    v = start / start.norm()
    value = 0.0
    for _ in range(iterations):
        hv = jvp(gradient, (theta,), (v,))[1] + wd * v
        value = float(v @ hv)
        v = hv / hv.norm()
    return value


def analyse(
    model: GrokkingModule,
    inputs: Tensor,
    targets: Tensor,
    snapshots: dict[int, Tensor],
    norms: Sequence[float],
    step: int,
    window: int = WINDOW,
    kink_thresholds: Sequence[float] = KINK_THRESHOLDS,
    stat_thresholds: Sequence[float] = STAT_THRESHOLDS,
    power_iterations: int = POWER_ITERATIONS,
) -> dict[str, Any]:
    """Every quantity of the module docstring at ``step``, from float32 snapshots θ_s for s in [step−w, step+w+1]."""
    hp = model.hparams
    lr, wd = float(hp.lr), float(hp.weight_decay)
    flat = Flat(model, inputs, targets)
    theta = snapshots[step].double()
    sq = float(theta @ theta)
    half = window // 2
    rates = {
        "bwd": -(norms[step] - norms[step - window]) / window,
        "ctr": -(norms[step + half] - norms[step - half]) / (2 * half),
        "fwd": -(norms[step + window] - norms[step]) / window,
    }

    jac = jacrev(flat.flat_outputs)(theta)  # (nC, P)
    m, p = jac.shape
    v_row, sigma, rank = row_basis(jac)
    normal = v_row @ (v_row.T @ theta)
    tangent = theta - normal
    t_sq = float(tangent @ tangent)
    predicted = 2 * lr * wd * t_sq
    # Same, with the cut-off the package applies to a float32 model, and the package itself.
    v32, _, rank32 = row_basis(jac, max(m, p) * torch.finfo(torch.float32).eps)
    t32 = theta - v32 @ (v32.T @ theta)
    # Independent check of the SVD projector: least squares against Jᵀ (gelsd).
    lsq = torch.linalg.lstsq(
        jac.T, theta.unsqueeze(1), rcond=max(m, p) * torch.finfo(torch.float64).eps, driver="gelsd"
    )
    t_lsq = theta - jac.T @ lsq.solution.squeeze(1)
    net32 = copy.deepcopy(model.net).float()
    with torch.no_grad():
        net32.fc1.weight.copy_(snapshots[step][: flat.hidden * flat.width].reshape(net32.fc1.weight.shape))
        net32.fc2.weight.copy_(snapshots[step][flat.hidden * flat.width :].reshape(net32.fc2.weight.shape))
    projector = TangentProjector(ConstraintOperator(net32, inputs.float()), method="dense")
    pkg_tangent = projector.project(snapshots[step]).tangent
    sigma_rel = sigma / sigma[0]

    # Pre-activations now and their signs over [step − w, step + w].
    z = flat.preactivations(theta)  # (n, H)
    scale = float(z.abs().median())
    signs = torch.stack(
        [torch.sign(flat.preactivations(snapshots[s].double())) for s in range(step - window, step + window + 1)]
    )
    flips = (signs != signs[0]).any(dim=0)
    dead_units = int((z <= 0).all(dim=0).sum())
    stats = {"exact_zero": int((z == 0).sum())}
    for tau in stat_thresholds:
        stats[f"{tau:g}"] = int((z.abs() < tau * scale).sum())

    def kink_entry(mask: Tensor) -> dict[str, Any]:
        basis = flat.kink_basis(mask)
        t = kink_tangent(v_row, basis, theta.unsqueeze(1)).squeeze(1)
        rate = 2 * lr * wd * float(t @ t)
        return {
            "rows": int(mask.sum()),
            "rank": basis.shape[1],
            "tangent_fraction": float(t @ t) / sq,
            "predicted": rate,
            "ratio_to_measured": rate / rates["ctr"] if rates["ctr"] else None,
        }

    kinks = {f"{tau:g}": kink_entry(z.abs() < tau * scale) for tau in kink_thresholds}
    kinks["flips"] = kink_entry(flips)
    # Control: as many pre-activations as flip, drawn at random (private generator) instead of at the kinks.
    generator = torch.Generator().manual_seed(step)
    pick = torch.randperm(z.numel(), generator=generator)[: int(flips.sum())]
    random_mask = torch.zeros(z.numel(), dtype=torch.bool)
    random_mask[pick] = True
    kinks["random"] = kink_entry(random_mask.reshape(z.shape))

    # One-step budget at step: −Δ‖θ‖² = −2⟨θ, Δθ⟩ − ‖Δθ‖², and −2⟨θ, −lr g⟩ = tangent term + normal term.
    g = grad(flat.loss)(theta) + wd * theta
    r = v_row @ (v_row.T @ g)
    delta = snapshots[step + 1].double() - theta
    updates = [snapshots[s + 1].double() - snapshots[s].double() for s in range(step, step + window + 1)]
    first = [
        -2 * float(snapshots[s].double() @ d) for s, d in zip(range(step, step + window + 1), updates, strict=True)
    ]
    second = [-float(d @ d) for d in updates]
    cosines = [float(a @ b / (a.norm() * b.norm())) for a, b in itertools.pairwise(updates)]
    budget = {
        "measured_one_step": -(norms[step + 1] - norms[step]),
        "first_order": -2 * float(theta @ delta),
        "second_order": -float(delta @ delta),
        "first_order_from_gradient": 2 * lr * float(theta @ g),
        "tangent_term": 2 * lr * wd * t_sq,
        "normal_term": 2 * lr * float(normal @ r),
        "update_vs_minus_lr_g": float((delta + lr * g).norm() / (lr * g).norm()),
        "r_over_wd_normal": float(r.norm() / (wd * normal.norm())),
        "tangent_share_of_gradient": float((g - r).norm() / g.norm()),
        "window_mean_first_order": statistics.fmean(first[:window]),
        "window_mean_second_order": statistics.fmean(second[:window]),
        "mean_consecutive_cos": statistics.fmean(cosines[:window]),
        "min_consecutive_cos": min(cosines[:window]),
    }
    # Edge of stability: top eigenvalue of the Hessian of the objective vs 2/lr, and the Gauss-Newton estimate.
    n = inputs.shape[0]
    start = torch.linalg.svd(jac, full_matrices=False)[2][0]
    sharpness = top_hessian_eigenvalue(flat, theta, wd, start, power_iterations)
    stability = {
        "top_hessian_eigenvalue": sharpness,
        "gauss_newton_top": 2 * float(sigma[0]) ** 2 / n + wd,
        "two_over_lr": 2 / lr,
        "lr_lambda_over_2": lr * sharpness / 2,
    }
    entry: dict[str, Any] = {
        "step": step,
        "norm_sq": sq,
        "measured": rates,
        "predicted": predicted,
        "ratio_pred_to_measured": {k: predicted / v if v else None for k, v in rates.items()},
        "tangent_fraction": t_sq / sq,
        "tangent_fraction_f32_cutoff": float(t32 @ t32) / sq,
        "tangent_fraction_package": float(pkg_tangent @ pkg_tangent) / sq,
        "tangent_fraction_lstsq": float(t_lsq @ t_lsq) / sq,
        "jacobian": {
            "shape": [m, p],
            "rank": rank,
            "rank_f32_cutoff": rank32,
            "sigma_max": float(sigma[0]),
            "sigma_min_kept": float(sigma[rank - 1]),
            "count_sigma_rel_below": {f"{c:g}": int((sigma_rel < c).sum()) for c in (1e-10, 1e-8, 1e-6, 1e-4, 1e-3)},
        },
        "preactivations": {
            "median_abs": scale,
            "count": z.numel(),
            "near_zero": stats,
            "flips_in_window": int(flips.sum()),
            "dead_units": dead_units,
        },
        "kink_aware": kinks,
        "one_step": budget,
        "stability": stability,
    }
    if model.net.config.activation == "relu":
        # Unit rescalings (W₁[j], −W₂[:, j]) are exact symmetries of a bias-free ReLU net, hence in null(J).
        w1, w2 = flat.params(theta)["fc1.weight"], flat.params(theta)["fc2.weight"]
        along = (w1.square().sum(1) - w2.square().sum(0)).square() / (w1.square().sum(1) + w2.square().sum(0))
        entry["rescaling_share_of_tangent"] = float(along.sum()) / t_sq
    return entry


def run(
    activation: str,
    measure_steps: Sequence[int] = MEASURE_STEPS,
    *,
    seed: int = 0,
    window: int = WINDOW,
    data_overrides: dict | None = None,
    model_overrides: dict | None = None,
    kink_thresholds: Sequence[float] = KINK_THRESHOLDS,
    stat_thresholds: Sequence[float] = STAT_THRESHOLDS,
    power_iterations: int = POWER_ITERATIONS,
) -> dict[str, Any]:
    """Train the preset (float32, full batch) and analyse it at every step of ``measure_steps`` (each ≥ window)."""
    if any(s < window for s in measure_steps):
        raise ValueError(f"Expected argument `measure_steps` to be at least window={window}, but got {measure_steps}.")
    start = time.perf_counter()
    data, model = build(activation, seed, data_overrides, model_overrides)
    inputs, targets = data.train_inputs, data.train_targets
    optimizer = model.configure_optimizers()
    keep = {s for t in measure_steps for s in range(t - window, t + window + 2)}
    last = max(keep)
    norms: list[float] = []
    snapshots: dict[int, Tensor] = {}
    accuracy: dict[int, float] = {}
    for step in range(last + 1):
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        norms.append(float(theta.double() @ theta.double()))
        if step in keep:
            snapshots[step] = theta.clone()
        if step in measure_steps:
            with torch.no_grad():
                val = model(data.val_inputs).argmax(-1) == data.val_targets.argmax(-1)
                accuracy[step] = float(val.float().mean())
        if step == last:
            break
        optimizer.zero_grad()
        loss = model.loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start
    entries = []
    for step in measure_steps:
        entry = analyse(
            model, inputs, targets, snapshots, norms, step, window, kink_thresholds, stat_thresholds, power_iterations
        )
        entry["val_acc"] = accuracy[step]
        entries.append(entry)
    return {
        "activation": activation,
        "seed": seed,
        "lr": float(model.hparams.lr),
        "weight_decay": float(model.hparams.weight_decay),
        "n_train": inputs.shape[0],
        "window": window,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
        "steps": entries,
    }


def _g(x: float) -> str:
    return f"{x:.3g}"


def print_table(result: dict[str, Any]) -> None:
    rows = result["steps"]
    print(f"\n== {result['activation']}  (lr {result['lr']}, wd {result['weight_decay']}, {result['seconds']:.0f} s)")
    print(
        f"{'step':>5} {'val':>4} {'|θ|²':>7} {'meas':>9} {'bwd':>9} {'pred':>9} {'pred/meas':>9} {'bwd':>7}"
        f" {'ρ':>6} {'ρ_f32':>6} {'pkg':>6} {'rank':>4}"
    )
    for e in rows:
        print(
            f"{e['step']:>5} {e['val_acc']:>4.2f} {e['norm_sq']:>7.2f} {e['measured']['ctr']:>9.3g}"
            f" {e['measured']['bwd']:>9.3g} {e['predicted']:>9.3g} {e['ratio_pred_to_measured']['ctr']:>9.3g}"
            f" {e['ratio_pred_to_measured']['bwd']:>7.3g} {e['tangent_fraction']:>6.3f}"
            f" {e['tangent_fraction_f32_cutoff']:>6.3f} {e['tangent_fraction_package']:>6.3f}"
            f" {e['jacobian']['rank']:>4}"
        )
    keys = list(rows[0]["kink_aware"])
    print("pre-activations: count with |z| < τ·median|z| (of n·H), sign flips in [t−w, t+w], dead units")
    stat_keys = list(rows[0]["preactivations"]["near_zero"])
    print(f"{'step':>5} {'med|z|':>7} " + " ".join(f"{k:>11}" for k in stat_keys) + f" {'flips':>6} {'dead':>4}")
    for e in rows:
        pa = e["preactivations"]
        print(
            f"{e['step']:>5} {pa['median_abs']:>7.3f} "
            + " ".join(f"{pa['near_zero'][k]:>11}" for k in stat_keys)
            + f" {pa['flips_in_window']:>6} {pa['dead_units']:>4}"
        )
    print("kink-aware prediction / measured (centred), and [rows of K] per set (τ relative to median|z|)")
    print(f"{'step':>5} " + " ".join(f"{k:>13}" for k in keys))
    for e in rows:
        cells = [f"{_g(e['kink_aware'][k]['ratio_to_measured'])} [{e['kink_aware'][k]['rows']}]" for k in keys]
        print(f"{e['step']:>5} " + " ".join(f"{c:>13}" for c in cells))
    print("one step at t (rates, + = shrink): measured = 1st + 2nd order; 1st ≈ tangent + normal term")
    print(
        f"{'step':>5} {'meas1':>9} {'1st':>9} {'2nd':>9} {'tangent':>9} {'normal':>10} {'|r|/|wdPNθ|':>11}"
        f" {'cos':>6} {'cos_min':>7} {'lr·λ/2':>6}"
    )
    for e in rows:
        b, s = e["one_step"], e["stability"]
        print(
            f"{e['step']:>5} {b['measured_one_step']:>9.3g} {b['first_order']:>9.3g} {b['second_order']:>9.3g}"
            f" {b['tangent_term']:>9.3g} {b['normal_term']:>10.3g} {b['r_over_wd_normal']:>11.3g}"
            f" {b['mean_consecutive_cos']:>6.3f} {b['min_consecutive_cos']:>7.3f} {s['lr_lambda_over_2']:>6.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6000, help="last measuring step (of 500, 1000, 2000, 4000, 6000)")
    parser.add_argument("--activation", choices=("relu", "gelu", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    parser.add_argument("--weight-decay", type=float, default=None, help="override the preset's weight decay")
    parser.add_argument("--out", type=Path, default=None, help="directory for relu_rate_gap.json")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("lr", args.lr), ("weight_decay", args.weight_decay)) if v is not None}
    torch.set_num_threads(1)
    steps = [s for s in MEASURE_STEPS if s <= args.steps] or [args.steps]
    activations = ("relu", "gelu") if args.activation == "both" else (args.activation,)
    results = [run(a, steps, seed=args.seed, model_overrides=overrides) for a in activations]
    for result in results:
        print_table(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "relu_rate_gap.json"
        path.write_text(json.dumps({"config": str(CONFIG.name), "runs": results}, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
