"""Pins the numbers the methods pages (docs/methods/*.md) quote from the committed result JSON files
under results/: each test rebuilds a page's result tables and headline sentences from its JSON (with
the experiments' own verdict and statistics helpers where they exist), in the page's own rounding,
and requires every such string in the page. A rerun that changes a JSON without updating its page,
or a hand edit of a page's numbers, fails here; a failure lists every expected string not found."""

import json
import statistics
from pathlib import Path

from experiments import dbp, dwf, lmc_sparse
from experiments.common import holm, mean_ci

ROOT = Path(__file__).resolve().parents[1]


def page(name):
    return (ROOT / "docs" / "methods" / f"{name}.md").read_text()


def load(path):
    return json.loads((ROOT / "results" / path).read_text())


def missing(text, expected):
    """The expected strings the page text lacks; runs of whitespace count as one space, so a
    quoted sentence may wrap anywhere in the page."""
    text = " ".join(text.split())
    return [e for e in expected if " ".join(e.split()) not in text]


def ci(d, scale=1.0, fmt="+.2f", unit="", bold=False):
    """'mean [lo, hi]' of a mean_ci / paired-difference / ratio dict, as the pages print it."""
    mean, (lo, hi) = d.get("mean", d.get("ratio")), d["ci95"]
    s = f"{scale * mean:{fmt}}{unit} [{scale * lo:{fmt}}, {scale * hi:{fmt}}]"
    return f"**{s}**" if bold else s


def ratio(d):
    return ci(d, fmt=".2f", unit="x")


def short_e(x):
    """0.01 -> '1e-2', 0.00367 -> '3.67e-3', as the pages write them."""
    m, e = f"{x:.2e}".split("e")
    return f"{float(m):g}e{int(e)}"


def row(*cells):
    return ("| " + " | ".join(str(c) for c in cells) + " |").replace("|  |", "| |")


def acc(e):
    return f"{e['acc_mean']:.2f} ± {e['acc_std']:.2f}"


def stamp(s):
    return f"{s['datetime'][:10]}, commit {s['commit'][:7]}"


def cpu_name(s):
    """The machine as the pages name it."""
    return next((name for key, name in (("Xeon", "Intel Xeon"), ("EPYC", "AMD EPYC")) if key in s["cpu"]), s["cpu"])


