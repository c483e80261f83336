"""Writing files atomically: a crash, a full disk or an exception leaves the old file (or
none), never half of one."""

from __future__ import annotations

import contextlib
import json
import errno
import functools
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch  # read as safetensors.torch.<name> at each call: tests swap them
import torch
from torch import Tensor

from twa_kernels._checks import path_without_nul
from twa_kernels._outdir import current_umask, fsync_directory
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, OutputError, TWAKernelsError
from twa_kernels.io.keys import _not_dense_values


try:
    import fcntl  # POSIX: a writer holds a lock beside its temporary file for as long as it lives
except ImportError:  # Windows: without the lock no temporary file can be told abandoned
    fcntl = None

# atomic_write's temporary file is `.<name>.<8 random characters>.tmp`, and its lock file the
# same with `.lck`: a name within this many bytes of the file system's limit cannot be written
TEMPORARY_NAME_EXTRA = len("..") + 8 + len(".tmp")
_NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # mkstemp's
# what flock raises where the file system has no locks (so no cleaner has them either)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)
_DRAWS = 100  # names tried for a temporary before giving up (one is almost always enough)


class Temporary:
    """A new empty file beside `target`, `.<name>.<8 random characters>.tmp` (`path`), for a
    writer to fill and rename onto it. While the writer lives it holds an exclusive flock on a
    lock file beside it, `.<name>.<same 8>.lck`, taken before the temporary exists: the
    kernel drops the lock with the process however it ends, so the next write of `target`
    can remove what a killed writer left (remove_abandoned_temporaries). The lock is on a
    file of its own, never on the one written: on SMB mounts a lock makes every other
    descriptor's reads and writes fail, and the writers (torch.save, safetensors) open the
    temporary by name. `release()` removes the lock file; call it once the temporary is
    renamed or removed. Without fcntl (Windows) there is no lock file."""

    def __init__(self, target: Path):
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        for _ in range(_DRAWS):
            stem = f".{target.name}." + "".join(secrets.choice(_NAME_CHARACTERS) for _ in range(8))
            path = target.parent / f"{stem}.tmp"
            try:
                if fcntl is not None and not self._lock(target.parent / f"{stem}.lck"):
                    self.release()  # a lock file of that name someone holds: draw again
                    continue
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:  # a name another writer has: draw again
                self.release()
                continue
            except BaseException:
                self.release()
                raise
            self.path = str(path)
            return
        raise OSError(errno.EEXIST, f"no free name for a temporary file after {_DRAWS} draws")

    def _lock(self, lock_path: Path) -> bool:
        """Create the lock file and lock it; False if another process holds its lock."""
        self._lock_path = None
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._lock_path = lock_path
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if exc.errno in _NO_LOCKS:  # without locks the file is taken unlocked
                return True
            raise
        # a cleaner that locked it first took it for an orphan and removed it: draw again
        return self._holds_the_name()

    def _holds_the_name(self) -> bool:
        """Whether the lock file's name still names the file this writer holds open."""
        try:
            return os.lstat(self._lock_path).st_ino == os.fstat(self._lock_fd).st_ino
        except OSError:
            return False

    def release(self, keep_lock_file: bool = False) -> None:
        """Remove the lock file (first, while still locked) and let the lock go. A temporary
        that could not be removed keeps its lock file (`keep_lock_file`), so that the next
        write of its target takes both."""
        try:
            if self._lock_path is not None and not keep_lock_file and self._holds_the_name():
                try:
                    os.unlink(self._lock_path)
                except OSError:
                    pass
        finally:
            self._lock_path = None
            if self._lock_fd is not None:
                fd, self._lock_fd = self._lock_fd, None
                os.close(fd)


# the descriptors directory_held holds: closed in a forked child (a DataLoader's worker),
# which would otherwise share the lock and keep it past the block
_HELD_DIRECTORIES: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD_DIRECTORIES:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_DIRECTORIES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


