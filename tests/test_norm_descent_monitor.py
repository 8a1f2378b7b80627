import math
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grok_lightning import NormDescentMonitor
from grok_lightning.callbacks._data import squared_norms
from grok_lightning.reference import LinearToyModule, ToyDataModule


def tangent_squared(w):
    """‖P_T w‖² on '1+1=2': P_T w = ((w₁ − w₂)/2, (w₂ − w₁)/2)."""
    return float((w[0] - w[1]) ** 2 / 2)


class TwoLayers(pl.LightningModule):
    """Two param groups with their own lr and weight decay; optional optimizer and scheduler."""

    def __init__(self, optimizer="sgd", weight_decays=(0.1, 0.3), scheduler=False, dropout=0.0, batchnorm=False):
        super().__init__()
        self.optimizer_name, self.weight_decays, self.scheduler = optimizer, weight_decays, scheduler
        self.first = nn.Sequential(
            nn.Linear(3, 8), nn.BatchNorm1d(8) if batchnorm else nn.Identity(), nn.Dropout(dropout), nn.Tanh()
        )
        self.second = nn.Linear(8, 1)

    def forward(self, x):
        return self.second(self.first(x)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self(x) - y).pow(2).mean()

    def configure_optimizers(self):
        groups = [
            {"params": self.first.parameters(), "lr": 0.05, "weight_decay": self.weight_decays[0]},
            {"params": self.second.parameters(), "lr": 0.02, "weight_decay": self.weight_decays[1], "name": "head"},
        ]
        if self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(groups)
        elif self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(groups)
        else:
            optimizer = torch.optim.SGD(groups, momentum=0.5)
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def regression_loader(shuffle=False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=8, shuffle=shuffle)


