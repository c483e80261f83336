"""An output directory whose files are replaced together, as one set.

`twa fit` writes several files that belong together (the averaged weights in two formats and
the report that describes them). A reader must never see a new file beside an old one, so the
files are written into a staging directory beside the target and the two directories are then
swapped in one step: renameat2(RENAME_EXCHANGE) on Linux. Where that call is missing (another
OS, a file system without it) the old directory is first renamed aside and then the new one
into place; a run killed between those two renames leaves no target, and the next run puts
the old set back before it starts.

Staging and set-aside directories are named `.<target>.twa-stage.<owner>.<random>` and
`.<target>.twa-old.<owner>.<random>`, where <owner> is the process's number and its start time
in clock ticks after boot; the next run removes those whose process is gone, so an
interrupted run (SIGINT, SIGKILL, a crash) leaves nothing behind for long. A process of that
number that started at another time is not the owner (numbers are reused, and a restarted
container's first process often gets the one its killed run had); ticks after boot, unlike
file times, no change of the wall clock moves.

Because the whole directory is replaced, it must hold nothing but these outputs (regular
files of exactly those names, and the `.<name>.<random>.tmp` and `.lck` files an interrupted
atomic_write leaves): a directory with anything else in it is refused before any work, never
emptied. What appears in it while the run works (a file a data loader writes there, say) is
moved into the new set after the swap, not removed with the old one; one named like an output
(which the new set's file takes the place of) keeps the previous set aside, with a warning.

The staging name is the target's and STAGING_NAME_EXTRA characters more, so the target's name
must be at least that much shorter than the file system's limit for one name (218 of 255).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import reprlib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from twa_kernels._checks import path_without_nul
from twa_kernels.errors import OutputError, warn_at_caller


def fit_file_name(output_name: str, kind: str) -> str:
    """`.<output_name>.twa-<kind>`: a file or folder `twa fit` keeps beside its output directory
    `output_name`: its progress (kind `progress.pt`), or a staging, set-aside or kept folder
    (kind `stage.<owner>.`, `old.<owner>.` or `kept.`, to which mkdtemp adds its own characters;
    <owner> is owner_tag())."""
    return f".{output_name}.twa-{kind}"


# every name fit_file_name gives: directory listings of checkpoints skip them, also where the
# output sits in the checkpoints' folder
FIT_FILE = re.compile(r"^\..+\.twa-(progress\.pt|(stage|old|kept)\..+)$")

# the owner's part of a name (owner_tag): a process number, and its start where it could be read
OWNER = r"\d+(?:-[0-9a-z]+)?"
_LEFTOVER = re.compile(rf"^\.(?P<target>.+)\.twa-(?P<kind>stage|old)\.(?P<owner>{OWNER})\.[^.]+$")
# `.twa-stage.` and the owner's tag around the name (the pid, in 7 digits for Linux's largest,
# 2**22, a dash and its start in 8 base-36 digits: ticks for centuries), and mkdtemp's 8 random
# characters after it: a fixed bound, so a name that fits fits every run
STAGING_NAME_EXTRA = len("..twa-stage..") + 7 + 1 + 8 + 8
_DEFAULT_NAME_MAX = 255  # bytes per name on ext4, XFS, btrfs, APFS and NTFS

_PATH_REPR = reprlib.Repr()
_PATH_REPR.maxstring = 200


def shown(path: str | os.PathLike) -> str:
    """A path as a message shows it: quoted, and cut short when it is long."""
    return _PATH_REPR.repr(str(path))


def _entries(names: Sequence[str]) -> str:
    """The first few of `names`, for a message."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (os.umask can only
    be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/<pid>/stat's field 22: a
    count that no change of the wall clock moves), or None where /proc cannot tell (another
    OS, no such process, a restricted /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            # the command name (field 2) may hold spaces and parentheses: fields follow its last ')'
            return int(stat_file.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def owner_tag() -> str:
    """`<pid>-<start>` of this process (its start in ticks, base 36), or `<pid>` where /proc
    cannot tell: what a staging folder's name says of the process that made it."""
    ticks = _start_ticks(os.getpid())
    if ticks is None:
        return str(os.getpid())
    digits = ""
    while True:
        ticks, digit = divmod(ticks, 36)
        digits = _BASE36[digit] + digits
        if not ticks:
            return f"{os.getpid()}-{digits}"


def owner_alive(tag: str) -> bool:
    """Whether the process that a name's `tag` (owner_tag) names may still run: a process of
    that number exists and, where the tag has its start, started then. One that started at
    another time got the number again after the owner ended, as a restarted container's
    first process does (often this very one). A tag without the start (no /proc where it
    was made) counts any process of that number, another user's too."""
    number, _, start = tag.partition("-")
    pid = int(number)
    try:
        if pid != os.getpid():
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    if not start:
        return True
    ticks = _start_ticks(pid)
    return ticks is None or ticks == int(start, 36)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries to disk (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE).
    False where the OS or the file system does not offer it; other failures raise."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc older than 2.28, or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def name_limit(directory: Path) -> int:
    """The most bytes one file name may hold in `directory`, or in its nearest existing
    ancestor where it does not exist yet."""
    existing = directory
    while not os.path.isdir(existing) and existing != existing.parent:  # isdir: False on any error
        existing = existing.parent
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):  # no such query on this OS or file system
        return _DEFAULT_NAME_MAX


class OutputDirectory:
    """The directory `path`, to be replaced by the files `names` as one set.

    Construction checks that the location can be written (and refuses a path that is a file,
    lies under a file, is the working directory or holds other files), removes what an
    interrupted run left and creates the staging directory, so a bad output location fails
    before any training. Write each file to `stage(name)`, then `commit()`; `discard()` (safe
    to call after commit) removes the staging directory if the run ends without committing.
    """

    def __init__(self, path: str | os.PathLike, names: Sequence[str]):
        path_without_nul(path, "the output directory", OutputError)
        self.path = Path(path)
        self.names = list(names)
        # a symlinked output is written where it points, and the link is kept
        self._target = Path(os.path.realpath(self.path))
        self._check_location()
        # the parents this run creates, removed again by discard() when it ends without output
        self._created = [d for d in (self._target.parent, *self._target.parent.parents) if not d.exists()]
        self._committed = False
        self._staging_removable = True
        try:
            self.recover()
            self._target.parent.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=fit_file_name(self._target.name, f"stage.{owner_tag()}."),
                                                  dir=self._target.parent))
            # the outputs the target holds now: one that is new or changed at commit was written
            # there during the run (by a data loader, say), and is the user's, not an old output
            self._before = self._signatures(self._target)
        except OSError as exc:  # a read-only file system, a permission os.access did not see
            raise self._unwritable(self._target.parent, exc) from exc

    # -- checks before any work --------------------------------------------------------

    def _unwritable(self, where: Path, exc: OSError | None = None) -> OutputError:
        why = f": {exc.strerror or exc}" if exc is not None else ": no write permission"
        return OutputError(f"output {shown(self.path)} cannot be written ({shown(where)[1:-1]}{why}); choose a "
                           "directory you can write to")

    def _owned(self, folder: Path, entry: str) -> bool:
        """A regular file (or a link to one) named as an output, or as the temporary file an
        interrupted atomic_write of an output leaves (`.<name>.<random>.tmp` and its `.lck`):
        what the swap may remove. A directory named like an output is the user's."""
        named = entry in self.names or any(re.fullmatch(rf"\.{re.escape(name)}\.[A-Za-z0-9_]+\.(tmp|lck)", entry)
                                           for name in self.names)
        return named and os.path.isfile(folder / entry)

    def _signatures(self, folder: Path) -> dict[str, tuple[int, int, int]]:
        """(inode, size, modification time) of each output-named file in `folder`."""
        if not folder.is_dir():
            return {}
        found = {}
        for entry in os.listdir(folder):
            if self._owned(folder, entry):
                st = os.stat(folder / entry)
                found[entry] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return found

    def _check_name_length(self) -> None:
        """The staging directory's name is the target's and STAGING_NAME_EXTRA characters
        more: a name that leaves no room for them would fail at mkdtemp, naming the parent."""
        name_max = name_limit(self._target.parent)
        for part in self._target.parent.parts:
            if len(os.fsencode(part)) > name_max:
                raise OutputError(f"output {shown(self.path)}: the folder name {shown(part)} is "
                                  f"{len(os.fsencode(part))} characters, more than the {name_max} the file system "
                                  "allows in one name; choose a shorter path")
        limit = name_max - STAGING_NAME_EXTRA
        length = len(os.fsencode(self._target.name))
        if length > limit:
            raise OutputError(f"output {shown(self.path)}: the directory name is {length} characters, too long for "
                              f"the staging directory name beside it, which adds {STAGING_NAME_EXTRA}: at most "
                              f"{limit} characters (the file system allows {name_max} in one name); choose a "
                              "shorter name")

    def _check_location(self) -> None:
        try:
            self._check_name_length()
            self._check_existing()
        except OSError as exc:
            if isinstance(exc, OutputError):
                raise
            raise self._unwritable(Path(exc.filename) if exc.filename else self._target, exc) from exc

    def _check_existing(self) -> None:
        try:
            os.stat(self.path)
        except OSError as exc:
            # realpath() leaves a looping link as it is, and the loop would show only when the
            # finished run's outputs were moved in
            if exc.errno == errno.ELOOP:
                raise OutputError(f"output {shown(self.path)} runs through a symbolic link that leads back to "
                                  "itself; point the link at a directory, or remove it") from None
        target = self._target
        if target.exists() and not target.is_dir():
            raise OutputError(f"output {shown(self.path)} is a file, not a directory; the outputs "
                              f"({', '.join(self.names)}) go into a directory: choose another path")
        cwd = Path.cwd().resolve()
        if target.exists() and (target.resolve() == cwd or target.resolve() in cwd.parents):
            raise OutputError(f"output {shown(self.path)} is the working directory or holds it; the output "
                              "directory is replaced as a whole, so give the outputs a directory of their own")
        if target.is_dir() and os.path.ismount(target):  # a mount point cannot be renamed or swapped
            raise OutputError(f"output {shown(self.path)} is a mount point; the output directory is replaced as a "
                              "whole, so give the outputs a directory inside it")
        existing = target if target.exists() else target.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"output {shown(self.path)} lies under {shown(existing)}, which is a file, not a "
                              "directory: choose another path")
        if target.is_dir():
            # a directory is shown as `name/`: one named like an output is the user's, not an output
            foreign = sorted(e + ("/" if os.path.isdir(target / e) else "") for e in os.listdir(target)
                             if not self._owned(target, e))
            if foreign:
                raise OutputError(f"output {shown(self.path)} holds files other than {', '.join(self.names)} "
                                  f"({_entries(foreign)}); the output directory is replaced as a whole, so give the "
                                  "outputs a directory of their own (a new or empty one)")
            if not os.access(target, os.W_OK | os.X_OK):
                raise self._unwritable(target)
        # the staging directory and the swap both write into the target's parent (or into
        # the nearest existing folder above it, where the missing ones will be made)
        where = target.parent if target.exists() else existing
        if not os.access(where, os.W_OK | os.X_OK):
            raise self._unwritable(where)

    # -- what an interrupted run left ----------------------------------------------------

    def recover(self) -> None:
        """Put back a set an interrupted fallback swap left aside (when the target is
        missing), and remove every staging or set-aside directory of this target whose
        process is gone (owner_alive)."""
        parent = self._target.parent
        if not parent.is_dir():
            return
        leftovers = []
        for entry in os.listdir(parent):
            match = _LEFTOVER.match(entry)
            if match and match["target"] == self._target.name and not owner_alive(match["owner"]):
                leftovers.append((match["kind"], parent / entry))
        for kind, leftover in leftovers:
            if kind == "old" and not self._target.exists():
                os.rename(leftover, self._target)  # the last complete set
                continue
            try:
                foreign = [e for e in os.listdir(leftover) if not self._owned(leftover, e)]
            except OSError:  # cannot tell what it holds: left where it is rather than removed
                continue
            if not foreign:
                shutil.rmtree(leftover, ignore_errors=True)
                continue
            # a run stopped after its swap and before it moved the user's entries back: the
            # old set holds them, so it is set aside, not removed
            kept = self._keep_aside(leftover)
            warn_at_caller(f"output {shown(self.path)}: an interrupted run left {_entries(foreign)} of the previous "
                           f"set's folder, which are not outputs; they are kept in {shown(kept)}: move what you need "
                           "out of it, then remove it", RuntimeWarning)

    def _keep_aside(self, folder: Path) -> Path:
        """`folder` renamed to `.<target>.twa-kept.<random>`, which no run's clean-up removes;
        `folder` itself where the rename fails (a full disk, say)."""
        try:
            kept = Path(tempfile.mkdtemp(prefix=fit_file_name(self._target.name, "kept."), dir=self._target.parent))
        except OSError:
            return folder
        try:
            os.rename(folder, kept)  # replaces the empty directory mkdtemp made
        except OSError:
            kept.rmdir()
            return folder
        return kept

    # -- writing -------------------------------------------------------------------------

    def stage(self, name: str) -> Path:
        """Where to write output `name` before the commit."""
        if name not in self.names:
            raise OutputError(f"{name!r} is not one of this directory's outputs {self.names}")
        return self._staging / name

    def _set_modes(self) -> None:
        """New files and the directory get the modes the umask gives (as open() and mkdir()
        would); a replaced file or directory keeps its mode."""
        umask = current_umask()
        for name in self.names:
            staged, old = self._staging / name, self._target / name
            if staged.exists():
                os.chmod(staged, old.stat().st_mode & 0o7777 if old.is_file() else 0o666 & ~umask)
        old_dir = self._target.stat().st_mode & 0o7777 if self._target.is_dir() else 0o777 & ~umask
        os.chmod(self._staging, old_dir)

    def _swap(self) -> bool:
        """Put the staged set in place of the target; True when the old set is then at the
        staging path (False: there was no target)."""
        target = self._target
        if not target.exists():
            try:
                os.rename(self._staging, target)
                return False
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # a directory with entries appeared there during the run: swapped as one that was there
        if _exchange(self._staging, target):
            return True  # the staging path now holds the old set
        aside = Path(tempfile.mkdtemp(prefix=fit_file_name(target.name, f"old.{owner_tag()}."), dir=target.parent))
        os.rename(target, aside)  # replaces the empty directory mkdtemp made
        try:
            os.rename(self._staging, target)
        except BaseException:  # an error or Ctrl-C here: the old set goes back at once
            if not target.exists():
                os.rename(aside, target)
            raise
        os.rename(aside, self._staging)
        return True

    def _holds_no_other_folder(self, staged: os.stat_result) -> bool:
        """Whether the staging path is the folder this run staged (`staged`) or is gone."""
        try:
            now = os.stat(self._staging)
        except FileNotFoundError:
            return True
        return (now.st_dev, now.st_ino) == (staged.st_dev, staged.st_ino)

    def _keep_foreign(self) -> bool:
        """Move what is not an output from the old set (now at the staging path) into the new
        target: entries that appeared in the target while the run worked, which the check at
        construction could not see, stay where the user put them. False when some could not
        be moved: the old set is then kept (and named in a warning), not removed."""
        kept = []
        now = self._signatures(self._staging)  # the old set's, renamed: the same files
        for entry in sorted(os.listdir(self._staging)):
            # an output of the previous set, or a temporary file an interrupted write left
            if entry in now and (entry not in self.names or now[entry] == self._before.get(entry)):
                continue
            try:
                if os.path.lexists(self._target / entry):  # a directory named like an output, say
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(self._target / entry))
                os.rename(self._staging / entry, self._target / entry)
            except FileNotFoundError:
                if os.path.lexists(self._staging / entry):
                    kept.append(entry)
                # else it went away by itself (a loader's lock file): nothing to keep
            except OSError:
                kept.append(entry)
        if not kept:
            return True
        folder = self._keep_aside(self._staging)
        if folder == self._staging:  # not set aside: the next run would take it for a leftover
            self._staging_removable = False
        warn_at_caller(f"output {shown(self.path)}: {_entries(kept)} appeared in it during the run and could not be "
                       f"moved into the new set; the previous set, with them, is kept in {shown(folder)}: move what "
                       "you need out of it, then remove it", RuntimeWarning)
        return False

    def commit(self) -> None:
        """Replace the target directory by the staged files in one step; entries that are
        not outputs and appeared in it during the run are moved into the new set."""
        missing = [n for n in self.names if not (self._staging / n).is_file()]
        if missing:
            raise OutputError(f"outputs {missing} were not written; nothing was replaced")
        self._set_modes()
        fsync_directory(self._staging)  # the names are on disk before the swap makes them visible
        target = self._target
        # from the swap until the user's entries are moved out of the old set, the staging path
        # may hold them: an interruption in between leaves it to the next run's recover()
        staged = os.stat(self._staging)
        self._staging_removable = False
        try:
            swapped = self._swap()
        except BaseException as exc:
            # _swap puts the old set back when it fails, but a Ctrl-C just after the exchange
            # leaves the old set at the staging path: only this run's own folder is removed
            self._staging_removable = self._holds_no_other_folder(staged)
            if isinstance(exc, OSError):
                raise self._unwritable(target, exc) from exc
            raise
        self._committed = True
        try:
            removable = not swapped or self._keep_foreign()
        except OSError as exc:  # the old set could not even be listed: set aside rather than removed
            removable = False
            folder = self._keep_aside(self._staging)
            warn_at_caller(f"output {shown(self.path)} was replaced, but the previous set could not be read "
                           f"({exc.strerror or exc}), so it is kept in {shown(folder)}: move what you need out "
                           "of it, then remove it", RuntimeWarning)
        self._staging_removable = removable
        fsync_directory(target)
        fsync_directory(target.parent)
        if removable:
            shutil.rmtree(self._staging, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging directory and, when nothing was committed, the parent
        directories this run created for it, if they are still empty (a no-op after commit)."""
        if self._staging_removable:
            shutil.rmtree(self._staging, ignore_errors=True)
        if not self._committed:
            for directory in self._created:  # deepest first
                try:
                    directory.rmdir()
                except OSError:  # not empty (another writer's files), or gone: left as it is
                    break
