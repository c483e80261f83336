"""twa_kernels.lightning.TrainableWeightAveraging with the real Lightning Trainer: it keeps
the epochs it should, trains the coefficients as a plain TWA loop over the same files does,
validates at the averaged weights, resumes from a checkpoint of its TWA epochs, and names
what it cannot do."""

from __future__ import annotations

import copy
import re
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import twa_kernels as tk
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, UsageError
from twa_kernels.lightning import TrainableWeightAveraging

_gen = torch.Generator().manual_seed(0)
_X = torch.randn(96, 10, generator=_gen)
_Y = (_X[:, 0] + 0.5 * _X[:, 1] > 0).long()
_VAL = (torch.randn(40, 10, generator=_gen),)
_VAL = (_VAL[0], (_VAL[0][:, 0] + 0.5 * _VAL[0][:, 1] > 0).long())


class _Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)]


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(_X, _Y), batch_size=16)  # in order: the batches of every run are the same


def _trainer(root: Path, epochs: int = 4, callbacks=(), **kwargs) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks),
                     enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs)


def _fit(root: Path, callback: TrainableWeightAveraging, val: bool = True, callbacks=(),
         **kwargs) -> tuple[_Net, L.Trainer]:
    net = _Net()
    trainer = _trainer(root, callbacks=[callback, *callbacks], **kwargs)
    trainer.fit(net, _loader(), DataLoader(TensorDataset(*_VAL), batch_size=40) if val else None)
    return net, trainer


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("twa_callback")
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    net, trainer = _fit(root, callback)
    return root, callback, net, trainer


def test_the_epochs_from_start_epoch_are_kept_and_the_trainer_is_left_as_configured(straight_run):
    root, callback, net, trainer = straight_run
    assert [Path(p).name for p in callback.snapshots] == ["epoch=1.safetensors", "epoch=2.safetensors",
                                                          "epoch=3.safetensors"]
    folder = Path(callback.snapshots[0]).parent  # a folder of this run's own under twa_snapshots
    assert folder.parent == root / "twa_snapshots" and folder.name.startswith("run-")
    assert all(Path(p).parent == folder for p in callback.snapshots)
    assert trainer.current_epoch == 6 and trainer.max_epochs == 4  # 4 epochs of SGD, 2 of TWA
    # the run's optimizer and scheduler, not the coefficients' AdamW
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and len(trainer.lr_scheduler_configs) == 1
    assert "training_step" not in vars(net) and "validation_step" not in vars(net)
    with warnings.catch_warnings():  # the statistics it measured, loaded into the module with the weights: current
        warnings.simplefilter("error")
        callback.twa.averaged_state_dict()


def test_the_callback_gives_what_a_plain_twa_loop_over_its_files_gives(straight_run):
    _, callback, net, trainer = straight_run
    # the module as the SGD epochs left it: the last snapshot, BatchNorm statistics included
    plain = _Net()
    plain.load_state_dict(tk.load_state_dict(callback.snapshots[-1]))
    twa = tk.TWA(plain, callback.snapshots, bits=4, granularity="tensor")
    opt = torch.optim.AdamW(twa.parameters(), lr=0.02, weight_decay=0.0)
    for _ in range(2):
        twa.train()
        for x, y in _loader():
            opt.zero_grad()
            F.cross_entropy(twa(x), y).backward()
            opt.step()
        twa.eval()
        with torch.no_grad():  # the last epoch's validation runs at the averaged weights
            val_loss = F.cross_entropy(twa(_VAL[0]), _VAL[1])
    torch.testing.assert_close(callback.twa.coefficients, twa.coefficients, rtol=0, atol=1e-6)
    assert not torch.equal(twa.coefficients, torch.zeros_like(twa.coefficients))
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], val_loss, rtol=1e-5, atol=1e-6)
    twa.update_bn(_loader())
    expected = twa.averaged_state_dict()
    got = net.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the module holds the averaged weights, not the last epoch's
    assert not torch.equal(got["model.0.weight"], tk.load_state_dict(callback.snapshots[-1])["model.0.weight"])


def test_a_callback_used_for_a_second_fit_trains_a_twa_of_its_own(tmp_path):
    # it kept the first fit's TWA, snapshot folder and epochs: the second module ended with the first's weights
    callback = TrainableWeightAveraging(start_epoch=2, twa_epochs=1)
    first, _ = _fit(tmp_path / "a", callback, val=False)
    first_twa = callback.twa
    second = _Net()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.5 * torch.randn_like(p))
    _trainer(tmp_path / "b", callbacks=[callback]).fit(second, _loader())
    assert callback.twa is not first_twa and len(callback.snapshots) == 2
    assert all(Path(p).parent.parent == tmp_path / "b" / "twa_snapshots" for p in callback.snapshots)
    assert not torch.equal(callback.twa.coefficients, torch.zeros_like(callback.twa.coefficients))
    assert not torch.allclose(second.state_dict()["model.0.weight"], first.state_dict()["model.0.weight"])


