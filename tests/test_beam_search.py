"""Lean beam search gives Hugging Face `generate`'s beam-search answers, token for token: on
every family, with a LoRA adapter switched on and off, to the cap and to early ends, under each
`early_stopping` and a length penalty, with questions leaving the batch once done; the settings
it does not implement go to `generate`. Broken variants of the search are caught by the same
checks."""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from finetune_module.engine import beam_search, decoding, generation, t5_steps
from finetune_module.engine.beam_search import beam_generate
from finetune_module.engine.decoding import lean_decoding_applies
from finetune_module.tiny_model import FAMILIES
from tests import test_decoding
from tests.test_decoding import QUESTIONS, Tiny

# the decoding tests' fixtures: their tiny models (built once), torch on one thread
tiny, one_thread = test_decoding.tiny, test_decoding.one_thread


def _stock(t: Tiny, beams: int, max_new_tokens: int) -> torch.Tensor:
    """`generate`'s beam-search sequences for the batch."""
    with torch.inference_mode():
        return t.model.generate(
            **t.batch,
            max_new_tokens=max_new_tokens,
            num_beams=beams,
            do_sample=False,
            pad_token_id=t.tokenizer.pad_token_id,
        )


def _lean(t: Tiny, beams: int, max_new_tokens: int) -> torch.Tensor:
    """Lean beam search's sequences for the batch."""
    with torch.inference_mode():
        return beam_generate(
            t.model,
            t.batch["input_ids"],
            t.batch["attention_mask"],
            max_new_tokens,
            beams,
            t.tokenizer.pad_token_id,
        )


def _same(t: Tiny, beams: int, max_new_tokens: int, what: str = "") -> torch.Tensor:
    """`generate`'s sequences, checked equal to lean beam search's (`what`: the case)."""
    stock, lean = _stock(t, beams, max_new_tokens), _lean(t, beams, max_new_tokens)
    assert torch.equal(stock, lean), f"{what}\ngenerate:\n{stock}\nlean:\n{lean}"
    return stock


