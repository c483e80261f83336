"""Checkpoints in the shapes other libraries write them, with the real libraries: Hugging
Face save_pretrained directories (one file, or shards read through their index), Lightning
ModelCheckpoint .ckpt files, and the wrapped models (torch.compile, DataParallel) that wrote
their checkpoints; and the output directories of torchvision's and timm's training scripts,
written here in the same layout. Models are tiny and built from configs: nothing is
downloaded."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from torch import nn

import twa_kernels as tk
from twa_kernels import columns, io
from twa_kernels.errors import CheckpointError, UsageError

from tests.helpers import RunsCode, one_process_group

GPT2 = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)


def _gpt2(seed: int):
    torch.manual_seed(seed)
    transformers.logging.set_verbosity_error()  # the tiny vocabulary makes it warn about GPT-2's token ids
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()


def _mean(states: list[dict], keys) -> dict:
    return {k: torch.stack([s[k].double() for s in states]).mean(0).float() for k in keys}


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """Three fine-tunes of one GPT-2, each saved as one file and as shards, named as the
    HF Trainer names its checkpoints (checkpoint-5 before checkpoint-10)."""
    root = tmp_path_factory.mktemp("hf")
    states, single, sharded = [], [], []
    for i, step in enumerate((5, 10, 15)):
        model = _gpt2(i)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        single.append(root / "single" / f"checkpoint-{step}")
        sharded.append(root / "sharded" / f"checkpoint-{step}")
        model.save_pretrained(single[-1])
        model.save_pretrained(sharded[-1], max_shard_size="50KB")
    assert len(list(sharded[0].glob("*.safetensors"))) > 2 and (sharded[0] / "model.safetensors.index.json").exists()
    # save_pretrained keeps one name of the tied embedding and output weights
    assert "lm_head.weight" not in io.load_state_dict(single[0] / "model.safetensors")
    return {"root": root, "states": states, "single": single, "sharded": sharded}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_save_pretrained_directories_are_one_checkpoint_each(hf_runs, layout):
    dirs = hf_runs[layout]
    model = _gpt2(7)
    keys = list(model.state_dict())
    want = _mean(hf_runs["states"], keys)
    assert io.resolve_checkpoints(dirs[0]) == [dirs[0]]  # one directory is one checkpoint
    for state in hf_runs["states"][:1]:
        got = io.load_state_dict(dirs[0])
        assert all(torch.equal(got[k], state[k]) for k in got) and len(got) == len(keys) - 1  # lm_head tied
    twa = tk.TWA(model, dirs, bits=None)
    averaged = twa.averaged_state_dict()
    for key in keys:
        torch.testing.assert_close(averaged[key], want[key], rtol=0, atol=1e-6)
    assert torch.equal(averaged["lm_head.weight"], averaged["transformer.wte.weight"])  # tied, filled from the model
    soup = tk.uniform_average(dirs, model=model)
    assert list(soup) == keys
    for key in keys:
        torch.testing.assert_close(soup[key], want[key], rtol=0, atol=1e-6)


def test_a_trainer_output_directory_is_not_averaged_as_its_final_weights_alone(hf_runs, tmp_path):
    # the Trainer saves the final model beside its checkpoint-* folders: read as given, that
    # directory is one checkpoint, whose "average" would be the final weights
    import shutil

    out = tmp_path / "out"
    shutil.copytree(hf_runs["single"][-1], out)
    for run in hf_runs["single"]:
        shutil.copytree(run, out / run.name)
    for average in (tk.uniform_average, tk.ema_average):
        with pytest.raises(tk.CheckpointError, match=r"its average is itself.*checkpoint-\*"):
            average(out)
    soup = tk.uniform_average(str(out / "checkpoint-*"))
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.allclose(soup[name], sum(s[name] for s in hf_runs["states"]) / 3)


def test_a_twa_tells_the_hf_trainer_whether_its_model_takes_loss_arguments():
    # the Trainer passes num_items_in_batch to a forward that takes **kwargs, and asks the
    # model's accepts_loss_kwargs first; TWA's forward takes **kwargs for any model
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, labels=None):
            return self.fc(x)

    class Open(Plain):
        def forward(self, x, labels=None, **kwargs):
            return self.fc(x)

    class Refuses(Open):
        accepts_loss_kwargs = False

    def twa_of(cls):
        torch.manual_seed(0)
        states = [{k: v + i for k, v in cls().state_dict().items()} for i in range(3)]
        return tk.TWA(cls(), states, bits=None)

    assert [twa_of(cls).accepts_loss_kwargs for cls in (Plain, Open, Refuses)] == [False, True, False]


def test_a_folder_of_trainer_checkpoints_is_read_in_step_order(hf_runs):
    model = _gpt2(7)
    root = hf_runs["root"] / "sharded"
    assert io.resolve_checkpoints(root) == hf_runs["sharded"]  # checkpoint-5, -10, -15: natural order
    ema = tk.ema_average(root, decay=0.5, model=model)
    want = hf_runs["states"][0]["transformer.h.0.mlp.c_fc.weight"].double()
    for state in hf_runs["states"][1:]:
        want = 0.5 * want + 0.5 * state["transformer.h.0.mlp.c_fc.weight"].double()
    torch.testing.assert_close(ema["transformer.h.0.mlp.c_fc.weight"], want.float(), rtol=0, atol=1e-6)


def test_sharded_checkpoints_read_column_by_column_open_only_the_shard_they_need(hf_runs, monkeypatch):
    model = _gpt2(7)
    names = [n for n, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for p in model.parameters()]
    aliases = io.parameter_aliases(model)
    reference = torch.cat([hf_runs["states"][1][n].reshape(-1) for n in names])
    reader = columns.ColumnReader(hf_runs["sharded"][1])
    assert torch.equal(reader.columns(names, shapes, 0, reference.numel(), aliases), reference)
    assert set(reader.keys()) == set(io.load_state_dict(hf_runs["single"][1]))

    import safetensors

    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(Path(path).name) or
                        real(path, *a, **k))
    reader = columns.ColumnReader(hf_runs["sharded"][1])
    opened.clear()  # the metadata of every shard was read; now one tensor's columns
    offset = sum(math.prod(s) for s in shapes[:names.index("transformer.h.1.mlp.c_proj.weight")])
    got = reader.columns(names, shapes, offset + 10, offset + 20, aliases)
    assert torch.equal(got, reference[offset + 10: offset + 20])
    index = (hf_runs["sharded"][1] / "model.safetensors.index.json").read_text()
    holder = re.search(r'"transformer\.h\.1\.mlp\.c_proj\.weight": "([^"]+)"', index).group(1)
    assert set(opened) == {holder}


def test_sharded_build_of_save_pretrained_directories(hf_runs):
    """tk.TWA(..., process_group=pg, shard=True) reads its columns through ColumnReader."""
    import torch.distributed as dist

    with one_process_group():
        model = _gpt2(7)
        sharded = tk.TWA(model, hf_runs["sharded"], bits=4, process_group=dist.group.WORLD, shard=True)
        whole = tk.TWA(model, hf_runs["single"], bits=4)
        assert torch.equal(sharded.center, whole.center)
        assert torch.equal(sharded.basis_codes, whole.basis_codes)


def test_a_directory_that_is_not_a_checkpoint_is_named_as_one(hf_runs, tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match=r"notes: is a directory, not a checkpoint.*model\.safetensors"):
        tk.TWA(_gpt2(7), [hf_runs["single"][0], tmp_path / "notes"])
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint"):
        columns.ColumnReader(tmp_path / "notes")


# -- wrapped models ------------------------------------------------------------------------


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_the_wrapped_model_that_wrote_the_checkpoints_is_accepted(wrap):
    inner = [_mlp(i) for i in range(3)]
    checkpoints = [wrap(m).state_dict() for m in inner]
    prefix = "_orig_mod." if wrap is torch.compile else "module."
    assert all(k.startswith(prefix) for k in checkpoints[0])
    keys = list(_mlp(0).state_dict())
    want = _mean([m.state_dict() for m in inner], keys)
    wrapped = wrap(_mlp(9))
    twa = tk.TWA(wrapped, checkpoints, bits=None)
    assert twa.module is (wrapped._orig_mod if wrap is torch.compile else wrapped.module)
    for key in keys:
        torch.testing.assert_close(twa.averaged_state_dict()[key], want[key], rtol=0, atol=1e-6)
    for soup in (tk.uniform_average(checkpoints, model=wrapped),
                 tk.greedy_soup(checkpoints, lambda s: 0.0, model=wrapped)[0]):
        assert list(soup) == keys


def test_a_model_sharded_by_fully_shard_is_refused_with_what_to_pass():
    from torch.distributed.fsdp import fully_shard

    with one_process_group():
        model = fully_shard(_mlp(0))
        with pytest.raises(tk.errors.InvalidArgumentError, match=r"sharded by FSDP2.*unsharded model"):
            tk.TWA(model, [_mlp(i).state_dict() for i in range(2)])


# -- Lightning -----------------------------------------------------------------------------


class _Classifier(L.LightningModule):
    """The usual layout: the network is the module's `model` attribute."""

    def __init__(self, lr: float = 0.05, config: object = None):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _fit(folder: Path, module: L.LightningModule, every: int, steps: int, **checkpointing) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(2 * steps, 8, generator=gen),
                                          torch.randint(0, 4, (2 * steps,), generator=gen))
    trainer = L.Trainer(max_epochs=1, enable_progress_bar=False, logger=False, accelerator="cpu",
                        enable_model_summary=False, enable_checkpointing=True, default_root_dir=str(folder),
                        callbacks=[ModelCheckpoint(dirpath=str(folder), save_top_k=-1, every_n_train_steps=every,
                                                   **checkpointing)])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lightning")
    _fit(folder, _Classifier(), every=2, steps=12, save_last=True)
    steps = sorted(folder.glob("epoch=*.ckpt"), key=lambda p: int(re.search(r"step=(\d+)", p.name).group(1)))
    assert len(steps) == 6 and (folder / "last.ckpt").exists()  # step=2 ... step=12, and the save_last copy
    # what the network's own state_dict holds at each step (Lightning names it model.<name>)
    states = [{k[len("model."):]: v for k, v in torch.load(p, weights_only=True)["state_dict"].items()}
              for p in steps]
    return folder, steps, states


