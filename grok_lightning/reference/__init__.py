"""Reference grokking setups: the modular arithmetic task, the models that grok on it, toy models."""

from grok_lightning.reference.data import ModularArithmeticDataModule, TensorBatches, encode_pairs, modular_pairs
from grok_lightning.reference.module import GrokkingModule
from grok_lightning.reference.networks import MLP, MLPConfig, Transformer, TransformerConfig

__all__ = [
    "MLP",
    "GrokkingModule",
    "MLPConfig",
    "ModularArithmeticDataModule",
    "TensorBatches",
    "Transformer",
    "TransformerConfig",
    "encode_pairs",
    "modular_pairs",
]
