"""Fine-tuning straight from a real PostgreSQL table (and a view, a query, refused credentials);
a source is never written to, whatever the query.

`.ci/run` installs Debian's PostgreSQL, starts it on localhost and exports
FINETUNE_TEST_POSTGRES_URL; where no server is reachable these tests skip and say why.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_module.engine import sources
from finetune_module.engine.sources import read_sql_records
from finetune_module.errors import DataError, SettingsError, mask_credentials
from tests.conftest import EXAMPLE_DATA, QUICK, data_stage, read_json, run_dag

URL_VARIABLE = "FINETUNE_TEST_POSTGRES_URL"
TABLE = "finetune_test_qa"


@pytest.fixture(scope="module")
def postgres_url() -> str:
    """The test database's URL, with a table of the example data (ids in reverse file order,
    a `fold` split column) and a view on it."""
    url = os.environ.get(URL_VARIABLE)
    if not url:
        pytest.skip(f"no PostgreSQL server: {URL_VARIABLE} is not set (.ci/run starts one)")
    sqlalchemy = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(f"DROP VIEW IF EXISTS {TABLE}_view")
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS {TABLE}")
            connection.exec_driver_sql(
                f"CREATE TABLE {TABLE} (id integer PRIMARY KEY, question text, reply text, "
                "fold text)"
            )
            records = read_json(EXAMPLE_DATA)
            rows = [
                {"id": i, "question": r["question"], "reply": r["reply"], "fold": _fold(i)}
                for i, r in enumerate(records)
            ]
            connection.execute(
                sqlalchemy.text(f"INSERT INTO {TABLE} VALUES (:id, :question, :reply, :fold)"),
                rows[::-1],
            )
            connection.exec_driver_sql(
                f"CREATE VIEW {TABLE}_view AS SELECT question, reply FROM {TABLE} "
                "WHERE fold = 'train'"
            )
    except sqlalchemy.exc.OperationalError as e:
        pytest.skip(f"no PostgreSQL server reachable at {URL_VARIABLE}: {e.orig}")
    finally:
        engine.dispose()
    return url


def _fold(i: int) -> str:
    return "validation" if i % 10 == 1 else "test" if i % 20 == 2 else "train"


def test_fine_tune_from_a_postgres_table(
    postgres_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = run_dag(
        "base",
        source="sql",
        data_path=postgres_url,
        sql_table=TABLE,
        split_column="fold",
        model_id=str(tiny_model_dir),
        output_dir=str(tmp_path),
        **QUICK,
    )
    records = read_json(EXAMPLE_DATA)
    hold_out = [r["question"] for i, r in enumerate(records) if _fold(i) == "test"]
    assert [question for question, _, _ in result["hold_out_set_predictions"]] == hold_out
    metrics = result["training_and_validation_set_metrics"]
    assert metrics["global_step"] == QUICK["max_steps"] and "rougeL" in metrics
    assert (tmp_path / "best_model" / "adapter_model.safetensors").is_file()


def test_view_and_query(postgres_url: str, tiny_model_dir: Path) -> None:
    n_train = sum(_fold(i) == "train" for i in range(len(read_json(EXAMPLE_DATA))))
    view = data_stage(
        "sql",
        data_path=postgres_url,
        sql_table=f"public.{TABLE}_view",
        model_id=str(tiny_model_dir),
    )
    assert len(view["qa_table"]) == n_train
    query = data_stage(
        "sql",
        data_path=postgres_url,
        sql_query=f"SELECT question, reply FROM {TABLE} WHERE fold = 'train' ORDER BY id DESC",
        model_id=str(tiny_model_dir),
    )
    records = read_json(EXAMPLE_DATA)
    in_order = [r["question"] for i, r in enumerate(records) if _fold(i) == "train"]
    assert list(query["qa_table"]["input_text"]) == in_order[::-1]
    assert sorted(view["qa_table"]["input_text"]) == sorted(in_order)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("finetune:finetune@", "finetune:wrong-pw@"), "password authentication failed"),
        (("/finetune_test", "/no_such_db"), 'database "no_such_db" does not exist'),
    ],
)
def test_refused_credentials_and_missing_things_are_clear(
    postgres_url: str, change: tuple[str, str], expected: str
) -> None:
    url = postgres_url.replace(*change)
    with pytest.raises(DataError) as raised:
        data_stage("sql", data_path=url, sql_table=TABLE)
    message = str(raised.value)
    assert "cannot connect to the database" in message and expected in message
    assert "wrong-pw" not in message and ":***@" in message


def test_missing_table_and_column(postgres_url: str) -> None:
    with pytest.raises(DataError, match=rf"no table or view named 'qa'; found: .*'{TABLE}'"):
        data_stage("sql", data_path=postgres_url, sql_table="qa")
    with pytest.raises(DataError, match="no record has the key 'reply'; keys found: 'question'"):
        data_stage("sql", data_path=postgres_url, sql_query=f"SELECT question FROM {TABLE}")
    with pytest.raises(DataError, match='the database refused the query: column "nope"'):
        data_stage("sql", data_path=postgres_url, sql_query=f"SELECT nope FROM {TABLE}")


# --- sources are read-only ----------------------------------------------------------------------

SCHEMA = "finetune_read_only"  # the read-only tests' own schema: a table, a view, a sequence
ODD_NAME = 'odd "name"; DROP TABLE qa; --'


def _engine(url: str) -> Any:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    return sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


@pytest.fixture(scope="module")
def read_only_url(postgres_url: str) -> Iterator[str]:
    """The test database's URL, with the schema `finetune_read_only` holding a table `qa` (two
    rows), a view on it, a sequence and a table with an odd name (dropped afterwards)."""
    engine = _engine(postgres_url)
    odd = '"' + ODD_NAME.replace('"', '""') + '"'
    try:
        with engine.begin() as connection:
            for statement in (
                f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE",
                f"CREATE SCHEMA {SCHEMA}",
                f"CREATE TABLE {SCHEMA}.qa (id integer PRIMARY KEY, question text, reply text)",
                f"INSERT INTO {SCHEMA}.qa VALUES (1, 'How do I reset it?', 'Hold the button.'), "
                "(2, 'Is it safe?', 'Yes; it is.')",
                f"CREATE VIEW {SCHEMA}.qa_view AS SELECT question, reply FROM {SCHEMA}.qa",
                f"CREATE SEQUENCE {SCHEMA}.ids",
                f"CREATE TABLE {SCHEMA}.{odd} (a text)",
                f"INSERT INTO {SCHEMA}.{odd} VALUES ('x')",
            ):
                connection.exec_driver_sql(statement)
        yield postgres_url
        with engine.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {SCHEMA} CASCADE")
    finally:
        engine.dispose()


def _state(url: str) -> dict[str, Any]:
    """Everything a write could change: the schema's objects and columns, the rows, the
    sequence, and the schemas whose names start with ours."""
    engine = _engine(url)
    queries = {
        "objects": "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
        f"ON n.oid = c.relnamespace WHERE n.nspname = '{SCHEMA}' ORDER BY 1",
        "columns": "SELECT table_name, column_name, data_type FROM information_schema.columns "
        f"WHERE table_schema = '{SCHEMA}' ORDER BY 1, 2",
        "rows": f"SELECT * FROM {SCHEMA}.qa ORDER BY id",
        "sequence": f"SELECT last_value, is_called FROM {SCHEMA}.ids",
        "schemas": f"SELECT nspname FROM pg_namespace WHERE nspname LIKE '{SCHEMA}%%' ORDER BY 1",
    }
    try:
        with engine.connect() as connection:
            return {
                name: [tuple(row) for row in connection.exec_driver_sql(query)]
                for name, query in queries.items()
            }
    finally:
        engine.dispose()


S = SCHEMA
WRITES = [
    (f"DROP TABLE {S}.qa", "the query starts with 'DROP'"),
    (f"CREATE TABLE {S}.copy (a int)", "the query starts with 'CREATE'"),
    (f"CREATE SCHEMA {S}_2", "the query starts with 'CREATE'"),
    (f"INSERT INTO {S}.qa VALUES (3, 'q', 'r')", "the query starts with 'INSERT'"),
    (f"UPDATE {S}.qa SET reply = 'changed'", "the query starts with 'UPDATE'"),
    (f"DELETE FROM {S}.qa", "the query starts with 'DELETE'"),
    (f"TRUNCATE {S}.qa", "the query starts with 'TRUNCATE'"),
    (f"ALTER TABLE {S}.qa ADD COLUMN extra int", "the query starts with 'ALTER'"),
    (f"DO $$ BEGIN DELETE FROM {S}.qa; END $$", "the query starts with 'DO'"),
    (
        f"WITH gone AS (DELETE FROM {S}.qa RETURNING *) SELECT * FROM gone",
        "the query contains DELETE",
    ),
    (
        f"WITH n AS (INSERT INTO {S}.qa VALUES (3, 'q', 'r') RETURNING *) SELECT 1",
        "the query contains INSERT",
    ),
    (
        f"WITH c AS (UPDATE {S}.qa SET reply = 'x' RETURNING *) SELECT * FROM c",
        "the query contains UPDATE",
    ),
    (f"SELECT * INTO {S}.copy FROM {S}.qa", "the query contains INTO, which writes"),
    (f"SELECT 1; COMMIT; DROP TABLE {S}.qa", "more than one statement"),
]
TRICKS = [
    (f"SELECT 1; DROP TABLE {S}.qa", "more than one statement"),
    (f"SELECT 1 /* ; */ ; DROP TABLE {S}.qa", "more than one statement"),
    (f"SELECT 1 -- a comment\n; DROP TABLE {S}.qa", "more than one statement"),
    (f"SELECT $$;$$; DROP TABLE {S}.qa", "more than one statement"),
    (f"SELECT 'a\\' ; DROP TABLE {S}.qa; --'", "more than one statement"),
    (f"SELECT 'a\\'' ; DROP TABLE {S}.qa; --'", "more than one statement"),
    (f"/* SELECT */ DROP TABLE {S}.qa", "the query starts with 'DROP'"),
    ("SET default_transaction_read_only = off", "the query starts with 'SET'"),
    ("COMMIT", "the query starts with 'COMMIT'"),
    (f"EXPLAIN ANALYZE DELETE FROM {S}.qa", "the query starts with 'EXPLAIN'"),
    (f"COPY {S}.qa TO STDOUT", "the query starts with 'COPY'"),
]


@pytest.mark.parametrize(("query", "reason"), WRITES + TRICKS)
def test_anything_but_one_select_is_refused_and_the_database_is_unchanged(
    read_only_url: str, query: str, reason: str
) -> None:
    before = _state(read_only_url)
    with pytest.raises(SettingsError) as raised:
        read_sql_records(read_only_url, sql_query=query)
    message = str(raised.value)
    assert message.startswith(f"{mask_credentials(read_only_url)} query ")
    assert f": {reason}" in message and "\n" not in message
    assert _state(read_only_url) == before


@pytest.mark.parametrize(
    "query",
    [
        *(query for query, _ in WRITES),
        f"SELECT nextval('{S}.ids')",  # a SELECT that writes: only the server can tell
        f"SELECT * FROM {S}.qa FOR SHARE",
    ],
)
def test_the_server_refuses_writes_even_when_the_check_is_fooled(
    read_only_url: str, query: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: with the query check switched off, the READ ONLY transaction (and the
    one-statement prepared query) still refuse every write, and nothing changes."""
    monkeypatch.setattr(sources, "read_only_select", lambda query, label, postgres: query)
    before = _state(read_only_url)
    refused = (
        "the database refused the query: (cannot execute .* in a read-only transaction"
        "|cannot insert multiple commands into a prepared statement)"
    )
    with pytest.raises(DataError, match=refused):
        read_sql_records(read_only_url, sql_query=query)
    assert _state(read_only_url) == before


