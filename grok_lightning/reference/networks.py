"""The two reference architectures: a two-layer MLP and a one-block transformer.

Both are plain ``nn.Module`` s with no normalization layers, so every parameter is seen by weight decay
and the zero-loss manifold of the training set is all there is to the geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Activation = Literal["relu", "quadratic", "gelu"]


@dataclass
class MLPConfig:
    """Shape of :class:`MLP`."""

    input_width: int = 194  # features per example: p (e_a + e_b) or 2p ([e_a, e_b])
    hidden: int = 256  # hidden units
    output_width: int = 97  # one output per residue class
    activation: Activation = "relu"  # relu (the paper), quadratic (x², exactly solvable), gelu
    bias: bool = False  # biases on both layers (the paper has none)
    init_scale: float = 1.0  # multiplies PyTorch's default (Kaiming-uniform) initialization


class MLP(nn.Module):
    """Two layers, ``ŷ = σ(x W₁ᵀ) W₂ᵀ``: input → hidden → output.

    ``fc1.weight`` is the first layer (its columns are the embeddings of the input features, the rows
    the paper writes as E), ``fc2.weight`` the read-out.
    """

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        if config.activation not in ("relu", "quadratic", "gelu"):
            raise ValueError(
                f"Expected argument `activation` to be one of ('relu', 'quadratic', 'gelu'), "
                f"but got {config.activation!r}."
            )
        self.config = config
        self.fc1 = nn.Linear(config.input_width, config.hidden, bias=config.bias)
        self.fc2 = nn.Linear(config.hidden, config.output_width, bias=config.bias)
        if config.init_scale != 1.0:
            with torch.no_grad():
                for parameter in self.parameters():
                    parameter.mul_(config.init_scale)

    def activation(self, h: Tensor) -> Tensor:
        """The hidden nonlinearity σ."""
        if self.config.activation == "relu":
            return torch.relu(h)
        if self.config.activation == "quadratic":
            return h * h
        return nn.functional.gelu(h)

    def forward(self, x: Tensor) -> Tensor:
        """Map (N, input_width) float features to (N, output_width) outputs."""
        h = self.activation(self.fc1(x))  # (N, hidden)
        return self.fc2(h)  # (N, output_width)


@dataclass
class TransformerConfig:
    """Shape of :class:`Transformer`, after Nanda et al. (2023): one block, no LayerNorm."""

    vocab_size: int = 98  # residues 0..p-1 and the "=" token (id p)
    seq_len: int = 3  # [a, b, =]
    d_model: int = 128  # residual stream width
    n_heads: int = 4  # attention heads, d_model / n_heads each
    d_mlp: int = 512  # hidden units of the MLP
    output_width: int = 97  # one logit per residue class
    init_scale: float = 1.0  # multiplies the initialization's standard deviations


class Transformer(nn.Module):
    """One residual block, attention then a ReLU MLP, read out at the last position (the ``=`` token).

    Attention is written out by hand (no fused kernel), so forward-mode autodiff through
    ``torch.func.jvp`` works on every backend.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(
                f"Expected argument `d_model` to be divisible by `n_heads` ({config.n_heads}), "
                f"but got {config.d_model}."
            )
        self.config = config
        d = config.d_model
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.position_embedding = nn.Embedding(config.seq_len, d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.mlp_in = nn.Linear(d, config.d_mlp)
        self.mlp_out = nn.Linear(config.d_mlp, d)
        self.unembed = nn.Linear(d, config.output_width, bias=False)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if "embedding" in name:
                    parameter.normal_(0.0, config.init_scale / math.sqrt(d))
                elif name.endswith("bias"):
                    parameter.zero_()
                else:
                    parameter.normal_(0.0, config.init_scale / math.sqrt(parameter.shape[1]))

    def forward(self, tokens: Tensor) -> Tensor:
        """Map (N, seq_len) int64 token ids to (N, output_width) logits.

        Two exact shortcuts make this cheap on a CPU. With one block read out at the last position, only that
        position's query, attention mix and MLP reach the output. And the block's input at position t is a
        function of the token alone, ``E[token] + P[t]``, so queries, keys and values are computed once per
        (position, vocabulary entry) and gathered, instead of once per example. The logits equal those of the
        full causal block (tested).
        """
        n, t = tokens.shape
        heads, d_head = self.config.n_heads, self.config.d_model // self.config.n_heads
        positions = torch.arange(t, device=tokens.device)
        table = self.token_embedding.weight + self.position_embedding(positions)[:, None]  # (T, V, d)
        rows = positions * table.shape[1] + tokens  # (N, T): row of (position, token) in the flattened table
        qkv = nn.functional.embedding(rows, self.qkv(table).flatten(0, 1))  # (N, T, 3d), a gather with a fast backward

        q, k, v = qkv.view(n, t, 3, heads, d_head).unbind(dim=2)  # each (N, T, H, d_head)
        q = q[:, -1:]  # (N, 1, H, d_head): the last position attends to every position (causal)
        scores = (q * k).sum(dim=-1) / math.sqrt(d_head)  # (N, T, H); elementwise: T is 3, no batched matmul
        mixed = (scores.softmax(dim=1).unsqueeze(-1) * v).sum(dim=1)  # (N, H, d_head)
        residual = nn.functional.embedding(tokens[:, -1], table[-1])  # (N, d): the block's input at the last position
        x = residual + self.attn_out(mixed.reshape(n, -1))  # (N, d)

        x = x + self.mlp_out(torch.relu(self.mlp_in(x)))  # (N, d)
        return self.unembed(x)  # (N, output_width)
