"""MKL's AVX-512 kernels for torch's float32 products on AMD processors with AVX-512.

torch's CPU wheels link Intel's MKL into `libtorch_cpu.so`, and every float32 product of
training (`addmm`, `mm`, `bmm` and their backward) goes to MKL's `sgemm`. MKL picks its kernels
after asking its own function `mkl_serv_intel_cpu_true` whether the processor is Intel's: on
an AMD processor it answers no, and MKL runs its AVX2 kernels for AMD even where the processor
has AVX-512 (AMD's Zen 4 and later). Its AVX-512 kernels run there too, and faster: on this
project's Zen 4 machine (one thread, the training's shapes: 1623 x 512 x 1024, 256 x 512 x
32128, ...) 104-108 GFLOP/s against 88-97.

`use_avx512_kernels` has `libtorch_cpu.so`'s calls to that function answered yes: the library
calls it through its procedure linkage table, whose slot the dynamic loader fills with the
function's address and leaves writable; the slot is given the address of a six-byte function
that returns 1 (`mov eax, 1; ret`). It is what starting the process with `LD_PRELOAD` of a
library that defines the function does, for a process already running. MKL then chooses
among its kernels by the processor's own feature bits, as it does on Intel's processors. The
products are the same, summed in another order (float rounding in the last bits).

MKL settles each of its functions' kernels at the function's first call, so this changes
only the functions the process has not called yet: `models.build_model` calls it before the
model is loaded (the CPU speed layer's `mkl_avx512` piece), and a program that multiplies
float32 matrices before keeps MKL's AVX2 kernels for those. Only where every check holds is
the slot written: Linux on x86-64, an AMD processor with AVX-512 (F, CD, BW, DQ, VL), torch
built with MKL, the slot found in the library's relocations, writable, and still pointing into
the library (a process started with such an `LD_PRELOAD` keeps it).
"""

import ctypes
import functools
import logging
import mmap
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from finetune_module.engine import speedups

logger = logging.getLogger(__name__)

#: The library of torch's CPU kernels, which holds MKL.
LIBRARY = "libtorch_cpu.so"
#: MKL's function that says whether the processor is Intel's.
INTEL_CHECK = "mkl_serv_intel_cpu_true"
#: The AVX-512 extensions MKL's AVX-512 kernels need (Intel's Skylake-SP set), as
#: /proc/cpuinfo names them.
AVX512_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
#: `mov eax, 1; ret`: a function of no arguments that returns 1.
_ANSWER_YES = b"\xb8\x01\x00\x00\x00\xc3"

# ELF64 little-endian layouts (the dynamic symbol table and relocations with addends)
_SECTION = np.dtype(
    [("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"), ("offset", "<u8"),
     ("size", "<u8"), ("link", "<u4"), ("info", "<u4"), ("addralign", "<u8"),
     ("entsize", "<u8")]
)  # fmt: skip
_SYMBOL = np.dtype(
    [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"),
     ("size", "<u8")]
)  # fmt: skip
_RELOCATION = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])
_SHT_RELA = 4
_R_X86_64_GLOB_DAT = 6
_R_X86_64_JUMP_SLOT = 7
_PROT_READ, _PROT_EXEC = 0x1, 0x4

#: The page holding the answering function, kept for the life of the process once used.
_ANSWER_PAGE: list[mmap.mmap] = []


