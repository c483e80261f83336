"""torch.distributed.checkpoint (DCP) directories: read correctly, and never run code from
their pickles (the .metadata file, or non-tensor items in the .distcp data files)."""

import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import twa_kernels as tk
from twa_kernels import _dcp
from twa_kernels.errors import CheckpointError
from twa_kernels.columns import ColumnReader

from tests.helpers import RunsCode


class OpenPayload(RunsCode):
    """Unpickling this opens the marker file for writing."""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def save_dcp(path, state):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def model_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(6, 5, generator=gen), "fc.bias": torch.randn(6, generator=gen),
            "half": torch.randn(4, 3, generator=gen).to(torch.bfloat16)}


def test_a_genuine_dcp_checkpoint_reads_correctly(tmp_path):
    state = model_state()
    save_dcp(tmp_path / "ckpt", {"model": state, "step": 7})
    reader = ColumnReader(tmp_path / "ckpt")
    assert sorted(reader.keys()) == sorted(state)
    for key, value in state.items():
        assert reader.shape(key) == tuple(value.shape) and reader.dtype(key) == value.dtype
        assert torch.equal(reader.tensor(key), value)
    flat = torch.cat([state["fc.weight"].reshape(-1), state["fc.bias"]])
    assert torch.equal(reader.columns(["fc.weight", "fc.bias"], [(6, 5), (6,)], 3, 33), flat[3:33])
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    assert set(_dcp.tensor_entries(metadata)) == {f"model.{k}" for k in state}


def test_the_dcp_tutorials_app_state_layout_is_read_and_other_readers_are_told_to_convert(tmp_path):
    # dcp.save({"app": AppState(model, optimizer)}) stores app.model.<name> and app.optim...:
    # it was refused as holding no tensors of a state_dict
    state = model_state()
    save_dcp(tmp_path / "app", {"app": {"model": state, "optim": {"state": {"step": torch.tensor(3.0)}}}})
    reader = ColumnReader(tmp_path / "app")
    assert sorted(reader.keys()) == sorted(state)
    assert all(torch.equal(reader.tensor(key), value) for key, value in state.items())
    with pytest.raises(CheckpointError, match=r"read column by column, by tk.TWA only .*dcp_to_torch_save"):
        tk.uniform_average([tmp_path / "app"])

def test_a_flat_state_dict_whose_names_start_with_model_is_read_as_saved(tmp_path):
    # a Hugging Face causal LM names its weights model.layers.* and lm_head.*: saved flat, those
    # are its names, not a {"model": ...} nesting to unwrap
    gen = torch.Generator().manual_seed(1)
    state = {"model.embed.weight": torch.randn(5, 3, generator=gen), "lm_head.weight": torch.randn(2, 3, generator=gen)}
    save_dcp(tmp_path / "flat", state)
    shifted = {k: v + 1 for k, v in state.items()}
    save_dcp(tmp_path / "nested", {"model": shifted, "optim": {"state": {"step": torch.tensor(3.0)}}})
    for path, saved in (("flat", state), ("nested", shifted)):
        reader = ColumnReader(tmp_path / path)
        assert sorted(reader.keys()) == sorted(saved)
        for key, value in saved.items():
            assert torch.equal(reader.tensor(key), value)
    model = torch.nn.Module()
    model.model, model.lm_head = torch.nn.Module(), torch.nn.Linear(3, 2, bias=False)
    model.model.embed = torch.nn.Embedding(5, 3)
    twa = tk.TWA(model, [tmp_path / "flat", tmp_path / "nested"], bits=None)
    with twa.averaged_model() as averaged:
        assert torch.allclose(averaged.model.embed.weight, state["model.embed.weight"] + 0.5)


