import json
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

from grok_lightning import ZeroLossDetector, find_zero_loss_detector
from grok_lightning.reference import LinearToyModule, ToyDataModule

X = torch.tensor([1.0, 1.0], dtype=torch.float64)


def toy_losses(trajectory):
    return ((trajectory @ X - 2.0) ** 2).tolist()


def expected_event(values, ok, every_n_steps, patience):
    """First step of the first run of `patience` consecutive qualifying checks (checks at multiples of n)."""
    streak, start = 0, None
    for step in range(0, len(values), every_n_steps):
        if ok(values[step]):
            streak += 1
            start = step if streak == 1 else start
            if streak >= patience:
                return start
        else:
            streak = 0
    return None


def classification_data(one_hot=False, n=30):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, 4, generator=generator)
    labels = (inputs @ torch.randn(4, 3, generator=generator)).argmax(dim=1)
    targets = F.one_hot(labels, 3).float() if one_hot else labels
    return inputs, targets


class Classifier(pl.LightningModule):
    """No per_sample_loss: the detector falls back to its default losses."""

    def __init__(self, one_hot=False, dropout=0.0, batchnorm=False):
        super().__init__()
        self.one_hot = one_hot
        self.net = nn.Sequential(
            nn.Linear(4, 16),
            nn.BatchNorm1d(16) if batchnorm else nn.Identity(),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(16, 3),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return F.mse_loss(out, y, reduction="sum") / len(y) if self.one_hot else F.cross_entropy(out, y)

    def configure_optimizers(self):
        lr = 0.05 if self.one_hot else 0.3
        return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)


def test_zero_loss_detector_toy_memorizes_at_the_analytic_step(tiny_trainer, toy_trajectory, logged_by_step):
    """On '1+1=2' from (−1, 1) the logged full training loss and the memorization step match the closed form."""
    detector = ZeroLossDetector(every_n_steps=1, loss_threshold=0.01)
    trainer = tiny_trainer([detector], max_steps=40, limit_val_batches=0)
    trainer.fit(LinearToyModule(start=(-1.0, 1.0), lr=0.1, weight_decay=0.1), ToyDataModule(steps_per_epoch=40))

    losses = toy_losses(toy_trajectory((-1.0, 1.0), lr=0.1, wd=0.1, steps=40))
    logged = logged_by_step(trainer, "grok/train_loss_full")
    assert sorted(logged) == list(range(41))
    for step, value in logged.items():
        assert value == pytest.approx(losses[step], rel=1e-5, abs=1e-7)
    expected = expected_event(losses, lambda v: v <= 0.01, 1, 1)
    assert expected is not None and expected < 30  # memorized within tens of steps
    assert detector.memorized_step == expected and detector.memorized
    assert logged_by_step(trainer, "grok/memorized")[expected] == 1.0
    assert logged_by_step(trainer, "grok/memorized")[expected - 1] == 0.0
    assert "grok/train_acc_full" not in trainer.callback_metrics  # regression: no accuracy


@pytest.mark.parametrize(
    ("every_n_steps", "loss_threshold", "patience"),
    [(1, 0.05, 1), (1, 0.05, 4), (3, 0.02, 1), (2, 0.003, 3), (5, 1e-9, 1)],
)
def test_zero_loss_detector_thresholds_and_patience(
    tiny_trainer, toy_trajectory, every_n_steps, loss_threshold, patience
):
    """The memorization step follows the threshold, the check cadence and the patience."""
    detector = ZeroLossDetector(every_n_steps=every_n_steps, loss_threshold=loss_threshold, patience=patience)
    trainer = tiny_trainer([detector], max_steps=30, limit_val_batches=0, csv_logger=False)
    trainer.fit(LinearToyModule(lr=0.1, weight_decay=0.1), ToyDataModule(steps_per_epoch=30))
    losses = toy_losses(toy_trajectory((-1.0, 1.0), lr=0.1, wd=0.1, steps=30))
    assert detector.memorized_step == expected_event(losses, lambda v: v <= loss_threshold, every_n_steps, patience)


@pytest.mark.parametrize("one_hot", [False, True])
def test_zero_loss_detector_default_loss_and_accuracy(tiny_trainer, one_hot):
    """Without a module loss: cross-entropy (class targets) or summed squared error (one-hot), plus accuracy."""
    inputs, targets = classification_data(one_hot)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=8, shuffle=True)
    torch.manual_seed(0)
    model = Classifier(one_hot=one_hot)
    detector = ZeroLossDetector(every_n_steps=5)
    tiny_trainer([detector], max_steps=20, csv_logger=False).fit(model, loader)

    with torch.no_grad():
        outputs = model.eval()(inputs)
    if one_hot:
        expected_loss = ((outputs - targets) ** 2).sum(dim=1).double().mean()
        labels = targets.argmax(dim=1)
    else:
        expected_loss = F.cross_entropy(outputs, targets, reduction="none").double().mean()
        labels = targets
    expected_acc = (outputs.argmax(dim=1) == labels).double().mean()
    assert detector.train_loss == pytest.approx(float(expected_loss), rel=1e-6)
    assert detector.train_acc == pytest.approx(float(expected_acc))
    assert detector.train_acc > 0.0  # a real classification problem


