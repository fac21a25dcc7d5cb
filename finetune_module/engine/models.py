"""The model recipe and the one builder that makes a model from it.

A `ModelRecipe` says, as plain data, how a model is built: which pretrained model, with which
auto class, with a fresh LoRA adapter or a saved one or none, quantized or not, in which
precision, with which CPU speed-ups. `build_model` builds it on a device, for training or for
evaluation, and loads trained weights into it when they are given. Training, evaluation,
`{"start": "presaved"}`, `predict` and `export_merged` all build their models here;
`saved_model_recipe` is the recipe of a model saved by a run (a LoRA adapter, a full model, a
Trainer checkpoint or an export).

Weights are read from safetensors files only, and code shipped with a model runs only when
`trust_remote_code` is set.
"""

import dataclasses
import glob
import json
import logging
import os
from typing import Any, NoReturn

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peft import set_peft_model_state_dict as _set_adapter_weights
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load as load_safetensors_bytes
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

from finetune_module.engine import mkl_kernels, speedups
from finetune_module.engine.files import BEST_MODEL_DIR, CHECKPOINTS_DIR, existing_directory
from finetune_module.engine.loading import ADAPTER_CONFIG, load_pretrained, saved_adapter_dir
from finetune_module.engine.settings import LoraSettings
from finetune_module.errors import ModelNotAvailableError, SettingsError

MODEL_CONFIG_FILE = "config.json"  # a saved full model
AUTO_CLASSES = {"seq2seq": AutoModelForSeq2SeqLM, "causal": AutoModelForCausalLM}

#: A model the dataflow trains or evaluates: a transformers model, with or without an adapter.
LanguageModel = PreTrainedModel | PeftModel

logger = logging.getLogger(__name__)

# Attention query/value projections by name, separate or fused, across common architectures.
_ATTENTION_PROJECTIONS = (
    *("q", "v", "q_proj", "v_proj", "query", "value"),
    *("c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack"),
)


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """How to build a model, as plain data."""

    model_id: str  # a Hugging Face model id, or a local directory (absolute)
    model_type: str = "seq2seq"  # the auto class: "seq2seq" or "causal" (AUTO_CLASSES)
    lora: LoraConfig | None = None  # a fresh LoRA adapter of this shape
    adapter_path: str | None = None  # or a saved adapter to load (to continue or to evaluate)
    quantization: str | None = None  # "4bit" (QLoRA's NF4), "8bit" or None (fp32)
    precision: str = "no"  # mixed precision of training: "no", "bf16" or "fp16"
    trust_remote_code: bool = False
    speedups: tuple[str, ...] = ()  # the CPU speed-ups that apply (engine.speedups)

    def describe(self) -> dict[str, Any]:
        """The recipe as JSON-ready values (the LoRA config as its settings)."""
        described = dataclasses.asdict(self)
        if self.lora is not None:
            lora = self.lora
            described["lora"] = {
                "r": lora.r,
                "lora_alpha": lora.lora_alpha,
                "lora_dropout": lora.lora_dropout,
                "target_modules": sorted(lora.target_modules),
            }
        described["speedups"] = list(self.speedups)
        return described


def model_files_identity(model_id: str) -> list[Any]:
    """What identifies a model's files without reading them: for a local directory, each
    file's path in it, size and modification time; for a hub id, the cached snapshot (its
    commit) that loading takes, or nothing when the model is not cached yet."""
    if os.path.isdir(model_id):
        return sorted(
            [os.path.relpath(os.path.join(folder, name), model_id), stat.st_size, stat.st_mtime_ns]
            for folder, _, names in os.walk(model_id)
            for name in names
            for stat in [os.stat(os.path.join(folder, name))]
        )
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, MODEL_CONFIG_FILE)
    return [os.path.dirname(cached)] if isinstance(cached, str) else []


