"""Lean beam search: the lean decoding loop's steps (`decoding`), choosing the next tokens as
Hugging Face `generate` does with `num_beams` > 1, without its per-step work on what beam
search does not change.

`beam_generate` returns what `model.generate(input_ids, attention_mask=..., max_new_tokens=...,
num_beams=k, do_sample=False, pad_token_id=...)` returns, token for token: each question's best
finished beam, as long as the longest of them. Every question runs as `k` rows (its beams); at
each step every row's next-token log-probabilities (after the same generation-config rules as
greedy answers, `decoding.ruled_scores`) are added to its beam's score, and of each question's
`k` x vocabulary continuations the best `2k` (more with several end tokens) are kept: those
that end a sequence (an end token, or the cap) among the best `k` enter the question's
finished beams when they score better there (their log-probability over their length to the
power of the config's `length_penalty`), and the best `k` that do not end carry on. A question
is done when its best running beam can no longer beat its worst finished one (as `generate`
estimates it under the config's `early_stopping`), and the loop stops when every question is
done or at the cap. The arithmetic on the scores is `generate`'s, operation by operation, so
that ties and near-ties go the same way.

Where this saves work against `generate`:
- the steps are the lean loop's: T5's written out (`t5_steps`), the others the model's forward
  pass against a cache allocated once, every linear layer on packed weights, the questions
  read in length groups (`generation.generate` sets these up, as for greedy answers);
- a question is read once, not once a beam: an encoder-decoder model's encoder states are
  laid out once a beam after its pass (as `generate` does), and a decoder-only model's prompt
  keys and values after its pass over the prompts (where `generate` reads each prompt `k`
  times); T5's written steps hold a question's cross-attention keys and values once, and its
  beams attend to them together (one SDPA call with `k` queries a question);
- after each step, `generate` copies every layer's whole key/value caches into the order of
  the beams that carry on, the cross-attention's keys and values and a decoder-only model's
  prompts included. A beam only ever continues a beam of its own question, whose question's
  keys and values are the same, so here only the answers' self-attention keys and values are
  reordered, up to the tokens they hold, and only in the rows that take another beam's;
- questions that are done leave the batch (`decoding.RETIRE_SHARE` of it at a time), as
  ended greedy answers do: the steps after compute only the questions still searching, whose
  answers stay `generate`'s up to float rounding (a smaller batch's products may round
  differently in the last bit).

It applies where `decoding.lean_decoding_applies` (the same families and settings as greedy
answers, and no beam-search setting it does not implement: one sequence returned per
question, no beam groups); `tests/test_beam_search.py` proves its answers equal to `generate`'s.
"""

from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.modeling_outputs import BaseModelOutput

from finetune_module.engine.decoding import (
    RETIRE_SHARE,
    GreedyRules,
    PreallocatedLayer,
    first_step,
    greedy_rules,
    keep_rows,
    next_step_inputs,
    retirable,
    ruled_scores,
    transformers_model,
)
from finetune_module.engine.t5_steps import T5Steps

#: What `generate` adds to a score to rule a candidate out (a float, as it adds it).
RULED_OUT = -1.0e9


def fill_token(rules: GreedyRules) -> int:
    """The token `generate`'s beam search writes after a sequence's end: the padding token,
    else (no padding token, or token 0, which its check takes for none) the first end token;
    -1 where nothing ends a sequence."""
    if not rules.eos_token_ids:
        return -1
    return rules.pad_token_id or rules.eos_token_ids[0]


class _Beams:
    """The search's state for the questions still searching (`A` of them, `k` beams each, as
    rows `question * k + beam`): each beam's sequence so far and score, and each question's
    finished beams (sequences, scores, generated lengths, and which slots hold one)."""

    def __init__(self, prompt: torch.Tensor, beams: int, max_length: int, fill: int) -> None:
        questions = prompt.shape[0] // beams
        length = self.prompt_length = prompt.shape[1]
        self.running = prompt.new_full((questions, beams, max_length), fill)
        self.running[:, :, :length] = prompt.view(questions, beams, length)
        self.scores = torch.zeros((questions, beams), dtype=torch.float32, device=prompt.device)
        self.scores[:, 1:] = RULED_OUT  # the first step continues the first beam only
        self.finished = self.running.clone()
        self.finished_scores = torch.full_like(self.scores, RULED_OUT)
        self.finished_lengths = torch.zeros_like(self.running[:, :, 0])
        self.is_finished = torch.zeros_like(self.scores, dtype=torch.bool)
        self.improvable = torch.ones((questions, 1), dtype=torch.bool, device=prompt.device)

    def keep(self, questions: torch.Tensor) -> None:
        """Keeps the questions `questions` (indices among those still searching)."""
        for name, held in vars(self).items():
            if isinstance(held, torch.Tensor):
                setattr(self, name, held[questions])


