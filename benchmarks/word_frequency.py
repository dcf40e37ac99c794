"""Which held-out words does a demo model miss: those its training transcripts rarely or never say?

Each reference word of a held-out set is put in a bucket by how many times the words of the run's training
transcripts (`train.jsonl` of its corpus) say it, and counted as heard when the word alignment of the run's
transcript keeps it (jiwer's "equal" spans). Whisper tiny.en's transcripts of the same clips (the corpus's cached
reference, the same normaliser) go through the same buckets: its errors do not depend on our training counts, so a
bucket where the model is far behind Whisper is a bucket where the data, not the audio, is missing.

    python benchmarks/word_frequency.py --corpus CORPUS RUN [RUN ...] [--labels NAME ...]
    # writes benchmarks/results/word_frequency.md
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = ((0, 0), (1, 2), (3, 9), (10, 99), (100, None))  # training occurrences, inclusive


def bucket(count: int) -> str:
    for low, high in BUCKETS:
        if count >= low and (high is None or count <= high):
            return f"{low}+" if high is None else (f"{low}" if low == high else f"{low}-{high}")
    raise ValueError(count)


def heard(reference: str, hypothesis: str) -> list[bool]:
    """For each reference word: does the alignment keep it?"""
    import jiwer

    words = reference.split()
    kept = [False] * len(words)
    if not hypothesis.strip():
        return kept
    for span in jiwer.process_words(reference, hypothesis).alignments[0]:
        if span.type == "equal":
            kept[span.ref_start_idx:span.ref_end_idx] = [True] * (span.ref_end_idx - span.ref_start_idx)
    return kept


def missed_by_bucket(pairs: list[tuple[str, str]], counts: Counter) -> dict[str, tuple[int, int]]:
    """{bucket: (reference words, missed words)} over (reference, hypothesis) pairs."""
    table = {bucket(low): [0, 0] for low, _ in BUCKETS}
    for reference, hypothesis in pairs:
        for word, kept in zip(reference.split(), heard(reference, hypothesis)):
            cell = table[bucket(counts[word])]
            cell[0] += 1
            cell[1] += not kept
    return {name: (words, missed) for name, (words, missed) in table.items()}


def whisper_pairs(corpus: Path, name: str) -> list[tuple[str, str]]:
    """(reference, Whisper tiny.en's normalised transcript) for each clip of a held-out set."""
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.evaluate import whisper_for

    manifest = corpus / f"test_{name}.jsonl"
    rows = manifest_records(manifest)
    return [(row["text"], hyp) for row, hyp in zip(rows, whisper_for(manifest, rows), strict=True)]


def row_cells(table: dict[str, tuple[int, int]]) -> list[str]:
    return [f"{missed / words:.0%} of {words}" if words else "-" for words, missed in table.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="demo output folders (with test_<set>.hypotheses.jsonl)")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus folder the runs trained on")
    parser.add_argument("--labels", nargs="+", help="the runs' names in the table (default: their paths)")
    parser.add_argument("--sets", nargs="+", default=["uqm", "librivox", "fortunes"])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "word_frequency.md")
    args = parser.parse_args()
    labels = args.labels or [str(run) for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    from speechlm.demo.corpus import manifest_records

    counts = Counter(word for row in manifest_records(args.corpus / "train.jsonl") for word in row["text"].split())
    names = [bucket(low) for low, _ in BUCKETS]
    lines = ["| set | transcripts by | " + " | ".join(f"words heard {n}x in training: missed" for n in names)
             + " | missed in all |", "|---|---|" + "---|" * (len(names) + 1)]
    for name in args.sets:
        sources = {"Whisper tiny.en alone": whisper_pairs(args.corpus, name)}
        for run, label in zip(args.runs, labels):
            rows = [json.loads(line) for line in (run / f"test_{name}.hypotheses.jsonl").read_text().splitlines()
                    if line.strip()]
            sources[label] = [(row["ref"], row["hyp"]) for row in rows]
        for source, pairs in sources.items():
            table = missed_by_bucket(pairs, counts)
            words, missed = (sum(cell[i] for cell in table.values()) for i in (0, 1))
            lines.append(f"| {name} | {source} | " + " | ".join(row_cells(table)) + f" | {missed / words:.1%} |")
    table = "\n".join(lines)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("# Held-out words missed, by how often the training transcripts say them\n\n"
                           "`python benchmarks/word_frequency.py --corpus CORPUS RUN...` (missed: a reference word "
                           f"the alignment does not keep; substitutions and deletions, not insertions)\n\n{table}\n")


if __name__ == "__main__":
    main()
