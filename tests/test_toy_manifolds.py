import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from toy_manifolds import run_toy, steps_to_settle


def test_toy_manifolds_one_plus_one_slides_to_equal_weights(toy_trajectory):
    """'1+1=2' from (−1, 1), λ = 0.2: ends at the regularized fixed point c·(1, 1), c = 2/2.2, as GD by hand."""
    run = run_toy((-1.0, 1.0), lam=0.2)
    assert run["steps"] == steps_to_settle(0.2) == 175
    expected = toy_trajectory((-1.0, 1.0), lr=0.1, wd=0.4, steps=run["steps"])  # GD by hand, float64
    torch.testing.assert_close(torch.tensor(run["end"], dtype=torch.float64), expected[-1], atol=1e-5, rtol=0)
    assert run["end"] == pytest.approx([2 / 2.2, 2 / 2.2], abs=1e-3)
    assert run["generalized_step"] is not None and run["generalized_step"] > run["memorized_step"]


def test_toy_manifolds_one_plus_one_memorizes_near_zero_two(toy_trajectory):
    """λ = 0.01: memorized (loss ≤ 0.05) within 10 steps, near (0, 2), at the step GD by hand says."""
    run = run_toy((-1.0, 1.0), lam=0.01, steps=20)
    expected = toy_trajectory((-1.0, 1.0), lr=0.1, wd=0.02, steps=20)
    first = int(torch.nonzero((expected.sum(dim=1) - 2) ** 2 <= 0.05)[0])
    assert run["memorized_step"] == first <= 10
    assert run["at_memorization"] == pytest.approx(expected[first].tolist(), abs=1e-5)
    assert run["at_memorization"] == pytest.approx([0.0, 2.0], abs=0.15)
    assert run["generalized_step"] is None  # 20 steps: still memorizing, not yet slid to (1, 1)
