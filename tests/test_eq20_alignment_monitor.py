import random
import types

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from grok_lightning import Eq20AlignmentMonitor, GrokkingModule, ModularArithmeticDataModule
from grok_lightning.geometry import eq20_flow
from grok_lightning.reference import PredictedDynamicsModule

COS, GAP = "grok/eq20/update_cos", "grok/eq20/readout_gap"


def modular_data(p=7, target="one_hot", **kwargs):
    options = {"pairs": "unordered", "train_fraction": 0.7, "encoding": "one_hot_sum", "target": target}
    options.update(kwargs)
    return ModularArithmeticDataModule(p=p, **options)  # p = 7: 20 training rows


def mse_mlp(p=7, hidden=32, **kwargs):
    options = {"encoding": "one_hot_sum", "hidden": hidden, "loss": "mse", "optimizer": "sgd", "lr": 0.5}
    options.update({"weight_decay": 4e-3, **kwargs})
    return GrokkingModule(p=p, **options)


class EulerMLP(GrokkingModule):
    """A reference MLP whose first layer takes Euler steps of Eq. 20 and whose read-out is the minimum-norm one."""

    def __init__(self, step_size: float = 1e-2, **kwargs):
        super().__init__(**kwargs)
        self.step_size = step_size
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        fc1, fc2 = self.net.fc1, self.net.fc2
        with torch.no_grad():
            flow, _, _ = eq20_flow(fc1.weight.T, x, y)
            fc1.weight.grad = -flow.T.to(fc1.weight.dtype)  # fc1.weight is Eᵀ
        self.optimizers().step()
        fc1.weight.grad = None
        with torch.no_grad():
            _, readout, _ = eq20_flow(fc1.weight.T, x, y)
            fc2.weight.copy_(readout.T)

    def configure_optimizers(self):
        return torch.optim.SGD([self.net.fc1.weight], lr=self.step_size)


def _readout_gap(w2, e, x, y):
    optimal = torch.linalg.pinv(torch.relu(x @ e)) @ y
    return float((w2 - optimal).norm() / optimal.norm())


def test_eq20_alignment_monitor_euler_steps_of_predicted_dynamics(tiny_trainer, logged_by_step):
    """A PredictedDynamicsModule moves by Euler steps of Eq. 20: cosine 1 for k = 1, read-out gap 0."""
    torch.manual_seed(0)
    model = PredictedDynamicsModule(p=7, width=48, step_size=1e-2)
    monitor = Eq20AlignmentMonitor(every_n_steps=1, update_window=1)
    trainer = tiny_trainer([monitor], max_steps=12, limit_val_batches=0)
    trainer.fit(model, modular_data(steps_per_epoch=12))
    cosines, gaps = logged_by_step(trainer, COS), logged_by_step(trainer, GAP)
    assert sorted(cosines) == list(range(1, 13)) and sorted(gaps) == list(range(13))
    assert min(cosines.values()) == pytest.approx(1.0, abs=1e-9)
    assert max(gaps.values()) < 1e-9


def test_eq20_alignment_monitor_reads_the_first_layer_transposed(tiny_trainer, logged_by_step):
    """A float32 GrokkingModule MLP stepped along Eq. 20 on E = fc1.weight.T: cosine 1 to 1e-6, read-out gap ~0."""
    pl.seed_everything(0, verbose=False)
    model = EulerMLP(p=7, encoding="one_hot_sum", hidden=32, loss="mse", step_size=1e-2)
    monitor = Eq20AlignmentMonitor(every_n_steps=3, update_window=1)
    trainer = tiny_trainer([monitor], max_steps=12, limit_val_batches=0)
    trainer.fit(model, modular_data(steps_per_epoch=12))
    cosines, gaps = logged_by_step(trainer, COS), logged_by_step(trainer, GAP)
    assert sorted(cosines) == [3, 6, 9, 12]
    assert min(cosines.values()) == pytest.approx(1.0, abs=1e-6)
    assert gaps[0] > 0.1  # the initial read-out is random
    assert max(gaps[s] for s in gaps if s > 0) < 1e-5  # fc2 is set to the minimum-norm read-out each step


