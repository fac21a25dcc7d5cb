"""The CPU speed layer: pieces that compute the same functions as the stock transformers path
with less work or memory on a CPU, each applied only to the model families a test proves it
equal for.

The pieces (`SPEEDUPS`, switched with the dataflow's input `cpu_speedups`):
- `allocator`: glibc's allocator keeps freed memory for reuse (`keep_freed_memory`);
- `fused_gelu`: the tanh GELU in one kernel instead of five operations (`fuse_gelu`);
- `cheap_dropout`: dropout with 16 random bits and a one-byte mask per value (`FastDropout`);
- `attention_dropout`: the same cheaper dropout on the attention weights, keeping 5 bytes per
  score instead of SDPA's ~12 (`attention`);
- `logit_free_loss`: a sequence-to-sequence training loss that never holds the logits
  (`linear_cross_entropy`);
- `activation_budget`: long batches recompute some layers' activations (`memory`).

Each is the same function as the one it replaces (dropout keeps each value with probability
1 - p and scales it by 1 / (1 - p); GELU is the same tanh approximation); only the work, the
random stream behind dropout, and float rounding in the last bits differ. `PROVEN` names the
families for which `tests/test_speedups.py` proves each piece equal to the stock path (loss and
gradients), on the transformers release `PROVEN_ON`; on any other family or release the stock
path runs. Measured with `python -m bench.benchmark` (see docs/performance.md); each can be
switched off there with `--ablate`.
"""

import contextlib
import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import (
    create_position_bias_mask,
    sdpa_attention_forward,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from finetune_module.engine.tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: Every piece of the speed layer, in the order they are applied.
SPEEDUPS = (
    "allocator",
    "fused_gelu",
    "cheap_dropout",
    "attention_dropout",
    "logit_free_loss",
    "activation_budget",
)
#: The model families (config.model_type) each piece is proven equal to the stock path for
#: (tests/test_speedups.py), where it changes something: the fused GELU where the family has
#: the five-operation GELU, the logit-free loss for sequence-to-sequence families. The
#: allocator concerns the process, not the model.
_WITHOUT_LOSS = ("allocator", "cheap_dropout", "attention_dropout", "activation_budget")
_BART_LIKE = ("allocator", "cheap_dropout", "attention_dropout", "logit_free_loss",
              "activation_budget")  # fmt: skip
PROVEN: dict[str, tuple[str, ...]] = {
    "t5": SPEEDUPS,
    "mt5": SPEEDUPS,
    "bart": _BART_LIKE,
    "mbart": _BART_LIKE,
    "marian": _BART_LIKE,
    "pegasus": _BART_LIKE,
    "m2m_100": _WITHOUT_LOSS,  # builds its decoder's inputs inside its forward pass only
    "gpt2": ("allocator", "fused_gelu", "cheap_dropout", "attention_dropout", "activation_budget"),
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gpt_neox", "opt"),
        _WITHOUT_LOSS,
    ),
}
#: The transformers release (major.minor) the pieces were proven on; they reach into its
#: internals, so on another release the stock path runs.
PROVEN_ON = "5.23"

# glibc's mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30  # blocks up to this size come from (and go back to) the heap


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask that is True with probability 1 - p, independently for each value.

    On the CPU, torch draws one 32-bit random number per value for `bernoulli_` (and again for
    `rand`); here each value takes 16 random bits instead, from the default generator (so seeds
    and Trainer checkpoints govern it as they govern any torch random number). The probability
    is p rounded to a multiple of 1/65536 (0.1 -> 0.100006).
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p
    count = torch.Size(shape).numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:count].view(shape)
    return lanes >= round(p * 65536) - 32768


def _kept(
    x: torch.Tensor, keep: torch.Tensor, scale: float = 1.0, *, in_place: bool = False
) -> torch.Tensor:
    """`x` times `keep` (a boolean mask) times `scale`, as torch's dropout computes it (0 where
    `keep` is False): one multiplication by the mask (torch converts its bytes to floats on
    the way) and one by `scale` unless it is 1; `in_place`: into `x` itself.

    The mask multiplies as bytes (its `uint8` view): torch's CPU kernels for boolean operands
    (`torch.where`, `x * keep`) are not vectorised and take 1.7x as long on the benchmark's
    attention scores."""
    as_bytes = keep.view(torch.uint8)
    kept = x.mul_(as_bytes) if in_place else x * as_bytes
    return kept.mul_(scale) if scale != 1.0 else kept


class _Dropout(torch.autograd.Function):
    """Dropout whose backward pass keeps a boolean mask (one byte per value, not four)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = _keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return _kept(x, keep, ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return _kept(grad, keep, ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`torch.nn.functional.dropout`, computed with a cheaper random mask."""
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return torch.zeros_like(x)
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same behaviour in train and eval mode) with a cheaper mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def fuse_gelu(model: nn.Module) -> nn.Module:
    """Replaces each `NewGELUActivation` (the tanh GELU written as five tensor operations,
    which T5 uses) with the same function computed in one kernel; returns the model."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
    return model


def cheaper_dropout(model: nn.Module) -> nn.Module:
    """Replaces each `nn.Dropout` module (the model's and LoRA's) with `FastDropout` of the
    same p; returns the model."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout and child.p > 0:
                setattr(module, name, FastDropout(child.p))
    return model


