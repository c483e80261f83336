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
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import reprlib
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from twa_kernels._progress import progress_bar
from twa_kernels.batchnorm import NoBatchesError, has_running_statistics
from twa_kernels.errors import InvalidArgumentError
from twa_kernels import distributed
from twa_kernels._outdir import OutputDirectory
from twa_kernels._provenance import stamp
from twa_kernels.io import resolve_checkpoints, save_state_dict, write_json
from twa_kernels.quant import MAX_GROUP_SIZE, SUPPORTED_BITS
from twa_kernels.twa import TWA

KEYS = {"model", "data", "checkpoints", "bits", "granularity", "group_size", "int8_gradients", "optimizer", "epochs",
        "train_on", "loss", "output", "distributed"}
OUTPUTS = ("averaged.pt", "averaged.safetensors", "report.json")
DEFAULT_LOSS = "torch.nn.functional:cross_entropy"


class FitError(InvalidArgumentError):
    """A problem with a `twa fit` config."""


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """A checked `twa fit` config, with every default filled in (see the module docstring)."""

    model: str
    data: dict[str, str]
    checkpoints: str | list[str] | None
    bits: int | None = 4
    granularity: str | int = "tensor"
    group_size: int = 128
    int8_gradients: bool = False
    optimizer: str = "AdamW"
    optimizer_args: dict[str, Any] = dataclasses.field(default_factory=lambda: {"lr": 1e-2, "weight_decay": 0.0})
    epochs: int = 1
    train_on: str = "train"
    loss: str = DEFAULT_LOSS
    output: str = "twa-out"
    distributed_mode: str = "replicated"
    source: str = ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# a config's values can be huge (YAML aliases nest a list of ten in itself a few times over):
# a message shows a few hundred characters of one, never all of it
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 120, 60, 120
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_MAX_SHOWN = 300


def _short(value: Any) -> str:
    """repr(value), cut to a few hundred characters."""
    text = _REPR.repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


def _describe(value: Any) -> str:
    """The value as the user wrote it, and its YAML type where that is the problem."""
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return f"{_short(value)} ({kinds.get(type(value), type(value).__name__)})"


