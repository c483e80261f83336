"""The `twa` command (also `python -m twa_kernels`): demo, fit, bench, build."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path


def _build(args: argparse.Namespace) -> int:
    import torch

    from twa_kernels import _build

    start = time.perf_counter()
    try:
        library = _build.build_cpu(verbose=args.verbose)
        print(f"twa: CPU kernels ready in {time.perf_counter() - start:.1f}s: {library}")
        if args.cuda:
            start = time.perf_counter()
            if torch.version.cuda is None:  # no CUDA torch to link against: compile the sources only
                library = _build.build_cuda_kernels()
                archs = " ".join(flag.split("code=")[1] for flag in _build.cuda_arch_flags()[1::2])
                print(f"twa: CUDA sources compile for {archs} in "
                      f"{time.perf_counter() - start:.1f}s; torch {torch.__version__} has no CUDA, so this was a "
                      f"compile check only: {library}")
            else:
                library = _build.build_cuda(verbose=args.verbose)
                print(f"twa: CUDA kernels ready in {time.perf_counter() - start:.1f}s: {library}")
    except _build.BuildError as exc:
        print(f"twa: build failed:\n{exc}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from twa_kernels.demo import run_demo

    report = run_demo(args.out, quick=args.quick, seeds=args.seeds, progress=not args.no_progress)
    print(f"\nMNIST-1D, {report['seeds']} seed(s): SGD for {report['epochs']} epochs; SWA, TWA and "
          f"greedy soup use the checkpoints of the first {report['head_epochs']} epochs ({report['bits']}-bit basis)\n")
    print(report["table"])
    print(f"\nwritten: {Path(args.out) / 'results.json'}, {Path(args.out) / 'accuracy.png'} "
          f"({report['total_seconds']:.0f}s)")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from twa_kernels.fit import run_fit

    report = run_fit(args.config, progress=not args.no_progress)
    for key in ("val_loss_at_swa", "val_loss_after_twa"):
        if key in report:
            print(f"{key}: {report[key]:.4f}")
    print("written: " + ", ".join(report["outputs"]))
    return 0


def _bench(args: argparse.Namespace) -> int:
    bench = Path(__file__).resolve().parent.parent / "bench"
    if not (bench / "report.py").is_file():
        print("twa: error: `twa bench` runs the bench/ suite of a source checkout, and none is beside this "
              "install; clone the repository and pip install -e it", file=sys.stderr)
        return 2
    results = bench / "results" / f"local-{args.grid}.json"
    env = {**os.environ, "TWA_BENCH": args.grid}
    code = subprocess.call([sys.executable, "-m", "pytest", str(bench), "-q", "-p", "no:cacheprovider",
                            f"--benchmark-json={results}"], env=env, cwd=bench.parent)
    if code != 0:
        return code
    return subprocess.call([sys.executable, str(bench / "report.py"), str(results)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twa", description="Trainable Weight Averaging with fused subspace kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="TWA vs full training, SWA and greedy soup on MNIST-1D")
    demo.add_argument("--quick", action="store_true", help="one seed, a shorter schedule (about a minute)")
    demo.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, or 1 with --quick)")
    demo.add_argument("--out", default="twa-demo", help="where checkpoints, results.json and accuracy.png go")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    fit = sub.add_parser("fit", help="TWA on your own model and data, from a YAML config")
    fit.add_argument("config", help="the YAML config (see twa_kernels/fit.py)")
    fit.add_argument("--no-progress", action="store_true", help="no progress bars")
    fit.set_defaults(func=_fit)
    bench = sub.add_parser("bench", help="run the benchmark suite and print the roofline table")
    bench.add_argument("--grid", choices=["quick", "default", "full"], default="quick")
    bench.set_defaults(func=_bench)
    build = sub.add_parser("build", help="compile the C++ kernels now (they are cached) and print where")
    build.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands and output")
    build.add_argument("--cuda", action="store_true",
                       help="also build the CUDA kernels with nvcc (compile check only when torch has no CUDA)")
    build.set_defaults(func=_build)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from twa_kernels.fit import FitError
    from twa_kernels.io import CheckpointError

    try:
        return args.func(args)
    except (FitError, CheckpointError) as exc:
        print(f"twa: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