def test_the_twa_claims_page_tables_quote_the_claims_jsons_as_they_stand():
    head, sweep, tail = load("claims/head.json"), load("claims/head_sweep.json"), load("claims/tail.json")
    bits, finetune, cal = load("claims/bits.json"), load("claims/finetune.json"), load("claims/calibration.json")
    d = "TWA-v_minus_this"
    # head stage: accuracy, loss, epochs and TWA-v's paired difference, bold where its interval excludes zero
    want = [row(m, acc(e), f"{e['loss_mean']:.4f}", e["epochs"], ci(e[d], bold=e[d]["holds"]) if d in e else "")
            for m, e in head["table"].items()]
    s = sweep["table"]
    for m in ("SGD, stopped early", "SGD, budgeted", "SWA", "greedy soup", "TWA-t", "TWA-v"):  # the head fractions
        es = [s[f"{m}, head {f}"] for f in sweep["head_fractions"]]
        want.append(row(m, *(acc(e) + (f" ({ci(e[d], bold=e[d]['holds'])})" if d in e else "") for e in es)))
    want.append(f"Full training: {acc(s['full training'])} ({s['full training']['epochs']} epochs).")
    for m, e in tail["table"].items():  # tail stage: TWA-v's and TWA-t's differences
        want.append(row(m, acc(e), f"{e['loss_mean']:.4f}", *(ci(e[k], bold=e[k]["holds"]) if k in e else ""
                                                              for k in (d, "TWA-t_minus_this"))))
    mib = {b: f"{n / 2 ** 20:.0f} MiB" for b, n in bits["resnet18_basis_bytes"]["bytes"].items()}
    for b, e in bits["table"].items():  # accuracy against bits, and the memory of both bases
        dm = e.get("dense_minus_this")
        want.append(row("dense (float32)" if b == "dense" else f"{b}-bit", acc(e),
                        ci(dm, bold=dm["holds"]) if dm else "-", f"{e['basis_bytes'] / 1024:.0f} KiB", mib[b]))
    want.append(f"{mib['dense']} in float32, {mib['8']} at 8 bits, {mib['4']} at 4, {mib['2']} at 2, {mib['1']} at 1.")
    for m, e in finetune["table"].items():  # the fine-tuned copies
        want.append(row(m, acc(e), f"{e['loss_mean']:.4f}", ci(e[d], bold=e[d]["holds"]) if d in e else ""))
    for g in cal["grid"]:  # the calibration grid (validation, seeds 0-2), the chosen setting in bold
        st, v = g["setting"], g["val_acc_mean"]
        cells = [st["train_size"], st["width"], st["schedule"], f"{st['lr']:g}", st["shift"] or "-",
                 *(f"{v[k]:.2f}" for k in ("stopped at 0.3", "stopped at 0.5", "stopped at 0.7", "full training")),
                 f"{g['gap_at_default_head']:+.2f}"]
        want.append(row(*(f"**{c}**" if st == cal["chosen"] else c for c in cells)))
    full, early = head["table"]["full training"]["acc_mean"], head["table"]["SGD, stopped early"]["acc_mean"]
    want += [f"the gap is {full - early:.1f} points ({full:.2f} against {early:.2f})",
             f"AVX-512, {stamp(head['stamp'])},", f"Xeon, {cal['date']}, at {cal['git_commit'][:7]}"]
    assert not missing(page("twa-claims"), want)


def test_the_twa_claims_page_verdicts_follow_the_claims_jsons():
    s, tail = load("claims/head_sweep.json")["table"], load("claims/tail.json")["table"]
    bits, ft = load("claims/bits.json")["table"], load("claims/finetune.json")["table"]
    h = {(m, f): s[f"{m}, head {f}"]["TWA-v_minus_this"] for m in ("SGD, stopped early", "SGD, budgeted", "SWA")
         for f in (0.3, 0.5, 0.7)}
    dense = {b: bits[b]["dense_minus_this"] for b in ("8", "4", "2", "1")}
    low = {b: dict(mean=-x["mean"], ci95=[-x["ci95"][1], -x["ci95"][0]]) for b, x in dense.items()}  # minus dense
    t = load("claims/corrected.json")["table"]
    by = {r["comparison"]: r for r in t}
    early, swa3, swa5 = (by[f"TWA-v minus {m}"] for m in ("SGD, stopped early, head 0.3", "SWA, head 0.3",
                                                           "SWA, head 0.5"))
    twa_v = [r for r in t if r["comparison"].startswith("TWA-v")]
    alone = dict(zip((r["comparison"] for r in twa_v), holm([r["p"] for r in twa_v])))  # Holm over TWA-v's own
    assert all(r["p_holm"] >= 0.05 for r in t)  # "none stays below 0.05"
    assert f"{early['p']:.3f}" == f"{swa3['p']:.3f}" and early["p_holm"] == swa3["p_holm"]  # "p 0.002 each"
    word = {True: "holds", False: "not shown"}
    sgd, swa = h["SGD, stopped early", 0.5], h["SWA", 0.5]
    fd = {m: ci(e["TWA-v_minus_this"]) for m, e in ft.items() if m != "TWA-v"}
    want = [  # the verdict table's result column
        f"| {ci(sgd)} at 20 of 40 epochs; {ci(h['SGD, stopped early', 0.3])} at 12 |",
        f"| {ci(h['SGD, budgeted', 0.5])}; {ci(h['SGD, budgeted', 0.3])} at 12 epochs (",
        f"| {ci(swa)} at 20 epochs; {ci(h['SWA', 0.3])} at 12; {ci(h['SWA', 0.7])} at 28 |",
        f"| {ci(tail['SWA']['TWA-v_minus_this'])} (TWA-t: {ci(tail['SWA']['TWA-t_minus_this'])}) |",
        f"float32: {ci(low['8'])} and {ci(low['4'])}; 2-bit: {ci(low['2'])}; 1-bit: {ci(low['1'])} |",
        f"| {fd['uniform soup']} over the uniform soup, {fd['greedy soup']} against greedy soup, "
        f"{fd['best single (by val)']} against the best single model |",
        f"greedy soup has the best mean, {ft['greedy soup']['acc_mean']:.2f})",
        f"the intervals allow losses of up to {dense['8']['ci95'][1]:.2f} and {dense['4']['ci95'][1]:.2f} points",
        *(f"the mean loss ({dense['2']['mean']:.2f} and {dense['1']['mean']:.2f} points) is {rest}"
          for rest in ("within the intervals |", "not shown either")),  # verdict column, and under the bits table
        # the head-stage bullets: each verdict word follows its interval
        f"**TWA-v against SGD stopped early: {word[sgd['holds']]}** ({sgd['mean']:+.2f} points, interval "
        f"[{sgd['ci95'][0]:+.2f}, {sgd['ci95'][1]:+.2f}])",
        f"**TWA-v beats SWA: {word[swa['holds']]}** ({swa['mean']:+.2f}, "
        f"[{swa['ci95'][0]:+.2f}, {swa['ci95'][1]:+.2f}])",
        # Holm's correction over the 27 comparisons, and over TWA-v's 21 alone
        f"come from {len(t)} paired comparisons", f"TWA-v's {len(twa_v)} (", f"over all {len(t)} (",
        f"(p {early['p']:.3f} each, adjusted {early['p_holm']:.3f})",
        f"it is p {swa5['p']:.3f}, adjusted {swa5['p_holm']:.2f}",
        f"those two would pass (adjusted {alone[early['comparison']]:.3f})"]
    assert not missing(page("twa-claims"), want)


