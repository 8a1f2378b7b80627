"""The reference data module and models: splits, encodings, shapes, bad input, a short training."""

import math

import lightning.pytorch as pl
import pytest
import torch

from grok_lightning import GrokkingModule, ModularArithmeticDataModule
from grok_lightning.reference import TensorBatches, Transformer, TransformerConfig, modular_pairs


@pytest.mark.parametrize(
    ("operation", "pairs", "p", "count"),
    [("add", "ordered", 7, 49), ("add", "unordered", 11, 66), ("sub", "ordered", 5, 25), ("div", "ordered", 7, 42)],
)
def test_modular_pairs_counts_and_labels(operation, pairs, p, count):
    """Every pair appears once and its label is the operation mod p."""
    a, b, label = modular_pairs(p, operation, pairs)
    assert len(a) == count
    for x, y, z in zip(a.tolist(), b.tolist(), label.tolist(), strict=True):
        if operation == "div":
            assert y != 0
            expected = x * pow(y, -1, p) % p
        else:
            expected = {"add": x + y, "sub": x - y, "mul": x * y}[operation] % p
        assert z == expected
    if pairs == "unordered":
        assert bool((a <= b).all())


def test_data_module_split_is_deterministic_and_disjoint():
    """The same seed gives the same split; train and val partition the pairs."""
    first = ModularArithmeticDataModule(p=13, train_fraction=0.5, seed=3)
    second = ModularArithmeticDataModule(p=13, train_fraction=0.5, seed=3)
    other = ModularArithmeticDataModule(p=13, train_fraction=0.5, seed=4)
    assert torch.equal(first.train_index, second.train_index)
    assert not torch.equal(first.train_index, other.train_index)
    together = torch.cat([first.train_index, first.val_index]).sort().values
    assert torch.equal(together, torch.arange(169))
    assert len(first.train_index) == round(0.5 * 169)


def test_data_module_encodings_and_targets():
    """Each encoding has its documented width and content; one-hot targets match the class labels."""
    sums = ModularArithmeticDataModule(p=5, pairs="unordered", encoding="one_hot_sum", target="one_hot", seed=0)
    a, b = sums.operands[sums.train_index].T
    assert sums.train_inputs.shape[1] == 5
    assert torch.equal(sums.train_inputs, torch.eye(5)[a] + torch.eye(5)[b])
    assert torch.equal(sums.train_targets.argmax(1), sums.labels[sums.train_index])
    assert sums.train_targets.dtype == torch.float32

    concat = ModularArithmeticDataModule(p=5, encoding="one_hot_concat", seed=0)
    a, b = concat.operands[concat.train_index].T
    assert torch.equal(concat.train_inputs, torch.cat([torch.eye(5)[a], torch.eye(5)[b]], 1))
    assert concat.train_targets.dtype == torch.int64

    tokens = ModularArithmeticDataModule(p=5, encoding="tokens", seed=0)
    a, b = tokens.operands[tokens.train_index].T
    assert torch.equal(tokens.train_inputs, torch.stack([a, b, torch.full_like(a, 5)], 1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1}, "`p`.*got 1"),
        ({"p": 9, "operation": "div"}, "`p` to be prime.*got 9"),
        ({"train_fraction": 0.0}, "`train_fraction`.*got 0.0"),
        ({"train_fraction": 1.0}, "`train_fraction`.*got 1.0"),
        ({"p": 2, "train_fraction": 0.1}, "`train_fraction` to leave both splits non-empty"),
        ({"operation": "pow"}, "`operation`.*'pow'"),
        ({"pairs": "both"}, "`pairs`.*'both'"),
        ({"encoding": "binary"}, "`encoding`.*'binary'"),
        ({"target": "soft"}, "`target`.*'soft'"),
        ({"batch_size": 0}, "`batch_size`.*got 0"),
        ({"steps_per_epoch": 0}, "`steps_per_epoch`.*got 0"),
        ({"steps_per_epoch": 5, "batch_size": 8}, "`steps_per_epoch`.*got 5"),
    ],
)
def test_data_module_rejects_bad_input(kwargs, match):
    """Bad arguments raise ValueError naming the argument and value."""
    with pytest.raises(ValueError, match=match):
        ModularArithmeticDataModule(**kwargs)