def test_a_folder_of_lightning_checkpoints_in_step_order(lightning_run, caplog):
    folder, steps, _ = lightning_run
    with caplog.at_level(logging.WARNING, logger="twa_kernels.io"):
        assert io.resolve_checkpoints(folder) == steps  # step=10 after step=8; last.ckpt left out
    assert "last.ckpt" in caplog.text


def test_lightning_checkpoints_match_the_inner_network(lightning_run):
    folder, _, states = lightning_run
    inner = _Classifier().model
    keys = list(inner.state_dict())
    want = _mean(states, keys)
    twa = tk.TWA(inner, folder, bits=None)
    for key in keys:
        torch.testing.assert_close(twa.averaged_state_dict()[key], want[key], rtol=0, atol=1e-6)
    soup = tk.uniform_average(folder, model=inner)
    assert list(soup) == keys
    for key in keys:
        torch.testing.assert_close(soup[key], want[key], rtol=0, atol=1e-6)
    ema = tk.ema_average(folder, decay=0.5, model=inner)
    expected = states[0]["0.weight"].double()
    for state in states[1:]:
        expected = 0.5 * expected + 0.5 * state["0.weight"].double()
    assert list(ema) == keys
    torch.testing.assert_close(ema["0.weight"], expected.float(), rtol=0, atol=1e-6)
    greedy, _ = tk.greedy_soup(folder, lambda s: -float(s["2.bias"].norm()), model=inner)
    assert list(greedy) == keys
    # the LightningModule itself matches its own keys, and so does no model at all
    assert list(tk.uniform_average(folder, model=_Classifier())) == list(_Classifier().state_dict())
    assert all(k.startswith("model.") for k in tk.uniform_average(folder))


