"""Two CPU kernel paths that cost the demo's training step, each measured against its fix in one run.

1. The LM head's input. In training the model keeps logits only where a label follows. Asked as a count
   (`logits_to_keep=k`), the LLM slices its hidden states (`hidden[:, -k:, :]`, a strided view) and its LM head
   multiplies that view; torch's CPU linear layer then copies the weight per sample. Asked as an index tensor (what
   `speechlm.modeling.kept_positions` passes since session 30), the rows are gathered first.
2. Attention. torch's CPU flash attention (transformers' `sdpa`) is slow in bfloat16, backward above all; the
   `eager` implementation (plain matmuls and softmax) is what the demo trains a bfloat16 LLM with since session 30.

Every side runs the demo's training step (SmolLM2-135M frozen + LoRA + projector, batch 8, `cpu_dtype.py`'s shapes)
in bfloat16 and float32, all interleaved:

    python benchmarks/cpu_training_step.py            # appends its rows to benchmarks/results/cpu_training_step.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_dtype import FRAMES, append_rows, demo_models, step_seconds  # noqa: E402

import speechlm.modeling  # noqa: E402

GATHERED = speechlm.modeling.kept_positions


def strided(logits_to_keep, sequence):
    """The count as it was passed before: the LLM slices a strided view."""
    return logits_to_keep


SIDES = {  # name: (kept positions, attention)
    "strided head, sdpa (before)": (strided, "sdpa"),
    "gathered head, sdpa": (GATHERED, "sdpa"),
    "gathered head, eager": (GATHERED, "eager"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="this CPU", help="row label, e.g. the CPU kind")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "cpu_training_step.md")
    args = parser.parse_args()

    models = demo_models()
    times = {(dtype, side): [] for dtype in models for side in SIDES}
    for _ in range(2):  # interleaved, so that a burst of load hits every side alike
        for dtype, (processor, model) in models.items():
            for side, (positions, attention) in SIDES.items():
                speechlm.modeling.kept_positions = positions
                model.language_model.set_attn_implementation(attention)
                times[dtype, side] += step_seconds(model, processor, args.steps)
    speechlm.modeling.kept_positions = GATHERED
    rows = []
    for dtype in models:
        before, *after = (statistics.median(times[dtype, side]) for side in SIDES)
        cells = " | ".join(f"{seconds:.2f} ({before / seconds:.2f}x)" for seconds in after)
        rows.append(f"| {args.label} | {torch.get_num_threads()} | {str(dtype).removeprefix('torch.')} | "
                    f"{before:.2f} | {cells} |")
    print("\n".join(rows))
    header = ("# Kernel paths in a demo training step on CPU (benchmarks/cpu_training_step.py)\n\n"
              f"Median seconds per training step, batch 8, {FRAMES} encoder frames + a 13-word transcript, "
              "SmolLM2-135M frozen + LoRA r=8 (q/v) + projector, in training mode (logits only where a label "
              "follows); all sides interleaved in one run.\n\n"
              "| CPU | threads | frozen LLM dtype | " + " | ".join(f"{side} s/step" for side in SIDES) + " |\n"
              "|---|---|---|---|---|---|\n")
    append_rows(args.output, header, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
