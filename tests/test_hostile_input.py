"""Hostile and careless input: every case gets a named library error (or the correct
result), never a crash, a silently wrong number, or code run from a file.

Cases that could crash the process on a broken build run in a subprocess, so a crash
shows as that process's exit code instead of ending the test run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import twa_kernels as tk
from twa_kernels import _ops, columns, io
from twa_kernels import twa as twa_module
from twa_kernels.errors import BasisLayoutError, CheckpointError, TWAKernelsError
from twa_kernels.quant import QuantizedBasis

from tests.helpers import RunsCode


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


# ---- a basis built by hand: its layout is checked where it is made ------------------------

_BAD_OFFSETS = {
    "inner offset past the end": [0, 5000, 1000],
    "not increasing": [0, 900, 100, 1000],
    "an empty block": [0, 500, 500, 1000],
    "negative": [0, -8, 1000],
    "short of the end": [0, 999],
}


@pytest.mark.parametrize("offsets", _BAD_OFFSETS.values(), ids=_BAD_OFFSETS.keys())
def test_a_hand_built_basis_with_bad_offsets_is_refused_where_it_is_made(offsets):
    done = _run(f"""
        import torch, twa_kernels as tk
        from twa_kernels.quant import QuantizedBasis
        from twa_kernels.errors import BasisLayoutError
        qb = tk.quantize(torch.randn(2, 1000), bits=4, group_size=64)
        try:
            bad = QuantizedBasis(qb.codes, qb.scales, qb.mins, torch.tensor({offsets}), 4, 64, 1000)
        except BasisLayoutError as exc:
            print("refused:", exc)
        else:
            print("accepted", tk.project(bad, torch.randn(1000)))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: block_offsets" in done.stdout


_BASIS_16 = tk.quantize(torch.randn(3, 16), bits=4, group_size=8)


@pytest.mark.parametrize("names, shapes, center, basis, named", [
    (["a", "a"], [(8,), (8,)], torch.zeros(16), _BASIS_16, "'a' appears more than once"),
    (["a", "b"], [(-8,), (24,)], torch.zeros(16), _BASIS_16, "'a' has a negative size"),
    ([1, 2], [(8,), (8,)], torch.zeros(16), _BASIS_16, "names must be a list of strings"),
    ("ab", [(8,), (8,)], torch.zeros(16), _BASIS_16, "names must be a list of strings"),
    (["a", "b"], [8, 8], torch.zeros(16), _BASIS_16, "shapes must be sequences of ints"),
    (["a", "b"], [(8.5,), (8,)], torch.zeros(16), _BASIS_16, "shapes must be sequences of ints"),
    (["a", "b"], [(16,)], torch.zeros(16), _BASIS_16, "2 parameter names but 1 shapes"),
    (["a", "b"], None, torch.zeros(16), _BASIS_16, "needs the shapes"),
    (["a", "b"], [(8,), (8,)], None, _BASIS_16, "center Tensor and a QuantizedBasis"),
    (["a", "b"], [(8,), (8,)], torch.zeros(16), torch.zeros(3, 16), "center Tensor and a QuantizedBasis"),
    (["a", "b"], [(8,), (4,)], torch.zeros(12), _BASIS_16, "inconsistent subspace"),
])
def test_a_subspace_whose_layout_cannot_cut_its_vector_is_named(names, shapes, center, basis, named):
    with pytest.raises(tk.errors.InvalidArgumentError, match=re.escape(named)):
        tk.Subspace(names, shapes, center, basis)


def test_flatten_and_unflatten_name_what_they_were_given():
    sub = tk.Subspace(["a", "b"], [torch.Size([2, 4]), (8,)], torch.zeros(16), _BASIS_16)
    assert sub.shapes == [(2, 4), (8,)]
    for bad, shown in [(torch.zeros(15), r"\(15,\)"), (torch.zeros(4, 4), r"\(4, 4\)"), ([0.0] * 16, "list")]:
        with pytest.raises(tk.errors.InvalidArgumentError, match=f"vector of the subspace's 16 weights, got {shown}"):
            sub.unflatten(bad)
    with pytest.raises(tk.errors.InvalidArgumentError, match="takes a state_dict"):
        sub.flatten([torch.zeros(16)])
    with pytest.raises(CheckpointError, match="key 'b' holds a list"):
        sub.flatten({"a": torch.zeros(2, 4), "b": [0.0] * 8})


def test_from_checkpoints_refuses_shapes_without_names_and_a_huge_group_before_reading(tmp_path):
    checkpoints = [{"w": torch.randn(4)} for _ in range(3)]
    with pytest.raises(tk.errors.InvalidArgumentError, match="parameter_shapes needs parameter_names"):
        tk.Subspace.from_checkpoints(checkpoints, parameter_shapes=[(5,)])
    with pytest.raises(CheckpointError, match=r"'w' has shape \(4,\) but the model has \(5,\)"):
        tk.Subspace.from_checkpoints(checkpoints, parameter_names=["w"], parameter_shapes=[(5,)])
    absent = [tmp_path / "no_such_1.pt", tmp_path / "no_such_2.pt"]
    with pytest.raises(tk.errors.InvalidArgumentError, match="group_size must be .* up to 1048576"):
        tk.Subspace.from_checkpoints(absent, group_size=2**21)


