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
import itertools
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from twa_kernels.errors import BuildError, warn_at_caller

logger = logging.getLogger(__name__)

CPU_LIBRARY = "twa_kernels_cpu"
# -march=native is safe because the cache key holds the CPU model and its flags: a cache directory
# shared between different machines never hands one of them the other's build.
CPU_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]


def source_dir() -> Path:
    """Where csrc/ lives: inside the package in a wheel, beside it in a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "twa_kernels.cpp").is_file():
            return candidate
    raise BuildError(f"the C++ sources (csrc/) are missing next to {package}; reinstall twa-kernels")


def cache_root() -> Path:
    """$TWA_KERNELS_CACHE, else $XDG_CACHE_HOME/twa_kernels (an absolute one), else
    ~/.cache/twa_kernels."""
    if os.environ.get("TWA_KERNELS_CACHE"):
        return Path(os.environ["TWA_KERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):  # a relative one is to be ignored (the XDG base directory spec)
        try:
            base = Path.home() / ".cache"
        except (RuntimeError, KeyError) as exc:  # no $HOME and no passwd entry (a container's user)
            raise BuildError("no home directory to keep the compiled kernels in (no $HOME, and the user has no "
                             "passwd entry); set TWA_KERNELS_CACHE (or XDG_CACHE_HOME) to a writable "
                             "directory") from exc
    return Path(base) / "twa_kernels"


def _cpu_identity() -> str:
    """The CPU's name and its feature flags (first core), for the build key: -march=native
    code must not be reused on a CPU with other features under the same name."""
    wanted = ("model name", "flags", "Features")
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = next((w for w in wanted if line.startswith(w)), None)
                if key is not None and key not in found:
                    found[key] = line
                if len(found) == len(wanted) or line.strip() == "" and found:  # the first core is enough
                    break
    except OSError:
        pass
    return "".join(found.values()) or platform.processor()


def _cpu_sources(src: Path) -> list[Path]:
    return [src / "twa_kernels.cpp", src / "cpu" / "kernels.cpp"]


def _cpu_build_key(src: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted([*_cpu_sources(src), *src.glob("*.h"), *(src / "cpu").glob("*.h")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (*_torch_identity(), " ".join(CPU_CFLAGS), _cpu_identity(), os.environ.get("CXX", "")):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _torch_identity() -> tuple[str, ...]:
    """What a library built against this torch depends on: two builds of one version (a
    wheel and a source or conda build, of another C++ ABI) in environments sharing a cache
    would each load the other's library, fail, and rebuild it for themselves in turn."""
    return (torch.__version__, str(getattr(torch.version, "git_version", "")),
            str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")), os.path.dirname(torch.__file__), sys.version)


def _fingerprint(path: Path) -> str:
    return f"{path.stat().st_size} {hashlib.sha256(path.read_bytes()).hexdigest()}"


def _record_of(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _intact(library: Path) -> bool:
    """Whether `library` is whole: the size and SHA-256 its build recorded beside it. A cache
    copied half-way, a full disk or a crash before the data reached the disk leaves a short
    or empty file, which dlopen may answer by killing the process (SIGBUS), not with an error."""
    try:
        return library.is_file() and _record_of(library).read_text().strip() == _fingerprint(library)
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(library: Path) -> None:
    """Flush a freshly built library to disk, then record its size and SHA-256 beside it."""
    _fsync(library)
    record = _record_of(library)
    record.write_text(_fingerprint(library) + "\n")
    _fsync(record)
    _fsync(library.parent)


# How long a process waits for another's build lock before it says so (and waits again), and
# in all before it gives up (the ops then fall back, with a warning): a CPU build takes 15-30 s,
# a CUDA build for several architectures some minutes.
_LOCK_WAIT_S = 30.0
_LOCK_GIVE_UP_S = 1800.0


def _cached_build(prefix: str, key: str, filename: str, compile_into: Callable[[Path], None]) -> Path:
    """`root/prefix-key/filename`, compiled by `compile_into(temp_dir)` unless already cached
    whole (_intact: a damaged copy is built again).

    Under a file lock, so parallel processes neither race nor see a half-written build: the
    compiler writes into a private temporary directory, renamed into place only on success.
    """
    root = cache_root()
    final_dir = root / f"{prefix}-{key}"
    unusable = (f"the kernel cache {root} cannot be used ({{reason}}); set TWA_KERNELS_CACHE to a writable "
                "directory")
    # a finished build is renamed into place whole and sealed, so it needs no lock to be read:
    # a process holding the lock (a stopped build, a hung compiler) made every other wait
    if _intact(final_dir / filename):
        return final_dir / filename
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / f"{prefix}-{key}.lock"))
        for waited in itertools.count(1):
            try:
                lock.acquire(timeout=_LOCK_WAIT_S)
                break
            except Timeout:  # said, then waited for again: a compile takes a while
                if waited * _LOCK_WAIT_S >= _LOCK_GIVE_UP_S:  # a build stopped (Ctrl-Z, a debugger) or hung
                    raise BuildError(f"another process has held {root / f'{prefix}-{key}.lock'} for "
                                     f"{_LOCK_GIVE_UP_S / 60:.0f} minutes without finishing its build (stopped, or "
                                     "its compiler hung); end that process, or set TWA_KERNELS_CACHE to another "
                                     "directory") from None
                logger.warning("waiting for %s, held by another process building the same kernels",
                               root / f"{prefix}-{key}.lock")
    except OSError as exc:  # under a file, read-only, no permission: nothing can be built here
        if _intact(final_dir / filename):  # a read-only cache that holds the build already
            return final_dir / filename
        where = f"{exc.strerror or exc}" + (f": {exc.filename}" if getattr(exc, "filename", None) else "")
        raise BuildError(unusable.format(reason=where)) from exc
    try:
        if _intact(final_dir / filename):  # built by the process that held the lock
            return final_dir / filename
        _remove_abandoned_builds(root, held=f"{prefix}-{key}")
        build_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-{key}.building.", dir=root))
        try:
            logger.info("building %s in %s", filename, build_dir)
            compile_into(build_dir)
            _seal(build_dir / filename)
        except BuildError:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        except Exception as exc:  # compiler missing, compile error, ninja missing, ...
            shutil.rmtree(build_dir, ignore_errors=True)
            raise BuildError(str(exc)) from exc
        except BaseException:  # Ctrl-C, SIGTERM: nothing half-built is left
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        # mkdtemp's folder is the owner's alone: a cache shared by a team (TWA_KERNELS_CACHE) is
        # read by other users, as far as the umask allows
        try:
            os.chmod(build_dir, 0o755 & ~_umask())
        except OSError:  # a file system without permissions (some CIFS and FUSE mounts): nothing to share
            pass
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(build_dir, final_dir)
        _fsync(root)
    except OSError as exc:  # the directory gave the lock but no room for a build (full disk, quota)
        raise BuildError(unusable.format(reason=exc.strerror or exc)) from exc
    finally:
        lock.release()
    return final_dir / filename


