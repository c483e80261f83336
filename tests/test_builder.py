"""The one basis builder: every caller gets the rows of quantising each whole centred
checkpoint at once, bit for bit, however the columns are cut into windows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import twa_kernels as tk
from twa_kernels import builder
from twa_kernels.geometry import planes
from twa_kernels.quant import block_offsets_from_sizes


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(37, 29)  # 1,073 + 29 weights: groups cross tensor edges
        self.b = nn.Linear(29, 11)


def _checkpoints(k: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [{n: torch.randn(p.shape, generator=gen) * (1 + i) for n, p in _Net().named_parameters()}
            for i in range(k)]


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1) for n, _ in _Net().named_parameters()])


@pytest.fixture(params=[True, False], ids=["small windows", "one window"])
def windows(request, monkeypatch):
    if request.param:  # a window of 3 quantisation chunks: many windows, a short last one
        monkeypatch.setattr(builder, "_CHUNK_GROUPS", 2)
        monkeypatch.setattr(builder, "_READ_COLUMNS", 3 * 2 * 16)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, None])
def test_the_subspace_equals_quantising_whole_centred_rows(bits, windows, tmp_path):
    states = _checkpoints(4)
    paths = []
    for i, state in enumerate(states):  # files and state_dicts are read alike
        paths.append(tmp_path / f"{i}.pt")
        torch.save(state, paths[-1])
    sub = tk.Subspace.from_checkpoints([paths[0], states[1], paths[2], states[3]], bits=bits, group_size=16)
    flats = torch.stack([_flat(s) for s in states])
    center = builder.mean_center(flats.double().sum(0), len(states))
    assert torch.equal(sub.center, center)
    sizes = [p.numel() for _, p in _Net().named_parameters()]
    want = tk.quantize(flats - center, bits=bits, group_size=16, block_sizes=sizes)
    for key, value in want.state_dict().items():
        assert torch.equal(sub.basis.state_dict()[key], value), key


@pytest.mark.parametrize("bits", [4, None])
def test_a_planes_directions_are_the_builders_rows_from_checkpoint_a(bits, windows):
    states = _checkpoints(3)
    frame, _ = planes._frame_from_checkpoints(_Net(), states, bits, 16, False)
    origin = _flat(states[0])
    layout = builder.Layout([n for n, _ in _Net().named_parameters()], [tuple(p.shape) for p in _Net().parameters()])
    offsets = block_offsets_from_sizes(None, origin.numel())
    want = builder.build_basis(states[1:], layout, origin, 0, offsets, bits, 16, lambda items, what: items)
    for key, value in want.state_dict().items():
        assert torch.equal(frame.basis.state_dict()[key], value), key
    direct = tk.quantize(torch.stack([_flat(s) for s in states[1:]]) - origin, bits=bits, group_size=16)
    assert torch.equal(frame.basis.codes, direct.codes)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_checkpoint_written_during_the_build_is_named_not_mixed_into_it(tmp_path, monkeypatch, suffix):
    # a trainer saving over a file while the subspace was built gave a center of one state
    # and rows of another (between the passes), or one tensor of two states (within one)
    paths = []
    for i in range(3):
        paths.append(tk.save_state_dict({"w": torch.full((4096,), float(i))}, tmp_path / f"c{i}{suffix}"))
    names, shapes = ["w"], [(4096,)]
    original = builder.mean_center

    def rewrite_after_pass_one(total, count):
        tk.save_state_dict({"w": torch.full((4096,), 9.0)}, paths[1])  # atomically: a new inode
        return original(total, count)

    with monkeypatch.context() as patch:
        patch.setattr(builder, "mean_center", rewrite_after_pass_one)
        with pytest.raises(tk.CheckpointError, match=rf"c1{suffix}: changed between the passes of the build"):
            tk.Subspace.from_checkpoints(paths, bits=4, group_size=64, parameter_names=names, parameter_shapes=shapes)
    reader = builder.Layout(names, shapes).open(paths[2], 2)
    assert torch.equal(reader.read("w", (4096,), 0, 1024), torch.full((1024,), 2.0))
    tk.save_state_dict({"w": torch.full((4096,), 7.0)}, paths[2])
    with pytest.raises(tk.CheckpointError, match=rf"c2{suffix}: changed while it was being read"):
        reader.read("w", (4096,), 1024, 4096)


def test_the_range_check_of_a_dense_row_holds_a_window_not_a_copy_of_the_row():
    # the check of a whole dense row made |row| and a mask of it at once: 1.25x the row's
    # bytes on top of the plane's build peak (a dense ResNet-18 plane rose from 0.85x to
    # 1.09x of 2W + basis). Measured in a fresh process, from its peak resident memory.
    import subprocess
    import sys

    script = (
        "import re, torch\n"
        "from pathlib import Path\n"
        "from twa_kernels import builder\n"
        "def status(key):\n"
        "    return int(re.search(key + r':\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024\n"
        "row = torch.randn(1 << 23)  # 32 MiB\n"
        "layout = builder.Layout(['w'], [tuple(row.shape)])\n"
        "builder.check_range(row[: 1 << 19], layout, 'checkpoint', 0)  # torch's first-call set-up, not the check\n"
        "before = status('VmRSS')\n"
        "Path('/proc/self/clear_refs').write_text('5')\n"
        "builder.check_range(row, layout, 'checkpoint', 0)\n"
        "print(status('VmHWM') - before)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # a 1 MB window's temporaries, far below the 40 MiB of a copy and a mask of the row
    assert int(done.stdout) < 16 << 20, f"{int(done.stdout) / 2**20:.1f} MiB above the row"


def test_the_range_check_names_the_key_of_the_first_value_out_of_range_in_any_window():
    row = torch.zeros(3 * builder._READ_COLUMNS)
    row[2 * builder._READ_COLUMNS + 5] = float("inf")
    layout = builder.Layout(["a", "b"], [(builder._READ_COLUMNS,), (2 * builder._READ_COLUMNS,)])
    with pytest.raises(tk.CheckpointError, match="key 'b' lies more than"):
        builder.check_range(row, layout, "checkpoint", 0)


def test_float64_checkpoints_beyond_float32s_range_are_named_as_such():
    # they lie close to their average; float32, which the basis is, cannot hold them
    make = lambda: nn.Linear(3, 2).double()  # noqa: E731
    big = [{k: torch.full_like(v, scale) for k, v in make().state_dict().items()} for scale in (1.0e39, 1.1e39, 1.2e39)]
    with pytest.raises(tk.CheckpointError, match="holds a value float32 cannot"):
        tk.TWA(make(), big, bits=None)


def test_checkpoints_that_span_nothing_or_hold_no_real_weights_are_named():
    # orthonormalising identical checkpoints ended in quantize's "P must have at least one row";
    # checkpoints without a real floating-point entry, in "block_sizes must be positive integers"
    import copy

    a = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    with pytest.warns(RuntimeWarning, match="dropped 2 of 2 rows"), \
            pytest.raises(tk.errors.InvalidArgumentError, match="span no direction"):
        tk.Subspace.from_checkpoints([a, copy.deepcopy(a), copy.deepcopy(a)], bits=None, granularity="model",
                                     orthonormalize=True)
    for entries in ({"w": torch.randn(3, dtype=torch.complex64)}, {"n": torch.tensor(1)}):
        with pytest.raises(tk.CheckpointError, match="holds no real floating-point weight"):
            tk.Subspace.from_checkpoints([entries, copy.deepcopy(entries)], bits=None, granularity="model")
