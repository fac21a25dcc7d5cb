"""The CPU speed layer computes the same functions as what it replaces: each piece, for each
model family it is proven for (`speedups.PROVEN`), gives the stock path's loss and gradients;
unproven families and other devices run the stock path."""

import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.activations import NewGELUActivation

import finetune_module
from finetune_module.engine import masks, speedups, unpadded, workers
from finetune_module.engine.memory import ActivationBudget
from finetune_module.engine.models import lora_config
from finetune_module.engine.settings import LoraSettings, speedups_requested
from finetune_module.engine.trainer import FinetuneTrainer
from finetune_module.tiny_model import FAMILIES, build_causal, build_t5
from tests.conftest import EXAMPLE_DATA, QUICK, REPO, cpu_path_only, run_dag


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_each_value_with_probability_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    keep = speedups._keep_mask(torch.Size((1000, 1001)), p, torch.device("cpu"))
    assert keep.shape == (1000, 1001) and keep.dtype == torch.bool
    assert keep.float().mean().item() == pytest.approx(1 - p, abs=0.002)
    # no pattern along either axis (rows, columns, or the four 16-bit lanes of a random word)
    assert keep.float().mean(dim=0).std().item() < 0.05
    assert keep.float().mean(dim=1).std().item() < 0.05
    lanes = keep.flatten()[: 4 * 250_000].view(-1, 4).float().mean(dim=0)
    assert torch.allclose(lanes, torch.full((4,), 1 - p), atol=0.005)


def test_dropout_scales_kept_values_and_its_gradient_follows_the_mask() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 300).abs().add(0.1).requires_grad_()
    y = speedups.dropout(x, 0.25)
    kept = y != 0
    assert 0.7 < kept.float().mean().item() < 0.8
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)


def test_dropout_is_the_identity_in_eval_mode_and_at_p_zero_and_zero_at_p_one() -> None:
    x = torch.randn(10, 10)
    assert speedups.dropout(x, 0.3, training=False) is x
    assert speedups.dropout(x, 0.0) is x
    assert not speedups.dropout(x, 1.0).any()
    module = speedups.FastDropout(0.3).eval()
    assert module(x) is x


def test_dropout_masks_follow_the_torch_seed() -> None:
    x = torch.ones(50, 50)
    torch.manual_seed(7)
    first = speedups.dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(speedups.dropout(x, 0.5), first)
    assert not torch.equal(speedups.dropout(x, 0.5), first)


