"""How a checkpoint's keys are matched to the model's names.

1. The wrapper prefixes `module.` (DistributedDataParallel, DataParallel, swa_utils'
   AveragedModel) and `_orig_mod.` (torch.compile) are removed from the start of the keys
   where every key carries them, as a wrapper writes them, apart from keys without a dot
   (the wrapper's or the script's own entries beside the weights, such as AveragedModel's
   `n_averaged`). Where a dotted key lacks the prefix, the prefix is a submodule's own name
   (a model with an attribute `module`) and stays; a model whose only child is named
   `module` gets it back under rule 2. Keys that one of these prefixes makes
   one name (`fc1.weight` and `module.fc1.weight`) are refused, naming both: which one is
   meant cannot be known.
2. Where the model's names are known (TWA, the baselines with `model=`, a Subspace given
   parameter_names, ColumnReader.columns), a checkpoint is also matched with one leading
   `model.` removed (then rule 1 again), and that reading is used when it finds more of the
   model's names than the keys as they are. This is a LightningModule that holds the
   network as `self.model`, whose checkpoint names the network's weights `model.<name>`,
   read for the network itself; its keys outside `model.` are then not used. A model whose
   own names start with `model.` (a Hugging Face LlamaForCausalLM) matches its own
   checkpoints as they are, and its Lightning checkpoints (`model.model.<name>`) with one
   `model.` removed. Likewise the keys are matched with a wrapper prefix put back, for a
   model whose own names carry it. Without the model's names, keys are used as rule 1
   leaves them.

A state_dict nested under "state_dict", "model" or "model_state_dict" (Lightning's .ckpt,
training-loop dicts) is unwrapped; the file's other entries are not used. Tied weights that
a file holds under one of their names only (safetensors writers keep one) are read under
all of them when the model is given (see parameter_aliases). A wrapped model
(torch.compile, DistributedDataParallel, DataParallel) given as the model is read as the
module it wraps (unwrap_model), whose names its checkpoints hold under rule 1. A PEFT
model's adapter files hold each adapter weight under the key peft gives it, without the
adapter's name; TWA reads them under that key too (checkpoint_aliases).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from twa_kernels._checks import check_module
from twa_kernels.errors import CheckpointError, InvalidArgumentError, warn_at_caller

DECOR_BUFFER = "decor_R"  # the buffer of a decorrelated layer's R, "<layer>.decor_R" in its checkpoints

_NESTING_KEYS = ("state_dict", "model", "model_state_dict")

# set to True in the checkpoints the Lightning TrainableWeightAveraging callback saves during
# its TWA epochs, whose state_dict holds TWA's averaged weights rather than the run's own
TWA_AVERAGE_MARK = "twa_kernels_averaged"
_PREFIXES = ("module.", "_orig_mod.")
_LIGHTNING_PREFIX = "model."

StateDict = dict[str, Tensor]


def strip_wrapper_prefixes(key: str) -> str:
    """`key` without its leading wrapper prefixes (`module.`, `_orig_mod.`, in any order)."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _strip_names(keys: Iterable[str], source: str) -> dict[str, str]:
    """{name: stored key}: the keys without the wrapper prefixes that a wrapper put on them
    (see the module docstring, rule 1). Two keys that become one name, or a key that a
    wrapper prefix would make another key's name, are refused, naming both: which of them
    is the model's weight cannot be known."""
    keys = list(keys)
    names = keys
    stripped = True
    while stripped and names:
        stripped = False
        for prefix in _PREFIXES:
            # a wrapper prefixes every key of the model it wraps; keys without a dot beside
            # them are the wrapper's or the script's own entries (AveragedModel's n_averaged,
            # a saved step), while a dotted key without the prefix means `module` is a
            # submodule's own name, which stays
            if any(n.startswith(prefix) for n in names) and all(n.startswith(prefix) or "." not in n for n in names):
                names, stripped = [n[len(prefix):] if n.startswith(prefix) else n for n in names], True
    by_name: dict[str, str] = {}
    for name, key in zip(names, keys):
        if name in by_name:
            raise _both_name(source, by_name[name], key, name)
        by_name[name] = key
    for name, key in by_name.items():
        inner = strip_wrapper_prefixes(name)
        if inner != name and inner in by_name:
            raise _both_name(source, by_name[inner], key, inner)
    return by_name


