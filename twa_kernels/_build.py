"""JIT build of the C++ kernels in csrc/.

The CPU library is compiled once per (sources, torch, Python, CPU) combination into a
cache directory, under a file lock so that parallel processes (pytest-xdist, DDP ranks)
neither race nor load a half-written library: each build happens in a private temporary
directory that is renamed into place only when it succeeded. If no compiler is found the
package still works: `cpu_kernels_available()` returns False after one warning, and the
CPU ops run on the reference backend.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from filelock import FileLock

logger = logging.getLogger(__name__)

CPU_LIBRARY = "twa_kernels_cpu"
# -march=native is safe because the cache key holds the CPU model: a cache directory
# shared between different machines never hands one of them the other's build.
CPU_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]


class BuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded."""


def source_dir() -> Path:
    """Where csrc/ lives: inside the package in a wheel, beside it in a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "twa_kernels.cpp").is_file():
            return candidate
    raise BuildError(f"the C++ sources (csrc/) are missing next to {package}; reinstall twa-kernels")


def cache_root() -> Path:
    """$TWA_KERNELS_CACHE, else $XDG_CACHE_HOME/twa_kernels, else ~/.cache/twa_kernels."""
    if os.environ.get("TWA_KERNELS_CACHE"):
        return Path(os.environ["TWA_KERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "twa_kernels"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cpu_sources(src: Path) -> list[Path]:
    return [src / "twa_kernels.cpp", src / "cpu" / "kernels.cpp"]


def _cpu_build_key(src: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted([*_cpu_sources(src), *(src / "cpu").glob("*.h")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (torch.__version__, sys.version, " ".join(CPU_CFLAGS), _cpu_model(), os.environ.get("CXX", "")):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def build_cpu(verbose: bool = False) -> Path:
    """Compile (or find in the cache) and load the CPU kernel library; return its path.

    Raises BuildError with the compiler's message when the build fails.
    """
    src = source_dir()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = _cpu_build_key(src)
    final_dir = root / f"cpu-{key}"
    library = final_dir / f"{CPU_LIBRARY}.so"
    with FileLock(str(root / f"cpu-{key}.lock")):
        if library.is_file():
            torch.ops.load_library(str(library))
            return library
        from torch.utils.cpp_extension import load

        build_dir = Path(tempfile.mkdtemp(prefix=f"cpu-{key}.building.", dir=root))
        try:
            logger.info("building the twa_kernels CPU kernels in %s", build_dir)
            load(
                name=CPU_LIBRARY,
                sources=[str(p) for p in _cpu_sources(src)],
                extra_cflags=CPU_CFLAGS,
                extra_ldflags=CPU_LDFLAGS,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # compiler missing, compile error, ninja missing, ...
            shutil.rmtree(build_dir, ignore_errors=True)
            raise BuildError(str(exc)) from exc
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(build_dir, final_dir)
    return library


_cpu_state: dict[str, object] = {}
_cpu_lock = threading.Lock()


def cpu_kernels_available() -> bool:
    """Build and load the CPU kernels on first call; False (after one warning) if that fails."""
    with _cpu_lock:
        if "ok" not in _cpu_state:
            try:
                build_cpu()
                _cpu_state["ok"] = True
            except BuildError as exc:
                _cpu_state["ok"] = False
                _cpu_state["error"] = exc
                reason = str(exc).strip().splitlines()
                reason = reason[0] if reason else type(exc).__name__
                warnings.warn(
                    f"twa_kernels: the C++ CPU kernels could not be built ({reason[:300]}); CPU ops fall back "
                    "to the reference backend, which is correct but slower. Run `python -m twa_kernels build` "
                    "to see the full compiler output.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return bool(_cpu_state["ok"])


def cpu_build_error() -> BuildError | None:
    """The error of the last failed build in this process, if any."""
    error = _cpu_state.get("error")
    return error if isinstance(error, BuildError) else None
