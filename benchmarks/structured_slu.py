"""Schema-constrained decoding on trained demo models: what does holding SLU answers to the domain's schema change?

Session 11's error analysis: 34 of 50 wrong intents were names the domain does not have ("play_music" for
"play"). Each model answers the SLU instruction on the held-out synthetic clips twice, freely and held to
`speechlm.demo.understanding.slu_schema()` (its intents and their slots, via `transcribe_arrays(json_schema=...)`);
the cascade (Whisper tiny.en's transcript -> the same base LLM, 8-shot, intent list in the prompt) both ways beside.

    python benchmarks/structured_slu.py --models RUN/model [RUN2/model ...] --corpus CORPUS_DIR
    # writes benchmarks/results/structured_slu.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (("valid_json", "valid JSON"), ("intent_accuracy", "intent"), ("slot_f1", "slot F1"))


def cells(metrics: dict) -> str:
    return " | ".join(f"{100 * metrics[key]:.1f}%" for key, _ in COLUMNS)


def main() -> None:
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.evaluate import _cascade_shots, cascade_answers, evaluate_understanding, whisper_for
    from speechlm.demo.grammar import utterances
    from speechlm.demo.run import resolve_parts
    from speechlm.demo.settings import DemoSettings
    from speechlm.demo.understanding import examples, slu_schema
    from speechlm.inference import load_pretrained
    from speechlm.tasks import score_task

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="demo runs' model folders")
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus folder (test_*.jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="at most N held-out clips")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "structured_slu.md")
    args = parser.parse_args()

    manifests = {path.stem: path for path in args.corpus.glob("*.jsonl")}
    rows = []
    for folder in args.models:
        processor, model = load_pretrained(str(folder), dtype=torch.float32)
        start = time.monotonic()
        slu = evaluate_understanding(model, processor, manifests, ("transcribe", "slu"), 0, args.limit)["slu"]
        rows.append(f"| `{folder}` | {slu['n_utterances']} | {cells(slu['free'])} | {cells(slu)} | "
                    f"{time.monotonic() - start:.0f} |")
        print(rows[-1], flush=True)
        del model

    # The cascade, both ways, on the same clips (the anchor does not depend on the model).
    test = manifest_records(manifests["test_synthetic"])[: args.limit]
    meanings = utterances([row["text"] for row in test], 0)
    test = [row for row in test if row["text"] in meanings]
    pairs = [(row, ex) for row in test for ex in examples(row["text"], meanings[row["text"]], ["slu"])
             if ex.task == "slu"]
    transcripts = dict(zip([row["id"] for row in test], whisper_for(manifests["test_synthetic"], test), strict=True))
    queries = [(transcripts[row["id"]], ex.prompt) for row, ex in pairs]
    shots = _cascade_shots(manifests["train"], 0)
    _, decoder, gguf_file = resolve_parts(DemoSettings())
    refs = [ex.target for _, ex in pairs]
    cascade = {name: score_task("json", refs, cascade_answers((decoder, gguf_file), "slu", queries, shots,
                                                                json_schema=schema))
               for name, schema in (("free", None), ("schema", slu_schema()))}
    rows.append(f"| cascade: Whisper tiny.en -> SmolLM2-135M, 8-shot | {len(pairs)} | {cells(cascade['free'])} | "
                f"{cells(cascade['schema'])} | |")
    print(rows[-1], flush=True)
    header = " | ".join(label for _, label in COLUMNS)
    table = [
        "# Schema-constrained SLU decoding on trained demo models",
        "",
        "`python benchmarks/structured_slu.py --models ... --corpus ...`: the SLU instruction on every held-out "
        "synthetic clip (held-out voices and sentences), greedy, decoded freely and held to the domain's schema "
        "(`slu_schema()`: 140 frames of intent + slot keys, slot values free text).",
        "",
        f"| model | clips | free: {header} | schema: {header} | decode s (both) |",
        "|---|---|" + "---|" * (2 * len(COLUMNS)) + "---|",
        *rows,
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(table))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
