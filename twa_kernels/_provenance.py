"""Where a result came from: machine, date, commit and software, recorded beside it.

`twa demo`, the experiments and the benchmarks all write `stamp()` into their JSON, so that
every number carries the CPU, the date and the commit that produced it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

# the package's own checkout, when it runs from one (an editable install); absent from a wheel
PACKAGE_REPO = Path(__file__).resolve().parent.parent

# CPU features the kernels dispatch on; a stamp lists those the machine has.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "avx512_bf16",
                "avx_vnni", "amx_tile")


def _git(repo: Path, *args: str) -> str | None:
    if not (repo / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or platform's answer elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of CPU_FEATURES this CPU has (empty where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FEATURES if f in have]
    except OSError:
        pass
    return []


def package_version() -> str | None:
    try:  # the installed distribution's metadata: importing the package here would be circular
        return importlib.metadata.version("twa-kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def stamp(repo: Path = PACKAGE_REPO, output_dirs: Sequence[str] = ()) -> dict:
    """Machine, UTC date, commit of `repo` (None outside a git checkout, where the package
    version says what ran) and whether its code was clean (changes under `output_dirs`,
    where results are written, do not count), and software versions."""
    status = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".",
                  *(f":(exclude){d}" for d in output_dirs))
    info = {
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git(repo, "rev-parse", "HEAD"),
        "clean": status == "" if status is not None else None,
        "twa_kernels": package_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_features": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def machine_slug(gpu: bool = False) -> str:
    """A short file-name prefix for the device a benchmark measured: the GPU's name for a GPU
    benchmark (gpu=True), else the CPU family and logical cores, also on a machine that has
    a GPU, so that CPU numbers are never filed under the GPU."""
    if gpu:
        name = torch.cuda.get_device_name(0).lower()
        return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.replace("nvidia", "")).strip("-")
    model = cpu_model().lower()
    family = next((f for f in ("epyc", "xeon", "ryzen", "core", "graviton", "neoverse") if f in model), "cpu")
    return f"cpu-{family}-{os.cpu_count()}core"
