"""Training setups beyond full-batch SGD: every callback at once, each value against a reference computed here.

One small two-layer regression network (5 → 8 → 3, tanh, squared error on one-hot targets, 8 samples) trains for 4
optimizer steps under each setup with the ZeroLossDetector, NormDescentMonitor, TangentGradientMonitor and
FourierEmbeddingMonitor attached. At the end the values in ``trainer.callback_metrics`` (no logger: item 5(d) too)
are compared with references computed from the final weights by hand: the full-set loss and accuracy, ‖θ‖ and the
unconstrained decay rate over the trained parameters with the lr each group has by then, the measured descent rate
from recorded weights, the tangent fraction and predicted rate from an SVD of J, and the Fourier power share from
numpy's FFT. The Eq20AlignmentMonitor reads only bias-free networks; its variants are at the end.
"""

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from grok_lightning import (
    Eq20AlignmentMonitor,
    FourierEmbeddingMonitor,
    GrokkingModule,
    ModularArithmeticDataModule,
    NormDescentMonitor,
    TangentGradientMonitor,
    ZeroLossDetector,
)

N, STEPS = 8, 4
generator = torch.Generator().manual_seed(0)
X = torch.randn(N, 5, generator=generator)
Y = nn.functional.one_hot(torch.arange(N) % 3, 3).float()


class Net(pl.LightningModule):
    """5 → 8 → 3 with tanh; the variant switches manual optimization, a frozen read-out, groups or a scheduler."""

    def __init__(self, variant: str = "full_batch"):
        super().__init__()
        self.variant = variant
        self.first = nn.Linear(5, 8)
        self.second = nn.Linear(8, 3)
        if variant == "frozen_submodule":
            self.second.requires_grad_(False)  # the optimizer below still lists it
        self.automatic_optimization = variant != "manual_optimization"

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))

    def per_sample_loss(self, outputs, targets):
        return (outputs - targets).pow(2).sum(dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.per_sample_loss(self(x), y).mean()
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def configure_optimizers(self):
        if self.variant == "param_groups":
            groups = [
                {"params": self.first.parameters(), "lr": 0.1, "weight_decay": 0.01},
                {"params": self.second.parameters(), "lr": 0.05, "weight_decay": 0.1, "name": "head"},
            ]
            return torch.optim.SGD(groups, momentum=0.5)
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=0.01)
        if self.variant != "lr_scheduler":
            return optimizer
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def decay_per_step(variant):
    """(lr·wd/(1 − momentum) of the first layer, of the read-out) when the last step is measured, by hand."""
    if variant == "param_groups":
        return 0.1 * 0.01 / 0.5, 0.05 * 0.1 / 0.5
    if variant == "lr_scheduler":
        lr = 0.1 * 0.8**STEPS  # the per-step scheduler has already set the next step's lr
        return lr * 0.01, lr * 0.01
    if variant == "frozen_submodule":
        return 0.1 * 0.01, 0.0  # the frozen read-out is neither stepped nor decayed
    return 0.1 * 0.01, 0.1 * 0.01


def weight_decays(variant):
    return (0.01, 0.1) if variant == "param_groups" else (0.01, 0.01)


# name: (trainer options, loader options)
VARIANTS = {
    "full_batch": ({}, {}),
    "minibatch": ({}, {"batch_size": 2, "shuffle": True}),
    "accumulate_grad_batches": ({"accumulate_grad_batches": 2}, {"batch_size": 4}),
    "limit_train_batches": ({"limit_train_batches": 1}, {"batch_size": 4}),  # trains on the first 4 samples only
    "param_groups": ({}, {}),
    "lr_scheduler": ({}, {}),
    "bf16_mixed": ({"precision": "bf16-mixed"}, {}),
    "manual_optimization": ({}, {}),
    "frozen_submodule": ({}, {}),
    "torch_compile": ({}, {}),
}


class WeightRecorder(Callback):
    """The trained parameters (first layer, then read-out), flattened, at each optimizer step."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = [p.detach().double().clone() for p in pl_module.parameters()]


def tangent_projector(model, trained):
    """P_T over the trained parameters: an SVD of J = ∂F/∂θ on all N samples, float64, without the package."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    double = Net().double()

    def outputs(trained_params):
        return functional_call(double, {**params, **trained_params}, (X.double(),)).reshape(-1)

    jac = jacrev(outputs)({k: params[k] for k in trained})
    jacobian = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in trained], dim=1)
    _, s, vh = torch.linalg.svd(jacobian, full_matrices=False)
    basis = vh[s > s[0] * max(jacobian.shape) * torch.finfo(torch.float32).eps].T
    return torch.eye(jacobian.shape[1], dtype=torch.float64) - basis @ basis.T


