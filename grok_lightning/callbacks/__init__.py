"""Lightning callbacks that watch a run approach the zero-loss manifold and descend its weight norm."""

from grok_lightning.callbacks.eq20_alignment_monitor import Eq20AlignmentMonitor
from grok_lightning.callbacks.fourier_embedding_monitor import FourierEmbeddingMonitor
from grok_lightning.callbacks.norm_descent_monitor import NormDescentMonitor
from grok_lightning.callbacks.tangent_gradient_monitor import TangentGradientMonitor
from grok_lightning.callbacks.zero_loss_detector import ZeroLossDetector, find_zero_loss_detector

__all__ = [
    "Eq20AlignmentMonitor",
    "FourierEmbeddingMonitor",
    "NormDescentMonitor",
    "TangentGradientMonitor",
    "ZeroLossDetector",
    "find_zero_loss_detector",
]
