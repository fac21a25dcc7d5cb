"""Model stage: where the run's files go, the device, the base model, the LoRA model.

With `{"start": "base"}` a fresh LoRA adapter is put on the base model; with
`{"start": "presaved"}` a saved adapter is loaded onto the base model it was trained from.
"""

import json
import os

import torch
from hamilton.function_modifiers import config
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig, PreTrainedModel, set_seed

from finetune_module.distributed import process_device
from finetune_module.errors import ModelNotAvailableError, SettingsError, require_package
from finetune_module.loading import DEFAULT_MODEL_ID, load_pretrained

DEFAULT_OUTPUT_DIR = "finetuned-model"


def best_model_dir(output_dir: str = DEFAULT_OUTPUT_DIR) -> str:
    """Directory that holds the best fine-tune (adapter, tokenizer, metrics, predictions).

    :param output_dir: the run's output directory (default ./finetuned-model); checkpoints go to
        its `checkpoints/` folder, the best model to `best_model/`.
    """
    return os.path.join(os.path.abspath(output_dir), "best_model")


@config.when(start="presaved")
def presaved_model_dir(best_model_dir: str, presaved_model_path: str | None = None) -> str:
    """Directory of the saved fine-tune to evaluate: `presaved_model_path`, else the best model
    of `output_dir`.

    :param best_model_dir: where a run with the same output_dir saved its best model.
    :param presaved_model_path: any directory holding a saved adapter (a `best_model/` folder or
        a Trainer `checkpoint-N/` folder).
    """
    path = os.path.abspath(presaved_model_path or best_model_dir)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ModelNotAvailableError(
            f"No saved fine-tune in {path!r} (no adapter_config.json). Run with "
            '{"start": "base"} first, or set presaved_model_path to a saved adapter directory.'
        )
    return path


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


def _load_seq2seq(
    model_id: str,
    device: torch.device,
    trust_remote_code: bool,
    quantization_config: BitsAndBytesConfig | None,
) -> PreTrainedModel:
    """A sequence-to-sequence model from `model_id` on `device`, safetensors only: in fp32, or
    quantized by bitsandbytes (which places the weights itself) when a config is given."""
    quantized = {"quantization_config": quantization_config, "device_map": device}
    model = load_pretrained(
        AutoModelForSeq2SeqLM.from_pretrained,
        model_id,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        dtype=torch.float32,
        **(quantized if quantization_config is not None else {}),
    )
    return model if quantization_config is not None else model.to(device)


@config.when(start="base")
def base_model__base(
    device: torch.device,
    quantization_config: BitsAndBytesConfig | None,
    model_id: str = DEFAULT_MODEL_ID,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The pretrained model to fine-tune.

    :param device: where the model runs.
    :param quantization_config: how to quantize it (QLoRA), or None for fp32.
    :param model_id: a Hugging Face model id or a local directory (any AutoModelForSeq2SeqLM).
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    return _load_seq2seq(model_id, device, trust_remote_code, quantization_config)


@config.when(start="presaved")
def base_model__presaved(
    presaved_model_dir: str,
    device: torch.device,
    quantization_config: BitsAndBytesConfig | None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The pretrained model the saved adapter was trained from (named in its adapter_config.json).

    :param presaved_model_dir: the directory of the saved fine-tune.
    :param device: where the model runs.
    :param quantization_config: how to quantize it (as it was for training), or None for fp32.
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    with open(os.path.join(presaved_model_dir, "adapter_config.json"), encoding="utf-8") as f:
        base_id = json.load(f)["base_model_name_or_path"]
    return _load_seq2seq(base_id, device, trust_remote_code, quantization_config)


def _default_target_modules(model: PreTrainedModel) -> list[str]:
    """LoRA target modules for the model's architecture: peft's table, else every attention
    projection found by name."""
    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
    if known:
        return list(known)
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    found = sorted(n for n in names if n in ("q", "v", "q_proj", "v_proj", "query", "value"))
    if not found:
        raise SettingsError(
            f"Cannot infer LoRA target_modules for model type {model.config.model_type!r}; "
            f"set target_modules to some of its linear layers: {', '.join(sorted(names))}."
        )
    return found


@config.when(start="base")
def lora_config(
    base_model: PreTrainedModel,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float | int = 0.05,
    target_modules: list[str] | None = None,
) -> LoraConfig:
    """The LoRA adapter's shape: rank, scaling, dropout and which layers it adapts.

    :param base_model: the model the adapter goes on (its architecture picks default targets).
    :param r: rank of the low-rank update matrices.
    :param lora_alpha: scaling of the update (the update is multiplied by lora_alpha / r).
    :param lora_dropout: dropout on the adapter's input during training.
    :param target_modules: names of the linear layers to adapt; default `q`, `v` for T5 and the
        attention query/value projections of other architectures.
    """
    if r < 1:
        raise SettingsError(f"r (the LoRA rank) must be at least 1, got {r}.")
    if not 0 <= lora_dropout < 1:
        raise SettingsError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules or _default_target_modules(base_model)),
        bias="none",
        task_type=TaskType.SEQ_2_SEQ_LM,
    )


@config.when(start="base")
def peft_model__base(
    base_model: PreTrainedModel,
    lora_config: LoraConfig,
    quantization_config: BitsAndBytesConfig | None,
    gradient_checkpointing: bool = False,
    seed: int = 42,
) -> PeftModel:
    """The base model with a fresh, trainable LoRA adapter (only the adapter's weights train).

    A quantized base is first prepared for training (peft's `prepare_model_for_kbit_training`:
    frozen, norms in fp32, input gradients on for gradient checkpointing).

    :param gradient_checkpointing: recompute activations in the backward pass to save memory.
    :param seed: seed of the adapter's random initialisation (and of training).
    """
    set_seed(seed)
    if quantization_config is not None:
        base_model = prepare_model_for_kbit_training(
            base_model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(base_model, lora_config)


@config.when(start="presaved")
def peft_model__presaved(base_model: PreTrainedModel, presaved_model_dir: str) -> PeftModel:
    """The base model with the saved adapter loaded, ready for evaluation."""
    return PeftModel.from_pretrained(base_model, presaved_model_dir, is_trainable=False)
