"""Bad input and faults, for every callback: one message shape, nan_policy, a failing diagnostic never ends the run."""

import inspect
import json
import re
import subprocess
import sys
import textwrap
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import grok_lightning.callbacks as callbacks_package
import grok_lightning.callbacks.norm_descent_monitor as norm_module
from grok_lightning import (
    Eq20AlignmentMonitor,
    FourierEmbeddingMonitor,
    GrokkingModule,
    ModularArithmeticDataModule,
    NormDescentMonitor,
    TangentGradientMonitor,
    ZeroLossDetector,
)
from grok_lightning.callbacks._base import DiagnosticCallback, NonFiniteError

CALLBACK_CLASSES = [
    getattr(callbacks_package, name)
    for name in callbacks_package.__all__
    if inspect.isclass(getattr(callbacks_package, name)) and issubclass(getattr(callbacks_package, name), Callback)
]

# Each callback at a cadence of one step, and the key that says it measured.
FACTORIES = {
    "ZeroLossDetector": (lambda **kw: ZeroLossDetector(every_n_steps=1, **kw), "grok/train_loss_full"),
    "NormDescentMonitor": (lambda **kw: NormDescentMonitor(every_n_steps=1, window=1, **kw), "grok/weight_norm"),
    "TangentGradientMonitor": (
        lambda **kw: TangentGradientMonitor(every_n_steps=1, time_budget=None, **kw),
        "grok/tangent/weight_fraction",
    ),
    "FourierEmbeddingMonitor": (
        lambda **kw: FourierEmbeddingMonitor(every_n_steps=1, **kw),
        "grok/fourier/top_power_fraction",
    ),
    "Eq20AlignmentMonitor": (
        lambda **kw: Eq20AlignmentMonitor(every_n_steps=1, update_window=1, **kw),
        "grok/eq20/readout_gap",
    ),
}
MESSAGE = re.compile(r"Expected argument `(?P<name>\w+)` to be (?P<expectation>.+), but got (?P<value>.+)\.", re.S)


def tiny_setup(loss="mse"):
    """p = 5, 12 training pairs, a bias-free two-layer MLP (16 hidden units): every callback can read it."""
    pl.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(
        p=5, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum", target="one_hot", steps_per_epoch=100
    )
    model = GrokkingModule(
        p=5, encoding="one_hot_sum", hidden=16, loss=loss, optimizer="sgd", lr=0.1, weight_decay=0.01
    )
    return model, data


class Arm(Callback):
    """Sets ``state["armed"]`` at the end of step ``at`` (before the callbacks listed after it run their hook)."""

    def __init__(self, state, at):
        self.state, self.at = state, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at:
            self.state["armed"] = True


