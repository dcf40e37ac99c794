"""Which dtype should the demo's frozen LLM train in on this CPU? One demo-shaped training step, both ways, one run.

The demo's real parts (Whisper tiny.en frames -> projector -> SmolLM2-135M with LoRA r=8 on q/v, batch 8) train on
cached encoder frames; this times `STEPS` optimiser steps on random frames of a typical length with the frozen LLM
in bfloat16 and in float32, interleaved, and prints what `speechlm.hardware` would choose. To see a CPU without
native bf16 on one that has it, restrict the kernels:

    python benchmarks/cpu_dtype.py                                                   # this CPU as it is
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_dtype.py --label avx2-only

Each run appends its row to benchmarks/results/cpu_dtype.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechlm.demo.run import DemoSettings, load_parts  # noqa: E402
from speechlm.hardware import choose_cpu_dtype, cpu_flags  # noqa: E402

STEPS = 4
FRAMES = 200  # 4 s of Whisper frames (50/s) -> 50 audio tokens after 4x stacking
TEXT = "set an alarm for seven thirty tomorrow morning and call my sister"


def step_seconds(model, processor, steps: int) -> list[float]:
    """Seconds per optimiser step (projector + LoRA trainable) on a fixed random batch of 8."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    width = model.config.audio_config.d_model
    frames = torch.randn(8, FRAMES, width, generator=torch.Generator().manual_seed(0))
    batch = processor.encode_text([processor.build_prompt()] * 8, [TEXT] * 8)
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(encoder_frames=frames, encoder_frame_lengths=torch.full((8,), FRAMES), **batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    return seconds[1:]  # the first step warms up


def demo_models() -> dict[torch.dtype, tuple]:
    """The demo's parts, frozen LLM in bfloat16 and in float32, in training mode: dtype -> (processor, model)."""
    torch.manual_seed(0)
    models = {dtype: load_parts(DemoSettings(), dtype) for dtype in (torch.bfloat16, torch.float32)}
    for _, model in models.values():
        model.train()
    return models


def append_rows(output: Path, header: str, rows: list[str]) -> None:
    """Appends `rows` to the results table at `output`, starting it with `header` if it does not exist yet."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if not output.is_file():
        output.write_text(header)
    with output.open("a") as table:
        table.write("\n".join(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="this CPU", help="row label, e.g. the CPU kind or the ISA restriction")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "cpu_dtype.md")
    args = parser.parse_args()

    models = demo_models()
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in models}
    for _ in range(2):  # interleaved, so that a burst of load hits both alike
        for dtype, (processor, model) in models.items():
            times[dtype] += step_seconds(model, processor, args.steps)
    bf16, fp32 = (statistics.median(times[d]) for d in (torch.bfloat16, torch.float32))
    choice = choose_cpu_dtype()
    native = ", ".join(sorted({"avx512_bf16", "amx_bf16"} & cpu_flags())) or "none"
    row = (f"| {args.label} | {torch.backends.cpu.get_cpu_capability()} | {native} | {bf16:.2f} | {fp32:.2f} | "
           f"{bf16 / fp32:.2f} | {choice.name} |")
    print(row)
    header = ("# Frozen-LLM dtype for demo training on CPU (benchmarks/cpu_dtype.py)\n\n"
              f"Median seconds per training step, batch 8, {FRAMES} encoder frames + a 13-word transcript, "
              "SmolLM2-135M frozen + LoRA r=8 (q/v) + projector; both dtypes interleaved in one run.\n\n"
              "| CPU / kernels | torch kernels | native bf16 flags | bf16 s/step | fp32 s/step | bf16 / fp32 | "
              "speechlm.hardware chooses |\n|---|---|---|---|---|---|---|\n")
    append_rows(args.output, header, [row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
