"""The OS memory hints (twa_kernels/_memory.py) are advice only: they never change a value."""

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


def test_return_freed_memory_is_harmless():
    _memory.return_freed_memory()
    _memory.return_freed_memory()
