"""The training dtype follows what the hardware computes fast (speechlm/hardware.py)."""

from __future__ import annotations

import torch

import speechlm.hardware
from speechlm.hardware import choose_cpu_dtype, choose_decoding_dtype, cpu_flags, probe_seconds


def fail_probe(dtype):
    raise AssertionError("a CPU without native bf16 must not need a probe")


def test_cpu_without_native_bf16_trains_in_float32():
    choice = choose_cpu_dtype(flags={"avx2", "fma", "avx512f"}, probe=fail_probe)
    assert choice.dtype == torch.float32 and "no native bfloat16" in choice.reason


def test_native_bf16_that_the_probe_confirms_trains_in_bfloat16():
    choice = choose_cpu_dtype(flags={"avx2", "amx_bf16"}, probe={torch.bfloat16: 1.0, torch.float32: 3.0}.get)
    assert choice.dtype == torch.bfloat16 and "3.0x faster" in choice.reason


def test_native_bf16_flag_without_a_real_speedup_stays_float32():
    choice = choose_cpu_dtype(flags={"avx512_bf16"}, probe={torch.bfloat16: 1.0, torch.float32: 1.1}.get)
    assert choice.dtype == torch.float32 and "avx512_bf16" in choice.reason


def test_cpu_flags_reads_the_kernels_flag_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\nbugs\t\t: spectre\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_probe_times_a_finite_positive_interval():
    assert 0 < probe_seconds(torch.float32, size=(8, 16, 32), repeats=1) < float("inf")


def test_cpu_decoding_is_float32_even_with_native_bf16(monkeypatch):
    monkeypatch.setattr(speechlm.hardware, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    assert choose_decoding_dtype("cpu").dtype == torch.float32
