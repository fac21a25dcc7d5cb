"""T5 training on real tokens only (`engine/unpadded.py`): the texts laid end to end give the
padded batch's loss and gradients, the model's layers see no padding, and every batch or model
the layout does not fit runs padded as before."""

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForSeq2SeqLM, Seq2SeqTrainingArguments

from finetune_module.engine import speedups, unpadded
from finetune_module.engine.models import lora_config
from finetune_module.engine.settings import LoraSettings
from finetune_module.engine.trainer import FinetuneTrainer


def test_texts_go_to_the_padded_layout_and_back() -> None:
    texts = unpadded.Texts.of(torch.tensor([3, 1, 2]), 3)
    assert texts.index.tolist() == [0, 1, 2, 3, 6, 7]  # row-major positions of real tokens
    states = torch.arange(1.0, 1 + 2 * 6 * 4).view(1, 2, 6, 4)  # [1, heads, tokens, size]
    padded = texts.padded(states)
    assert padded.shape == (3, 2, 3, 4)
    assert padded.transpose(0, 1).is_contiguous()  # heads first: a matrix per head and text
    torch.testing.assert_close(padded[1, :, 0], states[0, :, 3])  # the second text's token
    torch.testing.assert_close(padded[2, :, :2], states[0, :, 4:6])
    assert padded[1, :, 1:].abs().sum() == 0 and padded[2, :, 2].abs().sum() == 0
    back = texts.unpadded(padded.transpose(1, 2))  # as attention returns it: [texts, width, ...]
    torch.testing.assert_close(back, states.transpose(1, 2))
    lowest = torch.finfo(torch.float32).min
    key_mask = texts.key_mask(torch.float32)
    assert key_mask[:, 0, 0].tolist() == [[0, 0, 0], [0, lowest, lowest], [0, 0, lowest]]
    assert texts.key_mask(torch.float16)[1, 0, 0, 1] == torch.finfo(torch.float16).min
    layout = unpadded.Layout(texts, unpadded.Texts.of(torch.tensor([2, 2, 1]), 2))
    assert layout.causal_mask(torch.float32)[0, 0].tolist() == [[0, lowest], [0, 0]]


def _model(model_dir: Path, lora: bool) -> nn.Module:
    """The tiny T5 in training mode, in float64 (so that float rounding does not hide a
    difference), dropout on but dropping nothing (so that the padded and the unpadded paths
    draw no different masks), LoRA or every weight trained, the adapter's second matrix random
    (so that its gradient flows through the first)."""
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dropout_rate=1e-9)
    if lora:
        model = get_peft_model(model, lora_config(LoraSettings(r=4, lora_dropout=1e-9), model))
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(weight, std=0.5)
    else:
        model.requires_grad_(True)
    return model.to(torch.float64).train()


