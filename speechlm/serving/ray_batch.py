"""Batch transcription of a large corpus on Ray Data: `transcribe_dataset(manifest, model_dir, output, ...)`.

`speechlm transcribe` decodes on one device; this spreads a JSONL manifest (`{"audio": path, "id": ...}` per line, as
`speechlm transcribe` reads it) over a pool of Ray actors, each holding the model once. The pipeline:

1. header durations, read by Ray tasks (no decoding), then a global sort by duration, so that consecutive batches
   hold clips of similar length (length buckets: little padding, the same reason `transcribe_arrays` sorts);
2. `map_batches` with a callable class (`concurrency=num_actors`): each actor runs `transcribe_files`, the code of
   `speechlm transcribe` (batched decoding, long files cut on silence, a bad file reported, never fatal);
3. the driver appends each finished block to one JSONL file and flushes it, so results survive a crash, and a
   second run skips every id already written (resumable). A file that cannot be read or decoded gets an error row
   `{"id", "audio", "error"}`; `retry_errors=True` decodes those again.

Success rows are `speechlm transcribe --format json` records (`audio`, `id`, `text`, `duration`, `segments`).
Audio paths must be readable by every node (a shared file system or the same paths everywhere). Run it from
Python or as `python -m speechlm.serving.ray_batch MANIFEST --model DIR --output OUT.jsonl --actors N`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .ray_serve import require_ray


def manifest_rows(manifest: str | os.PathLike) -> tuple[list[dict[str, str]], list[str]]:
    """(rows, problems): one `{"id", "audio"}` per manifest line; the id is the line's `id`, else its audio path.

    Read with `speechlm transcribe`'s own manifest reader, so both accept and refuse the same lines."""
    from ..inference.cli import collect_inputs

    inputs, problems = collect_inputs([str(manifest)])
    return [{"id": item.id or item.name, "audio": str(Path(item.path).resolve())} for item in inputs], problems


def finished_ids(output: str | os.PathLike, retry_errors: bool = False) -> set[str]:
    """Ids that already have a row in `output` (error rows too, unless `retry_errors`); a torn last line (a crash
    mid-write) does not count, so that id is decoded again."""
    done: set[str] = set()
    errors: set[str] = set()
    path = Path(output)
    if not path.exists():
        return done
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or row.get("id") is None:
                continue
            (errors if "error" in row else done).add(str(row["id"]))
    return done if retry_errors else done | errors


def _with_durations(batch: dict[str, Any]) -> dict[str, Any]:
    """Header durations (a Ray task, no decoding); an unreadable header sorts first and fails in the actor."""
    from ..audio import AudioError, audio_duration

    durations = []
    for path in batch["audio"]:
        try:
            durations.append(audio_duration(str(path)))
        except (AudioError, OSError):
            durations.append(0.0)
    return {"id": list(batch["id"]), "audio": list(batch["audio"]), "duration": durations}


class Transcriber:
    """A Ray Data actor: loads the model once, then decodes batch after batch with `transcribe_files`."""

    def __init__(self, model_dir: str, dtype: str | None = "auto", device: str | None = None, quantize: str = "none",
                 prompt: str | None = None, max_chunk_seconds: float = 25.0, threads: int | None = None,
                 generate_kwargs: dict | None = None):  # fmt: skip
        import torch

        from ..cli_options import resolve_device
        from ..loading import load_pretrained

        if threads:
            torch.set_num_threads(threads)
        self.processor, self.model = load_pretrained(model_dir, dtype=dtype, device=resolve_device(device),
                                                     quantize=quantize, merge_lora=True)  # fmt: skip
        self.prompt = prompt
        self.max_chunk_seconds = max_chunk_seconds
        self.generate_kwargs = dict(generate_kwargs or {})

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from ..inference.cli import AudioInput, transcribe_files

        ids, paths = [str(i) for i in batch["id"]], [str(p) for p in batch["audio"]]
        inputs = [AudioInput(Path(path), path, Path("unused"), key) for key, path in zip(ids, paths)]
        rows: list[str] = [""] * len(inputs)
        failed = [False] * len(inputs)
        messages: list[str] = []

        def on_result(index: int, transcript) -> None:
            if transcript is None:  # `transcribe_files` reports the message just before
                row = {"id": ids[index], "audio": paths[index], "error": messages[-1] if messages else "failed"}
                rows[index], failed[index] = json.dumps(row, ensure_ascii=False), True
            else:
                rows[index] = transcript.render("json").strip()

        transcribe_files(self.model, self.processor, inputs, on_result, messages.append, self.prompt, len(inputs),
                         self.max_chunk_seconds, **self.generate_kwargs)  # fmt: skip
        return {"id": ids, "row": rows, "failed": failed}