def test_lightning_columns_match_the_inner_network(lightning_run):
    _, steps, states = lightning_run
    inner = _Classifier().model
    names = [n for n, _ in inner.named_parameters()]
    shapes = [tuple(p.shape) for p in inner.parameters()]
    reference = torch.cat([states[3][n].reshape(-1) for n in names])
    got = columns.ColumnReader(steps[3]).columns(names, shapes, 0, reference.numel())
    assert torch.equal(got, reference)


def test_baselines_name_the_key_a_checkpoint_lacks(lightning_run):
    folder, _, _ = lightning_run
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match=r"step=2\.ckpt: missing key '3\.weight' that the model has"):
        tk.uniform_average(folder, model=other)


class _Config:
    """Hyper-parameters as an object, not plain values."""


def test_a_lightning_checkpoint_holding_objects_is_refused_with_the_fix(tmp_path):
    _fit(tmp_path, _Classifier(config=_Config()), every=2, steps=4)
    files = sorted(tmp_path.glob("*.ckpt"))
    with pytest.raises(CheckpointError, match=r"refused\. This Lightning checkpoint holds Python objects "
                                              r"\(.*_Config\).*save_hyperparameters\(\) with plain values"):
        tk.uniform_average(files, model=_Classifier().model)



class _TWAModule(L.LightningModule):
    """TWA trained by a Trainer: the module holds the TWA, whose parameters are the coefficients."""

    def __init__(self, twa: tk.TWA):
        super().__init__()
        self.twa = twa

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.twa(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.twa.parameters(), lr=0.05)


def test_a_twa_trained_by_a_trainer_resumes_from_its_checkpoint_where_it_stopped(lightning_run, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    folder, _, _ = lightning_run
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen))

    def fit(epochs: int, root: Path, resume: Path | None = None) -> _TWAModule:
        module = _TWAModule(tk.TWA(_Classifier().model, folder, bits=4))
        L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=str(root),
                  callbacks=[ModelCheckpoint(dirpath=str(root), save_last=True)]
                  ).fit(module, torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=resume)
        return module

    straight = fit(3, tmp_path / "straight")
    fit(1, tmp_path / "stopped")
    resumed = fit(3, tmp_path / "resumed", resume=tmp_path / "stopped" / "last.ckpt")
    assert not torch.equal(resumed.twa.coefficients, torch.zeros_like(resumed.twa.coefficients))
    # the coefficients and AdamW's moments came back from the checkpoint: the same 3 epochs
    torch.testing.assert_close(resumed.twa.coefficients, straight.twa.coefficients, rtol=0, atol=1e-6)


# -- the output directories of torchvision's and timm's training scripts ------------------
# Written here in their layout: torchvision's references/classification/train.py saves
# {"model", "optimizer", "lr_scheduler", "epoch", "args", "model_ema"} as model_<epoch>.pth
# and again as checkpoint.pth; timm's train.py saves {"epoch", "arch", "state_dict",
# "optimizer", "version", "args", "state_dict_ema", "metric"} as checkpoint-<epoch>.pth.tar,
# with last.pth.tar and model_best.pth.tar beside them, and with --recovery-interval the
# newest mid-epoch state as recovery-<epoch>-<batch>.pth.tar. Both save their
# argparse.Namespace.


def _script_run(folder: Path, layout: str, epochs: int = 11) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=epochs, output_dir=str(folder), lr_steps=[5, 8],
                              weights=None, amp=False)
    states = []
    for epoch in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 4, (32,))).backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        if layout == "torchvision":
            saved = {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                     "epoch": epoch, "args": args, "model_ema": ema.state_dict()}
            torch.save(saved, folder / f"model_{epoch}.pth")
            torch.save(saved, folder / "checkpoint.pth")
        else:
            saved = {"epoch": epoch, "arch": "resnet18", "state_dict": model.state_dict(),
                     "optimizer": opt.state_dict(), "version": 2, "args": args,
                     "state_dict_ema": ema.module.state_dict(), "metric": 50.0 + epoch % 3}
            torch.save(saved, folder / f"checkpoint-{epoch}.pth.tar")
            torch.save(saved, folder / "last.pth.tar")
            if epoch % 3 == 2:
                torch.save(saved, folder / "model_best.pth.tar")
            if epoch == epochs - 2:  # a mid-epoch state: not one of the run's epoch points
                mid = {k: v + 1.0 for k, v in model.state_dict().items()}
                torch.save(dict(saved, state_dict=mid), folder / f"recovery-{epoch + 1}-40.pth.tar")
    return states


