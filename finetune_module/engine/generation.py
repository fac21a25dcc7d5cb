"""Answers from a model: batched greedy (or beam) decoding of tokenized questions.

Questions are sorted by length so that each batch pads little, then the answers are put back
in order. Greedy answers come from the lean decoding loop (`engine.decoding`), beam search's
from its lean form (`engine.beam_search`), where they are proven to give `generate`'s
answers; from Hugging Face `generate` everywhere else. Where the
loop is proven for an encoder-decoder model, its encoder reads each batch's questions in
smaller groups of similar length (`decoding.read_in_length_groups`) and the decoder answers the
whole batch at once, each group attending only to its own questions' length
(`decoding.keys_read_in_groups`); a decoder-only model reads its prompts in such groups too
(`decoding.prompts_read_in_length_groups`, into the key/value cache), and its decode steps
attend likewise, each group of prompts of similar length to its own longest prompt's keys.
Both paths get the same states, caches and attention. With
several processes each answers its share of the batches and the answers are gathered, so every
process ends with the answers of a single-process run.
"""

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from finetune_module.engine.beam_search import beam_generate
from finetune_module.engine.decoding import (
    greedy_generate,
    keys_read_in_groups,
    lean_decoding_applies,
    packed_weights,
    prompts_read_in_length_groups,
    read_in_length_groups,
)
from finetune_module.engine.distributed import (
    gathered,
    is_main_process,
    this_process_share,
    weights_sharded,
    world_size,
)
from finetune_module.engine.tokens import TokenizedSet, input_lengths


def model_device(model: torch.nn.Module) -> torch.device:
    """The device the model's weights are on."""
    return next(model.parameters()).device


def uses_lean_decoding(model: torch.nn.Module, num_beams: int, longest: int = 0) -> bool:
    """Whether `generate` answers with the lean decoding loop, for sequences of up to `longest`
    tokens: a single process on the CPU (where the loop is proven; several processes, sharded
    weights and GPUs keep Hugging Face `generate`), and a model and settings the loop gives
    `generate`'s answers for (`decoding.lean_decoding_applies`)."""
    return (
        world_size() == 1
        and not weights_sharded(model)
        and model_device(model).type == "cpu"
        and lean_decoding_applies(model, num_beams, longest)
    )


