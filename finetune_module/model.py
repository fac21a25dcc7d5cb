"""Model stage: where the run's files go, the device, the base model, the LoRA model.

With `{"start": "base"}` a fresh LoRA adapter is put on the base model (or, with
`{"use_lora": False}`, every weight of the base model trains); with `{"start": "presaved"}` a
saved fine-tune is loaded: an adapter onto the base model it was trained from, or a full model.
`{"model_type": "causal"}` loads decoder-only models (GPT-2, Llama, ...) instead of
sequence-to-sequence ones. The model that trains is built inside the training stage; the models
here are what the trained weights are loaded into for evaluation. Model objects are never written
to Hamilton's cache (`@cache(behavior="disable")`): they are loaded on each run, and only plain
data (tokens, the trained weights) is cached.
"""

import json
import logging
import os

import torch
from hamilton.function_modifiers import cache, config
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BitsAndBytesConfig,
    PreTrainedModel,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

from finetune_module import speedups
from finetune_module.distributed import process_device
from finetune_module.errors import ModelNotAvailableError, SettingsError, require_package
from finetune_module.loading import (
    ADAPTER_CONFIG,
    DEFAULT_MODEL_ID,
    load_pretrained,
    saved_adapter_dir,
)

DEFAULT_OUTPUT_DIR = "finetuned-model"
MODEL_TYPES = ("seq2seq", "causal")  # values of the config key "model_type"
MODEL_CONFIG_FILE = "config.json"  # a saved full model
# An artifact directory being replaced is first renamed to `<dir>.old` (see artifacts.py).
BACKUP_SUFFIX = ".old"

#: A model the dataflow trains or evaluates: a transformers model, with or without an adapter.
LanguageModel = PreTrainedModel | PeftModel

logger = logging.getLogger(__name__)


def best_model_dir(output_dir: str = DEFAULT_OUTPUT_DIR) -> str:
    """Directory that holds the best fine-tune (adapter, tokenizer, metrics, predictions).

    :param output_dir: the run's output directory (default ./finetuned-model); checkpoints go to
        its `checkpoints/` folder, the best model to `best_model/`.
    """
    return os.path.join(os.path.abspath(output_dir), "best_model")