def test_a_run_resumed_from_a_checkpoint_of_its_twa_epochs_ends_where_the_straight_run_ends(straight_run, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, _, straight, _ = straight_run
    saving = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_top_k=-1, every_n_epochs=1)
    _, first = _fit(tmp_path / "first", TrainableWeightAveraging(start_epoch=1, twa_epochs=2), callbacks=[saving])
    # the last TWA epoch's checkpoint holds the model its validation measured (ckpt_path="best")
    last = _Net().eval()
    last.load_state_dict(torch.load(next((tmp_path / "ckpts").glob("epoch=5-*.ckpt")), weights_only=True)["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(F.cross_entropy(last(_VAL[0]), _VAL[1]), first.callback_metrics["val_loss"],
                                   rtol=1e-5, atol=1e-6)
    # a later TWA over the folder would count those averages as points of the run: named
    with pytest.warns(UserWarning, match="epoch=5-.*a checkpoint of a TWA epoch of the Lightning"):
        tk.uniform_average(str(tmp_path / "ckpts"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.uniform_average(sorted((tmp_path / "ckpts").glob("epoch=[0-2]-*.ckpt")))  # the run's own: no word
        first.save_checkpoint(tmp_path / "final.ckpt")  # after fit, as the guide says: the final model
        tk.load_state_dict(tmp_path / "final.ckpt")
    # resumed after the first TWA epoch (epoch 4), by a new Trainer and a new callback
    ckpt = next((tmp_path / "ckpts").glob("epoch=4-*.ckpt"))
    net, trainer = _Net(), _trainer(tmp_path / "first", callbacks=[TrainableWeightAveraging(start_epoch=1,
                                                                                              twa_epochs=2)])
    trainer.fit(net, _loader(), DataLoader(TensorDataset(*_VAL), batch_size=40), ckpt_path=str(ckpt))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    # resumed with another granularity, the saved coefficients do not fit: named, not a torch error
    trainer = _trainer(tmp_path / "first", callbacks=[TrainableWeightAveraging(start_epoch=1, granularity="model")])
    with pytest.raises(UsageError, match=r"coefficients are \(3, \d+\) but this callback's TWA has \(3, 1\)"):
        trainer.fit(_Net(), _loader(), ckpt_path=str(ckpt))
    # resumed with a layer frozen that trained before (BackboneFinetuning leaves it so): named too
    frozen = _Net()
    frozen.model[0].requires_grad_(False)
    trainer = _trainer(tmp_path / "first", callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=2)])
    with pytest.raises(UsageError, match=r"same parameters trainable \(requires_grad\)"):
        trainer.fit(frozen, _loader(), ckpt_path=str(ckpt))


def test_a_run_resumed_from_the_checkpoint_of_its_last_twa_epoch_ends_where_the_straight_run_ends(straight_run,
                                                                                                  tmp_path):
    # a job stopped between its last checkpoint and the end of fit: Lightning's fit loop has
    # no epoch left and skips on_train_end, which left the module with the checkpoint's state
    # (the averaged weights, but the BatchNorm statistics of the TWA epochs), without a word
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, _, straight, _ = straight_run
    saving = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_last=True)
    first = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    _fit(tmp_path / "first", first, callbacks=[saving])
    ckpt = tmp_path / "ckpts" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 5  # the last TWA epoch
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    net, trainer = _Net(), _trainer(tmp_path / "first", callbacks=[callback])
    trainer.fit(net, _loader(), DataLoader(TensorDataset(*_VAL), batch_size=40), ckpt_path=str(ckpt))
    got = net.state_dict()
    assert got.keys() == straight.state_dict().keys()
    for key, value in straight.state_dict().items():  # the weights, and the statistics recomputed at them
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    assert int(net.model[1].num_batches_tracked) == 6  # one pass over the training batches, not the TWA epochs'
    assert trainer.current_epoch == 6 and trainer.max_epochs == 4
    assert callback.twa is not None and callback.snapshots == first.snapshots
    torch.testing.assert_close(callback.twa.coefficients, first.twa.coefficients, rtol=0, atol=0)
    assert "training_step" not in vars(net) and "validation_step" not in vars(net)
    # what cannot be finished is named, not left as the checkpoint's weights
    Path(first.snapshots[0]).unlink()
    trainer = _trainer(tmp_path / "first", callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=2)])
    with pytest.raises(tk.errors.CheckpointError, match="epoch=1.safetensors is gone"):
        trainer.fit(_Net(), _loader(), ckpt_path=str(ckpt))


def test_a_finished_run_fitted_again_on_the_same_trainer_is_named_not_left_unfinished(tmp_path):
    net, callback = _Net(), TrainableWeightAveraging(start_epoch=1, twa_epochs=1)
    trainer = _trainer(tmp_path, epochs=3, callbacks=[callback])
    trainer.fit(net, _loader())
    with pytest.raises(UsageError, match=r"starts at epoch 4, after the TWA epochs \(epochs 3..3\), with no trained"):
        trainer.fit(net, _loader())  # no epoch left to run: nothing of this fit to average


def test_a_resumed_run_with_nothing_left_to_run_keeps_the_statistics_of_frozen_batchnorm(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class FrozenNorm(_Net):
        def on_train_epoch_start(self):
            self.model[1].eval()  # a hook the resumed fit, with no epoch to run, never calls

    saving = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_last=True)
    _trainer(tmp_path, epochs=3, callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=1), saving]).fit(
        FrozenNorm(), _loader())
    net = FrozenNorm()
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=1)
    _trainer(tmp_path, epochs=3, callbacks=[callback]).fit(net, _loader(), ckpt_path=str(tmp_path / "ckpts" /
                                                                                           "last.ckpt"))
    assert callback.twa is not None
    norm = net.model[1]
    assert torch.equal(norm.running_mean, torch.zeros(16)) and torch.equal(norm.running_var, torch.ones(16))
    assert int(norm.num_batches_tracked) == 0


