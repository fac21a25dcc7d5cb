"""Report stage: one self-contained HTML page that shows what the run did.

Loss curves, ROUGE of the base model against the fine-tune, the token lengths of the data with
the chosen caps, and the hold-out answers side by side. plotly.js is embedded in the page, so it
opens from disk with no network (`finetune_module.engine.html_report` draws the parts).
"""

from typing import Any

import pandas as pd

from finetune_module.engine import html_report
from finetune_module.engine.tokens import TokenLists


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
) -> str:
    """The run's report: a self-contained HTML page (plotly.js embedded) with the loss curves,
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
    return html_report.page(
        "Fine-tune report",
        [
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
                html_report.loss_figure(training_log),
            ),
            (
                "ROUGE: base model vs fine-tuned",
                "Word overlap with the reference answers (0-100, higher is better), for the same "
                "questions answered by the base model (adapter switched off) and by the "
                "fine-tune; with accuracy and macro-F1 when the targets are class labels.",
                html_report.scores_figure(base_vs_finetuned_metrics),
            ),
            (
                "Token lengths and caps",
                "Texts longer than a cap (dashed line) are cut to it: inputs when they are read, "
                "targets in training; the target cap also bounds the length of generated "
                "answers.",
                html_report.lengths_figure(*lengths),
            ),
            (
                "Hold-out answers",
                "Questions the model never saw in training or model selection.",
                html_report.table(["question", "reference", "base model", "fine-tuned"], answers),
            ),
        ],
    )
