"""How well does the text-only teacher of distillation predict the answers it is distilled on?

Distillation (`speechlm.training.distillation`) pulls the model towards the frozen LLM reading the transcript where
the clip stands. For transcription that teacher should copy the transcript; this measures, on a demo model's own
prompt format and training transcripts, the probability it gives each label token and how often its top token is the
label, for the answer's first token, the tokens inside it, and the closing EOS.

    python benchmarks/distillation_teacher.py --model RUN/model --corpus CORPUS_DIR [--limit 200]
    # writes benchmarks/results/distillation_teacher.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("first token", "inner tokens", "EOS")


def main() -> None:
    from speechlm.demo.corpus import manifest_records
    from speechlm.inference import load_pretrained
    from speechlm.training.distillation import labelled_logits, teacher_logits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a demo run's model folder (its LLM and prompt)")
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus folder (train.jsonl)")
    parser.add_argument("--limit", type=int, default=200, help="training transcripts read (every n-th, all sources)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "distillation_teacher.md")
    args = parser.parse_args()

    processor, model = load_pretrained(str(args.model), dtype=torch.float32)
    records = manifest_records(args.corpus / "train.jsonl")
    texts = [record["text"] for record in records[:: max(1, len(records) // args.limit)]][: args.limit]
    probability = {part: [] for part in PARTS}
    agreement = {part: [] for part in PARTS}
    for start in range(0, len(texts), 16):
        chunk = texts[start : start + 16]
        rows = processor.encode_text([processor.build_prompt(audio_text=text) for text in chunk], chunk)
        logits = teacher_logits(model.language_model, rows["input_ids"], rows["decoder_attention_mask"]).float()
        for row in range(len(chunk)):
            row_logits, wanted = labelled_logits(logits[row : row + 1], rows["labels"][row : row + 1])
            p = torch.softmax(row_logits, -1)[torch.arange(len(wanted)), wanted]
            top = row_logits.argmax(-1) == wanted
            for part, index in (("first token", slice(0, 1)), ("inner tokens", slice(1, -1)), ("EOS", slice(-1, None))):
                probability[part] += p[index].tolist()
                agreement[part] += top[index].float().tolist()
    lines = ["# The text-only teacher of distillation on the demo's transcripts (benchmarks/distillation_teacher.py)",
             "", f"Model `{args.model}` (its LLM with LoRA off, its prompt `{processor.prompt}`, audio layout "
             f"`{processor.audio_layout}`), {len(texts)} training transcripts of `{args.corpus.name}`. The teacher "
             "reads the transcript where the clip stands, then the prompt, and is scored on the answer (the same "
             "transcript + EOS).", "", "| answer part | tokens | mean probability of the label | teacher's top token "
             "is the label |", "|---|---|---|---|"]
    for part in PARTS:
        n = len(probability[part])
        lines.append(f"| {part} | {n} | {sum(probability[part]) / n:.3f} | {100 * sum(agreement[part]) / n:.1f} % |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
