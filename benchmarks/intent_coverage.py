"""How often does training see each intent that the held-out clips ask for, against the grammar's own share?

The demo's corpus keeps *distinct* sentences (`speechlm.demo.grammar.split_sentences`), and so do the text-only rows
(`text_only_utterances`). A template with few fillings ("you are caller number {count} in the queue") can say only a
handful of strings, and some of them are held out, so training sees it far less often than the grammar draws it,
while the 200 held-out sentences, too few to exhaust any template, keep its share. This counts, per intent: training
clips, text-only rows (`--text-rows`, TEXT_ONLY_SENTENCES sentences: distinct, and drawn with repeats as
`--text-rows-repeat` draws them), what the grammar's share would give each, the held-out clips, and the wrong intents
each RUN answered there (its `slu_transcript.hypotheses.jsonl` or `slu...`).

    python benchmarks/intent_coverage.py --corpus CORPUS [RUN ...]   # writes benchmarks/results/intent_coverage.md
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def intents(texts: list[str], seed: int) -> Counter:
    from speechlm.demo.grammar import utterances

    return Counter(utterance.intent for utterance in utterances(texts, seed).values())


def wrong_intents(run: Path) -> Counter:
    from slu_errors import json_field, slu_answers  # this folder's sibling script

    return Counter(json_field(row["ref"], "intent") for row in slu_answers(run).values() if not row["intent_correct"])


def main() -> None:
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.grammar import intent_shares, text_only_utterances
    from speechlm.demo.training import TEXT_ONLY_SENTENCES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a demo corpus folder (structured domain)")
    parser.add_argument("--seed", type=int, default=0, help="the corpus's seed (`speechlm demo --seed`)")
    parser.add_argument("runs", type=Path, nargs="*", help="demo output folders trained with an SLU task")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "intent_coverage.md")
    args = parser.parse_args()

    def texts(name: str) -> list[str]:
        return [record["text"] for record in manifest_records(args.corpus / name)]

    train, test = intents(texts("train.jsonl"), args.seed), intents(texts("test_synthetic.jsonl"), args.seed)
    rows = text_only_utterances(TEXT_ONLY_SENTENCES, args.seed)
    text_rows = Counter(utterance.intent for utterance in rows)
    repeated = Counter(utterance.intent for utterance in text_only_utterances(len(rows), args.seed, distinct=False))
    shares = intent_shares()
    wrong = [wrong_intents(run) for run in args.runs]
    n_train = sum(train.values())
    # Held-out intents only, the most starved first (training clips against the grammar's share).
    order = sorted(test, key=lambda intent: (train[intent] / (shares[intent] * n_train), intent))
    table = [
        "# Training coverage of the held-out clips' intents (benchmarks/intent_coverage.py)",
        "",
        f"Corpus `{args.corpus.name}`: {n_train} distinct training sentences the grammar made (its synthetic "
        f"clips' and any real prompt it can also say), {len(rows)} text-only sentences, "
        f"{sum(test.values())} held-out clips. *Grammar's share*: what the same number of draws would give the intent "
        "if sentences could repeat. Wrong: the intent answered wrong on that many of its held-out clips, per run.",
        "",
        "| intent | training clips | grammar's share | text-only rows | with `--text-rows-repeat` | grammar's share "
        "| held-out clips | wrong " + " | ".join(f"`{run.name}`" for run in args.runs) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * max(len(args.runs), 1),
    ]
    for intent in order:
        cells = [intent, str(train[intent]), f"{shares[intent] * n_train:.0f}", str(text_rows[intent]),
                 str(repeated[intent]), f"{shares[intent] * len(rows):.0f}", str(test[intent]),
                 " | ".join(str(counts[intent]) for counts in wrong) or "-"]
        table.append("| " + " | ".join(cells) + " |")
    starved = [intent for intent in test if train[intent] < shares[intent] * n_train / 4]
    held = sum(test[intent] for intent in starved)
    table += ["", f"{len(starved)} of the {len(test)} held-out intents get under a quarter of their share in "
              f"training; they ask {held} of the {sum(test.values())} held-out clips"
              + "".join(f"; `{run.name}` answered {sum(counts[i] for i in starved)} of them wrong "
                        f"({sum(counts.values())} wrong in all)" for run, counts in zip(args.runs, wrong)) + "."]
    print("\n".join(table))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
