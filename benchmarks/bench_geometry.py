"""Benchmark of the geometry core: dense and iterative tangent projections, as measured in one run.

(a) Dense path against the naive computation (full ``jacrev`` Jacobian + ``torch.linalg.pinv``) on the paper's
    problem, 770 constraints × 2816 parameters of rank 550 (70 ordered pairs, repeated inputs), and on the
    ``paper_mlp_mse_gd`` preset at initialization, 649 × 2816 of full row rank (the case the monitor meets).
(b) Iterative path on the (a + b) mod 97 cross-entropy MLP (3764 samples × 97 outputs, 74 496 parameters)
    after 1500 full-batch AdamW steps (state cached in /tmp): cold LSQR, warm-started LSQR after a few more
    optimizer steps, plain CG on the normal equations J Jᵀ (float32 and float64) for comparison, and LSQR
    with the output-space read-out preconditioner (``ReadoutPreconditioner``), cold and warm.

(c) Fixed cost of the J·v map at a new θ (the transpose of the vjp closure against ``torch.func.linearize``)
    and the cost per LSQR step on two small problems.
(d) The probe-subset effect: the tangent fraction ρ on ``probe_size`` subsets against the full constraint set,
    on the paper preset after 1000 GD steps and on the mod-97 preset (kind "losses") after 1500 AdamW steps.

Times depend on the machine's load (the CPU is shared): the load average is printed next to them, and
iteration counts are the load-independent part.

Run: ``python benchmarks/bench_geometry.py [--threads N] [--parts a b c d]``. On a shared, oversubscribed CPU (load
above the core count) torch's intra-op threads wait on each other: one thread was measured 4-5x faster per step than
two there.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

import torch
from torch.func import functional_call, jacrev, linearize

from grok_lightning.geometry import ConstraintOperator, ReadoutPreconditioner, TangentProjector, batched_lsqr
from grok_lightning.reference import GrokkingModule, ModularArithmeticDataModule

CACHE = "/tmp/grok_geometry_bench/p97_adamw1500.pt"


def best_of(fn, repeats=3):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def paper_problem():
    """(a + b) mod 11, 70 training pairs, MSE, MLP 11 → 128 → 11 without biases: J is 770 × 2816."""
    dm = ModularArithmeticDataModule(
        p=11, pairs="ordered", train_fraction=70 / 121, encoding="one_hot_sum", target="one_hot"
    )
    torch.manual_seed(0)
    net = GrokkingModule(p=11, encoding="one_hot_sum", hidden=128, loss="mse").net
    return net, dm.train_inputs


def preset_problem():
    """The ``paper_mlp_mse_gd`` preset at initialization: (a + b) mod 11, 59 unordered pairs: J is 649 × 2816."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _presets import load_preset

    data, model, _ = load_preset("paper_mlp_mse_gd")
    return model.net, data.train_inputs


def bench_dense():
    for name, (net, x) in (("paper problem", paper_problem()), ("paper_mlp_mse_gd preset", preset_problem())):
        dense_against_naive(name, net, x)


def dense_against_naive(name, net, x):
    params = dict(net.named_parameters())
    names = list(params)
    generator = torch.Generator().manual_seed(0)
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()]).double()
    vectors = torch.stack([theta, torch.randn(theta.numel(), dtype=torch.float64, generator=generator)])
    m, p = x.shape[0] * 11, theta.numel()
    rtol = max(m, p) * torch.finfo(torch.float32).eps

    def naive():
        def f(*primals):
            return functional_call(net, dict(zip(names, primals, strict=True)), (x,)).reshape(-1)

        blocks = jacrev(f, argnums=tuple(range(len(names))))(*[params[n].detach() for n in names])
        jac = torch.cat([b.reshape(m, -1) for b in blocks], dim=1).double()
        pinv = torch.linalg.pinv(jac, rtol=rtol)
        return vectors - (pinv @ (jac @ vectors.T)).T

    def ours():
        operator = ConstraintOperator(net, x)  # fresh: linearization, J and factorization all counted
        return TangentProjector(operator, "dense").project(vectors)

    naive()
    ours()  # warm-up
    t_naive, expected = best_of(naive)
    t_ours, result = best_of(ours)
    error = ((result.tangent - expected).norm(dim=1) / vectors.norm(dim=1)).max().item()
    rho = (result.tangent[0].norm() ** 2 / theta.norm() ** 2).item()
    print(f"(a) dense, {name}: J is {m} x {p}, rank {result.rank}, rho at init = {rho:.6f}")
    print(f"    naive jacrev + pinv: {t_naive * 1e3:8.1f} ms   (2 vectors)")
    print(f"    TangentProjector:    {t_ours * 1e3:8.1f} ms   speed-up {t_naive / t_ours:.2f}x   ({load()})")
    print(f"    max relative difference of P_T v: {error:.2e}  (target <= 1e-6)")


