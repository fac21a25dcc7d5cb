"""Evaluation stage: batched greedy generation, ROUGE, validation loss, hold-out predictions,
and the same sets answered by the base model for comparison.

Generation is deterministic by default (greedy; beam search with `num_beams > 1`), runs in
batches of similar length with the KV cache, and stops at the data-derived target length.
ROUGE is computed with the `rouge-score` package (no download needed). When the targets are
class labels, accuracy and macro-F1 (scikit-learn) are reported too. Under a multi-process
launcher the batches are shared out between the processes and the results gathered, so every
process holds the same predictions and metrics as a single-process run. The base model's answers
come from the same model object with the adapter switched off (no second copy of the weights).
"""

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from hamilton.function_modifiers import cache, config, extract_fields, parameterize, source
from hamilton.function_modifiers import value as fixed
from peft import PeftModel, set_peft_model_state_dict
from rouge_score import rouge_scorer
from safetensors.torch import load as load_safetensors_bytes
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as _confusion_matrix
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, Seq2SeqTrainingArguments, TrainerState

from finetune_module.distributed import (
    gathered,
    is_main_process,
    this_process_share,
    weights_sharded,
)
from finetune_module.errors import SettingsError
from finetune_module.model import LanguageModel
from finetune_module.training import FittedWeights

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TASKS = ("auto", "classification", "generation")  # values of the input "task"
MAX_AUTO_LABELS = 20  # task="auto": at most this many distinct targets, each seen twice or more
OTHER_LABEL = "(other)"  # confusion-matrix column of predictions outside the label set


@cache(behavior="disable")
@config.when(start="base")
def evaluation_model__base(
    fitted_weights: FittedWeights, trainable_model: LanguageModel
) -> LanguageModel:
    """The fine-tuned model to evaluate: the trained weights (the best checkpoint's) loaded into
    the model as it was before training (the fresh adapter, or the base model), in eval mode."""
    weights = load_safetensors_bytes(fitted_weights.weights)
    if isinstance(trainable_model, PeftModel):
        set_peft_model_state_dict(trainable_model, weights)
    else:
        trainable_model.load_state_dict(weights)
    return trainable_model.eval()


@cache(behavior="disable")
@config.when(start="presaved")
def evaluation_model__presaved(presaved_model: LanguageModel) -> LanguageModel:
    """The fine-tuned model to evaluate: the saved fine-tune, in eval mode."""
    return presaved_model.eval()


def _model_device(model: torch.nn.Module) -> torch.device:
    """The device the model's weights are on."""
    return next(model.parameters()).device


