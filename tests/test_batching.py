"""Training batches group inputs and targets of similar length, and still vary by epoch."""

import random

import numpy as np
import pytest
import torch

from finetune_module.engine import batching
from finetune_module.engine.batching import LengthGroupedBatches, fewer_padded_tokens


def _lengths(count: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return [rng.randint(5, 500) for _ in range(count)], [rng.randint(5, 150) for _ in range(count)]


def _padded(batches: list[list[int]], sources: list[int], targets: list[int]) -> int:
    return sum(len(b) * (max(sources[i] for i in b) + max(targets[i] for i in b)) for b in batches)


def test_every_example_once_in_full_batches_with_the_short_one_last() -> None:
    sources, targets = _lengths(381)
    torch.manual_seed(0)
    sampler = LengthGroupedBatches(sources, targets, batch_size=8)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(381))
    assert [len(b) for b in batches] == [8] * 47 + [5]
    assert len(sampler) == 381 and sorted(sampler) == list(range(381))
    # the costliest batch comes first
    costs = [_padded([b], sources, targets) for b in batches[:-1]]
    assert costs[0] == max(costs)


def test_less_padding_than_grouping_by_input_length_only() -> None:
    sources, targets = _lengths(400, seed=1)
    torch.manual_seed(0)
    ours = _padded(LengthGroupedBatches(sources, targets, 8).batches(), sources, targets)
    by_input = sorted(range(400), key=lambda i: -sources[i])
    input_only = _padded([by_input[k : k + 8] for k in range(0, 400, 8)], sources, targets)
    real = sum(sources) + sum(targets)
    assert ours < input_only
    assert ours < 1.25 * real


def test_batches_follow_the_seed_and_change_between_epochs() -> None:
    sources, targets = _lengths(200, seed=2)
    sampler = LengthGroupedBatches(sources, targets, 8)
    torch.manual_seed(3)
    first, second = sampler.batches(), sampler.batches()
    torch.manual_seed(3)
    assert sampler.batches() == first
    assert {tuple(sorted(b)) for b in first} != {tuple(sorted(b)) for b in second}
    assert first[1:] != second[1:]


def test_fewer_examples_than_a_batch_make_one_short_batch() -> None:
    torch.manual_seed(0)
    batches = LengthGroupedBatches([3, 9, 4], [1, 2, 3], 8).batches()
    assert len(batches) == 1 and sorted(batches[0]) == [0, 1, 2]


def test_a_swap_puts_long_sources_and_long_targets_apart() -> None:
    # two batches that each hold a long source and a long target: swapping one example
    # between them pads 440 tokens instead of 800
    sources, targets = np.array([100, 100, 10, 10]), np.array([10, 10, 100, 100])
    before = [[0, 2], [1, 3]]
    after = fewer_padded_tokens(before, sources, targets)
    assert _padded(before, sources, targets) == 800
    assert _padded(after, sources, targets) == 440
    assert sorted(sorted(b) for b in after) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("size", [2, 8, 24])
def test_swaps_keep_every_example_and_never_pad_more(size: int) -> None:
    sources, targets = _lengths(40 * size, seed=size)
    order = list(range(40 * size))
    random.Random(size).shuffle(order)
    before = [order[k : k + size] for k in range(0, len(order), size)]
    after = fewer_padded_tokens(before, np.array(sources), np.array(targets))
    assert sorted(i for b in after for i in b) == list(range(40 * size))
    assert [len(b) for b in after] == [size] * 40
    # from batches of random examples, swaps alone remove a good part of the padding
    assert _padded(after, sources, targets) < 0.9 * _padded(before, sources, targets)


def test_the_swaps_cut_the_windows_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    sources, targets = _lengths(400, seed=4)
    torch.manual_seed(5)
    swapped = LengthGroupedBatches(sources, targets, 8).batches()
    monkeypatch.setattr(batching, "fewer_padded_tokens", lambda b, s, t: b)
    torch.manual_seed(5)
    windows = LengthGroupedBatches(sources, targets, 8).batches()
    real = sum(sources) + sum(targets)
    assert sorted(i for b in swapped for i in b) == list(range(400))
    assert _padded(swapped, sources, targets) - real < 0.75 * (
        _padded(windows, sources, targets) - real
    )
