"""`twa fit CONFIG.yaml`: TWA on your own model and data, without a training script.

    model: mypackage.models:make_model        # a callable returning the nn.Module
    data:
      train: mypackage.data:train_loader      # a callable returning an iterable of (x, y) batches
      val: mypackage.data:val_loader          # optional; needed for train_on: val
    checkpoints: runs/exp1/epoch_*.pt         # paths, a directory or a glob
    bits: 4                                   # 1, 2, 4, 8 or null (dense)
    granularity: tensor                       # model | tensor | an int
    optimizer: {name: AdamW, lr: 0.01}        # any torch.optim class and its arguments
    epochs: 2
    train_on: train                           # train (TWA-t) or val (TWA-v)
    loss: torch.nn.functional:cross_entropy   # optional; loss(outputs, targets)
    output: twa-out                           # averaged.pt, averaged.safetensors, report.json
    distributed: {mode: replicated}           # under torchrun: replicated | sharded (see distributed.py)

Under torchrun (`torchrun --nproc_per_node N -m twa_kernels fit config.yaml`) every rank
trains on its share of the data (DistributedSampler), and rank 0 alone writes the outputs.

Problems in the config (unknown keys or import strings, bad values, YAML syntax) raise
FitError with one line that says what and where.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twa_kernels.errors import InvalidArgumentError
from twa_kernels import distributed
from twa_kernels.io import save_state_dict
from twa_kernels.quant import SUPPORTED_BITS
from twa_kernels.twa import TWA

KEYS = {"model", "data", "checkpoints", "bits", "granularity", "group_size", "optimizer", "epochs", "train_on",
        "loss", "output", "distributed"}


class FitError(InvalidArgumentError):
    """A problem with a `twa fit` config."""


def load_config(path: str | Path, required: tuple[str, ...] = ("model", "data", "checkpoints")) -> dict:
    """The checked config; `required` are the keys it must have (`twa connect` and `twa
    plane` take their checkpoints from the command line, so they need no 'checkpoints')."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FitError(f"{path}: no such config file")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FitError(f"{path}: YAML error{where}: {problem}") from exc
    if not isinstance(config, dict):
        raise FitError(f"{path}: the config must be a mapping of keys to values")
    unknown = set(config) - KEYS
    if unknown:
        raise FitError(f"{path}: unknown key(s) {sorted(unknown)}; the keys are {sorted(KEYS)}")
    for key in required:
        if key not in config:
            raise FitError(f"{path}: missing required key {key!r}")
    if not isinstance(config["data"], dict) or "train" not in config["data"]:
        raise FitError(f"{path}: data must be a mapping with at least a 'train' import string")
    bits = config.get("bits", 4)
    if bits is not None and bits not in SUPPORTED_BITS:
        raise FitError(f"{path}: bits must be one of {list(SUPPORTED_BITS)} or null, got {bits!r}")
    if config.get("train_on", "train") not in ("train", "val"):
        raise FitError(f"{path}: train_on must be 'train' or 'val', got {config['train_on']!r}")
    if config.get("train_on") == "val" and "val" not in config["data"]:
        raise FitError(f"{path}: train_on: val needs data.val")
    mode = (config.get("distributed") or {}).get("mode", "replicated") if isinstance(
        config.get("distributed", {}), dict) else None
    if mode not in ("replicated", "sharded") or set(config.get("distributed") or {}) - {"mode"}:
        raise FitError(f"{path}: distributed must be {{mode: replicated}} or {{mode: sharded}}, got "
                       f"{config.get('distributed')!r}")
    epochs = config.get("epochs", 1)
    if not isinstance(epochs, int) or epochs < 0:
        raise FitError(f"{path}: epochs must be a non-negative integer, got {epochs!r}")
    return config