def _generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, list[int]]],
    max_new_tokens: int,
    num_beams: int,
    batch_size: int,
    desc: str = "answering",
    quiet: bool = True,
) -> list[str]:
    """The model's decoded answers to the examples' `input_ids`, in the examples' order.

    Examples are sorted by length so that each batch pads little, then put back in order. With
    several processes each answers its share of the same batches, so the answers do not depend
    on how many processes there are. A decoder-only model's prompts are padded on the left, so
    that its answer follows on. A progress bar named `desc` counts the answers (the main
    process's share) unless `quiet`.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    answered: list[tuple[int, str]] = []
    device, sharded = _model_device(model), weights_sharded(model)
    decoder_only = not model.config.is_encoder_decoder
    share = this_process_share(batches, model)
    progress = tqdm(
        total=sum(map(len, share)),
        desc=desc,
        unit="answer",
        disable=quiet or not is_main_process(),
    )
    with torch.inference_mode(), progress:
        for indices in share:
            batch = tokenizer.pad(
                {"input_ids": [examples[i]["input_ids"] for i in indices]},
                padding_side="left" if decoder_only else None,
                return_tensors="pt",
            ).to(device)
            generated = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                use_cache=True,
                synced_gpus=sharded,  # sharded weights: run in step until every process is done
                pad_token_id=tokenizer.pad_token_id,
            )
            if decoder_only:  # the output starts with the prompt
                generated = generated[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            answered.extend((i, text.strip()) for i, text in zip(indices, texts, strict=True))
            progress.update(len(indices))
    answers = [""] * len(examples)
    for i, text in gathered(answered, model):
        answers[i] = text
    return answers


def generation_settings(
    target_length_cap: int,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    generation_batch_size: int = 32,
) -> dict[str, int]:
    """How answers are generated: beams (1 = greedy), the length bound and the batch size.

    :param target_length_cap: the data-derived target length; the default length bound.
    :param num_beams: 1 for greedy decoding, more for beam search.
    :param max_new_tokens: the most tokens an answer may have (default: target_length_cap).
    :param generation_batch_size: questions answered at once.
    """
    given = {
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "generation_batch_size": generation_batch_size,
    }
    for name, value in given.items():
        if value is not None and value < 1:
            raise SettingsError(f"{name} must be at least 1, got {value}.")
    return {
        "num_beams": num_beams,
        "max_new_tokens": target_length_cap if max_new_tokens is None else max_new_tokens,
        "batch_size": generation_batch_size,
    }


def _answers_by_set(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    validation: list[dict[str, list[int]]],
    hold_out: list[dict[str, list[int]]],
    generation_settings: dict[str, int],
    who: str,
    quiet: bool,
) -> dict[str, list[str]]:
    """The answers of the model (called `who` on its progress bar) to the validation and the
    hold-out questions, by set, generated in one pass over both: decoding is bound by reading
    the weights, so a batch of 20 answers costs about what a batch of 4 does, and the small
    hold-out set fills the last batch."""
    desc = f"{who}, validation and hold-out sets"
    examples = [*validation, *hold_out]
    answers = _generate(model, tokenizer, examples, **generation_settings, desc=desc, quiet=quiet)
    return {"validation": answers[: len(validation)], "hold_out": answers[len(validation) :]}


def finetuned_model_answers(
    evaluation_model: LanguageModel,
    tokenizer: PreTrainedTokenizerBase,
    tokenized_validation: list[dict[str, list[int]]],
    tokenized_hold_out: list[dict[str, list[int]]],
    generation_settings: dict[str, int],
    quiet: bool = False,
) -> dict[str, list[str]]:
    """The fine-tuned model's answers to the validation and the hold-out questions, by set
    ("validation", "hold_out"), generated together.

    :param quiet: no progress bars (training and generation).
    """
    sets = (tokenized_validation, tokenized_hold_out)
    return _answers_by_set(
        evaluation_model, tokenizer, *sets, generation_settings, "fine-tuned model", quiet
    )


@extract_fields({"validation_predictions": list, "validation_references": list})
def finetuned_model_on_validation_set(
    finetuned_model_answers: dict[str, list[str]], validation_set: pd.DataFrame
) -> dict[str, list[str]]:
    """The fine-tuned model's answers to the validation questions, and the reference answers."""
    return {
        "validation_predictions": finetuned_model_answers["validation"],
        "validation_references": list(validation_set["output_text"]),
    }


def _sentences_on_lines(text: str) -> str:
    """The text with one sentence per line, as ROUGE-Lsum expects."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def _rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (x100) of predictions against references, with stemming."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences_on_lines(reference), _sentences_on_lines(prediction))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    n = max(1, len(predictions))
    return {key: round(100 * total / n, 4) for key, total in totals.items()}


def class_labels(qa_table: pd.DataFrame, task: str = "auto") -> list[str]:
    """The class labels when the targets are labels (sorted), else an empty list.

    :param qa_table: the validated table (its targets are looked at).
    :param task: "auto" (default): the targets are labels when there are at most 20 distinct
        ones and each occurs at least twice; "classification": they are labels;
        "generation": they are free text.
    """
    if task not in TASKS:
        raise SettingsError(f"task must be one of {', '.join(TASKS)}; got {task!r}.")
    counts = Counter(text.strip() for text in qa_table["output_text"])
    looks_like_labels = len(counts) <= MAX_AUTO_LABELS and min(counts.values()) >= 2
    if task == "classification" or (task == "auto" and looks_like_labels):
        return sorted(counts)
    return []


def _text_metrics(
    predictions: list[str], references: list[str], class_labels: list[str]
) -> dict[str, float]:
    """ROUGE of the answers and, when the targets are class labels, the accuracy and macro-F1
    (0-100) of the answers taken as labels (an answer outside the label set is wrong)."""
    metrics = _rouge(predictions, references)
    if class_labels:
        predicted = [p.strip() for p in predictions]
        expected = [r.strip() for r in references]
        metrics["accuracy"] = round(100 * accuracy_score(expected, predicted), 4)
        f1 = f1_score(expected, predicted, labels=class_labels, average="macro", zero_division=0)
        metrics["macro_f1"] = round(100 * f1, 4)
    return metrics


def validation_set_metrics(
    validation_predictions: list[str], validation_references: list[str], class_labels: list[str]
) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum (F-measure, 0-100) of the validation answers, with accuracy and
    macro_f1 (0-100) when the targets are class labels."""
    return _text_metrics(validation_predictions, validation_references, class_labels)