def cpu_fields(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields as Linux lists them ("vendor_id", "model name", "flags",
    ...); empty where the file is absent or unreadable."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if not key.strip():
            if fields:
                break  # the first processor's block ends
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """The first processor's vendor (e.g. "AuthenticAMD") and feature flags; empty where
    Linux does not list them."""
    fields = cpu_fields(path)
    return fields.get("vendor_id", ""), frozenset(fields.get("flags", "").split())


def loaded_library(
    name: str, maps: Path = Path("/proc/self/maps")
) -> tuple[Path, list[tuple[int, int, str]]] | None:
    """The path of the shared library `name` this process has loaded and its mappings
    (start, end, permissions), or None where it has not."""
    path: str | None = None
    regions: list[tuple[int, int, str]] = []
    for line in maps.read_text(encoding="utf-8").splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or Path(parts[5]).name != name:
            continue
        if path is not None and parts[5] != path:
            continue  # another copy of a library of the same name
        path = parts[5]
        start, end = (int(address, 16) for address in parts[0].split("-"))
        regions.append((start, end, parts[1]))
    return (Path(path), regions) if path is not None else None


def relocation_offsets(library: Path, symbol: str) -> tuple[list[int], int | None]:
    """The offsets, from the library's load address, of the slots the dynamic loader fills with
    the address of `symbol` for the library's own calls (JUMP_SLOT and GLOB_DAT relocations),
    and the offset of the library's own definition of it (None where it has none). Reads the
    file's section and symbol tables only."""
    with library.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as elf:
        if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
            return [], None  # not a 64-bit little-endian ELF file
        section_offset = int.from_bytes(elf[0x28:0x30], "little")
        count = int.from_bytes(elf[0x3C:0x3E], "little")
        sections = np.frombuffer(elf, _SECTION, count, section_offset).copy()
        slots: list[int] = []
        defined: int | None = None
        for rela in sections[sections["type"] == _SHT_RELA]:
            table = sections[rela["link"]]
            strings = sections[table["link"]]
            names = elf[strings["offset"] : strings["offset"] + strings["size"]]
            at = names.find(b"\0" + symbol.encode() + b"\0")
            if at < 0:
                continue
            symbols = np.frombuffer(elf, _SYMBOL, int(table["size"]) // 24, int(table["offset"]))
            indices = np.flatnonzero(symbols["name"] == at + 1)
            values = symbols["value"][indices]
            if defined is None and values.any():
                defined = int(values[values != 0][0])
            entries = np.frombuffer(elf, _RELOCATION, int(rela["size"]) // 24, int(rela["offset"]))
            kinds = entries["info"] & 0xFFFFFFFF
            wanted = np.isin(entries["info"] >> 32, indices) & np.isin(
                kinds, (_R_X86_64_JUMP_SLOT, _R_X86_64_GLOB_DAT)
            )
            slots += [int(offset) for offset in entries["offset"][wanted]]
            del symbols, entries  # views of the mapped file, released before it closes
        return slots, defined


def refusal() -> str | None:
    """Why MKL's AVX-512 kernels cannot be switched on in this process, or None where they
    can (see the module's docstring for the checks)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"not Linux on x86-64 ({sys.platform}, {platform.machine()})"
    vendor, flags = cpu_info()
    if vendor != "AuthenticAMD":
        return f"the processor is {vendor or 'unknown'}'s, not AMD's (MKL's own choice holds)"
    missing = [flag for flag in AVX512_FLAGS if flag not in flags]
    if missing:
        return f"the processor lacks {', '.join(missing)}"
    if not torch.backends.mkl.is_available():
        return "torch is not built with MKL"
    return None


def _answering_function() -> int | None:
    """The address of a function that returns 1, on a page of its own (read and execute);
    None where the system refuses executable pages made at run time (or its C library is not
    glibc, whose `mprotect` makes the page executable)."""
    if not _ANSWER_PAGE:
        page = mmap.mmap(-1, mmap.PAGESIZE)
        page.write(_ANSWER_YES)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        libc = speedups.glibc()
        if libc is None:
            return None
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.mprotect(address, mmap.PAGESIZE, _PROT_READ | _PROT_EXEC) != 0:
            return None
        _ANSWER_PAGE.append(page)
    return ctypes.addressof(ctypes.c_char.from_buffer(_ANSWER_PAGE[0]))


def _check_slots() -> tuple[list[int], str | None]:
    """The addresses of `libtorch_cpu.so`'s slots for MKL's check, and why they cannot be
    written (None where they can): the library's own, writable, still pointing into it."""
    found = loaded_library(LIBRARY)
    if found is None:
        return [], f"{LIBRARY} is not loaded"
    path, regions = found
    offsets, defined = relocation_offsets(path, INTEL_CHECK)
    function = getattr(ctypes.CDLL(str(path)), INTEL_CHECK, None)
    own = ctypes.cast(function, ctypes.c_void_p).value if function is not None else None
    if not offsets or own is None or defined is None:
        return [], f"{LIBRARY} has no call to {INTEL_CHECK}"
    base = own - defined  # the library's load address

    def inside(address: int, writable: bool = False) -> bool:
        return any(s <= address < e and (not writable or "w" in p) for s, e, p in regions)

    slots = [base + offset for offset in offsets]
    if not all(inside(slot, writable=True) for slot in slots):
        return [], f"{LIBRARY}'s slot for {INTEL_CHECK} is read-only"
    if not all(inside(ctypes.c_uint64.from_address(slot).value) for slot in slots):
        return [], f"{INTEL_CHECK} is already another library's (LD_PRELOAD)"
    return slots, None


@functools.cache
def use_avx512_kernels() -> bool:
    """Has MKL take its AVX-512 kernels on this AMD processor for the functions the process
    has not called yet (see the module's docstring); returns whether it did. Once per process."""
    slots: list[int] = []
    answer: int | None = None
    reason = refusal()
    if reason is None:
        slots, reason = _check_slots()
    if reason is None:
        answer = _answering_function()
        if answer is None:
            reason = "the system refuses an executable page made at run time (or is not glibc)"
    if reason is not None or answer is None:
        logger.debug("MKL keeps its own choice of kernels: %s.", reason)
        return False
    for slot in slots:
        ctypes.c_uint64.from_address(slot).value = answer
    logger.debug("MKL takes its AVX-512 kernels on this AMD processor.")
    return True
