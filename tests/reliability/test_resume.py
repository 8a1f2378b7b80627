"""A run resumed from a checkpoint continues every callback as if it had never stopped.

One uninterrupted run of the tiny task with every callback saves checkpoints as Lightning users do: every 16 steps
(at a batch end, mid-epoch) and after each validation (at an epoch end). Runs resumed from three of them (``ckpt_path``)
must log, for every ``grok/`` key, exactly the values the uninterrupted run logged after the checkpoint (none again,
none missing, same steps, same values), announce only the events the uninterrupted run announced after it, and end in
the same callback state.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from reliability.harness import TINY_SETTING, RecordingLogger, disabled, tiny_task, tiny_trainer
from reliability.registry import VOLATILE, callbacks_for, specs_for

# Checkpoints resumed from: inside the memorization streak (step 32, mid-epoch), after the validation whose result the
# detector has not yet read (step 40, epoch end), inside the generalization streak (step 48, mid-epoch).
RESUME_FROM = ("step=32", "step=40-validated", "step=48")
EVENT = re.compile(r"(memorized|generalized) at step (\d+)")


def train(tmp_path, ckpt_path=None):
    """Fit the tiny task with every callback; checkpoints only when ``ckpt_path`` is None (the uninterrupted run)."""
    module, data = tiny_task()
    callbacks = callbacks_for(module, TINY_SETTING)
    assert len(callbacks) == len(specs_for(module)) >= 5
    checkpoints = []
    if ckpt_path is None:
        checkpoints = [
            ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=16, save_top_k=-1),
            ModelCheckpoint(tmp_path, filename="{step}-validated", save_top_k=-1),  # after each validation
        ]
    recorder = RecordingLogger()
    trainer = tiny_trainer(
        recorder, [*callbacks, *checkpoints], deterministic=True, enable_checkpointing=bool(checkpoints)
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert not disabled(callbacks)
    return recorder, callbacks


def states_equal(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.allclose(a, b, rtol=1e-6)
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6)
    return a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run: its records, callbacks, announced events (confirming step, text) and checkpoints."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    records = _Announcements()
    with records.capture():
        recorder, callbacks = train(tmp_path)
    return recorder, callbacks, records.events(recorder), tmp_path


class _Announcements(logging.Handler):
    """The detector's event lines, in order."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if EVENT.search(record.getMessage()):
            self.lines.append(record.getMessage())

    def capture(self):
        logger = logging.getLogger("grok_lightning")
        handler = self

        class _Scope:
            def __enter__(self):
                self.level = logger.level
                logger.setLevel(logging.INFO)
                logger.addHandler(handler)

            def __exit__(self, *exc):
                logger.removeHandler(handler)
                logger.setLevel(self.level)

        return _Scope()

    def events(self, recorder: RecordingLogger) -> list[tuple[int, str]]:
        """Each line with the step of the check that confirmed it (where its 0/1 flag first reads 1)."""
        series = recorder.series()
        out = []
        for line in self.lines:
            kind = EVENT.search(line).group(1)
            confirmed = next(step for step, value in series[f"grok/{kind}"] if value == 1.0)
            out.append((confirmed, line))
        return out


def test_uninterrupted_run_has_events_on_both_sides_of_each_resume(uninterrupted):
    """The setup exercises what the resume test claims: memorized between steps 32 and 40, generalized after 48,
    every callback logged, and the checkpoints exist."""
    recorder, _, events, tmp_path = uninterrupted
    assert [(step, kind) for step, line in events for kind in [EVENT.search(line).group(1)]] == [
        (35, "memorized"),
        (55, "generalized"),
    ]
    series = recorder.series()
    for spec in specs_for(tiny_task()[0]):
        assert set(spec.keys) <= series.keys(), spec.name
    assert set(RESUME_FROM) <= {path.stem for path in tmp_path.glob("*.ckpt")}


@pytest.mark.parametrize("checkpoint", RESUME_FROM)
def test_resumed_run_continues_every_callback(uninterrupted, checkpoint, tmp_path):
    """Every grok/ series after the checkpoint, step by step, equals the uninterrupted run's; events seen before it
    are not announced again; the callbacks end in the same state."""
    full, full_callbacks, events, checkpoints = uninterrupted
    resume_step = int(re.search(r"step=(\d+)", checkpoint).group(1))
    announcements = _Announcements()
    with announcements.capture():
        resumed, callbacks = train(tmp_path, ckpt_path=checkpoints / f"{checkpoint}.ckpt")

    expected = {
        key: [(step, value) for step, value in values if step > resume_step] for key, values in full.series().items()
    }
    expected = {key: values for key, values in expected.items() if values}
    got = resumed.series()
    assert got.keys() == expected.keys()
    for key, values in expected.items():
        assert [step for step, _ in got[key]] == [step for step, _ in values], key
        if key not in VOLATILE:  # wall times differ from run to run
            assert [value for _, value in got[key]] == pytest.approx([value for _, value in values], rel=1e-6), key
    assert announcements.lines == [line for step, line in events if step > resume_step]
    for before, after in zip(full_callbacks, callbacks, strict=True):
        assert states_equal(after.state_dict(), before.state_dict()), type(after).__name__
