"""bench/gpu.py, the scripted GPU run, dry-run on the CPU: its logic (grid, baselines, JSON)
with tiny models, the Triton kernels in the interpreter and torch.cuda's timing stubbed out.
It cannot say anything about GPU speed; it keeps the script from rotting between GPU runs."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import twa_kernels

REPO = Path(twa_kernels.__file__).resolve().parent.parent

DRY_RUN = """
import sys, time
import torch

class Event:
    def __init__(self, enable_timing=True):
        self.t = None
    def record(self):
        self.t = time.perf_counter()
    def synchronize(self):
        pass
    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3

torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda *a: "Dry Run"
torch.cuda.mem_get_info = lambda *a: (10**11, 10**11)
torch.cuda.Event = Event
torch.cuda.synchronize = lambda *a: None
torch.cuda.empty_cache = lambda *a: None
sys.path.insert(0, "bench")
import gpu
gpu.DEVICE = "cpu"
gpu.MODELS = {"88M": lambda: [3000, 10, 2000], "1B": lambda: [5000, 7]}
gpu.copy_bandwidth_gbps = lambda: 20.0
timer = gpu.cuda_time_ms
gpu.cuda_time_ms = lambda fn, min_reps=10, min_ms=300.0, warmup=2: timer(fn, 2, 0, 1)
sys.argv = ["gpu.py", "--quick", "--no-peers", "--out", sys.argv[1]]
sys.exit(gpu.main())
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="the dry run uses the Triton kernels in the interpreter")
def test_gpu_bench_script_runs_and_writes_its_json(tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("TWA_KERNELS_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", DRY_RUN, str(out)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "Dry Run" and report["failures"] == []
    assert report["stamp"]["torch"] == torch.__version__
    impls = {(r["op"], r["impl"]) for r in report["rows"]}
    # the Triton backend for each op, and the baselines timed in the same run
    assert {("project", "triton"), ("reconstruct", "triton"), ("twa_step", "triton")} <= impls
    assert {("project_bf16", "triton"), ("reconstruct_bf16", "triton")} <= impls  # a bfloat16 model's step
    assert {("project", "reference"), ("twa_step", "reference"), ("twa_step", "paper")} <= impls
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in report["rows"])
    assert "x paper" in result.stdout

    # bench/report.py renders the run into the docs' GPU section: one row per backend and
    # baseline, the speed-up over the paper's path, and the grid
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import report as bench_report

    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu-dry-run-cuda-ops.json").write_text(out.read_text())
    monkeypatch.setattr(bench_report, "RESULTS", results)
    monkeypatch.setattr(bench_report, "_link", lambda path, page: path.name)  # outside the repository
    table = bench_report.cuda_ops(REPO / "docs" / "benchmarks.md")
    assert table.startswith("**Dry Run")
    lines = table.splitlines()
    triton_step = next(line for line in lines if line.startswith("| twa_step | 16 | triton backend |"))
    assert triton_step.rstrip(" |").endswith("x")  # against the paper's step of the same run
    assert any(line.startswith("| 88M | 16 | 4 | ") for line in lines)
    # a GPU file beside the CPU suites' (as gpu_run.sh leaves it in bench/results): `*-ops.json`
    # matched it too, and every CPU table stopped on its missing "benchmarks"
    for name in ("cpu-epyc-2core-ops.json", "cpu-epyc-2core-ops-interleaved.json"):
        (results / name).write_text((REPO / "bench" / "results" / name).read_text())
    assert [p.name for p in bench_report._files("ops")] == ["cpu-epyc-2core-ops.json"]
    assert bench_report.ops(REPO / "docs" / "benchmarks.md").startswith("**AMD EPYC")


def test_results_are_filed_under_the_device_they_measured(monkeypatch):
    # on a machine with a GPU, the CPU suites' files were named after the GPU
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import stamp

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert stamp.machine_slug().startswith("cpu-") and stamp.machine_slug().endswith(f"-{os.cpu_count()}core")
    assert stamp.machine_slug(gpu=True) == "gpu-h100-80gb-hbm3"
