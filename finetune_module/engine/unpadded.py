"""T5 training on a batch's real tokens only: every layer but attention runs on the batch's
texts laid end to end, without their padding, and attention runs per text.

A padded batch of 8 texts computes every linear layer, norm, dropout and activation over its
padding too; on the benchmark's grouped batches that is ~8% of a training step's FLOPs
(10% more tokens than real ones). Here the encoder gets the batch's inputs as one row of their
real tokens ([1, N]) and the decoder their targets likewise (each shifted right within its own
text), so those layers see no padding. Attention alone needs the texts apart: it lays the
queries, keys and values out again as [texts, heads, longest, head size] (zeros where a text is
shorter), attends with the same masks and position bias as the padded batch (T5's relative
position bias depends only on the distance between two tokens of a text, so it is computed
for the longest text, as the padded batch does), and takes the real tokens' outputs back to the
row. The loss is the same mean over the same labelled tokens, and so are the gradients, up to
float rounding (`tests/test_unpadded.py`); dropout draws fewer random numbers, so a run's draws
differ from the padded path's.

It applies to a sequence-to-sequence T5-family model that trains with its attention through
transformers' attention interface (`install`), to right-padded batches
(`laid_out_inputs`), and only where no layer recomputes its activations in the backward pass (a
recomputed layer would run after the layout is gone). Evaluation and generation are unchanged.
"""

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from finetune_module.engine.tokens import IGNORE_INDEX, prefix_lengths, right_padded_lengths

# what each attention module of an installed model attends with (an attribute of the module)
_ROLE = "_finetune_unpadded_role"
ENCODER, DECODER, CROSS = "encoder", "decoder", "cross"
# the attention implementation names registered here: the wrapped one's name behind this prefix
_PREFIX = "unpadded+"


