"""`twa fit CONFIG.yaml`: TWA on your own model and data, without a training script.

    model: mypackage.models:make_model        # a callable returning the nn.Module
    data:
      train: mypackage.data:train_loader      # a callable returning an iterable of (x, y) batches
      val: mypackage.data:val_loader          # optional; needed for train_on: val
    checkpoints: runs/exp1/epoch_*.pt         # paths, a directory or a glob
    bits: 4                                   # 1, 2, 4, 8 or null (dense)
    granularity: tensor                       # model | tensor | an int
    group_size: 128                           # a positive multiple of 8, at most 2**20 (quantisation group)
    int8_gradients: false                     # project gradients rounded to int8 (tk.project_int8)
    optimizer: {name: AdamW, lr: 0.01}        # a torch.optim class (not LBFGS) and its arguments
    epochs: 2
    train_on: train                           # train (TWA-t) or val (TWA-v)
    loss: torch.nn.functional:cross_entropy   # optional; loss(outputs, targets)
    output: twa-out                           # a directory of its own: averaged.pt, averaged.safetensors, report.json
    distributed: {mode: replicated}           # under torchrun: replicated | sharded (see distributed.py)
    seed: 0                                   # torch's, Python's and numpy's global RNGs, for the run

Under torchrun (`torchrun --nproc_per_node N -m twa_kernels fit config.yaml`) every rank
trains on its share of the data (DistributedSampler), and rank 0 alone writes the outputs.
In one process `distributed` has no effect; `{mode: sharded}` there trains unsharded, with a
warning. A leading `~` in `output` is the home directory, as in a shell.

Import strings are resolved from the working directory. The whole config is checked
(FitConfig) before any work, and every import string in it (model, data.train, data.val,
loss) is resolved before any factory is called: a problem (an unknown key or import string,
a bad value, YAML syntax) raises FitError with one line naming the key, the value and what
is allowed. So is the output location (OutputError): it must be a directory that can be
written and that holds nothing but these outputs, because the outputs replace it as one set
(see _outdir.py); what appears in it during the run is kept in the new set. A data
loader that gives no batches for a pass it is used for is a FitError, not a silent result, as
are a batch that is not an (inputs, targets) pair and a run that diverged (a NaN or Inf in
the averaged weights or the report): nothing is written then.

`val_loss_at_swa` in the report is the loss at the uniform average of the checkpoints, with
BatchNorm statistics recomputed on data.train as they are for TWA's `val_loss_after_twa`.

An interrupted run resumes after its last finished epoch when the same config is run again
(_fit_progress.py keeps the progress beside the output directory between epochs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twa_kernels import _fit_progress as fit_progress
from twa_kernels._collectives import ranks_unlike_rank0
from twa_kernels._ops import kernels_in_use
from twa_kernels._progress import progress_bar
from twa_kernels.batchnorm import NoBatchesError, feed_batch, has_running_statistics
from twa_kernels import distributed
from twa_kernels._fit_config import FitConfig, FitError, describe, load_config, short
from twa_kernels.errors import TWAKernelsError, warn_at_caller
from twa_kernels._outdir import OutputDirectory
from twa_kernels._user_code import trainable_loss, call_factory, call_loss, loss_from, resolve_import_strings
from twa_kernels._provenance import package_version, stamp
from twa_kernels.io import resolve_checkpoints, save_state_dict, write_json
from twa_kernels.twa import TWA

OUTPUTS = ("averaged.pt", "averaged.safetensors", "report.json")


def _data(factory: Callable, spec: str, key: str) -> Iterable:
    """The loader data.`key`'s factory returns, refused now if it cannot be iterated at all."""
    loader = call_factory(factory, spec, f"data.{key}")
    if not (hasattr(loader, "__iter__") or hasattr(loader, "__getitem__")):
        raise FitError(f"data.{key} ({short(spec)}) returned {describe(loader)}, which is not iterable; return an "
                       "iterable of (inputs, targets) batches such as a DataLoader")
    return loader


