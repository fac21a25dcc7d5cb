"""Training steps shared between threads: the rows dealt between workers, the same loss and
gradients as one thread, the same dropout masks for the same seed, and the shared state
(the output layer, the torch thread count) left as it was."""

import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Seq2SeqTrainingArguments

from finetune_module.engine import speedups, workers
from finetune_module.engine.memory import ActivationBudget
from finetune_module.engine.trainer import FinetuneTrainer
from finetune_module.tiny_model import FAMILIES
from tests.test_memory import _lora_t5, _unlike_rows
from tests.test_speedups import _family_model


def _budget_bytes(budget: ActivationBudget, rows: int, source: int, target: int) -> float:
    return sum(kept for kept, _ in budget.layer_bytes(rows, source, target))


def _rows_of(part: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> list[int]:
    """The batch's rows a part holds (found by their first input token)."""
    first = batch["input_ids"][:, 0].tolist()
    return [first.index(token) for token in part["input_ids"][:, 0].tolist()]


def test_the_rows_are_dealt_by_their_work_each_worker_within_its_share_of_the_budget(
    tiny_model_dir: Path,
) -> None:
    model = _lora_t5(tiny_model_dir)
    batch = _unlike_rows(model)  # inputs 30, 120, 60, 90; answers 5, 20, 10, 40 (75 tokens)
    sources, targets = [30, 120, 60, 90], [5, 20, 10, 40]
    budget = ActivationBudget(model, 1.0)
    work = [budget.row_work(s, t) for s, t in zip(sources, targets, strict=True)]
    assert work[0] < work[2] < min(work[1], work[3])  # more tokens, more work
    assert budget.row_work(60, 10) > 2 * budget.row_work(30, 5)  # attention grows faster
    shared = budget.worker_parts(batch, 2)
    assert shared is not None and len(shared) == 2
    dealt = []
    for parts in shared:
        ((part, _),) = parts  # each fits half the budget whole
        own = _rows_of(part, batch)
        assert own == sorted(own)
        assert part["input_ids"].shape == (len(own), max(sources[r] for r in own))
        for key, value in part.items():
            assert torch.equal(value, batch[key][own, : value.shape[1]])
            assert (batch[key][own, value.shape[1] :] <= 0).all()  # only padding left out
        dealt.append(own)
    assert sorted(dealt[0] + dealt[1]) == [0, 1, 2, 3]

    # the split whose busier worker has the least work of every split of the 4 rows
    def busier(split: list[list[int]]) -> float:
        return max(sum(work[r] for r in own) for own in split)

    splits = [
        [list(own), [r for r in range(4) if r not in own]]
        for size in range(1, 4)
        for own in itertools.combinations(range(4), size)
    ]
    assert busier(dealt) == min(busier(split) for split in splits)
    tokens = [(batch["labels"][own] != -100).sum().item() for own in dealt]
    assert [parts[0][1] for parts in shared] == pytest.approx([n / 75 for n in tokens])

    # a budget that a worker's two rows overrun but any one row fits: parts within half of it
    probe = ActivationBudget(model, 1.0)
    single = max(_budget_bytes(probe, 1, 120, 20), _budget_bytes(probe, 1, 90, 40))
    tight = ActivationBudget(model, 2.02 * single / 1e9)
    shared = tight.worker_parts(batch, 2)
    assert shared is not None
    assert sum(len(parts) for parts in shared) > 2
    for parts in shared:
        for part, _ in parts:
            assert tight.fits(part, tight.budget / 2)
    taken = sorted(
        r for parts in shared for part, _ in parts for r in part["input_ids"][:, 0].tolist()
    )
    assert taken == sorted(batch["input_ids"][:, 0].tolist())  # every row once
    assert sum(share for parts in shared for _, share in parts) == pytest.approx(1.0)

    # not shared: one worker, fewer rows than workers, a row alone over half the budget, or a
    # batch the budget would not cut
    assert tight.worker_parts(batch, 1) is None
    one = {key: value[:1] for key, value in batch.items()}
    assert tight.worker_parts(one, 2) is None
    assert ActivationBudget(model, 1.5 * single / 1e9).worker_parts(batch, 2) is None
    extra = {**batch, "something": batch["input_ids"]}
    assert tight.worker_parts(extra, 2) is None


def test_one_long_row_is_dealt_against_the_short_ones(tiny_model_dir: Path) -> None:
    # dealt in order of length back and forth, the long row and the shortest would go to one
    # worker (the benchmark's steps: one worker waiting 4-8% of a step, against 2-3% dealt by
    # work)
    model = _lora_t5(tiny_model_dir)
    sources = [20, 30, 40, 200]  # answers of 10 tokens each
    ids = torch.arange(4)[:, None] * 50 + torch.arange(3, 203)[None, :]  # unlike first tokens
    mask = (torch.arange(200) < torch.tensor(sources)[:, None]).long()
    labels = torch.full((4, 10), 5)
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}
    budget = ActivationBudget(model, 1.0)
    shared = budget.worker_parts(batch, 2)
    assert shared is not None
    dealt = sorted(
        sorted(r for part, _ in parts for r in _rows_of(part, batch)) for parts in shared
    )
    assert dealt == [[0, 1, 2], [3]]
    assert budget.row_work(200, 10) > sum(budget.row_work(s, 10) for s in sources[:3])