def _as_float(value: Any) -> float | None:
    """A number of the config as a float (an integer too large for one is infinite); None
    for what is not a number (a bool included: YAML's true is no learning rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _non_finite(value: Any, key: str, depth: int = 0) -> tuple[str, Any] | None:
    """(key, number) of the first NaN or infinite number in an optimizer argument (a number,
    or one inside a list such as betas)."""
    if isinstance(value, str):
        try:
            number = float(value)  # YAML reads `nan` and `inf` (no dot) as strings
        except ValueError:
            return None
        return None if math.isfinite(number) else (key, value)
    if isinstance(value, (list, tuple)) and depth < 3:
        for i, item in enumerate(value):
            found = _non_finite(item, f"{key}[{i}]", depth + 1)
            if found:
                return found
        return None
    number = _as_float(value)
    return (key, value) if number is not None and not math.isfinite(number) else None


def _check_import_string(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or value.count(":") != 1 or not all(value.split(":")):
        raise FitError(f"{where}: {key} must be an import string like 'package.module:name', got {_describe(value)}")
    return value


def _optimizer(where: str, value: Any) -> tuple[str, dict[str, Any]]:
    """(class name, arguments) of the `optimizer` entry, tried on a dummy parameter so a bad
    argument is found now, not at the first step."""
    if value is None:  # no weight decay: it would pull the coefficients, and the average, towards the center
        return "AdamW", {"lr": 1e-2, "weight_decay": 0.0}
    names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
             and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"]
    if not isinstance(value, Mapping):
        hint = next((f"; did you mean {{name: {n}}}?" for n in names if isinstance(value, str)
                     and n.lower() == value.lower()), "")
        raise FitError(f"{where}: optimizer must be a mapping such as {{name: AdamW, lr: 0.01}}, got "
                       f"{_describe(value)}{hint}")
    args = dict(value)
    name = args.pop("name", "AdamW")
    if name not in names:
        hint = next((f"; did you mean {n}?" for n in names if isinstance(name, str) and n.lower() == name.lower()), "")
        raise FitError(f"{where}: optimizer.name must be a torch.optim optimizer ({', '.join(sorted(names))}), "
                       f"got {_describe(name)}{hint}")
    for key, arg in list(args.items()):
        if isinstance(arg, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(arg)
            except ValueError:
                continue
            if math.isfinite(number):
                args[key] = number
    # a yes/no setting given as text ("false") is true to the optimizer, as any non-empty
    # string is: maximize: "false" trained the coefficients up the loss
    defaults = inspect.signature(getattr(torch.optim, name).__init__).parameters
    for key, arg in args.items():
        default = defaults[key].default if key in defaults else inspect.Parameter.empty
        # foreach and fused default to None (torch chooses) and are yes/no too; LBFGS's
        # line_search_fn defaults to None and takes a name
        if isinstance(arg, str) and (isinstance(default, bool) or (default is None and key in ("foreach", "fused"))):
            raise FitError(f"{where}: optimizer.{key} is a yes/no setting, got the text {_describe(arg)}; write true "
                           "or false without quotes, or leave the key out for the optimizer's default")
    lr = _as_float(args.get("lr", 1.0))  # absent: the optimizer's own default
    # an infinite lr (YAML .inf, or 1e400) writes NaN weights; 0 trains nothing
    if lr is None or not (math.isfinite(lr) and lr > 0):
        raise FitError(f"{where}: optimizer.lr must be a finite positive number (e.g. 0.01), got "
                       f"{_describe(args['lr'])}")
    for key, arg in args.items():
        # a NaN or infinite momentum or weight decay makes every step NaN, which would be
        # reported as a divergence blamed on the learning rate
        found = _non_finite(arg, str(key))
        if found:
            raise FitError(f"{where}: optimizer.{_short(found[0])[1:-1]} must be a finite number, got "
                           f"{_describe(found[1])}: NaN, an infinity or an integer too large for a float makes "
                           "every step NaN; give a finite value, or leave the key out for the optimizer's default")
    if name == "LBFGS":
        raise FitError(f"{where}: optimizer LBFGS needs a closure that re-evaluates the loss at each step, and twa fit "
                       "takes one plain step per batch; use AdamW or SGD, or train TWA from Python with "
                       "optimizer.step(closure)")
    # one step on a stand-in for the coefficients ([k, blocks], zero gradient): arguments that
    # construction accepts but the step cannot use (3 betas, capturable on CPU, SparseAdam's
    # sparse-only gradients) are found now, not after the basis is built
    trial = torch.zeros(2, 3, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = getattr(torch.optim, name)([trial], **args)
            trial.grad = torch.zeros_like(trial)
            optimizer.step()
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError, OverflowError) as exc:
        raise FitError(f"{where}: optimizer {name} does not take {_short(args)} for TWA's coefficients: "
                       f"{type(exc).__name__}: {_short(str(exc))[1:-1]}; give it arguments its documentation "
                       "lists, with values in their ranges") from exc
    return name, args


def check_config(raw: Any, where: str, required: tuple[str, ...] = ("model", "data", "checkpoints")) -> FitConfig:
    """Every key of a parsed config checked against the schema (FitConfig): the first
    problem raises FitError naming the key, the value and what is allowed."""
    if not isinstance(raw, Mapping):
        raise FitError(f"{where}: the config must be a mapping of keys to values, got {_describe(raw)}")
    names = [key for key in raw if not isinstance(key, str)]
    if names:  # `1: x` or `null: x`: a YAML key that is not a name
        raise FitError(f"{where}: the key {_describe(names[0])} is not a name; the keys are {sorted(KEYS)}: write "
                       "one of them, or remove the line")
    unknown = set(raw) - KEYS
    if unknown:
        raise FitError(f"{where}: unknown key(s) {_short(sorted(unknown))}; the keys are {sorted(KEYS)}")
    for key in required:
        if key not in raw:
            raise FitError(f"{where}: missing required key {key!r}")
    model = _check_import_string(where, "model", raw.get("model", "")) if "model" in raw else ""
    data = raw.get("data", {})
    if not isinstance(data, Mapping) or "train" not in data or set(data) - {"train", "val"}:
        raise FitError(f"{where}: data must be a mapping with a 'train' and an optional 'val' import string, "
                       f"got {_describe(data)}")
    data = {k: _check_import_string(where, f"data.{k}", v) for k, v in data.items()}
    checkpoints = raw.get("checkpoints")
    if "checkpoints" in raw and not (
            (isinstance(checkpoints, str) and checkpoints)
            or (isinstance(checkpoints, list) and checkpoints and all(isinstance(c, str) and c for c in checkpoints))):
        raise FitError(f"{where}: checkpoints must be a path, a directory, a glob or a non-empty list of paths, "
                       f"got {_describe(checkpoints)}")
    bits = raw.get("bits", 4)
    if bits is not None and not (_is_int(bits) and bits in SUPPORTED_BITS):
        raise FitError(f"{where}: bits must be one of {list(SUPPORTED_BITS)} or null, got {_describe(bits)}")
    granularity = raw.get("granularity", "tensor")
    if granularity not in ("model", "tensor") and not (_is_int(granularity) and granularity > 0):
        raise FitError(f"{where}: granularity must be 'model', 'tensor' or a positive integer (elements per "
                       f"coefficient block), got {_describe(granularity)}")
    group_size = raw.get("group_size", 128)
    if not (_is_int(group_size) and 0 < group_size <= MAX_GROUP_SIZE and group_size % 8 == 0):
        raise FitError(f"{where}: group_size must be a positive multiple of 8 (e.g. 64, 128) of at most "
                       f"{MAX_GROUP_SIZE}, got {_describe(group_size)}")
    int8_gradients = raw.get("int8_gradients", False)
    if not isinstance(int8_gradients, bool):
        raise FitError(f"{where}: int8_gradients must be true or false, got {_describe(int8_gradients)}")
    if int8_gradients and bits is None:
        raise FitError(f"{where}: int8_gradients: true rounds gradients per basis group, which a dense basis "
                       "(bits: null) does not have; set bits to 1, 2, 4 or 8, or int8_gradients: false")
    optimizer, optimizer_args = _optimizer(where, raw.get("optimizer"))
    epochs = raw.get("epochs", 1)
    if not _is_int(epochs) or epochs < 1:  # 0 would write the untrained average as if it were TWA's
        raise FitError(f"{where}: epochs must be a positive integer, got {_describe(epochs)}")
    train_on = raw.get("train_on", "train")
    if train_on not in ("train", "val"):
        raise FitError(f"{where}: train_on must be 'train' or 'val', got {_describe(train_on)}")
    if train_on == "val" and "val" not in data:
        raise FitError(f"{where}: train_on: val needs data.val")
    loss = _check_import_string(where, "loss", raw.get("loss", DEFAULT_LOSS))
    output = raw.get("output", "twa-out")
    if not isinstance(output, str) or not output:
        raise FitError(f"{where}: output must be a directory path, got {_describe(output)}")
    output = os.path.expanduser(output)  # as a shell would: `~/runs` is in the home directory, not ./~/runs
    dist_config = raw.get("distributed")
    dist_config = {} if dist_config is None else dist_config  # `distributed:` with nothing after it
    mode = dist_config.get("mode", "replicated") if isinstance(dist_config, Mapping) else None
    if mode not in ("replicated", "sharded") or set(dist_config) - {"mode"}:
        raise FitError(f"{where}: distributed must be {{mode: replicated}} or {{mode: sharded}}, got "
                       f"{_describe(raw.get('distributed'))}; write one of them, or leave the key out (it has an "
                       "effect under torchrun only)")
    return FitConfig(model=model, data=data, checkpoints=checkpoints, bits=bits, granularity=granularity,
                     group_size=group_size, int8_gradients=int8_gradients, optimizer=optimizer,
                     optimizer_args=optimizer_args, epochs=epochs,
                     train_on=train_on, loss=loss, output=output, distributed_mode=mode, source=where)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping: YAML's own rule
    is that the last one wins, so a second `epochs:` would silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {_short(key)} appears twice (first at line {seen[key] + 1}); give it once",
                    key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, required: tuple[str, ...] = ("model", "data", "checkpoints")) -> FitConfig:
    """The checked config; `required` are the keys it must have (`twa connect` and `twa
    plane` take their checkpoints from the command line, so they need no 'checkpoints')."""
    path = Path(path)
    try:
        config = yaml.load(_read_config(path), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise FitError(f"{path}: not a UTF-8 text file (byte {exc.start} cannot be decoded); give the YAML "
                       "config file, not a checkpoint or other binary file") from exc
    except OSError as exc:
        raise FitError(f"{path}: cannot read the config ({exc.strerror or exc}); check its permissions") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FitError(f"{path}: YAML error{where}: {problem}") from exc
    except RecursionError:  # a config is a few levels of mappings: nesting this deep is not one
        raise FitError(f"{path}: not a valid config: its YAML is nested too deeply to read; a `twa fit` config is "
                       "a mapping of settings (model, data, checkpoints, ...) a few levels deep") from None
    return check_config(config, str(path), required)


# a config is a few lines; a pipe or device giving more than this is not one (and /dev/zero never ends)
_MAX_STREAMED_CONFIG = 16 * 2**20


def _read_config(path: Path) -> str:
    """The config's text: a regular file, or what a pipe or character device gives once
    (`twa fit <(envsubst < base.yaml)` passes /dev/fd/63, a pipe)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FitError(f"{path}: no such config file; give the YAML file's path") from None
    except OSError as exc:
        raise FitError(f"{path}: cannot read the config ({exc.strerror or exc}); check the path and its "
                       "permissions") from exc
    except (ValueError, UnicodeError):  # a NUL byte, or a name the file system's encoding cannot hold
        raise FitError(f"{_short(str(path))}: not a path a config file can have (it holds a NUL byte or text the "
                       "file system cannot encode); give the YAML file's path") from None
    if stat.S_ISDIR(mode):
        raise FitError(f"{path}: is a directory, not a config file; give the YAML file's path")
    if stat.S_ISREG(mode):
        return path.read_text(encoding="utf-8")
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        kind = "a socket" if stat.S_ISSOCK(mode) else "a block device" if stat.S_ISBLK(mode) else "not a file"
        raise FitError(f"{path}: not a regular file ({kind}), so not a config file; give the YAML file's path")
    with open(path, "rb") as f:
        data = f.read(_MAX_STREAMED_CONFIG + 1)
    if len(data) > _MAX_STREAMED_CONFIG:
        raise FitError(f"{path}: gave more than {_MAX_STREAMED_CONFIG // 2**20} MiB, which is no config; give the "
                       "YAML file's path (or a pipe that gives its text)")
    return data.decode("utf-8")