class _Batches:
    """A data loader that counts the batches of each pass, so a pass that gave none (an empty
    loader, or a generator already used up) is an error instead of a silent result: an empty
    BatchNorm pass would leave the statistics reset to 0 and 1, an empty evaluation a loss of 0."""

    def __init__(self, loader: Iterable, key: str, spec: str, ranks: int):
        self.loader, self.key, self.spec, self.ranks = loader, key, spec, ranks
        self.count = 0
        self.inputs: Any = None  # the last batch's, to name in an error

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        self.count = 0
        for batch in self.loader:
            if not isinstance(batch, (list, tuple)) or len(batch) != 2:  # or a ValueError deep in unpacking
                length = f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""
                hint = ""
                if isinstance(batch, Mapping):  # a transformers collator's or a datasets batch
                    hint = ("; from a mapping with the targets under 'labels', give (the mapping without 'labels', "
                            "batch['labels']), e.g. from the DataLoader's collate_fn" if "labels" in batch else
                            f"; this mapping ({short(sorted(map(str, batch)))}) holds no 'labels': give the "
                            "targets beside the inputs")
                raise FitError(f"data.{self.key} ({short(self.spec)}) gave a batch that is a {type(batch).__name__}"
                               f"{length}; each batch must be an (inputs, targets) pair, as a DataLoader over "
                               f"TensorDataset(inputs, targets) gives{hint}")
            self.count += 1
            self.inputs = batch[0]
            yield batch

    def error(self, doing: str) -> FitError:
        share = f" (this rank's share of {self.ranks})" if self.ranks > 1 else ""
        return FitError(f"data.{self.key} ({short(self.spec)}) gave no batches{share} {doing}: the loader is empty, "
                        "or an iterator that was used up; return a DataLoader over a non-empty data set")

    def check_not_empty(self, doing: str) -> None:
        """Before any work, where the loader has a length."""
        try:
            n = len(self.loader)  # type: ignore[arg-type]
        except TypeError:  # no length (an iterable data set): counted as it is iterated
            return
        if n == 0:
            raise self.error(doing)

    def check_pass(self, doing: str) -> None:
        """After a pass."""
        if self.count == 0:
            raise self.error(doing)


def _first_tensor(value: Any, depth: int = 0) -> torch.Tensor | None:
    """The first tensor in a batch's inputs or targets (a tensor, or one in a mapping or a
    sequence of them, as a DataLoader collates dicts and tuples)."""
    if isinstance(value, torch.Tensor):
        return value
    if depth < 4:
        items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
        for item in items:
            found = _first_tensor(item, depth + 1)
            if found is not None:
                return found
    return None


def _samples(x: Any, y: Any, loader: _Batches) -> int:
    """How many samples a batch holds, to weight its mean loss by, counted on the targets
    (on the inputs where the targets hold no tensor): a tensor's leading dimension (1 for a
    0-d target, as a loader with batch_size=None gives one sample at a time); tensors that
    share a leading dimension (targets per task, as default_collate gives them) that
    dimension; a tuple of 0-d tensors (one sample's targets per task) 1; other lists of
    tensors, and lists of mappings, one item per sample; otherwise the count of the first
    item of a list, tuple or mapping that gives one (len() of a dict would count its keys)."""
    for value in (y, x):
        count = _batch_size(value)
        if count is not None:
            return count
    raise FitError(f"data.{loader.key} ({short(loader.spec)}) gave a batch whose inputs "
                   f"({type(x).__name__}) and targets ({type(y).__name__}) hold no tensor to count its samples "
                   "by; give tensors, or mappings or tuples of them, as a DataLoader collates them")


