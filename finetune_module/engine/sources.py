"""Reading records from where users keep them: data files by extension, or a SQL database.

A record is whatever one object, line or row holds (a dictionary, once it has been checked);
nothing here knows which keys the dataflow will read. Every problem is a `DataError` (or a
`SettingsError` for a missing optional package or driver) naming the file or database.

- `read_file_records(path)`: `.json` (a list of objects, or JSON Lines), `.jsonl`/`.ndjson`,
  `.csv`/`.tsv` with a header line, `.parquet`, or a directory saved with Hugging Face
  `datasets`' `save_to_disk`; any other extension is read as JSON.
- `read_sql_records(url, table, query)`: the rows of a table, view or SELECT query, through
  SQLAlchemy (SQLite built in, PostgreSQL with psycopg 3), never writing (`read_only_sql`).
"""

import codecs
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pandas as pd

from finetune_module.engine.read_only_sql import (
    allow_sqlite_reading_only,
    read_only_select,
    read_only_sqlite_url,
)
from finetune_module.errors import (
    EXTRAS_HINT,
    DataError,
    SettingsError,
    import_optional,
    mask_credentials,
)


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: "null", "a number", "an object", ..."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"))
    return next((kind for types, kind in kinds if isinstance(value, types)), "an object")


def read_text(data_path: str) -> str:
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


