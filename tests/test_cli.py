"""The `twa` command: fit on a user's model and data from YAML, its one-line errors, and the demo."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import twa_kernels as tk

from tests.digits import make_model

USER_PACKAGE = '''
import torch
from torch.utils.data import DataLoader
from digits import digits_splits, make_model as _make

def make_model():
    return _make(0)

def train_loader():
    return DataLoader(digits_splits()[0], batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))

def val_loader():
    return DataLoader(digits_splits()[1], batch_size=256)

NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits_checkpoints):
    """A user's package (model factory, loaders) and a folder of checkpoints."""
    root = tmp_path_factory.mktemp("user")
    (root / "userpkg.py").write_text(USER_PACKAGE)
    ckpts = root / "ckpts"
    for i, state in enumerate(digits_checkpoints(epochs=4, lr=0.01)):
        tk.save_state_dict(state, ckpts / f"epoch_{i}.pt")
    return root


def _twa(args, cwd, timeout=600):
    package_root = str(Path(tk.__file__).resolve().parents[1])  # this checkout's twa_kernels, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(Path(__file__).parent), package_root])}
    env.pop("TWA_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "twa_kernels", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _config(root, **overrides):
    config = dict(model="userpkg:make_model", data=dict(train="userpkg:train_loader", val="userpkg:val_loader"),
                  checkpoints=str(root / "ckpts" / "epoch_*.pt"), bits=4, granularity="tensor",
                  optimizer=dict(name="AdamW", lr=0.02), epochs=2, train_on="train", output=str(root / "out"))
    config.update(overrides)
    import yaml

    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("int8_gradients", [False, True], ids=["float", "int8_gradients"])
def test_fit_writes_the_averaged_model_and_a_report(project, int8_gradients):
    result = _twa(["fit", str(_config(project, int8_gradients=int8_gradients)), "--no-progress"], project)
    assert result.returncode == 0, result.stderr
    written = [name.strip() for name in result.stdout.split("written: ")[1].split(",")]
    assert [Path(name).name for name in written] == ["averaged.pt", "averaged.safetensors", "report.json"]
    report = json.loads((project / "out" / "report.json").read_text())
    assert report["val_loss_after_twa"] < report["val_loss_at_swa"]
    assert report["int8_gradients"] is int8_gradients
    assert report["stamp"]["twa_kernels"] and report["stamp"]["cpu"] and report["stamp"]["datetime"]
    # what ran, defaults filled in, and the files the glob resolved to
    assert report["settings"]["int8_gradients"] is int8_gradients and report["settings"]["bits"] == 4
    assert report["settings"]["optimizer_args"]["lr"] > 0 and report["settings"]["granularity"] == "tensor"
    assert [Path(p).name for p in report["checkpoints"]] == sorted(p.name for p in (project / "ckpts").iterdir())
    for name in ("averaged.pt", "averaged.safetensors"):
        model = make_model(5)
        model.load_state_dict(tk.load_state_dict(project / "out" / name))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(model="userpkg:no_such_factory"), "unknown import string 'userpkg:no_such_factory'"),
        (dict(model="nopkg.models:make"), "cannot import module 'nopkg.models'"),
        (dict(model=".userpkg:make_model"), "cannot import module '.userpkg'"),  # relative: a TypeError before
        (dict(checkpoints="{root}/ckpts/nothing_*.pt"), "matches no files"),
        (dict(bits=3), "bits must be one of [1, 2, 4, 8] or null, got 3"),
        (dict(bits=None, int8_gradients=True), "int8_gradients: true rounds gradients per basis group"),
        (dict(checkpoints="{root}/wrong"), "has shape (10, 47) but the model has (10, 48)"),
        (dict(epochs="two"), "epochs must be a positive integer"),
        (dict(learning_rate=0.1), "unknown key(s) ['learning_rate']"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(project, overrides, message):
    wrong = project / "wrong"
    if not wrong.exists():
        state = dict(tk.load_state_dict(project / "ckpts" / "epoch_0.pt"))
        state["3.weight"] = torch.zeros(10, 47)
        for name in ("bad_0.pt", "bad_1.pt"):  # two: one checkpoint alone is refused before its shapes
            tk.save_state_dict(state, wrong / name)
    overrides = {k: v.format(root=project) if isinstance(v, str) else v for k, v in overrides.items()}
    result = _twa(["fit", str(_config(project, **overrides)), "--no-progress"], project)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twa: error:") and message in lines[0], result.stderr


def test_yaml_error_names_its_line(project):
    path = project / "broken.yaml"
    path.write_text(textwrap.dedent("""\
        model: userpkg:make_model
        data:
          train: userpkg:train_loader
        checkpoints: [a, b
        bits: 4
    """))
    result = _twa(["fit", str(path)], project)
    assert result.returncode == 2
    assert "YAML error at line" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_demo_quick_writes_table_json_and_plot(tmp_path):
    result = _twa(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "demo")], tmp_path)
    assert result.returncode == 0, result.stderr
    methods = {"full training", "SGD, stopped early", "SGD, budgeted", "SWA", "greedy soup", "TWA-t", "TWA-v"}
    for method in methods:
        assert method in result.stdout
    report = json.loads((tmp_path / "demo" / "results.json").read_text())
    summary = report["summary"]
    assert set(summary) == methods
    assert summary["TWA-t"]["epochs"] < summary["full training"]["epochs"]
    # the budgeted baseline gets exactly TWA's budget: the head stage plus TWA's own epochs
    budget = report["head_epochs"] + report["twa_epochs"]
    assert summary["SGD, budgeted"]["epochs"] == summary["TWA-v"]["epochs"] == budget
    assert summary["SGD, stopped early"]["epochs"] == summary["SWA"]["epochs"] == report["head_epochs"]
    assert (tmp_path / "demo" / "accuracy.png").stat().st_size > 10_000
    # the numbers carry where they came from (the commit is None outside a git checkout), and
    # the one thread the demo trains on
    assert {"datetime", "commit", "cpu", "torch", "twa_kernels"} <= set(report["stamp"])
    assert report["stamp"]["threads"] == 1
    assert "MNIST-1D, 1 seed(s):" in result.stdout
    assert sorted(p.name for p in (tmp_path / "demo").iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("where, message", [
    ("results.json", "holds a directory named results.json, where the demo writes that file"),
    ("nul", "holds a NUL byte"),
    ("long", "cannot be used .*File name too long.*choose a shorter path"),
])
def test_the_demo_refuses_an_output_it_could_not_write_before_training(tmp_path, where, message):
    from twa_kernels.demo import run_demo

    out = tmp_path / "demo"
    if where == "results.json":
        (out / "results.json").mkdir(parents=True)
    elif where == "nul":
        out = str(out) + "\0x"
    else:
        out = tmp_path / ("x" * 300)
    with pytest.raises(tk.errors.OutputError, match=message):
        run_demo(out, quick=True, progress=False)  # at once: no training comes before the refusal
    assert sorted(p.name for p in tmp_path.iterdir()) == (["demo"] if where == "results.json" else [])


@pytest.mark.parametrize("stranger", ["seed folder", "budget folder", "results", "figure"])
def test_the_demo_replaces_nothing_it_did_not_write(tmp_path, stranger):
    # a user's notes in a seed folder were deleted with the earlier run's folder, and another
    # program's results.json or figures replaced, without a word
    from twa_kernels import demo

    out = tmp_path / "demo"
    seed = out / f"seed{demo.FIRST_SEED}"
    (seed / "budget10").mkdir(parents=True)
    (seed / "epoch_001.safetensors").write_text("an earlier demo's")
    (seed / "budget10" / "epoch_001.safetensors").write_text("an earlier demo's")
    (out / "results.json").write_text(json.dumps({"dataset": "MNIST-1D", "runs": [], "summary": {}}))
    (out / "accuracy.png").write_text("an earlier demo's")
    demo._checked_out_dir(out, [demo.FIRST_SEED])  # an earlier demo's outputs are its to replace
    named = {"seed folder": seed / "notes.txt", "budget folder": seed / "budget10" / "notes.txt",
             "results": out / "results.json", "figure": out / "plane.png"}[stranger]
    if stranger == "results":
        named.write_text('{"my": "results"}')
    elif stranger == "figure":
        (out / "results.json").unlink()
        (out / "accuracy.png").unlink()
        named.write_text("another program's")
    else:
        named.write_text("mine")
    with pytest.raises(tk.errors.OutputError, match=rf"{re.escape(named.name)}'? is not (a file the demo writes|an "
                                                    r"earlier demo's output)"):
        demo.run_demo(out, quick=True, progress=False)  # before any training
    assert named.exists() and not any(p.name.startswith(".twa-demo-stage") for p in out.iterdir())


def test_an_interrupted_demo_removes_the_checkpoint_folders_it_began(tmp_path, monkeypatch):
    # a seed folder holding part of a run was left beside the results, for twa connect to read
    from twa_kernels import demo

    out = tmp_path / "demo"
    earlier = out / f"seed{demo.FIRST_SEED}"
    earlier.mkdir(parents=True)
    (earlier / "epoch_001.safetensors").write_text("an earlier run's")

    def run_seed(seed, setting, out_dir, progress):
        folder = out_dir / f"seed{seed}"
        folder.mkdir(exist_ok=True)
        (folder / "epoch_001.safetensors").write_text("this run's")
        if seed == demo.FIRST_SEED + 1:
            raise KeyboardInterrupt
        return {"head_epochs": 1}

    monkeypatch.setattr(demo, "run_seed", run_seed)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, seeds=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [earlier.name]
    # the earlier run's folder whole: a seed trained again before the interruption did not
    # overwrite its files (this run's and the earlier run's files were mixed)
    assert (earlier / "epoch_001.safetensors").read_text() == "an earlier run's"
    # a first run interrupted leaves none of the folders it created
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "new" / "demo", seeds=3, progress=False)
    assert not (tmp_path / "new").exists()


