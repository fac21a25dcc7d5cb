"""Artifacts stage: the best model and the run's files, written atomically.

Everything is written to a temporary directory beside the destination and renamed into
place, so an interrupted run leaves the previous complete output (or none), never half of one.
Under a multi-process launcher only the main process writes; the others wait until it is done.
"""

import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
from hamilton.function_modifiers import cache, config
from transformers import PreTrainedTokenizerBase

from finetune_module.distributed import is_main_process, wait_for_everyone
from finetune_module.model import BACKUP_SUFFIX, DEFAULT_OUTPUT_DIR, LanguageModel

METRICS_FILE = "metrics.json"
HOLD_OUT_PREDICTIONS_FILE = "hold_out_predictions.csv"
VALIDATION_PREDICTIONS_FILE = "validation_predictions.csv"
SETTINGS_FILE = "finetune_settings.json"

logger = logging.getLogger(__name__)


@contextmanager
def _atomic_directory(path: str) -> Iterator[str]:
    """Yields a fresh temporary directory that replaces `path` once the block succeeds.

    The old directory is moved aside, the new one renamed in, and the old one deleted; a
    crash between the two renames leaves the old one as `<path>.old`, restored on the next write.
    Staging directories left by a killed run (`.<name>.tmp-*`) are removed on the next write.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    backup = path + BACKUP_SUFFIX
    if os.path.isdir(backup) and not os.path.exists(path):
        os.rename(backup, path)
    prefix = f".{name}.tmp-"
    for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
        shutil.rmtree(stale, ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield staging
        if os.path.exists(path):
            shutil.rmtree(backup, ignore_errors=True)
            os.rename(path, backup)
        os.rename(staging, path)
        shutil.rmtree(backup, ignore_errors=True)
        logger.info("Wrote %s", path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: str, value: Any) -> None:
    """`value` as indented JSON in `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
        f.write("\n")


def _write_run_files(
    directory: str,
    metrics: dict[str, Any],
    hold_out_set_predictions: list[tuple[str, str, str]],
    validation_set: pd.DataFrame,
    validation_predictions: list[str],
) -> None:
    """The metrics (JSON) and the validation and hold-out predictions (CSV) in `directory`."""
    _write_json(os.path.join(directory, METRICS_FILE), metrics)
    columns = ["question", "prediction", "reference"]
    pd.DataFrame(hold_out_set_predictions, columns=columns).to_csv(
        os.path.join(directory, HOLD_OUT_PREDICTIONS_FILE), index=False
    )
    validation_rows = zip(
        validation_set["input_text"],
        validation_predictions,
        validation_set["output_text"],
        strict=True,
    )
    pd.DataFrame(list(validation_rows), columns=columns).to_csv(
        os.path.join(directory, VALIDATION_PREDICTIONS_FILE), index=False
    )


@cache(behavior="recompute")  # writing files is the point: never skipped on a cached re-run
@config.when(start="base")
def save_best_models__base(
    evaluation_model: LanguageModel,
    tokenizer: PreTrainedTokenizerBase,
    best_model_dir: str,
    training_and_validation_set_metrics: dict[str, Any],
    hold_out_set_metrics: dict[str, float],
    hold_out_set_predictions: list[tuple[str, str, str]],
    validation_set: pd.DataFrame,
    validation_predictions: list[str],
    source_length_cap: int,
    target_length_cap: int,
    generation_settings: dict[str, int],
) -> str:
    """Where the best fine-tune was saved: the LoRA adapter (safetensors) and tokenizer, with
    `metrics.json`, `validation_predictions.csv`, `hold_out_predictions.csv` and
    `finetune_settings.json` (length caps and generation settings).

    Loadable with `PeftModel.from_pretrained(base_model, path)` or `{"start": "presaved"}`.
    """
    if is_main_process():
        with _atomic_directory(best_model_dir) as staging:
            evaluation_model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            metrics = {
                "training_and_validation": training_and_validation_set_metrics,
                "hold_out": hold_out_set_metrics,
            }
            _write_run_files(
                staging, metrics, hold_out_set_predictions, validation_set, validation_predictions
            )
            _write_json(
                os.path.join(staging, SETTINGS_FILE),
                {
                    "source_length_cap": source_length_cap,
                    "target_length_cap": target_length_cap,
                    **generation_settings,
                },
            )
    wait_for_everyone()
    return best_model_dir


@cache(behavior="recompute")
@config.when(start="presaved")
def save_best_models__presaved(
    presaved_model_dir: str,
    training_and_validation_set_metrics: dict[str, Any],
    hold_out_set_metrics: dict[str, float],
    hold_out_set_predictions: list[tuple[str, str, str]],
    validation_set: pd.DataFrame,
    validation_predictions: list[str],
    output_dir: str = DEFAULT_OUTPUT_DIR,
) -> str:
    """Where the evaluation of the saved fine-tune was written: `<output_dir>/evaluation/` with
    `metrics.json` and the prediction CSVs. The saved model itself is left as it is.

    :param presaved_model_dir: the evaluated fine-tune (recorded in metrics.json).
    :param output_dir: the run's output directory.
    """
    evaluation_dir = os.path.join(os.path.abspath(output_dir), "evaluation")
    if is_main_process():
        with _atomic_directory(evaluation_dir) as staging:
            metrics = {
                "model_dir": presaved_model_dir,
                "validation": training_and_validation_set_metrics,
                "hold_out": hold_out_set_metrics,
            }
            _write_run_files(
                staging, metrics, hold_out_set_predictions, validation_set, validation_predictions
            )
    wait_for_everyone()
    return evaluation_dir
