"""The OS memory hints (twa_kernels/_memory.py) are advice only: they never change a value."""

import subprocess
import sys
import textwrap

import pytest
import torch

from twa_kernels import _memory


def test_huge_page_advice_changes_no_value_and_skips_small_buffers():
    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: spans whole 2 MiB pages
    before = big.clone()
    _memory.advise_huge_pages(big)  # True on Linux with THP, False elsewhere: either is fine
    assert torch.equal(big, before)
    assert _memory.advise_huge_pages(torch.ones(1000)) is False  # under two huge pages: nothing to advise


def test_dropped_pages_of_a_mapped_checkpoint_read_back_the_same(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(1 << 20)}, path)
    expected = torch.load(path, weights_only=True)["w"]
    mapped = torch.load(path, weights_only=True, mmap=True)["w"]
    assert torch.equal(mapped, expected)  # pages now resident
    if _memory.drop_pages(mapped[1000:500_000]):
        assert torch.equal(mapped, expected)  # dropped pages are read again from the file
    assert _memory.drop_pages(mapped[:0])


def test_return_freed_memory_gives_a_freed_heap_back_to_the_os():
    """250 MB of small allocations freed under a live one stay in glibc's heap (the process
    keeps holding them) until return_freed_memory trims it. Run in a fresh process, so the
    resident size counts this heap alone."""
    if _memory._libc_call("malloc_trim") is None:
        pytest.skip("no glibc malloc_trim on this platform: return_freed_memory does nothing here by design")
    code = textwrap.dedent("""
        import os
        from twa_kernels import _memory
        def resident():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        blocks = [bytearray(64 << 10) for _ in range(4000)]
        for b in blocks:
            b[::4096] = bytes(len(b[::4096]))  # touch every page
        live = bytearray(16)
        del blocks
        before = resident()
        _memory.return_freed_memory()
        _memory.return_freed_memory()  # a second call finds nothing more and does no harm
        print(before, resident())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert before - after > 125 << 20, (before >> 20, after >> 20)


def test_keep_freed_memory_stops_freed_blocks_faulting_in_again():
    """A 64 MiB block freed and taken again: by default glibc unmaps it (it is over its
    mmap threshold) and every page faults in again; after keep_freed_memory it stays in the
    heap and the second take faults no page. Fresh processes, so nothing else has changed
    the allocator."""
    if _memory._libc_call("malloc_trim") is None:
        pytest.skip("no glibc on this platform: keep_freed_memory does nothing here by design")
    code = textwrap.dedent("""
        import resource, sys
        from twa_kernels import _memory
        kept = sys.argv[1] == "keep" and _memory.keep_freed_memory()
        def take_and_free():
            block = bytearray(64 << 20)
            block[::4096] = bytes(len(block[::4096]))  # touch every page
        take_and_free()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        take_and_free()
        take_and_free()
        print(int(kept), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {}
    for mode in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        kept, faults[mode] = map(int, done.stdout.split())
        assert kept == (mode == "keep")
    # 16,384 faults of 4 KiB pages by default (fewer where the system backs it with huge
    # pages), none once kept
    assert faults["default"] > 8 * faults["keep"] and faults["keep"] < 64, faults


def test_the_buffers_every_step_streams_are_advised_before_they_are_filled(monkeypatch):
    """The packed basis, the center and TWA's weight workspace ask for huge pages while
    still untouched (advice given after the first touch only takes effect fault by fault)."""
    import twa_kernels as tk

    advised = []

    def record(start, length, advice):
        advised.append((start, start + length))
        return True

    monkeypatch.setattr(_memory, "_madvise", record)
    model = torch.nn.Linear(2048, 2048)  # 4.2M weights: the codes, center and workspace span whole 2 MiB pages
    states = [{k: torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, states, bits=4)

    def was_advised(t):
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        return any(lo <= start < end <= hi and end - start >= (hi - lo) // 2 for start, end in advised)

    assert was_advised(twa.basis_codes) and was_advised(twa.center)
    assert was_advised(twa._workspace.buffer)
    assert torch.equal(twa.center, torch.stack([torch.cat([s["weight"].flatten(), s["bias"]]) for s in states])
                       .double().mean(0).float())


def test_the_cpu_kernels_large_fresh_outputs_are_advised_where_python_allocates_them(monkeypatch):
    """The page-advice policy lives in Python alone: the C++ kernels advise nothing, so the
    cpp backend asks for huge pages on the fresh outputs it allocates (reconstruct's
    weights, combine_rows' rows) before the kernels first touch them."""
    import twa_kernels as tk
    from twa_kernels import _ops

    if _ops.backend("cpu") != "cpp":
        pytest.skip("the C++ kernels are not built here")
    advised = []

    def record(start, length, advice):
        advised.append((start, start + length))
        return True

    monkeypatch.setattr(_memory, "_madvise", record)
    d = 3 << 20  # 12 MiB of float32: spans whole 2 MiB pages
    qb = tk.quantize(torch.randn(2, d), bits=4)
    w = tk.reconstruct(qb, torch.randn(2, 1))
    lo, hi = w.data_ptr(), w.data_ptr() + w.numel() * w.element_size()
    assert any(lo <= start < end <= hi for start, end in advised)
    rows = _ops.combine_rows_op(torch.eye(2, dtype=torch.float64), torch.randn(2, d))
    lo, hi = rows.data_ptr(), rows.data_ptr() + rows.numel() * rows.element_size()
    assert any(lo <= start < end <= hi for start, end in advised)


def test_the_gradients_worth_holding_are_glibc_heap_blocks_while_the_heap_is_not_kept(monkeypatch):
    small, on_mmap = torch.ones(1000), torch.empty(8 << 20)  # 4 KB, and 32 MiB: glibc's own mapping
    monkeypatch.setattr(_memory, "_heap_kept", False)
    monkeypatch.setattr(_memory, "_libc_call", lambda name: object())  # a glibc
    held = _memory.gradients_to_hold([small, None, on_mmap])
    assert len(held) == 1 and held[0] is small
    monkeypatch.setattr(_memory, "_heap_kept", True)  # keep_freed_memory(): nothing is given back
    assert _memory.gradients_to_hold([small]) == []
    monkeypatch.setattr(_memory, "_heap_kept", False)
    monkeypatch.setattr(_memory, "_libc_call", lambda name: None)  # not glibc
    assert _memory.gradients_to_hold([small]) == []


def test_a_twa_step_holds_its_weight_gradients_until_the_next_backward(monkeypatch):
    """The held gradients are the last backward's: the next backward drops the ones before
    once its own exist, and a forward that records nothing (evaluation) drops them all."""
    import weakref

    import torch.nn.functional as F

    import twa_kernels as tk

    monkeypatch.setattr(_memory, "gradients_to_hold", lambda grads: [g for g in grads if g is not None])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    states = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, states, bits=4)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))

    def step() -> list[weakref.ref]:
        F.cross_entropy(twa(x), y).backward()
        return [weakref.ref(g) for g in twa._workspace.held]

    first = step()
    assert len(first) == 4 and all(ref() is not None for ref in first)
    assert [tuple(ref().shape) for ref in first] == [tuple(p.shape) for p in model.parameters()]
    second = step()
    assert all(ref() is None for ref in first) and all(ref() is not None for ref in second)
    with torch.no_grad():
        twa(x)
    assert twa._workspace.held == [] and all(ref() is None for ref in second)
    third = step()
    assert third and all(ref() is not None for ref in third)
    twa.eval()  # so does switching to evaluation
    assert twa._workspace.held == [] and all(ref() is None for ref in third)


def test_losses_kept_for_logging_hold_neither_a_copy_of_the_weights_nor_up_each_step():
    # a loss kept after its backward held its forward's weights (a D-long copy where the
    # kernels cannot write the model's dtype, or on a sharded rank), and graphs kept without
    # a backward made every backward look at all of them
    import gc

    import torch.nn.functional as F

    import twa_kernels as tk
    from twa_kernels import lending

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).double()
    states = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, states, bits=4)
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.randint(0, 3, (5,))

    def first_layer_copies() -> int:
        gc.collect()
        return sum(1 for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.dtype == torch.float64
                   and t.shape == (64, 8))

    before, kept = first_layer_copies(), []
    for _ in range(10):
        loss = F.cross_entropy(twa(x), y)
        loss.backward()
        kept.append(loss)
    assert first_layer_copies() - before <= 1  # was 10 more: one per kept loss

    looked_at, take_grads = [], lending.Loan.take_grads

    def counted(loan):
        looked_at.append(loan)
        return take_grads(loan)

    waiting = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lending.Loan, "take_grads", counted)
        for _ in range(30):  # a training step, and a graph kept without a backward, each step
            looked_at.clear()
            F.cross_entropy(twa(x), y).backward()
            waiting.append(F.cross_entropy(twa(x), y))
            # only loans whose weights the model held since the last backward: not all that wait
            assert len(looked_at) <= 6  # a few, however many wait (it grew with them)
    del waiting


def test_an_evaluation_without_no_grad_reuses_the_workspace_once_its_graph_is_freed():
    # each forward whose graph was freed without a backward left the workspace busy: the
    # next took a fresh D-long buffer, zeroed (a validation loop that forgot torch.no_grad())
    import twa_kernels as tk

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    states = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, states, bits=4).eval()
    x = torch.randn(5, 8)
    first = twa(x).sum().item()
    buffer, generation = twa._workspace.buffer, twa._workspace.generation
    for _ in range(5):
        assert twa(x).sum().item() == first  # the graph dies with the output
    assert twa._workspace.buffer is buffer and twa._workspace.generation == generation
    assert len(twa._lent.in_slots_since) <= 1  # nor does the lender remember each ended loan
    kept = twa(x)  # a graph still alive keeps the workspace: the next forward gets another
    twa(x)
    assert twa._workspace.generation == generation + 1
    kept.sum().backward()  # and its backward works as before
    assert twa.coefficients.grad is not None
