"""Joint CTC/LLM decoding on trained demo models: how much does the CTC head's prefix score change each held-out set?

Each model decodes the demo's held-out sets through the demo's own path (`evaluate_sets`: greedy, new tokens capped
by clip length, the corpus's normaliser) at each `--weights` value (0: the LLM alone, the demo's figure; 1: the CTC
head's prefix search with the LLM only proposing candidates), with the head proposing candidates of its own as well
at each `--head-candidates` value, and the CTC head alone (greedy, no LLM) beside them.

`--dev-uqm N` adds a development set to choose settings on, never the test sets: N clips of The Ur-Quan Masters'
training characters (real, open-domain speech; unseen by a demo model trained with `--no-real-speech`, and by
different actors from the held-out `test_uqm` characters), written into the cache. A corpus that trains on them
(`--real-speech`, the demo's default since session 51) is refused: its models have heard these actors. `--dev-uqm-long
N` is the development set for such a model: N pieces of those actors' clips over 15 s (cut at sentence ends as
`speechlm demo --cut-long-clips` cuts them), which the default leaves out of training; heard voices, unheard lines.
A corpus built with `--cut-long-clips` is refused for it.

    python benchmarks/joint_ctc.py --models RUN/model [RUN2/model ...] --corpus CORPUS_DIR [--weights 0 0.3 0.5]
        [--head-candidates 0 8] [--num-beams 4] [--sets test_synthetic test_asterisk] [--dev-uqm 60 | --dev-uqm-long 60]
        [--head-vocabulary trained full]
    # writes benchmarks/results/joint_ctc.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from speechlm.audio import load_audio
from speechlm.demo.evaluate import TEST_SETS, ctc_head_transcripts

ROOT = Path(__file__).resolve().parents[1]
SETS = TEST_SETS  # the demo's held-out sets, the fortunes' among them since session 50


def all_token_ids(model, tokenizer) -> torch.Tensor:
    """Every token of the LLM's vocabulary but the special ones: classes for the CTC head instead of its training
    transcripts' tokens (it scores audio tokens by cosine against the LLM's input embeddings, so any token has a
    score). Can the head then write words its training never had?"""
    size = model.language_model.get_input_embeddings().weight.shape[0]
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(size) if i not in special])


def development_uqm(count: int, seed: int = 0) -> Path:
    """The manifest of `count` clips drawn from the UQM training characters' lines (written once into the cache)."""
    import random

    from speechlm.cache import cache_dir
    from speechlm.demo import uqm
    from speechlm.demo.corpus import write_manifest

    root = cache_dir("benchmarks") / f"dev_uqm_actors_{count}_{seed}"  # "actors": split_lines splits by actor
    manifest = root / "dev_uqm.jsonl"
    if not manifest.is_file():
        if not uqm.is_available():
            raise SystemExit(f"--dev-uqm needs The Ur-Quan Masters' voice acting in {uqm.nonfree_root()}: run "
                             "scripts/fetch_nonfree.sh (scripts/setup.sh does)")
        train, _ = uqm.split_lines(uqm.voiced_lines())
        lines = random.Random(seed).sample(train, min(len(train), 3 * count))  # some fail the length/rate checks
        rows = uqm.write_clips(root, lines, "uqm/dev")[:count]
        write_manifest(manifest, rows)
    return manifest


def development_uqm_long(count: int, seed: int = 0) -> Path:
    """The manifest of `count` pieces of the UQM training characters' clips over 15 s (written once into the cache)."""
    import random

    from speechlm.cache import cache_dir
    from speechlm.demo import uqm
    from speechlm.demo.corpus import write_manifest

    root = cache_dir("benchmarks") / f"dev_uqm_long_{count}_{seed}"
    manifest = root / "dev_uqm_long.jsonl"
    if not manifest.is_file():
        train, _ = uqm.split_lines(uqm.voiced_lines())
        long_lines = [line for line in train if line.sentences]  # only lines with several sentences can be cut
        lines = random.Random(seed).sample(long_lines, min(len(long_lines), count))
        rows = [row for row in uqm.write_clips(root, lines, "uqm/dev", cut_long=True) if "cut_from" in row]
        write_manifest(manifest, random.Random(seed).sample(rows, min(len(rows), count)))
    return manifest


def corpus_stamp(corpus: Path) -> dict:
    """The parameters a demo corpus was built with (its stamp; empty if it has none)."""
    from speechlm.demo.corpus import STAMP

    stamp = corpus / STAMP
    return json.loads(stamp.read_text()) if stamp.is_file() else {}


def trains_on_uqm_actors(corpus: Path) -> bool:
    """Whether a demo corpus's training set holds the UQM training actors' clips (its stamp says --real-speech)."""
    return bool(corpus_stamp(corpus).get("real_speech"))


