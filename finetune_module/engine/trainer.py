"""The Trainer pieces: batches, the Hugging Face `Seq2SeqTrainer` as we run it, checkpoints,
and the training log.

`fit` trains a model with a `FinetuneTrainer` and returns what training produced as plain data
(`FittedWeights`): the trained weights as safetensors bytes and the trainer's state. The trainer
draws batches of similar input and target length (`batching`), pads each batch to its own
longest example (`DataCollatorForSeq2Seq`, or `PromptAnswerCollator` for decoder-only models),
keeps each batch's activations within a budget (`memory`), computes a sequence-to-sequence loss
without its logits where the speed layer applies (`speedups`), evaluates each epoch and loads
the checkpoint with the lowest validation loss back at the end.
"""

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate.utils import broadcast_object_list
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save as safetensors_bytes
from transformers import (
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
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from finetune_module.engine import speedups, unpadded, workers
from finetune_module.engine.batching import LengthGroupedBatches
from finetune_module.engine.collector import objects_alive_frozen
from finetune_module.engine.distributed import world_size
from finetune_module.engine.files import SETTINGS_FILE, storage_error, take_umask, write_json
from finetune_module.engine.generation import questions_read_in_groups
from finetune_module.engine.memory import ActivationBudget
from finetune_module.engine.settings import TrainingSettings
from finetune_module.engine.tokens import IGNORE_INDEX, TokenizedSet
from finetune_module.errors import SettingsError

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")  # the Trainer's checkpoint folders
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

logger = logging.getLogger(__name__)

#: The share of a training step's loss that the batch going forward in this context holds (1
#: unless the step goes in parts: `FinetuneTrainer.training_step`); a context of its own for
#: each of the threads that share a step
_LOSS_SHARE: contextvars.ContextVar[float] = contextvars.ContextVar(
    "finetune_loss_share", default=1.0
)
# the callbacks that trainers built by `fit` in this context get too (see `trainer_callbacks`)
_EXTRA_CALLBACKS: contextvars.ContextVar[tuple[TrainerCallback, ...]] = contextvars.ContextVar(
    "finetune_trainer_callbacks", default=()
)


@contextlib.contextmanager
def trainer_callbacks(callbacks: Sequence[TrainerCallback]) -> Iterator[None]:
    """A block in which every trainer that `fit` builds also gets `callbacks` (Hugging Face
    `TrainerCallback`s), e.g. a sweep's pruning callback, without the dataflow having an input
    for them. The callbacks are this context's own (a `contextvars` variable): other threads,
    and the code after the block, do not see them."""
    token = _EXTRA_CALLBACKS.set((*_EXTRA_CALLBACKS.get(), *callbacks))
    try:
        yield
    finally:
        _EXTRA_CALLBACKS.reset(token)


def is_complete_checkpoint(path: str) -> bool:
    """Whether a checkpoint folder was written to the end: the Trainer writes its
    trainer_state.json last, after the weights, optimizer, scheduler and RNG states."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(checkpoints_dir: str) -> str | None:
    """The complete `checkpoint-N` folder with the highest N, if any."""
    if not os.path.isdir(checkpoints_dir):
        return None
    steps = {
        int(match.group(1)): os.path.join(checkpoints_dir, name)
        for name in os.listdir(checkpoints_dir)
        if (match := CHECKPOINT_PATTERN.fullmatch(name))
    }
    complete = [step for step, path in steps.items() if is_complete_checkpoint(path)]
    return steps[max(complete)] if complete else None


RUN_RECORD_FILE = "finetune_run.json"  # in each checkpoint: the run that wrote it


def examples_fingerprint(examples: Any) -> str:
    """A fingerprint of tokenized examples (their input ids and labels, in order)."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(examples, TokenizedSet):  # its arrays, as they are
        for lists in (examples.input_ids, examples.labels):
            digest.update(lists.offsets.tobytes())
            digest.update(lists.ids.tobytes())
        return digest.hexdigest()
    for example in examples:
        for key in ("input_ids", "labels"):
            ids = np.asarray(example[key], dtype=np.int64)
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(ids.tobytes())
    return digest.hexdigest()


def run_identity(model: torch.nn.Module, tokenized_train: Any) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it: the base model, the
    adapter's shape (or full fine-tuning) and the training data."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    identity: dict[str, Any] = {"base model": str(base.config.name_or_path)}
    if isinstance(model, PeftModel):
        adapter = model.peft_config[model.active_adapter]
        identity["adapter"] = {
            "r": adapter.r,
            "lora_alpha": adapter.lora_alpha,
            "target_modules": sorted(adapter.target_modules),
        }
    else:
        identity["adapter"] = "none (full fine-tuning)"
    identity["training data"] = examples_fingerprint(tokenized_train)
    return identity


def planned_steps(arguments: TrainingArguments, examples: int, processes: int) -> int:
    """The optimizer steps a run of these arguments takes over `examples` training examples."""
    if arguments.max_steps > 0:
        return arguments.max_steps
    batches = math.ceil(examples / (arguments.per_device_train_batch_size * processes))
    per_epoch = max(math.ceil(batches / arguments.gradient_accumulation_steps), 1)
    return math.ceil(arguments.num_train_epochs * per_epoch)


def check_resumable(checkpoint: str, identity: dict[str, Any], steps: int) -> dict[str, Any]:
    """The record of the run that wrote `checkpoint`, when this run (`identity`, `steps`
    optimizer steps in all) may continue from it; otherwise a SettingsError saying what
    differs: a checkpoint of another base model, adapter shape or data, or one at a step
    beyond this run's last."""
    name = os.path.basename(checkpoint)
    try:
        with open(os.path.join(checkpoint, RUN_RECORD_FILE), encoding="utf-8") as f:
            record = json.load(f)
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
            step = int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SettingsError(
            f"resume_from_checkpoint: {checkpoint} has no readable {RUN_RECORD_FILE}, so it "
            "cannot be checked to fit this run (it was written by another tool or version); "
            "train from the start (resume_from_checkpoint false) or use another output_dir."
        ) from e
    differences = [
        f"{key} {_shown(record.get('identity', {}).get(key))}, not {_shown(value)}"
        for key, value in identity.items()
        if record.get("identity", {}).get(key) != value
    ]
    if differences:
        raise SettingsError(
            f"resume_from_checkpoint: {name} was written by a run with another "
            f"{'; '.join(differences)}. Train from the start (resume_from_checkpoint false) "
            "or use another output_dir."
        )
    if step > steps:
        raise SettingsError(
            f"resume_from_checkpoint: {name} is at step {step}, beyond this run's {steps} "
            "steps: nothing would be trained. Ask for more steps (num_train_epochs, "
            "max_steps) or train from the start."
        )
    return record


def _shown(value: Any) -> str:
    """A record's value in a message (fingerprints shortened)."""
    if isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        return f"(fingerprint {value[:8]})"
    return json.dumps(value) if not isinstance(value, str) else value


def checkpoint_to_resume(resume_from_checkpoint: bool | str, checkpoints_dir: str) -> str | None:
    """The checkpoint training continues from: None for a fresh start, the last complete one
    in `checkpoints_dir` for True, or the given checkpoint folder (checked)."""
    if resume_from_checkpoint is False:
        if last_complete_checkpoint(checkpoints_dir):
            logger.info(
                "Training from the start; %s holds checkpoints of an earlier run "
                "(resume_from_checkpoint=True continues from the last one).",
                checkpoints_dir,
            )
        return None
    if resume_from_checkpoint is True:
        last = last_complete_checkpoint(checkpoints_dir)
        if last is None:
            logger.warning(
                "resume_from_checkpoint: no complete checkpoint in %s; training from the start.",
                checkpoints_dir,
            )
        return last
    path = os.path.abspath(resume_from_checkpoint)
    if not is_complete_checkpoint(path):
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


def scaling_arguments(settings: TrainingSettings, precision: str) -> dict[str, Any]:
    """The training arguments that take a run beyond one process in fp32: mixed precision,
    gradient checkpointing, DeepSpeed or FSDP, and data-parallel (DDP) settings."""
    arguments: dict[str, Any] = {
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        # every LoRA weight takes part in every step: DDP need not search for unused ones
        "ddp_find_unused_parameters": False,
    }
    if settings.gradient_checkpointing:
        arguments["gradient_checkpointing"] = True
        arguments["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if settings.deepspeed is not None:
        arguments["deepspeed"] = settings.deepspeed
    if settings.fsdp:
        arguments["fsdp"] = True
        if settings.fsdp_config is not None:
            arguments["fsdp_config"] = settings.fsdp_config
    return arguments


def seq2seq_collator(
    tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> DataCollatorForSeq2Seq:
    """Turns a list of examples into a batch padded to its own longest example. Labels are
    padded with -100 so that padding is left out of the loss; on a GPU lengths are rounded up
    to a multiple of 8 for tensor cores. The model builds the decoder's inputs from the labels;
    the collator holds no model, so it is plain data to Hamilton's cache."""
    return DataCollatorForSeq2Seq(
        tokenizer,
        label_pad_token_id=IGNORE_INDEX,
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
        labels = torch.full((len(examples), width), IGNORE_INDEX)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths, strict=True)):
            prompt = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"] + example["labels"])
            labels[row, prompt:length] = torch.tensor(example["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TrainingClock(TrainerCallback):
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


class FinetuneTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose `group_by_length` batches group targets by length too, which
    keeps each batch's activations within a budget (when it has one), which computes its
    training and validation losses without logits (when `logit_free_loss` is set), and which
    restores every weight of a fully fine-tuned model from a checkpoint, whatever names the
    model's family saves its weights under."""

    activation_budget: ActivationBudget | None = None
    logit_free_loss: bool = False
    run_identity: dict[str, Any] | None = None  # written into each checkpoint (RUN_RECORD_FILE)
    checkpoint_settings: dict[str, Any] | None = None  # and these, as SETTINGS_FILE
    earlier_loss_sum: float = 0.0  # the training loss summed over the steps before a resume
    worker_threads: int = 1  # threads that share a training step (`workers`)
    # the last model `_unwrapped` was asked about, and it unwrapped
    _last_unwrapped: tuple[torch.nn.Module, torch.nn.Module] | None = None

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """A checkpoint, with the record of this run (`RUN_RECORD_FILE`: what a resume must
        share with it, and the training loss summed so far) and the run's length caps and
        prompt template (`SETTINGS_FILE`, as a best model has them) written first, so that a
        complete checkpoint (trainer_state.json is written last) always has them; its files
        take the process's umask."""
        folder = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        try:
            if self.args.should_save and self.run_identity is not None:
                os.makedirs(folder, exist_ok=True)
                loss_sum = self.earlier_loss_sum + self._total_loss_scalar + float(self._tr_loss)
                record = {
                    "identity": self.run_identity,
                    "global_step": self.state.global_step,
                    "loss_sum": loss_sum,
                }
                write_json(os.path.join(folder, RUN_RECORD_FILE), record)
                if self.checkpoint_settings is not None:
                    write_json(os.path.join(folder, SETTINGS_FILE), self.checkpoint_settings)
            super()._save_checkpoint(model, trial)
            if self.args.should_save and os.path.isdir(folder):
                take_umask(folder)
        except Exception as e:
            refused = storage_error(e, "the checkpoint", folder)
            if refused is None:
                raise
            if self.args.should_save:  # never a half-written checkpoint to resume from
                shutil.rmtree(folder, ignore_errors=True)
            raise refused from e

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's evaluation, after the memory that the training steps freed and the
        allocator kept for them is given back (`speedups.give_back_freed_memory`): evaluation
        allocates other sizes, which would otherwise grow the process past the training's
        peak."""
        speedups.give_back_freed_memory()
        return super().evaluate(*args, **kwargs)

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One step. Under an activation budget, a batch that does not fit it goes forward and
        backward in parts that do (`ActivationBudget.parts`: each part's loss scaled by its
        share of the batch's, the gradients added up, synchronised between processes after the
        last part only), and each part first sets the layers that recompute their activations
        (none, unless one row does not fit). Splitting a batch costs next to nothing where
        recomputing a layer costs its forward pass again. With `worker_threads` (2), the rows
        go forward and backward on two threads at once, each within half the budget
        (`_step_on_workers`), unless a row alone does not fit that."""
        budget = self.activation_budget
        if budget is None or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            if budget is not None:
                budget.before_step(inputs)
            return super().training_step(model, inputs, num_items_in_batch)
        shared = budget.worker_parts(inputs, self.worker_threads)
        if shared is not None:
            return self._step_on_workers(model, shared, num_items_in_batch)
        parts = budget.parts(inputs)
        losses = []
        for index, (part, share) in enumerate(parts):
            budget.before_step(part)
            last = index == len(parts) - 1
            token = _LOSS_SHARE.set(share)
            try:
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    losses.append(super().training_step(model, part, num_items_in_batch))
            finally:
                _LOSS_SHARE.reset(token)
        return torch.stack(losses).sum() if len(losses) > 1 else losses[0]

    def _step_on_workers(
        self,
        model: torch.nn.Module,
        shared: list[list[tuple[dict[str, Any], float]]],
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        """One step whose rows go forward and backward on `worker_threads` threads at once
        (`workers`), each over its parts of the batch (`ActivationBudget.worker_parts`: none
        recomputes activations); each part's loss is scaled by its share of the batch's as in
        `training_step`, and for gradient accumulation as the Trainer scales it. The workers'
        gradients are added to the weights' in the workers' order. Returns the step's loss."""
        model.train()
        self.activation_budget.set([False] * len(self.activation_budget.layers))
        weights = workers.trained_weights(model)
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # as `Trainer.training_step` decides it
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None

        def worker(parts: list[tuple[dict[str, Any], float]]) -> Any:
            loss_sum = None
            grads_sum: list[torch.Tensor | None] = [None] * len(weights)
            for part, share in parts:
                _LOSS_SHARE.set(share)
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(
                        model, self._prepare_inputs(part), num_items_in_batch=num_items_in_batch
                    )
                if not scaled:
                    loss = loss / self.current_gradient_accumulation_steps
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                grads_sum = workers.summed_gradients([grads_sum, grads])
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            return loss_sum, grads_sum

        results = workers.run_at_once([functools.partial(worker, own) for own in shared])
        results = [(loss, grads) for loss, grads in results if loss is not None]
        workers.add_gradients(weights, workers.summed_gradients([g for _, g in results]))
        return torch.stack([loss for loss, _ in results]).sum()

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The loss of the batch `inputs` (see `_batch_loss`); in training, times the batch's
        share of the step's loss when the step goes in parts (this context's `_LOSS_SHARE`).
        A part's loss is its mean token loss before it is scaled: where the Trainer counts the
        step's tokens (`num_items_in_batch`, which a decoder-only model's loss divides its sum
        by, in place of the mean), the part gets that count times its share, so that its
        scaled loss is its sum over the step's count, as the whole batch's would be."""
        share = _LOSS_SHARE.get()
        if share != 1.0 and model.training and num_items_in_batch is not None:
            num_items_in_batch = num_items_in_batch * share
        loss = self._batch_loss(model, inputs, return_outputs, num_items_in_batch)
        if share == 1.0 or not model.training:
            return loss
        return (loss[0] * share, loss[1]) if return_outputs else loss * share

    def _unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` without the wrappers the accelerator may have put around it, as
        `Accelerator.unwrap_model` gives it; kept for the last model asked about, which is
        the same object at every part of every step (unwrapping walks the model's ~900
        modules, ~1.5 ms a part)."""
        last = self._last_unwrapped
        if last is None or last[0] is not model:
            last = self._last_unwrapped = (model, self.accelerator.unwrap_model(model))
        return last[1]

    def _batch_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """With `logit_free_loss`, the loss alone (no outputs) of a model whose output layer
        has no bias of its own (BART's separate logits bias is fine) and is frozen or gets no
        gradient, in fp32 (its products in bf16 under the CPU's bf16; on a GPU not under mixed
        precision), computed without keeping its logits (`speedups.linear_cross_entropy`: the same
        cross-entropy; a decoder-only model's is of each token given those before it, over the
        step's count of tokens where the Trainer gives one, as its own loss is); anything else
        as the Trainer computes it. In training, a model with `unpadded` installed computes
        either loss on the batch's real tokens laid end to end where the batch allows it
        (`unpadded.laid_out_inputs`). Without gradients (evaluation), an encoder-decoder model
        reads the batch's questions in length groups (`generation.questions_read_in_groups`)."""
        base = self._unwrapped(model)
        if not model.training:
            inputs = questions_read_in_groups(base, inputs)
        base = base.get_base_model() if isinstance(base, PeftModel) else base
        head = speedups.output_layer(base) if isinstance(base, PreTrainedModel) else None
        seq2seq = isinstance(base, PreTrainedModel) and base.config.is_encoder_decoder
        laid = None
        if model.training and not return_outputs and unpadded.installed(base):
            laid = unpadded.laid_out_inputs(base, inputs)
        if laid is not None:  # the batch's real tokens laid end to end: `unpadded`
            inputs, layout = laid
            within: Any = functools.partial(unpadded.laid_out, layout)
        else:
            within = contextlib.nullcontext
        if (
            not self.logit_free_loss
            or return_outputs
            or "labels" not in inputs
            or type(head) is not torch.nn.Linear
            or head.bias is not None
            or (head.weight.requires_grad and torch.is_grad_enabled())
            or (seq2seq and not hasattr(base, "prepare_decoder_input_ids_from_labels"))  # NLLB
            or getattr(base.config, "final_logit_softcapping", None) is not None  # tanh cap
            or (self.args.bf16 and self.args.device.type != "cpu")
            or self.args.fp16
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
        ):
            with within():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        divisor = None
        if not seq2seq:  # each position's target is the next token
            labels, divisor = speedups.next_token_labels(labels), num_items_in_batch
        elif laid is None:  # laid out, the decoder's inputs are shifted within each text
            forward["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
        with within(), speedups.output_layer_off(base) as (_, bias):
            hidden = model(**forward).logits  # the last hidden states, as the head gets them
        # fp32 states (as the Trainer's model returns its outputs under autocast too); under
        # the CPU's bf16 the loss's products (the output layer's) in bf16, as autocast's are
        hidden = hidden.to(head.weight.dtype)
        bf16 = self.args.bf16  # (only the CPU's gets here)
        return speedups.linear_cross_entropy(hidden, head.weight, labels, bias, divisor, bf16)

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """An evaluation batch's loss, logits and labels, as `Seq2SeqTrainer` predicts them;
        where only the loss is wanted (a validation loss) and `logit_free_loss` is set, the
        loss as `_batch_loss` computes it, without the logits that the Trainer would compute
        and drop (for a decoder-only model, a batch's every position's, prompts' included)."""
        if not (prediction_loss_only and self.logit_free_loss and "labels" in inputs):
            return super().prediction_step(
                model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs
            )
        inputs = self._prepare_inputs(inputs)
        items = self._get_num_items_in_batch([inputs], self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=items)
        return loss.detach().mean(), None, None

    def _restore_every_weight(self, checkpoint: str) -> bool:
        """Loads a full model's weights from `checkpoint` as `from_pretrained` reads them, every
        weight or an error; returns False (leaving it to the Trainer) for an adapter, a
        sharded (FSDP, DeepSpeed) model or a checkpoint without safetensors weights.

        The Trainer itself loads the checkpoint's tensors by the names they are saved under,
        skipping names the model does not have: a family whose saved names differ from its
        module names (GPT-NeoX saves its output layer as `embed_out`) would keep some weights
        of the last step instead of the checkpoint's."""
        model = self.accelerator.unwrap_model(self.model)
        if (
            isinstance(model, PeftModel)
            or not isinstance(model, PreTrainedModel)
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
            or not any(
                os.path.isfile(os.path.join(checkpoint, name))
                for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
            )
        ):
            return False
        saved = type(model).from_pretrained(checkpoint, dtype=model.dtype, use_safetensors=True)
        model.load_state_dict(saved.state_dict(), strict=True)
        return True

    def _load_best_model(self) -> None:
        """The best checkpoint's weights, every one of them (see `_restore_every_weight`)."""
        if not self._restore_every_weight(self.state.best_model_checkpoint):
            super()._load_best_model()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """A resumed run's weights, every one of them (see `_restore_every_weight`)."""
        if model is not None or not self._restore_every_weight(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        """`LengthGroupedBatches` for `train_sampling_strategy="group_by_length"` (the default
        here): a sequence-to-sequence batch groups by input and target length, a decoder-only
        one by the length of prompt and answer together."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(
            dataset, TokenizedSet | list
        ):
            return super()._get_train_sampler(train_dataset)
        if isinstance(dataset, list):
            dataset = TokenizedSet.from_examples(dataset)
        sources, targets = dataset.input_ids.lengths(), dataset.labels.lengths()
        if not self.model.config.is_encoder_decoder:  # one sequence: prompt and answer
            sources, targets = sources + targets, np.zeros_like(targets)
        return LengthGroupedBatches(sources, targets, self.args.train_batch_size)


@dataclasses.dataclass(frozen=True)
class FittedWeights:
    """What training produced, as plain data that Hamilton's cache can store and fingerprint."""

    weights: bytes  # the trained weights (LoRA adapter, or every weight) in safetensors format
    trainer_state: TrainerState  # log history, global step, best metric and checkpoint


def fit(
    model: torch.nn.Module,
    tokenized_train: TokenizedSet | list[dict[str, list[int]]],
    tokenized_validation: TokenizedSet | list[dict[str, list[int]]],
    training_arguments: Seq2SeqTrainingArguments,
    data_collator: Callable,
    tokenizer: PreTrainedTokenizerBase,
    *,
    activation_memory_gb: float | None = None,
    logit_free_loss: bool = False,
    worker_threads: bool = False,
    checkpoint_settings: dict[str, Any] | None = None,
) -> FittedWeights:
    """Trains the model with a `FinetuneTrainer` (continuing from
    `training_arguments.resume_from_checkpoint` when that is set; the best checkpoint is loaded
    back at the end) and returns its trained weights, gathered and shared with every process.
    Unless every layer recomputes its activations already (gradient_checkpointing), a batch
    keeps at most about `activation_memory_gb` of them (None: no limit). Each checkpoint holds
    `checkpoint_settings` (length caps, prompt template) as its finetune_settings.json. With
    `worker_threads`, a budgeted fp32 or bf16 run of an adapter in one process on a CPU shares
    each step between threads (`workers`). The trainer also gets the callbacks of an enclosing
    `trainer_callbacks` block."""
    # the Trainer, its training and the gathered weights make objects by the thousand
    with objects_alive_frozen():
        trainer = FinetuneTrainer(
            model=model,
            args=training_arguments,
            data_collator=data_collator,
            train_dataset=tokenized_train,
            eval_dataset=tokenized_validation,
            processing_class=tokenizer,
            callbacks=[TrainingClock(), *_EXTRA_CALLBACKS.get()],
        )
        # Seq2seq models (T5, BART) average their loss over their own batch and ignore the
        # Trainer's token count, so the Trainer must average over accumulation steps and processes
        # itself; otherwise gradients and logged losses grow with both. (Decoder-only models are
        # averaged the same way then: per batch, over accumulation steps and processes.)
        trainer.model_accepts_loss_kwargs = False
        trainer.logit_free_loss = logit_free_loss
        if activation_memory_gb is not None and not training_arguments.gradient_checkpointing:
            try:
                trainer.activation_budget = ActivationBudget(model, activation_memory_gb)
            except ValueError as e:  # a model without gradient checkpointing trains unbudgeted
                logger.info("activation_memory_gb does not apply: %s", e)
        if (
            worker_threads
            and trainer.activation_budget is not None
            and world_size() == 1
            and not training_arguments.fp16
            and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
            and workers.few_weights_train(model)
        ):
            trainer.worker_threads = workers.worker_count(training_arguments.device)
        if training_arguments.disable_tqdm:  # quiet: no bar, and no log lines printed instead
            trainer.remove_callback(PrinterCallback)
        trainer.run_identity = run_identity(model, tokenized_train)
        trainer.checkpoint_settings = checkpoint_settings
        resumed = training_arguments.resume_from_checkpoint
        record = None
        if resumed:
            steps = planned_steps(training_arguments, len(tokenized_train), world_size())
            record = check_resumable(resumed, trainer.run_identity, steps)
            trainer.earlier_loss_sum = float(record["loss_sum"])
        trainer.train(resume_from_checkpoint=resumed)
        speedups.give_back_freed_memory()  # what comes next (answers) allocates other sizes
        if record is not None:  # the Trainer's train_loss covers the steps after the resume only
            _whole_run_loss(trainer.state, record)
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


def _whole_run_loss(state: TrainerState, record: dict[str, Any]) -> None:
    """Makes the end-of-training `train_loss` of a resumed run the mean over all its steps:
    the loss summed before the resume (from the checkpoint's record) and the steps since."""
    summary = next((e for e in reversed(state.log_history) if "train_loss" in e), None)
    if summary is None or state.global_step <= 0:
        return
    since = state.global_step - int(record["global_step"])
    summary["train_loss"] = (float(record["loss_sum"]) + summary["train_loss"] * since) / (
        state.global_step
    )


def log_table(log_history: list[dict[str, Any]]) -> pd.DataFrame:
    """The trainer's log entries as a table, one row per logging step or evaluation; the
    end-of-training summary (train_runtime, ...) is left to the metrics."""
    rows = [entry for entry in log_history if "train_runtime" not in entry]
    table = pd.DataFrame(rows)
    others = sorted(set(table.columns) - set(TRAINING_LOG_COLUMNS))
    return table.reindex(columns=[*TRAINING_LOG_COLUMNS, *others])


def best_checkpoint_eval_loss(state: TrainerState) -> float | None:
    """The validation loss the Trainer measured for the checkpoint it loaded back as the best:
    the `eval_loss` logged at that checkpoint's step; None when the log has none."""
    step = (state.best_model_checkpoint or "").rsplit("-", 1)[-1]
    if not step.isdigit():
        return None
    for entry in reversed(state.log_history):
        if entry.get("step") == int(step) and "eval_loss" in entry:
            return float(entry["eval_loss"])
    return None


def training_summary(state: TrainerState, world_size: int) -> dict[str, Any]:
    """The trainer's own end-of-training figures (loss, runtime, throughput, best checkpoint)."""
    summary: dict[str, Any] = {}
    for entry in state.log_history:
        if "train_runtime" in entry:
            summary.update({k: v for k, v in entry.items() if k != "step"})
    summary["global_step"] = state.global_step
    summary["world_size"] = world_size
    summary["best_eval_loss"] = state.best_metric
    summary["best_model_checkpoint"] = state.best_model_checkpoint
    return summary
