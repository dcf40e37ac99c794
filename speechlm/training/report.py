"""What a finished run leaves beside the model: training_curves.png, training_report.md and training_summary.json."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..evaluation import format_summary_table, json_safe
from .config import TrainConfig

logger = logging.getLogger(__name__)

SUMMARY_NAME = "training_summary.json"

# Trainer's names for the per-task eval losses of a dict of eval sets, and the timing keys the report leaves out.
_TASK_LOSS = re.compile(r"eval_(.+)_loss")
_TIMING = re.compile(r"eval_.*(runtime|per_second|model_preparation_time)")


def _curves(summaries: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Loss/WER points on one step axis across stages (each stage's steps continue the previous stage's)."""
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], "eval_wer": [], "eval_cer": []}
    offset = 0
    for summary in summaries:
        for entry in summary["log_history"]:
            for key in [*curves, *(k for k in entry if _TASK_LOSS.fullmatch(k) and k not in curves)]:
                if entry.get(key) is not None and "step" in entry:
                    curves.setdefault(key, []).append((offset + entry["step"], float(entry[key])))
        offset += summary["global_step"]
    return curves


def plot_training_curves(summaries: list[dict], path: Path) -> Path | None:
    """Training/eval loss and WER/CER against steps, with the stage boundaries marked; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no training_curves.png")
        return None
    curves = _curves(summaries)
    has_wer = bool(curves["eval_wer"])
    figure, axes = plt.subplots(1, 2 if has_wer else 1, figsize=(11 if has_wer else 6, 4), squeeze=False)
    loss_axis = axes[0][0]
    task_losses = [(key, f"eval loss ({_TASK_LOSS.fullmatch(key).group(1)})", "o--") for key in curves
                   if key != "eval_loss" and _TASK_LOSS.fullmatch(key)]  # fmt: skip
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-"), *task_losses):
        if curves[key]:
            loss_axis.plot(*zip(*curves[key]), style, label=label, markersize=3)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.set_title("Loss")
    if has_wer:
        wer_axis = axes[0][1]
        for key, label in (("eval_wer", "WER"), ("eval_cer", "CER")):
            if curves[key]:
                steps, values = zip(*curves[key])
                wer_axis.plot(steps, [100 * v for v in values], "o-", label=label, markersize=3)
        wer_axis.set_xlabel("step")
        wer_axis.set_ylabel("%")
        wer_axis.set_title("Error rates (eval)")
    offset = 0
    for summary in summaries[:-1]:
        offset += summary["global_step"]
        for row in axes:
            for axis in row:
                axis.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
    for row in axes:
        for axis in row:
            if axis.get_legend_handles_labels()[0]:
                axis.legend()
            axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(config: TrainConfig, output_dir: Path, summaries: list[dict], elapsed: float) -> None:
    """The curves, the markdown report and the JSON summary of every stage of a run, in `output_dir`."""
    image = plot_training_curves(summaries, output_dir / "training_curves.png")
    lines = [f"# Training report: {output_dir.name}", ""]
    source = config.model.init_from or f"{config.model.encoder} + {config.model.decoder}"
    lines += [f"- Model: {source} (audio layout {config.model.audio_layout})",
              f"- Train data: {config.data.train_manifest}", f"- Eval data: {config.data.eval_manifest}",
              f"- Wall time of this invocation: {elapsed / 60:.1f} min", ""]  # fmt: skip
    lines += ["| Stage | Steps | Learning rate | Trainable params | Final train loss | Time |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for s in summaries:
        loss = next((e["loss"] for e in reversed(s["log_history"]) if "loss" in e), None)
        lines.append(
            f"| {s['stage']} | {s['global_step']} | {s['learning_rate']:g} | {s['trainable_parameters']:,} | "
            f"{'n/a' if loss is None else f'{loss:.4f}'} | {s['elapsed_seconds'] / 60:.1f} min |"
        )
    lines.append("")
    final_metrics = {}  # the last value of every eval metric (per task too), without the timings
    for entry in (entry for summary in summaries for entry in summary["log_history"]):
        final_metrics.update({key.removeprefix("eval_"): value for key, value in entry.items()
                              if key.startswith("eval_") and not _TIMING.fullmatch(key) and value is not None})
    if final_metrics:
        lines.append(format_summary_table(final_metrics, "Final evaluation"))
    if image is not None:
        lines += [f"![training curves]({image.name})", ""]
    lines += ["Load it with:", "", "```python", "from speechlm.inference import load_pretrained",
              f"processor, model = load_pretrained({str(output_dir)!r})", "```", ""]  # fmt: skip
    if any(s["world_size"] > 1 for s in summaries):
        agree = all(s["ranks_agree"] for s in summaries)
        lines.append(f"Distributed: {summaries[-1]['world_size']} processes; final weights identical on every rank: "
                     f"{'yes' if agree else 'NO'}.")
    (output_dir / "training_report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"stages": [{k: v for k, v in s.items() if k != "log_history"} for s in summaries],
               "final_metrics": final_metrics, "global_step": summaries[-1]["global_step"]}
    with open(output_dir / SUMMARY_NAME, "w", encoding="utf-8") as handle:
        json.dump(json_safe(summary), handle, indent=2)
