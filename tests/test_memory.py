"""The activation budget: long batches go in parts, or recompute some layers; the loss and
gradients do not change."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSeq2SeqLM, Seq2SeqTrainingArguments

from finetune_module.engine import memory
from finetune_module.engine.memory import ActivationBudget
from finetune_module.engine.settings import TrainingSettings
from finetune_module.engine.trainer import FinetuneTrainer
from finetune_module.errors import SettingsError
from finetune_module.tiny_model import FAMILIES
from tests.conftest import EXAMPLE_DATA, QUICK, cpu_path_only, run_dag
from tests.test_speedups import _family_model


def _lora_t5(tiny_model_dir: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    return get_peft_model(model, lora).train()


def test_plan_checkpoints_no_layer_when_the_batch_fits_and_enough_when_not(
    tiny_model_dir: Path,
) -> None:
    budget = ActivationBudget(_lora_t5(tiny_model_dir), budget_gb=0.001)  # 1 MB
    assert len(budget.layers) == 2  # one encoder and one decoder block
    assert budget.plan(2, 10, 5) == [False, False]
    for shape in [(8, 200, 50), (8, 400, 20), (8, 30, 300)]:
        flags = budget.plan(*shape)
        sizes = budget.layer_bytes(*shape)
        assert any(flags)
        kept = sum(small if on else full for (full, small), on in zip(sizes, flags, strict=True))
        assert kept <= 0.001e9 or all(flags)
    # the long input is paid for by the encoder, the long target by the decoder
    assert budget.plan(8, 400, 20)[0] and budget.plan(8, 30, 300)[1]


def _step(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[Any, int]:
    """Loss, LoRA gradients, and bytes kept for the backward pass of one training step."""
    kept, seen = [0], set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            kept[0] += t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return (loss.item(), grads), kept[0]


def test_checkpointed_layers_keep_less_and_give_the_same_gradients(tiny_model_dir: Path) -> None:
    model = _lora_t5(tiny_model_dir)
    budget = ActivationBudget(model, budget_gb=1e-9)
    ids, labels = torch.randint(3, 300, (4, 120)), torch.randint(3, 300, (4, 40))
    budget.set([False, False])
    (loss, grads), kept_all = _step(model, ids, labels)
    budget.before_step({"input_ids": ids, "labels": labels})
    assert all(layer.gradient_checkpointing for _, layer in budget.layers)
    (loss_again, grads_again), kept_less = _step(model, ids, labels)
    assert kept_less < 0.7 * kept_all
    assert loss_again == loss
    for name, grad in grads.items():
        torch.testing.assert_close(grads_again[name], grad, rtol=0, atol=0)


@cpu_path_only
def test_a_run_under_a_tiny_budget_trains_as_without_one(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a budget no row fits, every step goes one row at a time, each recomputing every
    layer: the same training (no dropout, which draws its masks part by part)."""
    undropped = tmp_path / "model"
    AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir, dropout_rate=0.0).save_pretrained(
        undropped
    )
    for name in os.listdir(tiny_model_dir):  # the tokenizer's files
        if not (undropped / name).exists():
            shutil.copy(tiny_model_dir / name, undropped / name)
    steps: list[tuple[int, bool]] = []
    original = ActivationBudget.before_step

    def before_step(self: ActivationBudget, inputs: dict[str, torch.Tensor]) -> None:
        original(self, inputs)
        recomputed = all(layer.gradient_checkpointing for _, layer in self.layers)
        steps.append((inputs["input_ids"].shape[0], recomputed))

    monkeypatch.setattr(ActivationBudget, "before_step", before_step)
    common = {
        "data_path": str(EXAMPLE_DATA),
        "model_id": str(undropped),
        "lora_dropout": 0.0,
        "per_device_train_batch_size": 4,
        **QUICK,
    }
    unlimited = run_dag("base", output_dir=str(tmp_path / "a"), activation_memory_gb=None, **common)
    assert steps == []
    tiny = run_dag("base", output_dir=str(tmp_path / "b"), activation_memory_gb=1e-9, **common)
    assert steps == [(1, True)] * 8  # 2 steps of 4 rows, one row at a time
    for key in ("eval_loss", "train_loss", "rougeL"):
        assert tiny["training_and_validation_set_metrics"][key] == pytest.approx(
            unlimited["training_and_validation_set_metrics"][key], rel=1e-5
        )
    assert tiny["hold_out_set_predictions"] == unlimited["hold_out_set_predictions"]