class Trajectory(Callback):
    """E = fc1.weight.T and W₂ = fc2.weight.T after every optimizer step, in float64."""

    def __init__(self):
        self.weights = {}

    def on_train_start(self, trainer, pl_module):
        self.on_train_batch_end(trainer, pl_module, None, None, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        net = pl_module.net
        self.weights[trainer.global_step] = (net.fc1.weight.detach().T.double(), net.fc2.weight.detach().T.double())


def _reference_flow(e, x, y):
    """−½ ∇_E (‖E‖² + ‖pinv(relu(X E)) Y‖²) by autograd through the pseudo-inverse: no closed form."""

    def cost(e):
        return e.square().sum() + (torch.linalg.pinv(torch.relu(x @ e)) @ y).square().sum()

    return -0.5 * torch.func.grad(cost)(e)


def test_eq20_alignment_monitor_matches_independent_reference(tiny_trainer, logged_by_step):
    """Cosines and read-out gaps of real SGD training equal a reference built on pinv and autograd (class targets)."""
    pl.seed_everything(0, verbose=False)
    data = modular_data(target="class", steps_per_epoch=30)
    model, trajectory = mse_mlp(weight_decay=0.05), Trajectory()
    trainer = tiny_trainer([Eq20AlignmentMonitor(every_n_steps=5, update_window=3), trajectory], max_steps=30)
    trainer.fit(model, data)

    x = data.train_inputs.double()
    y = torch.nn.functional.one_hot(data.train_targets, 7).double()
    cosines, gaps = logged_by_step(trainer, COS), logged_by_step(trainer, GAP)
    assert sorted(cosines) == [5, 10, 15, 20, 25, 30] and sorted(gaps) == [0, 5, 10, 15, 20, 25, 30]
    for step, logged in cosines.items():
        start, end = trajectory.weights[step - 3][0], trajectory.weights[step][0]
        flow = _reference_flow(start, x, y)
        update = end - start
        expected = float((update * flow).sum() / (update.norm() * flow.norm()))
        assert logged == pytest.approx(expected, abs=1e-6), step
    for step, logged in gaps.items():
        e, w2 = trajectory.weights[step]
        assert logged == pytest.approx(_readout_gap(w2, e, x, y), rel=1e-6, abs=1e-9), step


def test_eq20_alignment_monitor_is_reduction_invariant(tiny_trainer, logged_by_step):
    """Mean loss with (lr, wd) and summed loss with (lr/n, n·wd) are one trajectory: the same cosines."""
    data = modular_data(steps_per_epoch=40)
    n = len(data.train_targets)
    runs = []
    for reduction, lr, wd in (("mean", 0.5, 0.05), ("sum", 0.5 / n, 0.05 * n)):
        pl.seed_everything(0, verbose=False)
        model = mse_mlp(mse_reduction=reduction, lr=lr, weight_decay=wd)
        trainer = tiny_trainer([Eq20AlignmentMonitor(every_n_steps=10, update_window=10)], max_steps=40)
        trainer.fit(model, data)
        runs.append(logged_by_step(trainer, COS))
    assert sorted(runs[0]) == sorted(runs[1]) == [10, 20, 30, 40]
    for step in runs[0]:
        assert runs[0][step] == pytest.approx(runs[1][step], abs=1e-5)


def test_eq20_alignment_monitor_never_changes_training(tiny_trainer):
    """Bit-identical weights and gradients with and without the monitor; RNG streams and modes untouched."""

    class State(Callback):
        def on_train_end(self, trainer, pl_module):
            self.rng = (torch.rand(3), random.random(), np.random.rand())
            self.modes = [m.training for m in pl_module.modules()]

    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        model, state = mse_mlp(), State()
        data = modular_data(batch_size=8)  # minibatches: the training loader shuffles
        tiny_trainer([*callbacks, state], max_steps=8, csv_logger=False).fit(model, data)
        return model, state

    monitor = Eq20AlignmentMonitor(every_n_steps=2, update_window=1)
    (plain, plain_state), (watched, watched_state) = run([]), run([monitor])
    assert monitor._last_measure_step == 8
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad))
    assert torch.equal(plain_state.rng[0], watched_state.rng[0]) and plain_state.rng[1:] == watched_state.rng[1:]
    assert plain_state.modes == watched_state.modes


