"""Model stage: where the run's files go, the device, the base model, the LoRA model.

With `{"start": "base"}` a fresh LoRA adapter is put on the base model; with
`{"start": "presaved"}` a saved adapter is loaded onto the base model it was trained from.
"""

import json
import os

import torch
from hamilton.function_modifiers import config
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel, set_seed

from finetune_module.errors import ModelNotAvailableError, SettingsError
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
    """Where the model runs: the first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_seq2seq(model_id: str, device: torch.device, trust_remote_code: bool) -> PreTrainedModel:
    """A sequence-to-sequence model from `model_id`, in fp32 on `device`, safetensors only."""
    model = load_pretrained(
        AutoModelForSeq2SeqLM.from_pretrained,
        model_id,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        dtype=torch.float32,
    )
    return model.to(device)


@config.when(start="base")
def base_model__base(
    device: torch.device, model_id: str = DEFAULT_MODEL_ID, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The pretrained model to fine-tune.

    :param device: where the model runs.
    :param model_id: a Hugging Face model id or a local directory (any AutoModelForSeq2SeqLM).
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    return _load_seq2seq(model_id, device, trust_remote_code)


@config.when(start="presaved")
def base_model__presaved(
    presaved_model_dir: str, device: torch.device, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The pretrained model the saved adapter was trained from (named in its adapter_config.json).

    :param presaved_model_dir: the directory of the saved fine-tune.
    :param device: where the model runs.
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    with open(os.path.join(presaved_model_dir, "adapter_config.json"), encoding="utf-8") as f:
        base_id = json.load(f)["base_model_name_or_path"]
    return _load_seq2seq(base_id, device, trust_remote_code)


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
    base_model: PreTrainedModel, lora_config: LoraConfig, seed: int = 42
) -> PeftModel:
    """The base model with a fresh, trainable LoRA adapter (only the adapter's weights train).

    :param seed: seed of the adapter's random initialisation (and of training).
    """
    set_seed(seed)
    return get_peft_model(base_model, lora_config)


@config.when(start="presaved")
def peft_model__presaved(base_model: PreTrainedModel, presaved_model_dir: str) -> PeftModel:
    """The base model with the saved adapter loaded, ready for evaluation."""
    return PeftModel.from_pretrained(base_model, presaved_model_dir, is_trainable=False)
