"""The tokenization stage: caps from the data, truncation, no padding."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from finetune_module.engine.settings import LengthSettings
from finetune_module.engine.tokens import truncate_tail
from finetune_module.errors import SettingsError
from finetune_module.tokenization import (
    source_length_cap,
    source_token_ids,
    target_length_cap,
    target_token_ids,
    tokenized_set,
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
    assert all(ids[-1] == tokenizer.eos_token_id for ids in sources + targets)
    train = tokenized_set(table.iloc[[2, 1]], sources, targets, 10, 6, "tail")
    assert [len(x["input_ids"]) for x in train] == [min(10, len(sources[2])), 10]
    assert train[1]["labels"][-1] == tokenizer.eos_token_id and len(train[1]["labels"]) == 6
    assert train[0]["labels"] == targets[2]
    assert tokenizer.pad_token_id not in train[0]["input_ids"]
