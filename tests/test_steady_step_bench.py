"""bench/steady_step.py's training phase splits each step into forward, backward and
optimizer step, and bench/report.py renders that split."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_on_path():
    """steady_step puts bench/ on sys.path to import its helpers (conftest, resnet, shapes):
    undone afterwards, so that no later test imports bench's conftest for its own."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    bench = str(REPO / "bench")
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "") or "").startswith(bench):
            del sys.modules[name]


def test_every_training_step_records_its_three_phases(bench_on_path):
    steady_step = _load("steady_step")
    result = steady_step.training_steps(rounds=1, profile=False)
    phases = result["median_phase_ms"]
    assert set(phases) == set(result["median_ms"]) == {"sgd", "twa", "twa_int8_gradients", "twa_fresh_output"}
    for name, split in phases.items():
        assert list(split) == ["forward", "backward", "update"], name
        assert all(ms > 0 for ms in split.values()), (name, split)


def test_the_small_layout_has_resnet18s_tensors_at_a_sixteenth_of_its_channels(bench_on_path):
    steady_step = _load("steady_step")
    small = steady_step.small_layout_steps(rounds=2)
    assert small["tensors"] == 62 and small["weights"] == 45_102
    assert set(small["median_ms"]) == {"sgd", "twa"} and all(ms > 0 for ms in small["median_ms"].values())
    assert small["twa_minus_sgd_ms"] == small["median_ms"]["twa"] - small["median_ms"]["sgd"]


def test_the_report_shows_the_phase_split_of_each_run():
    report = _load("report")
    split = {"sgd": {"forward": 20.0, "backward": 45.0, "update": 5.5},
             "twa": {"forward": 28.5, "backward": 51.3, "update": 0.3}}
    runs = [{"training_step_kept_heap": {"median_phase_ms": split}}] * 2
    rows = report._phase_rows(runs, "training_step_kept_heap")
    assert rows[1].startswith("| run | heap kept, forward")
    assert rows[3:] == ["| 1 | 20.0 / 28.5 | 45.0 / 51.3 | 5.5 / 0.3 |", "| 2 | 20.0 / 28.5 | 45.0 / 51.3 | 5.5 / 0.3 |"]
    small = {"median_ms": {"sgd": 7.25, "twa": 8.31}}
    rows = report._phase_rows([{"training_step": {"median_phase_ms": split, "small_layout": small}}], "training_step")
    assert rows[1].endswith("| 1/16 width, SGD / TWA ms |")
    assert rows[3] == "| 1 | 20.0 / 28.5 | 45.0 / 51.3 | 5.5 / 0.3 | 7.25 / 8.31 |"
    # files written before the split have no phases: no table rather than a KeyError
    assert report._phase_rows([{"training_step": {"median_ms": {}}}], "training_step") == []


def test_results_are_written_whole_and_too_few_calls_are_refused(tmp_path, bench_on_path):
    # the scripts wrote with write_text: an interrupted run left half a JSON; --calls 10 or
    # fewer ended in statistics.median([]) inside a worker, as a CalledProcessError
    import json
    import subprocess

    stamp = _load("stamp")
    out = tmp_path / "sub" / "result.json"
    stamp.write_result(out, {"stamp": {"cpu": "x"}, "value": 1.5})
    assert json.loads(out.read_text()) == {"stamp": {"cpu": "x"}, "value": 1.5}
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]
    done = subprocess.run([sys.executable, str(REPO / "bench" / "steady_step.py"), "--calls", "10"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--calls must be more than 10, got 10" in done.stderr
