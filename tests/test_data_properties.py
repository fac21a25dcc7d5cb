"""Property-based tests of the data stage: any file is either a valid table or one DataError."""

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_module.data import data_splits, qa_table
from finetune_module.data import raw_records__file as raw_records
from finetune_module.engine.records import minimum_records, split_sizes
from finetune_module.engine.settings import SplitSettings
from finetune_module.errors import DataError

QUICK = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Texts with something to read in them (all of Unicode but lone surrogates, which JSON files
# can only hold as escapes and which are refused).
texts = st.text(min_size=1, max_size=30).filter(lambda t: t.strip())
records = st.lists(
    st.fixed_dictionaries({"question": texts, "reply": texts}, optional={"id": st.integers()}),
    min_size=1,
    max_size=12,
)
not_text = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    """A folder for the examples' files (hypothesis reruns a test; tmp_path would be shared)."""
    with tempfile.TemporaryDirectory() as path:
        yield Path(path)


def _load(folder: Path, name: str, content: bytes) -> pd.DataFrame:
    path = folder / name
    path.write_bytes(content)
    return qa_table(raw_records(str(path)), str(path), "question", "reply")


@QUICK
@given(records=records, ascii_only=st.booleans(), lines=st.booleans())
def test_valid_records_load_in_file_order(
    folder: Path, records: list[dict[str, Any]], ascii_only: bool, lines: bool
) -> None:
    if lines:
        content = "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in records)
    else:
        content = json.dumps(records, ensure_ascii=ascii_only, indent=1)
    table = _load(folder, "d.jsonl" if lines else "d.json", content.encode("utf-8"))
    assert table["input_text"].tolist() == [r["question"] for r in records]
    assert table["output_text"].tolist() == [r["reply"] for r in records]


@QUICK
@given(records=records, data=st.data())
def test_one_bad_value_is_named_by_record_and_key(
    folder: Path, records: list[dict[str, Any]], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(records) - 1), label="index")
    key = data.draw(st.sampled_from(["question", "reply"]), label="key")
    bad = data.draw(st.one_of(not_text, st.sampled_from(["", " ", "\n\t"]), st.just(...)))
    if bad is ...:
        del records[index][key]
        # a key missing from every record gets its own message, naming the keys there are
        expected = "no record has the key" if len(records) == 1 else f"record {index} has no key"
    else:
        records[index][key] = bad
        expected = f"record {index}, key {key!r}: "
    with pytest.raises(DataError) as error:
        _load(folder, "bad.json", json.dumps(records).encode("utf-8"))
    assert str(error.value).startswith(str(folder / "bad.json"))
    assert expected in str(error.value)


@QUICK
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_give_a_table_or_a_data_error(folder: Path, content: bytes) -> None:
    try:
        table = _load(folder, "any.json", content)
    except DataError as e:
        assert str(e).startswith(str(folder / "any.json"))
    else:
        assert list(table.columns) == ["input_text", "output_text"] and len(table) > 0


@QUICK
@given(
    n=st.integers(1, 300),
    train_size=st.floats(0.05, 0.95),
    validation_size=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_is_a_partition_or_says_how_many_records_are_needed(
    n: int, train_size: float, validation_size: float, seed: int
) -> None:
    table = pd.DataFrame({"input_text": [f"q{i}" for i in range(n)], "output_text": ["a"] * n})
    needed = minimum_records(train_size, validation_size)
    if n < needed:
        with pytest.raises(DataError, match=f"at least {needed} are needed"):
            data_splits(table, "d.json", SplitSettings(seed, train_size, validation_size))
        return
    sets = data_splits(table, "d.json", SplitSettings(seed, train_size, validation_size))
    again = data_splits(table, "d.json", SplitSettings(seed, train_size, validation_size))
    parts = [list(sets[k].index) for k in ("train_set", "validation_set", "hold_out_set")]
    assert [len(p) for p in parts] == list(split_sizes(n, train_size, validation_size))
    assert min(len(p) for p in parts) >= 1
    assert sorted(parts[0] + parts[1] + parts[2]) == list(range(n))
    assert parts == [list(again[k].index) for k in ("train_set", "validation_set", "hold_out_set")]
