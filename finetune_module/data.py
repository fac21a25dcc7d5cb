"""Data stage: raw records -> validated table -> train / validation / hold-out sets -> prompts.

Read top to bottom: the records are loaded, each record is checked and reduced to the two
configured keys (and the split column, if one is named), the table is split, by that column or
deterministically at random, and each input text is put in the prompt template.

Where the records come from is the driver config's `source`:
- `file` (the default, no config needed): `data_path` is a file, read by its extension: JSON
  (a list of objects, or JSON Lines), `.jsonl`/`.ndjson`, `.csv`, `.tsv`, `.parquet`; or a
  directory saved with Hugging Face `datasets`' `save_to_disk`.
- `sql`: `data_path` is a SQLAlchemy database URL (`sqlite:///data.db`,
  `postgresql://user@host/db`) and `sql_table` or `sql_query` says what to read.
The readers and the record checks are in `finetune_module.engine.sources` and `.records`.
"""

from typing import Any

import numpy as np
import pandas as pd
from hamilton.function_modifiers import cache, config, extract_fields

from finetune_module.engine import records as checks
from finetune_module.engine.records import DEFAULT_PROMPT_TEMPLATE, TEXT
from finetune_module.engine.run_info import records_fingerprint
from finetune_module.engine.settings import SplitSettings
from finetune_module.engine.sources import (
    json_kind,
    read_file_records,
    read_sql_records,
    sql_label,
)
from finetune_module.errors import DataError, SettingsError

SOURCES = ("file", "sql")  # values of the config key "source"


@cache(behavior="recompute")  # the file may have changed: always read, cache by its content
@config.when_not(source="sql")
def raw_records__file(data_path: str) -> list[Any]:
    """The records in the data file, as read: one per object, line or row.

    :param data_path: a `.json` file holding a list of objects (or JSON Lines), a `.jsonl`/
        `.ndjson` file, a `.csv`/`.tsv` file with a header line, a `.parquet` file, or a
        directory saved with Hugging Face `datasets`' `save_to_disk`.
    """
    return read_file_records(data_path)


@cache(behavior="recompute")  # the database may have changed: always read, cache by content
@config.when(source="sql")
def raw_records__sql(
    data_path: str, sql_table: str | None = None, sql_query: str | None = None
) -> list[Any]:
    """The rows of a database table, view or query, as records (column name -> value). The
    database is only ever read: nothing is written, whatever the query.

    :param data_path: a SQLAlchemy database URL: `sqlite:///data.db` (a file), or
        `postgresql://user:password@host:5432/dbname` (read with psycopg). A password is masked
        in every message; better keep it out of the URL (PGPASSWORD or ~/.pgpass).
    :param sql_table: the table or view to read, `name` or `schema.name`; rows come in
        primary-key order.
    :param sql_query: or one SELECT (or WITH ... SELECT) query, run read-only on SQLite or
        PostgreSQL; anything else is refused (add ORDER BY for a fixed row order). Give one of
        the two.
    """
    return read_sql_records(data_path, sql_table, sql_query)


@config.when_not(source="sql")
def data_label__file(data_path: str) -> str:
    """How messages name the data: the file's path."""
    return data_path


@config.when(source="sql")
def data_label__sql(
    data_path: str, sql_table: str | None = None, sql_query: str | None = None
) -> str:
    """How messages name the data: the database URL (password masked) and the table or query."""
    return sql_label(data_path, sql_table, sql_query)