@contextmanager
def directory_held(directory: Path, what: str) -> Iterator[None]:
    """An exclusive flock on `directory` itself for the block (nothing is written into it):
    a second run writing the same folder (`what`) at once is refused with OutputError,
    rather than writing over the first one's files and mixing them. The kernel drops the
    lock with the process however it ends; a forked child closes its copy of the
    descriptor, so the lock ends with the block. Where the file system has no such locks
    (NFS may refuse a directory's), or without fcntl (Windows), the block runs unlocked."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    _HELD_DIRECTORIES.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{str(directory)!r} is being written by another {what} running now; wait for it "
                                  "to finish, or pass another folder") from None
            if exc.errno not in (*_NO_LOCKS, errno.EBADF):
                raise
        yield
    finally:
        _HELD_DIRECTORIES.discard(fd)
        os.close(fd)


def remove_abandoned_temporaries(target: Path) -> None:
    """Remove the temporary files of `target` that writers killed mid-write left (SIGKILL,
    the out-of-memory killer): a `.<name>.<8 characters>.tmp` beside it whose lock file is
    there and locked by no process, with that lock file, and a lock file locked by no
    process whose temporary is gone. A live writer holds the lock from before its
    temporary exists (Temporary), so its file is never taken; a temporary without a lock
    file (one written without locks, or by an earlier version) is left. Best effort:
    anything unreadable, unlockable or not a regular file is left as it is."""
    if fcntl is None:
        return
    pattern = re.compile(rf"(\.{re.escape(target.name)}\.[a-z0-9_]{{8}})\.(tmp|lck)")
    try:
        entries = os.listdir(target.parent)
    except OSError:
        return
    stems = {found.group(1) for found in map(pattern.fullmatch, entries) if found}
    for stem in stems:
        path, lock_path = target.parent / f"{stem}.tmp", target.parent / f"{stem}.lck"
        try:  # regular files only: opening a FIFO or a device may have effects of its own
            if not stat.S_ISREG(os.lstat(lock_path).st_mode):
                continue
            fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW)  # NFS locks exclusively only files open to write
        except OSError:  # no lock file: a temporary written without locks is left
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.lstat(lock_path).st_ino:
                continue  # the name is another writer's lock file now
            if os.path.lexists(path):
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                os.unlink(path)
            os.unlink(lock_path)
        except OSError:  # a live writer's lock, no locks on this file system, no permission
            pass
        finally:
            os.close(fd)


def _default_file_mode() -> int:
    """The mode open() gives a new file under the current umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def check_output_file(path: str | os.PathLike, example: str = "averaged.safetensors") -> Path:
    """`path` as a Path, or an OutputError when it cannot name a file to write: a NUL byte,
    an existing directory (the message suggests `example` inside it), a file where a folder
    of the path should be, a symbolic link that leads back to itself. For work that runs
    long before it writes, to check its output first."""
    path_without_nul(path, "the output path", OutputError)
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file path such as {path / example}")
    if os.path.islink(os.path.realpath(path)):  # where realpath stops: a link whose chain comes back to it
        raise OutputError(f"{path} is a symbolic link that leads back to itself; remove the loop or give another path")
    nearest = next((parent for parent in path.parents if parent.exists()), None)  # the folder the file goes under
    if nearest is not None and not nearest.is_dir():
        raise OutputError(f"cannot write {path}: {nearest} is a file, not a folder; give a path whose folders are "
                          "folders")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file through `write(temporary_path)`, then move it into place: a crash, a
    full disk or an exception leaves the old file (or none), never half of one; a full disk
    or an exception leaves no temporary file either (a process killed mid-write leaves its
    `.<name>.*.tmp` and `.lck` beside the target, which the next write of the same file
    removes). The new file gets the old one's mode, or the umask's as open() would give it.
    A symbolic link is written through: the file it points to is replaced and the link
    kept, as OutputDirectory keeps a linked output directory. An unwritable location is an
    OutputError naming the path."""
    return atomic_write_together({path: write})[0]


def atomic_write_together(writes: Mapping[str | os.PathLike, Callable[[str], None]]) -> list[Path]:
    """atomic_write for several files that belong together (a figure and the JSON of its
    numbers): every file is written whole beside its target first, and only then are they
    moved into place, in the order given. A full disk or an exception while writing leaves
    every old file as it was."""
    paths = [check_output_file(path) for path in writes]
    staged: list[tuple[str, Path, Path]] = []  # (temporary, target, path as given)
    temporaries: list[Temporary] = []  # their locks, held until the end
    created: list[Path] = []  # deepest first per file: removed if the writes fail
    replaced = 0
    current = paths[0] if paths else None
    try:
        for path, write in zip(paths, writes.values()):
            current = path
            # the temporary goes beside the file the link points to: os.replace onto the link
            # itself would put a regular file in its place, and across file systems it could
            # not rename at all
            real = Path(os.path.realpath(path))
            created += [parent for parent in real.parents if not parent.exists()]
            try:
                real.parent.mkdir(parents=True, exist_ok=True)
                mode = real.stat().st_mode & 0o7777 if real.exists() else _default_file_mode()
                remove_abandoned_temporaries(real)
                temporaries.append(Temporary(real))
            except OSError as exc:
                raise OutputError(f"cannot write {path}: {exc.strerror or exc}; choose a writable location") from exc
            tmp = temporaries[-1].path
            staged.append((tmp, real, path))
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.chmod(tmp, mode)
        for tmp, real, path in staged:  # the renames one after another: an interruption between
            current = path              # two of them (an fsync takes a while) would split the set
            os.replace(tmp, real)
            replaced += 1
        for folder in dict.fromkeys(real.parent for _, real, _ in staged):
            fsync_directory(folder)  # the new names themselves are on disk too
    except TWAKernelsError:  # named already (an unwritable location above, or by `write`)
        raise
    except OSError as exc:
        kept = "the previous file, if any, is unchanged" if replaced == 0 else "the files before it were replaced"
        raise OutputError(f"cannot write {current}: {exc.strerror or exc} ({kept}); free space or choose another "
                          "location") from exc
    except (RuntimeError, safetensors.SafetensorError) as exc:
        # torch.save and safetensors report a failed write (a full disk, a file size limit)
        # as their own errors, not as OSError; the values were checked before writing began
        raise OutputError(f"cannot write {current}: the writer failed ({type(exc).__name__}: {exc}); the previous "
                          "file, if any, is unchanged (a full disk or a file size limit fails it so: free space or "
                          "choose another location)") from exc
    finally:
        for (tmp, _, _), temporary in zip(staged, temporaries):
            left = False
            try:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            except OSError:  # the error being raised matters more; the next write takes this one
                left = True
            finally:  # after the rename or unlink: no temporary is ever left unlocked
                temporary.release(keep_lock_file=left)
        for temporary in temporaries[len(staged):]:
            temporary.release()
        if replaced < len(staged) or len(staged) < len(paths):
            _remove_empty(sorted(set(created), key=lambda p: len(p.parts), reverse=True))
    return paths


@functools.cache
def _safetensors_holds(dtype: torch.dtype) -> bool:
    """Whether safetensors writes `dtype` (its writer fails on others with a bare KeyError)."""
    try:
        safetensors.torch.save({"probe": torch.empty(0, dtype=dtype)})
    except Exception:  # noqa: BLE001  (any failure means: not a dtype the format holds)
        return False
    return True


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories a failed write created (deepest first), where still empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (something else wrote there meanwhile) or already gone: leave the rest


def write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = True) -> Path:
    """Write `obj` as indented JSON, atomically (see atomic_write). allow_nan=False refuses
    NaN and infinities (InvalidArgumentError, a ValueError; nothing written) instead of
    writing them as the bare NaN / Infinity that strict JSON readers reject; a value JSON
    cannot hold (a set, a tensor) is InvalidTypeError."""
    try:  # before the write: a refusal leaves nothing
        text = json.dumps(obj, indent=1, allow_nan=allow_nan)
    except ValueError as exc:  # a NaN or infinity with allow_nan=False, or a container holding itself
        fix = ("write None where a value is not finite" if "float" in str(exc)
               else "give data without a reference cycle")
        raise InvalidArgumentError(f"{path}: cannot be written as JSON ({exc}); {fix}") from exc
    except TypeError as exc:
        raise InvalidTypeError(f"{path}: {exc}; give JSON's types (dicts with str keys, lists, str, numbers, bools, "
                               "None): convert tensors with .tolist() and sets with sorted()") from exc
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def json_record(path: str | os.PathLike) -> dict | None:
    """The JSON object a file holds (a record write_json wrote, say), or None where it holds
    none: unreadable, not JSON, or JSON of another kind. For a command that replaces only a
    record of its own."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write a state_dict as .safetensors or with torch.save, atomically (see atomic_write):
    a crash leaves either the old file or the new one, never half of one."""
    path_without_nul(path, "the output path", OutputError)
    if not isinstance(state, Mapping):
        raise InvalidTypeError(f"state must be a mapping of names to tensors, got {type(state).__name__}")
    if not state:
        raise InvalidArgumentError(f"{path}: the state_dict to save is empty; pass the tensors to save")
    for key, value in state.items():
        if isinstance(key, str) and key.rpartition(".")[2] == "_extra_state" and not isinstance(value, Tensor):
            raise InvalidTypeError(f"state[{key!r}] is a module's extra state (get_extra_state), a "
                                   f"{type(value).__name__}, which a weights file does not hold: save the tensors "
                                   "({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}) and keep the "
                                   "extra state apart (torch.save)")
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise InvalidTypeError(f"state[{key!r}] is {type(value).__name__}: a state_dict to save holds tensors "
                                   "under string names only; leave other entries out")
        if Path(path).suffix == ".safetensors":
            try:
                key.encode("utf-8")  # the header is UTF-8 JSON
            except UnicodeEncodeError:  # a name decoded from bytes with surrogates, as os.fsdecode leaves them
                raise InvalidArgumentError(f"{path}: state key {key!r} is not valid Unicode text (it holds a lone "
                                           "surrogate), which a .safetensors header cannot hold; rename it, or save "
                                           "as .pt") from None
        if Path(path).suffix == ".safetensors" and not _safetensors_holds(value.dtype):
            raise InvalidArgumentError(f"state[{key!r}] is {value.dtype}, which a .safetensors file cannot hold; "
                                       "save as .pt, or cast it to a dtype the format has (such as torch.float32)")
        if kind := _not_dense_values(value):
            raise InvalidArgumentError(f"state[{key!r}] is {kind}; save real, dense tensors (materialise meta "
                                       "tensors, .to_dense() sparse ones)")
    if Path(path).suffix == ".safetensors" and "__metadata__" in state:
        raise InvalidArgumentError(f"{path}: a .safetensors file cannot hold a tensor named '__metadata__' (the "
                                   "format reserves that name for its header); rename it or save as .pt")
    # clone: safetensors refuses tensors that share memory (tied weights, views)
    tensors = {}
    for key, value in state.items():
        try:
            tensors[key] = value.detach().cpu().clone().contiguous()
        except (RuntimeError, NotImplementedError) as exc:  # torch copies no sub-byte dtype (uint4, int2, ...)
            raise InvalidArgumentError(f"state[{key!r}] is {value.dtype}, which torch cannot copy to save ({exc}); "
                                       "cast it to a dtype torch computes in, such as torch.uint8") from exc
    if Path(path).suffix == ".safetensors":
        return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))
