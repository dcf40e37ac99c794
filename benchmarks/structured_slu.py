"""Grammar-constrained decoding on trained demo models: what does holding SLU answers to a schema (and QA answers to
the asked slot's catalogue) change?

Session 11's error analysis: 34 of 50 wrong intents were names the domain does not have ("play_music" for
"play"). Each model answers the SLU instruction on the held-out synthetic clips three ways: freely; held to the
domain's ontology (`slu_schema()`: its intents and each intent's slot keys, values free text); held to the ontology
and its entity catalogue (`slu_schema(values=True)`: each slot value one the grammar can say). The cascade (Whisper
tiny.en's transcript -> the same base LLM, 8-shot, intent list in the prompt) is decoded the same three ways.
With `--task slu_transcript --joint-ctc-weights ...`, the models' transcript field is also decoded jointly with
their CTC head (`speechlm.joint_ctc.json_string_span`), the intent and slots after it by the LLM alone.
`sentences` (transcript-first forms only) also holds the transcript field to the sentences the domain's grammar can
say, as a command application that knows what it can be asked would. With `--qa`, each model also answers the
question about each clip freely and held to a regular expression of every value the asked slot can take
(`answer_pattern`, the QA counterpart of the catalogue; models only); with
`--qa-task qa_transcript`, in the transcript-first form (the words, decoded jointly with the CTC head at each joint
weight, then the answer, held to the same values).

    python benchmarks/structured_slu.py --models RUN/model [RUN2/model ...] --corpus CORPUS_DIR [--no-cascade] \
        [--num-beams 1 4] [--qa [--qa-task qa_transcript]] [--task slu_transcript [--joint-ctc-weights 0 0.5]
        [--head-candidates 0 8]]
    # writes benchmarks/results/structured_slu.md
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (("valid_json", "valid JSON"), ("intent_accuracy", "intent"), ("slot_f1", "slot F1"))
VARIANTS = ("free", "ontology", "catalogue", "quoted", "sentences")


def main() -> None:
    from speechlm.audio import load_audio
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.evaluate import (
        UNDERSTANDING_TOKENS,
        _cascade_shots,
        cascade_answers,
        held_structure,
        whisper_for,
    )
    from speechlm.demo.grammar import utterances
    from speechlm.demo.run import resolve_parts
    from speechlm.demo.settings import DemoSettings
    from speechlm.demo.understanding import answer_of, examples, task_schema
    from speechlm.inference import load_pretrained, transcribe_arrays
    from speechlm.joint_ctc import HEAD_CANDIDATES, json_string_span
    from speechlm.tasks import score_task

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="demo runs' model folders")
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus folder (test_*.jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="at most N held-out clips")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--no-cascade", action="store_true", help="models only (the anchor is the same every run)")
    parser.add_argument("--num-beams", type=int, nargs="+", default=[1],
                        help="beam widths to decode the models with (a row each; the cascade stays greedy)")
    parser.add_argument("--qa", action="store_true", help="also QA: free vs held to the asked slot's catalogue")
    parser.add_argument("--qa-task", choices=["qa", "qa_transcript"], default="qa",
                        help="the question form the models learned (qa_transcript: the answer after the transcript, "
                             "which is decoded jointly at each --joint-ctc-weights)")
    parser.add_argument("--task", choices=["slu", "slu_transcript"], default="slu",
                        help="the SLU form the models learned (slu_transcript: the frame after its transcript)")
    parser.add_argument("--joint-ctc-weights", type=float, nargs="+", default=[0.0],
                        help="slu_transcript only: joint CTC weights for the transcript field (a row each; 0: the "
                             "LLM alone)")
    parser.add_argument("--head-candidates", type=int, nargs="+", default=[HEAD_CANDIDATES],
                        help="with a joint weight: how many of the CTC head's best next tokens it proposes beside "
                             "the LLM's (a row each; 0: the LLM's alone, as before session 22)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "structured_slu.md")
    args = parser.parse_args()
    if args.task != "slu_transcript" and args.qa_task != "qa_transcript" and any(args.joint_ctc_weights):
        parser.error("--joint-ctc-weights needs --task slu_transcript or --qa-task qa_transcript (the CTC head scores "
                     "the transcript field)")

    schemas = {"free": None, "ontology": task_schema(args.task), "catalogue": task_schema(args.task, values=True),
               "quoted": task_schema(args.task, values=True, quoted=True),
               "sentences": task_schema(args.task, values=True, quoted=True, sentences=True)}
    test = manifest_records(args.corpus / "test_synthetic.jsonl")[: args.limit]
    meanings = utterances([row["text"] for row in test], 0)
    test = [row for row in test if row["text"] in meanings]
    pairs = [(row, ex) for row in test for ex in examples(row["text"], meanings[row["text"]], [args.task])
             if ex.task == args.task]
    refs = [ex.target for _, ex in pairs]
    audio = [load_audio(row["audio"]) for row, _ in pairs]

    def row(name: str, answers_for) -> str:
        cells, seconds = [], {}
        for variant in args.variants:
            start = time.monotonic()
            metrics = score_task("json", refs, answers_for(json_schema=schemas[variant]))
            seconds[variant] = time.monotonic() - start
            figures = [f"{100 * metrics[key]:.1f}%" for key, _ in COLUMNS]
            cells += figures
            labelled = ", ".join(f"{label} {figure}" for (_, label), figure in zip(COLUMNS, figures, strict=True))
            print(f"  {name}, {variant}: {labelled} ({seconds[variant]:.0f} s)", flush=True)  # say each as it ends
        timing = " / ".join(f"{seconds[v]:.0f}" for v in args.variants)
        line = f"| {name} | {len(pairs)} | " + " | ".join(cells) + f" | {timing} |"
        print(line, flush=True)
        return line

    asked = [(row, ex) for row in test for ex in examples(row["text"], meanings[row["text"]], [args.qa_task])
             if ex.task == args.qa_task]
    qa_audio = [load_audio(row["audio"]) for row, _ in asked]
    said = [meanings[row["text"]] for row, _ in asked]
    held = {"free": {}, "catalogue": held_structure(args.qa_task, said),
            "quoted": held_structure(args.qa_task, said, quoted=True),
            "sentences": held_structure(args.qa_task, said, quoted=True, sentences=True)}
    # a plain answer has no transcript to quote or hold
    qa_variants = [v for v in held if v in args.variants and (v in ("free", "catalogue")
                                                              or args.qa_task == "qa_transcript")]

    def qa_answers(model, processor, beams: int, variant: str, joint: dict) -> list[str]:
        """Each question's answer, free or held to its slot's catalogue (after the transcript for qa_transcript,
        and to its words with `quoted`)."""
        outputs = transcribe_arrays(model, processor, qa_audio, prompt=[ex.prompt for _, ex in asked],
                                    batch_size=16 // beams or 1, max_new_tokens=UNDERSTANDING_TOKENS[args.qa_task],
                                    num_beams=beams, **held[variant], **joint)
        return [answer_of(args.qa_task, text) for text in outputs]

    rows, qa_table = [], []
    for folder in args.models:
        processor, model = load_pretrained(str(folder), dtype=torch.float32)
        for beams in args.num_beams:
            name = f"`{folder}`" + (f", {beams} beams" if beams > 1 else "")
            for n, (weight, head) in enumerate([(0.0, 0)] * (0 in args.joint_ctc_weights) + [
                    (w, h) for w in args.joint_ctc_weights if w for h in args.head_candidates]):
                joint = {"joint_ctc_weight": weight, "joint_ctc_span": json_string_span(processor.tokenizer),
                         "joint_ctc_head_candidates": head} if weight else {}
                label = f", transcript joint with CTC {weight:g}, the head proposes {head}" if weight else ""
                if args.task == "slu_transcript" or not weight:
                    rows.append(row(name + label,
                                    partial(transcribe_arrays, model, processor, audio,
                                            prompt=[ex.prompt for _, ex in pairs], batch_size=16 // beams or 1,
                                            max_new_tokens=UNDERSTANDING_TOKENS[args.task], num_beams=beams,
                                            **joint)))
                if args.qa and (args.qa_task == "qa_transcript" or not n):  # plain answers have no transcript
                    cells = []
                    for variant in qa_variants:
                        answers = qa_answers(model, processor, beams, variant,
                                             joint if args.qa_task == "qa_transcript" else {})
                        metrics = score_task("answer", [answer_of(args.qa_task, ex.target) for _, ex in asked],
                                             answers)
                        cells += [f"{100 * metrics['exact_match']:.1f}%", f"{100 * metrics['token_f1']:.1f}%"]
                    qa_label = label if args.qa_task == "qa_transcript" else ""
                    qa_table.append(f"| {name}{qa_label}, {args.qa_task} | {len(asked)} | " + " | ".join(cells)
                                    + " |")
                    print(qa_table[-1], flush=True)
        del model

    if not args.no_cascade:  # the anchor does not depend on the model
        whisper = whisper_for(args.corpus / "test_synthetic.jsonl", test)
        transcripts = dict(zip([r["id"] for r in test], whisper, strict=True))
        queries = [(transcripts[r["id"]], ex.prompt) for r, ex in pairs]
        shots = _cascade_shots(args.corpus / "train.jsonl", 0)
        _, decoder, gguf_file = resolve_parts(DemoSettings())
        rows.append(row("cascade: Whisper tiny.en -> SmolLM2-135M, 8-shot",
                        partial(cascade_answers, (decoder, gguf_file), args.task, queries, shots)))

    header = [f"{variant}: {label}" for variant in args.variants for _, label in COLUMNS]
    table = [
        "# Schema-constrained SLU decoding on trained demo models",
        "",
        "`python benchmarks/structured_slu.py --models ... --corpus ...`: the SLU instruction on every held-out "
        "synthetic clip (held-out voices and sentences), greedy unless the row names beams, decoded freely, held to "
        "the domain's ontology "
        "(`slu_schema()`: 140 frames of intent + slot keys, values free text) and held to the ontology and its entity "
        "catalogue (`slu_schema(values=True)`: each slot value one the grammar can fill it with); `quoted` "
        "(`slu_transcript` only): the catalogue, and each slot value words of the transcript field the model wrote "
        "first (`x-speechlm-words-from`); `sentences`: quoted, and the transcript field itself held to the "
        "sentences the domain's grammar can say (`grammar.sentence_pattern()`, defined once in `$defs`).",
        "",
        "| model | clips | " + " | ".join(header) + f" | decode s ({' / '.join(args.variants)}) |",
        "|---|---|" + "---|" * len(header) + "---|",
        *rows,
    ]
    if qa_table:
        table += [
            "",
            "QA (`--qa`): the question about each held-out clip, answered freely and held to a regular expression of "
            "every value the asked slot can take in any template (`answer_pattern`; for `qa_transcript`, the answer "
            "field after a free transcript).",
            "",
            "| model | questions | " + " | ".join(f"{v}: exact match | {v}: token F1" for v in qa_variants) + " |",
            "|---|---|" + "---|---|" * len(qa_variants),
            *qa_table,
        ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(table) + "\n")
    print(f"table written to {args.output}")


if __name__ == "__main__":
    main()
