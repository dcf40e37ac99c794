"""`speechlm transcribe`: files, folders and JSONL manifests in; txt, json, srt or vtt out, one file per input.

Short files are decoded in length-sorted batches, long ones through the silence splitter (`segmentation`). Torch and
the model code are imported when a command runs, not when its parser is built, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..cli_options import (
    add_decoding_arguments,
    add_joint_ctc_argument,
    add_length_cap_argument,
    add_model_arguments,
    add_prefer_quoted_argument,
    beams_for_prefer_quoted,
    generation_options,
    joint_ctc_weight_for,
    load_or_explain,
)
from .formats import Segment, Transcript

if TYPE_CHECKING:
    import numpy as np

    from ..modeling import SpeechLMModel
    from ..processing import SpeechLMProcessor

AUDIO_EXTENSIONS = {
    ".aac", ".aif", ".aiff", ".amr", ".flac", ".m4a", ".mka", ".mp3", ".mp4", ".oga", ".ogg", ".opus", ".wav", ".weba",
    ".webm", ".wma",
}  # fmt: skip
MANIFEST_EXTENSIONS = {".jsonl", ".json"}


@dataclass
class AudioInput:
    """One file to transcribe: where it is, how messages name it, where its output goes (relative, no suffix)."""

    path: Path
    name: str
    output_stem: Path
    id: str | None = None
    duration: float = 0.0


def _safe_relative(path: Path) -> Path:
    """`path` with anchors and `..` removed, so outputs stay inside the output folder."""
    parts = [part for part in path.parts if part not in ("", ".", "..", path.anchor)]
    return Path(*parts) if parts else Path("audio")


MAX_ID_BYTES = 200  # ids name output files: well under the 255-byte file-name limit with an extension added


def _manifest_inputs(manifest: Path) -> tuple[list[AudioInput], list[str]]:
    inputs, errors = [], []
    with open(manifest, "rb") as handle:  # bytes: a line that is not UTF-8 is reported, the others go on
        for number, data in enumerate(handle, 1):
            if not data.strip():
                continue
            where = f"{manifest}:{number}"
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as error:
                errors.append(f"{where}: not UTF-8 text (byte {error.start + 1} of the line)")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                errors.append(f"{where}: not valid JSON ({error.msg})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("audio"), str):
                errors.append(f'{where}: expected an object with an "audio" path')
                continue
            audio = Path(record["audio"])
            path = audio if audio.is_absolute() else manifest.parent / audio
            identifier = None if record.get("id") is None else str(record["id"])
            if identifier is not None and (len(identifier.encode()) > MAX_ID_BYTES
                                           or any(unicodedata.category(ch)[0] == "C" for ch in identifier)):
                errors.append(f'{where}: "id" must be at most {MAX_ID_BYTES} bytes without control characters '
                              "(it names the output files)")
                continue
            stem = Path(identifier) if identifier else audio.with_suffix("")
            inputs.append(AudioInput(path, str(path), _safe_relative(stem), identifier))
    return inputs, errors


def collect_inputs(sources: Sequence[str]) -> tuple[list[AudioInput], list[str]]:
    """Files, folders (searched recursively for audio extensions) and JSONL manifests -> inputs + error lines."""
    inputs: list[AudioInput] = []
    errors: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
            if not files:
                errors.append(f"{source}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) in this folder")
            inputs += [AudioInput(p, str(p), p.relative_to(path).with_suffix("")) for p in files]
        elif path.suffix.lower() in MANIFEST_EXTENSIONS and path.is_file():
            found, problems = _manifest_inputs(path)
            inputs += found
            errors += problems
        elif path.exists():
            inputs.append(AudioInput(path, source, Path(path.stem)))
        else:
            errors.append(f"{source}: file not found")
    return inputs, errors


class TranscriptWriter:
    """Writes each transcript as it is ready: one file per input under a folder, or stdout in input order.

    Decoding runs in length order; stdout keeps the input order with a small reorder buffer of finished texts.
    """

    def __init__(self, fmt: str, output: str, inputs: Sequence[AudioInput], stream: TextIO | None = None):
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stdout
        self.directory = None if output == "-" else Path(output)
        self.inputs = inputs
        self.ready: dict[int, Transcript | None] = {}
        self.next_index = 0
        self.paths: dict[int, Path] = {}
        if self.directory is not None:
            used: set[Path] = set()
            for index, item in enumerate(inputs):
                candidate, number = item.output_stem, 1
                while candidate in used:
                    number += 1
                    candidate = item.output_stem.with_name(f"{item.output_stem.name}-{number}")
                used.add(candidate)
                self.paths[index] = self.directory / f"{candidate}.{fmt}"

    def write(self, index: int, transcript: Transcript | None) -> None:
        """Record input `index`'s transcript (None when it failed)."""
        if self.directory is not None:
            if transcript is not None:
                path = self.paths[index]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(transcript.render(self.fmt, indent=2), encoding="utf-8")
            return
        self.ready[index] = transcript
        while self.next_index in self.ready:
            done = self.ready.pop(self.next_index)
            if done is not None:
                if len(self.inputs) > 1 and self.fmt != "json":
                    self.stream.write(f"==> {done.audio} <==\n")
                self.stream.write(done.render(self.fmt))
                self.stream.flush()
            self.next_index += 1


