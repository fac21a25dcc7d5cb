"""The tokenization stage: caps from the data, truncation, no padding."""

import pickle
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hamilton.caching import fingerprinting
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import finetune_module
from bench.tokenize_memory import write_records
from finetune_module.engine import tokens
from finetune_module.engine.records import TEXT
from finetune_module.engine.settings import LengthSettings
from finetune_module.engine.tokens import (
    TokenizedSet,
    TokenLists,
    encoded,
    input_lengths,
    truncate_middle,
    truncate_tail,
)
from finetune_module.errors import SettingsError
from finetune_module.tokenization import (
    source_length_cap__base as source_length_cap,
)
from finetune_module.tokenization import (
    source_token_ids,
    target_token_ids,
    tokenized_set,
)
from finetune_module.tokenization import (
    target_length_cap__base as target_length_cap,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_caps_are_the_95th_percentile_unless_overridden() -> None:
    ids = [[1] * n for n in range(1, 101)]
    assert source_length_cap(ids, LengthSettings()) == int(
        np.ceil(np.percentile(range(1, 101), 95))
    )
    assert target_length_cap(ids, LengthSettings(length_percentile=50)) == 51
    assert source_length_cap(ids, LengthSettings(max_source_length=7)) == 7
    with pytest.raises(SettingsError, match="max_target_length must be at least 2"):
        LengthSettings(max_target_length=0)
    with pytest.raises(SettingsError, match=r"length_percentile must be in \(0, 100\]"):
        LengthSettings(length_percentile=0)


def test_truncation_keeps_the_end_of_sequence_token() -> None:
    assert truncate_tail([5, 6, 7, 8, 1], 3) == [5, 6, 1]
    assert truncate_tail([5, 1], 3) == [5, 1]


def test_sets_are_truncated_slices_of_one_tokenization_without_padding(tokenizer) -> None:
    table = pd.DataFrame(
        {
            "input_text": [
                "short one",
                "a much longer question about LoRA and ROUGE " * 5,
                "mid size q",
            ],
            "output_text": ["yes", "a long answer " * 10, "no"],
        }
    )
    sources = source_token_ids(list(table["input_text"]), tokenizer)
    targets = target_token_ids(table, tokenizer)
    assert sources.tolist() == tokenizer(list(table["input_text"]))["input_ids"]
    assert all(ids[-1] == tokenizer.eos_token_id for ids in [*sources, *targets])
    train = tokenized_set(table.iloc[[2, 1]], sources, targets, 10, 6, "tail")
    assert [len(x["input_ids"]) for x in train] == [min(10, len(sources[2])), 10]
    assert train[1]["labels"][-1] == tokenizer.eos_token_id and len(train[1]["labels"]) == 6
    assert train[0]["labels"] == targets[2].tolist()
    assert tokenizer.pad_token_id not in train[0]["input_ids"]


# --- compact token tables -------------------------------------------------------------------

token_lists = st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=12), max_size=30)


@settings(max_examples=200, deadline=None)
@given(lists=token_lists, cap=st.integers(1, 14), data=st.data())
def test_token_lists_take_and_truncate_as_the_list_functions_do(
    lists: list[list[int]], cap: int, data: st.DataObject
) -> None:
    table = TokenLists.from_lists(lists)
    assert table.ids.dtype == np.int32 and len(table) == len(lists)
    assert table.tolist() == lists and table.lengths().tolist() == [len(x) for x in lists]
    assert table.truncated(cap, "tail").tolist() == [truncate_tail(x, cap) for x in lists]
    assert table.truncated(cap, "middle").tolist() == [truncate_middle(x, cap) for x in lists]
    if lists:
        rows = data.draw(st.lists(st.integers(-len(lists), len(lists) - 1), max_size=40))
        assert table.take(rows).tolist() == [lists[i] for i in rows]
        assert table[-1].tolist() == lists[-1]
    with pytest.raises(IndexError):
        table[len(lists)]


def test_gathering_in_chunks_gives_the_same_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    lists = [rng.integers(0, 1000, rng.integers(0, 20)).tolist() for _ in range(1000)]
    rows = rng.permutation(1000)[:700]
    whole = TokenLists.from_lists(lists).take(rows).truncated(9, "middle")
    monkeypatch.setattr(tokens, "GATHER_CHUNK", 7)
    assert TokenLists.from_lists(lists).take(rows).truncated(9, "middle") == whole
    assert whole.tolist() == [truncate_middle(lists[i], 9) for i in rows]


