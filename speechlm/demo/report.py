"""The demo's report: report.md (settings, steps, every held-out figure beside its anchor, examples), curves.png,
per-set hypotheses (JSONL) and metrics.json."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..joint_ctc import LLM_CANDIDATES
from .settings import BUNDLED

if TYPE_CHECKING:
    from .settings import DemoSettings

_HEADLINES = {"slu": (("valid_json", "valid JSON"), ("intent_accuracy", "intent accuracy"), ("slot_f1", "slot F1")),
              "qa": (("exact_match", "exact match"), ("token_f1", "token F1"))}


def task_summary(metrics: dict) -> str:
    """`valid JSON 99.0%, intent accuracy 97.5%, slot F1 91.2%` for a json task, exact match/F1 for answers."""
    names = _HEADLINES["slu" if "valid_json" in metrics else "qa"]
    return ", ".join(f"{label} {100 * metrics[key]:.1f}%" for key, label in names)


def result_line(name: str, metrics: dict) -> str:
    """One console line for a held-out set (`WER synthetic: 9.0% (CER ..., Whisper tiny.en ...)`) or an
    understanding task (its figures, free decoding's and the cascade's beside)."""
    if "wer" in metrics:
        head = f", the CTC head alone {100 * metrics['ctc_head']['wer']:.1f}%" if "ctc_head" in metrics else ""
        whisper = f", Whisper tiny.en {100 * metrics['whisper']['wer']:.1f}%" if "whisper" in metrics else ""
        return (f"WER {name.removeprefix('test_')}: {100 * metrics['wer']:.1f}%  (CER {100 * metrics['cer']:.1f}%, "
                f"{metrics['insertions']} inserted words, {metrics['n_utterances']} clips{head}{whisper})")
    anchors = (("best_beam", "the best beam, quoted or not"), ("free", "free decoding"),
               ("cascade", "cascade Whisper tiny.en -> same LLM few-shot"))
    beside = [f"{what}: {task_summary(metrics[key])}" for key, what in anchors if key in metrics]
    clips = f"{metrics['n_utterances']} held-out clips"
    return f"{name.upper()} {task_summary(metrics)} ({'; '.join([clips, *beside])})"


def held_out_row(name: str, metrics: dict, head: bool) -> str:
    """One row of the report's held-out table (with the CTC head's own column where the model has a head)."""
    whisper, head_wer = (f"{metrics[key]['wer']:.1%}" if key in metrics else "-" for key in ("whisper", "ctc_head"))
    return (f"| {name} | {metrics['n_utterances']} | {metrics['wer']:.1%} | {metrics['cer']:.1%} | "
            f"{metrics['insertions']} | " + (f"{head_wer} | " if head else "")
            + f"{whisper} | {metrics['seconds']:.0f} |")


def keep_result(output: Path, name: str, metrics: dict) -> None:
    """As a held-out set or task ends: its line on the console and its hypotheses on disk, so that an evaluation
    stopped part way (the understanding tasks take most of an hour on a CPU) keeps what it measured."""
    from ..evaluation import write_jsonl

    print(f"[demo] {result_line(name, metrics)}", flush=True)
    write_jsonl(metrics["rows"], output / f"{name}.hypotheses.jsonl")


# The held-out WER curves training records (`history` keys) and their names; the same keys behind HEAD_CURVE are the
# CTC head's own greedy reading of the same clips.
CURVES = {"wer": "synthetic", "wer_fortunes": "fortunes (open-domain text)",
          "wer_asterisk": "Asterisk (real phone prompts)", "wer_uqm": "UQM (real, unseen speakers)"}
HEAD_CURVE = "head_"
CURVE_TITLES = {"": "Held-out WER during training (the first clips of each set, greedy, the LLM alone):",
                HEAD_CURVE: "The same clips read by the CTC head alone (greedy, no LLM: what the projector carries, "
                            "the pre-alignment's progress while the LLM's answers say little yet):"}


def curve_table(history: dict, prefix: str = "") -> list[str]:
    """The held-out WER curve as markdown lines (one row per evaluation: minutes, step, each set's WER); none
    without one. `prefix` HEAD_CURVE tables the CTC head's curve instead of the LLM's."""
    curves = {curve: {step: (minutes, wer) for minutes, step, wer in history[prefix + curve]}
              for curve in CURVES if history.get(prefix + curve)}  # fmt: skip
    if not curves:
        return []
    lines = [CURVE_TITLES[prefix], "",
             "| minutes | step | " + " | ".join(CURVES[curve] for curve in curves) + " |",
             "|---|---|" + "---|" * len(curves)]
    for step in sorted({step for points in curves.values() for step in points}):
        minutes = next(points[step][0] for points in curves.values() if step in points)
        cells = [f"{points[step][1]:.1%}" if step in points else "-" for points in curves.values()]
        lines.append(f"| {minutes:.1f} | {step} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def training_levers(settings: DemoSettings) -> list[str]:
    """The regularisation and data levers a run set away from their off position: a report names what it measured."""
    return [text for value, text in (
        (settings.frame_masking, f"frames and channels masked at {settings.frame_masking:g} in the pre-alignment"),
        (settings.llm_frame_masking,
         f"frames and channels masked at {settings.llm_frame_masking:g} through the LLM phase"),
        (settings.projector_layers, f"{settings.projector_layers} transformer layers in the projector"),
        (settings.lora_dropout, f"LoRA dropout {settings.lora_dropout:g}"),
        (settings.voice_perturbation, f"voice perturbation {settings.voice_perturbation:g}"),
        (settings.accent_fraction, f"{settings.accent_fraction:.0%} of the sentences in a simulated accent"),
        (settings.real_speech, "the UQM training actors' clips and Pico readings of their lines"
         + (", their clips over 15 s cut at sentence ends in pauses" if settings.cut_long_clips else "")
         + (", their processed (robotic, pitched) voices too" if settings.processed_voices else "")
         + (", also of the lines whose clips are not trained on" if settings.pico_all_lines else "")
         + (f", {settings.natural_fraction:.0%} of the sentences by Pico voices" if settings.natural_fraction else "")),
        (settings.text_rows_repeat, "text-only sentences drawn with repeats (each intent its grammar share)"),
        (settings.train_seed is not None, f"training seed {settings.train_seed}"),
    ) if value]


def write_report(output: Path, settings: DemoSettings, history: dict, results: dict[str, dict],
                 understanding: dict[str, dict] | None = None) -> Path:
    """report.md + curves.png + metrics.json (each set's and task's hypotheses were kept as it ended: `keep_result`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, wer_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for curve, label in (("ctc_loss", "CTC pre-alignment"), ("loss", "training")):
        if history.get(curve):
            minutes, _, losses = zip(*history[curve])
            loss_axis.plot(minutes, losses, label=label)
    loss_axis.set(xlabel="training minutes", ylabel="loss", title="training loss")
    if history.get("ctc_loss"):
        loss_axis.legend()
    for color, (curve, label) in enumerate(CURVES.items()):
        for prefix, style in (("", "-"), (HEAD_CURVE, "--")):
            if history.get(prefix + curve):
                minutes, _, wers = zip(*history[prefix + curve])
                wer_axis.plot(minutes, [100 * w for w in wers], style, marker="o", color=f"C{color}",
                              label=None if prefix else label)
    if any(history.get(HEAD_CURVE + curve) for curve in CURVES):
        wer_axis.plot([], [], "k--", label="dashed: the CTC head alone")
    wer_axis.set(xlabel="training minutes", ylabel="WER %", title="held-out WER during training")
    if len(wer_axis.get_lines()) > 1:  # beside the plot: eight lines leave no free corner inside it
        wer_axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(output / "curves.png", dpi=100, bbox_inches="tight")
    plt.close(figure)

    dtype_reason = history.get("dtype_reason", history.get("dtype", "?"))
    head = any("ctc_head" in metrics for metrics in results.values())
    lines = [
        "# SpeechLM demo report", "",
        f"Encoder `{settings.encoder}`, decoder `{settings.decoder}`, corpus `{settings.corpus}`"
        + (f" ({settings.open_share:.0%} of the training sentences from the fortunes)"
           if settings.corpus == "mixed" else "") + "; "
        f"{history.get('steps', '?')} steps of batch {settings.batch_size} in {history.get('minutes', 0):.1f} "
        f"minutes ({str(history['ctc_steps']) + ' CTC pre-alignment steps, ' if history.get('ctc_steps') else ''}"
        f"{history.get('llm_steps', '?')} through the LLM; frozen weights in {dtype_reason}; "
        f"projector{' + LoRA r=' + str(settings.lora_rank) if settings.lora_rank else ''} trained, "
        "encoder and LLM frozen"
        + f"; budget: {settings.describe_budget()}"
        + (f"; loss = LLM loss + {settings.ctc_weight:g} x CTC alignment loss" if settings.ctc_weight else "")
        + (f" + {settings.distill_weight:g} x KL to the text-only LLM reading the transcript (distillation"
           + (", on the answer tokens the teacher predicts)" if settings.distill_agreeing_only else ")")
           if settings.distill_weight else "")
        + ("; the LLM reads the CTC-compressed audio" if settings.ctc_compression else "")
        + (f"; real-speech clips x{settings.real_speech_repeats}" if settings.real_speech_repeats > 1 else "")
        + (" (copies augmented)" if settings.real_speech_repeats > 1 and settings.real_speech_augment else "")
        + "".join(f"; {lever}" for lever in training_levers(settings))
        + "). Held-out sets decoded "
        + (f"with beam width {settings.num_beams}" if settings.num_beams > 1 else "greedily")
        + (f", jointly with the CTC head (weight {settings.decoding_ctc_weight:g}; the LLM and the head each propose "
           f"their best next tokens, the LLM {LLM_CANDIDATES}, the head {settings.joint_ctc_head_candidates})"
           if settings.decoding_ctc_weight else "")
        + "; the curve during training is greedy.", "",
        *[f"**{warning}**" for warning in history.get("warnings", [])], "",
        "Whisper tiny.en alone " + ("(the same encoder with its own decoder) " if settings.encoder == BUNDLED else "")
        + "reads the same clips as the reference; both "
        "go through the corpus's normaliser (digits spelled). Insertions are words the model added: a high count "
        "means it made text up." + (" The CTC head alone is its greedy reading of the same clips without the LLM "
                                    "(how much of the answer the projector carries)." if head else ""), "",
        "| held-out set | clips | WER | CER | insertions | " + ("CTC head alone WER | " if head else "")
        + "Whisper tiny.en WER | decode s |",
        "|---|---|---|---|---|---|---|" + ("---|" if head else ""),
    ]
    lines += [held_out_row(name, metrics, head) for name, metrics in results.items()]
    joint = (f"; the model carries its joint CTC weight ({settings.decoding_ctc_weight:g}) with its head, so both "
             "decode jointly unless given `--joint-ctc-weight 0`") if settings.decoding_ctc_weight else ""
    beams = f" --num-beams {settings.num_beams}" if settings.num_beams > 1 else ""
    lines += ["", f"Your own audio, decoded as here: `speechlm transcribe FILE --model {output / 'model'} "
              f"--tokens-per-second 5{beams}` (`speechlm serve` takes the same decoding flags{joint})."]
    if understanding:
        width = f"beam width {settings.understanding_beams}" if settings.understanding_beams > 1 else "greedily"
        lines += ["", f"Understanding tasks (trained: {settings.tasks}) on the held-out synthetic clips (held-out "
                  f"voices and sentences), decoded {width} (`--understanding-beams`). JSON answers are held to the "
                  "domain's schema while decoding (its intents, their slots and the values the domain can fill each "
                  "slot with: its entity catalogue), a question's answer to the values its slot can take; after a "
                  "transcript field, each value is also held to words the model wrote there, where some fit "
                  "(`x-speechlm-words-from`). The same model decoding freely is beside. Cascade: Whisper tiny.en's "
                  "transcript handed to the same base LLM (greedy) with the same instruction and the same schema or "
                  "answer pattern, after eight examples (and, for JSON, the list of intent names). With beams, "
                  "the answer is the best beam whose values are all quoted from its transcript (the best beam when "
                  "none is); the best beam, quoted or not, is scored beside.", "",
                  "| task | clips | SpeechLM | SpeechLM, the best beam quoted or not "
                  "| SpeechLM, free decoding | cascade | decode s |",
                  "|---|---|---|---|---|---|---|"]
        for task, metrics in understanding.items():
            best, free, cascade = (task_summary(metrics[k]) if k in metrics else "-"
                                   for k in ("best_beam", "free", "cascade"))
            lines.append(f"| {task} | {metrics['n_utterances']} | {task_summary(metrics)} | {best} | {free} | "
                         f"{cascade} | {metrics['seconds']:.0f} |")
    lines += ["", "![loss and WER](curves.png)", "", *curve_table(history), *curve_table(history, HEAD_CURVE)]
    for name, metrics in results.items():
        lines += [f"## {name}: reference vs hypothesis", "", "| reference | hypothesis | WER |", "|---|---|---|"]
        for row in metrics["rows"][:8]:
            lines.append(f"| {row['ref']} | {row['hyp'].replace('|', ' ')} | {row['wer']:.0%} |")
        lines.append("")
    for task, metrics in (understanding or {}).items():
        lines += [f"## {task}: instruction, reference vs answer", "", "| instruction | reference | answer |",
                  "|---|---|---|"]
        for prompt, row in list(zip(metrics["prompts"], metrics["rows"]))[:8]:
            answer = row.get("output", row["hyp"])  # all the model wrote (a transcript-first answer's words too)
            lines.append(f"| {prompt} | {row['ref'].replace('|', ' ')} | {answer.replace('|', ' ')} |")
        lines.append("")
    (output / "report.md").write_text("\n".join(lines))
    summary = {name: {k: v for k, v in m.items() if k not in ("rows", "prompts")}
               for name, m in {**results, **(understanding or {})}.items()}
    (output / "metrics.json").write_text(json.dumps({"settings": asdict(settings), "history": history,
                                                     "results": summary}, indent=2, default=str))
    return output / "report.md"