# The libraries this process loaded, by name: a second copy of one (built into another
# cache) would register its torch.library namespace again, which aborts the process.
_loaded: dict[str, Path] = {}


def _load(library: Path) -> None:
    """torch.ops.load_library, its OSError named as a BuildError (the fallback's warning then
    says what happened instead of every op raising it)."""
    try:
        torch.ops.load_library(str(library))
        _loaded[library.stem] = library
    except OSError as exc:
        raise BuildError(f"the kernel library {library} could not be loaded ({exc}); delete {library.parent} "
                         "and run `python -m twa_kernels build`") from exc


def _loaded_from(library: Path) -> None:
    """Record a library that cpp_extension.load() has just loaded from its build directory,
    at once: a build stopped after it (Ctrl-C while it is sealed and renamed) deletes that
    directory, and loading a fresh build of it again would abort the process. Loading the
    renamed copy later is the same file (the same inode) to the dynamic loader. After such a
    stop the path recorded is gone from disk while the library stays loaded: the next
    process builds it again."""
    _loaded[library.stem] = library


# The temporary directory of a build, as _cached_build's mkdtemp names it: the cache may be a
# folder the user keeps other things in (TWA_KERNELS_CACHE), whose look-alikes stay untouched.
_BUILDING_NAME = re.compile(r"(cpu|cuda|cuda-kernels)-[0-9a-f]{16}\.building\.[a-z0-9_]{8}")


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _remove_abandoned_builds(root: Path, held: str) -> None:
    """Delete the temporary directories of builds whose process died mid-compile (killed,
    out of memory). A live build holds its key's lock for its whole life, so a building
    directory whose lock this process holds (`held`) or can take at once has no owner left."""
    for stale in root.glob("*.building.*"):
        if not _BUILDING_NAME.fullmatch(stale.name):  # not a build's: a folder of the user's, left alone
            continue
        owner = stale.name.split(".building.", 1)[0]
        if owner == held:
            shutil.rmtree(stale, ignore_errors=True)
            continue
        try:
            with FileLock(str(root / f"{owner}.lock"), timeout=0):
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # filelock.Timeout: being built now; or another user's lock, not ours to take
            continue


