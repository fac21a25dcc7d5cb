"""Data stage: raw records -> validated table -> train / validation / hold-out sets.

Read top to bottom: the records are loaded, each record is checked and reduced to the two
configured keys (and the split column, if one is named), and the table is split, by that
column or deterministically at random.

Where the records come from is the driver config's `source`:
- `file` (the default, no config needed): `data_path` is a file, read by its extension: JSON
  (a list of objects, or JSON Lines), `.jsonl`/`.ndjson`, `.csv`, `.tsv`, `.parquet`; or a
  directory saved with Hugging Face `datasets`' `save_to_disk`.
- `sql`: `data_path` is a SQLAlchemy database URL (`sqlite:///data.db`,
  `postgresql://user@host/db`) and `sql_table` or `sql_query` says what to read.
"""

import functools
import json
import logging
import math
import os
import string
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from hamilton.function_modifiers import cache, config, extract_fields

from finetune_module.errors import (
    EXTRAS_HINT,
    DataError,
    SettingsError,
    import_optional,
    mask_credentials,
)

SOURCES = ("file", "sql")
SPLIT_STRATEGIES = ("random", "last")
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


def _json_lines_records(data_path: str) -> list[Any]:
    """The records of a JSON Lines file (one object a line)."""
    return _parse_json_lines(_read_text(data_path), data_path)


def _json_records(data_path: str) -> list[Any]:
    """The records of a JSON file: a list of objects, or JSON Lines."""
    text = _read_text(data_path)
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


def _csv_records(data_path: str, separator: str = ",") -> list[Any]:
    """The rows of a CSV (or TSV) file with a header line, every cell read as text."""
    try:
        table = pd.read_csv(
            data_path, sep=separator, dtype=str, keep_default_na=False, encoding="utf-8"
        )
    except UnicodeDecodeError as e:
        raise DataError(f"{data_path}: not UTF-8 text (byte {e.start}); save it as UTF-8.") from e
    except pd.errors.EmptyDataError:
        return []
    except pd.errors.ParserError as e:
        raise DataError(f"{data_path}: not a valid CSV file ({str(e).strip()}).") from e
    return table.to_dict("records")


def _parquet_records(data_path: str) -> list[Any]:
    """The rows of a Parquet file."""
    parquet = import_optional("pyarrow.parquet", "Reading a Parquet file")
    try:
        return parquet.read_table(data_path).to_pylist()
    except (OSError, ValueError) as e:
        raise DataError(f"{data_path}: not a readable Parquet file ({e}).") from e