def test_an_interrupted_demo_leaves_the_previous_runs_outputs_together(tmp_path, monkeypatch):
    from twa_kernels import demo

    out = tmp_path / "demo"
    out.mkdir()
    previous = {name: "previous run" for name in demo.OUTPUTS}
    previous["results.json"] = json.dumps({"dataset": "previous run", "runs": [], "summary": {}})  # a demo's record
    for name, text in previous.items():
        (out / name).write_text(text)
    runs = []

    def run_seed(seed, setting, out_dir, progress):
        runs.append(seed)
        (out_dir / f"seed{seed}").mkdir()
        (out_dir / f"seed{seed}" / "swa.safetensors").write_text(f"run {len(runs)}")
        return {"head_epochs": 1, "files": {"swa": str(out_dir / f"seed{seed}" / "swa.safetensors")}}

    monkeypatch.setattr(demo, "run_seed", run_seed)
    monkeypatch.setattr(demo, "summarize", lambda runs: {})
    monkeypatch.setattr(demo, "plot", lambda runs, summary, path: Path(path).write_text("new figure"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "plane_figure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, quick=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(demo.OUTPUTS)  # and no staging folder
    assert all((out / name).read_text() == text for name, text in previous.items())

    # run to the end, each output is replaced whole and through a symlink that stands in its place
    elsewhere = tmp_path / "kept-elsewhere.json"
    elsewhere.write_text(previous["results.json"])
    (out / "results.json").unlink()
    (out / "results.json").symlink_to(elsewhere)
    monkeypatch.setattr(demo, "plane_figure", lambda runs, setting, path, **kw: Path(path).write_text("new plane"))
    monkeypatch.setattr(demo, "format_table", lambda summary, n: "")
    (out / ".twa-demo-stage.999999999.abc").mkdir()  # a killed demo's, its process gone
    demo.run_demo(out, quick=True, progress=False)
    results = json.loads(elsewhere.read_text())
    assert (out / "results.json").is_symlink() and results["seeds"] == [demo.FIRST_SEED]
    seed_folder = f"seed{demo.FIRST_SEED}"
    assert results["runs"][0]["files"]["swa"] == str(out / seed_folder / "swa.safetensors")  # where it is now
    assert (out / "plane.png").read_text() == "new plane"
    assert sorted(p.name for p in out.iterdir()) == sorted([*demo.OUTPUTS, seed_folder])
    with pytest.raises(tk.errors.InvalidTypeError, match="out_dir must be a directory path"):
        demo.run_demo(123, quick=True, progress=False)
    # a full disk while the outputs are copied into place: none of them changes
    copyfile = shutil.copyfile

    def disk_full_at_the_plane(src, dst):
        if Path(src).name == "plane.png":
            raise OSError(28, "No space left on device")
        return copyfile(src, dst)

    monkeypatch.setattr(demo.shutil, "copyfile", disk_full_at_the_plane)
    monkeypatch.setattr(demo, "plot", lambda runs, summary, path: Path(path).write_text("newer figure"))
    with pytest.raises(tk.errors.OutputError, match="No space left on device.*previous file, if any, is unchanged"):
        demo.run_demo(out, quick=True, progress=False)
    assert (out / "accuracy.png").read_text() == "new figure" and (out / "plane.png").read_text() == "new plane"
    assert sorted(p.name for p in out.iterdir()) == sorted([*demo.OUTPUTS, seed_folder])
    finished = (out / seed_folder / "swa.safetensors").read_text()
    assert finished == "run 2"  # the folder of the run the outputs belong to, not the failed run's
    monkeypatch.setattr(demo.shutil, "copyfile", copyfile)
    # a seed folder that cannot be moved (the second of two): every earlier folder goes back
    earlier_second = out / f"seed{demo.FIRST_SEED + 1}"
    earlier_second.mkdir()
    (earlier_second / "swa.safetensors").write_text("earlier")
    replace = os.replace

    def unmovable(src, dst):
        if Path(src) == earlier_second:
            raise PermissionError(13, "Permission denied")
        return replace(src, dst)

    monkeypatch.setattr(demo.os, "replace", unmovable)
    with pytest.raises(tk.errors.OutputError, match="a seed folder could not be put in place.*Permission denied"):
        demo.run_demo(out, seeds=2, progress=False)
    monkeypatch.setattr(demo.os, "replace", replace)
    assert (out / seed_folder / "swa.safetensors").read_text() == finished
    assert (earlier_second / "swa.safetensors").read_text() == "earlier"
    assert (out / "accuracy.png").read_text() == "new figure"
    assert sorted(p.name for p in out.iterdir()) == sorted([*demo.OUTPUTS, seed_folder, earlier_second.name])
    # a symbolic link or a file where a seed's folder goes is refused before any training
    earlier_second.rename(tmp_path / "elsewhere")
    earlier_second.symlink_to(tmp_path / "elsewhere")
    trained = len(runs)
    with pytest.raises(tk.errors.OutputError, match=r"holds a symbolic link named seed\d+, where the demo puts"):
        demo.run_demo(out, seeds=2, progress=False)
    assert len(runs) == trained


@pytest.mark.parametrize("missing", ["mnist1d", "matplotlib"])
def test_the_demo_without_its_extra_names_the_extra_before_training(tmp_path, monkeypatch, missing):
    from twa_kernels.demo import run_demo

    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")] + [missing]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: `import` raises ImportError
    with pytest.raises(tk.errors.MissingDependencyError, match=r"needs %s.*pip install 'twa-kernels\[demo\]'" % missing):
        run_demo(tmp_path / "demo", quick=True, progress=False)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("seed", [None, 0, 7])
def test_the_demos_batches_are_the_dataloaders_batches(seed):
    """The demo takes each batch with one indexing; the batches and their order are those of
    a DataLoader over the same examples, so the demo's numbers do not depend on the trick."""
    from torch.utils.data import DataLoader, TensorDataset

    from twa_kernels.demo import batches

    dataset = TensorDataset(torch.randn(201, 1, 8), torch.randint(0, 10, (201,)))
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    expected = list(DataLoader(dataset, batch_size=64, shuffle=seed is not None, generator=generator))
    got = list(batches(dataset, 64, seed))
    assert len(got) == len(expected) == 4
    for (x, y), (x_expected, y_expected) in zip(got, expected):
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_paired_difference_interval():
    from twa_kernels.demo import paired_difference, t975

    d = paired_difference([1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.5, 1.0, 1.5, 2.0])
    diffs = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0], dtype=torch.float64)
    half = 2.776 * float(diffs.std()) / 5 ** 0.5
    assert d["mean"] == pytest.approx(2.0) and d["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert d["holds"]
    assert not paired_difference([1.0, 2.0, 3.0], [2.0, 1.0, 3.0])["holds"]  # mean 0: never excludes zero
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 4, 9, 30, 31, 60, 500):
        assert t975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=2e-3)