def _batch(sources: list[int], targets: list[int]) -> dict[str, torch.Tensor]:
    """A right-padded batch of texts of these lengths."""
    torch.manual_seed(3)
    ids = torch.randint(3, 200, (len(sources), max(sources)))
    mask = (torch.arange(max(sources))[None, :] < torch.tensor(sources)[:, None]).long()
    labels = torch.randint(3, 200, (len(targets), max(targets)))
    labels[torch.arange(max(targets))[None, :] >= torch.tensor(targets)[:, None]] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def _loss_and_gradients(
    model: nn.Module, trainer: FinetuneTrainer, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize(
    ("lora", "logit_free", "pieces"),
    [
        (True, True, ("cheap_dropout", "attention_dropout", "unpadded")),  # as it trains
        (True, False, ("unpadded",)),  # the model's own loss, and SDPA's attention inside
        (False, False, ("attention_dropout", "unpadded")),  # every weight, position bias too
    ],
)
def test_texts_laid_end_to_end_give_the_padded_batch_loss_and_gradients(
    tiny_model_dir: Path, tmp_path: Path, lora: bool, logit_free: bool, pieces: tuple[str, ...]
) -> None:
    batch = _batch(sources=[23, 5, 17, 1], targets=[4, 11, 1, 7])
    args = Seq2SeqTrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to="none")
    results = []
    for laid in (False, True):
        model = _model(tiny_model_dir, lora)
        speedups.apply_to_model(model, pieces if laid else pieces[:-1], training=True)
        assert unpadded.installed(model) == laid
        trainer = FinetuneTrainer(model=model, args=args)
        trainer.logit_free_loss = logit_free
        shapes: list[tuple[int, ...]] = []
        base = model.get_base_model() if lora else model
        for stack in (base.encoder, base.decoder):
            stack.register_forward_pre_hook(
                lambda _m, _args, kwargs, seen=shapes: seen.append(
                    tuple(kwargs["input_ids"].shape)
                ),
                with_kwargs=True,
            )
        results.append(_loss_and_gradients(model, trainer, batch))
        # the encoder's and the decoder's token ids: padded, or the real tokens in one row
        assert shapes == ([(1, 46), (1, 23)] if laid else [(4, 23), (4, 11)])
    (loss, grads), (stock_loss, stock_grads) = results[1], results[0]
    torch.testing.assert_close(loss, stock_loss, rtol=1e-12, atol=0)
    assert grads.keys() == stock_grads.keys()
    if not lora:
        assert any("relative_attention_bias" in name for name in grads)
    for name, grad in grads.items():
        scale = max(1.0, stock_grads[name].abs().max().item())
        torch.testing.assert_close(grad, stock_grads[name], rtol=1e-9, atol=1e-11 * scale)
        assert grad.abs().sum() > 0, name


def test_batches_and_models_the_layout_does_not_fit_run_padded(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir, lora=True)
    assert unpadded.install(model) and unpadded.install(model)  # twice: wrapped once
    assert model.config._attn_implementation.count("unpadded+") == 1
    base = model.get_base_model()
    batch = _batch(sources=[6, 3], targets=[2, 4])
    laid, layout = unpadded.laid_out_inputs(base, batch)
    assert laid["input_ids"].tolist() == [
        batch["input_ids"][0].tolist() + batch["input_ids"][1, :3].tolist()
    ]
    # each target's decoder inputs start again from the start token
    start = base.config.decoder_start_token_id
    labels = batch["labels"]
    assert laid["decoder_input_ids"].tolist() == [
        [start, labels[0, 0].item(), start, *labels[1, :3].tolist()]
    ]
    assert layout.targets.lengths.tolist() == [2, 4]
    left_padded = {**batch, "attention_mask": batch["attention_mask"].flip(1)}
    assert unpadded.laid_out_inputs(base, left_padded) is None
    with_more = {**batch, "decoder_attention_mask": torch.ones_like(batch["labels"])}
    assert unpadded.laid_out_inputs(base, with_more) is None
    base.encoder.block[0].gradient_checkpointing = True  # recomputed after the layout is gone
    assert unpadded.laid_out_inputs(base, batch) is None
    base.encoder.block[0].gradient_checkpointing = False  # each batch reads the switches anew
    assert unpadded.laid_out_inputs(base, batch) is not None
    base.decoder.gradient_checkpointing = True
    assert unpadded.laid_out_inputs(base, batch) is None
    base.decoder.gradient_checkpointing = False
    # without a layout (evaluation, generation) the model computes what it did before
    stock = _model(tiny_model_dir, lora=True).eval()
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(**batch).logits, stock(**batch).logits)


def test_a_model_without_t5_attention_is_left_as_it_is(
    family_model: object,
) -> None:
    model = AutoModelForSeq2SeqLM.from_pretrained(family_model("bart"))  # type: ignore[operator]
    before = model.config._attn_implementation
    assert not unpadded.install(model)
    assert not unpadded.installed(model)
    assert model.config._attn_implementation == before
