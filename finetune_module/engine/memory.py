"""Training memory to a budget: a long batch goes in parts, and gradient checkpointing only
where even one row does not fit.

A training batch keeps each layer's activations for the backward pass; for a long batch (the
95th-percentile input length times the batch size) that is gigabytes, while most batches need
a fraction of it. Before each step the activations each layer would keep are estimated from
the batch's padded shape. A batch over the budget goes forward and backward in the fewest
parts that fit (`ActivationBudget.parts`: its rows in order of length, each part padded to its
own longest), and the Trainer adds up their gradients, each part's loss scaled by its share of
the batch's; that costs next to nothing. Only where one row alone does not fit do just enough
layers (the costliest first) recompute theirs in the backward pass, at about one extra forward
pass of those layers.

The budget scales with the model: by default ("auto") a batch may keep activations of up to
`AUTO_BUDGET_WEIGHTS` times the memory of the model's own weights (at least
`AUTO_BUDGET_FLOOR_GB`), so the peak stays a fixed multiple of the model's size however long the
data's longest batch is. For the benchmark's model of flan-t5-small's shape (61M distinct
weights in fp32, 0.24 GB) that is 0.88 GB: over one epoch, 10-12 of its 48 batches go in two
or three parts, and the peak stays near 2.1-2.4 GB instead of 3.4 GB without a budget. Before
batches went in parts, those batches recomputed some layers instead, which cost 6.5 s of the 91
s of steps (95 -> 86 s of training with parts). The multiple was 4 until T5 trained on unpadded
tokens (`unpadded`): a part of 4 x 541 inputs laid end to end keeps the same saved tensors as
padded but peaked 80-120 MB higher, which took the benchmark's peak to 2.49-2.51 GB; at 3.6 it
is 2.11 GB, and unpadded training in the smaller budget still took 3.4% less time than padded
training in the larger one (measured in one process over 94 batches).
"""

from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from finetune_module.engine.tokens import IGNORE_INDEX, right_padded_lengths

FLOAT_BYTES = 4
# Per token a layer keeps about 9 x hidden size + 4 x feed-forward size floats (inputs of its
# linear layers and LoRA, norms, activation, dropout masks, attention heads); per attention
# score about 5 bytes (the attention weights and their one-byte dropout mask, see
# `speedups.attention`). Fitted to T5 (flan-t5-small's shape, LoRA on q and v) measured with
# torch's saved-tensor hooks: within 1% for batches of 8 x (60 + 109) to 8 x (520 + 109) tokens.
TOKEN_FLOATS = (9, 4)  # x hidden size, x feed-forward size
SCORE_BYTES = 5
# A decoder-only model's SDPA attention without dropout keeps no score on a CPU (torch's flash
# kernel recomputes them in the backward pass): on a Llama of flan-t5-small's width a part kept
# 240-250 KB a token, 1.3-2x less than estimated here. Counting no scores for it was measured
# and not kept: 4.1% less training time in one process, but the benchmark's Llama then peaked
# at 2.44-2.60 GB instead of 1.99 GB (larger parts, and what their backward passes allocate
# besides what they keep), past the 2.5 GB the benchmark stays under; so its scores count as
# T5's do.
AUTO_BUDGET_WEIGHTS = 3.6  # "auto": activations up to this many times the weights' own bytes
# ... and at least this many GB: less is not what limits any machine that trains, and a small
# model's batches would go one row at a time (a tiny test model's budget would be 0.6 MB)
AUTO_BUDGET_FLOOR_GB = 0.25
# the keys of a batch that `ActivationBudget.parts` cuts into parts: a model's inputs, and a
# sequence-to-sequence model's targets (a decoder-only model's labels run along its inputs)
SOURCE_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})
TARGET_KEYS = frozenset({"labels", "decoder_input_ids", "decoder_attention_mask"})


def _sizes(config: Any) -> tuple[int, int, int]:
    """Hidden size, feed-forward size and attention heads of a transformers config."""
    hidden = getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or 0
    ff = getattr(config, "d_ff", None) or getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_heads", None) or getattr(config, "num_attention_heads", 1)
    return int(hidden), int(ff), int(heads)


def _layer_stacks(model: torch.nn.Module) -> list[tuple[str, GradientCheckpointingLayer]]:
    """The model's checkpointable layers, each named "encoder" or "decoder" by the stack it is
    in (every layer of a decoder-only model is "decoder")."""
    return [
        ("encoder" if ".encoder." in f".{name}." else "decoder", module)
        for name, module in model.named_modules()
        if isinstance(module, GradientCheckpointingLayer)
    ]


