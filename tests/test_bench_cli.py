"""`twa bench` writes its results where the user runs it, never into the source tree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from twa_kernels import cli

REPO = Path(__file__).resolve().parent.parent


RESULTS = '{"benchmarks": [{"name": "copy"}]}'


def _benchmarks_writing(calls: list, code: int = 0, written: str = RESULTS):
    """subprocess.call as the benchmarks run it: pytest writes its --benchmark-json, then
    exits with `code`; the report only records its call."""
    def call(args, **kw):
        calls.append(args)
        json_arg = next((a for a in args if a.startswith("--benchmark-json=")), None)
        if json_arg:
            Path(json_arg.split("=", 1)[1]).write_text(written)
            return code
        return 0
    return call


def test_twa_bench_writes_into_the_current_directory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", _benchmarks_writing(calls))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench"]) == 0
    out = Path(calls[1][-1])  # the file the roofline report reads
    assert out.parent == tmp_path.resolve()
    assert out.name.startswith("twa-bench-") and out.name.endswith("-quick.json")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_twa_bench_out_chooses_the_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", _benchmarks_writing(calls))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--grid", "default", "--out", "run.json"]) == 0
    assert (tmp_path / "run.json").read_text() == RESULTS
    assert calls[1][-1] == str(tmp_path.resolve() / "run.json")


def test_a_failed_twa_bench_run_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", _benchmarks_writing(calls, code=1))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.json").write_text("earlier run")
    assert cli.main(["bench", "--out", "run.json"]) == 1
    assert (tmp_path / "run.json").read_text() == "earlier run"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # the partial file is gone
    assert len(calls) == 1  # no report of a failed run


def test_a_twa_bench_run_that_timed_nothing_leaves_the_earlier_files_whole(tmp_path, monkeypatch, capsys):
    # pytest passed with the benchmarks switched off (PYTEST_ADDOPTS=--benchmark-disable, -n):
    # the earlier results became an empty file and the report a traceback
    for written in ('{"benchmarks": []}', ""):
        calls = []
        monkeypatch.setattr(cli.subprocess, "call", _benchmarks_writing(calls, written=written))
        monkeypatch.chdir(tmp_path)
        (tmp_path / "run.json").write_text("earlier run")
        (tmp_path / "run-roofline.json").write_text("earlier roofline")
        assert cli.main(["bench", "--out", "run.json"]) == 2
        assert "timed no benchmark" in capsys.readouterr().err and len(calls) == 1
        assert (tmp_path / "run.json").read_text() == "earlier run"
        assert (tmp_path / "run-roofline.json").read_text() == "earlier roofline"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run-roofline.json", "run.json"]
    monkeypatch.setenv("PYTEST_ADDOPTS", "--benchmark-disable")
    seen = []
    monkeypatch.setattr(cli.subprocess, "call", lambda args, **kw: seen.append(kw["env"]) or 1)
    cli.main(["bench", "--out", "run.json"])
    assert "PYTEST_ADDOPTS" not in seen[0]


def test_twa_bench_runs_the_kernel_suites_and_they_exist(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", _benchmarks_writing(calls))
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
    (tmp_path / "blocked-roofline.json").mkdir()  # where the roofline table's JSON would go
    for out, named in ((str(tmp_path / "missing" / "run.json"), "run.json"), (str(tmp_path), tmp_path.name),
                       ("blocked.json", "blocked-roofline.json"), ("x" * 300 + ".json", None)):
        assert cli.main(["bench", "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("twa: error: ")
        assert f"{named} (from --out {out})" in err[0] if named else "give a shorter path" in err[0]
    assert calls == []  # no benchmark ran