def _working_directory_on_path() -> None:
    """Import strings name the user's own modules, so they are found from the working
    directory, as `python -m` does and uvicorn and gunicorn do for theirs; an installed
    console script's sys.path starts with its bin/ folder instead."""
    cwd = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path):
        sys.path.insert(0, cwd)


def import_string(spec: str, what: str = "") -> Any:
    """The object named by 'package.module:attribute', importable from the working directory
    (`what`: the config key that gave it, named in the error)."""
    key = f"{what}: " if what else ""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise FitError(f"{key}import string {_short(spec)} must look like 'package.module:name'")
    module_name, attr = spec.split(":")
    _working_directory_on_path()
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as exc:  # a relative ('.pkg') or empty module name too
        raise FitError(f"{key}unknown import string {_short(spec)}: cannot import module {_short(module_name)} "
                       f"({_short(str(exc))[1:-1]}); check the module's name and that it is importable from the "
                       "working directory") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise FitError(f"{key}unknown import string {_short(spec)}: module {_short(module_name)} has no "
                       f"{_short(attr)}; check the name after the ':'") from exc
    return obj


def callable_from(spec: str, what: str) -> Callable:
    """The callable named by the import string `spec` (`what`: the config key, for the error)."""
    obj = import_string(spec, what)
    if not callable(obj):
        raise FitError(f"{what}: {_short(spec)} is {type(obj).__name__}, not callable; name a function or class")
    return obj


