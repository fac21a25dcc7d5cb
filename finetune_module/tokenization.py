"""Tokenization stage: tokenizer, length caps from the data, tokenized sets.

Every text is tokenized once, without padding and without truncation; the caps are read off
those lengths and the sets are truncated slices of the same token lists. Padding happens per
batch, in the collator (training) and in the generation loop (evaluation).

For a decoder-only model (`{"model_type": "causal"}`) an example is the prompt's tokens and the
answer's tokens (ending with the end-of-sequence token); the collator joins them into one
sequence whose loss covers the answer only.
"""

from collections.abc import Callable

import numpy as np
import pandas as pd
from hamilton.function_modifiers import cache, config, parameterize, source
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from finetune_module.errors import SettingsError
from finetune_module.loading import DEFAULT_MODEL_ID, load_pretrained


def _with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, padding with its end-of-sequence token when it has no padding token
    (GPT-2, Llama and most decoder-only tokenizers); padding is masked out everywhere."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# tokenizers are always loaded (a model directory may change in place) and cached by content
@cache(behavior="recompute")
@config.when(start="base")
def tokenizer__base(
    model_id: str = DEFAULT_MODEL_ID, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The base model's tokenizer.

    :param model_id: a Hugging Face model id (default google/flan-t5-small) or a local directory.
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    return _with_pad_token(
        load_pretrained(
            AutoTokenizer.from_pretrained, model_id, trust_remote_code=trust_remote_code
        )
    )


@cache(behavior="recompute")
@config.when(start="presaved")
def tokenizer__presaved(
    presaved_model_dir: str, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the fine-tuned model.

    :param presaved_model_dir: the directory of the saved fine-tune.
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    """
    return _with_pad_token(
        load_pretrained(
            AutoTokenizer.from_pretrained, presaved_model_dir, trust_remote_code=trust_remote_code
        )
    )


def source_token_ids(
    prompt_texts: list[str], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Token ids of every prompt (the input text in the prompt template), in table order, with
    the special tokens the tokenizer adds (end-of-sequence for T5, beginning for Llama)."""
    return tokenizer(prompt_texts)["input_ids"]


@config.when_not(model_type="causal")
def target_token_ids(qa_table: pd.DataFrame, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of every target text (with the end-of-sequence token), in table order."""
    return tokenizer(text_target=list(qa_table["output_text"]))["input_ids"]


@config.when(model_type="causal")
def target_token_ids__causal(
    qa_table: pd.DataFrame, tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Token ids of every answer, in table order: the text's own tokens (no beginning-of-sequence
    token, as it continues the prompt) and the end-of-sequence token that stops generation."""
    answers = tokenizer(list(qa_table["output_text"]), add_special_tokens=False)["input_ids"]
    return [[*ids, tokenizer.eos_token_id] for ids in answers]


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
    """Longest input (prompt), in tokens, fed to the model; longer inputs are truncated.

    :param source_token_ids: token ids of every prompt.
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


def _truncate_start(ids: list[int], cap: int) -> list[int]:
    """The last `cap - 1` tokens after the first one: a prompt cut in its middle, keeping its
    first token (beginning-of-sequence, where there is one) and its end, next to the answer."""
    return ids if len(ids) <= cap else ids[:1] + ids[len(ids) - cap + 1 :]


def _examples(
    rows: pd.DataFrame,
    source_token_ids: list[list[int]],
    target_token_ids: list[list[int]],
    source_cap: int,
    target_cap: int,
    truncate_source: Callable[[list[int], int], list[int]],
) -> list[dict[str, list[int]]]:
    """The rows' examples as `{"input_ids", "labels"}`, truncated to the caps, not padded."""
    return [
        {
            "input_ids": truncate_source(source_token_ids[i], source_cap),
            "labels": _truncate(target_token_ids[i], target_cap),
        }
        for i in rows.index
    ]


_SET_DOC = "The {} examples: `input_ids` and `labels`, truncated to the caps, not padded."
_SETS = {
    "tokenized_train": ({"rows": source("train_set")}, _SET_DOC.format("training")),
    "tokenized_validation": ({"rows": source("validation_set")}, _SET_DOC.format("validation")),
    "tokenized_hold_out": ({"rows": source("hold_out_set")}, _SET_DOC.format("hold-out")),
}


@config.when_not(model_type="causal")
@parameterize(**_SETS)
def tokenized_set(
    rows: pd.DataFrame,
    source_token_ids: list[list[int]],
    target_token_ids: list[list[int]],
    source_length_cap: int,
    target_length_cap: int,
) -> list[dict[str, list[int]]]:
    """The rows' examples as `{"input_ids", "labels"}`, truncated to the caps, not padded."""
    return _examples(
        rows, source_token_ids, target_token_ids, source_length_cap, target_length_cap, _truncate
    )


@config.when(model_type="causal")
@parameterize(**_SETS)
def tokenized_set__causal(
    rows: pd.DataFrame,
    source_token_ids: list[list[int]],
    target_token_ids: list[list[int]],
    source_length_cap: int,
    target_length_cap: int,
) -> list[dict[str, list[int]]]:
    """The rows' examples as `{"input_ids": prompt, "labels": answer}`, not padded: the prompt
    cut in its middle to its cap, the answer truncated to its cap keeping its end token."""
    return _examples(
        rows,
        source_token_ids,
        target_token_ids,
        source_length_cap,
        target_length_cap,
        _truncate_start,
    )