class _DroppedOutAttention(torch.autograd.Function):
    """`dropout(weights, p) @ value` that keeps the attention weights and a one-byte mask for the
    backward pass (5 bytes per attention score; SDPA's own dropout keeps about 12) and draws
    the mask as `FastDropout` does (16 random bits per score, not 32).

    Dropout's scale 1 / (1 - p) multiplies the value (and, backwards, the incoming gradient)
    instead of the scores: the product is the same, and a head's value (a row per key, 64-odd
    columns) is smaller than its scores (a row per query, a column per key) once a text has
    more tokens than a head has columns. One pass over the scores fewer forwards, two
    backwards."""

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, value: torch.Tensor, p: float) -> torch.Tensor:
        keep = _keep_mask(weights.shape, p, weights.device)
        ctx.save_for_backward(weights, keep, value)
        ctx.scale = 1.0 / (1.0 - p)
        return _kept(weights, keep) @ (value * ctx.scale)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        weights, keep, value = ctx.saved_tensors
        grad_weights = grad_value = None
        scaled_grad = grad * ctx.scale
        if ctx.needs_input_grad[1]:
            grad_value = _kept(weights, keep).transpose(-1, -2) @ scaled_grad
        if ctx.needs_input_grad[0]:
            grad_weights = _kept(scaled_grad @ value.transpose(-1, -2), keep, in_place=True)
        return grad_weights, grad_value, None


def _additive_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    position_bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """What SDPA adds to the attention scores: the position bias (T5) and the mask, as floats
    (see `_biased_mask`)."""
    if position_bias is not None:
        return _biased_mask(position_bias, attention_mask, is_causal, query, key)
    if is_causal:
        rows = torch.arange(query.shape[2], device=query.device)[:, None]
        attention_mask = rows >= torch.arange(key.shape[2], device=key.device)[None, :]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        lowest = torch.finfo(query.dtype).min
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, lowest
        )
    return attention_mask


# the attribute of a position bias that holds the mask last made from it (see `_biased_mask`)
_BIASED_MASK = "_finetune_biased_mask"


def _biased_mask(
    position_bias: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
) -> torch.Tensor:
    """The position bias with the mask applied (transformers' `create_position_bias_mask`),
    made once per stack of layers instead of once per layer.

    T5's first layer makes the position bias and hands that same tensor, with the same mask,
    to every later layer of its stack (and to their recomputation), so the masked bias (a
    value per batch row, head, query and key) is kept on the bias tensor itself and lives as
    long as it does. Only a bias without gradient (a frozen one: LoRA's) keeps it; a trained
    bias gets a new one per layer, as in transformers."""
    if position_bias.requires_grad:
        return create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
    made = getattr(position_bias, _BIASED_MASK, None)
    shape = (query.shape[2], key.shape[2])
    if made is not None and made[0] is attention_mask and made[1:3] == (is_causal, shape):
        return made[3]
    mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
    setattr(position_bias, _BIASED_MASK, (attention_mask, is_causal, shape, mask))
    return mask


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention, except while training on the CPU with dropout on the
    attention weights: then the same attention (key/value heads shared by several query heads
    included) with `FastDropout`'s cheaper mask, keeping less for the backward pass (see
    `_DroppedOutAttention`)."""
    if (
        not module.training
        or not 0.0 < dropout < 1.0
        or query.device.type != "cpu"
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, position_bias=position_bias, **kwargs,
        )  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)  # query heads per key/value head
    if groups != 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = query.shape[2] > 1 and attention_mask is None and causal
    scores = query @ key.transpose(-1, -2)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if scaling != 1.0:
        scores.mul_(scaling)
    added = _additive_mask(query, key, attention_mask, causal, position_bias)
    if added is not None:
        scores.add_(added)
    weights = torch.softmax(scores, dim=-1)
    output = _DroppedOutAttention.apply(weights, value, dropout)
    return output.transpose(1, 2).contiguous(), None


CHEAP_DROPOUT_ATTENTION = "sdpa_cheap_cpu_dropout"


@functools.cache
def _register_attention() -> str:
    """Registers `attention` with transformers (once), under `CHEAP_DROPOUT_ATTENTION`, with
    the masks SDPA gets; returns the name."""
    AttentionInterface.register(CHEAP_DROPOUT_ATTENTION, attention)
    AttentionMaskInterface.register(CHEAP_DROPOUT_ATTENTION, sdpa_mask)
    return CHEAP_DROPOUT_ATTENTION


def cheaper_attention_dropout(model: nn.Module) -> nn.Module:
    """Switches a model that uses SDPA attention to `attention` (SDPA, but for the dropout on
    the attention weights when training on the CPU); returns the model."""
    _register_attention()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if module.config._attn_implementation == "sdpa":
                module.set_attn_implementation(CHEAP_DROPOUT_ATTENTION)
            break  # the outermost model sets its submodels
    return model


@functools.cache
def keep_freed_memory() -> bool:
    """Tells glibc's allocator to keep freed memory for reuse instead of giving it back to the
    system and taking it again (zeroed pages, page faults) at every training step; returns
    whether it applied (glibc only). Peak memory is unchanged: what is kept is reused."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