def test_a_mask_is_seeded_from_torch_and_the_same_compiled_and_from_numpy() -> None:
    # past numpy's chunks (262,144 values), the last short
    shape = torch.Size((3, 5, masks._NUMPY_CHUNK // 4 + 7))
    cpu = torch.device("cpu")
    torch.manual_seed(3)
    one = speedups._keep_mask(shape, 0.1, cpu)
    torch.manual_seed(3)
    assert torch.equal(speedups._keep_mask(shape, 0.1, cpu), one)
    torch.manual_seed(4)
    assert not torch.equal(speedups._keep_mask(shape, 0.1, cpu), one)
    assert masks.kernels() is not None  # llvmlite is a dependency: the kernels must compile
    for seed in (12345, -(1 << 62), (1 << 64) - 1):
        for p in (0.05, 0.1, 0.5):
            compiled = masks.keep_mask(shape, p, seed)
            assert torch.equal(masks.keep_mask(shape, p, seed, compiled=False), compiled)
    # the last, partial chunk is drawn like the others
    tail = one.flatten()[-(masks._NUMPY_CHUNK // 4) :]
    assert tail.float().mean().item() == pytest.approx(0.9, abs=0.01)
    # p at the edges: every value kept, every value dropped (p rounds to 1/65536 steps)
    assert bool(masks.keep_mask(shape, 1e-6, 1).all())
    assert not bool(masks.keep_mask(shape, 1 - 1e-6, 1).any())


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_dropout_in_one_pass_is_the_mask_times_the_input_times_the_scale(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled kernel's one pass (or, without it, numpy's mask and torch's
    multiplications) gives what torch's dropout arithmetic gives with the same mask, bit for
    bit: NaN stays NaN, a dropped negative value is -0.0, and the gradient follows the
    mask."""
    if not compiled:
        monkeypatch.setattr(masks, "kernels", lambda: None)
    x = torch.randn(37, 1001)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -2.0])
    out, keep = masks.dropout(x, 0.3, 77)
    assert torch.equal(keep, masks.keep_mask(x.shape, 0.3, 77, compiled=False))
    expected = x * keep.to(x.dtype) * (1 / 0.7)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(5.0), expected.nan_to_num(5.0))
    assert torch.equal(out.signbit(), expected.signbit())
    grad = torch.randn(37, 1001)
    assert torch.equal(masks.masked(grad, keep, 1 / 0.7), grad * keep * (1 / 0.7))
    copy = grad.clone()
    assert masks.masked(copy, keep, in_place=True) is copy and torch.equal(copy, grad * keep)
    # values laid out otherwise, and other float types, go the same way
    across = torch.randn(1001, 37).T
    assert torch.equal(masks.masked(across, keep, 2.0), across * keep * 2.0)
    expected = across * keep
    assert torch.equal(masks.masked(across, keep, in_place=True), expected)
    assert torch.equal(across, expected)
    double, double_keep = masks.dropout(x.double(), 0.3, 77)
    assert torch.equal(double_keep, keep)
    assert torch.equal(double.nan_to_num(5.0), (x.double() * keep * (1 / 0.7)).nan_to_num(5.0))


def test_the_kernels_compile_once_when_two_workers_ask_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    started = threading.Event()

    def compiled() -> dict[str, Any]:
        calls.append(1)
        started.set()
        time.sleep(0.2)  # the other worker asks meanwhile
        return {"kernel": object()}

    monkeypatch.setattr(masks, "_KERNELS", [])
    monkeypatch.setattr(masks, "_compiled_kernels", compiled)

    def second() -> dict[str, Any] | None:
        started.wait(5)
        return masks.kernels()

    got = workers.run_at_once([masks.kernels, second])
    assert len(calls) == 1 and got[0] is got[1] and got[0] is masks.kernels()


def _ones_by_position(words: np.ndarray) -> np.ndarray:
    """For each of the 64 bit positions, the share of `words` with that bit set."""
    return np.array([((words >> np.uint64(i)) & np.uint64(1)).mean() for i in range(64)])


def _splitmix64(seed: int, count: int) -> list[int]:
    """The first `count` outputs of splitmix64 started at `seed`, in plain Python."""
    word, out, state = (1 << 64) - 1, [], seed & ((1 << 64) - 1)
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & word
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & word
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & word
        out.append(z ^ (z >> 31))
    return out


def test_mask_words_of_neighbouring_seeds_are_unrelated() -> None:
    count = 50_000
    one = masks.words(12345, 0, count)
    assert one.dtype == np.uint64 and one.shape == (count,)
    assert one[:100].tolist() == _splitmix64(12345, 100)  # splitmix64's outputs, as documented
    # a mask's values are the words' 16-bit lanes, lowest first, against the threshold
    lanes = [(w >> (16 * lane)) & 0xFFFF for w in _splitmix64(-7, 25) for lane in range(4)]
    expected = torch.tensor([bits >= masks.threshold(0.3) for bits in lanes])
    assert torch.equal(masks.keep_mask(torch.Size((100,)), 0.3, -7), expected)
    assert np.array_equal(masks.words(12345, 0, count), one)  # the same words again
    assert np.array_equal(masks.words(12345, 10, count - 10), one[10:])  # from any word on
    assert np.array_equal(masks.words(12345 - (1 << 64), 0, count), one)  # read modulo 2^64
    # seeds one apart, and seeds far apart (torch draws signed int64)
    for seed in (12346, 12344, 12345 + (1 << 63), -12345):
        agree = _ones_by_position(~(one ^ masks.words(seed, 0, count)))
        assert np.abs(agree - 0.5).max() < 0.012, agree  # each bit agrees half the time
    # every bit position of one stream is a fair coin
    assert np.abs(_ones_by_position(one) - 0.5).max() < 0.012


def test_masks_drawn_on_threads_at_once_are_the_masks_drawn_one_after_another() -> None:
    shape = torch.Size((7, 3 * masks._NUMPY_CHUNK + 5))  # many chunks, the last short
    cpu = torch.device("cpu")

    def drawn(seed: int) -> Callable[[], list[torch.Tensor]]:
        def draw() -> list[torch.Tensor]:
            with speedups.dropout_generator(torch.Generator().manual_seed(seed)):
                return [speedups._keep_mask(shape, 0.1, cpu) for _ in range(3)]

        return draw

    alone = [drawn(seed)() for seed in (1, 2)]
    for _ in range(3):
        at_once = workers.run_at_once([drawn(1), drawn(2)])
        for drawn_masks, expected in zip(at_once, alone, strict=True):
            assert all(torch.equal(m, e) for m, e in zip(drawn_masks, expected, strict=True))
    assert not torch.equal(alone[0][0], alone[1][0])


def _tiny_t5(tiny_model_dir: Path) -> nn.Module:
    return AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)


def test_cheaper_dropout_replaces_every_dropout_of_a_lora_model(tiny_model_dir: Path) -> None:
    model = get_peft_model(
        _tiny_t5(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q", "v"], lora_dropout=0.05, task_type="SEQ_2_SEQ_LM"),
    )
    before = [m.p for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    assert before, "the tiny T5 and its adapter have dropout"
    speedups.cheaper_dropout(model)
    assert not [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    assert sorted(m.p for m in model.modules() if isinstance(m, speedups.FastDropout)) == sorted(
        before
    )


def test_fused_gelu_gives_the_same_outputs(tiny_model_dir: Path) -> None:
    model = _tiny_t5(tiny_model_dir).eval()
    ids = torch.randint(3, 200, (2, 17))
    labels = torch.randint(3, 200, (2, 9))
    with torch.inference_mode():
        before = model(input_ids=ids, labels=labels).logits
        assert any(isinstance(m, NewGELUActivation) for m in model.modules())
        speedups.fuse_gelu(model)
        assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
        after = model(input_ids=ids, labels=labels).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_keep_freed_memory_applies_on_glibc() -> None:
    speedups.keep_freed_memory.cache_clear()
    assert speedups.give_back_freed_memory() is False  # nothing kept: nothing to give back
    assert speedups.keep_freed_memory() is True
    assert speedups.give_back_freed_memory() is True


def test_onednn_caches_are_bounded_unless_the_environment_sizes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    speedups.bounded_onednn_caches.cache_clear()
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")  # the user's own size is kept
    try:
        assert speedups.bounded_onednn_caches() is True
        entries = str(speedups.ONEDNN_CACHED_PRODUCTS)
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == entries
        assert os.environ["LRU_CACHE_CAPACITY"] == "512"
        speedups.bounded_onednn_caches.cache_clear()
        assert speedups.bounded_onednn_caches() is False  # both sized already
    finally:
        speedups.bounded_onednn_caches.cache_clear()


# a process multiplies bf16 matrices of 1200 shapes, one after another (as training's products
# change shape with every batch), and prints how much its resident memory grew, in MB
_SHAPES_GROWTH = """
import sys, torch
torch.set_num_threads(1)  # on two threads a busy machine's scheduling moved the growth more
from finetune_module.engine import speedups
if sys.argv[1] == "bounded":
    speedups.bounded_onednn_caches()
def resident():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024
weights = [torch.randn(outputs, 512).bfloat16() for outputs in (1024, 768)]
(torch.randn(8, 512).bfloat16() @ weights[0].T).sum()
before = resident()
for rows in range(100, 700):
    for weight in weights:
        (torch.randn(rows, 512).bfloat16() @ weight.T).sum()
print(resident() - before)
"""


@pytest.mark.slow  # two processes of 1200 products: 25-45 s
@pytest.mark.skipif(
    not (Path("/proc/self/status").is_file() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="oneDNN multiplies bf16 here only on a CPU with AVX-512 (and Linux's /proc to read "
    "a process's memory)",
)
def test_bounded_onednn_caches_keep_a_process_from_growing_with_each_product_shape() -> None:
    """oneDNN keeps each shape's compiled product with buffers sized by the shape; bounded,
    the process stays within a fraction of what it grows to otherwise. (How much the bounded
    process grows varies from run to run, 50-190 MB over 600 shapes, for reasons not
    measured; with twice the shapes the unbounded one grows twice as much, 610-800 MB, and
    the bounded one no more: 60-130 MB.)"""
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    }
    grown = {}
    for caches in ("bounded", "default"):
        done = subprocess.run(
            [sys.executable, "-c", _SHAPES_GROWTH, caches],
            capture_output=True, text=True, cwd=REPO, env=environment, timeout=300, check=True,
        )  # fmt: skip
        grown[caches] = float(done.stdout)
    assert grown["default"] > 400, grown
    assert grown["bounded"] < grown["default"] / 3, grown


class _Attending(nn.Module):
    """A stand-in for an attention layer: only its training flag is read."""


@pytest.mark.parametrize("heads_first", [False, True], ids=["rows-first", "heads-first"])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20], ids=["a-row-a-chunk", "one-chunk"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_drops_out_weights_and_its_gradients_follow_the_mask(
    causal: bool, chunk_bytes: int, heads_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attention, its dropout and the gradients of query, key, value and a trained position
    bias are those of the plain formula with the same mask, however the batch is chunked and
    whether its operands are laid out rows first (as torch lays them out) or heads first (as
    `unpadded` does; then the output is returned where it lies, heads first, not copied)."""
    monkeypatch.setattr(speedups, "_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(2)
    rows, heads = 3, 2
    if heads_first:
        q, k, v = (torch.randn(heads, rows, 7, 8).transpose(0, 1) for _ in range(3))
    else:
        q, k, v = (torch.randn(rows, heads, 7, 8) for _ in range(3))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    bias = torch.randn(1, heads, 7, 7, requires_grad=True)
    padding = torch.ones(rows, 1, 1, 7, dtype=torch.bool)
    padding[1, ..., 5:] = False  # the second row's last two keys are padding
    mask = None if causal else padding.expand(rows, 1, 7, 7)
    module = _Attending().train()
    module.is_causal = causal
    torch.manual_seed(3)
    out, _ = speedups.attention(module, q, k, v, mask, dropout=0.3, scaling=0.5, position_bias=bias)
    assert out.transpose(1, 2).transpose(0, 1).is_contiguous() == heads_first
    torch.manual_seed(3)  # the same mask, drawn again, in the order the operands lie
    drawn = (heads, rows) if heads_first else (rows, heads)
    keep = speedups._keep_mask(torch.Size((*drawn, 7, 7)), 0.3, q.device)
    keep = keep.transpose(0, 1) if heads_first else keep
    scores = q @ k.transpose(-1, -2) * 0.5 + bias
    allowed = torch.ones(7, 7, dtype=torch.bool).tril() if causal else padding
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    expected = ((scores.softmax(-1) * keep / 0.7) @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    inputs = (q, k, v, bias)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("trained_bias", [False, True], ids=["lora", "full"])
def test_t5_makes_each_additive_mask_once_per_stack_and_attends_as_sdpa(
    trained_bias: bool, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder's self-attention, the decoder's and its cross-attention each turn their
    boolean mask into an additive one once, for every layer of the stack; the step's loss and
    gradients (the position bias's too, when it trains) are those of SDPA."""
    made: list[tuple[int, ...]] = []
    stock = speedups._made_additive

    def counted(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        made.append(tuple(mask.shape))
        return stock(mask, dtype)

    monkeypatch.setattr(speedups, "_made_additive", counted)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir, dropout_rate=1e-9)
    if not trained_bias:
        config = LoraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
        model = get_peft_model(model, config)
    model.train()
    batch = _batch(model)

    def loss_and_gradients() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    with_sdpa = loss_and_gradients()
    speedups.apply_to_model(model, ("attention_dropout",), training=True)
    chunked = loss_and_gradients()
    assert len(made) == 3
    torch.testing.assert_close(chunked[0], with_sdpa[0])
    for grad, expected in zip(chunked[1], with_sdpa[1], strict=True):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_models_attend_as_with_sdpa(arch: str, tmp_path: Path) -> None:
    """A model in training mode gives the same outputs and gradients with its attention on the
    cheaper path as with SDPA (dropout so small that no weight is dropped)."""
    texts = [r["question"] for r in json.loads(EXAMPLE_DATA.read_text())]
    if arch == "t5":
        path = build_t5(str(tmp_path), texts, d_model=32, num_layers=2, num_heads=4, d_ff=64)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dropout_rate=1e-9)
    else:
        path = build_causal(str(tmp_path), texts, d_model=32, num_layers=2, num_heads=4, d_ff=64)
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_pdrop=1e-9, resid_pdrop=0.0, embd_pdrop=0.0
        )
    ids = torch.randint(3, 200, (2, 9))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids).index_fill_(1, torch.tensor([7, 8]), 0),
    }
    inputs["labels"] = torch.randint(3, 200, (2, 5)) if arch == "t5" else ids
    model.train()
    results = []
    for cheaper in (False, True):
        if cheaper:
            speedups.cheaper_attention_dropout(model)
        assert model.config._attn_implementation == (
            speedups.CHEAP_DROPOUT_ATTENTION if cheaper else "sdpa"
        )
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        results.append(
            (out.logits, [p.grad.clone() for p in model.parameters() if p.grad is not None])
        )
    (logits, grads), (cheap_logits, cheap_grads) = results
    torch.testing.assert_close(cheap_logits, logits)
    assert len(grads) == len(cheap_grads) > 0
    for grad, cheap_grad in zip(grads, cheap_grads, strict=True):
        torch.testing.assert_close(cheap_grad, grad)


def test_the_causal_mask_alone_reads_only_right_padded_batches_from_their_start(
    family_model: Callable[[str], Path],
) -> None:
    """`causal_mask_only` leaves out the padding mask of a right-padded batch read from its
    start, where the real tokens' outputs stay the same; a left-padded batch, a step over a
    cache of earlier keys and a sequence-to-sequence model keep their masks."""
    model = AutoModelForCausalLM.from_pretrained(family_model("llama")).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 8))
    right = torch.ones_like(ids)
    right[0, 5:], right[2, 7:] = 0, 0
    left = right.flip(1)
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=right).logits
        stock_left = model(input_ids=ids, attention_mask=left).logits
    speedups.causal_mask_only(model)
    speedups.causal_mask_only(model)  # hooked once only
    stack = speedups.layer_stack(model)
    assert stack is model.model
    masks: list[torch.Tensor | None] = []  # what the stack's layers get, after our hook
    stack.register_forward_pre_hook(
        lambda _, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=right).logits
        assert masks[-1] is None
        real = right.bool()
        torch.testing.assert_close(ours[real], stock[real], rtol=1e-5, atol=1e-5)
        assert not torch.equal(ours[~real], stock[~real])  # the padding's outputs differ
        ours_left = model(input_ids=ids, attention_mask=left).logits
        assert masks[-1] is left
        torch.testing.assert_close(ours_left, stock_left, rtol=0, atol=0)
        step = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        model(
            input_ids=ids[:, :1],
            attention_mask=torch.ones(3, 9, dtype=torch.long),
            past_key_values=step.past_key_values,
        )
        assert masks[-1] is not None and masks[-1].shape == (3, 9)
    assert len(stack._forward_pre_hooks) == 2  # ours and this test's
    t5 = T5ForConditionalGeneration(
        T5Config(d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=1, vocab_size=10)
    )
    hooks = sum(len(m._forward_pre_hooks) for m in t5.modules())
    speedups.causal_mask_only(t5)
    assert sum(len(m._forward_pre_hooks) for m in t5.modules()) == hooks


@pytest.mark.parametrize("scale", [3.0, 100.0])  # 100: logits hundreds apart (exp underflows)
@pytest.mark.parametrize("with_bias", [False, True])  # BART's final_logits_bias
def test_linear_cross_entropy_equals_cross_entropy_and_its_gradient(
    scale: float, with_bias: bool
) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 700, 64, requires_grad=True)  # more rows than one chunk
    weight = torch.randn(1000, 64) * scale
    bias = torch.randn(1, 1000) * scale if with_bias else None
    labels = torch.randint(0, 1000, (3, 700))
    labels[:, 600:] = -100
    logits = (hidden @ weight.T).reshape(-1, 1000) + (bias if bias is not None else 0)
    reference = nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
    reference.backward()
    expected_grad, hidden.grad = hidden.grad.clone(), None
    loss = speedups.linear_cross_entropy(hidden, weight, labels, bias)
    (2 * loss).backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(hidden.grad, 2 * expected_grad)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_in_bf16_is_autocasts_output_layer_and_cross_entropy(
    with_bias: bool,
) -> None:
    """With `precision` bf16 the loss is the cross-entropy of the logits as autocast's bf16
    output layer makes them (bf16 products, the loss in fp32), its gradient as autocast's."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 300, 64, requires_grad=True)  # more rows than one chunk
    weight = torch.randn(1000, 64)
    bias = torch.randn(1, 1000) if with_bias else None
    labels = torch.randint(0, 1000, (3, 300))
    labels[:, 250:] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = nn.functional.linear(hidden, weight).reshape(-1, 1000)
    logits = logits.float() + (bias if bias is not None else 0)
    reference = nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
    reference.backward()
    expected_grad, hidden.grad = hidden.grad.clone(), None
    loss = speedups.linear_cross_entropy(hidden, weight, labels, bias, bf16=True)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-3, atol=1e-3)
    assert hidden.grad.dtype == torch.float32
    # bf16's 8 bits of mantissa: each gradient within a few of its roundings
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=2e-2, atol=2e-5)
    fp32 = speedups.linear_cross_entropy(hidden, weight, labels, bias)
    assert not torch.equal(fp32, loss)  # the products did run in bf16


def test_linear_cross_entropy_hands_its_gradient_product_no_subnormal_float(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Logits hundreds apart make probabilities below the least normal float, and a product
    with subnormal floats runs up to hundreds of times slower on some CPUs: every probability
    the gradient's product gets is 0 or normal, and the gradient is still the exact one."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 300, 64, requires_grad=True)
    weight = torch.randn(5000, 64) * 100.0
    labels = torch.randint(0, 5000, (2, 300))
    logits = (hidden @ weight.T).reshape(-1, 5000)
    reference = nn.functional.cross_entropy(logits, labels.reshape(-1))
    reference.backward()
    expected_grad, hidden.grad = hidden.grad.clone(), None
    tiny, seen = torch.finfo(torch.float32).tiny, []
    matmul = torch.matmul

    def watched(a: torch.Tensor, b: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if a.shape[-1] == 5000:
            seen.append(int(((a != 0) & (a.abs() < tiny)).sum()))
        return matmul(a, b, **kwargs)

    monkeypatch.setattr(torch, "matmul", watched)
    loss = speedups.linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert seen and seen == [0] * len(seen)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(hidden.grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_losss_exponent_floor_keeps_probabilities_normal_and_the_loss_exact(
    dtype: torch.dtype,
) -> None:
    """All the raised terms of a row together stay under the dtype's rounding step; in float32
    and bfloat16 (float32's range) the least probability the floor allows, divided by a row's
    largest sum and the target count, is still a normal float."""
    info, vocabulary, count = torch.finfo(dtype), 32128, 4096
    floor = speedups._exp_floor(vocabulary, count, dtype)
    assert vocabulary * math.exp(floor) <= info.eps
    if dtype != torch.float16:
        assert math.exp(floor) / vocabulary / count >= info.tiny * 0.999


def test_linear_cross_entropy_of_a_batch_without_labels_is_zero_with_zero_gradient() -> None:
    """Only labelled rows get logits: a batch whose targets are all padding has nothing to
    learn from (loss 0 and no gradient), where cross_entropy's mean over no tokens is NaN."""
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = speedups.linear_cross_entropy(hidden, torch.randn(50, 16), labels)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad is not None and not hidden.grad.any()


@cpu_path_only
def test_training_uses_the_fused_loss_and_trains_as_the_stock_loss_does(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []  # whether each call computed a gradient (training)
    fused = speedups.linear_cross_entropy

    def counting(*args: Any) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return fused(*args)

    monkeypatch.setattr(speedups, "linear_cross_entropy", counting)
    given_back: list[int] = []  # before evaluating, and after training
    give_back = speedups.give_back_freed_memory
    monkeypatch.setattr(
        speedups, "give_back_freed_memory", lambda: (given_back.append(1), give_back())[1]
    )
    layouts: list[unpadded.Layout] = []  # and training on unpadded tokens, with either loss
    laid_out = unpadded.laid_out
    monkeypatch.setattr(unpadded, "laid_out", lambda lay: (layouts.append(lay), laid_out(lay))[1])
    common = {
        "data_path": str(EXAMPLE_DATA),
        "model_id": str(tiny_model_dir),
        "activation_memory_gb": None,  # each step in one pass (a budget may split it in parts)
        **QUICK,
    }
    ours = run_dag("base", output_dir=str(tmp_path / "a"), **common)
    assert sum(calls) == len(layouts) == QUICK["max_steps"]
    assert calls.count(False) > 0  # the validation loss too
    assert len(given_back) >= 2
    others = [name for name in speedups.SPEEDUPS if name != "logit_free_loss"]
    called = len(calls)
    stock = run_dag("base", output_dir=str(tmp_path / "b"), cpu_speedups=others, **common)
    assert len(calls) == called  # the switch turned the fused loss off
    assert len(layouts) == 2 * QUICK["max_steps"]
    for key in ("train_loss", "eval_loss"):
        assert ours["training_and_validation_set_metrics"][key] == pytest.approx(
            stock["training_and_validation_set_metrics"][key], rel=1e-5
        )


@cpu_path_only
def test_a_decoder_only_model_trains_on_the_fused_loss_as_on_its_own(
    family_model: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder-only model's run computes its training loss logit-free, each position's
    logits against the next token, for the answer's tokens only (the prompt's labels are
    ignored), and trains as its own loss trains it."""
    labelled: list[int] = []
    fused = speedups.linear_cross_entropy

    def counting(hidden: torch.Tensor, weight: Any, labels: torch.Tensor, *rest: Any) -> Any:
        assert hidden.shape[:2] == labels.shape  # the hidden states as they are, not shifted
        assert (labels[:, -1] == -100).all()  # the last position predicts nothing
        labelled.append(int((labels != -100).sum()))
        assert (labels[:, :2] == -100).all()  # nor do the prompts' positions
        return fused(hidden, weight, labels, *rest)

    monkeypatch.setattr(speedups, "linear_cross_entropy", counting)
    common = {
        "data_path": str(EXAMPLE_DATA),
        "model_id": str(family_model("llama")),
        "input_text_key": "question",
        "output_text_key": "reply",
        "activation_memory_gb": None,
        **QUICK,
    }
    dr = finetune_module.build_driver("base", model_type="causal")
    metrics = "training_and_validation_set_metrics"
    ours = dr.execute([metrics], inputs={**common, "output_dir": str(tmp_path / "a")})[metrics]
    assert len(labelled) >= QUICK["max_steps"] and min(labelled) > 0
    others = [name for name in speedups.SPEEDUPS if name != "logit_free_loss"]
    stock_inputs = {**common, "output_dir": str(tmp_path / "b"), "cpu_speedups": others}
    calls = len(labelled)
    stock = dr.execute([metrics], inputs=stock_inputs)[metrics]
    assert len(labelled) == calls  # the switch turned the fused loss off
    for key in ("train_loss", "eval_loss"):
        assert ours[key] == pytest.approx(stock[key], rel=1e-5)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_validation_loss_is_computed_without_logits_also_for_a_trained_output_layer(
    family: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """Evaluation's loss (only the loss wanted) comes from the logit-free loss, also where
    the output layer trains (a full fine-tune), as it gets no gradient there: the Trainer's
    own loss, up to float rounding."""
    model = _family_model(family_model(family)).eval()
    batch = _batch(model)
    for trained_head in (False, True):
        model.get_output_embeddings().weight.requires_grad_(trained_head)
        trainer = FinetuneTrainer(
            model=model,
            args=Seq2SeqTrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to="none"),
        )
        stock, logits, _ = trainer.prediction_step(model, dict(batch), prediction_loss_only=True)
        used = _switch_on("logit_free_loss", model, batch, trainer)
        loss, _, _ = trainer.prediction_step(model, dict(batch), prediction_loss_only=True)
        assert used() and logits is None
        torch.testing.assert_close(loss, stock, rtol=1e-5, atol=1e-6)


def test_a_model_that_caps_its_logits_keeps_its_own_loss(
    family_model: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config that caps the logits (`final_logit_softcapping`, a tanh after the output
    layer) is a loss the logit-free one is not: the model's own runs."""
    model = _family_model(family_model("gemma3"))
    model.config.final_logit_softcapping = 3.0
    batch = _batch(model)
    trainer = FinetuneTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to="none"),
    )
    stock_loss, _ = _loss_and_gradients(model, batch, trainer)
    used = _switch_on("logit_free_loss", model, batch, trainer)
    loss, _ = _loss_and_gradients(model, batch, trainer)
    assert not used()
    assert loss == stock_loss
    model.config.final_logit_softcapping = None  # without the cap the fused loss runs
    used = _switch_on("logit_free_loss", model, batch, trainer)
    uncapped, _ = _loss_and_gradients(model, batch, trainer)
    assert used() and uncapped != loss


