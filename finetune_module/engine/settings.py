"""The run's settings as plain data, each group checked when it is made.

The settings stage builds one of each group from the dataflow's inputs; everything else takes
the checked groups. A value outside what it may be is one `SettingsError` naming the setting
(the input's name), raised before any data is read or any model is loaded.
"""

import dataclasses
import json
import logging
import math
import os
from typing import Any

import torch

from finetune_module.engine.speedups import SPEEDUPS
from finetune_module.errors import SettingsError, require_package

SPLIT_STRATEGIES = ("random", "last")
MODEL_TYPES = ("seq2seq", "causal")  # values of the config key "model_type"
TASKS = ("auto", "classification", "generation")  # values of the input "task"
PRECISIONS = ("no", "bf16", "fp16")
QUANTIZATIONS = ("4bit", "8bit")
AUTO = "auto"  # activation_memory_gb: a budget derived from the model's own size

logger = logging.getLogger(__name__)


def _check_positive(**settings: Any) -> None:
    """Refuses settings that must be positive numbers."""
    for name, value in settings.items():
        if value is None or isinstance(value, bool) or value <= 0:
            raise SettingsError(f"{name} must be a positive number, got {value}.")


def _check_at_least_one(**settings: int | None) -> None:
    """Refuses counts below 1 (None: not set, allowed)."""
    for name, value in settings.items():
        if value is not None and value < 1:
            raise SettingsError(f"{name} must be at least 1, got {value}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuses a value that is not one of `choices`."""
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


def _check_seed(name: str, value: int) -> None:
    """Refuses a negative seed."""
    if value < 0:
        raise SettingsError(f"{name} must be 0 or more, got {value}.")


@dataclasses.dataclass(frozen=True)
class SplitSettings:
    """How the records are split into the train, validation and hold-out sets (when the data
    has no split column of its own)."""

    random_state: int = 42
    train_size: float = 0.95
    validation_size: float = 0.8
    split_strategy: str = "random"

    def __post_init__(self) -> None:
        for name in ("train_size", "validation_size"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise SettingsError(f"{name} must be between 0 and 1 (exclusive), got {value}.")
        _check_seed("random_state", self.random_state)
        _check_choice("split_strategy", self.split_strategy, SPLIT_STRATEGIES)


@dataclasses.dataclass(frozen=True)
class LengthSettings:
    """How long inputs and targets may be, in tokens: fixed caps, or a percentile of the
    data's own lengths."""

    max_source_length: int | None = None
    max_target_length: int | None = None
    length_percentile: float = 95.0

    def __post_init__(self) -> None:
        for name in ("max_source_length", "max_target_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise SettingsError(f"{name} must be at least 2 tokens, got {value}.")
        if not 0 < self.length_percentile <= 100:
            raise SettingsError(
                f"length_percentile must be in (0, 100], got {self.length_percentile}."
            )


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The shape of a fresh LoRA adapter (target_modules None: chosen for the architecture)."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise SettingsError(f"r (the LoRA rank) must be at least 1, got {self.r}.")
        if not 0 <= self.lora_dropout < 1:
            raise SettingsError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which model to build and how: the settings the model recipe is made from."""

    model_id: str
    model_type: str = "seq2seq"
    use_lora: bool = True
    trust_remote_code: bool = False
    lora: LoraSettings = LoraSettings()
    init_adapter_path: str | None = None
    presaved_model_path: str | None = None
    mixed_precision: str = "no"
    quantization: str | None = None
    speedups: tuple[str, ...] = ()
    seed: int = 42

    def __post_init__(self) -> None:
        _check_choice("model_type", self.model_type, MODEL_TYPES)
        _check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        if self.quantization is not None:
            _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_seed("seed", self.seed)
        unknown = [name for name in self.speedups if name not in SPEEDUPS]
        if unknown:
            raise SettingsError(
                f"cpu_speedups: unknown speed-up {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(SPEEDUPS)}."
            )


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """How the model trains: the Hugging Face training arguments we set, and our own."""

    num_train_epochs: float = 2.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    learning_rate: float = 1e-3
    gradient_accumulation_steps: int = 1
    seed: int = 42
    resume_from_checkpoint: bool | str = False
    extra_training_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    gradient_checkpointing: bool = False
    deepspeed: dict[str, Any] | None = None
    fsdp: bool = False
    fsdp_config: dict[str, Any] | None = None
    activation_memory_gb: float | str | None = AUTO
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_report_to(self.report_to)
        _check_positive(
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_eval_batch_size,
            learning_rate=self.learning_rate,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
        )
        if self.max_steps <= 0:
            _check_positive(num_train_epochs=self.num_train_epochs)
        _check_seed("seed", self.seed)
        if self.deepspeed is not None and self.fsdp:
            raise SettingsError("deepspeed and fsdp exclude each other; set at most one.")
        if self.fsdp_config is not None and not self.fsdp:
            raise SettingsError("fsdp_config is only used with fsdp; set fsdp too (--fsdp).")
        budget = self.activation_memory_gb
        if budget not in (None, AUTO) and (
            isinstance(budget, bool | str) or not math.isfinite(budget) or budget <= 0
        ):
            raise SettingsError(
                "activation_memory_gb must be a positive number of GB, None (no limit) or "
                f'"{AUTO}" (from the model\'s size), got {budget}.'
            )


def report_to_names(report_to: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The Trainer integrations that `report_to` names, as a tuple: () for "none" (or None),
    every installed one for "all", else the names given (one text or a list of them)."""
    if report_to is None:
        return ()
    names = (report_to,) if isinstance(report_to, str) else tuple(report_to)
    if not all(isinstance(name, str) for name in names):
        raise SettingsError(f"report_to must be a name or a list of names, got {report_to!r}.")
    names = tuple(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    if names in ((), ("none",)):
        return ()
    if names == ("all",):
        from transformers.integrations import get_available_reporting_integrations

        return tuple(get_available_reporting_integrations())
    return names


def check_report_to(names: tuple[str, ...]) -> None:
    """Refuses a Trainer integration that transformers does not know, or whose package is not
    installed here, naming the ones it knows or the package to install."""
    from transformers.integrations import integration_utils

    known = tuple(integration_utils.INTEGRATION_TO_CALLBACK)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SettingsError(
            f"report_to: unknown integration {', '.join(map(repr, unknown))}; known: none, all, "
            f"{', '.join(known)}."
        )
    available = integration_utils.get_available_reporting_integrations()
    missing = [name for name in names if name not in available]
    if missing:
        raise SettingsError(
            f"report_to: {', '.join(missing)} is not installed here (pip install "
            f"{' '.join(missing)}; for tensorboard, pip install tensorboard)."
        )


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """How the fine-tune is evaluated: answers generated greedily (or by beam search) in
    batches, the validation loss in batches, and what kind of targets the data has."""

    num_beams: int = 1
    max_new_tokens: int | None = None
    generation_batch_size: int = 32
    per_device_eval_batch_size: int = 8
    task: str = "auto"

    def __post_init__(self) -> None:
        _check_at_least_one(
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            generation_batch_size=self.generation_batch_size,
        )
        _check_positive(per_device_eval_batch_size=self.per_device_eval_batch_size)
        _check_choice("task", self.task, TASKS)


def cpu_multiplies_bf16() -> bool:
    """Whether this machine's CPU multiplies bfloat16 natively (AVX512-BF16, as on AMD Zen 4
    and Intel Cooper Lake or later, or AMX tiles, as on Intel Sapphire Rapids or later); where
    it does not, oneDNN converts bf16 to fp32 for every product, which is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own probes
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def mixed_precision(device: torch.device, bf16: bool = False, fp16: bool = False) -> str:
    """The number format of training's matrix products: "no" (fp32 throughout), "bf16" or
    "fp16" (autocast, the weights kept in fp32): bf16 on a CUDA GPU with bf16 support or on
    the CPU (with a warning where the CPU does not multiply bf16 natively), fp16 on a CUDA GPU;
    refused where it cannot run."""
    if bf16 and fp16:
        raise SettingsError("bf16 and fp16 exclude each other; set at most one of them.")
    if not (bf16 or fp16):
        return "no"
    if bf16 and device.type == "cpu":
        if not cpu_multiplies_bf16():
            logger.warning(
                "bf16: this CPU has no native bf16 products (AVX512-BF16 or AMX), so training "
                "in bf16 is likely slower here than in fp32 (leave bf16 off)."
            )
        return "bf16"
    name = "bf16" if bf16 else "fp16"
    if device.type != "cuda":
        raise SettingsError(
            f"{name} needs a CUDA GPU{' or a CPU' if bf16 else ''}; this machine has "
            f"none (it trains in fp32 on the CPU: leave {name} off)."
        )
    if bf16 and not torch.cuda.is_bf16_supported():
        raise SettingsError(
            f"bf16 needs a CUDA GPU with bf16 support; {torch.cuda.get_device_name(device)} has "
            "none: use fp16 instead."
        )
    return name


def quantization(
    device: torch.device, load_in_4bit: bool = False, load_in_8bit: bool = False
) -> str | None:
    """How the frozen base model is quantized by bitsandbytes: "4bit" (QLoRA's NF4), "8bit"
    (LLM.int8) or None (fp32); refused where it cannot run."""
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
    return "4bit" if load_in_4bit else "8bit"


def speedups_requested(
    device: torch.device, cpu_speedups: bool | list[str] | None
) -> tuple[str, ...]:
    """The CPU speed-ups asked for: every one by default (None) when the model runs on the
    CPU, none on an accelerator; all (True) or none (False) anywhere; or the ones named. Which
    of them apply to a model depends on its family (`speedups.applicable`)."""
    if cpu_speedups is None:
        return SPEEDUPS if device.type == "cpu" else ()
    if isinstance(cpu_speedups, bool):
        return SPEEDUPS if cpu_speedups else ()
    return tuple(cpu_speedups)


def json_settings(value: str | dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The settings of a JSON file (or of a mapping given as is; None stays None), with a
    clear error when the file is missing or is not a JSON object."""
    if value is None or isinstance(value, dict):
        return value
    if not os.path.isfile(value):
        raise SettingsError(f"{name}: no such file {value!r} (expected a JSON file).")
    with open(value, encoding="utf-8") as f:
        try:
            settings = json.load(f)
        except json.JSONDecodeError as e:
            raise SettingsError(f"{name}: {value} is not valid JSON ({e}).") from e
    if not isinstance(settings, dict):
        kind = type(settings).__name__
        raise SettingsError(f"{name}: {value} must hold a JSON object, got a {kind}.")
    return settings


def check_scaling(device: torch.device, deepspeed: Any, fsdp: bool) -> None:
    """Refuses DeepSpeed and FSDP without CUDA GPUs, and DeepSpeed when it is not installed."""
    for setting, on in (("deepspeed", deepspeed is not None), ("fsdp", fsdp)):
        if on and device.type != "cuda":
            raise SettingsError(
                f"{setting} needs CUDA GPUs; this machine has none (on the CPU, several "
                f"processes train with plain DDP: launch with torchrun and leave {setting} off)."
            )
    if deepspeed is not None:
        require_package("deepspeed", "deepspeed")


def output_directory(output_dir: str) -> str:
    """`output_dir` as an absolute path; refused when it is an existing file."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SettingsError(f"output_dir {output_dir!r} is a file; it must be a directory.")
    return os.path.abspath(output_dir)