def _text_lines(data_path: str) -> Iterator[str]:
    """The file's lines, read and decoded one at a time (lines end at "\\n" only, as JSON
    Lines says; a UTF-8 byte order mark is dropped), with the errors of `read_text`: a missing,
    unreadable, empty or non-UTF-8 file is a clear DataError (the first problem in the file)."""
    if not os.path.exists(data_path):
        raise DataError(f"{data_path}: no such file.")
    if os.path.isdir(data_path):
        raise DataError(f"{data_path}: is a directory, expected a JSON or JSON Lines file.")
    offset, any_text = 0, False
    try:
        with open(data_path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):  # binary: split at b"\n" only
                if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw, offset = raw[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{data_path}: not UTF-8 text (byte {offset + e.start}, line "
                        f"{line_number}); save it as UTF-8."
                    ) from e
                offset += len(raw)
                any_text = any_text or bool(line.strip())
                yield line.removesuffix("\n")
    except OSError as e:
        raise DataError(f"{data_path}: cannot be read ({e.strerror}).") from e
    if not any_text:
        raise DataError(f"{data_path}: the file is empty.")


def _parse_json_lines(lines: Iterable[str], data_path: str) -> list[Any]:
    """One JSON value per non-empty line. Objects share their keys' strings (a file of a
    million records holds each key once, not a million times)."""
    records: list[Any] = []
    keys: dict[str, str] = {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = _loads(line, f"{data_path}: line {line_number}")
        except json.JSONDecodeError as e:
            raise DataError(
                f"{data_path}: line {line_number} is not valid JSON ({e.msg}, column {e.colno})."
            ) from e
        if type(value) is dict:
            value = {keys.setdefault(key, key): item for key, item in value.items()}
        records.append(value)
    return records


def _json_lines_records(data_path: str) -> list[Any]:
    """The records of a JSON Lines file (one object a line), read a line at a time."""
    return _parse_json_lines(_text_lines(data_path), data_path)


def _json_records(data_path: str) -> list[Any]:
    """The records of a JSON file: a list of objects, or JSON Lines."""
    text = read_text(data_path)
    try:
        parsed = _loads(text, data_path)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_json_lines(text.split("\n"), data_path)
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
            raise DataError(
                f"{data_path}: invalid JSON: the file ends before the JSON value is complete "
                f"(truncated?): {e.msg} (line {e.lineno}, column {e.colno})."
            ) from e
        raise DataError(
            f"{data_path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}."
        ) from e
    if not isinstance(parsed, list):
        raise DataError(f"{data_path}: expected a JSON list of objects, found {json_kind(parsed)}.")
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
#: The file extensions read as tables of records (any other file is read as JSON).
RECORD_FILE_SUFFIXES = tuple(_FILE_READERS)


def read_file_records(data_path: str) -> list[Any]:
    """The records in a data file (or a saved `datasets` directory), as read: one per object,
    line or row, in file order."""
    if not os.path.exists(data_path):
        raise DataError(f"{data_path}: no such file.")
    if os.path.isdir(data_path):
        return _saved_dataset_records(data_path)
    extension = os.path.splitext(data_path)[1].lower()
    return _FILE_READERS.get(extension, _json_records)(data_path)


def sql_label(data_path: str, sql_table: str | None, sql_query: str | None) -> str:
    """The database URL with its password masked, and what is read from it."""
    what = f"table {sql_table!r}" if sql_table else f"query {' '.join(str(sql_query).split())!r}"
    return f"{mask_credentials(data_path)} {what}"


def _driver_reason(error: Exception, password: str | None) -> str:
    """The first line of a database driver's error, with the password (if any) masked."""
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    reason = re.sub(r"\s*\(Background on this error at: [^)]*\)", "", reason)  # SQLAlchemy's
    if password:
        reason = reason.replace(password, "***")
    return mask_credentials(reason)


def _table_name(sql_table: str, label: str) -> tuple[str | None, str]:
    """The schema (None: the default one) and the name in `table` or `schema.table`."""
    parts = sql_table.split(".")
    if len(parts) > 2 or not all(parts):
        raise DataError(
            f"{label}: expected `table` or `schema.table` (to read a name with a dot in it, "
            "give sql_query with the name in double quotes)."
        )
    return (parts[0] if len(parts) == 2 else None), parts[-1]


def _table_select(connection: Any, sql_table: str, label: str) -> Any:
    """A SELECT of every row of the table or view, in primary-key order (so that the same seed
    gives the same split), its name quoted by SQLAlchemy's reflection."""
    import sqlalchemy
    from sqlalchemy import exc

    schema, name = _table_name(sql_table, label)
    inspector = sqlalchemy.inspect(connection)
    if schema is not None and schema not in (schemas := inspector.get_schema_names()):
        raise DataError(
            f"{label}: no schema named {schema!r}; found: {', '.join(map(repr, schemas))}."
        )
    try:
        table = sqlalchemy.Table(
            name, sqlalchemy.MetaData(), schema=schema, autoload_with=connection
        )
    except exc.NoSuchTableError as e:
        found = sorted(
            inspector.get_table_names(schema=schema) + inspector.get_view_names(schema=schema)
        )
        raise DataError(
            f"{label}: no table or view named {sql_table!r}; "
            f"found: {', '.join(map(repr, found)) or 'none'}."
        ) from e
    return sqlalchemy.select(table).order_by(*table.primary_key.columns)


def _database_url(data_path: str) -> Any:
    """The SQLAlchemy URL of `data_path` (PostgreSQL through psycopg 3, which we ship; the
    default would be psycopg2), or a DataError saying it is not a database URL."""
    import sqlalchemy
    from sqlalchemy import exc

    try:
        url = sqlalchemy.engine.make_url(data_path)
    except exc.ArgumentError as e:
        raise DataError(
            f"{mask_credentials(data_path)}: not a database URL; expected e.g. "
            "sqlite:///data.db or postgresql://user@localhost/dbname."
        ) from e
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url


def read_sql_records(
    data_path: str, sql_table: str | None = None, sql_query: str | None = None
) -> list[dict[str, Any]]:
    """The rows of a table or view (in primary-key order) or of a query (give exactly one of
    the two), read through SQLAlchemy from the database at the URL `data_path`, as
    dictionaries of column name -> value.

    Nothing is ever written: a query must be one SELECT (or WITH ... SELECT) and is read only
    from SQLite (opened read-only, reading only) or PostgreSQL (psycopg, a READ ONLY
    transaction), always rolled back; see `read_only_sql`."""
    if bool(sql_table) == bool(sql_query):
        raise SettingsError(
            "With {'source': 'sql'}, give exactly one of sql_table (a table or view) and "
            "sql_query (a SELECT query)."
        )
    label = sql_label(data_path, sql_table, sql_query)
    sqlalchemy = import_optional("sqlalchemy", "Reading from a database")
    from sqlalchemy import exc

    url = _database_url(data_path)
    sqlite = url.drivername in ("sqlite", "sqlite+pysqlite")
    postgres = url.drivername == "postgresql+psycopg"
    query = None
    if sql_query:
        if not (sqlite or postgres):
            raise SettingsError(
                f"{label}: a query is read only from SQLite or PostgreSQL (with psycopg), where "
                f"it runs read-only; from {url.drivername!r}, give sql_table (a table or view)."
            )
        query = read_only_select(sql_query, label, postgres=postgres)
    sqlite_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    if sqlite_file and not os.path.isfile(url.database):  # sqlite would create an empty one
        raise DataError(f"{label}: no such database file {url.database!r}.")
    if sqlite and sqlite_file:
        url = read_only_sqlite_url(url)
    try:  # psycopg: every statement prepared (one statement each, the server makes sure)
        engine = sqlalchemy.create_engine(
            url, **({"connect_args": {"prepare_threshold": 0}} if postgres else {})
        )
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
            try:
                if postgres:  # BEGIN READ ONLY
                    connection.execution_options(postgresql_readonly=True)
                if sql_table:
                    statement = _table_select(connection, sql_table, label)
                else:
                    statement = sqlalchemy.text(query)
                if sqlite:
                    allow_sqlite_reading_only(connection.connection.driver_connection)
                return [dict(row) for row in connection.execute(statement).mappings()]
            except exc.DBAPIError as e:
                raise DataError(
                    f"{label}: the database refused the query: {_driver_reason(e, url.password)}"
                ) from e
            except exc.StatementError as e:  # SQLAlchemy's own: a :name with no value
                raise DataError(
                    f"{label}: cannot run the query: {_driver_reason(e, url.password)} "
                    "(SQLAlchemy reads :name as a parameter; write \\:name for a colon)."
                ) from e
            finally:
                connection.rollback()
    finally:
        engine.dispose()
