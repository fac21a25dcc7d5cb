"""Data stage: raw records -> validated table -> train / validation / hold-out sets.

Read top to bottom: the file is loaded, each record is checked and reduced to the two
configured keys, and the table is split deterministically.
"""

import json
import logging
import math
import os
import string
from typing import Any

import numpy as np
import pandas as pd
from hamilton.function_modifiers import extract_fields

from finetune_module.errors import DataError, SettingsError

SPLIT_STRATEGIES = ("random", "last")
PROMPT_FIELDS = ("input", "context")  # the placeholders a prompt_template may use
DEFAULT_PROMPT_TEMPLATE = "{input}"  # the input text as it is
SHOWN_DUPLICATES = 10  # duplicate records named in the warning; the count covers all of them

logger = logging.getLogger(__name__)


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: "null", "a number", "an object", ..."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"))
    return next((kind for types, kind in kinds if isinstance(value, types)), "an object")


def _read_text(data_path: str) -> str:
    """The file's text (a UTF-8 byte order mark is dropped), or a clear error when it is
    missing, unreadable, empty or not UTF-8."""
    if not os.path.exists(data_path):
        raise DataError(f"{data_path}: no such file.")
    if os.path.isdir(data_path):
        raise DataError(f"{data_path}: is a directory, expected a JSON or JSON Lines file.")
    try:
        with open(data_path, "rb") as f:
            content = f.read()
    except OSError as e:
        raise DataError(f"{data_path}: cannot be read ({e.strerror}).") from e
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = content.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{data_path}: not UTF-8 text (byte {e.start}, line {line}); save it as UTF-8."
        ) from e
    if not text.strip():
        raise DataError(f"{data_path}: the file is empty.")
    return text


def _loads(text: str, where: str) -> Any:
    """The JSON value in `text`; a value JSON allows but Python cannot hold (a number of
    thousands of digits, nesting thousands deep) is a DataError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as e:
        raise DataError(f"{where}: JSON too large to read ({e}).") from e


def _parse_json_lines(text: str, data_path: str) -> list[Any]:
    """One JSON value per non-empty line (lines end at "\\n" only, as JSON Lines says)."""
    records = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(_loads(line, f"{data_path}: line {line_number}"))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{data_path}: line {line_number} is not valid JSON ({e.msg}, column {e.colno})."
            ) from e
    return records


def raw_records(data_path: str) -> list[Any]:
    """The records in the data file, as parsed: a JSON list, or JSON Lines (one object a line).

    :param data_path: path to a `.json` file holding a list of objects, or a `.jsonl`/`.ndjson`
        file holding one object per line. A `.json` file that holds JSON Lines is accepted too.
    """
    text = _read_text(data_path)
    if data_path.endswith((".jsonl", ".ndjson")):
        return _parse_json_lines(text, data_path)
    try:
        parsed = _loads(text, data_path)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_json_lines(text, data_path)
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
            raise DataError(
                f"{data_path}: invalid JSON: the file ends before the JSON value is complete "
                f"(truncated?): {e.msg} (line {e.lineno}, column {e.colno})."
            ) from e
        raise DataError(
            f"{data_path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}."
        ) from e
    if not isinstance(parsed, list):
        raise DataError(
            f"{data_path}: expected a JSON list of objects, found {_json_kind(parsed)}."
        )
    return parsed


def _check_key_exists(records: list[dict[str, Any]], key: str, data_path: str) -> None:
    """Refuses a key that no record has, naming the keys that do exist."""
    if any(key in r for r in records):
        return
    seen = list(dict.fromkeys(k for r in records for k in r))
    raise DataError(
        f"{data_path}: no record has the key {key!r}; keys found: {', '.join(map(repr, seen))}."
    )


def _text(record: dict[str, Any], key: str, index: int, data_path: str) -> str:
    """The record's non-empty text under `key`, or an error naming the file, record and key."""
    if key not in record:
        raise DataError(f"{data_path}: record {index} has no key {key!r}.")
    value = record[key]
    if not isinstance(value, str):
        shown = "" if value is None else f" ({json.dumps(value)[:60]})"
        raise DataError(
            f"{data_path}: record {index}, key {key!r}: expected text, "
            f"found {_json_kind(value)}{shown}."
        )
    if not value.strip():
        raise DataError(f"{data_path}: record {index}, key {key!r}: empty text.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{data_path}: record {index}, key {key!r}: not valid Unicode text "
            f"(an unpaired surrogate escape at character {e.start})."
        ) from e
    return value