def test_a_run_resumed_before_its_twa_epochs_keeps_the_epochs_it_kept(straight_run, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, _, straight, _ = straight_run
    saving = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_top_k=-1, every_n_epochs=1)
    first = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    _fit(tmp_path / "first", first, callbacks=[saving])
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    net, trainer = _Net(), _trainer(tmp_path / "first", callbacks=[callback])
    trainer.fit(net, _loader(), DataLoader(TensorDataset(*_VAL), batch_size=40),
                ckpt_path=str(next((tmp_path / "ckpts").glob("epoch=2-*.ckpt"))))
    # the resumed epoch 3 went beside the epochs it kept, in a file of its own: the earlier
    # fit's epoch=3.safetensors, which its later checkpoints name, is left as it was
    assert callback.snapshots[:2] == first.snapshots[:2]
    assert Path(callback.snapshots[2]).parent == Path(first.snapshots[2]).parent
    assert re.fullmatch(r"epoch=3\.[0-9a-f]+\.safetensors", Path(callback.snapshots[2]).name)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_a_fraction_of_max_epochs_and_a_custom_optimizer_and_bn_call(tmp_path):
    calls = []

    def feed(module, batch):
        calls.append(len(batch[0]))
        module(batch[0])

    callback = TrainableWeightAveraging(start_epoch=0.5, twa_epochs=1, bits=None,
                                        optimizer=partial(torch.optim.SGD, lr=0.05), update_bn=feed)
    _fit(tmp_path, callback, val=False)
    assert [Path(p).name for p in callback.snapshots] == ["epoch=2.safetensors", "epoch=3.safetensors"]
    assert isinstance(callback._twa_optimizer, torch.optim.SGD) and callback.twa.bits is None
    assert calls == [16] * 6  # one pass over the training data


def test_training_stopped_before_the_twa_epochs_warns_and_keeps_the_modules_weights(tmp_path):
    class StopAtEpoch2(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                trainer.should_stop = True

    callback = TrainableWeightAveraging(start_epoch=1)
    with pytest.warns(RuntimeWarning, match="stopped at epoch 3, before the TWA epochs"):
        net, _ = _fit(tmp_path, callback, val=False, callbacks=[StopAtEpoch2()])
    assert Path(callback.snapshots[-1]).name == "epoch=2.safetensors"
    assert torch.equal(net.state_dict()["model.0.weight"],
                       tk.load_state_dict(callback.snapshots[-1])["model.0.weight"])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(start_epoch=-1), InvalidArgumentError, "start_epoch must be"),
    (dict(start_epoch=1.5), InvalidArgumentError, "start_epoch must be"),
    (dict(start_epoch=True), InvalidTypeError, "start_epoch must be"),
    (dict(start_epoch="half"), InvalidTypeError, "start_epoch must be"),
    (dict(twa_epochs=0), InvalidArgumentError, "twa_epochs must be"),
    (dict(twa_epochs=True), InvalidTypeError, "twa_epochs must be an int >= 1"),
    (dict(optimizer="adamw"), InvalidArgumentError, "optimizer must be a function"),
    (dict(update_bn="yes"), InvalidArgumentError, "update_bn must be"),
    (dict(bits=3), InvalidArgumentError, "bits"),
    (dict(granularity="row"), InvalidArgumentError, "granularity"),
])
def test_bad_settings_are_named_where_the_callback_is_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainableWeightAveraging(**kwargs)


def test_a_start_past_the_run_and_a_step_limit_are_named_before_training(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"start_epoch 3 is epoch 3, but the run has epochs 0\.\.3 and "
                                                   r"TWA needs at least two of them: start at epoch 2"):
        _fit(tmp_path, TrainableWeightAveraging(start_epoch=3), val=False)  # one checkpoint spans no subspace
    with pytest.raises(UsageError, match="counts epochs: give the Trainer max_epochs"):
        _fit(tmp_path, TrainableWeightAveraging(start_epoch=1), val=False, max_steps=10)


def test_manual_optimization_is_named(tmp_path):
    class Manual(_Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(UsageError, match="manual optimization"):
        _trainer(tmp_path, callbacks=[TrainableWeightAveraging(start_epoch=1)]).fit(Manual(), _loader())


@pytest.mark.parametrize("other", ["StochasticWeightAveraging", "EMAWeightAveraging"])
def test_another_weight_averaging_callback_in_the_trainer_is_named(tmp_path, other):
    # EMA's average replaced TWA's in the module without a word; SWA added an epoch of its own
    if not hasattr(L.pytorch.callbacks, other):  # an older Lightning, without WeightAveraging
        pytest.skip(f"this Lightning has no {other}")
    kind = getattr(L.pytorch.callbacks, other)
    made = kind(swa_lrs=0.01) if other == "StochasticWeightAveraging" else kind()
    with pytest.raises(UsageError, match=rf"also has {other}.*use one weight-averaging callback per Trainer"):
        _trainer(tmp_path, callbacks=[TrainableWeightAveraging(start_epoch=1), made]).fit(_Net(), _loader())


def test_without_lightning_the_import_names_the_extra():
    import subprocess
    import sys

    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "from twa_kernels.errors import MissingDependencyError\n"
            "try:\n    import twa_kernels.lightning\nexcept MissingDependencyError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'twa-kernels[lightning]'" in done.stdout, done.stderr[-2000:]


def test_an_error_in_the_twa_epochs_leaves_the_module_with_its_own_steps(tmp_path):
    class FailInTWAEpoch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 4 and batch_idx == 2:
                raise ValueError("stop here")

    net = _Net()
    with pytest.raises(ValueError, match="stop here"):
        _trainer(tmp_path, callbacks=[TrainableWeightAveraging(start_epoch=1), FailInTWAEpoch()]).fit(net, _loader())
    assert "training_step" not in vars(net) and "validation_step" not in vars(net)
    assert net.training_step.__func__ is _Net.training_step


class _UnloggedNet(_Net):  # Lightning 2.6 cannot self.log inside a compiled step
    def training_step(self, batch, _):
        return F.cross_entropy(self(batch[0]), batch[1])


def test_a_compiled_module_trains_the_coefficients_and_gets_its_compiled_steps_back(tmp_path):
    # Lightning keeps a compiled module's steps on the instance, which the callback took for
    # its own wrappers: the TWA epochs ran at the module's own weights, the coefficients
    # stayed 0
    runs = {}
    for compiled in (False, True):
        callback, net = TrainableWeightAveraging(start_epoch=1, twa_epochs=2), _UnloggedNet()
        _trainer(tmp_path / str(compiled), callbacks=[callback]).fit(
            torch.compile(net, backend="eager") if compiled else net, _loader())
        runs[compiled] = callback.twa.coefficients.detach().clone(), net
    assert runs[False][0].abs().sum() > 0
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-6)
    compiled_net = runs[True][1]
    assert "training_step" in vars(compiled_net) and not isinstance(vars(compiled_net)["training_step"], partial)


