import pytest
import torch

from grok_lightning.reference import LinearToyModule, ToyDataModule


def test_toys_follow_hand_computed_gradient_descent(tiny_trainer, toy_trajectory):
    """The toy module's SGD steps equal gradient descent on (w·x − y)² + (wd/2)‖w‖² done by hand."""
    model = LinearToyModule(start=(-1.0, 1.0), lr=0.1, weight_decay=0.2)
    tiny_trainer(max_steps=30, csv_logger=False, limit_val_batches=0).fit(model, ToyDataModule(steps_per_epoch=30))
    expected = toy_trajectory((-1.0, 1.0), lr=0.1, wd=0.2, steps=30)[-1]
    torch.testing.assert_close(model.weight.detach().double(), expected, atol=1e-5, rtol=0)


def test_toys_three_weights_end_at_equal_weights(tiny_trainer):
    """'1+1+1=3' is the same classes with three weights; weight decay drives them to equal values."""
    model = LinearToyModule(start=(0.5, -1.0, 2.0), lr=0.1, weight_decay=0.4)
    dm = ToyDataModule(inputs=[[1.0, 1.0, 1.0]], targets=[3.0], steps_per_epoch=200)
    tiny_trainer(max_steps=200, csv_logger=False, limit_val_batches=0).fit(model, dm)
    w = model.weight.detach()
    assert (w - w.mean()).abs().max() < 1e-3
    assert w.sum() == pytest.approx(3.0 * 6 / (6 + 0.4), rel=1e-4)  # w·x at the decay-shifted fixed point


def test_toys_datamodule_defaults():
    """The default task is (1, 1) → 2, validated on each summand alone."""
    dm = ToyDataModule()
    assert dm.train_inputs.tolist() == [[1.0, 1.0]] and dm.train_targets.tolist() == [2.0]
    assert dm.val_inputs.tolist() == [[1.0, 0.0], [0.0, 1.0]] and dm.val_targets.tolist() == [1.0, 1.0]
    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == (1, 2) and targets.shape == (1,)


def test_toys_validation_accuracy_uses_tolerance(tiny_trainer):
    """val/acc counts validation predictions within `tolerance` of their targets."""
    model = LinearToyModule(start=(0.9, 1.3), tolerance=0.25)
    trainer = tiny_trainer(csv_logger=False)
    (metrics,) = trainer.validate(model, ToyDataModule(), verbose=False)
    assert metrics["val/acc"] == pytest.approx(0.5)
    assert metrics["val/loss"] == pytest.approx((0.1**2 + 0.3**2) / 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": ()}, "start"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"tolerance": 0.0}, "tolerance"),
    ],
)
def test_toys_module_bad_arguments(kwargs, match):
    """Bad module arguments raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        LinearToyModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inputs": [1.0, 1.0]}, "inputs"),
        ({"targets": [2.0, 3.0]}, "targets"),
        ({"val_inputs": [[1.0, 0.0, 0.0]]}, "val_inputs"),
        ({"val_targets": [1.0]}, "val_targets"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
    ],
)
def test_toys_datamodule_bad_arguments(kwargs, match):
    """Bad data module arguments raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        ToyDataModule(**kwargs)
