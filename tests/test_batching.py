"""Training batches group inputs and targets of similar length, and still vary by epoch."""

import random

import torch

from finetune_module.engine.batching import LengthGroupedBatches


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