def test_the_decor_page_quotes_dbp_fair_json_as_it_stands():
    fair = load("dbp/fair.json")
    t, over, rules = fair["table"], fair["step_overhead"], fair["resnet18_projection"]["rules"]
    verdict, _ = dbp.fair_verdict(t, fair["resnet18_projection"])  # the rule, applied to the stored intervals
    assert verdict == fair["verdict"]
    cnn, mlp = t["cnn"], t["mlp"]

    def cols(label, f):  # one row of the results table: the CNN's column, then the MLP's
        return row(label, f(cnn), f(mlp))
    want = [
        f"**Verdict: {verdict}**",  # the headline paragraph
        f"({ci(mlp['epochs_saved'], fmt='.1f')} saved) but takes longer to get there: "
        f"{ratio(mlp['wallclock_ratio'])} BP's wall-clock, since each of its steps costs {over['mlp']['ratio']:.1f}x",
        f"at epoch {statistics.fmean(p['bp_epochs'] for p in mlp['per_seed']):.1f} of 20 on average",
        f"On the CNN neither is shown: {ci(cnn['epochs_saved'], fmt='.1f')} epochs saved and "
        f"{ratio(cnn['wallclock_ratio'])} the wall-clock",
        cols("chosen Adam lr, BP and DBP",
             lambda r: f"{short_e(r['chosen']['lr'])}, {short_e(r['chosen']['dbp']['lr'])}"),
        cols("chosen DBP (decor lr, kappa)",
             lambda r: f"{short_e(r['chosen']['dbp']['decor_lr'])}, {r['chosen']['dbp']['kappa']:g}"),
        cols("BP's epochs to its own peak validation accuracy (mean)",
             lambda r: f"{statistics.fmean(p['bp_epochs'] for p in r['per_seed']):.1f}"),
        cols("seeds where DBP reached that peak", lambda r: r["dbp_reached_bp_peak"].replace("/", " of ")),
        cols("epochs saved by DBP (a miss counts as epoch 21)", lambda r: ci(r["epochs_saved"], fmt=".1f")),
        cols("wall-clock to the target, DBP / BP (the runs' own seconds)",
             lambda r: ci(r["wallclock_ratio"], fmt=".2f")),
        cols("the same projected from the step costs, taken as exact",
             lambda r: ci(r["wallclock_ratio_projected"], fmt=".2f")),
        row("step cost, DBP / BP (one thread, measured apart)", *(f"x{over[m]['ratio']:.2f}" for m in ("cnn", "mlp"))),
        cols("final test accuracy, BP / DBP (%)",
             lambda r: f"{100 * r['final_test']['bp']['mean']:.2f} / {100 * r['final_test']['dbp']['mean']:.2f}"),
        cols("final accuracy, DBP minus BP (points)", lambda r: ci(r["final_test"]["dbp_minus_bp"], 100)),
        # the bullets: seed-mean curves, the secondary shared target, the ResNet-18 projection, the stamp
        "DBP reaches BP's peak at epoch {} against {} (CNN) and {} against {} (MLP)".format(
            *(r["epochs_mean_curve"][m] for r in (cnn, mlp) for m in ("dbp", "bp"))),
        f"{ci(cnn['secondary_shared_target']['epochs_saved'], fmt='.1f')} epochs saved on the CNN and "
        f"{ci(mlp['secondary_shared_target']['epochs_saved'], fmt='.1f')} on the MLP",
        f"costs +{100 * rules['2d rows']['overhead']:.0f}% with 2d rows",
        f"+{100 * rules['10% of rows']['overhead']:.0f}% with 10% of rows",
        f"2 cores, {stamp(fair['stamp'])} (the JSON's"]
    assert not missing(page("decor"), want)


