"""TWA as a Lightning callback: `Trainer(callbacks=[TrainableWeightAveraging(...)])`.

    from twa_kernels.lightning import TrainableWeightAveraging

    trainer = L.Trainer(max_epochs=40, callbacks=[TrainableWeightAveraging(start_epoch=0.5, twa_epochs=3)])
    trainer.fit(module, train_loader, val_loader)    # 40 epochs of the module's own training, then 3 of TWA

The run trains as configured for `max_epochs` epochs. From `start_epoch` on, the callback
writes the LightningModule's weights at the end of every epoch into `dirpath` (safetensors,
one file per epoch): the checkpoints whose subspace TWA trains in. After the last epoch it
builds a `TWA` over them (it starts at their uniform average, SWA) and the same Trainer runs
`twa_epochs` more epochs in which the optimizer is `optimizer(twa.parameters())` (AdamW by
default), training the averaging coefficients alone, with the module's own `training_step`
run at the averaged weights (TWA.run): its loss, logging, precision and gradient clipping
are the Trainer's as before. Validation in those epochs runs at the averaged weights too.
When training ends, BatchNorm statistics are recomputed at the averaged weights on the
training data (TWA.update_bn) and the averaged weights are loaded into the module, as
Lightning's StochasticWeightAveraging leaves the SWA weights in the module.

A checkpoint written during the TWA epochs holds the averaged weights of its epoch (with the
module's buffers: what that epoch's validation measured), so `ckpt_path="best"` picks a TWA
model when one validated best. It also resumes where it stopped: it holds the run's own
optimizer state, as before the TWA epochs, and the callback's state holds the snapshot files
(which must still exist and hold what the run wrote: their SHA-256 is checked), the
coefficients and their optimizer's state. A checkpoint of the last TWA epoch (ModelCheckpoint's
`save_last`, or one written every epoch: what a job stopped before the end of fit resumes
from) leaves no epoch to run, and the resumed fit ends as the run would have ended: BatchNorm
statistics recomputed and the averaged weights in the module.

Under DDP (strategy="ddp") rank 0 writes the snapshots, which every process reads (dirpath
on a file system they all see), the TWA all-reduces the coefficients' gradients, and the
BatchNorm statistics are measured over every process's batches. Automatic optimization only;
strategies that split the weights over processes (FSDP, DeepSpeed) are refused: keep the
checkpoints with ModelCheckpoint and train a TWA held by a LightningModule
(docs/guides/lightning.md).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twa_kernels import distributed
from twa_kernels._checks import integer
from twa_kernels._collectives import agree
from twa_kernels._imports import optional
from twa_kernels._passes import kept_modes
from twa_kernels._progress import progress_enabled
from twa_kernels.batchnorm import feed_batch, has_running_statistics, running_norms
from twa_kernels.errors import CheckpointError, InvalidArgumentError, InvalidTypeError, UsageError, warn_at_caller
from twa_kernels.io import TWA_AVERAGE_MARK, save_state_dict
from twa_kernels.subspace import check_build_args
from twa_kernels.twa import TWA

optional("lightning.pytorch", "lightning", "twa_kernels.lightning")
import lightning.pytorch as pl  # noqa: E402  (after the check that names the missing extra)

# The LightningModule methods that run at the averaged weights during the TWA epochs.
_STEPS = ("training_step", "validation_step")


def _twa_step(step: object) -> bool:
    """Whether `step` is a training or validation step this callback wrapped to run at a
    TWA's averaged weights."""
    return isinstance(step, partial) and getattr(step.func, "__func__", None) is TWA.run


def _unwrap_steps(pl_module: pl.LightningModule) -> None:
    """Give the module back the steps another TWA wrapped (a deep copy taken during a TWA's
    epochs holds that TWA's wrappers, which would run this fit's epochs at its weights)."""
    for name in _STEPS:
        while _twa_step(step := vars(pl_module).get(name)):
            inner = step.args[0]
            if getattr(inner, "__self__", None) is pl_module and getattr(inner, "__func__", None) is getattr(
                    type(pl_module), name, None):
                delattr(pl_module, name)  # the class's own step
            else:
                setattr(pl_module, name, inner)  # one the instance held (a compiled step)


