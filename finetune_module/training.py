"""Training stage (start=base): training arguments, collator, the fitted weights, and the
training log (with start=presaved: the log saved with the model, if any).

The Hugging Face `Seq2SeqTrainer` does the training loop. Batches are drawn grouped by length
and padded per batch, the model is evaluated on the validation set each epoch, and the
checkpoint with the lowest validation loss is loaded back at the end. What training yields is
plain data, the trained weights and the trainer's state, so that Hamilton's cache can keep it
and a re-run with the same data, model and training settings skips training.
"""

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from accelerate.utils import broadcast_object_list
from hamilton.function_modifiers import config
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import save as safetensors_bytes
from transformers import (
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME

from finetune_module import speedups
from finetune_module.batching import LengthGroupedBatches
from finetune_module.distributed import world_size
from finetune_module.errors import SettingsError, require_package
from finetune_module.loading import DEFAULT_MODEL_ID
from finetune_module.memory import (
    DEFAULT_ACTIVATION_MEMORY_GB,
    ActivationBudget,
    activation_budget,
)
from finetune_module.model import (
    DEFAULT_OUTPUT_DIR,
    LanguageModel,
    _fully_trainable,
    _load_model,
    _trainable_adapter,
)

LABEL_PAD_TOKEN_ID = speedups.IGNORE_INDEX  # label positions left out of the loss
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")  # the Trainer's checkpoint folders

logger = logging.getLogger(__name__)

TRAINING_LOG_FILE = "training_log.csv"  # saved with the best model
#: The training log's first columns; any other logged figures follow in name order.
TRAINING_LOG_COLUMNS = (
    "step",
    "epoch",
    "elapsed_seconds",
    "loss",
    "eval_loss",
    "learning_rate",
    "grad_norm",
)


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
    quiet: bool = False,
) -> Seq2SeqTrainingArguments:
    """The Hugging Face training arguments of the run.

    :param train_set: the training set (its size sets the logging and evaluation steps).
    :param device: where training runs.
    :param scaling_arguments: precision, memory and multi-process settings.
    :param generation_settings: how answers are generated: taken here so that bad generation
        settings are refused before training starts (they are not part of the arguments, so
        that a cached re-run with other generation settings does not train again).
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
    :param quiet: no progress bars (training and generation).
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
        # evaluate and save each epoch (or once at the end of a run shorter than an epoch)
        "eval_strategy": "epoch" if per_epoch else "steps",
        "save_strategy": "epoch" if per_epoch else "steps",
        "eval_steps": None if per_epoch else max_steps,
        "save_steps": None if per_epoch else max_steps,
        "logging_strategy": "steps",
        "logging_steps": max(1, steps_per_epoch // 5),
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "prediction_loss_only": True,  # evaluation needs the loss only: keep no logits
        "greater_is_better": False,
        "save_total_limit": 2,
        "train_sampling_strategy": "group_by_length",
        "report_to": "none",
        "use_cpu": device.type == "cpu",
        **scaling_arguments,
        "disable_tqdm": quiet,
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
    tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> DataCollatorForSeq2Seq:
    """Turns a list of examples into a batch padded to its own longest example.

    Labels are padded with -100 so that padding is left out of the loss; on a GPU lengths are
    rounded up to a multiple of 8 for tensor cores. The model builds the decoder's inputs from
    the labels; the collator holds no model, so it is plain data to Hamilton's cache.
    """
    return DataCollatorForSeq2Seq(
        tokenizer,
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


class _TrainingClock(TrainerCallback):
    """Stamps each entry of the trainer's log with the seconds since training began (a resumed
    run carries on from the time its checkpoint's log reached)."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        earlier = [e["elapsed_seconds"] for e in state.log_history if "elapsed_seconds" in e]
        self.began = time.perf_counter() - (earlier[-1] if earlier else 0.0)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # the trainer appends the entry to state.log_history before it calls on_log; the
        # end-of-training summary has its own train_runtime
        entry = state.log_history[-1]
        if "train_runtime" not in entry:
            entry["elapsed_seconds"] = round(time.perf_counter() - self.began, 3)


