"""`twa bench` writes its results where the user runs it, never into the source tree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from twa_kernels import cli

REPO = Path(__file__).resolve().parent.parent


def test_twa_bench_writes_into_the_current_directory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda args, **kw: calls.append(args) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench"]) == 0
    json_arg = next(a for a in calls[0] if a.startswith("--benchmark-json="))
    out = Path(json_arg.split("=", 1)[1])
    assert out.parent == tmp_path.resolve()
    assert out.name.startswith("twa-bench-") and out.name.endswith("-quick.json")
    assert calls[1][-1] == str(out)  # the roofline report reads the same file


def test_twa_bench_out_chooses_the_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda args, **kw: calls.append(args) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--grid", "default", "--out", "run.json"]) == 0
    assert f"--benchmark-json={tmp_path.resolve() / 'run.json'}" in calls[0]


def test_twa_bench_runs_the_kernel_suites_and_they_exist(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda args, **kw: calls.append(args) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench"]) == 0
    suites = [a for a in calls[0] if a.endswith(".py")]
    assert [Path(s).name for s in suites] == list(cli.BENCH_SUITES)
    assert all(Path(s).is_file() for s in suites)


def test_the_roofline_skips_benchmarks_of_other_suites():
    spec = importlib.util.spec_from_file_location("_bench_report", REPO / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    run = {"benchmarks": [
        {"extra_info": {"op": "copy", "bytes": 2e9}, "stats": {"median": 0.1}},
        {"extra_info": {"model": "resnet18", "impl": "decor"}, "stats": {"median": 0.5}},  # no "op": decor's suite
        {"extra_info": {}, "stats": {"median": 0.2}},
    ]}
    got = report.build_report(run)
    assert got["rows"] == [] and got["copy_GBps"] == 20.0


def test_twa_bench_refuses_an_out_it_cannot_write_before_running_anything(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda args, **kw: calls.append(args) or 0)
    monkeypatch.chdir(tmp_path)
    for out in (str(tmp_path / "missing" / "run.json"), str(tmp_path)):
        assert cli.main(["bench", "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"twa: error: --out {out}")
    assert calls == []  # no benchmark ran