# --- the speed layer, family by family ----------------------------------------------------------

# dropout so small that nothing is dropped: the cheaper dropout must then equal the stock one
_NO_DROP = 1e-9


def _family_model(model_dir: Path) -> nn.Module:
    """The tiny model in `model_dir` with a LoRA adapter on the family's default layers, in
    training mode, seeded; every dropout of its config at `_NO_DROP` (on, dropping nothing)
    and no layer dropped at random,
    and a random logits bias where the family has one (BART's), so that it counts."""
    config = AutoConfig.from_pretrained(model_dir)
    dropouts = {
        key: 0.0 if "layerdrop" in key else _NO_DROP  # layers skipped at random: none
        for key, value in config.to_dict().items()
        if ("dropout" in key or "pdrop" in key or "layerdrop" in key) and isinstance(value, float)
    }
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_pretrained(model_dir, **dropouts)
    if hasattr(model, speedups.LOGITS_BIAS):
        getattr(model, speedups.LOGITS_BIAS).normal_()
    adapter = lora_config(LoraSettings(r=4, lora_dropout=_NO_DROP), model)
    return get_peft_model(model, adapter).train()


def _batch(model: nn.Module) -> dict[str, torch.Tensor]:
    """A padded batch: inputs (the last two positions of the first row padding) and labels."""
    torch.manual_seed(5)
    ids = torch.randint(3, 200, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][0, 7:] = 0
    if model.config.is_encoder_decoder:
        batch["labels"] = torch.randint(3, 200, (2, 5))
        batch["labels"][1, 3:] = -100  # the second target two tokens shorter
    else:
        batch["labels"] = ids.masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _loss_and_gradients(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    trainer: FinetuneTrainer,
    items: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The trainer's training loss of the batch, and the adapter's gradients (a training step
    of the trainer where threads share its steps), with `items` as the Trainer's count of the
    step's tokens in the loss (`num_items_in_batch`)."""
    model.zero_grad()
    if trainer.worker_threads > 1:
        loss = trainer.training_step(model, dict(batch), items)
    else:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=items)
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _switch_on(
    piece: str, model: nn.Module, batch: dict[str, torch.Tensor], trainer: FinetuneTrainer
) -> Callable[[], bool]:
    """Switches `piece` on for the model; returns what tells, after a step, whether it changed
    anything (a piece that changes nothing for a family is not listed as proven for it)."""
    if piece == "logit_free_loss":
        trainer.logit_free_loss = True
        calls: list[int] = []
        fused = speedups.linear_cross_entropy
        speedups.linear_cross_entropy = lambda *args: (calls.append(1), fused(*args))[1]  # type: ignore[assignment]

        def used() -> bool:
            speedups.linear_cross_entropy = fused
            return bool(calls)

        return used
    if piece == "unpadded":
        speedups.apply_to_model(model, (piece,), training=True)
        layouts: list[unpadded.Layout] = []
        laid_out = unpadded.laid_out

        def counted(layout: unpadded.Layout) -> Any:
            layouts.append(layout)
            return laid_out(layout)

        unpadded.laid_out = counted  # type: ignore[assignment]

        def laid() -> bool:
            unpadded.laid_out = laid_out  # type: ignore[assignment]
            return bool(layouts)

        return laid
    if piece == "causal_mask":
        speedups.apply_to_model(model, (piece,), training=True)
        stack = speedups.layer_stack(model)  # what runs its layers, after our hook
        unmasked: list[bool] = []
        seen = stack.register_forward_pre_hook(
            lambda _, args, kwargs: unmasked.append(kwargs.get("attention_mask") is None),
            with_kwargs=True,
        )

        def dropped() -> bool:
            seen.remove()
            return bool(unmasked) and all(unmasked)

        return dropped
    if piece == "worker_threads":
        trainer.activation_budget = ActivationBudget(model, 1.0)
        trainer.worker_threads = 2
        trainer.current_gradient_accumulation_steps = 1
        threads: set[int] = set()
        hook = model.register_forward_pre_hook(lambda *_: threads.add(threading.get_ident()))

        def shared() -> bool:
            hook.remove()
            return len(threads) == 2

        return shared
    if piece == "activation_budget":
        budget = ActivationBudget(model, 1e-9)
        budget.before_step(batch)  # a budget of ~0 bytes: every layer recomputes
        return lambda: (
            bool(budget.layers) and all(layer.gradient_checkpointing for _, layer in budget.layers)
        )
    replaced = {"fused_gelu": NewGELUActivation, "cheap_dropout": nn.Dropout}.get(piece)
    before = [m for m in model.modules() if replaced is not None and type(m) is replaced]
    speedups.apply_to_model(model, (piece,), training=True)
    if piece == "attention_dropout":
        # (the name within another's where a later piece wraps it: `unpadded`)
        return lambda: speedups.CHEAP_DROPOUT_ATTENTION in model.config._attn_implementation
    return lambda: bool(before) and not any(type(m) is replaced for m in model.modules())


