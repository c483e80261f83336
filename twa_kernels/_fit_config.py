"""A `twa fit` config, read and checked whole before any work: FitConfig, every default
filled in, or one FitError naming the key, the value and what is allowed (see fit.py for
the keys). YAML is read with a safe loader that refuses duplicate keys."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import reprlib
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from twa_kernels._random import SEED_RANGE
from twa_kernels.errors import InvalidArgumentError
from twa_kernels.quant import MAX_GROUP_SIZE, SUPPORTED_BITS


KEYS = {"model", "data", "checkpoints", "bits", "granularity", "group_size", "int8_gradients", "optimizer", "epochs",
        "train_on", "loss", "output", "distributed", "seed"}

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
    seed: int = 0
    source: str = ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# a config's values can be huge (YAML aliases nest a list of ten in itself a few times over):
# a message shows a few hundred characters of one, never all of it
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 120, 60, 120
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_MAX_SHOWN = 300


def short(value: Any) -> str:
    """repr(value), cut to a few hundred characters."""
    text = _REPR.repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


def describe(value: Any) -> str:
    """The value as the user wrote it, and its YAML type where that is the problem."""
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return f"{short(value)} ({kinds.get(type(value), type(value).__name__)})"


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
        raise FitError(f"{where}: {key} must be an import string like 'package.module:name', got {describe(value)}")
    return value


# a decimal number as text: what YAML 1.1 leaves as text (1e-3, with no dot) and means a number
_DECIMAL = re.compile(r"^[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")


def _text_as_number(value: Any) -> Any:
    """An optimizer argument with the numbers YAML 1.1 reads as text (1e-3, without a dot)
    made numbers, in a list such as betas too; anything else as it is (text such as 010,
    0x10 or 1:30, which the checks then name)."""
    if isinstance(value, str):
        if not _DECIMAL.match(value):
            return value
        number = float(value)
        return number if math.isfinite(number) else value
    if isinstance(value, list):
        return [_text_as_number(item) for item in value]
    return value


def _plain(value: Any) -> bool:
    """Whether a YAML value is one JSON writes as it is: null, a bool, a number, text, or a
    list of them (a YAML date or timestamp is not)."""
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


_MAX_LIST = 16  # the longest list an optimizer argument takes (betas has 2, Rprop's etas 2)


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
                       f"{describe(value)}{hint}")
    args = dict(value)
    name = args.pop("name", "AdamW")
    if name not in names:
        hint = next((f"; did you mean {n}?" for n in names if isinstance(name, str) and n.lower() == name.lower()), "")
        raise FitError(f"{where}: optimizer.name must be a torch.optim optimizer ({', '.join(sorted(names))}), "
                       f"got {describe(name)}{hint}")
    for key, arg in args.items():
        # before any walk of the values: lists nested in lists (YAML aliases of aliases) can
        # stand for billions of items, and an optimizer takes numbers, names and short lists
        if isinstance(arg, Mapping) or isinstance(arg, list) and (
                len(arg) > _MAX_LIST or any(isinstance(item, (list, Mapping)) for item in arg)):
            raise FitError(f"{where}: optimizer.{key} must be a number, true/false, a name or a list of up to "
                           f"{_MAX_LIST} numbers, got {describe(arg)}")
    args = {key: _text_as_number(arg) for key, arg in args.items()}
    # a yes/no setting given as anything but true or false is read by its truth: the text
    # "false" is true, as any non-empty string is (maximize: "false" trained the coefficients
    # up the loss), and a date or a list turned the setting on, then failed the report's write
    defaults = inspect.signature(getattr(torch.optim, name).__init__).parameters
    for key, arg in args.items():
        default = defaults[key].default if key in defaults else inspect.Parameter.empty
        # foreach and fused default to None (torch chooses) and are yes/no too; LBFGS's
        # line_search_fn defaults to None and takes a name
        yes_no = isinstance(default, bool) or (default is None and key in ("foreach", "fused"))
        if yes_no and not (isinstance(arg, bool) or (arg is None and default is None)):
            raise FitError(f"{where}: optimizer.{key} is a yes/no setting, got {describe(arg)}; write true or false "
                           "without quotes, or leave the key out for the optimizer's default")
    lr = _as_float(args.get("lr", 1.0))  # absent: the optimizer's own default
    # an infinite lr (YAML .inf, or 1e400) writes NaN weights; 0 trains nothing
    if lr is None or not (math.isfinite(lr) and lr > 0):
        raise FitError(f"{where}: optimizer.lr must be a finite positive number (e.g. 0.01), got "
                       f"{describe(args['lr'])}")
    for key, arg in args.items():
        # a NaN or infinite momentum or weight decay makes every step NaN, which would be
        # reported as a divergence blamed on the learning rate
        found = _non_finite(arg, str(key))
        if found:
            raise FitError(f"{where}: optimizer.{short(found[0])[1:-1]} must be a finite number, got "
                           f"{describe(found[1])}: NaN, an infinity or an integer too large for a float makes "
                           "every step NaN; give a finite value, or leave the key out for the optimizer's default")
        default = defaults[key].default if key in defaults else inspect.Parameter.empty
        # a number given as true, null or a date: true was read as 1 (weight_decay: yes decayed by 1.0),
        # and the others failed at a later step (dampening is read from the second step on)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and _as_float(arg) is None:
            raise FitError(f"{where}: optimizer.{key} is a number (its default is {default!r}), got {describe(arg)}; "
                           "give a number, or leave the key out for the optimizer's default")
        # as long as the default: a shorter betas failed inside the step with an IndexError
        if isinstance(default, tuple) and not (isinstance(arg, list) and len(arg) == len(default) and all(
                _as_float(item) is not None or (item is None and None in default) for item in arg)):
            raise FitError(f"{where}: optimizer.{key} is a list of {len(default)} numbers (its default is "
                           f"{list(default)!r}), got {describe(arg)}; give a list such as {list(default)!r}, or "
                           "leave the key out")
        if not _plain(arg):  # the report writes the arguments as JSON
            raise FitError(f"{where}: optimizer.{key} must be a number, true/false, a name or a list of numbers, got "
                           f"{describe(arg)}")
    if name == "LBFGS":
        raise FitError(f"{where}: optimizer LBFGS needs a closure that re-evaluates the loss at each step, and twa fit "
                       "takes one plain step per batch; use AdamW or SGD, or train TWA from Python with "
                       "optimizer.step(closure)")
    # two steps on a stand-in for the coefficients ([k, blocks], a small gradient): arguments that
    # construction accepts but the step cannot use (3 betas, capturable on CPU, SparseAdam's
    # sparse-only gradients) are found now, not after the basis is built
    trial = torch.zeros(2, 3, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = getattr(torch.optim, name)([trial], **args)
            for _ in range(2):  # the second step reads what the first set up (SGD's dampening with momentum)
                trial.grad = torch.full_like(trial, 1e-3)
                optimizer.step()
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AssertionError, ArithmeticError) as exc:
        raise FitError(f"{where}: optimizer {name} does not take {short(args)} for TWA's coefficients: "
                       f"{type(exc).__name__}: {short(str(exc))[1:-1]}; give it arguments its documentation "
                       "lists, with values in their ranges") from exc
    return name, args


def check_config(raw: Any, where: str, required: tuple[str, ...] = ("model", "data", "checkpoints")) -> FitConfig:
    """Every key of a parsed config checked against the schema (FitConfig): the first
    problem raises FitError naming the key, the value and what is allowed."""
    if not isinstance(raw, Mapping):
        raise FitError(f"{where}: the config must be a mapping of keys to values, got {describe(raw)}")
    names = [key for key in raw if not isinstance(key, str)]
    if names:  # `1: x` or `null: x`: a YAML key that is not a name
        raise FitError(f"{where}: the key {describe(names[0])} is not a name; the keys are {sorted(KEYS)}: write "
                       "one of them, or remove the line")
    unknown = set(raw) - KEYS
    if unknown:
        raise FitError(f"{where}: unknown key(s) {short(sorted(unknown))}; the keys are {sorted(KEYS)}")
    for key in required:
        if key not in raw:
            raise FitError(f"{where}: missing required key {key!r}")
    model = _check_import_string(where, "model", raw.get("model", "")) if "model" in raw else ""
    data = raw.get("data", {})
    if not isinstance(data, Mapping) or "train" not in data or set(data) - {"train", "val"}:
        raise FitError(f"{where}: data must be a mapping with a 'train' and an optional 'val' import string, "
                       f"got {describe(data)}")
    data = {k: _check_import_string(where, f"data.{k}", v) for k, v in data.items()}
    checkpoints = raw.get("checkpoints")
    if "checkpoints" in raw and not (
            (isinstance(checkpoints, str) and checkpoints)
            or (isinstance(checkpoints, list) and checkpoints and all(isinstance(c, str) and c for c in checkpoints))):
        raise FitError(f"{where}: checkpoints must be a path, a directory, a glob or a non-empty list of paths, "
                       f"got {describe(checkpoints)}")
    if checkpoints is not None:  # `~/runs/*.pt` in the home directory, as a shell and `output:` read it
        checkpoints = ([os.path.expanduser(c) for c in checkpoints] if isinstance(checkpoints, list)
                       else os.path.expanduser(checkpoints))
    bits = raw.get("bits", 4)
    if bits is not None and not (_is_int(bits) and bits in SUPPORTED_BITS):
        raise FitError(f"{where}: bits must be one of {list(SUPPORTED_BITS)} or null, got {describe(bits)}")
    granularity = raw.get("granularity", "tensor")
    if granularity not in ("model", "tensor") and not (_is_int(granularity) and granularity > 0):
        raise FitError(f"{where}: granularity must be 'model', 'tensor' or a positive integer (elements per "
                       f"coefficient block), got {describe(granularity)}")
    group_size = raw.get("group_size", 128)
    if not (_is_int(group_size) and 0 < group_size <= MAX_GROUP_SIZE and group_size % 8 == 0):
        raise FitError(f"{where}: group_size must be a positive multiple of 8 (e.g. 64, 128) of at most "
                       f"{MAX_GROUP_SIZE}, got {describe(group_size)}")
    int8_gradients = raw.get("int8_gradients", False)
    if not isinstance(int8_gradients, bool):
        raise FitError(f"{where}: int8_gradients must be true or false, got {describe(int8_gradients)}")
    if int8_gradients and bits is None:
        raise FitError(f"{where}: int8_gradients: true rounds gradients per basis group, which a dense basis "
                       "(bits: null) does not have; set bits to 1, 2, 4 or 8, or int8_gradients: false")
    optimizer, optimizer_args = _optimizer(where, raw.get("optimizer"))
    epochs = raw.get("epochs", 1)
    if not _is_int(epochs) or epochs < 1:  # 0 would write the untrained average as if it were TWA's
        raise FitError(f"{where}: epochs must be a positive integer, got {describe(epochs)}")
    train_on = raw.get("train_on", "train")
    if train_on not in ("train", "val"):
        raise FitError(f"{where}: train_on must be 'train' or 'val', got {describe(train_on)}")
    if train_on == "val" and "val" not in data:
        raise FitError(f"{where}: train_on: val needs data.val")
    loss = _check_import_string(where, "loss", raw.get("loss", DEFAULT_LOSS))
    output = raw.get("output", "twa-out")
    if not isinstance(output, str) or not output:
        raise FitError(f"{where}: output must be a directory path, got {describe(output)}")
    if not _encodable_path(output):
        raise FitError(f"{where}: output {describe(output)} holds a NUL byte or text the file system cannot encode; "
                       "give a directory path without them")
    output = os.path.expanduser(output)  # as a shell would: `~/runs` is in the home directory, not ./~/runs
    dist_config = raw.get("distributed")
    dist_config = {} if dist_config is None else dist_config  # `distributed:` with nothing after it
    mode = dist_config.get("mode", "replicated") if isinstance(dist_config, Mapping) else None
    if mode not in ("replicated", "sharded") or set(dist_config) - {"mode"}:
        raise FitError(f"{where}: distributed must be {{mode: replicated}} or {{mode: sharded}}, got "
                       f"{describe(raw.get('distributed'))}; write one of them, or leave the key out (it has an "
                       "effect under torchrun only)")
    seed = raw.get("seed", 0)
    if not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise FitError(f"{where}: seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got "
                       f"{describe(seed)}")
    return FitConfig(model=model, data=data, checkpoints=checkpoints, bits=bits, granularity=granularity,
                     group_size=group_size, int8_gradients=int8_gradients, optimizer=optimizer,
                     optimizer_args=optimizer_args, epochs=epochs,
                     train_on=train_on, loss=loss, output=output, distributed_mode=mode, seed=seed, source=where)


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
                    None, None, f"the key {short(key)} appears twice (first at line {seen[key] + 1}); give it once",
                    key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# Numbers in decimal only (YAML 1.2's rule): YAML 1.1, which PyYAML follows, reads `epochs:
# 010` as 8 (octal), `seed: 1:30` as 90 and `lr: 0:00.5` as 0.5 (base 60), and 0b11 and 0x80
# too, without a word. Such a value stays a string here, which the checks then name.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int",
                                                                       "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
                                       list("-+0123456789"))
# floats as YAML 1.1 writes them (a dot; 1e-3 stays text), less its base 60 (`lr: 0:00.5`)
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


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


def _encodable_path(text: str) -> bool:
    """Whether `text` can name a file: no NUL byte, and encodable by the file system (a
    lone surrogate is not)."""
    try:
        return b"\0" not in os.fsencode(text)
    except UnicodeError:
        return False


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
        raise FitError(f"{short(str(path))}: not a path a config file can have (it holds a NUL byte or text the "
                       "file system cannot encode); give the YAML file's path") from None
    if stat.S_ISDIR(mode):
        raise FitError(f"{path}: is a directory, not a config file; give the YAML file's path")
    if stat.S_ISREG(mode) and os.stat(path).st_size > _MAX_STREAMED_CONFIG:  # read whole, a checkpoint given
        # by mistake would take several times its size in memory before it is refused
        raise FitError(f"{path}: a file of {os.stat(path).st_size / 2**20:,.0f} MiB, which is no config (at most "
                       f"{_MAX_STREAMED_CONFIG // 2**20} MiB are read); give the YAML file's path")
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
