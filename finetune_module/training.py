"""Training stage (start=base): training arguments, collator, the fitted weights, and the
training log (with start=presaved: the log saved with the model, if any).

The Hugging Face `Seq2SeqTrainer` does the training loop (`finetune_module.engine.trainer`).
Batches are drawn grouped by length and padded per batch, the model is evaluated on the
validation set each epoch, and the checkpoint with the lowest validation loss is loaded back at
the end. What training yields is plain data, the trained weights and the trainer's state, so
that Hamilton's cache can keep it and a re-run with the same data, model and training settings
skips training.
"""

import json
import math
import os
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from hamilton.function_modifiers import config
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Seq2SeqTrainingArguments

from finetune_module.engine import memory
from finetune_module.engine.distributed import world_size
from finetune_module.engine.files import CHECKPOINTS_DIR, RunLock
from finetune_module.engine.models import ModelRecipe, build_model
from finetune_module.engine.quiet import quiet_libraries
from finetune_module.engine.records import DEFAULT_PROMPT_TEMPLATE
from finetune_module.engine.settings import TrainingSettings
from finetune_module.engine.tokens import TokenizedSet
from finetune_module.engine.trainer import (
    TRAINING_LOG_FILE,
    FittedWeights,
    PromptAnswerCollator,
    checkpoint_to_resume,
    fit,
    log_table,
    scaling_arguments,
    seq2seq_collator,
)
from finetune_module.errors import SettingsError

_KNOWN_ARGUMENTS = frozenset(Seq2SeqTrainingArguments.__dataclass_fields__)