def _averaged(twa: tk.TWA) -> dict:
    with pytest.warns(RuntimeWarning, match="update_bn"):  # BatchNorm statistics are not measured here
        return twa.averaged_state_dict()


@pytest.mark.parametrize("layout", ["torchvision", "timm"])
def test_a_training_scripts_output_directory_is_its_checkpoints_in_epoch_order(tmp_path, layout, caplog):
    states = _script_run(tmp_path, layout)
    epochs = sorted((p for p in tmp_path.iterdir() if re.fullmatch(r"(model_|checkpoint-)\d+\.pth(\.tar)?", p.name)),
                    key=lambda p: int(re.search(r"(\d+)", p.name).group(1)))
    assert len(epochs) == len(states)
    with caplog.at_level(logging.WARNING, logger="twa_kernels.io"):
        assert io.resolve_checkpoints(tmp_path) == epochs  # epoch 10 after 9; the copies left out
    copies = (["checkpoint.pth"] if layout == "torchvision"
              else ["last.pth.tar", "model_best.pth.tar", "recovery-10-40.pth.tar"])
    assert all(name in caplog.text for name in copies)
    # the arguments' Namespace is read as data; the weights, not the EMA's, are averaged
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    twa = tk.TWA(model, tmp_path, bits=None)
    averaged = _averaged(twa)
    for name, _ in model.named_parameters():
        torch.testing.assert_close(averaged[name], _mean(states, [name])[name], rtol=0, atol=1e-6)
    soup = tk.uniform_average(tmp_path, model=model)
    torch.testing.assert_close(soup["3.weight"], _mean(states, ["3.weight"])["3.weight"], rtol=0, atol=1e-6)
    # a copy named in a list is read like any checkpoint
    assert len(tk.uniform_average([tmp_path / copies[0], epochs[0]], model=model)) == len(states[0])
    # the EMA weights, read as the guide says
    with torch.serialization.safe_globals([argparse.Namespace]):
        emas = [torch.load(p, weights_only=True)["model_ema" if layout == "torchvision" else "state_dict_ema"]
                for p in epochs]
    ema_twa = tk.TWA(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)), emas,
                     bits=None)
    want = _mean([io.unwrap_state_dict(e) for e in emas], ["0.weight"])["0.weight"]
    torch.testing.assert_close(_averaged(ema_twa)["0.weight"], want, rtol=0, atol=1e-6)


def test_a_namespace_is_read_as_data_but_what_it_holds_still_may_not_run_code(tmp_path):
    marker = tmp_path / "ran"
    model = nn.Linear(3, 2)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1, hook=RunsCode(str(marker)))},
               tmp_path / "model_0.pth")
    for read in (io.load_state_dict, lambda path: columns.ColumnReader(path).keys()):
        with pytest.raises(CheckpointError, match=r"model_0\.pth: refused"):
            read(tmp_path / "model_0.pth")
    assert not marker.exists()
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "model_1.pth")
    assert list(io.load_state_dict(tmp_path / "model_1.pth")) == ["weight", "bias"]