def _ending_at_different_steps(t: Tiny, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Makes two of the tokens `generate`'s best beams choose second end tokens too, so that
    beams end at different steps; returns the end tokens."""
    second = t.new_tokens(_stock(t, 3, 2))[:, 1].tolist()
    ends = [*sorted(set(second) - set(t.config_ends))[:2], *t.config_ends]
    monkeypatch.setattr(t.config, "eos_token_id", ends)
    return ends


def _ending_second(t: Tiny, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Makes the token `generate`'s best beams choose second most often an end token, without
    a length penalty: the questions whose best beam chooses it end there (a beam's score
    only falls as it grows). Returns the end tokens."""
    monkeypatch.setattr(t.config, "eos_token_id", t.config_ends)
    second = t.new_tokens(_stock(t, 3, 4))[:, 1]  # not the last: some families force an end
    second = second[~torch.isin(second, torch.tensor(t.config_ends))]
    ends = [int(second.mode().values), *t.config_ends]
    monkeypatch.setattr(t.config, "eos_token_id", ends)
    monkeypatch.setattr(t.config, "length_penalty", 0.0)
    return ends


def _ends_early(t: Tiny, sequences: torch.Tensor, ends: list[int], cap: int) -> bool:
    """Whether some answer ends before the cap (an end token before its last column)."""
    answers = t.new_tokens(sequences)
    return answers.shape[1] < cap or bool(torch.isin(answers[:, :-1], torch.tensor(ends)).any())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lean_beams_are_generates_on_every_family(
    family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny(family)
    assert lean_decoding_applies(t.model, num_beams=3)
    for on in (True, False):
        with t.adapter(on):
            _same(t, 3, 8, f"adapter {'on' if on else 'off'}, to the cap")
    for on in (True, False):
        with t.adapter(on), monkeypatch.context() as settings:
            _ending_at_different_steps(t, settings)
            _same(t, 3, 8, f"adapter {'on' if on else 'off'}, ending at different steps")
            ends = _ending_second(t, settings)
            sequences = _same(t, 3, 8, f"adapter {'on' if on else 'off'}, ending second")
            assert _ends_early(t, sequences, ends, 8), "some answer ends before the cap"


@pytest.mark.parametrize("family", ["t5", "bart", "llama"])
@pytest.mark.parametrize(
    ("early_stopping", "length_penalty"),
    [(False, 1.0), (True, 1.0), ("never", 1.0), (False, 2.0), ("never", -1.0), (False, 0.0)],
)
def test_early_stopping_and_length_penalty_are_generates(
    family: str,
    early_stopping: bool | str,
    length_penalty: float,
    tiny: Callable[[str], Tiny],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = tiny(family)
    _ending_at_different_steps(t, monkeypatch)
    monkeypatch.setattr(t.config, "early_stopping", early_stopping)
    monkeypatch.setattr(t.config, "length_penalty", length_penalty)
    assert lean_decoding_applies(t.model, num_beams=4)
    for beams in (2, 4):
        _same(t, beams, 10, f"{beams} beams")


def test_done_questions_leave_the_batch_and_the_answers_stay_generates(
    tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny("t5")
    rows_seen: list[int] = []
    step = t5_steps.T5Steps.__call__

    def counting(self: t5_steps.T5Steps, tokens: torch.Tensor) -> torch.Tensor:
        rows_seen.append(tokens.shape[0])
        return step(self, tokens)

    monkeypatch.setattr(t5_steps.T5Steps, "__call__", counting)
    monkeypatch.setattr(t.config, "length_penalty", 0.0)
    questions = t.batch["input_ids"].shape[0]
    chosen = t.new_tokens(_stock(t, 3, 12)).flatten().tolist()
    # an end token with which some questions are done before others (not every token is one)
    for token in dict.fromkeys(chosen):
        monkeypatch.setattr(t.config, "eos_token_id", [token, *t.config_ends])
        rows_seen.clear()
        lean = _lean(t, 3, 12)
        if questions * 3 > min(rows_seen) > 0:
            break
    else:
        pytest.fail("no end token lets a question finish before the others")
    stock = _stock(t, 3, 12)
    assert torch.equal(stock, lean), f"generate:\n{stock}\nlean:\n{lean}"
    assert rows_seen[0] == questions * 3
    assert all(rows % 3 == 0 for rows in rows_seen), "a question leaves with all its beams"


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_batch_of_many_questions_searches_as_generate(
    family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten questions in one batch (a question that is done stays in the batch until a
    quarter of it is), each of the first tokens the beams choose made an end token in turn,
    under the settings where `generate` rules out what a done question's beams find later and
    where "never" estimates a running beam's best at the cap."""
    t = tiny(family)
    many = [*QUESTIONS, *generation_questions()[:6]]
    padding = "left" if family == "llama" else None
    batch = t.tokenizer.pad(
        {"input_ids": t.tokenizer(many)["input_ids"]}, padding_side=padding, return_tensors="pt"
    )
    monkeypatch.setattr(t, "batch", batch)
    chosen = t.new_tokens(_stock(t, 4, 12))[:, :6].flatten().tolist()
    for token in list(dict.fromkeys(chosen))[:12]:
        monkeypatch.setattr(t.config, "eos_token_id", [token, *t.config_ends])
        for early, penalty in [("never", 1.0), (False, 1.0), (False, 2.0)]:
            monkeypatch.setattr(t.config, "early_stopping", early)
            monkeypatch.setattr(t.config, "length_penalty", penalty)
            _same(t, 4, 12, f"end token {token}, early_stopping {early}, penalty {penalty}")


@pytest.mark.parametrize("family", ["t5", "llama", "qwen3"])
def test_questions_read_in_length_groups_search_as_generate_reading_them_whole(
    family: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encoder reads each question once, a decoder-only model each prompt once (laid out
    once a beam), in length groups; both beam searches (the lean one and `generate`'s) on
    what they read give `generate`'s answers reading the batch whole, once a beam."""
    t = tiny(family)
    padding = "left" if family != "t5" else None
    batch = t.tokenizer.pad(
        {"input_ids": sorted(test_decoding._unlike_lengths(t), key=len)},  # as generate sorts
        padding_side=padding,
        return_tensors="pt",
    )
    monkeypatch.setattr(t, "batch", batch)
    ends = _ending_at_different_steps(t, monkeypatch)
    whole = _stock(t, 3, 8)
    for path in ("lean", "generate"):
        with torch.inference_mode(), decoding.keys_read_in_groups(t.model):
            read = generation._read_in_groups(t.model, batch, 8, num_beams=3)
            assert read, "the batch is read in groups"
            if path == "lean":
                found = beam_generate(t.model, **batch, max_new_tokens=8, num_beams=3,
                                      pad_token_id=t.tokenizer.pad_token_id, **read)  # fmt: skip
            else:
                found = t.model.generate(**batch, max_new_tokens=8, num_beams=3, do_sample=False,
                                         pad_token_id=t.tokenizer.pad_token_id, **read)  # fmt: skip
        assert torch.equal(found, whole), f"{path}, ends {ends}:\n{found}\nwhole:\n{whole}"


def test_settings_the_search_does_not_implement_go_to_generate(
    tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiny("t5")
    assert lean_decoding_applies(t.model, num_beams=2)
    monkeypatch.setattr(t.config, "num_beam_groups", 2)
    monkeypatch.setattr(t.config, "diversity_penalty", 0.5)
    assert decoding.stock_only_beam_settings(t.config) == ["num_beam_groups", "diversity_penalty"]
    assert not lean_decoding_applies(t.model, num_beams=2)
    assert lean_decoding_applies(t.model, num_beams=1), "greedy answers ignore beam groups"
    with pytest.raises(ValueError, match="at least 2 beams"):
        beam_generate(t.model, t.batch["input_ids"], t.batch["attention_mask"], 4, 1, 0)


def test_generation_answers_the_same_with_and_without_lean_beams(
    tiny: Callable[[str], Tiny],
) -> None:
    t = tiny("t5")
    questions = [*QUESTIONS, *generation_questions()]
    examples = [{"input_ids": ids} for ids in t.tokenizer(questions)["input_ids"]]
    answers = {
        lean: generation.generate(t.model, t.tokenizer, examples, 8, 3, 4, lean=lean)
        for lean in (True, False)
    }
    assert answers[True] == answers[False]
    assert len(set(answers[True])) > 1


def generation_questions() -> list[str]:
    """Questions of many lengths, more than a batch holds."""
    return [("Where is my parcel " * n).strip() + "?" for n in range(1, 10)]


def _forgets_the_reorder(*_: Any) -> None:
    """Leaves the caches in the order of the last step's beams."""


def _scores_without_log_softmax(
    scores: torch.Tensor, rules: decoding.GreedyRules, *args: Any
) -> torch.Tensor:
    return RULED(scores.exp(), rules, *args)


RULED = beam_search.ruled_scores
BROKEN = {
    "forgets to reorder the caches": (beam_search, "_reorder", _forgets_the_reorder),
    "adds probabilities, not log-probabilities": (
        beam_search,
        "ruled_scores",
        _scores_without_log_softmax,
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_searches_are_caught(
    broken: str, tiny: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    where, name, replacement = BROKEN[broken]
    caught = False
    for family in ("t5", "llama"):
        t = tiny(family)
        with monkeypatch.context() as patched:
            patched.setattr(where, name, replacement)
            lean = _lean(t, 3, 8)
        caught = caught or not torch.equal(_stock(t, 3, 8), lean)
    assert caught, f"the search that {broken} gives generate's answers"