def test_norm_descent_monitor_toy_rate_matches_tangent_projection(tiny_trainer, toy_trajectory, logged_by_step):
    """After memorization the measured rate is 2·lr·wd·‖P_T w‖² (window mean) within 2 %; norms are exact."""
    lr, wd, window = 0.1, 0.1, 10
    trainer = tiny_trainer([NormDescentMonitor(window=window)], max_steps=80, limit_val_batches=0)
    trainer.fit(LinearToyModule(start=(-1.0, 1.0), lr=lr, weight_decay=wd), ToyDataModule(steps_per_epoch=80))
    trajectory = toy_trajectory((-1.0, 1.0), lr=lr, wd=wd, steps=80)

    norms = logged_by_step(trainer, "grok/weight_norm")
    unconstrained = logged_by_step(trainer, "grok/decay_rate_unconstrained")
    assert sorted(norms) == list(range(81))
    for step, w in enumerate(trajectory):
        assert norms[step] == pytest.approx(float(w.norm()), rel=1e-6)
        assert unconstrained[step] == pytest.approx(2 * lr * wd * float(w @ w), rel=1e-5)

    rates = logged_by_step(trainer, "grok/norm_descent_rate")
    assert min(rates) == window  # from the first full window on
    fractions = logged_by_step(trainer, "grok/effective_tangent_fraction")
    timescales = logged_by_step(trainer, "grok/norm_timescale")
    for step in range(30, 81, 5):  # memorized by step ~10, the normal part settled
        predicted = sum(2 * lr * wd * tangent_squared(trajectory[s]) for s in range(step - window, step)) / window
        assert rates[step] == pytest.approx(predicted, rel=0.02)
        middle = trajectory[step - window // 2]
        assert fractions[step] == pytest.approx(tangent_squared(middle) / float(middle @ middle), rel=0.02)
        assert timescales[step] == pytest.approx(float(trajectory[step] @ trajectory[step]) / predicted, rel=0.02)
    relative = logged_by_step(trainer, "grok/norm_descent_rate_relative")
    assert relative[50] == pytest.approx(rates[50] / norms[50] ** 2, rel=1e-9)


def test_norm_descent_monitor_param_groups_hand_computed(tiny_trainer):
    """Per-group norms and the unconstrained rate 2·Σ lr_g·wd_g·‖θ_g‖²/(1 − momentum) match a hand computation."""
    torch.manual_seed(0)
    model = TwoLayers()
    monitor = NormDescentMonitor(window=3, log_param_groups=True)
    trainer = tiny_trainer([monitor], max_steps=8, csv_logger=False)
    trainer.fit(model, regression_loader())

    first = sum(float(p.detach().double().pow(2).sum()) for p in model.first.parameters())
    head = sum(float(p.detach().double().pow(2).sum()) for p in model.second.parameters())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["grok/weight_norm"] == pytest.approx(math.sqrt(first + head), rel=1e-6)
    assert metrics["grok/weight_norm/pg0"] == pytest.approx(math.sqrt(first), rel=1e-6)
    assert metrics["grok/weight_norm/head"] == pytest.approx(math.sqrt(head), rel=1e-6)
    expected = 2 * (0.05 * 0.1 * first + 0.02 * 0.3 * head) / (1 - 0.5)
    assert metrics["grok/decay_rate_unconstrained"] == pytest.approx(expected, rel=1e-6)
    assert metrics["grok/decay_rate_unconstrained/head"] == pytest.approx(2 * 0.02 * 0.3 * head / 0.5, rel=1e-6)
    group_rates = metrics["grok/norm_descent_rate/pg0"] + metrics["grok/norm_descent_rate/head"]
    assert group_rates == pytest.approx(metrics["grok/norm_descent_rate"], rel=1e-6)


def test_norm_descent_monitor_honours_schedulers_and_adamw(tiny_trainer):
    """The unconstrained rate reads lr from the param groups at that step; AdamW decay is lr·wd (no momentum)."""
    torch.manual_seed(0)
    model = TwoLayers(optimizer="adamw", scheduler=True)
    monitor = NormDescentMonitor(window=2)
    trainer = tiny_trainer([monitor], max_steps=6, csv_logger=False)
    trainer.fit(model, regression_loader())
    first = sum(float(p.detach().double().pow(2).sum()) for p in model.first.parameters())
    head = sum(float(p.detach().double().pow(2).sum()) for p in model.second.parameters())
    scale = 0.5**6  # measured after step 6, when the per-step scheduler has already set step 7's lr
    expected = 2 * scale * (0.05 * 0.1 * first + 0.02 * 0.3 * head)
    assert float(trainer.callback_metrics["grok/decay_rate_unconstrained"]) == pytest.approx(expected, rel=1e-6)


def test_norm_descent_monitor_adam_warns_once(tiny_trainer):
    """torch.optim.Adam with weight decay gets one warning that the unconstrained rate does not apply."""
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="preconditioner") as record:
        tiny_trainer([NormDescentMonitor()], max_steps=4, csv_logger=False).fit(
            TwoLayers(optimizer="adam"), regression_loader()
        )
    assert sum("preconditioner" in str(w.message) for w in record) == 1


def test_norm_descent_monitor_no_weight_decay_warns_and_still_logs(tiny_trainer):
    """Without weight decay: one warning, the measured rate is logged, the tangent fraction is not."""
    torch.manual_seed(0)
    monitor = NormDescentMonitor(window=2)
    trainer = tiny_trainer([monitor], max_steps=5, csv_logger=False)
    with pytest.warns(RuntimeWarning, match="no param group has weight decay") as record:
        trainer.fit(TwoLayers(weight_decays=(0.0, 0.0)), regression_loader())
    assert sum("weight decay" in str(w.message) for w in record) == 1
    metrics = trainer.callback_metrics
    assert "grok/norm_descent_rate" in metrics and float(metrics["grok/decay_rate_unconstrained"]) == 0.0
    assert "grok/effective_tangent_fraction" not in metrics


def test_norm_descent_monitor_never_changes_training(tiny_trainer):
    """Training with and without the monitor gives bit-identical weights, buffers and gradients."""

    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        model = TwoLayers(dropout=0.3, batchnorm=True)
        tiny_trainer(callbacks, max_steps=10, csv_logger=False).fit(model, regression_loader(shuffle=True))
        return model

    plain, watched = run([]), run([NormDescentMonitor(log_param_groups=True)])
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad))