def test_reading_leaves_the_callers_own_safe_globals_as_they_were(tmp_path):
    torch.save({"model": nn.Linear(3, 2).state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "model_0.pth")
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        io.load_state_dict(tmp_path / "model_0.pth")
        assert argparse.Namespace in torch.serialization.get_safe_globals()  # still the caller's allowance
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    io.load_state_dict(tmp_path / "model_0.pth")
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # the library's own ended with the read


def _perturbed_states(make_model: Callable[[], nn.Module], n: int = 3) -> list[dict]:
    """n state_dicts of fresh models, each moved by small noise through its parameters (so a
    tied embedding and head stay one), from torch's seed 0."""
    torch.manual_seed(0)
    states = []
    for _ in range(n):
        model = make_model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def _trainer_run(out: Path, checkpointing: bool = False, resume: Path | None = None) -> tuple[tk.TWA, dict]:
    """Four AdamW steps of the HF Trainer on a TWA over tiny GPT-2 fine-tunes, saved every 2
    steps (or resumed from `resume`); the TWA and the evaluation's metrics."""
    config = transformers.GPT2Config(**GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    states = _perturbed_states(lambda: transformers.GPT2LMHeadModel(config))
    twa = tk.TWA(transformers.GPT2LMHeadModel(config), states, bits=4)
    tokens = torch.randint(0, 100, (16, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    # transformers 5 names the argument activation_checkpointing, 4.x gradient_checkpointing
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    switch = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=0.05,
        **{switch: checkpointing}, remove_unused_columns=False, label_names=["labels"], report_to=[],
        save_strategy="steps", save_steps=2, logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=twa, args=args, train_dataset=data, eval_dataset=data[:8])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if checkpointing:  # the Trainer reached the model inside, which then checkpointed its blocks
        assert twa.is_activation_checkpointing
    return twa, trainer.evaluate()


def test_the_hf_trainer_turns_activation_checkpointing_on_in_the_model_inside_a_twa(tmp_path):
    plain, _ = _trainer_run(tmp_path / "plain")
    checkpointed, _ = _trainer_run(tmp_path / "checkpointed", checkpointing=True)
    assert plain.coefficients.abs().sum() > 0
    torch.testing.assert_close(checkpointed.coefficients, plain.coefficients, rtol=1e-5, atol=1e-6)


def test_a_twa_trained_by_the_hf_trainer_resumes_from_its_checkpoint_where_it_stopped(tmp_path):
    straight, metrics = _trainer_run(tmp_path / "straight")
    resumed, resumed_metrics = _trainer_run(tmp_path / "resumed", resume=tmp_path / "straight" / "checkpoint-2")
    # the Trainer saved the TWA's whole state_dict and loaded it back strictly enough
    assert torch.equal(resumed.coefficients, straight.coefficients)
    assert resumed_metrics["eval_loss"] == metrics["eval_loss"]
    assert straight.coefficients.abs().sum() > 0


def test_the_hf_trainers_label_smoothing_scores_a_twa_over_a_causal_lm_as_the_model(tmp_path):
    # the Trainer shifts the labels for label smoothing only for a model named as a causal LM:
    # under the name "TWA" each position was scored on its own input token, without a word
    config = transformers.GPT2Config(**GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    states = _perturbed_states(lambda: transformers.GPT2LMHeadModel(config))
    twa = tk.TWA(transformers.GPT2LMHeadModel(config), states, bits=4)
    plain = transformers.GPT2LMHeadModel(config)
    plain.load_state_dict(twa.averaged_state_dict())
    tokens = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=False,
                                          label_names=["labels"], report_to=[], use_cpu=True, disable_tqdm=True,
                                          per_device_eval_batch_size=8, label_smoothing_factor=0.1)
    got = transformers.Trainer(model=twa, args=args).evaluate(data)["eval_loss"]
    want = transformers.Trainer(model=plain, args=args).evaluate(data)["eval_loss"]
    assert got == pytest.approx(want, rel=1e-5)
    assert twa._get_name() == "GPT2LMHeadModel" and repr(twa).startswith("TWA(")


def test_the_hf_trainers_neftune_adds_its_noise_inside_a_twa_and_takes_it_away(tmp_path):
    config = transformers.GPT2Config(**GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    states = _perturbed_states(lambda: transformers.GPT2LMHeadModel(config))
    twa = tk.TWA(transformers.GPT2LMHeadModel(config), states, bits=4)
    assert twa.get_input_embeddings() is twa.module.get_input_embeddings()
    tokens = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          remove_unused_columns=False, label_names=["labels"], report_to=[],
                                          use_cpu=True, disable_tqdm=True, save_strategy="no", logging_strategy="no",
                                          neftune_noise_alpha=5.0)
    trainer = transformers.Trainer(model=twa, args=args, train_dataset=data)
    embeddings = twa.get_input_embeddings()
    noisy = []
    handle = embeddings.register_forward_hook(lambda module, inputs, output: noisy.append(
        hasattr(module, "neftune_noise_alpha")))
    trainer.train()
    handle.remove()
    assert noisy and all(noisy)  # every training forward went through NEFTune's embeddings
    assert not embeddings._forward_hooks and twa.coefficients.abs().sum() > 0  # its hook taken away
    with pytest.raises(tk.errors.UsageError, match="NEFTune"):
        tk.TWA(nn.Linear(4, 2), [{k: v + i for k, v in nn.Linear(4, 2).state_dict().items()} for i in range(3)],
               bits=4).get_input_embeddings()


def test_the_hf_trainer_predicts_with_a_twa_over_a_causal_lm_as_with_the_model(tmp_path):
    # the Trainer reaches cache settings through model.config, which a TWA did not give: the
    # model kept its cache on and predict() failed on the cache among the logits
    config = transformers.GPT2Config(**GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    states = _perturbed_states(lambda: transformers.GPT2LMHeadModel(config))
    twa = tk.TWA(transformers.GPT2LMHeadModel(config), states, bits=4)
    assert twa.config is twa.module.config
    tokens = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=False,
                                          label_names=["labels"], report_to=[], use_cpu=True, disable_tqdm=True,
                                          per_device_eval_batch_size=8)
    predicted = transformers.Trainer(model=twa, args=args).predict(data).predictions
    plain = transformers.GPT2LMHeadModel(config)
    plain.load_state_dict(twa.averaged_state_dict())
    with torch.no_grad():
        want = plain.eval()(tokens).logits
    torch.testing.assert_close(torch.as_tensor(predicted), want, rtol=1e-4, atol=1e-4)
    linear_states = [{k: v + i for k, v in nn.Linear(4, 2).state_dict().items()} for i in range(3)]
    with pytest.raises(AttributeError, match="no attribute 'config'"):  # as for any module without one
        tk.TWA(nn.Linear(4, 2), linear_states).config

    class DictConfig(nn.Linear):  # a config of the user's own, which the Trainer would try to set
        def __init__(self):
            super().__init__(4, 2)
            self.config = {"hidden": 4}

    own = tk.TWA(DictConfig(), linear_states)
    assert not hasattr(own, "config")
    own.config = {"mine": 1}  # an attribute of the user's, as on any module
    assert own.config == {"mine": 1}


def test_a_twa_over_a_model_without_activation_checkpointing_says_what_to_do():
    states = [{k: v + i for k, v in nn.Linear(4, 2).state_dict().items()} for i in range(3)]
    twa = tk.TWA(nn.Linear(4, 2), states, bits=None)
    assert not twa.is_activation_checkpointing
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        with pytest.raises(UsageError, match=rf"Linear\) has no {name}\(\).*torch.utils.checkpoint"):
            getattr(twa, name)()


class _OlderCheckpointingModel(nn.Module):
    """A model outside transformers with only transformers 4's name for turning activation
    checkpointing on (sentence-transformers' models, say), which records the call."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.turned_on_with: dict | None = None

    def forward(self, x, labels=None):
        logits = self.linear(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    def gradient_checkpointing_enable(self, **kwargs):
        self.turned_on_with = kwargs


def test_a_twa_has_the_models_handed_on_methods_only_where_the_model_has_them(tmp_path):
    # every TWA had all four, so the Trainer called activation_checkpointing_enable on a model
    # with only gradient_checkpointing_enable, whose fallback it skipped, and failed
    states = [{k: v + 0.1 * i for k, v in _OlderCheckpointingModel().state_dict().items()} for i in range(3)]
    twa = tk.TWA(_OlderCheckpointingModel(), states, bits=None)
    assert hasattr(twa, "gradient_checkpointing_enable")
    for name in ("activation_checkpointing_enable", "get_input_embeddings", "generate"):
        assert not hasattr(twa, name)
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    switch = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, **{switch: True},
        remove_unused_columns=False, label_names=["labels"], report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True)
    data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the Trainer's note on the older name
        transformers.Trainer(model=twa, args=args, train_dataset=data).train()
    assert twa.module.turned_on_with is not None
    assert twa.coefficients.abs().sum() > 0


def _lora_runs(tmp_path: Path, modules_to_save: list[str] | None = None, bias: str = "none"):
    """Three PEFT adapters of one tiny GPT-2 (the base), each its own random nudge of the
    trainable weights, saved with peft's save_pretrained; and a fresh model to average them."""
    import peft
    config = transformers.GPT2Config(**GPT2, num_labels=3, pad_token_id=0)
    cls = transformers.GPT2ForSequenceClassification if modules_to_save else transformers.GPT2LMHeadModel
    torch.manual_seed(0)
    base = cls(config).state_dict()
    lora = dict(r=2, target_modules=["c_attn"], lora_dropout=0.0, modules_to_save=modules_to_save, bias=bias,
                task_type="SEQ_CLS" if modules_to_save else None)

    def adapted():
        transformers.logging.set_verbosity_error()
        model = cls(config)
        model.load_state_dict(base)
        return peft.get_peft_model(model, peft.LoraConfig(**lora)).eval()

    for seed in range(3):
        torch.manual_seed(seed)
        model = adapted()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"adapter-{seed}")
    return adapted


@pytest.mark.parametrize("modules_to_save", [None, ["score"]], ids=["lora", "lora and a saved head"])
def test_a_twa_over_peft_adapter_directories_averages_the_adapters_and_keeps_the_base(tmp_path, modules_to_save):
    # adapter files hold `lora_A.weight` for the parameter `lora_A.default.weight`, and no base
    # weight: TWA named the first as missing, then the frozen base weights
    from safetensors.torch import load_file

    adapted = _lora_runs(tmp_path, modules_to_save)
    model = adapted()
    keys = {name: key for name, (key,) in io.adapter_file_keys(model).items()}  # one form for a PeftModel
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(keys) == sorted(trainable) and all(".default." not in key for key in keys.values())
    files = [load_file(tmp_path / f"adapter-{seed}" / "adapter_model.safetensors") for seed in range(3)]
    twa = tk.TWA(model, tmp_path, bits=None)  # a directory of adapter directories
    assert twa.names == trainable
    averaged = twa.averaged_state_dict()
    for name, key in keys.items():  # the uniform average to start
        torch.testing.assert_close(averaged[name], torch.stack([f[key] for f in files]).mean(0), rtol=0, atol=1e-6)
    own = dict(model.named_parameters())
    frozen = [n for n, p in own.items() if not p.requires_grad]
    assert frozen and all(torch.equal(averaged[n], own[n]) for n in frozen)  # the base, as the model holds it
    soup = tk.uniform_average(tmp_path, model=model)  # the soups read adapter files alike
    assert sorted(soup) == sorted(model.state_dict())
    for name, value in averaged.items():
        torch.testing.assert_close(soup[name], value, rtol=0, atol=1e-6)


def test_a_frozen_weight_that_only_some_adapter_checkpoints_hold_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    adapted = _lora_runs(tmp_path)
    model = adapted()
    frozen = next(n for n, p in model.named_parameters() if not p.requires_grad)
    second = tmp_path / "adapter-1" / "adapter_model.safetensors"
    save_file({**load_file(second), frozen: dict(model.named_parameters())[frozen].detach().clone()}, second)
    held = re.escape(repr(frozen))
    with pytest.raises(CheckpointError, match=rf"holds the frozen parameter {held}, which the first"):
        tk.TWA(model, tmp_path)


def test_a_model_without_peft_has_no_adapter_file_keys():
    model = _gpt2(0)
    assert io.adapter_file_keys(model) == {} and io.checkpoint_aliases(model) == io.parameter_aliases(model)


def test_a_second_adapter_of_the_model_keeps_its_values_while_the_trained_one_is_averaged(tmp_path):
    # peft saves every adapter under the same keys: the frozen adapter was pinned to the files'
    import peft

    adapted = _lora_runs(tmp_path)
    model = adapted()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))
    model.set_adapter("default")
    other = {n: p.detach().clone().normal_() for n, p in model.named_parameters() if ".other." in n}
    model.load_state_dict(other, strict=False)
    assert other and not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    averaged = tk.TWA(model, tmp_path, bits=None).averaged_state_dict()
    soup = tk.uniform_average(tmp_path, model=model)
    for name, value in other.items():
        assert torch.equal(averaged[name], value) and torch.equal(soup[name], value), name
    for p in model.parameters():
        p.requires_grad_(True)
    with pytest.raises(tk.errors.InvalidArgumentError, match="all trainable.*train one adapter at a time"):
        tk.TWA(model, tmp_path)