@config.when(start="base")
def training_arguments(
    train_set: pd.DataFrame,
    device: torch.device,
    run_dir: str,
    training_settings: TrainingSettings,
    model_recipe: ModelRecipe,
    show_progress: bool,
) -> Seq2SeqTrainingArguments:
    """The Hugging Face training arguments of the run: the training settings, evaluation and a
    checkpoint (in `<run_dir>/checkpoints`) each epoch, the best checkpoint by validation loss
    loaded back at the end, length-grouped batches, and the model's precision; any
    extra_training_args override these.

    Several processes come from the launcher (`torchrun`, `accelerate launch`), not from here:
    the Trainer reads their layout from the environment.

    :param train_set: the training set (its size sets the logging and evaluation steps).
    :param model_recipe: the model's precision (bf16, fp16 or fp32).
    """
    settings = training_settings
    checkpoints_dir = os.path.join(run_dir, CHECKPOINTS_DIR)
    batch = settings.per_device_train_batch_size * settings.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_set) / (batch * world_size()))
    per_epoch = settings.max_steps <= 0 or settings.max_steps >= steps_per_epoch
    arguments: dict[str, Any] = {
        "output_dir": checkpoints_dir,
        "num_train_epochs": settings.num_train_epochs,
        "max_steps": settings.max_steps,
        "per_device_train_batch_size": settings.per_device_train_batch_size,
        "per_device_eval_batch_size": settings.per_device_eval_batch_size,
        "learning_rate": settings.learning_rate,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "seed": settings.seed,
        "resume_from_checkpoint": checkpoint_to_resume(
            settings.resume_from_checkpoint, checkpoints_dir
        ),
        # evaluate and save each epoch (or once at the end of a run shorter than an epoch)
        "eval_strategy": "epoch" if per_epoch else "steps",
        "save_strategy": "epoch" if per_epoch else "steps",
        "eval_steps": None if per_epoch else settings.max_steps,
        "save_steps": None if per_epoch else settings.max_steps,
        "logging_strategy": "steps",
        "logging_steps": max(1, steps_per_epoch // 5),
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "prediction_loss_only": True,  # evaluation needs the loss only: keep no logits
        "greater_is_better": False,
        "save_total_limit": 2,
        "train_sampling_strategy": "group_by_length",
        "report_to": list(settings.report_to),
        "use_cpu": device.type == "cpu",
        **scaling_arguments(settings, model_recipe.precision),
        "disable_tqdm": not show_progress,
        **settings.extra_training_args,
    }
    unknown = sorted(set(arguments) - _KNOWN_ARGUMENTS)
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
    tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> DataCollatorForSeq2Seq:
    """Turns a list of examples into a batch padded to its own longest example, the labels'
    padding left out of the loss; the model builds the decoder's inputs from the labels."""
    return seq2seq_collator(tokenizer, device)


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
def fitted_weights(
    tokenized_train: TokenizedSet,
    tokenized_validation: TokenizedSet,
    data_collator: Callable,
    training_arguments: Seq2SeqTrainingArguments,
    training_settings: TrainingSettings,
    model_recipe: ModelRecipe,
    tokenizer: PreTrainedTokenizerBase,
    show_progress: bool,
    source_length_cap: int,
    target_length_cap: int,
    run_lock: RunLock,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> FittedWeights:
    """The trained weights (the LoRA adapter's, or every weight in a full fine-tune) of the
    checkpoint with the lowest validation loss, and the trainer's state.

    The model is built from the recipe and the `Seq2SeqTrainer` runs inside this node, which
    returns plain data: with Hamilton's caching on, a re-run with the same data, model and
    training settings takes the weights from the cache instead of training again. Where the
    recipe has the `activation_budget` speed-up, a batch keeps at most about
    activation_memory_gb of activations; with `logit_free_loss`, the training and validation
    losses keep no logits; with `worker_threads`, steps on a CPU are shared between threads. Each
    checkpoint holds the length caps and prompt template with its weights, so that `predict`
    and `export_merged` use them on a checkpoint too. (Every setting is checked before this
    runs, as everything depends on the settings stage; the data comes first among the
    parameters only so that a bad data file is reported before the model is looked up.)

    :param show_progress: False: the libraries print no bars or warnings of their own.
    :param prompt_template: the prompt the model is trained with (see `prompt_texts`).
    :param run_lock: held while checkpoints are written into the run's directory (taken
        last, after every other input is checked).
    """
    with quiet_libraries(not show_progress), run_lock.released_on_failure():
        model = build_model(
            model_recipe,
            training_arguments.device,  # this process's device, as the Trainer sees it
            trainable=True,
            seed=training_settings.seed,
            gradient_checkpointing=training_settings.gradient_checkpointing,
        )
        budget = None
        if "activation_budget" in model_recipe.speedups:
            budget = memory.budget_gb(training_settings.activation_memory_gb, model)
        return fit(
            model,
            tokenized_train,
            tokenized_validation,
            training_arguments,
            data_collator,
            tokenizer,
            activation_memory_gb=budget,
            logit_free_loss="logit_free_loss" in model_recipe.speedups,
            worker_threads="worker_threads" in model_recipe.speedups,
            checkpoint_settings={
                "source_length_cap": source_length_cap,
                "target_length_cap": target_length_cap,
                "max_new_tokens": target_length_cap,
                "prompt_template": prompt_template,
            },
        )


@config.when(start="base")
def training_log__base(fitted_weights: FittedWeights) -> pd.DataFrame:
    """The training log: one row per logging step (loss, learning_rate, grad_norm) and per
    evaluation (eval_loss, eval_runtime, ...), each with its step, epoch and elapsed_seconds
    since training began. Saved as `training_log.csv` with the best model."""
    return log_table(fitted_weights.trainer_state.log_history)


@config.when(start="presaved")
def training_log__presaved(presaved_model_dir: str) -> pd.DataFrame:
    """The training log saved with the fine-tune: its `training_log.csv`, else the log of a
    Trainer checkpoint's `trainer_state.json`, else an empty table (nothing was logged)."""
    saved_log = os.path.join(presaved_model_dir, TRAINING_LOG_FILE)
    if os.path.isfile(saved_log):
        return log_table(pd.read_csv(saved_log).to_dict("records"))
    state_file = os.path.join(presaved_model_dir, "trainer_state.json")
    if os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as f:
            return log_table(json.load(f).get("log_history", []))
    return log_table([])