def test_the_factorization_page_quotes_dwf_fair_jsons_as_they_stand():
    fair, short = load("dwf/fair.json"), load("dwf/fair_200ep.json")
    c, c3, depths = fair["compare"], fair["compare_at_1e3"], fair["protocol"]["depths"]
    verdict = dwf.fair_verdict(c, depths)  # the rule fixed before the run, applied to the stored ratios
    assert verdict == fair["verdict"]
    assert dwf.fair_verdict(short["compare"], short["protocol"]["depths"]) == short["verdict"]

    def r(arm, base, t):
        return ratio(c[f"DWF D={arm} / {base} @ -{t}"])
    deep = {t: {r(f"{d}{m}", "magnitude", t)[:5] for d in depths if d >= 3 for m in ("", " momentum")} for t in (5, 10)}
    assert all(len(v) == 1 for v in deep.values())  # every deep arm keeps the same ratio, quoted once for all
    runs = [x for x in fair["rows"] if x["method"].startswith("DWF")]
    settings = fair["tables"]["settings"]

    def setting(method, name):
        return next(x for x in settings[method] if x["setting"] == name)

    def acc(method, name, ci_too=True):
        test = setting(method, name)["test"]
        return f"{100 * test['mean']:.1f}%" + (f" [{100 * test['ci95'][0]:.1f}, {100 * test['ci95'][1]:.1f}]"
                                                if ci_too else "")

    def comp(method, name):
        return f"{setting(method, name)['compression']:.1f}x"
    want = [
        f"**Verdict: {verdict}** at this scale",  # the headline paragraph
        f"D = 2 comes closest, {r(2, 'magnitude', 10)} at 10 points",
        f"at 10 points ({r('2 momentum', 'magnitude', 10)}), but not at 5",
        f"D = 2 keeps {r(2, 'magnitude+FT', 5)} of its compression at 5 points and {r(2, 'magnitude+FT', 10)} at 10, "
        f"the momentum arm {r('2 momentum', 'magnitude+FT', 5)} and {r('2 momentum', 'magnitude+FT', 10)}",
        f"keep {min(deep[5])} and {min(deep[10])} of plain magnitude pruning's at 5 and 10 points",
        # far from dense: accuracy at near compressions
        f"D = 2 reaches {acc('DWF D=2', 'wd=0.0008')} test accuracy ({comp('DWF D=2', 'wd=0.0008')}) and its\n"
        f"momentum arm {acc('DWF D=2 momentum', 'wd=0.0008')} ({comp('DWF D=2 momentum', 'wd=0.0008')})",
        f"magnitude pruning at {comp('magnitude', 'amount=0.95')} reaches {acc('magnitude+FT', 'amount=0.95')} "
        f"with fine-tuning and {acc('magnitude', 'amount=0.95')} without",
        f"at {comp('DWF D=2 momentum', 'wd=0.0016')} the momentum arm\nkeeps {acc('DWF D=2 momentum', 'wd=0.0016')}",
        f"magnitude pruning at 50x is at {acc('magnitude+FT', 'amount=0.98', ci_too=False)} with fine-tuning and\n"
        f"{acc('magnitude', 'amount=0.98', ci_too=False)} without",
        # the table: compression against magnitude pruning within 5 and 10 points of dense
        *(row(f"D = 2{name}, {ft}", r(arm, base, 5), r(arm, base, 10)) for ft, base in
          (("without fine-tuning", "magnitude"), ("with fine-tuning", "magnitude+FT"))
          for name, arm in (("", 2), (" momentum arm", "2 momentum"))),
        # the bullets: dense accuracy, diverged runs, the count at 1e-3, the 200-epoch verdict, the stamp
        f"The tuned dense model: {ci(fair['tables']['dense_test'], 100, '.2f', unit='%')}.",
        f"{sum(not x.get('finite', True) for x in runs)} of {len(runs)} DWF runs ended with non-finite weights",
        f"D = 2 would keep {ratio(c3['DWF D=2 / magnitude @ -5'])} of magnitude pruning without fine-tuning within 5 "
        f"points, and {ratio(c3['DWF D=2 / magnitude+FT @ -5'])} of pruning with fine-tuning",
        f"recomputed under the rule above) {short['verdict']}.", f"2 cores, {stamp(fair['stamp'])} (25 minutes)"]
    assert not missing(page("factorization"), want)


