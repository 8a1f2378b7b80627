"""The example entry points: the CLI runs a preset end to end and writes its summary, config and figure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_presets_are_valid_configs(config):
    """Every preset names the data, the model and the detector, and sets the steps to train."""
    content = yaml.safe_load(config.read_text())
    assert {"trainer", "data", "model"} <= content.keys()
    assert content["trainer"]["max_steps"] > 0
    assert "p" not in content["model"], "the CLI links model.p to data.p"


def test_reproduce_cli_runs_a_preset_end_to_end(tmp_path):
    """`reproduce.py fit --config ...` with a few steps writes config.yaml, summary.json and curves.png."""
    command = [
        sys.executable,
        str(ROOT / "examples" / "reproduce.py"),
        "fit",
        "--config",
        str(ROOT / "examples" / "configs" / "paper_mlp_mse_gd.yaml"),
        "--trainer.max_steps=60",
        "--data.steps_per_epoch=20",
        "--detector.every_n_steps=20",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [path for path in tmp_path.rglob("summary.json")]
    summary = json.loads(run.read_text())
    assert summary["steps"] == 60
    assert {"memorized_step", "generalized_step", "grok_delay", "wall_seconds", "final"} <= summary.keys()
    assert "grok/weight_norm" in summary["final"] and "val/acc" in summary["final"]
    assert (run.parent / "config.yaml").exists()
    assert (run.parent / "curves.png").stat().st_size > 0
    assert list(run.parent.glob("events.out.tfevents.*")), "TensorBoard is the default logger"


def test_reproduce_eq20_runs_seeds_in_parallel_workers(tmp_path):
    """`reproduce_eq20.py` with two worker processes returns every (init, seed) run, in order, with its curves."""
    command = [
        sys.executable,
        str(ROOT / "examples" / "reproduce_eq20.py"),
        "--config",
        str(ROOT / "examples" / "configs" / "paper_eq20.yaml"),
        "--inits",
        "std",
        "variance",
        "--seeds",
        "1",
        "0",
        "--max-steps",
        "60",
        "--workers",
        "2",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["max_steps"] == 60
    assert [(r["init"], r["seed"]) for r in summary["runs"]] == [
        ("std", 1),
        ("std", 0),
        ("variance", 1),
        ("variance", 0),
    ]
    for run in summary["runs"]:
        assert run["min_train_acc"] == 1.0  # the read-out interpolates the training set at every step
        assert run["reduced_cost"]["last"] < run["reduced_cost"]["first"]
    assert set(summary["summary"]) == {"std", "variance"}
    assert (tmp_path / "eq20.png").stat().st_size > 0


def test_reproduce_alignment_runs_one_seed_and_writes_its_summary(tmp_path):
    """`reproduce_alignment.py` on 1 seed and 120 steps writes alignment.json (the schema below) and alignment.png."""
    command = [
        sys.executable,
        str(ROOT / "examples" / "reproduce_alignment.py"),
        "--config",
        str(ROOT / "examples" / "configs" / "paper_mlp_mse_gd.yaml"),
        "--seeds=0",
        "--max-steps=120",
        "--tangent-every=20",
        "--workers=1",
        f"--out={tmp_path}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peak update alignment inside the grokking phase for 0/1 seeds" in result.stdout  # not generalized yet
    data = json.loads((tmp_path / "alignment.json").read_text())
    assert {"config", "settings", "summary", "runs"} <= data.keys()
    assert {"seeds", "peak_in_phase", "peak_steps", "memorized_steps", "generalized_steps", "wall_seconds"} <= set(
        data["summary"]
    )
    (run,) = data["runs"]
    assert run["seed"] == 0 and run["steps"] == 120 and run["generalized_step"] is None
    assert run["peak_in_phase"] is None and run["grokking_phase"] is None
    cosines = run["curves"]["grok/tangent/update_cos"]
    assert [step for step, _ in cosines] == [20, 40, 60, 80, 100, 120]  # measured from the start, every 20 steps
    assert (run["peak_step"], run["peak_update_cos"]) == tuple(max(cosines, key=lambda sv: sv[1]))
    assert all(-1 <= value <= 1 for _, value in run["curves"]["grok/eq20/update_cos"])
    assert (tmp_path / "alignment.png").stat().st_size > 0