def test_eq20_alignment_monitor_schedule_and_resume(tiny_trainer, logged_by_step, tmp_path):
    """Measuring steps are the multiples of every_n_steps; E_{t−k} is checkpointed, so a resumed run logs the same."""
    kwargs = {"every_n_steps": 4, "update_window": 6}

    def fit(max_steps, ckpt_path=None, **options):
        pl.seed_everything(0, verbose=False)
        monitor = Eq20AlignmentMonitor(**kwargs)
        trainer = tiny_trainer([monitor], max_steps=max_steps, limit_val_batches=0, **options)
        trainer.fit(mse_mlp(weight_decay=0.05), modular_data(steps_per_epoch=16), ckpt_path=ckpt_path)
        return trainer, monitor

    full, _ = fit(16)
    assert sorted(logged_by_step(full, GAP)) == [0, 4, 8, 12, 16]
    assert sorted(logged_by_step(full, COS)) == [8, 12, 16]
    first, monitor = fit(10, csv_logger=False)
    assert sorted(monitor.state_dict()["snapshots"]) == [12, 16]  # E₆ and E₁₀ wait for steps 12 and 16
    first.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, _ = fit(16, ckpt_path=tmp_path / "mid.ckpt")
    for step in (12, 16):
        assert logged_by_step(resumed, COS)[step] == pytest.approx(logged_by_step(full, COS)[step], abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"update_window": 2.5}, "update_window"),
        ({"activation": "tanh"}, "activation"),
        ({"weights": "fc1"}, "weights"),
        ({"unpack_batch": 3}, "unpack_batch"),
        ({"loss_fn": "mse"}, "loss_fn"),
        ({"nan_policy": "ignore"}, "nan_policy"),
    ],
)
def test_eq20_alignment_monitor_bad_arguments(kwargs, match):
    """Bad arguments raise a ValueError naming the argument and the value."""
    with pytest.raises(ValueError, match=f"Expected argument `{match}` to be .*{kwargs[match]!r}"):
        Eq20AlignmentMonitor(**kwargs)


@pytest.mark.parametrize(
    ("model", "data", "monitor", "match"),
    [
        (
            lambda: GrokkingModule(p=7, encoding="tokens", architecture="transformer", loss="mse", d_model=8, d_mlp=8),
            lambda: modular_data(encoding="tokens"),
            {},
            "can only read bias-free two-layer MLPs",
        ),
        (lambda: mse_mlp(bias=True), modular_data, {}, "have biases"),
        (lambda: mse_mlp(loss="cross_entropy"), modular_data, {}, "squared-error loss"),
        (lambda: mse_mlp(hidden=16), modular_data, {}, "n=20 rows and the width is 16"),
        (mse_mlp, modular_data, {"activation": "quadratic"}, "differ from σ\\(X E\\) W₂ with σ = 'quadratic'"),
    ],
    ids=["transformer", "bias", "cross_entropy", "narrow", "wrong_activation"],
)
def test_eq20_alignment_monitor_refuses_what_eq20_does_not_describe(tiny_trainer, model, data, monitor, match):
    """Modules outside Eq. 20 stop at fit start with a MisconfigurationException that says why."""
    pl.seed_everything(0, verbose=False)
    trainer = tiny_trainer([Eq20AlignmentMonitor(**monitor)], max_steps=2, csv_logger=False)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(model(), data())


def test_eq20_alignment_monitor_refuses_sharded_strategies():
    """Sharding strategies are refused when fitting starts, naming the strategy."""
    trainer = types.SimpleNamespace(strategy=type("FSDPStrategy", (), {})())
    with pytest.raises(MisconfigurationException, match="FSDPStrategy"):
        Eq20AlignmentMonitor().setup(trainer, None, "fit")
    Eq20AlignmentMonitor().setup(trainer, None, "validate")  # only fitting measures


def test_eq20_alignment_monitor_singular_gram_and_nan_policy(tiny_trainer, logged_by_step):
    """Dead units (H Hᵀ singular): one warning, nothing logged. Non-finite E: one warning, or a RuntimeError."""
    pl.seed_everything(0, verbose=False)
    model = mse_mlp(weight_decay=0.0)
    with torch.no_grad():
        model.net.fc1.weight.copy_(-model.net.fc1.weight.abs())  # every pre-activation ≤ 0: H = 0
    trainer = tiny_trainer([Eq20AlignmentMonitor(every_n_steps=1, update_window=1)], max_steps=3)
    with pytest.warns(RuntimeWarning, match="H Hᵀ singular") as record:
        trainer.fit(model, modular_data(steps_per_epoch=3))
    assert sum("singular" in str(w.message) for w in record) == 1
    assert not logged_by_step(trainer, GAP)

    class Poison(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net.fc1.weight.fill_(float("nan"))

    for policy in ("warn", "error"):
        pl.seed_everything(0, verbose=False)
        monitor = Eq20AlignmentMonitor(every_n_steps=1, update_window=1, nan_policy=policy)
        trainer = tiny_trainer([Poison(), monitor], max_steps=3, csv_logger=False)
        if policy == "warn":
            with pytest.warns(RuntimeWarning, match="not finite at step 2"):
                trainer.fit(mse_mlp(), modular_data(steps_per_epoch=3))
        else:
            with pytest.raises(RuntimeError, match="not finite at step 2"):
                trainer.fit(mse_mlp(), modular_data(steps_per_epoch=3))