@pytest.mark.parametrize(
    ("family", "piece"),
    [
        (family, piece)
        for family in FAMILIES
        for piece in speedups.SPEEDUPS
        # the process's allocator and MKL's kernels: no model involved (tests above and in
        # tests/test_mkl_kernels.py)
        if piece not in ("allocator", "mkl_avx512")
    ],
)
def test_each_piece_gives_the_stock_loss_and_gradients_where_it_is_proven(
    family: str, piece: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """For each family, each piece proven for it (`speedups.PROVEN`) changes the model's
    training step and gives the stock loss and gradients; a piece not proven for it changes
    nothing there, or is not applied (`speedups.applicable`). Both without the Trainer's count
    of the step's tokens and with one, as if the batch were half of an accumulated step (a
    decoder-only model's loss divides by it)."""
    model = _family_model(family_model(family))
    batch = _batch(model)
    trainer = FinetuneTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to="none"),
    )
    counts = [None, 2 * trainer._get_num_items_in_batch([batch], torch.device("cpu"))]
    stock = [_loss_and_gradients(model, batch, trainer, items) for items in counts]
    changed = _switch_on(piece, model, batch, trainer)
    ours = [_loss_and_gradients(model, batch, trainer, items) for items in counts]
    proven = piece in speedups.PROVEN.get(model.config.model_type, ())
    assert changed() == proven, f"{piece} {'changes nothing' if proven else 'is unproven'}"
    for (loss, grads), (stock_loss, stock_grads) in zip(ours, stock, strict=True):
        if not proven:
            break
        torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
        assert len(grads) == len(stock_grads) > 0
        for grad, stock_grad in zip(grads, stock_grads, strict=True):
            # float32 rounding scales with the largest terms summed, not with each result: a
            # value near 0 in a gradient whose largest is ~2 may differ by ~1e-6 (T5 on AMD
            # EPYC's MKL kernels, recomputed layers). A wrong gradient is off by far more.
            scale = max(1.0, stock_grad.abs().max().item())
            torch.testing.assert_close(grad, stock_grad, rtol=1e-4, atol=1e-5 * scale)
    if proven and not model.config.is_encoder_decoder:  # its sum over the count, not the mean
        predicted = (batch["labels"][:, 1:] != -100).sum()
        expected = ours[0][0] * predicted / counts[1]
        torch.testing.assert_close(ours[1][0], expected, rtol=1e-5, atol=1e-6)


