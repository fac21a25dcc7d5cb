"""Tokenization stage: tokenizer, length caps from the data, tokenized sets.

Every text is tokenized once, without padding and without truncation, a chunk of texts at a
time into compact arrays (`finetune_module.engine.tokens.TokenLists`: int32 ids and offsets,
never a list of Python ints per text); the caps are read off those lengths and the sets are
truncated slices of the same arrays (`TokenizedSet`). Padding happens per batch, in the
collator (training) and in the generation loop (evaluation).

For a decoder-only model (`{"model_type": "causal"}`) an example is the prompt's tokens and the
answer's tokens (ending with the end-of-sequence token); the collator joins them into one
sequence whose loss covers the answer only.
"""

import pandas as pd
from hamilton.function_modifiers import cache, config, parameterize, source
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from finetune_module.engine.files import saved_settings
from finetune_module.engine.loading import load_pretrained
from finetune_module.engine.models import ModelRecipe, model_config
from finetune_module.engine.settings import LengthSettings, ModelSettings
from finetune_module.engine.tokens import (
    TokenizedSet,
    TokenLists,
    encoded,
    input_limit,
    length_cap,
    with_pad_token,
)
from finetune_module.errors import SettingsError

_IDS_ONLY = {"return_attention_mask": False, "return_token_type_ids": False}  # ids, nothing else


# tokenizers are always loaded (a model directory may change in place) and cached by content
@cache(behavior="recompute")
@config.when(start="base")
def tokenizer__base(model_settings: ModelSettings) -> PreTrainedTokenizerBase:
    """The base model's tokenizer (padding with its end-of-sequence token if it has no padding
    token of its own). A model that cannot generate answers (encoder-only) is refused first,
    from its configuration."""
    model_config(model_settings.model_id, model_settings.trust_remote_code)
    return with_pad_token(
        load_pretrained(
            AutoTokenizer.from_pretrained,
            model_settings.model_id,
            trust_remote_code=model_settings.trust_remote_code,
        )
    )


