"""Every data source through the real driver: files by extension, saved datasets, SQLite; the
split column; clear errors with credentials masked."""

import json
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from finetune_module.data import data_splits, qa_table
from finetune_module.engine.settings import SplitSettings
from finetune_module.errors import DataError, SettingsError, mask_credentials
from tests.conftest import EXAMPLE_DATA, QUICK, data_stage, read_json, run_dag

RECORDS: list[dict[str, Any]] = read_json(EXAMPLE_DATA)


@pytest.fixture(scope="module")
def from_json(tiny_model_dir: Path) -> dict[str, Any]:
    return data_stage(data_path=str(EXAMPLE_DATA), model_id=str(tiny_model_dir))


def _same_as_json(result: dict[str, Any], from_json: dict[str, Any]) -> None:
    pd.testing.assert_frame_equal(result["qa_table"], from_json["qa_table"])
    for name in ("train_set", "validation_set", "hold_out_set"):
        assert list(result[name].index) == list(from_json[name].index)
    assert result["tokenized_train"] == from_json["tokenized_train"]


def _write_table(path: Path, records: list[dict[str, Any]]) -> str:
    """The records in the format the file's extension names."""
    table = pd.DataFrame(records)
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        table.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".parquet":
        table.to_parquet(path)
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", ["data.csv", "data.tsv", "data.parquet", "data.jsonl"])
def test_file_formats_give_the_same_table_split_and_tokens_as_json(
    name: str, tmp_path: Path, tiny_model_dir: Path, from_json: dict[str, Any]
) -> None:
    path = _write_table(tmp_path / name, RECORDS)
    _same_as_json(data_stage(data_path=path, model_id=str(tiny_model_dir)), from_json)


def test_saved_dataset_directory(
    tmp_path: Path, tiny_model_dir: Path, from_json: dict[str, Any]
) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    _same_as_json(
        data_stage(data_path=str(tmp_path / "ds"), model_id=str(tiny_model_dir)), from_json
    )


def test_fine_tune_from_a_saved_dataset_dict_with_its_splits(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    splits = {"train": RECORDS[:150], "validation": RECORDS[150:170], "test": RECORDS[170:]}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
    ).save_to_disk(str(tmp_path / "dd"))
    inputs = {"data_path": str(tmp_path / "dd"), "model_id": str(tiny_model_dir)}
    result = data_stage(**inputs, split_column="split")
    sizes = (("train_set", 150), ("validation_set", 20), ("hold_out_set", len(RECORDS) - 170))
    for name, expected in sizes:
        assert len(result[name]) == expected
    # and the whole job, end to end
    outputs = run_dag(
        "base", **inputs, split_column="split", output_dir=str(tmp_path / "out"), **QUICK
    )
    hold_out = [question for question, _, _ in outputs["hold_out_set_predictions"]]
    assert hold_out == [r["question"] for r in RECORDS[170:]]
    assert (tmp_path / "out" / "best_model" / "adapter_model.safetensors").is_file()


def _sqlite(path: Path, records: list[dict[str, Any]]) -> str:
    """A SQLite database with the records in table `qa` (and a view `qa_view` on it)."""
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE qa (id INTEGER PRIMARY KEY, question TEXT, reply TEXT)")
        # inserted in reverse: reading in primary-key order gives the file's order back
        connection.executemany(
            "INSERT INTO qa (id, question, reply) VALUES (?, ?, ?)",
            [(i, r["question"], r["reply"]) for i, r in reversed(list(enumerate(records)))],
        )
        connection.execute("CREATE VIEW qa_view AS SELECT question, reply FROM qa")
    connection.close()
    return f"sqlite:///{path}"


@pytest.mark.parametrize(
    "what",
    [
        {"sql_table": "qa"},
        {"sql_table": "main.qa"},
        {"sql_query": "SELECT question, reply FROM qa ORDER BY id"},
    ],
)
def test_sqlite_table_and_query(
    what: dict[str, str], tmp_path: Path, tiny_model_dir: Path, from_json: dict[str, Any]
) -> None:
    pytest.importorskip("sqlalchemy")
    url = _sqlite(tmp_path / "qa.db", RECORDS)
    result = data_stage("sql", data_path=url, model_id=str(tiny_model_dir), **what)
    _same_as_json(result, from_json)


