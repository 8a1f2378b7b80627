"""FourierEmbeddingMonitor: do the residue embeddings form round circles, one per frequency?"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from grok_lightning.callbacks._base import DiagnosticCallback, NanPolicy
from grok_lightning.callbacks._data import log_now, log_pending, may_shard_parameters
from grok_lightning.callbacks._validation import check_callable, check_number, check_positive_int

__all__ = ["FourierEmbeddingMonitor", "FourierSpectrum", "default_embedding", "fourier_spectrum"]

EmbeddingFn = Callable[[pl.LightningModule], Tensor]


class FourierSpectrum(NamedTuple):
    """Per-frequency view of an embedding table, frequencies k = 1..⌊(p−1)/2⌋ (all float64, (K,))."""

    power: Tensor  # ‖F_k‖² = ‖Re F_k‖² + ‖Im F_k‖²
    re_norm: Tensor  # ‖Re F_k‖
    im_norm: Tensor  # ‖Im F_k‖
    roundness: Tensor  # min/max(‖Re F_k‖, ‖Im F_k‖); NaN where both vanish
    re_im_cos: Tensor  # |cos(Re F_k, Im F_k)|; NaN where either vanishes


def fourier_spectrum(embedding: Tensor) -> FourierSpectrum:
    """The discrete Fourier transform of embedding rows indexed by residue, one entry per frequency.

    F_k = Σ_a E[a] · exp(−2πi·k·a/p) ∈ ℂ^d for k = 1..⌊(p−1)/2⌋. The frequencies p − k are the complex
    conjugates of k for a real table, and k = 0 (the mean row) is not a circle, so both are left out.

    Args:
        embedding: E, (p, d): row a is the vector of residue a. A ``DTensor`` (parameters sharded by FSDP2) is
            gathered first, a collective: call it on every rank.

    Returns:
        The spectrum, float64.
    """
    e = embedding.detach()
    if hasattr(e, "full_tensor"):  # DTensor: the whole table on every rank
        e = e.full_tensor()
    e = e.to(torch.float64)
    p = e.shape[0]
    spectrum = torch.fft.fft(e, dim=0)[1 : (p - 1) // 2 + 1]  # (K, d) complex128
    re, im = spectrum.real, spectrum.imag
    re_norm, im_norm = re.norm(dim=1), im.norm(dim=1)
    longer, shorter = torch.maximum(re_norm, im_norm), torch.minimum(re_norm, im_norm)
    roundness = torch.where(longer > 0, shorter / longer, torch.nan)
    both = re_norm * im_norm
    re_im_cos = torch.where(both > 0, (re * im).sum(dim=1).abs() / both, torch.nan)
    return FourierSpectrum(re_norm.square() + im_norm.square(), re_norm, im_norm, roundness, re_im_cos)


def default_embedding(pl_module: pl.LightningModule) -> Tensor:
    """The rows of the first layer indexed by residue, (p, d), for the reference modules.

    - :class:`~grok_lightning.reference.PredictedDynamicsModule` (any module with a 2-D ``embedding``
      tensor): that tensor.
    - :class:`~grok_lightning.reference.GrokkingModule` MLP: ``fc1.weight.T`` (input features × hidden), its
      first ``p`` rows: all of them for ``one_hot_sum`` (e_a + e_b), operand a's for ``one_hot_concat``.
    - :class:`~grok_lightning.reference.GrokkingModule` transformer: token embedding rows 0..p−1 (the ``=``
      token, id p, left out).

    Raises:
        MisconfigurationException: For any other module: pass ``embedding`` to the monitor.
    """
    table = getattr(pl_module, "embedding", None)
    if isinstance(table, Tensor) and table.dim() == 2:
        return table
    net, hparams = getattr(pl_module, "net", None), getattr(pl_module, "hparams", {})
    p = hparams.get("p") if hasattr(hparams, "get") else None
    if isinstance(p, int):
        fc1 = getattr(net, "fc1", None)
        if isinstance(fc1, torch.nn.Linear):
            return fc1.weight.T[:p]
        token_embedding = getattr(net, "token_embedding", None)
        if isinstance(token_embedding, torch.nn.Embedding):
            return token_embedding.weight[:p]
    raise MisconfigurationException(
        f"FourierEmbeddingMonitor does not know where the residue embeddings of {type(pl_module).__name__} are: "
        "pass `embedding=lambda module: ...` returning a (p, d) tensor whose row a belongs to residue a."
    )


def _weighted_mean(values: Tensor, weights: Tensor) -> float | None:
    defined = ~values.isnan()
    total = weights[defined].sum()
    if not bool(total > 0):
        return None
    return float((values[defined] * weights[defined]).sum() / total)


class FourierEmbeddingMonitor(DiagnosticCallback):
    """Measure how circular the residue embeddings of a modular-arithmetic model are, frequency by frequency.

    Take the first-layer rows E[0..p−1], one per residue, and their discrete Fourier transform over the residue
    axis. At each frequency k the rows trace an ellipse a ↦ Re F_k·cos(2πka/p) + Im F_k·sin(2πka/p) (up to
    the factor 2/p); the paper's generalizing solution of (a + b) mod p makes these ellipses round circles,
    ‖Re F_k‖ ≈ ‖Im F_k‖ and Re F_k ⟂ Im F_k, with the power concentrated in a few frequencies for trained
    networks.

    Args:
        every_n_steps: Measure every this many optimizer steps (``trainer.global_step``), and when training
            starts.
        top_k: How many of the strongest frequencies ``grok/fourier/top_power_fraction`` counts.
        figure_every_n_steps: With a ``TensorBoardLogger``, draw the spectrum figure every this many steps
            (a multiple of ``every_n_steps`` to coincide with measurements); ``None`` for no figure.
        embedding: ``(pl_module) -> Tensor (p, d)``: the rows indexed by residue. ``None`` reads the reference
            modules (see :func:`default_embedding`).
        power_floor: Frequencies whose power is below this fraction of the total (k ≥ 1) power are left out of
            the unweighted means: their shape is rounding noise.
        nan_policy: What to do when the embedding holds NaN or inf at a measurement: ``"warn"`` (once) and skip
            it, or ``"error"`` (raise).
        strict: Raise an exception of the monitor's own measurement (e.g. from ``embedding``) instead of warning
            once and disabling the monitor for the rest of the run.

    Raises:
        ValueError: If an argument is out of range or of the wrong type, naming it and the value it got.
        MisconfigurationException: When training starts, if the embedding cannot be found or is not a
            (p, d) table with p ≥ 3.
        RuntimeError: ``NonFiniteError``, with ``nan_policy="error"``, at a measurement where the embedding is
            not finite.

    Logged metrics (every ``every_n_steps`` steps and when training starts, but not again when resuming from a
    checkpoint; written to the loggers under the ``trainer.global_step`` of the measurement and put in
    ``trainer.callback_metrics`` at the next batch end; frequencies k = 1..⌊(p−1)/2⌋, k = 0 excluded):

    - ``grok/fourier/circle_roundness``: mean over k of min/max(‖Re F_k‖, ‖Im F_k‖) (dimensionless, 1 = round
      circle, 0 = a line segment), over frequencies with power above ``power_floor``.
    - ``grok/fourier/re_im_cos``: mean over k of |cos(Re F_k, Im F_k)| (dimensionless, 0 = the ellipse's axes
      are Re and Im F_k), same frequencies.
    - ``grok/fourier/circle_roundness_weighted``, ``grok/fourier/re_im_cos_weighted``: the same means weighted
      by the power ‖F_k‖² (the shape of the frequencies that carry the embedding).
    - ``grok/fourier/top_power_fraction``: Σ of the ``top_k`` largest ‖F_k‖² over Σ_k ‖F_k‖² (in [top_k/K, 1];
      1 when the embedding lives in ``top_k`` frequencies).

    With a ``TensorBoardLogger``, the figure ``grok/fourier/spectrum`` (power share and roundness per k) every
    ``figure_every_n_steps`` steps (needs matplotlib; one warning and no figure without it).

    Notes:
        - The unweighted means are the paper's statistic; they give a frequency with almost no power as much
          say as the dominant one, so a network that uses few frequencies reads as "not round" through the
          shape of its noise. The weighted means follow the frequencies that matter; log both, judge with
          the weighted one when ``top_power_fraction`` is high.
        - Reads weights only, under ``torch.no_grad()``; draws no random numbers; two host syncs per
          measurement (the finiteness check and the values).
        - **Faults.** An exception inside a measurement (other than a configuration error) is reported once, as a
          ``RuntimeWarning`` with its type and message, and disables the monitor for the rest of the fit; training
          goes on. Under DDP it has no collective, so a failure disables it on the failing rank alone; with
          sharded parameters (FSDP2), where the embedding is gathered, the ranks agree on disabling it at the next
          measuring step.
        - Reads only the weights, so every training setup works (accumulation, param groups, schedulers,
          ``bf16-mixed``, manual optimization, frozen embeddings, ``torch.compile``, minibatches); see
          ``docs/limitations.md``.

    Example:
        >>> monitor = FourierEmbeddingMonitor(every_n_steps=100, top_k=4)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=10)
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        top_k: int = 5,
        figure_every_n_steps: int | None = None,
        embedding: EmbeddingFn | None = None,
        power_floor: float = 1e-9,
        nan_policy: NanPolicy = "warn",
        strict: bool = False,
    ) -> None:
        super().__init__(nan_policy=nan_policy, strict=strict)
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("top_k", top_k)
        check_positive_int("figure_every_n_steps", figure_every_n_steps, optional=True)
        check_callable("embedding", embedding)
        check_number("power_floor", power_floor, 0.0, 1.0, high_open=True)
        self.every_n_steps = every_n_steps
        self.top_k = top_k
        self.figure_every_n_steps = figure_every_n_steps
        self.embedding = embedding or default_embedding
        self.power_floor = float(power_floor)
        self.last: dict[str, float] = {}  # the latest measurement
        self._last_step = -1
        self._pending: dict[str, float] = {}

    @cached_property  # read by Lightning at every hook call (profiler names); built once from the arguments
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, top_k=self.top_k)

    def measure(self, pl_module: pl.LightningModule) -> tuple[dict[str, float], FourierSpectrum]:
        """The metrics and the spectrum of the module's embedding now.

        Raises:
            MisconfigurationException: If the embedding is not a (p, d) tensor with p ≥ 3.
        """
        with torch.no_grad():
            table = self.embedding(pl_module)
            if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[0] < 3 or table.shape[1] < 1:
                shape = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
                raise MisconfigurationException(
                    f"FourierEmbeddingMonitor expected the embedding to be a (p, d) tensor with p ≥ 3 residues, "
                    f"but got {shape}."
                )
            spectrum = fourier_spectrum(table)
        power = spectrum.power
        total = float(power.sum())  # host sync: values to log
        metrics: dict[str, float] = {}
        if total > 0:
            strong = power >= self.power_floor * total
            for key, values in (("circle_roundness", spectrum.roundness), ("re_im_cos", spectrum.re_im_cos)):
                unweighted = _weighted_mean(values, strong.to(power.dtype))
                if unweighted is not None:
                    metrics[f"grok/fourier/{key}"] = unweighted
                weighted = _weighted_mean(values, power)
                if weighted is not None:
                    metrics[f"grok/fourier/{key}_weighted"] = weighted
            top = power.topk(min(self.top_k, power.shape[0])).values.sum()
            metrics["grok/fourier/top_power_fraction"] = float(top) / total
        return metrics, spectrum

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fresh monitor measures where fitting starts; one restored from a checkpoint only at its own measuring
        # steps, as the uninterrupted run did.
        step = trainer.global_step
        due = self._last_step < 0 or (step % self.every_n_steps == 0 and step != self._last_step)
        if due and self._agree(trainer):
            self._pending = self._check(trainer, pl_module)  # `pl_module.log` is not allowed here yet

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_step:
            if not self._agree(trainer):  # a sync point when the embedding is sharded
                return
            self._pending = self._check(trainer, pl_module)
        if self._pending:
            log_pending(pl_module, self._pending)
            self._pending = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]

    @override
    def _collective(self, trainer: pl.Trainer) -> bool:
        return may_shard_parameters(trainer)  # the embedding is gathered from its shards

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        step = trainer.global_step
        self._last_step = step
        metrics, spectrum = self.measure(pl_module)
        if not math.isfinite(float(spectrum.power.sum())):  # host sync; a NaN or inf anywhere in E reaches the sum
            self._non_finite(trainer, "the embedding")
            return {}
        self.last = metrics
        if metrics:
            log_now(trainer, metrics, step)
        if self.figure_every_n_steps is not None and step % self.figure_every_n_steps == 0 and trainer.is_global_zero:
            self._draw(trainer, spectrum, step)
        return metrics

    def _draw(self, trainer: pl.Trainer, spectrum: FourierSpectrum, step: int) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            return
        try:
            from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend switch
        except ImportError:
            self._warn(
                "matplotlib",
                "FourierEmbeddingMonitor: matplotlib is not installed, so no spectrum figure is drawn; the "
                "scalars are still logged. `pip install matplotlib` to get it.",
            )
            return
        power = spectrum.power.cpu()
        share = power / power.sum() if float(power.sum()) > 0 else power
        k = list(range(1, power.shape[0] + 1))
        figure = Figure(figsize=(6, 4))
        top, bottom = figure.subplots(2, 1, sharex=True)
        top.bar(k, share.tolist(), color="tab:blue")
        top.set_ylabel("power share")
        top.set_title(f"Fourier spectrum of the embedding, step {step}")
        bottom.plot(k, spectrum.roundness.cpu().tolist(), "o-", label="roundness")
        bottom.plot(k, spectrum.re_im_cos.cpu().tolist(), "s-", label="|cos(Re, Im)|")
        bottom.set_ylim(-0.05, 1.05)
        bottom.set_xlabel("frequency k")
        bottom.legend(loc="best", fontsize="small")
        figure.tight_layout()
        for logger in loggers:
            logger.experiment.add_figure("grok/fourier/spectrum", figure, global_step=step, close=False)
