"""The three claims of TWA, reproduced at CPU scale on MNIST-1D (generated locally).

    python python/claims.py head|tail|finetune|all [--seeds 3] [--out results/claims]

head      TWA over the checkpoints of the first 60% of a run against full training (the
          papers: full-training accuracy with 30-40% fewer epochs on CIFAR, 30% on ImageNet).
tail      TWA against SWA over the same tail checkpoints (a constant learning rate after a
          cosine warm phase, as SWA runs are set up).
finetune  several fine-tuned copies of one pretrained network (different seeds, learning
          rates and input noise): TWA-v against the uniform soup, the greedy soup and the best
          single model.

Each prints a table of test accuracy and loss (mean and std over seeds) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from twa_kernels.averaging import uniform_average
from twa_kernels.demo import evaluate, fit_twa, greedy_soup_with_bn, make_model, mnist1d, run_seed, train_sgd

TWA_EPOCHS = 3


def _loaded(seed: int, state) -> torch.nn.Module:
    model = make_model(seed)
    model.load_state_dict(state)
    return model


def _with_bn(seed: int, state, train) -> torch.nn.Module:
    model = _loaded(seed, state)
    torch.optim.swa_utils.update_bn(torch.utils.data.DataLoader(train, batch_size=256), model)
    return model


def head(seed: int, work: Path) -> dict[str, tuple[float, float]]:
    run = run_seed(seed, 30, TWA_EPOCHS, work, progress=False)
    return {m: (r["acc"], r["loss"]) for m, r in run["methods"].items()}


def tail(seed: int, work: Path) -> dict[str, tuple[float, float]]:
    train, val, test = mnist1d(seed)
    model = make_model(seed)
    train_sgd(model, train, 15, seed, work / "warm", lr=0.05)  # cosine to zero: a trained start
    paths, _, _ = train_sgd(model, train, 10, seed, work / "tail", lr=0.01, schedule="constant")
    return {
        "last checkpoint": evaluate(_loaded(seed, _read(paths[-1])), test),
        "SWA": evaluate(_with_bn(seed, uniform_average(paths), train), test),
        "TWA-t": evaluate(fit_twa(seed, paths, train, train, TWA_EPOCHS), test),
        "TWA-v": evaluate(fit_twa(seed, paths, val, train, TWA_EPOCHS), test),
    }


def finetune(seed: int, work: Path) -> dict[str, tuple[float, float]]:
    train, val, test = mnist1d(seed)
    base = make_model(seed)
    train_sgd(base, train, 8, seed, work / "pretrain", lr=0.05)
    pretrained = {k: v.clone() for k, v in base.state_dict().items()}
    copies = []
    for i, (lr, noise) in enumerate([(0.005, 0.0), (0.01, 0.0), (0.02, 0.0), (0.05, 0.0),
                                     (0.005, 0.3), (0.01, 0.3), (0.02, 0.3), (0.05, 0.3)]):
        model = make_model(seed)
        model.load_state_dict(pretrained)
        paths, _, _ = train_sgd(model, train, 5, seed * 100 + i, work / f"ft{i}", lr=lr, noise=noise)
        copies.append(paths[-1])
    singles = [evaluate(_loaded(seed, _read(p)), val)[0] for p in copies]
    best = copies[max(range(len(copies)), key=singles.__getitem__)]

    soup, _ = greedy_soup_with_bn(make_model(seed), copies, train, val, seed)  # BN recomputed, as for the others
    return {
        "best single (by val)": evaluate(_loaded(seed, _read(best)), test),
        "uniform soup": evaluate(_with_bn(seed, uniform_average(copies), train), test),
        "greedy soup": evaluate(soup, test),
        "TWA-v": evaluate(fit_twa(seed, copies, val, train, TWA_EPOCHS), test),
    }


def _read(path):
    from twa_kernels.io import load_state_dict

    return load_state_dict(path)


EXPERIMENTS = {"head": head, "tail": tail, "finetune": finetune}


def run(name: str, seeds: int, out: Path) -> dict:
    per_seed = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as work:
            per_seed.append(EXPERIMENTS[name](seed, Path(work)))
    table = {}
    for method in per_seed[0]:
        accs = [100 * r[method][0] for r in per_seed]
        losses = [r[method][1] for r in per_seed]
        table[method] = dict(acc_mean=statistics.mean(accs), acc_std=statistics.stdev(accs) if seeds > 1 else 0.0,
                             loss_mean=statistics.mean(losses), accs=accs)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(experiment=name, dataset="MNIST-1D", seeds=list(range(seeds)), table=table)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(f"\n{name} ({seeds} seeds)\n{'method':<22} {'test acc (%)':>15} {'test loss':>10}")
    for method, r in table.items():
        print(f"{method:<22} {r['acc_mean']:>8.2f} ± {r['acc_std']:.2f} {r['loss_mean']:>10.4f}")
    return report


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "results" / "claims")
    args = parser.parse_args(argv)
    for name in EXPERIMENTS if args.experiment == "all" else [args.experiment]:
        run(name, args.seeds, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