def transcribe_dataset(
    manifest: str | os.PathLike,
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    num_actors: int = 1,
    batch_size: int = 8,
    *,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    dtype: str | None = "auto",
    device: str | None = None,
    quantize: str = "none",
    max_chunk_seconds: float = 25.0,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    threads: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Transcribe every manifest entry not yet in `output` (JSONL, appended to); returns counts and manifest problems.

    Uses the running Ray (`ray.init` first to join a cluster), else starts a local one. `num_actors` model copies,
    each reserving `num_cpus` / `num_gpus`; `batch_size` clips of similar length per `transcribe_arrays` call.
    """
    ray, _ = require_ray()
    if num_actors < 1 or batch_size < 1:
        raise ValueError(f"num_actors and batch_size must be >= 1, got {num_actors} and {batch_size}")
    rows, problems = manifest_rows(manifest)
    done = finished_ids(output, retry_errors)
    todo = [row for row in rows if row["id"] not in done]
    summary: dict[str, Any] = {"transcribed": 0, "failed": 0, "skipped": len(rows) - len(todo), "problems": problems}
    if not todo:
        return summary
    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = progress
    # Blocks are what the driver appends as they finish and what actors share out: about 4 batches each, and at
    # least 2 per actor so that no actor idles (a block is never split between actors); no more actors than blocks
    # (a tiny resume would load the model in actors that get nothing).
    blocks = min(len(todo), max(2 * num_actors, math.ceil(len(todo) / (4 * batch_size))))
    dataset = (
        ray.data.from_items(todo, override_num_blocks=blocks)
        .map_batches(_with_durations, batch_size=None)  # block by block: the sort keeps this many partitions
        .sort("duration")
        .map_batches(
            Transcriber,
            fn_constructor_kwargs=dict(model_dir=str(model_dir), dtype=dtype, device=device, quantize=quantize,
                                       prompt=prompt, max_chunk_seconds=max_chunk_seconds, threads=threads,
                                       generate_kwargs={"max_new_tokens": max_new_tokens, "num_beams": num_beams}),
            batch_size=batch_size, concurrency=min(num_actors, blocks), num_cpus=num_cpus, num_gpus=num_gpus,
        )
    )  # fmt: skip
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell():  # a torn last line from a crash: start on a fresh line
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        for block in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            for row, failed in zip(block["row"], block["failed"]):
                handle.write(row.encode("utf-8") + b"\n")
                summary["failed" if failed else "transcribed"] += 1
            handle.flush()
            os.fsync(handle.fileno())
    return summary


def main(argv: list[str] | None = None) -> int:
    from ..cli_options import add_decoding_arguments, add_model_arguments

    parser = argparse.ArgumentParser(prog="python -m speechlm.serving.ray_batch", description=__doc__.split("\n")[0])
    parser.add_argument("manifest", help='JSONL: {"audio": path, "id": ...} per line (as speechlm transcribe reads)')
    add_model_arguments(parser)
    add_decoding_arguments(parser, per="chunk")
    parser.add_argument("--output", required=True, help="JSONL of results, appended to (a rerun skips finished ids)")
    parser.add_argument("--actors", type=int, default=1, help="model copies (Ray actors)")
    parser.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per actor (its torch threads)")
    parser.add_argument("--actor-gpus", type=float, default=0.0, help="GPUs per actor (0.5 packs two on one GPU)")
    parser.add_argument("--max-chunk-seconds", type=float, default=25.0, help="longer files are cut on silence")
    parser.add_argument("--retry-errors", action="store_true", help="decode again the ids with an error row")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    args = parser.parse_args(argv)
    ray, _ = require_ray()
    ray.init(address=args.address, logging_level="WARNING")
    summary = transcribe_dataset(
        args.manifest, args.model, args.output, args.actors, args.batch_size, prompt=args.prompt,
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, dtype=args.dtype, device=args.device,
        quantize=args.quantize, max_chunk_seconds=args.max_chunk_seconds, num_cpus=args.actor_cpus,
        num_gpus=args.actor_gpus, retry_errors=args.retry_errors,
    )  # fmt: skip
    for problem in summary["problems"]:
        print(f"error: {problem}", file=sys.stderr)
    print(f"transcribed {summary['transcribed']}, failed {summary['failed']}, skipped {summary['skipped']} "
          f"(already in {args.output})", file=sys.stderr)  # fmt: skip
    return 1 if summary["failed"] or summary["problems"] else 0


__all__ = ["Transcriber", "finished_ids", "manifest_rows", "transcribe_dataset"]

if __name__ == "__main__":
    sys.exit(main())
