"""The JIT build: cache, lock, CLI, and the fallback when no compiler works."""

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import twa_kernels
from twa_kernels import _build

REPO = Path(twa_kernels.__file__).resolve().parent.parent


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("TWA_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=600,
                           cwd=REPO)


def test_no_compiler_falls_back_to_reference_with_one_warning(tmp_path):
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "import twa_kernels as tk\n"
        "qb = tk.quantize(torch.randn(3, 100), 4, 32)\n"
        "print(tk.backend('cpu'), tk.backend('cpu'))\n"
        "print(tuple(tk.project(qb, torch.randn(100)).shape))\n"
    )
    result = _run(code, {"CXX": str(tmp_path / "no-such-compiler"), "TWA_KERNELS_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reference", "reference", "(3,", "1)"]
    assert result.stderr.count("could not be built") == 1
    assert "python -m twa_kernels build" in result.stderr
    # one warning: torch's own banner called a missing compiler incompatible before it
    assert "no C++ compiler" in result.stderr and "WARNING !!" not in result.stderr
    # nothing half-built is left in the cache
    assert not list((tmp_path / "cache").glob("cpu-*/"))


def test_an_unusable_cache_falls_back_to_reference_naming_the_variable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = ("import warnings, torch\nwarnings.simplefilter('always')\nimport twa_kernels as tk\n"
            "print(tk.backend('cpu'))\n")
    result = _run(code, {"TWA_KERNELS_CACHE": str(blocker / "cache")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reference"]
    assert "cannot be used" in result.stderr and "TWA_KERNELS_CACHE" in result.stderr


def test_no_home_directory_falls_back_to_reference_naming_the_variable(tmp_path):
    # a container's user with neither $HOME nor a passwd entry: Path.home() raises RuntimeError
    code = ("import os, pathlib, warnings, torch\nwarnings.simplefilter('always')\n"
            "def no_home(): raise RuntimeError('Could not determine home directory.')\n"
            "pathlib.Path.home = staticmethod(no_home)\n"
            "import twa_kernels as tk\nprint(tk.backend('cpu'))\n")
    env = {key: value for key, value in os.environ.items() if key not in ("HOME", "XDG_CACHE_HOME",
                                                                          "TWA_KERNELS_CACHE", "TWA_KERNELS_BACKEND")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reference"]
    assert "no home directory" in result.stderr and "TWA_KERNELS_CACHE" in result.stderr


def test_the_cache_is_the_variables_or_the_users_and_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("TWA_KERNELS_CACHE", str(tmp_path / "mine"))
    assert _build.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("TWA_KERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _build.cache_root() == tmp_path / "twa_kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the spec says to ignore it: it moved with the working directory
    assert _build.cache_root() == Path.home() / ".cache" / "twa_kernels"


def test_parallel_builds_share_one_cached_library(tmp_path):
    env = {**os.environ, "TWA_KERNELS_CACHE": str(tmp_path)}
    env.pop("TWA_KERNELS_BACKEND", None)
    cmd = [sys.executable, "-m", "twa_kernels", "build"]
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    libraries = {out.strip().rsplit(": ", 1)[1] for out, _ in outputs}
    assert len(libraries) == 1 and Path(libraries.pop()).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [next(tmp_path.glob("cpu-*/")).name]
    # readable by the other users of a shared cache, as far as the umask allows (mkdtemp's is the owner's)
    built = next(tmp_path.glob("cpu-*/"))
    assert stat.S_IMODE(built.stat().st_mode) == 0o755 & ~_build._umask()


def test_cache_key_follows_sources(tmp_path):
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    for rel in ("twa_kernels.cpp", "cpu/kernels.cpp", "cpu/kernels.h"):
        (src / rel).write_text((_build.source_dir() / rel).read_text())
    before = _build._cpu_build_key(src)
    (src / "cpu" / "kernels.h").write_text((src / "cpu" / "kernels.h").read_text() + "\n// changed\n")
    assert _build._cpu_build_key(src) != before


def test_a_cache_on_a_file_system_without_permissions_keeps_its_build(tmp_path, monkeypatch):
    # the chmod that lets a shared cache's other users read a build failed on such mounts
    # (some CIFS and FUSE ones), and the build was thrown away as an unusable cache
    monkeypatch.setenv("TWA_KERNELS_CACHE", str(tmp_path))

    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_build.os, "chmod", refused)
    library = _build._cached_build("cpu", "k", "x.so", lambda where: (where / "x.so").write_bytes(b"built"))
    assert library.read_bytes() == b"built" and _build._intact(library)


def test_cache_key_follows_the_torch_build_not_only_its_version(monkeypatch):
    # a wheel and a source build of one version, of another C++ ABI, loaded each other's library
    import torch

    before = _build._cpu_build_key(_build.source_dir())
    monkeypatch.setattr(torch.version, "git_version", "another-commit")
    assert _build._cpu_build_key(_build.source_dir()) != before


def test_cache_key_follows_the_cpus_features_not_only_its_name(monkeypatch):
    # two machines that report the same CPU name with other features must not share a
    # -march=native build (it would stop the other with an illegal instruction)
    import builtins
    import io as stdio

    real_open = builtins.open

    def cpuinfo(flags: str):
        text = f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
        return lambda path, *a, **k: stdio.StringIO(text) if path == "/proc/cpuinfo" else real_open(path, *a, **k)

    keys = []
    for flags in ("fpu sse2 avx2 fma", "fpu sse2 avx2 fma avx512f avx512bw"):
        monkeypatch.setattr(builtins, "open", cpuinfo(flags))
        keys.append(_build._cpu_build_key(_build.source_dir()))
    assert keys[0] != keys[1]


def test_a_build_killed_mid_compile_leaves_nothing_behind_for_long(tmp_path, monkeypatch):
    """Building directories whose owner died are removed by the next build; one whose
    owner still holds its lock is left alone, and so are the user's folders that only look
    like one (the cache may be any folder)."""
    monkeypatch.setenv("TWA_KERNELS_CACHE", str(tmp_path))
    k1, k2, k3 = (f"{n:016x}" for n in (1, 2, 3))
    for name in (f"cpu-{k1}.building.dead1abc", f"cuda-{k2}.building.dead2abc", f"cpu-{k3}.building.alive_ab",
                 "thesis.building.v2", f"cpu-{k1}.building.mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "partial.o").write_bytes(b"\0" * 10)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom filelock import FileLock\n"
        f"with FileLock({str(tmp_path / f'cpu-{k3}.lock')!r}):\n    print('held', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        built = _build._cached_build("cpu", k1, "lib.so", lambda d: (d / "lib.so").write_bytes(b"lib"))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert built.read_bytes() == b"lib"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        [f"cpu-{k1}", f"cpu-{k3}.building.alive_ab", "thesis.building.v2", f"cpu-{k1}.building.mine"])
    assert not (tmp_path / "thesis.lock").exists()  # no lock made for an owner that is no build


def test_a_cached_library_cut_short_or_emptied_is_built_again(tmp_path, monkeypatch):
    # dlopen of a truncated library can kill the process (SIGBUS), so the cache checks the
    # size and digest its build recorded before handing the file out
    monkeypatch.setenv("TWA_KERNELS_CACHE", str(tmp_path))
    builds = []

    def compile_into(directory: Path) -> None:
        builds.append(directory)
        (directory / "lib.so").write_bytes(b"library bytes " * 100)

    library = _build._cached_build("cpu", "k", "lib.so", compile_into)
    assert _build._intact(library) and len(builds) == 1
    assert _build._cached_build("cpu", "k", "lib.so", compile_into) == library and len(builds) == 1
    for damage in (lambda: library.write_bytes(library.read_bytes()[:500]), lambda: library.write_bytes(b""),
                   lambda: _build._record_of(library).unlink()):
        damage()
        assert not _build._intact(library)
        assert _build._cached_build("cpu", "k", "lib.so", compile_into) == library
        assert _build._intact(library) and library.read_bytes() == b"library bytes " * 100
    assert len(builds) == 4


def test_a_cache_without_room_for_a_build_or_a_library_that_will_not_load_is_a_build_error(tmp_path, monkeypatch):
    import errno
    import tempfile

    import pytest

    monkeypatch.setenv("TWA_KERNELS_CACHE", str(tmp_path))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkdtemp", full_disk)
        with pytest.raises(_build.BuildError, match=r"kernel cache .* cannot be used \(No space left on device\); "
                                                    "set TWA_KERNELS_CACHE"):
            _build._cached_build("cpu", "k", "lib.so", lambda d: (d / "lib.so").write_bytes(b"x"))
    (tmp_path / "empty.so").write_bytes(b"")
    with pytest.raises(_build.BuildError, match=r"could not be loaded .*delete .* and run `python -m twa_kernels "
                                                r"build`"):
        _build._load(tmp_path / "empty.so")


def test_a_build_interrupted_by_ctrl_c_leaves_no_half_built_directory(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("TWA_KERNELS_CACHE", str(tmp_path))

    def interrupted(directory: Path) -> None:
        (directory / "kernels.o").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build._cached_build("cpu", "k", "lib.so", interrupted)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_a_cached_build_is_used_while_another_process_holds_its_lock(tmp_path):
    # every process waited on the lock, silently and for ever, even for an intact build
    cache = tmp_path / "cache"
    built = _run("from twa_kernels import _build; print(_build.build_cpu())", {"TWA_KERNELS_CACHE": str(cache)})
    assert built.returncode == 0, built.stderr[-2000:]
    assert "compiling the C++ CPU kernels, once" in built.stderr  # a first call says why it stalls
    library = Path(built.stdout.strip().splitlines()[-1])
    lock = cache / f"{library.parent.name}.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"held = FileLock({str(lock)!r}); held.acquire(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        again = subprocess.run([sys.executable, "-c", "from twa_kernels import _build; print(_build.build_cpu())"],
                               env={**os.environ, "TWA_KERNELS_CACHE": str(cache)}, capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(library), again.stderr
        assert "compiling" not in again.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_build_lock_held_for_too_long_is_a_build_error_not_a_wait_for_ever(tmp_path, monkeypatch):
    # a build stopped with Ctrl-Z (or in a debugger) made every other process wait for ever
    monkeypatch.setenv("TWA_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(_build, "_LOCK_WAIT_S", 0.2)
    monkeypatch.setattr(_build, "_LOCK_GIVE_UP_S", 0.6)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from filelock import FileLock; "
                               f"held = FileLock({str(tmp_path / 'cpu-k.lock')!r}); held.acquire(); "
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(twa_kernels.errors.BuildError, match=r"has held .*cpu-k.lock for 0 minutes without "
                                                                 r"finishing its build"):
            _build._cached_build("cpu", "k", "x.so", lambda where: pytest.fail("built while the lock was held"))
    finally:
        holder.kill()
        holder.wait()


def test_a_second_build_in_one_process_returns_the_library_it_loaded(tmp_path):
    # built into a second cache, the library registered its namespace again: the process aborted
    code = ("import os; from twa_kernels import _build\n"
            "first = _build.build_cpu()\n"
            f"os.environ['TWA_KERNELS_CACHE'] = {str(tmp_path / 'other')!r}\n"
            "print(first == _build.build_cpu())\n")
    result = _run(code, {})
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]
    assert not (tmp_path / "other").exists()  # nothing compiled there


def test_a_build_stopped_after_its_library_loaded_is_not_loaded_a_second_time(tmp_path):
    # cpp_extension.load() loads the library from the build directory; a Ctrl-C while it was
    # sealed removed that directory, and the retry loaded a fresh build: the process aborted
    # ("Only a single TORCH_LIBRARY can be used to register the namespace")
    built = _run("from twa_kernels import _build; print(_build.build_cpu())", {})  # in another process
    assert built.returncode == 0, built.stderr[-2000:]
    code = f"""
import os, shutil, torch, torch.utils.cpp_extension as extension
from twa_kernels import _build
built = {built.stdout.strip().splitlines()[-1]!r}
os.environ["TWA_KERNELS_CACHE"] = {str(tmp_path / "cache")!r}

def load(name, sources, build_directory, is_python_module, **kwargs):  # a compile, without compiling
    shutil.copy(built, os.path.join(build_directory, name + ".so"))
    torch.ops.load_library(os.path.join(build_directory, name + ".so"))

extension.load = load
seal, calls = _build._seal, []

def interrupted(library):
    calls.append(library)
    if len(calls) == 1:
        raise KeyboardInterrupt
    seal(library)

_build._seal = interrupted
try:
    _build.build_cpu()
except KeyboardInterrupt:
    pass
_build.build_cpu()
print("ok", len(calls))
"""
    result = _run(code, {})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "ok 1"  # the retry found the library loaded


def test_a_build_failure_is_named_by_its_cause_line():
    error = _build.BuildError("Error building extension 'twa_kernels_cpu': [1/3] c++ -MMD -MF kernels.o.d -O3 ...\n"
                              "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.")
    assert _build._reason(error) == "/bin/sh: 1: c++: not found"
    assert _build._reason(_build.BuildError("torch 2.13.0+cpu has no CUDA")) == "torch 2.13.0+cpu has no CUDA"


def test_a_wheel_built_through_the_source_distribution_ships_the_kernel_sources_and_builds_them(tmp_path):
    # `python -m build` makes the wheel from the sdist, which held no csrc/: the installed
    # package had no kernels to build and ran every op on the reference backend
    pytest.importorskip("setuptools", minversion="70.1")  # older ones build wheels with the `wheel` package only
    source = tmp_path / "source"
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((REPO / name).read_bytes())
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("twa_kernels", "csrc"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    build = ("import sys\nfrom setuptools import build_meta\n"
             "print(getattr(build_meta, sys.argv[1])(sys.argv[2]))\n")

    def hook(name: str, cwd: Path, out: Path) -> Path:
        done = subprocess.run([sys.executable, "-c", build, name, str(out)], cwd=cwd, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return out / done.stdout.strip().splitlines()[-1]

    sdist = hook("build_sdist", source, tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    wheel = hook("build_wheel", tmp_path / "unpacked" / sdist.name[: -len(".tar.gz")], tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n[len("twa_kernels/csrc/"):] for n in archive.namelist() if n.startswith("twa_kernels/csrc/")}
        archive.extractall(tmp_path / "site")  # a pure-Python wheel: unpacking it is installing it
    assert shipped == {p.relative_to(REPO / "csrc").as_posix() for p in (REPO / "csrc").rglob("*") if p.is_file()}
    code = ("import torch, twa_kernels as tk\n"
            "assert tk.__file__.startswith(%r), tk.__file__\n"
            "qb = tk.quantize(torch.randn(3, 256), 4, 32)\n"
            "g = torch.randn(256)\n"
            "dense = (tk.dequantize(qb).double() @ g.double()).float()\n"
            "print(tk.backend('cpu'), torch.allclose(tk.project(qb, g)[:, 0], dense, rtol=0, atol=1e-4))\n"
            ) % str(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "TWA_KERNELS_CACHE": str(tmp_path / "cache")}
    env.pop("TWA_KERNELS_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["cpp", "True"], (done.stdout, done.stderr[-2000:])