def test_several_training_loaders_with_batchnorm_are_named_before_training(tmp_path):
    class TwoLoaders(_Net):
        def training_step(self, batch, _):
            return F.cross_entropy(self(batch["a"][0]), batch["a"][1]) + F.cross_entropy(self(batch["b"][0]),
                                                                                       batch["b"][1])

    trainer = _trainer(tmp_path, callbacks=[TrainableWeightAveraging(start_epoch=1)])
    with pytest.raises(UsageError, match="trains on 2 loaders at once.*pass update_bn=False"):
        trainer.fit(TwoLoaders(), {"a": _loader(), "b": _loader()})
    assert trainer.current_epoch == 0


def test_mixed_precision_clipping_and_accumulation_train_the_coefficients(tmp_path):
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=1)
    net, _ = _fit(tmp_path, callback, val=False, precision="bf16-mixed", gradient_clip_val=0.05,
                  accumulate_grad_batches=2)
    coefficients = callback.twa.coefficients
    assert torch.isfinite(coefficients).all() and coefficients.abs().max() > 0
    assert coefficients.dtype == torch.float32  # the Trainer's precision casts the model's compute, not these
    assert all(torch.isfinite(v).all() for v in net.state_dict().values() if v.is_floating_point())


def test_a_remote_root_directory_asks_for_a_local_dirpath(tmp_path):
    trainer = _trainer("s3://bucket/run", callbacks=[TrainableWeightAveraging(start_epoch=1)])
    with pytest.raises(UsageError, match="pass dirpath= a local directory"):
        trainer.fit(_Net(), _loader())


def test_runs_sharing_a_root_directory_keep_their_snapshots_apart(tmp_path):
    first, second = (TrainableWeightAveraging(start_epoch=2, twa_epochs=1) for _ in range(2))
    _fit(tmp_path, first, val=False)
    _fit(tmp_path, second, val=False)
    assert not set(first.snapshots) & set(second.snapshots)
    assert all(Path(p).exists() for p in first.snapshots + second.snapshots)


def test_a_snapshot_written_over_by_another_run_is_named_before_the_twa_uses_it(tmp_path):
    class OverwriteFirstSnapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 3:  # after the last kept epoch, before the TWA is built
                other = {k: v + 1 if v.is_floating_point() else v for k, v in pl_module.state_dict().items()}
                tk.save_state_dict(other, callback.snapshots[0])

    callback = TrainableWeightAveraging(start_epoch=1)
    with pytest.raises(tk.errors.CheckpointError, match="epoch=1.safetensors no longer holds the weights this run"):
        _fit(tmp_path, callback, val=False, callbacks=[OverwriteFirstSnapshot()])


def test_the_final_statistics_pass_stops_where_limit_train_batches_stops_the_epochs(tmp_path):
    calls = []

    def feed(module, batch):
        calls.append(len(batch[0]))
        module(batch[0])

    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=1, update_bn=feed)
    _fit(tmp_path, callback, val=False, limit_train_batches=2)
    assert calls == [16, 16]  # the epochs saw 2 of the loader's 6 batches, and so does the pass


def test_a_module_without_forward_is_named_before_training_when_batchnorm_needs_it(tmp_path):
    class NoForward(_Net):
        forward = L.LightningModule.forward

        def training_step(self, batch, _):
            return F.cross_entropy(self.model(batch[0]), batch[1])

    trainer = _trainer(tmp_path, callbacks=[TrainableWeightAveraging(start_epoch=1)])
    with pytest.raises(UsageError, match="defines none: define forward, or pass update_bn=function"):
        trainer.fit(NoForward(), _loader())
    assert trainer.current_epoch == 0
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=1, update_bn=lambda m, b: m.model(b[0]))
    _trainer(tmp_path, callbacks=[callback]).fit(NoForward(), _loader())
    assert callback.twa is not None


class _SkipsAnEpoch(torch.utils.data.Sampler):
    """In order, but empty in one epoch: what a fit resumed from a checkpoint at an epoch's
    last batch sees from a loader that keeps its place (torchdata's StatefulDataLoader)."""

    def __init__(self, n: int, empty: int):
        self.n, self.empty, self.epoch = n, empty, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(()) if self.epoch == self.empty else iter(range(self.n))


def test_an_epoch_that_ran_no_batch_is_not_kept_as_a_copy_of_the_one_before(tmp_path):
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    loader = DataLoader(TensorDataset(_X, _Y), batch_size=16, sampler=_SkipsAnEpoch(len(_X), empty=2))
    with pytest.warns(RuntimeWarning, match="epoch 2 ran no training batch"):
        _trainer(tmp_path, callbacks=[callback]).fit(_Net(), loader)
    assert [Path(p).name for p in callback.snapshots] == ["epoch=1.safetensors", "epoch=3.safetensors"]


