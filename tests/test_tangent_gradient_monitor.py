import itertools
import json
import random
import subprocess
import sys
import textwrap
import types

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from grok_lightning import (
    GrokkingModule,
    ModularArithmeticDataModule,
    NormDescentMonitor,
    TangentGradientMonitor,
    ZeroLossDetector,
)
from grok_lightning.reference import LinearToyModule, ToyDataModule

KEYS = (
    "grok/tangent/weight_fraction",
    "grok/tangent/grad_norm",
    "grok/tangent/grad_fraction",
    "grok/norm_descent_rate_predicted",
    "grok/tangent/solver_residual",
    "grok/tangent/solver_iterations",
    "grok/tangent/seconds",
)


class Recorder(Callback):
    """Every `grok/` value in callback_metrics at each batch end, by step (after the monitors ran)."""

    def __init__(self):
        self.values = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("grok/")}
        self.values[trainer.global_step] = metrics


def dense_reference(jacobian, vectors):
    """P_T v for each row of `vectors` by an SVD of J in float64 (independent of the geometry package)."""
    _, s, vh = torch.linalg.svd(jacobian, full_matrices=False)
    basis = vh[s > s[0] * max(jacobian.shape) * torch.finfo(torch.float32).eps].T
    return vectors - (vectors @ basis) @ basis.T


def module_jacobian(module, inputs):
    """J of the flattened outputs over every parameter, float64, by jacrev."""
    params = {k: v.detach().double() for k, v in module.named_parameters()}
    module = module.double()
    jac = jacrev(lambda ps: functional_call(module, ps, (inputs.double(),)).reshape(-1))(params)
    module.float()
    return torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], dim=1)


def test_tangent_gradient_monitor_toy_closed_form(tiny_trainer, toy_trajectory, logged_by_step):
    """On '1+1=2' with SGD every key matches its closed form, memorized or not (P_T w = ((w₁−w₂)/2, (w₂−w₁)/2))."""
    lr, wd, k, steps = 0.1, 0.1, 3, 12
    monitor = TangentGradientMonitor(every_n_steps=1, time_budget=None, update_window=k, projected_reference=True)
    trainer = tiny_trainer([monitor], max_steps=steps, limit_val_batches=0)
    trainer.fit(LinearToyModule(start=(-1.0, 1.0), lr=lr, weight_decay=wd), ToyDataModule(steps_per_epoch=steps))
    trajectory = toy_trajectory((-1.0, 1.0), lr=lr, wd=wd, steps=steps)

    logged = {key: logged_by_step(trainer, key) for key in (*KEYS, "grok/tangent/update_cos")}
    logged["distance"] = logged_by_step(trainer, "grok/tangent/distance_to_manifold")
    logged["loss_grad_cos"] = logged_by_step(trainer, "grok/tangent/loss_grad_cos")
    assert sorted(logged["grok/tangent/weight_fraction"]) == list(range(steps + 1))
    for step, w in enumerate(trajectory):
        tangent = torch.stack([(w[0] - w[1]) / 2, (w[1] - w[0]) / 2])
        gradient = 2 * (w.sum() - 2) * torch.ones(2, dtype=torch.float64) + wd * w  # ∇L + g
        expected = {
            "grok/tangent/weight_fraction": float(tangent @ tangent / (w @ w)),
            "grok/tangent/grad_norm": wd * float(tangent.norm()),  # the trap: P_T∇L = 0, off the manifold too
            "grok/tangent/grad_fraction": wd * float(tangent.norm() / gradient.norm()),
            "grok/norm_descent_rate_predicted": 2 * lr * wd * float(tangent @ tangent),
            "distance": abs(float(w.sum()) - 2) / 2**0.5,
        }
        for key, value in expected.items():
            assert logged[key][step] == pytest.approx(value, rel=2e-5, abs=1e-7), (key, step)
        assert logged["loss_grad_cos"][step] == pytest.approx(0.0, abs=1e-6)  # Z is flat: T(θ′) = T(θ)
        assert logged["grok/tangent/solver_residual"][step] < 1e-6
        if step >= k:
            update = w - trajectory[step - k]
            cosine = float(update @ -tangent) / float(update.norm() * tangent.norm())  # against −P_T d, d = c·w
            assert logged["grok/tangent/update_cos"][step] == pytest.approx(cosine, rel=1e-4, abs=1e-6)
        else:
            assert step not in logged["grok/tangent/update_cos"]
    assert logged["grok/tangent/grad_fraction"][steps] > 0.99  # memorized: only the decay's tangent part is left