_LOSS_ROWS = 1024  # target tokens whose logits are computed at a time
# exp() of anything below this is a subnormal float (or 0), which the CPU computes tens of times
# slower; clamped to it, each such term adds at most 1.7e-38 to a sum of at least 1 (no change)
_EXP_FLOOR = -87.0


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, a few hundred rows of logits
    at a time. The gradient with respect to `hidden` is computed on the way (softmax minus the
    one-hot target, times the weight), so neither the logits nor their log-softmax are kept:
    for a batch of 8 x 154 targets and a 32k vocabulary that is ~600 MB less at the peak. The
    output layer's weight must be frozen (it gets no gradient)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        kept = labels != IGNORE_INDEX
        count = kept.sum().clamp(min=1)
        total = hidden.new_zeros(())
        grad = torch.zeros_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], _LOSS_ROWS):
            rows = slice(start, start + _LOSS_ROWS)
            logits = hidden[rows] @ weight.T
            if bias is not None:
                logits += bias
            targets = labels[rows].clamp(min=0).unsqueeze(1)
            target_logits = logits.gather(1, targets)
            peak = logits.amax(dim=1, keepdim=True)
            # in place of the logits: one pass of exp, with no subnormal results
            exps = logits.sub_(peak).clamp_(min=_EXP_FLOOR).exp_()
            sums = exps.sum(dim=1, keepdim=True)
            losses = (peak + sums.log() - target_logits).squeeze(1)
            total += losses[kept[rows]].sum()
            if grad is not None:
                probs = exps.div_(sums)  # the softmax
                probs.scatter_add_(1, targets, torch.full_like(targets, -1, dtype=probs.dtype))
                probs.mul_(kept[rows].unsqueeze(1).to(probs.dtype) / count)
                grad[rows] = probs @ weight
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output if grad is not None else None), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`cross_entropy(hidden @ weight.T + bias, labels, ignore_index=-100)` (the mean over the
    labelled tokens) without keeping the logits; `weight` and `bias` must be frozen."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if bias is not None:
        bias = bias.reshape(-1)
    return _LinearCrossEntropy.apply(flat, weight, labels.reshape(-1), bias)


#: The buffer that BART-family models (BART, mBART, Marian, Pegasus) add to their logits
LOGITS_BIAS = "final_logits_bias"


@contextlib.contextmanager
def output_layer_off(model: nn.Module) -> Iterator[tuple[nn.Linear, torch.Tensor | None]]:
    """Within the block `model` returns its last hidden states (as its output layer gets them)
    in place of logits; yields the output layer and the bias the model adds to its output
    (BART's `final_logits_bias`; None for most families), which is 0 within the block."""
    head = model.get_output_embeddings()
    bias = getattr(model, LOGITS_BIAS, None)
    model.set_output_embeddings(nn.Identity())
    if bias is not None:
        setattr(model, LOGITS_BIAS, bias.new_zeros(()))
    try:
        yield head, bias
    finally:
        model.set_output_embeddings(head)
        if bias is not None:
            setattr(model, LOGITS_BIAS, bias)


def applicable(requested: tuple[str, ...], config: PretrainedConfig) -> tuple[str, ...]:
    """The requested pieces that apply to a model with this config: those proven for its
    family on the installed transformers release, in `SPEEDUPS` order (none otherwise)."""
    if not requested:
        return ()
    installed = ".".join(transformers.__version__.split(".")[:2])
    if installed != PROVEN_ON:
        logger.warning(
            "The CPU speed layer was proven on transformers %s, not %s: the stock path runs.",
            PROVEN_ON,
            installed,
        )
        return ()
    proven = PROVEN.get(config.model_type, ("allocator",))
    return tuple(name for name in SPEEDUPS if name in requested and name in proven)


def apply_to_model(model: nn.Module, pieces: tuple[str, ...], training: bool) -> nn.Module:
    """The model with the pieces among `pieces` that change its modules applied: the fused
    GELU, and for a model that trains the cheaper dropout and attention dropout (in eval mode
    there is no dropout); returns the model."""
    changes = [("fused_gelu", fuse_gelu)]
    if training:
        changes += [
            ("cheap_dropout", cheaper_dropout),
            ("attention_dropout", cheaper_attention_dropout),
        ]
    for name, change in changes:
        if name in pieces:
            change(model)
    return model
