"""The CPU speed layer: pieces that compute the same functions as the stock transformers path
with less work or memory on a CPU, each applied only to the model families a test proves it
equal for.

The pieces (`SPEEDUPS`, switched with the dataflow's input `cpu_speedups`):
- `allocator`: glibc's allocator keeps freed memory for reuse (`keep_freed_memory`), and
  oneDNN's caches of compiled products stay small (`bounded_onednn_caches`);
- `mkl_avx512`: on an AMD processor with AVX-512, MKL runs torch's float32 products with its
  AVX-512 kernels instead of its AVX2 ones for AMD (`mkl_kernels`);
- `fused_gelu`: the tanh GELU in one kernel instead of five operations (`fuse_gelu`);
- `cheap_dropout`: dropout with 16 random bits and a one-byte mask per value, made and applied
  in one pass of code compiled at run time (`FastDropout`, `masks`);
- `attention_dropout`: the same cheaper dropout on the attention weights, keeping 5 bytes per
  score instead of SDPA's ~12 (`attention`);
- `causal_mask`: a decoder-only model reads a right-padded batch with the causal mask alone,
  which already hides the padding after each text from its real tokens; SDPA's causal kernel
  then skips the scores above the diagonal (`causal_mask_only`);
- `logit_free_loss`: a training loss that never holds the logits, and computes them only for
  the tokens in the loss (`linear_cross_entropy`);
- `unpadded`: T5 trains on each batch's real tokens, laid end to end, with attention per text
  (`unpadded`);
- `activation_budget`: a long batch goes forward and backward in parts within a memory budget,
  recomputing layers only where one example alone exceeds it (`memory`);
- `worker_threads`: a training step's rows go forward and backward on two threads at once,
  each running torch on its share of the cores (`workers`), where torch has two or more.

Each is the same function as the one it replaces (dropout keeps each value with probability
1 - p and scales it by 1 / (1 - p); GELU is the same tanh approximation); only the work, the
random stream behind dropout, and float rounding in the last bits differ. `PROVEN` names the
families for which `tests/test_speedups.py` proves each piece equal to the stock path (loss and
gradients), on the transformers release `PROVEN_ON`; on any other family or release the stock
path runs. Measured with `python -m bench.benchmark` (see docs/performance.md); each can be
switched off there with `--ablate`.
"""

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import logging
import math
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_layers import GradientCheckpointingLayer

from finetune_module.engine import masks, packing, unpadded
from finetune_module.engine.tokens import IGNORE_INDEX, prefix_lengths

logger = logging.getLogger(__name__)

#: Every piece of the speed layer, in the order they are applied.
SPEEDUPS = (
    "allocator",
    "mkl_avx512",
    "fused_gelu",
    "cheap_dropout",
    "attention_dropout",
    "causal_mask",
    "logit_free_loss",
    "unpadded",
    "activation_budget",
    "worker_threads",
)
#: The model families (config.model_type) each piece is proven equal to the stock path for
#: (tests/test_speedups.py), where it changes something: the fused GELU where the family has
#: the five-operation GELU, the logit-free loss where the family computes its loss from its
#: output layer's logits, training on unpadded tokens for T5's attention, the causal mask alone
#: for a decoder-only model's attention. The allocator and MKL's kernels concern the process,
#: not the model: every family gets them (`PROCESS_PIECES`).
PROCESS_PIECES = ("allocator", "mkl_avx512")
_WITHOUT_LOSS = (*PROCESS_PIECES, "cheap_dropout", "attention_dropout", "activation_budget",
                 "worker_threads")  # fmt: skip
_WITH_LOSS = (*PROCESS_PIECES, "cheap_dropout", "attention_dropout", "logit_free_loss",
              "activation_budget", "worker_threads")  # fmt: skip
