"""Tokenization stage: tokenizer, length caps from the data, tokenized sets.

Every text is tokenized once, without padding and without truncation; the caps are read off
those lengths and the sets are truncated slices of the same token lists. Padding happens per
batch, in the collator (training) and in the generation loop (evaluation).
"""

import numpy as np
import pandas as pd
from hamilton.function_modifiers import config, parameterize, source
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from finetune_module.errors import SettingsError
from finetune_module.loading import DEFAULT_MODEL_ID, load_pretrained


@config.when(start="base")
def tokenizer__base(
    model_id: str = DEFAULT_MODEL_ID, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The base model's tokenizer.

    :param model_id: a Hugging Face model id (default google/flan-t5-small) or a local directory.
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    return load_pretrained(
        AutoTokenizer.from_pretrained, model_id, trust_remote_code=trust_remote_code
    )


@config.when(start="presaved")
def tokenizer__presaved(
    presaved_model_dir: str, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the fine-tuned model.

    :param presaved_model_dir: the directory of the saved fine-tune.
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    return load_pretrained(
        AutoTokenizer.from_pretrained, presaved_model_dir, trust_remote_code=trust_remote_code
    )


def source_token_ids(qa_table: pd.DataFrame, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of every input text (with the end-of-sequence token), in table order."""
    return tokenizer(list(qa_table["input_text"]))["input_ids"]


def target_token_ids(qa_table: pd.DataFrame, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of every target text (with the end-of-sequence token), in table order."""
    return tokenizer(text_target=list(qa_table["output_text"]))["input_ids"]


def _length_cap(
    token_ids: list[list[int]], override: int | None, percentile: float, name: str
) -> int:
    """The override if given, else the given percentile of the token lengths (rounded up)."""
    if override is not None:
        if override < 2:
            raise SettingsError(f"{name} must be at least 2 tokens, got {override}.")
        return int(override)
    if not 0 < percentile <= 100:
        raise SettingsError(f"length_percentile must be in (0, 100], got {percentile}.")
    lengths = [len(ids) for ids in token_ids]
    return max(2, int(np.ceil(np.percentile(lengths, percentile))))


def source_length_cap(
    source_token_ids: list[list[int]],
    max_source_length: int | None = None,
    length_percentile: float | int = 95.0,
) -> int:
    """Longest input, in tokens, fed to the model; longer inputs are truncated.

    :param source_token_ids: token ids of every input text.
    :param max_source_length: a fixed cap; by default the cap comes from the data.
    :param length_percentile: percentile of the input lengths used as the cap (default 95).
    """
    return _length_cap(source_token_ids, max_source_length, length_percentile, "max_source_length")


def target_length_cap(
    target_token_ids: list[list[int]],
    max_target_length: int | None = None,
    length_percentile: float | int = 95.0,
) -> int:
    """Longest target, in tokens, trained on; also the generation length bound.

    :param target_token_ids: token ids of every target text.
    :param max_target_length: a fixed cap; by default the cap comes from the data.
    :param length_percentile: percentile of the target lengths used as the cap (default 95).
    """
    return _length_cap(target_token_ids, max_target_length, length_percentile, "max_target_length")


def _truncate(ids: list[int], cap: int) -> list[int]:
    """The first `cap` tokens, keeping the final (end-of-sequence) token last."""
    return ids if len(ids) <= cap else ids[: cap - 1] + ids[-1:]


_SET_DOC = "The {} examples: `input_ids` and `labels`, truncated to the caps, not padded."


@parameterize(
    tokenized_train=({"rows": source("train_set")}, _SET_DOC.format("training")),
    tokenized_validation=({"rows": source("validation_set")}, _SET_DOC.format("validation")),
    tokenized_hold_out=({"rows": source("hold_out_set")}, _SET_DOC.format("hold-out")),
)
def tokenized_set(
    rows: pd.DataFrame,
    source_token_ids: list[list[int]],
    target_token_ids: list[list[int]],
    source_length_cap: int,
    target_length_cap: int,
) -> list[dict[str, list[int]]]:
    """The rows' examples as `{"input_ids", "labels"}`, truncated to the caps, not padded."""
    return [
        {
            "input_ids": _truncate(source_token_ids[i], source_length_cap),
            "labels": _truncate(target_token_ids[i], target_length_cap),
        }
        for i in rows.index
    ]