@pytest.mark.parametrize(
    "query",
    [
        f"SELECT question, reply FROM {S}.qa ORDER BY id",
        f"WITH t AS (SELECT * FROM {S}.qa) SELECT question, reply FROM t ORDER BY id;",
        f"(SELECT question, reply FROM {S}.qa ORDER BY id) -- the end",
        f"SELECT question, reply FROM {S}.qa WHERE reply <> 'C:\\' ORDER BY id",
        f"SELECT question, reply FROM {S}.qa WHERE reply <> $$;DROP$$ AND reply <> E'\\';' "
        "ORDER BY id;;",
        f'SELECT "question", reply, \'insert; into\' AS "update" FROM {S}.qa_view',
    ],
)
def test_a_select_still_reads(read_only_url: str, query: str) -> None:
    before = _state(read_only_url)
    rows = read_sql_records(read_only_url, sql_query=query)
    assert [(r["question"], r["reply"]) for r in rows] == [
        ("How do I reset it?", "Hold the button."),
        ("Is it safe?", "Yes; it is."),
    ]
    assert _state(read_only_url) == before


@pytest.mark.parametrize(
    ("sql_table", "reason"),
    [
        ("a.b.c", "expected `table` or `schema.table`"),
        (f"{S}.", "expected `table` or `schema.table`"),
        ("no_such_schema.qa", "no schema named 'no_such_schema'; found: "),
        (f"{S}.missing", f"no table or view named '{S}.missing'; found: {ODD_NAME!r}, 'qa', "),
    ],
)
def test_a_table_name_that_names_nothing_gets_one_line(
    read_only_url: str, sql_table: str, reason: str
) -> None:
    with pytest.raises(DataError) as raised:
        read_sql_records(read_only_url, sql_table=sql_table)
    message = str(raised.value)
    assert message.startswith(f"{mask_credentials(read_only_url)} table {sql_table!r}: {reason}")
    assert "\n" not in message


def test_a_table_with_an_odd_name_is_read_by_its_quoted_name(read_only_url: str) -> None:
    before = _state(read_only_url)
    assert read_sql_records(read_only_url, sql_table=f"{S}.{ODD_NAME}") == [{"a": "x"}]
    assert _state(read_only_url) == before
