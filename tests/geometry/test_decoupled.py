import pytest
import torch

from grok_lightning.geometry import SingularGramError, activation_and_slope, eq20_flow, reduced_cost
from grok_lightning.reference import ModularArithmeticDataModule, predicted_dynamics


def _small_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dm = ModularArithmeticDataModule(
        p=5, pairs="unordered", train_fraction=0.7, encoding="one_hot_sum", target="one_hot", seed=seed
    )
    e = torch.randn(5, 24, generator=g, dtype=torch.float64) * 0.5
    return e, dm.train_inputs.double(), dm.train_targets.double()  # (5, 24), (10, 5), (10, 5)


@pytest.mark.parametrize("activation", ["relu", "quadratic", "gelu"])
def test_decoupled_activation_and_slope_match_torch(activation):
    """σ matches the reference network's nonlinearity and σ′ its autograd derivative (away from ReLU's kink)."""
    z = torch.linspace(-3, 3, 60, dtype=torch.float64, requires_grad=True)  # 60 points: none at ReLU's kink 0
    reference = {"relu": torch.relu, "quadratic": lambda t: t * t, "gelu": torch.nn.functional.gelu}[activation]
    value, slope = activation_and_slope(z.detach(), activation)
    (derivative,) = torch.autograd.grad(reference(z).sum(), z)
    torch.testing.assert_close(value, reference(z).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slope, derivative, rtol=1e-12, atol=1e-12)


def test_decoupled_gelu_flow_is_minus_half_gradient_of_reduced_cost():
    """With GELU, dE/ds = −½ ∇_E R/λ too, by central finite differences in float64."""
    e, x, y = _small_problem()
    flow, _, _ = eq20_flow(e, x, y, "gelu")
    eps = 1e-6
    gradient = torch.zeros_like(e)
    for i in range(e.shape[0]):
        for j in range(e.shape[1]):
            step = torch.zeros_like(e)
            step[i, j] = eps
            gradient[i, j] = (reduced_cost(e + step, x, y, "gelu") - reduced_cost(e - step, x, y, "gelu")) / (2 * eps)
    torch.testing.assert_close(flow, -0.5 * gradient, rtol=1e-6, atol=1e-6)


def test_decoupled_errors_and_reexports():
    """Unknown activations are refused by name; a singular Gram matrix raises SingularGramError; old imports work."""
    e, x, y = _small_problem()
    with pytest.raises(ValueError, match="Expected argument `activation` to be one of"):
        eq20_flow(e, x, y, "tanh")
    with pytest.raises(SingularGramError, match="singular"):
        eq20_flow(e, torch.cat([x, x[:1]]), torch.cat([y, y[:1]]))
    assert issubclass(SingularGramError, RuntimeError)
    assert predicted_dynamics.eq20_flow is eq20_flow and predicted_dynamics.reduced_cost is reduced_cost