def _is_adapter_dir(path: str) -> bool:
    """Whether `path` holds a saved LoRA adapter (rather than a full model)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


@config.when(start="presaved")
def presaved_model_dir(best_model_dir: str, presaved_model_path: str | None = None) -> str:
    """Directory of the saved fine-tune to evaluate: `presaved_model_path`, else the best model
    of `output_dir`.

    :param best_model_dir: where a run with the same output_dir saved its best model.
    :param presaved_model_path: any directory holding a saved fine-tune: a LoRA adapter
        (`adapter_config.json`) or a full model (`config.json`), such as a `best_model/` folder
        or a Trainer `checkpoint-N/` folder.
    """
    path = os.path.abspath(presaved_model_path or best_model_dir)
    backup = path + BACKUP_SUFFIX
    if presaved_model_path is None and not os.path.exists(path) and os.path.isdir(backup):
        path = backup  # a save was killed between its two renames; the previous model is here
    if not any(
        os.path.isfile(os.path.join(path, name)) for name in (ADAPTER_CONFIG, MODEL_CONFIG_FILE)
    ):
        raise ModelNotAvailableError(
            f"No saved fine-tune in {path!r} (no {ADAPTER_CONFIG} or {MODEL_CONFIG_FILE}). Run "
            'with {"start": "base"} first, or set presaved_model_path to a saved fine-tune '
            "directory."
        )
    # a full model's weights are checked when it is loaded (safetensors only)
    return saved_adapter_dir(path, "presaved_model_path") if _is_adapter_dir(path) else path


@cache(behavior="disable")
def device() -> torch.device:
    """Where this process's model runs: a CUDA GPU when there is one (under `torchrun` or
    `accelerate launch`, the process's own GPU, cuda:LOCAL_RANK), else the CPU.

    Under a launcher the process joins the others here (gloo on CPU, nccl on GPU).
    """
    return process_device()


def mixed_precision(device: torch.device, bf16: bool = False, fp16: bool = False) -> str:
    """The number format of training's matrix products: "no" (fp32 throughout), "bf16" or
    "fp16" (autocast on a CUDA GPU, the weights kept in fp32).

    :param device: where the model runs; mixed precision needs a CUDA GPU.
    :param bf16: train in bfloat16 mixed precision (GPUs with bf16 support: Ampere or newer);
        the safe choice for T5, whose activations can overflow in fp16.
    :param fp16: train in float16 mixed precision with loss scaling (any CUDA GPU).
    """
    if bf16 and fp16:
        raise SettingsError("bf16 and fp16 exclude each other; set at most one of them.")
    if not (bf16 or fp16):
        return "no"
    name = "bf16" if bf16 else "fp16"
    if device.type != "cuda":
        raise SettingsError(
            f"{name} needs a CUDA GPU{' with bf16 support' if bf16 else ''}; this machine has "
            f"none (it trains in fp32 on the CPU: leave {name} off)."
        )
    if bf16 and not torch.cuda.is_bf16_supported():
        raise SettingsError(
            f"bf16 needs a CUDA GPU with bf16 support; {torch.cuda.get_device_name(device)} has "
            "none: use fp16 instead."
        )
    return name


def quantization_config(
    device: torch.device,
    mixed_precision: str,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
) -> BitsAndBytesConfig | None:
    """How the frozen base model is quantized (bitsandbytes), or None to keep it in fp32.

    4-bit is QLoRA's recipe: NF4 weights with double quantization, computing in the training
    precision (bf16, fp16 or fp32); 8-bit is LLM.int8. Only the LoRA adapter trains, in fp32.

    :param device: where the model runs; quantized loading needs a CUDA GPU.
    :param mixed_precision: the training precision, used for the 4-bit matrix products.
    :param load_in_4bit: load the base model in 4 bits (QLoRA).
    :param load_in_8bit: load the base model in 8 bits.
    """
    if load_in_4bit and load_in_8bit:
        raise SettingsError("load_in_4bit and load_in_8bit exclude each other; set at most one.")
    if not (load_in_4bit or load_in_8bit):
        return None
    setting = "load_in_4bit" if load_in_4bit else "load_in_8bit"
    if device.type != "cuda":
        raise SettingsError(
            f"{setting} (a bitsandbytes-quantized base model) needs a CUDA GPU; this machine "
            f"has none (leave {setting} off on the CPU)."
        )
    require_package("bitsandbytes", setting)
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtypes[mixed_precision],
    )


@config.when_not(model_type="causal")
def auto_model_class__seq2seq(model_type: str = "seq2seq") -> type:
    """The transformers class that loads the model: `AutoModelForSeq2SeqLM`, for
    encoder-decoder models (T5, FLAN-T5, BART, ...). The default model type.

    :param model_type: the config key choosing the kind of model: "seq2seq" or "causal".
    """
    if model_type not in MODEL_TYPES:
        raise SettingsError(
            f"model_type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}."
        )
    return AutoModelForSeq2SeqLM


@config.when(model_type="causal")
def auto_model_class__causal() -> type:
    """The transformers class that loads the model: `AutoModelForCausalLM`, for decoder-only
    models (GPT-2, Llama, Mistral, OPT, ...)."""
    return AutoModelForCausalLM


def _load_model(
    auto_model_class: type,
    model_id: str,
    device: torch.device,
    trust_remote_code: bool,
    quantization_config: BitsAndBytesConfig | None,
) -> PreTrainedModel:
    """The model in `model_id`, loaded with `auto_model_class` on `device`, safetensors only: in
    fp32, or quantized by bitsandbytes (which places the weights itself) when a config is given.
    A model of the other kind is refused with the model_type to set. On the CPU its tanh GELU
    runs as one kernel and the allocator keeps freed memory for reuse (`speedups`)."""
    if device.type == "cpu":
        speedups.keep_freed_memory()
    quantized = {"quantization_config": quantization_config, "device_map": device}
    try:
        model = load_pretrained(
            auto_model_class.from_pretrained,
            model_id,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
            **(quantized if quantization_config is not None else {}),
        )
    except ValueError as e:
        _refuse_other_kind(e, model_id, auto_model_class)
    speedups.fuse_gelu(model)
    return model if quantization_config is not None else model.to(device)


def _refuse_other_kind(error: ValueError, model_id: str, auto_model_class: type) -> None:
    """Re-raises a loading error; a model of the other kind is refused with the model_type."""
    if "Unrecognized configuration class" not in str(error):
        raise error
    raise SettingsError(
        f"{model_id!r} cannot be loaded with {auto_model_class.__name__}. Set the config key "
        'model_type to "causal" for decoder-only models (GPT-2, Llama, ...) or "seq2seq" '
        "(the default) for encoder-decoder models (T5, BART, ...)."
    ) from error


def _weightless_model(
    auto_model_class: type, model_id: str, trust_remote_code: bool
) -> PreTrainedModel:
    """The model's architecture without its weights (on the meta device): enough to name its
    layers, with no second copy of the weights in memory."""
    model_config = load_pretrained(
        AutoConfig.from_pretrained, model_id, trust_remote_code=trust_remote_code
    )
    try:
        with torch.device("meta"):
            return auto_model_class.from_config(model_config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        _refuse_other_kind(e, model_id, auto_model_class)
        raise


@cache(behavior="disable")
@config.when(start="base")
def base_model__base(
    device: torch.device,
    auto_model_class: type,
    quantization_config: BitsAndBytesConfig | None,
    model_id: str = DEFAULT_MODEL_ID,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The pretrained model the trained weights are loaded into for evaluation.

    :param device: where the model runs.
    :param auto_model_class: the transformers class that loads it (set by model_type).
    :param quantization_config: how to quantize it (QLoRA), or None for fp32.
    :param model_id: a Hugging Face model id or a local directory (any AutoModelForSeq2SeqLM,
        or any AutoModelForCausalLM with model_type "causal").
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    return _load_model(auto_model_class, model_id, device, trust_remote_code, quantization_config)


def _adapter_base_model_id(adapter_dir: str) -> str:
    """The base model a saved adapter was trained from, as its adapter_config.json names it."""
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(config_path, encoding="utf-8") as f:
            return str(json.load(f)["base_model_name_or_path"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotAvailableError(
            f"{config_path}: not a usable adapter config (need the key base_model_name_or_path)."
        ) from e


@cache(behavior="disable")
@config.when(start="presaved")
def base_model__presaved(
    presaved_model_dir: str,
    device: torch.device,
    auto_model_class: type,
    quantization_config: BitsAndBytesConfig | None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The model the saved fine-tune is built on: for a LoRA adapter, the pretrained model it
    was trained from (named in its adapter_config.json); for a full fine-tune, the saved model.

    :param presaved_model_dir: the directory of the saved fine-tune.
    :param device: where the model runs.
    :param auto_model_class: the transformers class that loads it (set by model_type).
    :param quantization_config: how to quantize it (as it was for training), or None for fp32.
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    model_id = presaved_model_dir
    if _is_adapter_dir(presaved_model_dir):
        model_id = _adapter_base_model_id(presaved_model_dir)
    return _load_model(auto_model_class, model_id, device, trust_remote_code, quantization_config)


# Attention query/value projections by name, separate or fused, across common architectures.
_ATTENTION_PROJECTIONS = (
    *("q", "v", "q_proj", "v_proj", "query", "value"),
    *("c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack"),
)


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


def _has_transposed_weights(model: PreTrainedModel, targets: list[str]) -> bool:
    """Whether the target layers store their weights as (in, out), like GPT-2's Conv1D."""
    return any(
        isinstance(module, Conv1D)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    )