def test_a_tokenized_set_gives_examples_as_lists_and_its_lengths_as_arrays() -> None:
    examples = [{"input_ids": [4, 5, 1], "labels": [7, 1]}, {"input_ids": [6, 1], "labels": [1]}]
    dataset = TokenizedSet.from_examples(examples)
    assert len(dataset) == 2 and dataset[1] == examples[1] and dataset[-1] == examples[1]
    assert list(dataset) == examples and dataset[0:5] == examples
    assert type(dataset[0]["input_ids"][0]) is int  # what the collators take
    assert input_lengths(dataset).tolist() == [3, 2] == input_lengths(examples).tolist()
    assert dataset == TokenizedSet.from_examples(examples)
    assert dataset != TokenizedSet.from_examples(examples[::-1])
    with pytest.raises(ValueError, match="2 inputs but 1 labels"):
        TokenizedSet(dataset.input_ids, dataset.labels.take([0]))


def test_hamiltons_cache_fingerprints_a_tokenized_set_by_its_contents() -> None:
    examples = [{"input_ids": [4, 5, 1], "labels": [7, 1]}, {"input_ids": [6, 1], "labels": [1]}]
    dataset = TokenizedSet.from_examples(examples)
    fingerprint = fingerprinting.hash_value(dataset)
    assert fingerprint != fingerprinting.UNHASHABLE
    assert fingerprinting.hash_value(TokenizedSet.from_examples(examples)) == fingerprint
    changed = TokenizedSet.from_examples([examples[0], {"input_ids": [6, 2], "labels": [1]}])
    assert fingerprinting.hash_value(changed) != fingerprint
    assert pickle.loads(pickle.dumps(dataset)) == dataset  # how the cache stores it


def test_tokenizing_in_chunks_gives_the_ids_of_one_call(tokenizer) -> None:
    texts = [f"question number {i} about LoRA" * (1 + i % 3) for i in range(25)]
    ids = encoded(texts, lambda chunk: tokenizer(chunk)["input_ids"], chunk_size=4)
    assert ids.tolist() == tokenizer(texts)["input_ids"]
    assert len(encoded([], lambda chunk: tokenizer(chunk)["input_ids"])) == 0


def _peak_bytes(compute: Callable[[], Any]) -> tuple[Any, int]:
    """What `compute` returns, and the most memory Python allocated while it ran."""
    tracemalloc.start()
    try:
        result = compute()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tokenization_never_holds_every_texts_ids_as_python_lists(tokenizer) -> None:
    texts = [f"how do I reset password number {i} on my account?" for i in range(30_000)]
    table = pd.DataFrame({"input_text": texts, "output_text": texts}, dtype=TEXT)
    _, one_call = _peak_bytes(lambda: tokenizer(texts)["input_ids"])  # the prompts, as lists
    train, ours = _peak_bytes(
        lambda: tokenized_set(
            table,
            source_token_ids(texts, tokenizer),
            target_token_ids(table, tokenizer),
            source_length_cap=12,
            target_length_cap=12,
            source_truncation="tail",
        )
    )
    assert ours < one_call / 2  # prompts and targets tokenized, and the set made
    assert train.input_ids.ids.dtype == np.int32
    assert train.nbytes / (len(train.input_ids.ids) + len(train.labels.ids)) < 5


def test_the_dataflow_holds_tokenized_sets_as_compact_arrays(
    tiny_model_dir: Path, tmp_path: Path, tokenizer
) -> None:
    data = write_records(tmp_path / "short.jsonl", 20_000)  # the memory benchmark's records
    names = ["tokenized_train", "tokenized_validation", "tokenized_hold_out"]
    result = finetune_module.build_driver("base").execute(
        [*names, "source_token_ids", "target_token_ids", "prompt_texts"],
        inputs={
            "data_path": str(data),
            "input_text_key": "question",
            "output_text_key": "reply",
            "model_id": str(tiny_model_dir),
        },
    )
    assert sum(len(result[name]) for name in names) == 20_000
    for name in names:
        tokenized = result[name]
        assert isinstance(tokenized, TokenizedSet), name
        assert tokenized.input_ids.ids.dtype == tokenized.labels.ids.dtype == np.int32
        count = len(tokenized.input_ids.ids) + len(tokenized.labels.ids)
        assert tokenized.nbytes / count < 5  # 4 bytes a token, and 8 a text for its offset
    for ids in (result["source_token_ids"], result["target_token_ids"]):
        assert isinstance(ids, TokenLists) and ids.nbytes / len(ids.ids) < 5
    assert (
        result["source_token_ids"][123].tolist()
        == tokenizer(result["prompt_texts"][123])["input_ids"]
    )