def validation_loss(
    tokenized_validation: list[dict[str, list[int]]],
    evaluation_model: LanguageModel,
    data_collator: Callable,
    per_device_eval_batch_size: int = 8,
) -> float:
    """Mean cross-entropy per target token of the fine-tuned model on the validation set (with
    several processes, each scores its share of the batches and the sums are gathered).

    :param per_device_eval_batch_size: examples per forward pass.
    """
    if per_device_eval_batch_size < 1:
        raise SettingsError(
            "per_device_eval_batch_size must be a positive number, "
            f"got {per_device_eval_batch_size}."
        )
    device = _model_device(evaluation_model)
    n, size = len(tokenized_validation), per_device_eval_batch_size
    batches = [tokenized_validation[start : start + size] for start in range(0, n, size)]
    sums: list[tuple[float, int]] = []
    with torch.inference_mode():
        for examples in this_process_share(batches, evaluation_model):
            batch = {key: value.to(device) for key, value in data_collator(examples).items()}
            logits = evaluation_model(**batch).logits
            labels = batch["labels"]
            if not evaluation_model.config.is_encoder_decoder:  # each position predicts the next
                logits, labels = logits[:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"
            )
            sums.append((loss.item(), int((labels != -100).sum())))
    all_sums = gathered(sums, evaluation_model)
    return sum(total for total, _ in all_sums) / max(1, sum(tokens for _, tokens in all_sums))


def _training_summary(state: TrainerState, world_size: int) -> dict[str, Any]:
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


