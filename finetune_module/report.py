"""Report stage: what ran, and one self-contained HTML page that shows what the run did.

`run_description` states what ran (the model, the data and its fingerprint, the records per
set, the settings that differ from their defaults, the library versions, the date and each
stage's wall time); it heads the report and is saved as `run_info.json`. Then the loss
curves, ROUGE of the base model against the fine-tune, the token lengths of the data with the
chosen caps, and the hold-out answers side by side. plotly.js is embedded in the page, so it
opens from disk with no network (`finetune_module.engine.html_report` draws the parts).
"""

from typing import Any

import pandas as pd
import torch
from hamilton import version as hamilton_version
from hamilton.function_modifiers import cache

import finetune_module
from finetune_module import timing
from finetune_module.engine import html_report, run_info
from finetune_module.engine.collector import objects_alive_frozen
from finetune_module.engine.models import ModelRecipe
from finetune_module.engine.records import DEFAULT_PROMPT_TEMPLATE
from finetune_module.engine.tokens import TokenLists

_NOT_TIMED = (
    "not recorded: run with `finetune`, `finetune_module.build_driver`, or add "
    "`finetune_module.timing_adapter()` to the driver's adapters"
)


@cache(behavior="recompute")  # this run's clock, never a cached run's
def run_timings() -> dict[str, Any]:
    """When the run started (ISO 8601 with time zone), the wall time of each stage's nodes
    finished so far (`stage_seconds`, in seconds, stages in execution order) and the time
    since the start (`elapsed_seconds`), as the run's `timing.StageTimer` adapter has recorded
    them; with no timer on the driver, `started_at` is None and `note` says why."""
    readings = timing.running_readings()
    if readings is None:
        return {"started_at": None, "stage_seconds": {}, "note": _NOT_TIMED}
    return readings


@cache(behavior="recompute")  # states this run's date and times
def run_description(
    model_recipe: ModelRecipe,
    data_label: str,
    data_fingerprint: str,
    qa_table: pd.DataFrame,
    train_set: pd.DataFrame,
    validation_set: pd.DataFrame,
    hold_out_set: pd.DataFrame,
    non_default_settings: dict[str, dict[str, Any]],
    device: torch.device,
    run_timings: dict[str, Any],
    split_column: str | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    context_key: str | list[str] | None = None,
) -> dict[str, Any]:
    """What ran, as JSON-ready data: the model (its recipe: model id or path, the adapter),
    the data (its source, fingerprint and the records per set), the settings that differ from
    their defaults (name -> value and default, credentials masked), the library versions and
    the device, what the run is part of (a sweep's study and trial: `run_info.labelled_run`),
    when the run started and each stage's wall time up to this point (the report and artifacts
    stages come after). Heads the report; saved as `run_info.json`.

    :param split_column: the data's split column (listed when named).
    :param prompt_template: the prompt (listed when not the default).
    :param context_key: the context's key (listed when named).
    """
    data_inputs = {
        "split_column": split_column,
        "prompt_template": prompt_template,
        "context_key": context_key,
    }
    return {
        "model": model_recipe.describe(),
        "data": {
            "source": data_label,
            "fingerprint": data_fingerprint,
            "fingerprint_covers": run_info.FINGERPRINT_COVERS,
            "records": {
                "read": len(qa_table),
                "train": len(train_set),
                "validation": len(validation_set),
                "hold_out": len(hold_out_set),
            },
        },
        "settings_changed": {
            **non_default_settings,
            **run_info.differing_settings(run_description, data_inputs),
        },
        "versions": {
            "finetune_module": finetune_module.__version__,
            **run_info.library_versions(),
            "hamilton": ".".join(map(str, hamilton_version.VERSION)),
        },
        "device": run_info.device_description(device),
        "part_of": run_info.run_labels(),
        **run_timings,
        "described_at": run_info.now_iso(),
    }


@cache(behavior="disable")  # a new page each run (its date and times): not kept in the cache
def report_html(
    training_log: pd.DataFrame,
    base_vs_finetuned_metrics: dict[str, dict[str, dict[str, float]]],
    training_and_validation_set_metrics: dict[str, Any],
    source_token_ids: TokenLists,
    target_token_ids: TokenLists,
    source_length_cap: int,
    target_length_cap: int,
    hold_out_set_predictions: list[tuple[str, str, str]],
    base_hold_out_answers: list[str],
    run_description: dict[str, Any],
) -> str:
    """The run's report: a self-contained HTML page (plotly.js embedded) with what ran (see
    `run_description`), the loss curves,
    ROUGE of the base model vs the fine-tune, the token-length histograms with the caps, and the
    hold-out questions with their reference, base and fine-tuned answers. Saved as
    `report.html` with the run's files."""
    base_answers = base_hold_out_answers or ["n/a"] * len(hold_out_set_predictions)
    answers = [
        [question, reference, base, tuned]
        for (question, tuned, reference), base in zip(
            hold_out_set_predictions, base_answers, strict=True
        )
    ]
    lengths = (source_token_ids, target_token_ids, source_length_cap, target_length_cap)
    with objects_alive_frozen():  # plotly's first figure reads its validators: many objects
        losses = html_report.loss_figure(training_log)
        scores = html_report.scores_figure(base_vs_finetuned_metrics)
        histograms = html_report.lengths_figure(*lengths)
    return html_report.page(
        "Fine-tune report",
        [
            (
                "What ran",
                "The model, the data and its fingerprint, the records in each set, every "
                "setting that differs from its default, the versions and each stage's time "
                "(also in run_info.json beside this page).",
                html_report.what_ran(run_description),
            ),
            (
                "At a glance",
                "Gain is fine-tuned minus base; positive means the fine-tune scores higher (n/a: "
                "a full fine-tune has no adapter to switch off, so no base model to compare "
                "with).",
                html_report.glance_tables(
                    base_vs_finetuned_metrics, training_and_validation_set_metrics
                ),
            ),
            (
                "Loss curves",
                "Both curves should fall. Validation loss rising while training loss keeps "
                "falling means the model is memorising the training set (overfitting); the "
                "checkpoint with the lowest validation loss is the one kept.",
                losses,
            ),
            (
                "ROUGE: base model vs fine-tuned",
                "Word overlap with the reference answers (0-100, higher is better), for the same "
                "questions answered by the base model (adapter switched off) and by the "
                "fine-tune; with accuracy and macro-F1 when the targets are class labels.",
                scores,
            ),
            (
                "Token lengths and caps",
                "Texts longer than a cap (dashed line) are cut to it: inputs when they are read, "
                "targets in training; the target cap also bounds the length of generated "
                "answers.",
                histograms,
            ),
            (
                "Hold-out answers",
                "Questions the model never saw in training or model selection.",
                html_report.table(["question", "reference", "base model", "fine-tuned"], answers),
            ),
        ],
    )
