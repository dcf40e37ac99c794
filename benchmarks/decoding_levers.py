"""Decoding levers on a trained demo model: does curbing repetition change held-out WER?

A model that has half-heard a clip can loop ("and laugh and laugh and laugh ..."): the demo's UQM hypotheses showed
131 inserted words in 92 clips. Each variant changes one `generate` keyword against the model's saved decoding
settings (greedy, no 10-gram twice, each clip capped at 5 tokens per second + 8); same clips, same run, same
normaliser, Whisper tiny.en alone beside it.

    python benchmarks/decoding_levers.py --model RUN/model --corpus CORPUS_DIR [--variants ...] [--sets ...]
    # writes benchmarks/results/decoding_levers.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from speechlm.demo.evaluate import TEST_SETS

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "saved": {},
    "repetition_penalty=1.1": {"repetition_penalty": 1.1},
    "repetition_penalty=1.3": {"repetition_penalty": 1.3},
    "no_repeat_ngram_size=3": {"no_repeat_ngram_size": 3},
    "no_repeat_ngram_size=4": {"no_repeat_ngram_size": 4},
    "num_beams=4": {"num_beams": 4},
}
SETS = TEST_SETS  # the demo's held-out sets, the fortunes' among them since session 50


def main() -> None:
    from speechlm.demo.evaluate import evaluate_sets
    from speechlm.inference import load_pretrained

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a demo run's model folder")
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus folder (test_*.jsonl)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "decoding_levers.md")
    args = parser.parse_args()

    processor, model = load_pretrained(str(args.model), dtype=torch.float32)
    manifests = {name: args.corpus / f"{name}.jsonl" for name in SETS}
    rows, whisper = [], {}
    for variant in args.variants:
        kwargs = dict(VARIANTS[variant])
        beams = kwargs.pop("num_beams", 1)
        start = time.monotonic()
        results = evaluate_sets(model, processor, manifests, None, beams, sets=tuple(args.sets), **kwargs)
        cells = []
        for name in args.sets:
            metrics = results[name]
            whisper[name] = 100 * metrics["whisper"]["wer"]
            cells.append(f"{100 * metrics['wer']:.1f}% ({metrics['insertions']})")
        rows.append(f"| {variant} | " + " | ".join(cells) + f" | {time.monotonic() - start:.0f} |")
        print(rows[-1], flush=True)
    names = [name.removeprefix("test_") for name in args.sets]
    table = [
        "# Decoding levers on a trained demo model",
        "",
        f"Model `{args.model}`; `python benchmarks/decoding_levers.py --model ... --corpus ...`. WER on every clip of "
        "each held-out set (inserted words in brackets); `saved` = the model's generation_config.json (greedy, "
        "no_repeat_ngram_size 10); every row caps each clip at 5 tokens per second + 8.",
        "",
        "| decoding | " + " | ".join(names) + " | decode s |",
        "|---|" + "---|" * len(names) + "---|",
        *rows,
        "| Whisper tiny.en alone | " + " | ".join(f"{whisper[name]:.1f}%" for name in args.sets) + " | |",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(table))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