def test_a_hand_built_basis_in_a_subspace_never_reaches_twa():
    done = _run("""
        import torch, twa_kernels as tk
        from torch import nn
        from twa_kernels.errors import TWAKernelsError
        model = nn.Linear(40, 25)
        qb = tk.quantize(torch.randn(2, 1025), bits=4, group_size=64)
        try:
            basis = tk.QuantizedBasis(qb.codes, qb.scales, qb.mins, torch.tensor([0, 5000, 1025]), 4, 64, 1025)
            sub = tk.Subspace(["weight", "bias"], [(25, 40), (25,)], torch.zeros(1025), basis)
            twa = tk.TWA(model, sub)
            twa(torch.randn(3, 40)).sum().backward()
        except TWAKernelsError as exc:
            print("refused:", exc)
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout


@pytest.mark.parametrize("offsets", [[0, 900, 100, 1000], [0, 2000, 1000]])
def test_the_kernel_binding_checks_every_offset_as_a_last_line_of_defence(offsets):
    # the C++ kernels called directly, past every check in Python
    done = _run(f"""
        import torch, twa_kernels as tk
        from twa_kernels.backends import cpu
        qb = tk.quantize(torch.randn(2, 1000), bits=4, group_size=64)
        tk.project(qb, torch.randn(1000))  # builds or loads the kernels
        for call in (lambda o: cpu.project(qb.codes, qb.scales, qb.mins, o, torch.randn(1000), 4, 64),
                     lambda o: cpu.reconstruct(qb.codes, qb.scales, qb.mins, o, torch.randn(2, {len(offsets) - 1}),
                                               None, 4, 64, 1000)):
            try:
                call(torch.tensor({offsets}))
                print("accepted")
            except RuntimeError as exc:
                print("refused:", str(exc).splitlines()[0])
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("refused: block_offsets") == 2, done.stdout


@pytest.mark.parametrize("backend_name", ["cpp", "reference"])
@pytest.mark.parametrize("edit", ["data", "numpy", "torch.ops"])
def test_offsets_edited_past_the_basis_are_named_on_every_backend(monkeypatch, backend_name, edit):
    # writes through .data or .numpy() do not move the tensor's version counter
    monkeypatch.setenv("TWA_KERNELS_BACKEND", backend_name)
    qb = tk.quantize(torch.randn(2, 1000), bits=4, group_size=64, block_sizes=[100, 900])
    g = torch.randn(1000)
    expected = tk.project(qb, g)
    if edit == "data":
        qb.block_offsets.data[1] = 5000
    elif edit == "numpy":
        qb.block_offsets.numpy()[1] = 5000
    with pytest.raises(BasisLayoutError, match="block_offsets"):
        if edit == "torch.ops":
            torch.ops.twa_kernels.project(qb.codes, qb.scales, qb.mins, torch.tensor([0, 5000, 1000]), g, 4, 64)
        else:
            tk.project(qb, g)
    qb.block_offsets[1] = 100  # put back: the same basis gives the same numbers
    assert torch.equal(tk.project(qb, g), expected)


def test_raw_ops_name_operands_that_do_not_fit_the_basis(backend_name):
    # the Triton kernels read a short center or x past its end (1e30 from the next bytes),
    # and project_pieces took a 2-D piece whose backward then failed; raw calls are named
    qb = tk.quantize(torch.randn(3, 50), bits=4, group_size=16, block_sizes=[20, 30])
    ops, basis = torch.ops.twa_kernels, (qb.codes, qb.scales, qb.mins, qb.block_offsets)
    x, g = torch.randn(3, 2), torch.randn(50)
    calls = {
        "center has 45 elements but the basis has 50": lambda: ops.reconstruct(*basis, x, torch.randn(45), 4, 16, 50),
        r"x has shape \(3, 1\) but the basis needs \(3, 2\)":
            lambda: ops.reconstruct(*basis, x[:, :1], None, 4, 16, 50),
        "g must be float32 or bfloat16, got torch.float64": lambda: ops.project(*basis, g.double(), 4, 16),
        "g has 49 elements but the basis's block_offsets end at 50": lambda: ops.project(*basis, g[:49], 4, 16),
        "the pieces have 60 elements": lambda: ops.project_pieces(*basis, [g, g[:10]], 4, 16),
        "out has 49 elements": lambda: ops.reconstruct_into(*basis, x, None, 4, 16, torch.empty(49)),
        "pieces is empty": lambda: ops.project_pieces(*basis, [], 4, 16),
        "gram reads p as float32, got torch.float64": lambda: ops.gram(torch.randn(3, 50, dtype=torch.float64)),
        "combine_rows reads p as float32, got torch.float64":
            lambda: ops.combine_rows(torch.eye(3, dtype=torch.float64), torch.randn(3, 50, dtype=torch.float64)),
        r"pieces\[0\] is \(5, 10\)": lambda: ops.project_pieces(*basis, [g.view(5, 10)], 4, 16),
        "out must be float32 or bfloat16": lambda: ops.reconstruct_into(*basis, x, None, 4, 16, torch.empty(50).half()),
        r"combine_rows takes .* \(1, 4\)": lambda: ops.combine_rows(torch.randn(1, 4, dtype=torch.float64),
                                                                   torch.randn(3, 50)),
    }
    for message, call in calls.items():
        with pytest.raises(TWAKernelsError, match=message):
            call()
    torch.testing.assert_close(ops.reconstruct(*basis, x, None, 4, 16, 50), tk.reconstruct(qb, x))


def test_offsets_in_a_tensor_subclass_are_checked():
    class Tagged(torch.Tensor):
        pass

    qb = tk.quantize(torch.randn(2, 1000), bits=4, group_size=64)
    with pytest.raises(BasisLayoutError, match="block_offsets"):
        QuantizedBasis(qb.codes, qb.scales, qb.mins, torch.tensor([0, 40, 10**6]).as_subclass(Tagged), 4, 64, 1000)


def test_a_group_wider_than_any_use_is_refused_before_a_kernel_allocates_it():
    # one group of 2**40 columns fits the layout of a 100-column basis; each kernel thread
    # would allocate a group's scratch and the process would abort
    done = _run("""
        import dataclasses, torch, twa_kernels as tk
        from twa_kernels.backends import cpu
        from twa_kernels.errors import TWAKernelsError
        qb = tk.quantize(torch.randn(3, 100), bits=4, group_size=128)
        tk.project(qb, torch.randn(100))  # builds or loads the kernels
        state = qb.state_dict()
        state["meta"] = torch.tensor([4, 2**40, 100])
        calls = {
            "from_state_dict": lambda: tk.QuantizedBasis.from_state_dict(state),
            "replace": lambda: dataclasses.replace(qb, group_size=2**30),
            "quantize": lambda: tk.quantize(torch.randn(3, 100), bits=4, group_size=2**33),
            "torch.ops": lambda: torch.ops.twa_kernels.project(qb.codes, qb.scales, qb.mins, qb.block_offsets,
                                                               torch.randn(100), 4, 2**30),
        }
        for name, call in calls.items():
            try:
                call()
                print(name, "accepted")
            except TWAKernelsError as exc:
                print(name, "refused:", exc)
        try:
            cpu.project(qb.codes, qb.scales, qb.mins, qb.block_offsets, torch.randn(100), 4, 2**30)
        except RuntimeError as exc:
            print("binding refused:", str(exc).splitlines()[0])
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("refused: ") == 5 and "up to" in done.stdout, done.stdout
    assert "binding refused: group_size must be a positive multiple of 8 up to 2**20" in done.stdout


def test_a_valid_hand_built_basis_still_works():
    qb = tk.quantize(torch.randn(3, 1000), bits=2, group_size=64, block_sizes=[100, 900])
    same = QuantizedBasis(qb.codes, qb.scales, qb.mins, torch.tensor([0, 100, 1000]), 2, 64, 1000)
    g = torch.randn(1000)
    assert torch.equal(tk.project(same, g), tk.project(qb, g))
    # numpy's integers (a layout read from an array) are taken as the ints they are, as quantize takes them
    from_numpy = QuantizedBasis(qb.codes, qb.scales, qb.mins, qb.block_offsets, *np.array([2, 64, 1000]))
    assert (from_numpy.bits, from_numpy.group_size, from_numpy.num_cols) == (2, 64, 1000)
    assert all(type(v) is int for v in (from_numpy.bits, from_numpy.group_size, from_numpy.num_cols))
    assert torch.equal(tk.project(from_numpy, g), tk.project(qb, g))


@pytest.mark.parametrize("bits, field", [(None, "codes"), (4, "scales"), (4, "mins")])
def test_a_basis_whose_tensors_require_grad_is_refused_by_the_ops_while_grad_is_on(bits, field):
    # the ops give the basis no gradient: its tensors' .grad stayed None after a backward, silently
    qb = tk.quantize(torch.randn(3, 64), bits=bits, group_size=16)
    fields = dict(codes=qb.codes, scales=qb.scales, mins=qb.mins)
    fields[field] = fields[field].clone().requires_grad_()
    basis = QuantizedBasis(**fields, block_offsets=qb.block_offsets, bits=bits, group_size=16, num_cols=64)
    for call in (lambda: tk.project(basis, torch.randn(64)), lambda: tk.reconstruct(basis, torch.randn(3, 1))):
        with pytest.raises(tk.errors.InvalidArgumentError, match="tensors require grad, but these ops give the "
                                                                 "basis no gradient"):
            call()
        with torch.no_grad():
            call()  # nothing to lose there


def test_a_subspace_takes_its_orthonormal_flag_as_a_bool_only():
    qb = tk.quantize(torch.randn(2, 6), bits=None)
    with pytest.raises(tk.errors.InvalidTypeError, match="orthonormal must be True or False"):
        tk.Subspace(["w"], [(6,)], torch.zeros(6), qb, orthonormal="no")


def test_int8_gradients_over_a_dense_basis_are_refused_before_the_forward():
    from twa_kernels.ops import reconstruct_pieces

    qb = tk.quantize(torch.randn(2, 6), bits=None)
    with pytest.raises(tk.errors.InvalidArgumentError, match="int8_gradients rounds gradients per basis group"):
        reconstruct_pieces(qb, torch.zeros(2, 1), None, torch.empty(6), [(6,)], int8_gradients=True)


@pytest.mark.parametrize("field, value", [("group_size", 4.0), ("num_cols", True), ("bits", 3)])
def test_a_hand_built_basis_with_bad_metadata_is_refused(field, value):
    qb = tk.quantize(torch.randn(2, 64), bits=4, group_size=32)
    fields = dict(codes=qb.codes, scales=qb.scales, mins=qb.mins, block_offsets=qb.block_offsets, bits=4,
                  group_size=32, num_cols=64)
    fields[field] = value
    with pytest.raises(BasisLayoutError, match=field if field != "bits" else "bits must be"):
        QuantizedBasis(**fields)


# ---- corrupted files -------------------------------------------------------------------


def _flip_a_bit_in_tensor_data(path, record_index: int = 1) -> None:
    with zipfile.ZipFile(path) as archive:
        info = [i for i in archive.infolist() if "/data/" in i.filename][record_index]
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x04]))


def test_one_flipped_bit_in_a_torch_file_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"a.weight": torch.randn(300), "b.weight": torch.randn(300)}, path)
    _flip_a_bit_in_tensor_data(path)
    with pytest.raises(CheckpointError, match="corrupt.*CRC"):
        tk.load_state_dict(path)
    with pytest.raises(CheckpointError, match="corrupt.*CRC"):
        columns.ColumnReader(path).read("b.weight", (300,), 0, 10)


def test_a_flipped_bit_in_a_file_checked_before_is_refused_after_its_mtime_was_put_back(tmp_path):
    # the check is done once per file: a rewrite in place that restores the modification time
    # (rsync --inplace -t) kept the size, mtime and inode it is remembered by
    path = tmp_path / "ck.pt"
    torch.save({"a.weight": torch.randn(300), "b.weight": torch.randn(300)}, path)
    tk.load_state_dict(path)
    before = path.stat()
    _flip_a_bit_in_tensor_data(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(CheckpointError, match="corrupt.*CRC"):
        tk.load_state_dict(path)


def test_a_file_rewritten_many_times_keeps_one_record_of_its_checks(tmp_path):
    # each version of a file a trainer rewrites (last.pt) left its checks' record, about 100
    # bytes per tensor, for the life of the process
    from twa_kernels.io import read

    path, state = tmp_path / "last.pt", {f"layer{i}.weight": torch.zeros(4) for i in range(20)}
    before = len(read._VERIFIED)
    for step in range(5):
        state["layer0.weight"] += 1
        torch.save(state, path)
        assert float(tk.load_state_dict(path)["layer0.weight"][0]) == step + 1  # each version read, not a cached one
    assert len(read._VERIFIED) <= before + 1


def test_the_record_of_checked_files_drops_the_least_recently_used_beyond_its_size():
    from twa_kernels.io.read import FileVersionCache

    cache = FileVersionCache(paths=2)
    cache.put("a", 1, "a1")
    cache.put("b", 1, "b1")
    assert cache.get("a", 1) == "a1" and cache.get("a", 2) is None  # another version is not this one's
    cache.put("c", 1, "c1")  # b is the least recently used
    assert (cache.get("b", 1), cache.get("a", 1), cache.get("c", 1), len(cache)) == (None, "a1", "c1", 2)
    cache.put("a", 2, "a2")  # a new version replaces the old
    assert (cache.get("a", 1), cache.get("a", 2), len(cache)) == (None, "a2", 2)


def test_one_flipped_bit_is_refused_by_twa(tmp_path):
    model = nn.Linear(30, 20)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.pt")
        torch.save({k: v + 0.01 * i for k, v in model.state_dict().items()}, paths[-1])
    _flip_a_bit_in_tensor_data(paths[2], 0)
    with pytest.raises(CheckpointError, match=f"{paths[2].name}: corrupt"):
        tk.TWA(model, paths)


def test_an_intact_torch_file_passes_the_crc_check(tmp_path):
    # "w" spans several of the check's read buffers: the CRC carries across them
    state = {"w": torch.randn(300_000), "b": torch.randn(7)}
    torch.save(state, tmp_path / "ok.pt")
    got = tk.load_state_dict(tmp_path / "ok.pt")
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_a_flipped_bit_past_the_first_read_buffer_is_refused(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"w": torch.randn(300_000)}, path)  # 1.2 MB: the flip lands in a later buffer
    _flip_a_bit_in_tensor_data(path, 0)
    with pytest.raises(CheckpointError, match="corrupt.*CRC"):
        tk.load_state_dict(path)


def _declare_more_elements(path, key: str, numel: int, more: int) -> None:
    """Rewrite a torch file so that tensor `key` (numel elements, written as one BININT1 in
    its size tuple and its storage's persistent id) declares numel + more: still a valid
    zip whose every CRC-32 holds, but whose pickle asks for bytes its record lacks."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    old = b"K" + bytes([numel])
    assert records[name].count(old) == 2, "the test's file no longer has the layout it edits"
    records[name] = records[name].replace(old, b"K" + bytes([numel + more]))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for record, data in records.items():
            archive.writestr(record, data)


def test_a_storage_declaring_more_bytes_than_its_record_is_refused_by_every_reader(tmp_path):
    # A mapped load takes a storage's size from the pickle: these four extra floats would be
    # read from the zip records that follow the tensor's own (its headers, the next tensor)
    path = tmp_path / "ck.pt"
    torch.save({"w": torch.arange(16.0), "b": torch.ones(3)}, path)
    _declare_more_elements(path, "w", 16, 4)
    with pytest.raises(CheckpointError, match=r"corrupt \(its pickle declares 80 bytes for storage '0', whose "
                                              r"record holds 64 bytes\)"):
        columns.ColumnReader(path).read("w", (20,), 0, 20)
    with pytest.raises(CheckpointError, match="ck.pt"):
        tk.load_state_dict(path)
    model = nn.Linear(4, 5)  # weight 20 elements: the edited tensor fits it
    good = [tmp_path / f"{i}.pt" for i in range(2)]
    for i, other in enumerate(good):
        torch.save({"weight": torch.randn(5, 4), "bias": torch.randn(5)}, other)
    torch.save({"weight": torch.arange(16.0), "bias": torch.randn(5)}, path)
    _declare_more_elements(path, "weight", 16, 4)
    with pytest.raises(CheckpointError, match="ck.pt: corrupt"):
        tk.TWA(model, [*good, path], bits=4)


def test_the_storage_check_of_a_mapped_read_runs_no_code_of_the_file(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(4), "hook": RunsCode(marker)}, tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="refused"):
        columns.ColumnReader(tmp_path / "ck.pt").read("w", (4,), 0, 4)
    assert not marker.exists()


def test_a_mapped_read_of_an_intact_file_still_reads_its_values(tmp_path):
    path = tmp_path / "ck.pt"
    shared = torch.arange(12.0)
    torch.save({"w": shared, "view": shared[2:6], "b": torch.ones(3)}, path)  # one storage, two tensors
    reader = columns.ColumnReader(path)
    assert torch.equal(reader.read("w", (12,), 0, 12), shared)
    assert torch.equal(reader.read("view", (4,), 0, 4), shared[2:6])


# ---- values and ties that would silently give a wrong result ------------------------------


@pytest.mark.parametrize("bits", [4, None])
def test_finite_but_extreme_values_are_refused_with_the_key(bits):
    model = nn.Linear(4, 3)
    base = model.state_dict()
    states = [{k: v.clone() + 0.1 * i for k, v in base.items()} for i in range(3)]
    states[2]["weight"][0, 0] = 3e38
    states[1]["weight"][0, 0] = -3e38
    with pytest.raises(CheckpointError, match="key 'weight'"):
        tk.TWA(model, states, bits=bits)


def test_large_but_quantisable_values_give_finite_weights():
    model = nn.Linear(4, 3)
    states = [{k: v.clone() + 1e30 * i for k, v in model.state_dict().items()} for i in range(3)]
    twa = tk.TWA(model, states, bits=4)
    assert all(bool(torch.isfinite(w).all()) for w in twa.weights().values())


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x))


def test_tied_weights_that_disagree_in_a_checkpoint_are_refused_naming_both():
    model = _Tied()
    states = [{k: v.clone() + 0.1 * i for k, v in model.state_dict().items()} for i in range(2)]
    states[1]["out.weight"] = states[1]["out.weight"] + 0.5
    with pytest.raises(CheckpointError, match=r"'emb.weight' and 'out.weight'.*largest difference 0.5"):
        tk.TWA(model, states)


