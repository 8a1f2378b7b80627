"""The constraint operator: products against jacrev, no side effects, probes, validation."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from grok_lightning.geometry import ConstraintOperator, TangentProjector


class Noisy(nn.Module):
    """Dropout and BatchNorm: both must be inert under the operator."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def test_products_match_jacrev_in_eval_mode():
    """J·v and Jᵀ·u equal products with jacrev's Jacobian of the eval-mode network."""
    torch.manual_seed(0)
    net = Noisy().double()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(7, 4, dtype=torch.float64)
    op = ConstraintOperator(net, x)
    names = op.names
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())

    def f(*primals):
        return functional_call(
            net.eval(), {**params, **buffers, **dict(zip(names, primals, strict=True))}, (x,)
        ).reshape(-1)

    blocks = jacrev(f, argnums=tuple(range(len(names))))(*[params[n].detach() for n in names])
    jac = torch.cat([b.reshape(21, -1) for b in blocks], 1)
    net.train()
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(2, op.num_params, dtype=torch.float64, generator=generator)
    u = torch.randn(2, op.num_constraints, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(op.jvp(v), v @ jac.T)
    torch.testing.assert_close(op.vjp(u), u @ jac)
    torch.testing.assert_close(op.jvp(v[0]), jac @ v[0])
    torch.testing.assert_close(op.jacobian(chunk_size=4), jac)


def test_no_side_effects():
    """Modes, buffers, global RNG and .grad are exactly as before, and training is unaffected."""
    torch.manual_seed(1)
    net = Noisy()
    net.train()
    net.fc2.eval()  # mixed modes must come back as they were
    x = torch.randn(8, 4)
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    op = ConstraintOperator(net, x, probe_size=5, seed=3)
    projector = TangentProjector(op, "iterative", max_iter=5)
    projector.project(op.parameter_vector())
    TangentProjector(op, "dense").project(op.parameter_vector())
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training and net.bn.training and not net.fc2.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert all(p.grad is None for p in net.parameters())


def test_probe_subset_private_and_seeded():
    """probe_size draws a fixed subset from its own generator, never the global one."""
    x = torch.arange(20.0).reshape(10, 2)
    net = nn.Linear(2, 1)
    rng = torch.get_rng_state()
    a = ConstraintOperator(net, x, probe_size=4, seed=7)
    b = ConstraintOperator(net, x, probe_size=4, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a.sample_index, b.sample_index)
    assert a.num_constraints == 4 and a.num_samples == 4
    assert torch.equal(a.inputs[0], x[a.sample_index])
    assert ConstraintOperator(net, x, probe_size=50).sample_index is None


def test_losses_kind_one_constraint_per_sample():
    """kind='losses' has m = N and its tangent space contains that of kind='outputs'."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)

    def loss(out, target):
        return (out - target).pow(2).sum(-1)

    outputs = ConstraintOperator(net, x)
    losses = ConstraintOperator(net, x, kind="losses", targets=y, loss_fn=loss)
    assert (outputs.num_constraints, losses.num_constraints) == (8, 4)
    theta = outputs.parameter_vector()
    t_out = TangentProjector(outputs, "dense").project(theta).tangent
    t_loss = TangentProjector(losses, "dense").project(theta).tangent
    assert t_loss.norm() >= t_out.norm()
    # null(J_outputs) ⊂ null(J_losses): projecting an outputs-tangent vector changes nothing.
    torch.testing.assert_close(TangentProjector(losses, "dense").project(t_out).tangent, t_out)


def test_cache_follows_in_place_updates():
    """An in-place parameter update re-linearizes; value() tracks the new outputs."""
    net = nn.Linear(2, 2).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    op = ConstraintOperator(net, x)
    with torch.no_grad():
        net.weight.add_(1.0)
    torch.testing.assert_close(op.value(), net(x).detach().reshape(-1))


def test_flatten_roundtrip():
    net = nn.Linear(3, 2)
    op = ConstraintOperator(net, torch.randn(4, 3))
    theta = op.parameter_vector()
    assert theta.shape == (8,)
    for a, b in zip(op.unflatten(theta), net.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    torch.testing.assert_close(op.flatten(op.unflatten(theta)), theta)
    assert [s.stop - s.start for s in op.segments()] == [6, 2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "weights"}, "`kind`"),
        ({"kind": "losses"}, "`targets` and `loss_fn`"),
        ({"probe_size": 0}, "`probe_size`"),
        ({"params": [nn.Parameter(torch.ones(1))]}, "`params`"),
        ({"params": []}, "`params`"),
        ({"targets": torch.ones(5)}, "`targets`"),
    ],
)
def test_operator_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConstraintOperator(nn.Linear(2, 1), torch.ones(3, 2), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "svd"}, "`method`"),
        ({"tol": 0.0}, "`tol`"),
        ({"max_iter": 0}, "`max_iter`"),
        ({"damping": -1.0}, "`damping`"),
        ({"rank_rtol": 2.0}, "`rank_rtol`"),
    ],
)
def test_projector_rejects_bad_arguments(kwargs, match):
    op = ConstraintOperator(nn.Linear(2, 1), torch.ones(3, 2))
    with pytest.raises(ValueError, match=match):
        TangentProjector(op, **kwargs)
    with pytest.raises(ValueError, match="`vectors`"):
        TangentProjector(op).project(torch.ones(5))
    with pytest.raises(ValueError, match="`inputs`"):
        ConstraintOperator(nn.Linear(2, 1), torch.ones(0, 2))


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again (functorch would treat it as constant), with a jvp."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return tangent * (1 - y * y)


class OnceDifferentiable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(_OnceDifferentiableTanh.apply(self.fc1(x)))


def test_tangent_map_is_lazy():
    """Building the operator, Jᵀ·u and the dense projection never build the J·v map; the first J·v does."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    op = ConstraintOperator(net, torch.randn(4, 3, dtype=torch.float64))
    op.vjp(torch.ones(op.num_constraints, dtype=torch.float64))
    TangentProjector(op, "dense").project(op.parameter_vector())
    assert op._jvp_fn is None
    op.jvp(op.parameter_vector())
    assert op._jvp_fn is not None and not op._jvp_traced


def test_jvp_falls_back_to_linearize_without_double_backward():
    """A module whose backward cannot be differentiated again still gets J·v right, through linearize."""
    torch.manual_seed(0)
    net = OnceDifferentiable().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    op = ConstraintOperator(net, x)
    jac = op.jacobian()  # rows from Jᵀ·eᵢ: one backward only
    v = torch.randn(2, op.num_params, dtype=torch.float64)
    torch.testing.assert_close(op.jvp(v), v @ jac.T)
    assert op._jvp_traced
    reference = torch.func.jacrev(lambda w: functional_call(net, {"fc1.weight": w}, (x,)).reshape(-1))(
        net.fc1.weight.detach()
    )
    torch.testing.assert_close(jac[:, :15], reference.reshape(8, 15))