def test_the_layer_applies_only_where_proven_on_the_proven_release(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir).config
    everything = speedups_requested(torch.device("cpu"), None)
    assert everything == speedups.SPEEDUPS
    assert speedups.applicable(everything, config) == speedups.PROVEN["t5"]
    # on an accelerator the stock path runs unless asked for; a list picks pieces
    assert speedups_requested(torch.device("cuda"), None) == ()
    assert speedups_requested(torch.device("cpu"), False) == ()
    assert speedups.applicable(("fused_gelu", "nonsense"), config) == ("fused_gelu",)
    # a family no test proves gets the process-wide pieces only: the allocator, MKL's kernels
    config.model_type = "bloom"
    assert speedups.applicable(everything, config) == ("allocator", "mkl_avx512")
    # another transformers release: the stock path, with a warning
    config.model_type = "t5"
    monkeypatch.setattr(speedups.transformers, "__version__", "6.0.0")
    assert speedups.applicable(everything, config) == ()


def test_an_unproven_family_trains_on_the_stock_path(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(speedups.PROVEN, "t5", ("allocator",))  # as if T5 were unproven
    touched: list[str] = []
    for name in ("fuse_gelu", "cheaper_dropout", "cheaper_attention_dropout"):
        monkeypatch.setattr(speedups, name, lambda model, name=name: touched.append(name))
    monkeypatch.setattr(speedups, "linear_cross_entropy", lambda *a: touched.append("loss"))
    common = {"data_path": str(EXAMPLE_DATA), "model_id": str(tiny_model_dir), **QUICK}
    result = run_dag("base", output_dir=str(tmp_path), **common)
    assert touched == []
    assert np.isfinite(result["training_and_validation_set_metrics"]["train_loss"])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_proven_pieces_train_as_the_stock_path_does_in_bf16_on_the_cpu(
    family: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """Under the CPU's bf16 mixed precision (autocast entered by the Trainer's model, on each
    thread that runs it), every piece proven for the family at once (the fused loss in fp32,
    training on unpadded tokens, threads sharing the step within a budget, the cheaper dropout
    and attention, ...) gives the stock path's loss and gradients up to bf16 rounding, where a
    wrong piece (a lost mask, a missing term) is off by far more."""
    model = _family_model(family_model(family))
    batch = _batch(model)
    arguments = Seq2SeqTrainingArguments(
        str(tmp_path / "run"), use_cpu=True, report_to="none", bf16=True
    )
    trainer = FinetuneTrainer(model=model, args=arguments)
    wrapped = trainer.accelerator.prepare_model(model)  # the model as the Trainer trains it
    assert wrapped.forward is not type(wrapped).forward  # autocast around every call
    stock_loss, stock_grads = _loss_and_gradients(wrapped, batch, trainer)
    # the process's; every layer recomputing
    skipped = ("allocator", "mkl_avx512", "activation_budget")
    proven = [p for p in speedups.PROVEN[model.config.model_type] if p not in skipped]
    switched = {piece: _switch_on(piece, model, batch, trainer) for piece in proven}
    loss, grads = _loss_and_gradients(wrapped, batch, trainer)
    took_part = {piece: changed() for piece, changed in switched.items()}
    assert all(took_part.values()), took_part  # each piece took part in the step
    torch.testing.assert_close(loss, stock_loss, rtol=2e-2, atol=1e-3)
    assert len(grads) == len(stock_grads) > 0
    for grad, stock_grad in zip(grads, stock_grads, strict=True):
        if stock_grad.abs().max() == 0:  # LoRA's B starts at zero: A's gradient is zero
            assert grad.abs().max() == 0
            continue
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), stock_grad.flatten(), 0)
        assert float(cosine) > 0.99
        assert float(grad.norm()) == pytest.approx(float(stock_grad.norm()), rel=0.05)