@pytest.mark.parametrize("which", ["tuner", "transformers model"])
def test_the_model_inside_a_peft_model_reads_the_peft_models_adapter_files(tmp_path, which):
    # the files' keys start at the PeftModel (base_model.model.): the inner models missed them
    adapted = _lora_runs(tmp_path)
    outer = adapted()
    inner = outer.base_model if which == "tuner" else outer.base_model.model
    soup = tk.uniform_average(tmp_path, model=outer)
    prefix = "base_model." if which == "tuner" else "base_model.model."
    averaged = tk.TWA(inner, tmp_path, bits=None).averaged_state_dict()
    for name, value in averaged.items():
        torch.testing.assert_close(value, soup[prefix + name], rtol=0, atol=1e-6)


def test_soups_of_adapters_name_a_trainable_weight_that_one_file_lacks(tmp_path):
    # a trained bias is saved under its own name: the model's value was averaged in for the
    # file that lacked it, where TWA refused
    from safetensors.torch import load_file, save_file

    adapted = _lora_runs(tmp_path, bias="lora_only")
    third = tmp_path / "adapter-2" / "adapter_model.safetensors"
    state = load_file(third)
    assert any(k.endswith("c_attn.base_layer.bias") for k in state)
    save_file({k: v for k, v in state.items() if not k.endswith("bias")}, third)
    with pytest.raises(CheckpointError, match=r"adapter-2.*missing key .*c_attn\.base_layer\.bias"):
        tk.uniform_average(tmp_path, model=adapted())