def build_cpu(verbose: bool = False) -> Path:
    """Compile (or find in the cache) and load the CPU kernel library; return its path.

    Raises BuildError with the compiler's message when the build fails.
    """
    if CPU_LIBRARY in _loaded:  # this process has it already (from whichever cache)
        return _loaded[CPU_LIBRARY]
    src = source_dir()

    def compile_into(build_dir: Path) -> None:
        # torch's own check of a missing compiler logs a banner that calls it incompatible
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise BuildError(f"no C++ compiler: {compiler!r} was not found on PATH; install one (g++), or set CXX "
                             "to its path")
        # said, or the first op call of a machine would stall for the build without a word
        logger.warning("twa_kernels: compiling the C++ CPU kernels, once for this machine and torch (15-30 s)")
        from torch.utils.cpp_extension import load

        load(name=CPU_LIBRARY, sources=[str(p) for p in _cpu_sources(src)], extra_cflags=CPU_CFLAGS,
             extra_ldflags=CPU_LDFLAGS, build_directory=str(build_dir), is_python_module=False, verbose=verbose)
        _loaded_from(build_dir / f"{CPU_LIBRARY}.so")

    library = _cached_build("cpu", _cpu_build_key(src), f"{CPU_LIBRARY}.so", compile_into)
    _load(library)
    return library


_build_lock = threading.Lock()
_cpu_state: dict[str, object] = {}
_cuda_state: dict[str, object] = {}


def _built_once(state: dict[str, object], build: Callable[[], Path], failure: str) -> bool:
    """Run `build` on the first call only; on a BuildError warn once (`failure`) and remember it."""
    with _build_lock:
        if "ok" not in state:
            try:
                build()
                state["ok"] = True
            except BuildError as exc:
                state["ok"] = False
                state["error"] = exc
                reason = _reason(exc)
                warn_at_caller(failure.format(reason=reason[:300]), RuntimeWarning)
        return bool(state["ok"])


