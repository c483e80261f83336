"""`twa fit` given bad configs, empty data, unwritable or interrupted outputs, and run the
way users run it: each problem is one named error before any work, and the outputs change
as one set or not at all."""

import datetime
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import twa_kernels as tk
from twa_kernels.errors import OutputError
from twa_kernels.fit import FitError, run_fit

from tests.digits import digits_splits, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE_ROOT = str(Path(tk.__file__).resolve().parents[1])  # this checkout's twa_kernels
TESTS = str(Path(__file__).resolve().parent)

# A user's module: a BatchNorm model, loaders, and factories that misbehave on purpose. Every
# factory leaves a marker file, so a test can tell whether any work started.
USER_MODULE = '''
import os
import sys
from pathlib import Path
import torch
from torch.utils.data import DataLoader, TensorDataset
from digits import digits_splits, make_model as _make

def _mark():
    # Beside this module unless a test names another place: never in the caller's working directory.
    Path(os.environ.get("FIT_MARKER", Path(__file__).with_name("factory-called"))).touch()

def make_model():
    _mark()
    return _make(0)

def train_loader():
    return DataLoader(digits_splits()[0], batch_size=128)

def val_loader():
    return DataLoader(digits_splits()[1], batch_size=128)

def empty_loader():
    return DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.int64)), batch_size=8)

def shuffled_noisy_loader():  # as users write them: every random draw from a global RNG
    import random
    import numpy as np
    x, y = digits_splits()[0].tensors
    noise = torch.from_numpy(np.random.standard_normal(tuple(x.shape))).float() * random.random() * 0.1
    return DataLoader(TensorDataset(x + noise, y), batch_size=64, shuffle=True)

class _StoppingLoader:  # a shuffling loader that Ctrl-C stops as pass FIT_STOP_AT_PASS begins
    def __init__(self, generator=None):
        self.loader = DataLoader(digits_splits()[0], batch_size=128, shuffle=True, generator=generator)
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        if str(self.passes) == os.environ.get("FIT_STOP_AT_PASS"):
            raise KeyboardInterrupt
        if str(self.passes) == os.environ.get("FIT_EXIT_AT_PASS"):
            sys.exit(0)
        return iter(self.loader)

def stopping_loader():
    return _StoppingLoader()

def stopping_seeded_loader():  # shuffled by a generator of its own, seeded as the loader is made
    return _StoppingLoader(torch.Generator().manual_seed(5))

def one_pass_loader():
    return iter(list(DataLoader(digits_splits()[0], batch_size=128)))

NOT_CALLABLE = 3

def int_loader():
    return 5

def inputs_only_loader():
    return [x for x, _ in DataLoader(digits_splits()[0], batch_size=128)]

def triple_loader():
    return [(x, y, y) for x, y in DataLoader(digits_splits()[0], batch_size=128)]

def labelled_dict_loader():  # a transformers collator's batches: the targets under 'labels'
    return [{"pixels": x, "labels": y} for x, y in DataLoader(digits_splits()[0], batch_size=128)]

def unlabelled_dict_loader():
    return [{"pixels": x} for x, _ in DataLoader(digits_splits()[0], batch_size=128)]

def dict_input_loader():  # (mapping, targets) pairs
    return [({"pixels": x}, y) for x, y in DataLoader(digits_splits()[0], batch_size=128)]

class _Sized(torch.nn.Sequential):  # takes a tensor, as a transformers model calls input_ids.size()
    def forward(self, x):
        return super().forward(x.reshape(x.size(0), -1))

def sized_model():
    return _Sized(*_make(0))

def logits_loss(outputs, targets):  # written for a model that returns a ModelOutput
    return torch.nn.functional.cross_entropy(outputs.logits, targets)

def float_loss(outputs, targets):
    return float(torch.nn.functional.cross_entropy(outputs, targets))

def waiting_loader():  # marks that training started, then waits for a signal
    import time
    for x, y in DataLoader(digits_splits()[0], batch_size=128):
        _mark()
        time.sleep(60)
        yield x, y

class _WaitingLater:  # waits, marked, as its third pass begins (epoch 2, after the SWA statistics)
    def __init__(self):
        self.loader, self.passes = DataLoader(digits_splits()[0], batch_size=128), 0

    def __iter__(self):
        self.passes += 1
        if self.passes == 3:
            import time
            Path(os.environ["FIT_MARKER"] + ".epoch2").touch()  # (make_model marks FIT_MARKER itself)
            time.sleep(60)
        return iter(self.loader)

def waiting_in_epoch_2_loader():
    return _WaitingLater()

def nan_loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets) * float("nan")

def per_sample_loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")

def nan_valued_loss(outputs, targets):  # NaN in value only: its gradient is cross-entropy's
    loss = torch.nn.functional.cross_entropy(outputs, targets)
    return loss + (loss * float("nan")).detach()

def no_grad_loss(outputs, targets):
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(outputs, targets)

def noting_loader():  # the user's own code writes into the output directory while the run works
    notes = Path(os.environ["FIT_NOTES"])
    notes.parent.mkdir(parents=True, exist_ok=True)
    notes.write_text("mine")
    return DataLoader(digits_splits()[0], batch_size=128)

def one_sample_val_loader():  # as DataLoader(batch_size=None) gives them: each target 0-d
    return [(x[None], y) for x, y in digits_splits()[1]]

def flat_loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets.reshape(-1))

def dict_target_val_loader():  # 350 samples in batches of 128, 128 and 94
    return [(x, {"label": y}) for x, y in DataLoader(digits_splits()[1], batch_size=128)]

def five_features_loader():  # the digits model takes 64
    return DataLoader(TensorDataset(torch.randn(64, 5), torch.arange(64) % 10), batch_size=32)

def breaking_loader():  # a data set whose second batch cannot be read
    x, y = digits_splits()[0].tensors
    yield x[:64], y[:64]
    raise ValueError("image file is truncated (3 bytes not processed)")

class _OutOfMemory(torch.nn.Module):
    def forward(self, x):
        raise torch.OutOfMemoryError("out of memory: tried to allocate 9 GiB")

def out_of_memory_model():
    model = make_model()
    model.add_module("oom", _OutOfMemory())
    model.forward = lambda x: model.oom(x)
    return model

def growing_model():  # a training job still saving: one more checkpoint appears as the run starts
    import shutil
    shutil.copy(os.environ["FIT_COPY_FROM"], os.environ["FIT_COPY_TO"])
    return make_model()

def label_loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets["label"] if isinstance(targets, dict) else targets)
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits_checkpoints):
    root = tmp_path_factory.mktemp("fitproject")
    (root / "fit_hostile_pkg.py").write_text(USER_MODULE)
    for i, state in enumerate(digits_checkpoints(epochs=3, lr=0.01)):
        tk.save_state_dict(state, root / "ckpts" / f"epoch_{i}.pt")
    return root


@pytest.fixture
def in_project(project, monkeypatch):
    """run_fit in this process, from the project directory, with a fresh marker file."""
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(TESTS)
    monkeypatch.syspath_prepend(str(project))  # and restored afterwards
    # the project's own module, not an earlier copy's: a worker that ran other files' tests in
    # between makes the module-scoped project again, in another folder
    monkeypatch.delitem(sys.modules, "fit_hostile_pkg", raising=False)
    marker = project / "factory-called"
    marker.unlink(missing_ok=True)
    monkeypatch.setenv("FIT_MARKER", str(marker))
    return project


def _config(root: Path, name: str = "config.yaml", **overrides) -> Path:
    config = dict(model="fit_hostile_pkg:make_model",
                  data=dict(train="fit_hostile_pkg:train_loader", val="fit_hostile_pkg:val_loader"),
                  checkpoints=str(root / "ckpts" / "epoch_*.pt"), bits=4, group_size=32, epochs=1,
                  optimizer=dict(name="AdamW", lr=0.02), output=str(root / "out"))
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return path


def _env(*paths: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    env.pop("TWA_KERNELS_BACKEND", None)
    return env


def _twa_module(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twa_kernels", *args], cwd=root,
                          env={**_env(PACKAGE_ROOT, TESTS, str(root)), "FIT_MARKER": str(root / "factory-called")},
                          capture_output=True, text=True, timeout=300)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _leftovers(root: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(f".{name}."))


def _consistent(out: Path) -> dict:
    """The three outputs of one run: the two weight files hold the same tensors, and the
    report names them."""
    assert sorted(os.listdir(out)) == ["averaged.pt", "averaged.safetensors", "report.json"]
    pt, st = tk.load_state_dict(out / "averaged.pt"), tk.load_state_dict(out / "averaged.safetensors")
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    report = json.loads((out / "report.json").read_text())
    assert [Path(p).name for p in report["outputs"]] == ["averaged.pt", "averaged.safetensors"]
    return report


# -- the config is checked against its schema before any work -------------------------------


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (dict(bits=4.0), ["bits must be one of [1, 2, 4, 8] or null", "got 4.0 (a float)"]),
        (dict(granularity="layer"), ["granularity must be 'model', 'tensor' or a positive integer", "'layer'"]),
        (dict(group_size=7), ["group_size must be a positive multiple of 8", "got 7"]),
        (dict(group_size=0), ["group_size must be a positive multiple of 8", "got 0"]),
        (dict(int8_gradients="yes"), ["int8_gradients must be true or false", "'yes' (a string)"]),
        (dict(optimizer="adam"), ["optimizer must be a mapping such as {name: AdamW, lr: 0.01}", "'adam'",
                                  "did you mean {name: Adam}"]),
        (dict(optimizer=dict(lr="fast")), ["optimizer.lr must be a finite positive number", "'fast'"]),
        (dict(optimizer=dict(lr=float("inf"))), ["optimizer.lr must be a finite positive number", "inf"]),
        (dict(optimizer=dict(lr=0)), ["optimizer.lr must be a finite positive number", "got 0"]),
        (dict(group_size=1099511627776), ["group_size must be a positive multiple of 8", "at most 1048576",
                                          "got 1099511627776"]),
        (dict(epochs=0), ["epochs must be a positive integer", "got 0"]),
        (dict(loss="fit_hostile_pkg:NOT_CALLABLE"), ["loss: 'fit_hostile_pkg:NOT_CALLABLE' is int, not callable"]),
        (dict(optimizer=dict(name="SGD", lr=0.1, betas=[0.9, 0.99])), ["optimizer SGD does not take", "betas"]),
        (dict(optimizer=dict(name="Adam", lr=0.1, betas=[0.9, 0.99, 0.5])), ["optimizer.betas is a list of 2 "
                                                                             "numbers", "[0.9, 0.99, 0.5]"]),
        # one beta failed inside the first step with an IndexError, a traceback
        (dict(optimizer=dict(name="AdamW", lr=0.1, betas=[0.9])), ["optimizer.betas is a list of 2 numbers",
                                                                   "give a list such as [0.9, 0.999]"]),
        (dict(optimizer=dict(name="Rprop", lr=0.1, etas=[0.5])), ["optimizer.etas is a list of 2 numbers"]),
        # ASGD divides by its alpha-scaled step: a ZeroDivisionError, a traceback
        (dict(optimizer=dict(name="ASGD", lr=0.1, alpha=-1e30)), ["optimizer ASGD does not take",
                                                                  "ZeroDivisionError"]),
        (dict(optimizer=dict(name="SparseAdam", lr=0.1)), ["optimizer SparseAdam does not take",
                                                           "does not support dense gradients"]),
        (dict(optimizer=dict(name="Adam", lr=0.1, capturable=True)), ["optimizer Adam does not take",
                                                                      "capturable"]),
        (dict(optimizer=dict(name="LBFGS", lr=0.1)), ["optimizer LBFGS needs a closure", "use AdamW or SGD"]),
        (dict(checkpoints=5), ["checkpoints must be a path, a directory, a glob or a non-empty list", "got 5"]),
        (dict(model="torch.nn:Linear"), ["model: 'torch.nn:Linear' cannot be called without arguments",
                                         "missing a required argument: 'in_features'"]),  # a traceback before
        (dict(data=dict(train="fit_hostile_pkg:train_loader", test="x:y")), ["data must be a mapping with a 'train'"]),
        # every import string is resolved before the model factory runs, and its key is named
        (dict(data=dict(train="fit_hostile_pkg:train_loader", val="fit_hostile_pkg:val_laoder")),
         ["data.val: unknown import string 'fit_hostile_pkg:val_laoder'", "has no 'val_laoder'"]),
        (dict(data=dict(train="fit_hostile_pkg:train_laoder")), ["data.train: unknown import string"]),
        (dict(optimizer=dict(lr=10**400)), ["optimizer.lr must be a finite positive number", "(an integer)"]),
        (dict(optimizer=dict(name="SGD", lr=0.1, momentum=10**400)), ["optimizer.momentum must be a finite number",
                                                                      "(an integer)"]),
        (dict(optimizer=dict(name="SGD", lr=0.1, weight_decay=10**30)), ["optimizer SGD does not take",
                                                                         "OverflowError"]),
        (dict(optimizer=dict(name="SGD", lr=0.1, momentum=float("nan"))), ["optimizer.momentum must be a finite "
                                                                           "number, got nan"]),
        (dict(optimizer=dict(name="SGD", lr=0.1, weight_decay=float("inf"))), ["optimizer.weight_decay must be a "
                                                                               "finite number, got inf"]),
        (dict(optimizer=dict(name="Adam", lr=0.1, betas=[float("nan"), 0.99])), ["optimizer.betas[0] must be a "
                                                                                 "finite number"]),
        # any non-empty text is true to torch: "false" trained the coefficients up the loss
        (dict(optimizer=dict(name="AdamW", lr=0.02, maximize="false")), ["optimizer.maximize is a yes/no setting",
                                                                         "'false'", "without quotes"]),
        (dict(optimizer=dict(name="SGD", lr=0.1, momentum=0.9, nesterov="no")), ["optimizer.nesterov is a yes/no"]),
        # read by their truth, a date and a list turned the setting on (and the date then failed the report)
        (dict(optimizer=dict(name="AdamW", lr=0.02, maximize=datetime.date(2024, 1, 1))),
         ["optimizer.maximize is a yes/no setting", "datetime.date(2024, 1, 1)"]),
        (dict(optimizer=dict(name="AdamW", lr=0.02, amsgrad=[1])), ["optimizer.amsgrad is a yes/no setting"]),
        (dict(optimizer=dict(name="AdamW", lr=0.02, foreach=1)), ["optimizer.foreach is a yes/no setting"]),
        # true was read as 1.0 (a weight decay of 1); null and a date passed the check and failed the
        # second step of training (SGD reads dampening once momentum has a buffer) or the report
        (dict(optimizer=dict(name="AdamW", lr=0.02, weight_decay=True)), ["optimizer.weight_decay is a number",
                                                                          "True (a boolean)"]),
        (dict(optimizer=dict(name="SGD", lr=0.1, momentum=0.9, dampening=None)), ["optimizer.dampening is a number",
                                                                                   "None (null)"]),
        (dict(optimizer=dict(name="SGD", lr=0.1, dampening=datetime.date(2020, 1, 1))),
         ["optimizer.dampening is a number"]),
        (dict(optimizer=dict(name="Adam", lr=0.1, betas=0.9)), ["optimizer.betas is a list of 2 numbers"]),
        (dict(optimizer=dict(name="Adam", lr=0.1, betas=[0.9, True])), ["optimizer.betas is a list of 2 numbers"]),
        (dict(output="runs/a\0b"), ["output 'runs/a\\x00b' (a string) holds a NUL byte"]),
        (dict(loss="os.path:exists"), ["loss: 'os.path:exists' cannot be called as loss(outputs, targets)"]),
        (dict(seed="0"), ["seed must be an integer", "'0' (a string)"]),
        (dict(seed=True), ["seed must be an integer"]),
        (dict(seed=2**64), ["seed must be an integer from"]),
    ],
)
def test_a_bad_config_value_is_one_line_naming_key_value_and_what_is_allowed(in_project, capsys, overrides,
                                                                             expected):
    from twa_kernels.cli import main

    code = main(["fit", str(_config(in_project, **overrides)), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("twa: error:"), lines
    for part in expected:
        assert part in lines[0], lines[0]
    assert not (in_project / "factory-called").exists()  # refused before the model (or anything) was built


def test_a_run_draws_from_global_rngs_seeded_by_its_config_and_leaves_them_as_they_were(in_project):
    # the user's loader shuffled (and drew noise) from unseeded global RNGs: the same config
    # gave another SWA baseline and another TWA in every run
    import random

    import numpy as np

    def run(seed):
        config = _config(in_project, data=dict(train="fit_hostile_pkg:shuffled_noisy_loader",
                                               val="fit_hostile_pkg:val_loader"), seed=seed)
        report = run_fit(config, progress=False)
        return report["val_loss_at_swa"], report["val_loss_after_twa"], report["settings"]["seed"]

    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first, again, other = run(None), run(0), run(7)
    assert first == again and first[2] == 0  # seed 0 by default
    assert other[:2] != first[:2] and other[2] == 7
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()


@pytest.mark.parametrize("loader", ["stopping_loader", "stopping_seeded_loader"])
def test_an_interrupted_fit_resumes_after_its_last_epoch_and_ends_as_the_uninterrupted_run(in_project, monkeypatch,
                                                                                          tmp_path, loader):
    # an interrupted run kept nothing: the next one trained every epoch again (and a loader's
    # own generator, made anew, would shuffle the resumed epochs as the first ones)
    def run(output, stop_at=None):
        monkeypatch.delenv("FIT_STOP_AT_PASS", raising=False)
        if stop_at is not None:
            monkeypatch.setenv("FIT_STOP_AT_PASS", str(stop_at))
        config = _config(in_project, data=dict(train=f"fit_hostile_pkg:{loader}",
                                               val="fit_hostile_pkg:val_loader"), epochs=3, output=str(output))
        return run_fit(config, progress=False)

    straight = run(tmp_path / "straight")
    assert straight["resumed_after_epoch"] is None
    progress = tmp_path / ".resumed.twa-progress.pt"
    with pytest.raises(KeyboardInterrupt, match="finished epochs are kept in .*run the same command again"):
        run(tmp_path / "resumed", stop_at=4)  # passes: BatchNorm statistics, epochs 1, 2 and 3
    assert progress.is_file() and not (tmp_path / "resumed").exists()
    with pytest.warns(UserWarning) as caught:
        resumed = run(tmp_path / "resumed")
    said = [str(w.message) for w in caught]
    assert any("resuming after epoch 2 of 3" in text for text in said), said
    # (the test's loader is a class of its own, whose state the progress file cannot know it holds)
    assert any("data.train ('fit_hostile_pkg:" in text and "is a _StoppingLoader" in text for text in said), said
    assert resumed["resumed_after_epoch"] == 2 and not progress.exists()
    for key in ("val_loss_at_swa", "val_loss_after_twa", "train_loss_last_10_batches"):
        assert resumed[key] == straight[key], key
    want = tk.load_state_dict(tmp_path / "straight" / "averaged.safetensors")
    got = tk.load_state_dict(tmp_path / "resumed" / "averaged.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_user_code_that_calls_sys_exit_fails_the_command_and_keeps_the_earlier_outputs(in_project, monkeypatch,
                                                                                      tmp_path, capsys):
    # sys.exit(0) in a loader ended `twa fit` with status 0, no word and no outputs: a script
    # `twa fit cfg && deploy out/` deployed the earlier run's weights
    from twa_kernels.cli import main

    data = dict(train="fit_hostile_pkg:stopping_loader", val="fit_hostile_pkg:val_loader")
    config = _config(in_project, data=data, output=str(tmp_path / "out"), epochs=2)
    assert main(["fit", str(config), "--no-progress"]) == 0
    before = _digests(tmp_path / "out")
    monkeypatch.setenv("FIT_EXIT_AT_PASS", "2")
    capsys.readouterr()
    assert main(["fit", str(_config(in_project, "other.yaml", data=data, output=str(tmp_path / "out"), epochs=3)),
                 "--no-progress"]) == 2
    assert "twa: error: code the command ran" in capsys.readouterr().err
    assert _digests(tmp_path / "out") == before


def test_ctrl_c_says_progress_is_kept_only_when_this_run_kept_some(in_project, monkeypatch, tmp_path):
    # stopped in its first epoch beside another run's progress, a run said its finished
    # epochs were kept: the file was the other run's, and a rerun started afresh
    data = dict(train="fit_hostile_pkg:stopping_loader", val="fit_hostile_pkg:val_loader")
    monkeypatch.setenv("FIT_STOP_AT_PASS", "3")  # after epoch 1: this run's progress is kept
    with pytest.raises(KeyboardInterrupt, match="finished epochs are kept in"):
        run_fit(_config(in_project, "b.yaml", data=data, output=str(tmp_path / "out"), epochs=2), progress=False)
    monkeypatch.setenv("FIT_STOP_AT_PASS", "1")  # another config, stopped in its first epoch
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_fit(_config(in_project, "a.yaml", data=data, output=str(tmp_path / "out"), epochs=3), progress=False)
    assert str(stopped.value) == ""


def test_checkpoint_listings_skip_every_file_twa_fit_keeps_beside_its_output(tmp_path):
    # twa fit's progress file and its staging, set-aside and kept folders (each holding a
    # checkpoint-like file) are never read as checkpoints of the run
    from twa_kernels import _outdir
    from twa_kernels.io import resolve_checkpoints

    torch.save({"w": torch.ones(2)}, tmp_path / "epoch_1.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / _outdir.fit_file_name("out", "progress.pt"))
    for kind in (f"stage.{_outdir.owner_tag()}.", f"old.{_outdir.owner_tag()}.", "kept."):
        folder = tmp_path / (_outdir.fit_file_name("out", kind) + "a1b2c3d4")
        folder.mkdir()
        torch.save({"w": torch.zeros(2)}, folder / "model.pt")
        (folder / "config.json").write_text("{}")
    assert resolve_checkpoints(tmp_path) == [tmp_path / "epoch_1.pt"]


def test_a_run_whose_output_sits_in_its_checkpoint_folder_resumes(in_project, monkeypatch, tmp_path):
    # the progress file beside the output was read as one more checkpoint: every rerun failed
    import shutil

    folder = tmp_path / "ckpts"
    shutil.copytree(in_project / "ckpts", folder)
    data = dict(train="fit_hostile_pkg:stopping_loader", val="fit_hostile_pkg:val_loader")
    config = _config(in_project, data=data, checkpoints=str(folder), output=str(folder / "out"), epochs=2)
    monkeypatch.setenv("FIT_STOP_AT_PASS", "3")  # in epoch 2 of 2, after epoch 1's progress
    with pytest.raises(KeyboardInterrupt):
        run_fit(config, progress=False)
    assert (folder / ".out.twa-progress.pt").is_file()
    monkeypatch.delenv("FIT_STOP_AT_PASS")
    assert run_fit(config, progress=False)["resumed_after_epoch"] == 1


def test_a_progress_file_of_another_run_or_unreadable_is_replaced_with_a_warning(in_project, monkeypatch, tmp_path):
    import pickle

    progress = tmp_path / ".out.twa-progress.pt"
    data = dict(train="fit_hostile_pkg:stopping_loader", val="fit_hostile_pkg:val_loader")
    config = _config(in_project, data=data, output=str(tmp_path / "out"))
    progress.write_bytes(pickle.dumps(print))  # what a pickle may run is refused, not run
    with pytest.warns(UserWarning, match="cannot resume from .* starts afresh"):
        assert run_fit(config, progress=False)["resumed_after_epoch"] is None
    assert not progress.exists()
    monkeypatch.setenv("FIT_STOP_AT_PASS", "3")  # in epoch 2 of 2, after epoch 1's progress
    with pytest.raises(KeyboardInterrupt):
        run_fit(_config(in_project, "other.yaml", data=data, output=str(tmp_path / "out"), epochs=2), progress=False)
    assert progress.is_file()
    monkeypatch.delenv("FIT_STOP_AT_PASS")
    with pytest.warns(UserWarning, match="progress of a run with other settings"):
        assert run_fit(config, progress=False)["resumed_after_epoch"] is None
    assert not progress.exists()


def test_progress_of_the_same_config_with_other_code_is_not_taken_up(in_project, monkeypatch, tmp_path):
    # a loader fixed between two runs resumed the first run's epochs under the new code
    data = dict(train="fit_hostile_pkg:stopping_loader", val="fit_hostile_pkg:val_loader")
    config = _config(in_project, data=data, output=str(tmp_path / "out"), epochs=2)
    monkeypatch.setenv("FIT_STOP_AT_PASS", "3")  # in epoch 2 of 2, after epoch 1's progress
    with pytest.raises(KeyboardInterrupt):
        run_fit(config, progress=False)
    monkeypatch.delenv("FIT_STOP_AT_PASS")
    module = in_project / "fit_hostile_pkg.py"
    source = module.read_text()
    module.write_text(source + "\n# the loaders' code changed\n")
    try:
        with pytest.warns(UserWarning, match="progress of a run with other code in fit_hostile_pkg; this run starts "
                                             "afresh"):
            assert run_fit(config, progress=False)["resumed_after_epoch"] is None
    finally:
        module.write_text(source)


def test_the_warning_for_another_runs_progress_says_what_differs():
    # a resume under another world size said "other settings or checkpoints"
    from twa_kernels._fit_progress import _what_differs, fingerprint

    base = fingerprint({"epochs": 2}, [], 2, "1.0")
    assert _what_differs(base, fingerprint({"epochs": 2}, [], 4, "1.0")) == \
        "another number of processes (2 then, 4 now)"
    assert _what_differs(base, fingerprint({"epochs": 3}, [], 2, "1.1")) == \
        "other settings, another version of twa-kernels (1.0)"
    assert _what_differs("not json", base) == "other settings or checkpoints"
    # another backend or thread count sums in another order: a resume would end elsewhere
    cpp = fingerprint({"epochs": 2}, [], 2, "1.0", "cpp (avx512, int8 avx512-vnni), 2 threads")
    assert _what_differs(cpp, fingerprint({"epochs": 2}, [], 2, "1.0", "reference")) == \
        "other kernels (cpp (avx512, int8 avx512-vnni), 2 threads then, reference now)"


def test_the_kernels_a_fit_runs_on_are_named_with_their_setting_and_thread_count(monkeypatch):
    from twa_kernels._ops import kernels_in_use

    monkeypatch.delenv("TWA_KERNELS_CPU_ISA", raising=False)
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "reference")
    assert kernels_in_use(torch.device("cpu")) == "reference"
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "cpp")
    monkeypatch.setenv("TWA_KERNELS_CPU_ISA", "avx2")  # the paths taken, not the setting: on any CPU
    assert kernels_in_use(torch.device("cpu")) == f"cpp (avx2, int8 avx2), {torch.get_num_threads()} threads"
    monkeypatch.delenv("TWA_KERNELS_CPU_ISA")
    assert kernels_in_use(torch.device("cpu")).startswith(f"cpp ({torch.ops.twa_kernels_cpu.isa()}, int8 ")


@pytest.mark.parametrize("edit", ["coefficients", "rng", "epochs_done", "optimizer", "loaders", "damaged",
                                  # edited by hand: raw errors at every rerun, or a resume no run can have left
                                  "exp_avg_shape", "exp_avg_sq_nan", "lr", "lr_text", "epochs_float", "epochs_bool",
                                  "losses_2d", "val_loss_tensor"])
def test_a_progress_file_that_does_not_fit_the_run_starts_it_afresh_as_it_was(in_project, monkeypatch, tmp_path,
                                                                              edit):
    # read whole, but failing as the run took it up: every rerun crashed with torch's error (and
    # what was set before the failure, the train loader's generator, is put back)
    data = dict(train="fit_hostile_pkg:stopping_seeded_loader", val="fit_hostile_pkg:val_loader")
    config = _config(in_project, data=data, output=str(tmp_path / "out"), epochs=2)
    straight = run_fit(_config(in_project, "straight.yaml", data=data, output=str(tmp_path / "straight"), epochs=2),
                       progress=False)
    monkeypatch.setenv("FIT_STOP_AT_PASS", "3")
    with pytest.raises(KeyboardInterrupt):
        run_fit(config, progress=False)
    monkeypatch.delenv("FIT_STOP_AT_PASS")
    progress = tmp_path / ".out.twa-progress.pt"
    state = torch.load(progress, weights_only=True)
    if edit == "coefficients":
        state["coefficients"] = state["coefficients"][:, :1]
    elif edit == "rng":
        del state["rng"]["python"]
    elif edit == "epochs_done":
        state["epochs_done"] = 7
    elif edit == "loaders":
        state["loaders"][1] = [torch.zeros(3)]  # the val loader has no generator to take it
    elif edit == "optimizer":
        state["optimizer"]["param_groups"].append(state["optimizer"]["param_groups"][0])
    elif edit in ("exp_avg_shape", "exp_avg_sq_nan"):
        moments = state["optimizer"]["state"][0]
        if edit == "exp_avg_shape":
            moments["exp_avg"] = torch.zeros(7)
        else:
            moments["exp_avg_sq"][0, 0] = float("nan")
    elif edit in ("lr", "lr_text"):
        state["optimizer"]["param_groups"][0]["lr"] = 1e30 if edit == "lr" else "x"
    elif edit in ("epochs_float", "epochs_bool"):
        state["epochs_done"] = 1.0 if edit == "epochs_float" else True
    elif edit == "losses_2d":
        state["losses"] = state["losses"].reshape(1, -1)
    elif edit == "val_loss_tensor":
        state["val_loss_at_swa"] = torch.tensor(state["val_loss_at_swa"] or 1.0)
    if edit == "damaged":  # a flipped bit in the coefficients' data: a file torch reads, and a wrong point
        raw = bytearray(progress.read_bytes())
        raw[raw.index(state["coefficients"].flatten()[:2].numpy().tobytes())] ^= 1
        progress.write_bytes(raw)
    else:
        torch.save(state, progress)
    with pytest.warns(UserWarning, match="cannot resume from"):
        report = run_fit(config, progress=False)
    assert report["resumed_after_epoch"] is None and not progress.exists()
    assert report["val_loss_after_twa"] == straight["val_loss_after_twa"]  # trained from the start, untouched


def test_a_run_refused_after_an_epoch_leaves_no_progress_to_resume(in_project, tmp_path):
    # a loader used up by its first pass failed epoch 2, and the rerun took up epoch 1's
    # progress, trained epoch 2 on a fresh iterator and wrote what no whole run can
    config = _config(in_project, data=dict(train="fit_hostile_pkg:one_pass_loader"), epochs=2,
                     output=str(tmp_path / "out"))
    for _ in range(2):
        with pytest.raises(FitError, match="gave no batches to train on in epoch 2"):
            run_fit(config, progress=False)
        assert not (tmp_path / ".out.twa-progress.pt").exists()
    # a run refused before training leaves the progress an earlier run left, for the run after
    progress = tmp_path / ".out.twa-progress.pt"
    progress.write_bytes(b"an earlier run's")
    with pytest.raises(FitError, match="returned int"):
        run_fit(_config(in_project, model="fit_hostile_pkg:int_loader",
                        data=dict(train="fit_hostile_pkg:train_loader"), epochs=2, output=str(tmp_path / "out")),
                progress=False)
    assert progress.read_bytes() == b"an earlier run's"


def test_loaders_whose_order_the_progress_may_not_hold_are_named():
    from torch.utils.data import DataLoader, IterableDataset, Sampler, TensorDataset

    from twa_kernels import _fit_progress

    data = TensorDataset(torch.zeros(8, 2), torch.zeros(8))

    class OwnSampler(Sampler):
        def __init__(self):
            self.rng = torch.Generator()  # an attribute the progress file does not look for

        def __iter__(self):
            return iter(torch.randperm(8, generator=self.rng).tolist())

        def __len__(self):
            return 8

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    class Augmented(TensorDataset):
        def __init__(self):
            super().__init__(torch.zeros(8, 2), torch.zeros(8))
            self.rng = torch.Generator()

    held = [DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator()), DataLoader(data), [(1, 2)],
            DataLoader(torch.utils.data.Subset(data, [0, 1, 2]), shuffle=True, num_workers=2)]
    assert [_fit_progress.unheld_order(loader) for loader in held] == [None] * 4
    unheld = {"sampler": DataLoader(data, sampler=OwnSampler()), "workers": DataLoader(
        data, num_workers=1, persistent_workers=True), "stream": DataLoader(Stream()), "own": OwnSampler(),
              "batches": DataLoader(data, batch_sampler=torch.utils.data.BatchSampler(OwnSampler(), 4, False)),
              "dataset": DataLoader(Augmented())}
    reasons = {key: _fit_progress.unheld_order(loader) for key, loader in unheld.items()}
    assert "with a OwnSampler" in reasons["sampler"] and "persistent workers" in reasons["workers"]
    assert "IterableDataset" in reasons["stream"] and reasons["own"].startswith("a OwnSampler")
    assert "with a OwnSampler" in reasons["batches"] and "Augmented that holds a random generator" in reasons["dataset"]


def test_the_progress_fingerprint_sees_the_files_inside_a_checkpoint_directory_the_world_and_the_version(tmp_path):
    # a shard rewritten in a save_pretrained directory left the directory's own size and time
    from twa_kernels import _fit_progress

    folder = tmp_path / "checkpoint-10"
    tk.save_state_dict({"w": torch.zeros(3)}, folder / "model.safetensors")
    stamp = os.stat(folder).st_mtime_ns
    first = _fit_progress.fingerprint({"lr": 1}, [folder], 1, "0.1.0")
    tk.save_state_dict({"w": torch.ones(4)}, folder / "model.safetensors")
    os.utime(folder, ns=(stamp, stamp))
    assert _fit_progress.fingerprint({"lr": 1}, [folder], 1, "0.1.0") != first
    again = _fit_progress.fingerprint({"lr": 1}, [folder], 1, "0.1.0")
    assert again != _fit_progress.fingerprint({"lr": 1}, [folder], 2, "0.1.0")  # another number of processes
    assert again != _fit_progress.fingerprint({"lr": 1}, [folder], 1, "0.2.0")


def test_a_bad_config_value_exits_2_from_the_command_line(project):
    result = _twa_module(project, "fit", str(_config(project, group_size=7)), "--no-progress")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("twa: error:") and "group_size must be a positive multiple of 8" in result.stderr


@pytest.mark.parametrize("optimizer", [dict(name="Muon", lr=0.02), dict(name="Adafactor", lr=0.01),
                                       dict(name="SGD", lr=0.1, momentum=0.9, nesterov=True)])
def test_every_optimizer_that_can_step_the_coefficients_is_accepted(optimizer):
    # the coefficients are a [k, blocks] matrix: Muon, which steps matrices only, trains them
    from twa_kernels._fit_config import check_config

    config = check_config(dict(model="m:f", data=dict(train="m:g"), checkpoints="c", optimizer=optimizer), "cfg")
    assert config.optimizer == optimizer["name"]


@pytest.mark.parametrize("line,shown", [("1: x", "1 (an integer)"), ("null: x", "None (null)"),
                                        ("true: x", "True (a boolean)")])
def test_a_config_key_that_is_not_a_name_is_one_line_naming_it(in_project, capsys, line, shown):
    from twa_kernels.cli import main

    path = _config(in_project, name="odd-key.yaml")
    path.write_text(path.read_text() + line + "\nsurplus: y\n")
    assert main(["fit", str(path), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"the key {shown} is not a name; the keys are" in lines[0], lines


@pytest.mark.parametrize("key", ["checkpoints", "optimizer", "distributed"])
def test_a_value_built_from_nested_yaml_aliases_is_shown_cut_short(tmp_path, key):
    from twa_kernels._fit_config import load_config

    # five levels of ten aliases: 100,000 strings, whose whole repr would be 1.4 MB
    items = [f"  - &a0 [{', '.join(['xxxxxxxxxx'] * 10)}]"]
    items += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 5)]
    value = "\n".join(items)
    settings = dict(checkpoints="checkpoints:\n" + value, distributed="distributed:\n mode:\n" + value,
                    optimizer="optimizer:\n name: SGD\n lr: 0.1\n bomb:\n" + value)
    path = tmp_path / "aliases.yaml"
    text = "model: m:f\ndata: {train: m:t}\n" + ("" if key == "checkpoints" else "checkpoints: c/\n")
    path.write_text(text + settings[key] + "\n")
    with pytest.raises(FitError) as caught:
        load_config(path)
    message = str(caught.value)
    assert key in message and "..." in message and len(message) < 1000, message[:2000]


def test_optimizer_arguments_of_nested_yaml_aliases_are_refused_before_they_are_walked(tmp_path):
    # nine levels of ten aliases stand for 10^9 strings: converting the optimizer's arguments
    # walked them all (minutes, and memory that grew with it)
    from twa_kernels._fit_config import load_config

    items = [f"  a0: &a0 [{', '.join(['x'] * 10)}]"]
    items += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("model: m:f\ndata: {train: m:t}\ncheckpoints: c/\noptimizer:\n  name: SGD\n  lr: 0.1\n"
                    + "\n".join(items) + "\n")
    with pytest.raises(FitError, match=r"optimizer.a1 must be a number, true/false, a name or a list of up to 16 "
                                       r"numbers, got \[\['x'"):
        load_config(path)


def test_distributed_must_be_a_mapping_or_left_empty():
    from twa_kernels._fit_config import check_config

    base = dict(model="m:f", data=dict(train="m:t"), checkpoints="c")
    assert check_config(dict(base, distributed=None), "cfg").distributed_mode == "replicated"  # `distributed:` alone
    assert check_config(dict(base, distributed={}), "cfg").distributed_mode == "replicated"
    for value, shown in ((False, "False (a boolean)"), ([], "[] (a list)"), ("sharded", "'sharded' (a string)")):
        with pytest.raises(FitError, match=rf"distributed must be \{{mode: replicated\}} or \{{mode: sharded\}}, got "
                                           rf"{re.escape(shown)}; write one of them"):
            check_config(dict(base, distributed=value), "cfg")


def test_the_default_optimizer_has_no_weight_decay():
    # AdamW's own weight_decay (0.01) pulled the coefficients towards the center; the demo
    # and the Lightning callback use none
    from twa_kernels._fit_config import check_config

    config = check_config(dict(model="m:f", data=dict(train="m:t"), checkpoints="c"), "config.yaml")
    assert config.optimizer == "AdamW" and config.optimizer_args == {"lr": 1e-2, "weight_decay": 0.0}


def test_a_leading_tilde_in_checkpoints_is_the_home_directory_as_in_output(monkeypatch, tmp_path):
    # `output: ~/runs` was the home directory, `checkpoints: ~/runs/*.pt` a glob matching nothing
    from twa_kernels._fit_config import check_config

    monkeypatch.setenv("HOME", str(tmp_path))
    base = dict(model="m:f", data=dict(train="m:t"))
    assert check_config(dict(base, checkpoints="~/runs/*.pt"), "cfg").checkpoints == f"{tmp_path}/runs/*.pt"
    listed = check_config(dict(base, checkpoints=["~/a.pt", "b.pt"]), "cfg").checkpoints
    assert listed == [f"{tmp_path}/a.pt", "b.pt"]


def test_yaml_numbers_without_a_dot_are_numbers_for_the_optimizer():
    from twa_kernels._fit_config import check_config

    config = check_config(dict(model="m:f", data=dict(train="m:t"), checkpoints="c",
                               optimizer=dict(name="AdamW", lr="1e-3", weight_decay="1e-4")), "config.yaml")
    assert config.optimizer == "AdamW" and config.optimizer_args == {"lr": 1e-3, "weight_decay": 1e-4}
    # inside a list too: betas: [9e-1, 0.999] failed on "'<=' not supported between float and str"
    config = check_config(yaml.safe_load("{model: 'm:f', data: {train: 'm:t'}, checkpoints: c, "
                                         "optimizer: {name: Adam, lr: 1e-3, betas: [9e-1, 0.999]}}"), "config.yaml")
    assert config.optimizer_args == {"lr": 1e-3, "betas": [0.9, 0.999]}


def test_a_config_that_is_not_utf8_text_is_refused_naming_the_file(in_project, capsys):
    from twa_kernels.cli import main

    path = in_project / "binary.yaml"
    path.write_bytes(b"model: x:y\n\xff\xfe\x00\x80 binary")
    with pytest.raises(FitError, match=r"binary\.yaml: not a UTF-8 text file"):
        run_fit(path, progress=False)
    assert main(["fit", str(path), "--no-progress"]) == 2
    assert "binary.yaml: not a UTF-8 text file" in capsys.readouterr().err


def test_an_output_path_the_file_system_cannot_encode_is_named():
    from twa_kernels._fit_config import check_config

    config = dict(model="m:f", data=dict(train="m:g"), checkpoints="c", output="runs/\ud800")
    with pytest.raises(FitError, match="output 'runs/\\\\ud800' .*text the file system cannot encode"):
        check_config(config, "cfg")


def test_a_config_file_too_large_to_be_one_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from twa_kernels import _fit_config

    path = tmp_path / "epoch_3.pt"  # a checkpoint given where the config belongs
    path.write_bytes(b"PK\x03\x04" + bytes(4096))
    monkeypatch.setattr(_fit_config, "_MAX_STREAMED_CONFIG", 1024)
    monkeypatch.setattr(Path, "read_text", lambda *args, **kwargs: pytest.fail("the file was read"))
    with pytest.raises(FitError, match=r"epoch_3\.pt: a file of 0 MiB, which is no config \(at most 0 MiB"):
        _fit_config.load_config(path)


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000],
                         ids=["lists", "mappings"])
def test_a_config_nested_too_deeply_is_refused_naming_the_file(tmp_path, value):
    from twa_kernels._fit_config import load_config

    path = tmp_path / "deep.yaml"
    path.write_text(f"model: m:f\ndata: {{train: m:t}}\ncheckpoints: c/\noutput: {value}\n")
    with pytest.raises(FitError, match=r"deep\.yaml: not a valid config: its YAML is nested too deeply"):
        load_config(path)


def test_a_config_given_as_a_pipe_is_read_once(tmp_path):
    # `twa fit <(envsubst < base.yaml)` passes /dev/fd/63, a pipe, not a regular file
    from twa_kernels._fit_config import load_config

    pipe = tmp_path / "config.pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_text, args=("model: m:f\ndata: {train: m:t}\ncheckpoints: c/\n",),
                              daemon=True)
    writer.start()
    try:
        config = load_config(pipe)
    finally:
        if writer.is_alive():  # not read: open the reading end, so the writer's open() returns
            os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(10)
    assert (config.model, config.data, config.checkpoints) == ("m:f", {"train": "m:t"}, "c/")


def test_a_config_path_that_is_no_file_says_what_it_is(tmp_path, monkeypatch):
    from twa_kernels._fit_config import load_config

    monkeypatch.chdir(tmp_path)  # a socket's path must be short
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind("s")
        with pytest.raises(FitError, match=r"^s: not a regular file \(a socket\), so not a config file; give"):
            load_config("s")
    finally:
        server.close()
    with pytest.raises(FitError, match=r"is a directory, not a config file"):
        load_config(tmp_path)
    with pytest.raises(FitError, match=r"missing\.yaml: no such config file"):
        load_config(tmp_path / "missing.yaml")
    for name in ("bad\0name.yaml", "bad\ud800.yaml"):  # os.stat raises ValueError, UnicodeEncodeError
        with pytest.raises(FitError, match=r"not a path a config file can have"):
            load_config(name)


@pytest.mark.parametrize("targets, samples", [
    (torch.zeros(5), 5),
    (torch.tensor(2), 1),  # one sample at a time, as batch_size=None gives
    ({"label": torch.zeros(6), "weight": torch.ones(6)}, 6),  # not its 2 keys
    ([torch.zeros(5), torch.tensor(1), torch.zeros(2)], 3),  # one tensor per sample, of varied shapes
    ([torch.zeros(3), torch.zeros(5), torch.zeros(2), torch.zeros(7)], 4),
    ([torch.tensor(0), torch.tensor(1), torch.tensor(2)], 3),
    ((torch.zeros(7), torch.zeros(7, 3)), 7),  # one targets tensor per task
    (((torch.zeros(8), torch.zeros(8)), torch.zeros(8)), 8),
    ((torch.zeros(8), ["id"] * 8), 8),
    ((torch.tensor(1), torch.tensor(2)), 1),  # one sample, two tasks
    ([{"label": torch.tensor(0)}, {"label": torch.tensor(1)}, {"label": torch.tensor(2)}], 3),  # one per sample
    (["a", "b"], 4),  # no tensor: counted on the inputs
])
def test_a_validation_batch_is_weighted_by_the_samples_it_holds(targets, samples):
    from twa_kernels.fit import _samples

    assert _samples(torch.zeros(4, 2), targets, loader=None) == samples


# -- data that is not an iterable of (inputs, targets) batches -----------------------------


@pytest.mark.parametrize(
    "loader,message",
    [
        ("int_loader", r"returned 5 \(an integer\), which is not iterable"),
        ("inputs_only_loader", r"gave a batch that is a Tensor; each batch must be an \(inputs, targets\) pair"),
        ("triple_loader", r"gave a batch that is a tuple of length 3; each batch must be an \(inputs, targets\) pair"),
        ("labelled_dict_loader", r"gave a batch that is a dict; .* give \(the mapping without 'labels', "
                                 r"batch\['labels'\]\)"),
        ("unlabelled_dict_loader", r"gave a batch that is a dict; .* \(\['pixels'\]\) holds no 'labels'"),
    ],
)
def test_data_that_is_not_input_target_batches_is_named(in_project, loader, message):
    config = _config(in_project, data=dict(train=f"fit_hostile_pkg:{loader}"), output=str(in_project / "pairs-out"))
    with pytest.raises(FitError, match=rf"data.train \('fit_hostile_pkg:{loader}'\) {message}"):
        run_fit(config, progress=False)
    assert not (in_project / "pairs-out").exists()


# -- a diverged run writes nothing ----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(optimizer=dict(name="SGD", lr=1e30)), "training diverged: the coefficients hold NaN or Inf"),
        (dict(loss="fit_hostile_pkg:nan_loss"), "training diverged: the coefficients hold NaN or Inf"),
        (dict(loss="fit_hostile_pkg:nan_valued_loss"), "the report's val_loss_at_swa is nan, not a finite number"),
    ],
)
def test_a_run_that_diverges_is_a_fit_error_and_writes_nothing(in_project, overrides, message):
    config = _config(in_project, output=str(in_project / "nan-out"), **overrides)
    with pytest.raises(FitError, match=rf"{message}.*nothing was written"):
        run_fit(config, progress=False)
    assert not (in_project / "nan-out").exists() and _leftovers(in_project, "nan-out") == []


def test_a_loss_class_is_made_with_its_defaults_and_trains_as_its_function(in_project):
    reports = [run_fit(_config(in_project, output=str(in_project / f"loss-{i}"), loss=loss), progress=False)
               for i, loss in enumerate(("torch.nn.functional:cross_entropy", "torch.nn:CrossEntropyLoss"))]
    assert reports[0]["train_loss_last_10_batches"] == pytest.approx(reports[1]["train_loss_last_10_batches"], rel=1e-6)


def test_a_loss_that_does_not_require_grad_is_named_and_writes_nothing(in_project):
    config = _config(in_project, output=str(in_project / "no-grad-out"), loss="fit_hostile_pkg:no_grad_loss")
    with pytest.raises(FitError, match=r"loss: 'fit_hostile_pkg:no_grad_loss' returned a value that does not "
                                       r"require grad.*torch\.no_grad\(\)"):
        run_fit(config, progress=False)
    assert not (in_project / "no-grad-out").exists() and _leftovers(in_project, "no-grad-out") == []


@pytest.mark.parametrize("loader", ["one_sample_val_loader", "dict_target_val_loader"])
def test_the_validation_loss_is_the_mean_over_samples_whatever_the_batches_hold(in_project, loader):
    # 0-d targets (batch_size=None) have no len(); a dict of targets has the len() of its keys
    loss = "fit_hostile_pkg:flat_loss" if loader == "one_sample_val_loader" else "fit_hostile_pkg:label_loss"
    reports = [run_fit(_config(in_project, output=str(in_project / f"{loader}-{val}"), loss=loss,
                               data=dict(train="fit_hostile_pkg:train_loader", val=f"fit_hostile_pkg:{val}")),
                       progress=False) for val in ("val_loader", loader)]
    for key in ("val_loss_at_swa", "val_loss_after_twa"):
        assert reports[1][key] == pytest.approx(reports[0][key], rel=1e-5), key


@pytest.mark.parametrize("overrides,message", [
    # AttributeError and KeyError came as tracebacks: a transformers model given a mapping, a
    # loss written for a ModelOutput given a tensor, a float that cut the gradient
    (dict(model="fit_hostile_pkg:sized_model", data=dict(train="fit_hostile_pkg:dict_input_loader")),
     r"model: 'fit_hostile_pkg:sized_model' failed on a batch of data.train .*AttributeError: .*reshape.* a "
     r"transformers model takes it through a subclass whose forward\(x\) returns super\(\).forward\(\*\*x\).logits"),
    (dict(data=dict(train="fit_hostile_pkg:dict_input_loader")),
     r"model: 'fit_hostile_pkg:make_model' failed on a batch of data.train"),
    (dict(loss="fit_hostile_pkg:logits_loss"),
     r"loss: 'fit_hostile_pkg:logits_loss' failed on the model's outputs \(128, 10\) .*AttributeError.* the model "
     r"returns a tensor \(128, 10\), which has no such attribute: take the outputs as they are"),
    (dict(loss="fit_hostile_pkg:float_loss"),
     r"loss: 'fit_hostile_pkg:float_loss' returned a float, which carries no gradient"),
])
def test_a_model_or_loss_that_fails_as_users_write_them_is_one_error(in_project, capsys, overrides, message):
    from twa_kernels.cli import main

    config = _config(in_project, output=str(in_project / "user-code-out"), **overrides)
    with pytest.raises(FitError, match=message):
        run_fit(config, progress=False)
    assert main(["fit", str(config), "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (in_project / "user-code-out").exists()


def test_a_loss_that_is_not_one_number_is_named_and_writes_nothing(in_project):
    config = _config(in_project, output=str(in_project / "per-sample-out"), loss="fit_hostile_pkg:per_sample_loss")
    with pytest.raises(FitError, match=r"returned \(128,\), not one number"):
        run_fit(config, progress=False)
    assert not (in_project / "per-sample-out").exists()


def test_a_key_given_twice_in_the_config_is_refused_naming_it(in_project):
    path = _config(in_project, name="twice.yaml")
    path.write_text(path.read_text() + "epochs: 2\n")
    with pytest.raises(FitError, match="the key 'epochs' appears twice"):
        run_fit(path, progress=False)


@pytest.mark.parametrize("written", ["epochs: 010", "epochs: 0b11", "seed: 1:30", "group_size: 0x20"])
def test_integers_not_written_in_decimal_are_refused_not_read_in_another_base(in_project, written):
    # YAML 1.1 read epochs: 010 as 8 and seed: 1:30 as 90, and the run went on with them
    from twa_kernels._fit_config import load_config

    key = written.split(":")[0]
    path = _config(in_project, name="ints.yaml", **{key: None})
    path.write_text(path.read_text() + written + "\n")
    with pytest.raises(FitError, match=rf"{key} must be"):
        load_config(path)
    path.write_text(path.read_text().replace(written, f"{key}: 1_6"))  # decimal, with YAML's digit separator
    assert getattr(load_config(path), key) == 16



@pytest.mark.parametrize("lr", ["0:00.5", "010", "0x10"])
def test_an_optimizer_number_not_written_in_decimal_is_refused(in_project, lr):
    # lr: 0:00.5 was read as 0.5 (base 60) and lr: 010 as 10.0, silently
    from twa_kernels._fit_config import load_config

    path = _config(in_project, name="lr.yaml", optimizer=None)
    base = path.read_text()
    path.write_text(base + f"optimizer:\n  name: AdamW\n  lr: {lr}\n")
    with pytest.raises(FitError, match="lr"):
        load_config(path)
    path.write_text(base + "optimizer:\n  name: AdamW\n  lr: 1e-3\n")
    assert load_config(path).optimizer_args["lr"] == 1e-3


# -- empty data ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,message",
    [
        (dict(train="fit_hostile_pkg:empty_loader", val="fit_hostile_pkg:val_loader"), "data.train"),
        (dict(train="fit_hostile_pkg:train_loader", val="fit_hostile_pkg:empty_loader"), "data.val"),
    ],
)
def test_an_empty_loader_is_refused_by_name_before_any_training(in_project, data, message):
    with pytest.raises(FitError, match=rf"{message} \('fit_hostile_pkg:empty_loader'\) gave no batches"):
        run_fit(_config(in_project, data=data, output=str(in_project / "empty-out")), progress=False)
    assert not (in_project / "empty-out").exists()


@pytest.mark.parametrize("epochs,when", [(2, "to train on in epoch 2"), (1, "to recompute the BatchNorm statistics on")])
def test_a_loader_used_up_by_one_pass_is_refused_not_a_reset_batchnorm(in_project, epochs, when):
    config = _config(in_project, data=dict(train="fit_hostile_pkg:one_pass_loader"), epochs=epochs,
                     output=str(in_project / "once-out"))
    with pytest.raises(FitError, match=f"data.train .* gave no batches {when}"):
        run_fit(config, progress=False)
    assert not (in_project / "once-out").exists()


def test_the_cli_refuses_an_empty_training_loader_with_one_line(project):
    config = _config(project, data=dict(train="fit_hostile_pkg:empty_loader"), output=str(project / "cli-empty"))
    result = _twa_module(project, "fit", str(config), "--no-progress")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("twa: error:") and "data.train" in result.stderr
    assert not (project / "cli-empty").exists()


# -- the SWA baseline is measured like TWA ----------------------------------------------------


def test_val_loss_at_swa_is_the_uniform_average_with_batchnorm_recomputed(in_project):
    import torch.nn.functional as F

    from fit_hostile_pkg import train_loader, val_loader

    report = run_fit(_config(in_project, output=str(in_project / "swa-out")), progress=False)
    model = make_model(0)
    model.load_state_dict(tk.uniform_average(str(in_project / "ckpts" / "epoch_*.pt")))
    torch.optim.swa_utils.update_bn(train_loader(), model)  # torch's own, independently
    model.eval()
    with torch.no_grad():
        total = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in val_loader())
    expected = total / len(digits_splits()[1])
    assert abs(report["val_loss_at_swa"] - expected) < 1e-6, (report["val_loss_at_swa"], expected)
    # the model's fresh BatchNorm statistics would give another number altogether
    fresh = make_model(0)
    fresh.load_state_dict({k: v for k, v in tk.uniform_average(str(in_project / "ckpts" / "epoch_*.pt")).items()
                           if "running" not in k and "num_batches" not in k}, strict=False)
    fresh.eval()
    with torch.no_grad():
        stale = sum(float(F.cross_entropy(fresh(x), y)) * len(y) for x, y in val_loader()) / len(digits_splits()[1])
    assert abs(stale - expected) > 1e-3


@pytest.mark.parametrize("key", ["train", "val"])
def test_inputs_the_model_cannot_take_are_one_line_naming_model_and_data(in_project, capsys, key):
    from twa_kernels.cli import main

    data = dict(train="fit_hostile_pkg:train_loader", val="fit_hostile_pkg:val_loader")
    data[key] = "fit_hostile_pkg:five_features_loader"
    output = in_project / f"mismatch-{key}"
    code = main(["fit", str(_config(in_project, data=data, output=str(output))), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert (f"model: 'fit_hostile_pkg:make_model' failed on a batch of data.{key} "
            f"('fit_hostile_pkg:five_features_loader'), inputs (32, 5): RuntimeError: mat1 and mat2") in lines[0]
    assert not output.exists()


def test_a_failing_loader_or_running_out_of_memory_is_not_blamed_on_the_model(in_project):
    data = dict(train="fit_hostile_pkg:breaking_loader", val="fit_hostile_pkg:val_loader")
    with pytest.raises(ValueError, match="image file is truncated") as caught:  # in the BatchNorm pass
        run_fit(_config(in_project, data=data, output=str(in_project / "broken-out")), progress=False)
    assert not isinstance(caught.value, FitError)
    with pytest.raises(torch.OutOfMemoryError, match="tried to allocate"):
        run_fit(_config(in_project, model="fit_hostile_pkg:out_of_memory_model",
                        output=str(in_project / "oom-out")), progress=False)


def test_the_checkpoints_are_read_as_the_glob_matched_them_before_any_work(in_project, monkeypatch):
    import shutil

    folder = in_project / "growing"
    folder.mkdir()
    for i in range(2):
        shutil.copy(in_project / "ckpts" / f"epoch_{i}.pt", folder / f"epoch_{i}.pt")
    monkeypatch.setenv("FIT_COPY_FROM", str(in_project / "ckpts" / "epoch_2.pt"))
    monkeypatch.setenv("FIT_COPY_TO", str(folder / "epoch_2.pt"))
    report = run_fit(_config(in_project, model="fit_hostile_pkg:growing_model", checkpoints=str(folder / "epoch_*.pt"),
                             output=str(in_project / "growing-out")), progress=False)
    assert (folder / "epoch_2.pt").exists()  # written after the glob was read
    assert [Path(p).name for p in report["checkpoints"]] == ["epoch_0.pt", "epoch_1.pt"]
    assert report["coefficients"][0] == 2, report["coefficients"]


# -- the output location is checked before training -------------------------------------------


def test_an_output_path_that_is_a_file_fails_before_any_work(in_project):
    (in_project / "a-file").write_text("not a directory")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        run_fit(_config(in_project, output=str(in_project / "a-file")), progress=False)
    assert not (in_project / "factory-called").exists()


def test_an_output_path_under_a_file_fails_before_any_work(in_project):
    (in_project / "a-file").write_text("not a directory")
    with pytest.raises(OutputError, match="lies under .*a-file'?, which is a file"):
        run_fit(_config(in_project, output=str(in_project / "a-file" / "deeper" / "out")), progress=False)
    assert not (in_project / "factory-called").exists()


@pytest.mark.parametrize("below", [False, True])
def test_an_output_through_a_looping_symbolic_link_fails_before_any_work(in_project, below):
    # realpath() leaves such a link as it is: the loop showed only when the outputs were moved in
    a, b = in_project / f"loop-a-{below}", in_project / f"loop-b-{below}"
    a.symlink_to(b)
    b.symlink_to(a)
    config = _config(in_project, output=str(a / "out" if below else a))
    before = sorted(os.listdir(in_project))
    with pytest.raises(OutputError, match="runs through a symbolic link that leads back to itself"):
        run_fit(config, progress=False)
    assert not (in_project / "factory-called").exists()
    assert sorted(os.listdir(in_project)) == before  # no progress file, no staging folder


def test_an_output_without_write_permission_fails_before_any_work(in_project, monkeypatch):
    # the tests run as root, whom chmod does not stop: the permission check itself is stubbed
    from twa_kernels import _outdir

    denied = in_project / "locked"
    denied.mkdir(exist_ok=True)
    real_access = os.access
    monkeypatch.setattr(_outdir.os, "access", lambda p, mode: False if Path(p) == denied else real_access(p, mode))
    with pytest.raises(OutputError, match="cannot be written .*no write permission"):
        run_fit(_config(in_project, output=str(denied / "out")), progress=False)
    assert not (in_project / "factory-called").exists()
    assert os.listdir(denied) == []


def test_an_output_on_a_read_only_file_system_fails_before_any_work(in_project, monkeypatch):
    import errno

    from twa_kernels import _outdir

    def read_only(*args, **kwargs):  # what mkdir gives on a read-only mount, even to root
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(_outdir.tempfile, "mkdtemp", read_only)
    with pytest.raises(OutputError, match="cannot be written .*Read-only file system"):
        run_fit(_config(in_project, output=str(in_project / "ro-out")), progress=False)
    assert not (in_project / "factory-called").exists()


def test_an_output_directory_holding_other_files_is_refused_not_emptied(in_project):
    shared = in_project / "shared"
    shared.mkdir(exist_ok=True)
    (shared / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files other than .*\(notes.txt\)"):
        run_fit(_config(in_project, output=str(shared)), progress=False)
    assert os.listdir(shared) == ["notes.txt"] and not (in_project / "factory-called").exists()


@pytest.mark.parametrize("entry", ["directory", "backup", "link to a directory"])
def test_an_output_directory_holding_what_only_looks_like_an_output_is_refused(in_project, entry):
    out = in_project / f"look-alike-{entry.replace(' ', '-')}"
    out.mkdir()
    if entry == "directory":
        (out / "report.json").mkdir()
        (out / "report.json" / "draft.txt").write_text("mine")
    elif entry == "backup":
        (out / ".report.json.bak").write_text("mine")
    else:
        (in_project / "elsewhere").mkdir(exist_ok=True)
        (out / "averaged.pt").symlink_to(in_project / "elsewhere")
    before = sorted(os.listdir(out))
    shown = {"directory": "report.json/", "backup": ".report.json.bak", "link to a directory": "averaged.pt/"}[entry]
    with pytest.raises(OutputError, match=rf"holds files other than .*\({re.escape(shown)}\)"):
        run_fit(_config(in_project, output=str(out)), progress=False)
    assert sorted(os.listdir(out)) == before and not (in_project / "factory-called").exists()
    if entry == "directory":
        assert (out / "report.json" / "draft.txt").read_text() == "mine"


def test_a_file_written_into_the_output_during_a_run_is_kept_in_the_new_set(in_project, monkeypatch):
    out = in_project / "noted-out"
    monkeypatch.setenv("FIT_NOTES", str(out / "notes.txt"))
    report = run_fit(_config(in_project, output=str(out), data=dict(train="fit_hostile_pkg:noting_loader")),
                     progress=False)
    assert sorted(os.listdir(out)) == ["averaged.pt", "averaged.safetensors", "notes.txt", "report.json"]
    written = json.loads((out / "report.json").read_text())
    assert (out / "notes.txt").read_text() == "mine" and {k: v for k, v in written.items() if k != "stamp"} == report
    assert _leftovers(in_project, out.name) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
@pytest.mark.parametrize("existed", [True, False], ids=["replaced", "new"])
def test_entries_that_appear_in_the_output_during_a_run_are_moved_into_the_new_set(tmp_path, monkeypatch, exchange,
                                                                                     existed):
    from twa_kernels import _outdir

    if not exchange:
        monkeypatch.setattr(_outdir, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    if existed:
        first = _outdir.OutputDirectory(out, ["a.bin", "b.json"])
        for name in first.names:
            first.stage(name).write_text("old")
        first.commit()
    second = _outdir.OutputDirectory(out, ["a.bin", "b.json"])
    for name in second.names:
        second.stage(name).write_text("new")
    out.mkdir(exist_ok=True)  # while the run works, the user writes there
    (out / "notes.txt").write_text("mine")
    (out / "figures").mkdir()
    (out / "figures" / "loss.png").write_bytes(b"png")
    (out / ".b.json.x7_k2q9a.tmp").write_text("what an interrupted write of an output leaves")
    second.commit()
    second.discard()
    assert sorted(os.listdir(out)) == ["a.bin", "b.json", "figures", "notes.txt"]
    assert {(out / name).read_text() for name in ("a.bin", "b.json")} == {"new"}
    assert (out / "notes.txt").read_text() == "mine" and (out / "figures" / "loss.png").read_bytes() == b"png"
    assert _leftovers(tmp_path) == []


def _a_second_run_while_the_user_writes_notes(tmp_path):
    """An output directory holding a first run's a.bin, a second run staged to replace it, and
    notes.txt the user wrote into the directory meanwhile."""
    from twa_kernels import _outdir

    out = tmp_path / "out"
    first = _outdir.OutputDirectory(out, ["a.bin"])
    first.stage("a.bin").write_text("old")
    first.commit()
    second = _outdir.OutputDirectory(out, ["a.bin"])
    second.stage("a.bin").write_text("new")
    (out / "notes.txt").write_text("mine")
    return out, second


def test_a_run_stopped_after_its_swap_leaves_the_users_entries_to_the_next_run_kept_aside(tmp_path):
    # killed between the swap and moving the user's entries back: the old set, with them,
    # sat in a staging folder of a dead process, which the next run removed whole
    from twa_kernels import _outdir

    out, second = _a_second_run_while_the_user_writes_notes(tmp_path)
    staging = second._staging
    assert second._swap()  # the swap alone, as a run killed right after it leaves things
    dead = staging.with_name(staging.name.replace(f".{_outdir.owner_tag()}.", ".999999999."))
    os.rename(staging, dead)
    with pytest.warns(RuntimeWarning, match=r"interrupted run left notes\.txt .* kept in '.*\.out\.twa-kept"):
        _outdir.OutputDirectory(out, ["a.bin"]).discard()
    kept = [p for p in tmp_path.iterdir() if ".twa-kept." in p.name]
    assert len(kept) == 1 and (kept[0] / "notes.txt").read_text() == "mine"
    assert not dead.exists() and (out / "a.bin").read_text() == "new"


def test_a_killed_runs_staging_folder_is_removed_though_its_process_number_was_given_again(tmp_path):
    # a restarted container's first process gets the number the killed run had (often this
    # very run's): a staging folder was judged by its number alone and kept for ever
    from twa_kernels import _outdir

    mine = _outdir.owner_tag()
    if "-" not in mine:
        pytest.skip("no /proc: a process's start cannot be read here")
    number = mine.split("-")[0]
    earlier = tmp_path / f".out.twa-stage.{number}-0.k1lled"  # this number, started at boot: another process
    earlier.mkdir()
    (earlier / "a.bin").write_text("half")
    legacy = tmp_path / f".out.twa-old.{number}.0ld3r"  # a name without the start: the number alone decides
    legacy.mkdir()
    assert _outdir._start_ticks(int(number)) > 0
    outputs = _outdir.OutputDirectory(tmp_path / "out", ["a.bin"])
    assert not earlier.exists() and legacy.is_dir()
    assert outputs._staging.name.startswith(f".out.twa-stage.{mine}.")  # this run's own, kept while it runs
    assert _outdir.owner_alive(mine) and _outdir._LEFTOVER.match(outputs._staging.name)
    outputs.discard()


def test_a_live_runs_staging_folder_is_kept(tmp_path):
    from twa_kernels import _outdir

    script = "from twa_kernels._outdir import owner_tag; import time; print(owner_tag(), flush=True); time.sleep(60)"
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as other:
        try:
            tag = other.stdout.readline().strip()
            live = tmp_path / f".out.twa-stage.{tag}.wrking"
            live.mkdir()
            _outdir.OutputDirectory(tmp_path / "out", ["a.bin"]).discard()
            assert live.is_dir()
        finally:
            other.kill()
    other.wait(timeout=30)
    _outdir.OutputDirectory(tmp_path / "out", ["a.bin"]).discard()  # its process gone
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("when", ["moving them back", "the exchange's return"])
def test_a_ctrl_c_between_the_swap_and_moving_the_users_entries_back_keeps_them(tmp_path, monkeypatch, when):
    # the run's own clean-up (discard, in a finally) removed the old set with the user's files
    from twa_kernels import _outdir

    out, second = _a_second_run_while_the_user_writes_notes(tmp_path)
    exchange = _outdir._exchange
    if when == "the exchange's return":
        probe = [tmp_path / "p", tmp_path / "q"]
        for folder in probe:
            folder.mkdir()
        if not exchange(*probe):
            pytest.skip("this file system has no renameat2 exchange")

    def interrupted(*args):
        if when == "the exchange's return":
            exchange(*args)  # the directories swapped, and the Ctrl-C lands before _swap returns
        raise KeyboardInterrupt

    if when == "moving them back":
        monkeypatch.setattr(_outdir.OutputDirectory, "_keep_foreign", interrupted)
    else:
        monkeypatch.setattr(_outdir, "_exchange", interrupted)
    with pytest.raises(KeyboardInterrupt):
        second.commit()
    second.discard()
    assert (out / "a.bin").read_text() == "new"
    assert (second._staging / "notes.txt").read_text() == "mine"  # for the next run's recover() to keep aside


def test_an_entry_that_vanishes_before_it_is_moved_back_is_no_reason_to_keep_the_old_set(tmp_path, monkeypatch):
    from twa_kernels import _outdir

    out = tmp_path / "out"
    target = _outdir.OutputDirectory(out, ["a.bin"])
    target.stage("a.bin").write_text("new")
    out.mkdir()
    (out / "loader.lock").write_text("")
    rename = os.rename

    def lock_released_first(src, dst):  # the loader removes its lock file just before the move
        if Path(src).name == "loader.lock":
            os.unlink(src)
        return rename(src, dst)

    monkeypatch.setattr(_outdir.os, "rename", lock_released_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.commit()
    target.discard()
    assert os.listdir(out) == ["a.bin"] and _leftovers(tmp_path) == []
    assert not [p for p in tmp_path.iterdir() if ".twa-kept." in p.name]


def test_a_directory_named_like_an_output_that_appears_during_a_run_is_kept_aside(tmp_path):
    from twa_kernels import _outdir

    out = tmp_path / "out"
    target = _outdir.OutputDirectory(out, ["a.bin"])
    target.stage("a.bin").write_text("new")
    (out / "a.bin").mkdir(parents=True)
    (out / "a.bin" / "mine.txt").write_text("mine")
    with pytest.warns(RuntimeWarning, match=r"a\.bin appeared in it during the run .* kept in '.*\.out\.twa-kept"):
        target.commit()
    target.discard()
    assert (out / "a.bin").read_text() == "new"
    kept = [p for p in tmp_path.iterdir() if ".twa-kept." in p.name]
    assert len(kept) == 1 and (kept[0] / "a.bin" / "mine.txt").read_text() == "mine"
    _outdir.OutputDirectory(out, ["a.bin"]).discard()  # the next run's clean-up leaves it alone
    assert (kept[0] / "a.bin" / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "over-an-earlier-output"])
def test_a_file_named_like_an_output_written_during_a_run_is_kept_aside(tmp_path, earlier):
    # a data loader that wrote report.json into the output directory: it was taken for the
    # previous run's output and removed with it, without a word
    from twa_kernels import _outdir

    out = tmp_path / "out"
    if earlier:  # the previous run's set
        out.mkdir()
        (out / "a.bin").write_text("previous")
        (out / "b.json").write_text("previous")
    target = _outdir.OutputDirectory(out, ["a.bin", "b.json"])
    target.stage("a.bin").write_text("new")
    target.stage("b.json").write_text("new")
    out.mkdir(exist_ok=True)
    (out / "b.json").write_text("the loader's")
    with pytest.warns(RuntimeWarning, match=r"b\.json appeared in it during the run .* kept in '.*\.out\.twa-kept"):
        target.commit()
    target.discard()
    assert (out / "a.bin").read_text() == "new" and (out / "b.json").read_text() == "new"
    kept = [p for p in tmp_path.iterdir() if ".twa-kept." in p.name]
    assert len(kept) == 1 and (kept[0] / "b.json").read_text() == "the loader's"
    if earlier:
        assert (kept[0] / "a.bin").read_text() == "previous"


@pytest.mark.parametrize("length", [240, 300])
def test_an_output_name_too_long_for_its_staging_directory_names_the_limit(in_project, length):
    from twa_kernels._outdir import STAGING_NAME_EXTRA

    limit = os.pathconf(in_project, "PC_NAME_MAX") - STAGING_NAME_EXTRA
    with pytest.raises(OutputError, match=rf"the directory name is {length} characters, too long for the staging "
                                          rf"directory name .* at most {limit} characters .*choose a shorter name"):
        run_fit(_config(in_project, output=str(in_project / ("n" * length))), progress=False)
    assert not (in_project / "factory-called").exists()


def test_an_output_name_at_the_limit_is_written_and_a_longer_folder_is_an_output_error(tmp_path):
    from twa_kernels._outdir import STAGING_NAME_EXTRA, OutputDirectory

    limit = os.pathconf(tmp_path, "PC_NAME_MAX") - STAGING_NAME_EXTRA
    target = OutputDirectory(tmp_path / ("n" * limit), ["a.bin"])
    target.stage("a.bin").write_text("new")
    target.commit()
    assert (tmp_path / ("n" * limit) / "a.bin").read_text() == "new"
    with pytest.raises(OutputError, match=r"the folder name '.*' is 300 characters, more than the .* the file system "
                                          r"allows in one name; choose a shorter path"):
        OutputDirectory(tmp_path / ("d" * 300) / "out", ["a.bin"])


def test_the_cli_names_an_unwritable_output_in_one_line(project):
    (project / "a-file").write_text("not a directory")
    result = _twa_module(project, "fit", str(_config(project, output=str(project / "a-file"))), "--no-progress")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("twa: error: output") and "is a file" in result.stderr


# -- outputs change as one set, with the modes the umask gives --------------------------------

KILLER = textwrap.dedent('''
    import os, signal, sys
    import twa_kernels.fit as fit

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    point = sys.argv[2]
    if point == "after-first-file":
        real_save = fit.save_state_dict
        def save(state, path):
            real_save(state, path)
            die()
        fit.save_state_dict = save
    elif point == "inside-a-write":
        import safetensors.torch
        def save_file(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"half a file")
            die()
        safetensors.torch.save_file = save_file
    elif point == "between-fallback-renames":
        import twa_kernels._outdir as outdir
        outdir._exchange = lambda a, b: False
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if ".twa-old." in str(dst):
                die()
        outdir.os.rename = rename
    fit.run_fit(sys.argv[1], progress=False)