def test_tied_weights_that_agree_are_accepted():
    model = _Tied()
    states = [{k: v.clone() + 0.1 * i for k, v in model.state_dict().items()} for i in range(2)]
    twa = tk.TWA(model, states)
    assert twa(torch.tensor([1, 2])).shape == (2, 10)


def test_every_error_above_is_a_library_error():
    assert issubclass(CheckpointError, TWAKernelsError) and issubclass(BasisLayoutError, ValueError)


# ---- arguments a careless caller gives -------------------------------------------------


def _states(model: nn.Module, k: int = 3) -> list[dict]:
    return [{key: v.clone() + 0.1 * i for key, v in model.state_dict().items()} for i in range(k)]


@pytest.mark.parametrize("kwargs, named", [
    (dict(bits=4.0), "bits must be"),
    (dict(bits=3), "bits must be"),
    (dict(group_size=0), "group_size must be"),
    (dict(group_size=-8), "group_size must be"),
    (dict(group_size=7), "group_size must be"),
    (dict(granularity="layer"), "granularity must be"),
])
def test_bad_twa_settings_are_named_before_any_checkpoint_is_read(kwargs, named):
    class Watched(list):
        """The checkpoints, recording every look at them."""
        looked = 0

        def __iter__(self):
            Watched.looked += 1
            return super().__iter__()

        def __getitem__(self, index):
            Watched.looked += 1
            return super().__getitem__(index)

    checkpoints = Watched(_states(nn.Linear(4, 3)))
    with pytest.raises(tk.errors.InvalidArgumentError, match=named):
        tk.TWA(nn.Linear(4, 3), checkpoints, **kwargs)
    assert Watched.looked == 0
    tk.TWA(nn.Linear(4, 3), checkpoints, bits=4)  # the same checkpoints with good settings are read
    assert Watched.looked > 0


@pytest.mark.parametrize("field, shape", [("coefficients", (5, 5)), ("center", (7,))])
def test_loading_a_twa_state_of_another_shape_is_named(field, shape):
    model = nn.Linear(4, 3)
    twa = tk.TWA(model, _states(model))
    state = twa.state_dict()
    state[field] = torch.zeros(shape)
    with pytest.raises(tk.errors.InvalidArgumentError, match=re.escape(f"'{field}' has shape {tuple(shape)}")):
        twa.load_state_dict(state)


def test_the_state_of_a_compiled_or_wrapped_twa_loads_and_one_of_nothing_here_is_named():
    # a compiled TWA's state (every key `_orig_mod.`) was refused with advice to pass
    # strict=False, which then loaded nothing and said nothing
    model = nn.Linear(4, 3)
    twa = tk.TWA(model, _states(model))
    with torch.no_grad():
        twa.coefficients.fill_(0.25)
    saved = torch.compile(twa).state_dict()
    assert all(key.startswith("_orig_mod.") for key in saved)
    fresh = tk.TWA(model, _states(model))
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.coefficients, twa.coefficients)
    fresh.load_state_dict({f"module.{k}": v for k, v in twa.state_dict().items()})  # a DDP-wrapped one's
    for strict in (True, False):
        with pytest.raises(tk.errors.InvalidArgumentError, match="none of its keys .* is this TWA's"):
            fresh.load_state_dict(model.state_dict(), strict=strict)


def test_one_checkpoint_with_orthonormalize_is_named():
    with pytest.raises(CheckpointError, match="a subspace needs at least 2"):
        tk.Subspace.from_checkpoints(_states(nn.Linear(4, 3), 1), granularity="model", orthonormalize=True)


def test_a_zero_size_parameter_is_named():
    states = [{"a": torch.zeros(0), "b": torch.ones(3) * i} for i in range(2)]
    with pytest.raises(tk.errors.InvalidArgumentError, match="parameter 'a' has no elements"):
        tk.Subspace.from_checkpoints(states, parameter_names=["a", "b"])


def test_random_bytes_are_not_called_a_checkpoint_with_python_objects(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(bytes(range(7, 250)) * 5)
    with pytest.raises(CheckpointError, match="not a checkpoint at all"):
        tk.load_state_dict(path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_torch_file_cut_short_is_called_cut_short(tmp_path, keep, caplog):
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.randn(1000)}, whole)
    raw = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[:int(len(raw) * keep)])
    for read in (lambda: tk.load_state_dict(cut), lambda: tk.Subspace.from_checkpoints([cut, whole])):
        with pytest.raises(CheckpointError, match="cut.pt: cut short: it starts as a zip archive"):
            read()
    assert "loading it whole" not in caplog.text  # no advice about a file that cannot be read at all


def test_a_damaged_torch_file_is_called_damaged_not_hostile(tmp_path):
    # "load it yourself if you trust it" is advice for a file of Python objects, not for a broken one
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(3)}, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[:raw.index(b"FloatStorage") + 7])  # cut inside torch.FloatStorage
    zipfile.ZipFile(tmp_path / "empty.pt", "w").close()
    for name, named in (("cut.pt", "damaged, or not a torch checkpoint"),
                        ("empty.pt", "not a checkpoint at all: neither a torch zip archive nor a pickle")):
        with pytest.raises(CheckpointError, match=named) as info:
            tk.load_state_dict(tmp_path / name)
        assert "trust" not in str(info.value)
    torch.save({"w": torch.randn(3), "step": RunsCode(str(tmp_path / "ran"))}, tmp_path / "objects.pt")
    with pytest.raises(CheckpointError, match="refused. It holds Python objects"):
        tk.load_state_dict(tmp_path / "objects.pt")
    assert not (tmp_path / "ran").exists()


# ---- writing: atomic, named, and with the umask's mode ---------------------------------


def test_saving_onto_a_directory_is_an_output_error(tmp_path):
    with pytest.raises(tk.errors.OutputError, match="is a directory"):
        tk.save_state_dict({"a": torch.zeros(2)}, tmp_path)


def test_saving_a_non_tensor_value_names_the_key(tmp_path):
    with pytest.raises(tk.errors.InvalidTypeError, match=r"state\['step'\] is int"):
        tk.save_state_dict({"w": torch.zeros(2), "step": 3}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def test_saving_a_modules_extra_state_says_how_to_keep_it(tmp_path):
    class WithExtraState(torch.nn.Linear):
        def get_extra_state(self):
            return {"calibrated": True}

        def set_extra_state(self, state):
            pass

    state = WithExtraState(2, 2).state_dict()  # as averaged_state_dict() gives it, extra state included
    with pytest.raises(tk.errors.InvalidTypeError, match=r"'_extra_state'\] is a module's extra state .* dict"):
        tk.save_state_dict(state, tmp_path / "x.safetensors")
    tk.save_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, tmp_path / "x.safetensors")


def test_saving_under_a_file_or_onto_a_link_loop_is_an_output_error(tmp_path):
    # the file as a folder read "File exists"; the loop was replaced by a regular file
    tk.save_state_dict({"a": torch.zeros(2)}, tmp_path / "m.pt")
    for under in ("m.pt/x.pt", "m.pt/a/x.pt"):
        with pytest.raises(tk.errors.OutputError, match="m.pt is a file, not a folder"):
            tk.save_state_dict({"a": torch.zeros(2)}, tmp_path / under)
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    with pytest.raises(tk.errors.OutputError, match="symbolic link that leads back to itself"):
        tk.save_state_dict({"a": torch.zeros(2)}, tmp_path / "loop1")
    assert (tmp_path / "loop1").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["loop1", "loop2",
                                                                                                 "m.pt"]


