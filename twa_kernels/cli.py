"""The `twa` command (also `python -m twa_kernels`): demo, fit, bench, build, connect, plane."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from twa_kernels import _build, connectivity
from twa_kernels._imports import optional
from twa_kernels._provenance import machine_slug, stamp
from twa_kernels._memory import keep_freed_memory
from twa_kernels._outdir import name_limit
from twa_kernels.demo import run_demo
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, OutputError, TWAKernelsError
from twa_kernels._fit_config import DEFAULT_LOSS, FitError, load_config
from twa_kernels._user_code import call_factory, call_loss, loss_from, resolve_import_strings
from twa_kernels.fit import run_fit
from twa_kernels.geometry.evaluation import checkpoint_label, checkpoint_labels, printable
from twa_kernels.io import atomic_write_together, json_record
from twa_kernels.io.write import TEMPORARY_NAME_EXTRA, Temporary


def _progress(args: argparse.Namespace) -> bool | None:
    """--no-progress turns bars off; otherwise they show when standard error is a terminal."""
    return False if args.no_progress else None


def _build_command(args: argparse.Namespace) -> int:
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
    report = run_demo(args.out, quick=args.quick, seeds=args.seeds, progress=_progress(args))
    print(f"\nMNIST-1D, {len(report['seeds'])} seed(s): SGD for {report['epochs']} epochs; SWA, TWA and "
          f"greedy soup use the checkpoints of the first {report['head_epochs']} epochs ({report['bits']}-bit basis)\n")
    print(report["table"])
    print(f"\nwritten: {Path(args.out) / 'results.json'}, {Path(args.out) / 'accuracy.png'}, "
          f"{Path(args.out) / 'plane.png'} "
          f"({report['total_seconds']:.0f}s)")
    return 0


def _fit(args: argparse.Namespace) -> int:
    report = run_fit(args.config, progress=_progress(args))
    if dist.is_available() and dist.is_initialized():  # under torchrun
        # Every rank waits here until rank 0 has written its outputs, so no rank tears its
        # connections down while a peer may still be using them; then all shut down together.
        dist.barrier()
        # A TWA holding the group may be cyclic garbage (torch keeps the frames of the first
        # custom-op call in a cycle): free it now, so that the group's threads stop while
        # the interpreter is whole rather than during its exit, where their teardown can abort.
        gc.collect()
        dist.destroy_process_group()
    if "outputs" not in report:  # a rank other than 0: rank 0 writes and reports
        return 0
    for key in ("val_loss_at_swa", "val_loss_after_twa"):
        if key in report:
            print(f"{key}: {report[key]:.4f}")
    report_file = Path(report["outputs"][0]).with_name("report.json")  # the report lists the weights, not itself
    print("written: " + ", ".join([*report["outputs"], str(report_file)]))
    return 0


def _geometry_inputs(args: argparse.Namespace, need_error: bool = False):
    """(model, evaluation data, BatchNorm data, metric, split name, why the error is not
    measured) from a `twa fit`-style config: model and data as there; checkpoints come from
    the command line instead. With a loss of the config's, the error is the top-1 error where
    the model's outputs are a classifier's logits and NaN (not measured) elsewhere: a
    regression or a per-token loss has no error to count. `need_error` (plane's --value
    error) refuses that instead. The last item holds the reason once the first batch is in."""
    config = load_config(args.config, required=("model", "data"))
    split = args.split or ("val" if "val" in config.data else "train")
    if split not in config.data:
        raise FitError(f"{args.config}: --split {split} needs data.{split} in the config")
    # every import string resolved, and the loss made as `twa fit` makes it (a function, or an
    # nn.Module class with its defaults), before any factory runs or any point is evaluated
    callables = resolve_import_strings(config)
    loss_fn = loss_from(callables["loss"], config.loss) if config.loss != DEFAULT_LOSS else None

    def make(key: str):
        spec = config.model if key == "model" else config.data[key.removeprefix("data.")]
        return call_factory(callables[key], spec, key)

    model = make("model")
    if not isinstance(model, torch.nn.Module):
        raise FitError(f"model: {config.model!r} returned {type(model).__name__}, not an nn.Module; return the "
                       "model itself")
    train = make("data.train")
    data = train if split == "train" else make(f"data.{split}")
    unmeasured: list[str] = []
    if loss_fn is None:
        return model, data, train, connectivity.classification_metric, split, unmeasured

    def metric(outputs, targets):
        loss = call_loss(loss_fn, outputs, targets, config.loss)
        try:
            error = connectivity.classification_metric(outputs, targets)[1]
        except (InvalidArgumentError, InvalidTypeError) as exc:
            if need_error:
                raise InvalidArgumentError(f"--value error counts the top-1 errors of a classifier, but {exc}; "
                                           "show --value loss for this model") from None
            if not unmeasured:
                unmeasured.append(str(exc).split(";")[0])
            error = torch.tensor(float("nan"))
        return loss, error

    return model, data, train, metric, split, unmeasured


def _warn_unmeasured(unmeasured: list[str]) -> None:
    if unmeasured:
        print(f"twa: warning: the error is not measured, only the loss ({unmeasured[0]}); it is null in the JSON",
              file=sys.stderr)


def _check_figure_path(out: Path, inputs: list[str]) -> None:
    """Refuse an --out that the figure (or the JSON beside it) could not be written to, before
    minutes of evaluation: one of the command's `inputs` (a checkpoint without a suffix, or
    the config beside the figure, would be replaced), a suffix matplotlib cannot save (none
    means PNG), a directory, or a location under a file or without write permission. Missing
    parent directories are created when the files are written, as for every other output of
    the library; an earlier figure or JSON of the same name is replaced."""
    if out.name in ("", ".", ".."):  # '.', '/' or '': a directory, and no file name to put a suffix on
        raise OutputError(f"--out {str(out)!r} names a directory, not a figure file; give a file such as "
                          f"{str(out / 'plane.png')!r}")
    taken = {os.path.realpath(path): path for path in inputs}
    for path in (out, out.with_suffix(".json")):
        if os.path.realpath(path) in taken:
            raise OutputError(f"--out {str(out)!r} would write {path}, which is the input "
                              f"{taken[os.path.realpath(path)]!r}; give the figure another name")
    figure = optional("matplotlib.figure", "demo", "the --out figure")  # needed anyway; its absence named now
    formats = figure.Figure().canvas.get_supported_filetypes()
    if out.suffix and out.suffix.lstrip(".").lower() not in formats:
        raise InvalidArgumentError(f"--out {str(out)!r}: matplotlib cannot save a {out.suffix!r} figure; end it in "
                                   f"one of {', '.join('.' + f for f in sorted(formats))} (e.g. .png)")
    for path in (out, out.with_suffix(".json")):
        if path.is_dir():
            raise OutputError(f"--out {str(out)!r}: {path} is a directory; give a file path such as "
                              f"{path / 'figure.png' if path == out else out.with_name(out.stem + '-figure.png')}")
    numbers = out.with_suffix(".json")
    if numbers.is_file() and not _a_geometry_record(numbers):
        raise OutputError(f"--out {str(out)!r} would replace {numbers}, which is no record of twa connect or twa "
                          "plane (another command's results?); give the figure another name, or move that file")
    parent = out.absolute().parent
    while not parent.exists():  # the first existing ancestor must be a directory we can create in
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "a file, not a directory" if not parent.is_dir() else "not writable"
        raise OutputError(f"--out {str(out)!r} cannot be written: {parent} is {why}; choose a writable location")
    limit = name_limit(out.absolute().parent) - TEMPORARY_NAME_EXTRA  # room for the temporary file's name
    for path in (out, out.with_suffix(".json")):
        if len(os.fsencode(path.name)) > limit:
            raise OutputError(f"--out {str(out)!r}: the name {path.name[:40]!r}... is {len(os.fsencode(path.name))} "
                              f"bytes, and the temporary file it is written through needs {TEMPORARY_NAME_EXTRA} more "
                              f"than the file system's limit allows (at most {limit}); choose a shorter name")


def _a_geometry_record(path: Path) -> bool:
    """Whether `path` holds the JSON that twa connect or twa plane writes beside its figure:
    its numbers along a line (alphas, losses) or over a plane (anchors)."""
    record = json_record(path)
    return record is not None and ({"alphas", "loss"} <= record.keys() or "anchors" in record)


def _write_figure_and_json(out: Path, draw: Callable[[Path], object], record: dict) -> None:
    """The figure and the JSON of its numbers replaced together: the figure is drawn in a
    scratch folder first, then both are moved into place one right after the other
    (io.atomic_write_together), so that a failure while drawing or writing leaves the old
    pair; one between the two renames leaves the new figure beside the old numbers, and its
    error says so."""
    text = json.dumps(record, indent=1)  # as write_json writes it
    with tempfile.TemporaryDirectory(prefix="twa-figure-") as scratch:
        staged = Path(scratch) / out.name  # the same suffix: it names the format
        draw(staged)
        atomic_write_together({out: lambda tmp: shutil.copyfile(staged, tmp),
                               out.with_suffix(".json"): lambda tmp: Path(tmp).write_text(text)})


def _connect(args: argparse.Namespace) -> int:
    _check_figure_path(Path(args.out), [args.a, args.b, args.config])
    try:
        model, data, train, metric, split, unmeasured = _geometry_inputs(args)
        result = connectivity.interpolate(model, args.a, args.b, data, steps=args.steps, bn=args.bn, metric=metric,
                                          bn_data=train, progress=_progress(args))
    except ValueError as exc:  # CheckpointError and FitError included
        print(f"twa: error: {exc}", file=sys.stderr)
        return 2
    label = f"{checkpoint_label(args.a, 0)} -> {checkpoint_label(args.b, 1)}"
    # the files first: a closed or full standard output then loses the printout only
    out = Path(args.out)
    _write_figure_and_json(
        out, lambda path: connectivity.plot_interpolation({label: result}, path,
                                                          title=f"{label} (data.{split}, bn={args.bn})"),
        dict(a=printable(args.a), b=printable(args.b), split=split, **result.to_dict(), stamp=stamp()))
    _warn_unmeasured(unmeasured)
    print(f"{label}, on data.{split}, BatchNorm {args.bn}\n")
    print(result.table())
    diverged = sum(not math.isfinite(v) for v in result.loss)
    if diverged:  # a measurement, not an error: said once, and null in the JSON
        print(f"twa: warning: the loss is NaN or infinite at {diverged} of {len(result.loss)} alphas (weights that "
              "overflow the model's arithmetic?)", file=sys.stderr)
    print(f"\nwritten: {out}, {out.with_suffix('.json')}")
    return 0


def _plane(args: argparse.Namespace) -> int:
    points = {}
    for item in args.point or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"twa: error: --point {item!r} must look like NAME=PATH (e.g. SWA=runs/swa.pt)", file=sys.stderr)
            return 2
        if name in points:
            print(f"twa: error: --point {name}= is given twice; give each point its own name", file=sys.stderr)
            return 2
        points[name] = path
    grid = args.grid[0] if len(args.grid) == 1 else tuple(args.grid)
    _check_figure_path(Path(args.out), [*args.checkpoints, *points.values(), args.config])
    try:
        if len(args.grid) > 2:
            raise InvalidArgumentError(f"--grid takes one or two numbers (N, or NX NY), got {len(args.grid)}")
        model, data, train, metric, split, unmeasured = _geometry_inputs(args, need_error=args.value == "error")
        result = connectivity.plane(model, args.checkpoints, data, grid=grid, margin=args.margin, bn=args.bn,
                                    metric=metric, bits=args.bits, points=points, bn_data=train,
                                    labels=checkpoint_labels(args.checkpoints),
                                    progress=_progress(args))
        out = Path(args.out)  # the files first: a closed or full standard output then loses the printout only
        _write_figure_and_json(out, lambda path: connectivity.plot_plane(result, path, value=args.value),
                               dict(checkpoints=[printable(c) for c in args.checkpoints], split=split,
                                    **result.to_dict(), stamp=stamp()))
    except ValueError as exc:  # CheckpointError and FitError included
        print(f"twa: error: {exc}", file=sys.stderr)
        return 2
    _warn_unmeasured(unmeasured)
    print(f"plane through {', '.join(result.anchors)} (data.{split}, BatchNorm {args.bn}, "
          f"{'dense' if args.bits is None else f'{args.bits}-bit'} directions, {len(result.xs)}x{len(result.ys)} grid)\n")
    print(f"{'point':<24} {'x':>9} {'y':>9} {'distance':>9}")
    for name, p in result.points.items():
        print(f"{name:<24} {p.x:>9.4f} {p.y:>9.4f} {p.distance:>9.4f}")
    best = int(result.loss.nan_to_num(nan=math.inf).argmin())  # a diverged (NaN) point is not the lowest
    i, j = divmod(best, len(result.xs))
    print(f"\nlowest loss on the grid: {float(result.loss[i, j]):.4f} (error {100 * float(result.error[i, j]):.2f}%) "
          f"at ({result.xs[j]:.3f}, {result.ys[i]:.3f})")
    print(f"written: {out}, {out.with_suffix('.json')}")
    return 0


def _bits(value: str):
    if value.lower() in ("none", "dense"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be 1, 2, 4, 8 or none, got {value!r}") from None


def _add_geometry_commands(sub) -> None:
    connect = sub.add_parser("connect", help="loss and error along the line between two checkpoints, and barriers")
    connect.add_argument("a", help="first checkpoint (.pt, .pth, .safetensors)")
    connect.add_argument("b", help="second checkpoint")
    connect.add_argument("--config", required=True, help="YAML with model and data, as for `twa fit`")
    connect.add_argument("--steps", type=int, default=11, help="evenly spaced alphas in [0, 1] (default 11)")
    plane = sub.add_parser("plane", help="a contour PNG of the loss over the plane through three checkpoints")
    plane.add_argument("checkpoints", nargs=3, help="three checkpoints: the origin, the first axis, the plane")
    plane.add_argument("--config", required=True, help="YAML with model and data, as for `twa fit`")
    plane.add_argument("--grid", type=int, nargs="+", default=[21], help="points per axis: N, or NX NY (>= 2)")
    plane.add_argument("--margin", type=float, default=0.2, help="added on each side, times the points' span")
    plane.add_argument("--bits", type=_bits, default=None,
                       help="pack the two directions in 1, 2, 4 or 8 bits (default none: dense float32)")
    plane.add_argument("--point", action="append", metavar="NAME=PATH",
                       help="an extra checkpoint to place on the plane (repeatable), e.g. SWA=swa.pt")
    plane.add_argument("--value", choices=["loss", "error"], default="loss", help="what the contours show")
    for command, default_out in ((connect, "connect.png"), (plane, "plane.png")):
        command.add_argument("--bn", choices=["recompute", "interpolate", "none"], default="recompute",
                             help="BatchNorm statistics at each point (default: recompute on data.train)")
        command.add_argument("--split", choices=["train", "val"], default=None,
                             help="data to evaluate on (default: data.val if the config has it, else data.train)")
        command.add_argument("--out", default=default_out, help=f"the PNG (a JSON goes beside it; default {default_out})")
        command.add_argument("--no-progress", action="store_true", help="no progress bars")
    connect.set_defaults(func=_connect)
    plane.set_defaults(func=_plane)


# The kernels' suites: the ops against the reference, the paper's code path and torch's own
# kernels, and a training step. bench/ also times decor and factorize, which `twa bench`
# leaves to their own pages.
BENCH_SUITES = ("test_bench_ops.py", "test_bench_training.py")


def _bench(args: argparse.Namespace) -> int:
    bench = Path(__file__).resolve().parent.parent / "bench"
    if not (bench / "report.py").is_file():
        print("twa: error: `twa bench` runs the bench/ suite of a source checkout, and none is beside this "
              "install; clone the repository and pip install -e it", file=sys.stderr)
        return 2
    if args.out is None:  # in the current directory, never inside the source tree
        args.out = f"twa-bench-{machine_slug()}-{args.grid}.json"
    results = Path(args.out).resolve()
    roofline = results.with_name(results.stem + "-roofline.json")  # where report.py writes its table's JSON
    try:
        for path in (results, roofline):
            if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
                why = ("is a directory" if path.is_dir()
                       else f"cannot be written: {path.parent} is not a writable directory")
                print(f"twa: error: {path.name} (from --out {args.out}) {why}; give a .json file in a writable "
                      "directory", file=sys.stderr)
                return 2
    except OSError as exc:  # a name too long for the file system, say
        print(f"twa: error: --out {args.out[:200]!r} cannot be used ({exc.strerror or exc}); give a shorter path "
              "to a .json file in a writable directory", file=sys.stderr)
        return 2
    for module, what in (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark")):
        if importlib.util.find_spec(module) is None:
            print(f"twa: error: `twa bench` runs its suites with {what}, which is not installed; pip install -e "
                  "'.[test]' installs it", file=sys.stderr)
            return 2
    # PYTEST_ADDOPTS could switch the benchmarks off (--benchmark-disable, -n with xdist): a run
    # that passed would then have written no results
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"} | {"TWA_BENCH": args.grid}
    suites = [str(bench / name) for name in BENCH_SUITES]
    # pytest-benchmark writes its JSON as it goes: into a temporary file, moved into place
    # only once the run has passed and holds results, so a failed or interrupted run leaves
    # any earlier file (and its roofline beside it) whole
    # (locked while this process lives, so that no write of the results takes it for abandoned)
    temporary = Temporary(results)
    partial = temporary.path
    try:
        code = subprocess.call([sys.executable, "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider",
                                "-p", "no:xdist", f"--benchmark-json={partial}"], env=env, cwd=bench.parent)
        if code != 0:
            return code
        try:
            timed = json.loads(Path(partial).read_text()).get("benchmarks")
        except (OSError, ValueError, AttributeError):
            timed = None
        if not timed:
            print("twa: error: pytest passed but timed no benchmark, so no results were written (the earlier "
                  f"{results.name}, if any, is unchanged)", file=sys.stderr)
            return 2
        if roofline.exists():  # the earlier run's, which would stand beside the new results if the report fails
            roofline.unlink()
        atomic_write_together({results: lambda tmp: shutil.copyfile(partial, tmp)})  # flushed, the umask's mode
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
        temporary.release()
    return subprocess.call([sys.executable, str(bench / "report.py"), str(results)])


def run() -> int:
    """The `twa` command's entry: it owns its process, so it keeps freed memory in it
    (keep_freed_memory: no page faults of memory given back between training steps),
    then runs main()."""
    keep_freed_memory()
    return main()


_PACKAGE = Path(__file__).resolve().parent


def _show_warning(python_format: Callable[..., None], message: Warning | str, category: type[Warning],
                  filename: str, lineno: int, file: object = None, line: str | None = None) -> None:
    """Print the library's warnings as the command's own lines (`twa fit: warning: ...`), not
    as Python's source location and code line; another library's, or the user code's, keep
    Python's format, whose location says where to look. Whose it is, the code that called
    warnings.warn says: `filename` is where its stacklevel points, which for torch's own
    warnings about a call the library made is the library. (A warning raised in C, as
    torch's C++ code raises some, has no such caller: one raised inside the library's call
    reads as the library's.)"""
    caller = sys._getframe(1)  # past this function: the warnings module's machinery, then warn()'s caller
    while caller is not None and caller.f_globals.get("__name__") in ("warnings", "_py_warnings"):  # 3.14's
        caller = caller.f_back
    if caller is None or not Path(caller.f_code.co_filename).resolve().is_relative_to(_PACKAGE):
        python_format(message, category, filename, lineno, file, line)
        return
    print(_as_command_line(str(message)), file=sys.stderr)


def _as_command_line(text: str) -> str:
    """`twa: warning: <text>`, or `twa fit: warning: ...` for a text that names its command."""
    command, colon, rest = text.partition(": ")
    if colon and command.startswith("twa ") and " " not in command[4:]:
        return f"{command}: warning: {rest}"
    return f"twa: warning: {text}"


@contextlib.contextmanager
def _terminate_as_exception(terminated: list[int]) -> Iterator[None]:
    """SIGTERM raises SystemExit(143) for the length of the block, after the line `twa:
    terminated`, so that every `finally` runs on the way out: atomic writes remove their
    temporary file and output directories their staging one, where SIGTERM's default action
    would end the process with them on disk. SystemExit, like Ctrl-C's KeyboardInterrupt, is
    no Exception: no `except Exception` on the way turns it into an error message. The signal
    is appended to `terminated`, which tells this SystemExit from one of the user's code."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        if not terminated:  # (a stop delivered again, see _stops_survive_callbacks, says nothing more)
            print("twa: terminated", file=sys.stderr)
        terminated.append(signum)  # this SystemExit is SIGTERM's; any other comes from code the command ran
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _stops_survive_callbacks(terminated: list[int]) -> Iterator[None]:
    """Deliver again a Ctrl-C or SIGTERM whose exception Python swallowed. A signal's handler
    runs in the main thread between two bytecodes, wherever it is; when that is a `__del__` or
    a weakref callback (the import system's module locks have one), Python prints the exception
    as "Exception ignored" and carries on, and the run would go on training as if no signal
    had come. For the length of the block such an exception is not printed and the signal is
    sent again a moment later, from a thread, once the callback has returned (were it still
    running, the stop is swallowed and sent again). A stop not yet sent when the block ends
    is raised there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = sys.unraisablehook
    lock = threading.Lock()  # the block's end waits for a delivery under way, and none starts after it
    pending: list[int] = []  # stops swallowed and not sent again yet
    ended = False

    def deliver_later(signum: int) -> None:
        time.sleep(0.01)  # (a signal raised from the hook itself would run its handler inside the hook)
        with lock:
            if ended or signum not in pending:
                return  # the block's end raised it
            pending.remove(signum)
            if hasattr(signal, "pthread_kill"):  # a signal also ends a sleep or a wait the main thread is in
                signal.pthread_kill(threading.main_thread().ident, signum)
            else:  # (Windows)
                _thread.interrupt_main(signum)

    def redeliver(unraisable: sys.UnraisableHookArgs) -> None:
        exc, signum = unraisable.exc_value, None
        if threading.current_thread() is threading.main_thread():
            if isinstance(exc, SystemExit) and terminated and exc.code == 128 + terminated[-1]:
                signum = terminated[-1]
            elif isinstance(exc, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signum = signal.SIGINT
        if signum is None:
            previous(unraisable)
            return
        with lock:
            pending.append(signum)
        threading.Thread(target=deliver_later, args=(signum,), name="twa-stop-again", daemon=True).start()

    sys.unraisablehook = redeliver
    try:
        yield
    finally:
        sys.unraisablehook = previous
        with lock:
            ended, unsent = True, pending[:]
        if unsent:  # swallowed moments before the block ended: the command stops as the signal asked
            if unsent[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + unsent[0])


def main(argv: list[str] | None = None) -> int:
    """The `twa` command: parse `argv` (default: sys.argv[1:]), run the subcommand and
    return its exit status."""
    parser = argparse.ArgumentParser(prog="twa", description="Trainable Weight Averaging with fused subspace kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="TWA vs full training, SGD at the same budget, SWA and greedy soup on MNIST-1D")
    demo.add_argument("--quick", action="store_true",
                      help="one seed of the same setting, the full table")
    demo.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, or 1 with --quick)")
    demo.add_argument("--out", default="twa-demo",
                      help="where checkpoints, results.json, accuracy.png and plane.png go (default: twa-demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    fit = sub.add_parser("fit", help="TWA on your own model and data, from a YAML config")
    fit.add_argument("config", help="the YAML config (every key: docs/cli.md)")
    fit.add_argument("--no-progress", action="store_true", help="no progress bars")
    fit.set_defaults(func=_fit)
    bench = sub.add_parser("bench", help="run the benchmark suite and print the roofline table")
    bench.add_argument("--grid", choices=["quick", "default", "full"], default="quick",
                       help="quick: k = 16, 4-bit (a few minutes); default: k = 16 and 72, bits 1/2/4/8; "
                            "full: also CLIP ViT-B/32 shapes")
    bench.add_argument("--out", default=None,
                       help="the pytest-benchmark JSON (default ./twa-bench-<machine>-<grid>.json; "
                            "the roofline JSON goes beside it)")
    bench.set_defaults(func=_bench)
    build = sub.add_parser("build", help="compile the C++ kernels now (they are cached) and print where")
    build.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands and output")
    build.add_argument("--cuda", action="store_true",
                       help="also build the CUDA kernels with nvcc (compile check only when torch has no CUDA)")
    build.set_defaults(func=_build_command)
    _add_geometry_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    terminated: list[int] = []  # the signal, once SIGTERM has raised its SystemExit
    try:
        with _terminate_as_exception(terminated), _stops_survive_callbacks(terminated), warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            return args.func(args)
    except TWAKernelsError as exc:  # the library's own errors: their message says what and how to fix
        print(f"twa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: files are written whole or not at all, so there is nothing to show
        note = f"; {exc}" if str(exc) else ""  # (`twa fit` says where a rerun resumes)
        print(f"twa: interrupted{note}", file=sys.stderr)
        return 130  # the shells' code for a command stopped by SIGINT
    except BrokenPipeError:  # `twa ... | head`: the reader has what it wanted; files are already written
        # what is left in stdout's buffer goes to /dev/null at exit instead of raising again there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # the file system's own refusal (a name too long, a full disk): its message says which
        print(f"twa: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if terminated:
            raise
        # code of the user's the command ran (a factory, a loader, the loss) called sys.exit():
        # its code would pass for the command's, 0 for a success that wrote nothing
        print(f"twa: error: code the command ran (the model or data factory, a loader, the loss or metric) called "
              f"sys.exit({exc.code!r}), so the run stopped there and wrote no outputs (an earlier run's are as they "
              "were); raise an exception there instead, or return", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