class ActivationBudget:
    """Switches gradient checkpointing per layer before each training step so that the
    activations kept for the backward pass stay within `budget_gb` (an estimate)."""

    def __init__(self, model: torch.nn.Module, budget_gb: float) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not isinstance(base, PreTrainedModel) or not base.supports_gradient_checkpointing:
            raise ValueError(f"{type(base).__name__} does not support gradient checkpointing.")
        self.config = base.config
        for module in base.modules():  # this model only trains: no cache of past keys
            if isinstance(getattr(module, "config", None), PretrainedConfig):
                module.config.use_cache = False
        self.layers = _layer_stacks(base)
        self.budget = budget_gb * 1e9
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        for module in base.modules():  # the stacks' own flag only turns their cache off
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    def set(self, flags: list[bool]) -> None:
        """Turns checkpointing on or off for each layer."""
        for (_, layer), on in zip(self.layers, flags, strict=True):
            layer.gradient_checkpointing = on

    def layer_bytes(self, batch: int, source: int, target: int) -> list[tuple[float, float]]:
        """For each layer: the bytes it keeps for a batch of this padded shape, and the bytes
        it keeps when checkpointed (its input only)."""
        hidden, ff, heads = _sizes(self.config)
        per_token = FLOAT_BYTES * (TOKEN_FLOATS[0] * hidden + TOKEN_FLOATS[1] * ff)
        seq2seq = self.config.is_encoder_decoder
        out = []
        for stack, _ in self.layers:
            if stack == "encoder":
                tokens, scores = source, source * source
            elif seq2seq:  # self-attention over the targets and cross-attention to the inputs
                tokens, scores = target, target * target + target * source
            else:  # decoder-only: prompt and answer are one sequence
                tokens, scores = source + target, (source + target) ** 2
            kept = batch * (tokens * per_token + heads * scores * SCORE_BYTES)
            out.append((kept, batch * tokens * hidden * FLOAT_BYTES))
        return out

    def plan(self, batch: int, source: int, target: int, budget: float | None = None) -> list[bool]:
        """Which layers to checkpoint for a batch of this padded shape: none if it fits the
        budget (`budget` bytes, if given), else the fewest layers (costliest first) that bring
        it within."""
        sizes = self.layer_bytes(batch, source, target)
        excess = sum(kept for kept, _ in sizes) - (self.budget if budget is None else budget)
        flags = [False] * len(sizes)
        for index in sorted(range(len(sizes)), key=lambda i: -(sizes[i][0] - sizes[i][1])):
            if excess <= 0:
                break
            flags[index] = True
            excess -= sizes[index][0] - sizes[index][1]
        return flags

    def shape(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        """The padded shape of the batch `inputs` (as the collator made it): rows, input length
        and target length (0 for a decoder-only model, whose collator joined prompt and answer
        into input_ids)."""
        ids, labels = inputs["input_ids"], inputs.get("labels")
        seq2seq = self.config.is_encoder_decoder and labels is not None
        return ids.shape[0], ids.shape[1], labels.shape[1] if seq2seq else 0

    def fits(self, inputs: dict[str, torch.Tensor], budget: float | None = None) -> bool:
        """Whether the batch `inputs` keeps its activations within the budget (`budget` bytes,
        if given) with no layer recomputing them."""
        return not any(self.plan(*self.shape(inputs), budget))

    def before_step(self, inputs: dict[str, torch.Tensor]) -> None:
        """Sets the layers' checkpointing for the batch `inputs` (as the collator made it)."""
        self.set(self.plan(*self.shape(inputs)))

    def parts(self, inputs: dict[str, torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The batch `inputs` as the fewest parts that each fit the budget with no layer
        recomputing its activations, each with its share of the batch's loss; the batch alone
        (share 1) when it fits as it is, or cannot be split (one row, no labels, keys other than
        a model's inputs and targets).

        The rows go to the parts in order of length, and each part is padded only to its own
        longest input and target. A share is the part's count of tokens in the loss over the
        batch's, so the shares of the parts' mean token losses add up to the batch's mean token
        loss: one step over the parts, each backward pass scaled by its share, gives the
        batch's gradients (up to float rounding; dropout draws its masks part by part). Where
        even one row at a time does not fit, the parts are single rows, and `before_step`
        chooses the layers each recomputes. A part with no token in the loss is left out."""
        if not _splittable(inputs) or self.fits(inputs):
            return [(inputs, 1.0)]
        lengths = self._lengths(inputs)
        if lengths is None:
            return [(inputs, 1.0)]
        return self._split(inputs, list(range(inputs["input_ids"].shape[0])), lengths, self.budget)

    def worker_parts(
        self, inputs: dict[str, torch.Tensor], workers: int
    ) -> list[list[tuple[dict[str, torch.Tensor], float]]] | None:
        """The batch `inputs` shared between `workers` threads that train at once (`workers`):
        for each, its parts (as `parts` makes them, within its share of the budget, each with
        its share of the batch's loss). The rows are dealt by their work (`row_work`), the
        costliest first, each to the worker with the least so far, so that the workers end
        together: on the benchmark's steps, rows dealt in order of length back and forth left
        one worker waiting for the other 4-8% of a step's time, and 2-3% dealt by work (which
        also depends on a row's target length and grows with its attention's scores). None
        where that does not apply: fewer rows than workers, a batch `parts` would not split,
        or a row that alone does not fit a worker's share of the budget (the step then runs
        as `parts` has it)."""
        rows = inputs["input_ids"].shape[0]
        if workers < 2 or rows < workers or not _splittable(inputs):
            return None
        lengths = self._lengths(inputs)
        if lengths is None:
            return None
        source, target, _ = lengths
        budget = self.budget / workers
        if not all(
            self.fits(_rows(inputs, [row], source[row], target[row]), budget) for row in range(rows)
        ):
            return None
        # each row, the costliest first, to the worker with the least work so far
        work = [self.row_work(source[row], target[row]) for row in range(rows)]
        shared: list[list[int]] = [[] for _ in range(workers)]
        totals = [0.0] * workers
        for row in sorted(range(rows), key=lambda row: (-work[row], row)):
            least = totals.index(min(totals))
            shared[least].append(row)
            totals[least] += work[row]
        return [self._split(inputs, sorted(own), lengths, budget) for own in shared]

    def row_work(self, source: int, target: int) -> float:
        """The work of training on one row of `source` input and `target` target tokens, in
        the bytes of activations it keeps (`layer_bytes`): its linear layers' products and
        elementwise passes grow with its tokens, its attention's with its scores, and the
        activations count both."""
        return sum(kept for kept, _ in self.layer_bytes(1, source, target))

    def _lengths(
        self, inputs: dict[str, torch.Tensor]
    ) -> tuple[list[int], list[int], torch.Tensor] | None:
        """Each row's input and target length and its count of tokens in the loss; None when
        the batch has no token in the loss."""
        labels = inputs["labels"]
        seq2seq = self.config.is_encoder_decoder
        # a decoder-only model's loss predicts each token from the one before: the first of
        # its labels is never predicted
        tokens = ((labels != IGNORE_INDEX) if seq2seq else (labels[:, 1:] != IGNORE_INDEX)).sum(1)
        if int(tokens.sum()) == 0:
            return None
        mask = inputs.get("attention_mask")
        rows = inputs["input_ids"].shape[0]
        source = (
            right_padded_lengths(mask).tolist()
            if mask is not None
            else [inputs["input_ids"].shape[1]] * rows
        )
        # a decoder-only model's labels run along its inputs
        target = right_padded_lengths(labels != IGNORE_INDEX).tolist() if seq2seq else source
        return source, target, tokens

    def _split(
        self,
        inputs: dict[str, torch.Tensor],
        rows: list[int],
        lengths: tuple[list[int], list[int], torch.Tensor],
        budget: float,
    ) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The batch's `rows` as the fewest parts that each fit `budget` bytes (single rows
        if none does), in order of length, each with its share of the whole batch's loss."""
        source, target, tokens = lengths
        total = int(tokens.sum())
        order = sorted(rows, key=lambda row: (source[row], target[row]))
        for count in range(1, len(order) + 1):
            groups = [
                order[i * len(order) // count : (i + 1) * len(order) // count] for i in range(count)
            ]
            cut = [
                _rows(inputs, group, max(source[r] for r in group), max(target[r] for r in group))
                for group in groups
            ]
            if all(self.fits(part, budget) for part in cut):
                break
        shares = [int(tokens[group].sum()) / total for group in groups]
        return [(part, share) for part, share in zip(cut, shares, strict=True) if share > 0]


def _splittable(inputs: dict[str, torch.Tensor]) -> bool:
    """Whether `ActivationBudget` may cut the batch `inputs` into parts: two rows or more,
    labels, and no keys but a model's inputs and targets, all of them 2-d tensors."""
    return (
        inputs["input_ids"].shape[0] >= 2
        and inputs.get("labels") is not None
        and set(inputs) <= SOURCE_KEYS | TARGET_KEYS
        and all(isinstance(v, torch.Tensor) and v.dim() == 2 for v in inputs.values())
    )


def _rows(
    inputs: dict[str, torch.Tensor], rows: list[int], source: int, target: int
) -> dict[str, torch.Tensor]:
    """The batch's `rows`, each key cut to the part's longest input (`source`) or, for a
    sequence-to-sequence model's targets, its longest target (`target`); cut at the right
    only, where the collator pads; contiguous, as a model's own loss views its labels."""
    index = torch.tensor(rows)
    return {
        key: value.index_select(0, index)[
            :, : max(1, target if key in TARGET_KEYS else source)
        ].contiguous()
        for key, value in inputs.items()
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes the model's weights take (adapters and frozen weights alike)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def budget_gb(activation_memory_gb: float | str | None, model: torch.nn.Module) -> float | None:
    """The activation budget in GB for `model`: the number given, `AUTO_BUDGET_WEIGHTS` times
    its weights' bytes (at least `AUTO_BUDGET_FLOOR_GB`) for "auto", or None (no limit)."""
    if activation_memory_gb is None:
        return None
    if activation_memory_gb == "auto":
        return max(AUTO_BUDGET_FLOOR_GB, AUTO_BUDGET_WEIGHTS * weight_bytes(model) / 1e9)
    return float(activation_memory_gb)
