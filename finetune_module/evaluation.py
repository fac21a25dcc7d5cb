"""Evaluation stage: the fine-tuned model answers the validation and hold-out questions, and so
does its base model; every answer set is scored against the references.

Names follow one scheme, `<model>_<set>_<what>`: the model is `finetuned` or `base` (the
fine-tune with its LoRA adapter switched off: no second copy of the weights; a full fine-tune
has none), the set `validation` or `hold_out`, and the value `answers` or `metrics` (ROUGE-1/2/
L/Lsum, 0-100, with accuracy and macro-F1 when the targets are class labels). Each model answers
both sets in one pass of batched greedy decoding (beam search with num_beams > 1) up to the
target length cap (`finetune_module.engine.generation`). The last nodes give the reference
module's outputs in its own shapes. Under a multi-process launcher the batches are shared out
between the processes and the answers gathered, so every process holds the same results.
"""

from typing import Any

import pandas as pd
import torch
from hamilton.function_modifiers import cache, config, extract_fields, parameterize, source, value
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, Seq2SeqTrainingArguments

from finetune_module.engine import metrics
from finetune_module.engine.generation import answer_sets
from finetune_module.engine.models import (
    LanguageModel,
    ModelRecipe,
    build_model,
    model_files_identity,
)
from finetune_module.engine.quiet import quiet_libraries
from finetune_module.engine.settings import EvaluationSettings
from finetune_module.engine.tokens import TokenizedSet
from finetune_module.engine.trainer import (
    FittedWeights,
    best_checkpoint_eval_loss,
    training_summary,
)

_SETS = ("validation", "hold_out")


@cache(behavior="disable")  # a model object: built on each run, never written to the cache
@config.when(start="base")
def finetuned_model__base(
    fitted_weights: FittedWeights,
    model_recipe: ModelRecipe,
    device: torch.device,
    show_progress: bool,
) -> LanguageModel:
    """The fine-tuned model, in eval mode: the recipe's model with the trained weights (the
    best checkpoint's) loaded into it."""
    with quiet_libraries(not show_progress):
        return build_model(model_recipe, device, weights=fitted_weights.weights)


@cache(behavior="disable")
@config.when(start="presaved")
def finetuned_model__presaved(
    model_recipe: ModelRecipe, device: torch.device, show_progress: bool
) -> LanguageModel:
    """The fine-tuned model, in eval mode: the saved fine-tune the recipe describes."""
    with quiet_libraries(not show_progress):
        return build_model(model_recipe, device)


def generation_settings(
    evaluation_settings: EvaluationSettings, target_length_cap: int
) -> dict[str, int]:
    """How answers are generated: `num_beams` (1 = greedy), `max_new_tokens` (the setting, else
    the target length cap) and `batch_size` (questions answered at once)."""
    settings = evaluation_settings
    return {
        "num_beams": settings.num_beams,
        "max_new_tokens": settings.max_new_tokens or target_length_cap,
        "batch_size": settings.generation_batch_size,
    }


def _answers(
    model: LanguageModel,
    tokenizer: PreTrainedTokenizerBase,
    tokenized_validation: TokenizedSet,
    tokenized_hold_out: TokenizedSet,
    generation_settings: dict[str, int],
    show_progress: bool,
    who: str,
) -> dict[str, list[str]]:
    """A model's answers to both sets, by set, generated in one pass."""
    sets = {"validation": tokenized_validation, "hold_out": tokenized_hold_out}
    with quiet_libraries(not show_progress):
        return answer_sets(model, tokenizer, sets, generation_settings, who, not show_progress)


def finetuned_answers(
    finetuned_model: LanguageModel,
    tokenizer: PreTrainedTokenizerBase,
    tokenized_validation: TokenizedSet,
    tokenized_hold_out: TokenizedSet,
    generation_settings: dict[str, int],
    show_progress: bool,
) -> dict[str, list[str]]:
    """The fine-tuned model's answers to the validation and the hold-out questions, by set
    ("validation", "hold_out"), generated together in one pass."""
    return _answers(
        finetuned_model,
        tokenizer,
        tokenized_validation,
        tokenized_hold_out,
        generation_settings,
        show_progress,
        "fine-tuned model",
    )


@cache(behavior="ignore")  # a model object: base_model_identity stands for it in cache keys
def base_answer_model(finetuned_model: LanguageModel) -> LanguageModel:
    """The model that gives the base model's answers: the fine-tuned model, whose LoRA adapter
    `base_answers` switches off (no second copy of the weights). The cache keys of the nodes
    that take it leave it out; `base_model_identity` says what it is instead."""
    return finetuned_model