def _decode_batch(model, processor, audios: list[np.ndarray], prompt, batch_size, generate_kwargs) -> list:
    """Texts, or the exception of each clip the model rejects: a failed batch is retried clip by clip."""
    from .decoding import transcribe_arrays

    try:
        return transcribe_arrays(model, processor, audios, prompt, batch_size, **generate_kwargs)
    except (ValueError, RuntimeError):
        if len(audios) == 1:
            raise
    results: list = []
    for audio in audios:
        try:
            results += transcribe_arrays(model, processor, [audio], prompt, 1, **generate_kwargs)
        except (ValueError, RuntimeError) as error:
            results.append(error)
    return results


def transcribe_files(
    model: SpeechLMModel,
    processor: SpeechLMProcessor,
    inputs: Sequence[AudioInput],
    on_result: Callable[[int, Transcript | None], None],
    on_error: Callable[[str], None],
    prompt: str | None = None,
    batch_size: int = 8,
    max_chunk_seconds: float = 25.0,
    progress: Any = None,
    **generate_kwargs,
) -> int:
    """Transcribe every input, reporting each result (by input index) as soon as it exists; returns #failures.

    Files up to `max_chunk_seconds` are sorted by their header duration and loaded and decoded `batch_size` at a
    time, so memory holds one batch whatever the number of files; longer files go through `iter_transcribe_long`.
    A file that cannot be read or decoded is reported through `on_error` and skipped. `progress` is a tqdm-like bar
    counting milliseconds of audio (whole numbers, so the parts add up to the total exactly); its total is set once
    the headers have been read.
    """
    from ..audio import AudioError, audio_duration, load_audio
    from .decoding import MIN_AUDIO_SECONDS, STRUCTURES
    from .segmentation import iter_transcribe_long

    failures = 0

    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    def advance(milliseconds: int) -> None:
        if progress is not None and milliseconds:
            progress.update(milliseconds)

    def fail(index: int, message: str) -> None:
        nonlocal failures
        failures += 1
        on_error(message)
        on_result(index, None)
        advance(ms(inputs[index].duration))

    short, long = [], []
    for index, item in enumerate(inputs):
        try:
            item.duration = audio_duration(item.path, name=item.name)
        except AudioError as error:
            fail(index, str(error))
            continue
        held = [flag for flag in STRUCTURES if generate_kwargs.get(flag) is not None]
        if item.duration > max_chunk_seconds and held:
            fail(index, f"{item.name}: {item.duration:.1f} s is longer than --max-chunk-seconds "
                        f"({max_chunk_seconds:g} s); an answer held to --{held[0].replace('_', '-')} covers one "
                        "clip, not a file cut in chunks")
            continue
        (short if item.duration <= max_chunk_seconds else long).append(index)
    short.sort(key=lambda index: inputs[index].duration)
    if progress is not None:
        progress.total = sum(ms(item.duration) for item in inputs)
        progress.refresh()

    for start in range(0, len(short), batch_size):
        loaded = []
        for index in short[start : start + batch_size]:
            try:
                item = inputs[index]
                audio = load_audio(item.path, processor.sampling_rate, name=item.name, min_seconds=MIN_AUDIO_SECONDS)
                loaded.append((index, audio))
            except AudioError as error:
                fail(index, str(error))
        if not loaded:
            continue
        results = _decode_batch(model, processor, [a for _, a in loaded], prompt, batch_size, generate_kwargs)
        for (index, audio), text in zip(loaded, results):
            item = inputs[index]
            if isinstance(text, Exception):
                fail(index, f"{item.name}: {text}")
                continue
            duration = len(audio) / processor.sampling_rate
            on_result(index, Transcript(item.name, duration, [Segment(0.0, round(duration, 3), text)], item.id))
            advance(ms(item.duration))

    for index in long:
        item = inputs[index]
        segments, done = [], 0
        try:
            for segment in iter_transcribe_long(
                model, processor, item.path, prompt, batch_size, max_chunk_seconds, **generate_kwargs
            ):
                segments.append(segment)
                reached = min(ms(segment.end), ms(item.duration))
                advance(max(0, reached - done))
                done = max(done, reached)
        except (AudioError, ValueError, RuntimeError) as error:
            advance(-done)
            fail(index, str(error) if isinstance(error, AudioError) else f"{item.name}: {error}")
            continue
        on_result(index, Transcript(item.name, item.duration, segments, item.id))
        advance(ms(item.duration) - done)
    return failures