def test_norm_descent_monitor_resumes_its_window(tiny_trainer, tmp_path):
    """The window history is part of the checkpoint: the first rates after resuming match an uninterrupted run."""

    class Rates(Callback):
        def __init__(self):
            self.rates = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "grok/norm_descent_rate" in trainer.callback_metrics:
                self.rates[trainer.global_step] = float(trainer.callback_metrics["grok/norm_descent_rate"])

    full = Rates()
    tiny_trainer([NormDescentMonitor(window=5), full], max_steps=20, limit_val_batches=0, csv_logger=False).fit(
        LinearToyModule(), ToyDataModule(steps_per_epoch=20)
    )
    trainer = tiny_trainer([NormDescentMonitor(window=5)], max_steps=12, limit_val_batches=0, csv_logger=False)
    trainer.fit(LinearToyModule(), ToyDataModule(steps_per_epoch=20))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = Rates()
    tiny_trainer([NormDescentMonitor(window=5), resumed], max_steps=20, limit_val_batches=0, csv_logger=False).fit(
        LinearToyModule(), ToyDataModule(steps_per_epoch=20), ckpt_path=tmp_path / "mid.ckpt"
    )
    assert sorted(resumed.rates) == list(range(13, 21))
    for step, rate in resumed.rates.items():
        assert rate == pytest.approx(full.rates[step], rel=1e-6)


class Weights(Callback):
    """Records the squared norm of each param group of a TwoLayers after every step, in float64, by hand."""

    def __init__(self):
        self.squares = {}

    def record(self, trainer, pl_module):
        first = sum(float(p.detach().double().pow(2).sum()) for p in pl_module.first.parameters())
        head = sum(float(p.detach().double().pow(2).sum()) for p in pl_module.second.parameters())
        self.squares[trainer.global_step] = (first, head)

    def on_train_start(self, trainer, pl_module):
        self.record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record(trainer, pl_module)


def counting(monitor):
    """The steps at which ``monitor`` measures, recorded by wrapping its ``_measure``."""
    steps, measure = [], monitor._measure

    def counted(trainer):
        steps.append(trainer.global_step)
        return measure(trainer)

    monitor._measure = counted
    return steps