def _unlike_rows(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A batch of 4 rows of unlike input lengths (30, 120, 60, 90) and answer lengths (5, 20,
    10, 40), right-padded as the collators pad: a decoder-only model's labels run along its
    inputs, padding left out of the loss."""
    torch.manual_seed(3)
    sources, targets = [30, 120, 60, 90], [5, 20, 10, 40]
    ids = torch.randint(3, 200, (4, 120))
    mask = (torch.arange(120) < torch.tensor(sources)[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        labels = torch.randint(3, 200, (4, 40))
        batch["labels"] = labels.masked_fill(
            torch.arange(40) >= torch.tensor(targets)[:, None], -100
        )
    else:
        batch["labels"] = batch["input_ids"].masked_fill(mask == 0, -100)
    return batch


def test_a_batch_over_the_budget_goes_in_parts_that_fit(tiny_model_dir: Path) -> None:
    model = _lora_t5(tiny_model_dir)
    batch = _unlike_rows(model)
    half = sum(kept for kept, _ in ActivationBudget(model, 1.0).layer_bytes(2, 120, 40))
    budget = ActivationBudget(model, half * 1.01 / 1e9)
    assert not budget.fits(batch)
    parts = budget.parts(batch)
    # rows in order of length, two a part, each part padded to its own longest
    assert [part["input_ids"].shape for part, _ in parts] == [(2, 60), (2, 120)]
    assert [part["labels"].shape for part, _ in parts] == [(2, 10), (2, 40)]
    for (part, _), rows in zip(parts, ([0, 2], [3, 1]), strict=True):
        assert budget.fits(part)
        for key, value in part.items():
            assert torch.equal(value, batch[key][rows, : value.shape[1]])
            assert (batch[key][rows, value.shape[1] :] <= 0).all()  # only padding left out
    # the shares of the loss: each part's tokens in it (5 + 10 and 40 + 20 of 75)
    assert [share for _, share in parts] == pytest.approx([15 / 75, 60 / 75])

    # a batch that fits goes whole; no row fits: one row a part (each then recomputes)
    assert ActivationBudget(model, 1.0).parts(batch) == [(batch, 1.0)]
    nothing = ActivationBudget(model, 1e-9)
    rows = nothing.parts(batch)
    assert [part["input_ids"].shape[1] for part, _ in rows] == [30, 60, 90, 120]
    assert [part["labels"].shape[1] for part, _ in rows] == [5, 10, 40, 20]
    assert [share for _, share in rows] == pytest.approx([5 / 75, 10 / 75, 40 / 75, 20 / 75])
    # what it cannot cut goes whole: one row, keys it does not know, no labels
    one = {key: value[:1] for key, value in batch.items()}
    assert nothing.parts(one) == [(one, 1.0)]
    extra = {**batch, "something": batch["input_ids"]}
    assert nothing.parts(extra) == [(extra, 1.0)]
    unlabelled = {key: value for key, value in batch.items() if key != "labels"}
    assert nothing.parts(unlabelled) == [(unlabelled, 1.0)]
    # a row with nothing in the loss adds nothing: left out
    batch["labels"][1] = -100
    assert [part["input_ids"].shape[1] for part, _ in nothing.parts(batch)] == [30, 60, 90]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_step_in_parts_gives_the_whole_batchs_loss_and_gradients(
    family: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """One training step of a batch over the budget, in parts (one row each, every layer
    recomputing), against the whole batch in one pass: the same loss and adapter gradients."""
    model = _family_model(family_model(family))
    batch = _unlike_rows(model)
    if not model.config.is_encoder_decoder:  # the family's own vocabulary
        batch["input_ids"] = batch["input_ids"] % model.config.vocab_size
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    args = Seq2SeqTrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    trainer = FinetuneTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 2  # the step's share of an accumulated batch

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = trainer.training_step(model, dict(batch))
        return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    whole_loss, whole_grads = step()
    trainer.activation_budget = ActivationBudget(model, 1e-9)
    parts = trainer.activation_budget.parts(batch)
    assert len(parts) == 4 and sum(share for _, share in parts) == pytest.approx(1.0)
    loss, grads = step()
    assert all(layer.gradient_checkpointing for _, layer in trainer.activation_budget.layers)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(whole_grads) > 0
    for grad, whole_grad in zip(grads, whole_grads, strict=True):
        scale = max(1.0, whole_grad.abs().max().item())  # float32 rounding, as in test_speedups
        torch.testing.assert_close(grad, whole_grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True, "lots"])
def test_a_bad_budget_is_refused(value: Any) -> None:
    with pytest.raises(SettingsError, match="activation_memory_gb must be a positive"):
        TrainingSettings(activation_memory_gb=value)


def test_the_automatic_budget_scales_with_the_models_weights(tiny_model_dir: Path) -> None:
    # weights on the meta device: counted, never allocated
    big = torch.nn.Linear(10_000, 20_000, bias=False, device="meta")  # 0.8 GB of fp32
    assert memory.budget_gb("auto", big) == pytest.approx(memory.AUTO_BUDGET_WEIGHTS * 0.8)
    bigger = torch.nn.Sequential(big, torch.nn.Linear(20_000, 10_000, device="meta"))
    assert memory.budget_gb("auto", bigger) > memory.budget_gb("auto", big)
    # a small model's budget: the floor (the tiny model's weights are under a megabyte)
    model = _lora_t5(tiny_model_dir)
    assert sum(p.numel() for p in model.parameters()) * 4 < 1e6
    assert memory.budget_gb("auto", model) == memory.AUTO_BUDGET_FLOOR_GB
    assert memory.budget_gb(None, model) is None
    assert memory.budget_gb(2, model) == 2.0
