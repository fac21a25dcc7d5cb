"""Training stage (start=base): training arguments, collator, trainer, the fitted trainer.

The Hugging Face `Seq2SeqTrainer` does the training loop. Batches are drawn grouped by length
and padded per batch, the model is evaluated on the validation set each epoch, and the
checkpoint with the lowest validation loss is loaded back at the end.
"""

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from hamilton.function_modifiers import config
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME

from finetune_module.distributed import world_size
from finetune_module.errors import SettingsError, require_package
from finetune_module.model import DEFAULT_OUTPUT_DIR, LanguageModel

LABEL_PAD_TOKEN_ID = -100  # label positions with this id are left out of the loss
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")  # the Trainer's checkpoint folders

logger = logging.getLogger(__name__)


def _check_positive(**settings: float) -> None:
    """Refuses settings that must be positive numbers."""
    for name, value in settings.items():
        if value is None or value <= 0:
            raise SettingsError(f"{name} must be a positive number, got {value}.")


def _json_settings(value: str | dict[str, Any], name: str) -> dict[str, Any]:
    """The settings of a JSON file (or of a mapping given as is), with a clear error when the
    file is missing or is not a JSON object."""
    if isinstance(value, dict):
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


@config.when(start="base")
def scaling_arguments(
    device: torch.device,
    mixed_precision: str,
    gradient_checkpointing: bool = False,
    deepspeed: str | dict[str, Any] | None = None,
    fsdp: bool = False,
    fsdp_config: str | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training arguments that take a run beyond one process in fp32: mixed precision,
    gradient checkpointing, DeepSpeed or FSDP, and data-parallel (DDP) settings.

    Several processes come from the launcher (`torchrun`, `accelerate launch`), not from here:
    the Trainer reads their layout from the environment.

    :param device: where training runs (DeepSpeed and FSDP need CUDA GPUs).
    :param mixed_precision: "no", "bf16" or "fp16".
    :param gradient_checkpointing: recompute activations in the backward pass to save memory.
    :param deepspeed: a DeepSpeed JSON config file (ZeRO stage, offload, ...), or its contents.
    :param fsdp: shard the model, gradients and optimizer state across the processes with
        PyTorch FSDP instead of replicating the model (DDP).
    :param fsdp_config: a JSON file of FSDP settings (or its contents), e.g.
        {"version": 2, "reshard_after_forward": true, "cpu_offload": false}.
    """
    arguments: dict[str, Any] = {
        "bf16": mixed_precision == "bf16",
        "fp16": mixed_precision == "fp16",
        # every LoRA weight takes part in every step: DDP need not search for unused ones
        "ddp_find_unused_parameters": False,
    }
    if gradient_checkpointing:
        arguments["gradient_checkpointing"] = True
        arguments["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if deepspeed is not None and fsdp:
        raise SettingsError("deepspeed and fsdp exclude each other; set at most one.")
    if fsdp_config is not None and not fsdp:
        raise SettingsError("fsdp_config is only used with fsdp; set fsdp too (--fsdp).")
    if deepspeed is not None:
        arguments["deepspeed"] = _json_settings(deepspeed, "deepspeed")
    if fsdp:
        arguments["fsdp"] = True
        if fsdp_config is not None:
            arguments["fsdp_config"] = _json_settings(fsdp_config, "fsdp_config")
    for setting in ("deepspeed", "fsdp"):
        if setting in arguments and device.type != "cuda":
            raise SettingsError(
                f"{setting} needs CUDA GPUs; this machine has none (on the CPU, several "
                f"processes train with plain DDP: launch with torchrun and leave {setting} off)."
            )
    if "deepspeed" in arguments:
        require_package("deepspeed", "deepspeed")
    return arguments


def _is_complete_checkpoint(path: str) -> bool:
    """Whether a checkpoint folder was written to the end: the Trainer writes its
    trainer_state.json last, after the weights, optimizer, scheduler and RNG states."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def _last_complete_checkpoint(checkpoints_dir: str) -> str | None:
    """The complete `checkpoint-N` folder with the highest N, if any."""
    if not os.path.isdir(checkpoints_dir):
        return None
    steps = {
        int(match.group(1)): os.path.join(checkpoints_dir, name)
        for name in os.listdir(checkpoints_dir)
        if (match := CHECKPOINT_PATTERN.fullmatch(name))
    }
    complete = [step for step, path in steps.items() if _is_complete_checkpoint(path)]
    return steps[max(complete)] if complete else None


def _checkpoint_to_resume(resume_from_checkpoint: bool | str, checkpoints_dir: str) -> str | None:
    """The checkpoint training continues from: None for a fresh start, the last complete one
    in `checkpoints_dir` for True, or the given checkpoint folder (checked)."""
    if resume_from_checkpoint is False:
        if _last_complete_checkpoint(checkpoints_dir):
            logger.info(
                "Training from the start; %s holds checkpoints of an earlier run "
                "(resume_from_checkpoint=True continues from the last one).",
                checkpoints_dir,
            )
        return None
    if resume_from_checkpoint is True:
        last = _last_complete_checkpoint(checkpoints_dir)
        if last is None:
            logger.warning(
                "resume_from_checkpoint: no complete checkpoint in %s; training from the start.",
                checkpoints_dir,
            )
        return last
    path = os.path.abspath(resume_from_checkpoint)
    if not _is_complete_checkpoint(path):
        raise SettingsError(
            f"resume_from_checkpoint: {path!r} is not a complete Trainer checkpoint "
            f"(no readable {TRAINER_STATE_NAME})."
        )
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise SettingsError(
            f"resume_from_checkpoint: {path!r} has no .safetensors weights; only safetensors "
            "weights are loaded, never pickle files."
        )
    return path


@config.when(start="base")
def training_arguments(
    train_set: pd.DataFrame,
    device: torch.device,
    scaling_arguments: dict[str, Any],
    generation_settings: dict[str, int],
    output_dir: str = DEFAULT_OUTPUT_DIR,
    num_train_epochs: float | int = 2.0,
    max_steps: int = -1,
    per_device_train_batch_size: int = 8,
    per_device_eval_batch_size: int = 8,
    learning_rate: float | int = 1e-3,
    gradient_accumulation_steps: int = 1,
    seed: int = 42,
    resume_from_checkpoint: bool | str = False,
    extra_training_args: dict[str, Any] | None = None,
) -> Seq2SeqTrainingArguments:
    """The Hugging Face training arguments of the run.

    :param train_set: the training set (its size sets the logging and evaluation steps).
    :param device: where training runs.
    :param scaling_arguments: precision, memory and multi-process settings.
    :param generation_settings: how answers are generated; its beams are recorded as
        generation_num_beams, for the trainer's own `predict`, and bad generation settings are
        refused before training starts.
    :param output_dir: the run's output directory; Trainer checkpoints go to its `checkpoints/`.
    :param num_train_epochs: passes over the training set.
    :param max_steps: if positive, the number of optimizer steps, overriding num_train_epochs.
    :param per_device_train_batch_size: examples per training batch of each process.
    :param per_device_eval_batch_size: examples per evaluation batch.
    :param learning_rate: peak learning rate of AdamW (LoRA takes a higher one than full tuning).
    :param gradient_accumulation_steps: batches per optimizer step.
    :param seed: seed of initialisation, dropout and batch order.
    :param resume_from_checkpoint: True to continue from the last complete checkpoint in
        `<output_dir>/checkpoints` (training starts afresh when there is none yet), or the path
        of a `checkpoint-N` folder to continue from; False (default) trains from the start.
    :param extra_training_args: any other `Seq2SeqTrainingArguments` field, passed straight
        through and overriding the values above (e.g. {"push_to_hub": True, "warmup_steps": 10}).
    """
    _check_positive(
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_eval_batch_size,
        learning_rate=learning_rate,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    if max_steps <= 0:
        _check_positive(num_train_epochs=num_train_epochs)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SettingsError(f"output_dir {output_dir!r} is a file; it must be a directory.")
    checkpoints_dir = os.path.join(os.path.abspath(output_dir), "checkpoints")
    steps_per_epoch = math.ceil(
        len(train_set) / (per_device_train_batch_size * gradient_accumulation_steps * world_size())
    )
    per_epoch = max_steps <= 0 or max_steps >= steps_per_epoch
    arguments: dict[str, Any] = {
        "output_dir": checkpoints_dir,
        "num_train_epochs": num_train_epochs,
        "max_steps": max_steps,
        "per_device_train_batch_size": per_device_train_batch_size,
        "per_device_eval_batch_size": per_device_eval_batch_size,
        "learning_rate": learning_rate,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "seed": seed,
        "resume_from_checkpoint": _checkpoint_to_resume(resume_from_checkpoint, checkpoints_dir),
        "generation_num_beams": generation_settings["num_beams"],
        # evaluate and save each epoch (or once at the end of a run shorter than an epoch)
        "eval_strategy": "epoch" if per_epoch else "steps",
        "save_strategy": "epoch" if per_epoch else "steps",
        "eval_steps": None if per_epoch else max_steps,
        "save_steps": None if per_epoch else max_steps,
        "logging_strategy": "steps",
        "logging_steps": max(1, steps_per_epoch // 5),
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "save_total_limit": 2,
        "train_sampling_strategy": "group_by_length",
        "report_to": "none",
        "use_cpu": device.type == "cpu",
        **scaling_arguments,
    }
    arguments.update(extra_training_args or {})
    known = {field.name for field in dataclasses.fields(Seq2SeqTrainingArguments)}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise SettingsError(
            f"Unknown Seq2SeqTrainingArguments in extra_training_args: {', '.join(unknown)}."
        )
    try:
        return Seq2SeqTrainingArguments(**arguments)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"Invalid training arguments: {e}") from e


@config.when_not(model_type="causal")
def data_collator(
    tokenizer: PreTrainedTokenizerBase, base_model: PreTrainedModel, device: torch.device
) -> DataCollatorForSeq2Seq:
    """Turns a list of examples into a batch padded to its own longest example.

    Labels are padded with -100 so that padding is left out of the loss; on a GPU lengths are
    rounded up to a multiple of 8 for tensor cores. The model builds the decoder's inputs.
    """
    return DataCollatorForSeq2Seq(
        tokenizer,
        model=base_model,
        label_pad_token_id=LABEL_PAD_TOKEN_ID,
        pad_to_multiple_of=8 if device.type == "cuda" else None,
    )


@dataclasses.dataclass
class PromptAnswerCollator:
    """Joins each example's prompt and answer into one sequence and pads the batch, on the
    right, to its longest sequence; the labels are the answer's tokens, -100 elsewhere."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """The batch: `input_ids`, `attention_mask` and `labels`, all of the same shape."""
        lengths = [len(e["input_ids"]) + len(e["labels"]) for e in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id)
        labels = torch.full((len(examples), width), LABEL_PAD_TOKEN_ID)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths, strict=True)):
            prompt = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"] + example["labels"])
            labels[row, prompt:length] = torch.tensor(example["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@config.when(model_type="causal")
def data_collator__causal(
    tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> PromptAnswerCollator:
    """Turns a list of prompt/answer examples into a batch for a decoder-only model: each
    prompt followed by its answer, padded to the batch's longest, the loss on the answer only."""
    return PromptAnswerCollator(
        pad_token_id=tokenizer.pad_token_id,
        pad_to_multiple_of=8 if device.type == "cuda" else None,
    )


@config.when(start="base")
def trainer(
    tokenized_train: list[dict[str, list[int]]],
    tokenized_validation: list[dict[str, list[int]]],
    training_arguments: Seq2SeqTrainingArguments,
    trainable_model: LanguageModel,
    data_collator: Callable,
    tokenizer: PreTrainedTokenizerBase,
) -> Seq2SeqTrainer:
    """The trainer, set up and not yet run.

    The data and then the training arguments come first among the parameters: Hamilton computes
    dependencies in parameter order, so bad data and bad settings are refused before the model
    is loaded (and DeepSpeed ZeRO-3 is configured before the model exists, as it must be).
    """
    trainer = Seq2SeqTrainer(
        model=trainable_model,
        args=training_arguments,
        data_collator=data_collator,
        train_dataset=tokenized_train,
        eval_dataset=tokenized_validation,
        processing_class=tokenizer,
    )
    # Seq2seq models (T5, BART) average their loss over their own batch and ignore the
    # Trainer's token count, so the Trainer must average over accumulation steps and processes
    # itself; otherwise gradients and logged losses grow with both. (Decoder-only models are
    # averaged the same way then: per batch, over accumulation steps and processes.)
    trainer.model_accepts_loss_kwargs = False
    return trainer


@config.when(start="base")
def fitted_trainer(trainer: Seq2SeqTrainer) -> Seq2SeqTrainer:
    """The trainer after training, holding the best checkpoint's weights (lowest eval_loss).

    Training continues from `trainer.args.resume_from_checkpoint` when that is set.
    """
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    return trainer