def is_adapter_dir(path: str) -> bool:
    """Whether `path` holds a saved LoRA adapter (rather than a full model)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def holds_saved_model(path: str) -> bool:
    """Whether `path` holds a saved model: a LoRA adapter (`adapter_config.json`) or a full
    model (`config.json`), as a best model, a checkpoint and an export do."""
    return any(
        os.path.isfile(os.path.join(path, name)) for name in (ADAPTER_CONFIG, MODEL_CONFIG_FILE)
    )


def saved_model_dir(path: str, setting: str = "model_dir") -> str:
    """The directory of the saved model that `path` names, as an absolute path: `path` itself
    when it holds one (a `best_model/`, a Trainer `checkpoint-N/` or an exported model), else the
    best model of the run directory `path` (its `best_model/`, or that folder's backup when a
    save was killed between its two renames). A `ModelNotAvailableError` names `setting` and
    what is there otherwise (a run that has checkpoints but no best model yet lists them).

    :param path: a saved model's directory or a run's output directory.
    :param setting: the name the caller knows the path by, for the error message.
    """
    path = os.path.abspath(path)
    if holds_saved_model(path):
        return path
    if not os.path.isdir(path):
        raise ModelNotAvailableError(f"{setting} {path!r} does not exist or is not a directory.")
    best = existing_directory(os.path.join(path, BEST_MODEL_DIR))
    if holds_saved_model(best):
        return best
    checkpoints = sorted(
        glob.glob(os.path.join(path, CHECKPOINTS_DIR, "checkpoint-*")),
        key=lambda name: int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else -1,
    )
    found = [name for name in checkpoints if holds_saved_model(name)]
    hint = (
        f" It has checkpoints but no best model yet (the run did not finish): give one of "
        f"{', '.join(map(repr, found))}, or resume the run with resume_from_checkpoint."
        if found
        else " Give a run's output directory, its best_model/ folder, a checkpoint-N/ folder "
        "or an exported model."
    )
    raise ModelNotAvailableError(
        f"{setting} {path!r} holds no saved model (no {ADAPTER_CONFIG} or {MODEL_CONFIG_FILE}) "
        f"and no {BEST_MODEL_DIR}/ folder.{hint}"
    )


def adapter_base_model_id(adapter_dir: str) -> str:
    """The base model a saved adapter was trained from, as its adapter_config.json names it."""
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(config_path, encoding="utf-8") as f:
            return str(json.load(f)["base_model_name_or_path"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotAvailableError(
            f"{config_path}: not a usable adapter config (need the key base_model_name_or_path)."
        ) from e


def _refuse_other_kind(error: ValueError, model_id: str, model_type: str) -> NoReturn:
    """Re-raises a loading error; a model of the other kind is refused with the model_type."""
    if "Unrecognized configuration class" not in str(error):
        raise error
    raise SettingsError(
        f"{model_id!r} cannot be loaded with {AUTO_CLASSES[model_type].__name__}. Set the "
        'config key model_type to "causal" for decoder-only models (GPT-2, Llama, ...) or '
        '"seq2seq" (the default) for encoder-decoder models (T5, BART, ...).'
    ) from error


# the heads an encoder-only model (BERT, RoBERTa, DeBERTa, ...) is saved with: none generates
_ENCODER_ONLY_HEADS = (
    *("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification"),
    *("ForQuestionAnswering", "ForMultipleChoice", "ForPreTraining", "ForNextSentencePrediction"),
)


def model_config(model_id: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The configuration (config.json) of the model in `model_id`, without its weights. An
    encoder-only model (saved with only heads like BERT's), which cannot generate answers, is
    refused."""
    config = load_pretrained(
        AutoConfig.from_pretrained, model_id, trust_remote_code=trust_remote_code
    )
    heads = config.architectures or []
    if (
        heads
        and not config.is_encoder_decoder
        and all(head.endswith(_ENCODER_ONLY_HEADS) for head in heads)
    ):
        raise SettingsError(
            f"{model_id!r} is an encoder-only model ({config.model_type}: {', '.join(heads)}), "
            "which cannot generate answers. Fine-tune a sequence-to-sequence model (T5, BART, "
            '...) or a decoder-only one (GPT-2, Llama, Qwen, ...; model_type "causal").'
        )
    return config


