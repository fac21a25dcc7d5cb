"""Linear products on weights packed once for oneDNN's matrix kernels.

torch multiplies float32 matrices on the CPU with MKL, which runs a product of a few rows by a
large weight matrix (a decode step's: one row a sequence) far below the memory bandwidth, and
larger products at 130-200 GFLOP/s by shape. oneDNN, on a weight packed once into the blocks
its kernels read, runs both close to the machine's peak. Measured on this project's machine
(2 cores, AVX2), T5's output layer (32128 x 512): 20 rows 13.2 ms with MKL, 4.0 ms packed; 256
rows 56 -> 38 ms. The products are the same, summed in another order (float rounding in the
last bits).

A packed weight is a copy (as large as the weight), so it serves only where the weight does
not change while it is used: generation (`decoding.packed_weights`) and the frozen output
layer of the logit-free training loss (`speedups.linear_cross_entropy`, `FrozenPacks`).
"""

import threading
import weakref
from collections.abc import Callable

import torch

#: The row count oneDNN is told to pack for; a packed weight serves every row count (on this
#: project's machine a count of 32 and up packs alike, 1 packs for slower products).
PACK_FOR_ROWS = 32


def available() -> bool:
    """Whether this torch has oneDNN's linear product on packed weights."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


def packs(weight: torch.Tensor) -> bool:
    """Whether `weight` (out x in) can be packed here: float32, on the CPU, where packing is
    `available`."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and available()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out x in, as `torch.nn.Linear` holds it) packed for `product`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_FOR_ROWS)


#: Products of more rows than this run on a multiple of it (padded with rows of zeros): oneDNN
#: keeps a compiled kernel, and memory with it, for every shape it has run (measured: ~3.7 MB
#: for each row count of the output layer's products), so row counts that vary from batch to
#: batch would grow the process by hundreds of MB over an epoch.
ROW_STEP = 32


def product(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`torch.nn.functional.linear(x, weight, bias)` for float32 `x` (rows x in), on the
    weight as `pack` packed it; no gradient flows through it. Above `ROW_STEP` rows the
    product runs on the next multiple of it (the rows past `x`'s are dropped)."""
    rows = x.shape[0]
    pad = -rows % ROW_STEP if rows > ROW_STEP else 0
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return out[:rows] if pad else out


class FrozenPacks:
    """Copies of weights that stay frozen across calls (the output layer under LoRA), made by
    `make` (by default `pack`) the first time they are asked for and again only if the weight
    changes (another storage or an in-place change). A copy lives as long as its weight.
    Threads that train at once share the copies (the first to ask makes them)."""

    def __init__(self, make: Callable[[torch.Tensor], torch.Tensor] = pack) -> None:
        self._make = make
        # id(weight) -> (a reference to the weight, its stamp, the copy)
        self._packs: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (out x in) as `make` makes it: packed, by default, for `product(x, ...)` =
        `x @ weight.T`."""
        with self._lock:
            self._packs = {k: v for k, v in self._packs.items() if v[0]() is not None}
            stamp = (weight.data_ptr(), weight._version, tuple(weight.shape))
            found = self._packs.get(id(weight))
            if found is None or found[0]() is not weight or found[1] != stamp:
                copy = self._make(weight.detach())
                found = self._packs[id(weight)] = (weakref.ref(weight), stamp, copy)
            return found[2]