def test_the_demos_greedy_soup_is_measured_with_its_own_batchnorm_statistics():
    from torch.utils.data import TensorDataset

    from twa_kernels import demo

    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(96, 1, 40, generator=g), torch.randint(0, 10, (96,), generator=g))
    val = TensorDataset(torch.randn(32, 1, 40, generator=g), torch.randint(0, 10, (32,), generator=g))
    checkpoints = []
    for seed in range(3):
        state = demo.make_model(seed).state_dict()
        for key in state:
            if key.endswith("running_mean"):
                state[key] = torch.full_like(state[key], 5.0)  # statistics no average of these weights has
        checkpoints.append(state)
    soup, chosen = demo.greedy_soup_with_bn(demo.make_model(0), checkpoints, train, val, seed=0)
    expected = demo.make_model(0)
    expected.load_state_dict(soup.state_dict())
    torch.optim.swa_utils.update_bn(demo.bn_loader(train), expected)
    for (name, got), want in zip(soup.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    assert 1 <= len(chosen) <= 3 and not torch.allclose(soup[1].running_mean, torch.full((32,), 5.0))


# -- connect and plane check their inputs and --out before any evaluation --------------------


@pytest.fixture
def no_evaluation(project, monkeypatch):
    """main() in this process, from the project, with evaluation replaced by a failure."""
    from twa_kernels import connectivity

    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.syspath_prepend(str(project))

    def evaluated(*args, **kwargs):
        raise tk.errors.InvalidArgumentError("evaluation ran")

    monkeypatch.setattr(connectivity, "interpolate", evaluated)
    monkeypatch.setattr(connectivity, "plane", evaluated)
    return project


def _geometry(command, out, config):
    ckpts = [str(Path("ckpts") / f"epoch_{i}.pt") for i in range(3 if command == "plane" else 2)]
    return [command, *ckpts, "--config", str(config), "--out", str(out), "--no-progress"]


@pytest.mark.parametrize("command", ["connect", "plane"])
@pytest.mark.parametrize(
    "out,message",
    [
        ("c.txt", "matplotlib cannot save a '.txt' figure"),
        ("a-dir", "a-dir is a directory; give a file path"),
        ("a-file/c.png", "a-file is a file, not a directory"),
        (".", "names a directory, not a figure file"),
        ("", "names a directory, not a figure file"),
        # within the limit, but not with the temporary file's 14 more: it failed after the evaluation
        pytest.param("n" * 240 + ".png", "the temporary file it is written through needs 14 more", id="long-name"),
    ],
)
def test_geometry_commands_refuse_a_bad_out_before_evaluating(no_evaluation, capsys, command, out, message):
    from twa_kernels.cli import main

    (no_evaluation / "a-dir").mkdir(exist_ok=True)
    (no_evaluation / "a-file").write_text("not a directory")
    assert main(_geometry(command, out, _config(no_evaluation))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twa: error: --out") and message in err[0], err


def test_geometry_commands_create_missing_out_folders_only_when_writing(no_evaluation, capsys):
    # as every other output (fit, demo, atomic_write): missing parents are created, but only
    # once there is something to write; here evaluation fails, so nothing is left behind
    from twa_kernels.cli import main

    assert main(_geometry("connect", "new/sub/c.png", _config(no_evaluation))) == 2
    assert "evaluation ran" in capsys.readouterr().err and not (no_evaluation / "new").exists()


@pytest.mark.parametrize(
    "config,message",
    [
        ("binary", "binary.yaml: not a UTF-8 text file"),
        ("loss", "loss: 'userpkg:NOT_CALLABLE' is int, not callable"),
    ],
)
def test_geometry_commands_name_a_bad_config_before_evaluating(no_evaluation, capsys, config, message):
    from twa_kernels.cli import main

    if config == "binary":
        path = no_evaluation / "binary.yaml"
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    else:
        path = _config(no_evaluation, loss="userpkg:NOT_CALLABLE")
    assert main(_geometry("connect", "c.png", path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("command", ["connect", "plane"])
def test_geometry_commands_take_a_loss_class_as_fit_does(project, monkeypatch, tmp_path, capsys, command):
    # torch.nn:CrossEntropyLoss is made with its defaults, then called as the loss function is
    from twa_kernels.cli import main

    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.syspath_prepend(str(project))
    losses = []
    for i, loss in enumerate(("torch.nn:CrossEntropyLoss", "torch.nn.functional:cross_entropy")):
        out = tmp_path / f"{command}-{i}.png"
        args = _geometry(command, out, _config(project, loss=loss))
        args += ["--steps", "2"] if command == "connect" else ["--grid", "2"]
        assert main(args) == 0, capsys.readouterr().err
        written = json.loads(out.with_suffix(".json").read_text())
        losses.append(torch.tensor(written["loss"]).flatten().tolist())
        assert written["stamp"]["twa_kernels"] and written["stamp"]["datetime"]  # where the numbers came from
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_geometry_commands_resolve_every_import_string_before_building_the_model(no_evaluation, capsys):
    from twa_kernels.cli import main

    (no_evaluation / "marked.py").write_text("from pathlib import Path\nfrom userpkg import make_model as _make\n"
                                             "def make_model():\n    Path('model-built').touch()\n"
                                             "    return _make()\n")
    config = _config(no_evaluation, model="marked:make_model",
                     data=dict(train="userpkg:train_loader", val="userpkg:val_laoder"))
    assert main(_geometry("connect", "c.png", config) + ["--split", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.val: unknown import string 'userpkg:val_laoder'" in err[0], err
    assert not (no_evaluation / "model-built").exists()


# -- the demo checks its options before creating anything ----------------------------------


@pytest.mark.parametrize("seeds", [0, -1])
def test_the_demo_refuses_no_seeds_and_creates_nothing(tmp_path, capsys, seeds):
    from twa_kernels.cli import main

    assert main(["demo", "--seeds", str(seeds), "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seeds must be an int >= 1 (the number of seeds to run" in err[0]
    assert err[0].endswith(f"got {seeds}")
    assert not (tmp_path / "demo").exists()


def test_the_demo_refuses_an_out_that_is_a_file(tmp_path, capsys):
    from twa_kernels.cli import main

    (tmp_path / "a-file").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path / "a-file"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a directory" in err[0], err
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_sigterm_during_a_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    # SIGTERM's default action ends the process at once, leaving an atomic write's temporary
    # file behind; under the command it raises instead, so the write cleans up after itself
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        from twa_kernels import cli
        from twa_kernels.io import atomic_write

        def write(tmp):
            Path(tmp).write_text("half of a file")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises before this ends

        terminated = []
        try:
            with cli._terminate_as_exception(terminated):
                atomic_write({str(tmp_path / "out.txt")!r}, write)
        except SystemExit as exc:
            print(exc.code)
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, terminated == [signal.SIGTERM])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["143", "True", "True"] and done.stderr.strip() == "twa: terminated", \
        done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum, stop", [(signal.SIGTERM, "SystemExit 143"),
                                           (signal.SIGINT, "KeyboardInterrupt")], ids=["SIGTERM", "SIGINT"])
def test_a_stop_whose_handler_ran_inside_a_weakref_callback_is_not_lost(signum, stop):
    # Python swallows an exception raised in a weakref callback or __del__ (the import system's
    # module locks have such a callback): a SIGTERM or Ctrl-C landing there was lost and `twa
    # fit` went on training. The command delivers the signal again, outside the callback.
    code = textwrap.dedent(f"""
        import os, signal, time, weakref
        from twa_kernels import cli

        class Anything:
            pass

        def signalled_in_callback(ref):
            os.kill(os.getpid(), {int(signum)})
            for _ in range(100_000):  # the handler runs here, between two bytecodes of the callback
                pass

        terminated = []
        try:
            with cli._terminate_as_exception(terminated), cli._stops_survive_callbacks(terminated):
                thing = Anything()
                ref = weakref.ref(thing, signalled_in_callback)
                del thing
                time.sleep(20)  # the signal sent again ends the sleep
            print("went on")
        except SystemExit as exc:
            print("SystemExit", exc.code)
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
    """)
    done = _run_with_default_sigint(code)
    assert done.stdout.strip() == stop and "Exception ignored" not in done.stderr, done.stdout + done.stderr[-2000:]
    assert done.stderr.count("twa: terminated") == (signum == signal.SIGTERM), done.stderr[-2000:]


@pytest.mark.parametrize("signum, status, line", [(signal.SIGTERM, 143, "twa: terminated"),
                                                 (signal.SIGINT, 130, "twa: interrupted")], ids=["SIGTERM", "SIGINT"])
def test_a_stop_swallowed_just_before_the_command_returns_still_stops_it(signum, status, line):
    # the stop is sent again some milliseconds later: a command that returned first exited 0
    # after saying `twa: terminated`
    code = textwrap.dedent(f"""
        import os, sys, weakref
        from twa_kernels import cli

        class Anything:
            pass

        def signalled_in_callback(ref):
            os.kill(os.getpid(), {int(signum)})
            for _ in range(100_000):
                pass

        def finishing_command(args):
            thing = Anything()
            ref = weakref.ref(thing, signalled_in_callback)
            del thing
            return 0

        cli._build_command = finishing_command
        sys.exit(cli.main(["build"]))
    """)
    done = _run_with_default_sigint(code)
    assert done.returncode == status and done.stderr.strip() == line, (done.returncode, done.stderr[-2000:])


def _run_with_default_sigint(code: str) -> subprocess.CompletedProcess:
    """`code` in a Python of its own, importing this checkout, with Ctrl-C's default
    disposition: a suite started in the background by a non-interactive shell (as a CI
    runner may start it) has SIGINT ignored, which its children inherit."""
    package_root = str(Path(tk.__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": package_root},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_importing_the_library_leaves_torch_compile_unloaded():
    # the TWA class's compile-disabled method imported torch._dynamo when the class was
    # defined: 1.7 s more for every `twa --help` and every script, before any work
    package_root = str(Path(tk.__file__).resolve().parents[1])
    code = "import sys, twa_kernels, twa_kernels.cli; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": package_root})
    assert done.stdout.split() == ["False"], done.stderr[-2000:]
