"""Training stage (start=base): training arguments, collator, trainer, the fitted trainer.

The Hugging Face `Seq2SeqTrainer` does the training loop. Batches are drawn grouped by length
and padded per batch, the model is evaluated on the validation set each epoch, and the
checkpoint with the lowest validation loss is loaded back at the end.
"""

import dataclasses
import math
import os
from typing import Any

import pandas as pd
import torch
from hamilton.function_modifiers import config
from peft import PeftModel
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from finetune_module.errors import SettingsError
from finetune_module.model import DEFAULT_OUTPUT_DIR

LABEL_PAD_TOKEN_ID = -100  # label positions with this id are left out of the loss


def _check_positive(**settings: float) -> None:
    """Refuses settings that must be positive numbers."""
    for name, value in settings.items():
        if value is None or value <= 0:
            raise SettingsError(f"{name} must be a positive number, got {value}.")


@config.when(start="base")
def training_arguments(
    train_set: pd.DataFrame,
    device: torch.device,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    num_train_epochs: float | int = 2.0,
    max_steps: int = -1,
    per_device_train_batch_size: int = 8,
    per_device_eval_batch_size: int = 8,
    learning_rate: float | int = 1e-3,
    gradient_accumulation_steps: int = 1,
    seed: int = 42,
    extra_training_args: dict[str, Any] | None = None,
) -> Seq2SeqTrainingArguments:
    """The Hugging Face training arguments of the run.

    :param train_set: the training set (its size sets the logging and evaluation steps).
    :param device: where training runs.
    :param output_dir: the run's output directory; Trainer checkpoints go to its `checkpoints/`.
    :param num_train_epochs: passes over the training set.
    :param max_steps: if positive, the number of optimizer steps, overriding num_train_epochs.
    :param per_device_train_batch_size: examples per training batch.
    :param per_device_eval_batch_size: examples per evaluation batch.
    :param learning_rate: peak learning rate of AdamW (LoRA takes a higher one than full tuning).
    :param gradient_accumulation_steps: batches per optimizer step.
    :param seed: seed of initialisation, dropout and batch order.
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
    steps_per_epoch = math.ceil(
        len(train_set) / (per_device_train_batch_size * gradient_accumulation_steps)
    )
    per_epoch = max_steps <= 0 or max_steps >= steps_per_epoch
    arguments: dict[str, Any] = {
        "output_dir": os.path.join(os.path.abspath(output_dir), "checkpoints"),
        "num_train_epochs": num_train_epochs,
        "max_steps": max_steps,
        "per_device_train_batch_size": per_device_train_batch_size,
        "per_device_eval_batch_size": per_device_eval_batch_size,
        "learning_rate": learning_rate,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "seed": seed,
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
    }
    arguments.update(extra_training_args or {})
    known = {field.name for field in dataclasses.fields(Seq2SeqTrainingArguments)}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise SettingsError(
            f"Unknown Seq2SeqTrainingArguments in extra_training_args: {', '.join(unknown)}."
        )
    return Seq2SeqTrainingArguments(**arguments)


def data_collator(
    tokenizer: PreTrainedTokenizerBase, peft_model: PeftModel, device: torch.device
) -> DataCollatorForSeq2Seq:
    """Turns a list of examples into a batch padded to its own longest example.

    Labels are padded with -100 so that padding is left out of the loss; on a GPU lengths are
    rounded up to a multiple of 8 for tensor cores.
    """
    return DataCollatorForSeq2Seq(
        tokenizer,
        model=peft_model,
        label_pad_token_id=LABEL_PAD_TOKEN_ID,
        pad_to_multiple_of=8 if device.type == "cuda" else None,
    )


@config.when(start="base")
def trainer(
    tokenized_train: list[dict[str, list[int]]],
    tokenized_validation: list[dict[str, list[int]]],
    peft_model: PeftModel,
    training_arguments: Seq2SeqTrainingArguments,
    data_collator: DataCollatorForSeq2Seq,
    tokenizer: PreTrainedTokenizerBase,
) -> Seq2SeqTrainer:
    """The trainer, set up and not yet run.

    The data comes first among the parameters: Hamilton computes dependencies in parameter
    order, so bad data is refused before the model is loaded.
    """
    return Seq2SeqTrainer(
        model=peft_model,
        args=training_arguments,
        data_collator=data_collator,
        train_dataset=tokenized_train,
        eval_dataset=tokenized_validation,
        processing_class=tokenizer,
    )


@config.when(start="base")
def fitted_trainer(trainer: Seq2SeqTrainer) -> Seq2SeqTrainer:
    """The trainer after training, holding the best checkpoint's weights (lowest eval_loss)."""
    trainer.train()
    return trainer