def test_a_fit_resumed_at_the_end_of_a_kept_epoch_re_enters_it_without_a_word(tmp_path):
    # Lightning re-enters that epoch with no batch; the callback warned that it dropped a
    # snapshot it in fact held
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_top_k=-1, filename="{epoch}-{step}")
    val = DataLoader(TensorDataset(*_VAL), batch_size=40)
    _trainer(tmp_path / "first", callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=2), saving],
             val_check_interval=0.5).fit(_Net(), _loader(), val)
    ends = sorted((tmp_path / "ckpts").glob("epoch=1-*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path / "resumed", callbacks=[callback], val_check_interval=0.5).fit(
            _Net(), _loader(), val, ckpt_path=str(ends[-1]))
    assert not [w for w in caught if "ran no training batch" in str(w.message)]
    assert [_epoch(p) for p in callback.snapshots] == [1, 2, 3]


def _epoch(path: str) -> int:
    return int(Path(path).name.split("=")[1].split(".")[0])


def test_fast_dev_run_leaves_the_callback_out_with_a_warning(tmp_path):
    callback = TrainableWeightAveraging(start_epoch=1)
    with pytest.warns(UserWarning, match="does nothing under fast_dev_run"):
        _fit(tmp_path, callback, val=False, fast_dev_run=True)
    assert callback.snapshots == [] and callback.twa is None


def test_batchnorm_the_run_keeps_in_eval_mode_keeps_its_statistics(tmp_path):
    class FrozenNorm(_Net):
        def on_train_epoch_start(self):
            self.model[1].eval()  # fine-tuning with frozen BatchNorm statistics

    net = FrozenNorm()
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=1)
    _trainer(tmp_path, callbacks=[callback]).fit(net, _loader())
    norm = net.model[1]
    assert torch.equal(norm.running_mean, torch.zeros(16)) and torch.equal(norm.running_var, torch.ones(16))
    assert int(norm.num_batches_tracked) == 0


def test_batchnorm_in_train_mode_is_recomputed_at_the_averaged_weights(tmp_path):
    net = _Net()
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=1)
    _trainer(tmp_path, callbacks=[callback]).fit(net, _loader())
    assert int(net.model[1].num_batches_tracked) == 6  # one cumulative pass over the 6 training batches


def _measured_statistics(net: L.LightningModule, frozen: tuple[int, ...] = (), prepare=lambda batch: batch) -> dict:
    """The module's BatchNorm statistics measured at its present weights by one cumulative
    pass over the training batches, the layers in `frozen` run in eval mode as they are."""
    ref = copy.deepcopy(net).train()
    for i, m in enumerate(ref.model):
        if isinstance(m, nn.BatchNorm1d):
            if i in frozen:
                m.eval()
            else:
                m.reset_running_stats()
                m.momentum = None
    with torch.no_grad():
        for batch in _loader():
            ref(prepare(batch)[0])
    return {k: v for k, v in ref.state_dict().items() if "running" in k}


def test_batchnorm_after_a_frozen_one_is_measured_with_the_frozen_one_in_eval_mode(tmp_path):
    class FrozenFirstNorm(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                                       nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
            with torch.no_grad():  # pretrained statistics, far from this data's batch statistics
                self.model[1].running_mean.fill_(1.0)
                self.model[1].running_var.fill_(4.0)

        def on_train_epoch_start(self):
            self.model[1].eval()

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    net = FrozenFirstNorm()
    _trainer(tmp_path, epochs=3, callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=1)]).fit(net, _loader())
    assert torch.equal(net.model[1].running_mean, torch.ones(16)) and int(net.model[1].num_batches_tracked) == 0
    expected = _measured_statistics(net, frozen=(1,))  # the second layer ran after the frozen one in batch mode before
    for key, value in expected.items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert net.training and not net.model[1].training, "the modes Lightning leaves, not the TWA's eval mode"


def test_the_statistics_pass_sees_the_batches_as_the_training_steps_saw_them(tmp_path):
    class Rescaled(_Net):
        def on_after_batch_transfer(self, batch, dataloader_idx):  # e.g. raw inputs scaled on the device
            return batch[0] * 10 + 3, batch[1]

    net = Rescaled()
    _trainer(tmp_path, epochs=3, callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=1)]).fit(net, _loader())
    expected = _measured_statistics(net, prepare=lambda batch: net.on_after_batch_transfer(batch, 0))
    for key, value in expected.items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_the_statistics_pass_runs_a_datamodules_batch_hook_as_the_training_steps_did(tmp_path):
    # the pass called the module's on_before_batch_transfer, and a DataModule's own hook
    # (which Lightning calls instead) never ran: statistics of inputs training never saw
    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return _loader()

        def on_before_batch_transfer(self, batch, dataloader_idx):
            return batch[0] * 10 + 5, batch[1]

    net = _Net()
    _trainer(tmp_path, epochs=3, callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=1)]).fit(
        net, datamodule=Data())
    expected = _measured_statistics(net, prepare=lambda batch: (batch[0] * 10 + 5, batch[1]))
    for key, value in expected.items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_a_bfloat16_run_recomputes_its_statistics_on_bfloat16_batches(tmp_path):
    net = _Net()
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=1)
    _trainer(tmp_path, epochs=3, callbacks=[callback], precision="bf16-true").fit(net, _loader())
    assert net.model[0].weight.dtype == torch.bfloat16 and int(net.model[1].num_batches_tracked) == 6


