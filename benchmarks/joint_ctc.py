"""Joint CTC/LLM decoding on trained demo models: how much does the CTC head's prefix score change each held-out set?

Each model decodes the demo's held-out sets through the demo's own path (`evaluate_sets`: greedy, new tokens capped
by clip length, the corpus's normaliser) at each `--weights` value (0: the LLM alone, the demo's figure; 1: the CTC
head's prefix search with the LLM only proposing candidates), and the CTC head alone (greedy, no LLM) beside them.

    python benchmarks/joint_ctc.py --models RUN/model [RUN2/model ...] --corpus CORPUS_DIR [--weights 0 0.3 0.5]
        [--num-beams 4] [--sets test_synthetic test_asterisk]
    # writes benchmarks/results/joint_ctc.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETS = ("test_synthetic", "test_asterisk", "test_librivox", "test_uqm")


@torch.no_grad()
def ctc_alone(model, processor, rows: list[dict]) -> list[str]:
    """The CTC head's greedy transcripts (best class per audio token, repeats merged, blanks dropped)."""
    from speechlm.audio import load_audio

    texts = []
    for start in range(0, len(rows), 16):
        batch = processor.extract_audio([load_audio(row["audio"]) for row in rows[start : start + 16]])
        ids = model.ctc_head.greedy_token_ids(*model.ctc_head.logits(model, dict(batch)))
        texts += [text.strip() for text in processor.tokenizer.batch_decode(ids)]
    return texts


def main() -> None:
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.evaluate import evaluate_sets
    from speechlm.evaluation import word_error_rate
    from speechlm.evaluation.normalizers import normalize_text
    from speechlm.inference import load_pretrained

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", help="demo runs' model folders (trained with a CTC head)")
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus folder (test_*.jsonl)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--limit", type=int, default=None, help="at most N clips per set")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1, greedy as the demo)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "joint_ctc.md")
    args = parser.parse_args()

    manifests = {name: args.corpus / f"{name}.jsonl" for name in args.sets if (args.corpus / f"{name}.jsonl").is_file()}
    lines = ["# Joint CTC/LLM decoding on trained demo models (benchmarks/joint_ctc.py)", "",
             f"Corpus `{args.corpus.name}`; WER % (inserted words) per held-out set, "
             f"{'greedy' if args.num_beams == 1 else f'{args.num_beams} beams'}, new tokens capped by clip "
             "length as in the demo; weight 0 is the demo's own decoding, `CTC alone` the head's greedy transcript "
             "without the LLM; decode seconds for all sets (2 CPU threads unless the machine was shared).", "",
             "| model | decoding | " + " | ".join(n.removeprefix("test_") for n in manifests) + " | decode s |",
             "|---|---|" + "---|" * (len(manifests) + 1)]
    for model_dir in args.models:
        processor, model = load_pretrained(str(model_dir), dtype=torch.float32)
        label = model_dir.parent.name if model_dir.name == "model" else model_dir.name
        for weight in args.weights:
            start = time.perf_counter()
            results = evaluate_sets(model, processor, manifests, args.limit, args.num_beams, reference=False,
                                    sets=tuple(manifests), **({"joint_ctc_weight": weight} if weight else {}))
            cells = [f"{100 * r['wer']:.1f} ({r['insertions']})" for r in results.values()]
            row = f"| `{label}` | {'LLM alone' if not weight else f'joint, CTC weight {weight:g}'} | "
            lines.append(row + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |")
            print(lines[-1], flush=True)
        start, cells = time.perf_counter(), []
        for path in manifests.values():
            rows = manifest_records(path)[: args.limit]
            hyps = [normalize_text(h, spell_numbers=True) for h in ctc_alone(model, processor, rows)]
            metrics = word_error_rate([row["text"] for row in rows], hyps)  # as evaluate_sets scores
            cells.append(f"{100 * metrics['wer']:.1f} ({metrics['insertions']})")
        lines.append(f"| `{label}` | CTC alone | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |")
        print(lines[-1], flush=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