def _warn_about_duplicates(table: pd.DataFrame, data_path: str) -> None:
    """Logs a warning naming the records that repeat an earlier record's input and output."""
    repeated = table.duplicated(keep="first")
    if not repeated.any():
        return
    first_of = table.reset_index().groupby(list(table.columns))["index"].transform("first")
    pairs = [f"{i} (= {first_of[i]})" for i in table.index[repeated]]
    shown = ", ".join(pairs[:SHOWN_DUPLICATES]) + (", ..." if len(pairs) > SHOWN_DUPLICATES else "")
    logger.warning(
        "%s: %d duplicated records (same input and output text as an earlier record): %s. They "
        "are kept; a duplicate that lands in both the training and an evaluation set makes the "
        "scores look better than they are.",
        data_path,
        len(pairs),
        shown,
    )


def qa_table(
    raw_records: list[Any], data_path: str, input_text_key: str, output_text_key: str
) -> pd.DataFrame:
    """The validated question/answer table: columns `input_text` and `output_text`, one row per
    record, indexed by the record's position in the file.

    Every record must be an object whose two keys hold non-empty text; the first bad record is
    refused with its index and key. Duplicated records are kept and reported in a warning.

    :param raw_records: the records as parsed from the file.
    :param data_path: the file they came from (named in error messages).
    :param input_text_key: the key holding the model's input text (e.g. "question").
    :param output_text_key: the key holding the text the model should produce (e.g. "reply").
    """
    if not raw_records:
        raise DataError(f"{data_path}: holds no records.")
    if input_text_key == output_text_key:
        raise SettingsError(
            f"input_text_key and output_text_key are both {input_text_key!r}; they must differ."
        )
    for index, record in enumerate(raw_records):
        if not isinstance(record, dict):
            raise DataError(
                f"{data_path}: record {index} is {_json_kind(record)}, expected an object."
            )
    for key in (input_text_key, output_text_key):
        _check_key_exists(raw_records, key, data_path)
    rows = [
        [_text(record, key, index, data_path) for key in (input_text_key, output_text_key)]
        for index, record in enumerate(raw_records)
    ]
    table = pd.DataFrame(rows, columns=["input_text", "output_text"])
    _warn_about_duplicates(table, data_path)
    return table


def _split_sizes(n: int, train_size: float, validation_size: float) -> tuple[int, int, int]:
    """Sizes of the train, validation and hold-out sets for `n` records.

    The train set takes `floor(train_size * n)` records; the rest is split
    `floor(validation_size * rest)` to validation and the remainder to hold-out.
    """
    n_train = math.floor(train_size * n)
    n_validation = math.floor(validation_size * (n - n_train))
    return n_train, n_validation, n - n_train - n_validation


def _minimum_records(train_size: float, validation_size: float) -> int:
    """The fewest records that give every set at least one record."""
    n = 3
    while min(_split_sizes(n, train_size, validation_size)) < 1:
        n += 1
    return n


