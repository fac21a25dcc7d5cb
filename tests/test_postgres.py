"""Fine-tuning straight from a real PostgreSQL table (and a view, a query, refused credentials).

`.ci/run` installs Debian's PostgreSQL, starts it on localhost and exports
FINETUNE_TEST_POSTGRES_URL; where no server is reachable these tests skip and say why.
"""

import os
from pathlib import Path

import pytest

from finetune_module.errors import DataError
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
