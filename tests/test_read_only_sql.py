"""Sources are read-only: a query that is not one SELECT is refused before it reaches the
database, and the database itself refuses writes should that check ever be fooled. SQLite here
(through the real driver); PostgreSQL in tests/test_postgres.py; the command line in
tests/test_cli.py."""

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from finetune_module.engine import sources
from finetune_module.engine.read_only_sql import read_only_select
from finetune_module.engine.sources import read_sql_records
from finetune_module.errors import DataError, SettingsError

pytest.importorskip("sqlalchemy")

ROWS = [(1, "How do I reset it?", "Hold the button."), (2, "Is it safe?", "Yes; it is.")]
ODD_NAME = 'odd "name"; DROP TABLE qa; --'


def _quoted(name: str) -> str:
    """A SQLite name in double quotes."""
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A SQLite file with a table `qa`, a view on it and a table with an odd name."""
    path = tmp_path / "qa.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE qa (id INTEGER PRIMARY KEY, question TEXT, reply TEXT)")
        connection.executemany("INSERT INTO qa VALUES (?, ?, ?)", ROWS)
        connection.execute("CREATE VIEW qa_view AS SELECT question, reply FROM qa")
        connection.execute(f"CREATE TABLE {_quoted(ODD_NAME)} (a TEXT)")
        connection.execute(f"INSERT INTO {_quoted(ODD_NAME)} VALUES (?)", ("x",))
    connection.close()
    return path


def _state(path: Path) -> dict[str, Any]:
    """Everything a write could change: the schema, every table's rows, the user version, the
    file's bytes and the files beside it (an ATTACH would create one)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        schema = connection.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()
        rows = {
            name: connection.execute(f"SELECT * FROM {_quoted(name)}").fetchall()
            for kind, name, _ in schema
            if kind == "table"
        }
        version = connection.execute("PRAGMA user_version").fetchall()
    connection.close()
    return {
        "schema": schema,
        "rows": rows,
        "user_version": version,
        "bytes": hashlib.sha256(path.read_bytes()).hexdigest(),
        "files": sorted(p.name for p in path.parent.iterdir()),
    }


WRITES = [
    ("DROP TABLE qa", "the query starts with 'DROP'"),
    ("CREATE TABLE copy (a TEXT)", "the query starts with 'CREATE'"),
    ("CREATE TEMP TABLE copy (a TEXT)", "the query starts with 'CREATE'"),
    ("INSERT INTO qa VALUES (3, 'q', 'r')", "the query starts with 'INSERT'"),
    ("UPDATE qa SET reply = 'changed'", "the query starts with 'UPDATE'"),
    ("DELETE FROM qa", "the query starts with 'DELETE'"),
    ("REPLACE INTO qa VALUES (1, 'q', 'r')", "the query starts with 'REPLACE'"),
    ("ATTACH DATABASE 'file:{dir}/new.db?mode=rwc' AS new", "the query starts with 'ATTACH'"),
    ("PRAGMA user_version = 7", "the query starts with 'PRAGMA'"),
    ("PRAGMA query_only = OFF", "the query starts with 'PRAGMA'"),
    ("VACUUM", "the query starts with 'VACUUM'"),
    ("/* SELECT */ DROP TABLE qa", "the query starts with 'DROP'"),
    ("WITH t AS (SELECT 1) DELETE FROM qa", "the query contains DELETE, which writes"),
    ("WITH t AS (SELECT 3, 'q', 'r') INSERT INTO qa SELECT * FROM t", "the query contains INSERT"),
    (
        "WITH t AS (SELECT 1) REPLACE INTO qa VALUES (1, 'q', 'r')",
        "the query contains INTO, which writes",
    ),
    (
        "WITH t AS (SELECT 1) UPDATE qa SET reply = 'changed'",
        "the query contains UPDATE, which writes",
    ),
]
# ways to hide a write, and what is not even SQLite
TRICKS = [
    ("SELECT * INTO copy FROM qa", "the query contains INTO, which writes"),
    ("SELECT 1; DROP TABLE qa", "more than one statement"),
    ("SELECT 1 /* ; */ ; DROP TABLE qa", "more than one statement"),
    ("SELECT 1 -- a comment\n; DROP TABLE qa", "more than one statement"),
    ("SELECT 'a;b' AS x; DELETE FROM qa", "more than one statement"),
    ("SELECT 1;\n\nPRAGMA user_version = 7;", "more than one statement"),
    ('SELECT 1 AS "a;"; DROP TABLE qa', "more than one statement"),
    ("SELECT 1 AS [a;]; DROP TABLE qa", "more than one statement"),
    ("SELECT E'\\'; DROP TABLE qa; --'", "more than one statement"),  # no E'' strings in SQLite
    ("SELECT $$; DROP TABLE qa; $$", "more than one statement"),  # nor dollar quotes
    ("SELECT 'never closed; DROP TABLE qa", "a quoted string or name in the query is never closed"),
    ("SELECT [never closed; DROP TABLE qa", "a quoted string or name in the query is never closed"),
    ("  -- nothing but a comment", "the query is empty"),
]


