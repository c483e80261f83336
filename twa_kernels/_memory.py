"""Hints to the operating system about memory the library owns (give pages back, ask for
huge pages); keep_freed_memory, the allocator setting a training process may ask for; and
Workspace, the buffer TWA's forward writes its weights into and reuses. The hints are
advisory and return False (or do nothing) where the OS or libc does not offer them
(non-Linux, no glibc): results never depend on them, only memory and speed."""

from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_HUGE_PAGE = 1 << 21


@functools.cache
def _libc_call(name: str) -> Callable | None:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # no POSIX libc (Windows: TypeError), or no such call
        return None


def _madvise(start: int, length: int, advice: int | None) -> bool:
    call = _libc_call("madvise")
    if call is None or advice is None:
        return False
    call.argtypes, call.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return call(start, length, advice) == 0


def drop_pages(view: Tensor) -> bool:
    """Give back the resident pages under `view`, a range of a private file mapping that is
    never written (torch.load(mmap=True)): madvise(MADV_DONTNEED) drops them, and a later
    access reads them again from the file. The range is widened to whole pages, which stay
    inside the mapping (it starts on a page and covers the whole file)."""
    if view.numel() == 0:
        return True
    page = mmap.PAGESIZE
    start = view.data_ptr() // page * page
    end = view.data_ptr() + view.numel() * view.element_size()
    return _madvise(start, end - start, getattr(mmap, "MADV_DONTNEED", None))