def test_a_statistics_pass_that_fails_says_how_to_finish_and_keeps_the_trained_twa(tmp_path):
    class KeywordBatches(_Net):
        def training_step(self, batch, _):
            return F.cross_entropy(self(batch["x"]), batch["y"])

    loader = DataLoader([{"x": x, "y": y} for x, y in zip(_X, _Y)], batch_size=16)
    net, callback = KeywordBatches(), TrainableWeightAveraging(start_epoch=1, twa_epochs=1)
    with pytest.raises(UsageError, match=r"fed each training batch to forward\(\).*a mapping as keyword arguments\)"
                                         r", which failed: InvalidArgumentError: .*its forward does not take"
                                         r".*callback's `.twa`"):
        _trainer(tmp_path, epochs=3, callbacks=[callback]).fit(net, loader)
    assert callback.twa is not None and callback.twa.coefficients.abs().sum() > 0
    callback.twa.update_bn(loader, lambda model, batch: model(batch["x"]))  # the way the message gives
    net.load_state_dict(callback.twa.averaged_state_dict())
    assert int(net.model[1].num_batches_tracked) == 6


def test_a_library_error_in_the_statistics_pass_says_how_to_finish_too(tmp_path):
    # a library error raised inside the pass went out bare, without the way to finish by hand
    def measure(module, batch):
        raise tk.errors.InvalidArgumentError("this batch cannot be measured")

    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=1, update_bn=measure)
    with pytest.raises(UsageError, match=r"called update_bn\(module, batch\).*which failed: InvalidArgumentError: this "
                                         r"batch cannot be measured.*callback's `.twa`: recompute them") as caught:
        _trainer(tmp_path, epochs=3, callbacks=[callback]).fit(_Net(), _loader())
    assert "next time pass update_bn=function" not in str(caught.value)  # it was given one
    assert callback.twa is not None


def test_a_second_fit_on_the_same_trainer_is_named_before_it_averages_a_part_of_the_run(tmp_path):
    net, callback = _Net(), TrainableWeightAveraging(start_epoch=1, twa_epochs=1)
    trainer = _trainer(tmp_path, epochs=3, callbacks=[callback])
    trainer.fit(net, _loader())
    trainer.fit_loop.max_epochs = 8
    with pytest.raises(UsageError, match="keeps epochs 1..7, but this Trainer starts at epoch 4"):
        trainer.fit(net, _loader())


@pytest.mark.parametrize("progress, shown", [(None, False), (True, True)])
def test_the_basis_bars_follow_the_trainers_progress_bar_unless_asked(tmp_path, monkeypatch, progress, shown):
    # the callback had no progress= and drew its bars on a terminal under enable_progress_bar=False
    import twa_kernels.lightning as tl

    asked = []
    real = tl.TWA

    def recording(*args, **kwargs):
        asked.append(kwargs["progress"])
        return real(*args, **dict(kwargs, progress=False))

    monkeypatch.setattr(tl, "TWA", recording)
    _fit(tmp_path, TrainableWeightAveraging(start_epoch=1, twa_epochs=1, progress=progress), epochs=3)
    assert asked == [shown]
    with pytest.raises(tk.errors.InvalidTypeError, match="progress must be True, False or None"):
        TrainableWeightAveraging(progress="no")


def test_a_run_resumed_from_a_checkpoint_written_inside_an_epoch_keeps_every_epoch_and_trains_the_coefficients(
        tmp_path):
    # Lightning calls neither on_train_epoch_end for the epoch it resumes into nor
    # on_train_epoch_start: resumed from an epoch's last batch, the TWA averaged one epoch
    # fewer (or the fit was refused); resumed inside a TWA epoch, the rest of it trained the
    # module's own weights with the run's SGD instead of the coefficients
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_top_k=-1, every_n_train_steps=4)  # 6 batches/epoch
    straight_callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    straight, _ = _fit(tmp_path / "first", straight_callback, callbacks=[saving])

    def resumed(name):
        callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
        net, trainer = _Net(), _trainer(tmp_path / "first", callbacks=[callback])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
            trainer.fit(net, _loader(), DataLoader(TensorDataset(*_VAL), batch_size=40),
                        ckpt_path=str(tmp_path / "ckpts" / name))
        return net, callback

    for name in ("epoch=1-step=12.ckpt", "epoch=3-step=24.ckpt"):  # written at an epoch's last batch
        net, callback = resumed(name)
        assert [Path(p).name.split(".")[0] for p in callback.snapshots] == [f"epoch={e}" for e in (1, 2, 3)], name
        for key, value in straight.state_dict().items():
            torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=1e-6, msg=f"{name} {key}")
    _, callback = resumed("epoch=4-step=28.ckpt")  # inside the first TWA epoch
    steps = [int(state["step"]) for state in callback._twa_optimizer.state.values()]
    assert steps == [int(s["step"]) for s in straight_callback._twa_optimizer.state.values()] == [12]
    # a checkpoint without the snapshot of an epoch it finished (written before the callback
    # kept it) is named, rather than averaged over the epochs it has
    state = torch.load(tmp_path / "ckpts" / "epoch=3-step=24.ckpt", weights_only=False)
    key = next(k for k in state["callbacks"] if "TrainableWeightAveraging" in k)
    state["callbacks"][key]["snapshots"] = state["callbacks"][key]["snapshots"][:2]
    torch.save(state, tmp_path / "older.ckpt")
    trainer = _trainer(tmp_path / "first", callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=2)])
    with pytest.raises(UsageError, match=r"holds no snapshot of epoch\(s\) \[3\]"):
        trainer.fit(_Net(), _loader(), ckpt_path=str(tmp_path / "older.ckpt"))


class _FasterNet(_Net):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