@extract_fields(
    {"train_set": pd.DataFrame, "validation_set": pd.DataFrame, "hold_out_set": pd.DataFrame}
)
def data_splits(
    qa_table: pd.DataFrame,
    data_path: str,
    random_state: int = 42,
    train_size: float | int = 0.95,
    validation_size: float | int = 0.8,
    split_strategy: str = "random",
) -> dict[str, pd.DataFrame]:
    """The train, validation and hold-out sets: disjoint slices of the table.

    :param qa_table: the validated table.
    :param data_path: the data file (named in error messages).
    :param random_state: seed of the shuffle; the same seed gives the same split.
    :param train_size: fraction of records used for training (default 0.95).
    :param validation_size: fraction of the remaining records used for validation (default 0.8);
        the rest is the hold-out set.
    :param split_strategy: "random" shuffles first; "last" keeps file order, so the validation
        and hold-out sets are the tail of the file.
    """
    for name, value in (("train_size", train_size), ("validation_size", validation_size)):
        if not 0 < value < 1:
            raise SettingsError(f"{name} must be between 0 and 1 (exclusive), got {value}.")
    if random_state < 0:
        raise SettingsError(f"random_state must be 0 or more, got {random_state}.")
    if split_strategy not in SPLIT_STRATEGIES:
        raise SettingsError(
            f"split_strategy must be one of {', '.join(SPLIT_STRATEGIES)}; got {split_strategy!r}."
        )
    n = len(qa_table)
    n_train, n_validation, n_hold_out = _split_sizes(n, train_size, validation_size)
    if min(n_train, n_validation, n_hold_out) < 1:
        needed = _minimum_records(train_size, validation_size)
        raise DataError(
            f"{data_path}: {n} records are too few for a train/validation/hold-out split with "
            f"train_size={train_size} and validation_size={validation_size}; "
            f"at least {needed} are needed."
        )
    if split_strategy == "random":
        order = np.random.default_rng(random_state).permutation(n)
    else:
        order = np.arange(n)
    return {
        "train_set": qa_table.iloc[order[:n_train]],
        "validation_set": qa_table.iloc[order[n_train : n_train + n_validation]],
        "hold_out_set": qa_table.iloc[order[n_train + n_validation :]],
    }


def _template_fields(prompt_template: str) -> list[str]:
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


def _context_text(record: dict[str, Any], keys: list[str], index: int, data_path: str) -> str:
    """The record's context: the texts under `keys` (each a string or a list of strings),
    one per line."""
    texts = []
    for key in keys:
        if key not in record:
            raise DataError(f"{data_path}: record {index} has no key {key!r}.")
        value = record[key]
        parts = value if isinstance(value, list) else [value]
        if not all(isinstance(part, str) for part in parts):
            raise DataError(
                f"{data_path}: record {index}, key {key!r}: expected text or a list of texts, "
                f"found {json.dumps(value)[:60]}."
            )
        texts.extend(parts)
    return "\n".join(texts)


def prompt_texts(
    qa_table: pd.DataFrame,
    raw_records: list[Any],
    data_path: str,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    context_key: str | list[str] | None = None,
) -> list[str]:
    """The text the model is given for each row of the table, in table order: the prompt
    template filled with the row's input text and context. By default the input text as it is.

    :param qa_table: the validated table (its index is the record's position in the file).
    :param raw_records: the records as parsed (the context is read from them).
    :param data_path: the data file (named in error messages).
    :param prompt_template: the prompt, with `{input}` where the input text goes and optionally
        `{context}` where the context goes, e.g. "Context: {context}\nQuestion: {input}\nAnswer:".
    :param context_key: key (or list of keys) of each record's context: a text or a list of
        texts (documents), joined one per line; requires `{context}` in the template.
    """
    fields = _template_fields(prompt_template)
    keys = [context_key] if isinstance(context_key, str) else list(context_key or [])
    if keys and "context" not in fields:
        raise SettingsError(
            f"context_key is set ({', '.join(map(repr, keys))}) but prompt_template "
            f"{prompt_template!r} has no {{context}} placeholder to put it in."
        )
    if "context" in fields and not keys:
        raise SettingsError(
            "prompt_template uses {context}; set context_key to the record key that holds it."
        )
    for key in keys:
        _check_key_exists(raw_records, key, data_path)
    return [
        prompt_template.format(
            input=text,
            context=_context_text(raw_records[index], keys, index, data_path) if keys else "",
        )
        for index, text in zip(qa_table.index, qa_table["input_text"], strict=True)
    ]