def advise_huge_pages(buffer: Tensor) -> bool:
    """Ask for transparent huge pages over the 2 MiB-aligned middle of a CPU buffer, before
    anything touches it. Where THP is in "madvise" mode, advising a buffer whose pages are
    already mapped makes the next writes fault them into huge pages one by one (a 47 MB
    buffer's first kernel call took up to 9 such faults, 15-35 ms: AMD EPYC, 2 cores;
    2026-11-23, commit b06eafc); advised first, the pages are huge from the first touch."""
    if buffer.device.type != "cpu":
        return False
    begin = (buffer.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (buffer.data_ptr() + buffer.numel() * buffer.element_size()) & ~(_HUGE_PAGE - 1)
    if end - begin < 2 * _HUGE_PAGE:
        return False
    return _madvise(begin, end - begin, getattr(mmap, "MADV_HUGEPAGE", None))


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """torch.empty, with huge pages asked for before the first touch (CPU only; elsewhere a
    plain torch.empty). For the large buffers that every training step streams: the packed
    basis, the center, the weights' workspace. On 4 KiB pages the TLB misses of the fused
    step's many streams cost it 7-9% on ResNet-18 shapes (k = 16, 4 bits; an in-process A/B
    of the same basis on both kinds of pages: AMD EPYC, 2 cores; 2026-11-23, commit
    26546e8)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(buffer)
    return buffer


def return_freed_memory() -> None:
    """Hand memory freed by consumed checkpoints back to the OS. Their tensors are many
    allocations of a few MB, which glibc keeps in its heap after they are freed (a process
    would hold a dead checkpoint's worth of RAM); malloc_trim(0) releases them."""
    call = _libc_call("malloc_trim")
    if call is not None:
        call(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_KEEP_THRESHOLD = 1 << 30
_GLIBC_DYNAMIC_MMAP_MAX = 32 << 20  # the most glibc raises its mmap threshold to by itself (64-bit)
_heap_kept = False  # keep_freed_memory() succeeded in this process


def gradients_to_hold(grads: Sequence[Tensor | None]) -> list[Tensor]:
    """Of a backward's weight gradients, those worth holding until the next backward has
    made its own. glibc gives the free top of its heap back to the system: gradients freed
    as the backward ends let the heap shrink, and the next step faults the same memory in
    again, page by page (4,500-14,000 faults a ResNet-18 TWA step). Held until the next
    backward's gradients exist, they lie below those and the next step reuses them (0-2,144
    faults in five processes, none in the benchmarks' runs). Only CPU blocks that glibc
    serves from its heap (below its largest mmap threshold) are worth it, and none where the
    heap is kept already or the C library is not glibc: there holding would only cost
    memory."""
    if _heap_kept or _libc_call("malloc_trim") is None:
        return []
    return [g for g in grads if g is not None and g.is_cpu and g.nbytes < _GLIBC_DYNAMIC_MMAP_MAX]


def keep_freed_memory() -> bool:
    """Keep freed memory in this process: glibc's malloc stops giving the top of its heap
    back to the system and serves blocks up to 1 GiB from the heap instead of their own
    mmap. A training step frees and retakes tens of MB; given back, those pages fault in
    again on the next step, 4 KiB at a time (on ResNet-18 a TWA step that freed its weight
    gradients took 4,500-14,000 faults, a third or more of its overhead over SGD (AMD EPYC,
    2026-12-04, commit 2145a82); TWA holds them, see gradients_to_hold, and this keeps the rest). This is the process's
    setting, not the library's: call it at the start of a training script you own (the
    `twa` command does). return_freed_memory() still gives memory back when asked. Returns
    False, changing nothing, where the C library has no glibc mallopt."""
    call = _libc_call("mallopt")
    if call is None or _libc_call("malloc_trim") is None:  # malloc_trim: glibc's, not another libc's mallopt
        return False
    call.argtypes, call.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: a fixed trim threshold also fixes the mmap threshold, and
    # left at its 128 KiB start every larger block would get (and lose) its own mapping.
    # Some glibc versions refuse more than their dynamic maximum: then blocks above 32 MiB
    # keep their own mapping, as they do by default.
    if not (call(_M_MMAP_THRESHOLD, _KEEP_THRESHOLD) or call(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_MMAP_MAX)):
        return False
    global _heap_kept
    _heap_kept = bool(call(_M_TRIM_THRESHOLD, _KEEP_THRESHOLD))
    return _heap_kept


class Workspace:
    """The reused buffer of TWA's forward, the weights it writes. It is handed out again
    only after a backward pass has freed the graph of the forward that filled it, or that
    graph was freed without one (or at once when no graph was recorded); while a graph still
    needs it (before its backward, or kept by retain_graph=True or create_graph=True), the
    next forward gets a fresh buffer, which then becomes the workspace. So a second forward
    before the first backward works, and so does a second backward through a retained graph.
    (Where the coefficients take no gradient and the graph reaches the model's inputs only,
    the buffer is handed out again after the first backward through it: a retained graph's
    second backward after another forward meets the error below.) Every write bumps the
    buffer's version counter, so a graph that saved its weights and outlived them raises
    PyTorch's in-place error instead of using wrong weights."""

    def __init__(self):
        self.buffer: Tensor | None = None
        self.busy = False
        self.generation = 0
        self.held: list[Tensor] = []  # the last backward's weight gradients (hold_gradients)

    def take(self, numel: int, dtype: torch.dtype, device: torch.device,
             record: bool) -> tuple[Tensor, Callable[[], None]]:
        """(buffer, release): the weights' buffer, and the call that frees it for reuse."""
        buffer = self.buffer
        if buffer is None or self.busy or buffer.dtype != dtype or buffer.device != device or buffer.numel() != numel:
            # huge pages asked for first, then touched here by a parallel fill, once, not
            # by the kernel's first write (docs/benchmarks.md, Methodology: a fresh output per
            # call made reconstruct 1.3-1.5x and the step 1.3-2.9x slower, by its page faults)
            with torch.inference_mode(False):  # a buffer made in inference mode could never be trained through
                self.buffer = buffer = empty_huge((numel,), dtype, device).zero_()
            self.generation += 1
        self.busy = record
        if not record:  # evaluation: no backward follows soon to take the held memory's place
            self.drop_gradients()
        generation = self.generation
        return buffer, lambda: self._release(generation)

    def hold_gradients(self, grads: Sequence[Tensor | None]) -> None:
        """Hold a backward's weight gradients until the next backward's, dropping the ones
        held before: as SGD's .grad lives from one step to the next, so that the allocator
        reuses their memory instead of giving it back and faulting it in again
        (_memory.gradients_to_hold says which are worth it)."""
        self.held = gradients_to_hold(grads)

    def drop_gradients(self) -> None:
        self.held = []

    def prepare(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the weights' buffer ahead of the first forward."""
        self.take(numel, dtype, device, record=False)

    def _release(self, generation: int) -> None:
        if generation == self.generation:  # a late backward of a replaced buffer frees nothing
            self.busy = False