def _saved_dataset_records(data_path: str) -> list[Any]:
    """The rows of a Hugging Face dataset saved with `save_to_disk`. A DatasetDict's splits are
    read in order and each row gets its split's name under the key `split` (unless it has one).
    """
    datasets = import_optional("datasets", "Reading a saved Hugging Face dataset")
    try:
        loaded = datasets.load_from_disk(data_path)
    except FileNotFoundError as e:
        raise DataError(
            f"{data_path}: is a directory but not a dataset saved with `save_to_disk` "
            "(expected a JSON, JSON Lines, CSV or Parquet file, or such a directory)."
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        return [{"split": name, **row} for name, split in loaded.items() for row in split.to_list()]
    return loaded.to_list()


# file extension -> reader; any other extension is read as JSON
_FILE_READERS: dict[str, Callable[[str], list[Any]]] = {
    ".json": _json_records,
    ".jsonl": _json_lines_records,
    ".ndjson": _json_lines_records,
    ".csv": _csv_records,
    ".tsv": functools.partial(_csv_records, separator="\t"),
    ".parquet": _parquet_records,
}


@cache(behavior="recompute")  # the file may have changed: always read, cache by its content
@config.when_not(source="sql")
def raw_records__file(data_path: str) -> list[Any]:
    """The records in the data file, as read: one per object, line or row.

    :param data_path: a `.json` file holding a list of objects (or JSON Lines), a `.jsonl`/
        `.ndjson` file, a `.csv`/`.tsv` file with a header line, a `.parquet` file, or a
        directory saved with Hugging Face `datasets`' `save_to_disk`.
    """
    if not os.path.exists(data_path):
        raise DataError(f"{data_path}: no such file.")
    if os.path.isdir(data_path):
        return _saved_dataset_records(data_path)
    extension = os.path.splitext(data_path)[1].lower()
    return _FILE_READERS.get(extension, _json_records)(data_path)


def _sql_label(data_path: str, sql_table: str | None, sql_query: str | None) -> str:
    """The database URL with its password masked, and what is read from it."""
    what = f"table {sql_table!r}" if sql_table else f"query {' '.join(str(sql_query).split())!r}"
    return f"{mask_credentials(data_path)} {what}"


def _driver_reason(error: Exception, password: str | None) -> str:
    """The first line of a database driver's error, with the password (if any) masked."""
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    if password:
        reason = reason.replace(password, "***")
    return mask_credentials(reason)


def _sql_rows(
    data_path: str, sql_table: str | None, sql_query: str | None, label: str
) -> list[dict[str, Any]]:
    """The rows of the table, view or query, read through SQLAlchemy, as dictionaries."""
    sqlalchemy = import_optional("sqlalchemy", "Reading from a database")
    from sqlalchemy import exc

    try:
        url = sqlalchemy.engine.make_url(data_path)
    except exc.ArgumentError as e:
        raise DataError(
            f"{mask_credentials(data_path)}: not a database URL; expected e.g. "
            "sqlite:///data.db or postgresql://user@localhost/dbname."
        ) from e
    if url.drivername == "postgresql":  # SQLAlchemy's default is psycopg2; we ship psycopg 3
        url = url.set(drivername="postgresql+psycopg")
    sqlite_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    if sqlite_file and not os.path.isfile(url.database):  # sqlite would create an empty one
        raise DataError(f"{label}: no such database file {url.database!r}.")
    try:
        engine = sqlalchemy.create_engine(url)
    except (exc.NoSuchModuleError, ImportError) as e:
        raise SettingsError(
            f"{label}: no database driver for {url.drivername!r} ({e}); {EXTRAS_HINT}."
        ) from e
    try:
        try:
            connection = engine.connect()
        except exc.DBAPIError as e:
            raise DataError(
                f"{label}: cannot connect to the database: {_driver_reason(e, url.password)}"
            ) from e
        with connection:
            if sql_table:
                schema, _, name = sql_table.rpartition(".")
                try:
                    table = sqlalchemy.Table(
                        name, sqlalchemy.MetaData(), schema=schema or None, autoload_with=connection
                    )
                except exc.NoSuchTableError as e:
                    inspector = sqlalchemy.inspect(connection)
                    found = sorted(
                        inspector.get_table_names(schema=schema or None)
                        + inspector.get_view_names(schema=schema or None)
                    )
                    raise DataError(
                        f"{label}: no table or view named {sql_table!r}; "
                        f"found: {', '.join(map(repr, found)) or 'none'}."
                    ) from e
                # a table is read in primary-key order, so that the same seed gives the same split
                statement = sqlalchemy.select(table).order_by(*table.primary_key.columns)
            else:
                statement = sqlalchemy.text(sql_query)
            try:
                return [dict(row) for row in connection.execute(statement).mappings()]
            except exc.DBAPIError as e:
                raise DataError(
                    f"{label}: the database refused the query: {_driver_reason(e, url.password)}"
                ) from e
    finally:
        engine.dispose()


@cache(behavior="recompute")  # the database may have changed: always read, cache by content
@config.when(source="sql")
def raw_records__sql(
    data_path: str, sql_table: str | None = None, sql_query: str | None = None
) -> list[Any]:
    """The rows of a database table, view or query, as records (column name -> value).

    :param data_path: a SQLAlchemy database URL: `sqlite:///data.db` (a file), or
        `postgresql://user:password@host:5432/dbname` (read with psycopg). A password is masked
        in every message; better keep it out of the URL (PGPASSWORD or ~/.pgpass).
    :param sql_table: the table or view to read, `name` or `schema.name`; rows come in
        primary-key order.
    :param sql_query: or a SELECT query (add ORDER BY for a fixed row order). Give one of the two.
    """
    if bool(sql_table) == bool(sql_query):
        raise SettingsError(
            "With {'source': 'sql'}, give exactly one of sql_table (a table or view) and "
            "sql_query (a SELECT query)."
        )
    return _sql_rows(data_path, sql_table, sql_query, _sql_label(data_path, sql_table, sql_query))


@config.when_not(source="sql")
def data_label__file(data_path: str) -> str:
    """How messages name the data: the file's path."""
    return data_path


@config.when(source="sql")
def data_label__sql(
    data_path: str, sql_table: str | None = None, sql_query: str | None = None
) -> str:
    """How messages name the data: the database URL (password masked) and the table or query."""
    return _sql_label(data_path, sql_table, sql_query)


def _check_key_exists(records: list[dict[str, Any]], key: str, data_label: str) -> None:
    """Refuses a key that no record has, naming the keys that do exist."""
    if any(key in r for r in records):
        return
    seen = list(dict.fromkeys(k for r in records for k in r))
    raise DataError(
        f"{data_label}: no record has the key {key!r}; keys found: {', '.join(map(repr, seen))}."
    )


def _shown(value: Any) -> str:
    """A short rendering of a value for an error message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text[:60]


def _text(record: dict[str, Any], key: str, index: int, data_label: str) -> str:
    """The record's non-empty text under `key`, or an error naming the file, record and key."""
    if key not in record:
        raise DataError(f"{data_label}: record {index} has no key {key!r}.")
    value = record[key]
    if not isinstance(value, str):
        shown = "" if value is None else f" ({_shown(value)})"
        raise DataError(
            f"{data_label}: record {index}, key {key!r}: expected text, "
            f"found {_json_kind(value)}{shown}."
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


def _warn_about_duplicates(table: pd.DataFrame, data_label: str) -> None:
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
        data_label,
        len(pairs),
        shown,
    )


def qa_table(
    raw_records: list[Any],
    data_label: str,
    input_text_key: str,
    output_text_key: str,
    split_column: str | None = None,
) -> pd.DataFrame:
    """The validated question/answer table: columns `input_text` and `output_text` (and `split`
    when a split column is named), one row per record, indexed by the record's position.

    Every record must be an object whose two keys hold non-empty text; the first bad record is
    refused with its index and key. Duplicated records are kept and reported in a warning.

    :param raw_records: the records as parsed from the file.
    :param data_label: the source's name in error messages.
    :param input_text_key: the key holding the model's input text (e.g. "question").
    :param output_text_key: the key holding the text the model should produce (e.g. "reply").
    :param split_column: a key whose value puts each record in a set: train; validation (or
        valid, val, dev); test (or hold_out, holdout) for the hold-out set. Default: none, the
        split is made by split_strategy.
    """
    if not raw_records:
        raise DataError(f"{data_label}: holds no records.")
    if input_text_key == output_text_key:
        raise SettingsError(
            f"input_text_key and output_text_key are both {input_text_key!r}; they must differ."
        )
    for index, record in enumerate(raw_records):
        if not isinstance(record, dict):
            raise DataError(
                f"{data_label}: record {index} is {_json_kind(record)}, expected an object."
            )
    keys = (input_text_key, output_text_key)
    for key in (*keys, split_column) if split_column else keys:
        _check_key_exists(raw_records, key, data_label)
    rows = [
        [_text(record, key, index, data_label) for key in keys]
        + ([_split_of(record, index, split_column, data_label)] if split_column else [])
        for index, record in enumerate(raw_records)
    ]
    columns = ["input_text", "output_text", "split"]
    table = pd.DataFrame(rows, columns=columns[: len(rows[0])])
    _warn_about_duplicates(table, data_label)
    return table


def _split_of(record: dict[str, Any], index: int, split_column: str, data_label: str) -> str:
    """The set a record's split column puts it in: train, validation or hold_out."""
    value = record.get(split_column)
    split = SPLIT_VALUES.get(value.strip().lower()) if isinstance(value, str) else None
    if split is None:
        raise DataError(
            f"{data_label}: record {index}, split column {split_column!r}: {_shown(value)} is not "
            f"a split; use one of {', '.join(SPLIT_VALUES)}."
        )
    return split


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


def _sets_by_column(
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


@extract_fields(
    {"train_set": pd.DataFrame, "validation_set": pd.DataFrame, "hold_out_set": pd.DataFrame}
)
def data_splits(
    qa_table: pd.DataFrame,
    data_label: str,
    random_state: int = 42,
    train_size: float | int = 0.95,
    validation_size: float | int = 0.8,
    split_strategy: str = "random",
    split_column: str | None = None,
) -> dict[str, pd.DataFrame]:
    """The train, validation and hold-out sets: disjoint slices of the table.

    :param qa_table: the validated table.
    :param data_label: the source's name in error messages.
    :param random_state: seed of the shuffle; the same seed gives the same split.
    :param train_size: fraction of records used for training (default 0.95).
    :param validation_size: fraction of the remaining records used for validation (default 0.8);
        the rest is the hold-out set.
    :param split_strategy: "random" shuffles first; "last" keeps file order, so the validation
        and hold-out sets are the tail of the file.
    :param split_column: when named, the data's own split is used instead (see qa_table).
    """
    if split_column:
        return _sets_by_column(qa_table, split_column, data_label)
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
            f"{data_label}: {n} records are too few for a train/validation/hold-out split with "
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


def _context_text(record: dict[str, Any], keys: list[str], index: int, data_label: str) -> str:
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
                f"found {_shown(value)}."
            )
        texts.extend(parts)
    return "\n".join(texts)


def prompt_texts(
    qa_table: pd.DataFrame,
    raw_records: list[Any],
    data_label: str,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    context_key: str | list[str] | None = None,
) -> list[str]:
    """The text the model is given for each row of the table, in table order: the prompt
    template filled with the row's input text and context. By default the input text as it is.

    :param qa_table: the validated table (its index is the record's position in the file).
    :param raw_records: the records as parsed (the context is read from them).
    :param data_label: the source's name in error messages.
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
        _check_key_exists(raw_records, key, data_label)
    return [
        prompt_template.format(
            input=text,
            context=_context_text(raw_records[index], keys, index, data_label) if keys else "",
        )
        for index, text in zip(qa_table.index, qa_table["input_text"], strict=True)
    ]
