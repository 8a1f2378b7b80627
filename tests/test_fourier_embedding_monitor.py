import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from grok_lightning import FourierEmbeddingMonitor, GrokkingModule, ModularArithmeticDataModule
from grok_lightning.callbacks.fourier_embedding_monitor import default_embedding
from grok_lightning.reference import PredictedDynamicsModule


def _circles(p: int, parts: list[tuple[int, list[float], list[float]]], offset=None) -> torch.Tensor:
    """E[a] = Σ cos(2πka/p)·u + sin(2πka/p)·v over the given (k, u, v), plus a constant row ``offset``."""
    a = torch.arange(p, dtype=torch.float64)[:, None]
    table = torch.zeros(p, len(parts[0][1]), dtype=torch.float64)
    for k, u, v in parts:
        angle = 2 * math.pi * k * a / p
        table += torch.cos(angle) * torch.tensor(u, dtype=torch.float64)
        table += torch.sin(angle) * torch.tensor(v, dtype=torch.float64)
    if offset is not None:
        table += torch.tensor(offset, dtype=torch.float64)
    return table


class _Holder(pl.LightningModule):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.embedding = torch.nn.Parameter(table.clone())


def _numpy_reference(table: np.ndarray, top_k: int, floor: float = 1e-9) -> dict[str, float]:
    """The metrics straight from numpy's FFT, frequency by frequency in a Python loop."""
    p = table.shape[0]
    spectrum = np.fft.fft(table, axis=0)
    roundness, cosines, powers = [], [], []
    for k in range(1, (p - 1) // 2 + 1):
        re, im = spectrum[k].real, spectrum[k].imag
        nr, ni = np.linalg.norm(re), np.linalg.norm(im)
        roundness.append(min(nr, ni) / max(nr, ni))
        cosines.append(abs(re @ im) / (nr * ni))
        powers.append(nr**2 + ni**2)
    powers = np.array(powers)
    keep = powers >= floor * powers.sum()
    return {
        "grok/fourier/circle_roundness": float(np.mean(np.array(roundness)[keep])),
        "grok/fourier/re_im_cos": float(np.mean(np.array(cosines)[keep])),
        "grok/fourier/circle_roundness_weighted": float(np.average(roundness, weights=powers)),
        "grok/fourier/re_im_cos_weighted": float(np.average(cosines, weights=powers)),
        "grok/fourier/top_power_fraction": float(np.sort(powers)[::-1][:top_k].sum() / powers.sum()),
    }


def test_fourier_embedding_monitor_one_circle_by_hand():
    """One frequency, E[a] = cos·u + sin·v: roundness min/max(‖u‖, ‖v‖), |cos| of u and v, all power in it."""
    u, v = [3.0, 0.0, 4.0], [0.0, 2.0, 1.0]  # ‖u‖ = 5, ‖v‖ = √5, u·v = 4
    table = _circles(11, [(3, u, v)], offset=[7.0, -2.0, 0.5])  # the constant row (k = 0) is ignored
    metrics, spectrum = FourierEmbeddingMonitor(top_k=1).measure(_Holder(table))
    assert metrics["grok/fourier/circle_roundness"] == pytest.approx(math.sqrt(5) / 5)
    assert metrics["grok/fourier/re_im_cos"] == pytest.approx(4 / (5 * math.sqrt(5)))
    assert metrics["grok/fourier/circle_roundness_weighted"] == pytest.approx(math.sqrt(5) / 5)
    assert metrics["grok/fourier/top_power_fraction"] == pytest.approx(1.0)
    # F_k = (p/2)(u − i v): the power is (p/2)²(‖u‖² + ‖v‖²).
    assert spectrum.power[2].item() == pytest.approx((11 / 2) ** 2 * 30)


def test_fourier_embedding_monitor_two_circles_weighted_and_unweighted():
    """Two frequencies of different power: the unweighted means treat them alike, the weighted by power."""
    p = 13
    table = _circles(p, [(1, [3.0, 0.0, 0.0], [0.0, 1.0, 0.0]), (4, [1.0, 1.0, 0.0], [1.0, 0.0, 0.0])])
    metrics, _ = FourierEmbeddingMonitor(top_k=1).measure(_Holder(table))
    r1, r2, c1, c2 = 1 / 3, 1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)
    w1, w2 = 10.0, 3.0  # power ∝ ‖u‖² + ‖v‖²
    assert metrics["grok/fourier/circle_roundness"] == pytest.approx((r1 + r2) / 2)
    assert metrics["grok/fourier/re_im_cos"] == pytest.approx((c1 + c2) / 2)
    assert metrics["grok/fourier/circle_roundness_weighted"] == pytest.approx((w1 * r1 + w2 * r2) / (w1 + w2))
    assert metrics["grok/fourier/re_im_cos_weighted"] == pytest.approx((w1 * c1 + w2 * c2) / (w1 + w2))
    assert metrics["grok/fourier/top_power_fraction"] == pytest.approx(w1 / (w1 + w2))


