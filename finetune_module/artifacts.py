"""Artifacts stage: the best model and the run's files, written atomically.

Everything is written to a temporary directory beside the destination and renamed into
place (`finetune_module.engine.files.atomic_directory`), so an interrupted run leaves the
previous complete output (or none), never half of one. Under a multi-process launcher only the
main process writes; the others wait until it is done.
"""

import os
from typing import Any

import pandas as pd
from hamilton.function_modifiers import cache, config
from transformers import PreTrainedTokenizerBase

from finetune_module.engine.distributed import is_main_process, wait_for_everyone
from finetune_module.engine.files import (
    BASE_MODEL_PREDICTIONS_FILE,
    HOLD_OUT_PREDICTIONS_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_INFO_FILE,
    SETTINGS_FILE,
    VALIDATION_PREDICTIONS_FILE,
    RunLock,
    atomic_directory,
    write_json,
)
from finetune_module.engine.models import LanguageModel, ModelRecipe
from finetune_module.engine.quiet import quiet_libraries
from finetune_module.engine.records import DEFAULT_PROMPT_TEMPLATE
from finetune_module.engine.trainer import TRAINING_LOG_FILE


def _prediction_rows(rows: pd.DataFrame, predictions: list[str]) -> list[tuple[str, str, str]]:
    """(question, prediction, reference) for each row of a set and its predicted answer."""
    return list(zip(rows["input_text"], predictions, rows["output_text"], strict=True))


def prediction_tables(
    hold_out_set_predictions: list[tuple[str, str, str]],
    validation_set: pd.DataFrame,
    finetuned_validation_answers: list[str],
    hold_out_set: pd.DataFrame,
    base_validation_answers: list[str],
    base_hold_out_answers: list[str],
) -> dict[str, pd.DataFrame]:
    """The answers saved with a run, by file name: the fine-tune's on the validation and hold-out
    sets (question, prediction, reference) and the base model's on both (with a `set` column;
    no rows for a full fine-tune, which has no base model to compare with)."""
    columns = ["question", "prediction", "reference"]
    base_rows = [
        (name, *row)
        for name, rows, predictions in (
            ("validation", validation_set, base_validation_answers),
            ("hold_out", hold_out_set, base_hold_out_answers),
        )
        if predictions  # none for a full fine-tune
        for row in _prediction_rows(rows, predictions)
    ]
    return {
        VALIDATION_PREDICTIONS_FILE: pd.DataFrame(
            _prediction_rows(validation_set, finetuned_validation_answers), columns=columns
        ),
        HOLD_OUT_PREDICTIONS_FILE: pd.DataFrame(hold_out_set_predictions, columns=columns),
        BASE_MODEL_PREDICTIONS_FILE: pd.DataFrame(base_rows, columns=["set", *columns]),
    }


def _write_run_files(
    directory: str,
    metrics: dict[str, Any],
    prediction_tables: dict[str, pd.DataFrame],
    report_html: str,
    run_description: dict[str, Any],
) -> None:
    """The metrics (JSON), the prediction tables (CSV), the report (HTML) and what ran
    (`run_info.json`) in `directory`."""
    write_json(os.path.join(directory, METRICS_FILE), metrics)
    write_json(os.path.join(directory, RUN_INFO_FILE), run_description)
    for name, table in prediction_tables.items():
        table.to_csv(os.path.join(directory, name), index=False)
    with open(os.path.join(directory, REPORT_FILE), "w", encoding="utf-8") as f:
        f.write(report_html)


@cache(behavior="recompute")  # writing files is the point: never skipped on a cached re-run
@config.when(start="base")
def save_best_models__base(
    finetuned_model: LanguageModel,
    tokenizer: PreTrainedTokenizerBase,
    best_model_dir: str,
    training_and_validation_set_metrics: dict[str, Any],
    finetuned_hold_out_metrics: dict[str, float],
    source_length_cap: int,
    target_length_cap: int,
    generation_settings: dict[str, int],
    base_vs_finetuned_metrics: dict[str, dict[str, dict[str, float]]],
    prediction_tables: dict[str, pd.DataFrame],
    training_log: pd.DataFrame,
    report_html: str,
    run_description: dict[str, Any],
    model_recipe: ModelRecipe,
    show_progress: bool,
    run_lock: RunLock,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> str:
    """Where the best fine-tune was saved: the LoRA adapter (safetensors) and tokenizer, with
    `metrics.json` (including base vs fine-tuned ROUGE), `validation_predictions.csv`,
    `hold_out_predictions.csv`, `base_model_predictions.csv`, `training_log.csv`, `report.html`,
    `run_info.json` (what ran: `run_description`) and `finetune_settings.json` (length caps,
    generation settings and the prompt template, which `finetune_module.predict` uses, and the
    recipe the model was built from).

    Loadable with `PeftModel.from_pretrained(base_model, path)` or `{"start": "presaved"}`.

    :param show_progress: False: the libraries print no bars or warnings of their own while
        the model is written.
    :param prompt_template: the prompt the model was trained with (see `prompt_texts`).
    :param run_lock: held while the run writes into its directory.
    """
    with run_lock.released_on_failure():
        if is_main_process():
            with atomic_directory(best_model_dir) as staging:
                with quiet_libraries(not show_progress):
                    finetuned_model.save_pretrained(staging, safe_serialization=True)
                    tokenizer.save_pretrained(staging)
                metrics = {
                    "training_and_validation": training_and_validation_set_metrics,
                    "hold_out": finetuned_hold_out_metrics,
                    "base_vs_finetuned": base_vs_finetuned_metrics,
                }
                _write_run_files(staging, metrics, prediction_tables, report_html, run_description)
                training_log.to_csv(os.path.join(staging, TRAINING_LOG_FILE), index=False)
                write_json(
                    os.path.join(staging, SETTINGS_FILE),
                    {
                        "source_length_cap": source_length_cap,
                        "target_length_cap": target_length_cap,
                        **generation_settings,
                        "prompt_template": prompt_template,
                        "model_recipe": model_recipe.describe(),
                    },
                )
        wait_for_everyone()
    run_lock.release()  # the run's last write is done: the directory is free again
    return best_model_dir


@cache(behavior="recompute")
@config.when(start="presaved")
def save_best_models__presaved(
    presaved_model_dir: str,
    training_and_validation_set_metrics: dict[str, Any],
    finetuned_hold_out_metrics: dict[str, float],
    base_vs_finetuned_metrics: dict[str, dict[str, dict[str, float]]],
    prediction_tables: dict[str, pd.DataFrame],
    report_html: str,
    run_description: dict[str, Any],
    run_dir: str,
    run_lock: RunLock,
) -> str:
    """Where the evaluation of the saved fine-tune was written: `evaluation/` in the run's
    directory, with `metrics.json` (including base vs fine-tuned ROUGE and the evaluated
    model's directory), the prediction CSVs, `report.html` and `run_info.json` (what ran). The
    saved model itself is left as it is."""
    evaluation_dir = os.path.join(run_dir, "evaluation")
    with run_lock.released_on_failure():
        if is_main_process():
            with atomic_directory(evaluation_dir) as staging:
                metrics = {
                    "model_dir": presaved_model_dir,
                    "validation": training_and_validation_set_metrics,
                    "hold_out": finetuned_hold_out_metrics,
                    "base_vs_finetuned": base_vs_finetuned_metrics,
                }
                _write_run_files(staging, metrics, prediction_tables, report_html, run_description)
        wait_for_everyone()
    run_lock.release()  # the run's last write is done: the directory is free again
    return evaluation_dir
