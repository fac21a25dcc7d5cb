"""The activation budget: long batches recompute some layers, the results do not change."""

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSeq2SeqLM

from finetune_module.engine import memory
from finetune_module.engine.memory import ActivationBudget
from finetune_module.engine.settings import TrainingSettings
from finetune_module.errors import SettingsError
from tests.conftest import EXAMPLE_DATA, QUICK, cpu_path_only, run_dag


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
def test_a_run_under_a_tiny_budget_trains_exactly_as_without_one(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[bool] = []
    original = ActivationBudget.before_step

    def before_step(self: ActivationBudget, inputs: dict[str, torch.Tensor]) -> None:
        original(self, inputs)
        steps.append(all(layer.gradient_checkpointing for _, layer in self.layers))

    monkeypatch.setattr(ActivationBudget, "before_step", before_step)
    common = {"data_path": str(EXAMPLE_DATA), "model_id": str(tiny_model_dir), **QUICK}
    unlimited = run_dag("base", output_dir=str(tmp_path / "a"), activation_memory_gb=None, **common)
    assert steps == []
    tiny = run_dag("base", output_dir=str(tmp_path / "b"), activation_memory_gb=1e-9, **common)
    assert steps == [True, True]  # both steps recomputed every layer
    for key in ("eval_loss", "rougeL"):
        assert tiny["training_and_validation_set_metrics"][key] == pytest.approx(
            unlimited["training_and_validation_set_metrics"][key], abs=0
        )
    assert tiny["hold_out_set_predictions"] == unlimited["hold_out_set_predictions"]


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True, "lots"])
def test_a_bad_budget_is_refused(value: Any) -> None:
    with pytest.raises(SettingsError, match="activation_memory_gb must be a positive"):
        TrainingSettings(activation_memory_gb=value)


def test_the_automatic_budget_scales_with_the_models_weights(tiny_model_dir: Path) -> None:
    model = _lora_t5(tiny_model_dir)
    weights = sum(p.numel() for p in model.parameters()) * 4  # fp32
    assert memory.budget_gb("auto", model) == pytest.approx(
        memory.AUTO_BUDGET_WEIGHTS * weights / 1e9
    )
    assert memory.budget_gb(None, model) is None
    assert memory.budget_gb(2, model) == 2.0
    twice = torch.nn.Sequential(model, torch.nn.Linear(300, 1000))  # more weights, more budget
    assert memory.budget_gb("auto", twice) > memory.budget_gb("auto", model)