def test_prompt_tuning_models_average_their_whole_state_dicts_as_before():
    # their adapter files hold computed embeddings: no adapter keys, and whole state_dicts still work
    import peft

    model = peft.get_peft_model(_gpt2(0), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert io.adapter_file_keys(model) == {}
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append({k: v + 0.1 * torch.randn_like(v) if "prompt" in k else v.clone()
                       for k, v in model.state_dict().items()})
    twa = tk.TWA(model, states, bits=None)
    assert twa.names == ["prompt_encoder.default.embedding.weight"]


def test_a_model_whose_peft_config_is_not_peft_s_is_no_peft_model():
    model = nn.Linear(3, 3)
    model.peft_config = {"r": 8}  # a model of the user's own, with its own meaning for the name
    assert io.adapter_file_keys(model) == {}
    states = [{k: v + i for k, v in model.state_dict().items()} for i in range(3)]
    assert torch.equal(tk.uniform_average(states, model=model)["weight"], model.weight.detach() + 1)


def test_a_peft_model_and_whole_model_checkpoints_or_the_reverse_are_named_with_the_fix(tmp_path):
    adapted = _lora_runs(tmp_path / "adapters")
    model = adapted()
    for name in ("a", "b"):  # fine-tunes of the whole base model, without adapters
        _gpt2(0).save_pretrained(tmp_path / "whole" / name)
    with pytest.raises(CheckpointError, match="holds no LoRA weight: for a PEFT model, pass the adapter dir"):
        tk.TWA(model, tmp_path / "whole")
    with pytest.raises(CheckpointError, match="is a PEFT adapter file.*for a model without adapters, pass the model"):
        tk.TWA(_gpt2(0), tmp_path / "adapters")


def test_the_soups_name_the_fix_for_a_peft_mismatch_as_twa_does(tmp_path):
    # the soups said "was it saved from this model?" where TWA named the mismatch
    _lora_runs(tmp_path / "adapters")
    with pytest.raises(CheckpointError, match="is a PEFT adapter file.*for a model without adapters, pass the model"):
        tk.uniform_average(tmp_path / "adapters", model=_gpt2(0))


def test_adapter_files_for_a_model_with_several_adapters_none_trainable_name_the_fix(tmp_path):
    # peft saves every adapter under the same keys, so the files belong to no adapter of such a
    # model: the soups blamed the checkpoints ("was it saved from this model?")
    import peft

    adapted = _lora_runs(tmp_path / "adapters")
    model = adapted()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))
    for p in model.parameters():
        p.requires_grad_(False)  # as PeftModel.from_pretrained leaves a model loaded for inference
    with pytest.raises(CheckpointError, match=r"adapters \['default', 'other'\], none of them trainable.*set_adapter"):
        tk.uniform_average(tmp_path / "adapters", model=model)


