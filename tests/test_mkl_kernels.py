"""MKL's AVX-512 kernels on AMD processors (`engine/mkl_kernels.py`): the processor and the
library are read right, the switch happens only where every check holds, and where it does,
MKL sees the processor as one its AVX-512 kernels serve and the products stay right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_module.engine import mkl_kernels
from finetune_module.engine.models import ModelRecipe, build_model
from tests.conftest import REPO

_TWO_PROCESSORS = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
flags\t\t: fpu sse2 avx2 avx512f avx512cd avx512bw avx512dq avx512vl

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu
"""


def test_cpu_info_reads_the_first_processor(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(_TWO_PROCESSORS, encoding="utf-8")
    vendor, flags = mkl_kernels.cpu_info(cpuinfo)
    assert vendor == "AuthenticAMD"
    assert set(mkl_kernels.AVX512_FLAGS) <= flags and "avx2" in flags and "fpu" in flags
    assert mkl_kernels.cpu_info(tmp_path / "absent") == ("", frozenset())


@pytest.mark.parametrize(
    ("vendor", "flags", "reason"),
    [
        ("GenuineIntel", mkl_kernels.AVX512_FLAGS, "GenuineIntel's, not AMD's"),
        ("AuthenticAMD", ("avx2", "fma"), "lacks avx512f, avx512cd, avx512bw, avx512dq"),
        ("AuthenticAMD", ("avx512f", "avx512cd", "avx512dq", "avx512vl"), "lacks avx512bw"),
        ("", (), "unknown's"),
    ],
)
def test_other_processors_keep_mkl_s_own_choice(
    vendor: str, flags: tuple[str, ...], reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Intel's processors need nothing (MKL serves them its best kernels already), and AMD's
    without AVX-512 keep MKL's AVX2 kernels for AMD."""
    monkeypatch.setattr(mkl_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(mkl_kernels.sys, "platform", "linux")
    monkeypatch.setattr(mkl_kernels, "cpu_info", lambda: (vendor, frozenset(flags)))
    refusal = mkl_kernels.refusal()
    assert refusal is not None and reason in refusal


def test_an_amd_processor_with_avx512_and_torch_s_mkl_qualifies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if mkl_kernels.loaded_library(mkl_kernels.LIBRARY) is None:
        pytest.skip(f"this torch has no {mkl_kernels.LIBRARY}")
    monkeypatch.setattr(mkl_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(mkl_kernels.sys, "platform", "linux")
    flags = frozenset(mkl_kernels.AVX512_FLAGS)
    monkeypatch.setattr(mkl_kernels, "cpu_info", lambda: ("AuthenticAMD", flags))
    assert mkl_kernels.refusal() is None
    monkeypatch.setattr(mkl_kernels.torch.backends.mkl, "is_available", lambda: False)
    assert mkl_kernels.refusal() == "torch is not built with MKL"


def test_the_loaded_library_and_its_slots_are_found(tmp_path: Path) -> None:
    """`libtorch_cpu.so` is among the process's mappings, and its relocations name the slot
    of its calls to MKL's check, and its own definition; a symbol it never calls has none."""
    found = mkl_kernels.loaded_library(mkl_kernels.LIBRARY)
    if found is None or not torch.backends.mkl.is_available():
        pytest.skip(f"this torch has no {mkl_kernels.LIBRARY} with MKL")
    path, regions = found
    assert path.is_file() and path.name == mkl_kernels.LIBRARY
    assert any("x" in permissions for _, _, permissions in regions)
    assert any("w" in permissions for _, _, permissions in regions)
    slots, defined = mkl_kernels.relocation_offsets(path, mkl_kernels.INTEL_CHECK)
    assert slots and defined
    assert mkl_kernels.relocation_offsets(path, "no_such_function_anywhere") == ([], None)
    not_elf = tmp_path / "library.so"
    not_elf.write_bytes(b"#!/bin/sh\n" * 10)
    assert mkl_kernels.relocation_offsets(not_elf, mkl_kernels.INTEL_CHECK) == ([], None)
    maps = tmp_path / "maps"
    maps.write_text("7f0000000000-7f0000001000 r-xp 00000000 08:01 1 /lib/libc.so.6\n")
    assert mkl_kernels.loaded_library(mkl_kernels.LIBRARY, maps) is None


# A fresh process (MKL settles its kernels at each function's first call): MKL's processor
# type before and after the switch, whether it switched, the switch asked again, and a
# product's largest difference from the same product in float64. With "taken", the slot
# already points at another library's function first, as an LD_PRELOAD would have it; with
# "no-exec", the system refuses the executable page.
_SWITCH = """
import ctypes, json, sys
import torch
from finetune_module.engine import mkl_kernels
path, _ = mkl_kernels.loaded_library(mkl_kernels.LIBRARY)
library = ctypes.CDLL(str(path))
if sys.argv[1] == "taken":
    offsets, defined = mkl_kernels.relocation_offsets(path, mkl_kernels.INTEL_CHECK)
    base = ctypes.cast(getattr(library, mkl_kernels.INTEL_CHECK), ctypes.c_void_p).value - defined
    elsewhere = ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value
    for offset in offsets:
        ctypes.c_uint64.from_address(base + offset).value = elsewhere
if sys.argv[1] == "no-exec":
    mkl_kernels._answering_function = lambda: None
before = library.mkl_serv_get_cpu_type()
switched = mkl_kernels.use_avx512_kernels()
after = library.mkl_serv_get_cpu_type()
torch.manual_seed(0)
a, b = torch.randn(300, 512), torch.randn(512, 700)
error = ((a @ b).double() - a.double() @ b.double()).abs().max().item()
print(json.dumps({"before": before, "after": after, "switched": switched,
                  "again": mkl_kernels.use_avx512_kernels(), "error": error}))
"""


def _switch(mode: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _SWITCH, mode],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(
    mkl_kernels.refusal() is not None, reason=f"MKL's kernels stay: {mkl_kernels.refusal()}"
)
def test_on_an_amd_processor_with_avx512_mkl_sees_one_its_avx512_kernels_serve() -> None:
    """MKL's processor type (`mkl_serv_get_cpu_type`, which asks the check) changes from its
    answer for AMD's processors, once; products stay float32's (the sums of 512 products of
    normal values, each rounded at ~1e-6 of their size)."""
    result = _switch("free")
    assert result["switched"] is True and result["again"] is True
    assert result["after"] != result["before"]
    assert result["error"] < 1e-3


@pytest.mark.skipif(
    mkl_kernels.refusal() is not None, reason=f"MKL's kernels stay: {mkl_kernels.refusal()}"
)
@pytest.mark.parametrize("mode", ["taken", "no-exec"])
def test_a_check_answered_by_another_library_or_a_system_without_pages_to_run_keeps_it(
    mode: str,
) -> None:
    result = _switch(mode)
    assert result["switched"] is False and result["after"] == result["before"]
    assert result["error"] < 1e-3


def test_the_model_s_building_switches_only_with_its_piece(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(mkl_kernels, "use_avx512_kernels", lambda: calls.append("mkl") or True)
    device = torch.device("cpu")
    build_model(ModelRecipe(str(tiny_model_dir), speedups=("allocator",)), device)
    assert calls == []
    build_model(ModelRecipe(str(tiny_model_dir), speedups=("allocator", "mkl_avx512")), device)
    assert calls == ["mkl"]