def test_dcp_keys_that_name_one_weight_once_unwrapped_are_refused(tmp_path):
    save_dcp(tmp_path / "ckpt", {"fc.weight": torch.ones(2), "module.fc.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="keys 'fc.weight' and 'module.fc.weight' both name 'fc.weight'"):
        ColumnReader(tmp_path / "ckpt")
    save_dcp(tmp_path / "optimizer", {"optim": {"state": {"fc.weight": torch.ones(2)}}})
    with pytest.raises(CheckpointError, match="holds no tensors of a state_dict"):
        ColumnReader(tmp_path / "optimizer")


@pytest.mark.parametrize("payload", [RunsCode, OpenPayload], ids=["os.system", "open"])
def test_a_malicious_metadata_file_is_refused_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "MARKER"
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused.*names the Python global") as info:
        ColumnReader(tmp_path / "ckpt")
    assert ("system" if payload is RunsCode else "open") in str(info.value)
    assert not marker.exists()


def test_a_payload_hidden_inside_valid_metadata_is_refused(tmp_path):
    """A genuine Metadata object with a payload in one of its free-form fields."""
    marker = tmp_path / "MARKER"
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    save_dcp(tmp_path / "other", {"model": model_state()})
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    metadata.storage_meta.save_id = RunsCode(marker)
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"refused.*(posix|os)\.system"):
        ColumnReader(tmp_path / "ckpt")
    assert not marker.exists()


def test_the_load_never_unpickles_the_metadata_again(tmp_path, monkeypatch):
    """Once read safely, DCP's load is handed that copy: plain pickle never sees the file."""
    state = model_state()
    save_dcp(tmp_path / "ckpt", {"model": state})
    reader = ColumnReader(tmp_path / "ckpt")

    def no_pickle(*args, **kwargs):
        raise AssertionError("plain pickle.load called while loading a DCP tensor")
    monkeypatch.setattr(pickle, "load", no_pickle)
    assert torch.equal(reader.tensor("fc.weight"), state["fc.weight"])


def test_pickled_non_tensor_items_in_the_data_files_are_never_loaded(tmp_path):
    """DCP stores non-tensor items as pickles in the .distcp files (and loads them with
    weights_only=False): only tensors are read, and a planner that would load such an item
    refuses it."""
    marker = tmp_path / "MARKER"
    state = model_state()
    save_dcp(tmp_path / "ckpt", {"model": state, "extra": RunsCode(marker)})
    assert not marker.exists()  # saving pickles the object, running nothing
    reader = ColumnReader(tmp_path / "ckpt")
    assert sorted(reader.keys()) == sorted(state)
    for key, value in state.items():
        assert torch.equal(reader.tensor(key), value)
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="refused to load the non-tensor item 'extra'"):
        _dcp.load_tensor(_dcp.CheckedReader(str(tmp_path / "ckpt"), metadata), "extra", (), torch.float32, "ckpt")
    assert not marker.exists()


def test_metadata_pointing_outside_the_directory_is_refused(tmp_path):
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    save_dcp(tmp_path / "other", {"model": model_state()})
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="not a file name inside the checkpoint directory"):
        ColumnReader(tmp_path / "ckpt")


def test_a_directory_of_checkpoints_counts_its_dcp_subdirectories(tmp_path):
    from twa_kernels.io import resolve_checkpoints

    tk.save_state_dict(model_state(0), tmp_path / "runs" / "epoch_1.pt")
    save_dcp(tmp_path / "runs" / "epoch_2", {"model": model_state(1)})
    found = resolve_checkpoints(tmp_path / "runs")
    assert [p.name for p in found] == ["epoch_1.pt", "epoch_2"]


@pytest.mark.parametrize("change", ["shrink", "move outside"])
def test_metadata_whose_chunks_do_not_cover_a_tensor_is_refused(tmp_path, change):
    # DCP's load fills only the chunks it is told of: the rest would be uninitialised memory
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    save_dcp(tmp_path / "other", {"model": model_state()})
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    key, entry = next((k, e) for k, e in metadata.state_dict_metadata.items() if k.endswith("weight"))
    chunk = entry.chunks[0]
    if change == "shrink":
        chunk.sizes = torch.Size([chunk.sizes[0] - 1, *chunk.sizes[1:]])
    else:
        chunk.offsets = torch.Size([entry.size[0], *chunk.offsets[1:]])
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    named = (rf"the chunks of '{key}' cover \d+ of its \d+ elements" if change == "shrink"
             else rf"a chunk of '{key}' at .* lies outside its size")
    with pytest.raises(CheckpointError, match=named):
        ColumnReader(tmp_path / "ckpt")