def tiny_modular(p=5, hidden=16):
    pl.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(
        p=p, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum", target="one_hot", steps_per_epoch=100
    )
    model = GrokkingModule(
        p=p, encoding="one_hot_sum", hidden=hidden, loss="mse", optimizer="sgd", lr=0.1, weight_decay=0.01
    )
    return model, data


@pytest.mark.parametrize("constraint", ["outputs", "losses"])
def test_tangent_gradient_monitor_dense_and_iterative_match_svd_reference(tiny_trainer, constraint):
    """A tiny MLP on p = 5: dense and iterative (LSQR) values equal a float64 SVD reference computed here."""
    values = {}
    for method in ("dense", "iterative"):
        model, data = tiny_modular()
        monitor = TangentGradientMonitor(
            every_n_steps=6, time_budget=None, constraint=constraint, method=method, tol=1e-5, max_iter=300
        )
        trainer = tiny_trainer([monitor], max_steps=6, csv_logger=False, limit_val_batches=0)
        trainer.fit(model, data)
        values[method] = {k: float(trainer.callback_metrics[k]) for k in KEYS}

    # The reference at the final weights, from scratch.
    x, y = data.train_inputs, data.train_targets
    if constraint == "outputs":
        jacobian = module_jacobian(model, x)
    else:
        params = {k: v.detach().double() for k, v in model.named_parameters()}
        model.double()
        jac = jacrev(lambda ps: model.per_sample_loss(functional_call(model, ps, (x.double(),)), y.double()))(params)
        model.float()
        jacobian = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], dim=1)
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    model.loss(model(x), y).backward()
    loss_grad = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    full = loss_grad + 0.01 * theta
    tangent_theta, tangent_full = dense_reference(jacobian, torch.stack([theta, full]))
    reference = {
        "grok/tangent/weight_fraction": float(tangent_theta @ tangent_theta / (theta @ theta)),
        "grok/tangent/grad_norm": float(tangent_full.norm()),
        "grok/tangent/grad_fraction": float(tangent_full.norm() / full.norm()),
        "grok/norm_descent_rate_predicted": 2 * 0.1 * 0.01 * float(theta @ tangent_theta),
    }
    for method in ("dense", "iterative"):
        for key, value in reference.items():
            assert values[method][key] == pytest.approx(value, rel=1e-4), (method, key)
    assert values["dense"]["grok/tangent/solver_iterations"] == 0
    assert values["iterative"]["grok/tangent/solver_iterations"] > 0
    # The trap, as a solver check: the tangent part of the full gradient is that of the decay gradient.
    assert values["iterative"]["grok/tangent/grad_norm"] == pytest.approx(0.01 * float(tangent_theta.norm()), rel=1e-4)