_T5 = tuple(name for name in SPEEDUPS if name != "causal_mask")
_DECODER_ONLY = tuple(name for name in SPEEDUPS if name not in ("fused_gelu", "unpadded"))
PROVEN: dict[str, tuple[str, ...]] = {
    "t5": _T5,
    "mt5": _T5,
    "bart": _WITH_LOSS,
    "mbart": _WITH_LOSS,
    "marian": _WITH_LOSS,
    "pegasus": _WITH_LOSS,
    "m2m_100": _WITHOUT_LOSS,  # builds its decoder's inputs inside its forward pass only
    "gpt2": tuple(name for name in SPEEDUPS if name != "unpadded"),
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gpt_neox", "opt"),
        _DECODER_ONLY,
    ),
}
#: The transformers release (major.minor) the pieces were proven on; they reach into its
#: internals, so on another release the stock path runs.
PROVEN_ON = "5.23"

# glibc's mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30  # blocks up to this size come from (and go back to) the heap
#: compiled products each of oneDNN's caches keeps (`bounded_onednn_caches`)
ONEDNN_CACHED_PRODUCTS = 64
# the environment variables oneDNN's and ideep's caches read their sizes from
_ONEDNN_CACHE_SIZES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


#: The generator the masks' seeds come from in this context (`dropout_generator`): None for
#: torch's default one.
_GENERATOR: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "finetune_dropout_generator", default=None
)


@contextlib.contextmanager
def dropout_generator(generator: torch.Generator | None) -> Iterator[None]:
    """Within the block (in this context: this thread, unless the context is copied) the
    speed layer's dropout masks are seeded from `generator` instead of torch's default one:
    threads that train at once (`workers`) each draw from a generator of their own, seeded
    in a fixed order, so that their masks do not depend on which thread draws first."""
    token = _GENERATOR.set(generator)
    try:
        yield
    finally:
        _GENERATOR.reset(token)