@pytest.mark.parametrize(("every_n_steps", "window"), [(1, 4), (1, 10), (3, 4), (3, 10)])
def test_norm_descent_monitor_logs_what_every_step_would(tiny_trainer, logged_by_step, every_n_steps, window):
    """With log_every_n_steps=5, every logged value equals the one computed by hand from θ recorded at every step."""
    torch.manual_seed(0)
    recorder = Weights()
    monitor = NormDescentMonitor(every_n_steps=every_n_steps, window=window, log_param_groups=True)
    max_steps, log_every = 23, 5
    trainer = tiny_trainer([recorder, monitor], max_steps=max_steps, log_every_n_steps=log_every, precision="64-true")
    trainer.fit(TwoLayers(), regression_loader())
    assert sorted(recorder.squares) == list(range(max_steps + 1))

    # Published at the start and at steps 5, 10, 15, 20 and 23 (max_steps): the latest multiple of every_n_steps.
    published = {0} | {t // every_n_steps * every_n_steps for t in (*range(log_every, max_steps, log_every), max_steps)}
    decay = (2 * 0.05 * 0.1 / 0.5, 2 * 0.02 * 0.3 / 0.5)  # 2·c_g = 2·lr·wd/(1 − momentum)
    expected = {}
    for t in sorted(published):
        now = recorder.squares[t]
        total, unconstrained = sum(now), sum(c * s for c, s in zip(decay, now, strict=True))
        values = {
            "grok/weight_norm": math.sqrt(total),
            "grok/weight_norm/pg0": math.sqrt(now[0]),
            "grok/weight_norm/head": math.sqrt(now[1]),
            "grok/decay_rate_unconstrained": unconstrained,
            "grok/decay_rate_unconstrained/pg0": decay[0] * now[0],
            "grok/decay_rate_unconstrained/head": decay[1] * now[1],
        }
        if t >= window:  # the base: the latest multiple of every_n_steps at or before t − window
            s = (t - window) // every_n_steps * every_n_steps
            before = recorder.squares[s]
            rate = -(total - sum(before)) / (t - s)
            values["grok/norm_descent_rate"] = rate
            values["grok/norm_descent_rate/pg0"] = -(now[0] - before[0]) / (t - s)
            values["grok/norm_descent_rate/head"] = -(now[1] - before[1]) / (t - s)
            values["grok/norm_descent_rate_relative"] = rate / total
            mean = 0.5 * (unconstrained + sum(c * b for c, b in zip(decay, before, strict=True)))
            values["grok/effective_tangent_fraction"] = rate / mean
            if rate > 0:
                values["grok/norm_timescale"] = total / rate
        for key, value in values.items():
            expected.setdefault(key, {})[t] = value

    assert "grok/norm_descent_rate" in expected
    for key, values in expected.items():
        logged = logged_by_step(trainer, key)
        assert sorted(logged) == sorted(values), key
        for t, value in values.items():
            assert logged[t] == pytest.approx(value, rel=1e-9, abs=1e-15), (key, t)


@pytest.mark.parametrize(
    ("log_every", "every_n_steps", "window", "max_steps", "measured"),
    [
        (50, 1, 10, 200, [0, 40, 50, 90, 100, 140, 150, 190, 200]),  # each logging step and its base
        (5, 3, 4, 23, [0, 3, 9, 12, 15, 18, 21]),  # 3 ≤ 5, 9 ≤ 10, 15, 18 ≤ 20, 21 ≤ 23; bases 3, 9, 12, 15
        (4, 10, 3, 30, [0, 10, 20, 30]),  # every_n_steps > log_every_n_steps: every multiple is published
        (1, 1, 10, 30, list(range(31))),
    ],
)
def test_norm_descent_monitor_measures_only_what_it_publishes(
    tiny_trainer, log_every, every_n_steps, window, max_steps, measured
):
    """Measurements are taken on the steps published and at the bases of their windows only (every step with
    log_every_n_steps=1)."""
    monitor = NormDescentMonitor(every_n_steps=every_n_steps, window=window)
    steps = counting(monitor)
    tiny_trainer(
        [monitor], max_steps=max_steps, log_every_n_steps=log_every, limit_val_batches=0, csv_logger=False
    ).fit(LinearToyModule(), ToyDataModule(steps_per_epoch=max_steps))
    assert steps == measured


@pytest.mark.parametrize("collective", [False, True])
def test_norm_descent_monitor_measures_where_training_stops(tiny_trainer, toy_trajectory, logged_by_step, collective):
    """A step where training stops is measured and published, its rate over the span back to the latest earlier
    measurement at or before t − window; not where ranks must measure alike (a sharding strategy's all-reduce)."""

    class Stop(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step == 17

    monitor = NormDescentMonitor(window=4)
    if collective:
        monitor._collective = lambda trainer: True
    steps = counting(monitor)
    trainer = tiny_trainer([Stop(), monitor], max_steps=40, log_every_n_steps=5, limit_val_batches=0)
    trainer.fit(LinearToyModule(), ToyDataModule(steps_per_epoch=40))
    assert trainer.global_step == 17
    regular = [0, 1, 5, 6, 10, 11, 15, 16]  # the logging steps and their bases, 4 steps back (16 for step 20)
    assert steps == (regular if collective else [*regular, 17])

    # Without a measurement at step 17, the pending one (step 16, a base) is published there.
    rates = logged_by_step(trainer, "grok/norm_descent_rate")
    assert sorted(rates) == [5, 10, 15, 16 if collective else 17]
    if not collective:
        squares = [float(w @ w) for w in toy_trajectory((-1.0, 1.0), lr=0.1, wd=0.1, steps=17)]
        assert rates[17] == pytest.approx(-(squares[17] - squares[11]) / 6, rel=1e-4)  # base 11, not 13
        assert logged_by_step(trainer, "grok/weight_norm")[17] == pytest.approx(math.sqrt(squares[17]), rel=1e-6)


@pytest.mark.parametrize("resume_step", [7, 14])
def test_norm_descent_monitor_resumes_its_sparse_schedule(tiny_trainer, tmp_path, logged_by_step, resume_step):
    """Resumed from a mid-window checkpoint of the same run, it logs what the uninterrupted run logged after it
    (nothing at the resume step itself) and ends with the same history."""
    keys = ("grok/weight_norm", "grok/norm_descent_rate", "grok/effective_tangent_fraction")

    def run(ckpt_path=None):
        monitor = NormDescentMonitor(window=4)
        callbacks = [monitor]
        if ckpt_path is None:
            callbacks.append(
                ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=7, save_top_k=-1)
            )
        trainer = tiny_trainer(
            callbacks, max_steps=30, log_every_n_steps=5, limit_val_batches=0, enable_checkpointing=ckpt_path is None
        )
        trainer.fit(LinearToyModule(), ToyDataModule(steps_per_epoch=30), ckpt_path=ckpt_path)
        return monitor, {key: logged_by_step(trainer, key) for key in keys}

    full, full_logged = run()
    resumed, resumed_logged = run(tmp_path / "ckpt" / f"step={resume_step}.ckpt")
    for key in keys:
        expected = {step: value for step, value in full_logged[key].items() if step > resume_step}
        assert sorted(resumed_logged[key]) == sorted(expected), key
        for step, value in expected.items():
            assert resumed_logged[key][step] == pytest.approx(value, rel=1e-6), (key, step)
    assert resumed.state_dict() == full.state_dict()


def test_norm_descent_monitor_tensorboard_layout(tiny_trainer, tmp_path):
    """With TensorBoard, a custom-scalars chart puts the measured and unconstrained rates together."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(tmp_path, name="tb")
    tiny_trainer([NormDescentMonitor()], max_steps=3, logger=logger, limit_val_batches=0).fit(
        LinearToyModule(), ToyDataModule(steps_per_epoch=3)
    )
    layouts = []
    for path in sorted(Path(logger.log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    layout = layout_pb2.Layout()
                    layout.ParseFromString(value.tensor.string_val[0])
                    layouts.append(layout)
    (layout,) = layouts
    (chart,) = layout.category[0].chart
    tags = list(chart.multiline.tag)
    assert "grok/norm_descent_rate$" in tags and "grok/decay_rate_unconstrained$" in tags


def test_norm_descent_monitor_sharded_norms_are_reduced():
    """Under a sharding strategy each rank's sums are all-reduced; replicated parameters are not."""

    class StrategyStub:
        root_device = torch.device("cpu")

        def reduce(self, tensor, reduce_op):
            assert reduce_op == "sum"
            return tensor * 2  # the other rank holds a shard with the same squares

    class FSDPStrategyStub(StrategyStub):
        pass

    class DDPStrategyStub(StrategyStub):  # not derived from FSDP: a subclass of it shards too
        pass

    groups = [[torch.tensor([3.0, 4.0])], [torch.tensor([1.0]), torch.tensor([2.0])]]
    sharded = types.SimpleNamespace(world_size=2, strategy=FSDPStrategyStub())
    replicated = types.SimpleNamespace(world_size=2, strategy=DDPStrategyStub())
    assert squared_norms(groups, sharded).tolist() == [50.0, 10.0]
    assert squared_norms(groups, replicated).tolist() == [25.0, 5.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"log_param_groups": "yes"}, "log_param_groups"),
    ],
)
def test_norm_descent_monitor_bad_arguments(kwargs, match):
    """Bad arguments raise a ValueError naming the argument and the value."""
    with pytest.raises(ValueError, match=f"Expected argument `{match}` to be"):
        NormDescentMonitor(**kwargs)


def test_norm_descent_monitor_needs_an_optimizer(tiny_trainer):
    """A module without optimizer is rejected when fitting starts."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class NoOptimizer(LinearToyModule):
        def configure_optimizers(self):
            return None

    with pytest.raises(MisconfigurationException, match="needs an optimizer"):
        tiny_trainer([NormDescentMonitor()], max_steps=2, csv_logger=False, limit_val_batches=0).fit(
            NoOptimizer(), ToyDataModule()
        )