def test_tensor_batches_shards_and_shuffles_without_global_rng():
    """Ranks get disjoint shards covering the data; shuffling leaves the global RNG alone."""
    data = torch.arange(10)
    state = torch.get_rng_state()
    shards = [list(TensorBatches(data, batch_size=2, shuffle=True, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(state, torch.get_rng_state())
    seen = torch.cat([batch[0] for shard in shards for batch in shard]).sort().values
    assert torch.equal(seen, data)
    loader = TensorBatches(data, repeats=3)
    assert len(loader) == 3
    assert all(torch.equal(batch[0], data) for batch in loader)
    assert len(TensorBatches(data, batch_size=4)) == 3


@pytest.mark.parametrize(("loss", "target"), [("mse", "one_hot"), ("cross_entropy", "class")])
@pytest.mark.parametrize("architecture", ["mlp", "transformer"])
def test_module_output_shapes_and_losses(architecture, loss, target):
    """Both architectures map a batch to (N, p) outputs; both losses give finite scalars."""
    encoding = "tokens" if architecture == "transformer" else "one_hot_concat"
    dm = ModularArithmeticDataModule(p=7, encoding=encoding, target=target)
    model = GrokkingModule(p=7, encoding=encoding, architecture=architecture, loss=loss, hidden=8, d_model=8, d_mlp=16)
    outputs = model(dm.train_inputs)
    assert outputs.shape == (len(dm.train_inputs), 7)
    assert model.per_sample_loss(outputs, dm.train_targets).shape == (len(dm.train_inputs),)
    assert torch.isfinite(model.loss(outputs, dm.train_targets))


def test_module_mse_reduction_matches_the_documented_formula():
    """MSE sums over outputs and averages (or sums) over samples; class targets are one-hot encoded."""
    outputs, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    reference = ((outputs - torch.eye(3)[labels]) ** 2).sum()
    mean = GrokkingModule(p=3, encoding="one_hot_sum", loss="mse", mse_reduction="mean")
    total = GrokkingModule(p=3, encoding="one_hot_sum", loss="mse", mse_reduction="sum")
    assert math.isclose(mean.loss(outputs, labels).item(), reference.item() / 4, rel_tol=1e-6)
    assert math.isclose(total.loss(outputs, torch.eye(3)[labels]).item(), reference.item(), rel_tol=1e-6)
    ce = GrokkingModule(p=3, encoding="one_hot_sum", loss="cross_entropy")
    expected = torch.nn.functional.cross_entropy(outputs, labels)
    assert math.isclose(ce.loss(outputs, torch.eye(3)[labels]).item(), expected.item(), rel_tol=1e-6)


def test_transformer_last_position_matches_full_causal_block():
    """Computing only the read-out position equals a full causal block read at the last position."""
    torch.manual_seed(0)
    net = Transformer(TransformerConfig(vocab_size=8, d_model=16, n_heads=4, d_mlp=32, output_width=7))
    tokens = torch.randint(0, 8, (5, 3))
    n, t, h, dh = 5, 3, 4, 4
    x = net.token_embedding(tokens) + net.position_embedding(torch.arange(t))
    q, k, v = net.qkv(x).view(n, t, 3, h, dh).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~torch.ones(t, t).tril().bool(), -math.inf)
    x = x + net.attn_out((scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, -1))
    x = x + net.mlp_out(torch.relu(net.mlp_in(x)))
    torch.testing.assert_close(net(tokens), net.unembed(x[:, -1]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"architecture": "rnn"}, "`architecture`.*'rnn'"),
        ({"loss": "hinge"}, "`loss`.*'hinge'"),
        ({"optimizer": "lbfgs"}, "`optimizer`.*'lbfgs'"),
        ({"mse_reduction": "none"}, "`mse_reduction`.*'none'"),
        ({"hidden": 0}, "`hidden`.*got 0"),
        ({"lr": 0.0}, "`lr`.*got 0.0"),
        ({"weight_decay": -1.0}, "`weight_decay`.*got -1.0"),
        ({"architecture": "transformer"}, "`encoding` to be 'tokens'"),
        ({"activation": "tanh"}, "`activation`.*'tanh'"),
        ({"architecture": "transformer", "encoding": "tokens", "d_model": 10, "n_heads": 4}, "`d_model`.*got 10"),
    ],
)
def test_module_rejects_bad_input(kwargs, match):
    """Bad arguments raise ValueError naming the argument and value."""
    with pytest.raises(ValueError, match=match):
        GrokkingModule(**kwargs)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_short_training_memorizes_a_tiny_task(tmp_path, optimizer):
    """A few hundred full-batch steps fit the training pairs of (a + b) mod 7."""
    pl.seed_everything(0)
    dm = ModularArithmeticDataModule(p=7, train_fraction=0.6, steps_per_epoch=50)
    lr = 0.5 if optimizer == "sgd" else 1e-2
    model = GrokkingModule(p=7, hidden=64, optimizer=optimizer, lr=lr, weight_decay=1e-4, momentum=0.9)
    trainer = pl.Trainer(
        max_steps=300,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 300
    assert trainer.callback_metrics["train/acc"] == 1.0
    assert "val/acc" in trainer.callback_metrics
    with torch.no_grad():
        accuracy = (model(dm.train_inputs).argmax(1) == dm.train_targets).float().mean()
    assert accuracy == 1.0