class PoisonWeights(Callback):
    """Fills every parameter with NaN at the end of step ``at``: from then on the model is not finite."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


def _warnings_about(record, text):
    return [w for w in record if text in str(w.message)]


@pytest.mark.parametrize("cls", CALLBACK_CLASSES, ids=lambda cls: cls.__name__)
def test_every_callback_shares_the_fault_contract(cls):
    """Every exported callback derives from DiagnosticCallback and takes nan_policy and strict, checked alike."""
    assert issubclass(cls, DiagnosticCallback)
    parameters = inspect.signature(cls).parameters
    assert parameters["nan_policy"].default == "warn" and parameters["strict"].default is False
    with pytest.raises(ValueError) as error:
        cls(nan_policy="ignore")
    assert str(error.value) == "Expected argument `nan_policy` to be one of ('warn', 'error'), but got 'ignore'."
    with pytest.raises(ValueError) as error:
        cls(strict=1)
    assert str(error.value) == "Expected argument `strict` to be a bool, but got 1."
    instance = cls()
    assert (instance.nan_policy, instance.strict, instance.disabled) == ("warn", False, False)


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (ZeroLossDetector, {"every_n_steps": True}, "every_n_steps"),
        (ZeroLossDetector, {"loss_threshold": float("nan")}, "loss_threshold"),
        (ZeroLossDetector, {"val_threshold": float("nan")}, "val_threshold"),
        (ZeroLossDetector, {"monitor": 3}, "monitor"),
        (NormDescentMonitor, {"window": -1}, "window"),
        (NormDescentMonitor, {"every_n_steps": "10"}, "every_n_steps"),
        (TangentGradientMonitor, {"time_budget": True}, "time_budget"),
        (TangentGradientMonitor, {"seed": 1.5}, "seed"),
        (TangentGradientMonitor, {"tol": float("nan")}, "tol"),
        (TangentGradientMonitor, {"probe_size": -3}, "probe_size"),
        (TangentGradientMonitor, {"method": True}, "method"),
        (TangentGradientMonitor, {"unpack_batch": 0}, "unpack_batch"),
        (FourierEmbeddingMonitor, {"figure_every_n_steps": 2.0}, "figure_every_n_steps"),
        (FourierEmbeddingMonitor, {"power_floor": -0.5}, "power_floor"),
        (FourierEmbeddingMonitor, {"top_k": 0}, "top_k"),
        (Eq20AlignmentMonitor, {"activation": "tanh"}, "activation"),
        (Eq20AlignmentMonitor, {"weights": "fc1"}, "weights"),
        (Eq20AlignmentMonitor, {"update_window": 0}, "update_window"),
    ],
)
def test_bad_arguments_share_one_message_shape(cls, kwargs, name):
    """Every rejected argument gives 'Expected argument `name` to be ..., but got <repr of the value>.'."""
    with pytest.raises(ValueError) as error:
        cls(**kwargs)
    match = MESSAGE.fullmatch(str(error.value))
    assert match is not None, str(error.value)
    assert match["name"] == name and match["value"] == repr(kwargs[name])


@pytest.mark.parametrize("name", list(FACTORIES))
def test_non_finite_weights_warn_once_and_training_goes_on(name, tiny_trainer, logged_by_step):
    """NaN weights from step 2: one warning, nothing logged from then on, the run reaches max_steps."""
    factory, key = FACTORIES[name]
    model, data = tiny_setup()
    trainer = tiny_trainer([PoisonWeights(at=2), factory()], max_steps=4, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        trainer.fit(model, data)
    assert len(_warnings_about(record, "not finite")) == 1
    assert trainer.global_step == 4
    logged = logged_by_step(trainer, key)
    assert 1 in logged and max(logged) == 1  # measured before the weights broke, never after


@pytest.mark.parametrize("name", list(FACTORIES))
def test_non_finite_weights_raise_with_nan_policy_error(name, tiny_trainer):
    """nan_policy='error': a NonFiniteError (a RuntimeError) at the first non-finite measurement."""
    factory, _ = FACTORIES[name]
    model, data = tiny_setup()
    trainer = tiny_trainer([PoisonWeights(at=2), factory(nan_policy="error")], max_steps=4, csv_logger=False)
    with pytest.raises(NonFiniteError, match=f"{name}: .* is not finite at step 2"):
        trainer.fit(model, data)
    assert issubclass(NonFiniteError, RuntimeError)


def test_zero_loss_detector_infinite_loss_skips_the_check(tiny_trainer, logged_by_step):
    """A loss_fn returning inf at steps 2-3: those checks are skipped and restart the memorization streak."""
    state = {"armed": False}

    def loss_fn(outputs, targets):
        losses = (outputs - targets).pow(2).sum(dim=1)
        return torch.full_like(losses, float("inf")) if state["armed"] and state["step"] < 4 else losses

    class Step(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state["step"] = trainer.global_step

    detector = ZeroLossDetector(every_n_steps=1, loss_threshold=10.0, acc_threshold=None, patience=3, loss_fn=loss_fn)
    model, data = tiny_setup()
    trainer = tiny_trainer([Step(), Arm(state, at=2), detector], max_steps=6, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="full training loss") as record:
        trainer.fit(model, data)
    assert len(_warnings_about(record, "not finite")) == 1
    assert sorted(logged_by_step(trainer, "grok/train_loss_full")) == [0, 1, 4, 5, 6]
    # Every finite check qualifies (loss ≤ 10): without the skipped checks the streak 0, 1, 2 would confirm at 0.
    assert detector.memorized_step == 4


def _raising_callbacks(state, monkeypatch):
    """Each callback with a user function (or, for the norm monitor, its norm helper) that raises once armed."""

    def boom(*args, **kwargs):
        if state["armed"]:
            raise ValueError("injected")

    def loss_fn(outputs, targets):
        boom()
        return (outputs - targets).pow(2).sum(dim=1)

    def embedding(module):
        boom()
        return module.net.fc1.weight.T

    def weights(module):
        boom()
        return module.net.fc1.weight.T, module.net.fc2.weight.T

    real_squared_norms = norm_module.squared_norms

    def squared_norms(*args):
        boom()
        return real_squared_norms(*args)

    monkeypatch.setattr(norm_module, "squared_norms", squared_norms)
    return {
        "ZeroLossDetector": {"loss_fn": loss_fn},
        "NormDescentMonitor": {},
        "TangentGradientMonitor": {"loss_fn": loss_fn},
        "FourierEmbeddingMonitor": {"embedding": embedding},
        "Eq20AlignmentMonitor": {"weights": weights},
    }


@pytest.mark.parametrize("name", list(FACTORIES))
def test_exception_in_a_diagnostic_warns_once_and_disables_it(name, tiny_trainer, logged_by_step, monkeypatch):
    """An exception from step 2 on: one warning with the callback, type and message; disabled; the run completes."""
    factory, key = FACTORIES[name]
    state = {"armed": False}
    callback = factory(**_raising_callbacks(state, monkeypatch)[name])
    model, data = tiny_setup()
    trainer = tiny_trainer([Arm(state, at=2), callback], max_steps=5, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match=f"{name} failed in .* at step 2: ValueError: injected") as record:
        trainer.fit(model, data)
    assert len(_warnings_about(record, "injected")) == 1
    assert "disabled for the rest of this run" in str(_warnings_about(record, "injected")[0].message)
    assert callback.disabled and trainer.global_step == 5
    assert max(logged_by_step(trainer, key)) == 1  # nothing after the failure


@pytest.mark.parametrize("name", list(FACTORIES))
def test_exception_in_a_diagnostic_raises_when_strict(name, tiny_trainer, monkeypatch):
    """strict=True: the diagnostic's exception ends the run, as it is."""
    factory, _ = FACTORIES[name]
    state = {"armed": False}
    callback = factory(strict=True, **_raising_callbacks(state, monkeypatch)[name])
    model, data = tiny_setup()
    trainer = tiny_trainer([Arm(state, at=2), callback], max_steps=5, csv_logger=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="injected"):
        trainer.fit(model, data)
    assert trainer.global_step == 2