def test_a_resumed_fit_leaves_the_snapshots_the_earlier_checkpoints_name(straight_run, tmp_path):
    # a resumed fit that ran an epoch again (here at another learning rate) wrote over its
    # snapshot file, so every other checkpoint of the run was refused from then on
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, _, straight, _ = straight_run
    saving = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_top_k=-1, every_n_epochs=1)
    _fit(tmp_path / "first", TrainableWeightAveraging(start_epoch=1, twa_epochs=2), callbacks=[saving])
    other = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    _trainer(tmp_path / "first", callbacks=[other]).fit(_FasterNet(), _loader(),
                                                        ckpt_path=str(next((tmp_path / "ckpts").glob("epoch=1-*"))))
    assert [Path(p).name.split(".")[0] for p in other.snapshots] == ["epoch=1", "epoch=2", "epoch=3"]
    assert Path(other.snapshots[0]).name == "epoch=1.safetensors"  # the earlier fit's, kept as it was
    assert all(Path(p).name != f"epoch={e}.safetensors" for p, e in zip(other.snapshots[1:], (2, 3)))
    net = _Net()
    _trainer(tmp_path / "first", callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=2)]).fit(
        net, _loader(), DataLoader(TensorDataset(*_VAL), batch_size=40),
        ckpt_path=str(next((tmp_path / "ckpts").glob("epoch=3-*"))))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


# -- under DDP: two processes joined in a gloo group, as Lightning's own launcher would start them

class _NetWithoutNorm(_Net):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))