def test_metadata_claiming_more_bytes_than_a_chunk_stores_is_refused_before_any_allocation(tmp_path):
    # a model's center is allocated from the claimed sizes before a byte is read
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    save_dcp(tmp_path / "other", {"model": model_state()})
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    key, entry = next((k, e) for k, e in metadata.state_dict_metadata.items() if k.endswith("weight"))
    entry.size = torch.Size([10**6, 10**6])
    entry.chunks[0].sizes = entry.size
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    for read in (lambda: ColumnReader(tmp_path / "ckpt"),
                 lambda: tk.Subspace.from_checkpoints([tmp_path / "ckpt", tmp_path / "other"], bits=4)):
        with pytest.raises(CheckpointError, match=rf"the chunk of '{key}' at \[0, 0\] claims 4000000000000 bytes"):
            read()


def test_a_flipped_bit_in_a_stored_chunk_is_refused(tmp_path):
    # DCP stores each chunk in torch.save's zip format, whose CRCs torch's reader never checks
    import io
    import zipfile

    state = model_state()
    save_dcp(tmp_path / "ckpt", {"model": state})
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    info = metadata.storage_data[next(i for i in metadata.storage_data if i.fqn == "model.fc.weight")]
    path = tmp_path / "ckpt" / info.relative_path
    raw = bytearray(path.read_bytes())
    blob = zipfile.ZipFile(io.BytesIO(bytes(raw[info.offset:info.offset + info.length])))
    record = next(r for r in blob.infolist() if "/data/" in r.filename)
    header = raw[info.offset + record.header_offset:info.offset + record.header_offset + 30]
    data = info.offset + record.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
        int.from_bytes(header[28:30], "little")
    assert ColumnReader(tmp_path / "ckpt").tensor("fc.weight").equal(state["fc.weight"])  # intact: read
    raw[data + 2] ^= 0x40  # one bit of fc.weight[0, 0]
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"fc.weight.* is damaged \(Bad CRC-32"):
        ColumnReader(tmp_path / "ckpt").tensor("fc.weight")


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", pickle.dumps({"a": 1})],
                         ids=["empty", "garbled", "a dict"])
def test_a_broken_metadata_file_is_a_named_error(tmp_path, content):
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    (tmp_path / "ckpt" / ".metadata").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"\.metadata: not a (readable|valid) DCP metadata file"):
        ColumnReader(tmp_path / "ckpt")


def test_a_torch_without_distributed_gets_a_named_error_for_a_dcp_directory(tmp_path):
    # torch.distributed is a build option of torch; a build without it cannot read DCP, and the
    # reader says so rather than fail inside torch. Its absence is simulated in a fresh process.
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    script = (
        "import sys\n"
        "sys.modules['torch.distributed.checkpoint'] = None\n"
        "from twa_kernels.columns import ColumnReader\n"
        "from twa_kernels.errors import MissingDependencyError\n"
        "try:\n"
        f"    ColumnReader({str(tmp_path / 'ckpt')!r})\n"
        "except MissingDependencyError as exc:\n"
        "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs torch.distributed, which this torch" in out.stdout


def test_overlapping_chunks_are_refused_however_many_chunks_there_are(tmp_path):
    # past 4096 chunks the pairwise overlap test was skipped: two overlapping chunks whose
    # sizes still added up to the tensor's left elements no chunk wrote, read as weights
    import io
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
    )

    n, width = 8194, 2
    offsets = list(range(0, n - width, width)) + [1]  # 4097 chunks; the last overlaps, 8192..8193 uncovered
    chunks, storage, blob = [], {}, io.BytesIO()
    for offset in offsets:
        data = io.BytesIO()
        torch.save(torch.full((width,), 1.0), data)
        storage[MetadataIndex("w", torch.Size([offset]))] = _StorageInfo("__0_0.distcp", blob.tell(),
                                                                        len(data.getvalue()))
        blob.write(data.getvalue())
        chunks.append(ChunkStorageMetadata(offsets=torch.Size([offset]), sizes=torch.Size([width])))
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(blob.getvalue())
    entry = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([n]), chunks)
    metadata = Metadata(state_dict_metadata={"w": entry}, planner_data={"w": ("w",)}, storage_data=storage)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="the chunks of 'w' cover 8194 of its 8194 elements and overlap"):
        ColumnReader(folder).tensor("w")