class _Trainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose `group_by_length` batches group targets by length too, and
    which keeps each batch's activations within a budget (when it has one)."""

    activation_budget: ActivationBudget | None = None

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One step; first, the layers that recompute their activations for this batch."""
        if self.activation_budget is not None:
            self.activation_budget.before_step(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The training loss of a sequence-to-sequence model with a frozen output layer, in
        fp32, computed without keeping its logits (`speedups.linear_cross_entropy`: the same
        mean cross-entropy); anything else as the Trainer computes it."""
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if isinstance(base, PeftModel) else base
        head = base.get_output_embeddings() if isinstance(base, PreTrainedModel) else None
        if (
            return_outputs
            or not model.training
            or "labels" not in inputs
            or type(head) is not torch.nn.Linear
            or head.bias is not None
            or head.weight.requires_grad
            or not base.config.is_encoder_decoder
            or self.args.bf16
            or self.args.fp16
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        forward["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
        with speedups.output_layer_off(base):
            hidden = model(**forward).logits  # the last hidden states, as the head gets them
        return speedups.linear_cross_entropy(hidden, head.weight, labels)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        """`LengthGroupedBatches` for `train_sampling_strategy="group_by_length"` (the default
        here): a sequence-to-sequence batch groups by input and target length, a decoder-only
        one by the length of prompt and answer together."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, list):
            return super()._get_train_sampler(train_dataset)
        sources = [len(e["input_ids"]) for e in dataset]
        targets = [len(e["labels"]) for e in dataset]
        if not self.model.config.is_encoder_decoder:  # one sequence: prompt and answer
            sources, targets = (
                [s + t for s, t in zip(sources, targets, strict=True)],
                [0] * len(sources),
            )
        return LengthGroupedBatches(sources, targets, self.args.train_batch_size)


@dataclasses.dataclass(frozen=True)
class FittedWeights:
    """What training produced, as plain data that Hamilton's cache can store and fingerprint."""

    weights: bytes  # the trained weights (LoRA adapter, or every weight) in safetensors format
    trainer_state: TrainerState  # log history, global step, best metric and checkpoint


def _fit(
    model: LanguageModel,
    tokenized_train: list[dict[str, list[int]]],
    tokenized_validation: list[dict[str, list[int]]],
    training_arguments: Seq2SeqTrainingArguments,
    data_collator: Callable,
    tokenizer: PreTrainedTokenizerBase,
    activation_memory_gb: float | None,
) -> FittedWeights:
    """Trains the model with a Seq2SeqTrainer (continuing from
    `training_arguments.resume_from_checkpoint` when that is set; the best checkpoint is loaded
    back at the end) and returns its trained weights, gathered and shared with every process.
    Unless every layer recomputes its activations already (gradient_checkpointing), a batch
    keeps at most about `activation_memory_gb` of them (None: no limit)."""
    trainer = _Trainer(
        model=model,
        args=training_arguments,
        data_collator=data_collator,
        train_dataset=tokenized_train,
        eval_dataset=tokenized_validation,
        processing_class=tokenizer,
        callbacks=[_TrainingClock()],
    )
    # Seq2seq models (T5, BART) average their loss over their own batch and ignore the
    # Trainer's token count, so the Trainer must average over accumulation steps and processes
    # itself; otherwise gradients and logged losses grow with both. (Decoder-only models are
    # averaged the same way then: per batch, over accumulation steps and processes.)
    trainer.model_accepts_loss_kwargs = False
    if activation_memory_gb is not None and not training_arguments.gradient_checkpointing:
        try:
            trainer.activation_budget = ActivationBudget(model, activation_memory_gb)
        except ValueError as e:  # a model without gradient checkpointing trains unbudgeted
            logger.info("activation_memory_gb does not apply: %s", e)
    if training_arguments.disable_tqdm:  # quiet: no bar, and no log lines printed instead
        trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=training_arguments.resume_from_checkpoint)
    # gathered by every process: under FSDP or ZeRO-3 each one holds only a shard of the weights
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if isinstance(trainer.model, PeftModel):
        state_dict = get_peft_model_state_dict(trainer.model, state_dict=state_dict)
    # copies on the CPU (tied weights become separate tensors, as safetensors wants)
    weights = {name: tensor.detach().cpu().clone() for name, tensor in state_dict.items()}
    payload = [safetensors_bytes(weights)]
    if world_size() > 1:  # the gathered weights may live on the main process only: share them
        broadcast_object_list(payload, from_process=0)
    return FittedWeights(weights=payload[0], trainer_state=trainer.state)


@config.when(start="base")
@config.when_not(use_lora=False)
def fitted_weights__lora(
    tokenized_train: list[dict[str, list[int]]],
    tokenized_validation: list[dict[str, list[int]]],
    training_arguments: Seq2SeqTrainingArguments,
    data_collator: Callable,
    tokenizer: PreTrainedTokenizerBase,
    auto_model_class: type,
    lora_config: LoraConfig,
    quantization_config: BitsAndBytesConfig | None,
    model_id: str = DEFAULT_MODEL_ID,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    seed: int = 42,
    init_adapter_path: str | None = None,
    activation_memory_gb: float | int | None = DEFAULT_ACTIVATION_MEMORY_GB,
) -> FittedWeights:
    """The trained LoRA adapter: the weights of the checkpoint with the lowest validation loss,
    and the trainer's state.

    The base model, the adapter and the `Seq2SeqTrainer` live only inside this node, and it
    returns plain data: with Hamilton's caching on, a re-run with the same data, model and
    training settings takes the weights from the cache instead of training again. The data and
    then the training arguments come first among the parameters: Hamilton computes dependencies
    in parameter order, so bad data and bad settings are refused before the model is loaded (and
    DeepSpeed ZeRO-3 is configured before the model exists, as it must be).

    :param auto_model_class: the transformers class that loads the base model.
    :param quantization_config: how to quantize the base model (QLoRA), or None for fp32.
    :param model_id: the base model (hub id or local directory).
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    :param gradient_checkpointing: recompute activations in the backward pass to save memory.
    :param seed: seed of the adapter's random initialisation (and of training).
    :param init_adapter_path: a saved adapter to continue training instead of a fresh LoRA.
    :param activation_memory_gb: about how much memory (GB) a training batch may keep for its
        backward pass; a longer batch recomputes just enough layers' activations to stay
        within it (gradient checkpointing for those layers and that batch only). None: no
        limit (fastest, most memory).
    """
    budget = activation_budget(activation_memory_gb)
    base = _load_model(
        auto_model_class, model_id, training_arguments.device, trust_remote_code,
        quantization_config,
    )  # fmt: skip
    model = _trainable_adapter(
        base, lora_config, quantization_config, gradient_checkpointing, seed, init_adapter_path
    )
    return _fit(
        model, tokenized_train, tokenized_validation, training_arguments, data_collator,
        tokenizer, budget,
    )  # fmt: skip


@config.when(start="base", use_lora=False)
def fitted_weights__full(
    tokenized_train: list[dict[str, list[int]]],
    tokenized_validation: list[dict[str, list[int]]],
    training_arguments: Seq2SeqTrainingArguments,
    data_collator: Callable,
    tokenizer: PreTrainedTokenizerBase,
    auto_model_class: type,
    quantization_config: BitsAndBytesConfig | None,
    model_id: str = DEFAULT_MODEL_ID,
    trust_remote_code: bool = False,
    activation_memory_gb: float | int | None = DEFAULT_ACTIVATION_MEMORY_GB,
) -> FittedWeights:
    """With `{"use_lora": False}`: every weight of the fine-tuned model (from the checkpoint
    with the lowest validation loss), and the trainer's state. As for the LoRA variant, the
    model and the trainer live only inside this node, so that the cache can keep the result.

    :param auto_model_class: the transformers class that loads the base model.
    :param quantization_config: must be None: a quantized base model trains through LoRA only.
    :param model_id: the base model (hub id or local directory).
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    :param activation_memory_gb: about how much memory (GB) a training batch may keep for its
        backward pass (see the LoRA variant). None: no limit.
    """
    budget = activation_budget(activation_memory_gb)
    base = _load_model(
        auto_model_class, model_id, training_arguments.device, trust_remote_code,
        quantization_config,
    )  # fmt: skip
    model = _fully_trainable(base, quantization_config)
    return _fit(
        model, tokenized_train, tokenized_validation, training_arguments, data_collator,
        tokenizer, budget,
    )  # fmt: skip


def _log_table(log_history: list[dict[str, Any]]) -> pd.DataFrame:
    """The trainer's log entries as a table, one row per logging step or evaluation; the
    end-of-training summary (train_runtime, ...) is left to the metrics."""
    rows = [entry for entry in log_history if "train_runtime" not in entry]
    table = pd.DataFrame(rows)
    others = sorted(set(table.columns) - set(TRAINING_LOG_COLUMNS))
    return table.reindex(columns=[*TRAINING_LOG_COLUMNS, *others])


@config.when(start="base")
def training_log__base(fitted_weights: FittedWeights) -> pd.DataFrame:
    """The training log: one row per logging step (loss, learning_rate, grad_norm) and per
    evaluation (eval_loss, eval_runtime, ...), each with its step, epoch and elapsed_seconds
    since training began. Saved as `training_log.csv` with the best model."""
    return _log_table(fitted_weights.trainer_state.log_history)


@config.when(start="presaved")
def training_log__presaved(presaved_model_dir: str) -> pd.DataFrame:
    """The training log saved with the fine-tune: its `training_log.csv`, else the log of a
    Trainer checkpoint's `trainer_state.json`, else an empty table (nothing was logged).

    :param presaved_model_dir: the directory of the saved fine-tune.
    """
    saved_log = os.path.join(presaved_model_dir, TRAINING_LOG_FILE)
    if os.path.isfile(saved_log):
        return _log_table(pd.read_csv(saved_log).to_dict("records"))
    state_file = os.path.join(presaved_model_dir, "trainer_state.json")
    if os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as f:
            return _log_table(json.load(f).get("log_history", []))
    return _log_table([])