def questions_read_in_groups(model: torch.nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs of a forward pass without gradients (a validation loss) with the encoder's
    states read in length groups (`decoding.read_in_length_groups`, as `generate` reads its
    questions): for an encoder-decoder model the lean loop is proven for here
    (`uses_lean_decoding`), a batch holding `input_ids` and `attention_mask`. The same loss up
    to float rounding, with less padding read: a validation batch of 8 pads every question to
    its longest. Anything else: the inputs as they are."""
    if (
        torch.is_grad_enabled()
        or not model.config.is_encoder_decoder
        or "encoder_outputs" in inputs
        or not {"input_ids", "attention_mask"} <= inputs.keys()
        or not uses_lean_decoding(model, num_beams=1)
    ):
        return dict(inputs)
    read = read_in_length_groups(model, inputs["input_ids"], inputs["attention_mask"])
    return dict(inputs) if read is None else {**inputs, "encoder_outputs": read}


def _read_in_groups(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], max_new_tokens: int, num_beams: int
) -> dict[str, Any]:
    """The batch's questions read in length groups, as the arguments both paths take: an
    encoder-decoder model's encoder states (`encoder_outputs`), or a decoder-only model's
    key/value cache of its prompts but their last column (`past_key_values`, with room for
    `max_new_tokens` more; with beam search, each prompt's read once and laid out once a beam,
    as `generate` lays out its rows); none where one group is best."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if model.config.is_encoder_decoder:
        read = read_in_length_groups(model, ids, mask)
        return {} if read is None else {"encoder_outputs": read}
    cache = prompts_read_in_length_groups(model, ids, mask, ids.shape[1] + max_new_tokens)
    if cache is None:
        return {}
    if num_beams > 1:
        cache.batch_repeat_interleave(num_beams)
    return {"past_key_values": cache}


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: TokenizedSet | list[dict[str, list[int]]],
    max_new_tokens: int,
    num_beams: int,
    batch_size: int,
    desc: str = "answering",
    quiet: bool = True,
    lean: bool = True,
) -> list[str]:
    """The model's decoded answers to the examples' `input_ids`, in the examples' order.

    Examples are sorted by length so that each batch pads little, then put back in order. With
    several processes each answers its share of the same batches, so the answers do not depend
    on how many processes there are. A decoder-only model's prompts are padded on the left, so
    that its answer follows on. A progress bar named `desc` counts the answers (the main
    process's share) unless `quiet`. With `lean`, answers come from the lean decoding loop
    where `uses_lean_decoding` (greedy or beam search: the same answers, with less work per
    token); where it is
    proven for the model (`lean` or not), an encoder-decoder model's encoder reads each batch in
    length groups, the decode steps attend to questions (or prompts) in length groups, and their
    linear layers multiply by their weights packed for oneDNN (`packed_weights`).
    """
    lengths = input_lengths(examples)
    order = np.argsort(lengths, kind="stable").tolist()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    answered: list[tuple[int, str]] = []
    device, sharded = model_device(model), weights_sharded(model)
    decoder_only = not model.config.is_encoder_decoder
    share = this_process_share(batches, model)
    longest = int(lengths.max(initial=0)) + max_new_tokens
    proven = uses_lean_decoding(model, num_beams, longest)
    lean = lean and proven
    progress = tqdm(
        total=sum(map(len, share)),
        desc=desc,
        unit="answer",
        disable=quiet or not is_main_process(),
    )
    with torch.inference_mode(), progress, contextlib.ExitStack() as proven_only:
        if proven:
            proven_only.enter_context(keys_read_in_groups(model))
            proven_only.enter_context(packed_weights(model))
        for indices in share:
            batch = tokenizer.pad(
                {"input_ids": [examples[i]["input_ids"] for i in indices]},
                padding_side="left" if decoder_only else None,
                return_tensors="pt",
            ).to(device)
            read = _read_in_groups(model, batch, max_new_tokens, num_beams) if proven else {}
            if lean and num_beams > 1:
                generated = beam_generate(
                    model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    max_new_tokens,
                    num_beams,
                    tokenizer.pad_token_id,
                    **read,
                )
            elif lean:
                generated = greedy_generate(
                    model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    max_new_tokens,
                    tokenizer.pad_token_id,
                    **read,
                )
            else:
                generated = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    do_sample=False,
                    use_cache=True,
                    synced_gpus=sharded,  # sharded weights: every process runs every step
                    pad_token_id=tokenizer.pad_token_id,
                    **read,
                )
            if decoder_only:  # the output starts with the prompt
                generated = generated[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            answered.extend((i, text.strip()) for i, text in zip(indices, texts, strict=True))
            progress.update(len(indices))
    answers = [""] * len(examples)
    for i, text in gathered(answered, model):
        answers[i] = text
    return answers


def answer_sets(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sets: dict[str, TokenizedSet | list[dict[str, list[int]]]],
    generation_settings: dict[str, int],
    who: str = "model",
    quiet: bool = True,
) -> dict[str, list[str]]:
    """The model's answers to several sets of questions, by set name, generated in one pass
    over all of them: decoding is bound by reading the weights, so a batch of 20 answers costs
    about what a batch of 4 does, and a small set fills another's last batch. The progress bar
    names the model `who` and the sets."""
    examples = [example for rows in sets.values() for example in rows]
    desc = f"{who}, {' and '.join(name.replace('_', '-') for name in sets)} sets"
    answers = generate(model, tokenizer, examples, **generation_settings, desc=desc, quiet=quiet)
    by_set, start = {}, 0
    for name, rows in sets.items():
        by_set[name] = answers[start : start + len(rows)]
        start += len(rows)
    return by_set