@pytest.mark.parametrize(("p", "d", "top_k"), [(7, 3, 1), (13, 16, 3), (12, 5, 2), (37, 64, 5)])
def test_fourier_embedding_monitor_matches_numpy_fft(p, d, top_k):
    """Random tables: every metric equals a per-frequency numpy FFT reference (even p too)."""
    table = np.random.default_rng(p * d).normal(size=(p, d))
    metrics, _ = FourierEmbeddingMonitor(top_k=top_k).measure(_Holder(torch.from_numpy(table)))
    expected = _numpy_reference(table, top_k)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-10), key


def test_fourier_embedding_monitor_default_embeddings():
    """Defaults: E of the Eq. 20 module, fc1.weight.T (first p rows for concat), token rows 0..p−1."""
    dynamics = PredictedDynamicsModule(p=7, width=16)
    assert default_embedding(dynamics) is dynamics.embedding
    summed = GrokkingModule(p=7, encoding="one_hot_sum", hidden=16)
    torch.testing.assert_close(default_embedding(summed), summed.net.fc1.weight.T)
    concat = GrokkingModule(p=7, encoding="one_hot_concat", hidden=16)
    torch.testing.assert_close(default_embedding(concat), concat.net.fc1.weight.T[:7])
    transformer = GrokkingModule(p=7, encoding="tokens", architecture="transformer", d_model=8, n_heads=2, d_mlp=8)
    torch.testing.assert_close(default_embedding(transformer), transformer.net.token_embedding.weight[:7])
    with pytest.raises(MisconfigurationException, match="embedding"):
        default_embedding(pl.LightningModule())


def _fit(tmp_path, monitor, seed=0, steps=6, tensorboard=False):
    torch.manual_seed(seed)
    dm = ModularArithmeticDataModule(p=11, pairs="unordered", train_fraction=0.8, encoding="one_hot_sum")
    model = GrokkingModule(p=11, encoding="one_hot_sum", hidden=16, lr=1e-2, weight_decay=0.1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=TensorBoardLogger(tmp_path, name="tb") if tensorboard else False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[monitor] if monitor is not None else [],
    )
    trainer.fit(model, dm)
    return trainer, model


def test_fourier_embedding_monitor_logs_reference_values_and_figure(tmp_path):
    """In a run, callback_metrics hold the numpy reference of the final fc1.weight.T; TensorBoard gets figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = FourierEmbeddingMonitor(every_n_steps=3, top_k=2, figure_every_n_steps=3)
    trainer, model = _fit(tmp_path, monitor, tensorboard=True)
    expected = _numpy_reference(model.net.fc1.weight.detach().T.double().numpy(), top_k=2)
    for key, value in expected.items():
        assert float(trainer.callback_metrics[key]) == pytest.approx(value, rel=1e-6), key

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Images("grok/fourier/spectrum")] == [0, 3, 6]
    assert [e.step for e in events.Scalars("grok/fourier/circle_roundness")] == [0, 3, 6]


def test_fourier_embedding_monitor_does_not_change_training(tmp_path):
    """Weights, gradients and the global RNG after a run are bit for bit those of the run without the monitor."""
    _, plain = _fit(tmp_path / "plain", None)
    plain_rng = torch.get_rng_state()
    monitor = FourierEmbeddingMonitor(every_n_steps=1, figure_every_n_steps=2)
    _, watched = _fit(tmp_path / "watched", monitor, tensorboard=True)
    assert torch.equal(torch.get_rng_state(), plain_rng)
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)
        assert (a.grad is None) == (b.grad is None)
    assert watched.training == plain.training


def test_fourier_embedding_monitor_custom_embedding_and_bad_shape():
    """A custom accessor is used as given; a table that is not (p ≥ 3, d) is refused."""
    table = _circles(5, [(1, [1.0, 0.0], [0.0, 1.0])])
    monitor = FourierEmbeddingMonitor(embedding=lambda module: module.embedding * 2)
    assert monitor.measure(_Holder(table))[0]["grok/fourier/circle_roundness"] == pytest.approx(1.0)
    with pytest.raises(MisconfigurationException, match=r"\(p, d\) tensor"):
        FourierEmbeddingMonitor(embedding=lambda module: module.embedding[0]).measure(_Holder(table))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"top_k": 1.5}, "top_k"),
        ({"figure_every_n_steps": 0}, "figure_every_n_steps"),
        ({"embedding": "fc1"}, "embedding"),
        ({"power_floor": 1.0}, "power_floor"),
    ],
)
def test_fourier_embedding_monitor_bad_arguments(kwargs, match):
    """Bad arguments raise a ValueError naming the argument and the value."""
    with pytest.raises(ValueError, match=f"Expected argument `{match}` to be .*, but got"):
        FourierEmbeddingMonitor(**kwargs)