def test_the_pruning_page_quotes_lmc_sparse_fair_json_as_it_stands():
    fair = load("lmc_sparse/fair.json")
    t, d, cal = fair["tables"]["table"], fair["tables"]["paired_error_barrier"], fair["calibration"]
    verdict = lmc_sparse.full_verdict(fair["tables"])  # recomputed, and the JSON's own field says the same
    assert fair["verdict"] == verdict
    cols = [(r, w) for w in ("whole state", "weights only") for r in (4, 9)]

    def bar(k):
        return ci(t[k]["error_barrier"], 100, ".1f")
    want = [row("dense (round 0)", bar("real | round 0 | whole state"), "", bar("real | round 0 | weights only"), ""),
            row("real-IMP tickets", *(bar(f"real | round {r} | {w}") for r, w in cols)),
            *(row(f"distilled ipc {ipc}", *(bar(f"ipc {ipc} | round {r} | {w}") for r, w in cols)) for ipc in (10, 50))]
    for ipc in (10, 50):  # paired differences; bold where a distilled mask is below real IMP's (the claim)
        for base in ("real", "dense"):
            ks = [f"ipc {ipc} | round {r} | {w} minus {base}" for r, w in cols]
            want.append(row(f"distilled ipc {ipc} minus {base}",
                            *(ci(d[k], 100, "+.1f", bold=base == "real" and d[k]["ci95"][1] < 0) for k in ks)))
    per = {(x["method"], x["seed"]): y["error_barrier"] for x in fair["results"] for y in x["rows"]
           if y["round"] == 9 and y["rewind"] == "whole state"}
    no0 = mean_ci([per["ipc 50", s] - per["real", s] for s in fair["seeds"] if s != 0])  # without seed 0
    k, real, dense = "ipc 50 | round 9 | whole state", *(t[f"real | round {r} | whole state"] for r in (9, 0))
    lowest = min((key for key in t if not key.startswith("real") and "round 0" not in key),
                 key=lambda key: t[key]["error_barrier"]["mean"])
    barriers = [100 * x["error_barrier"] for x in cal["dense"]]
    setting = fair["protocol"]["setting"]
    want += [
        f"**Verdict: {verdict}.**",
        f"the lowest barrier is {bar(lowest)} points (ipc 50, round 9, whole state)",
        f"dense copies reach {100 * dense['acc']['mean']:.1f}% [{100 * dense['acc']['ci95'][0]:.1f}, "
        f"{100 * dense['acc']['ci95'][1]:.1f}] test accuracy",
        f"than real IMP's at {100 * t[k]['sparsity']:.1f}% sparsity, by "
        f"{-100 * d[k + ' minus real']['mean']:.1f} points",
        f"({min(barriers):.1f} to {max(barriers):.1f})",  # the calibration
        "initialisation ({:.0f}% sparse) had {:.1f} and {:.1f} points".format(
            100 * cal["imp"][0]["sparsity"], *(100 * x["error_barrier"] for x in cal["imp"])),
        f"width {setting['width']}, lr {setting['lr']:g}, random shift {setting['shift']}",
        f"tickets are {100 * (dense['error_barrier']['mean'] - real['error_barrier']['mean']):.0f} points more stable",
        f"reach {100 * t[k]['acc']['mean']:.1f}% test accuracy against real IMP's {100 * real['acc']['mean']:.1f}%",
        f"minus real is {ci(no0, 100)}, the same finding",
        f"2 cores, {stamp(fair.get('run_stamp', fair['stamp']))} (the run's stamp"]
    assert not missing(page("pruning-and-distillation"), want)


