"""Modular arithmetic tasks, the standard testbed of grokking.

Every pair ``(a, b)`` of residues modulo ``p`` is one example whose label is ``a ∘ b mod p``. The whole task
fits in a few tensors, so the data module prepares them once and serves batches by slicing: no DataLoader
workers, no per-sample Python calls. The full training tensors stay reachable as
:attr:`ModularArithmeticDataModule.train_inputs` and :attr:`~ModularArithmeticDataModule.train_targets`,
which the diagnostics callbacks use as the constraint set of the zero-loss manifold.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

Operation = Literal["add", "sub", "mul", "div"]
Pairs = Literal["ordered", "unordered"]
Encoding = Literal["one_hot_sum", "one_hot_concat", "tokens"]
Target = Literal["class", "one_hot"]

OPERATIONS: tuple[str, ...] = ("add", "sub", "mul", "div")
PAIRS: tuple[str, ...] = ("ordered", "unordered")
ENCODINGS: tuple[str, ...] = ("one_hot_sum", "one_hot_concat", "tokens")
TARGETS: tuple[str, ...] = ("class", "one_hot")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected argument `{name}` to be one of {choices}, but got {value!r}.")


def encoding_width(p: int, encoding: str) -> int:
    """Feature width of one encoded example: ``p`` for ``one_hot_sum``, ``2p`` for ``one_hot_concat``.

    For ``tokens`` it is the sequence length (3: ``a``, ``b`` and the ``=`` token, whose id is ``p``).
    """
    _check_choice("encoding", encoding, ENCODINGS)
    return {"one_hot_sum": p, "one_hot_concat": 2 * p, "tokens": 3}[encoding]


def modular_pairs(p: int, operation: str = "add", pairs: str = "ordered") -> tuple[Tensor, Tensor, Tensor]:
    """All operand pairs of the task and their labels.

    Args:
        p: The modulus.
        operation: ``"add"``, ``"sub"``, ``"mul"`` or ``"div"`` (``a · b⁻¹``; ``b`` ranges over 1..p-1).
        pairs: ``"ordered"`` keeps ``(a, b)`` and ``(b, a)`` apart; ``"unordered"`` keeps ``a ≤ b`` only,
            as the paper does for its commutative task.

    Returns:
        ``(a, b, label)``, three int64 tensors of equal length, in lexicographic order of ``(a, b)``.
    """
    _check_choice("operation", operation, OPERATIONS)
    _check_choice("pairs", pairs, PAIRS)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    keep = torch.ones_like(a, dtype=torch.bool)
    if pairs == "unordered":
        keep &= a <= b
    if operation == "div":
        keep &= b != 0
    a, b = a[keep], b[keep]
    if operation == "add":
        label = (a + b) % p
    elif operation == "sub":
        label = (a - b) % p
    elif operation == "mul":
        label = (a * b) % p
    else:
        inverse = torch.tensor([pow(int(x), p - 2, p) if x else 0 for x in range(p)])  # Fermat: p is prime
        label = (a * inverse[b]) % p
    return a, b, label


def encode_pairs(a: Tensor, b: Tensor, p: int, encoding: str) -> Tensor:
    """Encode operand pairs as model inputs.

    Shapes: ``a, b`` (N,) int64 → (N, p) float for ``one_hot_sum`` (the paper's e_a + e_b, so ``a = b`` gives
    a 2 in one place), (N, 2p) float for ``one_hot_concat``, (N, 3) int64 token ids ``[a, b, p]`` for
    ``tokens``.
    """
    _check_choice("encoding", encoding, ENCODINGS)
    if encoding == "tokens":
        return torch.stack([a, b, torch.full_like(a, p)], dim=1)
    eye = torch.eye(p)
    if encoding == "one_hot_sum":
        return eye[a] + eye[b]
    return torch.cat([eye[a], eye[b]], dim=1)


class TensorBatches:
    """A minimal loader over in-memory tensors: slices, no workers, no collation.

    Lightning accepts any sized iterable as a dataloader. Under data parallelism each rank takes every
    ``world_size``-th example (after the shuffle of this epoch, which every rank draws from the same seeded
    generator, so shards never overlap). Shuffling uses a private generator: iterating never touches the
    global RNG.

    Args:
        tensors: Tensors with the same first dimension.
        batch_size: Examples per batch on each rank, ``None`` for the whole (rank's share of the) set.
        shuffle: Draw a new order every epoch.
        repeats: How many passes one epoch makes. A full-batch epoch of ``repeats`` steps saves Lightning's
            per-epoch overhead, which dominates when one step takes a millisecond.
        seed: Seed of the shuffle.
        rank: This process's rank among ``world_size`` data-parallel ranks.
        world_size: Number of data-parallel ranks.
    """

    def __init__(
        self,
        *tensors: Tensor,
        batch_size: int | None = None,
        shuffle: bool = False,
        repeats: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.repeats = repeats
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def _local_size(self) -> int:
        n = self.tensors[0].shape[0]
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        if self.batch_size is None:
            return self.repeats
        return self.repeats * -(-self._local_size() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        n = self.tensors[0].shape[0]
        local = self.tensors
        if not self.shuffle and self.world_size > 1:
            local = tuple(t[self.rank :: self.world_size] for t in self.tensors)
        for r in range(self.repeats):
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + 7919 * self.epoch + r)
                order = torch.randperm(n, generator=generator)[self.rank :: self.world_size]
                local = tuple(t[order] for t in self.tensors)
            if self.batch_size is None:
                yield local
                continue
            for start in range(0, local[0].shape[0], self.batch_size):
                yield tuple(t[start : start + self.batch_size] for t in local)
        self.epoch += 1


class ModularArithmeticDataModule(pl.LightningDataModule):
    """The modular arithmetic task ``a ∘ b mod p``, split once into training and validation pairs.

    The split is a seeded permutation of all pairs: the first ``round(train_fraction · N)`` are trained on,
    the rest (the held-out pairs) form the validation set. Tensors are built in ``__init__``, so they are
    available before the Trainer starts, on every rank alike.

    Args:
        p: The modulus, at least 2 (prime for ``"div"``).
        operation: ``"add"``, ``"sub"``, ``"mul"`` or ``"div"``.
        pairs: ``"ordered"`` (all p² pairs) or ``"unordered"`` (``a ≤ b``, p(p+1)/2 pairs, the paper's choice).
        train_fraction: Share of the pairs trained on, in (0, 1); both splits must be non-empty.
        encoding: ``"one_hot_sum"`` (e_a + e_b, width p, the paper's input), ``"one_hot_concat"``
            ([e_a, e_b], width 2p) or ``"tokens"`` (ids ``[a, b, =]`` with ``=`` = p, for the transformer).
        target: ``"class"`` (int64 labels, for cross-entropy) or ``"one_hot"`` (float rows, for MSE).
        batch_size: Training examples per step, ``None`` for full-batch training.
        steps_per_epoch: Full-batch only: optimizer steps per Lightning epoch (see :class:`TensorBatches`).
            Validation runs once per epoch unless the Trainer says otherwise.
        seed: Seed of the split (and of the minibatch shuffle).

    Raises:
        ValueError: If an argument is out of range or an unknown choice, naming the argument and its value.

    Example:
        >>> dm = ModularArithmeticDataModule(p=11, pairs="unordered", train_fraction=0.8, target="one_hot")
        >>> dm.train_inputs.shape, dm.train_targets.shape, dm.val_inputs.shape
        (torch.Size([53, 11]), torch.Size([53, 11]), torch.Size([13, 11]))
    """

    def __init__(
        self,
        p: int = 97,
        operation: Operation = "add",
        pairs: Pairs = "ordered",
        train_fraction: float = 0.4,
        encoding: Encoding = "one_hot_concat",
        target: Target = "class",
        batch_size: int | None = None,
        steps_per_epoch: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(p, int) or p < 2:
            raise ValueError(f"Expected argument `p` to be an integer of at least 2, but got {p!r}.")
        for name, value, choices in (
            ("operation", operation, OPERATIONS),
            ("pairs", pairs, PAIRS),
            ("encoding", encoding, ENCODINGS),
            ("target", target, TARGETS),
        ):
            _check_choice(name, value, choices)
        if operation == "div" and not _is_prime(p):
            raise ValueError(f"Expected argument `p` to be prime for operation 'div', but got {p}.")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"Expected argument `train_fraction` to be in (0, 1), but got {train_fraction!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(
                f"Expected argument `batch_size` to be a positive integer or None, but got {batch_size!r}."
            )
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(
                f"Expected argument `steps_per_epoch` to be a positive integer, but got {steps_per_epoch!r}."
            )
        if steps_per_epoch > 1 and batch_size is not None:
            raise ValueError(
                f"Expected argument `steps_per_epoch` to be 1 with minibatches (batch_size={batch_size}), "
                f"but got {steps_per_epoch}."
            )
        self.save_hyperparameters()
        self.p, self.operation, self.pairs, self.encoding, self.target = p, operation, pairs, encoding, target
        self.train_fraction, self.batch_size, self.steps_per_epoch, self.seed = (
            train_fraction,
            batch_size,
            steps_per_epoch,
            seed,
        )

        a, b, label = modular_pairs(p, operation, pairs)
        n = label.shape[0]
        n_train = round(train_fraction * n)
        if not 0 < n_train < n:
            raise ValueError(
                f"Expected argument `train_fraction` to leave both splits non-empty, but got {train_fraction} "
                f"for {n} pairs ({n_train} training)."
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.train_index, self.val_index = order[:n_train].sort().values, order[n_train:].sort().values
        inputs = encode_pairs(a, b, p, encoding)
        targets = torch.nn.functional.one_hot(label, p).float() if target == "one_hot" else label
        self.operands = torch.stack([a, b], dim=1)  # (N, 2) int64, the residues of every pair
        self.labels = label  # (N,) int64
        self.train_inputs, self.train_targets = inputs[self.train_index], targets[self.train_index]
        self.val_inputs, self.val_targets = inputs[self.val_index], targets[self.val_index]

    @property
    def input_width(self) -> int:
        """Feature width of an example (sequence length for ``tokens``)."""
        return encoding_width(self.p, self.encoding)

    def _ranks(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> TensorBatches:
        rank, world_size = self._ranks()
        return TensorBatches(
            self.train_inputs,
            self.train_targets,
            batch_size=self.batch_size,
            shuffle=self.batch_size is not None,
            repeats=self.steps_per_epoch,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )

    def val_dataloader(self) -> TensorBatches:
        rank, world_size = self._ranks()
        return TensorBatches(self.val_inputs, self.val_targets, rank=rank, world_size=world_size)
