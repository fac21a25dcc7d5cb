"""Scores of answers and of a model: ROUGE (with `rouge-score`, no download), accuracy, macro-F1
and a confusion matrix when the targets are class labels, the gain of a fine-tune over its base
model, and the mean loss per target token."""

import re
from collections import Counter
from collections.abc import Callable

import pandas as pd
import torch

from finetune_module.engine.distributed import gathered, this_process_share
from finetune_module.engine.generation import model_device, questions_read_in_groups
from finetune_module.engine.tokens import IGNORE_INDEX, TokenizedSet

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
MAX_AUTO_LABELS = 20  # task="auto": at most this many distinct targets, each seen twice or more
OTHER_LABEL = "(other)"  # confusion-matrix column of predictions outside the label set


def _sentences_on_lines(text: str) -> str:
    """The text with one sentence per line, as ROUGE-Lsum expects."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (x100) of predictions against references, with stemming."""
    from rouge_score import rouge_scorer  # here: it imports nltk (~0.6 s of every start)

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences_on_lines(reference), _sentences_on_lines(prediction))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    n = max(1, len(predictions))
    return {key: round(100 * total / n, 4) for key, total in totals.items()}


def labels_of(targets: list[str], task: str = "auto") -> list[str]:
    """The class labels when the targets are labels (sorted), else an empty list: for
    task "auto" when there are at most `MAX_AUTO_LABELS` distinct targets and each occurs at
    least twice, for "classification" always, for "generation" never."""
    counts = Counter(text.strip() for text in targets)
    looks_like_labels = len(counts) <= MAX_AUTO_LABELS and min(counts.values()) >= 2
    if task == "classification" or (task == "auto" and looks_like_labels):
        return sorted(counts)
    return []


def text_metrics(
    predictions: list[str], references: list[str], class_labels: list[str]
) -> dict[str, float]:
    """ROUGE of the answers and, when the targets are class labels, the accuracy and macro-F1
    (0-100) of the answers taken as labels (an answer outside the label set is wrong)."""
    metrics = rouge(predictions, references)
    if class_labels:
        predicted = [p.strip() for p in predictions]
        expected = [r.strip() for r in references]
        right = sum(e == p for e, p in zip(expected, predicted, strict=True))
        metrics["accuracy"] = round(100 * right / max(1, len(expected)), 4)
        metrics["macro_f1"] = round(100 * macro_f1(expected, predicted, class_labels), 4)
    return metrics


def macro_f1(expected: list[str], predicted: list[str], labels: list[str]) -> float:
    """The mean over `labels` of each label's F1 score, 2 TP / (2 TP + FP + FN), taken as 0
    for a label that is neither expected nor predicted: scikit-learn's `f1_score` with
    `average="macro"` and `zero_division=0`, without importing scikit-learn: with SciPy, which
    transformers imports wherever it is installed, it took 0.44 s and 76 MiB of every
    command's start (`finetune --version`)."""
    pairs = Counter(zip(expected, predicted, strict=True))
    scores = []
    for label in labels:
        hits = pairs[label, label]
        misses = sum(n for (e, p), n in pairs.items() if (e == label) != (p == label))
        scores.append(2 * hits / (2 * hits + misses) if hits + misses else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def gains(base: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """Fine-tuned minus base, for each metric both have (positive: the fine-tune scores higher)."""
    return {key: round(finetuned[key] - base[key], 4) for key in finetuned if key in base}


def confusion_counts(
    predictions: list[str], references: list[str], class_labels: list[str]
) -> pd.DataFrame:
    """Counts with one row per reference label and one column per predicted label, plus a last
    column "(other)" for answers outside the label set (empty without labels)."""
    if not class_labels:
        return pd.DataFrame()
    columns = [*class_labels, OTHER_LABEL]
    predicted = [p.strip() if p.strip() in class_labels else OTHER_LABEL for p in predictions]
    expected = [r.strip() for r in references]
    pairs = Counter(zip(expected, predicted, strict=True))
    return pd.DataFrame(
        [[pairs[row, column] for column in columns] for row in class_labels],
        index=pd.Index(class_labels, name="reference"),
        columns=pd.Index(columns, name="prediction"),
    )


def mean_token_loss(
    model: torch.nn.Module,
    examples: TokenizedSet | list[dict[str, list[int]]],
    collator: Callable,
    batch_size: int,
) -> float:
    """The validation loss as the Hugging Face Trainer measures it: the examples in order, in
    batches of `batch_size` made by `collator`; each batch's mean cross-entropy per target
    token, averaged over the examples (a batch counts as many times as it has examples), an
    encoder-decoder model's questions read as the Trainer reads them
    (`generation.questions_read_in_groups`). The same model and data give the Trainer's
    `eval_loss`. With several processes, each scores its share of the batches and the sums are
    gathered."""
    device = model_device(model)
    batches = [
        examples[start : start + batch_size] for start in range(0, len(examples), batch_size)
    ]
    sums: list[tuple[float, int]] = []
    with torch.inference_mode():
        for rows in this_process_share(batches, model):
            batch = {key: value.to(device) for key, value in collator(rows).items()}
            logits = model(**questions_read_in_groups(model, batch)).logits
            labels = batch["labels"]
            if not model.config.is_encoder_decoder:  # each position predicts the next
                logits, labels = logits[:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"
            )
            tokens = int((labels != IGNORE_INDEX).sum())
            if tokens:  # a batch without targets has no loss (the Trainer leaves it out too)
                sums.append((loss.item() / tokens * len(rows), len(rows)))
    every = gathered(sums, model)
    return sum(total for total, _ in every) / max(1, sum(count for _, count in every))
