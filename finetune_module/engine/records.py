"""Checking records: the text a record holds under a key, the set a split column puts it in,
the sizes of a random split, and prompt templates with their context.

Every refusal is one `DataError` (the data) or `SettingsError` (a setting) naming the source,
the record's index and the key.
"""

import json
import logging
import math
import string
from typing import Any

import numpy as np
import pandas as pd

from finetune_module.engine.sources import json_kind
from finetune_module.errors import DataError, SettingsError

# values a split column may hold (any case) -> the set they put a record in
SPLIT_VALUES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "hold_out",
    "hold_out": "hold_out",
    "holdout": "hold_out",
}
SETS = ("train", "validation", "hold_out")
PROMPT_FIELDS = ("input", "context")  # the placeholders a prompt_template may use
DEFAULT_PROMPT_TEMPLATE = "{input}"  # the input text as it is
SHOWN_DUPLICATES = 10  # duplicate records named in the warning; the count covers all of them
#: The dtype of the table's text columns: pandas' `str`, holding the records' own strings
#: (its default pyarrow storage would copy every text, and copy again for every split).
TEXT = pd.StringDtype("python", na_value=np.nan)

logger = logging.getLogger(__name__)


def check_key_exists(records: list[dict[str, Any]], key: str, data_label: str) -> None:
    """Refuses a key that no record has, naming the keys that do exist."""
    if any(key in r for r in records):
        return
    seen = list(dict.fromkeys(k for r in records for k in r))
    raise DataError(
        f"{data_label}: no record has the key {key!r}; keys found: {', '.join(map(repr, seen))}."
    )


def shown(value: Any) -> str:
    """A short rendering of a value for an error message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text[:60]


def record_text(record: dict[str, Any], key: str, index: int, data_label: str) -> str:
    """The record's non-empty text under `key`, or an error naming the file, record and key."""
    if key not in record:
        raise DataError(f"{data_label}: record {index} has no key {key!r}.")
    value = record[key]
    if not isinstance(value, str):
        what = "" if value is None else f" ({shown(value)})"
        raise DataError(
            f"{data_label}: record {index}, key {key!r}: expected text, "
            f"found {json_kind(value)}{what}."
        )
    if not value.strip():
        raise DataError(f"{data_label}: record {index}, key {key!r}: empty text.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{data_label}: record {index}, key {key!r}: not valid Unicode text "
            f"(an unpaired surrogate escape at character {e.start})."
        ) from e
    return value


def warn_about_duplicates(table: pd.DataFrame, data_label: str) -> None:
    """Logs a warning naming the records that repeat an earlier record's input and output."""
    repeated = table.duplicated(keep="first")
    if not repeated.any():
        return
    first_of = table.reset_index().groupby(list(table.columns))["index"].transform("first")
    pairs = [f"{i} (= {first_of[i]})" for i in table.index[repeated]]
    named = ", ".join(pairs[:SHOWN_DUPLICATES]) + (", ..." if len(pairs) > SHOWN_DUPLICATES else "")
    logger.warning(
        "%s: %d duplicated records (same input and output text as an earlier record): %s. They "
        "are kept; a duplicate that lands in both the training and an evaluation set makes the "
        "scores look better than they are.",
        data_label,
        len(pairs),
        named,
    )


def split_of(record: dict[str, Any], index: int, split_column: str, data_label: str) -> str:
    """The set a record's split column puts it in: train, validation or hold_out."""
    value = record.get(split_column)
    split = SPLIT_VALUES.get(value.strip().lower()) if isinstance(value, str) else None
    if split is None:
        raise DataError(
            f"{data_label}: record {index}, split column {split_column!r}: {shown(value)} is not "
            f"a split; use one of {', '.join(SPLIT_VALUES)}."
        )
    return split


def split_sizes(n: int, train_size: float, validation_size: float) -> tuple[int, int, int]:
    """Sizes of the train, validation and hold-out sets for `n` records.

    The train set takes `floor(train_size * n)` records; the rest is split
    `floor(validation_size * rest)` to validation and the remainder to hold-out.
    """
    n_train = math.floor(train_size * n)
    n_validation = math.floor(validation_size * (n - n_train))
    return n_train, n_validation, n - n_train - n_validation


def minimum_records(train_size: float, validation_size: float) -> int:
    """The fewest records that give every set at least one record."""
    n = 3
    while min(split_sizes(n, train_size, validation_size)) < 1:
        n += 1
    return n


def sets_by_column(
    qa_table: pd.DataFrame, split_column: str, data_label: str
) -> dict[str, pd.DataFrame]:
    """The three sets as the split column assigns them, each in source order."""
    sets = {f"{name}_set": qa_table[qa_table["split"] == name] for name in SETS}
    empty = [name for name in SETS if sets[f"{name}_set"].empty]
    if empty:
        counts = qa_table["split"].value_counts().to_dict()
        raise DataError(
            f"{data_label}: the split column {split_column!r} puts no record in the "
            f"{' or '.join(empty)} set (counts: {counts}); every set needs at least one."
        )
    return sets


def template_fields(prompt_template: str) -> list[str]:
    """The placeholder names in the template, checked: `{input}` once or more, `{context}`
    optionally, nothing else."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(prompt_template) if f is not None]
    except ValueError as e:
        raise SettingsError(
            f"prompt_template {prompt_template!r} is not a valid template: {e}."
        ) from e
    unknown = sorted({f for f in fields if f not in PROMPT_FIELDS}, key=fields.index)
    if unknown:
        raise SettingsError(
            f"prompt_template has unknown placeholders: {', '.join('{' + f + '}' for f in unknown)}"
            "; it may use {input} and {context} (write {{ and }} for literal braces)."
        )
    if "input" not in fields:
        raise SettingsError(f"prompt_template {prompt_template!r} must contain {{input}}.")
    return fields


def context_text(record: dict[str, Any], keys: list[str], index: int, data_label: str) -> str:
    """The record's context: the texts under `keys` (each a string or a list of strings),
    one per line."""
    texts = []
    for key in keys:
        if key not in record:
            raise DataError(f"{data_label}: record {index} has no key {key!r}.")
        value = record[key]
        parts = value if isinstance(value, list) else [value]
        if not all(isinstance(part, str) for part in parts):
            raise DataError(
                f"{data_label}: record {index}, key {key!r}: expected text or a list of texts, "
                f"found {shown(value)}."
            )
        texts.extend(parts)
    return "\n".join(texts)
