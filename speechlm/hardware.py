"""Which floating-point type this machine computes fast: the choice that decides how many steps a CPU budget buys.

bfloat16 halves memory traffic, but a CPU without native bf16 instructions (AVX-512-BF16 or AMX; most laptops and
many AVX2 servers) emulates it: a 512x576x1536 matmul forward + backward took 16x longer in bf16 than in float32 on
an AVX2-only EPYC. So bf16 is chosen only where the CPU has the instructions *and* a short probe confirms it is
faster; CUDA devices with bf16 support use it as usual.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 must beat float32 by this factor in the probe: a tie is not worth bf16's rounding.
MIN_SPEEDUP = 1.2


@dataclass(frozen=True)
class DtypeChoice:
    """The chosen dtype and a sentence saying why, for logs and reports."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags the kernel reports (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def probe_seconds(dtype: torch.dtype, size: tuple[int, int, int] = (512, 576, 1536), repeats: int = 5) -> float:
    """Best-of-`repeats` seconds of one training-shaped matmul forward + backward in `dtype` (~0.1 s in all).

    The best, not the mean: a busy machine only ever adds time, so the minimum is the least disturbed reading."""
    rows, width, hidden = size
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(width, hidden, generator=generator).to(dtype)
    inputs = torch.randn(rows, width, generator=generator).to(dtype).requires_grad_()
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        (inputs @ weight).float().square().mean().backward()
        seconds.append(time.perf_counter() - start)
        inputs.grad = None
    return min(seconds[1:])  # the first round warms the kernels up


def probe_both(probe: Callable[[torch.dtype], float] = probe_seconds, rounds: int = 3) -> tuple[float, float]:
    """(bfloat16, float32) best seconds, measured in alternation so that a burst of load hits both alike."""
    bf16, fp32 = float("inf"), float("inf")
    for _ in range(rounds):
        bf16, fp32 = min(bf16, probe(torch.bfloat16)), min(fp32, probe(torch.float32))
    return bf16, fp32


def choose_cpu_dtype(
    flags: set[str] | None = None, probe: Callable[[torch.dtype], float] = probe_seconds
) -> DtypeChoice:
    """bfloat16 where the CPU has native bf16 and the probe shows it faster, float32 otherwise."""
    flags = cpu_flags() if flags is None else flags
    native = sorted(set(BF16_CPU_FLAGS) & flags)
    if not native:
        return DtypeChoice(torch.float32, "float32: this CPU has no native bfloat16 (no AVX-512-BF16 / AMX), where "
                                          "bf16 is emulated and many times slower")
    bf16, fp32 = probe_both(probe)
    if bf16 * MIN_SPEEDUP <= fp32:
        return DtypeChoice(torch.bfloat16, f"bfloat16: native on this CPU ({', '.join(native)}); a probe matmul ran "
                                           f"{fp32 / bf16:.1f}x faster than in float32")
    return DtypeChoice(torch.float32, f"float32: the CPU reports {', '.join(native)} but a probe matmul ran only "
                                      f"{fp32 / bf16:.2f}x as fast in bfloat16")


def choose_training_dtype(device: str | torch.device = "cpu") -> DtypeChoice:
    """The dtype for frozen weights during training on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "bfloat16: supported by this CUDA device")
        return DtypeChoice(torch.float32, "float32: this CUDA device has no bfloat16 support")
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"float32: no dtype probe for {device.type} devices")
    return choose_cpu_dtype()


def choose_decoding_dtype(device: str | torch.device = "cpu") -> DtypeChoice:
    """The dtype for decoding (`--dtype auto`): float32 on a CPU, whatever its bf16 support.

    Decoding one clip is a chain of matrix-vector products plus per-token Python work: on an AMX Xeon, bf16 decoded
    0.95x (1 thread) and 0.78x (2 threads) of float32's audio per CPU-second at batch 1 and won only batched at one
    thread (1.26x); CPUs without native bf16 emulate it (benchmarks/results/transcription.md). bf16 rounding also
    changed 2 of 16 demo clips between batch 8 and batch 1 (float32: none). The faster CPU option is int8
    (`quantize="int8"`, x1.9, at a cost in accuracy). GPUs decode in bf16 where supported."""
    device = torch.device(device)
    if device.type == "cpu":
        return DtypeChoice(torch.float32, "float32: bf16 CPU decoding measured no faster at batch 1, even with "
                                          "native bf16, and its rounding lets batch-mates change a clip's output")
    return choose_training_dtype(device)
