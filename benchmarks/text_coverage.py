"""Could a better choice of training text give the unseen UQM actors' words more occurrences? Counted, not trained.

`word_frequency.py` found that the demo's models miss nearly every held-out word their training transcripts say
fewer than 10 times. This counts, for the held-out UQM actors' words (every held-out line, not only the clips of
15 s or less that `test_uqm` keeps), how often each choice of training text says them, without rendering or
training anything:

- the default's texts: the grammar and a seeded random draw of the fortunes (`corpus._texts`), with and without
  the training actors' UQM lines (all of them: what `--pico-all-lines` adds brings the default close to that);
- the same number of fortunes chosen greedily for coverage: each next sentence the one whose words, not yet said
  `--enough` times, are most frequent in the fortune pool (a choice made without looking at any test text);
- every fortune on the training side (the pool's ceiling).

    python benchmarks/text_coverage.py   # writes benchmarks/results/text_coverage.md
"""

from __future__ import annotations

import argparse
import heapq
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from word_frequency import BUCKETS, bucket  # noqa: E402

from speechlm.demo import corpus, uqm  # noqa: E402
from speechlm.demo.settings import DEFAULT_OPEN_SHARE  # noqa: E402


def covering_choice(pool: list[str], n: int, enough: int) -> list[str]:
    """`n` sentences of `pool`, greedily: each next one the sentence whose words still said fewer than `enough` times
    weigh most (a word weighs the square root of the number of pool sentences that say it: common words first),
    per square root of its length, so short sentences are not crowded out."""
    weight = Counter(word for text in pool for word in set(text.split()))
    said: Counter = Counter()

    def gain(text: str) -> float:
        words = text.split()
        return sum(weight[w] ** 0.5 for w in set(words) if said[w] < enough) / len(words) ** 0.5

    heap = [(-gain(text), i) for i, text in enumerate(pool)]
    heapq.heapify(heap)
    chosen: list[str] = []
    while heap and len(chosen) < n:  # lazy greedy: a popped gain is stale if it fell below the next one's
        _, i = heapq.heappop(heap)
        fresh = gain(pool[i])
        if heap and fresh < -heap[0][0]:
            heapq.heappush(heap, (-fresh, i))
            continue
        chosen.append(pool[i])
        said.update(set(pool[i].split()))
    return chosen


def shares(words: list[str], texts: list[str]) -> list[float]:
    """The share of `words` in each training-occurrence bucket, counted over `texts`."""
    counts = Counter(word for text in texts for word in text.split())
    per_bucket = Counter(bucket(counts[word]) for word in words)
    return [per_bucket[bucket(low)] / len(words) for low, _ in BUCKETS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=9000, help="the demo's training sentences")
    parser.add_argument("--enough", type=int, default=5, help="occurrences after which a word stops counting")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "text_coverage.md")
    args = parser.parse_args()
    held_out_asterisk = [p.text for p in corpus.split_asterisk(corpus.asterisk_prompts())[1]]
    train, _ = corpus._texts("mixed", args.n_train, 200, 0, held_out_asterisk, open_share=DEFAULT_OPEN_SHARE)
    grammar = [text for text, source in train if source == "synthetic"]
    drawn = [text for text, source in train if source == "fortunes"]
    every_fortune = [t for t in corpus.fortune_sentences() if not corpus.is_held_out(t)]
    uqm_train, uqm_test = uqm.split_lines(uqm.voiced_lines())
    lines_said = [line.text for line in uqm_train]
    words = [word for line in uqm_test for word in line.text.split()]
    choices = {f"{len(drawn):,} fortunes drawn at random (the default)": drawn,
               f"{len(drawn):,} fortunes chosen for coverage": covering_choice(every_fortune, len(drawn), args.enough),
               f"every training-side fortune ({len(every_fortune):,})": every_fortune}
    names = [bucket(low) for low, _ in BUCKETS]
    lines = ["| the grammar's sentences + | UQM training lines | fortune words | "
             + " | ".join(f"said {name}x" for name in names) + " | under 10x |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for label, fortunes in choices.items():
        n_words = sum(len(text.split()) for text in fortunes)
        for with_lines in (False, True):
            cells = shares(words, grammar + fortunes + (lines_said if with_lines else []))
            under_ten = sum(share for (low, _), share in zip(BUCKETS, cells) if low < 10)
            lines.append(f"| {label} | {'all' if with_lines else 'none'} | {n_words:,} | "
                         + " | ".join(f"{share:.1%}" for share in cells) + f" | {under_ten:.1%} |")
    table = "\n".join(lines)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("# The unseen UQM actors' words, by how often each choice of training text says them\n\n"
                           f"`python benchmarks/text_coverage.py` ({len(words):,} words of {len(uqm_test)} held-out "
                           "lines; counted over texts, nothing rendered or trained)\n\n" + table + "\n")


if __name__ == "__main__":
    main()
