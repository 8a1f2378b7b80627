import itertools

import pytest
import torch

from grok_lightning.reference import ModularArithmeticDataModule, PredictedDynamicsModule
from grok_lightning.reference.predicted_dynamics import eq20_flow, reduced_cost


def _small_problem(activation: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dm = ModularArithmeticDataModule(
        p=5, pairs="unordered", train_fraction=0.7, encoding="one_hot_sum", target="one_hot", seed=seed
    )
    x, y = dm.train_inputs.double(), dm.train_targets.double()  # (10, 5), (10, 5)
    e = torch.randn(5, 24, generator=g, dtype=torch.float64) * 0.5
    return e, x, y


@pytest.mark.parametrize("activation", ["relu", "quadratic"])
def test_predicted_dynamics_flow_is_minus_half_gradient_of_reduced_cost(activation):
    """dE/ds of Eq. 20 equals −½ ∇_E (‖E‖² + tr(Yᵀ(HHᵀ)⁻¹Y)), by central finite differences in float64."""
    e, x, y = _small_problem(activation)
    flow, _, cost = eq20_flow(e, x, y, activation)
    eps = 1e-6
    gradient = torch.zeros_like(e)
    for i in range(e.shape[0]):
        for j in range(e.shape[1]):
            step = torch.zeros_like(e)
            step[i, j] = eps
            up, down = reduced_cost(e + step, x, y, activation), reduced_cost(e - step, x, y, activation)
            gradient[i, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(flow, -0.5 * gradient, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cost, reduced_cost(e, x, y, activation))


def test_predicted_dynamics_readout_is_minimum_norm_interpolant():
    """W₂ interpolates the training targets and equals the pseudo-inverse solution pinv(H) Y."""
    e, x, y = _small_problem("relu")
    _, readout, cost = eq20_flow(e, x, y)
    h = torch.relu(x @ e)
    torch.testing.assert_close(h @ readout, y, atol=1e-9, rtol=0)
    torch.testing.assert_close(readout, torch.linalg.pinv(h) @ y, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(cost, e.square().sum() + readout.square().sum())  # tr(YᵀAY) = ‖W₂‖²


def test_predicted_dynamics_short_run_keeps_zero_loss_and_descends(tiny_trainer, logged_by_step):
    """A short Lightning run: training accuracy 1.0 at every step, R/λ non-increasing, E moved by Euler steps."""
    torch.manual_seed(0)
    dm = ModularArithmeticDataModule(
        p=7, pairs="unordered", train_fraction=0.7, encoding="one_hot_sum", target="one_hot", steps_per_epoch=40
    )
    model = PredictedDynamicsModule(p=7, width=48, step_size=1e-2)
    start = model.embedding.detach().clone()
    trainer = tiny_trainer(max_steps=40)
    trainer.fit(model, dm)

    accuracy = logged_by_step(trainer, "train/acc")
    cost = logged_by_step(trainer, "grok/eq20/reduced_cost")
    norm = logged_by_step(trainer, "grok/eq20/weight_norm_sq")
    assert len(accuracy) == len(cost) == 40
    assert set(accuracy.values()) == {1.0}
    costs = [cost[s] for s in sorted(cost)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(costs))
    assert costs[-1] < costs[0]
    assert trainer.global_step == 40

    # The logged values describe E at the start of each step: replay the Euler steps by hand.
    e = start
    x, y = dm.train_inputs.double(), dm.train_targets.double()
    first = min(cost)
    for _ in range(first):
        e = e + 1e-2 * eq20_flow(e, x, y)[0]
    assert cost[first] == pytest.approx(float(reduced_cost(e, x, y)), rel=1e-9)
    assert norm[first] == pytest.approx(float(e.square().sum()), rel=1e-9)
    e = start
    for _ in range(40):
        e = e + 1e-2 * eq20_flow(e, x, y)[0]
    torch.testing.assert_close(model.embedding.detach(), e, rtol=1e-10, atol=1e-12)
    assert model.embedding.grad is None


def test_predicted_dynamics_validation_accuracy_matches_hand_readout(tiny_trainer):
    """val/acc is the argmax accuracy of σ(X_val E) pinv(H) Y on the held-out rows."""
    torch.manual_seed(1)
    dm = ModularArithmeticDataModule(p=7, pairs="unordered", train_fraction=0.7, encoding="one_hot_sum", target="class")
    model = PredictedDynamicsModule(p=7, width=48)
    (metrics,) = tiny_trainer(csv_logger=False).validate(model, dm, verbose=False)
    e = model.embedding.detach()
    h = torch.relu(dm.train_inputs.double() @ e)
    w2 = torch.linalg.pinv(h) @ torch.nn.functional.one_hot(dm.train_targets, 7).double()
    expected = ((torch.relu(dm.val_inputs.double() @ e) @ w2).argmax(1) == dm.val_targets).double().mean()
    assert metrics["val/acc"] == pytest.approx(float(expected))


def test_predicted_dynamics_init_readings():
    """'std' draws E with standard deviation p^(−1/2), 'variance' with variance p^(−1/2)."""
    torch.manual_seed(0)
    std = PredictedDynamicsModule(p=37, width=512, init="std").embedding.detach().std().item()
    torch.manual_seed(0)
    var = PredictedDynamicsModule(p=37, width=512, init="variance").embedding.detach().var().item()
    assert std == pytest.approx(37**-0.5, rel=0.02)
    assert var == pytest.approx(37**-0.5, rel=0.02)


def test_predicted_dynamics_singular_gram_raises():
    """A Gram matrix H Hᵀ that is singular (two identical training rows) stops with a clear error."""
    e, x, y = _small_problem("relu")
    x = torch.cat([x, x[:1]])
    y = torch.cat([y, y[:1]])
    with pytest.raises(RuntimeError, match="singular"):
        eq20_flow(e, x, y)


def test_predicted_dynamics_rejects_minibatches_and_narrow_width():
    """A batch smaller than the training set, or a width below it, is refused naming the problem."""
    dm = ModularArithmeticDataModule(p=7, pairs="unordered", train_fraction=0.7, encoding="one_hot_sum")
    with pytest.raises(ValueError, match="Expected argument `width`"):
        PredictedDynamicsModule(p=7, width=10).set_training_set(dm.train_inputs, dm.train_targets)
    model = PredictedDynamicsModule(p=7, width=48)
    model.set_training_set(dm.train_inputs, dm.train_targets)
    with pytest.raises(ValueError, match="full training batch"):
        model.training_step((dm.train_inputs[:5], dm.train_targets[:5]), 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1}, "p"),
        ({"width": 1.5}, "width"),
        ({"activation": "gelu"}, "activation"),
        ({"step_size": 0.0}, "step_size"),
        ({"init": "xavier"}, "init"),
    ],
)
def test_predicted_dynamics_bad_arguments(kwargs, match):
    """Bad arguments raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        PredictedDynamicsModule(**kwargs)