def _both_name(source: str, first: str, second: str, name: str) -> CheckpointError:
    return CheckpointError(f"{source}: keys {first!r} and {second!r} both name {name!r} once the wrapper prefixes "
                           f"{' / '.join(_PREFIXES)} are removed; save the state_dict of one model (the unwrapped "
                           "module's) so that each weight is there once")


def _strip_prefixes(state: Mapping[str, Tensor], source: str = "checkpoint") -> StateDict:
    return {name: state[key] for name, key in _strip_names(state, source).items()}


def model_renaming(keys: Iterable[str], names: Iterable[str], source: str = "checkpoint") -> dict[str, str] | None:
    """Rule 2 of the module docstring. `keys` are a checkpoint's names after rule 1, `names`
    the model's: {model's name: key} when the keys are the model's names under a leading
    `model.` (and match more of them that way than as they are), else None (use the keys
    as they are)."""
    wanted = set(names)
    keys = list(keys)
    if not wanted:
        return None
    best, found = None, sum(k in wanted for k in keys)
    inner = [k for k in keys if k.startswith(_LIGHTNING_PREFIX)]
    if inner:
        renamed = _strip_names((k[len(_LIGHTNING_PREFIX):] for k in inner), source)
        renamed = {name: _LIGHTNING_PREFIX + key for name, key in renamed.items()}
        if sum(n in renamed for n in wanted) > found:
            best, found = renamed, sum(n in renamed for n in wanted)
    for prefix in _PREFIXES:
        # a model whose only child is named `module` saves every dotted key under `module.`,
        # which rule 1 takes for a wrapper's: the prefix is put back where the model's names have it
        if any(n.startswith(prefix) for n in wanted):
            renamed = {prefix + k if prefix + k in wanted else k: k for k in keys}
            if len(renamed) == len(keys) and sum(n in renamed for n in wanted) > found:
                best, found = renamed, sum(n in renamed for n in wanted)
    return best


def match_names(state: Mapping[str, Tensor], names: Iterable[str] | None, source: str = "checkpoint") -> StateDict:
    """`state` (keys after rule 1) keyed by the model's `names` where rule 2 applies (see
    the module docstring); unchanged otherwise or when `names` is None."""
    renaming = None if names is None else model_renaming(state, names, source)
    if renaming is None:
        return dict(state)
    return {name: state[key] for name, key in renaming.items()}


# floating-point dtypes that pack several values into each element: torch counts, indexes and
# converts their bytes, not their values, so no average of them is defined
_PACKED_FLOATS = tuple(getattr(torch, name) for name in ("float4_e2m1fn_x2",) if hasattr(torch, name))


def _not_dense_values(value: Tensor) -> str | None:
    """What `value` is when it holds no dense values to read or save (a meta, sparse,
    nested, quantized or packed tensor), else None."""
    if value.is_meta:
        return "a meta tensor (no values)"
    if value.dtype in _PACKED_FLOATS:
        return f"a {value.dtype} tensor (values packed several to a byte, which cannot be averaged; dequantize it)"
    if value.is_nested or value.is_quantized:
        return "a nested tensor" if value.is_nested else "a quantized tensor (dequantize() it)"
    return f"a {value.layout} tensor" if value.layout != torch.strided else None


# The most bytes a checkpoint's expanded views may add when made whole: far above any broadcast
# buffer of a real model, far below what a hostile file could claim from a few bytes.
_EXPANDED_BYTES_LIMIT = 256 << 20