def resolve_import_strings(config: FitConfig) -> dict[str, Callable]:
    """Every import string of `config` resolved to its callable, keyed by its config key
    (model, data.train, data.val, loss), before any is called: a misspelt data.val is named
    before the model factory runs, which may take minutes (a download, a large model)."""
    specs = {"model": config.model, **{f"data.{key}": spec for key, spec in config.data.items()},
             "loss": config.loss}
    return {key: callable_from(spec, key) for key, spec in specs.items() if spec}


def call_factory(factory: Callable, spec: str, what: str) -> Any:
    """What `factory` (resolved from the import string `spec`) returns, called with no
    arguments, as every factory of a config is; a factory that needs some is named (its own
    TypeError would be a traceback)."""
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise FitError(f"{what}: {_short(spec)} cannot be called without arguments ({exc}); name a function of no "
                       "arguments, in a module of your own, that builds it as you need") from None
    except ValueError:  # no signature to read (some builtins): call it and see
        pass
    return factory()


def loss_from(obj: Callable, spec: str) -> Callable:
    """The loss that `obj` (resolved from the loss import string `spec`) names: a function of
    (outputs, targets), or an nn.Module loss class (torch.nn:CrossEntropyLoss), made with its
    defaults. `twa connect` and `twa plane` take their loss from here too."""
    if isinstance(obj, type):
        if not issubclass(obj, nn.Module):
            raise FitError(f"loss: {_short(spec)} is a class, not a loss; name a function of (outputs, targets) or "
                           "an nn.Module loss class such as torch.nn:CrossEntropyLoss")
        try:
            obj = obj()
        except TypeError as exc:
            raise FitError(f"loss: {_short(spec)} cannot be made without arguments ({exc}); name a function of "
                           "(outputs, targets) in your own module that builds it as you need") from exc
    if not callable(obj):
        raise FitError(f"loss: {_short(spec)} is a {type(obj).__name__}, not a function of (outputs, targets)")
    try:  # found now, before the model, the data and the basis are built
        inspect.signature(obj).bind(None, None)
    except TypeError as exc:
        raise FitError(f"loss: {_short(spec)} cannot be called as loss(outputs, targets) ({exc}); name a loss of "
                       "two arguments, such as torch.nn.functional:cross_entropy") from None
    except ValueError:  # no signature to read (some builtins): the first call tells
        pass
    return obj