def base_model_identity(model_recipe: ModelRecipe) -> dict[str, Any]:
    """What the base model is, as plain data that Hamilton's cache can compare across runs:
    the model id and its files (each file's size and time for a local directory, the cached
    snapshot for a hub id), how it is loaded, and whether the fine-tune has an adapter to
    switch off (a full fine-tune has no base model left). The fine-tune's training settings
    are not part of it: a re-run that trains differently takes the base model's answers from
    the cache (with `--cache`)."""
    recipe = model_recipe
    return {
        "model_id": recipe.model_id,
        "files": model_files_identity(recipe.model_id),
        "model_type": recipe.model_type,
        "quantization": recipe.quantization,
        "precision": recipe.precision,
        "trust_remote_code": recipe.trust_remote_code,
        "has_adapter": recipe.lora is not None or recipe.adapter_path is not None,
    }


def base_answers(
    base_answer_model: LanguageModel,
    base_model_identity: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    tokenized_validation: TokenizedSet,
    tokenized_hold_out: TokenizedSet,
    generation_settings: dict[str, int],
    show_progress: bool,
) -> dict[str, list[str]]:
    """The base model's answers to the validation and the hold-out questions, by set: the
    fine-tuned model with its LoRA adapter switched off, generated exactly as the fine-tune's
    answers are. Empty for a full fine-tune: its weights were trained in place, no adapter to
    switch off. With Hamilton's cache, a run with the same base model, questions and
    generation settings takes them from the cache, however the fine-tune was trained."""
    if not base_model_identity["has_adapter"] or not isinstance(base_answer_model, PeftModel):
        return {"validation": [], "hold_out": []}
    with base_answer_model.disable_adapter():
        return _answers(
            base_answer_model,
            tokenizer,
            tokenized_validation,
            tokenized_hold_out,
            generation_settings,
            show_progress,
            "base model",
        )


@parameterize(
    **{
        f"{model}_{name}_answers": (
            {"answers": source(f"{model}_answers"), "answer_set": value(name)},
            f"The {who}'s answers to the {name.replace('_', '-')} questions, in their order.",
        )
        for model, who in (("finetuned", "fine-tuned model"), ("base", "base model"))
        for name in _SETS
    }
)
def set_answers(answers: dict[str, list[str]], answer_set: str) -> list[str]:
    """One set's answers of a model."""
    return answers[answer_set]


@config.when(start="base")
def finetuned_validation_loss__base(
    fitted_weights: FittedWeights,
    finetuned_model: LanguageModel,
    tokenized_validation: TokenizedSet,
    data_collator: Any,
    evaluation_settings: EvaluationSettings,
) -> float:
    """The fine-tuned model's validation loss: the one the Trainer measured for the best
    checkpoint, whose weights the model has (not computed twice); measured again, as the
    Trainer does, only when the training log lacks it."""
    measured = best_checkpoint_eval_loss(fitted_weights.trainer_state)
    if measured is not None:
        return measured
    return metrics.mean_token_loss(
        finetuned_model,
        tokenized_validation,
        data_collator,
        evaluation_settings.per_device_eval_batch_size,
    )


@config.when(start="presaved")
def finetuned_validation_loss__presaved(
    finetuned_model: LanguageModel,
    tokenized_validation: TokenizedSet,
    data_collator: Any,
    evaluation_settings: EvaluationSettings,
) -> float:
    """The saved fine-tune's validation loss, measured as the Trainer measures it: mean
    cross-entropy per target token of each batch of per_device_eval_batch_size, averaged over
    the examples."""
    return metrics.mean_token_loss(
        finetuned_model,
        tokenized_validation,
        data_collator,
        evaluation_settings.per_device_eval_batch_size,
    )


def class_labels(qa_table: pd.DataFrame, evaluation_settings: EvaluationSettings) -> list[str]:
    """The class labels when the targets are labels (sorted), else an empty list: by the
    setting `task` ("classification", "generation", or "auto": at most 20 distinct targets,
    each seen twice or more)."""
    return metrics.labels_of(list(qa_table["output_text"]), evaluation_settings.task)


def _metrics_doc(who: str, name: str) -> str:
    return (
        f"ROUGE-1/2/L/Lsum (F-measure, 0-100) of the {who}'s {name} answers, with accuracy and "
        "macro_f1 when the targets are class labels (empty when there are no answers)."
    )


