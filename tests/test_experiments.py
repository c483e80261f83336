"""The experiment scripts (python -m experiments.<name>): their shared module, and each fair
protocol run end to end at a tiny size (seconds), checking what its fair.json must hold."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch import nn

import twa_kernels as tk
from experiments import common, dbp, dwf, lmc_sparse
from twa_kernels.errors import InvalidArgumentError

VERDICTS = {"holds", "partly", "does not hold", "not shown", "not testable at this scale"}


def test_make_mlp_and_accuracy():
    model = common.make_mlp(0, (40, 16, 10))
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    x = torch.randn(5, 1, 40)
    y = model(x).argmax(1)
    assert common.accuracy(model, torch.utils.data.TensorDataset(x, y)) == 1.0
    with pytest.raises(InvalidArgumentError, match="widths"):
        common.make_mlp(0, (40,))


def test_mean_ci():
    ci = common.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["n"] == 3
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n)
    assert ci["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert common.mean_ci([5.0])["ci95"] is None


def test_stamp_and_write_report(tmp_path):
    path = common.write_report(tmp_path / "r.json", {"a": 1})
    report = json.loads(path.read_text())
    assert report["a"] == 1 and {"datetime", "commit", "torch", "cpu"} <= set(report["stamp"])


def test_covariance_plan_gives_twice_the_width():
    model = dbp.MODELS["cnn"](0)
    plan, every = dbp.covariance_plan(model, torch.randn(64, 1, 40))
    for name, row in plan.items():
        assert row["rows_per_update"] >= dbp.ROWS_FACTOR * row["d"], name
    linear = [row for name, row in plan.items() if isinstance(model.get_submodule(name), nn.Linear)]
    assert all(row["fraction"] == 1.0 for row in linear)
    assert every == math.ceil(dbp.ROWS_FACTOR * 320 / 64)
    dbp.decorrelate_by_plan(model, plan, 1e-3, 0.01)
    fractions = {n: m.decor_sample_fraction for n, m in tk.decor.decorrelated_layers(model)}
    assert fractions == {n: row["fraction"] for n, row in plan.items()}


def _fair(module, tmp_path, capsys):
    report = module.main(["fair", "--size", "tiny", "--jobs", "1", "--out", str(tmp_path)])
    capsys.readouterr()
    saved = json.loads((tmp_path / "fair.json").read_text())
    assert (tmp_path / "fair.png").stat().st_size > 0
    assert {"protocol", "seeds", "verdict", "summary", "stamp"} <= set(saved)
    return report, saved


def test_dbp_fair_tiny(tmp_path, capsys):
    _, saved = _fair(dbp, tmp_path, capsys)
    assert saved["verdict"] in VERDICTS
    assert saved["protocol"]["cov_rows_factor"] >= 2 and saved["protocol"]["kappas"]
    for model_name in dbp.MODELS:
        row = saved["table"][model_name]
        assert len(row["per_seed"]) == len(saved["seeds"])
        assert row["final_test"]["dbp_minus_bp"]["ci95"] is not None
    assert saved["resnet18_projection"]["rules"]["2d rows"]["overhead"] > 0


def test_dbp_times_a_miss_as_one_epoch_past_the_end_at_the_trained_epochs_mean():
    curve = [{"seconds": s} for s in (1.0, 2.0, 3.0, 4.0)]
    assert dbp.seconds_to(curve, 2) == 2.0 and dbp.seconds_to(curve, None) == 5.0
    # diverged in epoch 3: its seconds stop there, and the epochs after it took no time
    diverged = [{"seconds": s} for s in (1.0, 2.0, 2.0, 2.0)]
    assert dbp.seconds_to(diverged, None) == 5.0


def test_dbp_verdict_tells_not_shown_from_does_not_hold():
    # the claim is fewer epochs and less wall-clock on every model; intervals that include no
    # difference show nothing either way, and were read as "does not hold"
    def row(saved, ratio):
        ci = lambda lo, hi: {"mean": (lo + hi) / 2, "ci95": [lo, hi]}  # noqa: E731
        return {"epochs_saved": ci(*saved), "wallclock_ratio": ci(*ratio), "wallclock_ratio_projected": ci(*ratio),
                "dbp_reached_bp_peak": "5/5", "per_seed": [{"bp_epochs": 10}],
                "secondary_shared_target": {"epochs_saved": ci(*saved)},
                "final_test": {m: ci(0.9, 0.95) for m in ("bp", "dbp", "dbp_minus_bp")}}

    projection = {"size": 224, "batch": 256, "rules": {"2d rows": {"overhead": 1.3}, "10% of rows": {"overhead": 0.7}}}
    include, fewer, more = (-3, 12), (1, 9), (-9, -1)
    faster, tie, slower = (0.5, 0.9), (0.9, 1.2), (1.1, 2.2)
    cases = {("not shown", (include, tie), (include, tie)), ("partly", (fewer, tie), (include, tie)),
             ("holds", (fewer, faster), (fewer, faster)), ("does not hold", (include, slower), (include, tie)),
             ("does not hold", (more, tie), (fewer, faster))}
    for expected, cnn, mlp in cases:
        verdict, _ = dbp.fair_verdict({"cnn": row(*cnn), "mlp": row(*mlp)}, projection)
        assert verdict == expected, (cnn, mlp)


def test_dwf_fair_tiny(tmp_path, capsys):
    _, saved = _fair(dwf, tmp_path, capsys)
    assert saved["verdict"] in VERDICTS
    assert saved["protocol"]["init"].startswith("dwf:")
    methods = {r["method"] for r in saved["rows"]}
    assert {"dense", "magnitude", "magnitude+FT", "L1+threshold", "DWF D=2", "DWF D=3"} <= methods
    assert len(saved["seeds"]) >= 2


def test_dwf_fair_takes_its_seeds_from_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):  # one seed gives no interval
        dwf.main(["fair", "--size", "tiny", "--seeds", "1", "--out", str(tmp_path)])
    assert "--seeds must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "fair.json").exists()
    dwf.main(["fair", "--size", "tiny", "--jobs", "1", "--seeds", "3", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "fair.json").read_text())["seeds"] == [1, 2, 3]  # seed 0 is the selection's


def test_lmc_sparse_fair_needs_two_seeds_for_its_intervals(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lmc_sparse.main(["fair", "--size", "tiny", "--seeds", "1", "--out", str(tmp_path)])
    assert "--seeds must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "fair.json").exists()


def test_lmc_sparse_fair_tiny(tmp_path, capsys):
    _, saved = _fair(lmc_sparse, tmp_path, capsys)
    cal = saved["calibration"]
    assert len(cal["dense"]) == 2 and all("error_barrier" in r for r in cal["dense"])
    assert saved["verdict"] in VERDICTS | {None}


def test_lmc_sparse_stability_runs_tiny(tmp_path):
    """The stage that runs when the calibration finds an unstable setting."""
    cal, full = lmc_sparse.CAL_SIZES["tiny"], lmc_sparse.FULL_SIZES["tiny"]
    results = lmc_sparse.run_full(dict(width=8, lr=0.1, shift=2), cal, full, 1, str(tmp_path))
    assert {r["method"] for r in results} == {"real", "ipc 2"}
    assert all("dense_on_distilled_test_acc" in r for r in results if r["method"] != "real")
    tables = lmc_sparse.full_tables(results, full)
    assert {"real | round 0 | whole state", "real | round 0 | weights only",
            "ipc 2 | round 1 | weights only"} <= set(tables["table"])
    assert "ipc 2 | round 1 | whole state minus real" in tables["paired_error_barrier"]
    assert lmc_sparse.full_verdict(tables) in VERDICTS


def _dwf_rows(dwf_val_and_compression: list[tuple[float, float]], magnitude: list[tuple[float, float]]) -> list[dict]:
    """Rows of two seeds (1, 2): a dense model at validation 0.9, and per seed one DWF and one
    magnitude setting of (validation accuracy, compression)."""
    rows = []
    for seed, (d, m) in enumerate(zip(dwf_val_and_compression, magnitude), start=1):
        rows.append(dict(method="dense", seed=seed, val=0.9, test=0.9))
        rows.append(dict(method="DWF D=3", seed=seed, wd=1e-4, val=d[0], test=d[0], compression=d[1],
                         compression_1e3=d[1], nonzero=1, nonzero_1e3=1))
        rows.append(dict(method="magnitude", seed=seed, amount=0.5, val=m[0], test=m[0], compression=m[1],
                         compression_1e3=m[1], nonzero=1, nonzero_1e3=1))
    return rows


def test_dwf_counts_a_seed_where_a_method_misses_as_no_compression_and_chooses_on_validation():
    # a seed where DWF reached no setting within tolerance dropped out of the paired interval,
    # which then rested on the seeds where it happened to succeed
    rows = _dwf_rows([(0.89, 3.0), (0.5, 40.0)], [(0.89, 2.0), (0.89, 2.0)])
    tables = dwf.fair_tables(rows, [1, 2])
    assert tables["frontier_per_seed"]["DWF D=3"]["within_5"] == [3.0, 1.0]  # the miss is the dense model
    ratio = dwf.fair_compare(tables)["DWF D=3 / magnitude @ -5"]
    assert ratio["n"] == 2 and ratio["ratio"] == pytest.approx(math.sqrt(1.5 * 0.5))
    # chosen on validation: a setting within on test but not on validation is not taken
    rows = _dwf_rows([(0.89, 3.0), (0.89, 3.0)], [(0.89, 2.0), (0.89, 2.0)])
    rows[1]["val"] = 0.7
    assert dwf.fair_tables(rows, [1, 2])["frontier_per_seed"]["DWF D=3"]["within_5"] == [1.0, 3.0]


def test_dwf_settings_leave_diverged_runs_out_of_their_compression():
    rows = _dwf_rows([(0.89, 3.0), (0.1, 2000.0)], [(0.89, 2.0), (0.89, 2.0)])
    rows[4]["finite"] = False  # seed 2's DWF run
    point = dwf.fair_tables(rows, [1, 2])["settings"]["DWF D=3"][0]
    assert point["compression"] == pytest.approx(3.0) and point["diverged"] == 1


def test_lmc_sparse_verdict_needs_a_stable_mask_where_real_imps_is_not():
    def table(distilled: dict, real: dict) -> dict:
        """Error-barrier intervals of round 9 by rewinding treatment (dense at round 0: unstable)."""
        out = {}
        for treatment in ("whole state", "weights only"):
            out[f"real | round 0 | {treatment}"] = {"error_barrier": {"ci95": [0.5, 0.7]}}
            out[f"real | round 9 | {treatment}"] = {"error_barrier": {"ci95": real[treatment]}}
            out[f"ipc 50 | round 9 | {treatment}"] = {"error_barrier": {"ci95": distilled[treatment]}}
        return {"table": out}

    unstable, stable = [0.30, 0.40], [0.001, 0.01]
    both = {"whole state": unstable, "weights only": unstable}
    # less unstable than real IMP's (28 against 36 points) is no stable mask: the claim is stability
    assert lmc_sparse.full_verdict(table({"whole state": [0.23, 0.34], "weights only": unstable}, both)) == \
        "does not hold"
    assert lmc_sparse.full_verdict(table({"whole state": stable, "weights only": unstable}, both)) == "partly"
    assert lmc_sparse.full_verdict(table({"whole state": stable, "weights only": stable}, both)) == "holds"
    # stable where real IMP's tickets are stable too says nothing of the distilled data
    assert lmc_sparse.full_verdict(table({"whole state": stable, "weights only": stable},
                                         {"whole state": stable, "weights only": stable})) == "does not hold"
    # an interval that reaches the threshold is not below it
    assert lmc_sparse.full_verdict(table({"whole state": [0.001, 0.025], "weights only": unstable}, both)) == \
        "does not hold"


def test_holm_adjusts_step_down_and_paired_p_values_are_students():
    from scipy import stats

    # Holm: sorted p times (m - i + 1), kept monotone, capped at 1, returned in input order
    assert common.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert common.holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])
    diffs = [0.3, 1.1, 0.4, 0.9, 0.2]
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    assert common.paired_p_value(mean, std, 5) == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)


def test_the_corrected_family_reads_every_paired_comparison_once(tmp_path, monkeypatch):
    from experiments import claims

    def diff(mean):
        return {"mean": mean, "std": 0.5, "ci95": [mean - 1, mean + 1], "holds": False}

    def table(ref="TWA-v", **diffs):
        return {m: {f"{ref}_minus_this": diff(mean)} for m, mean in diffs.items()} | {ref: {"accs": [97.0] * 5}}

    tail = table(c=1.0)
    tail["TWA-t"] = {"TWA-v_minus_this": diff(0.4)}
    tail["TWA-v"]["TWA-t_minus_this"] = diff(-0.4)  # the same test as TWA-v minus TWA-t: counted once
    files = {"head_sweep.json": table(a=2.0, b=0.1), "tail.json": tail, "finetune.json": table(d=0.0),
             "bits.json": table("dense", **{"4": 0.05})}
    for name, t in files.items():
        (tmp_path / name).write_text(json.dumps({"seeds": [3, 4, 5, 6, 7], "table": t, "stamp": {"commit": name}}))
    monkeypatch.setattr(claims, "stamp", lambda: {"commit": "now"})
    report = claims.corrected([], 1, tmp_path)
    rows = {r["comparison"]: r for r in report["table"]}
    assert len({"TWA-v minus TWA-t", "TWA-t minus TWA-v"} & set(rows)) == 1
    assert set(rows) - {"TWA-v minus TWA-t", "TWA-t minus TWA-v"} == {
        "TWA-v minus a", "TWA-v minus b", "TWA-v minus c", "TWA-v minus d", "dense minus 4"}
    assert report["comparisons"] == 6
    assert rows["TWA-v minus a"]["p_holm"] == pytest.approx(6 * common.paired_p_value(2.0, 0.5, 5))
    assert rows["TWA-v minus d"]["p_holm"] == 1.0
    assert json.loads((tmp_path / "corrected.json").read_text())["sources"]["tail.json"] == {"commit": "tail.json"}


def test_a_runs_stamp_is_taken_when_it_starts(monkeypatch):
    # a JSON written at the end of a run named the commit made while it ran: here the
    # machine's stamp changes between the run's first call and its last
    states = iter([{"datetime": "start", "commit": "aaa"}, {"datetime": "end", "commit": "bbb"}])
    monkeypatch.setattr(common, "_RUN_STAMP", {})
    monkeypatch.setattr(common, "_machine_stamp", lambda: next(states))
    first = common.stamp()
    later = common.stamp()
    assert (later["datetime"], later["commit"]) == (first["datetime"], first["commit"]) == ("start", "aaa")
    assert "written" in later


def test_connectivity_tables_and_figure_read_the_committed_report(tmp_path):
    # the report on the methods page (results/connectivity/connectivity.json) is what the
    # script's tables and figure are drawn from: a renamed key in either breaks this
    from experiments import connectivity

    report = json.loads((common.ROOT / "results" / "connectivity" / "connectivity.json").read_text())
    barriers = connectivity.barrier_table(report["barriers"]).splitlines()
    assert len(barriers) == 1 + len(report["barriers"])
    assert any(line.startswith("two seeds, epoch 15") and "interpolate" in line for line in barriers)
    sharpness = connectivity.sharpness_table(report["sharpness"]).splitlines()
    assert [line.split("  ")[0] for line in sharpness[1:]] == list(report["sharpness"])
    memory = connectivity.memory_table(report["memory"]).splitlines()
    assert [line.split()[0] for line in memory[1:]] == ["dense", "4-bit"]
    connectivity.plot_barriers(report["barriers"], tmp_path / "barriers.png")
    assert (tmp_path / "barriers.png").stat().st_size > 0


@pytest.mark.parametrize("module, record", [(lmc_sparse, "lmc_sparse/fair.json"), (dwf, "dwf/fair.json"),
                                            (dwf, "dwf/fair_200ep.json"), (dwf, "dwf/fair_lr_cap.json"),
                                            (dbp, "dbp/fair.json")])
def test_each_committed_record_states_the_verdict_its_own_runs_give(module, record, tmp_path):
    # a record summarised under an earlier rule kept that rule's verdict beside runs that give
    # another; resummarize recomputes it (and the stored per-seed runs are what it reads)
    stored = json.loads((common.RESULTS / record).read_text())
    (tmp_path / "fair.json").write_text(json.dumps(stored))
    if module is dwf:
        recomputed = dwf.resummarize(tmp_path, "fair")
    else:
        recomputed = module.resummarize(tmp_path)
    assert recomputed["verdict"] == stored["verdict"], record
    assert recomputed["run_stamp"] == stored.get("run_stamp", stored.get("stamp"))
