"""Where do a demo model's SLU mistakes come from: hearing the words, or mapping heard words to the frame?

A demo run trained with understanding tasks writes, per held-out clip, its transcription (`test_synthetic.hypotheses
.jsonl`) and its SLU answer (`slu.hypotheses.jsonl` or `slu_transcript.hypotheses.jsonl`, held to the domain's
schema). A wrong intent on a clip whose transcription was exact is a mapping error (the model heard every word and
still chose the wrong frame: more SLU training would help); on a clip it mis-transcribed it is a hearing error
(better acoustics would help). Slot errors are split the same way, and so are wrong answers to the question about a
clip when the run learned `qa` or `qa_transcript` (`qa.hypotheses.jsonl`, `qa_transcript.hypotheses.jsonl`; a second
table).

    python benchmarks/slu_errors.py RUN [RUN ...]    # writes benchmarks/results/slu_errors.md
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines()) if row}


def json_field(text: str, key: str):
    """`key`'s value in the JSON object `text` (None when `text` is no JSON object or lacks the key): the intent of an
    SLU answer, the transcript a `qa_transcript` answer wrote before its answer."""
    from speechlm.tasks import parse_json_object

    return (parse_json_object(text) or {}).get(key)


def qa_cells(run: Path, heard: dict[str, dict]) -> list[list[str]]:
    """The QA table's rows for `run`, one per question task it learned: wrong answers on clips transcribed exactly vs
    misheard, and for `qa_transcript` how many wrong answers followed a transcript field that was itself exact (the
    words were written right, the answer picked out of them wrong: mapping)."""
    from speechlm.evaluation.normalizers import normalize_text

    rows = []
    for task in ("qa", "qa_transcript"):
        if not (path := run / f"{task}.hypotheses.jsonl").is_file():
            continue
        counts = Counter()
        for clip, row in read_rows(path).items():
            side = "exact" if heard[clip]["wer"] == 0 else "misheard"
            counts[side] += 1
            counts[f"{side} wrong"] += not row["exact_match"]
            written = json_field(row.get("output", ""), "transcript")
            counts["wrote exact words, wrong"] += (not row["exact_match"] and written is not None
                                                  and normalize_text(written) == normalize_text(heard[clip]["ref"]))
        mapping = str(counts["wrote exact words, wrong"]) if task == "qa_transcript" else "-"
        rows.append([str(run), task, str(counts["exact"] + counts["misheard"]),
                     *(f"{counts[f'{side} wrong']} of {counts[side]} "
                       f"({counts[f'{side} wrong'] / max(counts[side], 1):.1%})" for side in ("exact", "misheard")),
                     mapping])
    return rows


def slu_answers(run: Path) -> dict[str, dict]:
    """The run's per-clip SLU answers, of whichever SLU task it learned (`slu` or `slu_transcript`)."""
    return read_rows(next(path for task in ("slu", "slu_transcript")
                          if (path := run / f"{task}.hypotheses.jsonl").is_file()))


def analyse(run: Path) -> tuple[list[str], Counter, list[list[str]]]:
    """One table row for `run` (counts split by whether the transcription was exact), its intent confusions and its
    QA rows (`qa_cells`)."""
    heard = read_rows(run / "test_synthetic.hypotheses.jsonl")
    slu = slu_answers(run)
    counts, confusions = Counter(), Counter()
    for clip, row in slu.items():
        exact = heard[clip]["wer"] == 0
        side = "exact" if exact else "misheard"
        counts[f"{side} clips"] += 1
        if not row["intent_correct"]:
            counts[f"{side} intent errors"] += 1
            confusions[(json_field(row["ref"], "intent"), json_field(row["hyp"], "intent"))] += 1
        counts[f"{side} slot errors"] += len(row["missing_slots"]) + len(row["extra_slots"])
    cells = [str(run), str(len(slu))]
    for side in ("exact", "misheard"):
        clips = counts[f"{side} clips"]
        errors = counts[f"{side} intent errors"]
        cells += [str(clips), f"{errors} ({errors / max(clips, 1):.1%})", str(counts[f"{side} slot errors"])]
    return cells, confusions, qa_cells(run, heard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="demo output folders trained with --tasks ...slu...")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "slu_errors.md")
    args = parser.parse_args()
    rows, confusions, qa_rows = [], Counter(), []
    for run in args.runs:
        cells, found, qa = analyse(run)
        rows.append("| " + " | ".join(cells) + " |")
        confusions += found
        qa_rows += ["| " + " | ".join(cells) + " |" for cells in qa]
    table = [
        "# SLU errors: hearing or mapping? (benchmarks/slu_errors.py)",
        "",
        "Held-out synthetic clips of demo runs trained with understanding; SLU answers held to the domain's schema. "
        "*Exact* clips are those the same model transcribed without a word error; a wrong intent there is a mapping "
        "error, on a *misheard* clip a hearing error. Slot errors = missing + extra `key=value` pairs.",
        "",
        "| run | SLU clips | exact clips | intent errors on exact | slot errors on exact | misheard clips | "
        "intent errors on misheard | slot errors on misheard |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Most frequent intent confusions (reference -> answer), all runs together:",
        "",
        "| reference intent | answered intent | clips |",
        "|---|---|---|",
        *[f"| {ref} | {hyp} | {n} |" for (ref, hyp), n in confusions.most_common(15)],
    ]
    if qa_rows:
        table += ["", "Questions about a slot (runs that learned `qa` or `qa_transcript`; answers held to the slot's "
                  "values), wrong answers (not an exact match) split the same way; for `qa_transcript`, also the "
                  "wrong answers written after a transcript field that was itself exact:", "",
                  "| run | task | questions | wrong on exact clips | wrong on misheard clips | "
                  "wrong after exact written words |", "|---|---|---|---|---|---|", *qa_rows]
    print("\n".join(table))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
