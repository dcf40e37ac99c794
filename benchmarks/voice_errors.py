"""Which held-out voices does a demo model mishear: the accent training never had, or new voices of known accents?

The synthetic test set is spoken by voices training never heard: every variant of the en-029 accent, and a few
variants (f4, m6, klatt3, Annie, robert, Hugo) on the six training accents (`speechlm/demo/render.py`). The
understanding tasks lose their slots on the clips a model mishears, so this splits each run's synthetic
transcriptions (`test_synthetic.hypotheses.jsonl`) by that voice group: WER and the share of clips heard without a
single word error. A lever aimed at new voices (e.g. `--voice-perturbation`) should move the second group; one aimed
at the accent, the first.

    python benchmarks/voice_errors.py --corpus CORPUS RUN [RUN ...]   # writes benchmarks/results/voice_errors.md
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def group_rows(run: Path, corpus: Path) -> dict[str, list[dict]]:
    """The run's per-clip synthetic rows grouped by `voice_group`, the voice read from the corpus's test manifest."""
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.render import voice_group

    voices = {row["id"]: row["extra"]["voice"] for row in manifest_records(corpus / "test_synthetic.jsonl")}
    groups = defaultdict(list)
    for line in (run / "test_synthetic.hypotheses.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            groups[voice_group(voices[row["id"]])].append(row)
    return dict(sorted(groups.items()))


def cells(rows: list[dict]) -> list[str]:
    words = sum(row["n_ref_words"] for row in rows)
    errors = sum(row["wer"] * row["n_ref_words"] for row in rows)
    exact = sum(row["wer"] == 0 for row in rows)
    return [str(len(rows)), f"{errors / max(words, 1):.1%}", f"{exact} ({exact / max(len(rows), 1):.1%})"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="demo output folders (with test_synthetic.hypotheses.jsonl)")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus folder (with test_synthetic.jsonl)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "voice_errors.md")
    args = parser.parse_args()
    lines = ["| run | voices | clips | WER | heard exactly |", "|---|---|---|---|---|"]
    for run in args.runs:
        groups = group_rows(run, args.corpus)
        everything = [row for rows in groups.values() for row in rows]
        for name, rows in (*groups.items(), ("all", everything)):
            lines.append(f"| {run} | {name} | " + " | ".join(cells(rows)) + " |")
    table = "\n".join(lines)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("# Held-out synthetic clips by voice group\n\n`python benchmarks/voice_errors.py --corpus "
                           f"CORPUS RUN...`\n\n{table}\n")


if __name__ == "__main__":
    main()
