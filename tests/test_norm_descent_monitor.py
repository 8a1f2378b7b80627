import math
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
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