def run_variant(variant, trainer_options, loader_options):
    pl.seed_everything(0, verbose=False)
    model = Net(variant)
    recorder = WeightRecorder()
    callbacks = [
        ZeroLossDetector(every_n_steps=1),
        NormDescentMonitor(every_n_steps=1, window=2),
        TangentGradientMonitor(every_n_steps=2, time_budget=None, only_when_memorized=False, method="dense"),
        FourierEmbeddingMonitor(every_n_steps=2, top_k=1, embedding=lambda module: module.first.weight.T),
        recorder,
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **trainer_options,
    )
    loader = DataLoader(TensorDataset(X, Y), **{"batch_size": N, **loader_options})
    fitted = torch.compile(model, backend="aot_eager") if variant == "torch_compile" else model
    try:
        trainer.fit(fitted, loader)
    finally:
        if variant == "torch_compile":
            torch._dynamo.reset()
    return trainer, model, recorder


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_variant_values_match_references(variant):
    """Each setup trains 4 optimizer steps and every callback's final values equal references from the weights."""
    trainer_options, loader_options = VARIANTS[variant]
    trainer, model, recorder = run_variant(variant, trainer_options, loader_options)
    assert trainer.global_step == STEPS
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("grok/")}
    reference = Net()
    reference.load_state_dict(model.state_dict())  # uncompiled, plain float32

    # ZeroLossDetector: the whole training set, in the Trainer's precision context.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16_mixed"):
        outputs = reference(X)
    losses = reference.per_sample_loss(outputs, Y)
    assert metrics["grok/train_loss_full"] == pytest.approx(float(losses.double().mean()), rel=1e-6)
    accuracy = float((outputs.argmax(dim=1) == Y.argmax(dim=1)).double().mean())
    assert metrics["grok/train_acc_full"] == pytest.approx(accuracy)

    # NormDescentMonitor: θ is the trained parameters (the frozen read-out left out).
    first = [p.detach().double() for p in reference.first.parameters()]
    second = [p.detach().double() for p in reference.second.parameters()]
    trained_second = variant != "frozen_submodule"
    first_sq = sum(float(p.pow(2).sum()) for p in first)
    second_sq = sum(float(p.pow(2).sum()) for p in second) if trained_second else 0.0
    c_first, c_second = decay_per_step(variant)
    assert metrics["grok/weight_norm"] == pytest.approx(math.sqrt(first_sq + second_sq), rel=1e-6)
    unconstrained = 2 * (c_first * first_sq + c_second * second_sq)
    assert metrics["grok/decay_rate_unconstrained"] == pytest.approx(unconstrained, rel=1e-6)
    n_trained = 4 if trained_second else 2

    def squared_norm(step):
        return sum(float(p.pow(2).sum()) for p in recorder.by_step[step][:n_trained])

    rate = -(squared_norm(STEPS) - squared_norm(STEPS - 2)) / 2  # window 2, in optimizer steps
    # The monitor takes each norm in float32 (~1e-7 of ‖θ‖²; measured: up to 2e-7 absolute here, ‖θ‖² ≈ 4).
    assert metrics["grok/norm_descent_rate"] == pytest.approx(rate, abs=1e-6 * squared_norm(STEPS))

    # TangentGradientMonitor: J, P_T and the decay over the trained parameters, float32 model (no autocast).
    trained = ["first.weight", "first.bias"] + (["second.weight", "second.bias"] if trained_second else [])
    projector = tangent_projector(reference, trained)
    theta = torch.cat([p.reshape(-1) for p in first + (second if trained_second else [])])
    split, rest = sum(p.numel() for p in first), theta.numel() - sum(p.numel() for p in first)
    wd_first, wd_second = weight_decays(variant)
    c = torch.cat([torch.full((split,), c_first), torch.full((rest,), c_second)]).double()
    wd = torch.cat([torch.full((split,), wd_first), torch.full((rest,), wd_second)]).double()
    tangent = projector @ theta
    assert metrics["grok/tangent/weight_fraction"] == pytest.approx(
        float(tangent @ tangent / (theta @ theta)), rel=1e-4
    )
    predicted = 2 * float(theta @ (projector @ (c * theta)))
    assert metrics["grok/norm_descent_rate_predicted"] == pytest.approx(predicted, rel=1e-4)
    # The trap: P_T∇L = 0, so the tangent part of the full gradient is that of the decay gradient g = (wd_g·θ_g).
    assert metrics["grok/tangent/grad_norm"] == pytest.approx(float((projector @ (wd * theta)).norm()), rel=1e-4)

    # FourierEmbeddingMonitor: the first layer's rows as a 5-residue table.
    spectrum = np.fft.fft(reference.first.weight.detach().double().T.numpy(), axis=0)[1:3]
    power = (np.abs(spectrum) ** 2).sum(axis=1)
    assert metrics["grok/fourier/top_power_fraction"] == pytest.approx(power.max() / power.sum(), rel=1e-6)


