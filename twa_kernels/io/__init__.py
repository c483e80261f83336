"""Checkpoints in and files out, safely.

- io.files: which files and directories are checkpoints, and the order a directory or a
  glob gives them in (`resolve_checkpoints`);
- io.read: reading one checkpoint without running code from it, damaged files refused
  (`load_state_dict`, `iter_state_dicts`);
- io.keys: how a checkpoint's keys are matched to the model's names (wrapper prefixes, a
  LightningModule's `model.`, tied weights, PEFT adapter files), and the model's own names;
- io.write: atomic writes of state_dicts and JSON (`save_state_dict`, `write_json`).

Every name below is importable from `twa_kernels.io` itself.
"""

from twa_kernels.errors import CheckpointError
from twa_kernels.io.files import (
    CHECKPOINT_SUFFIXES,
    Checkpoints,
    CheckpointSpec,
    checkpoint_directory_files,
    is_dcp_directory,
    resolve_checkpoints,
    trainer_output_hint,
)
from twa_kernels.io.keys import (
    TWA_AVERAGE_MARK,
    ModelKeys,
    adapter_file_keys,
    adapter_hint,
    checkpoint_aliases,
    StateDict,
    fill_tied_keys,
    match_names,
    model_key_names,
    model_renaming,
    parameter_aliases,
    refuse_decorrelated_keys,
    strip_wrapper_prefixes,
    tied_owners,
    unwrap_model,
    unwrap_state_dict,
    warn_unmatched_keys,
)
from twa_kernels.io.read import (
    changed_error,
    check_finite,
    file_stamp,
    finite,
    iter_state_dicts,
    load_state_dict,
    torch_load_safely,
    verify_zip_crc,
)
from twa_kernels.io.write import (atomic_write, atomic_write_together, check_output_file, directory_held, json_record,
                                  save_state_dict, write_json)

__all__ = [
    "CHECKPOINT_SUFFIXES", "CheckpointError", "CheckpointSpec", "Checkpoints", "ModelKeys", "StateDict",
    "TWA_AVERAGE_MARK", "adapter_file_keys", "adapter_hint", "atomic_write", "atomic_write_together",
    "changed_error", "check_finite", "check_output_file", "checkpoint_aliases", "checkpoint_directory_files",
    "directory_held", "file_stamp", "fill_tied_keys", "finite", "is_dcp_directory", "iter_state_dicts", "json_record",
    "load_state_dict", "match_names", "model_key_names", "model_renaming", "parameter_aliases",
    "refuse_decorrelated_keys", "resolve_checkpoints", "save_state_dict", "strip_wrapper_prefixes", "tied_owners",
    "torch_load_safely", "trainer_output_hint", "unwrap_model", "unwrap_state_dict", "verify_zip_crc",
    "warn_unmatched_keys", "write_json",
]