@config.when(start="base")
@config.when_not(use_lora=False)
def lora_config(
    auto_model_class: type,
    model_id: str = DEFAULT_MODEL_ID,
    trust_remote_code: bool = False,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float | int = 0.05,
    target_modules: list[str] | None = None,
) -> LoraConfig:
    """The LoRA adapter's shape: rank, scaling, dropout and which layers it adapts.

    :param auto_model_class: the transformers class of the model (set by model_type).
    :param model_id: the model the adapter goes on: its architecture picks the default targets
        (only its config is read, so no second copy of the weights is loaded).
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    :param r: rank of the low-rank update matrices.
    :param lora_alpha: scaling of the update (the update is multiplied by lora_alpha / r).
    :param lora_dropout: dropout on the adapter's input during training.
    :param target_modules: names of the linear layers to adapt; default `q`, `v` for T5 and the
        attention query/value projections of other architectures (`c_attn` for GPT-2,
        `q_proj`, `v_proj` for Llama, Mistral and OPT, ...).
    """
    if r < 1:
        raise SettingsError(f"r (the LoRA rank) must be at least 1, got {r}.")
    if not 0 <= lora_dropout < 1:
        raise SettingsError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
    base_model = _weightless_model(auto_model_class, model_id, trust_remote_code)
    if target_modules:
        names = _linear_layer_names(base_model)
        unknown = [t for t in target_modules if t.rsplit(".", 1)[-1] not in names]
        if unknown:
            raise SettingsError(
                f"target_modules: the model has no linear layer named {', '.join(unknown)}; "
                f"its linear layers are {', '.join(sorted(names))}."
            )
    targets = list(target_modules or _default_target_modules(base_model))
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        fan_in_fan_out=_has_transposed_weights(base_model, targets),
        bias="none",
        task_type=(
            TaskType.SEQ_2_SEQ_LM if base_model.config.is_encoder_decoder else TaskType.CAUSAL_LM
        ),
    )


def _load_adapter(base_model: PreTrainedModel, adapter_dir: str, is_trainable: bool) -> PeftModel:
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