def qa_table(
    raw_records: list[Any],
    data_label: str,
    input_text_key: str,
    output_text_key: str,
    split_column: str | None = None,
) -> pd.DataFrame:
    """The validated question/answer table: columns `input_text` and `output_text` (and `split`
    when a split column is named), one row per record, indexed by the record's position. The
    text columns are pandas `str` columns holding the records' own strings, not copies.

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
                f"{data_label}: record {index} is {json_kind(record)}, expected an object."
            )
    keys = (input_text_key, output_text_key)
    for key in (*keys, split_column) if split_column else keys:
        checks.check_key_exists(raw_records, key, data_label)
    inputs, outputs, splits = [], [], []
    for index, record in enumerate(raw_records):  # record by record: the first bad one is named
        inputs.append(checks.record_text(record, input_text_key, index, data_label))
        outputs.append(checks.record_text(record, output_text_key, index, data_label))
        if split_column:
            splits.append(checks.split_of(record, index, split_column, data_label))
    columns = {"input_text": inputs, "output_text": outputs}
    table = pd.DataFrame(columns | ({"split": splits} if split_column else {}), dtype=TEXT)
    checks.warn_about_duplicates(table, data_label)
    return table


def data_fingerprint(qa_table: pd.DataFrame) -> str:
    """A fingerprint of the data the run read: the sha256 (hex) of every record's input and
    output text, in the order read (and its split, when a split column is named). The same
    records give the same fingerprint, whichever file format or database they came from; any
    changed, added, removed or moved record changes it.

    :param qa_table: the validated table.
    """
    splits = qa_table["split"] if "split" in qa_table.columns else None
    return records_fingerprint(qa_table["input_text"], qa_table["output_text"], splits)


@extract_fields(
    {"train_set": pd.DataFrame, "validation_set": pd.DataFrame, "hold_out_set": pd.DataFrame}
)
def data_splits(
    qa_table: pd.DataFrame,
    data_label: str,
    split_settings: SplitSettings,
    split_column: str | None = None,
) -> dict[str, pd.DataFrame]:
    """The train, validation and hold-out sets: disjoint slices of the table, by the data's own
    split column when one is named, else by `split_settings` (sizes, seed, strategy).

    :param qa_table: the validated table.
    :param data_label: the source's name in error messages.
    :param split_settings: how to split: train_size, validation_size, random_state and
        split_strategy ("random" shuffles first; "last" holds out the tail of the file).
    :param split_column: when named, the data's own split is used instead (see qa_table).
    """
    if split_column:
        return checks.sets_by_column(qa_table, split_column, data_label)
    n, train_size, validation_size = (
        len(qa_table),
        split_settings.train_size,
        split_settings.validation_size,
    )
    n_train, n_validation, n_hold_out = checks.split_sizes(n, train_size, validation_size)
    if min(n_train, n_validation, n_hold_out) < 1:
        needed = checks.minimum_records(train_size, validation_size)
        raise DataError(
            f"{data_label}: {n} records are too few for a train/validation/hold-out split with "
            f"train_size={train_size} and validation_size={validation_size}; "
            f"at least {needed} are needed."
        )
    if split_settings.split_strategy == "random":
        order = np.random.default_rng(split_settings.random_state).permutation(n)
    else:
        order = np.arange(n)
    return {
        "train_set": qa_table.iloc[order[:n_train]],
        "validation_set": qa_table.iloc[order[n_train : n_train + n_validation]],
        "hold_out_set": qa_table.iloc[order[n_train + n_validation :]],
    }


def prompt_texts(
    qa_table: pd.DataFrame,
    raw_records: list[Any],
    data_label: str,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    context_key: str | list[str] | None = None,
) -> list[str]:
    """The text the model is given for each row of the table, in table order: the prompt
    template filled with the row's input text and context. By default the input text as it is
    (the table's own strings).

    :param qa_table: the validated table (its index is the record's position in the file).
    :param raw_records: the records as parsed (the context is read from them).
    :param data_label: the source's name in error messages.
    :param prompt_template: the prompt, with `{input}` where the input text goes and optionally
        `{context}` where the context goes, e.g. "Context: {context}\nQuestion: {input}\nAnswer:".
    :param context_key: key (or list of keys) of each record's context: a text or a list of
        texts (documents), joined one per line; requires `{context}` in the template.
    """
    fields = checks.template_fields(prompt_template)
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
        checks.check_key_exists(raw_records, key, data_label)
    if prompt_template == "{input}":  # the input texts themselves, not copies of them
        return list(qa_table["input_text"])
    return [
        prompt_template.format(
            input=text,
            context=checks.context_text(raw_records[index], keys, index, data_label)
            if keys
            else "",
        )
        for index, text in zip(qa_table.index, qa_table["input_text"], strict=True)
    ]