@cache(behavior="recompute")
@config.when(start="presaved")
def tokenizer__presaved(
    presaved_model_dir: str, model_settings: ModelSettings
) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the fine-tuned model."""
    return with_pad_token(
        load_pretrained(
            AutoTokenizer.from_pretrained,
            presaved_model_dir,
            trust_remote_code=model_settings.trust_remote_code,
        )
    )


def source_token_ids(prompt_texts: list[str], tokenizer: PreTrainedTokenizerBase) -> TokenLists:
    """Token ids of every prompt (the input text in the prompt template), in table order, with
    the special tokens the tokenizer adds (end-of-sequence for T5, beginning for Llama), held
    as int32 arrays (`TokenLists`: `source_token_ids[i]` is row i's)."""
    return encoded(prompt_texts, lambda texts: tokenizer(texts, **_IDS_ONLY)["input_ids"])


@config.when_not(model_type="causal")
def target_token_ids(qa_table: pd.DataFrame, tokenizer: PreTrainedTokenizerBase) -> TokenLists:
    """Token ids of every target text (with the end-of-sequence token), in table order, held
    as int32 arrays (`TokenLists`)."""
    return encoded(
        list(qa_table["output_text"]),
        lambda texts: tokenizer(text_target=texts, **_IDS_ONLY)["input_ids"],
    )


@config.when(model_type="causal")
def target_token_ids__causal(
    qa_table: pd.DataFrame, tokenizer: PreTrainedTokenizerBase
) -> TokenLists:
    """Token ids of every answer, in table order, held as int32 arrays (`TokenLists`): the
    text's own tokens (no beginning-of-sequence token, as it continues the prompt) and the
    end-of-sequence token that stops generation. A tokenizer without an end-of-sequence token
    is refused: answers would never end."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SettingsError(
            f"The tokenizer of {tokenizer.name_or_path!r} has no end-of-sequence token, which a "
            "decoder-only model needs to end its answers; use a model whose tokenizer has one "
            "(GPT-2, Llama, Qwen, ...), or add one to the tokenizer and save it."
        )

    def answer_ids(texts: list[str]) -> list[list[int]]:
        answers = tokenizer(texts, add_special_tokens=False, **_IDS_ONLY)["input_ids"]
        return [[*ids, eos] for ids in answers]

    return encoded(list(qa_table["output_text"]), answer_ids)


@config.when(start="base")
def source_length_cap__base(source_token_ids: TokenLists, length_settings: LengthSettings) -> int:
    """Longest input (prompt), in tokens, fed to the model; longer inputs are truncated: the
    fixed max_source_length, else the length_percentile of the prompts' lengths."""
    settings = length_settings
    return length_cap(source_token_ids, settings.max_source_length, settings.length_percentile)


@config.when(start="base")
def target_length_cap__base(target_token_ids: TokenLists, length_settings: LengthSettings) -> int:
    """Longest target, in tokens, trained on; also the generation length bound: the fixed
    max_target_length, else the length_percentile of the targets' lengths."""
    settings = length_settings
    return length_cap(target_token_ids, settings.max_target_length, settings.length_percentile)


@config.when(start="presaved")
def source_length_cap__presaved(
    presaved_model_dir: str,
    length_settings: LengthSettings,
    tokenizer: PreTrainedTokenizerBase,
    model_recipe: ModelRecipe,
) -> int:
    """Longest input (prompt), in tokens, fed to the saved fine-tune: the fixed
    max_source_length, else the cap it was trained with (saved with it), else the model's
    own input limit; longer inputs are truncated, so memory stays bounded for any input."""
    if length_settings.max_source_length is not None:
        return length_settings.max_source_length
    saved = saved_settings(presaved_model_dir).get("source_length_cap")
    if saved:
        return int(saved)
    config = model_config(model_recipe.model_id, model_recipe.trust_remote_code)
    return input_limit(config, tokenizer)


@config.when(start="presaved")
def target_length_cap__presaved(
    presaved_model_dir: str,
    target_token_ids: TokenLists,
    length_settings: LengthSettings,
) -> int:
    """Longest target, in tokens; also the generation length bound: the fixed
    max_target_length, else the cap the saved fine-tune was trained with, else the
    length_percentile of the targets' lengths."""
    settings = length_settings
    saved = saved_settings(presaved_model_dir).get("target_length_cap")
    if settings.max_target_length is None and saved:
        return int(saved)
    return length_cap(target_token_ids, settings.max_target_length, settings.length_percentile)


@config.when_not(model_type="causal")
def source_truncation() -> str:
    """How a prompt longer than its cap is cut: "tail", keeping its first tokens and its final
    (end-of-sequence) token, for an encoder that reads it whole."""
    return "tail"


@config.when(model_type="causal")
def source_truncation__causal() -> str:
    """How a prompt longer than its cap is cut: "middle", keeping its first token and its end,
    which the answer follows."""
    return "middle"


_SET_DOC = (
    "The {} examples: `input_ids` and `labels`, truncated to the caps, not padded, held as "
    "arrays (`TokenizedSet`)."
)


@parameterize(
    tokenized_train=({"rows": source("train_set")}, _SET_DOC.format("training")),
    tokenized_validation=({"rows": source("validation_set")}, _SET_DOC.format("validation")),
    tokenized_hold_out=({"rows": source("hold_out_set")}, _SET_DOC.format("hold-out")),
)
def tokenized_set(
    rows: pd.DataFrame,
    source_token_ids: TokenLists,
    target_token_ids: TokenLists,
    source_length_cap: int,
    target_length_cap: int,
    source_truncation: str,
) -> TokenizedSet:
    """The rows' examples (example `i` is `{"input_ids": prompt, "labels": target}`), not
    padded: the prompt cut to its cap as `source_truncation` says, the target cut to its cap
    keeping its end token."""
    positions = rows.index.to_numpy()  # the rows' positions in the table
    return TokenizedSet(
        input_ids=source_token_ids.take(positions, source_length_cap, source_truncation),
        labels=target_token_ids.take(positions, target_length_cap, "tail"),
    )