class _Tagger(nn.Module):
    """A layer PEFT adapts, a norm, and a head with running statistics."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(6, 6), nn.LayerNorm(6)
        self.head = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


def test_the_several_adapters_fix_is_named_though_a_layer_beside_them_trains(tmp_path):
    # every parameter was asked: a trainable norm beside the frozen adapters hid the fix
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(_Tagger(), peft.LoraConfig(r=2, target_modules=["lin"]))
    model.save_pretrained(tmp_path / "a")
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["lin"]))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("base_model.model.norm."))
    with pytest.raises(CheckpointError, match=r"adapters \['default', 'other'\], none of them trainable"):
        tk.uniform_average([tmp_path / "a"], model=model)


def test_an_adapter_weight_keeps_its_file_key_where_a_buffer_shares_its_memory():
    # the buffer was matched first and took the weight's key, leaving the weight with none
    import peft

    model = peft.get_peft_model(_Tagger(), peft.LoraConfig(r=2, target_modules=["lin"]))
    inner = model.base_model.model
    inner.register_buffer("lora_start", inner.lin.lora_A["default"].weight.detach())
    keys = io.adapter_file_keys(model)
    assert keys["base_model.model.lin.lora_A.default.weight"] == ["base_model.model.lin.lora_A.weight"]
    assert "base_model.model.lora_start" not in keys


def test_a_saved_heads_running_statistics_are_read_from_the_adapter_files(tmp_path):
    # modules_to_save keeps a head's BatchNorm statistics in the adapter files: the soups now
    # average them with the head's weights, where they kept the model's own
    import peft
    from safetensors.torch import load_file

    means = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = peft.get_peft_model(_Tagger(), peft.LoraConfig(r=2, target_modules=["lin"], modules_to_save=["head"]))
        model.train()(torch.randn(8, 6) + seed)  # statistics of its own data
        model.save_pretrained(tmp_path / f"run-{seed}")
        state = load_file(tmp_path / f"run-{seed}" / "adapter_model.safetensors")
        means.append(next(v for k, v in state.items() if k.endswith("running_mean")))
    torch.manual_seed(5)
    model = peft.get_peft_model(_Tagger(), peft.LoraConfig(r=2, target_modules=["lin"], modules_to_save=["head"]))
    soup = tk.uniform_average(tmp_path, model=model)
    key = "base_model.model.head.modules_to_save.default.1.running_mean"
    torch.testing.assert_close(soup[key], (means[0] + means[1]) / 2)


def test_vera_adapters_are_averaged_with_the_projections_their_files_hold(tmp_path):
    # VeRA's files hold its random projections (buffers shared by every adapted layer): the
    # soups kept the model's own, drawn from another seed, beside the files' averaged vectors,
    # and TWA ran with them without a word
    import peft
    from safetensors.torch import load_file

    if not hasattr(peft, "VeraConfig"):
        pytest.skip(f"peft {peft.__version__} has no VeRA")

    def adapted(key: int):
        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        config = peft.VeraConfig(r=4, target_modules=["c_attn"], save_projection=True, projection_prng_key=key)
        return peft.get_peft_model(_gpt2(0), config).eval()

    for seed in range(2):
        model = adapted(key=7)
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"vera-{seed}")
    files = [load_file(tmp_path / f"vera-{seed}" / "adapter_model.safetensors") for seed in range(2)]
    projection = next(key for key in files[0] if key.endswith("vera_A"))
    model = adapted(key=0)  # other projections than the files'
    names = [name for name in model.state_dict() if ".vera_A." in name]
    assert len(names) > 1 and not torch.equal(model.state_dict()[names[0]], files[0][projection])
    soup = tk.uniform_average(tmp_path, model=model)
    for name in names:  # every name the shared projection has in the state_dict
        assert torch.equal(soup[name], files[0][projection]), name
    with pytest.warns(UserWarning, match=r"holds other values of the model's buffer .*vera_A"):
        tk.TWA(model, tmp_path, bits=None)


@pytest.mark.parametrize("load", ["none", "assign"])
def test_greedy_soup_keeps_the_base_the_model_had_before_its_score_ran_the_model(tmp_path, load):
    # the second pass read the base again from a model the score had just changed, and a
    # score that loaded with assign=True changed the very tensors the next passes read
    adapted = _lora_runs(tmp_path)
    model = adapted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def score(state):  # a score that moves the model's own frozen weights, as a careless one might
        calls.append(1)
        if load == "assign":
            model.load_state_dict(state, assign=True)
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad:
                    p.add_(1.0)
        return -len(calls)

    soup, _ = tk.greedy_soup(tmp_path, score, model=model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(torch.equal(soup[n], before[n]) for n in frozen)


def test_seq2seq_trainer_generates_with_a_twa_at_the_averaged_weights(tmp_path):
    # predict_with_generate calls model.generate on the model it trains: a TWA had none
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    states = _perturbed_states(lambda: transformers.T5ForConditionalGeneration(config))
    twa = tk.TWA(transformers.T5ForConditionalGeneration(config), states, bits=4)
    assert twa.generation_config is twa.module.generation_config
    tokens = torch.randint(2, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), predict_with_generate=True, generation_max_length=5, remove_unused_columns=False,
        label_names=["labels"], report_to=[], use_cpu=True, disable_tqdm=True, per_device_eval_batch_size=4)
    predicted = transformers.Seq2SeqTrainer(model=twa, args=args).predict(data).predictions
    plain = transformers.T5ForConditionalGeneration(config)
    plain.load_state_dict(twa.averaged_state_dict())
    want = plain.eval().generate(tokens, max_length=5, do_sample=False)
    assert torch.equal(torch.as_tensor(predicted)[:, :want.shape[1]], want)
    # a generation config given to the Trainer is the one the model generates with
    shorter = transformers.GenerationConfig(max_length=3, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), predict_with_generate=True, generation_config=shorter, remove_unused_columns=False,
        label_names=["labels"], report_to=[], use_cpu=True, disable_tqdm=True, per_device_eval_batch_size=4)
    predicted = transformers.Seq2SeqTrainer(model=twa, args=args).predict(data).predictions
    assert torch.as_tensor(predicted).shape == (4, 3) and twa.module.generation_config.max_length == 3
    with pytest.raises(tk.errors.UsageError, match=r"has no generate\(\)"):
        tk.TWA(nn.Linear(4, 2), [{k: v + i for k, v in nn.Linear(4, 2).state_dict().items()} for i in range(3)]
               ).generate()
