"""The data stage: loading, validation with clear errors, deterministic splits."""

import json
from pathlib import Path

import pandas as pd
import pytest

from finetune_module.data import data_splits, qa_table, raw_records
from finetune_module.errors import DataError, SettingsError


def _write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def _records(n: int) -> list[dict[str, str]]:
    return [{"question": f"question {i}?", "reply": f"answer {i}.", "id": str(i)} for i in range(n)]


def _table(path: str) -> pd.DataFrame:
    return qa_table(raw_records(path), path, "question", "reply")


def test_json_list_and_json_lines_load_the_same_table(tmp_path: Path) -> None:
    records = _records(5)
    as_json = _write(tmp_path, "d.json", json.dumps(records))
    as_jsonl = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    lines_in_json_file = _write(tmp_path, "lines.json", "\n".join(json.dumps(r) for r in records))
    expected = _table(as_json)
    assert list(expected.columns) == ["input_text", "output_text"]
    assert expected.iloc[3].tolist() == ["question 3?", "answer 3."]
    pd.testing.assert_frame_equal(_table(as_jsonl), expected)
    pd.testing.assert_frame_equal(_table(lines_in_json_file), expected)


def test_example_dataset_is_large_and_clean(example_data: Path) -> None:
    table = _table(str(example_data))
    assert len(table) >= 150
    assert not table["input_text"].duplicated().any()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"question": "a", "reply": "b"}x', "line 1 is not valid JSON"),
        ('[{"question": "a",\n "reply": "b"}]]', "invalid JSON at line 2, column 16"),
        ('[{"question": "a", "reply": "b"},', "invalid JSON"),
        ('{"rows": []}', "expected a JSON list of objects, found a dict"),
        ("[]", "holds no records"),
        ('[{"question": "a", "reply": "b"}, "text"]', "record 1 is a str"),
        ('[{"question": "a", "reply": "b"}, {"question": "c"}]', "record 1 has no key 'reply'"),
        (
            '[{"q": "a", "answer": "b"}]',
            "no record has the key 'question'; keys found: 'q', 'answer'",
        ),
        (
            '[{"question": "a", "reply": null}]',
            "record 0, key 'reply': expected text, found NoneType",
        ),
        ('[{"question": 3, "reply": "b"}]', "record 0, key 'question': expected text, found int"),
        ('[{"question": {"x": 1}, "reply": "b"}]', "found dict"),
        ('[{"question": "  ", "reply": "b"}]', "record 0, key 'question': empty text"),
    ],
)
def test_bad_data_gets_one_clear_error_naming_file_record_and_key(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = _write(tmp_path, "bad.json", content)
    with pytest.raises(DataError) as error:
        _table(path)
    assert expected in str(error.value)
    assert str(error.value).startswith(path)


def test_bad_json_lines_name_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.jsonl", '{"question": "a", "reply": "b"}\n{"question": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        raw_records(path)


def test_missing_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        raw_records(str(tmp_path / "missing.json"))
    path = _write(
        tmp_path, "latin1.json", '[{"question": "caf\xe9", "reply": "b"}]'.encode("latin-1")
    )
    with pytest.raises(DataError, match="not UTF-8"):
        raw_records(path)


def _split(table: pd.DataFrame, **settings: object) -> dict[str, pd.DataFrame]:
    return data_splits(table, "data.json", **settings)


def test_split_sizes_follow_the_reference_fractions() -> None:
    table = pd.DataFrame(
        {"input_text": [f"q{i}" for i in range(180)], "output_text": [f"a{i}" for i in range(180)]}
    )
    sets = _split(table)
    assert [len(sets[k]) for k in ("train_set", "validation_set", "hold_out_set")] == [171, 7, 2]
    indices = [set(sets[k].index) for k in ("train_set", "validation_set", "hold_out_set")]
    assert set.union(*indices) == set(range(180))
    assert sum(len(i) for i in indices) == 180


def test_random_split_is_deterministic_per_seed() -> None:
    table = pd.DataFrame({"input_text": [f"q{i}" for i in range(100)], "output_text": ["a"] * 100})
    first, again = _split(table, random_state=7), _split(table, random_state=7)
    other = _split(table, random_state=8)
    for key in ("train_set", "validation_set", "hold_out_set"):
        assert list(first[key].index) == list(again[key].index)
    assert list(first["hold_out_set"].index) != list(other["hold_out_set"].index) or list(
        first["validation_set"].index
    ) != list(other["validation_set"].index)


def test_last_split_keeps_file_order_and_holds_out_the_tail() -> None:
    table = pd.DataFrame({"input_text": [f"q{i}" for i in range(40)], "output_text": ["a"] * 40})
    sets = _split(table, split_strategy="last")
    assert list(sets["train_set"].index) == list(range(38))
    assert list(sets["validation_set"].index) == [38]
    assert list(sets["hold_out_set"].index) == [39]


def test_too_few_records_and_bad_fractions_are_refused() -> None:
    table = pd.DataFrame({"input_text": ["q"] * 5, "output_text": ["a"] * 5})
    with pytest.raises(DataError, match=r"5 records are too few .* at least 21 are needed"):
        _split(table)
    with pytest.raises(SettingsError, match="train_size must be between 0 and 1"):
        _split(table, train_size=1.5)
    with pytest.raises(SettingsError, match="split_strategy must be one of random, last"):
        _split(table, split_strategy="first")
