"""The data stage: loading, validation with clear errors, deterministic splits."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from finetune_module.data import data_splits, prompt_texts, qa_table
from finetune_module.data import raw_records__file as raw_records
from finetune_module.engine.settings import SplitSettings
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
        ('[{"question": "a", "reply": "b"},', "invalid JSON: the file ends before the JSON"),
        ('{"rows": []}', "expected a JSON list of objects, found an object"),
        ('"text"', "expected a JSON list of objects, found a string"),
        ("null", "expected a JSON list of objects, found null"),
        ("[]", "holds no records"),
        ("", "the file is empty"),
        (" \n\n ", "the file is empty"),
        ('[{"question": "a", "reply": "b"}, "text"]', "record 1 is a string, expected an object"),
        ("[1, 2]", "record 0 is a number, expected an object"),
        ('[["a", "b"]]', "record 0 is an array, expected an object"),
        ('[{"question": "a", "reply": "b"}, {"question": "c"}]', "record 1 has no key 'reply'"),
        (
            '[{"q": "a", "answer": "b"}]',
            "no record has the key 'question'; keys found: 'q', 'answer'",
        ),
        ('[{"question": "a", "reply": null}]', "record 0, key 'reply': expected text, found null."),
        (
            '[{"question": "a", "reply": "b"}, {"question": 3, "reply": "b"}]',
            "record 1, key 'question': expected text, found a number (3)",
        ),
        ('[{"question": {"x": 1}, "reply": "b"}]', 'found an object ({"x": 1})'),
        ('[{"question": ["a"], "reply": "b"}]', 'found an array (["a"])'),
        ('[{"question": "a", "reply": true}]', "key 'reply': expected text, found a boolean"),
        ('[{"question": "  ", "reply": "b"}]', "record 0, key 'question': empty text"),
        ('[{"question": "a", "reply": ""}]', "record 0, key 'reply': empty text"),
        ('[{"question": "\\ud800", "reply": "b"}]', "key 'question': not valid Unicode text"),
        ('[{"question": "a", "reply": "b', "ends before the JSON value is complete (truncated?)"),
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
    with pytest.raises(DataError, match=r"missing\.json: no such file"):
        raw_records(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="is a directory"):
        raw_records(str(tmp_path))
    path = _write(
        tmp_path,
        "latin1.json",
        '[{"question": "a", "reply": "b"},\n {"question": "caf\xe9", "reply": "b"}]'.encode(
            "latin-1"
        ),
    )
    with pytest.raises(DataError, match=r"latin1\.json: not UTF-8 text \(byte 52, line 2\)"):
        raw_records(path)
    for name in ("latin1.jsonl", "missing.jsonl", "empty.jsonl"):  # read a line at a time
        content = b'{"question": "a", "reply": "b"}\n\n{"question": "caf\xe9", "reply": "b"}\n'
        if name != "missing.jsonl":
            _write(tmp_path, name, content if name == "latin1.jsonl" else b" \n\n")
        expected = {
            "latin1.jsonl": rf"not UTF-8 text \(byte {content.index(0xE9)}, line 3\)",
            "missing.jsonl": "no such file",
            "empty.jsonl": "the file is empty",
        }[name]
        with pytest.raises(DataError, match=rf"{re.escape(name)}: {expected}"):
            raw_records(str(tmp_path / name))


def test_utf8_with_byte_order_mark_and_line_separators_in_json_lines(tmp_path: Path) -> None:
    records = [{"question": "one\u2028two\x85three", "reply": "b"}, {"question": "c", "reply": "d"}]
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path = _write(tmp_path, "d.jsonl", b"\xef\xbb\xbf" + lines.encode("utf-8"))
    assert _table(path)["input_text"].tolist() == ["one\u2028two\x85three", "c"]


def test_json_lines_records_share_their_keys_and_the_table_and_prompts_their_texts(
    tmp_path: Path,
) -> None:
    # a million records must not hold a million copies of each key, nor copies of every text
    records = _records(3)
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in records))
    read = raw_records(path)
    assert read == records
    assert all(a is b for a, b in zip(read[0], read[2], strict=True))
    table = qa_table(read, path, "question", "reply")
    assert table["input_text"].dtype == "str" and table["output_text"].dtype == "str"
    assert table["input_text"][2] is read[2]["question"]
    assert table["output_text"][1] is read[1]["reply"]
    prompts = prompt_texts(table, read, path)
    assert prompts == [r["question"] for r in records] and prompts[2] is read[2]["question"]
    assert prompt_texts(table, read, path, "Q: {input}") == [f"Q: {p}" for p in prompts]


def test_duplicated_records_are_kept_and_reported_with_their_indices(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = _records(4)
    records += [records[1], {**records[0], "id": "other"}, records[1], {**records[2], "reply": "x"}]
    path = _write(tmp_path, "d.json", json.dumps(records))
    with caplog.at_level("WARNING", logger="finetune_module.engine.records"):
        table = _table(path)
    assert len(table) == 8  # kept
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{path}: 3 duplicated records")
    assert "4 (= 1), 5 (= 0), 6 (= 1)." in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune_module.engine.records"):
        _table(_write(tmp_path, "clean.json", json.dumps(_records(4))))
    assert not caplog.records


def _split(table: pd.DataFrame, **settings: object) -> dict[str, pd.DataFrame]:
    return data_splits(table, "data.json", SplitSettings(**settings))


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
    with pytest.raises(SettingsError, match="validation_size must be between 0 and 1"):
        _split(table, validation_size=0)
    with pytest.raises(SettingsError, match="random_state must be 0 or more, got -1"):
        _split(table, random_state=-1)
