"""The `twa` command (also `python -m twa_kernels`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _build(args: argparse.Namespace) -> int:
    from twa_kernels import _build

    start = time.perf_counter()
    try:
        library = _build.build_cpu(verbose=args.verbose)
    except _build.BuildError as exc:
        print(f"twa: building the C++ CPU kernels failed:\n{exc}", file=sys.stderr)
        return 1
    print(f"twa: CPU kernels ready in {time.perf_counter() - start:.1f}s: {library}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twa", description="Trainable Weight Averaging with fused subspace kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile the C++ kernels now (they are cached) and print where")
    build.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands and output")
    build.set_defaults(func=_build)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
