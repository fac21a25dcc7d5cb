"""Deprecated names: the nodes the dataflow had before the model recipe and the
`<model>_<set>_<what>` naming scheme, kept so that code asking for them keeps working.

Each is computed from what replaced it and says so with a `DeprecationWarning` when it runs;
none is upstream of the dataflow's own outputs. `RENAMED` lists the nodes that are another node
under an old name; `DEPRECATED_NODES` maps every deprecated name to what to ask for instead.
"""

import dataclasses
import warnings
from typing import Any

import torch
from hamilton.function_modifiers import cache, config, parameterize, source, value
from transformers import BitsAndBytesConfig

from finetune_module.engine.models import (
    AUTO_CLASSES,
    LanguageModel,
    ModelRecipe,
    bitsandbytes_config,
    build_model,
)
from finetune_module.engine.settings import ModelSettings, TrainingSettings
from finetune_module.engine.trainer import scaling_arguments as scaling_arguments_of

#: Deprecated nodes that are another node under its old name.
RENAMED = {
    "evaluation_model": "finetuned_model",
    "validation_loss": "finetuned_validation_loss",
    "finetuned_model_answers": "finetuned_answers",
    "base_model_answers": "base_answers",
    "base_model_on_validation_set": "base_validation_answers",
    "base_model_on_hold_out_set": "base_hold_out_answers",
    "validation_set_metrics": "finetuned_validation_metrics",
    "hold_out_set_metrics": "finetuned_hold_out_metrics",
    "base_validation_set_metrics": "base_validation_metrics",
    "base_hold_out_set_metrics": "base_hold_out_metrics",
}
#: Every deprecated node -> what to use instead.
DEPRECATED_NODES = {
    **RENAMED,
    "presaved_model": "finetuned_model",
    "base_model": "model_recipe (built with finetune_module.engine.models.build_model)",
    "peft_model": "model_recipe (built with build_model(..., trainable=True))",
    "trainable_model": "model_recipe (built with build_model(..., trainable=True))",
    "auto_model_class": "model_recipe.model_type",
    "mixed_precision": "model_settings.mixed_precision",
    "quantization_config": "model_settings.quantization",
    "scaling_arguments": "training_arguments",
}


def _warn(name: str) -> None:
    """Says that node `name` is deprecated, and what to use instead."""
    warnings.warn(
        f"The node {name!r} is deprecated; use {DEPRECATED_NODES[name]}.",
        DeprecationWarning,
        stacklevel=3,
    )


@cache(behavior="disable")
@config.when(start="presaved")
def presaved_model(finetuned_model: LanguageModel) -> LanguageModel:
    """Deprecated: `finetuned_model` (the saved fine-tune, in eval mode)."""
    _warn("presaved_model")
    return finetuned_model


@cache(behavior="disable")
def base_model(model_recipe: ModelRecipe, device: torch.device) -> LanguageModel:
    """Deprecated: the pretrained model the fine-tune is built on, without any adapter."""
    _warn("base_model")
    return build_model(dataclasses.replace(model_recipe, lora=None, adapter_path=None), device)


def _trainable(
    name: str, recipe: ModelRecipe, settings: TrainingSettings, device: torch.device
) -> LanguageModel:
    """The recipe's model ready to train, as the training stage builds it."""
    _warn(name)
    return build_model(
        recipe,
        device,
        trainable=True,
        seed=settings.seed,
        gradient_checkpointing=settings.gradient_checkpointing,
    )


@cache(behavior="disable")
@config.when(start="base")
@config.when_not(use_lora=False)
def peft_model(
    model_recipe: ModelRecipe, training_settings: TrainingSettings, device: torch.device
) -> LanguageModel:
    """Deprecated: the base model with its trainable LoRA adapter, before training."""
    return _trainable("peft_model", model_recipe, training_settings, device)


@cache(behavior="disable")
@config.when(start="base")
def trainable_model(
    model_recipe: ModelRecipe, training_settings: TrainingSettings, device: torch.device
) -> LanguageModel:
    """Deprecated: the model the trainer updates, before training."""
    return _trainable("trainable_model", model_recipe, training_settings, device)


def auto_model_class(model_recipe: ModelRecipe) -> type:
    """Deprecated: the transformers auto class of the model (`model_recipe.model_type`)."""
    _warn("auto_model_class")
    return AUTO_CLASSES[model_recipe.model_type]


def mixed_precision(model_settings: ModelSettings) -> str:
    """Deprecated: "no", "bf16" or "fp16" (`model_settings.mixed_precision`)."""
    _warn("mixed_precision")
    return model_settings.mixed_precision


def quantization_config(model_settings: ModelSettings) -> BitsAndBytesConfig | None:
    """Deprecated: bitsandbytes' configuration of the base model, or None."""
    _warn("quantization_config")
    return bitsandbytes_config(model_settings.quantization, model_settings.mixed_precision)


@config.when(start="base")
def scaling_arguments(
    training_settings: TrainingSettings, model_settings: ModelSettings
) -> dict[str, Any]:
    """Deprecated: the training arguments of precision, memory and several processes (all in
    `training_arguments`)."""
    _warn("scaling_arguments")
    return scaling_arguments_of(training_settings, model_settings.mixed_precision)


@cache(behavior="disable")  # a model object among them; each is only a name for another node
@parameterize(
    **{
        old: ({"renamed": source(new), "old_name": value(old)}, f"Deprecated: `{new}`.")
        for old, new in RENAMED.items()
    }
)
def renamed_node(renamed: Any, old_name: str) -> Any:
    """A node under its deprecated name."""
    _warn(old_name)
    return renamed
