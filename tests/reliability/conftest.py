"""The reliability tests run every callback in :data:`reliability.registry.CALLBACKS`; register new ones there."""

from __future__ import annotations

import pytest

from reliability.registry import CALLBACKS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that asks for ``spec`` runs once per registered callback."""
    if "spec" in metafunc.fixturenames:
        metafunc.parametrize("spec", CALLBACKS, ids=[spec.name for spec in CALLBACKS])


@pytest.fixture
def trainer_options():
    """Options of a small deterministic CPU Trainer; the caller adds callbacks, logger and steps."""

    def options(**kwargs) -> dict:
        base = {
            "accelerator": "cpu",
            "devices": 1,
            "deterministic": True,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "num_sanity_val_steps": 0,
        }
        return {**base, **kwargs}

    return options