def trained_mod97():
    dm = ModularArithmeticDataModule(p=97, train_fraction=0.4, encoding="one_hot_concat")
    torch.manual_seed(0)
    net = GrokkingModule(p=97).net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
    if os.path.exists(CACHE):
        state = torch.load(CACHE)
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["opt"])
    else:
        print(f"    training 1500 full-batch AdamW steps (cached afterwards in {CACHE}) ...", flush=True)
        for _ in range(1500):
            loss = torch.nn.functional.cross_entropy(net(dm.train_inputs), dm.train_targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        torch.save({"net": net.state_dict(), "opt": optimizer.state_dict()}, CACHE)
    return net, optimizer, dm


def lsqr_trace(operator, theta, u0=None, iterations=100, precond=None):
    """LSQR on min ‖Jᵀu − θ‖ from u0 (u = u0 + L w with a preconditioner); returns [(seconds, ρ_k)] and u."""
    norm2 = theta.norm() ** 2
    start = time.perf_counter()
    rhs = theta[None] if u0 is None else theta[None] - operator.vjp(u0[None])
    matvec, rmatvec = operator.vjp, operator.jvp
    if precond is not None:

        def matvec(w):
            return operator.vjp(precond.apply(w))

        def rmatvec(y):
            return precond.apply(operator.jvp(y))

    trace = []
    if u0 is not None:
        trace.append((time.perf_counter() - start, (rhs.norm() ** 2 / norm2).item()))

    def record(i, residual_norm, normal):
        trace.append((time.perf_counter() - start, (residual_norm[0] ** 2 / norm2).item()))

    out = batched_lsqr(matvec, rmatvec, rhs, operator.num_constraints, tol=1e-14, max_iter=iterations, trace=record)
    x = out.x if precond is None else precond.apply(out.x)
    u = x[0] if u0 is None else u0 + x[0]
    return trace, u, (out.residual[0].norm() ** 2 / norm2).item()


def cg_trace(operator, theta, dtype, iterations=60):
    """Plain CG on J Jᵀ u = J θ, tracking ρ_k = ‖θ − Jᵀu_k‖²/‖θ‖² (Jᵀu kept by recurrence, no extra cost)."""
    theta = theta.to(dtype)
    norm2 = theta.norm() ** 2
    start = time.perf_counter()
    b = operator.jvp(theta)
    u = torch.zeros_like(b)
    jt_u = torch.zeros_like(theta)
    r = b.clone()
    d = r.clone()
    rr = r @ r
    trace = []
    for _ in range(iterations):
        jt_d = operator.vjp(d)
        q = operator.jvp(jt_d)
        alpha = rr / (d @ q)
        u += alpha * d
        jt_u += alpha * jt_d
        r -= alpha * q
        rr_new = r @ r
        d = r + (rr_new / rr) * d
        rr = rr_new
        trace.append(
            (time.perf_counter() - start, ((theta - jt_u).norm() ** 2 / norm2).item(), (rr.sqrt() / b.norm()).item())
        )
    return trace


def first_within(trace, reference, rel=1e-3):
    for i, item in enumerate(trace):
        if abs(item[1] - reference) <= rel * reference:
            return i, item[0]
    return None, float("nan")


def describe(name, trace, reference):
    i, seconds = first_within(trace, reference)
    final = trace[-1]
    reached = f"within 1e-3 after {i} it, {seconds:5.2f} s" if i is not None else "not within 1e-3"
    print(f"    {name:<34} {reached:<34} last rho {final[1]:.6f} ({len(trace)} it, {final[0]:.2f} s)")


def load():
    return f"load {os.getloadavg()[0]:.1f}"


def bench_iterative():
    net, optimizer, dm = trained_mod97()
    x, y = dm.train_inputs, dm.train_targets
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    operator = ConstraintOperator(net, x)
    theta = operator.parameter_vector().double()
    w1, w2 = net.fc1.weight.detach().double(), net.fc2.weight.detach().double()
    a, b = (w1**2).sum(1), (w2**2).sum(0)
    rescaling = (((a - b) ** 2 / (a + b)).sum() / theta.norm() ** 2).item()
    print(f"(b) iterative, mod 97 after 1500 AdamW steps: J is {operator.num_constraints} x {operator.num_params}")
    start = time.perf_counter()
    operator.jvp(theta)
    print(f"    linearization + first J.v: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    for _ in range(3):
        operator.vjp(operator.jvp(theta))
    print(f"    one J.v + one J^T.u (one LSQR step): {(time.perf_counter() - start) / 3 * 1e3:.0f} ms ({load()})")
    start = time.perf_counter()
    precond = ReadoutPreconditioner.from_operator(operator)
    print(
        f"    read-out preconditioner ({precond.layer}, c = {precond.shift:.3g}): built in "
        f"{time.perf_counter() - start:.2f} s"
    )
    u_probe = operator.jvp(theta)[None]
    start = time.perf_counter()
    for _ in range(3):
        precond.apply(operator.jvp(operator.vjp(precond.apply(u_probe))))
    print(f"    one preconditioned LSQR step (pair + 2 L): {(time.perf_counter() - start) / 3 * 1e3:.0f} ms ({load()})")
    start = time.perf_counter()
    batch3 = torch.stack([theta, theta.flip(0), theta.roll(1)])
    operator.vjp(operator.jvp(batch3))
    print(
        f"    one J.v + one J^T.u for 3 vectors at once (vmap): {(time.perf_counter() - start) * 1e3:.0f} ms ({load()})"
    )

    # Cold LSQR, long enough to serve as the converged reference.
    trace, u, rho_ref = lsqr_trace(operator, theta, iterations=150)
    print(
        f"    converged rho (LSQR, 150 it) = {rho_ref:.6f}; last 10 it changed it by "
        f"{(trace[-11][1] - trace[-1][1]) / rho_ref:.1e} rel."
    )
    print(f"    analytic lower bound from the {w1.shape[0]} ReLU rescaling directions: {rescaling:.6f}")
    describe("LSQR float64, cold", trace, rho_ref)
    pre_trace, u_pre, _ = lsqr_trace(operator, theta, iterations=45, precond=precond)
    describe("LSQR + read-out precond., cold", pre_trace, rho_ref)
    for dtype in (torch.float32, torch.float64):
        cg = cg_trace(operator, theta, dtype)
        describe(f"CG on J J^T, {str(dtype)[6:]}, cold", cg, rho_ref)
        print(f"        CG relative residual after {len(cg)} it: {cg[-1][2]:.1e}")
    for preconditioner, tols in (("none", (1e-3,)), ("auto", (1e-2, 3e-3, 1e-3))):
        for tol in tols:
            projector = TangentProjector(operator, "iterative", tol=tol, max_iter=300, preconditioner=preconditioner)
            result = projector.project(theta)
            rho = (result.tangent.norm() ** 2 / theta.norm() ** 2).item()
            print(
                f"    TangentProjector(tol={tol:.0e}, preconditioner={preconditioner}) cold: {result.seconds:5.2f} s, "
                f"{result.iterations} it, rho {rho:.6f} (rel err {abs(rho - rho_ref) / rho_ref:.1e}), {load()}"
            )
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"    extra peak RSS of the cold solves: {(rss1 - rss0) / 1024:.0f} MB")

    # A few optimizer steps later: warm start from the previous u (plain and preconditioned LSQR each keep theirs).
    warm_projector = TangentProjector(operator, "iterative", tol=1e-2, max_iter=300)
    warm_projector.project(theta, keys=["theta"])
    for steps in (1, 5):
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        theta_new = operator.parameter_vector().double()
        warm_pre, u_pre_new, rho_new = lsqr_trace(operator, theta_new, u0=u_pre, iterations=45, precond=precond)
        warm, u_new, _ = lsqr_trace(operator, theta_new, u0=u, iterations=45)
        describe(f"LSQR warm, +{steps} AdamW steps", warm, rho_new)
        describe(f"LSQR + precond. warm, +{steps} steps", warm_pre, rho_new)
        u, u_pre = u_new, u_pre_new
        print(f"        reference rho after the steps (preconditioned warm LSQR, 45 it) = {rho_new:.6f}")
        result = warm_projector.project(theta_new, keys=["theta"])
        rho = (result.tangent.norm() ** 2 / theta_new.norm() ** 2).item()
        print(
            f"        TangentProjector(tol=1e-02) warm: {result.seconds:5.2f} s, {result.iterations} it, rho {rho:.6f} "
            f"(rel err {abs(rho - rho_new) / rho_new:.1e}), {load()}"
        )


def tangent_map_costs():
    """(c) Fixed costs of the J·v map at a new θ, and per LSQR step, on small problems (60 × 160, 770 × 2816)."""
    for p, hidden, fraction in ((5, 16, 0.8), (11, 128, 70 / 121)):
        dm = ModularArithmeticDataModule(
            p=p, pairs="unordered" if p == 5 else "ordered", train_fraction=fraction, encoding="one_hot_sum"
        )
        torch.manual_seed(0)
        net = GrokkingModule(p=p, encoding="one_hot_sum", hidden=hidden, loss="mse").net
        x = dm.train_inputs

        def first_product(net=net, x=x):
            op = ConstraintOperator(net, x)
            op.jvp(op.parameter_vector())
            return op

        def traced(op):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return linearize(op._function, *[q.detach() for q in op.params])

        op = first_product()
        t_transpose, _ = best_of(first_product, 5)
        t_vjp, _ = best_of(lambda net=net, x=x: ConstraintOperator(net, x), 5)
        t_trace, _ = best_of(lambda op=op: traced(op), 3)
        projector = TangentProjector(op, "iterative", tol=1e-8, max_iter=500, warm_start=False)
        result = projector.project(torch.stack([op.parameter_vector(), torch.ones(op.num_params)]))
        print(
            f"(c) J is {op.num_constraints} x {op.num_params}: operator (vjp) {t_vjp * 1e3:.1f} ms, operator + "
            f"first J.v {t_transpose * 1e3:.1f} ms (transpose); torch.func.linearize alone {t_trace * 1e3:.1f} ms; "
            f"LSQR {result.iterations} steps, {result.seconds * 1e3 / max(result.iterations, 1):.2f} ms/step "
            f"(2 vectors), {load()}"
        )


def probe_size_effect(seeds: int = 5):
    """(d) How much a probe subset overestimates the tangent fraction rho, on the reference presets."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _presets import load_preset

    data, model, _ = load_preset("paper_mlp_mse_gd")
    optimizer = model.configure_optimizers()
    x, y = data.train_inputs, data.train_targets
    for _ in range(1000):
        loss = model.loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y.argmax(1)).float().mean())
    print(f"(d) paper_mlp_mse_gd after 1000 GD steps: train loss {loss.item():.2e}, train accuracy {accuracy:.3f}")
    table(model, x, y, (59, 45, 30, 15, 8), ("outputs", "losses"), seeds, method="dense")

    net, _, dm = trained_mod97()
    model = GrokkingModule(p=97)
    model.net = net
    print("(d) mlp_ce_adamw after 1500 AdamW steps (cached), kind 'losses'")
    table(model, dm.train_inputs, dm.train_targets, (3764, 2000, 1000, 500, 250), ("losses",), seeds, "auto")


def table(model, x, y, sizes, kinds, seeds, method):
    n = x.shape[0]
    print(f"    {'kind':<8} {'probe':>6} {'m':>7} {'rho mean':>9} {'min':>9} {'max':>9} {'/ full':>7}  seconds")
    for kind in kinds:
        full = None
        for size in sizes:
            rhos, start, converged = [], time.perf_counter(), True
            for seed in range(1 if size >= n else seeds):
                op = ConstraintOperator(
                    model, x, kind=kind, targets=y, loss_fn=model.per_sample_loss, probe_size=size, seed=seed
                )
                projector = TangentProjector(op, method, tol=1e-6, max_iter=2000, dense_max_bytes=2**29)
                theta = op.parameter_vector().double()
                result = projector.project(theta)
                rhos.append(float(result.tangent.norm() ** 2 / theta.norm() ** 2))
                converged = converged and result.converged
            rho = sum(rhos) / len(rhos)
            full = rho if full is None else full
            print(
                f"    {kind:<8} {size:>6} {op.num_constraints:>7} {rho:>9.4f} {min(rhos):>9.4f} {max(rhos):>9.4f} "
                f"{rho / full:>7.2f}  {time.perf_counter() - start:.1f} ({load()}), {result.method}"
                f"{'' if converged else ', NOT converged'}",
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    parts = {"a": bench_dense, "b": bench_iterative, "c": tangent_map_costs, "d": probe_size_effect}
    for part in args.parts:
        parts[part]()


if __name__ == "__main__":
    main()