@pytest.mark.parametrize(("query", "reason"), WRITES + TRICKS)
def test_anything_but_one_select_is_refused_and_the_database_is_unchanged(
    query: str, reason: str, database: Path
) -> None:
    query = query.replace("{dir}", str(database.parent))
    before = _state(database)
    with pytest.raises(SettingsError) as raised:
        read_sql_records(f"sqlite:///{database}", sql_query=query)
    message = str(raised.value)
    label = sources.sql_label(f"sqlite:///{database}", None, query)
    assert message.startswith(f"{label}: {reason}")
    assert "\n" not in message
    assert _state(database) == before


@pytest.mark.parametrize(("query", "reason"), WRITES)
def test_the_database_refuses_writes_even_when_the_check_is_fooled(
    query: str, reason: str, database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: with the query check switched off, SQLite (opened read-only, reading
    only) still refuses every write, and nothing changes."""
    monkeypatch.setattr(sources, "read_only_select", lambda query, label, postgres: query)
    query = query.replace("{dir}", str(database.parent))
    before = _state(database)
    refused = "the database refused the query: (not authorized|authorization denied)"
    with pytest.raises(DataError, match=refused):
        read_sql_records(f"sqlite:///{database}", sql_query=query)
    assert _state(database) == before


def test_a_second_statement_never_runs_even_when_the_check_is_fooled(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "read_only_select", lambda query, label, postgres: query)
    before = _state(database)
    with pytest.raises(DataError, match="You can only execute one statement at a time"):
        read_sql_records(f"sqlite:///{database}", sql_query="SELECT 1; DROP TABLE qa")
    assert _state(database) == before


@pytest.mark.parametrize(
    "query",
    [
        "SELECT question, reply FROM qa ORDER BY id",
        "select question, reply from qa order by id;",
        "WITH t AS (SELECT * FROM qa) SELECT question, reply FROM t ORDER BY id -- the end",
        "/* a; b */ SELECT question, reply FROM qa WHERE reply <> 'x;y' ORDER BY id;;",
        'SELECT "question", [reply] FROM `qa` ORDER BY id',
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2) "
        "SELECT question, reply FROM qa JOIN n ON qa.id = n.i ORDER BY id",
        "SELECT question, reply FROM qa_view",
        "SELECT question, reply, 'insert; into' AS \"update\" FROM qa",
    ],
)
def test_a_select_still_reads(query: str, database: Path) -> None:
    before = _state(database)
    rows = read_sql_records(f"sqlite:///{database}", sql_query=query)
    assert [(r["question"], r["reply"]) for r in rows] == [(q, r) for _, q, r in ROWS]
    assert _state(database) == before


def test_a_table_with_an_odd_name_is_read_by_its_quoted_name(database: Path) -> None:
    before = _state(database)
    assert read_sql_records(f"sqlite:///{database}", sql_table=ODD_NAME) == [{"a": "x"}]
    assert _state(database) == before


NOT_A_NAME = (
    "expected `table` or `schema.table` (to read a name with a dot in it, give sql_query with "
    "the name in double quotes)."
)


@pytest.mark.parametrize(
    ("sql_table", "reason"),
    [
        ("a.b.c", NOT_A_NAME),
        ("main.", NOT_A_NAME),
        (".qa", NOT_A_NAME),
        ("nosuch.qa", "no schema named 'nosuch'; found: 'main'."),
        ("public.qa", "no schema named 'public'; found: 'main'."),
        (
            "main.missing",
            f"no table or view named 'main.missing'; found: {ODD_NAME!r}, 'qa', 'qa_view'.",
        ),
    ],
)
def test_a_table_name_that_names_nothing_gets_one_line(
    sql_table: str, reason: str, database: Path
) -> None:
    with pytest.raises(DataError) as raised:
        read_sql_records(f"sqlite:///{database}", sql_table=sql_table)
    assert str(raised.value) == f"sqlite:///{database} table {sql_table!r}: {reason}"


def test_a_query_is_refused_where_it_cannot_run_read_only() -> None:
    for url in ("mysql://me@localhost/db", "postgresql+psycopg2://me@localhost/db"):
        with pytest.raises(SettingsError, match="a query is read only from SQLite or PostgreSQL"):
            read_sql_records(url, sql_query="SELECT 1")


def test_a_colon_name_is_a_parameter_and_says_so(database: Path) -> None:
    url = f"sqlite:///{database}"
    with pytest.raises(DataError, match=r"A value is required for bind parameter 'x' \("):
        read_sql_records(url, sql_query="SELECT * FROM qa WHERE id = :x")
    assert read_sql_records(url, sql_query="SELECT '\\:x' AS a") == [{"a": ":x"}]


# PostgreSQL's lexical rules, checked without a server: E'' strings, dollar quotes, and string
# literals read both with and without backslash escapes (standard_conforming_strings)
@pytest.mark.parametrize(
    ("query", "refused"),
    [
        ("SELECT E'\\'; DROP TABLE qa; --' AS a", None),
        ("SELECT $$; DROP TABLE qa; $$ AS a", None),
        ("SELECT $tag$ $$; DROP $$ $tag$ AS a", None),
        ("SELECT a$b$ FROM t", None),
        ("SELECT $1", None),
        ("SELECT 'C:\\' AS a", None),  # left open only when read with escapes: a syntax error
        ("SELECT E'C:\\' AS a", "never closed"),
        ("SELECT 'a\\'' ; DROP TABLE qa; --'", "more than one statement"),
        ("SELECT 'a\\' ; DROP TABLE qa; --' AS a", "more than one statement"),
        ("SELECT $tag$ unclosed; DROP TABLE qa", "never closed"),
        ("SELECT /* /* */ ; DROP TABLE qa; */ 1", "more than one statement"),
        ("SELECT 1 --\r; DROP TABLE qa", "more than one statement"),
        ("(SELECT 1) UNION (SELECT 2)", None),
        ("((WITH t AS (SELECT 1) SELECT * FROM t))", None),
        ("WITH d AS (DELETE FROM qa RETURNING *) SELECT * FROM d", "contains DELETE"),
        ("WITH m AS MATERIALIZED (UPDATE qa SET a = 1 RETURNING *) SELECT 1", "contains UPDATE"),
        ("WITH t AS (SELECT 1) MERGE INTO qa USING t ON true WHEN MATCHED THEN DELETE", "MERGE"),
        ("SELECT * INTO TEMP copy FROM qa", "contains INTO"),
        ("SELECT * FROM qa FOR UPDATE", "contains UPDATE"),
        ("EXPLAIN ANALYZE DELETE FROM qa", "starts with 'EXPLAIN'"),
        ("COPY qa TO '/tmp/x'", "starts with 'COPY'"),
        ("SET default_transaction_read_only = off", "starts with 'SET'"),
        ("COMMIT", "starts with 'COMMIT'"),
        ("TABLE qa", "starts with 'TABLE'"),
        ("CALL p()", "starts with 'CALL'"),
        ("DO $$ BEGIN DELETE FROM qa; END $$", "starts with 'DO'"),
    ],
)
def test_postgres_lexical_rules(query: str, refused: str | None) -> None:
    if refused is None:
        assert read_only_select(query, "db", postgres=True) == query
    else:
        with pytest.raises(SettingsError, match=refused):
            read_only_select(query, "db", postgres=True)