def test_fine_tune_from_a_sqlite_view(tmp_path: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("sqlalchemy")
    url = _sqlite(tmp_path / "qa.db", RECORDS)
    inputs = {"data_path": url, "model_id": str(tiny_model_dir), "sql_table": "qa_view"}
    result = data_stage("sql", **inputs)
    assert sorted(result["qa_table"]["input_text"]) == sorted(r["question"] for r in RECORDS)
    outputs = run_dag("base", source="sql", **inputs, output_dir=str(tmp_path / "out"), **QUICK)
    assert outputs["training_and_validation_set_metrics"]["global_step"] == QUICK["max_steps"]
    assert (tmp_path / "out" / "best_model" / "hold_out_predictions.csv").is_file()


@pytest.mark.parametrize(
    ("inputs", "error", "expected"),
    [
        ({"data_path": "not a url", "sql_table": "qa"}, DataError, "not a database URL"),
        (
            {"data_path": "sqlite:///{tmp}/missing.db", "sql_table": "qa"},
            DataError,
            "no such database file",
        ),
        (
            {"data_path": "sqlite:///{tmp}/qa.db", "sql_table": "answers"},
            DataError,
            "table 'answers': no table or view named 'answers'; found: 'qa', 'qa_view'.",
        ),
        (
            {"data_path": "sqlite:///{tmp}/qa.db", "sql_query": "SELECT nope FROM qa"},
            DataError,
            "the database refused the query: no such column: nope",
        ),
        (
            {"data_path": "sqlite:///{tmp}/qa.db", "sql_query": "SELECT id, reply FROM qa"},
            DataError,
            "no record has the key 'question'; keys found: 'id', 'reply'.",
        ),
        ({"data_path": "sqlite:///{tmp}/qa.db"}, SettingsError, "give exactly one of sql_table"),
        (
            {"data_path": "mysql://u:pw@localhost/db", "sql_table": "qa"},
            SettingsError,
            "no database driver for 'mysql'",
        ),
    ],
)
def test_sql_errors_are_clear(
    inputs: dict[str, str], error: type, expected: str, tmp_path: Path
) -> None:
    pytest.importorskip("sqlalchemy")
    _sqlite(tmp_path / "qa.db", RECORDS[:30])
    inputs = {k: v.replace("{tmp}", str(tmp_path)) for k, v in inputs.items()}
    with pytest.raises(error) as raised:
        data_stage("sql", **inputs)
    assert expected in str(raised.value)
    assert "pw" not in str(raised.value)


def test_refused_connection_names_the_server_and_masks_the_password() -> None:
    pytest.importorskip("psycopg")
    # nothing listens on port 1: the driver's own reason comes back, the password never does
    url = "postgresql://finetune:s3cret-pw@127.0.0.1:1/qa"
    with pytest.raises(DataError) as raised:
        data_stage("sql", data_path=url, sql_table="qa")
    message = str(raised.value)
    assert message.startswith("postgresql://finetune:***@127.0.0.1:1/qa table 'qa': cannot connect")
    assert "s3cret-pw" not in message


def test_mask_credentials() -> None:
    assert (
        mask_credentials("x postgresql+psycopg://me:p%40ss@db:5432/q?sslmode=require y")
        == "x postgresql+psycopg://me:***@db:5432/q?sslmode=require y"
    )
    assert mask_credentials("host=db password=hunter2 user=me") == "host=db password=*** user=me"
    assert mask_credentials("sqlite:///data.db and /a/b.json") == "sqlite:///data.db and /a/b.json"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("question,reply\n", "holds no records"),
        ("", "holds no records"),
        ('question,reply\n"a,b\n', "not a valid CSV file"),
        ("question,reply\nq1,\n", "record 0, key 'reply': empty text"),
        ("q,reply\nq1,a1\n", "no record has the key 'question'; keys found: 'q', 'reply'"),
    ],
)
def test_bad_csv_gets_one_clear_error(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as raised:
        data_stage(data_path=str(path))
    assert str(raised.value).startswith(str(path)) and expected in str(raised.value)


def test_parquet_nulls_and_numbers_are_named(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    records = [{"question": "q", "reply": "a"}, {"question": None, "reply": "b"}]
    path = _write_table(tmp_path / "nulls.parquet", records)
    with pytest.raises(DataError, match=r"record 1, key .question.: expected text, found null"):
        data_stage(data_path=path)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        data_stage(data_path=str(broken))


def test_a_directory_that_is_no_dataset_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="is a directory but not a dataset saved with"):
        data_stage(data_path=str(tmp_path))


def _table(splits: list[Any]) -> pd.DataFrame:
    records = [{"question": f"q{i}", "reply": f"a{i}", "fold": s} for i, s in enumerate(splits)]
    return qa_table(records, "d.json", "question", "reply", split_column="fold")


def test_split_column_decides_the_sets() -> None:
    table = _table(["train", "Valid", "test", "train", "dev", "hold_out", "TRAIN"])
    sets = data_splits(table, "d.json", SplitSettings(), split_column="fold")
    assert list(sets["train_set"].index) == [0, 3, 6]
    assert list(sets["validation_set"].index) == [1, 4]
    assert list(sets["hold_out_set"].index) == [2, 5]


@pytest.mark.parametrize(
    ("splits", "expected"),
    [
        (["train", "validation", "tset"], "record 2, split column 'fold': \"tset\" is not a split"),
        (["train", "validation", None], "record 2, split column 'fold': null is not a split"),
        (["train", "validation", 3], "record 2, split column 'fold': 3 is not a split"),
    ],
)
def test_bad_split_values_are_refused(splits: list[Any], expected: str) -> None:
    with pytest.raises(DataError) as raised:
        _table(splits)
    assert expected in str(raised.value)


def test_a_split_column_that_leaves_a_set_empty_is_refused() -> None:
    table = _table(["train", "train", "validation"])
    with pytest.raises(DataError, match="puts no record in the hold_out set"):
        data_splits(table, "d.json", SplitSettings(), split_column="fold")
    records = [{"question": "q", "reply": "a"}]
    with pytest.raises(DataError, match="no record has the key 'fold'"):
        qa_table(records, "d.json", "question", "reply", split_column="fold")
