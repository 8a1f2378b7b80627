"""Every callback under data parallelism and sharding, against a single-process run on the same global batch.

One launch of ``ddp_run.py`` (2 CPU processes, gloo, under a timeout: a collective called on one rank alone hangs and
fails the test instead of blocking the suite) trains the tiny task twice: under DDP with every callback, and under
FSDP2 (``fully_shard``, weights held as DTensor shards) with the callbacks that support sharding. Strategies Lightning
cannot run on CPU (FSDP1) are checked where they are refused: at fit start.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from grok_lightning import ZeroLossDetector
from reliability.harness import TINY_SETTING, TINY_STEPS, RecordingLogger, disabled, tiny_task, tiny_trainer
from reliability.registry import CALLBACKS, VOLATILE, callbacks_for, specs_for

SCRIPT = Path(__file__).with_name("ddp_run.py")
pytestmark = pytest.mark.distributed


def grok_entries(entries):
    """The grok/ entries as (step, key, value), wall-time values blanked."""
    return [(step, key, None if key in VOLATILE else value) for step, key, value in entries if key.startswith("grok/")]


def by_key(entries):
    out = {}
    for step, key, value in grok_entries(entries):
        out.setdefault(key, []).append((step, value))
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Both distributed runs, each rank's record: {"ddp": [rank 0, rank 1], "fsdp": [rank 0, rank 1]}."""
    out = tmp_path_factory.mktemp("distributed")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=180, cwd=out
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {kind: [json.loads((out / f"{kind}_rank{r}.json").read_text()) for r in (0, 1)] for kind in ("ddp", "fsdp")}


@pytest.fixture(scope="module")
def single():
    """The same training on one process: its logged entries, the detector's events and the final weights."""
    module, data = tiny_task()
    callbacks = callbacks_for(module, TINY_SETTING)
    recorder = RecordingLogger()
    trainer = tiny_trainer(recorder, callbacks)
    trainer.fit(module, data)
    assert not disabled(callbacks)
    detector = next(c for c in callbacks if isinstance(c, ZeroLossDetector))
    weights = [p.detach().tolist() for p in module.parameters()]
    return {
        "entries": recorder.entries,
        "events": [detector.memorized_step, detector.generalized_step],
        "weights": weights,
    }


def assert_close_to_single(record, single, exclude=()):
    """Every grok/ series of ``record`` has the single-process run's steps and, within float tolerance, its values
    (keys starting with one of ``exclude`` left out of the single-process run)."""
    got, expected = by_key(record["entries"]), by_key(single["entries"])
    expected = {key: values for key, values in expected.items() if not key.startswith(tuple(exclude))}
    assert got.keys() == expected.keys()
    for key, values in expected.items():
        assert [step for step, _ in got[key]] == [step for step, _ in values], key
        if key not in VOLATILE:
            # DDP averages the two shards' gradients where one process averages all rows: rounding differs.
            assert [v for _, v in got[key]] == pytest.approx([v for _, v in values], rel=1e-4, abs=1e-7), key


def test_ddp_every_rank_logs_the_same(launched):
    """Both ranks log the same grok/ values at the same steps, hold the same callback_metrics after every batch, and
    find the events at the same steps; no callback was disabled."""
    ranks = launched["ddp"]
    assert grok_entries(ranks[0]["entries"]) == grok_entries(ranks[1]["entries"])
    for metrics in (r["metrics"] for r in ranks):
        for values in metrics.values():
            for key in VOLATILE & values.keys():
                values[key] = None
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["events"] == ranks[1]["events"] == [30, 45]
    assert ranks[0]["disabled"] == ranks[1]["disabled"] == []
    logged = {key for _, key, _ in ranks[0]["entries"]}
    for spec in specs_for(tiny_task()[0]):
        assert set(spec.keys) <= logged, spec.name


def test_ddp_equals_a_single_process_run(launched, single):
    """Every grok/ series under DDP equals the single-process run's on the same global batch; same events."""
    assert_close_to_single(launched["ddp"][0], single)
    assert launched["ddp"][0]["events"] == single["events"]
    for got, expected in zip(launched["ddp"][0]["weights"], single["weights"], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-6)


def test_ddp_collectives_are_called_on_every_rank_alike(launched):
    """Every collective (torch.distributed call) is made by both ranks, in the same order, from the same callback's
    hook; the detector's all-reduce is among them (the instrumentation sees callbacks' collectives)."""
    calls = [[tuple(call) for call in r["calls"]] for r in launched["ddp"]]
    assert calls[0] == calls[1]
    assert calls[0].count(("ZeroLossDetector", "all_reduce")) >= TINY_STEPS // TINY_SETTING.every_n_steps + 1


def test_fsdp_norm_is_the_unsharded_norm(launched, single):
    """Under FSDP2 each rank holds shards of the weights, yet the norm monitor logs the norm of the whole model (that
    of the gathered weights, the single-process value); the other callbacks that support sharding agree too."""
    ranks = launched["fsdp"]
    assert ranks[0]["sharded"]["NormDescentMonitor"] and all(ranks[0]["sharded"]["NormDescentMonitor"])
    assert grok_entries(ranks[0]["entries"]) == grok_entries(ranks[1]["entries"])
    assert ranks[0]["disabled"] == ranks[1]["disabled"] == []
    # The callbacks that refuse sharding did not run: their keys are left out of the comparison.
    refused = [prefix for spec in CALLBACKS if not spec.sharded for prefix in spec.prefixes]
    assert_close_to_single(ranks[0], single, exclude=refused)
    logged = {key for _, key, _ in ranks[0]["entries"]}
    for spec in (spec for spec in CALLBACKS if spec.sharded):
        assert set(spec.keys) <= logged, spec.name
    whole = sum(float(torch.tensor(w, dtype=torch.float64).square().sum()) for w in ranks[0]["weights"]) ** 0.5
    final = [value for step, key, value in ranks[0]["entries"] if key == "grok/weight_norm" and step == TINY_STEPS]
    assert final == [pytest.approx(whole, rel=1e-6)]


class ShardedOnCPU(FSDPStrategy):
    """A user's FSDP strategy under another name (Lightning refuses plain FSDP on CPU, not a subclass)."""


@pytest.mark.parametrize("refusing", [s for s in CALLBACKS if not s.sharded], ids=lambda s: s.name)
def test_jacobian_callbacks_refuse_sharded_strategies(refusing):
    """Callbacks that need θ whole on one rank refuse FSDP, FSDP2 and subclasses of them when fitting starts."""
    module = tiny_task()[0]
    trainers = [
        types.SimpleNamespace(strategy=FSDPStrategy()),  # Lightning builds no FSDP Trainer on CPU
        pl.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(2, 1), logger=False),
        pl.Trainer(accelerator="cpu", devices=2, strategy=ShardedOnCPU(), logger=False),
    ]
    for trainer in trainers:
        callback = refusing.make(TINY_SETTING)
        with pytest.raises(MisconfigurationException, match=type(trainer.strategy).__name__):
            callback.setup(trainer, module, "fit")
