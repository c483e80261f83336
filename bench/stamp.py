"""Where a benchmark number came from: machine, date, commit and software.

Every JSON under bench/results carries `stamp()` under the key "stamp", and its file name
starts with `machine_slug()` (e.g. "cpu-xeon-2core"), so a reader can tell which numbers
are current and which machine they describe without reading the run's log.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# CPU features the kernels dispatch on; the stamp lists those this machine has.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vbmi", "avx512_bf16",
                "avx_vnni", "amx_tile")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
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
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FEATURES if f in have]
    except OSError:
        pass
    return []


def machine_slug() -> str:
    """A short file-name prefix for this machine: device, CPU family, logical cores."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.replace("nvidia", "")).strip("-")
    model = cpu_model().lower()
    family = next((f for f in ("epyc", "xeon", "ryzen", "core", "graviton", "neoverse") if f in model), "cpu")
    return f"cpu-{family}-{os.cpu_count()}core"


# Where benchmarks and experiments write their results: a results file written earlier in
# the same batch of runs does not make the code the next run measures differ from the commit.
OUTPUT_DIRS = ("bench/results", "results")


def stamp() -> dict:
    """Machine, UTC date, commit (and whether the tree's code was clean: changes under
    OUTPUT_DIRS do not count) and software versions.

    A copy of the tree without its git directory (as shipped to a remote GPU machine) names
    its commit in $TWA_BENCH_COMMIT; its cleanliness is then unknown (None)."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  *(f":(exclude){d}" for d in OUTPUT_DIRS))
    info = {
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD") or os.environ.get("TWA_BENCH_COMMIT") or None,
        "clean": status == "" if status is not None else None,
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


if __name__ == "__main__":  # `python bench/stamp.py` prints the slug, for results file names
    print(machine_slug())