def architecture(
    model_id: str, model_type: str, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The model's architecture without its weights (on the meta device): enough to name its
    layers, with no copy of the weights in memory. A model of the other kind than `model_type`
    is refused with the model_type to set."""
    config = model_config(model_id, trust_remote_code)
    try:
        with torch.device("meta"):
            return AUTO_CLASSES[model_type].from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        _refuse_other_kind(e, model_id, model_type)


def _linear_layer_names(model: PreTrainedModel) -> set[str]:
    """The last part of the name of every linear layer in the model ("q", "v", "wo", ...),
    GPT-2's Conv1D layers included."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D)
    }


def _default_target_modules(model: PreTrainedModel) -> list[str]:
    """LoRA target modules for the model's architecture: peft's table, else every attention
    projection found by name."""
    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
    if known:
        return list(known)
    names = _linear_layer_names(model)
    found = sorted(n for n in names if n in _ATTENTION_PROJECTIONS)
    if not found:
        raise SettingsError(
            f"Cannot infer LoRA target_modules for model type {model.config.model_type!r}; "
            f"set target_modules to some of its linear layers: {', '.join(sorted(names))}."
        )
    return found


def lora_config(settings: LoraSettings, model: PreTrainedModel) -> LoraConfig:
    """The LoRA adapter's configuration for `model` (its architecture is enough): the layers
    named in the settings (checked to exist) or the architecture's attention query/value
    projections, with the settings' rank, scaling and dropout."""
    names = _linear_layer_names(model)
    if settings.target_modules:
        unknown = [t for t in settings.target_modules if t.rsplit(".", 1)[-1] not in names]
        if unknown:
            raise SettingsError(
                f"target_modules: the model has no linear layer named {', '.join(unknown)}; "
                f"its linear layers are {', '.join(sorted(names))}."
            )
    targets = list(settings.target_modules or _default_target_modules(model))
    transposed = any(  # GPT-2's Conv1D stores its weights as (in, out)
        isinstance(module, Conv1D)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    )
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=transposed,
        bias="none",
        task_type=TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM,
    )


def bitsandbytes_config(quantization: str | None, precision: str) -> BitsAndBytesConfig | None:
    """bitsandbytes' configuration for the recipe's quantization: QLoRA's NF4 with double
    quantization, computing in the training precision; LLM.int8; or None (fp32)."""
    if quantization is None:
        return None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtypes[precision],
    )


def load_model(
    model_type: str,
    model_id: str,
    device: torch.device,
    trust_remote_code: bool = False,
    quantization_config: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """The pretrained model in `model_id`, loaded with the auto class of `model_type` on
    `device`, safetensors only: in fp32, or quantized by bitsandbytes (which places the weights
    itself). A model of the other kind is refused with the model_type to set."""
    quantized = {"quantization_config": quantization_config, "device_map": device}
    try:
        model = load_pretrained(
            AUTO_CLASSES[model_type].from_pretrained,
            model_id,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
            **(quantized if quantization_config is not None else {}),
        )
    except ValueError as e:
        _refuse_other_kind(e, model_id, model_type)
    return model if quantization_config is not None else model.to(device)


def load_adapter(base_model: PreTrainedModel, adapter_dir: str, is_trainable: bool) -> PeftModel:
    """The base model with the adapter saved in `adapter_dir` (a checked safetensors adapter)."""
    try:
        return PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=is_trainable)
    except (RuntimeError, ValueError) as e:  # layers or shapes of another base model
        if isinstance(e, RuntimeError) and "size mismatch" not in str(e):
            raise
        raise ModelNotAvailableError(
            f"The adapter in {adapter_dir!r} does not fit the base model "
            f"{base_model.config.name_or_path!r}: {' '.join(str(e).split())[:500]}"
        ) from e