def test_zero_loss_detector_generalization_and_grok_delay(tiny_trainer, toy_trajectory, logged_by_step):
    """Generalization is read from the validation metric once per validation run; the delay is their gap."""
    detector = ZeroLossDetector(every_n_steps=1, loss_threshold=0.05, monitor="val/acc", val_threshold=1.0)
    trainer = tiny_trainer([detector], max_steps=70)
    trainer.fit(LinearToyModule(lr=0.1, weight_decay=0.4, tolerance=0.25), ToyDataModule())

    trajectory = toy_trajectory((-1.0, 1.0), lr=0.1, wd=0.4, steps=70)
    val_ok = [bool(((w - 1.0).abs() < 0.25).all()) for w in trajectory]
    # The check at step s sees the validation run after step s − 1.
    generalized = 1 + val_ok.index(True, 1)
    memorized = expected_event(toy_losses(trajectory), lambda v: v <= 0.05, 1, 1)
    assert memorized < generalized - 20  # the toy groks: a real delay
    assert (detector.memorized_step, detector.generalized_step) == (memorized, generalized)
    assert detector.grok_delay == generalized - memorized
    assert logged_by_step(trainer, "grok/grok_delay") == dict.fromkeys(range(generalized, 71), generalized - memorized)
    assert logged_by_step(trainer, "grok/generalized")[generalized - 1] == 0.0
    assert trainer.callback_metrics["grok/generalized_step"] == generalized


def test_zero_loss_detector_early_stopping_stops_at_grokking(tiny_trainer):
    """EarlyStopping on grok/generalized ends the run right after generalization, not before."""
    detector = ZeroLossDetector(every_n_steps=1, monitor="val/acc", val_threshold=1.0)
    stop = EarlyStopping(monitor="grok/generalized", mode="max", stopping_threshold=0.5, patience=10**9)
    trainer = tiny_trainer([detector, stop], max_steps=200, csv_logger=False)
    trainer.fit(LinearToyModule(lr=0.1, weight_decay=0.4), ToyDataModule())
    assert detector.generalized_step is not None
    assert trainer.global_step == detector.generalized_step < 200
    assert stop.stopped_epoch > 0


def test_zero_loss_detector_early_stopping_threshold_is_strict(tiny_trainer):
    """Lightning compares stopping_threshold strictly: 1.0 never stops on a 0/1 flag (hence 0.5 in the docs)."""
    detector = ZeroLossDetector(every_n_steps=1, monitor="val/acc", val_threshold=1.0)
    stop = EarlyStopping(monitor="grok/generalized", mode="max", stopping_threshold=1.0, patience=10**9)
    trainer = tiny_trainer([detector, stop], max_steps=70, csv_logger=False)
    trainer.fit(LinearToyModule(lr=0.1, weight_decay=0.4), ToyDataModule())
    assert detector.generalized and trainer.global_step == 70


def test_zero_loss_detector_missing_monitor_warns_once(tiny_trainer):
    """A monitor key that never appears gets one warning listing the keys that exist."""
    detector = ZeroLossDetector(every_n_steps=1, monitor="val/accuracy")
    with pytest.warns(RuntimeWarning, match=r"val/accuracy.*val/acc") as record:
        tiny_trainer([detector], max_steps=5, csv_logger=False).fit(LinearToyModule(), ToyDataModule())
    assert sum("val/accuracy" in str(w.message) for w in record) == 1
    assert not detector.generalized


def test_zero_loss_detector_never_changes_training(tiny_trainer):
    """Training with and without the detector gives bit-identical weights, buffers and gradients."""

    class ModeProbe(Callback):
        def __init__(self):
            self.changed = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.modes = [m.training for m in pl_module.modules()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.changed |= self.modes != [m.training for m in pl_module.modules()]

    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        inputs, targets = classification_data()
        loader = DataLoader(TensorDataset(inputs, targets), batch_size=8, shuffle=True)
        model = Classifier(dropout=0.3, batchnorm=True)
        tiny_trainer(callbacks, max_steps=12, csv_logger=False).fit(model, loader)
        return model

    probe = ModeProbe()
    plain, watched = run([]), run([ZeroLossDetector(every_n_steps=1), probe])
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad))
    assert not probe.changed