def main() -> None:
    from speechlm.inference import load_pretrained
    from speechlm.joint_ctc import HEAD_CANDIDATES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", help="demo runs' model folders (trained with a CTC head)")
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus folder (test_*.jsonl)")
    parser.add_argument("--weights", type=float, nargs="*", default=[0.0, 0.3, 0.5],
                        help="0: the LLM alone; none: the head alone only")
    parser.add_argument("--head-candidates", type=int, nargs="+", default=[HEAD_CANDIDATES],
                        help="the head's own best next tokens scored beside the LLM's 8 (0: the LLM's alone; "
                        f"default: {HEAD_CANDIDATES}, the library's)")
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=SETS,
                        help="held-out sets (none: --dev-uqm alone)")
    parser.add_argument("--dev-uqm", type=int, default=0, metavar="N",
                        help="add N clips of the UQM training characters as set dev_uqm (choose settings on it)")
    parser.add_argument("--dev-uqm-long", type=int, default=0, metavar="N",
                        help="add N pieces of the UQM training characters' clips over 15 s as set dev_uqm_long (for "
                        "models that trained on those characters' shorter clips, the demo's default)")
    parser.add_argument("--limit", type=int, default=None, help="at most N clips per set")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1, greedy as the demo)")
    parser.add_argument("--head-vocabulary", nargs="+", choices=("trained", "full"), default=["trained"],
                        help="decode with each of these class sets: the head's training transcripts' tokens (as "
                        "saved), the LLM's whole vocabulary but the special tokens")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "joint_ctc.md")
    args = parser.parse_args()

    manifests = {name: args.corpus / f"{name}.jsonl" for name in args.sets if (args.corpus / f"{name}.jsonl").is_file()}
    if args.dev_uqm:
        if trains_on_uqm_actors(args.corpus):
            raise SystemExit(f"--dev-uqm draws from the UQM training actors, whom {args.corpus} trains on "
                             "(--real-speech, the demo's default since session 51): its models have heard them, so "
                             "they cannot choose settings; give the corpus of a --no-real-speech run")
        manifests["dev_uqm"] = development_uqm(args.dev_uqm)
    if args.dev_uqm_long:
        if corpus_stamp(args.corpus).get("uqm_cut_long"):
            raise SystemExit(f"--dev-uqm-long draws from the UQM training actors' long clips, which {args.corpus} "
                             "trains on (--cut-long-clips): give the corpus of a run without it")
        manifests["dev_uqm_long"] = development_uqm_long(args.dev_uqm_long)
    lines = ["# Joint CTC/LLM decoding on trained demo models (benchmarks/joint_ctc.py)", "",
             f"Corpus `{args.corpus.name}`; WER % (inserted words) per held-out set, "
             f"{'greedy' if args.num_beams == 1 else f'{args.num_beams} beams'}, new tokens capped by clip "
             "length as in the demo; weight 0 is the demo's own decoding, `CTC alone` the head's greedy transcript "
             "without the LLM; decode seconds for all sets (2 CPU threads unless the machine was shared).", "",
             "| model | decoding | " + " | ".join(n.removeprefix("test_") for n in manifests) + " | decode s |",
             "|---|---|" + "---|" * (len(manifests) + 1)]
    for model_dir in args.models:
        processor, model = load_pretrained(str(model_dir), dtype=torch.float32)
        name = model_dir.parent.name if model_dir.name == "model" else model_dir.name
        classes = {"trained": model.ctc_head.vocabulary_ids, "full": all_token_ids(model, processor.tokenizer)}
        for vocabulary in args.head_vocabulary:
            model.ctc_head.vocabulary_ids = classes[vocabulary]
            label = name + (f", head over {len(classes['full'])} tokens" if vocabulary == "full" else "")
            lines += decoding_rows(model, processor, manifests, label, args)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


def decoding_rows(model, processor, manifests: dict[str, Path], label: str, args) -> list[str]:
    """One table row per decoding of `args` (LLM alone, each joint weight x head proposals), then the head alone."""
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.evaluate import evaluate_sets
    from speechlm.evaluation import word_error_rate
    from speechlm.evaluation.normalizers import normalize_text

    lines = []
    for weight, head in [(0.0, 0)] * (0 in args.weights) + [(w, h) for w in args.weights if w
                                                             for h in args.head_candidates]:
        start = time.perf_counter()
        options = {"joint_ctc_weight": weight, "joint_ctc_head_candidates": head} if weight else {}
        results = evaluate_sets(model, processor, manifests, args.limit, args.num_beams, reference=False,
                                sets=tuple(manifests), **options)
        cells = [f"{100 * r['wer']:.1f} ({r['insertions']})" for r in results.values()]
        name = "LLM alone" if not weight else f"joint, CTC weight {weight:g}"
        name += f", head proposes {head}" if weight and head else ""
        lines.append(f"| `{label}` | {name} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |")
        print(lines[-1], flush=True)
    start, cells = time.perf_counter(), []
    for path in manifests.values():
        rows = manifest_records(path)[: args.limit]
        audio = [load_audio(row["audio"]) for row in rows]
        hyps = [normalize_text(h, spell_numbers=True) for h in ctc_head_transcripts(model, processor, audio)]
        metrics = word_error_rate([row["text"] for row in rows], hyps)  # as evaluate_sets scores
        cells.append(f"{100 * metrics['wer']:.1f} ({metrics['insertions']})")
    lines.append(f"| `{label}` | CTC alone | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |")
    print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
