"""grok_lightning: watch a network grok, live, through the geometry of the zero-loss manifold."""

from grok_lightning.callbacks import (
    Eq20AlignmentMonitor,
    FourierEmbeddingMonitor,
    NormDescentMonitor,
    TangentGradientMonitor,
    ZeroLossDetector,
    find_zero_loss_detector,
)
from grok_lightning.reference import GrokkingModule, ModularArithmeticDataModule

__version__ = "0.1.0"

__all__ = [
    "Eq20AlignmentMonitor",
    "FourierEmbeddingMonitor",
    "GrokkingModule",
    "ModularArithmeticDataModule",
    "NormDescentMonitor",
    "TangentGradientMonitor",
    "ZeroLossDetector",
    "__version__",
    "find_zero_loss_detector",
]
