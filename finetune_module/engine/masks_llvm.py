"""Dropout's masks and their application as machine code, compiled at run time by LLVM
(llvmlite, a wheel with LLVM inside: no compiler on the machine) from the four loops below.

Each kernel is one pass over its values. A dropout's: value i's 16 random bits computed where
they are needed (splitmix64's word i // 4, lane i % 4, as `masks` defines them), compared with
the threshold, the mask's byte written and the value multiplied by the scale or by 0. The
others make a mask alone, or apply one to the values given (into another array or in place).
LLVM vectorises the loops for the processor it runs on (AVX-512 or AVX2 on x86, NEON on
ARM). A kernel runs through ctypes, which lets go of Python's lock for the call, so that the
workers' dropouts run at once (`workers`). Compiling the four takes ~0.1 s, once per process,
at the first dropout.

numba was measured first: the same loops ran as fast, but starting its compiler took ~360 MB of
the process's memory, and the benchmark's training peaked at 2.59 GiB instead of 2.35; LLVM
alone takes ~70 MB.
"""

import ctypes
import functools
from collections.abc import Callable

import llvmlite.binding as llvm

from finetune_module.engine.masks import SPLITMIX

# splitmix64's increment and multipliers (`masks.SPLITMIX`), as LLVM's signed 64-bit constants
_GOLDEN, _MIX_1, _MIX_2 = (c - (1 << 64) if c >= 1 << 63 else c for c in SPLITMIX)

# the value's 16 random bits (%bits, an i64) and whether it is kept (%kept), from the loop's
# index %i, the seed %seed and the threshold %threshold (an i32)
_KEPT = f"""
  %word = lshr i64 %i, 2
  %count = add i64 %word, 1
  %step = mul i64 %count, {_GOLDEN}
  %z0 = add i64 %step, %seed
  %r1 = lshr i64 %z0, 30
  %x1 = xor i64 %z0, %r1
  %z1 = mul i64 %x1, {_MIX_1}
  %r2 = lshr i64 %z1, 27
  %x2 = xor i64 %z1, %r2
  %z2 = mul i64 %x2, {_MIX_2}
  %r3 = lshr i64 %z2, 31
  %z3 = xor i64 %z2, %r3
  %lane = and i64 %i, 3
  %shift = shl i64 %lane, 4
  %shifted = lshr i64 %z3, %shift
  %bits = and i64 %shifted, 65535
  %least = zext i32 %threshold to i64
  %kept = icmp uge i64 %bits, %least
  %kept_byte = zext i1 %kept to i8
"""


def _loop(name: str, arguments: str, body: str) -> str:
    """A function `name` (returning nothing) of `arguments` and the count %n that runs `body`
    for %i from 0 to %n - 1."""
    return f"""
define void @{name}({arguments}, i64 %n) {{
entry:
  %none = icmp eq i64 %n, 0
  br i1 %none, label %done, label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %loop]
{body}
  %next = add nuw i64 %i, 1
  %more = icmp ult i64 %next, %n
  br i1 %more, label %loop, label %done
done:
  ret void
}}
"""


# value i's mask byte written
_WRITE_KEPT = """
  %keep_at = getelementptr inbounds i8, ptr %keep, i64 %i
  store i8 %kept_byte, ptr %keep_at
"""
# whether value i is kept (%kept), read from its mask byte
_READ_KEPT = """
  %keep_at = getelementptr inbounds i8, ptr %keep, i64 %i
  %byte = load i8, ptr %keep_at
  %kept = icmp ne i8 %byte, 0
"""


def _scaled_into(into: str) -> str:
    """Value i of %x times %scale where %kept, times 0 elsewhere (so that NaN stays NaN),
    stored as value i of `into` (%x itself, or another array)."""
    address = (
        "" if into == "x" else f"\n  %{into}_at = getelementptr inbounds float, ptr %{into}, i64 %i"
    )
    return f"""
  %x_at = getelementptr inbounds float, ptr %x, i64 %i
  %value = load float, ptr %x_at
  %factor = select i1 %kept, float %scale, float 0.0
  %product = fmul float %value, %factor{address}
  store float %product, ptr %{into}_at
"""


_OUT = "ptr noalias nocapture writeonly"
_IN = "ptr noalias nocapture readonly"
_SOURCE = (
    _loop(
        "keep_mask",
        f"{_OUT} %keep, i64 %seed, i32 %threshold",
        _KEPT + _WRITE_KEPT,
    )
    + _loop(
        "dropout",
        f"{_IN} %x, {_OUT} %out, {_OUT} %keep, i64 %seed, i32 %threshold, float %scale",
        _KEPT + _WRITE_KEPT + _scaled_into("out"),
    )
    + _loop(
        "masked",
        f"{_IN} %x, {_IN} %keep, {_OUT} %out, float %scale",
        _READ_KEPT + _scaled_into("out"),
    )
    + _loop(
        "masked_in_place",
        f"ptr noalias nocapture %x, {_IN} %keep, float %scale",
        _READ_KEPT + _scaled_into("x"),
    )
)

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float
_SIGNATURES = {
    "keep_mask": (_P, _I64, _I32, _I64),
    "dropout": (_P, _P, _P, _I64, _I32, _F32, _I64),
    "masked": (_P, _P, _P, _F32, _I64),
    "masked_in_place": (_P, _P, _F32, _I64),
}


# the engines that hold the kernels' machine code (one, once `compiled` has run)
_ENGINES: list[llvm.ExecutionEngine] = []


@functools.cache
def compiled() -> dict[str, Callable[..., None]]:
    """The kernels, compiled for this processor (once per process): `keep_mask(keep, seed,
    threshold, n)`, `dropout(x, out, keep, seed, threshold, scale, n)`, `masked(x, keep, out,
    scale, n)` and `masked_in_place(x, keep, scale, n)`, each taking its arrays as addresses
    (float32 values, one byte a mask value), as ctypes functions."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    target = llvm.Target.from_default_triple()
    machine = target.create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3
    )
    module = llvm.parse_assembly(_SOURCE)
    module.triple, module.data_layout = machine.triple, str(machine.target_data)
    module.verify()
    tuning = llvm.create_pipeline_tuning_options(speed_level=3)
    builder = llvm.create_pass_builder(machine, tuning)
    builder.getModulePassManager().run(module, builder)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    _ENGINES.append(engine)
    return {
        name: ctypes.CFUNCTYPE(None, *types)(engine.get_function_address(name))
        for name, types in _SIGNATURES.items()
    }
