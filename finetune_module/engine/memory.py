"""Training memory to a budget: gradient checkpointing only for the batches and layers that
need it.

A training batch keeps each layer's activations for the backward pass; for a long batch (the
95th-percentile input length times the batch size) that is gigabytes, while most batches need
a fraction of it. Before each step the activations each layer would keep are estimated from
the batch's padded shape; if they add up to more than the budget, just enough layers (the
costliest first) recompute theirs in the backward pass instead of keeping them. Short batches
run at full speed; the longest pay about one extra forward pass of the layers they recompute.

The budget scales with the model: by default ("auto") a batch may keep activations of up to
`AUTO_BUDGET_WEIGHTS` times the memory of the model's own weights, so the peak stays a fixed
multiple of the model's size however long the data's longest batch is. For the benchmark's model
of flan-t5-small's shape (61M distinct weights in fp32, 0.24 GB) that is 0.98 GB, the
trade-off the fixed default of 1.0 GB struck before: 20 of its 96 training batches recompute
some layers (~3% more compute), and the peak stays near 2.6 GB instead of 4.4 GB without a
budget (2.4 GB and 3.4 GB over one epoch since the attention works a few batch rows at a time;
the recomputed layers cost 6.5 s of its 91 s of steps).
"""

from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

FLOAT_BYTES = 4
# Per token a layer keeps about 9 x hidden size + 4 x feed-forward size floats (inputs of its
# linear layers and LoRA, norms, activation, dropout masks, attention heads); per attention
# score about 5 bytes (the attention weights and their one-byte dropout mask, see
# `speedups.attention`). Fitted to T5 (flan-t5-small's shape, LoRA on q and v) measured with
# torch's saved-tensor hooks: within 1% for batches of 8 x (60 + 109) to 8 x (520 + 109) tokens.
TOKEN_FLOATS = (9, 4)  # x hidden size, x feed-forward size
SCORE_BYTES = 5
AUTO_BUDGET_WEIGHTS = 4  # "auto": activations up to this many times the weights' own bytes


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

    def plan(self, batch: int, source: int, target: int) -> list[bool]:
        """Which layers to checkpoint for a batch of this padded shape: none if it fits the
        budget, else the fewest layers (costliest first) that bring it within."""
        sizes = self.layer_bytes(batch, source, target)
        excess = sum(kept for kept, _ in sizes) - self.budget
        flags = [False] * len(sizes)
        for index in sorted(range(len(sizes)), key=lambda i: -(sizes[i][0] - sizes[i][1])):
            if excess <= 0:
                break
            flags[index] = True
            excess -= sizes[index][0] - sizes[index][1]
        return flags

    def before_step(self, inputs: dict[str, torch.Tensor]) -> None:
        """Sets the layers' checkpointing for the batch `inputs` (as the collator made it)."""
        ids, labels = inputs["input_ids"], inputs.get("labels")
        # a decoder-only model's collator joined prompt and answer into input_ids
        seq2seq = self.config.is_encoder_decoder and labels is not None
        self.set(self.plan(ids.shape[0], ids.shape[1], labels.shape[1] if seq2seq else 0))


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes the model's weights take (adapters and frozen weights alike)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def budget_gb(activation_memory_gb: float | str | None, model: torch.nn.Module) -> float | None:
    """The activation budget in GB for `model`: the number given, `AUTO_BUDGET_WEIGHTS` times
    its weights' bytes for "auto", or None (no limit)."""
    if activation_memory_gb is None:
        return None
    if activation_memory_gb == "auto":
        return AUTO_BUDGET_WEIGHTS * weight_bytes(model) / 1e9
    return float(activation_memory_gb)
