"""The lean greedy decoding loop gives Hugging Face `generate`'s answers, token for token: on
every family, with a LoRA adapter switched on and off, on batches of different lengths, to the
length cap and to early ends; under the generation-config rules it implements; and it leaves
every other config to `generate`. Broken variants of the loop are caught by the same checks."""

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DynamicCache,
    EncoderDecoderCache,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import BaseModelOutput

from finetune_module.engine import decoding, generation, packing, t5_steps
from finetune_module.engine.decoding import greedy_generate, lean_decoding_applies
from finetune_module.engine.models import lora_config
from finetune_module.engine.settings import LoraSettings
from finetune_module.engine.tokens import with_pad_token
from finetune_module.tiny_model import FAMILIES

QUESTIONS = [
    "How do I reset my password?",
    "Refund",
    "My order has not arrived yet and it has been two weeks; what can I do about it?",
    "Can I change the email address on my account?",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread while these tests run: both paths run under the same setting, and
    on a shared 2-core machine two threads wait on each other's core (5x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny:
    """A tiny model of a family (its config changed by `config`) with a LoRA adapter whose
    weights change its answers, its tokenizer, and a padded batch of questions of different
    lengths."""

    def __init__(self, model_dir: Path, family: str, **config: Any) -> None:
        kind = FAMILIES[family].kind
        auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        torch.manual_seed(0)
        base = auto.from_pretrained(model_dir, **config).eval()
        self.model = get_peft_model(base, lora_config(LoraSettings(r=4), base)).eval()
        for name, weight in self.model.named_parameters():
            if "lora_B" in name:
                weight.data.normal_(0.0, 0.5)  # a zero B (peft's start) would change nothing
        self.tokenizer = with_pad_token(AutoTokenizer.from_pretrained(model_dir))
        self.batch = self.tokenizer.pad(
            {"input_ids": self.tokenizer(QUESTIONS)["input_ids"]},
            padding_side="left" if kind == "causal" else None,
            return_tensors="pt",
        )
        self.config = self.model.get_base_model().generation_config
        self.config_ends = list(decoding.greedy_rules(self.config, None).eos_token_ids)

    def adapter(self, on: bool) -> AbstractContextManager[Any]:
        """The adapter switched on (as it is) or off for the block."""
        return nullcontext() if on else self.model.disable_adapter()

    def stock(self, max_new_tokens: int) -> torch.Tensor:
        """`generate`'s greedy sequences for the batch."""
        with torch.inference_mode():
            return self.model.generate(
                **self.batch,
                max_new_tokens=max_new_tokens,
                num_beams=1,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )

    def first_logits(self) -> torch.Tensor:
        """The logits `generate` chooses the batch's first answer tokens from."""
        with torch.inference_mode():
            return self.model.generate(
                **self.batch,
                max_new_tokens=1,
                pad_token_id=self.tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            ).logits[0]

    def lean(self, max_new_tokens: int) -> torch.Tensor:
        """The lean loop's greedy sequences for the batch."""
        with torch.inference_mode():
            return greedy_generate(
                self.model,
                self.batch["input_ids"],
                self.batch["attention_mask"],
                max_new_tokens,
                self.tokenizer.pad_token_id,
            )

    def same(self, max_new_tokens: int, what: str = "") -> torch.Tensor:
        """`generate`'s sequences, checked equal to the lean loop's (`what`: the case)."""
        stock, lean = self.stock(max_new_tokens), self.lean(max_new_tokens)
        assert torch.equal(stock, lean), f"{what}\ngenerate:\n{stock}\nlean:\n{lean}"
        return stock

    def differs(self, max_new_tokens: int) -> bool:
        """Whether the lean loop's sequences differ from `generate`'s."""
        return not torch.equal(self.stock(max_new_tokens), self.lean(max_new_tokens))

    @property
    def prompt_length(self) -> int:
        """How many tokens `generate`'s sequences hold before the answers: the decoder start,
        or the left-padded prompt."""
        return 1 if self.model.config.is_encoder_decoder else self.batch["input_ids"].shape[1]

    def new_tokens(self, sequences: torch.Tensor) -> torch.Tensor:
        """The generated part of `generate`-shaped sequences."""
        return sequences[:, self.prompt_length :]


@pytest.fixture(scope="module")
def tiny(family_model: Callable[[str], Path]) -> Callable[[str], Tiny]:
    """A `Tiny` of a family, built once per module."""
    made: dict[str, Tiny] = {}

    def of(family: str) -> Tiny:
        if family not in made:
            made[family] = Tiny(family_model(family), family)
        return made[family]

    return of


def _second_tokens(t: Tiny) -> list[int]:
    """The tokens `generate` chooses second: as end tokens, they end every answer by its
    second token (some at their first)."""
    return sorted(set(t.new_tokens(t.stock(2))[:, 1].tolist()))


def _set(monkeypatch: pytest.MonkeyPatch, t: Tiny, **settings: Any) -> None:
    """Sets generation-config settings of a Tiny for the test."""
    for key, value in settings.items():
        monkeypatch.setattr(t.config, key, value)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lean_answers_are_generates_on_every_family(
    family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny(family)
    assert lean_decoding_applies(t.model, num_beams=1)
    answers, logits = {}, {}
    for on in (True, False):
        with t.adapter(on):
            answers[on] = t.same(10, f"adapter {'on' if on else 'off'}, to the cap")
            logits[on] = t.first_logits()
    assert not torch.allclose(logits[True], logits[False]), "the adapter changes the model"

    # the first answer ends at its second token, the others when they choose it or later
    ending = t.new_tokens(answers[True])[0, 1].item()
    _set(monkeypatch, t, eos_token_id=[ending, *t.config_ends])
    for on in (True, False):
        with t.adapter(on):
            answers[on] = t.same(10, f"adapter {'on' if on else 'off'}, ending early")
    assert (t.new_tokens(answers[True])[0, 2:] == t.tokenizer.pad_token_id).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ended_answers_leave_the_batch_and_the_answers_stay_generates(
    family: str, family_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = Tiny(family_model(family), family)
    while True:
        to_the_cap = t.new_tokens(t.same(10)).tolist()
        # an end token at which some answers end before others (and before the cap)
        candidates = (x for row in to_the_cap for x in row)
        token = next(
            (x for x in candidates if len(set(_ends(to_the_cap, [x, *t.config_ends]))) > 1), None
        )
        if token is not None:
            break
        # a tiny model may answer every question alike: a stronger adapter tells them apart
        lora_b = [w for name, w in t.model.named_parameters() if "lora_B" in name]
        assert lora_b[0].abs().max() < 100, f"every answer alike: {to_the_cap}"
        for weight in lora_b:
            weight.data *= 4
    end = _ends(to_the_cap, [token, *t.config_ends])
    _set(monkeypatch, t, eos_token_id=[token, *t.config_ends])
    with _rows_per_step(t.model) as rows:
        sequences = t.same(10, "answers ending at different steps")
    # each step's rows: generate's, then the lean loop's, which leaves a row out once it has
    # ended (of 4 rows, one ended is enough: `decoding.RETIRE_SHARE`); after the last row has
    # ended, no more steps
    steps = t.new_tokens(sequences).shape[1]
    assert steps == min(10, max(end) + 1)
    assert rows == [4] * steps + [sum(e >= i for e in end) for i in range(steps)]
    assert min(rows) < 4


def _ends(answers: list[list[int]], tokens: list[int]) -> list[int]:
    """Where each answer (its tokens) would end if `tokens` ended answers: the position of
    the first of them in it, or its length if none."""
    return [next((i for i, x in enumerate(row) if x in tokens), len(row)) for row in answers]


@contextmanager
def _rows_per_step(model: torch.nn.Module) -> Iterator[list[int]]:
    """The rows of each decode step of the model's (its decoder's input) while in the block;
    an encoder-decoder model's encoder, run apart, is not counted."""
    rows: list[int] = []

    def seen(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("decoder_input_ids", kwargs.get("input_ids"))
        rows.append(ids.shape[0])

    net = decoding.transformers_model(model)
    hook = net.register_forward_pre_hook(seen, with_kwargs=True)
    written = t5_steps.T5Steps.__call__

    def written_step(steps: t5_steps.T5Steps, tokens: torch.Tensor) -> torch.Tensor:
        rows.append(tokens.shape[0])
        return written(steps, tokens)

    t5_steps.T5Steps.__call__ = written_step
    try:
        yield rows
    finally:
        hook.remove()
        t5_steps.T5Steps.__call__ = written


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_sliding_window_layers_past_their_window(
    family: str, family_model: Callable[[str], Path]
) -> None:
    t = Tiny(family_model(family), family, sliding_window=4)
    assert type(t.model.get_base_model().config.sliding_window) is int
    assert t.batch["attention_mask"].sum(1).min() > 4  # every prompt outgrows the window
    t.same(10, "sliding window of 4")


def test_phi3_beyond_its_original_length_goes_to_generate(
    tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny("phi3")
    config = t.model.get_base_model().config
    monkeypatch.setattr(config, "original_max_position_embeddings", 40)
    assert lean_decoding_applies(t.model, num_beams=1, longest=40)
    assert not lean_decoding_applies(t.model, num_beams=1, longest=41)
    assert not generation.uses_lean_decoding(t.model, num_beams=1, longest=41)
    calls = []
    monkeypatch.setattr(generation, "greedy_generate", lambda *a: calls.append(1))
    examples = [{"input_ids": list(range(3, 33))}]  # 30 tokens: 30 + 11 > 40
    generation.generate(
        t.model, t.tokenizer, examples, max_new_tokens=11, num_beams=1, batch_size=4
    )
    assert calls == []
    monkeypatch.setattr(decoding, "longest_proven", lambda config: None)
    assert lean_decoding_applies(t.model, num_beams=1, longest=10**6)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_the_loop_stops_when_every_answer_has_ended(
    family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny(family)
    _set(monkeypatch, t, eos_token_id=_second_tokens(t))
    with _rows_per_step(t.model) as steps:
        lean = t.lean(30)
    assert torch.equal(lean, t.stock(30))
    assert t.new_tokens(lean).shape[1] == len(steps) <= 2


def _prompt_and(extra: int) -> Callable[[Tiny], int]:
    """A length: the prompt's (1, an encoder-decoder model's decoder start) and `extra`."""
    return lambda t: (
        (1 if t.model.config.is_encoder_decoder else t.batch["input_ids"].shape[1]) + extra
    )


def _first_tokens(t: Tiny) -> list[int]:
    """The tokens of the first three of every answer, but the end tokens."""
    return sorted(set(t.new_tokens(t.stock(3)).flatten().tolist()) - set(t.config_ends))


# each rule's settings (values computed from the Tiny where they are functions), and the end
# tokens it is tried with
RULES: dict[str, tuple[dict[str, Any], bool]] = {
    "forced_bos": ({"forced_bos_token_id": 5}, False),
    "forced_eos": ({"forced_eos_token_id": 7}, False),
    "forced_eos_list": ({"forced_eos_token_id": [9, 8]}, False),
    "suppress_tokens": ({"suppress_tokens": _first_tokens}, False),
    "bad_words": ({"bad_words_ids": lambda t: [[token] for token in _first_tokens(t)]}, False),
    "min_length": ({"min_length": _prompt_and(5)}, True),
    "min_new_tokens": ({"min_new_tokens": lambda t: 4}, True),
    "min_new_tokens_over_min_length": ({"min_new_tokens": lambda t: 4, "min_length": 2}, True),
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("family", ["t5", "bart", "llama"])
def test_the_generation_rules_give_generates_answers(
    family: str, rule: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny(family)
    settings, early_ends = RULES[rule]
    if early_ends:
        _set(monkeypatch, t, eos_token_id=_second_tokens(t))
    values = {key: value(t) if callable(value) else value for key, value in settings.items()}
    before = t.stock(8)
    _set(monkeypatch, t, **values)
    assert lean_decoding_applies(t.model, num_beams=1)
    if not (rule == "forced_bos" and family == "llama"):  # a prompt is longer than 1 token
        assert not torch.equal(t.stock(8), before), "the rule changes the answers"
    t.same(8)


@pytest.mark.parametrize(
    "settings",
    [
        {"no_repeat_ngram_size": 2},
        {"repetition_penalty": 1.3},
        {"bad_words_ids": [[5, 6]]},
        {"sequence_bias": {(5,): -2.0}},
        {"encoder_no_repeat_ngram_size": 2},
        {"renormalize_logits": True},
        {"decoder_start_token_id": [0, 0, 0, 0]},
        {"max_time": 10.0},
        {"cache_implementation": "static"},
    ],
)
def test_settings_the_loop_does_not_implement_go_to_generate(
    settings: dict[str, Any], tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny("t5")
    _set(monkeypatch, t, **settings)
    assert decoding.stock_only_settings(t.config) == list(settings)
    assert not lean_decoding_applies(t.model, num_beams=1)
    assert not generation.uses_lean_decoding(t.model, num_beams=1)


def test_settings_that_do_not_change_greedy_answers_keep_the_loop(
    tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny("t5")
    _set(monkeypatch, t, do_sample=True, temperature=0.7, top_p=0.9, num_beams=4, max_length=9)
    assert decoding.stock_only_settings(t.config) == []
    t.same(6)


def test_unproven_families_go_to_generate(
    tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny("t5")
    assert lean_decoding_applies(t.model, num_beams=2)  # beam search: tests/test_beam_search.py
    assert not lean_decoding_applies(t.model, num_beams=0)
    monkeypatch.setattr(decoding, "PROVEN", decoding.PROVEN - {"t5"})
    assert not lean_decoding_applies(t.model, num_beams=1)
    assert not lean_decoding_applies(t.model, num_beams=2)
    assert lean_decoding_applies(tiny("llama").model, num_beams=1)
    monkeypatch.setattr(decoding, "PROVEN_ON", "0.0")
    assert not lean_decoding_applies(tiny("llama").model, num_beams=1)


def _pads_with_another_token(config: Any, pad: int | None) -> decoding.GreedyRules:
    rules = GREEDY_RULES(config, pad)
    return dataclasses.replace(rules, pad_token_id=rules.pad_token_id + 1)


def _never_ends(config: Any, pad: int | None) -> decoding.GreedyRules:
    return dataclasses.replace(GREEDY_RULES(config, pad), eos_token_ids=())


def _keeps_a_stale_value(
    self: decoding.PreallocatedLayer, keys: torch.Tensor, values: torch.Tensor, *_: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches each new token's value one step late: the slot holds the token's before it."""
    keys, values = CACHE_UPDATE(self, keys, values)
    if values.shape[2] > 1:
        values[:, :, -1] = values[:, :, -2]
    return keys, values


def _writes_a_stale_value(
    self: t5_steps.T5Steps, layer: int, position: int, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's written steps caching each new token's value one step late."""
    keys, values = WRITTEN_CACHE(self, layer, position, keys, values)
    if values.shape[2] > 1:
        values[:, :, -1] = values[:, :, -2]
    return keys, values


GREEDY_RULES, CACHE_UPDATE = decoding.greedy_rules, decoding.PreallocatedLayer.update
WRITTEN_CACHE = t5_steps.T5Steps._cached
BROKEN = {
    "pads with another token": (decoding, "greedy_rules", _pads_with_another_token),
    "never ends": (decoding, "greedy_rules", _never_ends),
    "ignores the rules": (decoding, "_next_tokens", lambda logits, *_: logits.argmax(-1)),
    "caches a stale value": (decoding.PreallocatedLayer, "update", _keeps_a_stale_value),
    "T5's steps cache a stale value": (t5_steps.T5Steps, "_cached", _writes_a_stale_value),
}


def _forward_logits(
    net: torch.nn.Module,
    states: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    cache: EncoderDecoderCache,
) -> torch.Tensor:
    """The logits of an encoder-decoder model's forward pass for one decode step's tokens."""
    return net(
        encoder_outputs=BaseModelOutput(last_hidden_state=states),
        attention_mask=mask,
        decoder_input_ids=tokens[:, None],
        past_key_values=cache,
        use_cache=True,
    ).logits[:, -1]


#: T5 whose output layer is its embedding scales the decoder's output by the width first (the
#: original T5 checkpoints; flan-t5's and the tiny one's are apart)
SCALED = {"tie_word_embeddings": True, "scale_decoder_outputs": True}


@pytest.mark.parametrize(
    ("family", "config"), [("t5", {}), ("mt5", {}), ("t5", SCALED)], ids=["t5", "mt5", "t5-tied"]
)
def test_t5s_written_steps_give_its_forward_passs_logits(
    family: str,
    config: dict[str, Any],
    tiny: Callable[[str], Tiny],
    family_model: Callable[[str], Path],
) -> None:
    t = Tiny(family_model(family), family, **config) if config else tiny(family)
    net = t.model.get_base_model()
    assert t5_steps.written_steps_apply(net)
    assert bool(config) == getattr(net.config, "scale_decoder_outputs", False)
    mask = t.batch["attention_mask"]
    with torch.inference_mode():
        states = net.get_encoder()(input_ids=t.batch["input_ids"], attention_mask=mask)[0]
        steps = t5_steps.T5Steps(net, states, mask, capacity=8)
        cache = EncoderDecoderCache(
            DynamicCache(config=net.config), DynamicCache(config=net.config)
        )
        tokens = torch.full((4,), net.generation_config.decoder_start_token_id)
        chosen = []
        for step in range(7):
            if step == 3:  # the second and fourth rows leave the batch
                keep = torch.tensor([0, 2])
                steps.keep(keep)
                cache.batch_select_indices(keep)
                states, mask, tokens = states[keep], mask[keep], tokens[keep]
            written = steps(tokens)
            forward = _forward_logits(net, states, mask, tokens, cache)
            assert torch.equal(written, forward), f"step {step}"
            tokens = forward.argmax(-1)
            chosen.extend(tokens.tolist())
    assert len(set(chosen)) > 1  # the steps answer, not one token throughout


@pytest.mark.parametrize("family", ["t5", "mt5"])
@pytest.mark.parametrize("weight_first", [None, 2], ids=["packed", "two-rows-weight-first"])
def test_t5s_written_steps_on_packed_weights_multiply_q_k_v_and_the_gate_as_one(
    family: str,
    weight_first: int | None,
    tiny: Callable[[str], Tiny],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within `packed_weights`, the written steps multiply each layer's q, k and v, and its
    feed-forward's two input layers, as one product each (`decoding.fused_product`, the LoRA
    layers' updates merged): the logits of the layers one by one, bit for bit, before and
    after rows leave, and the forward pass's on the packed layers (up to float rounding: at 2
    rows oneDNN's sums may differ in the last bits between the two paths); two rows where
    they go weight first run the layers one by one, as the forward pass does."""
    monkeypatch.setattr(decoding, "WEIGHT_FIRST_ROWS", weight_first)
    t = tiny(family)
    net = t.model.get_base_model()
    layers = len(net.decoder.block)
    inner = net.config.num_heads * net.config.d_kv
    widths: list[int] = []
    product = packing.product

    def counted(x: torch.Tensor, packed: torch.Tensor, *args: Any) -> torch.Tensor:
        out = product(x, packed, *args)
        widths.append(out.shape[-1])
        return out

    monkeypatch.setattr(decoding.packing, "product", counted)
    mask = t.batch["attention_mask"]
    with torch.inference_mode(), decoding.packed_weights(t.model):
        states = net.get_encoder()(input_ids=t.batch["input_ids"], attention_mask=mask)[0]
        fused = t5_steps.T5Steps(net, states, mask, capacity=6, fuse=decoding.fused_product)
        assert all(together is not None and gate is not None for together, gate in fused.fused)
        apart = t5_steps.T5Steps(net, states, mask, capacity=6)
        cache = EncoderDecoderCache(
            DynamicCache(config=net.config), DynamicCache(config=net.config)
        )
        tokens = torch.full((4,), net.generation_config.decoder_start_token_id)
        for step in range(5):
            if step == 2:  # two rows leave the batch
                keep = torch.tensor([1, 3])
                fused.keep(keep)
                apart.keep(keep)
                cache.batch_select_indices(keep)
                states, mask, tokens = states[keep], mask[keep], tokens[keep]
            widths.clear()
            written = fused(tokens)
            together = widths.count(3 * inner), widths.count(2 * net.config.d_ff)
            assert together == ((0, 0) if len(tokens) == weight_first else (layers, layers))
            assert torch.equal(written, apart(tokens)), f"step {step}"
            forward = _forward_logits(net, states, mask, tokens, cache)
            torch.testing.assert_close(written, forward, rtol=1e-5, atol=1e-5)
            assert torch.equal(written.argmax(-1), forward.argmax(-1))
            tokens = forward.argmax(-1)


@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_t5s_written_steps_attend_to_each_group_of_questions_apart(
    family: str, tiny: Callable[[str], Tiny]
) -> None:
    t = tiny(family)
    net = t.model.get_base_model()
    unlike = _questions_of_unlike_lengths(t)
    order = unlike["attention_mask"].sum(1).argsort(stable=True)  # as `generate` batches them
    ids, mask = unlike["input_ids"][order], unlike["attention_mask"][order]
    with torch.inference_mode():
        states = net.get_encoder()(input_ids=ids, attention_mask=mask)[0]
        steps = t5_steps.T5Steps(net, states, mask, capacity=6)
        assert len(steps.groups) > 1
        cache = EncoderDecoderCache(
            DynamicCache(config=net.config), DynamicCache(config=net.config)
        )
        tokens = torch.full((len(ids),), net.generation_config.decoder_start_token_id)
        for _ in range(5):
            written = steps(tokens)
            forward = _forward_logits(net, states, mask, tokens, cache)
            torch.testing.assert_close(written, forward, rtol=1e-5, atol=1e-5)
            tokens = forward.argmax(-1)
            assert torch.equal(written.argmax(-1), tokens)


def test_the_written_steps_stand_for_t5s_forward_pass_only_where_they_are_its(
    tiny: Callable[[str], Tiny],
) -> None:
    t5 = tiny("t5")
    net = t5.model.get_base_model()
    assert t5_steps.written_steps_apply(net)
    calls: list[int] = []
    hook = net.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        t5.same(6)  # generate's answers, then the lean loop's: its steps call no forward pass
    finally:
        hook.remove()
    assert len(calls) == t5.new_tokens(t5.stock(6)).shape[1]  # generate's steps only
    assert not t5_steps.written_steps_apply(tiny("bart").model.get_base_model())
    try:
        net.train()
        assert not t5_steps.written_steps_apply(net)
        net.eval()
        net.set_attn_implementation("eager")
        assert not t5_steps.written_steps_apply(net)
    finally:
        net.eval()
        net.set_attn_implementation("sdpa")
    assert t5_steps.written_steps_apply(net)


#: the families each broken loop is tried on: T5's decode steps are written out
#: (`t5_steps`), BART's and Llama's run the model's forward pass on preallocated caches
BROKEN_ON = [
    *((family, broken) for broken in list(BROKEN)[:3] for family in ("t5", "llama")),
    ("bart", "caches a stale value"),
    ("llama", "caches a stale value"),
    ("t5", "T5's steps cache a stale value"),
]


@pytest.mark.parametrize(("family", "broken"), BROKEN_ON)
def test_broken_loops_are_caught(
    broken: str, family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny(family)
    ending = t.new_tokens(t.stock(6))[0, 1].item()  # the first answer ends early
    _set(monkeypatch, t, eos_token_id=[ending], forced_eos_token_id=[ending])
    t.same(6)
    monkeypatch.setattr(*BROKEN[broken])
    assert t.differs(6)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_generation_answers_the_same_with_and_without_the_lean_loop(
    family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny(family)
    examples = [{"input_ids": ids} for ids in t.tokenizer(QUESTIONS * 3)["input_ids"]]
    settings = {"max_new_tokens": 10, "num_beams": 1, "batch_size": 5}
    calls = []
    monkeypatch.setattr(
        generation, "greedy_generate", lambda *a, **k: calls.append(1) or greedy_generate(*a, **k)
    )
    lean = generation.generate(t.model, t.tokenizer, examples, **settings)
    assert len(calls) == 3  # 12 questions in batches of 5
    assert generation.generate(t.model, t.tokenizer, examples, **settings, lean=False) == lean
    assert len(calls) == 3
    with t.model.disable_adapter():
        base = generation.generate(t.model, t.tokenizer, examples, **settings)
        assert generation.generate(t.model, t.tokenizer, examples, **settings, lean=False) == base
    assert base != lean


SEQ2SEQ = [family for family, made in FAMILIES.items() if made.kind == "seq2seq"]
CAUSAL = [family for family, made in FAMILIES.items() if made.kind == "causal"]


def _split_cost(lengths: list[int], groups: list[list[int]], group_cost: int) -> int:
    """The tokens an encoder reads for `groups` of rows, each padded to its longest, plus
    `group_cost` for each group."""
    return sum(len(rows) * max(lengths[row] for row in rows) + group_cost for rows in groups)


def test_length_groups_read_the_fewest_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        count = 1 + trial % 9
        lengths = torch.randint(1, 300, (count,), generator=generator).tolist()
        group_cost = [0, 16, 64, 500][trial % 4]
        groups = decoding.length_groups(lengths, group_cost)
        assert sorted(row for rows in groups for row in rows) == list(range(count))
        in_order = [lengths[row] for rows in groups for row in rows]
        assert in_order == sorted(lengths)
        # every split of the rows in order of length into consecutive groups
        order = sorted(range(count), key=lambda row: lengths[row])
        best = min(
            _split_cost(
                lengths,
                [order[a:b] for a, b in zip((0, *cuts), (*cuts, count), strict=True)],
                group_cost,
            )
            for size in range(count)
            for cuts in itertools.combinations(range(1, count), size)
        )
        assert _split_cost(lengths, groups, group_cost) == best, (lengths, group_cost)
    assert decoding.length_groups([5, 5, 5, 5]) == [[0, 1, 2, 3]]
    assert len(decoding.length_groups([3, 500, 4, 480], group_cost=64)) == 2


def test_question_lengths_are_read_from_right_padding_only() -> None:
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert decoding.question_lengths(right) == [2, 4, 1]
    assert decoding.question_lengths(right.flip(1)) is None  # left padding
    assert decoding.question_lengths(torch.tensor([[1, 0, 1, 0]])) is None  # a hole


def _unlike_lengths(t: Tiny) -> list[list[int]]:
    """The questions and a long one, tokenized: they split into length groups."""
    return t.tokenizer([*QUESTIONS, " ".join(QUESTIONS * 6)])["input_ids"]


def _questions_of_unlike_lengths(t: Tiny) -> dict[str, torch.Tensor]:
    """A right-padded batch of the questions and a long one: the encoder reads it in groups."""
    return t.tokenizer.pad({"input_ids": _unlike_lengths(t)}, return_tensors="pt")


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_the_encoder_reads_questions_in_length_groups(
    family: str, tiny: Callable[[str], Tiny]
) -> None:
    t = tiny(family)
    batch = _questions_of_unlike_lengths(t)
    lengths = batch["attention_mask"].sum(1).tolist()
    encoder = t.model.get_base_model().get_encoder()
    reads: list[int] = []
    hook = encoder.register_forward_pre_hook(
        lambda _, args, kwargs: reads.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            grouped = decoding.read_in_length_groups(t.model, **batch).last_hidden_state
            whole = encoder(**batch).last_hidden_state
            alone = [
                encoder(input_ids=batch["input_ids"][row : row + 1, :n]).last_hidden_state
                for row, n in enumerate(lengths)
            ]
    finally:
        hook.remove()
    groups = decoding.length_groups(lengths)
    assert len(groups) > 1 and groups[-1] == [len(lengths) - 1]  # the long question alone
    assert reads[: len(groups)] == [max(lengths[row] for row in rows) for rows in groups]
    for row, n in enumerate(lengths):
        torch.testing.assert_close(grouped[row, :n], alone[row][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grouped[row, :n], whole[row, :n], rtol=1e-4, atol=1e-5)
    assert not grouped[:-1, max(lengths[:-1]) :].any()  # past the short questions' groups
    assert not torch.allclose(grouped[0, 0], grouped[1, 0]), "rows keep their own states"


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_answers_from_length_groups_are_the_whole_batchs(
    family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny(family)
    batch = _questions_of_unlike_lengths(t)
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = batch["input_ids"].tolist()
    examples = [{"input_ids": row[:n]} for row, n in zip(rows, lengths, strict=True)]
    settings = {"max_new_tokens": 10, "num_beams": 1, "batch_size": 8}
    answers = {}
    for path in ("lean", "generate"):
        answers[path] = generation.generate(
            t.model, t.tokenizer, examples, **settings, lean=path == "lean"
        )
    grouped, attended = [], []
    monkeypatch.setattr(
        generation,
        "read_in_length_groups",
        lambda *a: grouped.append(1) or decoding.read_in_length_groups(*a),
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention(query: torch.Tensor, key: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        if query.shape[2] == 1:  # a decode step's
            attended.append(key.shape[2])
        return sdpa(query, key, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention)
    assert generation.generate(t.model, t.tokenizer, examples, **settings) == answers["lean"]
    assert grouped == [1]
    # the decode steps' attention to the questions: each group to its own longest question
    # (T5 in its written steps, the others in `decoding.grouped_key_attention`)
    longest = [max(lengths[row] for row in rows) for rows in decoding.length_groups(lengths)]
    assert {keys for keys in attended if keys in longest} == set(longest)
    net = t.model.get_base_model()
    assert net.config._attn_implementation == "sdpa"  # set back after answering
    assert net.get_encoder().config._attn_implementation == "sdpa"
    monkeypatch.setattr(generation, "read_in_length_groups", lambda *a: None)
    monkeypatch.setattr(generation, "keys_read_in_groups", lambda _: nullcontext())
    whole = generation.generate(t.model, t.tokenizer, examples, **settings)
    assert answers["lean"] == answers["generate"] == whole
    if family in ("t5", "bart"):  # (the tiny mBART's answers decode to empty texts)
        assert len(set(whole)) > 1


@pytest.mark.parametrize("family", CAUSAL)
def test_a_decoder_only_models_steps_attend_to_each_group_of_prompts_apart(
    family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder-only model reads its prompts, all but their last column, group by group of
    rows of similar prompt length, each group padded to its own longest
    (`decoding.prompts_read_in_length_groups`; not with sliding-window layers), and its decode
    steps attend, group by group, only to the keys of the group's longest prompt and the
    answers so far (`decoding.grouped_key_attention` on left padding), on both paths, with the
    answers of the batch reading and attending as one."""
    t = tiny(family)
    examples = [{"input_ids": ids} for ids in _unlike_lengths(t)]
    lengths = sorted(len(example["input_ids"]) for example in examples)
    settings = {"max_new_tokens": 6, "num_beams": 1, "batch_size": 8}
    config = t.model.get_base_model().config
    layers = config.num_hidden_layers
    # Gemma 3's sliding-window layers attend to a window of the latest keys (grouped within it)
    windowed = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    # a cache with sliding-window layers (Gemma 3's, Mistral's) is filled by one pass
    cache = decoding._self_attention_cache(config, 1)
    sliding = any(type(layer) is not decoding.PreallocatedLayer for layer in cache.layers)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    attended: list[int] = []
    read: list[tuple[int, int]] = []  # the prompts' passes: (rows, tokens)

    def attention(query: torch.Tensor, key: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        if query.shape[2] < key.shape[2]:  # a decode step's (grouped queries packed, or one)
            attended.append(key.shape[2])
        elif query.shape[2] > 1:
            read.append((query.shape[0], key.shape[2]))
        return sdpa(query, key, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention)
    groups = decoding.length_groups(lengths)
    assert len(groups) > 1
    # each group's prompts but their last tokens, then the last column: each group its longest
    # prompt, then the token after it
    passes = [(len(rows), max(lengths[row] for row in rows) - 1) for rows in groups]
    first = [max(lengths[row] for row in rows) for rows in groups]
    answers = {}
    for path in ("lean", "generate"):
        attended.clear()
        read.clear()
        answers[path] = generation.generate(
            t.model, t.tokenizer, examples, **settings, lean=path == "lean"
        )
        whole_pass = [(len(lengths), lengths[-1])] * layers
        assert read == (whole_pass if sliding else [p for p in passes for _ in range(layers)])
        # read as one, the prompts' last column goes with the rest
        steps = [first, [length + 1 for length in first]][1 if sliding else 0 :]
        if windowed:
            assert min(attended) < max(attended), path  # not every row the whole window
        else:
            expected = [keys for step in steps for keys in step * layers]
            assert attended[: len(expected)] == expected, path
    assert t.model.get_base_model().config._attn_implementation == "sdpa"  # set back after
    monkeypatch.setattr(generation, "keys_read_in_groups", lambda _: nullcontext())
    monkeypatch.setattr(generation, "prompts_read_in_length_groups", lambda *_: None)
    attended.clear()
    read.clear()
    whole = generation.generate(t.model, t.tokenizer, examples, **settings)
    assert read == [(len(lengths), lengths[-1])] * layers
    if not windowed:
        steps = range(1, settings["max_new_tokens"])
        assert set(attended) == {lengths[-1] + step for step in steps}
    assert answers["lean"] == answers["generate"] == whole


def test_two_rows_go_weight_first_on_cpus_up_to_avx2_only() -> None:
    """MKL's product of two rows weight first beats oneDNN's up to AVX2, not with AVX-512
    (`decoding.weight_first_rows`); this CPU's choice is the module's."""
    assert decoding.weight_first_rows("AVX2") == decoding.weight_first_rows("DEFAULT") == 2
    assert decoding.weight_first_rows("AVX512") is None
    capability = torch.backends.cpu.get_cpu_capability()
    assert decoding.weight_first_rows(capability) == decoding.WEIGHT_FIRST_ROWS


@pytest.mark.parametrize("weight_first", [2, None])
def test_a_linear_layer_multiplies_on_packed_weights_with_the_same_result(
    weight_first: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within `packed_weights`, linear layers (with and without a bias, any row count) give
    `linear`'s products, on weights packed once per layer (two rows weight first where the
    CPU's choice is so); a layer whose product needs a gradient multiplies as before; the
    layers are set back after."""
    assert packing.available()
    monkeypatch.setattr(decoding, "WEIGHT_FIRST_ROWS", weight_first)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(48, 300), torch.nn.Linear(48, 300, bias=False)]
    model = torch.nn.Sequential(*layers)
    inputs = [torch.randn(5, 1, 48), torch.randn(3, 70, 48), torch.randn(1, 48), torch.randn(2, 48)]
    stock = [[layer(x) for x in inputs] for layer in layers]
    packs: list[tuple[int, ...]] = []
    products: list[tuple[int, ...]] = []
    reorder, product = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    with (
        mock.patch.object(
            torch.ops.mkldnn,
            "_reorder_linear_weight",
            side_effect=lambda w, rows: packs.append(tuple(w.shape)) or reorder(w, rows),
        ),
        mock.patch.object(
            torch.ops.mkldnn,
            "_linear_pointwise",
            side_effect=lambda x, *a: products.append(tuple(x.shape)) or product(x, *a),
        ),
        torch.inference_mode(),
        decoding.packed_weights(model),
    ):
        for layer, expected in zip(layers, stock, strict=True):
            for x, want in zip(inputs, expected, strict=True):
                out = layer(x)
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
                assert out.is_contiguous() and out.shape == want.shape
    assert packs == [(300, 48), (300, 48)]  # once a layer
    # every product, rows flattened, but for two rows where they go weight first
    packed_rows = [(5, 48), (224, 48), (1, 48)] + ([(2, 48)] if weight_first is None else [])
    assert products == packed_rows * 2
    with decoding.packed_weights(model):  # with gradients: `linear`, and a gradient
        out = layers[0](inputs[0])
        assert torch.equal(out, stock[0][0]) and out.requires_grad
    assert all("forward" not in vars(layer) for layer in layers)  # set back after


@pytest.mark.parametrize("weight_first", [2, None])
def test_a_lora_layer_multiplies_once_on_its_weight_with_the_update_added(
    weight_first: int | None, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within `packed_weights`, a LoRA layer with its adapter on gives peft's result in one
    product, on its merged weight packed once; switched off, its frozen layer's; for two rows
    where they go weight first, and with a gradient, peft's own forward; the layer is set back
    after."""
    monkeypatch.setattr(decoding, "WEIGHT_FIRST_ROWS", weight_first)
    t = tiny("t5")
    layer = next(m for m in t.model.modules() if type(m) is LoraLinear)
    torch.manual_seed(3)
    x = torch.randn(3, 5, layer.in_features)
    with torch.inference_mode():
        adapted = layer(x)
        with t.model.disable_adapter():
            frozen = layer(x)
    assert not torch.allclose(adapted, frozen, atol=1e-3)  # the adapter counts
    packs: list[tuple[int, ...]] = []
    rows: list[int] = []
    pack, product = packing.pack, packing.product
    with (
        mock.patch.object(
            decoding.packing, "pack", side_effect=lambda w: packs.append(tuple(w.shape)) or pack(w)
        ),
        mock.patch.object(
            decoding.packing,
            "product",
            side_effect=lambda x, *a: rows.append(x.shape[0]) or product(x, *a),
        ),
        torch.inference_mode(),
        decoding.packed_weights(t.model),
    ):
        assert "forward" in vars(layer)
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        assert len(packs) == 1  # the merged weight, once; the adapter's layers never ran
        torch.testing.assert_close(layer(x[:2, 0]), adapted[:2, 0], rtol=1e-5, atol=1e-5)
        assert len(packs) == 1
        assert rows == [15, 15] + ([2] if weight_first is None else [])
        with t.model.disable_adapter():
            torch.testing.assert_close(layer(x), frozen, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(layer)
    with decoding.packed_weights(t.model):  # a gradient (the adapter trains): peft's forward
        out = layer(x)
        assert out.requires_grad
        torch.testing.assert_close(out.detach(), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_answers_on_packed_weights_are_the_stock_products(
    family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On every family, `generation.generate` (both paths) multiplies by packed weights (the
    LoRA layers by their merged ones), and answers as with the stock products."""
    t = tiny(family)
    examples = [{"input_ids": ids} for ids in t.tokenizer(QUESTIONS)["input_ids"]]
    settings = {"max_new_tokens": 10, "num_beams": 1, "batch_size": 8}
    calls: list[int] = []
    product = decoding._packed_product
    monkeypatch.setattr(
        decoding,
        "_packed_product",
        lambda packed, layer, x: calls.append(1) or product(packed, layer, x),
    )
    answers = {
        path: generation.generate(t.model, t.tokenizer, examples, **settings, lean=path == "lean")
        for path in ("lean", "generate")
    }
    assert len(calls) > 20  # every decode step's layers
    linears = [m for m in t.model.modules() if type(m) in (torch.nn.Linear, LoraLinear)]
    assert linears and all("forward" not in vars(m) for m in linears)  # set back after
    monkeypatch.setattr(generation, "packed_weights", lambda _: nullcontext())
    stock = generation.generate(t.model, t.tokenizer, examples, **settings)
    assert answers["lean"] == answers["generate"] == stock


def _attention_inputs(
    lengths: list[int], bias: bool, heads: int = 3, width: int = 8, left: bool = False
) -> tuple[torch.Tensor, ...]:
    """A decode step's query, the questions' keys and values, their right-padding mask
    (batch x 1 x 1 x keys, boolean; left padding, a decoder-only model's, if `left`) and a
    T5-like position bias (1 x heads x 1 x keys) or None."""
    generator = torch.Generator().manual_seed(4)
    batch, keys = len(lengths), max(lengths)
    query = torch.randn(batch, heads, 1, width, generator=generator)
    key, value = (torch.randn(batch, heads, keys, width, generator=generator) for _ in "kv")
    mask = torch.arange(keys)[None, :] < torch.tensor(lengths)[:, None]
    mask = mask.flip(-1) if left else mask
    position_bias = torch.randn(1, heads, 1, keys, generator=generator) if bias else None
    return query, key, value, mask[:, None, None, :], position_bias


@pytest.mark.parametrize(
    ("bias", "left"),
    [(False, False), (True, False), (False, True)],
    ids=["no-bias", "t5-bias", "left-padding"],
)
def test_grouped_key_attention_is_the_padded_batchs(
    bias: bool, left: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = torch.nn.Module().eval()
    calls: list[int] = []
    monkeypatch.setattr(
        decoding,
        "sdpa_attention_forward",
        lambda *a, **k: calls.append(a[2].shape[2]) or sdpa_attention_forward(*a, **k),
    )
    cases = (
        ([3, 4, 40, 41, 300], [4, 41, 300]),
        ([300, 3, 4], [4, 300]),
        ([300, 3, 301, 4], [301]),
    )
    for lengths, groups in cases:
        query, key, value, mask, position_bias = _attention_inputs(lengths, bias, left=left)
        calls.clear()
        out, _ = decoding.grouped_key_attention(
            module, query, key, value, mask, scaling=0.5, position_bias=position_bias
        )
        assert calls == groups  # groups of rows apart from each other: the batch as one
        stock, _ = sdpa_attention_forward(
            module, query, key, value, mask, scaling=0.5, position_bias=position_bias
        )
        torch.testing.assert_close(out, stock, rtol=1e-5, atol=1e-6)
    # several queries a row (a prompt, the encoder), or a module in training: as one
    query, key, value, mask, _ = _attention_inputs([3, 40, 300], bias=False, left=left)
    calls.clear()
    decoding.grouped_key_attention(module, query.expand(-1, -1, 2, -1), key, value, mask)
    decoding.grouped_key_attention(module.train(), query, key, value, mask)
    assert calls == [300, 300]


@pytest.mark.parametrize("family", ["t5", "bart", "llama"])
def test_a_validation_loss_reads_questions_in_length_groups(
    family: str, tiny: Callable[[str], Tiny]
) -> None:
    t = tiny(family)
    if t.model.config.is_encoder_decoder:
        batch = dict(_questions_of_unlike_lengths(t))
    else:
        batch = dict(t.batch)
    labels = t.tokenizer(["an answer", "another, longer answer", "a", "yes", "no"])["input_ids"]
    padded = t.tokenizer.pad({"input_ids": labels[: len(batch["input_ids"])]}, return_tensors="pt")
    batch["labels"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
    if not t.model.config.is_encoder_decoder:  # one sequence: labels as long as the inputs
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        grouped = generation.questions_read_in_groups(t.model, batch)
        stock = t.model(**batch).loss
        loss = t.model(**grouped).loss
    assert ("encoder_outputs" in grouped) == t.model.config.is_encoder_decoder
    torch.testing.assert_close(loss, stock, rtol=1e-5, atol=1e-6)
    # with gradients (training) the batch is left as it is
    assert "encoder_outputs" not in generation.questions_read_in_groups(t.model, batch)
