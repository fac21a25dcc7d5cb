"""Model stage: where the run's files go, and the model recipe: how the model is built, as
plain data.

With `{"start": "base"}` the recipe is the pretrained model with a fresh LoRA adapter (or the
saved adapter of `init_adapter_path` to continue), or, with `{"use_lora": False}`, the
pretrained model with every weight trainable; with `{"start": "presaved"}` it is a saved
fine-tune: an adapter on the base model it names, or a full model. `{"model_type": "causal"}`
builds decoder-only models (GPT-2, Llama, ...) instead of sequence-to-sequence ones.

No model is loaded here: the training and evaluation stages build theirs from the recipe with
`finetune_module.engine.models.build_model`, as `predict` and `export_merged` do, and only
plain data (the recipe, the trained weights) passes between nodes and into Hamilton's cache.
"""

import os

from hamilton.function_modifiers import config
from peft import LoraConfig

from finetune_module.engine import models, speedups
from finetune_module.engine.files import BEST_MODEL_DIR, existing_directory
from finetune_module.engine.loading import ADAPTER_CONFIG, saved_adapter_dir
from finetune_module.engine.models import MODEL_CONFIG_FILE, ModelRecipe
from finetune_module.engine.settings import ModelSettings
from finetune_module.errors import ModelNotAvailableError, SettingsError


def best_model_dir(run_dir: str) -> str:
    """Directory that holds the best fine-tune (adapter, tokenizer, metrics, predictions):
    `best_model/` in the run's directory."""
    return os.path.join(run_dir, BEST_MODEL_DIR)


@config.when(start="presaved")
def presaved_model_dir(best_model_dir: str, model_settings: ModelSettings) -> str:
    """Directory of the saved fine-tune to evaluate: `presaved_model_path` (a saved model, or a
    run's output directory: its best model), else the best model of this run's directory (or
    its backup, when a save was killed between its two renames)."""
    given = model_settings.presaved_model_path
    if given:
        path = models.saved_model_dir(given, "presaved_model_path")
    else:
        path = existing_directory(best_model_dir)
    if not models.holds_saved_model(path):
        raise ModelNotAvailableError(
            f"No saved fine-tune in {path!r} (no {ADAPTER_CONFIG} or {MODEL_CONFIG_FILE}). Run "
            'with {"start": "base"} first, or set presaved_model_path to a saved fine-tune '
            "directory."
        )
    # a full model's weights are checked when it is loaded (safetensors only)
    return saved_adapter_dir(path, "presaved_model_path") if models.is_adapter_dir(path) else path


@config.when(start="base")
@config.when_not(use_lora=False)
def lora_config(model_settings: ModelSettings) -> LoraConfig:
    """The fresh LoRA adapter's shape: rank, scaling, dropout and the layers it adapts (those
    named in target_modules, checked to exist, else the architecture's attention query/value
    projections). Only the model's configuration is read, not its weights."""
    architecture = models.architecture(
        model_settings.model_id, model_settings.model_type, model_settings.trust_remote_code
    )
    return models.lora_config(model_settings.lora, architecture)


def _recipe(model_settings: ModelSettings, **parts: object) -> ModelRecipe:
    """The recipe of `model_settings`' pretrained model with the given parts (an adapter),
    and the speed-ups that apply to its family."""
    config = models.model_config(model_settings.model_id, model_settings.trust_remote_code)
    return ModelRecipe(
        model_id=model_settings.model_id,
        model_type=model_settings.model_type,
        quantization=model_settings.quantization,
        precision=model_settings.mixed_precision,
        trust_remote_code=model_settings.trust_remote_code,
        speedups=speedups.applicable(model_settings.speedups, config),
        **parts,
    )


@config.when(start="base")
@config.when_not(use_lora=False)
def model_recipe__lora(model_settings: ModelSettings, lora_config: LoraConfig) -> ModelRecipe:
    """How the model that trains is built: the pretrained model with a fresh LoRA adapter of
    `lora_config`'s shape, or the saved adapter of `init_adapter_path` (its own rank and
    targets kept) to continue training."""
    if model_settings.init_adapter_path is None:
        return _recipe(model_settings, lora=lora_config)
    adapter = saved_adapter_dir(model_settings.init_adapter_path, "init_adapter_path")
    return _recipe(model_settings, adapter_path=adapter)


@config.when(start="base", use_lora=False)
def model_recipe__full(model_settings: ModelSettings) -> ModelRecipe:
    """How the model that trains is built, with `{"use_lora": False}`: the pretrained model
    itself, every weight trainable (full fine-tuning). A quantized base trains through LoRA
    only, so quantization is refused here."""
    if model_settings.quantization is not None:
        raise SettingsError(
            "load_in_4bit and load_in_8bit quantize a frozen base model for LoRA; full "
            "fine-tuning (use_lora False) trains every weight: leave them off, or use LoRA."
        )
    return _recipe(model_settings)


@config.when(start="presaved")
def model_recipe__presaved(presaved_model_dir: str, model_settings: ModelSettings) -> ModelRecipe:
    """How the saved fine-tune is built: its LoRA adapter on the base model its
    adapter_config.json names, or, for a full fine-tune, the saved model itself."""
    return models.saved_model_recipe(
        presaved_model_dir,
        model_type=model_settings.model_type,
        trust_remote_code=model_settings.trust_remote_code,
        quantization=model_settings.quantization,
        precision=model_settings.mixed_precision,
        speedups_requested=model_settings.speedups,
        setting="presaved_model_path",
    )