def _storage_bytes(value: Tensor) -> int | None:
    """The bytes of the storage under `value`; None for a tensor subclass without one."""
    try:
        return value.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    """The tensors of a loaded checkpoint: nested state_dicts unwrapped, prefixes stripped."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) and \
            isinstance(obj.get("current_model_state"), Mapping):
        # Lightning's WeightAveraging callbacks (EMA, SWA) save the average as the state_dict
        # and the weights being trained beside it
        warn_at_caller(f"{source}: a Lightning checkpoint of a WeightAveraging callback: its state_dict, which is "
                       "read, holds the callback's running average (e.g. EMA); the weights being trained are under "
                       "'current_model_state'. To average those, pass ckpt['current_model_state'] state_dicts",
                       UserWarning)
    if isinstance(obj, Mapping) and obj.get(TWA_AVERAGE_MARK) is True:
        warn_at_caller(f"{source}: a checkpoint of a TWA epoch of the Lightning TrainableWeightAveraging callback: its "
                       "state_dict holds TWA's averaged weights, not a point of the training run; averaged with the "
                       "run's checkpoints it would count that average as one more point, so average the checkpoints "
                       "of the epochs before TWA started (a list or a glob)", UserWarning)
    for _ in range(3):
        if isinstance(obj, Mapping):
            nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
            if nested is None:
                break
            obj = nested
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: not a state_dict (got {type(obj).__name__}); save model.state_dict()")
    if not obj:
        raise CheckpointError(f"{source}: an empty mapping, with no weights; save model.state_dict() of the model")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors and {"state", "param_groups"} <= obj.keys():
        raise CheckpointError(f"{source}: an optimizer's state_dict (state, param_groups), not a model's; if it sits "
                              "in a folder of checkpoints, pass a glob of the checkpoints instead of the folder (e.g. "
                              "'run/epoch_*.pt')")
    if not tensors:
        holders = [repr(k) for k, v in obj.items() if isinstance(v, Mapping)]  # a state_dict nested under another key
        where = (f" at its top level (it nests mappings under {', '.join(holders[:3])}: pass the state_dict itself, "
                 "e.g. torch.load(path)[key])" if holders else "")
        raise CheckpointError(f"{source}: holds no tensors{where}; save model.state_dict()")
    expanded_bytes = 0  # what the expanded views below claim beyond their storage
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: the tensor under key {key!r} ({type(key).__name__}) has no string name; "
                                  "a state_dict names each tensor by a string: save model.state_dict()")
        if kind := _not_dense_values(value):
            raise CheckpointError(f"{source}: key {key!r} is {kind}; save the model's real, dense weights "
                                  "(materialise meta tensors, .to_dense() sparse ones)")
        if (stored := _storage_bytes(value)) is not None and value.numel() * value.element_size() > stored:
            # an expanded or overlapping view (a broadcast buffer a model keeps as expand()):
            # made whole, within a bound, since it is read, summed and checked element by element
            # however few bytes the file holds (10**12 elements from 4 bytes)
            expanded_bytes += value.numel() * value.element_size() - stored
            if expanded_bytes > _EXPANDED_BYTES_LIMIT:
                raise CheckpointError(f"{source}: key {key!r} claims {value.numel()} elements of shape "
                                      f"{tuple(value.shape)} but its storage holds {stored} bytes (an expanded or "
                                      f"overlapping view), and the checkpoint's expanded views come to more than "
                                      f"{_EXPANDED_BYTES_LIMIT >> 20} MiB beyond their bytes; save each weight whole: "
                                      "{k: v.contiguous() for k, v in state_dict.items()}")
            tensors[key] = value.contiguous()
    # values only: a state_dict of live Parameters (named_parameters(), or a file saved from
    # them) would otherwise put the averages, and the checkpoints with them, in the graph
    tensors = {k: v.detach() if v.requires_grad else v for k, v in tensors.items()}
    return _strip_prefixes(tensors, source)


def tied_owners(model: nn.Module, module: nn.Module, attribute: str = "weight") -> list[str]:
    """The names of the other modules of `model` that hold `module`'s Parameter `attribute`
    (tied weights, e.g. an output layer tied to an embedding). A module reused under two
    names is one module, not a tie; the root module is named "<root>"."""
    check_module(model, "tied_owners's model")
    target = getattr(module, attribute)
    return [name or "<root>" for name, other in model.named_modules(remove_duplicate=False)
            if other is not module and any(p is target for p in other.parameters(recurse=False))]


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every state_dict name of each parameter of `model`, keyed by the name
    named_parameters() gives it (its first). A tied weight (an embedding shared with the
    output layer) is one tensor under several names: one row segment of a subspace, and
    every one of its names in a state_dict."""
    check_module(model, "parameter_aliases's model")
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {names[0]: names for names in groups.values()}