@pytest.mark.parametrize("dtype,suffix,named", [
    (torch.complex32, ".safetensors", "a .safetensors file cannot hold"),
    (torch.bits8, ".safetensors", "a .safetensors file cannot hold"),
    (torch.uint4, ".pt", "torch cannot copy"),
])
def test_saving_a_dtype_the_format_cannot_hold_names_the_key(tmp_path, dtype, suffix, named):
    # a bare KeyError from safetensors' dtype table, a NotImplementedError from torch's copy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32's "experimental" note
        value = torch.empty(4, dtype=dtype)
    with pytest.raises(tk.errors.InvalidArgumentError, match=rf"state\['w'\] is {dtype}, which {named}"):
        tk.save_state_dict({"w": value}, tmp_path / f"x{suffix}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, suffix):
    import errno

    path = tmp_path / f"model{suffix}"
    tk.save_state_dict({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(tk.errors.OutputError, match="No space left on device.*unchanged"):
        tk.save_state_dict({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_failed_write_removes_the_directories_it_created(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    (tmp_path / "kept").mkdir()
    with pytest.raises(tk.errors.OutputError, match="No space left on device"):
        tk.save_state_dict({"w": torch.zeros(3)}, tmp_path / "kept" / "new" / "deeper" / "w.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_write_cut_short_by_the_file_system_is_an_output_error(tmp_path, suffix):
    # torch.save and safetensors raise their own errors when a write fails, not OSError: a
    # file size limit (RLIMIT_FSIZE) makes a real one without filling the disk
    path = tmp_path / f"model{suffix}"
    script = (
        "import resource, signal, sys, torch, twa_kernels as tk\n"
        "tk.save_state_dict({'w': torch.ones(3)}, sys.argv[1])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        "    tk.save_state_dict({'w': torch.zeros(100_000)}, sys.argv[1])\n"
        "except tk.errors.OutputError as exc:\n"
        "    print('OutputError:', exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "OutputError: cannot write" in done.stdout and "unchanged" in done.stdout
    assert torch.equal(tk.load_state_dict(path)["w"], torch.ones(3))  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("call, error, what", [
    (lambda d: tk.Subspace.from_checkpoints([d / "a\0b.pt", d / "c.pt"]), CheckpointError, "checkpoint #0"),
    (lambda d: tk.Subspace.from_checkpoints(f"{d}/a\0*.pt"), CheckpointError, "the checkpoint path"),
    (lambda d: tk.load_state_dict(d / "a\0b.pt"), CheckpointError, "the checkpoint path"),
    (lambda d: tk.save_state_dict({"w": torch.ones(1)}, d / "a\0b.pt"), tk.errors.OutputError, "the output path"),
    (lambda d: io.write_json(d / "a\0b.json", {}), tk.errors.OutputError, "the output path"),
], ids=["list", "glob", "load", "save", "json"])
def test_a_path_with_a_nul_byte_is_named(tmp_path, call, error, what):
    # every OS call refuses such a path with a bare ValueError from deep inside
    with pytest.raises(error, match=rf"{what} .* holds a NUL byte"):
        call(tmp_path)
    assert not list(tmp_path.iterdir())


def test_saved_files_follow_the_umask_and_keep_an_existing_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = tk.save_state_dict({"w": torch.ones(3)}, tmp_path / "a.pt")
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        tk.save_state_dict({"w": torch.zeros(3)}, path)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# ---- frozen parameters stay at their checkpoint value ------------------------------------


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(40, 30)
        self.head = nn.Linear(30, 5)
        self.register_parameter("steps", nn.Parameter(torch.tensor([7, 9]), requires_grad=False))
        self.body.weight.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))) + self.steps.sum() * 0


def _fine_tunes(model: nn.Module, k: int = 4) -> list[dict]:
    """Fine-tunes of `model` with its frozen tensors untouched, as training leaves them."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    gen = torch.Generator().manual_seed(3)
    return [{n: v.clone() if n in frozen else v + 0.1 * torch.randn(v.shape, generator=gen)
             for n, v in model.state_dict().items()} for _ in range(k)]


def test_frozen_parameters_stay_exactly_at_their_checkpoint_value_while_twa_trains():
    source = _Backbone()
    checkpoints = _fine_tunes(source)
    model = _Backbone()  # a fresh model: its own frozen weights differ from the checkpoints'
    twa = tk.TWA(model, checkpoints, bits=4, group_size=64)
    opt = torch.optim.AdamW(twa.parameters(), lr=0.1)
    x = torch.randn(8, 40)
    for _ in range(3):
        twa(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    averaged = twa.averaged_state_dict()
    assert torch.equal(averaged["body.weight"], checkpoints[0]["body.weight"])
    assert torch.equal(averaged["steps"], checkpoints[0]["steps"])
    # the forward ran at those values: a plain model loaded with the average gives the same output
    plain = _Backbone()
    plain.load_state_dict(averaged)
    torch.testing.assert_close(twa(x), plain(x), rtol=1e-6, atol=1e-6)
    assert sorted(twa.frozen_names) == ["body.weight", "steps"] and "body.weight" not in twa.names
    assert not torch.equal(model.body.weight, checkpoints[0]["body.weight"])  # the model's own stays its own


def test_a_frozen_parameter_the_run_trained_is_named_and_one_that_agrees_is_not():
    # frozen only when the TWA is built, it was pinned to the checkpoints' mean without a word
    source = _Backbone()
    checkpoints = _fine_tunes(source)
    model = _Backbone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fine-tunes' frozen body agrees: nothing to say
        tk.TWA(model, checkpoints)
    model.head.weight.requires_grad_(False)  # trained in every fine-tune
    with pytest.warns(UserWarning, match=r"frozen parameters \['head.weight'\] differ between the checkpoints"):
        twa = tk.TWA(model, checkpoints)
    mean = sum(c["head.weight"].double() for c in checkpoints) / len(checkpoints)
    assert torch.equal(twa.averaged_state_dict()["head.weight"], mean.float())
    # the same values stored in another dtype agree
    agreeing = [{**c, "head.weight": checkpoints[0]["head.weight"].double() if i else checkpoints[0]["head.weight"]}
                for i, c in enumerate(checkpoints)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.TWA(model, agreeing)


def test_a_checkpoint_rewritten_between_the_build_and_the_frozen_read_is_named(tmp_path, monkeypatch):
    # the frozen parameters are read in a pass after the subspace's: a trainer saving over a
    # checkpoint in between pinned them to another state than the basis's
    paths = [tk.save_state_dict(state, tmp_path / f"c{i}.safetensors")
             for i, state in enumerate(_fine_tunes(_Backbone()))]
    original = twa_module.check_model_fits

    def rewrite_then_check(*args):
        tk.save_state_dict(_fine_tunes(_Backbone(), k=1)[0], paths[2])
        return original(*args)

    monkeypatch.setattr(twa_module, "check_model_fits", rewrite_then_check)
    with pytest.raises(CheckpointError, match=r"c2.safetensors: changed after the subspace was built"):
        tk.TWA(_Backbone(), paths, bits=4, group_size=64)
    monkeypatch.setattr(twa_module, "check_model_fits", original)
    assert sorted(tk.TWA(_Backbone(), paths, bits=4, group_size=64).frozen_names) == ["body.weight", "steps"]


def test_inference_mode_beside_training_never_leaves_a_twa_that_cannot_train():
    # a forward under inference_mode while a graph was pending made the next buffer an
    # inference tensor, and a TWA built there could never train: raw RuntimeErrors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, checkpoints, bits=4, group_size=16)
    x, y = torch.randn(4, 7), torch.randint(0, 5, (4,))
    loss = torch.nn.functional.cross_entropy(twa(x), y)
    with torch.inference_mode():
        evaluated = twa(x)
    loss.backward()
    for _ in range(2):
        torch.nn.functional.cross_entropy(twa(x), y).backward()
    assert twa.coefficients.grad is not None and torch.isfinite(evaluated).all()
    with torch.inference_mode():
        with pytest.raises(tk.errors.UsageError, match=r"TWA\(\.\.\.\) under torch.inference_mode"):
            tk.TWA(model, checkpoints, bits=4, group_size=16)
        with pytest.raises(tk.errors.UsageError, match="Moving or casting a TWA"):
            twa.to(torch.bfloat16)
        names = [n for n, _ in model.named_parameters()]
        subspace = tk.Subspace.from_checkpoints(checkpoints, bits=4, group_size=16, parameter_names=names)
    from_subspace = tk.TWA(model, subspace)
    torch.nn.functional.cross_entropy(from_subspace(x), y).backward()
    assert from_subspace.coefficients.grad is not None


def test_a_model_cast_on_its_own_lends_its_frozen_parameters_in_its_dtype_too():
    # the trainable weights followed model.to(bfloat16), the pinned values stayed float32:
    # a raw dtype error in the forward
    checkpoints = _fine_tunes(_Backbone())
    model = _Backbone()
    twa = tk.TWA(model, checkpoints, bits=4, group_size=64)
    model.to(torch.bfloat16)
    out = twa(torch.randn(8, 40, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_a_state_loaded_with_assign_takes_the_twas_own_dtypes():
    # assign=True installed a float64 center (refused by the kernels), int32 offsets and
    # bfloat16 coefficients (which changed the arithmetic) as they were
    checkpoints = _fine_tunes(_Backbone())
    source = tk.TWA(_Backbone(), checkpoints, bits=4, group_size=64)
    with torch.no_grad():
        source.coefficients.normal_()
    state = source.state_dict()
    x = torch.randn(8, 40)
    for key, dtype in (("center", torch.float64), ("basis_block_offsets", torch.int32),
                       ("coefficients", torch.float64)):
        twa = tk.TWA(_Backbone(), checkpoints, bits=4, group_size=64)
        given = {**state, key: state[key].to(dtype)}
        twa.load_state_dict(given, assign=True)
        assert getattr(twa, key).dtype == state[key].dtype and given[key].dtype == dtype
        torch.testing.assert_close(twa(x), source(x), rtol=0, atol=1e-6)


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor that is not contiguous (every other element of a wider one)."""
    wide = torch.stack([t, torch.zeros_like(t)], dim=-1)
    return wide[..., 0]


def test_a_state_loaded_with_assign_installs_contiguous_tensors():
    # assign=True installed a strided basis as it was: the load succeeded, then every
    # forward refused the basis ("must be contiguous")
    checkpoints = _fine_tunes(_Backbone())
    source = tk.TWA(_Backbone(), checkpoints, bits=4, group_size=64)
    with torch.no_grad():
        source.coefficients.normal_()
    x = torch.randn(8, 40)
    given = {key: _strided_copy(value) if value.dim() else value for key, value in source.state_dict().items()}
    assert not given["basis_codes"].is_contiguous() and not given["center"].is_contiguous()
    twa = tk.TWA(_Backbone(), checkpoints, bits=4, group_size=64)
    twa.load_state_dict(given, assign=True)
    assert all(t.is_contiguous() for t in [*twa.parameters(recurse=False), *twa.buffers(recurse=False)])
    torch.testing.assert_close(twa(x), source(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("assign", [False, True])
def test_a_state_with_entries_of_the_wrong_kind_is_refused_before_anything_is_copied(assign):
    # an integer or bool center and complex coefficients were cast silently by the copy; a
    # list, a sparse or a meta tensor, or an unexpected key failed inside torch's load after
    # the entries before it were copied, leaving the TWA half loaded
    checkpoints = _fine_tunes(_Backbone())
    source = tk.TWA(_Backbone(), checkpoints, bits=4, group_size=64)
    with torch.no_grad():
        source.coefficients.normal_()
    state = source.state_dict()
    twa = tk.TWA(_Backbone(), checkpoints, bits=4, group_size=64)
    before = {k: v.clone() for k, v in twa.state_dict().items()}
    center = state["center"]
    cases = {"integer values": {"center": center.round().long()},
             "bool values": {"center": center > 0},
             "complex values": {"coefficients": state["coefficients"].to(torch.complex64)},
             "is a list, not a tensor": {"coefficients": state["coefficients"].tolist()},
             "sparse_coo tensor, not a dense": {"coefficients": state["coefficients"].to_sparse()},
             "meta tensor": {"coefficients": state["coefficients"].to("meta")},
             "unexpected keys \\['extra'\\]": {"extra": torch.ones(1)}}
    for message, changed in cases.items():
        with pytest.raises(tk.errors.InvalidArgumentError, match=message):
            twa.load_state_dict({**state, "center": center + 1, **changed}, assign=assign)
        for key, value in twa.state_dict().items():
            assert torch.equal(value, before[key]), (message, key)  # nothing copied
    twa.load_state_dict({**state, "extra": torch.ones(1)}, strict=False, assign=assign)  # what strict=False is for
    assert torch.equal(twa.center, center)


def test_a_twa_subclass_with_modules_of_its_own_loads_its_whole_state_strictly():
    # the strict check of unexpected keys knew the TWA's own tensors only, and refused a head's
    class WithHead(tk.TWA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.head = nn.Linear(4, 2)

    checkpoints = _fine_tunes(_Backbone())
    source = WithHead(_Backbone(), checkpoints, bits=4, group_size=64)
    twa = WithHead(_Backbone(), checkpoints, bits=4, group_size=64)
    twa.load_state_dict(source.state_dict())
    assert torch.equal(twa.head.weight, source.head.weight)
    with pytest.raises(tk.errors.MissingKeyError, match="head.bias"):
        twa.load_state_dict({k: v for k, v in source.state_dict().items() if k != "head.bias"})


def test_a_model_without_parameters_or_with_all_frozen_is_named_for_what_it_is():
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"the model \(ReLU\) has no parameters"):
        tk.TWA(nn.ReLU(), [{}, {}])
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(tk.errors.InvalidArgumentError, match="every parameter of the model has requires_grad=False"):
        tk.TWA(frozen, [frozen.state_dict()] * 2)


def test_a_frozen_integer_parameter_that_differs_between_checkpoints_is_named():
    checkpoints = _fine_tunes(_Backbone())
    checkpoints[2]["steps"] = torch.tensor([7, 10])
    with pytest.raises(CheckpointError, match="frozen integer parameter 'steps' differs"):
        tk.TWA(_Backbone(), checkpoints)


def test_a_subspace_that_leaves_out_a_trainable_parameter_is_refused_until_it_is_frozen():
    model = _Backbone()
    head_only = tk.Subspace.from_checkpoints(_fine_tunes(model), parameter_names=["head.weight"])
    with pytest.raises(tk.errors.InvalidArgumentError, match="does not span 2 trainable.*'body.bias'"):
        tk.TWA(model, head_only)
    model.body.bias.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    kept = model.head.bias.detach().clone()
    with pytest.warns(UserWarning, match="pins the model's 4 frozen parameter"):
        twa = tk.TWA(model, head_only)
    twa(torch.randn(8, 40)).pow(2).mean().backward()
    assert model.head.bias.grad is None and twa.coefficients.grad is not None
    assert torch.equal(twa.averaged_state_dict()["head.bias"], kept)


def test_a_model_with_nothing_to_train_is_named():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(tk.errors.InvalidArgumentError, match="requires_grad=False"):
        tk.TWA(model, _fine_tunes(model))


def test_exporting_a_batchnorm_model_without_update_bn_warns_until_it_ran_at_those_weights():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    twa = tk.TWA(model, _fine_tunes(model, 3))
    with pytest.warns(RuntimeWarning, match="update_bn"):
        twa.averaged_state_dict()
    twa.update_bn([torch.randn(16, 4)])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twa.averaged_state_dict()
    with torch.no_grad():
        twa.coefficients.add_(0.1)  # other weights: the statistics are stale again
    with pytest.warns(RuntimeWarning, match="update_bn"):
        twa.averaged_state_dict()


def test_exporting_the_weights_of_a_diverged_twa_is_refused():
    # a NaN export would be loaded into a working model (the Lightning callback loads it)
    model = nn.Linear(4, 2)
    twa = tk.TWA(model, _fine_tunes(model, 3))
    with torch.no_grad():
        twa.coefficients.fill_(float("nan"))
    with pytest.raises(tk.errors.InvalidArgumentError, match="holds NaN or Inf .*the coefficients diverged"):
        twa.averaged_state_dict()


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu", 5])
def test_update_bn_names_a_call_fn_that_cannot_be_called(device):
    # swa_utils.update_bn(loader, model, device): here the third argument is call_fn
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tk.errors.InvalidTypeError, match="call_fn must be a callable") as info:
        tk.update_bn([torch.randn(8, 4)], model, device)
    assert ("takes a device there" in str(info.value)) == (device != 5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---- values and tensors that would pass into a result silently ----------------------------


def test_a_frozen_parameter_holding_nan_in_any_checkpoint_is_named():
    checkpoints = _fine_tunes(_Backbone())
    checkpoints[2]["body.weight"] = checkpoints[2]["body.weight"].clone()
    checkpoints[2]["body.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="checkpoint #2: the frozen parameter 'body.weight' holds NaN"):
        tk.TWA(_Backbone(), checkpoints)


def test_a_view_claiming_more_elements_than_its_file_holds_is_named_before_it_is_read(tmp_path):
    # torch.save keeps an expanded view's strides: 4 bytes on disk read back as 10**10
    # elements, which every reader would walk or allocate
    good = {"weight": torch.randn(4, 8), "bias": torch.randn(4)}
    torch.save(good, tmp_path / "good.pt")
    torch.save(good, tmp_path / "good2.pt")
    torch.save({"weight": torch.zeros(1).expand(10**5, 10**5), "bias": torch.randn(4)}, tmp_path / "huge.pt")
    done = _run(f"""
        import torch, twa_kernels as tk
        from torch import nn
        from twa_kernels.errors import CheckpointError
        huge, good, good2 = {str(tmp_path / "huge.pt")!r}, {str(tmp_path / "good.pt")!r}, {str(tmp_path / "good2.pt")!r}
        for name, call in {{
            "load_state_dict": lambda: tk.load_state_dict(huge),
            "uniform_average": lambda: tk.uniform_average([huge, good]),
            "Subspace": lambda: tk.Subspace.from_checkpoints([good, huge, good2], bits=4),
            "TWA": lambda: tk.TWA(nn.Linear(8, 4), [good, good2, huge]),
        }}.items():
            try:
                call()
                print(name, "accepted")
            except CheckpointError as exc:
                print(name, "refused:", exc)
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("'weight' claims 10000000000 elements") == 4, done.stdout


class _BroadcastBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.rand(3, 1).expand(3, 4))  # kept expanded, as some models do

    def forward(self, x):
        return self.lin(x * self.scale[0])


def test_a_broadcast_buffer_a_model_keeps_expanded_is_read_as_its_values(tmp_path):
    # a model's own state_dict, which torch saves and loads as it is, was refused as a hostile view
    torch.manual_seed(0)
    states = [_BroadcastBuffer().state_dict() for _ in range(3)]
    torch.save(states[0], tmp_path / "one.pt")
    loaded = tk.load_state_dict(tmp_path / "one.pt")
    assert torch.equal(loaded["scale"], states[0]["scale"]) and loaded["scale"].is_contiguous()
    average = tk.uniform_average(states)
    for key in ("lin.weight", "scale"):
        torch.testing.assert_close(average[key], sum(s[key] for s in states) / 3)
    twa = tk.TWA(_BroadcastBuffer(), states, bits=8)
    twa(torch.randn(2, 4)).sum().backward()
    assert twa.coefficients.grad.abs().sum() > 0
    # from files, read through a mapping: the whole copy is on the heap, whose pages the
    # reader gave back as if they were the file's (the process aborted)
    paths = []
    for i, state in enumerate(states):
        torch.save({**state, "lin.weight": torch.randn(3, 1).expand(3, 4)}, tmp_path / f"c{i}.pt")
        paths.append(tmp_path / f"c{i}.pt")
    done = subprocess.run([sys.executable, "-c", (
        "import torch, twa_kernels as tk\n"
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
        "from tests.test_hostile_input import _BroadcastBuffer\n"
        f"twa = tk.TWA(_BroadcastBuffer(), {[str(p) for p in paths]!r}, bits=8)\n"
        f"files = [torch.load(p) for p in {[str(p) for p in paths]!r}]\n"
        "mean = sum(f['lin.weight'] for f in files) / 3\n"
        "print(float((twa.averaged_state_dict()['lin.weight'] - mean).abs().max()))\n")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 1e-6  # the coefficients start at the uniform average


@pytest.mark.parametrize("index", [0, 2])
def test_a_meta_tensor_in_a_checkpoint_is_named_wherever_it_is(index):
    # on the CPU, adding a meta tensor changes nothing: the mean would have come out short
    checkpoints = _fine_tunes(_Backbone())
    checkpoints[index]["body.weight"] = torch.empty(30, 40, device="meta")
    with pytest.raises(CheckpointError, match=f"checkpoint #{index}: key 'body.weight' is a meta tensor"):
        tk.TWA(_Backbone(), checkpoints)


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="this torch has no packed 4-bit float type")
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_packed_four_bit_float_weights_are_named_not_averaged_as_bytes(tmp_path, suffix):
    # torch counts, indexes and converts float4_e2m1fn_x2 by the byte (two values each), and
    # safetensors stores it as F4, whose shape counts values: neither can be averaged
    import safetensors.torch

    model = nn.Linear(4, 2)
    packed = torch.arange(8, dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(2, 4)
    paths = [tmp_path / f"ckpt{i}{suffix}" for i in range(2)]
    for path in paths:
        state = {"weight": packed, "bias": torch.ones(2)}
        torch.save(state, path) if suffix == ".pt" else safetensors.torch.save_file(state, path)
    named = rf"ckpt0{re.escape(suffix)}: key 'weight' is (stored as F4|a torch.float4_e2m1fn_x2 tensor)"
    for read in (lambda: tk.load_state_dict(paths[0]), lambda: tk.TWA(model, paths, bits=None),
                 lambda: tk.Subspace.from_checkpoints(paths, bits=None)):
        with pytest.raises(CheckpointError, match=named):
            read()
    with pytest.raises(tk.errors.InvalidArgumentError, match="float4_e2m1fn_x2 tensor .values packed"):
        tk.save_state_dict({"weight": packed}, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_a_checkpoint_key_that_is_not_a_string_is_named():
    checkpoints = _fine_tunes(_Backbone())
    checkpoints[1][7] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="key 7 .int. has no string name"):
        tk.TWA(_Backbone(), checkpoints)


def test_a_loaded_state_with_a_non_finite_pinned_value_is_refused_and_nothing_changes():
    twa = tk.TWA(_Backbone(), _fine_tunes(_Backbone()))
    frozen = [n for n in twa.state_dict() if n.startswith("frozen_")]
    state = twa.state_dict()
    name = next(n for n in frozen if state[n].is_floating_point())
    before = state[name].clone()
    state = {k: v.clone() for k, v in state.items()}
    state[name].view(-1)[0] = float("inf")
    with pytest.raises(tk.errors.InvalidArgumentError, match=f"'{name}' holds NaN or Inf"):
        twa.load_state_dict(state)
    assert torch.equal(twa.state_dict()[name], before)


def test_a_subspace_whose_center_is_not_finite_is_refused():
    model = nn.Linear(4, 3)
    subspace = tk.Subspace.from_checkpoints(_fine_tunes(model, 3), bits=4, group_size=8)
    subspace.center[0] = float("nan")
    with pytest.raises(tk.errors.InvalidArgumentError, match="center holds NaN or Inf"):
        tk.TWA(model, subspace)


@pytest.mark.parametrize("center", ["long", "meta"])
def test_a_subspace_whose_center_is_not_floating_point_values_is_refused(center):
    # an integer center was cast by TWA (the weights all 0.0); a meta one failed in .item()
    model = nn.Linear(4, 3)
    subspace = tk.Subspace.from_checkpoints(_fine_tunes(model, 3), bits=4, group_size=8)
    bad = subspace.center.long() if center == "long" else subspace.center.to("meta")
    with pytest.raises(tk.errors.InvalidArgumentError, match="center must be a floating-point tensor with values"):
        tk.Subspace(subspace.names, subspace.shapes, bad, subspace.basis)


@pytest.mark.parametrize("call", ["normalize_rows", "orthonormalize", "biases", "check", "allow_empty"])
def test_an_option_flag_that_is_not_a_bool_is_refused_not_read_as_true(call):
    # "no" is a true string: each of these turned its option on
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    checkpoints = _fine_tunes(model, 3)
    calls = {
        "normalize_rows": lambda: tk.Subspace.from_checkpoints(checkpoints, normalize_rows="no"),
        "orthonormalize": lambda: tk.Subspace.from_checkpoints(checkpoints, orthonormalize="no"),
        "biases": lambda: tk.factorize(model, 2, biases="no"),
        "check": lambda: tk.decor.update(model, check="no"),
        "allow_empty": lambda: tk.update_bn([torch.randn(4, 4)], model, allow_empty="no"),
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tk.errors.InvalidTypeError, match=f"{call} must be True or False, got str 'no'"):
        calls[call]()
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_arguments_of_the_wrong_kind_are_named_in_the_librarys_words(tmp_path):
    # each raised a bare TypeError, or read an empty file as "not a state_dict (got dict)"
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    for loader in (None, torch.randn(4, 4)):
        with pytest.raises(tk.errors.InvalidTypeError, match="loader must be an iterable of batches"):
            tk.update_bn(loader, model)
    with pytest.raises(tk.errors.InvalidTypeError, match="takes the mapping basis.state_dict"):
        QuantizedBasis.from_state_dict(None)
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="an empty mapping, with no weights"):
        tk.load_state_dict(tmp_path / "empty.pt")


def test_a_state_dict_or_process_group_of_the_wrong_kind_is_named():
    # a bare TypeError from `in`, an AttributeError from .clone() and from the group's methods
    masks = {"weight": torch.ones(3, 4, dtype=torch.bool)}
    with pytest.raises(tk.prune.PruningError, match="takes a state_dict \\(a mapping of tensors\\), got NoneType"):
        tk.prune.masked_state_dict(None, masks)
    with pytest.raises(tk.prune.PruningError, match="holds \\['list'\\]"):
        tk.prune.masked_state_dict({"weight": [0.0] * 12}, masks)
    with pytest.raises(tk.errors.InvalidTypeError, match="process_group must be a torch.distributed ProcessGroup"):
        tk.decor.update(nn.Linear(2, 2), process_group="x")


@pytest.mark.parametrize("call", ["TWA", "update_bn"])
def test_a_lazy_layer_not_yet_run_is_named_with_the_fix(call):
    # torch's message spoke of load_state_dict
    model = nn.Sequential(nn.LazyLinear(3), nn.LazyBatchNorm1d())
    with pytest.raises(tk.errors.InvalidArgumentError, match="'0.weight' belongs to a lazy layer.*run one forward"):
        tk.TWA(model, [{}, {}]) if call == "TWA" else tk.update_bn([torch.randn(4, 5)], model)


def test_parameter_names_as_a_generator_are_read_once_and_an_empty_list_is_named():
    # a generator was used up by the check ("0 parameter names but 2 shapes"); [] was blamed
    # on the checkpoint ("holds no real floating-point weight")
    model = nn.Linear(4, 3)
    checkpoints = _fine_tunes(model, 3)
    subspace = tk.Subspace.from_checkpoints(checkpoints, parameter_names=(n for n in ["weight", "bias"]))
    assert subspace.names == ["weight", "bias"]
    with pytest.raises(tk.errors.InvalidArgumentError, match="parameter_names is empty"):
        tk.Subspace.from_checkpoints(checkpoints, parameter_names=[])


@pytest.mark.parametrize("aliases", [[1, 2], {"0.weight": 3}, {"0.weight": [4]}])
def test_parameter_aliases_that_are_not_names_by_name_are_refused(aliases):
    model = nn.Linear(4, 3)
    with pytest.raises(tk.errors.InvalidTypeError, match="aliases must map each name to a list of its state_dict"):
        tk.Subspace.from_checkpoints(_fine_tunes(model, 3), parameter_aliases=aliases)


def test_a_float64_basis_beyond_float32_range_is_refused_not_turned_to_inf():
    P = torch.randn(2, 64, dtype=torch.float64) * 1e300
    for build in (lambda: tk.quantize(P, bits=None), lambda: tk.quantize(P, bits=4, group_size=8),
                  lambda: tk.orthonormalize(P)):
        with pytest.raises(tk.errors.InvalidArgumentError, match="beyond float32's range"):
            build()


@pytest.mark.parametrize("bits", [4.0, True, "4"])
def test_bits_that_only_compare_equal_to_a_width_are_refused(bits):
    with pytest.raises(tk.errors.InvalidArgumentError, match="bits must be one of"):
        tk.quantize(torch.randn(2, 64), bits=bits, group_size=8)


def test_a_meta_basis_is_named():
    with pytest.raises(tk.errors.InvalidArgumentError, match="meta tensor"):
        tk.quantize(torch.empty(2, 64, device="meta"), bits=4, group_size=8)
    with pytest.raises(tk.errors.InvalidArgumentError, match="meta tensor"):
        tk.orthonormalize(torch.empty(2, 64, device="meta"))


def test_reconstruct_refuses_an_out_that_partly_overlaps_its_center():
    qb = tk.quantize(torch.randn(3, 64), bits=4, group_size=8)
    x = torch.randn(3, 1)
    buffer = torch.randn(65)
    with pytest.raises(tk.errors.InvalidArgumentError, match="overlaps center"):
        tk.reconstruct(qb, x, buffer[:-1], out=buffer[1:])
    center = torch.randn(64)
    expected = tk.reconstruct(qb, x, center.clone())
    with torch.no_grad():
        tk.reconstruct(qb, x, center, out=center)  # the same elements: an in-place update
    assert torch.equal(center, expected)


@pytest.mark.parametrize("view", ["expanded", "strided"])
def test_reconstruct_refuses_a_center_that_starts_at_out_but_is_not_its_elements(view):
    # the reference backend writes out a chunk at a time while it still reads center: an
    # expanded or strided center starting at out's first element read weights already written
    qb = tk.quantize(torch.randn(3, 64), bits=4, group_size=8)
    buffer = torch.randn(128)
    out = buffer[:64]
    center, x = out[:1].expand(64) if view == "expanded" else buffer[::2], torch.randn(3, 1)
    with torch.no_grad(), pytest.raises(tk.errors.InvalidArgumentError, match="overlaps center"):
        _ops.reconstruct_into_op(qb.codes, qb.scales, qb.mins, qb.block_offsets, x, center, 4, 8, out)
    expected = tk.reconstruct(qb, x, center.clone())
    with torch.no_grad():
        tk.reconstruct(qb, x, center, out=out)  # the public op reads a non-contiguous center from its own copy
    torch.testing.assert_close(out, expected)


def test_raw_ops_refuse_a_gradient_or_center_that_is_not_1d():
    # the reference broadcast a [10, 100] g against the basis's 1,000 columns, the kernels read it flat
    qb = tk.quantize(torch.randn(5, 1000), bits=4, group_size=128, block_sizes=[300, 700])
    layout = (qb.codes, qb.scales, qb.mins, qb.block_offsets)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"g must be 1-D .* got shape \(10, 100\)"):
        _ops.project_op(*layout, torch.ones(10, 100), 4, 128)
    with pytest.raises(tk.errors.InvalidArgumentError, match="center must be 1-D"):
        _ops.reconstruct_op(*layout, torch.ones(5, 2), torch.ones(10, 100), 4, 128, 1000)


def test_reconstruct_refuses_an_out_that_shares_memory_with_x_or_the_basis():
    # the kernel would write out while it still reads them
    qb = tk.quantize(torch.randn(3, 100), bits=4, group_size=32, block_sizes=[40, 60])
    buffer = torch.zeros(100)
    x = buffer[:6].view(3, 2)
    x.copy_(torch.randn(3, 2))
    with pytest.raises(tk.errors.InvalidArgumentError, match="out shares memory with x"):
        tk.reconstruct(qb, x, out=buffer)
    wide = tk.quantize(torch.randn(16, 100), bits=8, group_size=32)  # 1,600 code bytes: room for 100 floats
    codes_as_floats = wide.codes.view(-1).view(torch.float32)
    with pytest.raises(tk.errors.InvalidArgumentError, match="out shares memory with the basis codes"):
        tk.reconstruct(wide, torch.randn(16, 1), out=codes_as_floats[:100])
    fine = torch.empty(100)
    torch.testing.assert_close(tk.reconstruct(qb, x.clone(), out=fine), tk.reconstruct(qb, x.clone()))


def test_a_saved_basis_in_another_format_is_refused_and_one_without_a_version_is_read_as_format_1():
    # a layout change passes every shape check where k equals the number of groups: the
    # file's format number is what tells
    from twa_kernels.quant import FORMAT_VERSION

    qb = tk.quantize(torch.randn(4, 64), bits=4, group_size=16)  # k = n_groups = 4
    state = qb.state_dict()
    assert state["meta"].tolist() == [4, 16, 64, FORMAT_VERSION]
    state["meta"] = torch.tensor([4, 16, 64, FORMAT_VERSION + 1])
    with pytest.raises(tk.errors.InvalidArgumentError, match=f"stored in format {FORMAT_VERSION + 1}, and this "
                                                             f"version of twa-kernels reads format {FORMAT_VERSION}"):
        tk.QuantizedBasis.from_state_dict(state)
    state["meta"] = torch.tensor([4, 16, 64])  # written before the meta held the version
    assert torch.equal(tk.dequantize(tk.QuantizedBasis.from_state_dict(state)), tk.dequantize(qb))
    model = nn.Linear(8, 4)
    twa = tk.TWA(model, _fine_tunes(model, 3), bits=4, group_size=8)
    saved = twa.state_dict()
    saved["basis_meta"] = saved["basis_meta"][:3].clone()
    twa.load_state_dict(saved)  # a TWA state_dict saved then still loads
    assert twa.basis_meta.tolist()[-1] == FORMAT_VERSION


@pytest.mark.parametrize("device, error", [(torch.float64, tk.errors.InvalidTypeError),
                                           ("nope", tk.errors.InvalidArgumentError)])
def test_moving_a_basis_to_something_that_is_not_a_device_is_named(device, error):
    qb = tk.quantize(torch.randn(2, 64), bits=4, group_size=16)
    with pytest.raises(error, match="QuantizedBasis.to"):
        qb.to(device)
    assert qb.to("cpu").codes.equal(qb.codes)


def test_a_saved_basis_whose_scales_reach_past_float32_is_refused():
    # scales of 3e38 passed as finite, and every dequantised value of the group became Inf
    state = tk.quantize(torch.randn(2, 64), bits=4, group_size=16).state_dict()
    state["scales"] = state["scales"].clone().fill_(3e38)
    with pytest.raises(BasisLayoutError, match="beyond float32's range"):
        tk.QuantizedBasis.from_state_dict(state)


def test_an_out_over_the_basis_block_offsets_is_refused_before_the_kernel_reads_them():
    # the kernel wrote floats over offsets it had not read yet, and its column walk then
    # never reached the end: the process aborted with std::bad_alloc
    D, n_blocks = 4000, 1000
    made = tk.quantize(torch.randn(2, D), bits=4, group_size=64, block_sizes=[4] * n_blocks)
    buffer = torch.zeros(4 * (n_blocks + 1) + D, dtype=torch.int64)
    offsets = buffer[n_blocks + 1: 2 * (n_blocks + 1)]
    offsets.copy_(made.block_offsets)
    qb = QuantizedBasis(made.codes, made.scales, made.mins, offsets, 4, 64, D)
    out = buffer.view(torch.float32)[D:2 * D]
    with pytest.raises(tk.errors.InvalidArgumentError, match="out shares memory with the basis block offsets"):
        tk.reconstruct(qb, torch.randn(2, n_blocks), out=out)
    assert torch.equal(offsets, made.block_offsets)


def test_the_raw_op_refuses_an_out_that_shares_memory_with_what_it_reads():
    # torch.ops calls skip the public wrapper's checks: the op itself checks
    qb = tk.quantize(torch.randn(3, 40), bits=4, group_size=16, block_sizes=[10, 30])
    buffer = torch.zeros(40)
    x = buffer[:6].view(3, 2)
    x.copy_(torch.randn(3, 2))
    with pytest.raises(tk.errors.InvalidArgumentError, match="out shares memory with x"):
        torch.ops.twa_kernels.reconstruct_into(qb.codes, qb.scales, qb.mins, qb.block_offsets, x, None, 4, 16, buffer)


def test_the_cpu_binding_reads_its_own_copy_of_the_offsets_and_refuses_k_0():
    # below the op's checks, where torch.ops.twa_kernels_cpu is called directly: an out over
    # the block offsets sent the column walk out of bounds (the process aborted), and a
    # basis of no rows left reconstruct's output unwritten
    done = _run("""
        import torch, twa_kernels as tk
        from twa_kernels.backends import cpu
        cpu_ops = torch.ops.twa_kernels_cpu
        D, n_blocks = 4000, 1000
        qb = tk.quantize(torch.randn(2, D), bits=4, group_size=64, block_sizes=[4] * n_blocks)
        x = torch.randn(2, n_blocks)
        want = tk.reconstruct(qb, x)
        buffer = torch.zeros(4 * (n_blocks + 1) + D, dtype=torch.int64)
        offsets = buffer[n_blocks + 1: 2 * (n_blocks + 1)]
        offsets.copy_(qb.block_offsets)
        out = buffer.view(torch.float32)[D:2 * D]
        cpu_ops.reconstruct_out(qb.codes, qb.scales, qb.mins, offsets, x, None, 4, 64, 2, out)
        print("same weights:", torch.equal(out, want))
        try:
            cpu_ops.reconstruct_out(qb.codes[:0], qb.scales[:0], qb.mins[:0], qb.block_offsets, x[:0], None, 4, 64,
                                    2, torch.full((D,), float("nan")))
        except RuntimeError as exc:
            print("k = 0 refused:", str(exc).splitlines()[0])
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "same weights: True" in done.stdout, done.stdout
    assert "k = 0 refused: codes must be 2-D [k, ...] with k >= 1" in done.stdout, done.stdout


def test_an_out_on_meta_tensors_reports_no_overlap_that_does_not_exist():
    # meta tensors have no memory: their data pointers are all 0
    qb = tk.quantize(torch.randn(3, 40), bits=4, group_size=16, block_sizes=[10, 30]).to("meta")
    out = torch.empty(40, device="meta")
    assert tk.reconstruct(qb, torch.empty(3, 2, device="meta"), out=out).device.type == "meta"


def test_a_float64_basis_row_below_float32s_normal_range_is_refused():
    # cast to float32 it became zeros (1e-50) or kept a few bits (1e-42), without a word
    for scale in (1e-50, 1e-42):
        P = torch.randn(2, 64, dtype=torch.float64)
        P[1] *= scale
        for build in (lambda: tk.quantize(P, bits=4, group_size=64), lambda: tk.quantize(P, bits=None),
                      lambda: tk.orthonormalize(P)):
            with pytest.raises(tk.errors.InvalidArgumentError, match="row 1 has magnitudes below float32's smallest"):
                build()
    P = torch.randn(2, 64, dtype=torch.float64)
    P[0, 3] = 1e-45  # one tiny entry in a normal row loses nothing the row's scale can show
    tk.quantize(P, bits=4, group_size=64)


def test_project_int8_on_a_dense_basis_through_the_raw_op_is_a_named_error():
    qb = tk.quantize(torch.randn(2, 64), bits=None)
    with pytest.raises(tk.errors.InvalidArgumentError, match="needs a packed basis"):
        torch.ops.twa_kernels.project_int8(qb.codes, qb.scales, qb.mins, qb.block_offsets, [torch.randn(64)], 0, 128)


def test_dequantize_from_inside_a_group_names_the_group_edge():
    qb = tk.quantize(torch.randn(2, 40), bits=4, group_size=16)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"start must be a multiple of group_size \(16\)"):
        tk.dequantize(qb, 5, 20)


def test_a_non_float_out_is_told_to_be_allocated_in_a_kernel_dtype():
    qb = tk.quantize(torch.randn(2, 40), bits=4, group_size=16)
    with pytest.raises(tk.errors.InvalidTypeError, match="allocate it as float32 or bfloat16"):
        tk.reconstruct(qb, torch.randn(2, 1), out=torch.empty(40, dtype=torch.float64))


def test_out_center_on_a_tensor_that_requires_grad_is_refused_outside_no_grad():
    qb = tk.quantize(torch.randn(3, 64), bits=4, group_size=8)
    center = nn.Parameter(torch.randn(64))
    before = center.detach().clone()
    with pytest.raises(tk.errors.InvalidArgumentError, match="under torch.no_grad"):
        tk.reconstruct(qb, torch.randn(3, 1), center, out=center)
    assert torch.equal(center.detach(), before)
    with torch.no_grad():
        tk.reconstruct(qb, torch.randn(3, 1), center, out=center)  # the documented in-place update
    assert not torch.equal(center.detach(), before)


def test_an_out_that_requires_grad_is_refused_outside_no_grad_and_left_as_it_was():
    qb = tk.quantize(torch.randn(3, 64), bits=4, group_size=8)
    out = nn.Parameter(torch.zeros(64))
    with pytest.raises(tk.errors.InvalidArgumentError, match="out requires grad"):
        tk.reconstruct(qb, torch.randn(3, 1), out=out)
    assert torch.equal(out.detach(), torch.zeros(64))
    with torch.no_grad():
        tk.reconstruct(qb, torch.randn(3, 1), out=out)
    assert out.detach().abs().sum() > 0


@pytest.mark.parametrize("call, name", [
    (lambda qb: tk.project(qb, torch.randn(64).to_sparse()), "g"),
    (lambda qb: tk.project_int8(qb, torch.randn(64).to_sparse()), "g"),
    (lambda qb: tk.reconstruct(qb, torch.randn(3, 1).to_sparse()), "x"),
    (lambda qb: tk.reconstruct(qb, torch.randn(3, 1), torch.randn(64).to_sparse()), "center"),
])
def test_a_sparse_input_to_an_op_is_named(call, name):
    with pytest.raises(tk.errors.InvalidArgumentError, match=f"{name} is a torch.sparse_coo tensor.*to_dense"):
        call(tk.quantize(torch.randn(3, 64), bits=4, group_size=8))


def test_dequantize_checks_its_column_range_for_dense_and_packed_bases():
    for bits in (None, 4):
        qb = tk.quantize(torch.randn(3, 64), bits=bits, group_size=8)
        for start, stop in ((-2, None), (5, 2), (0, 99), (8, 8)):
            with pytest.raises(tk.errors.InvalidArgumentError, match="range"):
                tk.dequantize(qb, start, stop)
        with pytest.raises(tk.errors.InvalidTypeError, match="start must be an int"):
            tk.dequantize(qb, 0.0, 32)
    with pytest.raises(tk.errors.InvalidTypeError, match="QuantizedBasis"):
        tk.dequantize(torch.randn(3, 64))


@pytest.mark.parametrize("block_sizes, error", [([40.9, 23.1], "must be ints"), ([True] * 64, "must be ints"),
                                                 (64, "sequence of ints"), ("ab", "sequence of ints")])
def test_block_sizes_that_are_not_ints_are_refused_not_truncated(block_sizes, error):
    with pytest.raises(tk.errors.InvalidTypeError, match=error):
        tk.quantize(torch.randn(2, 64), bits=4, group_size=8, block_sizes=block_sizes)


def test_block_sizes_may_be_any_iterable_of_ints():
    import numpy as np

    for sizes in (torch.tensor([40, 24]), np.array([40, 24]), (s for s in (40, 24)), (40, 24)):
        assert tk.quantize(torch.randn(2, 64), bits=4, group_size=8, block_sizes=sizes).block_offsets.tolist() == \
            [0, 40, 64]


def test_a_numpy_group_size_is_an_int_and_a_float_one_is_named():
    np = pytest.importorskip("numpy")
    qb = tk.quantize(torch.randn(2, 64), bits=np.int64(4), group_size=np.int64(32))
    assert qb.group_size == 32 and type(qb.group_size) is int
    with pytest.raises(tk.errors.InvalidArgumentError, match="group_size must be an int, got float"):
        tk.quantize(torch.randn(2, 64), bits=4, group_size=32.0)


def test_orthonormalize_names_a_tol_that_is_not_a_number_and_a_p_that_needs_a_gradient():
    with pytest.raises(tk.errors.InvalidTypeError, match="tol must be a number"):
        tk.orthonormalize(torch.randn(2, 64), tol="a")
    P = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(tk.errors.InvalidArgumentError, match="not differentiable"):
        tk.orthonormalize(P)
    with torch.no_grad():
        assert tk.orthonormalize(P).shape == (2, 64)


@pytest.mark.parametrize("device, error", [(None, tk.errors.InvalidTypeError),
                                           ("bogus", tk.errors.InvalidArgumentError)])
def test_backend_names_a_device_it_cannot_read(device, error):
    with pytest.raises(error, match="device"):
        tk.backend(device)


def test_a_number_argument_that_is_none_or_nan_is_named():
    linear = nn.Linear(3, 2)
    batches = [(torch.randn(2, 3), torch.tensor([0, 1]))]
    calls = {
        "decay must be a number": lambda: tk.ema_average([linear.state_dict()] * 2, decay=None),
        "fraction must be a number": lambda: tk.split_holdout(list(range(10)), None),
        "fraction must be a finite number": lambda: tk.split_holdout(list(range(10)), float("nan")),
        # a NaN tol never counted as converged: every call ran all its iterations
        "tol must be a finite number": lambda: tk.connectivity.top_eigenvalue(linear, lambda out, y: out.sum(),
                                                                              batches, tol=float("nan")),
    }
    for message, call in calls.items():
        with pytest.raises(TWAKernelsError, match=message):
            call()


def test_geometry_names_a_model_without_parameters():
    batches = [(torch.randn(2, 3), torch.tensor([0, 1]))]
    for call in (lambda: tk.connectivity.interpolate(nn.ReLU(), {}, {}, batches),
                 lambda: tk.connectivity.hessian_diagonal(nn.ReLU(), lambda out, y: out.sum(), batches)):
        with pytest.raises(tk.errors.InvalidArgumentError, match="ReLU has no parameters"):
            call()


def test_ops_name_a_basis_or_vector_of_the_wrong_type():
    qb = tk.quantize(torch.randn(3, 64), bits=4, group_size=8)
    with pytest.raises(tk.errors.InvalidTypeError, match="must be a tk.QuantizedBasis"):
        tk.project([qb], torch.randn(64))
    with pytest.raises(tk.errors.InvalidTypeError, match="g must be a torch.Tensor"):
        tk.project(qb, [0.0] * 64)
    with pytest.raises(tk.errors.InvalidTypeError, match="x must be a torch.Tensor"):
        tk.reconstruct(qb, [[0.0]] * 3)


def test_save_state_dict_refuses_what_it_could_not_read_back(tmp_path):
    good = tmp_path / "w.safetensors"
    tk.save_state_dict({"a": torch.ones(2)}, good)
    with pytest.raises(tk.errors.InvalidArgumentError, match="reserves that name"):
        tk.save_state_dict({"__metadata__": torch.zeros(1)}, good)
    assert torch.equal(tk.load_state_dict(good)["a"], torch.ones(2))  # the good file is still there
    with pytest.raises(tk.errors.InvalidArgumentError, match="is empty"):
        tk.save_state_dict({}, tmp_path / "e.pt")
    with pytest.raises(tk.errors.InvalidArgumentError, match="sparse_coo tensor"):
        tk.save_state_dict({"a": torch.zeros(2).to_sparse()}, tmp_path / "s.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_twa_trains_through_a_sparse_embedding_as_through_a_dense_one():
    torch.manual_seed(0)

    def model(sparse: bool) -> nn.Module:
        return nn.Sequential(nn.Embedding(10, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 2))

    checkpoints = [model(False).state_dict() for _ in range(3)]
    tokens = torch.randint(0, 10, (5, 3))
    grads = []
    for sparse in (True, False):
        twa = tk.TWA(model(sparse), checkpoints, bits=None)
        with torch.no_grad():
            twa.coefficients.copy_(torch.linspace(-1, 1, twa.coefficients.numel()).view_as(twa.coefficients))
        twa(tokens).square().sum().backward()
        grads.append(twa.coefficients.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_one_checkpoint_is_refused_and_a_trainer_output_directory_is_named(tmp_path):
    model = nn.Linear(4, 2)
    with pytest.raises(CheckpointError, match="1 checkpoint .a state_dict.: a subspace needs at least 2"):
        tk.TWA(model, [model.state_dict()])
    out = tmp_path / "trainer-out"  # a Trainer's output: its final weights beside checkpoint-* folders
    for i, folder in enumerate((out, out / "checkpoint-4", out / "checkpoint-8")):
        folder.mkdir(parents=True)
        tk.save_state_dict({k: v + i for k, v in model.state_dict().items()}, folder / "model.safetensors")
    for given in (out, [out], tk.io.resolve_checkpoints(out)):  # as given, and as `twa fit` resolves it first
        with pytest.raises(CheckpointError, match=r"beside 2 checkpoint-\* folders: pass those"):
            tk.TWA(model, given)
    tk.TWA(model, str(out / "checkpoint-*"))  # the glob the message suggests


class _Generator(nn.Module):
    """A model with a method that calls it directly, as transformers' generate() does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x)

    def generate(self, x):
        return self(self(x))


def test_averaged_model_lends_the_averaged_weights_to_calls_past_forward():
    torch.manual_seed(0)
    model = _Generator()
    twa = tk.TWA(model, [_Generator().state_dict() for _ in range(3)], bits=None)
    with torch.no_grad():
        twa.coefficients.normal_()
    x = torch.randn(2, 4)
    own = model.generate(x)
    with twa.averaged_model() as lent:
        inside = lent.generate(x)
    assert torch.allclose(inside, twa(twa(x)).detach(), atol=1e-6)
    assert not torch.allclose(inside, own)
    assert torch.equal(model.generate(x), own)  # the model's own parameters again after the block


def test_update_bn_feeds_a_mapping_batch_as_keyword_arguments():
    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(3)

        def forward(self, pixel_values, labels=None):
            return self.norm(pixel_values)

    model = Keyed()
    data = torch.randn(16, 3) * 2 + 5
    tk.update_bn([{"pixel_values": data[:8], "labels": None}, {"pixel_values": data[8:]}], model)
    torch.testing.assert_close(model.norm.running_mean, data.mean(0))


def test_a_lightning_weight_averaging_checkpoint_says_which_weights_are_read(tmp_path):
    model = nn.Linear(4, 2)
    ema = {f"model.{k}": v + 1 for k, v in model.state_dict().items()}
    path = tmp_path / "epoch=0.ckpt"
    torch.save({"state_dict": ema, "current_model_state": dict(model.state_dict())}, path)
    with pytest.warns(UserWarning, match="current_model_state"):
        io.load_state_dict(path)


def test_casting_a_twa_keeps_its_center_basis_and_coefficients_exact():
    torch.manual_seed(0)
    states = [{k: v * 1e6 + 1e-3 * torch.randn_like(v) for k, v in nn.Linear(8, 4).state_dict().items()}
              for _ in range(3)]
    for state in states[1:]:
        state["bias"] = states[0]["bias"]
    model = nn.Linear(8, 4)
    model.bias.requires_grad_(False)  # its checkpoint value is kept too: it was rounded, unlike the rest
    twa = tk.TWA(model, states, bits=4, group_size=8)
    with torch.no_grad():
        twa.coefficients.fill_(0.1234568)
    before = {k: v.clone() for k, v in twa.state_dict().items()}
    assert "frozen_0" in before
    twa.half()
    assert next(twa.module.parameters()).dtype == torch.float16  # the model is cast, as asked
    twa.float()
    for key, value in twa.state_dict().items():
        assert torch.equal(value, before[key]), key  # a round trip through float16 rounded these
    assert torch.equal(twa.averaged_state_dict()["bias"], states[0]["bias"])


def test_casting_a_twa_keeps_its_coefficients_gradient_exact_and_float32():
    # nn.Module casts a parameter's gradient with it: .half() and back rounded it, and after
    # .double() the next Adam step refused the float64 gradient on float32 coefficients
    torch.manual_seed(0)
    states = [{k: v + 0.1 * torch.randn_like(v) for k, v in nn.Linear(8, 4).state_dict().items()} for _ in range(3)]
    twa = tk.TWA(nn.Linear(8, 4), states, bits=4, group_size=8)
    opt = torch.optim.Adam(twa.parameters(), lr=1e-2)
    twa(torch.randn(5, 8)).square().mean().backward()
    grad = twa.coefficients.grad.clone()
    twa.half().float()
    assert torch.equal(twa.coefficients.grad, grad)
    twa.double()
    assert twa.coefficients.grad.dtype == torch.float32 and torch.equal(twa.coefficients.grad, grad)
    opt.step()  # raised "expected dtype float ... but got dtype double"


def test_a_weight_changed_in_place_during_the_forward_is_named():
    # nn.Embedding(max_norm=...) renormalises rows of its weight in place: autograd refused
    # that with a message about views of a multi-output function, naming no weight and no fix
    torch.manual_seed(0)
    model = nn.Embedding(10, 4, max_norm=0.5)
    states = [{"weight": torch.randn(10, 4)} for _ in range(3)]
    twa = tk.TWA(model, states, bits=4, group_size=8)
    with pytest.raises(tk.errors.UsageError, match="changed one of its weights in place during the forward"):
        twa(torch.tensor([1, 2, 3]))
    assert isinstance(model.weight, nn.Parameter)  # the model holds its own weight again
    model.max_norm = None
    twa(torch.tensor([1, 2, 3])).sum().backward()  # and the next step trains
    assert twa.coefficients.grad is not None


def test_checkpoints_of_live_parameters_are_read_as_values():
    models = [nn.Linear(8, 4) for _ in range(3)]
    states = [dict(m.named_parameters()) for m in models]  # tensors that require grad
    twa = tk.TWA(nn.Linear(8, 4), states, bits=4, group_size=8)
    assert not twa.center.requires_grad and not tk.uniform_average(states)["weight"].requires_grad
    opt = torch.optim.SGD(twa.parameters(), lr=0.1)
    for _ in range(2):  # the second backward failed while the center held the checkpoints' graph
        opt.zero_grad()
        twa(torch.randn(3, 8)).sum().backward()
        opt.step()
    assert all(m.weight.grad is None for m in models)


def test_float8_checkpoints_are_read():
    states = [{k: v.to(torch.float8_e4m3fn) for k, v in nn.Linear(8, 4).state_dict().items()} for _ in range(3)]
    twa = tk.TWA(nn.Linear(8, 4), states, bits=4, group_size=8)
    expected = sum(s["weight"].float() for s in states) / 3
    # the coefficients start at zero, so the weights are the center: the float8 values' mean
    torch.testing.assert_close(twa.weights()["weight"], expected, atol=1e-6, rtol=0)


def test_twa_names_a_model_that_is_not_one_or_holds_no_values():
    checkpoints = _fine_tunes(_Backbone(), 3)
    with pytest.raises(tk.errors.InvalidTypeError,
                       match=r"TWA's model \(the network .*\) must be an nn.Module, got str"):
        tk.TWA("model", checkpoints)
    with torch.device("meta"):
        meta = _Backbone()
    with pytest.raises(tk.errors.InvalidArgumentError, match="the model's '(body.weight|steps)' is on the meta device"):
        tk.TWA(meta, checkpoints)


@pytest.mark.parametrize("bits", [None, 4])
def test_checkpoints_that_are_all_one_point_get_a_warning(bits):
    state, other = _fine_tunes(_Backbone(), 2)
    copies = [{k: v.clone() for k, v in state.items()} for _ in range(3)]
    with pytest.warns(UserWarning, match="every checkpoint holds the same weights") as once:
        tk.TWA(_Backbone(), copies, bits=bits)
    assert [w.filename for w in once] == [__file__]  # one warning, at the caller's line
    with pytest.warns(UserWarning, match="every checkpoint holds the same weights") as built:
        tk.Subspace.from_checkpoints(copies, bits=bits)  # a subspace built to be saved warns too
    assert [w.filename for w in built] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.TWA(_Backbone(), [state, other, state], bits=bits)  # a repeat among others: the caller's weighting


def test_a_parameter_with_no_elements_is_kept_out_of_the_subspace_as_a_frozen_one_is():
    # AdaptiveLogSoftmaxWithLoss with an empty cluster: TWA refused the model, trainable as it is
    model = nn.Linear(3, 2)
    model.empty = nn.Parameter(torch.zeros(0, 3))
    checkpoints = [{k: v + i for k, v in model.state_dict().items()} for i in range(3)]
    twa = tk.TWA(model, checkpoints, bits=None)
    assert twa.names == ["weight", "bias"] and twa.frozen_names == ["empty"]
    twa(torch.randn(4, 3)).sum().backward()
    assert twa.coefficients.grad.abs().sum() > 0
    assert twa.averaged_state_dict()["empty"].shape == (0, 3)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"'empty' has no elements.*leave it out"):
        tk.Subspace.from_checkpoints(checkpoints)  # the builder asked for it by name: refused


def test_checkpoints_whose_buffers_differ_from_the_models_get_a_warning():
    # weights trained beside other buffers (decorrelation matrices here) meet the model's own
    model = tk.decor.decorrelate(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)))
    checkpoints = []
    for i in range(3):
        state = {k: v + 0.1 * (i + 1) if k.endswith("weight") else v.clone() for k, v in model.state_dict().items()}
        state["0.decor_R"] = torch.eye(6) + 0.05 * (i + 1)
        checkpoints.append(state)
    with pytest.warns(UserWarning, match=r"checkpoint #0 holds other values of the model's buffer '0.decor_R'"):
        tk.TWA(model, checkpoints)
    for state in checkpoints:
        state["0.decor_R"] = model[0].decor_R.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.TWA(model, checkpoints)


class _FrozenBackbone(nn.Module):
    """A frozen backbone whose BatchNorm train() keeps in eval mode, as fine-tuning does."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), nn.Linear(6, 3)
        self.backbone.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x):
        return self.head(self.backbone(x))


def test_statistics_of_a_batchnorm_kept_in_eval_mode_that_differ_from_the_checkpoints_get_a_warning():
    # the training steps normalise with them and update_bn leaves them: a fresh model's 0 and 1
    # met weights fine-tuned behind the checkpoints' statistics, without a word
    torch.manual_seed(0)
    trained = _FrozenBackbone()
    trained.backbone[1].running_mean.fill_(2.0)
    trained.backbone[1].running_var.fill_(9.0)
    checkpoints = [{k: v + 0.1 * i if k.startswith("head") else v.clone() for k, v in trained.state_dict().items()}
                   for i in range(3)]
    with pytest.warns(UserWarning, match=r"other values of the model's buffer 'backbone.1.running_mean'"):
        tk.TWA(_FrozenBackbone(), checkpoints)
    fresh = _FrozenBackbone()
    fresh.load_state_dict(checkpoints[0])
    with warnings.catch_warnings():  # loaded first, as the training guide says: nothing to say
        warnings.simplefilter("error")
        tk.TWA(fresh, checkpoints)
    measured = _FrozenBackbone()
    measured.backbone.train = lambda mode=True: nn.Module.train(measured.backbone, mode)  # no longer frozen
    measured.train = lambda mode=True: nn.Module.train(measured, mode)
    with warnings.catch_warnings():  # statistics update_bn measures are not compared
        warnings.simplefilter("error")
        tk.TWA(measured, checkpoints)


def test_a_twa_from_a_subspace_says_its_frozen_parameters_take_the_models_values():
    checkpoints = _fine_tunes(_Backbone(), 3)
    model = _Backbone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    subspace = tk.Subspace.from_checkpoints(checkpoints, parameter_names=trainable)
    with pytest.warns(UserWarning, match=r"pins the model's 2 frozen parameter\(s\) .* to the model's own values"):
        tk.TWA(model, subspace)


def _records(obj) -> dict[str, bytes]:
    """The records of a torch.save zip, by name below its top folder."""
    import io as _io

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    archive = zipfile.ZipFile(_io.BytesIO(buffer.getvalue()))
    top = archive.namelist()[0].split("/")[0]
    return {name[len(top) + 1:]: archive.read(name) for name in archive.namelist()}


def test_a_zip_checkpoint_holding_a_record_twice_is_refused_by_every_reader(tmp_path):
    # torch reads the first copy of a name and zipfile the last: a pickle declaring 8 floats
    # over a 4-float record passed the size check, and the mapped read took the bytes after it
    big, small = _records({"w": torch.full((8,), 1.0)}), _records({"w": torch.full((4,), 1.0)})
    path = tmp_path / "twice.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("twice/data.pkl", big["data.pkl"])
        archive.writestr("twice/data/0", small["data/0"])
        for name, data in small.items():
            if name not in ("data.pkl", "data/0"):
                archive.writestr(f"twice/{name}", data)
        archive.writestr("twice/data.pkl", small["data.pkl"])
        archive.writestr("twice/data/0", small["data/0"])
    for read in (tk.load_state_dict, lambda p: columns.ColumnReader(p).tensor("w")):
        with pytest.raises(CheckpointError, match="record 'twice/data.pkl' is in the archive twice"):
            read(path)


def test_an_unreadable_checkpoint_a_frozen_weight_of_another_kind_and_a_key_no_header_holds_are_named(
        tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    torch.save({"w": torch.ones(2)}, path)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(io.read, "open", refused, raising=False)
        with pytest.raises(CheckpointError, match=r"c.pt: cannot be read \(Permission denied\)"):
            tk.load_state_dict(path)
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    ckpts = [{k: v + i for k, v in model.state_dict().items()} for i in range(2)]
    ckpts[1]["0.bias"] = torch.zeros(2, dtype=torch.int64)  # summed into an integer total, a raw cast error
    with pytest.raises(CheckpointError, match="frozen parameter '0.bias' is stored as torch.int64, but the model's "
                                              "is torch.float32"):
        tk.TWA(model, ckpts, bits=None)
    key = "layer\udcff.weight"  # what os.fsdecode leaves of an undecodable byte
    with pytest.raises(tk.errors.InvalidArgumentError, match="not valid Unicode text.*save as .pt"):
        tk.save_state_dict({key: torch.ones(2)}, tmp_path / "bad.safetensors")
    assert tk.load_state_dict(tk.save_state_dict({key: torch.ones(2)}, tmp_path / "ok.pt")).keys() == {key}
    assert not list(tmp_path.glob(".*.tmp"))
    for read in (tk.load_state_dict, columns.ColumnReader):  # a device is not "no such file"
        with pytest.raises(CheckpointError, match="/dev/null: not a regular file"):
            read("/dev/null")