def test_training_variant_bf16_mixed_detector_sees_bf16_rounding():
    """Under bf16-mixed the detector's loss is the bf16 forward's (matched above), not the float32 model's."""
    trainer, model, _ = run_variant("bf16_mixed", *VARIANTS["bf16_mixed"])
    reference = Net()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        float32_loss = float(reference.per_sample_loss(reference(X), Y).double().mean())
    logged = float(trainer.callback_metrics["grok/train_loss_full"])
    # Measured: 8.4e-4 relative apart, within one bf16 rounding step (2⁻⁸ ≈ 3.9e-3).
    assert logged != pytest.approx(float32_loss, rel=1e-5)
    assert logged == pytest.approx(float32_loss, rel=2**-8)


def test_training_variant_limit_train_batches_measures_the_whole_set():
    """limit_train_batches=1 trains on the first 4 samples; the detector reports the loss over all 8 (measured:
    0.63 against 0.23 on the 4 it trains on)."""
    trainer, model, _ = run_variant("limit_train_batches", *VARIANTS["limit_train_batches"])
    reference = Net()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        losses = reference.per_sample_loss(reference(X), Y).double()
    assert float(trainer.callback_metrics["grok/train_loss_full"]) == pytest.approx(float(losses.mean()), rel=1e-6)
    assert float(trainer.callback_metrics["grok/train_loss_full"]) != pytest.approx(float(losses[:4].mean()), rel=1e-3)


EQ20_VARIANTS = {  # name: (trainer options, batch size, compiled)
    "minibatch": ({}, 4, False),
    "accumulate_grad_batches": ({"accumulate_grad_batches": 2}, 6, False),
    "limit_train_batches": ({"limit_train_batches": 1}, 4, False),
    "bf16_mixed": ({"precision": "bf16-mixed"}, None, False),
    "torch_compile": ({}, None, True),
}


@pytest.mark.parametrize("variant", list(EQ20_VARIANTS))
def test_training_variant_eq20_monitor_reads_the_first_layer(variant):
    """Eq20AlignmentMonitor (bias-free MLP only): its cosine equals cos(E_t − E_{t−1}, Eq. 20 flow at E_{t−1})."""
    from grok_lightning.geometry import eq20_flow

    trainer_options, batch_size, compiled = EQ20_VARIANTS[variant]
    pl.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(
        p=5, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum", target="one_hot", batch_size=batch_size
    )
    model = GrokkingModule(
        p=5, encoding="one_hot_sum", hidden=16, loss="mse", optimizer="sgd", lr=0.5, weight_decay=4e-3
    )
    recorder = WeightRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[Eq20AlignmentMonitor(every_n_steps=2, update_window=1), recorder],
        **trainer_options,
    )
    try:
        trainer.fit(torch.compile(model, backend="aot_eager") if compiled else model, data)
    finally:
        if compiled:
            torch._dynamo.reset()
    assert trainer.global_step == STEPS

    e_now, e_before = recorder.by_step[STEPS][0].T, recorder.by_step[STEPS - 1][0].T  # fc1.weight is Eᵀ
    flow, _, _ = eq20_flow(e_before, data.train_inputs.double(), data.train_targets.double())
    update = e_now - e_before
    expected = float((update * flow).sum() / (update.norm() * flow.norm()))
    assert float(trainer.callback_metrics["grok/eq20/update_cos"]) == pytest.approx(expected, rel=1e-6)


def test_training_variant_half_parameters_refused_by_the_tangent_monitor():
    """precision='bf16-true' (bf16 parameters): the tangent monitor refuses at fit start; the others measure."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    pl.seed_everything(0, verbose=False)
    options = {"accelerator": "cpu", "max_steps": 2, "logger": False, "precision": "bf16-true"}
    options.update(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    loader = DataLoader(TensorDataset(X, Y), batch_size=N)
    trainer = pl.Trainer(callbacks=[TangentGradientMonitor(time_budget=None, only_when_memorized=False)], **options)
    with pytest.raises(MisconfigurationException, match=r"float32 or float64 parameters.*torch.bfloat16.*bf16-true"):
        trainer.fit(Net(), loader)

    model = Net()
    detector, norm = ZeroLossDetector(every_n_steps=1), NormDescentMonitor(every_n_steps=1)
    trainer = pl.Trainer(callbacks=[detector, norm], **options)
    trainer.fit(model, loader)
    theta_sq = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    assert model.first.weight.dtype == torch.bfloat16
    assert float(trainer.callback_metrics["grok/weight_norm"]) == pytest.approx(math.sqrt(theta_sq), rel=1e-6)
    with torch.no_grad():
        losses = model.per_sample_loss(model(X.to(torch.bfloat16)), Y).double()
    assert float(trainer.callback_metrics["grok/train_loss_full"]) == pytest.approx(float(losses.mean()), rel=1e-6)