def _setting(config: GenerationConfig, name: str) -> Any:
    """A generation-config setting as `generate` reads it: the config's, else the default."""
    value = getattr(config, name, None)
    return config._get_default_generation_params()[name] if value is None else value


def _gather(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`values` (questions x slots x ...) at the slots `indices` (questions x chosen)."""
    while indices.dim() < values.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(values, indices, dim=1)


def beam_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    pad_token_id: int | None,
    encoder_outputs: BaseModelOutput | None = None,
    past_key_values: DynamicCache | None = None,
) -> torch.Tensor:
    """The sequences `model.generate(input_ids=..., attention_mask=..., max_new_tokens=...,
    num_beams=num_beams, do_sample=False, pad_token_id=..., encoder_outputs=...)` returns (for
    a model where `decoding.lean_decoding_applies`): each question's best beam (an
    encoder-decoder model's decoder start and answer tokens, a decoder-only model's
    left-padded prompt and answer tokens), filled after its end with `fill_token`, as long as
    the longest of them. An encoder-decoder model's encoder reads the questions once (not once
    a beam) unless `encoder_outputs` holds their states; a decoder-only model reads its
    prompts unless `past_key_values` holds all but their last column, once a beam (as
    `generation.generate` lays out each prompt read once).

    Call it under `torch.inference_mode()`.
    """
    if num_beams < 2:
        raise ValueError(f"beam search needs at least 2 beams, not {num_beams}")
    net = transformers_model(model)
    config = net.generation_config
    rules = greedy_rules(config, pad_token_id)
    penalty, early = (
        _setting(config, "length_penalty"),
        _setting(config, "early_stopping"),
    )
    beams, questions = num_beams, input_ids.shape[0]
    prompt, kwargs, written, step, step_mask = first_step(
        net,
        rules,
        input_ids,
        attention_mask,
        max_new_tokens,
        encoder_outputs,
        past_key_values,
        beams,
    )
    prompt_length = prompt.shape[1]
    max_length = prompt_length + max_new_tokens
    fill = fill_token(rules)
    state = _Beams(prompt, beams, max_length, fill)
    ends = torch.tensor(rules.eos_token_ids, dtype=torch.long, device=prompt.device)
    kept = max(2, 1 + len(ends)) * beams  # continuations kept a step, as generate keeps them
    first_k = torch.arange(kept, device=prompt.device) < beams
    # each question's best beam once it is done: its sequence and generated length
    answers = prompt.new_full((questions, max_length), fill)
    answer_lengths = [0] * questions
    searching = torch.arange(questions, device=prompt.device)  # the questions still searching
    retires = len(ends) > 0 and (written is not None or retirable(kwargs["past_key_values"]))
    length = prompt_length
    while True:
        if written is not None:
            logits = written(step["decoder_input_ids"][:, -1])
        else:
            logits = net(**step, **kwargs).logits[:, -1]
        scores = torch.nn.functional.log_softmax(logits.float(), dim=-1)
        scores = ruled_scores(scores, rules, length, length - prompt_length, max_length)
        sources, hits = _step(state, scores, length, kept, first_k, ends, penalty, early)
        offsets = torch.arange(len(sources), device=sources.device)[:, None] * beams
        source_rows = (sources + offsets).flatten()
        tokens = state.running[:, :, length].flatten()
        length += 1
        # can a question's running beams still beat its finished ones (as generate estimates)?
        longest = max_length if early == "never" and penalty > 0.0 else length
        best = state.scores[:, :1] / (longest - prompt_length) ** penalty
        worst = torch.where(
            state.is_finished, state.finished_scores.min(dim=1, keepdim=True)[0], RULED_OUT
        )
        state.improvable &= (best > worst).any(dim=-1, keepdim=True)
        done = ~state.improvable[:, 0] | (state.is_finished.all(dim=-1) & (early is True))
        if bool(hits.all()) or bool(done.all()):
            break
        _reorder(kwargs, written, source_rows, prompt_length)
        step = next_step_inputs(net, step, tokens, step_mask, length)
        if retires and int(done.sum()) * RETIRE_SHARE >= len(done):
            _answer(state, searching, done.nonzero().squeeze(1), answers, answer_lengths)
            on = (~done).nonzero().squeeze(1)
            searching = searching[on]
            state.keep(on)
            rows = (on[:, None] * beams + torch.arange(beams, device=on.device)).flatten()
            step = {name: value[rows] for name, value in step.items()}
            if step_mask is not None:
                step_mask = step_mask[rows]
            keep_rows(kwargs, rows, written)
    _answer(state, searching, torch.arange(len(searching)), answers, answer_lengths)
    return answers[:, : prompt_length + max(answer_lengths)]


def _answer(
    state: _Beams,
    searching: torch.Tensor,
    indices: torch.Tensor,
    answers: torch.Tensor,
    lengths: list[int],
) -> None:
    """Writes the best finished beam of each question at `indices` (among those still
    searching, whose numbers in the batch are `searching`) into `answers` and its generated
    length into `lengths`."""
    for index in indices.tolist():
        question = int(searching[index])
        answers[question] = state.finished[index, 0]
        lengths[question] = int(state.finished_lengths[index, 0])


def _step(
    state: _Beams,
    scores: torch.Tensor,
    length: int,
    kept: int,
    first_k: torch.Tensor,
    ends: torch.Tensor,
    penalty: float,
    early: bool | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the search on `scores` (rows x vocabulary: each beam's next-token
    log-probabilities, ruled), where the sequences are `length` tokens long: the `kept` best
    continuations of each question, the best `k` that do not end as its running beams, the
    ending ones among the best `k` into its finished beams where they score better. Returns,
    for each running beam, the beam it continues (questions x k) and, for each continuation,
    whether it ended (questions x kept)."""
    questions, beams, max_length = state.running.shape
    vocabulary = scores.shape[-1]
    totals = (scores.view(questions, beams, vocabulary) + state.scores[:, :, None]).view(
        questions, beams * vocabulary
    )
    top_scores, top = torch.topk(totals, k=kept)
    continued, tokens = top // vocabulary, top % vocabulary
    candidates = _gather(state.running, continued)
    candidates[:, :, length] = tokens
    hits = torch.isin(tokens, ends) if len(ends) else torch.zeros_like(tokens, dtype=torch.bool)
    if length + 1 >= max_length:
        hits = torch.ones_like(hits)

    running_scores = top_scores + hits.to(torch.float32) * RULED_OUT
    carry_on = torch.topk(running_scores, k=beams)[1]
    state.running = _gather(candidates, carry_on)
    state.scores = _gather(running_scores, carry_on)
    sources = _gather(continued, carry_on)

    ended = hits & first_k[None, :]
    generated = length + 1 - state.prompt_length  # the continuations' generated tokens
    finished_scores = top_scores / (generated**penalty)
    full = state.is_finished.all(dim=-1, keepdim=True) & (early is True)
    finished_scores += full.to(torch.float32) * RULED_OUT
    finished_scores += (~state.improvable).to(torch.float32) * RULED_OUT
    finished_scores += (~ended) * RULED_OUT
    merged = torch.cat((state.finished_scores, finished_scores), dim=1)
    best = torch.topk(merged, k=beams)[1]
    state.finished = _gather(torch.cat((state.finished, candidates), dim=1), best)
    state.finished_scores = _gather(merged, best)
    lengths = torch.full_like(tokens, generated)
    state.finished_lengths = _gather(torch.cat((state.finished_lengths, lengths), dim=1), best)
    state.is_finished = _gather(torch.cat((state.is_finished, ended), dim=1), best)
    return sources, hits


def _reorder(
    kwargs: dict[str, Any], written: T5Steps | None, rows: torch.Tensor, prompt_length: int
) -> None:
    """Puts the self-attention caches of the tokens so far in the order of the beams that
    carry on (`rows`: for each, the row it continues). A beam continues a beam of its own
    question, so what its question holds stays: an encoder-decoder model's cross-attention
    keys and values, and a decoder-only model's keys and values of its prompt (the first
    `prompt_length` columns) in a preallocated cache."""
    if written is not None:
        written.reorder(rows)
        return
    cache = kwargs["past_key_values"]
    if "encoder_outputs" in kwargs:
        cache.self_attention_cache.reorder_cache(rows)
        return
    for layer in cache.layers:  # a decoder-only model's: its prompt's columns stay
        if type(layer) is PreallocatedLayer:
            layer.reorder_cache(rows, start=prompt_length)
        else:
            layer.reorder_cache(rows)