def _reason(exc: BuildError) -> str:
    """The line of a build error that says why: a compiler's log starts with its command
    line, and the cause (`c++: not found`, `error: ...`) comes later."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    causes = [line for line in lines if re.search(r"error|not found|No such file", line, re.I)]
    return (causes[-1] if causes else lines[0])


def cpu_kernels_available() -> bool:
    """Build and load the CPU kernels on first call; False (after one warning) if that fails."""
    return _built_once(_cpu_state, build_cpu,
                       "twa_kernels: the C++ CPU kernels could not be built ({reason}); CPU ops fall back to the "
                       "reference backend, which is correct but slower. Run `python -m twa_kernels build` to see "
                       "the full compiler output.")


def cpu_build_error() -> BuildError | None:
    """The error of the last failed CPU build in this process, if any."""
    error = _cpu_state.get("error")
    return error if isinstance(error, BuildError) else None


# ---- CUDA -----------------------------------------------------------------------------------

CUDA_LIBRARY = "twa_kernels_cuda"
CUDA_KERNELS_LIBRARY = "libtwa_cuda_kernels.so"  # csrc/cuda alone: no torch, loadable with ctypes
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# Warnings are errors: CI compiles the kernels without a GPU, and a warning there is the only
# sign of a mistake that would show on the device.
NVCC_FLAGS = ["-O3", "-Werror", "all-warnings"]


def cuda_arch_flags() -> list[str]:
    """nvcc -gencode flags for $TORCH_CUDA_ARCH_LIST (like "8.0;9.0a" or "8.6+PTX"), default sm_80 and sm_90."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
    flags: list[str] = []
    for item in re.split(r"[;,\s]+", spec):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", item)
        if not match:
            raise BuildError(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not a compute capability like 8.0, 9.0a or 8.6+PTX")
        arch = f"{match[1]}{match[2]}{match[3]}"
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if match[4]:
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME (or $CUDA_PATH), else from PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_key(src: Path, *parts: str) -> str:
    digest = hashlib.sha256()
    for path in sorted([src / "twa_kernels_cuda.cpp", *src.glob("*.h"), *(src / "cuda").glob("*.cu*")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (*parts, " ".join(NVCC_FLAGS), " ".join(cuda_arch_flags())):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{what} failed ({' '.join(command[:2])} ...):\n{result.stdout}{result.stderr}")


def _nvcc_version() -> str:
    """`nvcc --version`'s output: a library built by another toolkit needs its libcudart."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc was not found on PATH or in $CUDA_HOME/bin; install the CUDA toolkit")
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError as exc:  # found but not runnable (a broken link, no execute permission)
        raise BuildError(f"{nvcc} could not be run ({exc.strerror or exc}); install the CUDA toolkit") from exc


def build_cuda_kernels() -> Path:
    """Compile csrc/cuda with nvcc alone into a shared library, without torch or a GPU.

    This is the compile check CI runs (`python -m twa_kernels build --cuda` on a machine
    without CUDA torch); it also gives the tests the host emulation of the kernels' index
    arithmetic. Also checks that the binding csrc/twa_kernels_cuda.cpp compiles.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc was not found on PATH or in $CUDA_HOME/bin; install the CUDA toolkit")
    src = source_dir()
    version = _nvcc_version()

    def compile_into(build_dir: Path) -> None:
        # the shipped kernels plus their host emulation (emulate.cu), which only this library has
        _run([nvcc, *NVCC_FLAGS, "-std=c++17", *cuda_arch_flags(), "-Xcompiler", "-fPIC", "-shared",
              str(src / "cuda" / "kernels.cu"), str(src / "cuda" / "emulate.cu"),
              "-o", str(build_dir / CUDA_KERNELS_LIBRARY)], "compiling csrc/cuda/kernels.cu and emulate.cu")
        from torch.utils.cpp_extension import include_paths

        abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
        _run([os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", "-Wall", "-Werror",
              f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-isystem{p}" for p in include_paths()),
              str(src / "twa_kernels_cuda.cpp")], "compiling csrc/twa_kernels_cuda.cpp")

    return _cached_build("cuda-kernels", _cuda_key(src, version, torch.__version__), CUDA_KERNELS_LIBRARY, compile_into)


def build_cuda(verbose: bool = False) -> Path:
    """Compile (or find in the cache) and load the CUDA extension; needs a CUDA build of torch and nvcc."""
    if torch.version.cuda is None:
        raise BuildError(f"torch {torch.__version__} has no CUDA; install a CUDA build of torch to use the cuda backend")
    if find_nvcc() is None:
        raise BuildError("nvcc was not found on PATH or in $CUDA_HOME/bin; install the CUDA toolkit")
    if CUDA_LIBRARY in _loaded:  # this process has it already (from whichever cache)
        return _loaded[CUDA_LIBRARY]
    src = source_dir()

    def compile_into(build_dir: Path) -> None:
        from torch.utils.cpp_extension import load

        logger.warning("twa_kernels: compiling the CUDA kernels, once for this machine, torch and toolkit (some "
                       "minutes)")
        # Our own -gencode flags make cpp_extension skip its default of the visible GPUs' archs.
        load(name=CUDA_LIBRARY, sources=[str(src / "twa_kernels_cuda.cpp"), str(src / "cuda" / "kernels.cu")],
             extra_cflags=["-O3"], extra_cuda_cflags=[*NVCC_FLAGS, *cuda_arch_flags()],
             build_directory=str(build_dir), is_python_module=False, verbose=verbose)
        _loaded_from(build_dir / f"{CUDA_LIBRARY}.so")

    key = _cuda_key(src, *_torch_identity(), _nvcc_version(), os.environ.get("CXX", ""))
    library = _cached_build("cuda", key, f"{CUDA_LIBRARY}.so", compile_into)
    _load(library)
    return library


def cuda_kernels_available() -> bool:
    """Build and load the CUDA extension on first call; False (after one warning) if that fails."""
    return _built_once(_cuda_state, build_cuda,
                       "twa_kernels: the CUDA kernels could not be built ({reason}); CUDA tensors use the Triton "
                       "or reference backend. `python -m twa_kernels build --cuda -v` shows why.")


def cuda_build_error() -> BuildError | None:
    """The error of the last failed CUDA build in this process, if any."""
    error = _cuda_state.get("error")
    return error if isinstance(error, BuildError) else None
