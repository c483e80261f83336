"""DBP against BP per training step on ResNet-18 shapes (batch 32, 32x32 inputs, 10 classes),
with DBP's three extra costs timed on their own, all in the same run:

  fold        A = W R for every layer (the forward does this on every call): 2 C_out d^2 flops
  covariance  the sampled patches (sample_fraction 0.1) decorrelated, z = R x: 2 n d^2 flops
              (n sampled rows), plus S += Z^T Z (2 n d^2) where n > d
  update      tk.decor.update: C R per layer, batched by d: 2 d^3 flops from S, or
              4 n d^2 + 2 n^2 d from the rows Z where n <= d (X R = Z^T (Z R); the deep layers)

next to the BP and DBP forward+backward. extra_info holds the flops of each phase; run this
file as a script for the per-layer flop table (results/dbp/resnet18_flops.json).

    python -m pytest bench/test_bench_decor.py --benchmark-json=...
    python bench/test_bench_decor.py
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from resnet import resnet18  # noqa: E402

import twa_kernels as tk  # noqa: E402

BATCH, SIZE, FRACTION = 32, 32, 0.1


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def layer_table(model=None) -> list[dict]:
    """Per decorrelated layer: d, C_out, output positions, sampled rows and the flops of the
    conv itself (forward), the fold, the covariance and the update."""
    x, _ = _inputs()
    model = model or tk.decor.decorrelate(resnet18(10), sample_fraction=FRACTION)
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: shapes.__setitem__(name, out.shape))
             for name, m in tk.decor.decorrelated_layers(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, m in tk.decor.decorrelated_layers(model):
        d, cout = m.decor_R.shape[0], m.weight.shape[0]
        out = shapes[name]
        positions = out.numel() // cout  # B * Ho * Wo, or B for the Linear layer
        n = m._decor_num_samples(positions)
        lowrank = n <= d  # tk.decor keeps the rows and forms X R = Z^T (Z R) in update()
        rows.append(dict(layer=name, d=d, c_out=cout, positions=positions, sampled=n, lowrank=lowrank,
                         conv_flops=2 * positions * cout * d, fold_flops=2 * cout * d * d,
                         covariance_flops=2 * n * d * d * (1 if lowrank else 2),  # z = R x (+ Z^T Z)
                         update_flops=4 * n * d * d + 2 * n * n * d if lowrank else 2 * d ** 3,
                         update_flops_dense=2 * d ** 3))
    return rows


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    plain = resnet18(10)
    dbp = tk.decor.decorrelate(copy.deepcopy(plain), sample_fraction=FRACTION)
    return plain, dbp


def _totals():
    rows = layer_table()
    return {k: sum(r[k] for r in rows) for k in ("conv_flops", "fold_flops", "covariance_flops", "update_flops")}


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("impl", ["bp", "dbp"])
def test_forward_backward(benchmark, models, impl):
    """One training forward + backward (no optimizer): DBP includes the fold and the sampled
    covariance inside its forward."""
    plain, dbp = models
    model = plain if impl == "bp" else dbp
    model.train()
    x, y = _inputs()
    benchmark.group = "resnet18 b32 32x32 forward+backward"
    benchmark.extra_info.update(impl=impl, **_totals())
    benchmark.pedantic(_step, args=(model, x, y), rounds=5, iterations=1, warmup_rounds=1)
    if impl == "dbp":
        tk.decor.update(dbp)  # leave no stale S behind


def test_fold(benchmark, models):
    _, dbp = models
    layers = [m for _, m in tk.decor.decorrelated_layers(dbp)]

    @torch.no_grad()
    def fold_all():
        for m in layers:
            m.decor_folded_weight()

    benchmark.group = "resnet18 b32 32x32 DBP phases"
    benchmark.extra_info.update(phase="fold", flops=_totals()["fold_flops"])
    benchmark.pedantic(fold_all, rounds=5, iterations=1, warmup_rounds=1)


def test_covariance(benchmark, models):
    _, dbp = models
    x, _ = _inputs()
    inputs = {}
    layers = tk.decor.decorrelated_layers(dbp)
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: inputs.__setitem__(name, a[0].detach()))
             for name, m in layers]
    with torch.no_grad():
        dbp.eval()(x)
    for h in hooks:
        h.remove()

    def covariance():
        for name, m in layers:
            m.decor_capture(inputs[name])

    benchmark.group = "resnet18 b32 32x32 DBP phases"
    benchmark.extra_info.update(phase="covariance", flops=_totals()["covariance_flops"])
    benchmark.pedantic(covariance, rounds=5, iterations=1, warmup_rounds=1)
    for _, m in layers:
        m.decor_reset()


def test_update(benchmark, models):
    _, dbp = models
    x, y = _inputs()
    dbp.train()
    _step(dbp, x, y)
    layers = [m for _, m in tk.decor.decorrelated_layers(dbp)]
    saved = [(m._decor_sum, list(m._decor_rows), m._decor_count) for m in layers]

    def setup():
        for m, (s, rows, n) in zip(layers, saved):
            m._decor_sum, m._decor_rows, m._decor_count = None if s is None else s.clone(), list(rows), n

    benchmark.group = "resnet18 b32 32x32 DBP phases"
    benchmark.extra_info.update(phase="update", flops=_totals()["update_flops"])
    benchmark.pedantic(tk.decor.update, args=(dbp,), setup=setup, rounds=3, iterations=1, warmup_rounds=0)


if __name__ == "__main__":
    rows = layer_table()
    out = Path(__file__).resolve().parents[1] / "results" / "dbp" / "resnet18_flops.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(batch=BATCH, size=SIZE, sample_fraction=FRACTION, layers=rows), indent=1))
    g = 1e9
    print(f"{'layer':<22} {'d':>5} {'C_out':>5} {'n':>5} {'conv GF':>8} {'fold GF':>8} {'cov GF':>7} {'update GF':>9} "
          f"{'2d^3 GF':>8}")
    for r in rows:
        print(f"{r['layer']:<22} {r['d']:>5} {r['c_out']:>5} {r['sampled']:>5} {r['conv_flops'] / g:>8.3f} "
              f"{r['fold_flops'] / g:>8.3f} {r['covariance_flops'] / g:>7.3f} {r['update_flops'] / g:>9.3f} "
              f"{r['update_flops_dense'] / g:>8.3f}")
    keys = ("conv_flops", "fold_flops", "covariance_flops", "update_flops", "update_flops_dense")
    tot = {k: sum(r[k] for r in rows) / g for k in keys}
    print(f"{'total':<22} {'':>5} {'':>5} {'':>5} {tot['conv_flops']:>8.3f} {tot['fold_flops']:>8.3f} "
          f"{tot['covariance_flops']:>7.3f} {tot['update_flops']:>9.3f} {tot['update_flops_dense']:>8.3f}")
    print(f"wrote {out}")
