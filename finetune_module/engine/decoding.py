"""Lean greedy decoding: the model's own forward pass, called step by step, with none of the
per-step work that Hugging Face `generate` spends on features greedy answers do not use.

`greedy_generate` returns what `model.generate(input_ids, attention_mask=...,
max_new_tokens=..., num_beams=1, do_sample=False, pad_token_id=...)` returns, token for token:
an encoder-decoder model's encoder runs once per batch and every step feeds the decoder one
token against a key/value cache that grows in place (no concatenation per step); a decoder-only
model reads its left-padded prompt once, then one token a step. Logits are reduced to the next
token by `argmax`, after exactly the rules of the model's generation config that change greedy
answers and that this loop implements (`GreedyRules`); a sequence that has ended is filled with
the padding token and, once enough have ended (`RETIRE_SHARE`), leaves the batch: the steps
after it compute only the rows still answering. The loop stops as soon as every sequence has
ended or the length cap is reached. Each row's tokens are those of the batch it started in up
to float rounding (a smaller batch's products may round differently in the last bit, as a
different `generation_batch_size` does); `tests/test_decoding.py` proves them equal to
`generate`'s on every family in `PROVEN`.

The loop calls the model's forward pass (T5's decode steps are written out in `t5_steps`,
with the same logits), so it applies only where `tests/test_decoding.py` proves it
equal to `generate`: the families in `PROVEN`, on the transformers release `PROVEN_ON`, a LoRA
adapter or none, and a generation config with nothing the loop does not implement
(`stock_only_settings`). Beam search runs the same steps in `beam_search.beam_generate`.
`lean_decoding_applies` says whether a model qualifies; `generation.generate` falls back to
`generate` everywhere else.
"""

