"""Dropout's random masks, and dropout applied with them, for the speed layer (`speedups`).

A mask keeps each value with probability 1 - p, p rounded to a multiple of 1/65536 (0.1 ->
0.100006): value i is kept where its 16 random bits, read as an unsigned number, are at least
round(p * 65536). Value i's bits are bits 16 (i % 4) to 16 (i % 4) + 15 of word i // 4, and
word w is output w + 1 of splitmix64 started at the mask's seed (drawn from torch's
generator, so that seeds and Trainer checkpoints govern the masks as they govern any torch
random number). A value's bits depend on the seed and its index alone, so a mask comes out
the same whatever order or thread computes it in.

Where LLVM can compile for the machine (llvmlite, a dependency, carries it), one pass of
machine code makes a dropout's mask and its output at once, and another its gradient
(`masks_llvm`), without Python's lock. Elsewhere (or with `compiled=False`) numpy computes the
same masks and torch applies them, with its own operations: numpy's random bits, a second pass
to compare them, torch's multiplication by the mask's bytes (which makes a float copy of them)
and a pass for the scale.
"""

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: The steps p is rounded to: each value's random bits
STEPS = 1 << 16
_WORD = (1 << 64) - 1
#: splitmix64's increment and its two multipliers (numpy's words here, `masks_llvm`'s kernels)
SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_GOLDEN, _MIX_1, _MIX_2 = (np.uint64(c) for c in SPLITMIX)
#: values whose bits numpy makes at a time (without the kernels): 512 KB of bits, in L2
_NUMPY_CHUNK = 1 << 18


Kernels = dict[str, Callable[..., None]]
# the compiled kernels, or None where there are none, once `kernels` has been asked
_KERNELS: list[Kernels | None] = []
_KERNELS_LOCK = threading.Lock()


def kernels() -> Kernels | None:
    """The compiled kernels (`masks_llvm.compiled`), or None where llvmlite is not installed or
    LLVM cannot compile for this machine; compiled once, also when both workers' first
    dropouts ask at once."""
    if not _KERNELS:
        with _KERNELS_LOCK:
            if not _KERNELS:
                _KERNELS.append(_compiled_kernels())
    return _KERNELS[0]


def _compiled_kernels() -> Kernels | None:
    """`masks_llvm.compiled()`, or None (said in the log) where it fails."""
    try:
        from finetune_module.engine import masks_llvm

        return masks_llvm.compiled()
    except Exception as e:  # ImportError, or LLVM's own error for an unknown machine
        logger.info("Dropout without compiled kernels (%s): numpy and torch compute it.", e)
        return None


def threshold(p: float) -> int:
    """The least 16 random bits of a kept value, for dropout probability `p`: round(p * 2^16)
    (2^16 where every value is dropped)."""
    return min(STEPS, max(0, round(p * STEPS)))


def words(seed: int, first: int, count: int) -> np.ndarray:
    """Words `first` to `first + count - 1` of the mask seeded `seed` (any integer; read
    modulo 2^64), as numpy computes them: outputs `first + 1` onwards of splitmix64 started at
    `seed`."""
    z = np.arange(first + 1, first + count + 1, dtype=np.uint64)
    z *= _GOLDEN
    z += np.uint64(seed & _WORD)
    z ^= z >> np.uint64(30)
    z *= _MIX_1
    z ^= z >> np.uint64(27)
    z *= _MIX_2
    z ^= z >> np.uint64(31)
    return z


def keep_mask(shape: torch.Size, p: float, seed: int, *, compiled: bool = True) -> torch.Tensor:
    """The mask (booleans on the CPU, `shape`) of dropout probability `p` seeded `seed`: True
    where a value is kept. `compiled`: by the compiled kernel where there is one (the same mask
    either way)."""
    keep = torch.empty(shape, dtype=torch.bool)
    flat = keep.numpy().reshape(-1)
    least = threshold(p)
    if least >= STEPS:
        flat[:] = False
        return keep
    compiled_kernels = kernels() if compiled else None
    if compiled_kernels is not None:
        compiled_kernels["keep_mask"](keep.data_ptr(), seed & _WORD, least, flat.size)
        return keep
    for start in range(0, flat.size, _NUMPY_CHUNK):
        stop = min(flat.size, start + _NUMPY_CHUNK)
        lanes = words(seed, start // 4, (stop - start + 3) // 4).view(np.uint16)
        np.greater_equal(lanes[: stop - start], np.uint16(least), out=flat[start:stop])
    return keep


def _by_torch(x: torch.Tensor, keep: torch.Tensor, scale: float, in_place: bool) -> torch.Tensor:
    """`masked` with torch's operations: one multiplication by the mask's bytes (torch's CPU
    kernels for boolean operands, `torch.where` and `x * keep`, are not vectorised and took
    1.7x as long on the benchmark's attention scores; the bytes are converted to floats on the
    way) and one by `scale` unless it is 1."""
    as_bytes = keep.view(torch.uint8)
    product = x.mul_(as_bytes) if in_place else x * as_bytes
    return product.mul_(scale) if scale != 1.0 else product


def _compiled_for(x: torch.Tensor) -> Kernels | None:
    """The compiled kernels where they apply to `x`: a contiguous float32 tensor on the
    CPU."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return None
    return kernels()


def dropout(x: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout of `x` (on the CPU) with probability `p` and the mask seeded `seed`: its output
    (kept values times 1 / (1 - p), dropped ones times 0) and its mask (`keep_mask`)."""
    scale = 1.0 / (1.0 - p)
    compiled = _compiled_for(x)
    least = threshold(p)
    if compiled is None or least >= STEPS:
        keep = keep_mask(x.shape, p, seed)
        return _by_torch(x, keep, scale, in_place=False), keep
    out = torch.empty_like(x)
    keep = torch.empty(x.shape, dtype=torch.bool)
    compiled["dropout"](
        x.data_ptr(), out.data_ptr(), keep.data_ptr(), seed & _WORD, least, scale, x.numel()
    )
    return out, keep


def masked(
    x: torch.Tensor, keep: torch.Tensor, scale: float = 1.0, *, in_place: bool = False
) -> torch.Tensor:
    """`x` times `scale` where `keep` (a boolean mask of `x`'s shape) is True, times 0 where it
    is False, as torch's dropout computes it (so that NaN stays NaN): a dropout's output from
    its input and mask, or its input's gradient from its output's; `in_place`: into `x`
    itself. One compiled pass where the kernels apply (`_compiled_for`), torch's operations
    otherwise."""
    compiled = _compiled_for(x)
    if (
        compiled is None
        or keep.dtype != torch.bool
        or keep.shape != x.shape
        or not keep.is_contiguous()
    ):
        return _by_torch(x, keep, scale, in_place)
    if in_place:
        compiled["masked_in_place"](x.data_ptr(), keep.data_ptr(), scale, x.numel())
        return x
    out = torch.empty_like(x)
    compiled["masked"](x.data_ptr(), keep.data_ptr(), out.data_ptr(), scale, x.numel())
    return out
