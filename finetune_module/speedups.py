"""CPU speed-ups that leave the maths alone: a cheaper dropout, a fused GELU, and the C
allocator told to keep the memory it has.

Each is the same function as the one it replaces (dropout keeps each value with probability
1 - p and scales it by 1 / (1 - p); GELU is the same tanh approximation, computed in one
kernel); only the work to compute it, the random stream behind dropout, and float rounding in
the last bits differ. Measured with `python -m bench.benchmark` (see the README's Benchmark
section); each can be switched off there with `--ablate`.
"""

import ctypes
import ctypes.util
import functools
from typing import Any

import torch
from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation

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


class _Dropout(torch.autograd.Function):
    """Dropout whose backward pass keeps a boolean mask (one byte per value, not four)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = _keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


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
    same p; returns the model. (Dropout inside the attention kernel is left to it.)"""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout and child.p > 0:
                setattr(module, name, FastDropout(child.p))
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