def test_metadata_whose_byte_ranges_lie_past_its_data_files_is_refused_before_any_allocation(tmp_path):
    # a metadata file of a few KB claimed a tensor of 10^9 floats and as many stored bytes:
    # the tiling check and the builder's center were allocated from it before a byte was read
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    key, entry = next((k, e) for k, e in metadata.state_dict_metadata.items() if k.endswith("bias"))
    entry.size = entry.chunks[0].sizes = torch.Size([10**9])
    metadata.storage_data[next(i for i in metadata.storage_data if i.fqn == key)].length = 4 * 10**9
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=rf"the data of '{key}' lies past the end of __0_0.distcp "
                                              r"\(\d+ bytes\); the checkpoint is truncated"):
        ColumnReader(tmp_path / "ckpt")


def test_metadata_pointing_two_items_at_the_same_bytes_is_refused(tmp_path):
    # many chunks pointing at one byte range each passed the stored-bytes bound, so a few KB of
    # metadata claimed a tensor of any size, allocated by the tiling check and the readers
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    weight, bias = (next(i for i in metadata.storage_data if i.fqn.endswith(end)) for end in ("weight", "bias"))
    metadata.storage_data[bias].offset = metadata.storage_data[weight].offset
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"the data of '.*' and of '.*' share bytes of __0_0.distcp"):
        ColumnReader(tmp_path / "ckpt")


def test_a_tied_weight_saved_under_two_keys_passes_the_checks(tmp_path):
    shared = torch.randn(4, 3)
    save_dcp(tmp_path / "ckpt", {"model": {"embed.weight": shared, "head.weight": shared}})
    metadata = _dcp.read_metadata(tmp_path / "ckpt")  # each key's bytes written apart
    assert {key for key, _ in _dcp.state_dict_keys(metadata)} == {"embed.weight", "head.weight"}


@pytest.mark.parametrize("replacement", ["missing", "fifo"])
def test_a_data_file_that_is_missing_or_not_a_regular_file_is_a_named_error(tmp_path, replacement):
    # opening a FIFO blocks until a writer comes: the reader waited for ever
    import os

    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    data = tmp_path / "ckpt" / "__0_0.distcp"
    data.unlink()
    if replacement == "fifo":
        os.mkfifo(data)
    named = "could not be read" if replacement == "missing" else "is not a regular file"
    script = ("from twa_kernels.columns import ColumnReader\n"
              "from twa_kernels.errors import CheckpointError\n"
              "try:\n"
              f"    ColumnReader({str(tmp_path / 'ckpt')!r}).tensor('fc.weight')\n"
              "except CheckpointError as exc:\n"
              "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"the data file __0_0.distcp of 'model.fc.weight' {named}" in out.stdout


def test_a_stored_chunk_whose_dtype_differs_from_the_metadata_is_refused(tmp_path):
    # DCP copies a stored chunk into a tensor of the metadata's dtype: float32 data under a
    # float16 entry came back rounded to float16 without a word
    save_dcp(tmp_path / "ckpt", {"model": model_state()})
    metadata = _dcp.read_metadata(tmp_path / "ckpt")
    metadata.state_dict_metadata["model.fc.weight"].properties.dtype = torch.float16
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="the chunk of 'model.fc.weight' stores torch.float32 but the "
                                              "checkpoint's metadata gives it torch.float16"):
        ColumnReader(tmp_path / "ckpt").tensor("fc.weight")
    assert ColumnReader(tmp_path / "ckpt").tensor("fc.bias").equal(model_state()["fc.bias"])  # the others read