def _base_fields(base: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """The base model's metrics as `base_<key>` and the fine-tune's gain as `<key>_gain` (none
    for a full fine-tune, which has no base model to compare with)."""
    gains = _gains(base, finetuned)
    return {
        **{f"base_{key}": value for key, value in base.items()},
        **{f"{key}_gain": value for key, value in gains.items()},
    }


@config.when(start="base")
def training_and_validation_set_metrics__base(
    fitted_weights: FittedWeights,
    training_arguments: Seq2SeqTrainingArguments,
    validation_loss: float,
    validation_set_metrics: dict[str, float],
    base_validation_set_metrics: dict[str, float],
) -> dict[str, Any]:
    """Training figures (train_loss, train_runtime, ...) with the validation loss and ROUGE, the
    base model's validation ROUGE (`base_rouge1`, ...) and the gain over it (`rouge1_gain`, ...)
    (with LoRA; a full fine-tune has no base to compare with)."""
    return {
        **_training_summary(fitted_weights.trainer_state, training_arguments.world_size),
        "eval_loss": validation_loss,
        **validation_set_metrics,
        **_base_fields(base_validation_set_metrics, validation_set_metrics),
    }


@config.when(start="presaved")
def training_and_validation_set_metrics__presaved(
    validation_loss: float,
    validation_set_metrics: dict[str, float],
    base_validation_set_metrics: dict[str, float],
) -> dict[str, Any]:
    """The saved model's validation loss and ROUGE, the base model's validation ROUGE
    (`base_rouge1`, ...) and the gain over it (`rouge1_gain`, ...); no training in this mode."""
    return {
        "eval_loss": validation_loss,
        **validation_set_metrics,
        **_base_fields(base_validation_set_metrics, validation_set_metrics),
    }


def hold_out_set_predictions(
    finetuned_model_answers: dict[str, list[str]], hold_out_set: pd.DataFrame
) -> list[tuple[str, str, str]]:
    """The fine-tuned model's answers to the hold-out questions, as
    (question, prediction, reference) tuples in hold-out order."""
    return list(
        zip(
            hold_out_set["input_text"],
            finetuned_model_answers["hold_out"],
            hold_out_set["output_text"],
            strict=True,
        )
    )


def hold_out_set_metrics(
    hold_out_set_predictions: list[tuple[str, str, str]], class_labels: list[str]
) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum (F-measure, 0-100) of the hold-out answers, with accuracy and macro_f1
    (0-100) when the targets are class labels."""
    return _text_metrics(
        [prediction for _, prediction, _ in hold_out_set_predictions],
        [reference for _, _, reference in hold_out_set_predictions],
        class_labels,
    )


def confusion_matrix(
    hold_out_set_predictions: list[tuple[str, str, str]], class_labels: list[str]
) -> pd.DataFrame:
    """The hold-out confusion matrix when the targets are class labels (else empty): counts with
    one row per reference label and one column per predicted label, plus a last column
    "(other)" for answers outside the label set."""
    if not class_labels:
        return pd.DataFrame()
    columns = [*class_labels, OTHER_LABEL]
    predicted = [
        p.strip() if p.strip() in class_labels else OTHER_LABEL
        for _, p, _ in hold_out_set_predictions
    ]
    expected = [r.strip() for _, _, r in hold_out_set_predictions]
    counts = _confusion_matrix(expected, predicted, labels=columns)[: len(class_labels)]
    return pd.DataFrame(
        counts,
        index=pd.Index(class_labels, name="reference"),
        columns=pd.Index(columns, name="prediction"),
    )


def base_model_answers(
    evaluation_model: LanguageModel,
    tokenizer: PreTrainedTokenizerBase,
    tokenized_validation: list[dict[str, list[int]]],
    tokenized_hold_out: list[dict[str, list[int]]],
    generation_settings: dict[str, int],
    quiet: bool = False,
) -> dict[str, list[str]]:
    """The base model's answers to the validation and the hold-out questions, by set: the
    fine-tuned model with its LoRA adapter switched off (no second copy of the weights),
    generated exactly as the fine-tune's answers are. Empty for a full fine-tune: its weights
    were trained in place, no adapter to switch off.
    """
    if not isinstance(evaluation_model, PeftModel):
        return {"validation": [], "hold_out": []}
    with evaluation_model.disable_adapter():
        sets = (tokenized_validation, tokenized_hold_out)
        return _answers_by_set(
            evaluation_model, tokenizer, *sets, generation_settings, "base model", quiet
        )


@parameterize(
    base_model_on_validation_set=(
        {"answer_set": fixed("validation")},
        "The base model's answers (adapter switched off) to the validation questions.",
    ),
    base_model_on_hold_out_set=(
        {"answer_set": fixed("hold_out")},
        "The base model's answers (adapter switched off) to the hold-out questions.",
    ),
)
def base_model_set_answers(base_model_answers: dict[str, list[str]], answer_set: str) -> list[str]:
    """The base model's answers to one set's questions."""
    return base_model_answers[answer_set]


@parameterize(
    base_validation_set_metrics=(
        {"answers": source("base_model_on_validation_set"), "rows": source("validation_set")},
        "ROUGE-1/2/L/Lsum (F-measure, 0-100) of the base model's validation answers, with "
        "accuracy and macro_f1 when the targets are class labels (empty without base answers).",
    ),
    base_hold_out_set_metrics=(
        {"answers": source("base_model_on_hold_out_set"), "rows": source("hold_out_set")},
        "ROUGE-1/2/L/Lsum (F-measure, 0-100) of the base model's hold-out answers, with "
        "accuracy and macro_f1 when the targets are class labels (empty without base answers).",
    ),
)
def base_set_metrics(
    answers: list[str], rows: pd.DataFrame, class_labels: list[str]
) -> dict[str, float]:
    """The metrics of the base model's answers against the rows' reference answers."""
    if not answers:
        return {}
    return _text_metrics(answers, list(rows["output_text"]), class_labels)


def _gains(base: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """Fine-tuned minus base, for each metric both have (positive: the fine-tune scores higher)."""
    return {key: round(finetuned[key] - base[key], 4) for key in finetuned if key in base}


def base_vs_finetuned_metrics(
    validation_set_metrics: dict[str, float],
    base_validation_set_metrics: dict[str, float],
    hold_out_set_metrics: dict[str, float],
    base_hold_out_set_metrics: dict[str, float],
) -> dict[str, dict[str, dict[str, float]]]:
    """ROUGE (and accuracy, macro_f1 for class labels) of the base model and of the fine-tune on
    the validation and hold-out sets, with the gain (fine-tuned minus base):
    `{"validation": {"base": {...}, "finetuned": {...}, "gain": {...}}, "hold_out": {...}}`
    ("base" and "gain" are empty for a full fine-tune)."""
    return {
        name: {"base": base, "finetuned": finetuned, "gain": _gains(base, finetuned)}
        for name, base, finetuned in (
            ("validation", base_validation_set_metrics, validation_set_metrics),
            ("hold_out", base_hold_out_set_metrics, hold_out_set_metrics),
        )
    }