def _ddp_fit(root: str, net_class: type, world: int) -> dict:
    """A fit with the callback whose global batch is 16 samples at any world size: each
    process takes every world-th sample in order, so that step i of every world sees the same
    samples. Returns what the test compares, and the batches this process fed."""
    from torch.utils.data.distributed import DistributedSampler

    data = TensorDataset(_X, _Y)
    sampler = DistributedSampler(data, shuffle=False) if world > 1 else None
    loader = DataLoader(data, batch_size=16 // world, sampler=sampler)
    callback = TrainableWeightAveraging(start_epoch=1, twa_epochs=2)
    net = net_class()
    ddp = dict(strategy="ddp", devices=world, use_distributed_sampler=False) if world > 1 else {}
    _trainer(Path(root), callbacks=[callback], **ddp).fit(net, loader)
    return dict(coefficients=callback.twa.coefficients.detach().clone(), state=net.state_dict(),
                snapshots=list(callback.snapshots), batches=[x.clone() for x, _ in loader])


def _ddp_resumed_at_the_end(root: str, world: int) -> dict:
    """A run under Lightning's own (shuffled) DistributedSampler that saves its last epoch,
    and a fit resumed from that checkpoint: the final states of both."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    states = {}
    for run in ("straight", "resumed"):
        net = _Net()
        saving = ModelCheckpoint(dirpath=str(Path(root) / "ckpts"), save_last=True, save_top_k=0)
        trainer = _trainer(Path(root), callbacks=[TrainableWeightAveraging(start_epoch=1, twa_epochs=2), saving],
                           strategy="ddp", devices=world)
        trainer.fit(net, DataLoader(TensorDataset(_X, _Y), batch_size=8),
                    ckpt_path=str(Path(root) / "ckpts" / "last.ckpt") if run == "resumed" else None)
        states[run] = net.state_dict()
    return states


def _ddp_rank(root: str, rank: int, world: int) -> dict:
    import os

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")  # Lightning joins the group the test started
    fits = {name: _ddp_fit(os.path.join(root, name), net_class, world)
            for name, net_class in (("plain", _NetWithoutNorm), ("batchnorm", _Net))}
    return {**fits, "at the end": _ddp_resumed_at_the_end(os.path.join(root, "at-the-end"), world)}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    from tests.helpers import spawn

    root = tmp_path_factory.mktemp("twa_callback_ddp")
    return root, spawn(partial(_ddp_rank, str(root)), 2, str(root), timeout=150)


def test_under_ddp_the_callback_trains_what_one_process_trains_on_the_same_batches(ddp_run, tmp_path):
    root, ranks = ddp_run
    one = _ddp_fit(str(tmp_path), _NetWithoutNorm, 1)
    for rank in ranks:
        torch.testing.assert_close(rank["plain"]["coefficients"], one["coefficients"], rtol=0, atol=1e-6)
        for key, value in one["state"].items():
            torch.testing.assert_close(rank["plain"]["state"][key], value, rtol=0, atol=1e-6, msg=key)
    assert torch.equal(ranks[0]["plain"]["coefficients"], ranks[1]["plain"]["coefficients"])
    # rank 0 wrote each snapshot once, and every process averaged those files
    assert ranks[0]["plain"]["snapshots"] == ranks[1]["plain"]["snapshots"]
    written = sorted(p.name for p in (root / "plain").rglob("*") if p.is_file())
    assert written == ["epoch=1.safetensors", "epoch=2.safetensors", "epoch=3.safetensors"]


def test_under_ddp_a_fit_resumed_from_the_last_epoch_ends_where_the_run_ended(ddp_run):
    # the statistics pass of a fit that runs no epoch read Lightning's shuffled sampler in
    # its first epoch's order, not the last epoch's as the run did
    _, ranks = ddp_run
    for rank in ranks:
        straight, resumed = rank["at the end"]["straight"], rank["at the end"]["resumed"]
        for key, value in straight.items():
            assert torch.equal(resumed[key], value), key


def test_under_ddp_batchnorm_statistics_are_measured_over_every_processs_batches(ddp_run):
    _, ranks = ddp_run
    final = ranks[0]["batchnorm"]["state"]
    for key, value in final.items():
        assert torch.equal(ranks[1]["batchnorm"]["state"][key], value), key
    # one process, at the final weights, over the batches of both processes
    net = _Net()
    net.load_state_dict(final)
    tk.update_bn(ranks[0]["batchnorm"]["batches"] + ranks[1]["batchnorm"]["batches"], net)
    for key in ("model.1.running_mean", "model.1.running_var"):
        torch.testing.assert_close(final[key], net.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_strategies_that_split_the_weights_over_processes_are_named(strategy):
    from types import SimpleNamespace

    import lightning.pytorch as pl

    split = SimpleNamespace(world_size=2, strategy=object.__new__(getattr(pl.strategies, strategy)))
    with pytest.raises(UsageError, match=f"one process or under DDP.*runs {strategy} over 2 processes"):
        TrainableWeightAveraging(start_epoch=1).setup(split, _Net(), "fit")


class _HideFirstSnapshotOnRank1(L.Callback):
    """Rank 1 cannot see the first snapshot, as on a machine whose disk rank 0's files are not on."""

    def __init__(self, averaging: TrainableWeightAveraging):
        self.averaging = averaging

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank == 1 and trainer.current_epoch == 3:
            self.averaging.snapshots[0] += ".elsewhere"


def _ddp_failures(root: str, rank: int, world: int) -> dict:
    import os

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    data = TensorDataset(_X, _Y)
    errors = {}
    for case in ("unseen snapshot", "unwritable dirpath"):
        blocker = Path(root) / "a-file"
        blocker.write_text("")
        averaging = TrainableWeightAveraging(start_epoch=1, dirpath=blocker / "snapshots" if "dirpath" in case
                                             else None)
        callbacks = [averaging] + ([_HideFirstSnapshotOnRank1(averaging)] if "snapshot" in case else [])
        trainer = _trainer(Path(root) / case.replace(" ", "-"), callbacks=callbacks, strategy="ddp", devices=world)
        try:
            trainer.fit(_Net(), DataLoader(data, batch_size=8))
        except tk.errors.TWAKernelsError as exc:
            errors[case] = (type(exc).__name__, str(exc), trainer.current_epoch)
    return errors


def test_under_ddp_a_process_that_cannot_go_on_stops_every_process_with_a_named_error(tmp_path):
    from tests.helpers import spawn

    first, second = spawn(partial(_ddp_failures, str(tmp_path)), 2, str(tmp_path), timeout=150,
                          collective_timeout=60)
    # every process stops at the same point, none waits in a collective for one that stopped
    kind, message, epoch = second["unseen snapshot"]
    assert kind == "CheckpointError" and "epoch=1.safetensors.elsewhere is gone" in message and epoch == 4
    kind, message, epoch = first["unseen snapshot"]
    assert kind == "RankFailedError" and "rank 1 failed while checking the snapshots" in message
    assert ".elsewhere is gone" in message and epoch == 4
    kind, message, _ = first["unwritable dirpath"]
    assert kind == "OutputError" and "a-file" in message
    kind, message, _ = second["unwritable dirpath"]
    assert kind == "RankFailedError" and "rank 0 failed while writing the snapshot of epoch 1" in message


def test_a_copy_taken_during_the_twa_epochs_trains_later_with_its_class_steps(tmp_path):
    # a deep copy taken while the steps were wrapped holds the wrapper; a later fit of the copy
    # unwraps it and leaves the class's steps, not a bound copy of them, once it is done
    copies = []

    class CopyInTWAEpoch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 4 and batch_idx == 0 and not copies:
                trainer_of_module, pl_module._trainer = pl_module._trainer, None
                copies.append(copy.deepcopy(pl_module))
                pl_module._trainer = trainer_of_module

    _trainer(tmp_path / "a", callbacks=[TrainableWeightAveraging(start_epoch=1), CopyInTWAEpoch()]).fit(
        _Net(), _loader())
    (copied,) = copies
    assert isinstance(vars(copied)["training_step"], partial)
    callback = TrainableWeightAveraging(start_epoch=1)
    _trainer(tmp_path / "b", callbacks=[callback]).fit(copied, _loader())
    assert callback.twa.coefficients.abs().sum() > 0
    assert "training_step" not in vars(copied) and "validation_step" not in vars(copied)
    assert copied.training_step.__func__ is _Net.training_step


def test_a_resumed_run_with_another_length_is_refused_once_it_kept_epochs_and_takes_it_before(tmp_path):
    # the resumed fit kept its first length silently: asked for 8 epochs, it stopped after 5
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_top_k=-1, every_n_epochs=1,
                             filename="{epoch}")
    _fit(tmp_path, TrainableWeightAveraging(start_epoch=2, twa_epochs=1), callbacks=[saving], val=False)
    longer = TrainableWeightAveraging(start_epoch=2, twa_epochs=1)
    with pytest.raises(UsageError, match=r"resumes a run of max_epochs=4 whose TWA keeps epochs 2..3 \(1 kept so "
                                         r"far\).*now has max_epochs=8.*resume with max_epochs=4"):
        _trainer(tmp_path, epochs=8, callbacks=[longer]).fit(_Net(), _loader(),
                                                             ckpt_path=str(tmp_path / "ckpts" / "epoch=2.ckpt"))
    # resumed before the first kept epoch: nothing was kept, and the new length holds
    early = TrainableWeightAveraging(start_epoch=2, twa_epochs=1)
    trainer = _trainer(tmp_path, epochs=5, callbacks=[early])
    trainer.fit(_Net(), _loader(), ckpt_path=str(tmp_path / "ckpts" / "epoch=0.ckpt"))
    assert [Path(p).name.split(".")[0] for p in early.snapshots] == ["epoch=2", "epoch=3", "epoch=4"]
    assert trainer.current_epoch == 6 and early.twa is not None
