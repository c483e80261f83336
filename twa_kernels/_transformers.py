"""What transformers' Trainer and Seq2SeqTrainer ask of the model they train, answered by a
TWA for the model it wraps: its config and generation config (the same objects), whether its
forward takes loss arguments, its class name and input embeddings, activation checkpointing
turned on in it, and generate() at the averaged weights. A mixin of TWA's, kept apart so
that twa.py holds the training itself."""

from __future__ import annotations

import inspect
import sys
from typing import Any

from torch import nn

from twa_kernels.errors import ModelMethodMissingError


class TransformersFacade:
    """The transformers-facing members of TWA, which provides `module` (the wrapped model)
    and `averaged_model()`."""

    module: nn.Module

    def _share_transformers_config(self, model: nn.Module) -> None:
        hf_config = getattr(model, "config", None)
        if callable(getattr(hf_config, "to_dict", None)) and callable(getattr(hf_config, "to_json_string", None)):
            # a transformers model's config, the same object: the Trainer reads and sets the
            # config of the model it is given (the cache it turns off for training, the outputs
            # predict() leaves out), and without it a TWA over a causal LM kept its cache on
            self.config = hf_config

    @property
    def generation_config(self) -> Any:
        """The wrapped model's `generation_config` (transformers), read and set through: what
        Seq2SeqTrainer sets on the model it trains before it calls generate()."""
        if not hasattr(self.module, "generation_config"):
            raise AttributeError(f"the model inside this TWA ({type(self.module).__name__}) has no generation_config")
        return self.module.generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.module.generation_config = value

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the wrapped model's forward takes loss arguments: its own answer, or whether
        its forward takes **kwargs. transformers' Trainer asks before it passes
        num_items_in_batch; TWA's own forward takes **kwargs for any model and hands them on,
        so without this the Trainer would pass them to a model with no place for them."""
        model = self.module
        if hasattr(model, "accepts_loss_kwargs"):
            return bool(model.accepts_loss_kwargs)
        parameters = inspect.signature(model.forward).parameters.values()
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

    def _get_name(self) -> str:
        """The wrapped model's class name (a PeftModel's: its base model's), not "TWA": the
        Trainer's label smoothing shifts the labels by one only for a model whose name is a
        causal LM's, and scored a TWA over GPT-2 on its own input tokens. A TWA's repr
        still says TWA; torch's own messages that name a module by it (get_submodule's)
        name the wrapped model's class."""
        if "_model" not in self.__dict__:  # not built yet (a repr in a debugger during __init__)
            return "TWA"
        model = self.module
        peft = sys.modules.get("peft")  # a PeftModel has imported it
        if peft is not None and isinstance(model, peft.PeftModel):
            model = model.base_model.model
        return model._get_name()

    def __repr__(self) -> str:
        own = super().__repr__()  # nn.Module's, which starts with _get_name()
        return "TWA" + own[len(self._get_name()):]

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether the wrapped model checkpoints its activations (the Trainer asks under DDP)."""
        model = self.module
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5, then 4.x
            if hasattr(model, name):
                return bool(getattr(model, name))
        return False

    def __getattr__(self, name: str) -> Any:
        # The wrapped model's methods that a TWA hands on exist only where the model has them:
        # transformers asks hasattr() before it calls (the Trainer turns activation checkpointing
        # on through gradient_checkpointing_enable where activation_checkpointing_enable is
        # missing; its FSDP setup calls get_input_embeddings only where there is one).
        try:
            return super().__getattr__(name)  # nn.Module's: parameters, buffers, submodules
        except AttributeError:
            fix = _HANDED_ON.get(name)
            if fix is None or "_model" not in self.__dict__:
                raise
        if not callable(getattr(self.module, name, None)):
            raise ModelMethodMissingError(f"the model inside this TWA ({type(self.module).__name__}) has no "
                                          f"{name}(): {fix}") from None
        return self._generate_averaged if name == "generate" else getattr(self.module, name)

    def _generate_averaged(self, *args: Any, **kwargs: Any) -> Any:
        """`twa.generate(...)`: the wrapped model's generate() at the averaged weights, inside
        averaged_model(). No gradient reaches the coefficients."""
        with self.averaged_model() as model:
            return model.generate(*args, **kwargs)


_CHECKPOINTING_FIX = ("wrap its blocks in torch.utils.checkpoint.checkpoint(..., use_reentrant=False) in its forward, "
                      "or leave activation checkpointing off")
# name -> what to do instead, of each method a TWA hands on to the model it wraps
_HANDED_ON = {
    # where the Trainer's NEFTune puts its noise, which then reaches every forward of the TWA
    "get_input_embeddings": "leave NEFTune (neftune_noise_alpha) off, or add noise to the embeddings in the model's "
                            "own forward",
    # what a Trainer with activation_checkpointing=True (transformers 5) or gradient_checkpointing=True
    # (transformers 4) calls; the recomputation belongs to the wrapped model, which checkpoints its
    # blocks at TWA's weights
    "activation_checkpointing_enable": _CHECKPOINTING_FIX,
    "gradient_checkpointing_enable": _CHECKPOINTING_FIX,
    # what Seq2SeqTrainer's predict_with_generate calls on the model it trains
    "generate": "call what it has inside `with twa.averaged_model() as model:`",
}