def add_transcribe_arguments(parser: argparse.ArgumentParser) -> None:
    """`speechlm transcribe`'s flags: the shared model and decoding options (`speechlm.cli_options`) plus its own."""
    parser.add_argument("inputs", nargs="+", help="audio files, folders (recursive) or JSONL manifests")
    add_model_arguments(parser)
    add_decoding_arguments(parser, per="chunk")
    add_length_cap_argument(parser, per="chunk")
    add_joint_ctc_argument(parser)
    parser.add_argument("--format", choices=["txt", "json", "srt", "vtt"], default="txt", help="output format")
    parser.add_argument("--output", default="-", help="folder for one output file per input, or - for stdout")
    parser.add_argument(
        "--max-chunk-seconds", type=float, default=25.0,
        help="longer audio is cut on silence (silero-vad) into chunks of at most this length",
    )  # fmt: skip
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--json-schema", default=None, metavar="SCHEMA.json",
                      help="hold each answer to this JSON schema while decoding (with a --prompt that asks for it, "
                           "e.g. intent and slots); files longer than --max-chunk-seconds are then refused "
                           "(default: free text)")
    held.add_argument("--regex", default=None, metavar="PATTERN",
                      help="hold each answer to this regular expression while decoding (a short answer: a time, a "
                           "digit string, one of a list of names); files longer than --max-chunk-seconds are then "
                           "refused (default: free text)")
    add_prefer_quoted_argument(parser, "answers held to --json-schema")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_transcribe(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .decoding import audio_positions, check_positions, new_token_budget, prompt_positions
    from .structured import WORDS_FROM, quoting

    inputs, errors = collect_inputs(args.inputs)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    if not inputs:
        print("error: nothing to transcribe", file=sys.stderr)
        return 1
    held = {}  # checked before the model loads
    if args.json_schema is not None:
        from .structured import read_schema_file

        try:
            held["json_schema"] = read_schema_file(args.json_schema)
        except ValueError as error:
            print(f"error: --json-schema {error}", file=sys.stderr)
            return 2
    if args.regex is not None:
        from .structured import regex_grammar

        try:
            regex_grammar(args.regex)
        except ValueError as error:
            print(f"error: --regex: {error}", file=sys.stderr)
            return 2
        held["regex"] = args.regex
    if args.prefer_quoted and not quoting(held.get("json_schema")):
        print(f"error: --prefer-quoted needs a --json-schema that quotes its values from a transcript ({WORDS_FROM!r})",
              file=sys.stderr)  # fmt: skip
        return 2
    if (loaded := load_or_explain(args)) is None:
        return 2
    processor, model = loaded
    if not beams_for_prefer_quoted(args, model):
        return 2
    generate_kwargs = generation_options(args) | ({"prefer_quoted": True} if args.prefer_quoted else {})
    if args.tokens_per_second is not None:
        generate_kwargs["tokens_per_second"] = args.tokens_per_second
    if (joint_ctc_weight := joint_ctc_weight_for(args, model)) is None:
        return 2
    if joint_ctc_weight:
        generate_kwargs["joint_ctc_weight"] = joint_ctc_weight
    generate_kwargs.update(held)
    try:  # the longest chunk must fit the LLM's positions: say so now, not after a crash on the first long file
        longest = audio_positions(model, processor, round(args.max_chunk_seconds * processor.sampling_rate))
        check_positions(model, longest, prompt_positions(processor, args.prompt),
                        new_token_budget(generate_kwargs, model),
                        f"a {args.max_chunk_seconds:g} s chunk (--max-chunk-seconds)")  # fmt: skip
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    writer = TranscriptWriter(args.format, args.output, inputs)
    # Counts milliseconds of audio, shown as seconds: the rate is then audio seconds per second (x real time).
    bar_options = {"unit": "s", "unit_scale": 0.001, "disable": True if args.quiet else None, "file": sys.stderr}
    with tqdm(**bar_options) as bar:
        failures = transcribe_files(
            model, processor, inputs, writer.write, lambda message: bar.write(f"error: {message}", file=sys.stderr),
            args.prompt, args.batch_size, args.max_chunk_seconds, progress=bar, **generate_kwargs,
        )  # fmt: skip
    failed = failures + len(errors)
    print(f"transcribed {len(inputs) - failures} file(s), {failed} failed", file=sys.stderr)
    return 1 if failed else 0


add_arguments = add_transcribe_arguments
run = run_transcribe

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioInput",
    "TranscriptWriter",
    "add_transcribe_arguments",
    "collect_inputs",
    "run_transcribe",
    "transcribe_files",
]
