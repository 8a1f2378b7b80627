"""Reference grokking setups: the modular arithmetic task, the models that grok on it, toy models."""

from grok_lightning.reference.data import ModularArithmeticDataModule, TensorBatches, encode_pairs, modular_pairs
from grok_lightning.reference.module import GrokkingModule
from grok_lightning.reference.networks import MLP, MLPConfig, Transformer, TransformerConfig
from grok_lightning.reference.predicted_dynamics import PredictedDynamicsModule
from grok_lightning.reference.toys import LinearToyModule, ToyDataModule

__all__ = [
    "MLP",
    "GrokkingModule",
    "LinearToyModule",
    "MLPConfig",
    "ModularArithmeticDataModule",
    "PredictedDynamicsModule",
    "TensorBatches",
    "ToyDataModule",
    "Transformer",
    "TransformerConfig",
    "encode_pairs",
    "modular_pairs",
]