@parameterize(
    **{
        f"{model}_{name}_metrics": (
            {"answers": source(f"{model}_{name}_answers"), "rows": source(f"{name}_set")},
            _metrics_doc(who, name.replace("_", "-")),
        )
        for model, who in (("finetuned", "fine-tuned model"), ("base", "base model"))
        for name in _SETS
    }
)
def answer_metrics(
    answers: list[str], rows: pd.DataFrame, class_labels: list[str]
) -> dict[str, float]:
    """The scores of a set of answers against the rows' reference answers."""
    if not answers:
        return {}
    return metrics.text_metrics(answers, list(rows["output_text"]), class_labels)


def base_vs_finetuned_metrics(
    finetuned_validation_metrics: dict[str, float],
    base_validation_metrics: dict[str, float],
    finetuned_hold_out_metrics: dict[str, float],
    base_hold_out_metrics: dict[str, float],
) -> dict[str, dict[str, dict[str, float]]]:
    """The scores of the base model and of the fine-tune on the validation and hold-out sets,
    with the gain (fine-tuned minus base):
    `{"validation": {"base": {...}, "finetuned": {...}, "gain": {...}}, "hold_out": {...}}`
    ("base" and "gain" are empty for a full fine-tune)."""
    return {
        name: {"base": base, "finetuned": finetuned, "gain": metrics.gains(base, finetuned)}
        for name, base, finetuned in (
            ("validation", base_validation_metrics, finetuned_validation_metrics),
            ("hold_out", base_hold_out_metrics, finetuned_hold_out_metrics),
        )
    }


def confusion_matrix(
    finetuned_hold_out_answers: list[str], hold_out_set: pd.DataFrame, class_labels: list[str]
) -> pd.DataFrame:
    """The fine-tune's hold-out confusion matrix when the targets are class labels (else empty):
    counts with one row per reference label and one column per predicted label, plus a last
    column "(other)" for answers outside the label set."""
    references = list(hold_out_set["output_text"])
    return metrics.confusion_counts(finetuned_hold_out_answers, references, class_labels)


# --- the reference module's outputs ---------------------------------------------------------


@extract_fields({"validation_predictions": list, "validation_references": list})
def finetuned_model_on_validation_set(
    finetuned_validation_answers: list[str], validation_set: pd.DataFrame
) -> dict[str, list[str]]:
    """The fine-tuned model's answers to the validation questions, and the reference answers."""
    return {
        "validation_predictions": finetuned_validation_answers,
        "validation_references": list(validation_set["output_text"]),
    }


def hold_out_set_predictions(
    finetuned_hold_out_answers: list[str], hold_out_set: pd.DataFrame
) -> list[tuple[str, str, str]]:
    """The fine-tuned model's answers to the hold-out questions, as
    (question, prediction, reference) tuples in hold-out order."""
    return list(
        zip(
            hold_out_set["input_text"],
            finetuned_hold_out_answers,
            hold_out_set["output_text"],
            strict=True,
        )
    )


def _with_base(finetuned: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """The fine-tune's metrics, the base model's as `base_<key>` and the gain as `<key>_gain`
    (neither for a full fine-tune, which has no base model to compare with)."""
    return {
        **finetuned,
        **{f"base_{key}": value for key, value in base.items()},
        **{f"{key}_gain": value for key, value in metrics.gains(base, finetuned).items()},
    }


@config.when(start="base")
def training_and_validation_set_metrics__base(
    fitted_weights: FittedWeights,
    training_arguments: Seq2SeqTrainingArguments,
    finetuned_validation_loss: float,
    finetuned_validation_metrics: dict[str, float],
    base_validation_metrics: dict[str, float],
) -> dict[str, Any]:
    """Training figures (train_loss, train_runtime, ...) with the validation loss (`eval_loss`)
    and ROUGE, the base model's validation ROUGE (`base_rouge1`, ...) and the gain over it
    (`rouge1_gain`, ...) (with LoRA; a full fine-tune has no base to compare with)."""
    return {
        **training_summary(fitted_weights.trainer_state, training_arguments.world_size),
        "eval_loss": finetuned_validation_loss,
        **_with_base(finetuned_validation_metrics, base_validation_metrics),
    }


@config.when(start="presaved")
def training_and_validation_set_metrics__presaved(
    finetuned_validation_loss: float,
    finetuned_validation_metrics: dict[str, float],
    base_validation_metrics: dict[str, float],
) -> dict[str, Any]:
    """The saved model's validation loss (`eval_loss`) and ROUGE, the base model's validation
    ROUGE (`base_rouge1`, ...) and the gain over it (`rouge1_gain`, ...); no training here."""
    return {
        "eval_loss": finetuned_validation_loss,
        **_with_base(finetuned_validation_metrics, base_validation_metrics),
    }
