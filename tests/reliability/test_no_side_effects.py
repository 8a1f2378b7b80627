"""A callback never changes training (design notes §5): every registered callback, alone and all together.

Two checks per run. Between the callbacks stand state witnesses (:class:`~reliability.harness.Witnesses`): at every
hook a callback overrides, weights, gradients, buffers, train/eval modes, optimizer state and the torch, Python and
NumPy random states must be the same after the callback's hook as before it. And the run as a whole is compared
with one without callbacks: final weights, buffers, gradients and optimizer state, the random states at the start of
every step and the logged ``train/loss`` are bit for bit the same.
"""

from __future__ import annotations

import pickle
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grok_lightning import ModularArithmeticDataModule
from reliability.harness import (
    PRESETS,
    TINY_DATA,
    RecordingLogger,
    Witnesses,
    capture,
    differences,
    disabled,
    preset,
)
from reliability.registry import CALLBACKS, Setting, callbacks_for, specs_for

TRAIN_LOSS = "train/loss"


class RandomStates(Callback):
    """The global torch, Python and NumPy random states at the start of every training step."""

    def __init__(self) -> None:
        self.states: list[tuple[torch.Tensor, object, bytes]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append((torch.get_rng_state(), random.getstate(), pickle.dumps(np.random.get_state())))


def fit(module, data, callbacks, options, steps, loggers=(), log_every_n_steps=10):
    """Train with ``callbacks`` between witnesses; return what the comparisons need."""
    witnesses, states, recorder = Witnesses(list(callbacks)), RandomStates(), RecordingLogger()
    trainer = pl.Trainer(
        **options(max_steps=steps, log_every_n_steps=log_every_n_steps, logger=[recorder, *loggers]),
        callbacks=[states, *witnesses.interleaved],
    )
    trainer.fit(module, data)
    return {
        "final": capture(trainer, module),
        "random_states": states.states,
        "train_loss": [(step, value) for step, key, value in recorder.entries if key == TRAIN_LOSS],
        "logged": {key for _, key, _ in recorder.entries},
        "witnesses": witnesses,
    }


def assert_unchanged(plain, watched, callbacks, specs):
    """The watched run trained exactly as the plain one, no hook changed anything, and every callback measured."""
    assert not disabled(callbacks)
    assert watched["witnesses"].changes == []
    assert watched["witnesses"].observed.get("on_train_batch_end", 0) > 0  # the witnesses did look
    assert differences(plain["final"], watched["final"]) == []
    assert len(plain["random_states"]) == len(watched["random_states"]) > 0
    for i, (a, b) in enumerate(zip(plain["random_states"], watched["random_states"], strict=True)):
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:], f"random state differs at the start of step {i}"
    assert plain["train_loss"] and watched["train_loss"] == plain["train_loss"]
    for spec in specs:
        missing = set(spec.keys) - watched["logged"]
        assert not missing, f"{spec.name} never logged {sorted(missing)}"


@pytest.mark.parametrize("name", PRESETS)
def test_presets_train_bit_for_bit_alike_with_every_callback(name, trainer_options, tmp_path):
    """Each reference preset (shortened, and shrunk where a measurement would take seconds) with every callback that
    can watch it: weights, optimizer state, random states and logged train/loss as without callbacks."""
    steps = 200

    def run(watch):
        module, data = preset(name)
        setting = Setting(
            every_n_steps=40,
            squared_error=module.hparams.loss == "mse",
            overrides={
                "TangentGradientMonitor": {"only_when_memorized": False},  # measure before memorization too
                "FourierEmbeddingMonitor": {"figure_every_n_steps": steps},  # draws at steps 0 and 200
            },
        )
        callbacks = callbacks_for(module, setting) if watch else []
        loggers = [TensorBoardLogger(tmp_path, name=name)] if watch else []
        return fit(module, data, callbacks, trainer_options, steps, loggers), callbacks, specs_for(module)

    (plain, _, _), (watched, callbacks, specs) = run(False), run(True)
    assert len(callbacks) >= 4  # the detector, the norm, tangent and Fourier monitors watch every preset
    assert_unchanged(plain, watched, callbacks, specs)


class NoisyModule(pl.LightningModule):
    """Dropout, BatchNorm, two param groups, SGD with momentum: what a careless callback could disturb."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.first = nn.Linear(p, 32)
        self.norm = nn.BatchNorm1d(32)
        self.dropout = nn.Dropout(0.3)
        self.second = nn.Linear(32, p)

    def forward(self, x):
        return self.second(self.dropout(torch.relu(self.norm(self.first(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self(x) - y).pow(2).sum(dim=1).mean()
        self.log(TRAIN_LOSS, loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(dim=1) == y.argmax(dim=1)).float().mean())

    def configure_optimizers(self):
        groups = [
            {"params": [*self.first.parameters(), *self.norm.parameters()], "lr": 0.1, "weight_decay": 1e-3},
            {"params": self.second.parameters(), "lr": 0.05, "weight_decay": 1e-2, "name": "head"},
        ]
        return torch.optim.SGD(groups, momentum=0.9)


class ShuffledData(pl.LightningDataModule):
    """The tiny task through torch DataLoaders, shuffled (a draw from the global torch RNG each epoch), in
    minibatches, without ``train_inputs``: the callbacks must read the training set through the loader."""

    def __init__(self) -> None:
        super().__init__()
        task = ModularArithmeticDataModule(**TINY_DATA)
        self.train_set = TensorDataset(task.train_inputs, task.train_targets)
        self.val_set = TensorDataset(task.val_inputs, task.val_targets)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=8)


NOISY_SETTING = Setting(
    every_n_steps=3,
    embedding=lambda module: module.first.weight.T,  # one row per residue: the inputs are e_a + e_b
    overrides={"TangentGradientMonitor": {"only_when_memorized": False}},
)


def noisy_run(specs, options, steps=24):
    pl.seed_everything(0, verbose=False)
    module = NoisyModule(TINY_DATA["p"])
    callbacks = [spec.make(NOISY_SETTING) for spec in specs]
    return fit(module, ShuffledData(), callbacks, options, steps, log_every_n_steps=2), callbacks


@pytest.fixture(scope="module")
def noisy_plain():
    """The noisy model trained without callbacks (shared by the tests of this module)."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "deterministic": True,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    return noisy_run([], lambda **kwargs: {**options, **kwargs})[0]


def test_dropout_batchnorm_model_each_callback_alone(spec, noisy_plain, trainer_options):
    """Dropout, BatchNorm and a shuffling loader, one callback: no BatchNorm update, no random draw, no .grad, modes
    restored, bit-identical training. A callback that cannot watch this model refuses it when fitting starts."""
    if not spec.applies(NoisyModule(TINY_DATA["p"])):
        with pytest.raises(MisconfigurationException):
            noisy_run([spec], trainer_options)
        return
    watched, callbacks = noisy_run([spec], trainer_options)
    assert_unchanged(noisy_plain, watched, callbacks, [spec])


def test_dropout_batchnorm_model_all_callbacks_together(noisy_plain, trainer_options):
    """All callbacks that can watch the noisy model at once (the tangent monitor and the detector interact)."""
    specs = [spec for spec in CALLBACKS if spec.applies(NoisyModule(TINY_DATA["p"]))]
    assert len(specs) >= 4
    watched, callbacks = noisy_run(specs, trainer_options)
    assert_unchanged(noisy_plain, watched, callbacks, specs)