def test_zero_loss_detector_resumes_from_checkpoint(tiny_trainer, tmp_path):
    """Events and streaks survive a checkpoint: a resumed run decides as the uninterrupted one."""
    arguments = {"every_n_steps": 2, "loss_threshold": 0.003, "patience": 3}
    full = ZeroLossDetector(**arguments)
    tiny_trainer([full], max_steps=30, limit_val_batches=0, csv_logger=False).fit(
        LinearToyModule(), ToyDataModule(steps_per_epoch=30)
    )

    first = ZeroLossDetector(**arguments)
    trainer = tiny_trainer([first], max_steps=14, limit_val_batches=0, csv_logger=False)
    trainer.fit(LinearToyModule(), ToyDataModule(steps_per_epoch=30))
    assert first._memorize_streak > 0 and not first.memorized  # interrupted inside the confirming streak
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    resumed = ZeroLossDetector(**arguments)
    tiny_trainer([resumed], max_steps=30, limit_val_batches=0, csv_logger=False).fit(
        LinearToyModule(), ToyDataModule(steps_per_epoch=30), ckpt_path=tmp_path / "mid.ckpt"
    )
    assert resumed.state_dict() == full.state_dict()
    assert resumed.memorized_step is not None


def test_zero_loss_detector_tensorboard_event_text(tiny_trainer, tmp_path):
    """Each event is written as a TensorBoard text entry at the check's step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    detector = ZeroLossDetector(every_n_steps=1, monitor="val/acc", val_threshold=1.0)
    tiny_trainer([detector], max_steps=60, logger=logger).fit(LinearToyModule(weight_decay=0.4), ToyDataModule())
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0}).Reload()
    texts = events.Tensors("grok/events/text_summary")
    assert [t.step for t in texts] == [detector.memorized_step, detector.generalized_step]
    assert b"memorized at step" in texts[0].tensor_proto.string_val[0]


def test_zero_loss_detector_find_helper(tiny_trainer):
    """find_zero_loss_detector returns the detector on a trainer, or None."""
    detector = ZeroLossDetector()
    assert find_zero_loss_detector(tiny_trainer([detector], csv_logger=False)) is detector
    assert find_zero_loss_detector(tiny_trainer([], csv_logger=False)) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.0}, "every_n_steps"),
        ({"acc_threshold": 1.5}, "acc_threshold"),
        ({"loss_threshold": -0.1}, "loss_threshold"),
        ({"acc_threshold": None, "loss_threshold": None}, "acc_threshold"),
        ({"patience": 0}, "patience"),
        ({"monitor": ""}, "monitor"),
        ({"val_threshold": "high"}, "val_threshold"),
        ({"unpack_batch": 3}, "unpack_batch"),
        ({"loss_fn": "mse"}, "loss_fn"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_zero_loss_detector_bad_arguments(kwargs, match):
    """Bad arguments raise a ValueError naming the argument and the value."""
    with pytest.raises(ValueError, match=f"Expected argument `{match}` to be"):
        ZeroLossDetector(**kwargs)


DDP_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset
from grok_lightning import ZeroLossDetector

out = sys.argv[1]
generator = torch.Generator().manual_seed(0)
inputs = torch.randn(7, 5, generator=generator)  # odd: the two shards differ in size
labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])

class Data(pl.LightningDataModule):
    train_inputs, train_targets = inputs, labels
    def train_dataloader(self):
        return DataLoader(TensorDataset(inputs, labels), batch_size=7)

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(5, 3)
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

class Dump(Callback):
    def on_train_end(self, trainer, pl_module):
        detector = trainer.callbacks[0]
        with torch.no_grad():
            outputs = pl_module(inputs)
        reference = {
            "loss": F.cross_entropy(outputs, labels).item(),
            "acc": (outputs.argmax(1) == labels).double().mean().item(),
        }
        record = {"loss": detector.train_loss, "acc": detector.train_acc, "state": detector.state_dict(),
                  "reference": reference}
        with open(f"{out}/{trainer.datamodule is not None}{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)

if __name__ == "__main__":
    for datamodule in (True, False):  # the DataModule's tensors, then the dataloader; one process group
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            callbacks=[ZeroLossDetector(every_n_steps=3, loss_threshold=None), Dump()],
        )
        if datamodule:
            trainer.fit(Model(), datamodule=Data())
        else:
            trainer.fit(Model(), Data().train_dataloader())
"""


@pytest.mark.distributed
def test_zero_loss_detector_ddp_reduction(tmp_path):
    """Under 2-process CPU DDP every rank gets the full-set loss and accuracy, and decides the same."""
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for source in ("True", "False"):  # from the DataModule's tensors, from the dataloader
        ranks = [json.loads((tmp_path / f"{source}{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["state"] == ranks[1]["state"]
        for record in ranks:
            assert record["loss"] == pytest.approx(record["reference"]["loss"], rel=1e-5)
            assert record["acc"] == pytest.approx(record["reference"]["acc"])
        assert ranks[0]["state"]["last_check_step"] == 6