def adapter_file_keys(model: nn.Module) -> dict[str, list[str]]:
    """For a PEFT model (peft's PeftModel, its tuner, or a transformers model holding
    adapters): the keys its adapter files (save_pretrained's adapter_model.safetensors) may
    hold each adapter weight under, by the parameter's name, and each buffer they hold (VeRA's
    projections, a saved head's running statistics), by the buffer's. PEFT leaves the adapter's name
    out of the file (`lora_A.default.weight` is saved as `lora_A.weight`) by rules of each
    tuner; peft's own get_peft_model_state_dict gives them, matched to the parameters by
    storage. A PeftModel's files name keys from it (`base_model.model.`), a transformers
    model's own save_pretrained from the model: a model inside a PeftModel gets both forms.
    Adapters of one model are saved under the same keys: where several map to one, the
    trainable one is read (the others keep the model's values), and several trainable ones
    are refused. Prompt-learning adapters, whose files hold computed embeddings rather than
    parameters, get none. Empty for any other model."""
    model = unwrap_model(model)
    configs = getattr(model, "peft_config", None)
    peft = sys.modules.get("peft")  # a model peft made has imported it
    if (peft is None or not isinstance(configs, Mapping) or not configs
            or not all(isinstance(config, peft.PeftConfig) for config in configs.values())):
        return {}
    from peft.tuners.tuners_utils import BaseTuner

    # where the model sits under the PeftModel whose names a PeftModel's files carry
    prefixes = ([""] if isinstance(model, peft.PeftModel) else ["base_model."] if isinstance(model, BaseTuner)
                else ["base_model.model.", ""])
    # buffers too: VeRA's files hold its shared random projections (vera_A, vera_B), buffers
    # of the model, and the adapter weights are only right beside the projections they met
    params = dict(model.named_parameters())
    tensors = {**params, **dict(model.named_buffers())}  # a parameter first, where a buffer shares its memory
    owner = {}
    for name, tensor in tensors.items():
        if tensor.data_ptr():
            owner.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype), name)
    by_key: dict[str, list[str]] = {}
    for adapter, config in configs.items():
        if getattr(config, "is_prompt_learning", False):
            continue
        # save_embedding_layers=False: "auto" may look the base model up on the Hugging Face Hub
        state = peft.get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
        for key, value in state.items():
            name = owner.get((value.data_ptr(), tuple(value.shape), value.dtype))
            if name is not None and name not in by_key.setdefault(key, []):
                by_key[key].append(name)
    keys: dict[str, list[str]] = {}
    for key, names in by_key.items():
        read = [name for name in names if name in params and params[name].requires_grad] if len(names) > 1 else names
        if len(read) > 1:
            raise InvalidArgumentError(f"the PEFT model's parameters {read} are all trainable, and adapter files hold "
                                       f"each of them under the one key {key!r}; train one adapter at a time "
                                       "(set_adapter), so that its files are read for it alone")
        for name in read:
            if [prefix + key for prefix in prefixes] != [name]:
                keys[name] = [prefix + key for prefix in prefixes if prefix + key != name]
    return keys