def _trainer(model: torch.nn.Module, tmp_path: Path, threads: int) -> FinetuneTrainer:
    args = Seq2SeqTrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    trainer = FinetuneTrainer(model=model, args=args)
    trainer.activation_budget = ActivationBudget(model, 1.0)
    trainer.worker_threads = threads
    trainer.current_gradient_accumulation_steps = 2  # the step's share of an accumulated batch
    return trainer


def _threads_running(model: torch.nn.Module) -> tuple[set[int], Callable[[], None]]:
    """The threads the model's forward passes run on, as they run; and how to stop noting."""
    seen: set[int] = set()
    hook = model.register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
    return seen, hook.remove


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_step_on_two_threads_gives_the_batchs_loss_and_gradients(
    family: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """One training step with its rows on two threads against the whole batch on one: the
    same loss and adapter gradients (dropout on, dropping nothing), computed on two threads
    with torch on one core each."""
    model = _family_model(family_model(family))
    batch = _unlike_rows(model)
    if not model.config.is_encoder_decoder:  # the family's own vocabulary
        batch["input_ids"] = batch["input_ids"] % model.config.vocab_size
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def step(threads: int) -> tuple[torch.Tensor, list[torch.Tensor], set[int], list[int]]:
        trainer = _trainer(model, tmp_path, threads)
        counts: list[int] = []
        seen, stop = _threads_running(model)
        inner = model.register_forward_pre_hook(lambda *_: counts.append(torch.get_num_threads()))
        model.zero_grad()
        try:
            loss = trainer.training_step(model, dict(batch))
        finally:
            stop()
            inner.remove()
        return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad], seen, counts

    threads_before = torch.get_num_threads()
    whole_loss, whole_grads, whole_threads, _ = step(1)
    loss, grads, ran_on, counts = step(2)
    assert len(whole_threads) == 1 and len(ran_on) == 2
    assert set(counts) == {max(1, threads_before // 2)}  # torch's threads shared between them
    assert torch.get_num_threads() == threads_before
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(whole_grads) > 0
    for grad, whole_grad in zip(grads, whole_grads, strict=True):
        scale = max(1.0, whole_grad.abs().max().item())  # float32 rounding, as in test_speedups
        torch.testing.assert_close(grad, whole_grad, rtol=1e-4, atol=1e-5 * scale)


def test_steps_on_two_threads_draw_the_same_masks_for_the_same_seed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With the speed layer and real dropout, a step on two threads gives the same gradients,
    to the bit, for the same seed (whichever thread ends first), and others for another."""
    model = _lora_t5(tiny_model_dir)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    base = model.get_base_model()
    speedups.apply_to_model(model, speedups.applicable(speedups.SPEEDUPS, base.config), True)
    trainer = _trainer(model, tmp_path, 2)
    trainer.logit_free_loss = True
    batch = _unlike_rows(model)

    def grads(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        trainer.training_step(model, dict(batch))
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    first, again, other = grads(0), grads(0), grads(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert isinstance(base.get_output_embeddings(), torch.nn.Linear)  # back after the step


def test_the_output_layer_comes_back_when_the_last_thread_is_done_with_it(
    tiny_model_dir: Path,
) -> None:
    base = _lora_t5(tiny_model_dir).get_base_model()
    head = base.get_output_embeddings()
    entered, release = threading.Barrier(2), threading.Event()
    seen: list[Any] = []

    def hold() -> None:
        with speedups.output_layer_off(base) as (layer, _):
            seen.append(layer)
            entered.wait()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    with speedups.output_layer_off(base) as (layer, _):
        entered.wait()
        seen.append(layer)
    # this block is done, the other thread's is not: still off, and its layer still known
    assert isinstance(base.get_output_embeddings(), torch.nn.Identity)
    assert speedups.output_layer(base) is head
    release.set()
    thread.join()
    assert seen == [head, head]
    assert base.get_output_embeddings() is head and speedups.output_layer(base) is head


def test_jobs_at_once_keep_their_order_their_own_masks_and_raise_what_they_raise() -> None:
    def masks() -> list[torch.Tensor]:
        jobs = [lambda: speedups.dropout(torch.ones(1000), 0.5) for _ in range(2)]
        return workers.run_at_once(jobs)

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    first = masks()
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(first, masks(), strict=True))
    assert not torch.equal(first[0], first[1])  # each job its own generator
    assert workers.run_at_once([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]
    assert torch.get_num_threads() == threads

    def fails() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        workers.run_at_once([lambda: 1, fails])
    assert torch.get_num_threads() == threads


def test_the_gradients_of_the_workers_add_up_in_order() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])
    total, nothing = workers.summed_gradients([[a, None], [b, None]])
    assert torch.equal(total, a + b) and nothing is None
    weights = [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    weights[1].grad = torch.ones(2)
    workers.add_gradients(weights, [a, b])
    assert torch.equal(weights[0].grad, a) and torch.equal(weights[1].grad, b + 1)
    assert workers.worker_count(torch.device("meta")) == 1


def test_only_an_adapters_steps_are_shared(tiny_model_dir: Path) -> None:
    """Each worker holds its own gradients: an adapter's are small, a full fine-tune's are
    the model's size again."""
    model = _lora_t5(tiny_model_dir)
    assert workers.few_weights_train(model)
    for weight in model.parameters():
        weight.requires_grad_(True)
    assert not workers.few_weights_train(model)


def test_the_trainer_unwraps_the_model_it_is_given_once(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every part of every step asks for the model inside the accelerator's wrappers; the
    answer is kept for the same model object, and found again for another."""
    model = _lora_t5(tiny_model_dir)
    args = Seq2SeqTrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to="none")
    trainer = FinetuneTrainer(model=model, args=args)
    asked: list[torch.nn.Module] = []
    unwrap = trainer.accelerator.unwrap_model
    monkeypatch.setattr(trainer.accelerator, "unwrap_model", lambda m: asked.append(m) or unwrap(m))
    wrapped = torch.nn.DataParallel(model)  # on the CPU: the model, wrapped
    assert trainer._unwrapped(wrapped) is model
    assert trainer._unwrapped(wrapped) is model
    assert asked == [wrapped]
    assert trainer._unwrapped(model) is model
    assert asked == [wrapped, model]
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 1]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.tensor([[8, 9, 1]]),
    }
    loss = trainer.compute_loss(model.train(), batch)
    assert torch.isfinite(loss) and asked == [wrapped, model]