def call_loss(loss_fn: Callable, outputs: Any, targets: Any, spec: str) -> torch.Tensor:
    """loss_fn(outputs, targets), one number; a loss that cannot take this model's outputs and
    these targets (class labels given to a regression loss, say) is named with both shapes."""
    try:
        loss = loss_fn(outputs, targets)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        def shape(value: Any) -> str:
            return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
        raise FitError(f"loss: {_short(spec)} failed on the model's outputs {shape(outputs)} and the targets "
                       f"{shape(targets)}: {type(exc).__name__}: {_short(str(exc))[1:-1]}; name a loss that takes "
                       "them, such as torch.nn.functional:cross_entropy for class labels") from exc
    return _one_number(loss, spec)


def _one_number(loss: Any, spec: str) -> torch.Tensor:
    """The loss of one batch, which must be one number (a tensor of one element)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise FitError(f"loss: {_short(spec)} returned {_short(shape)}, not one number; a loss reduced over the "
                       "batch (reduction='mean') is what the coefficients train on")
    return loss


def _trainable(loss: torch.Tensor, spec: str) -> torch.Tensor:
    """The loss of a training batch, which must carry the gradient back to the coefficients."""
    if not loss.requires_grad:
        raise FitError(f"loss: {_short(spec)} returned a value that does not require grad, so the coefficients "
                       "cannot train on it (computed under torch.no_grad(), detached, or rebuilt with "
                       "torch.tensor(...)); return the loss computed from the outputs as they are")
    return loss


def _data(factory: Callable, spec: str, key: str) -> Iterable:
    """The loader data.`key`'s factory returns, refused now if it cannot be iterated at all."""
    loader = call_factory(factory, spec, f"data.{key}")
    if not (hasattr(loader, "__iter__") or hasattr(loader, "__getitem__")):
        raise FitError(f"data.{key} ({_short(spec)}) returned {_describe(loader)}, which is not iterable; return an "
                       "iterable of (inputs, targets) batches such as a DataLoader")
    return loader