def _trainable_adapter(
    base_model: PreTrainedModel,
    lora_config: LoraConfig,
    quantization_config: BitsAndBytesConfig | None,
    gradient_checkpointing: bool,
    seed: int,
    init_adapter_path: str | None,
) -> PeftModel:
    """The base model with a trainable LoRA adapter (fresh, or the saved one to continue from);
    a quantized base is first prepared for training. (The training stage uses it too, on its own
    copy of the base model.)"""
    if seed < 0:
        raise SettingsError(f"seed must be 0 or more, got {seed}.")
    set_seed(seed)
    if quantization_config is not None:
        base_model = prepare_model_for_kbit_training(
            base_model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if init_adapter_path is None:
        return speedups.cheaper_dropout(get_peft_model(base_model, lora_config))
    adapter_dir = saved_adapter_dir(init_adapter_path, "init_adapter_path")
    trained_on = _adapter_base_model_id(adapter_dir)
    if trained_on != base_model.config.name_or_path:
        logger.warning(
            "init_adapter_path: the adapter in %s was trained on %s, not on model_id %s.",
            adapter_dir,
            trained_on,
            base_model.config.name_or_path,
        )
    return speedups.cheaper_dropout(_load_adapter(base_model, adapter_dir, is_trainable=True))


@cache(behavior="disable")
@config.when(start="base")
@config.when_not(use_lora=False)
def peft_model__base(
    base_model: PreTrainedModel,
    lora_config: LoraConfig,
    quantization_config: BitsAndBytesConfig | None,
    gradient_checkpointing: bool = False,
    seed: int = 42,
    init_adapter_path: str | None = None,
) -> PeftModel:
    """The base model with a trainable LoRA adapter: a fresh one, or the saved one to continue
    from when `init_adapter_path` is given (only the adapter's weights train); the evaluation
    stage loads the trained adapter's weights into it.

    A quantized base is first prepared for training (peft's `prepare_model_for_kbit_training`:
    frozen, norms in fp32, input gradients on for gradient checkpointing).

    :param gradient_checkpointing: recompute activations in the backward pass to save memory.
    :param seed: seed of the adapter's random initialisation (and of training).
    :param init_adapter_path: a saved adapter (a `best_model/` or `checkpoint-N/` folder) to
        continue training instead of a fresh LoRA; its own rank and targets are kept, so the
        LoRA settings (r, lora_alpha, ...) do not apply. It should have been trained on
        `model_id`.
    """
    return _trainable_adapter(
        base_model,
        lora_config,
        quantization_config,
        gradient_checkpointing,
        seed,
        init_adapter_path,
    )


@cache(behavior="disable")
@config.when(start="base")
@config.when_not(use_lora=False)
def trainable_model__lora(peft_model: PeftModel, use_lora: bool = True) -> LanguageModel:
    """The model the trainer updates: the base model with its LoRA adapter (the default).

    :param use_lora: the config key choosing LoRA (True, the default) or full fine-tuning
        (False); taken here so that Hamilton refuses a value that is not a boolean.
    """
    return peft_model


def _fully_trainable(
    base_model: PreTrainedModel, quantization_config: BitsAndBytesConfig | None
) -> PreTrainedModel:
    """The base model with every weight trainable; a quantized one is refused. (The training
    stage uses it too, on its own copy of the base model.)"""
    if quantization_config is not None:
        raise SettingsError(
            "load_in_4bit and load_in_8bit quantize a frozen base model for LoRA; full "
            "fine-tuning (use_lora False) trains every weight: leave them off, or use LoRA."
        )
    for parameter in base_model.parameters():
        parameter.requires_grad_(True)
    return speedups.cheaper_dropout(base_model)


@cache(behavior="disable")
@config.when(start="base", use_lora=False)
def trainable_model__full(
    base_model: PreTrainedModel, quantization_config: BitsAndBytesConfig | None
) -> LanguageModel:
    """The model the trainer updates: with `{"use_lora": False}` the base model itself, every
    weight trainable (full fine-tuning; it takes a lower learning_rate than LoRA, e.g. 5e-5).
    The evaluation stage loads the trained weights into it.

    :param quantization_config: must be None: a quantized base model trains through LoRA only.
    """
    return _fully_trainable(base_model, quantization_config)


@cache(behavior="disable")
@config.when(start="presaved")
def presaved_model(base_model: PreTrainedModel, presaved_model_dir: str) -> LanguageModel:
    """The saved fine-tune, ready for evaluation: its LoRA adapter on the base model, or, for a
    full fine-tune, the saved model itself."""
    if _is_adapter_dir(presaved_model_dir):
        return _load_adapter(base_model, presaved_model_dir, is_trainable=False)
    return base_model