def _batch_size(value: Any) -> int | None:
    """The samples `value` holds (see _samples), or None where it holds no tensor."""
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.ndim else 1
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, torch.Tensor) for item in value):
        leading = {item.shape[0] if item.ndim else None for item in value}
        if len(leading) == 1 and None not in leading:
            return leading.pop()  # default_collate's targets per task, each [B, ...]
        if leading == {None} and isinstance(value, tuple):
            return 1  # one sample's targets per task (batch_size=None)
        return len(value)  # one tensor per sample (a custom collate's labels, boxes, sequences)
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, Mapping) for item in value):
        return len(value) if _first_tensor(value) is not None else None
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        count = _batch_size(item)
        if count is not None:
            return count
    return None


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _raised_in_the_library(exc: BaseException) -> bool:
    """Whether the innermost Python frame of `exc`'s traceback is in twa_kernels: a failure
    of the library's own code, not of the user's model (or of torch's layers under it)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE)


@contextlib.contextmanager
def _running(config: FitConfig, loader: _Batches, group: Any) -> Iterator[None]:
    """The user's model run on `loader`'s current batch: a failure inside it (inputs of
    another shape than it takes, say) is a FitError naming the model and the data. Passed
    through as they are: the library's own errors and failures of its code, running out of
    memory, and everything across processes (`group`), where a failed exchange raises the
    same kinds of error as a model."""
    try:
        yield
    except (TWAKernelsError, torch.OutOfMemoryError):
        raise
    # AttributeError and KeyError: a transformers model given a dict batch as one input (it
    # calls .size() on it), a forward that looks up a key the batches do not have
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError, KeyError) as exc:
        if group is not None or _raised_in_the_library(exc):
            raise
        first = _first_tensor(loader.inputs)
        inputs = f"inputs {tuple(first.shape)}" if first is not None else f"inputs {describe(loader.inputs)}"
        fix = f"check that data.{loader.key} gives the inputs the model takes"
        if isinstance(loader.inputs, Mapping):
            fix += (" (the model is called as model(inputs) with the mapping as one argument: a transformers "
                    "model takes it through a subclass whose forward(x) returns super().forward(**x).logits, "
                    "docs/cli.md)")
        raise FitError(f"model: {short(config.model)} failed on a batch of data.{loader.key} "
                       f"({short(loader.spec)}), {inputs}: {type(exc).__name__}: {short(str(exc))[1:-1]}; "
                       f"{fix}") from exc


@torch.no_grad()
def _mean_loss(twa: TWA, loader: _Batches, loss_fn: Callable, config: FitConfig, group: Any = None) -> float:
    """The loss at the averaged weights, computed once (in sharded mode, gathered once) for
    every batch: the forwards then need no exchange, so the ranks' shares of the samples may
    differ (split_for_evaluation's, each sample once)."""
    twa.eval()
    total, count = 0.0, 0
    with twa.averaged_model() as model:
        for x, y in loader:
            samples = _samples(x, y, loader)
            with _running(config, loader, group):
                predictions = model(x)
            total += float(call_loss(loss_fn, predictions, y, config.loss)) * samples
            count += samples
    if group is not None:  # over every rank's share
        sums = distributed.all_reduce_metrics({"total": total, "count": count}, group)
        total, count = sums["total"], sums["count"]
    if count == 0:
        raise loader.error("to evaluate the loss on")
    return total / count


def _update_bn(twa: TWA, loader: _Batches, config: FitConfig, group: Any) -> None:
    """BatchNorm statistics recomputed at the current weights, over every rank's share."""
    try:
        if group is None:
            def feed(model: nn.Module, batch: Any) -> None:  # the model's call alone: not the loader's
                with _running(config, loader, group):
                    feed_batch(model, batch, "make the config's model take the x of each (x, y) batch as its "
                               "one argument, as twa fit calls it: model(x)")

            twa.update_bn(loader, feed)
        else:
            distributed.update_bn(loader, twa, group)
    except NoBatchesError as exc:  # update_bn refuses a pass with no batches: name the loader instead
        raise loader.error("to recompute the BatchNorm statistics on") from exc
    loader.check_pass("to recompute the BatchNorm statistics on")


@distributed.record_errors  # under torchrun, each rank's own error reaches the job's summary
def run_fit(config_path: str | Path, progress: bool | None = None) -> dict:
    """Build, train and write a TWA from the config at `config_path` (see the module
    docstring); returns the report. The config and the output location are checked before
    any work; the outputs replace the output directory's old ones as one set. Rank 0 shows
    progress bars (`progress` None: only when standard error is a terminal)."""
    config = load_config(config_path)
    inputs = resolve_checkpoints(config.checkpoints)  # an empty glob or a missing directory, now
    # an earlier run's averaged weights given as a checkpoint would be replaced by this run's
    outputs_paths = {os.path.realpath(Path(config.output) / name): name for name in OUTPUTS}
    for spec in inputs:
        if isinstance(spec, (str, os.PathLike)) and os.path.realpath(spec) in outputs_paths:
            raise FitError(f"{config.source}: the checkpoint {str(spec)!r} is the output "
                           f"{outputs_paths[os.path.realpath(spec)]} of output: {config.output}, which this run "
                           "replaces; copy it elsewhere first, or choose another output")
    group = distributed.init_from_environment()
    if group is None and config.distributed_mode == "sharded":
        # a config shared by one-process trials and torchrun jobs: the one process runs, but is told
        warn_at_caller(f"{config.source}: distributed: {{mode: sharded}} has no effect in one process (no torchrun, "
                       "or WORLD_SIZE 1): this run trains unsharded; launch it with torchrun --nproc_per_node N to "
                       "shard the basis, or remove the key", UserWarning)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    outputs = OutputDirectory(config.output, OUTPUTS) if rank == 0 else None  # rank 0 alone writes
    # "training" once the run has taken up or started its epochs, "kept" once a progress
    # file of this run is on disk (taken up, or written after an epoch)
    stage: set[str] = set()
    progress_file = fit_progress.progress_path(config.output)
    try:
        try:
            with fit_progress.seeded_everywhere(config.seed):
                report = _fit(config, inputs, group, rank, progress, outputs, stage)
        except FitError:
            # in training or after it, the config, data or loss needs a change (a diverged run, a
            # loader used up after one pass): a rerun must not take up epochs this run could not
            # have finished. (A FitError before, such as a model factory that failed, leaves the
            # progress an earlier run of the config may have left.)
            if outputs is not None and "training" in stage:
                fit_progress.remove(progress_file)
            raise
        except KeyboardInterrupt:
            if outputs is not None and "kept" in stage and progress_file.is_file():  # said where Ctrl-C stopped
                raise KeyboardInterrupt(f"its finished epochs are kept in {progress_file}: run the same command "
                                        "again to resume after them") from None
            raise
        except SystemExit:  # SIGTERM (a scheduler's stop: `twa: terminated` is said), or the user's code's exit
            if outputs is not None and "kept" in stage and progress_file.is_file():
                print(f"twa: its finished epochs are kept in {progress_file}: run the same command again to resume "
                      "after them", file=sys.stderr)
            raise
        if outputs is not None:
            outputs.commit()
            fit_progress.remove(progress_file)  # nothing left to resume
    finally:
        if outputs is not None:
            outputs.discard()
    return report


def _fit(config: FitConfig, inputs: list, group: Any, rank: int, progress: bool | None,
         outputs: OutputDirectory | None, stage: set[str]) -> dict:
    progress = progress if rank == 0 else False
    world = 1 if group is None else torch.distributed.get_world_size(group)
    callables = resolve_import_strings(config)  # all of them before any factory runs
    loss_fn = loss_from(callables["loss"], config.loss)
    model = call_factory(callables["model"], config.model, "model")
    if not isinstance(model, nn.Module):
        raise FitError(f"model: {short(config.model)} returned {type(model).__name__}, not an nn.Module; return "
                       "the model itself")
    train_loader = _data(callables["data.train"], config.data["train"], "train")
    val_loader = _data(callables["data.val"], config.data["val"], "val") if "val" in config.data else None
    eval_loader = val_loader  # the loss is evaluated on every sample once, over the ranks
    if group is not None:
        train_loader = distributed.split_loader(train_loader, group)
        if val_loader is not None:
            eval_loader = distributed.split_for_evaluation(val_loader, group)
            val_loader = distributed.split_loader(val_loader, group)
    train_loader = _Batches(train_loader, "train", config.data["train"], world)
    train_loader.check_not_empty("to train on" if config.train_on == "train" else "for the BatchNorm statistics")
    if val_loader is not None:
        val_loader = _Batches(val_loader, "val", config.data["val"], world)
        val_loader.check_not_empty("to train on" if config.train_on == "val" else "to evaluate the loss on")
        eval_loader = _Batches(eval_loader, "val", config.data["val"], world)
    fit_loader = val_loader if config.train_on == "val" else train_loader

    # the checkpoints resolved once, before any work: a glob read again here could take in a
    # file written since (a training job still saving), which the report would not list
    twa = TWA(model, inputs, bits=config.bits, granularity=config.granularity,
              group_size=config.group_size, progress=progress, process_group=group,
              int8_gradients=config.int8_gradients,
              shard=group is not None and config.distributed_mode == "sharded")
    optimizer = getattr(torch.optim, config.optimizer)(twa.parameters(), **config.optimizer_args)

    start = time.perf_counter()
    basis_bytes = twa.basis.nbytes  # a sharded rank's share: summed over the ranks below
    shares = {"own": basis_bytes}
    if twa.parallel is not None and config.distributed_mode == "sharded":
        shares = distributed.all_reduce_metrics(shares, group)
    # what ran, with every default filled in: the config file may change, or be a pipe read once
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("source", "checkpoints")}
    report: dict[str, Any] = dict(config=config.source, settings=settings,
                                  checkpoints=[str(p) for p in inputs],
                                  coefficients=list(twa.coefficients.shape),
                                  basis_bytes=int(shares["own"]), basis_bytes_per_rank=basis_bytes,
                                  int8_gradients=twa.int8_gradients, kernels=_kernels(twa, group),
                                  world_size=world,
                                  distributed_mode=None if group is None else config.distributed_mode)
    progress_file = fit_progress.progress_path(config.output)
    run = fit_progress.fingerprint(settings, inputs, world, str(package_version()), report["kernels"])
    ordered = [train_loader, val_loader]  # the loaders whose batch order a resumed run takes up
    resumed = _resumed(progress_file, run, config, twa, optimizer, ordered, group)
    # the loader trained on (the others' order changes only the order of a mean's terms), on rank 0
    reason = fit_progress.unheld_order(fit_loader) if resumed is not None and rank == 0 else None
    if reason is not None:
        key = config.train_on
        warn_at_caller(f"twa fit: data.{key} ({short(config.data[key])}) is {reason}: the resumed epochs may see "
                       "other batches than the uninterrupted run would have (the progress file holds the global "
                       "random number generators, and a DataLoader's own generators and samplers)", UserWarning)
    report["resumed_after_epoch"] = None if resumed is None else resumed.epochs_done
    stage.add("training")
    if resumed is not None:
        stage.add("kept")
        losses, first_epoch = resumed.losses, resumed.epochs_done
        report["bytes_communicated_per_step"] = resumed.bytes_per_step
        if resumed.val_loss_at_swa is not None:
            report["val_loss_at_swa"] = resumed.val_loss_at_swa
    else:
        losses, first_epoch = [], 0
        if val_loader is not None:
            # The SWA baseline is measured the way TWA is: at the uniform average (the
            # coefficients start at zero) with BatchNorm statistics recomputed for those
            # weights, not the model's fresh ones. Training is unaffected: train-mode BatchNorm
            # normalises with batch statistics, and update_bn recomputes them again at the end.
            if has_running_statistics(model):
                _update_bn(twa, train_loader, config, group)
            report["val_loss_at_swa"] = _mean_loss(twa, eval_loader, loss_fn, config, group)
    for epoch in range(first_epoch, config.epochs):
        twa.train()
        for x, y in progress_bar(fit_loader, enabled=progress, desc=f"TWA epoch {epoch + 1}"):
            distributed.reset_comm_bytes(twa)
            optimizer.zero_grad()
            with _running(config, fit_loader, group):
                predictions = twa(x)
            loss = trainable_loss(call_loss(loss_fn, predictions, y, config.loss), config.loss)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())  # after backward: the value only
            report["bytes_communicated_per_step"] = sum(distributed.comm_bytes(twa).values())
        fit_loader.check_pass(f"to train on in epoch {epoch + 1}")
        if outputs is not None and bool(torch.isfinite(twa.coefficients).all()):  # rank 0, which writes the outputs
            fit_progress.save(progress_file, run, fit_progress.Progress(
                epochs_done=epoch + 1, coefficients=twa.coefficients.detach().cpu().clone(),
                optimizer=optimizer.state_dict(), losses=losses, val_loss_at_swa=report.get("val_loss_at_swa"),
                bytes_per_step=report.get("bytes_communicated_per_step", 0),
                rng=fit_progress.rng_states(one_device=group is not None),
                loaders=fit_progress.loader_states(ordered)))
            stage.add("kept")
    if not bool(torch.isfinite(twa.coefficients).all()):  # diverged: no BatchNorm pass or export at NaN weights
        raise FitError(f"training diverged: the coefficients hold NaN or Inf; {_fix(config)}")
    if has_running_statistics(model):
        _update_bn(twa, train_loader, config, group)
    if val_loader is not None:
        report["val_loss_after_twa"] = _mean_loss(twa, eval_loader, loss_fn, config, group)
    report.update(train_loss_last_10_batches=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                  seconds=time.perf_counter() - start)

    state = twa.averaged_state_dict()  # every rank: sharded mode gathers the weights
    _check_finite(state, report, config)  # every rank alike, before anything is staged
    if outputs is None:
        return report
    out = Path(config.output)
    for name in ("averaged.pt", "averaged.safetensors"):
        save_state_dict(state, outputs.stage(name))
    report["outputs"] = [str(out / name) for name in OUTPUTS[:2]]
    # with the machine, date and software the numbers came from; _check_finite ran: a NaN is a bug
    write_json(outputs.stage("report.json"), {**report, "stamp": stamp()}, allow_nan=False)
    return report