def _adamw(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The default optimizer of the coefficients: AdamW at lr 0.02 without weight decay, the
    setting of `twa demo` (weight decay would pull the average towards the center)."""
    return torch.optim.AdamW(parameters, lr=0.02, weight_decay=0.0)


class TrainableWeightAveraging(pl.Callback):
    """Train a Trainable Weight Average of the epochs from `start_epoch` on, after the run.

    start_epoch: the first epoch (0-based) whose end-of-epoch weights are kept, or a float
      in (0, 1): that fraction of max_epochs. twa_epochs: the epochs that train the
      coefficients after max_epochs. optimizer: builds the coefficients' optimizer from
      their parameters (default AdamW, lr 0.02). bits, granularity, group_size: as for
      `TWA`. dirpath: where the per-epoch snapshots go (default a folder of this run's own,
      `<default_root_dir>/twa_snapshots/run-<time>-<random>`, so runs sharing a root
      directory never write over each other's); files already there are replaced, never
      read, but by a fit resumed from a checkpoint, which writes an epoch it runs again to
      `epoch=<n>.<random>.safetensors` (the run's other checkpoints name the earlier
      file). The callback's state records each snapshot's SHA-256, and the TWA is built
      only from files that still hold what this run wrote. progress: the bars of building the
      basis (None: as the Trainer's own, none with enable_progress_bar=False, else only
      when standard error is a terminal; False: never).
    Under `fast_dev_run` the callback does nothing (it warns), as Lightning's checkpointing
    does. In the TWA epochs the Trainer steps the coefficients' optimizer alone, so
    `self.lr_schedulers()` in the module's steps is None there.
    update_bn: recompute BatchNorm statistics at the averaged weights at the end: True (each
      training batch, after the Trainer's batch hooks and precision conversion, is fed to the
      module's forward: a tuple's or list's first element, a mapping as keyword arguments),
      False, or a function(module, batch) that runs the module on one batch. BatchNorm layers
      that the run keeps in eval mode (frozen statistics) keep theirs and stay in eval mode
      during the pass. The module's train/eval modes after fit are those Lightning leaves.
    """

    def __init__(self, start_epoch: int | float = 0.5, twa_epochs: int = 2, *,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = _adamw,
                 bits: int | None = 4, granularity: str | int = "tensor", group_size: int = 128,
                 dirpath: str | os.PathLike | None = None,
                 update_bn: bool | Callable[[nn.Module, Any], Any] = True, progress: bool | None = None):
        wrong_kind = isinstance(start_epoch, bool) or not isinstance(start_epoch, (int, float))
        if wrong_kind or not ((isinstance(start_epoch, int) and start_epoch >= 0)
                              or (isinstance(start_epoch, float) and 0.0 < start_epoch < 1.0)):
            # a bool or a string is of the wrong kind, as twa_epochs=True is (InvalidTypeError)
            raise (InvalidTypeError if wrong_kind else InvalidArgumentError)(
                f"start_epoch must be an epoch index >= 0 or a fraction of max_epochs in (0, 1), got {start_epoch!r}")
        integer("twa_epochs", twa_epochs, 1, "the epochs that train the coefficients")
        if not callable(optimizer):
            raise InvalidArgumentError("optimizer must be a function of the coefficients' parameters that returns a "
                                       f"torch optimizer, e.g. partial(torch.optim.AdamW, lr=0.02); got {optimizer!r}")
        if not (isinstance(update_bn, bool) or callable(update_bn)):
            raise InvalidArgumentError(f"update_bn must be True, False or a function(module, batch), got {update_bn!r}")
        check_build_args(bits, group_size, granularity)  # here, not after the whole run
        progress_enabled(progress)  # refused here, not after the whole run
        self.start_epoch, self.twa_epochs = start_epoch, twa_epochs
        self.optimizer, self.update_bn = optimizer, update_bn
        self.twa_options = dict(bits=bits, granularity=granularity, group_size=group_size, progress=progress)
        self._dirpath_given = None if dirpath is None else Path(dirpath)
        self._new_run()

    def _new_run(self) -> None:
        """Forget any earlier fit: a callback object used for a second fit builds a TWA of its
        own (a resumed fit gets its state back from load_state_dict, which Lightning calls
        after setup)."""
        self.dirpath = self._dirpath_given
        self.snapshots: list[str] = []
        self._digests: dict[str, str] = {}  # snapshot path -> SHA-256 of what this run wrote there
        self._snapped: int | None = None  # the epoch whose snapshot this fit wrote last
        self._written: set[str] = set()  # the snapshot files this fit wrote
        self._resumed = False  # a fit from a checkpoint: the snapshot folder holds the earlier fit's files
        self._off = False  # fast_dev_run: the callback stands aside
        self._frozen_norms: set[str] = set()  # BatchNorm layers the epochs ran in eval mode
        self.twa: TWA | None = None
        self._finished = False  # the module holds the final model (the BatchNorm pass done)
        self._instance_steps: dict[str, Any] = {}  # steps the module held as its own (compiled ones)
        self._first: int | None = None  # the first epoch kept
        self._last: int | None = None  # max_epochs of the run: the TWA epochs come after it
        self._loaded: dict[str, Any] | None = None  # the TWA state of a resumed checkpoint
        self._twa_optimizer: torch.optim.Optimizer | None = None
        self._batches_run: int | None = None  # the training batches of the current epoch (None: not counted)
        self._run_optimizers: list[torch.optim.Optimizer] = []
        self._run_schedulers: list[Any] = []

    # ---- the run -----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._new_run()
        if trainer.world_size > 1 and not _replicates_the_module(trainer.strategy):
            raise UsageError(f"TrainableWeightAveraging runs in one process or under DDP (strategy='ddp'); this "
                             f"Trainer runs {type(trainer.strategy).__name__} over {trainer.world_size} processes, "
                             "whose modules hold parts of the weights. Keep the checkpoints with ModelCheckpoint and "
                             "train a TWA held by a LightningModule (docs/guides/lightning.md)")
        # Lightning's own weight averaging (an older Lightning has no WeightAveraging)
        averaging = tuple(getattr(pl.callbacks, name) for name in ("StochasticWeightAveraging", "WeightAveraging")
                          if hasattr(pl.callbacks, name))
        other = next((c for c in trainer.callbacks if isinstance(c, averaging)), None)
        if other is not None:  # its average would replace TWA's in the module at the end, or add its own epochs
            raise UsageError(f"TrainableWeightAveraging leaves its averaged weights in the module, and the Trainer "
                             f"also has {type(other).__name__}, which puts its own average there (or trains epochs of "
                             "its own after TWA's); use one weight-averaging callback per Trainer")
        if not pl_module.automatic_optimization:
            raise UsageError("TrainableWeightAveraging swaps the Trainer's optimizer for the coefficients' one, which "
                             "manual optimization (automatic_optimization = False) would not use; train a TWA held "
                             "by the LightningModule instead (docs/guides/lightning.md)")
        _unwrap_steps(pl_module)
        if self.dirpath is None:
            root = str(trainer.default_root_dir)
            if "://" in root:  # a remote file system that Lightning reaches through fsspec
                raise UsageError(f"TrainableWeightAveraging writes its snapshots to a local directory, and "
                                 f"default_root_dir is {root!r}: pass dirpath= a local directory")
            # a folder of this run's own: runs sharing a root directory (the default is the
            # working directory) would otherwise write over each other's snapshots
            run = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            # every process of a DDP run reads the snapshots that rank 0 writes: its name
            self.dirpath = Path(root) / "twa_snapshots" / trainer.strategy.broadcast(run)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            self._off = True
            warn_at_caller("TrainableWeightAveraging does nothing under fast_dev_run, which runs too few batches for "
                           "a TWA; run without fast_dev_run to train one", UserWarning)
            return
        if self._last is None or not self.snapshots and self._loaded is None:
            # a fresh run, or one resumed before it kept an epoch: the Trainer's length holds
            self._first, self._last = self._schedule(trainer)
        elif trainer.max_epochs != self._last or self._schedule(trainer)[0] != self._first:
            # the kept epochs and the TWA epochs' place follow from the run's length
            raise UsageError(f"this fit resumes a run of max_epochs={self._last} whose TWA keeps epochs "
                             f"{self._first}..{self._last - 1} ({len(self.snapshots)} kept so far) and trains after "
                             f"them, but the Trainer now has max_epochs={trainer.max_epochs} and start_epoch "
                             f"{self.start_epoch!r}: resume with max_epochs={self._last} and the same start_epoch "
                             "(the TWA epochs follow on their own), or start a new fit to train longer")
        trainer.fit_loop.max_epochs = self._last + self.twa_epochs

    def _schedule(self, trainer: pl.Trainer) -> tuple[int, int]:
        """(first kept epoch, max_epochs) of a run on `trainer`, checked."""
        last = trainer.max_epochs
        if trainer.max_steps != -1 or last is None or last < 1:
            raise UsageError("TrainableWeightAveraging counts epochs: give the Trainer max_epochs (>= 1), not "
                             f"max_steps (max_epochs={last}, max_steps={trainer.max_steps})")
        first = math.floor(self.start_epoch * last) if isinstance(self.start_epoch, float) else self.start_epoch
        if first > last - 2:  # a subspace needs two checkpoints
            raise InvalidArgumentError(f"start_epoch {self.start_epoch!r} is epoch {first}, but the run has "
                                       f"epochs 0..{last - 1} and TWA needs at least two of them: start at "
                                       f"epoch {last - 2} or earlier, or raise max_epochs")
        return first, last

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._off:
            return
        self._batches_run = 0  # a resumed fit runs no on_train_epoch_start for the epoch it resumes into
        epoch = trainer.current_epoch  # restored by now on a resume
        if epoch > self._first and not self.snapshots and self._loaded is None:
            raise UsageError(f"TrainableWeightAveraging keeps epochs {self._first}..{self._last - 1}, but this "
                             f"Trainer starts at epoch {epoch}: the epochs before it ran without this callback (a "
                             "second fit on the same Trainer counts on from the first, TWA epochs included; a "
                             "checkpoint written without the callback holds none of its snapshots). Fit with a new "
                             "Trainer, or resume from a checkpoint written with this callback")
        self._check_statistics_pass(trainer, pl_module)
        self._check_snapshots_cover(epoch)
        if epoch >= self._last and self.twa is None:
            # a fit resumed inside a TWA epoch: Lightning calls no on_train_epoch_start for the
            # epoch it resumes into, and the rest of that epoch would train the module's own
            # weights with the run's optimizer
            self._start_twa(trainer, pl_module)

    def _check_snapshots_cover(self, epoch: int) -> None:
        """A resumed fit has a snapshot of every finished epoch it keeps: a checkpoint written
        before an epoch's snapshot (by an older version, or with snapshots deleted since)
        would train a TWA over fewer epochs without a word."""
        if not self.snapshots and self._loaded is None:
            return
        kept = {_epoch_of(p) for p in self.snapshots}
        missing = [e for e in range(self._first, min(epoch, self._last)) if e not in kept]
        if missing:
            raise UsageError(f"TrainableWeightAveraging: this fit resumes at epoch {epoch}, but the checkpoint holds "
                             f"no snapshot of epoch(s) {missing} (it was written before the callback kept them), so "
                             "the TWA would average fewer epochs than the run trained; resume from a checkpoint "
                             "written at the end of an epoch")

    def _check_statistics_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Name, before the run, a BatchNorm statistics pass that the end of fit could not run."""
        loaders = trainer.train_dataloader
        if (self.update_bn is True and has_running_statistics(pl_module)
                and type(pl_module).forward is pl.LightningModule.forward):
            raise UsageError(f"TrainableWeightAveraging recomputes BatchNorm statistics at the end by feeding each "
                             f"training batch to the module's forward(), and {type(pl_module).__name__} defines "
                             "none: define forward, or pass update_bn=function(module, batch) that runs the "
                             "module on a batch")
        if (self.update_bn is not False and has_running_statistics(pl_module)
                and isinstance(loaders, (Mapping, list, tuple))):
            raise UsageError(f"TrainableWeightAveraging recomputes BatchNorm statistics on the training data at the "
                             f"end, but this run trains on {len(loaders)} loaders at once and it cannot tell which "
                             "to use: pass update_bn=False and call tk.update_bn(loader, module) after fit")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._off:
            return
        self._batches_run = 0
        if trainer.current_epoch >= self._last and self.twa is None:
            self._start_twa(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # the epoch's weights are final after its last batch: kept now, before a checkpoint
        # that ModelCheckpoint writes at this batch (its hooks run after this callback's), so
        # that a fit resumed from that checkpoint holds this epoch's snapshot. Lightning runs
        # no on_train_epoch_end for the epoch it resumes into.
        if self._batches_run is not None:
            self._batches_run += 1
        if trainer.is_last_batch:
            self._snapshot(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.training:  # the modes the epoch trained in (Lightning sets eval before on_train_end)
            self._frozen_norms = {name for name, m in running_norms(pl_module).items() if not m.training}
        self._snapshot(trainer, pl_module)  # where no batch was known to be the last (an unsized loader)

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._off or not self._first <= epoch < self._last or self._snapped == epoch:
            return
        if self._batches_run == 0:
            self._snapped = epoch
            if any(_epoch_of(path) == epoch for path in self.snapshots):
                return  # a fit resumed at the end of an epoch it kept re-enters it with no batch
            # a fit resumed from a checkpoint taken at an epoch's last batch, with a loader that
            # keeps its place (torchdata's StatefulDataLoader), runs the next epoch with no batch
            warn_at_caller(f"TrainableWeightAveraging: epoch {epoch} ran no training batch (a fit resumed from a "
                           "checkpoint taken at an epoch's last batch, with a loader that keeps its place, runs the "
                           "next epoch empty); its weights are the epoch before's, so it is not kept as a snapshot. "
                           "Resume from a checkpoint taken at an epoch's end or inside one", RuntimeWarning)
            return

        def write() -> tuple[str, str] | None:
            if not trainer.is_global_zero:  # DDP keeps the same weights in every process: rank 0 writes them
                return None
            path = self.dirpath / f"epoch={epoch}.safetensors"
            if self._resumed and path.exists() and str(path) not in self._written:
                # an epoch that a resumed fit runs again: the file is the earlier fit's, which its
                # other checkpoints name (with its digest), so it is left as it is
                path = self.dirpath / f"epoch={epoch}.{secrets.token_hex(4)}.safetensors"
            path = save_state_dict(pl_module.state_dict(), path)
            return str(path), _sha256(path)

        if trainer.world_size > 1:
            # a failed write stops every process with its reason; the broadcast is also the
            # barrier: no process reads a snapshot before it is whole
            written = agree(write, torch.distributed.group.WORLD, f"writing the snapshot of epoch {epoch}")
            written = trainer.strategy.broadcast(written)
        else:
            written = write()
        path, digest = written
        self.snapshots = [p for p in self.snapshots if _epoch_of(p) != epoch] + [path]
        self.snapshots.sort(key=_epoch_of)
        self._digests[path] = digest
        self._written.add(path)
        self._snapped = epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._off:
            return
        trainer.fit_loop.max_epochs = self._last
        if self.twa is None:
            warn_at_caller(f"TrainableWeightAveraging: training stopped at epoch {trainer.current_epoch}, before the "
                           f"TWA epochs (from epoch {self._last}); the module keeps its own weights", RuntimeWarning)
            return
        self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finish a fit resumed from a checkpoint of the last TWA epoch. Lightning's fit loop
        has no epoch left to run there and skips them, on_train_end included, so this fit built
        no TWA (one that did was finished by on_train_end, and is not finished again)."""
        if self._off or self._last is None or self.twa is not None:
            return
        trainer.fit_loop.max_epochs = self._last
        epoch, end = trainer.current_epoch, self._last + self.twa_epochs
        if epoch < end:  # stopped before the end of the TWA epochs: on_train_end said so, if training ran
            return
        if self._loaded is None:
            raise UsageError(f"TrainableWeightAveraging: this fit starts at epoch {epoch}, after the TWA epochs "
                             f"(epochs {self._last}..{end - 1}), with no trained TWA to finish: the epochs before "
                             "it ran without this callback (a second fit on the same Trainer counts on from the "
                             "first; a checkpoint written without the callback holds none of its state), and the "
                             "module keeps the weights it has. Fit with a new Trainer, or resume from a "
                             "checkpoint written with this callback")
        self._check_statistics_pass(trainer, pl_module)
        # the Trainer's teardown has moved the module off its device: finish there, as the
        # TWA epochs would have, and leave the module where the teardown left it
        device = pl_module.device
        # the statistics pass reads the batches in the order of the run's last epoch: under DDP
        # Lightning's DistributedSampler shuffles by epoch, and this fit ran none
        _set_sampler_epoch(trainer.train_dataloader, end - 1)
        try:
            pl_module.to(trainer.strategy.root_device)
            self._start_twa(trainer, pl_module)  # from the snapshots and the checkpoint's coefficients
            self._finish(trainer, pl_module)
        finally:
            self._restore_steps(pl_module)
            pl_module.to(device)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The end of the run: BatchNorm statistics recomputed at the averaged weights, and
        those weights loaded into the module."""
        self._restore_steps(pl_module)
        twa = self.twa
        with kept_modes(pl_module):  # as Lightning left them; twa.eval() sets all
            twa.eval()
            # BatchNorm layers the run kept in eval mode (frozen statistics, as in fine-tuning)
            # keep their statistics and run in eval mode; the others are recomputed at the
            # averaged weights, on the batches as the training steps got them
            norms = running_norms(pl_module)
            if self.update_bn is not False and len(self._frozen_norms) < len(norms):
                self._update_bn(trainer, pl_module)
            with warnings.catch_warnings():  # the statistics are current unless update_bn=False asked to keep them
                warnings.simplefilter("ignore", RuntimeWarning)
                averaged = twa.averaged_state_dict()
            pl_module.load_state_dict(averaged)
        # the Trainer holds the run's optimizers and schedulers again, as it did before the TWA epochs
        trainer.strategy.optimizers = self._run_optimizers
        trainer.strategy.lr_scheduler_configs = self._run_schedulers
        self._finished = True

    def _update_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """twa.update_bn over the training batches, each passed through the Trainer's batch
        pipeline (precision conversion, on_before_batch_transfer, the move to the device and
        on_after_batch_transfer) and run in the precision's context, as the training steps ran."""
        call_fn = feed_batch if self.update_bn is True else self.update_bn
        how = ("fed each training batch to forward() (a tuple's or list's first element, a mapping as keyword "
               "arguments)" if self.update_bn is True else "called update_bn(module, batch) on each training batch")

        def named(exc: Exception, by_the_module: bool = True) -> UsageError:  # a failure of this process's own pass
            feeding = f"{how}, which failed" if by_the_module else "failed"
            advice = ("; next time pass update_bn=function(module, batch) that runs the module on one batch"
                      if by_the_module and self.update_bn is True else "")
            error = UsageError(f"TrainableWeightAveraging: recomputing the BatchNorm statistics at the averaged "
                               f"weights {feeding}: {type(exc).__name__}: {exc}. The trained TWA is this callback's "
                               "`.twa`: recompute them with twa.update_bn(loader, call_fn) (under DDP, "
                               "tk.distributed.update_bn(loader, twa, None, call_fn)) and load "
                               f"twa.averaged_state_dict() into the module{advice}")
            error._names_the_pass = True
            return error

        def prepared(batches: Iterable) -> Iterator[Any]:
            batches = iter(batches)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except Exception as exc:
                    raise named(exc, by_the_module=False) from exc
                try:
                    batch = trainer.precision_plugin.convert_input(batch)
                    # as the fit loop calls it: the DataModule's hook where it defines one, else the module's
                    batch = pl_module._on_before_batch_transfer(batch, 0)
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
                except Exception as exc:
                    raise named(exc, by_the_module=False) from exc
                yield batch

        def run(module: nn.Module, batch: Any) -> None:
            try:
                call_fn(module, batch)
            except Exception as exc:  # the library's own errors too (a batch feed_batch cannot feed)
                raise named(exc) from exc

        batches = trainer.train_dataloader
        if math.isfinite(trainer.num_training_batches):  # limit_train_batches, as the epochs ran
            batches = itertools.islice(batches, int(trainer.num_training_batches))
        # the errors of the pass are named where they arise, so that an error of the processes'
        # exchange under DDP (a peer gone) keeps its own message
        with trainer.precision_plugin.train_step_context():
            if trainer.world_size > 1:  # each process's share of the batches, merged as one pass over all
                distributed.update_bn(prepared(batches), self.twa, None, run, frozen_norms=sorted(self._frozen_norms))
                return
            try:
                self.twa.update_bn(prepared(batches), run, frozen_norms=sorted(self._frozen_norms))
            except Exception as exc:  # in one process every failure is the pass's own (no batch, a lone example)
                if getattr(exc, "_names_the_pass", False):
                    raise
                raise named(exc, by_the_module=False) from exc

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_steps(pl_module)  # an error (or Ctrl-C) skips on_train_end and teardown
        if self._last is not None:
            trainer.fit_loop.max_epochs = self._last

    # ---- the TWA epochs ------------------------------------------------------------------

    def _start_twa(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.snapshots:
            raise UsageError(f"TrainableWeightAveraging kept no epoch to average (start_epoch {self._first}, "
                             f"max_epochs {self._last}); start earlier")
        if trainer.world_size > 1:
            # every process checks the files before any of them builds a TWA, whose collectives
            # would leave the others waiting for one that stopped here
            agree(self._check_snapshots, torch.distributed.group.WORLD, "checking the snapshots")
        else:
            self._check_snapshots()
        options = dict(self.twa_options)
        if options["progress"] is None and trainer.progress_bar_callback is None:  # enable_progress_bar=False
            options["progress"] = False
        if trainer.world_size > 1:
            # the coefficients are not the module's parameters, so DDP does not average their
            # gradients: the TWA all-reduces them itself (and DDP, whose parameters get no
            # gradient in these epochs, reduces nothing)
            options["process_group"] = torch.distributed.group.WORLD
        self.twa = TWA(pl_module, self.snapshots, **options).to(pl_module.device)
        self._finished = False
        self._twa_optimizer = self.optimizer(self.twa.parameters())
        if self._loaded is not None:
            saved = self._loaded["coefficients"]
            if tuple(saved.shape) != tuple(self.twa.coefficients.shape):
                raise UsageError(f"the checkpoint's TWA coefficients are {tuple(saved.shape)} but this callback's TWA "
                                 f"has {tuple(self.twa.coefficients.shape)}: resume with the bits, granularity and "
                                 "group_size the run started with, and with the same parameters trainable "
                                 "(requires_grad) when the TWA epochs start: a callback that freezes or thaws layers "
                                 "(BackboneFinetuning) may leave them otherwise after a resume")
            self.twa.coefficients.data.copy_(saved)
            self._twa_optimizer.load_state_dict(self._loaded["optimizer"])
            self._loaded = None
        # the run's optimizers and schedulers are kept for the checkpoints (on_save_checkpoint)
        self._run_optimizers = list(trainer.strategy.optimizers)
        self._run_schedulers = list(trainer.strategy.lr_scheduler_configs)
        trainer.strategy.optimizers = [self._twa_optimizer]
        trainer.strategy.lr_scheduler_configs = []
        # the steps run at the averaged weights: the class's, or one the instance holds (Lightning
        # keeps a torch.compile'd module's compiled steps there), which is put back after
        self._instance_steps = {}
        for name in _STEPS:
            step = vars(pl_module).get(name)
            if step is not None:
                self._instance_steps[name] = step
            setattr(pl_module, name, partial(self.twa.run, getattr(pl_module, name)))

    def _check_snapshots(self) -> None:
        """A CheckpointError where the snapshots cannot be averaged here (gone, or written over)."""
        missing = [path for path in self.snapshots if not os.path.exists(path)]
        if missing:
            raise CheckpointError(f"TrainableWeightAveraging: snapshot {missing[0]} is gone ({len(missing)} of "
                                   f"{len(self.snapshots)} missing); the TWA epochs need every epoch it kept. Resume "
                                   "from a checkpoint of the run whose snapshots still exist (under DDP, dirpath must "
                                   "be on a file system that every machine of the job sees)")
        for path in self.snapshots:
            expected = self._digests.get(path)
            if expected is not None and _sha256(path) != expected:
                raise CheckpointError(f"TrainableWeightAveraging: snapshot {path} no longer holds the weights this "
                                       "run wrote there (another run writing to the same dirpath?); the TWA would "
                                       "average another run's weights. Give each run its own dirpath")

    def _restore_steps(self, pl_module: pl.LightningModule) -> None:
        for name in _STEPS:
            step = vars(pl_module).get(name)
            if isinstance(step, partial) and self.twa is not None and step.func == self.twa.run:
                delattr(pl_module, name)
                kept = self._instance_steps.get(name)
                if kept is not None:  # the instance's own step (a compiled one), as it was
                    setattr(pl_module, name, kept)

    # ---- checkpoints -----------------------------------------------------------------------

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.twa is None:
            return
        # the weights this epoch's validation measured: the averaged ones with the module's
        # buffers, so that ckpt_path="best" of a TWA epoch is that TWA model. A resumed run does
        # not read them: TWA rebuilds its weights from the snapshots and coefficients.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # statistics as the validation used them
            checkpoint["state_dict"] = self.twa.averaged_state_dict()
        if not self._finished:  # a TWA epoch's average; a save after fit holds the run's final model
            checkpoint[TWA_AVERAGE_MARK] = True  # reading it as a checkpoint of the run warns
        if "optimizer_states" in checkpoint:  # not a weights-only checkpoint
            # the run's optimizer states, which a resumed Trainer loads into the optimizers that
            # configure_optimizers makes; the coefficients' optimizer is in this callback's state
            checkpoint["optimizer_states"] = [opt.state_dict() for opt in self._run_optimizers]
            checkpoint["lr_schedulers"] = [config.scheduler.state_dict() for config in self._run_schedulers]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(snapshots=list(self.snapshots), first_epoch=self._first, last_epoch=self._last,
                                     digests=dict(self._digests), frozen_norms=sorted(self._frozen_norms),
                                     dirpath=None if self.dirpath is None else str(self.dirpath))
        if self.twa is not None:
            state["twa"] = dict(coefficients=self.twa.coefficients.detach().cpu().clone(),
                                optimizer=self._twa_optimizer.state_dict())
        elif self._loaded is not None:
            state["twa"] = self._loaded
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots = list(state_dict["snapshots"])
        self._digests = dict(state_dict.get("digests", {}))
        # the BatchNorm layers the epochs ran in eval mode, for a resumed fit that runs none
        self._frozen_norms = set(state_dict.get("frozen_norms", ()))
        if state_dict.get("dirpath") is not None and self._dirpath_given is None:
            self.dirpath = Path(state_dict["dirpath"])  # the resumed run writes beside the snapshots it kept
        self._first, self._last = state_dict["first_epoch"], state_dict["last_epoch"]
        self._loaded = state_dict.get("twa")
        self._resumed = True


def _set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Call set_epoch(epoch) on a loader's sampler (or its batch sampler's) where it has one."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def _replicates_the_module(strategy: Any) -> bool:
    """Whether every process holds the whole module, as DDP keeps it: DeepSpeed, a DDPStrategy
    too, may partition the weights, as FSDP does."""
    deepspeed = getattr(pl.strategies, "DeepSpeedStrategy", ())
    return isinstance(strategy, pl.strategies.DDPStrategy) and not isinstance(strategy, deepspeed)


def _epoch_of(path: str) -> int:
    """The epoch of a snapshot file, `epoch=N.safetensors` or a resumed fit's
    `epoch=N.<random>.safetensors`."""
    match = re.fullmatch(r"epoch=(\d+)(\.[0-9a-f]+)?\.safetensors", Path(path).name)
    return int(match.group(1)) if match else -1


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["TrainableWeightAveraging"]