import contextlib
import dataclasses
import functools
import inspect
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import transformers
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import (
    AttentionInterface,
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import BaseModelOutput

from finetune_module.engine import packing
from finetune_module.engine.speedups import CHEAP_DROPOUT_ATTENTION
from finetune_module.engine.t5_steps import T5Steps, written_steps
from finetune_module.engine.tokens import length_groups, length_ranges, prefix_lengths

#: The model families (config.model_type) whose greedy answers `tests/test_decoding.py` proves
#: equal to `generate`'s, with and without a LoRA adapter.
PROVEN = frozenset(
    {
        *("t5", "mt5", "bart", "mbart", "marian", "pegasus", "m2m_100"),
        *("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gpt_neox", "opt"),
    }
)
#: The transformers release (major.minor) the loop was proven on; on another one `generate` runs.
PROVEN_ON = "5.23"

#: Generation-config settings that cannot change greedy answers here: set by every call
#: (lengths, beams, sampling), used by sampling or beam search only, or about what `generate`
#: returns rather than which tokens (the special token ids are read by `greedy_rules`).
_NO_EFFECT_ON_GREEDY = frozenset(
    {
        *("max_length", "max_new_tokens", "num_beams", "do_sample", "use_cache"),
        *("temperature", "top_k", "top_p", "min_p", "top_h", "typical_p"),
        *("epsilon_cutoff", "eta_cutoff", "early_stopping", "length_penalty", "num_beam_groups"),
        *("diversity_penalty", "output_attentions", "output_hidden_states", "output_scores"),
        *("output_logits", "pad_token_id", "bos_token_id", "eos_token_id"),
        *("decoder_start_token_id", "num_assistant_tokens", "num_assistant_tokens_schedule"),
        *("assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind"),
        *("compile_config", "disable_compile", "transformers_version", "_from_model_config"),
    }
)
#: Generation-config settings that change greedy answers and that `GreedyRules` implements.
_IMPLEMENTED = frozenset(
    {
        *("forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "bad_words_ids"),
        *("min_length", "min_new_tokens"),
    }
)


def stock_only_settings(generation_config: GenerationConfig) -> list[str]:
    """The names of the generation config's settings, set away from their defaults, that this
    loop does not implement (so that greedy answers need `generate`): any setting outside the
    implemented and the no-effect ones, a bad word of several tokens, a decoder start that is a
    list. Empty when the loop gives `generate`'s answers."""
    defaults = generation_config._get_default_generation_params()
    unknown = [
        name
        for name, value in generation_config.to_dict().items()
        if value is not None
        and value != defaults.get(name)
        and name not in _NO_EFFECT_ON_GREEDY | _IMPLEMENTED
    ]
    if any(len(word) != 1 for word in generation_config.bad_words_ids or []):
        unknown.append("bad_words_ids")
    if isinstance(generation_config.decoder_start_token_id, list):
        unknown.append("decoder_start_token_id")
    return unknown


#: Beam-search settings `beam_search.beam_generate` implements at their defaults only (any
#: other value needs `generate`): beam groups and their diversity penalty.
_BEAM_DEFAULTS_ONLY = ("num_beam_groups", "diversity_penalty")


def stock_only_beam_settings(generation_config: GenerationConfig) -> list[str]:
    """The names of the generation config's beam-search settings that lean beam search does
    not implement (`_BEAM_DEFAULTS_ONLY`), set away from their defaults. (Its `length_penalty`
    and `early_stopping` it implements; every other setting is `stock_only_settings`'.)"""
    defaults = generation_config._get_default_generation_params()
    return [
        name
        for name in _BEAM_DEFAULTS_ONLY
        if getattr(generation_config, name, None) not in (None, defaults[name])
    ]


def transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model that runs the forward pass: the model itself, or the one a LoRA
    adapter sits in (whose layers hold the adapter, switched on or off)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def longest_proven(config: PretrainedConfig) -> int | None:
    """The longest sequence (prompt and answer) the loop is proven for with a model of
    `config` (None: any): Phi-3's `generate` drops the cache and starts over once a sequence
    outgrows `original_max_position_embeddings` (its long RoPE factors start there); the loop
    leaves such sequences to it."""
    if config.model_type == "phi3":
        return getattr(config, "original_max_position_embeddings", None)
    return None


def lean_decoding_applies(model: torch.nn.Module, num_beams: int, longest: int = 0) -> bool:
    """Whether the lean loop gives `model`'s answers exactly as `generate` does, for sequences
    of up to `longest` tokens (a decoder-only model's prompt and answer): `greedy_generate`
    with `num_beams` 1, `beam_search.beam_generate` with more; transformers `PROVEN_ON`, a
    family in `PROVEN`, within its `longest_proven` length, a LoRA adapter or none
    (prompt-learning adapters need `generate`), weights whole on one device and not
    quantized, and nothing in the generation config that needs `generate`
    (`stock_only_settings`, and for beam search `stock_only_beam_settings`)."""
    if num_beams < 1 or not transformers.__version__.startswith(PROVEN_ON + "."):
        return False
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return False
    net = transformers_model(model)
    return (
        isinstance(net, PreTrainedModel)
        and net.config.model_type in PROVEN
        and longest <= (longest_proven(net.config) or longest)
        and getattr(net, "hf_quantizer", None) is None
        and len(set(getattr(net, "hf_device_map", {"": None}).values())) == 1
        and not stock_only_settings(net.generation_config)
        and (num_beams == 1 or not stock_only_beam_settings(net.generation_config))
    )


@dataclasses.dataclass(frozen=True)
class GreedyRules:
    """What a model's generation config asks of greedy decoding, as `generate` reads it.

    Lengths count the whole sequence `generate` returns (prompt or decoder start included).
    """

    eos_token_ids: tuple[int, ...]  # any of these ends a sequence (none: only the cap does)
    pad_token_id: int | None  # written after a sequence's end
    decoder_start_token_id: int | None  # an encoder-decoder model's first decoder token
    forced_bos_token_id: int | None  # the only token allowed at length 1
    forced_eos_token_ids: tuple[int, ...]  # the only tokens allowed at the cap's last step
    suppressed: tuple[int, ...]  # never chosen (`suppress_tokens`)
    bad_words: tuple[int, ...]  # one-token bad words, minus the end tokens (`bad_words_ids`)
    min_length: int  # the end tokens are not chosen while the sequence is shorter
    min_new_tokens: int  # nor while fewer new tokens than this have been chosen


def _ids(value: int | list[int] | None) -> tuple[int, ...]:
    """Token ids as a tuple: none, one or several."""
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def greedy_rules(config: GenerationConfig, pad_token_id: int | None) -> GreedyRules:
    """The rules `generate` applies to greedy decoding under the generation config `config`,
    called with `pad_token_id` (None: the config's, else its first end token)."""
    eos = _ids(config.eos_token_id)
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    return GreedyRules(
        eos_token_ids=eos,
        pad_token_id=pad if pad is not None else (eos[0] if eos else None),
        decoder_start_token_id=(
            config.decoder_start_token_id
            if config.decoder_start_token_id is not None
            else config.bos_token_id
        ),
        forced_bos_token_id=config.forced_bos_token_id,
        forced_eos_token_ids=_ids(config.forced_eos_token_id),
        suppressed=_ids(config.suppress_tokens),
        bad_words=tuple(
            word[0] for word in config.bad_words_ids or [] if len(word) == 1 and word[0] not in eos
        ),
        min_length=config.min_length or 0,
        min_new_tokens=config.min_new_tokens or 0,
    )


def _next_tokens(
    logits: torch.Tensor, rules: GreedyRules, length: int, new: int, max_length: int
) -> torch.Tensor:
    """The greedy choice of every sequence's next token from its last position's `logits`
    (batch x vocabulary): `ruled_scores` on them as float32, then the argmax. (The logits are
    changed in place.)"""
    return ruled_scores(logits.float(), rules, length, new, max_length).argmax(dim=-1)


def ruled_scores(
    scores: torch.Tensor, rules: GreedyRules, length: int, new: int, max_length: int
) -> torch.Tensor:
    """Every sequence's next-token `scores` (batch x vocabulary, float32: greedy decoding's
    logits, beam search's log-probabilities) under the rules that apply where each sequence
    is `length` tokens long, `new` of them generated, and may grow to `max_length`, in
    `generate`'s order, as its logits processors apply them. (Changed in place, unless a token
    is forced: then a new tensor.)"""
    if rules.bad_words:
        scores[:, list(rules.bad_words)] += float("-inf")  # an added bias, as generate does
    if rules.eos_token_ids and (length < rules.min_length or new < rules.min_new_tokens):
        scores[:, _in_vocabulary(rules.eos_token_ids, scores)] = float("-inf")
    forced = ()
    if rules.forced_bos_token_id is not None and length == 1:
        forced = (rules.forced_bos_token_id,)
    if rules.forced_eos_token_ids and length == max_length - 1:
        forced = rules.forced_eos_token_ids
    if forced:
        scores = torch.full_like(scores, float("-inf"))
        scores[:, list(forced)] = 0.0
    if rules.suppressed:
        scores[:, _in_vocabulary(rules.suppressed, scores)] = float("-inf")
    return scores


def _in_vocabulary(ids: tuple[int, ...], scores: torch.Tensor) -> list[int]:
    """The ids that have a score (`generate` masks by vocabulary, passing over the others)."""
    return [i for i in ids if i < scores.shape[-1]]


class PreallocatedLayer(DynamicLayer):
    """A self-attention key/value cache layer whose storage is allocated once, for `capacity`
    tokens, at the first write: each step's keys and values are copied into it, and the layer
    holds views of the tokens written so far (where `DynamicLayer` concatenates every step)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new keys and values after the ones held; returns all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads, _, key_width = key_states.shape
            shape = (batch, heads, self.capacity)
            self._key_storage = key_states.new_empty((*shape, key_width))
            self._value_storage = value_states.new_empty((*shape, value_states.shape[-1]))
        end = self.length + key_states.shape[-2]
        self._key_storage[:, :, self.length : end].copy_(key_states)
        self._value_storage[:, :, self.length : end].copy_(value_states)
        self.length = end
        self.keys = self._key_storage[:, :, :end]
        self.values = self._value_storage[:, :, :end]
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.Tensor, start: int = 0) -> None:
        """Puts the rows in the order `beam_idx` (for each row, the row it takes), in place:
        the tokens written so far only, not the whole storage, of the rows that take another
        row's, from position `start` on (those before it are the same in every row a row may
        take: beam search's beams of one prompt)."""
        own = torch.arange(len(beam_idx), device=beam_idx.device)
        moved = (beam_idx != own).nonzero().squeeze(1)
        if self.is_initialized and self.length > start and len(moved):
            held, sources = slice(start, self.length), beam_idx[moved]
            self._key_storage[moved, :, held] = self._key_storage[sources, :, held]
            self._value_storage[moved, :, held] = self._value_storage[sources, :, held]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Makes each row `repeats` rows in a row (storage and all): beam search's beams of a
        prompt read once."""
        if self.is_initialized:
            self._key_storage = self._key_storage.repeat_interleave(repeats, dim=0)
            self._value_storage = self._value_storage.repeat_interleave(repeats, dim=0)
            self.keys = self._key_storage[:, :, : self.length]
            self.values = self._value_storage[:, :, : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the rows `indices` only (storage and all)."""
        if self.is_initialized:
            self._key_storage = self._key_storage[indices]
            self._value_storage = self._value_storage[indices]
            self.keys = self._key_storage[:, :, : self.length]
            self.values = self._value_storage[:, :, : self.length]


def _self_attention_cache(config: PretrainedConfig, capacity: int) -> DynamicCache:
    """The decoder's self-attention cache, laid out as `generate` lays it out for `config`
    (sliding-window layers where the model has them), with every full-attention layer
    preallocated for `capacity` tokens."""
    cache = DynamicCache(config=config)
    cache.layers = [
        PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache


def question_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Each row's question length in a right-padded batch (the mask's leading ones), or None
    when some row's mask is not ones followed by zeros (left padding, or holes)."""
    lengths = prefix_lengths(attention_mask)
    return None if lengths is None else lengths.tolist()


def read_in_length_groups(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> BaseModelOutput | None:
    """An encoder-decoder model's encoder states for a right-padded batch of questions, read
    in `length_groups`: each group padded to its own longest question, not the batch's (on the
    benchmark's 20 questions of 10 to 539 tokens, 3,086 + 5 x 64 tokens read instead of
    10,780). Each row's states are those of its question as the encoder reads it in a smaller
    batch (equal to the whole batch's up to float rounding); past its group's longest question
    they are zero. The decoder's attention mask hides every state past a row's question. None
    (read the batch as one) where the mask is not right padding or one group is best."""
    lengths = question_lengths(attention_mask)
    groups = length_groups(lengths) if lengths is not None else []
    if len(groups) < 2:
        return None
    encoder = transformers_model(model).get_encoder()
    states = None
    for rows in groups:
        longest = max(lengths[row] for row in rows)
        index = torch.tensor(rows, device=input_ids.device)
        read = encoder(
            input_ids=input_ids[index, :longest],
            attention_mask=attention_mask[index, :longest],
            return_dict=True,
        ).last_hidden_state
        if states is None:
            states = read.new_zeros((*input_ids.shape, read.shape[-1]))
        states[index, :longest] = read
    return BaseModelOutput(last_hidden_state=states)


def prompts_read_in_length_groups(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int
) -> DynamicCache | None:
    """A decoder-only model's key/value cache (for `capacity` tokens) of a left-padded batch of
    prompts, all but their last column, read in `length_groups` of the rows (in order of
    length, as `generation.generate` makes its batches): each group's prompts padded to their
    own longest, not the batch's (on the benchmark's 20 questions of 13 to 554 tokens, a Llama
    of flan-t5-small's size reads them in 1.5-1.7 s instead of 4.2-4.5 s). The keys and values
    are those of each prompt read in a smaller batch (equal to the whole batch's up to float
    rounding); before a group's longest prompt they are zero, where the mask hides them. The
    first step (`greedy_generate`'s or `generate`'s) reads the last column over this cache.
    None (read the batch as one) for an encoder-decoder model, a mask that is not left
    padding, one group, or a cache with sliding-window layers."""
    net = transformers_model(model)
    lengths = question_lengths(attention_mask.flip(-1))
    if net.config.is_encoder_decoder or lengths is None:
        return None
    width = input_ids.shape[1] - 1  # the columns before the last
    read = [max(0, length - 1) for length in lengths]
    groups = length_ranges(read)
    cache = _self_attention_cache(net.config, capacity)
    if len(groups) < 2 or any(type(layer) is not PreallocatedLayer for layer in cache.layers):
        return None
    positions = _prompt_inputs(input_ids, attention_mask, 0)[0]["position_ids"]
    laid: list[tuple[torch.Tensor, torch.Tensor]] = []
    for first, end, longest in groups:
        if longest == 0:
            continue
        columns, rows = slice(width - longest, width), slice(first, end)
        group_cache = _self_attention_cache(net.config, longest)
        net(
            input_ids=input_ids[rows, columns],
            attention_mask=attention_mask[rows, columns],
            position_ids=positions[rows, columns],
            past_key_values=group_cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for index, layer in enumerate(group_cache.layers):
            if len(laid) <= index:
                shape = (input_ids.shape[0], *layer.keys.shape[1:2], width)
                laid.append(
                    (
                        layer.keys.new_zeros((*shape, layer.keys.shape[-1])),
                        layer.values.new_zeros((*shape, layer.values.shape[-1])),
                    )
                )
            laid[index][0][rows, :, columns] = layer.keys
            laid[index][1][rows, :, columns] = layer.values
    for layer, (keys, values) in zip(cache.layers, laid, strict=True):
        layer.update(keys, values)
    return cache


# the attribute of a decode step's boolean key mask that holds its row groups
_GROUPS = "_finetune_key_groups"


def _key_groups(mask: torch.Tensor) -> tuple[list[tuple[int, int, int]], bool]:
    """The groups of consecutive rows, with the keys each attends to (start row, end row,
    keys), of a boolean key mask of shape (batch, 1, 1, keys) whose rows are right padding (an
    encoder-decoder model's questions) or left padding (a decoder-only model's prompts and
    answers so far): `length_groups` of the rows' key counts, where each group is a range of
    rows (the rows are in order of length, as `generation.generate` makes its batches); and
    whether the keys are the last ones (left padding) rather than the first. No groups where
    the rows do not split so. The groups are kept on the mask (the model's layers share it)."""
    found = getattr(mask, _GROUPS, None)
    if found is None:
        rows = mask[:, 0, 0, :]
        lengths, from_end = question_lengths(rows), False
        if lengths is None:
            lengths, from_end = question_lengths(rows.flip(-1)), True
        groups = length_ranges(lengths) if lengths is not None else []
        found = (groups if len(groups) > 1 else [], from_end)
        setattr(mask, _GROUPS, found)
    return found


def grouped_key_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention, except for a decode step's attention over padded keys (one
    query a row, a boolean mask of padding): an encoder-decoder model's attention to the
    questions (right padding), a decoder-only model's to its left-padded prompts and the
    answers so far. Then each group of rows of similar length (`_key_groups`) attends to its
    own longest row's keys only, not to the batch's longest (the keys a row does not reach are
    masked either way: the same attention, up to float rounding). On the benchmark's 20
    questions of 10 to 539 tokens, a T5 layer's step takes 0.30 ms instead of 0.98."""
    groups, from_end = [], False
    if (
        not module.training
        and query.shape[2] == 1
        and attention_mask is not None
        and attention_mask.dtype == torch.bool
        and attention_mask.shape[1:3] == (1, 1)
        and attention_mask.shape[0] == query.shape[0] == key.shape[0]
        and attention_mask.shape[-1] == key.shape[2]
    ):
        groups, from_end = _key_groups(attention_mask)
    if not groups:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, position_bias=position_bias, **kwargs
        )
    output = None
    for start, end, keys in groups:
        reach = slice(key.shape[2] - keys, None) if from_end else slice(None, keys)
        bias = position_bias
        if bias is not None:
            bias = bias[..., reach] if bias.shape[0] == 1 else bias[start:end, ..., reach]
        part, _ = sdpa_attention_forward(
            module,
            query[start:end],
            key[start:end, :, reach],
            value[start:end, :, reach],
            attention_mask[start:end, ..., reach],
            position_bias=bias,
            **kwargs,
        )
        if output is None:
            output = part.new_empty((query.shape[0], *part.shape[1:]))
        output[start:end] = part
    return output, None


GROUPED_KEY_ATTENTION = "sdpa_grouped_question_keys"


def weight_first_rows(capability: str | None = None) -> int | None:
    """The row count whose products go weight first (`weight @ x.T`, MKL's) instead of on
    packed weights (oneDNN's), on a CPU of torch's `capability` (`torch.backends.cpu.
    get_cpu_capability()`, this one's by default): 2 up to AVX2, none with AVX-512.

    Up to AVX2, MKL's product of 2 rows that way round beats oneDNN's (measured with AVX2:
    T5's output layer 2.3 ms against 2.6; a decode pass where 18 of 20 answers end at once,
    most steps of 2 rows, 3.5-4.0 s against 4.2-4.6 s); for 1 row and 3 or more it does not.
    oneDNN's kernels for AVX-512 run every row count better (measured on a 2-core Xeon with
    AVX-512, two threads: the output layer at 2 rows 2.9-3.4 ms packed against 5.8 ms weight
    first; that pass 3.40-3.84 s against 4.22-5.43 s, five rounds alternated, the same
    answers)."""
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    return None if capability.upper().startswith("AVX512") else 2


#: Products of exactly this many rows go weight first (`weight_first_rows`; None: none do).
WEIGHT_FIRST_ROWS = weight_first_rows()


def _packed_product(
    packed: dict[torch.nn.Linear, torch.Tensor], self: torch.nn.Linear, x: torch.Tensor
) -> torch.Tensor:
    """`torch.nn.Linear.forward`, on the weights packed for oneDNN (once, into `packed`), or
    weight first for `WEIGHT_FIRST_ROWS` rows; where a gradient is wanted, or for inputs of
    another type or shape, as before."""
    wanted = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
    if wanted or x.dim() < 2 or x.dtype != torch.float32 or not x.numel():
        return torch.nn.functional.linear(x, self.weight, self.bias)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == WEIGHT_FIRST_ROWS:
        if self.bias is None:
            out = torch.mm(self.weight, flat.T)
        else:
            out = torch.addmm(self.bias[:, None], self.weight, flat.T)
        out = out.T.contiguous()
    else:
        if self not in packed:
            packed[self] = packing.pack(self.weight)
        out = packing.product(flat, packed[self], self.bias)
    return out.reshape(*x.shape[:-1], self.out_features)


def _merged_product(
    merged: dict[LoraLinear, tuple[str, torch.Tensor]],
    self: LoraLinear,
    x: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """A LoRA layer's forward (`peft`'s `Linear`: its frozen layer plus its one active
    adapter's product, scaled) as one product, on its frozen weight with the adapter's update
    added (`get_delta_weight`, as `merge` adds it), packed for oneDNN once per adapter (into
    `merged`). Anything else runs peft's forward: the adapter switched off or merged, several
    adapters or none, a variant (DoRA) or an adapter bias, training, a gradient, per-row
    adapters (`adapter_names`), inputs of another type or shape, `WEIGHT_FIRST_ROWS` rows."""
    adapter = None if args or kwargs else _merged_adapter(self)
    wanted = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in self.parameters())
    )
    if adapter is None or wanted or x.dim() < 2 or x.dtype != torch.float32 or not x.numel():
        return LoraLinear.forward(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == WEIGHT_FIRST_ROWS:
        return LoraLinear.forward(self, x)
    found = merged.get(self)
    if found is None or found[0] != adapter:
        found = merged[self] = (adapter, packing.pack(_merged_weight(self, adapter)))
    out = packing.product(flat, found[1], self.base_layer.bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _merged_adapter(layer: LoraLinear) -> str | None:
    """The adapter that `_merged_product` multiplies `layer` by, merged into its weight: its
    one active adapter, where it is on, not merged already, not a variant (DoRA) and without a
    bias, and the layer is not training; else None."""
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(adapters) != 1 or layer.training or layer.disable_adapters or layer.merged:
        return None
    if adapters[0] in layer.lora_variant or getattr(layer, "lora_bias", {}).get(adapters[0]):
        return None
    return adapters[0]


def _merged_weight(layer: LoraLinear, adapter: str) -> torch.Tensor:
    """`layer`'s frozen weight with `adapter`'s update added, as peft's `merge` adds it."""
    return layer.base_layer.weight + layer.get_delta_weight(adapter)


def fused_product(
    layers: Sequence[torch.nn.Module],
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One product standing for linear layers that read the same input (rows x in): their
    outputs side by side. Within `packed_weights`, where each of `layers` multiplies on a
    packed weight of its own (its weight, or a LoRA layer's with its adapter's update added:
    `_merged_product`) and has no bias, their weights laid end to end and packed once: the same
    sums as each layer's own product (oneDNN splits a product by rows and inputs, not by the
    outputs; `tests/test_decoding.py` checks them equal), in one call instead of one a layer
    (at a decode step's 20 rows, T5's q, k and v of its 8 layers 2.5-2.8 ms a step against
    3.4-4.0, its feed-forward's two input layers 4.0-4.1 against 5.0-5.1). Products of
    `WEIGHT_FIRST_ROWS` rows run each layer as it multiplies. None where any layer multiplies
    otherwise."""
    weights = []
    for layer in layers:
        forward = getattr(vars(layer).get("forward"), "__func__", None)
        patched = getattr(forward, "func", None)
        if patched is _packed_product and layer.bias is None:
            weights.append(layer.weight)
        elif patched is _merged_product and layer.base_layer.bias is None:
            adapter = _merged_adapter(layer)
            if adapter is None:
                return None
            weights.append(_merged_weight(layer, adapter))
        else:
            return None
    packed = packing.pack(torch.cat(weights))

    def product(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == WEIGHT_FIRST_ROWS:
            return torch.cat([layer(x) for layer in layers], dim=-1)
        return packing.product(x, packed)

    return product


@contextlib.contextmanager
def packed_weights(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, each of the model's linear layers (`torch.nn.Linear` itself, float32
    on the CPU, with no forward of its own already) multiplies by its weights packed for
    oneDNN's matmul kernels: the same product, summed in another order. MKL runs a decode
    step's products (a few rows, one a sequence, by a large weight matrix) far below the
    memory bandwidth; oneDNN, on weights packed in the blocks its kernels read, close to it:
    T5's output layer (32128 x 512) at 20 rows takes 13.2 ms as `linear` and 4.0 ms packed, a
    1024 x 512 layer 0.36 and 0.15 ms (streamed from memory, as in a decode step). The
    encoder's products (many rows) gain too, less. A layer's weights are packed the first time
    it runs within the block (T5's output layer: ~30 ms), and dropped after it, when the
    layers are set back. On CPUs up to AVX2, two rows go weight first (`WEIGHT_FIRST_ROWS`).
    A LoRA layer with one adapter on multiplies once, by its weight with the adapter's update
    added, packed (`_merged_product`: the adapter's two small products, its scaling and the
    sum cost more than the product itself at a decode step's few rows; the benchmark's
    fine-tune answered in 4.6-4.8 s a pass merged against 4.9-6.0 s). Where this torch lacks
    the operations (`packing.available`), or a gradient is wanted, the layers multiply as
    before."""
    linears = [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear
        and packing.packs(module.weight)
        and "forward" not in vars(module)
    ]
    adapted = [
        module
        for module in model.modules()
        if type(module) is LoraLinear
        and type(module.base_layer) is torch.nn.Linear
        and packing.packs(module.base_layer.weight)
        and not module.fan_in_fan_out
        and "forward" not in vars(module)
    ]
    packed: dict[torch.nn.Linear, torch.Tensor] = {}
    merged: dict[LoraLinear, tuple[str, torch.Tensor]] = {}
    for module in linears:
        module.forward = types.MethodType(functools.partial(_packed_product, packed), module)
    for module in adapted:
        module.forward = types.MethodType(functools.partial(_merged_product, merged), module)
    try:
        yield
    finally:
        packed.clear()
        merged.clear()
        for module in [*linears, *adapted]:
            vars(module).pop("forward", None)


@functools.cache
def _register_grouped_key_attention() -> str:
    """Registers `grouped_key_attention` with transformers (once), under
    `GROUPED_KEY_ATTENTION`, with the masks SDPA gets; returns the name."""
    AttentionInterface.register(GROUPED_KEY_ATTENTION, grouped_key_attention)
    AttentionMaskInterface.register(GROUPED_KEY_ATTENTION, sdpa_mask)
    return GROUPED_KEY_ATTENTION


@contextlib.contextmanager
def keys_read_in_groups(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, a model that attends with SDPA (or the speed layer's SDPA with cheaper
    dropout) attends as `grouped_key_attention`; its own attention is set back after."""
    net = transformers_model(model)
    before = net.config._attn_implementation
    if before not in ("sdpa", CHEAP_DROPOUT_ATTENTION):
        yield
        return
    net.set_attn_implementation(_register_grouped_key_attention())
    try:
        yield
    finally:
        net.set_attn_implementation(before)


def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int | None,
    encoder_outputs: BaseModelOutput | None = None,
    past_key_values: DynamicCache | None = None,
) -> torch.Tensor:
    """The sequences `model.generate(input_ids=..., attention_mask=..., max_new_tokens=...,
    num_beams=1, do_sample=False, pad_token_id=..., encoder_outputs=...)` returns (for a model
    where `lean_decoding_applies`): an encoder-decoder model's decoder start and answer tokens,
    a decoder-only model's left-padded prompt and answer tokens, each row ended by one of the
    end tokens and padded after it, as long as the longest answer (at most `max_new_tokens`).
    An encoder-decoder model's encoder reads the questions unless `encoder_outputs` holds its
    states (as `read_in_length_groups` reads them); a decoder-only model reads its prompts
    unless `past_key_values` holds all but their last column (`prompts_read_in_length_groups`).
    A T5 or mT5 model's decode steps run as `t5_steps.T5Steps` writes them out (the same
    logits, without the forward pass's per-step work: `t5_steps.written_steps_apply`); every
    other model's as its forward pass.

    Call it under `torch.inference_mode()`.
    """
    net = transformers_model(model)
    rules = greedy_rules(net.generation_config, pad_token_id)
    prompt, kwargs, written, step, mask = first_step(
        net, rules, input_ids, attention_mask, max_new_tokens, encoder_outputs, past_key_values
    )
    batch = input_ids.shape[0]

    prompt_length = prompt.shape[1]
    max_length = prompt_length + max_new_tokens
    sequences = prompt.new_empty((batch, max_length))
    sequences[:, :prompt_length] = prompt
    ends = torch.tensor(rules.eos_token_ids, dtype=torch.long, device=prompt.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=prompt.device)
    rows = torch.arange(batch, device=prompt.device)  # the rows of `sequences` still answering
    retires = len(ends) > 0 and (written is not None or retirable(kwargs["past_key_values"]))
    length = prompt_length
    while length < max_length:
        if written is not None:
            logits = written(step["decoder_input_ids"][:, -1])
        else:
            logits = net(**step, **kwargs).logits[:, -1]
        tokens = _next_tokens(logits, rules, length, length - prompt_length, max_length)
        if len(ends):
            tokens = torch.where(unfinished, tokens, rules.pad_token_id)
        sequences[rows, length] = tokens
        length += 1
        if len(ends):
            unfinished &= ~torch.isin(tokens, ends)
            if not unfinished.any():
                break
        step = next_step_inputs(net, step, tokens, mask, length)
        ended = len(unfinished) - int(unfinished.sum())
        if retires and ended * RETIRE_SHARE >= len(unfinished):
            keep = unfinished.nonzero().squeeze(1)
            sequences[rows[~unfinished], length:] = rules.pad_token_id
            rows, unfinished = rows[keep], unfinished[keep]
            step = {name: value[keep] for name, value in step.items()}
            if mask is not None:
                mask = mask[keep]
            keep_rows(kwargs, keep, written)
    return sequences[:, :length]


def next_step_inputs(
    net: PreTrainedModel,
    step: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    length: int,
) -> dict[str, torch.Tensor]:
    """A decode step's inputs after the step `step`: its new `tokens` (one a row), each row
    now `length` tokens long; for a decoder-only model with the positions after the step's
    and its attention `mask`'s first `length` columns (a beam's are its question's)."""
    if net.config.is_encoder_decoder:
        return {"decoder_input_ids": tokens[:, None]}
    following = {"input_ids": tokens[:, None], "position_ids": step["position_ids"][:, -1:] + 1}
    if mask is not None:
        following["attention_mask"] = mask[:, :length]
    return following


def first_step(
    net: PreTrainedModel,
    rules: GreedyRules,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    encoder_outputs: BaseModelOutput | None,
    past_key_values: DynamicCache | None,
    beams: int = 1,
) -> tuple[
    torch.Tensor,
    dict[str, Any],
    T5Steps | None,
    dict[str, torch.Tensor],
    torch.Tensor | None,
]:
    """What `greedy_generate`'s first step starts from: the sequences' first tokens (the
    decoder's start token, or the prompts), the arguments every step passes the model (the
    key/value cache, an encoder-decoder model's encoder states and question mask), T5's
    written steps where they apply, the first step's own inputs and a decoder-only model's
    attention mask over the prompts and every new token. The encoder reads the questions
    unless `encoder_outputs` holds their states; a decoder-only model's prompts go in whole
    unless `past_key_values` holds all but their last column. With `beams` (beam search),
    every question is that many rows in a row (`repeat_interleave`, as `generate` lays them
    out): the encoder reads each question once, the written steps attend to each question's
    keys once for all its beams; a decoder-only model's `past_key_values` holds them once a
    beam already (else it reads its prompt once a beam, as `generate` does)."""
    kwargs: dict[str, Any] = {"use_cache": True, "return_dict": True}
    if "logits_to_keep" in inspect.signature(net.forward).parameters:
        kwargs["logits_to_keep"] = 1  # as generate passes it
    if beams > 1 and not net.config.is_encoder_decoder:
        input_ids = input_ids.repeat_interleave(beams, dim=0)
        attention_mask = attention_mask.repeat_interleave(beams, dim=0)
    if not net.config.is_encoder_decoder:
        cache = past_key_values
        if cache is None:
            cache = _self_attention_cache(net.config, input_ids.shape[1] + max_new_tokens)
        kwargs["past_key_values"] = cache
        cached = past_key_values is not None
        step, mask = _prompt_inputs(input_ids, attention_mask, max_new_tokens, cached)
        return input_ids, kwargs, None, step, mask
    rows = input_ids.shape[0] * beams
    prompt = torch.full((rows, 1), rules.decoder_start_token_id, device=input_ids.device)
    if encoder_outputs is None:
        encoder_outputs = net.get_encoder()(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        )
    states = encoder_outputs.last_hidden_state
    written = written_steps(net, states, attention_mask, max_new_tokens, fused_product, beams)
    if beams > 1:
        states = states.repeat_interleave(beams, dim=0)
        encoder_outputs = BaseModelOutput(last_hidden_state=states)
        attention_mask = attention_mask.repeat_interleave(beams, dim=0)
    kwargs["encoder_outputs"] = encoder_outputs
    kwargs["attention_mask"] = attention_mask
    self_attention = _self_attention_cache(net.config, max_new_tokens)
    cache = EncoderDecoderCache(self_attention, DynamicCache(config=net.config))
    kwargs["past_key_values"] = cache
    return prompt, kwargs, written, {"decoder_input_ids": prompt}, None


#: Rows that have ended leave the batch (`greedy_generate`) once they are at least this
#: fraction (1 / RETIRE_SHARE) of the rows still in it: their caches are copied out then, which
#: costs about a step's reading of the caches, so not for every row that ends.
RETIRE_SHARE = 4


def retirable(cache: DynamicCache | EncoderDecoderCache) -> bool:
    """Whether rows can leave this cache: each of its layers is one of `DynamicCache`'s own
    (sliding-window ones included) or a `PreallocatedLayer`, which select rows by index."""
    caches = (
        [cache.self_attention_cache, cache.cross_attention_cache]
        if isinstance(cache, EncoderDecoderCache)
        else [cache]
    )
    return all(
        type(layer) in (PreallocatedLayer, DynamicLayer, DynamicSlidingWindowLayer)
        for each in caches
        for layer in each.layers
    )


def keep_rows(kwargs: dict[str, Any], keep: torch.Tensor, written: T5Steps | None) -> None:
    """Keeps the rows `keep` of the batch in the written steps where they run, else in a decode
    step's arguments (`greedy_generate`'s): the key/value caches, and an encoder-decoder
    model's encoder states and question mask."""
    if written is not None:
        written.keep(keep)
        return
    kwargs["past_key_values"].batch_select_indices(keep)
    if "encoder_outputs" in kwargs:
        states = kwargs["encoder_outputs"].last_hidden_state
        kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=states[keep])
        kwargs["attention_mask"] = kwargs["attention_mask"][keep]


def _prompt_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    cached: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A decoder-only model's inputs for its left-padded prompt, as `generate` makes them, and
    the attention mask over the prompt and every new token (None when there is no padding: a
    mask of all ones is left out). Positions count the real tokens (padding at 0). The mask is
    allocated once; each step gives the model its first columns. With `cached` (the cache
    holds all but the prompts' last column), the inputs are that column's."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    step = {"input_ids": input_ids, "position_ids": positions}
    if cached:
        step = {name: value[:, -1:] for name, value in step.items()}
    if bool(attention_mask.all()):
        return step, None
    batch, prompt_length = attention_mask.shape
    mask = attention_mask.new_ones((batch, prompt_length + max_new_tokens))
    mask[:, :prompt_length] = attention_mask
    return {**step, "attention_mask": attention_mask}, mask