def test_the_geometry_page_quotes_connectivity_json_as_it_stands():
    res = load("connectivity/connectivity.json")
    b, want, mb = res["barriers"], [], 1e6
    for key, label, bn, bold in (  # the barrier table; the two seeds' rows in fewer digits, recompute's bold
            ("itself (epoch 15)", "a model with itself (epoch 15)", "recompute", None),
            ("epochs 14 and 15", "epochs 14 and 15 of one run", "recompute", None),
            ("epochs 14 and 15", "epochs 14 and 15 of one run", "interpolate", None),
            ("epochs 3 and 9 (head stage)", "epochs 3 and 9 of one run", "recompute", None),
            ("two seeds, epoch 15", "two seeds, epoch 15", "recompute", True),
            ("two seeds, epoch 15", "two seeds, epoch 15", "interpolate", False)):
        r = b[f"{key} | {bn}"]
        cells = [f"{r['loss_barrier']:.{3 if bold is not None else 4}f}",
                 f"{100 * r['error_barrier']:.{1 if bold is not None else 2}f}"]
        want.append(row(label, bn.replace("interpolate", "interpolate (study)"),
                        *(f"**{x}**" if bold else x for x in cells),
                        " / ".join(f"{r['loss'][i]:.3f}" for i in (0, len(r["loss"]) // 2, -1))))
    two, study = b["two seeds, epoch 15 | recompute"], b["two seeds, epoch 15 | interpolate"]
    want += [f"(a {100 * two['error_barrier']:.0f}-point error barrier)",
             f"({study['loss_barrier']:.2f} against {two['loss_barrier']:.2f})",
             f"near-random classifier ({100 * study['error_barrier']:.0f} points)",
             *(f"{cpu_name(s)}, {stamp(s)}{end}" for s, end in ((res["run_stamps"]["barriers"], ";"),
                                                                (res["run_stamps"]["sharpness"], ")"),
                                                                (res["run_stamps"]["memory"], ")")))]
    for m in res["memory"]:  # the plane's memory in MB, as experiments.connectivity.memory_table computes it
        bp = m["build_peak"]
        want.append(row("dense (`bits=None`)" if m["bits"] is None else f"{m['bits']}-bit",
                        *(f"{v / mb:.1f}" for v in (m["basis_bytes"], m["bound"], bp["pt"], bp["safetensors"],
                                                    bp["pt, mapping kept"], m["peak_extra"])),
                        f"{m['peak_extra'] / m['bound']:.2f}", f"{m['forward_bytes'] / mb:.1f}",
                        f"{m['seconds'] / m['grid'] ** 2:.3f}"))
    want += [f"W = {res['memory'][0]['model_bytes'] / mb:.1f} MB",
             "({:.2f}x and {:.2f}x of 2W + basis)".format(*(m["build_peak"]["pt"] / m["bound"] for m in res["memory"]))]
    for name, r in res["sharpness"].items():  # the sharpness table
        want.append(row(name, f"{r['train_loss']:.4f}", f"{r['top_eigenvalue']:.2f}", r["iterations"],
                        short_e(r["mean_diagonal"])))
    assert not missing(page("geometry"), want)


def test_the_geometry_page_quotes_the_cli_connect_and_plane_jsons_as_they_stand():
    ep, st, plane = (load(f"connectivity/{n}.json") for n in ("connect_epochs", "connect_swa_twa", "plane"))
    e, p = ep["error"], plane["points"]
    above = [x - ((1 - a) * e[0] + a * e[-1]) for a, x in zip(ep["alphas"], e)]  # error over the straight line
    low = min(range(len(st["loss"])), key=st["loss"].__getitem__)

    def xy(v):
        return "0" if v == 0 else f"{v:.3f}"

    def nearest(name):  # the plane's loss at the grid point nearest a projection (loss[i][j] at ys[i], xs[j])
        i = min(range(len(plane["ys"])), key=lambda k: abs(plane["ys"][k] - p[name]["y"]))
        j = min(range(len(plane["xs"])), key=lambda k: abs(plane["xs"][k] - p[name]["x"]))
        return f"{plane['loss'][i][j]:.3f}"
    anchors = [p[a] for a in plane["anchors"]]
    assert all(a["distance"] == 0 for a in anchors)  # the anchors lie in their plane: one "0" for all three
    assert nearest("SWA") == f"{min(min(r) for r in plane['loss']):.3f}"  # "the grid's lowest to three digits"
    want = [  # `twa connect`: the barriers and the curves the sentences describe
        f"`twa connect epoch_020 epoch_040` gives a loss barrier of {ep['loss_barrier']:.4f} and an error barrier of "
        f"{100 * ep['error_barrier']:.2f} points (the error falls from {100 * e[0]:.1f}% to {100 * e[-1]:.1f}% and "
        f"sits {100 * max(above):.2f} points above the straight line once, at alpha "
        f"{ep['alphas'][above.index(max(above))]:g})",
        f"`twa connect swa twa_v` gives {st['loss_barrier']:.4f} and {100 * st['error_barrier']:.2f} points: the loss "
        f"falls from SWA's {st['loss'][0]:.4f} to {st['loss'][low]:.4f} at alpha {st['alphas'][low]:g} and ends at "
        f"TWA-v's {st['loss'][-1]:.4f}", f"AMD EPYC, {stamp(plane['stamp'])}; curves",
        # `twa plane`: the table of projections, and the plane's loss where they land
        row("epoch 7 / 13 / 20", *(" / ".join(xy(a[k]) for a in anchors) for k in ("x", "y")), "0"),
        *(row(label, *(xy(p[name][k]) for k in ("x", "y", "distance"))) for name, label in
          (("SWA", "SWA (epochs 1-20)"), ("TWA-v", "TWA-v"), ("SGD final", "SGD, final (epoch 40)"))),
        f"(plane loss at the nearest grid point {nearest('SWA')}, the grid's lowest to three digits)",
        f"lies {p['SWA']['distance']:.1f} away from the plane",
        f"floor too ({nearest('TWA-v')}), {p['TWA-v']['distance']:.1f} away",
        f"(plane loss {nearest('SGD final')} there", f"carried it {p['SGD final']['distance']:.1f} off the plane"]
    assert not missing(page("geometry"), want)