def test_unpack_batch_failing_at_fit_start_disables_from_the_start(tiny_trainer):
    """A custom unpack_batch that raises when fitting starts: one warning each, training completes unwatched."""
    from torch.utils.data import DataLoader, TensorDataset

    def unpack_batch(batch):
        raise KeyError("no targets in this batch")

    _, data = tiny_setup()
    model = GrokkingModule(p=5, encoding="one_hot_sum", hidden=16, loss="mse", optimizer="sgd", lr=0.1)
    loader = DataLoader(TensorDataset(data.train_inputs, data.train_targets), batch_size=4)
    detector = ZeroLossDetector(unpack_batch=unpack_batch)
    monitor = TangentGradientMonitor(unpack_batch=unpack_batch, time_budget=None)
    trainer = tiny_trainer([detector, monitor], max_steps=3, csv_logger=False)
    with pytest.warns(RuntimeWarning, match="KeyError") as record:
        trainer.fit(model, loader)
    assert len(_warnings_about(record, "ZeroLossDetector failed")) == 1
    assert len(_warnings_about(record, "TangentGradientMonitor failed")) == 1
    assert detector.disabled and monitor.disabled and trainer.global_step == 3
    assert not any(key.startswith("grok/") for key in trainer.callback_metrics)


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("ZeroLossDetector", lambda: ZeroLossDetector(loss_fn=lambda o, t: o.sum()), "per-sample losses of shape"),
        ("TangentGradientMonitor", lambda: TangentGradientMonitor(projected_reference=True), "zero at infinity"),
        ("FourierEmbeddingMonitor", lambda: FourierEmbeddingMonitor(embedding=lambda m: m.net.fc1.bias), "p ≥ 3"),
        ("Eq20AlignmentMonitor", lambda: Eq20AlignmentMonitor(), "squared-error loss"),
    ],
)
def test_configuration_errors_still_raise_at_fit_start(name, make, match, tiny_trainer):
    """MisconfigurationException passes through the guard, strict or not: a setup the callback cannot measure."""
    model, data = tiny_setup(loss="cross_entropy")
    data = ModularArithmeticDataModule(p=5, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum")
    trainer = tiny_trainer([make()], max_steps=2, csv_logger=False)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(model, data)


def test_norm_monitor_refuses_an_all_frozen_model(tiny_trainer):
    """Every parameter frozen (the optimizer still lists them): the norm monitor has nothing to watch and says so."""
    model, data = tiny_setup()
    model.requires_grad_(False)
    trainer = tiny_trainer([NormDescentMonitor()], max_steps=2, csv_logger=False)
    with pytest.raises(MisconfigurationException, match="hold no trained parameters"):
        trainer.fit(model, data)


class Probe(DiagnosticCallback):
    """A callback written later, knowing nothing of faults: its hook fails from step 2 on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= 2:
            raise IndexError("late failure")
        self.steps.append(trainer.global_step)


def test_a_new_callback_gets_the_guard_by_subclassing(tiny_trainer):
    """Subclassing DiagnosticCallback is enough: one warning, disabled, the run completes; a new fit re-enables it."""
    probe = Probe()
    model, data = tiny_setup()
    with pytest.warns(RuntimeWarning, match=r"Probe failed in on_train_batch_end at step 2: IndexError") as record:
        tiny_trainer([probe], max_steps=4, csv_logger=False).fit(model, data)
    assert len(_warnings_about(record, "late failure")) == 1
    assert probe.disabled and probe.steps == [1]

    probe.steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_trainer([probe], max_steps=1, csv_logger=False).fit(model, data)
    assert probe.steps == [1] and not probe.disabled  # a new fit starts enabled

    with pytest.raises(IndexError, match="late failure"):
        tiny_trainer([Probe(strict=True)], max_steps=4, csv_logger=False).fit(*tiny_setup())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_without_a_logger_values_still_reach_callback_metrics(name, tiny_trainer, logged_by_step):
    """logger=False: callback_metrics hold the values a CSV logger receives in the same run with a logger."""
    factory, key = FACTORIES[name]
    model, data = tiny_setup()
    logged = tiny_trainer([factory()], max_steps=3, limit_val_batches=0)
    logged.fit(model, data)
    reference = logged_by_step(logged, key)[3]

    model, data = tiny_setup()
    trainer = tiny_trainer([factory()], max_steps=3, csv_logger=False, limit_val_batches=0)
    trainer.fit(model, data)
    assert trainer.logger is None
    assert float(trainer.callback_metrics[key]) == pytest.approx(reference, rel=1e-6)


DDP_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from grok_lightning import (FourierEmbeddingMonitor, GrokkingModule, ModularArithmeticDataModule,
                            TangentGradientMonitor, ZeroLossDetector)

out = sys.argv[1]
state = {"step": 0, "rank": 0}

def fails_on_rank_one(step):
    if state["rank"] == 1 and state["step"] >= step:
        raise ValueError(f"injected on rank {state['rank']}")

def loss_fn(outputs, targets):
    fails_on_rank_one(2)
    return (outputs - targets).pow(2).sum(dim=1)

def embedding(module):
    fails_on_rank_one(2)
    return module.net.fc1.weight.T

class Step(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state["step"], state["rank"] = trainer.global_step, trainer.global_rank

measured = {"tangent": [], "fourier": []}  # steps whose measurement completed, on this rank
real_measure, real_check = TangentGradientMonitor._measure, FourierEmbeddingMonitor._check

def measure(self, trainer, pl_module):
    metrics = real_measure(self, trainer, pl_module)
    measured["tangent"].append(trainer.global_step)
    return metrics

def check(self, trainer, pl_module):
    metrics = real_check(self, trainer, pl_module)
    measured["fourier"].append(trainer.global_step)
    return metrics

TangentGradientMonitor._measure, FourierEmbeddingMonitor._check = measure, check

class Dump(Callback):
    def on_train_end(self, trainer, pl_module):
        detector, tangent, fourier = trainer.callbacks[1:4]
        record = {"step": trainer.global_step, "measured": measured,
                  "disabled": [detector.disabled, tangent.disabled, fourier.disabled]}
        with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)

if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(p=5, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum",
                                       target="one_hot", steps_per_epoch=8)
    model = GrokkingModule(p=5, encoding="one_hot_sum", hidden=16, loss="mse", optimizer="sgd", lr=0.1,
                           weight_decay=0.01)
    callbacks = [
        Step(),
        ZeroLossDetector(every_n_steps=2, loss_fn=loss_fn),
        TangentGradientMonitor(every_n_steps=2, time_budget=1.0, only_when_memorized=False, loss_fn=loss_fn),
        FourierEmbeddingMonitor(every_n_steps=1, embedding=embedding),
        Dump(),
    ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
    )
    trainer.fit(model, data)
"""


@pytest.mark.distributed
def test_a_failure_on_one_rank_never_leaves_the_others_waiting(tmp_path):
    """2-process DDP, failures on rank 1 only: collective callbacks are disabled on both ranks together, the
    collective-free Fourier monitor on rank 1 alone; both ranks finish the run."""
    script = tmp_path / "ddp_faults.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    # Detector and tangent monitor: disabled on both ranks; the tangent monitor measured step 2 on rank 0 (its
    # failure on rank 1 is agreed on at the next measuring step, 4) and never after.
    assert ranks[0]["disabled"][:2] == ranks[1]["disabled"][:2] == [True, True]
    assert ranks[0]["measured"]["tangent"] == [0, 2] and ranks[1]["measured"]["tangent"] == [0]
    # The Fourier monitor has no collective: rank 0 keeps measuring, rank 1 stopped at its failure.
    assert ranks[0]["disabled"][2] is False and ranks[1]["disabled"][2] is True
    assert ranks[0]["measured"]["fourier"] == list(range(7)) and ranks[1]["measured"]["fourier"] == [0, 1]
    assert "ZeroLossDetector failed on rank 1" in result.stderr
    assert "disabled on every rank" in result.stderr