def adapter_hint(name: str, keys: Sequence[str], source: str, model: nn.Module | None = None) -> str | None:
    """The fix where checkpoint `source` lacks the model's `name` (`keys`: what it holds) and a
    PEFT model may meet whole-model checkpoints, a model adapter files, or adapter files a
    model with several adapters cannot tell apart (None: no such case)."""
    path = Path(source)
    try:
        adapter = path.name.startswith("adapter_model.") or any(
            (path / file).is_file() for file in ("adapter_model.safetensors", "adapter_model.bin"))
    except OSError:  # a source that names no file
        adapter = False
    if adapter and model is not None:
        model = unwrap_model(model)
        configs = getattr(model, "peft_config", None)
        adapters = ([adapter_name for adapter_name, config in configs.items()
                     if not getattr(config, "is_prompt_learning", False)] if isinstance(configs, Mapping) else [])
        in_adapter = [p for n, p in model.named_parameters() if any(f".{a}." in f"{n}." for a in adapters)]
        if len(adapters) > 1 and not any(p.requires_grad for p in in_adapter):
            return (f"the model holds the PEFT adapters {adapters}, none of them trainable, and peft saves every "
                    "adapter under the same keys, so these files cannot be read for one of them: make the adapter "
                    "they were saved from trainable (model.set_adapter(name), or PeftModel.from_pretrained(..., "
                    "is_trainable=True))")
    if adapter:
        return ("this is a PEFT adapter file, which holds adapter weights alone: for a model without adapters, "
                "pass the model with them (peft.get_peft_model(model, config)); for a PEFT model, the file was "
                "saved with another adapter config (target_modules, modules_to_save)")
    if ".lora_" in name and not any(".lora_" in key for key in keys):
        return ("this checkpoint holds no LoRA weight: for a PEFT model, pass the adapter directories peft's "
                "save_pretrained wrote, or the model without its adapters")
    return None