class _Batches:
    """A data loader that counts the batches of each pass, so a pass that gave none (an empty
    loader, or a generator already used up) is an error instead of a silent result: an empty
    BatchNorm pass would leave the statistics reset to 0 and 1, an empty evaluation a loss of 0."""

    def __init__(self, loader: Iterable, key: str, spec: str, ranks: int):
        self.loader, self.key, self.spec, self.ranks = loader, key, spec, ranks
        self.count = 0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        self.count = 0
        for batch in self.loader:
            if not isinstance(batch, (list, tuple)) or len(batch) != 2:  # or a ValueError deep in unpacking
                length = f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""
                raise FitError(f"data.{self.key} ({_short(self.spec)}) gave a batch that is a {type(batch).__name__}"
                               f"{length}; each batch must be an (inputs, targets) pair, as a DataLoader over "
                               "TensorDataset(inputs, targets) gives")
            self.count += 1
            yield batch

    def error(self, doing: str) -> FitError:
        share = f" (this rank's share of {self.ranks})" if self.ranks > 1 else ""
        return FitError(f"data.{self.key} ({_short(self.spec)}) gave no batches{share} {doing}: the loader is empty, "
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
    raise FitError(f"data.{loader.key} ({_short(loader.spec)}) gave a batch whose inputs "
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


@torch.no_grad()
def _mean_loss(model: nn.Module, loader: _Batches, loss_fn: Callable, spec: str, group: Any = None) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        samples = _samples(x, y, loader)
        total += float(call_loss(loss_fn, model(x), y, spec)) * samples
        count += samples
    if group is not None:  # over every rank's share
        sums = distributed.all_reduce_metrics({"total": total, "count": count}, group)
        total, count = sums["total"], sums["count"]
    if count == 0:
        raise loader.error("to evaluate the loss on")
    return total / count


def _update_bn(twa: TWA, loader: _Batches, group: Any) -> None:
    """BatchNorm statistics recomputed at the current weights, over every rank's share."""
    try:
        if group is None:
            twa.update_bn(loader)
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
        warnings.warn(f"{config.source}: distributed: {{mode: sharded}} has no effect in one process (no torchrun, "
                      "or WORLD_SIZE 1): this run trains unsharded; launch it with torchrun --nproc_per_node N to "
                      "shard the basis, or remove the key", UserWarning, stacklevel=3)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    outputs = OutputDirectory(config.output, OUTPUTS) if rank == 0 else None  # rank 0 alone writes
    try:
        report = _fit(config, inputs, group, rank, progress, outputs)
        if outputs is not None:
            outputs.commit()
    finally:
        if outputs is not None:
            outputs.discard()
    return report


def _fit(config: FitConfig, inputs: list, group: Any, rank: int, progress: bool | None,
         outputs: OutputDirectory | None) -> dict:
    progress = progress if rank == 0 else False
    world = 1 if group is None else torch.distributed.get_world_size(group)
    callables = resolve_import_strings(config)  # all of them before any factory runs
    loss_fn = loss_from(callables["loss"], config.loss)
    model = call_factory(callables["model"], config.model, "model")
    if not isinstance(model, nn.Module):
        raise FitError(f"model: {_short(config.model)} returned {type(model).__name__}, not an nn.Module; return "
                       "the model itself")
    train_loader = _data(callables["data.train"], config.data["train"], "train")
    val_loader = _data(callables["data.val"], config.data["val"], "val") if "val" in config.data else None
    eval_loader = val_loader  # the loss is evaluated on every sample once, over the ranks
    if group is not None:
        train_loader = distributed.split_loader(train_loader, group)
        if val_loader is not None:
            eval_loader = (distributed.split_for_evaluation(val_loader, group)
                           if config.distributed_mode == "replicated" else distributed.split_loader(val_loader, group))
            val_loader = distributed.split_loader(val_loader, group)
    train_loader = _Batches(train_loader, "train", config.data["train"], world)
    train_loader.check_not_empty("to train on" if config.train_on == "train" else "for the BatchNorm statistics")
    if val_loader is not None:
        val_loader = _Batches(val_loader, "val", config.data["val"], world)
        val_loader.check_not_empty("to train on" if config.train_on == "val" else "to evaluate the loss on")
        eval_loader = _Batches(eval_loader, "val", config.data["val"], world)
    fit_loader = val_loader if config.train_on == "val" else train_loader

    twa = TWA(model, config.checkpoints, bits=config.bits, granularity=config.granularity,
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
                                  int8_gradients=twa.int8_gradients, world_size=world,
                                  distributed_mode=None if group is None else config.distributed_mode)
    if val_loader is not None:
        # The SWA baseline is measured the way TWA is: at the uniform average (the
        # coefficients start at zero) with BatchNorm statistics recomputed for those
        # weights, not the model's fresh ones. Training is unaffected: train-mode BatchNorm
        # normalises with batch statistics, and update_bn recomputes them again at the end.
        if has_running_statistics(model):
            _update_bn(twa, train_loader, group)
        report["val_loss_at_swa"] = _mean_loss(twa, eval_loader, loss_fn, config.loss, group)
    losses = []
    for epoch in range(config.epochs):
        twa.train()
        for x, y in progress_bar(fit_loader, enabled=progress, desc=f"TWA epoch {epoch + 1}"):
            distributed.reset_comm_bytes(twa)
            optimizer.zero_grad()
            loss = _trainable(call_loss(loss_fn, twa(x), y, config.loss), config.loss)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())  # after backward: the value only
            report["bytes_communicated_per_step"] = sum(distributed.comm_bytes(twa).values())
        fit_loader.check_pass(f"to train on in epoch {epoch + 1}")
    if not bool(torch.isfinite(twa.coefficients).all()):  # diverged: no BatchNorm pass or export at NaN weights
        raise FitError(f"training diverged: the coefficients hold NaN or Inf; {_fix(config)}")
    if has_running_statistics(model):
        _update_bn(twa, train_loader, group)
    if val_loader is not None:
        report["val_loss_after_twa"] = _mean_loss(twa, eval_loader, loss_fn, config.loss, group)
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


def _fix(config: FitConfig) -> str:
    return (f"nothing was written; lower optimizer.lr (now {_short(config.optimizer_args.get('lr', 'the default'))}) "
            f"or check that loss ({_short(config.loss)}) returns finite values")


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