@pytest.mark.slow
def test_tangent_gradient_monitor_paper_preset_rate_and_fractions(tiny_trainer):
    """Paper-style MLP (p = 7, MSE, full-batch SGD, GELU): predicted rate within 10 % of the measured one after
    memorization; grad_fraction rises towards 1; loss_grad_cos falls with the distance to Z."""
    pl.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(
        p=7, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum", target="one_hot", steps_per_epoch=1000
    )
    model = GrokkingModule(
        p=7,
        encoding="one_hot_sum",
        hidden=32,
        activation="gelu",
        loss="mse",
        optimizer="sgd",
        lr=0.3,
        weight_decay=3e-4,
    )
    recorder = Recorder()
    monitor = TangentGradientMonitor(every_n_steps=200, time_budget=None, projected_reference=True)
    trainer = tiny_trainer(
        [monitor, NormDescentMonitor(every_n_steps=10, window=10), recorder],
        max_steps=1000,
        csv_logger=False,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    values = recorder.values

    predicted = values[1000]["grok/norm_descent_rate_predicted"]
    assert predicted == pytest.approx(values[1000]["grok/norm_descent_rate"], rel=0.10)
    steps = range(200, 1001, 200)
    fractions = [values[s]["grok/tangent/grad_fraction"] for s in steps]
    assert fractions[0] < 0.05 and fractions[-1] > 0.95
    assert all(a < b for a, b in itertools.pairwise(fractions))
    distances = [values[s]["grok/tangent/distance_to_manifold"] for s in steps]
    cosines = [values[s]["grok/tangent/loss_grad_cos"] for s in steps]
    assert all(a > b for a, b in itertools.pairwise(distances))
    assert all(a > b for a, b in itertools.pairwise(cosines))
    assert values[1000]["grok/tangent/update_cos"] > 0.9


class Noisy(pl.LightningModule):
    """Dropout, BatchNorm and a shuffling loader: anything a careless callback could disturb."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5, weight_decay=0.1)


def regression_loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=8, shuffle=True)


def test_tangent_gradient_monitor_never_changes_training(tiny_trainer):
    """Bit-identical weights, buffers and gradients with and without the monitor; RNG streams and modes untouched."""

    class State(Callback):
        def on_train_end(self, trainer, pl_module):
            self.rng = (torch.rand(3), random.random(), np.random.rand())
            self.modes = [m.training for m in pl_module.modules()]

    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        model, state = Noisy(), State()
        tiny_trainer([*callbacks, state], max_steps=8, csv_logger=False).fit(model, regression_loader())
        return model, state

    monitor = TangentGradientMonitor(every_n_steps=2, time_budget=None, update_window=1, projected_reference=False)
    (plain, plain_state), (watched, watched_state) = run([]), run([monitor])
    assert monitor._last_measure_step == 8
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad))
    assert torch.equal(plain_state.rng[0], watched_state.rng[0]) and plain_state.rng[1:] == watched_state.rng[1:]
    assert plain_state.modes == watched_state.modes


def test_tangent_gradient_monitor_schedule_every_n_steps(tiny_trainer, logged_by_step):
    """Measuring steps are the multiples of every_n_steps, from the start; update_cos from the first full window."""
    monitor = TangentGradientMonitor(every_n_steps=4, time_budget=None, update_window=6)
    trainer = tiny_trainer([monitor], max_steps=12, limit_val_batches=0)
    trainer.fit(LinearToyModule(), ToyDataModule(steps_per_epoch=12))
    assert sorted(logged_by_step(trainer, "grok/tangent/weight_fraction")) == [0, 4, 8, 12]
    assert sorted(logged_by_step(trainer, "grok/tangent/update_cos")) == [8, 12]
    assert sorted(monitor._snapshots) == [16]  # θ₁₀, for a step 16 this run does not reach (kept for resuming)


def test_tangent_gradient_monitor_only_when_memorized(tiny_trainer, logged_by_step):
    """With a ZeroLossDetector the monitor waits for memorization; with only_when_memorized=False it does not."""
    detector = ZeroLossDetector(every_n_steps=1, loss_threshold=0.01)
    waiting = TangentGradientMonitor(every_n_steps=1, time_budget=None)
    trainer = tiny_trainer([detector, waiting], max_steps=20, limit_val_batches=0)
    trainer.fit(LinearToyModule(), ToyDataModule(steps_per_epoch=20))
    measured = sorted(logged_by_step(trainer, "grok/tangent/weight_fraction"))
    assert detector.memorized_step is not None and measured == list(range(detector.memorized_step, 21))

    eager = TangentGradientMonitor(every_n_steps=1, time_budget=None, only_when_memorized=False)
    trainer = tiny_trainer([ZeroLossDetector(every_n_steps=1, loss_threshold=0.01), eager], max_steps=5)
    trainer.fit(LinearToyModule(), ToyDataModule(steps_per_epoch=5))
    assert eager._last_measure_step == 5


def test_tangent_gradient_monitor_time_budget_skips(tiny_trainer, logged_by_step):
    """A tiny time budget leaves the first measurement only; the budget covers the callback's own time."""
    monitor = TangentGradientMonitor(every_n_steps=1, time_budget=1e-6)
    trainer = tiny_trainer([monitor], max_steps=10, limit_val_batches=0)
    trainer.fit(LinearToyModule(), ToyDataModule(steps_per_epoch=10))
    assert sorted(logged_by_step(trainer, "grok/tangent/weight_fraction")) == [0]
    assert monitor._spent > 0


def test_tangent_gradient_monitor_time_budget_bounds_the_first_solve(tiny_trainer, monkeypatch):
    """The budget's deadline cuts even the first iterative solve; later ones warm-start from it and improve."""
    import grok_lightning.callbacks.tangent_gradient_monitor as module

    monkeypatch.setattr(module, "_MIN_ALLOWANCE", 0.0)  # at fit start the allowance is then 0 s
    model, data = tiny_modular()
    recorder = Recorder()
    monitor = TangentGradientMonitor(every_n_steps=1, time_budget=0.5, method="iterative", tol=1e-5, max_iter=300)
    with pytest.warns(RuntimeWarning, match="deadline") as record:
        trainer = tiny_trainer([monitor, recorder], max_steps=40, csv_logger=False, limit_val_batches=0)
        trainer.fit(model, data)
    assert sum("deadline" in str(w.message) for w in record) == 1
    measured = [v for v in recorder.values.values() if "grok/tangent/solver_iterations" in v]
    assert measured[0]["grok/tangent/solver_residual"] > 1e-5  # cut short: the allowance at fit start is ~0 s
    # Later allowances are positive: solves take steps and continue from the previous solution.
    assert max(v["grok/tangent/solver_iterations"] for v in measured) > 0
    assert measured[-1]["grok/tangent/solver_residual"] < measured[0]["grok/tangent/solver_residual"]


def test_tangent_gradient_monitor_resumes(tiny_trainer, tmp_path):
    """Snapshots and the last measured step are checkpointed: a resumed run logs what an uninterrupted one does."""
    kwargs = {"every_n_steps": 4, "time_budget": None, "update_window": 3}
    full = Recorder()
    tiny_trainer([TangentGradientMonitor(**kwargs), full], max_steps=16, csv_logger=False, limit_val_batches=0).fit(
        LinearToyModule(), ToyDataModule(steps_per_epoch=16)
    )
    first = TangentGradientMonitor(**kwargs)
    trainer = tiny_trainer([first], max_steps=10, csv_logger=False, limit_val_batches=0)
    trainer.fit(LinearToyModule(), ToyDataModule(steps_per_epoch=16))
    assert sorted(first.state_dict()["snapshots"]) == [12]  # θ₉ waits for step 12
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = Recorder()
    tiny_trainer([TangentGradientMonitor(**kwargs), resumed], max_steps=16, csv_logger=False, limit_val_batches=0).fit(
        LinearToyModule(), ToyDataModule(steps_per_epoch=16), ckpt_path=tmp_path / "mid.ckpt"
    )
    for step in (12, 16):
        for key in ("grok/tangent/update_cos", "grok/tangent/weight_fraction"):
            assert resumed.values[step][key] == pytest.approx(full.values[step][key], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"time_budget": 0.0}, "time_budget"),
        ({"time_budget": 1.5}, "time_budget"),
        ({"only_when_memorized": "yes"}, "only_when_memorized"),
        ({"update_window": 2.5}, "update_window"),
        ({"projected_reference": 1}, "projected_reference"),
        ({"reference_steps": 0}, "reference_steps"),
        ({"constraint": "weights"}, "constraint"),
        ({"method": "svd"}, "method"),
        ({"probe_size": 0}, "probe_size"),
        ({"tol": 1.0}, "tol"),
        ({"max_iter": -1}, "max_iter"),
        ({"loss_fn": "mse"}, "loss_fn"),
        ({"loss_reduction": "max"}, "loss_reduction"),
        ({"nan_policy": "ignore"}, "nan_policy"),
    ],
)
def test_tangent_gradient_monitor_bad_arguments(kwargs, match):
    """Bad arguments raise a ValueError naming the argument and the value."""
    with pytest.raises(ValueError, match=f"Expected argument `{match}` to be"):
        TangentGradientMonitor(**kwargs)


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_tangent_gradient_monitor_refuses_sharded_strategies(name):
    """Sharding strategies are refused when fitting starts, naming the strategy and the norm monitor."""
    strategy = type(name, (), {})()
    trainer = types.SimpleNamespace(strategy=strategy)
    with pytest.raises(MisconfigurationException, match=f"{name}.*NormDescentMonitor still works"):
        TangentGradientMonitor().setup(trainer, None, "fit")
    TangentGradientMonitor().setup(trainer, None, "validate")  # only fitting measures


