"""How many beams should the demo's transcript-first answers choose among? Each beam width decodes the understanding
tasks once, as the demo decodes them (held to the schema and catalogue, values quoted from the transcript field,
that field joint with the CTC head at the weight the model carries), and scores both choices from that one
decoding: the best beam, and the best beam whose values are all quoted (`first_quoted`, the demo's answer).

    python benchmarks/quoted_beams.py --model RUN/model --corpus CORPUS_DIR [--num-beams 4 8]
        [--tasks slu_transcript qa_transcript]
    # writes benchmarks/results/quoted_beams.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from speechlm.demo.evaluate import evaluate_understanding
    from speechlm.demo.report import task_summary
    from speechlm.inference import load_pretrained

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a demo run's model folder")
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus folder (test_synthetic.jsonl)")
    parser.add_argument("--num-beams", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tasks", nargs="+", default=["slu_transcript", "qa_transcript"],
                        choices=["slu_transcript", "qa_transcript"])
    parser.add_argument("--limit", type=int, default=None, help="at most N held-out clips")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "quoted_beams.md")
    args = parser.parse_args()

    processor, model = load_pretrained(str(args.model), dtype=torch.float32)
    manifests = {"test_synthetic": args.corpus / "test_synthetic.jsonl"}
    lines = []
    for beams in args.num_beams:
        results = evaluate_understanding(model, processor, manifests, ("transcribe", *args.tasks), seed=0,
                                         limit=args.limit, num_beams=beams, free=False)
        for task, metrics in results.items():
            lines.append(f"| {task} | {beams} | {task_summary(metrics['best_beam'])} | {task_summary(metrics)} | "
                         f"{metrics['seconds']:.0f} |")
            print(lines[-1], flush=True)
    table = [
        "# The best beam against the best beam with every value quoted, by beam width", "",
        f"`python benchmarks/quoted_beams.py --model {args.model} --corpus {args.corpus} --num-beams "
        f"{' '.join(map(str, args.num_beams))}`: the held-out synthetic clips (held-out voices and sentences), decoded "
        "as the demo decodes, both choices from one decoding per width (float32).", "",
        "| task | beams | the best beam | the best beam with every value quoted (the demo's answer) | decode s |",
        "|---|---|---|---|---|",
        *lines,
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(table) + "\n")
    print(f"table written to {args.output}")


if __name__ == "__main__":
    main()
