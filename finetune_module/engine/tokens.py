"""Token lists: the padding token, length caps read off the data, and truncation that keeps the
tokens a model needs (the end-of-sequence token of a target, the end of a prompt)."""

import numpy as np
from transformers import PretrainedConfig, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label of a position left out of the loss (padding, a prompt)
#: The input cap of a model whose own limit is unknown (T5's relative positions have no table).
DEFAULT_INPUT_LIMIT = 512


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, padding with its end-of-sequence token when it has no padding token
    (GPT-2, Llama and most decoder-only tokenizers); padding is masked out everywhere."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def length_cap(token_ids: list[list[int]], fixed: int | None, percentile: float) -> int:
    """`fixed` if given, else the given percentile of the token lengths (rounded up, at
    least 2)."""
    if fixed is not None:
        return int(fixed)
    lengths = [len(ids) for ids in token_ids]
    return max(2, int(np.ceil(np.percentile(lengths, percentile))))


def truncate_tail(ids: list[int], cap: int) -> list[int]:
    """The first `cap` tokens, keeping the final (end-of-sequence) token last."""
    return ids if len(ids) <= cap else ids[: cap - 1] + ids[-1:]


def truncate_middle(ids: list[int], cap: int) -> list[int]:
    """The last `cap - 1` tokens after the first one: a prompt cut in its middle, keeping its
    first token (beginning-of-sequence, where there is one) and its end, next to the answer."""
    return ids if len(ids) <= cap else ids[:1] + ids[len(ids) - cap + 1 :]


def input_limit(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input a model was made for, the cap of a model saved without its run's
    caps: the smaller of its position table and its tokenizer's model_max_length, else
    `DEFAULT_INPUT_LIMIT`."""
    limits = [
        value
        for name in ("max_position_embeddings", "n_positions", "max_source_positions")
        if isinstance(value := getattr(config, name, None), int) and value > 0
    ]
    if 0 < tokenizer.model_max_length < 1_000_000:  # "no limit" is a huge placeholder
        limits.append(int(tokenizer.model_max_length))
    return min(limits, default=DEFAULT_INPUT_LIMIT)