''')


@pytest.fixture(scope="module")
def first_output(project) -> Path:
    """The output set of one finished `twa fit` run, which each kill test copies as the set
    its killed run must not lose."""
    out = project / "kill-first"
    config = _config(project, name="kill-first.yaml", output=str(out))
    first = subprocess.run([sys.executable, "-m", "twa_kernels", "fit", str(config), "--no-progress"], cwd=project,
                           env=_env(PACKAGE_ROOT, TESTS, str(project)), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    _consistent(out)
    return out


@pytest.mark.parametrize("point", ["after-first-file", "inside-a-write", "between-fallback-renames"])
def test_sigkill_between_writes_keeps_the_old_set_and_a_rerun_cleans_up(project, first_output, point):
    out = project / f"kill-{point}"
    shutil.copytree(first_output, out)
    env = _env(PACKAGE_ROOT, TESTS, str(project))
    before = _digests(out)

    # a run whose outputs would differ from the first one's (another learning rate)
    changed = _config(project, name=f"kill-{point}-changed.yaml", output=str(out), optimizer=dict(lr=0.05))
    killed = subprocess.run([sys.executable, "-c", KILLER, str(changed), point], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point != "between-fallback-renames":
        assert _digests(out) == before  # the old set, untouched
    else:  # killed between the two renames: no output, and the old set is the one set aside
        assert not out.exists()
        aside = [name for name in _leftovers(project, out.name) if ".twa-old." in name]
        assert len(aside) == 1 and _digests(project / aside[0]) == before
    assert _leftovers(project, out.name)  # what the killed run left beside the output

    rerun = subprocess.run([sys.executable, "-m", "twa_kernels", "fit", str(changed), "--no-progress"], cwd=project,
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _consistent(out)["config"] == str(changed)
    assert _digests(out)["averaged.pt"] != before["averaged.pt"]
    assert _leftovers(project, out.name) == []


def test_an_interrupt_between_writes_keeps_the_old_set_and_leaves_nothing(in_project, monkeypatch):
    import twa_kernels.fit as fit

    out = in_project / "interrupted"
    run_fit(_config(in_project, output=str(out)), progress=False)
    before = _digests(out)
    real_save = fit.save_state_dict

    def save(state, path):
        real_save(state, path)
        raise KeyboardInterrupt  # Ctrl-C after the first file

    monkeypatch.setattr(fit, "save_state_dict", save)
    with pytest.raises(KeyboardInterrupt):  # a run whose outputs would differ (another learning rate)
        run_fit(_config(in_project, output=str(out), optimizer=dict(lr=0.05)), progress=False)
    # nothing of the new set; only the progress of its finished epoch, for the next run
    assert _digests(out) == before and _leftovers(in_project, out.name) == [".interrupted.twa-progress.pt"]
    monkeypatch.setattr(fit, "save_state_dict", real_save)
    with pytest.warns(UserWarning, match="resuming after epoch 1 of 1"):
        run_fit(_config(in_project, output=str(out), optimizer=dict(lr=0.05)), progress=False)
    assert _digests(out) != before and _leftovers(in_project, out.name) == []


def test_outputs_follow_the_umask_and_replaced_files_keep_their_mode(in_project):
    out = in_project / "modes"
    old_umask = os.umask(0o027)
    try:
        run_fit(_config(in_project, output=str(out)), progress=False)
        assert stat.S_IMODE(out.stat().st_mode) == 0o750
        for name in ("averaged.pt", "averaged.safetensors", "report.json"):
            assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
        os.umask(0o022)
        os.chmod(out / "report.json", 0o600)
        os.chmod(out / "averaged.pt", 0o444)
        os.chmod(out, 0o700)
        (out / ".averaged.safetensors.k3j9x2_q.tmp").write_bytes(b"a temporary file a killed writer left")
        (out / ".averaged.safetensors.k3j9x2_q.lck").touch()  # and its lock file
        run_fit(_config(in_project, output=str(out)), progress=False)
        assert not (out / ".averaged.safetensors.k3j9x2_q.tmp").exists()
        assert not (out / ".averaged.safetensors.k3j9x2_q.lck").exists()
        assert stat.S_IMODE((out / "report.json").stat().st_mode) == 0o600
        assert stat.S_IMODE((out / "averaged.pt").stat().st_mode) == 0o444
        assert stat.S_IMODE((out / "averaged.safetensors").stat().st_mode) == 0o640
        assert stat.S_IMODE(out.stat().st_mode) == 0o700
        shutil.rmtree(out)
        run_fit(_config(in_project, output=str(out)), progress=False)
        assert stat.S_IMODE((out / "averaged.pt").stat().st_mode) == 0o644  # as torch.save under umask 022
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
    finally:
        os.umask(old_umask)
    _consistent(out)


# -- run as users run it ------------------------------------------------------------------------


def test_the_console_script_imports_the_project_from_the_working_directory(tmp_path):
    """The `twa fit config.yaml` of docs/cli.md, through the installed console script, from a
    project directory that is not on PYTHONPATH."""
    project = tmp_path / "project"
    (project / "mypackage").mkdir(parents=True)
    (project / "mypackage" / "__init__.py").write_text("")
    (project / "mypackage" / "models.py").write_text(textwrap.dedent('''
        import torch
        def make_model():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    '''))
    (project / "mypackage" / "data.py").write_text(textwrap.dedent('''
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        def _set(seed):
            g = torch.Generator().manual_seed(seed)
            return TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
        def train_loader():
            return DataLoader(_set(0), batch_size=16)
        def val_loader():
            return DataLoader(_set(1), batch_size=32)
    '''))
    torch.manual_seed(0)
    for i in range(3):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        tk.save_state_dict(model.state_dict(), project / "runs" / "exp1" / f"epoch_{i}.pt")
    # the config exactly as the page gives it
    page = (Path(PACKAGE_ROOT) / "docs" / "cli.md").read_text()
    (project / "config.yaml").write_text(page.split("## twa fit", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0])
    # The console script pip installed (its first sys.path entry is its bin/ folder, not the
    # working directory); where this environment has none, the same wrapper pip writes.
    script = Path(sys.executable).parent / "twa"
    if not script.is_file():
        script = tmp_path / "bin" / "twa"
        script.parent.mkdir()
        script.write_text("import sys\nfrom twa_kernels.cli import main\nsys.exit(main())\n")
    result = subprocess.run([sys.executable, str(script), "fit", "config.yaml", "--no-progress"], cwd=project,
                            env=_env(PACKAGE_ROOT), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "val_loss_after_twa" in result.stdout
    _consistent(project / "twa-out")
    # the page's optimizer is the one the library recommends: AdamW without decay towards the center
    report = json.loads((project / "twa-out" / "report.json").read_text())
    assert report["settings"]["optimizer_args"] == {"lr": 0.02, "weight_decay": 0}, report["settings"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_an_output_directory_is_replaced_as_one_set_and_an_interrupt_mid_swap_keeps_the_old(tmp_path, monkeypatch,
                                                                                             exchange):
    from twa_kernels import _outdir

    if not exchange:
        monkeypatch.setattr(_outdir, "_exchange", lambda a, b: False)
    else:
        probe = [tmp_path / "p", tmp_path / "q"]
        for p in probe:
            p.mkdir()
        if not _outdir._exchange(*probe):
            pytest.skip("this file system has no renameat2 exchange")
    out = tmp_path / "out"

    def staged(content: str) -> "_outdir.OutputDirectory":
        target = _outdir.OutputDirectory(out, ["a.bin", "b.json"])
        for name in target.names:
            target.stage(name).write_text(content)
        return target

    def contents() -> set:
        return {(out / name).read_text() for name in ("a.bin", "b.json")}

    first = staged("old")
    first.commit()
    first.discard()
    assert contents() == {"old"} and _leftovers(tmp_path) == []
    second = staged("new")
    second.commit()
    assert contents() == {"new"} and _leftovers(tmp_path) == []

    third = staged("newer")
    real_rename = os.rename

    def interrupted(*args):  # Ctrl-C at the step that would make the new set visible
        raise KeyboardInterrupt

    monkeypatch.setattr(_outdir, "_exchange", interrupted if exchange else (lambda a, b: False))
    if not exchange:
        monkeypatch.setattr(_outdir.os, "rename", lambda src, dst: interrupted() if ".twa-stage." in str(src)
                            else real_rename(src, dst))
    with pytest.raises(KeyboardInterrupt):
        third.commit()
    third.discard()
    monkeypatch.setattr(_outdir.os, "rename", real_rename)
    assert contents() == {"new"} and _leftovers(tmp_path) == []


def test_an_output_that_is_the_working_directory_is_refused(tmp_path, monkeypatch):
    from twa_kernels import _outdir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="is the working directory or holds it"):
        _outdir.OutputDirectory(".", ["a.bin"])
    with pytest.raises(OutputError, match="is the working directory or holds it"):
        _outdir.OutputDirectory(tmp_path.parent, ["a.bin"])


@pytest.mark.parametrize("signum, status, line", [(signal.SIGINT, 130, "twa: interrupted"),
                                                 (signal.SIGTERM, 143, "twa: terminated")], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_the_command_with_one_line_and_no_output(project, signum, status, line):
    _interrupt(project, signum, status, line, "waiting_loader", epochs=1, marker_name="waiting-started")


@pytest.mark.parametrize("signum, status, line", [
    (signal.SIGINT, 130, "twa: interrupted; its finished epochs are kept in"),
    (signal.SIGTERM, 143, "twa: its finished epochs are kept in")], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_after_an_epoch_says_that_the_same_command_resumes(project, signum, status, line):
    out = _interrupt(project, signum, status, line, "waiting_in_epoch_2_loader", epochs=2,
                     marker_name="waiting-started.epoch2")
    assert _leftovers(project, out.name) == [f".{out.name}.twa-progress.pt"]


def _interrupt(project, signum, status, line, loader, epochs, marker_name):
    """Run `twa fit` until the file `marker_name` says the loader waits, send `signum`, and
    check the one line the command ends with (its start: a path may follow) and that no
    output was made."""
    out = project / f"interrupted-out-{signum}-{loader}"
    config = _config(project, name=f"interrupted-{signum}-{loader}.yaml", output=str(out), epochs=epochs,
                     data=dict(train=f"fit_hostile_pkg:{loader}", val="fit_hostile_pkg:val_loader"))
    marker = project / marker_name
    marker.unlink(missing_ok=True)
    env = {**_env(PACKAGE_ROOT, TESTS, str(project)), "FIT_MARKER": str(project / "waiting-started")}
    # a command started in the background by a non-interactive shell (as a CI runner may start
    # the suite) inherits SIGINT ignored, and then never sees the Ctrl-C this test sends: the
    # child gets the default disposition, as a terminal's command has
    proc = subprocess.Popen([sys.executable, "-m", "twa_kernels", "fit", str(config), "--no-progress"], cwd=project,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=30)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # 130 as a shell reports it: the status 130, or death by SIGINT, as CPython sometimes exits
    # after a Ctrl-C that was caught (the interrupt may land in model building or in training)
    assert proc.returncode in (status, -signum) and err.strip().splitlines()[-1].startswith(line), err
    assert "Traceback" not in err
    assert not out.exists()
    if epochs == 1:
        assert not _leftovers(project, out.name)
    return out


def test_sharded_mode_in_one_process_warns_that_it_trains_unsharded(in_project, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = _config(in_project, output=str(in_project / "sharded-out"), distributed=dict(mode="sharded"))
    with pytest.warns(UserWarning, match=r"distributed: \{mode: sharded\} has no effect in one process .*torchrun"):
        report = run_fit(config, progress=False)
    assert report["world_size"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replicated, the default, is said nothing about
        run_fit(_config(in_project, output=str(in_project / "sharded-out"), distributed=dict(mode="replicated")),
                progress=False)


def test_the_command_prints_the_librarys_warnings_as_its_own_lines(in_project, monkeypatch, capsys):
    # Python's format showed a source path, a line number and the warn() call's code line
    from twa_kernels import _build, cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("TWA_KERNELS_CACHE", str(_build.cache_root()))
    config = _config(in_project, output=str(in_project / "sharded-out"), distributed=dict(mode="sharded"))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert cli.main(["fit", str(config), "--no-progress"]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "has no effect in one process" in line)
    assert line.startswith("twa: warning: ") and "fit.py" not in err and "warnings.warn(" not in err
    # another library's or the user's code's keep Python's format, whose location helps
    from twa_kernels._user_code import call_loss

    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = functools.partial(cli._show_warning, lambda *args: shown.append(args))
        warnings.warn("theirs", UserWarning)  # this test's own code
        # torch's own warning about a call the library made, whose stacklevel points into the library
        call_loss(torch.nn.functional.mse_loss, torch.zeros(4, 1, requires_grad=True), torch.zeros(4), "mse")
        # the library's own, whose stacklevel points here
        model = torch.nn.Linear(2, 2)
        tk.TWA(torch.compile(model), [{k: v + i for k, v in model.state_dict().items()} for i in range(3)])
    assert [str(args[0]) for args in shown][0] == "theirs" and "target size" in str(shown[1][0])
    assert shown[0][2] == __file__ and shown[1][2].endswith("_user_code.py")
    assert capsys.readouterr().err.startswith("twa: warning: TWA holds the model inside the OptimizedModule")
    assert cli._as_command_line("twa fit: resuming after epoch 2") == "twa fit: warning: resuming after epoch 2"
    assert cli._as_command_line("the basis: packed") == "twa: warning: the basis: packed"


def test_a_leading_tilde_in_output_is_the_home_directory(in_project, tmp_path, monkeypatch, capsys):
    from twa_kernels import _build
    from twa_kernels.cli import main

    monkeypatch.setenv("TWA_KERNELS_CACHE", str(_build.cache_root()))  # the built kernels, whatever HOME is
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["fit", str(_config(in_project, output="~/twa-home-out")), "--no-progress"]) == 0
    out = tmp_path / "twa-home-out"
    assert f"written: {out / 'averaged.pt'}, " in capsys.readouterr().out
    _consistent(out)
    assert not (in_project / "~").exists()


def test_a_run_that_fails_leaves_no_directory_it_made_for_its_outputs(in_project):
    # new/deeper/ stayed behind, empty, after a run refused for its model
    with pytest.raises(FitError, match="unknown import string|cannot import|no attribute"):
        run_fit(_config(in_project, output=str(in_project / "new" / "deeper" / "out"),
                        model="fit_hostile_pkg:not_there"), progress=False)
    assert not (in_project / "new").exists()


def test_a_loss_that_cannot_take_the_outputs_and_targets_is_one_line_naming_both_shapes(in_project, capsys):
    # mean squared error of [128, 10] logits against [128] class labels: torch's own
    # RuntimeError came as a traceback, after the model, the data and the basis were built
    from twa_kernels.cli import main

    config = _config(in_project, loss="torch.nn.functional:mse_loss", output=str(in_project / "out_mse"))
    code = main(["fit", str(config), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "loss: 'torch.nn.functional:mse_loss' failed on the model's outputs (128, 10) and the targets (128,)" \
        in lines[0], lines[0]
    assert not (in_project / "out_mse").exists()


def test_a_loss_that_fails_on_a_later_batch_is_not_told_to_take_other_outputs():
    # it passed the earlier batches, so the advice to name another loss pointed the wrong way
    from twa_kernels._user_code import call_loss, loss_from

    calls = []

    def flaky_loss(outputs, targets):
        calls.append(1)
        if len(calls) > 1:
            raise ValueError("a label out of range in this batch")
        return outputs.sum()

    flaky = loss_from(flaky_loss, "pkg:flaky")  # a run's handle on the loss, as run_fit holds it

    outputs, targets = torch.ones(8, 3), torch.zeros(8, dtype=torch.long)
    call_loss(flaky, outputs, targets, "pkg:flaky")
    with pytest.raises(FitError, match="a label out of range in this batch; it took earlier batches, so look at "
                                       "this batch's values"):
        call_loss(flaky, outputs, targets, "pkg:flaky")

    def never(outputs, targets):
        raise ValueError("shapes differ")

    with pytest.raises(FitError, match="name a loss that takes them"):
        call_loss(never, outputs, targets, "pkg:never")
    # each run holds its own handle on a loss: one that took a batch in an earlier run (a
    # notebook's second fit) is not taken to have taken one in this run
    earlier, this = (loss_from(torch.nn.functional.cross_entropy, "torch.nn.functional:cross_entropy") for _ in "ab")
    call_loss(earlier, outputs, targets, "torch.nn.functional:cross_entropy")
    with pytest.raises(FitError, match="cross_entropy takes logits .*; name a loss that takes these"):
        call_loss(this, torch.ones(4, 1), torch.ones(4, 1, 2), "torch.nn.functional:cross_entropy")


def test_a_loss_given_a_transformers_model_output_says_to_take_its_logits():
    # it suggested cross_entropy, the loss that had just failed; and out.loss, always None as
    # twa fit calls the model without the targets, was "not one number"
    import transformers

    from twa_kernels._user_code import call_loss, loss_from

    output = transformers.modeling_outputs.SequenceClassifierOutput(logits=torch.randn(8, 3))
    labels = torch.zeros(8, dtype=torch.long)
    loss = loss_from(torch.nn.functional.cross_entropy, "torch.nn.functional:cross_entropy")
    with pytest.raises(FitError, match="returns a SequenceClassifierOutput: name a loss that takes its .logits"):
        call_loss(loss, output, labels, "torch.nn.functional:cross_entropy")
    with pytest.raises(FitError, match="if it returns the model's outputs.loss, that is None .* called without the "
                                       "targets"):
        call_loss(lambda out, y: out.loss, output, labels, "pkg:hf_loss")
    assert call_loss(lambda out, y: torch.nn.functional.cross_entropy(out.logits, y), output, labels, "pkg:ok") > 0


def test_an_earlier_output_given_as_a_checkpoint_is_refused_before_it_is_replaced(in_project, capsys):
    from twa_kernels.cli import main

    out = in_project / "out_reused"
    tk.save_state_dict(tk.load_state_dict(in_project / "ckpts" / "epoch_0.pt"), out / "averaged.pt")
    before = _digests(out)
    checkpoints = [str(in_project / "ckpts" / "epoch_1.pt"), str(in_project / "ckpts" / "epoch_2.pt"),
                   str(out / "averaged.pt")]
    code = main(["fit", str(_config(in_project, checkpoints=checkpoints, output=str(out))), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is the output averaged.pt of output:" in lines[0], lines
    assert _digests(out) == before and not (in_project / "factory-called").exists()


def test_a_saved_optimizer_without_a_setting_a_newer_torch_added_is_taken_up():
    # a key the file lacks was called a changed setting, and a torch upgrade started runs afresh
    from twa_kernels._fit_progress import check_saved_optimizer

    coefficients = torch.nn.Parameter(torch.zeros(3, 2))
    optimizer = torch.optim.AdamW([coefficients], lr=0.01, weight_decay=0.0)
    fresh = optimizer.state_dict()
    coefficients.grad = torch.ones(3, 2)
    optimizer.step()
    saved = optimizer.state_dict()
    del saved["param_groups"][0]["maximize"]
    check_saved_optimizer(saved, fresh, optimizer, {"lr": 0.01, "weight_decay": 0.0})
    saved["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match="optimizer's settings lr are not the config's"):
        check_saved_optimizer(saved, fresh, optimizer, {"lr": 0.01, "weight_decay": 0.0})
    # a setting the file lacks takes torch's default when loaded: refused where the config's differs
    amsgrad = torch.optim.AdamW([coefficients], lr=0.01, weight_decay=0.0, amsgrad=True)
    fresh = amsgrad.state_dict()
    amsgrad.step()
    saved = amsgrad.state_dict()
    del saved["param_groups"][0]["amsgrad"]
    with pytest.raises(ValueError, match="optimizer's settings amsgrad are not the config's"):
        check_saved_optimizer(saved, fresh, amsgrad, {"lr": 0.01, "weight_decay": 0.0, "amsgrad": True})