def _mask_seed() -> int:
    """A mask's seed: a number drawn from this context's generator (`dropout_generator`)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=_GENERATOR.get()))


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask that is True with probability 1 - p, independently for each value.

    On the CPU, torch draws one 32-bit random number per value for `bernoulli_` (and again for
    `rand`). Here each value takes 16 random bits from splitmix64, seeded with a number drawn
    from torch's generator (`masks`: seeds and Trainer checkpoints govern the mask as they
    govern any torch random number), made and compared with the threshold in one pass. The
    probability is p rounded to a multiple of 1/65536 (0.1 -> 0.100006).
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p
    return masks.keep_mask(shape, p, _mask_seed())


class _Dropout(torch.autograd.Function):
    """Dropout whose backward pass keeps a boolean mask (one byte per value, not four), made
    with its output in one pass (`masks.dropout`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        ctx.scale = 1.0 / (1.0 - p)
        if x.device.type != "cpu":
            keep = _keep_mask(x.shape, p, x.device)
            out = masks.masked(x, keep, ctx.scale)
        else:
            out, keep = masks.dropout(x, p, _mask_seed())
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return masks.masked(grad.contiguous(), keep, ctx.scale), None


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


# the attention scores of one chunk of batch rows are kept to about this size, so that the
# passes over them (mask, softmax, dropout and their gradients) stay within the CPU's caches
_CHUNK_BYTES = 4 << 20


class _DroppedOutAttention(torch.autograd.Function):
    """`dropout(softmax(query @ key.T * scaling + bias + mask), p) @ value`, computed a few
    batch rows at a time so that each row's scores are made, masked, normalised, dropped out
    and multiplied while they are in the CPU's caches (on the benchmark's longest texts the
    whole batch's scores are 56 MB, more than the caches hold: every pass over them went to
    memory). Only the attention weights and a one-byte mask are kept for the backward pass
    (5 bytes per attention score; SDPA's own dropout keeps about 12), and the mask is drawn as
    `FastDropout` draws it (16 random bits per score, not 32), for the whole batch at once
    (the same random stream whatever the chunks).

    The products run as batched matrix products on the operands as they are laid out, with no
    copies: query, key and value are taken in the order of their first two dimensions in
    which they are contiguous (batch rows, then heads, as torch lays them out; or heads, then
    batch rows, as `unpadded` lays out a batch of texts), made contiguous only when neither
    is (one copy each), and chunked along the outer one; the output and the gradients come out
    in the same layout. The bias and the mask are added first, into the scores' buffer, and
    the product `query @ key.T * scaling` is added to them in the product itself (one pass
    over the scores instead of three); dropout's scale 1 / (1 - p) multiplies the product with
    the value (and, backwards, the products with the incoming gradient) in the product too.
    `bias` (T5's position bias, shared by the batch) gets a gradient when it is trained;
    `mask` is additive (0 or the lowest float, see `_additive_mask`)."""

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor | None,
        p: float,
        scaling: float,
    ) -> torch.Tensor:
        flip = _heads_first(query)
        query, key, value = (_framed(x, flip).contiguous() for x in (query, key, value))
        bias, mask = _framed(bias, flip), _framed(mask, flip)
        outer, inner, queries, _ = query.shape
        keys = key.shape[2]
        keep = _keep_mask(torch.Size((outer, inner, queries, keys)), p, query.device)
        weights = query.new_empty(outer, inner, queries, keys)
        output = query.new_empty(outer, inner, queries, value.shape[-1])
        scale = 1.0 / (1.0 - p)
        rows = max(1, _CHUNK_BYTES // max(1, inner * queries * keys * query.element_size()))
        for start in range(0, outer, rows):
            chunk = slice(start, start + rows)
            scores = query.new_empty(*query[chunk].shape[:2], queries, keys)
            added = _add_into(scores, bias, mask, chunk)
            _multiply(scores, query[chunk], key[chunk].transpose(-1, -2), scaling, added)
            torch.ops.aten._softmax.out(scores, -1, False, out=weights[chunk])
            dropped = masks.masked(weights[chunk], keep[chunk])
            _multiply(output[chunk], dropped, value[chunk], scale)
        ctx.save_for_backward(query, key, value, weights, keep)
        ctx.scale, ctx.scaling, ctx.rows, ctx.flip = scale, scaling, rows, flip
        ctx.bias_shape = bias.shape if bias is not None and bias.requires_grad else None
        return _framed(output, flip)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, weights, keep = ctx.saved_tensors
        needs_query, needs_key, needs_value, needs_bias = ctx.needs_input_grad[:4]
        grad = _framed(grad, ctx.flip).contiguous()
        grad_query = torch.empty_like(query) if needs_query else None
        grad_key = torch.empty_like(key) if needs_key else None
        grad_value = torch.empty_like(value) if needs_value else None
        grad_bias = None
        if needs_bias and ctx.bias_shape is not None:
            grad_bias = weights.new_zeros(ctx.bias_shape)
        for start in range(0, query.shape[0], ctx.rows):
            chunk = slice(start, start + ctx.rows)
            chunk_weights, chunk_keep = weights[chunk], keep[chunk]
            if grad_value is not None:
                dropped = masks.masked(chunk_weights, chunk_keep)
                _multiply(grad_value[chunk], dropped.transpose(-1, -2), grad[chunk], ctx.scale)
            if grad_query is None and grad_key is None and grad_bias is None:
                continue
            grad_dropped = chunk_weights.new_empty(chunk_weights.shape)
            _multiply(grad_dropped, grad[chunk], value[chunk].transpose(-1, -2), ctx.scale)
            masks.masked(grad_dropped, chunk_keep, in_place=True)
            grad_scores = torch.empty_like(grad_dropped)
            torch.ops.aten._softmax_backward_data.out(
                grad_dropped, chunk_weights, -1, chunk_weights.dtype, grad_input=grad_scores
            )
            if grad_bias is not None:  # summed over what the bias is broadcast across
                target = grad_bias if grad_bias.shape[0] == 1 else grad_bias[chunk]
                target += grad_scores.sum_to_size(target.shape)
            if grad_query is not None:
                _multiply(grad_query[chunk], grad_scores, key[chunk], ctx.scaling)
            if grad_key is not None:
                _multiply(grad_key[chunk], grad_scores.transpose(-1, -2), query[chunk], ctx.scaling)
        grads = (grad_query, grad_key, grad_value, grad_bias)
        return (*(_framed(g, ctx.flip) for g in grads), None, None, None)


def _heads_first(x: torch.Tensor) -> bool:
    """Whether the attention operand `x` ([batch, heads, tokens, size]) is laid out heads
    first: contiguous with its first two dimensions swapped, and not as it is."""
    return not x.is_contiguous() and x.transpose(0, 1).is_contiguous()


def _framed(x: torch.Tensor | None, flip: bool) -> torch.Tensor | None:
    """`x` with its first two dimensions swapped when `flip` (a view), else as it is."""
    return x.transpose(0, 1) if flip and x is not None else x


def _add_into(
    out: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None, chunk: slice
) -> bool:
    """Writes `bias + mask` for the rows of `chunk` (each broadcast; either may be None) into
    `out`; returns whether there was anything to write (`out` is left as it is if not)."""
    addends = [a if a.shape[0] == 1 else a[chunk] for a in (bias, mask) if a is not None]
    if len(addends) == 2:
        torch.add(addends[0].expand(out.shape), addends[1], out=out)
    elif addends:
        out.copy_(addends[0])
    return bool(addends)


def _multiply(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, added: bool = False
) -> None:
    """`out = a @ b * alpha` (batched over the first two dimensions, `out` contiguous), or
    `out += a @ b * alpha` when `added`, as one batched product (the scaling in the product,
    not a pass of its own)."""
    batch = out.shape[0] * out.shape[1]
    out.view(batch, *out.shape[2:]).baddbmm_(
        a.reshape(batch, *a.shape[2:]),
        b.reshape(batch, *b.shape[2:]),
        beta=1.0 if added else 0.0,
        alpha=alpha,
    )


# the attribute of a boolean attention mask that holds the additive mask made from it
_ADDITIVE = "_finetune_additive_mask"


def _additive_mask(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor | None:
    """What the attention adds to its scores besides a position bias: 0 where a query may
    attend to a key and the lowest float where it may not, from a boolean mask (or causality
    when there is no mask); a float mask is already additive.

    A stack of layers hands the same boolean mask to each of its layers (and to their
    recomputation), so the additive mask is kept on the boolean mask itself and made once per
    stack. The lowest float plus any score or position bias is the lowest float again (their
    size is far below its rounding step), so adding bias and mask gives exactly the scores of
    transformers' `create_position_bias_mask`, which puts the lowest float in place of the
    bias."""
    if attention_mask is None:
        if not is_causal:
            return None
        rows = torch.arange(query.shape[2], device=query.device)[:, None]
        attention_mask = rows >= torch.arange(key.shape[2], device=key.device)[None, :]
    if attention_mask.dtype != torch.bool:
        return attention_mask
    made = getattr(attention_mask, _ADDITIVE, None)
    if made is None or made.dtype != query.dtype:
        made = _made_additive(attention_mask, query.dtype)
        setattr(attention_mask, _ADDITIVE, made)
    return made


def _made_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a boolean attention mask: 0 where it is True, the lowest float of
    `dtype` where it is False."""
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, torch.finfo(dtype).min)


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
    device = query.device.type
    if torch.is_autocast_enabled(device):  # in its precision, as SDPA runs under autocast (a
        dtype = torch.get_autocast_dtype(device)  # rotary position's query and key are fp32)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    groups = getattr(module, "num_key_value_groups", 1)  # query heads per key/value head
    if groups != 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = query.shape[2] > 1 and attention_mask is None and causal
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = _additive_mask(query, key, attention_mask, causal)
    while mask is not None and mask.dim() < 4:
        mask = mask.unsqueeze(0)
    output = _DroppedOutAttention.apply(query, key, value, position_bias, mask, dropout, scaling)
    # [batch, tokens, heads, size]; laid out heads first, as it came, for `unpadded` to gather
    returned = output.transpose(1, 2)
    return (returned if _heads_first(output) else returned.contiguous()), None


CHEAP_DROPOUT_ATTENTION = "sdpa_cheap_cpu_dropout"


# set on a decoder-only model's stack of layers once `causal_mask_only` hooked it
_CAUSAL_MASK_HOOKED = "_finetune_causal_mask_only"


def _without_padding_mask(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A decoder-only stack's forward pre-hook: its call with the attention mask left out
    where the batch is read from its start (no cache of earlier keys) and padded on the right
    only (every row's ones, then its zeros). There every real token is followed by nothing but
    padding, which the causal mask already hides from it, so the padding mask changes none of
    the real tokens' outputs, and without it SDPA runs its causal kernel, which skips the
    scores above the diagonal instead of computing and masking them. The padding's own outputs
    differ, and nothing reads them (their labels are out of the loss). Any other call (left
    padding, a cache, a mask that is already 4-d) is left as it is."""
    mask = kwargs.get("attention_mask")
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dim() != 2
        or kwargs.get("past_key_values") is not None
        or prefix_lengths(mask) is None
    ):
        return None
    return args, {**kwargs, "attention_mask": None}


def layer_stack(model: nn.Module) -> nn.Module | None:
    """The module that runs the model's transformer layers (the first to hold a list of them):
    what a decoder-only model's head calls with the batch (Llama's `model`, OPT's
    `model.decoder`, GPT-2's `transformer`); None for a model without such layers."""
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and any(
                isinstance(layer, GradientCheckpointingLayer) for layer in child
            ):
                return module
    return None


def causal_mask_only(model: nn.Module) -> nn.Module:
    """Has a decoder-only model (or a LoRA model of one) read right-padded batches with the
    causal mask alone (`_without_padding_mask`, on its `layer_stack`); a sequence-to-sequence
    model is left as it is. Returns the model."""
    outer = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    stack = layer_stack(model)
    if outer is None or outer.config.is_encoder_decoder or stack is None:
        return model
    if not getattr(stack, _CAUSAL_MASK_HOOKED, False):
        stack.register_forward_pre_hook(_without_padding_mask, with_kwargs=True)
        setattr(stack, _CAUSAL_MASK_HOOKED, True)
    return model


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
def glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (it has `mallopt` and `malloc_trim`)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc's, or AttributeError
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def keep_freed_memory() -> bool:
    """Tells glibc's allocator to keep freed memory for reuse instead of giving it back to the
    system and taking it again (zeroed pages, page faults) at every training step; returns
    whether it applied (glibc only). Peak memory is unchanged: what is kept is reused."""
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


@functools.cache
def bounded_onednn_caches() -> bool:
    """Has each of oneDNN's two caches of compiled products (oneDNN's own and ideep's, which
    torch's CPU products go through) keep `ONEDNN_CACHED_PRODUCTS` of them instead of 1024,
    unless the environment sets their size already; returns whether it set either.

    oneDNN compiles a product for each shape it meets and keeps it with buffers sized by the
    shape. In bf16 on the CPU every product of training goes through oneDNN, and the shapes
    change with every batch (its real tokens laid end to end): the benchmark's process grew
    to 3.46 GB over an epoch (1.98 GB with the smaller caches), and by 1 GB over 900 shapes
    of one product. A batch's shapes repeat in every layer, so the smaller caches serve the
    layers after the first; compiling a shape again costs ~0.6 ms. Both caches read their
    size from the environment once, at the process's first oneDNN product, so this must run
    before it (`models.build_model` calls it first)."""
    changed = False
    for name in _ONEDNN_CACHE_SIZES:
        if name not in os.environ:
            os.environ[name] = str(ONEDNN_CACHED_PRODUCTS)
            changed = True
    return changed


def give_back_freed_memory() -> bool:
    """Where `keep_freed_memory` applied, gives the memory the allocator keeps back to the
    system (glibc's `malloc_trim`): between training steps it is reused, but evaluation and
    generation allocate tensors of other sizes, which the training's freed blocks (scattered
    between those still in use) may not fit, so the process would grow past the training's
    peak. Returns whether it did."""
    if keep_freed_memory.cache_info().currsize == 0 or not keep_freed_memory():
        return False
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


_LOSS_ROWS = 256  # target tokens whose logits are computed at a time
#: The frozen output layers' weights packed for oneDNN (`packing`), kept across steps
_OUTPUT_PACKS = packing.FrozenPacks()
#: ... and in bfloat16, packed (the logits' product) and as it is (the gradient's), for the
#: loss under the CPU's bf16 mixed precision
_OUTPUT_BF16_PACKS = packing.FrozenPacks(lambda weight: packing.pack(weight.bfloat16()))
_OUTPUT_BF16 = packing.FrozenPacks(lambda weight: weight.bfloat16())


def _exp_floor(vocabulary: int, count: float, dtype: torch.dtype) -> float:
    """The least shifted logit the loss exponentiates (smaller ones are raised to it), such
    that every probability of its gradient, `exp / sum / count`, is a normal float: the sum
    of a row's exps (each at most 1) is at most `vocabulary`. A subnormal float makes a
    product with it tens to hundreds of times slower on some CPUs (the gradient's product by
    the output layer's weight: 0.7 GFLOP/s against 170, on an Intel Xeon with AVX-512). Each
    raised term adds at most `vocabulary * count` times the least normal float to a sum of at
    least 1, and as little to a probability: far below float rounding. Where that floor would
    be higher than one at which all the raised terms together stay under the dtype's rounding
    step (float16's narrow range), the floor is that one instead: the loss stays exact, its
    probabilities may then be subnormal."""
    info = torch.finfo(dtype)
    normal = math.log(info.tiny) + math.log(vocabulary) + math.log(count)
    return min(normal, math.log(info.eps) - math.log(vocabulary))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `labels` (or their sum over
    `divisor`), a few hundred rows of logits at a time, for the labelled rows only (a batch's
    padded target positions, and a decoder-only model's prompts, which the loss ignores, get
    no logits: on the benchmark's batches ~18% of the rows). The gradient with
    respect to `hidden` is computed on the way (softmax minus the one-hot target, times the
    weight; 0 for the ignored rows), so neither the logits nor their log-softmax are kept: for
    a batch of 8 x 154 targets and a 32k vocabulary that is ~600 MB less at the peak. The
    output layer's weight must be frozen (it gets no gradient). Where `packing` applies, the
    logits come from the weight packed for oneDNN (once, kept across steps in `_OUTPUT_PACKS`:
    66 MB for T5's output layer): on rows of the benchmark's batch sizes the loss and its
    gradient take ~19% less time (28.5 -> 23.1 s over 120 batches of 100-900 targets; in the
    benchmark's first 24 steps 4.7-4.9 -> 4.3 s). The gradient's product stays torch's:
    packing the transposed weight too gained another 8% for another 66 MB and more of
    oneDNN's working memory, at the training's peak. With `bf16` (the CPU's mixed precision)
    both products run in bfloat16, as autocast runs the output layer, on bf16
    copies of the weight kept across steps (packed for the logits, 33 MB each for T5's);
    the logits' softmax and the loss stay in fp32."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        divisor: float | None,
        bf16: bool,
    ) -> torch.Tensor:
        positions = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        count = divisor if divisor is not None else max(1, positions.numel())
        labelled, targets = hidden.index_select(0, positions), labels.index_select(0, positions)
        total = hidden.new_zeros(())
        grad_labelled = torch.empty_like(labelled) if hidden.requires_grad else None
        packed, product_weight = None, weight
        low = bf16 and packing.available() and weight.device.type == "cpu"
        if low:
            packed, product_weight = _OUTPUT_BF16_PACKS.weight(weight), _OUTPUT_BF16.weight(weight)
        elif packing.packs(weight) and not weight.requires_grad:
            packed = _OUTPUT_PACKS.weight(weight)
        floor = _exp_floor(weight.shape[0], count, hidden.dtype)
        for start in range(0, labelled.shape[0], _LOSS_ROWS):
            rows = slice(start, start + _LOSS_ROWS)
            if low:  # the product in bf16, the logits from here on in fp32
                logits = packing.product(labelled[rows].bfloat16(), packed).float()
                if bias is not None:
                    logits += bias
            elif packed is not None:
                logits = packing.product(labelled[rows], packed, bias)
            else:
                logits = labelled[rows] @ weight.T
                if bias is not None:
                    logits += bias
            row_targets = targets[rows].unsqueeze(1)
            target_logits = logits.gather(1, row_targets)
            peak = logits.amax(dim=1, keepdim=True)
            # in place of the logits: one pass of exp, with no subnormal results or probabilities
            exps = logits.sub_(peak).clamp_(min=floor).exp_()
            sums = exps.sum(dim=1, keepdim=True)
            total += (peak + sums.log() - target_logits).sum()
            if grad_labelled is not None:
                probs = exps.div_(sums)  # the softmax
                minus_one = torch.full_like(row_targets, -1, dtype=probs.dtype)
                probs.scatter_add_(1, row_targets, minus_one).div_(count)
                if low:
                    grad_labelled[rows] = probs.bfloat16() @ product_weight
                else:
                    torch.matmul(probs, weight, out=grad_labelled[rows])
        grad = None
        if grad_labelled is not None:
            grad = torch.zeros_like(hidden).index_copy_(0, positions, grad_labelled)
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output if grad is not None else None), None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    divisor: torch.Tensor | float | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """`cross_entropy(hidden @ weight.T + bias, labels, ignore_index=-100)` (the mean over the
    labelled tokens; with `divisor`, their sum over it) without keeping the logits; `weight`
    and `bias` must be frozen. `bf16`: its products in bfloat16 (under the CPU's mixed
    precision), the rest in `hidden`'s precision."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if bias is not None:
        bias = bias.reshape(-1)
    if isinstance(divisor, torch.Tensor):
        divisor = float(divisor)
    return _LinearCrossEntropy.apply(flat, weight, labels.reshape(-1), bias, divisor, bf16)


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """A decoder-only model's labels moved one position left (the last ignored): at each
    position, the token its logits predict. The loss over them is the model's own, which
    shifts its logits instead, and the hidden states need no copy."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


#: The buffer that BART-family models (BART, mBART, Marian, Pegasus) add to their logits
LOGITS_BIAS = "final_logits_bias"


#: Guards the models' output layers while `output_layer_off` swaps them
_OUTPUT_LAYER_LOCK = threading.Lock()
# the attribute of a model whose output layer is off: (its output layer, its logits bias, how
# many `output_layer_off` blocks are open on it)
_OUTPUT_LAYER_OFF = "_finetune_output_layer_off"


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer (`get_output_embeddings`), also while `output_layer_off` has
    it off (on another thread that trains at once)."""
    with _OUTPUT_LAYER_LOCK:
        off = getattr(model, _OUTPUT_LAYER_OFF, None)
        return off[0] if off is not None else model.get_output_embeddings()


@contextlib.contextmanager
def output_layer_off(model: nn.Module) -> Iterator[tuple[nn.Linear, torch.Tensor | None]]:
    """Within the block `model` returns its last hidden states (as its output layer gets them)
    in place of logits; yields the output layer and the bias the model adds to its output
    (BART's `final_logits_bias`; None for most families), which is 0 within the block. Blocks
    may nest and overlap, also on threads that train at once (`workers`): the output layer
    comes back when the last one ends."""
    with _OUTPUT_LAYER_LOCK:
        off = getattr(model, _OUTPUT_LAYER_OFF, None)
        if off is None:
            head = model.get_output_embeddings()
            bias = getattr(model, LOGITS_BIAS, None)
            model.set_output_embeddings(nn.Identity())
            if bias is not None:
                setattr(model, LOGITS_BIAS, bias.new_zeros(()))
            off = [head, bias, 0]
            setattr(model, _OUTPUT_LAYER_OFF, off)
        off[2] += 1
    try:
        yield off[0], off[1]
    finally:
        with _OUTPUT_LAYER_LOCK:
            off[2] -= 1
            if off[2] == 0:
                delattr(model, _OUTPUT_LAYER_OFF)
                model.set_output_embeddings(off[0])
                if off[1] is not None:
                    setattr(model, LOGITS_BIAS, off[1])


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
    proven = PROVEN.get(config.model_type, PROCESS_PIECES)
    return tuple(name for name in SPEEDUPS if name in requested and name in proven)


def apply_to_model(model: nn.Module, pieces: tuple[str, ...], training: bool) -> nn.Module:
    """The model with the pieces among `pieces` that change its modules applied: the fused
    GELU, and for a model that trains the cheaper dropout and attention dropout (in eval mode
    there is no dropout), a decoder-only model's causal mask alone (for its training and
    validation batches) and the attention that lets T5 train on unpadded tokens; returns the
    model."""
    changes = [("fused_gelu", fuse_gelu)]
    if training:
        changes += [
            ("cheap_dropout", cheaper_dropout),
            ("attention_dropout", cheaper_attention_dropout),
            ("causal_mask", causal_mask_only),
            ("unpadded", lambda model: unpadded.install(model) and model),
        ]
    for name, change in changes:
        if name in pieces:
            change(model)
    return model