def checkpoint_aliases(model: nn.Module, adapters: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """parameter_aliases, with each PEFT adapter weight's adapter-file keys (adapter_file_keys,
    or `adapters` where the caller has them already) among its names, and an adapter buffer's
    keys beside every name the buffer has: every key a checkpoint of `model` may hold a
    parameter or an adapter buffer under."""
    aliases = parameter_aliases(model)
    adapters = adapter_file_keys(model) if adapters is None else adapters
    if not adapters:  # no PEFT model: its buffers are read under their own names
        return aliases
    # a buffer shared by several modules (VeRA's projections) is filled under every name it has
    shared: dict[int, list[str]] = {}
    for name, buffer in unwrap_model(model).named_buffers(remove_duplicate=False):
        shared.setdefault(id(buffer), []).append(name)
    buffers = {names[0]: names for names in shared.values()}
    for name, keys in adapters.items():
        aliases[name] = [*aliases.get(name, buffers.get(name, [name])), *keys]
    return aliases


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a wrapper holds, whose names a checkpoint's keys are matched to:
    torch.compile's OptimizedModule (`_orig_mod`), DistributedDataParallel / DataParallel
    and torch.optim.swa_utils.AveragedModel (`.module`; its `n_averaged` is no weight) are
    unwrapped, however nested. A model sharded by FSDP2's fully_shard is
    refused: its parameters are shards, not the weights a checkpoint holds."""
    check_module(model, "unwrap_model's model")
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel, AveragedModel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            break
    if _is_fully_sharded(model):
        raise InvalidArgumentError(
            "the model is sharded by FSDP2 (fully_shard): its parameters are shards of the weights. Pass an "
            "unsharded model of the same architecture, and TWA(..., process_group=pg, shard=True) to split the "
            "subspace across ranks instead")
    return model


def _is_compiled(model: nn.Module) -> bool:
    # torch.compile imports torch._dynamo: where it is not imported, nothing is compiled
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


def _is_fully_sharded(model: nn.Module) -> bool:
    # as for compile: a model is sharded only where FSDP is imported, which this check does
    # not do itself (the import costs memory and time a process without FSDP never needs)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    return module_type is not None and any(isinstance(m, module_type) for m in model.modules())


@dataclass(frozen=True)
class ModelKeys:
    """What a checkpoint of a model may hold (model_key_names): `names`, every key of its
    state (buffers and the names of tied parameters included); `modules`, the dotted
    names of its modules ("" for the root); `unset`, the parameters and buffers a module
    declares but was built without (Linear(bias=False)'s bias, BatchNorm's running
    statistics with track_running_stats=False)."""

    names: frozenset[str]
    modules: frozenset[str]
    unset: frozenset[str]

    # read as the set of its names (`key in model_key_names(model)`)
    def __contains__(self, key: object) -> bool:
        return key in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def model_key_names(model: nn.Module) -> ModelKeys:
    """The keys a checkpoint of `model` may hold, its modules, and the entries it declares
    without a value (see ModelKeys)."""
    model = unwrap_model(model)
    names = set(model.state_dict().keys()) | {n for n, _ in model.named_buffers()}
    for tied in checkpoint_aliases(model).values():
        names.update(tied)
    modules = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unset = {f"{prefix}.{name}" if prefix else name
             for prefix, module in model.named_modules(remove_duplicate=False)
             for slots in (module._parameters, module._buffers) for name, value in slots.items() if value is None}
    return ModelKeys(frozenset(names), frozenset(modules), frozenset(unset - names))


def refuse_decorrelated_keys(keys: Iterable[str], known: ModelKeys, source: str) -> None:
    """CheckpointError for a checkpoint of a decorrelated model (twa_kernels.decor) given
    with a model whose layer there is not decorrelated: the layer's weights act through the
    `decor_R` the checkpoint holds, and would run without it. (A layer the model does not
    have at all is left to warn_unmatched_keys.)"""
    decorrelation = [key for key in keys if key.rpartition(".")[2] == DECOR_BUFFER and key not in known.names
                     and key.rpartition(".")[0] in known.modules]
    if decorrelation:
        raise CheckpointError(f"{source} was saved from a decorrelated model (it holds {decorrelation[0]!r}, a "
                              "decorrelation matrix R the layer's input goes through), but the model given is not "
                              "decorrelated there, so its weights would run without R: pass the decorrelated model "
                              "(tk.decor.decorrelate(model) before loading), or fold R into each checkpoint's "
                              "weights first (load it into the decorrelated model and save "
                              "tk.decor.fold(model).state_dict())")


def warn_unmatched_keys(entries: Mapping[str, tuple[torch.dtype, Sequence[int]]], known: ModelKeys,
                        source: str) -> None:
    """Warn when a checkpoint holds floating-point tensors that the model has no place for
    (`entries`: the checkpoint's names, as matched to the model's, and their dtypes and
    shapes): those of modules it does not have, of parameters or buffers it was built
    without, and the root module's tensors it lacks (a `cls_token` of a model built
    without one). They are left out, and a model built from another config than the one
    that saved them (fewer layers, no biases) would otherwise run on part of the
    checkpoint without a word. A decorrelated model's checkpoint given with a model not
    decorrelated there is refused (CheckpointError): its weights act through R."""
    refuse_decorrelated_keys(entries, known, source)

    def unplaced(key: str, shape: Sequence[int]) -> bool:
        if key in known.unset:
            return True
        module = key.rpartition(".")[0]
        if "." not in key:  # the root's: a script's own scalar (`lr` beside a wrapper's weights) is no weight
            return len(shape) > 0
        # any other key under a module the model has is an entry that module no longer keeps
        # (a buffer that older versions saved: GPT-2's attn.bias), not weights the model lacks
        return module not in known.modules

    extra = [key for key, (dtype, shape) in entries.items()
             if key not in known.names and dtype.is_floating_point and unplaced(key, shape)]
    if extra:
        warn_at_caller(f"{source}: {len(extra)} floating-point tensor(s) that the model has no place for are left out "
                       f"(e.g. {extra[:3]}). If the checkpoint was saved from this model, the model was built "
                       "differently from the one that saved it (a config with fewer layers, or without biases?); "
                       "tensors of another module saved beside it are rightly left out", UserWarning)


def fill_tied_keys(state: StateDict, aliases: Mapping[str, Sequence[str]], source: str = "the checkpoint"
                   ) -> StateDict:
    """`state` with every name of a tied tensor present: a checkpoint that holds it under
    one name only (safetensors writers keep one) gets the others from it. A checkpoint that
    holds two of its names with different values was not saved from this tying, and taking
    either would be wrong: CheckpointError naming `source`."""
    for names in aliases.values():
        present = [n for n in names if n in state]
        for other in present[1:]:
            first, value = state[present[0]], state[other]
            if value.shape != first.shape or not torch.equal(value, first):
                raise CheckpointError(f"{source}: {present[0]!r} and {other!r} are one tied weight in the model but "
                                      "differ in the checkpoint; untie them in the model, or save the checkpoint "
                                      "from the tied model")
    out = dict(state)
    for names in aliases.values():
        present = next((n for n in names if n in out), None)
        if present is not None:
            for name in names:
                out.setdefault(name, out[present])
    return out