def load_weights(model: LanguageModel, weights: bytes) -> None:
    """Loads trained weights (safetensors bytes: an adapter's, or every weight) into `model`."""
    state = load_safetensors_bytes(weights)
    if isinstance(model, PeftModel):
        _set_adapter_weights(model, state)
    else:
        model.load_state_dict(state)


def build_model(
    recipe: ModelRecipe,
    device: torch.device,
    *,
    trainable: bool = False,
    seed: int = 42,
    gradient_checkpointing: bool = False,
    weights: bytes | None = None,
) -> LanguageModel:
    """The model the recipe describes, on `device`: the pretrained model, with its saved
    adapter (`adapter_path`), a fresh one (`lora`, initialised from `seed`) or neither, and the
    recipe's CPU speed-ups. `trainable`: ready to train (only the adapter's weights, or with no
    adapter every weight; a quantized base is first prepared, as peft's
    `prepare_model_for_kbit_training` does); otherwise in eval mode. `weights`: trained weights
    (safetensors bytes) loaded into it."""
    if "allocator" in recipe.speedups:
        speedups.keep_freed_memory()
        speedups.bounded_onednn_caches()
    if "mkl_avx512" in recipe.speedups:  # before the model's first product
        mkl_kernels.use_avx512_kernels()
    quantization_config = bitsandbytes_config(recipe.quantization, recipe.precision)
    model = load_model(
        recipe.model_type, recipe.model_id, device, recipe.trust_remote_code, quantization_config
    )
    if trainable and quantization_config is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if trainable or recipe.lora is not None:
        set_seed(seed)  # the fresh adapter's initialisation
    if recipe.adapter_path is not None:
        trained_on = adapter_base_model_id(recipe.adapter_path)
        if trained_on != model.config.name_or_path:
            logger.warning(
                "The adapter in %s was trained on %s, not on %s.",
                recipe.adapter_path,
                trained_on,
                model.config.name_or_path,
            )
        model = load_adapter(model, recipe.adapter_path, is_trainable=trainable)
    elif recipe.lora is not None:
        model = get_peft_model(model, recipe.lora)
    elif trainable:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    model = speedups.apply_to_model(model, recipe.speedups, training=trainable)
    if weights is not None:
        load_weights(model, weights)
    return model if trainable else model.eval()


def saved_model_recipe(
    model_dir: str,
    *,
    model_type: str | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    precision: str = "no",
    speedups_requested: tuple[str, ...] = (),
    setting: str = "model_dir",
) -> ModelRecipe:
    """The recipe of a model saved by a run: a LoRA adapter (`adapter_config.json`) on the base
    model it names, or a full model (`config.json`: a full fine-tune or an export). Its kind is
    `model_type`, or read off its config. `setting` names the input in error messages."""
    model_dir = os.path.abspath(model_dir)
    adapter_path = None
    if is_adapter_dir(model_dir):
        adapter_path = saved_adapter_dir(model_dir, setting)
        model_id = adapter_base_model_id(adapter_path)
    elif os.path.isfile(os.path.join(model_dir, MODEL_CONFIG_FILE)):
        model_id = model_dir
    else:
        raise ModelNotAvailableError(
            f"No saved fine-tune in {model_dir!r}: expected {ADAPTER_CONFIG} (a LoRA adapter "
            f"saved by a run) or {MODEL_CONFIG_FILE} (a full model or an export)."
        )
    config = model_config(model_id, trust_remote_code)
    return ModelRecipe(
        model_id=model_id,
        model_type=model_type or ("seq2seq" if config.is_encoder_decoder else "causal"),
        adapter_path=adapter_path,
        quantization=quantization,
        precision=precision,
        trust_remote_code=trust_remote_code,
        speedups=speedups.applicable(speedups_requested, config),
    )