def import_string(spec: str) -> Any:
    """The object named by 'package.module:attribute'."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise FitError(f"import string {spec!r} must look like 'package.module:name'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FitError(f"unknown import string {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise FitError(f"unknown import string {spec!r}: module {module_name!r} has no {attr!r}") from exc
    return obj


def _call(spec: str, what: str) -> Any:
    factory = import_string(spec)
    if not callable(factory):
        raise FitError(f"{spec!r} ({what}) is not callable")
    return factory()


@torch.no_grad()
def _mean_loss(model: nn.Module, loader, loss_fn: Callable, group: Any = None) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        total += float(loss_fn(model(x), y)) * len(y)
        count += len(y)
    if group is not None:  # over every rank's share
        sums = distributed.all_reduce_metrics({"total": total, "count": count}, group)
        total, count = sums["total"], sums["count"]
    return total / max(count, 1)


@distributed.record_errors  # under torchrun, each rank's own error reaches the job's summary
def run_fit(config_path: str | Path, progress: bool = True) -> dict:
    from tqdm import tqdm

    config = load_config(config_path)
    group = distributed.init_from_environment()
    rank = 0 if group is None else torch.distributed.get_rank(group)
    progress = progress and rank == 0
    model = _call(config["model"], "model")
    if not isinstance(model, nn.Module):
        raise FitError(f"{config['model']!r} returned {type(model).__name__}, not an nn.Module")
    train_loader = _call(config["data"]["train"], "data.train")
    val_loader = _call(config["data"]["val"], "data.val") if "val" in config["data"] else None
    loss_fn = import_string(config.get("loss", "torch.nn.functional:cross_entropy"))
    if group is not None:
        train_loader = distributed.split_loader(train_loader, group)
        val_loader = None if val_loader is None else distributed.split_loader(val_loader, group)
    fit_loader = val_loader if config.get("train_on", "train") == "val" else train_loader
    mode = (config.get("distributed") or {}).get("mode", "replicated")

    twa = TWA(model, config["checkpoints"], bits=config.get("bits", 4),
              granularity=config.get("granularity", "tensor"), group_size=config.get("group_size", 128),
              progress=progress, process_group=group, shard=group is not None and mode == "sharded")
    opt_config = dict(config.get("optimizer") or {"name": "AdamW", "lr": 1e-2})
    opt_name = opt_config.pop("name", "AdamW")
    opt_class = getattr(torch.optim, opt_name, None)
    if opt_class is None:
        raise FitError(f"optimizer {opt_name!r} is not in torch.optim")
    optimizer = opt_class(twa.parameters(), **opt_config)

    start = time.perf_counter()
    report: dict[str, Any] = dict(config=str(config_path), coefficients=list(twa.coefficients.shape),
                                  basis_bytes=twa.basis.nbytes,
                                  world_size=1 if group is None else torch.distributed.get_world_size(group),
                                  distributed_mode=None if group is None else mode)
    if val_loader is not None:
        report["val_loss_at_swa"] = _mean_loss(twa, val_loader, loss_fn, group)
    losses = []
    for epoch in range(config.get("epochs", 1)):
        twa.train()
        for x, y in tqdm(fit_loader, desc=f"TWA epoch {epoch + 1}", disable=not progress, leave=False):
            distributed.reset_comm_bytes(twa)
            optimizer.zero_grad()
            loss = loss_fn(twa(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())  # after backward: the value only
            report["bytes_communicated_per_step"] = sum(distributed.comm_bytes(twa).values())
    if group is None:
        twa.update_bn(train_loader)
    else:  # statistics over every rank's share
        distributed.update_bn(twa, train_loader, group)
    if val_loader is not None:
        report["val_loss_after_twa"] = _mean_loss(twa, val_loader, loss_fn, group)
    report.update(train_loss_last_10_batches=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                  seconds=time.perf_counter() - start)

    out = Path(config.get("output", "twa-out"))
    state = twa.averaged_state_dict()  # every rank: sharded mode gathers the weights
    if rank != 0:
        return report
    report["outputs"] = [str(save_state_dict(state, out / "averaged.pt")),
                         str(save_state_dict(state, out / "averaged.safetensors"))]
    tmp = out / ".report.json.tmp"  # atomic: a reader never sees half a report
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "report.json")
    return report