def _kernels(twa: TWA, group: Any) -> str:
    """The kernels this run's ops take (backend, instruction set, threads), the same string
    on every rank: a rank's own where all agree, else which ranks differ from rank 0 (the
    progress file is rank 0's, and each rank checks it against its own fingerprint)."""
    kernels = kernels_in_use(twa.center.device)
    if group is None or not (unlike := ranks_unlike_rank0(kernels, group, "comparing the ranks' kernels")):
        return kernels
    return f"kernels that differ between the ranks (ranks {unlike} unlike rank 0)"


def _resumed(path: Path, run: str, config: FitConfig, twa: TWA, optimizer: torch.optim.Optimizer,
             loaders: list, group: Any) -> fit_progress.Progress | None:
    """Take up the progress of an interrupted run of this config: the coefficients, the
    optimizer's state, the generators' states. Every rank reads the same file, and they must
    agree on it. None to start afresh: no file, or one that does not fit this run (which is
    then left as this run found it, and replaced after its first epoch)."""
    resumed = fit_progress.load(path, run)
    if resumed is not None:
        kept = (twa.coefficients.detach().clone(), optimizer.state_dict(), fit_progress.rng_states(),
                fit_progress.loader_states(loaders))
        try:
            if resumed.coefficients.shape != twa.coefficients.shape or not 0 < resumed.epochs_done <= config.epochs \
                    or not bool(torch.isfinite(resumed.coefficients).all()):
                # the settings and files are the same, but the model factory builds another model (or a
                # file made by hand)
                raise ValueError(f"its coefficients {tuple(resumed.coefficients.shape)} after epoch "
                                 f"{resumed.epochs_done} do not fit this run's {tuple(twa.coefficients.shape)} "
                                 f"over {config.epochs} epochs")
            with torch.no_grad():
                twa.coefficients.copy_(resumed.coefficients)
            fit_progress.check_saved_optimizer(resumed.optimizer, kept[1], optimizer, config.optimizer_args)
            optimizer.load_state_dict(resumed.optimizer)
            fit_progress.set_rng_states(resumed.rng)  # the batches the uninterrupted run would draw next
            fit_progress.set_loader_states(loaders, resumed.loaders)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
            with torch.no_grad():
                twa.coefficients.copy_(kept[0])
            optimizer.load_state_dict(kept[1])
            fit_progress.set_rng_states(kept[2])
            fit_progress.set_loader_states(loaders, kept[3])
            warn_at_caller(f"twa fit: cannot resume from {path} ({type(exc).__name__}: {exc}); this run starts "
                           "afresh and replaces it", UserWarning)
            resumed = None
    if group is not None:
        seen = None if resumed is None else (resumed.epochs_done, resumed.coefficients.tolist())
        unlike = ranks_unlike_rank0(seen, group, "the check of the ranks' fit progress")
        if unlike:
            raise FitError(f"ranks {unlike} read another progress file {path} than rank 0 (or none): the folder of "
                           "output: must be one every rank sees; delete the file to start afresh")
    if resumed is not None:
        warn_at_caller(f"twa fit: resuming after epoch {resumed.epochs_done} of {config.epochs} from {path}, which an "
                       "interrupted run of this config left; delete it to start afresh", UserWarning)
    return resumed


def _fix(config: FitConfig) -> str:
    return (f"nothing was written; lower optimizer.lr (now {short(config.optimizer_args.get('lr', 'the default'))}) "
            f"or check that loss ({short(config.loss)}) returns finite values")


def _check_finite(state: Mapping[str, torch.Tensor], report: Mapping[str, Any], config: FitConfig) -> None:
    """Refuse a diverged run (too high a learning rate, a loss that returned NaN): its
    weights would load without complaint and predict nothing."""
    fix = _fix(config)
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FitError(f"training diverged: the averaged weights hold NaN or Inf (first in {key!r}); {fix}")
    for key, value in report.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FitError(f"the report's {key} is {value}, not a finite number (a diverged run?); {fix}")