@dataclasses.dataclass(frozen=True)
class Texts:
    """One side (inputs or targets) of a batch of texts laid end to end: each text's length,
    the padded width (the longest), and where each real token sits in the padded
    [texts x width] layout (`index`, in the order the tokens are laid end to end)."""

    lengths: torch.Tensor
    width: int
    index: torch.Tensor
    _masks: dict[torch.dtype, torch.Tensor] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def of(cls, lengths: torch.Tensor, width: int) -> "Texts":
        """The layout of texts of these lengths in a padded batch `width` wide."""
        present = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        return cls(lengths, width, present.reshape(-1).nonzero().squeeze(1))

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    def key_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask of a padded batch of these texts as keys ([texts, 1, 1, width]):
        0 over each text's tokens, the lowest float of `dtype` over its padding (made once per
        dtype: every layer of a stack adds the same)."""
        if dtype not in self._masks:
            device = self.lengths.device
            padding = torch.arange(self.width, device=device) >= self.lengths[:, None]
            mask = torch.zeros(self.rows, 1, 1, self.width, dtype=dtype, device=device)
            self._masks[dtype] = mask.masked_fill_(
                padding[:, None, None, :], torch.finfo(dtype).min
            )
        return self._masks[dtype]

    def padded(self, states: torch.Tensor) -> torch.Tensor:
        """Attention states of the texts laid end to end ([1, heads, tokens, size]) as a padded
        batch ([texts, heads, width, size]; zeros over the padding), laid out heads first
        (`_zeros_heads_first`)."""
        _, heads, tokens, size = states.shape
        flat = states.transpose(1, 2).reshape(tokens, heads, size)
        out = _Scattered.apply(flat, self.index, self.rows * self.width)
        return out.view(heads, self.rows, self.width, size).transpose(0, 1)

    def unpadded(self, output: torch.Tensor) -> torch.Tensor:
        """An attention output of the padded batch ([texts, width, heads, size], as attention
        implementations return it) for the texts laid end to end ([1, tokens, heads, size]).
        Read where it lies: an output laid out heads first, as `speedups.attention` returns
        the states of `padded`, is not copied first."""
        _, _, heads, size = output.shape
        flat = _Gathered.apply(output.reshape(self.rows * self.width, heads, size), self.index)
        return flat.unsqueeze(0)


def _zeros_heads_first(like: torch.Tensor, rows: int) -> torch.Tensor:
    """Zeros of `rows` rows shaped as the rows of `like` ([rows, heads, size]), laid out
    heads first ([heads, rows, size]): an attention batch in this layout is one contiguous
    matrix per head and text, which batched products read as it lies
    (`speedups._DroppedOutAttention`)."""
    _, heads, size = like.shape
    return like.new_zeros(heads, rows, size).transpose(0, 1)


class _Scattered(torch.autograd.Function):
    """`rows` rows of zeros ([heads, rows, size]) with `flat`'s rows ([tokens, heads, size])
    at `index`. Keeps only the index for the backward pass (torch's `index_copy` keeps `flat`
    itself: every layer's queries, keys and values twice over)."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return _zeros_heads_first(flat, rows).index_copy_(0, index, flat).transpose(0, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (index,) = ctx.saved_tensors
        return grad.transpose(0, 1).index_select(0, index), None, None


class _Gathered(torch.autograd.Function):
    """The rows of `padded` ([rows, heads, size]) at `index`, keeping only the index (and the
    row count) for the backward pass, whose gradient is laid out heads first."""

    @staticmethod
    def forward(ctx: Any, padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = padded.shape[0]
        return padded.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return _zeros_heads_first(grad, ctx.rows).index_copy_(0, index, grad), None


@dataclasses.dataclass(frozen=True)
class Layout:
    """A batch of a sequence-to-sequence model laid end to end: its inputs and its targets."""

    inputs: Texts
    targets: Texts
    _masks: dict[torch.dtype, torch.Tensor] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def causal_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive causal mask of the targets' self-attention ([1, 1, width, width], in
        `dtype`; made once per dtype). The targets are right-padded, so no real token attends to
        padding under it."""
        if dtype not in self._masks:
            width = self.targets.width
            later = torch.ones(width, width, dtype=torch.bool, device=self.targets.index.device)
            mask = torch.zeros(1, 1, width, width, dtype=dtype, device=later.device)
            self._masks[dtype] = mask.masked_fill_(later.triu(1), torch.finfo(dtype).min)
        return self._masks[dtype]


_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar(
    "finetune_unpadded_layout", default=None
)


def _attention(
    inner: Callable[..., tuple[torch.Tensor, Any]],
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The attention implementation `inner`, on texts laid end to end when a layout is set (see
    the module's docstring) and as it is otherwise."""
    layout = _LAYOUT.get()
    role = getattr(module, _ROLE, None)
    if layout is None or role is None:
        kwargs["position_bias"] = position_bias
        return inner(module, query, key, value, attention_mask, **kwargs)
    queries = layout.inputs if role == ENCODER else layout.targets
    keys = layout.targets if role == DECODER else layout.inputs
    if role == DECODER:
        mask = layout.causal_mask(query.dtype)
    else:  # the encoder's self-attention and the cross-attention: the inputs' padding
        mask = keys.key_mask(query.dtype)
        if role == CROSS:
            position_bias = None  # T5's is zeros (here `_no_cross_bias`'s placeholder)
    kwargs["is_causal"] = False
    output, weights = inner(
        module, queries.padded(query), keys.padded(key), keys.padded(value), mask,
        position_bias=position_bias, **kwargs,
    )  # fmt: skip
    return queries.unpadded(output), weights


def _relative_bias(
    compute_bias: Callable[..., torch.Tensor],
    is_decoder: bool,
    query_length: int,
    key_length: int,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """T5's relative position bias, for the longest text when a layout is set (not for the
    whole row of texts laid end to end, which would be tokens x tokens)."""
    layout = _LAYOUT.get()
    if layout is not None:
        query_length = key_length = (layout.targets if is_decoder else layout.inputs).width
    return compute_bias(query_length, key_length, *args, **kwargs)


def _no_cross_bias(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Before a cross-attention module runs on a layout: a placeholder for its position bias,
    which T5 would otherwise make as zeros over every target and input token of the row
    ([1, heads, targets, inputs]: 83 MB for 8 texts of 109 and 541 tokens) for `_attention` to
    ignore."""
    if _LAYOUT.get() is None or kwargs.get("position_bias") is not None:
        return None
    return args, {**kwargs, "position_bias": _PLACEHOLDER_BIAS}


_PLACEHOLDER_BIAS = torch.zeros(1, 1, 1, 1)


def install(model: nn.Module) -> bool:
    """Lets `model` (a T5-family sequence-to-sequence model, or a LoRA model of one) train on
    texts laid end to end: marks what each attention module attends with, has its relative
    position bias computed for the longest text, and wraps its attention implementation (see
    `_attention`; without a layout everything runs as before). Returns whether it applied: a
    model whose attention modules are not T5's is left as it is."""
    roles: list[tuple[nn.Module, str]] = []
    for module in model.modules():
        attention = getattr(module, "EncDecAttention", None)
        if attention is not None:
            roles.append((attention, CROSS))
        attention = getattr(module, "SelfAttention", None)
        if attention is not None:
            roles.append((attention, DECODER if attention.is_decoder else ENCODER))
    outer = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if not roles or outer is None or not all(hasattr(a, "compute_bias") for a, _ in roles):
        return False
    name = outer.config._attn_implementation
    if not name.startswith(_PREFIX):
        inner = ALL_ATTENTION_FUNCTIONS.get(name)
        if inner is None:  # "eager": T5's own maths, which the interface cannot call
            return False
        wrapped = _PREFIX + name
        AttentionInterface.register(wrapped, functools.partial(_attention, inner))
        AttentionMaskInterface.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS.get(name))
        outer.set_attn_implementation(wrapped)
    for attention, role in roles:
        if getattr(attention, _ROLE, None) is None:
            setattr(attention, _ROLE, role)
            if role == CROSS:
                attention.register_forward_pre_hook(_no_cross_bias, with_kwargs=True)
            if attention.has_relative_attention_bias:
                attention.compute_bias = functools.partial(
                    _relative_bias, attention.compute_bias, attention.is_decoder
                )
    return True


def installed(model: nn.Module) -> bool:
    """Whether `install` applied to `model`."""
    return any(getattr(m, _ROLE, None) is not None for m in model.modules())


# the attribute of a model that holds its modules that can recompute their activations
_RECOMPUTING = "_finetune_recomputing_modules"


def _recomputing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that have a `gradient_checkpointing` switch (its layers and
    stacks), found once per model: a step's parts each ask whether one is on, and walking the
    ~900 modules of a T5 with adapters each time took ~1.5 ms a part."""
    found = model.__dict__.get(_RECOMPUTING)
    if found is None:
        found = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        model.__dict__[_RECOMPUTING] = found
    return found


def laid_out_inputs(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], Layout] | None:
    """A training batch of the sequence-to-sequence `model` (input ids, attention mask,
    labels) laid end to end: the model's inputs ([1, tokens] each: input ids, decoder input
    ids shifted right within each text, labels) and their layout; None where it does not apply
    (other keys, no attention mask or labels, a batch not padded at the right, a layer that
    recomputes its activations)."""
    if set(inputs) != {"input_ids", "attention_mask", "labels"} or any(
        m.gradient_checkpointing for m in _recomputing_modules(model)
    ):
        return None
    mask, labels = inputs["attention_mask"], inputs["labels"]
    if mask.dim() != 2 or labels.dim() != 2:
        return None
    sources = prefix_lengths(mask)
    if sources is None:
        return None
    # a target's length runs to its last labelled token (right padding is all IGNORE_INDEX)
    targets = right_padded_lengths(labels != IGNORE_INDEX)
    layout = Layout(Texts.of(sources, mask.shape[1]), Texts.of(targets, labels.shape[1]))
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    laid = {
        "input_ids": inputs["input_ids"].reshape(-1)[layout.inputs.index][None],
        "decoder_input_ids": decoder_ids.reshape(-1)[layout.targets.index][None],
        "labels": labels.reshape(-1)[layout.targets.index][None],
    }
    return laid, layout


def current_layout() -> Layout | None:
    """The layout an installed model's forward pass reads its inputs in now (None: padded)."""
    return _LAYOUT.get()


@contextlib.contextmanager
def laid_out(layout: Layout) -> Iterator[None]:
    """Within the block an installed model's forward pass reads its inputs as texts laid end
    to end in `layout`."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)
