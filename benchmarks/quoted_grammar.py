"""What a quoted answer's grammar costs to build, per transcript, the way session 40 built it against the way it is
built now. A beam that closes the transcript field of a `x-speechlm-words-from` schema gets a grammar of its own
(`quoted_schema`): with 8 beams over 200 demo clips that is ~1,600 grammars, and profiling an 8-beam decoding of 16
held-out clips put 54 % of its time there.

Before: the quoted schema inline (every SLU frame carrying its own copy of a long slot pattern), checked with
llguidance's validator, then compiled into a matcher. Now: repeated long fields defined once (`shared_fields`), no
second validation (the schema it narrows was validated; a matcher in error falls back), compiled once per distinct
transcript per `generate` call. Both sides build the same language; both run here, in one process, in turn.

    python benchmarks/quoted_grammar.py --model RUN/model --corpus CORPUS_DIR [--limit 40] [--repeats 3]
    # writes benchmarks/results/quoted_grammar.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from llguidance import LLMatcher

    import speechlm.inference.structured as structured
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.understanding import task_schema
    from speechlm.processing import SpeechLMProcessor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a demo run's model folder (its tokenizer)")
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus folder (test_synthetic.jsonl)")
    parser.add_argument("--limit", type=int, default=40, help="held-out sentences used as transcripts")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side (alternating)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "quoted_grammar.md")
    args = parser.parse_args()

    tokenizer = SpeechLMProcessor.from_pretrained(str(args.model)).tokenizer
    engine = structured._engine_tokenizer(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    schema = task_schema("slu_transcript", values=True, quoted=True)
    texts = [row["text"] for row in manifest_records(args.corpus / "test_synthetic.jsonl")[: args.limit]]

    def narrowed(text: str, inline: bool) -> str:
        shared = structured.SHARED_FIELD_CHARS
        structured.SHARED_FIELD_CHARS = 10**12 if inline else shared  # inline: as in session 40
        try:
            return json.dumps(structured.quoted_schema(schema, text))
        finally:
            structured.SHARED_FIELD_CHARS = shared

    def before(text: str) -> None:
        grammar = LLMatcher.grammar_from_json_schema(narrowed(text, inline=True))
        LLMatcher.validate_grammar_with_warnings(grammar)
        LLMatcher(engine, grammar)

    def now(text: str) -> None:
        LLMatcher(engine, LLMatcher.grammar_from_json_schema(narrowed(text, inline=False)))

    kilobytes = {name: statistics.mean(len(narrowed(text, name == "before")) for text in texts) / 1000
                 for name in ("before", "now")}
    timings: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(args.repeats):
        for name, build in (("before", before), ("now", now)):
            start = time.perf_counter()
            for text in texts:
                build(text)
            timings[name].append((time.perf_counter() - start) / len(texts))
    best = {name: min(values) for name, values in timings.items()}
    ratio = best["before"] / best["now"]
    lines = [
        "# A quoted answer's grammar: built as in session 40 against now", "",
        f"`python benchmarks/quoted_grammar.py --model {args.model} --corpus {args.corpus} --limit {args.limit} "
        f"--repeats {args.repeats}`: the demo's `slu_transcript` schema quoted from {len(texts)} held-out sentences, "
        "each side timed in turn in one process (best of the passes, seconds per transcript; all passes listed).", "",
        "| build | s per transcript (best) | all passes |",
        "|---|---|---|",
        f"| session 40: inline (mean schema {kilobytes['before']:.0f} kB), validated, compiled | "
        f"{best['before']:.3f} | "
        f"{', '.join(f'{v:.3f}' for v in timings['before'])} |",
        f"| now: repeated fields defined once (mean schema {kilobytes['now']:.0f} kB), compiled | "
        f"{best['now']:.3f} | {', '.join(f'{v:.3f}' for v in timings['now'])} |",
        "", f"Ratio: **{ratio:.1f}x** faster per transcript (before / now).",
    ]
    print("\n".join(lines))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"table written to {args.output}")


if __name__ == "__main__":
    main()