def test_tangent_gradient_monitor_projected_reference_needs_finite_zero(tiny_trainer):
    """Cross-entropy has no zero at finite outputs: projected_reference is refused at fit start."""
    pl.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(p=5, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum")
    model = GrokkingModule(p=5, encoding="one_hot_sum", hidden=8, loss="cross_entropy")
    trainer = tiny_trainer([TangentGradientMonitor(projected_reference=True)], max_steps=2, csv_logger=False)
    with pytest.raises(MisconfigurationException, match="cross-entropy has its zero at infinity"):
        trainer.fit(model, data)


def test_tangent_gradient_monitor_nan_policy(tiny_trainer):
    """Non-finite weights: one warning and no values with 'warn'; a RuntimeError with 'error'."""
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        trainer = tiny_trainer([TangentGradientMonitor(every_n_steps=1, time_budget=None)], max_steps=3)
        trainer.fit(LinearToyModule(start=(float("nan"), 1.0)), ToyDataModule(steps_per_epoch=3))
    assert sum("not finite" in str(w.message) for w in record) == 1
    assert "grok/tangent/weight_fraction" not in trainer.callback_metrics
    trainer = tiny_trainer([TangentGradientMonitor(nan_policy="error")], max_steps=3, csv_logger=False)
    with pytest.raises(RuntimeError, match="not finite"):
        trainer.fit(LinearToyModule(start=(float("nan"), 1.0)), ToyDataModule(steps_per_epoch=3))


DDP_SCRIPT = """
import json, sys, time
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from grok_lightning import GrokkingModule, ModularArithmeticDataModule, TangentGradientMonitor

out = sys.argv[1]

class Dump(Callback):
    def __init__(self):
        self.values = {}
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values[trainer.global_step] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("grok/tangent/")
            and k != "grok/tangent/seconds"
        }
    def on_train_end(self, trainer, pl_module):
        record = {"values": self.values, "params": [p.detach().tolist() for p in pl_module.parameters()],
                  "last": trainer.callbacks[0]._last_measure_step}
        with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)

class Slow(Callback):
    # Training time outside the monitor, so that time_budget=1.0 (callback time <= training time) admits each
    # measuring step: the budget path (rank 0 decides, broadcast) runs without skipping.
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        time.sleep(0.5)

if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(p=5, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum",
                                       target="one_hot", steps_per_epoch=6)
    model = GrokkingModule(p=5, encoding="one_hot_sum", hidden=16, loss="mse", optimizer="sgd", lr=0.1,
                           weight_decay=0.01)
    monitor = TangentGradientMonitor(every_n_steps=3, time_budget=1.0, update_window=2)  # rank 0 decides
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[monitor, Dump(), Slow()],
    )
    trainer.fit(model, data)
"""


@pytest.mark.distributed
def test_tangent_gradient_monitor_ddp_ranks_agree(tmp_path):
    """Under 2-process CPU DDP both ranks log the same values, equal to a dense reference on the full set."""
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["values"] == ranks[1]["values"]
    assert ranks[0]["last"] == ranks[1]["last"] == 6 and "grok/tangent/update_cos" in ranks[0]["values"]["6"]

    # The full training set, not one rank's shard: ρ at the final weights from an SVD of J on all pairs.
    data = ModularArithmeticDataModule(p=5, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum")
    model = GrokkingModule(p=5, encoding="one_hot_sum", hidden=16, loss="mse")
    with torch.no_grad():
        for p, values in zip(model.parameters(), ranks[0]["params"], strict=True):
            p.copy_(torch.tensor(values))
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    tangent = dense_reference(module_jacobian(model, data.train_inputs), theta[None])[0]
    expected = float(tangent @ tangent / (theta @ theta))
    assert ranks[0]["values"]["6"]["grok/tangent/weight_fraction"] == pytest.approx(expected, rel=1e-4)
