"""Inference: load a trained SpeechLM and turn audio into text, batched and sorted by length.

`transcribe_arrays` is the one decoding loop: evaluation, `speechlm transcribe` and the server all call it.
Long recordings are cut on silence by a streaming voice-activity detector (`SilenceSplitter`, silero-vad) into chunks
the encoder can take, so an hours-long file is read, segmented and decoded block by block, never held whole.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from .factory import AUDIO_TOKEN
from .loading import DTYPE_CHOICES, QUANTIZE_CHOICES, add_loading_arguments
from .modeling import SpeechLMModel
from .processing import SpeechLMProcessor


def load_pretrained(path: str, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                    quantize: str | None = None, merge_lora: bool = False):
    """(processor, model) from a folder written by training / `save_pretrained` (model + processor side by side).

    `dtype="auto"` asks the hardware (`resolve_dtype`); `quantize="int8"` quantises the LLM's linear layers for
    decoding (`quantize_language_model`); `merge_lora=True` folds LoRA adapters into the LLM (inference only: less
    work per token).
    """
    device = torch.device(device) if device is not None else None
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    quantize = None if quantize == "none" else quantize
    if quantize and device is not None and device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU only (dynamic int8 kernels), not on {device}")
    dtype = resolve_dtype(dtype, device or "cpu", quantize)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = SpeechLMModel.from_pretrained(path, **kwargs).eval()
    if merge_lora or quantize:
        model.merge_lora()
    if device is not None:
        model = model.to(device)
    if quantize:
        quantize_language_model(model, quantize)
    processor = SpeechLMProcessor.from_pretrained(path)
    return processor, model


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device = "cpu",
                  quantize: str | None = None) -> torch.dtype | None:
    """The dtype to load with: `auto` = what the hardware computes natively (`speechlm.hardware`), None = the
    checkpoint's own. int8 quantisation needs float32 weights to quantise, so it forces float32."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
        if dtype == "auto":
            from .hardware import choose_cpu_dtype, choose_training_dtype

            if quantize:
                return torch.float32
            device = torch.device(device)
            return (choose_cpu_dtype() if device.type == "cpu" else choose_training_dtype(device)).dtype
        dtype = getattr(torch, dtype)
    if quantize and dtype not in (None, torch.float32):
        raise ValueError(f"quantize={quantize!r} quantises float32 weights; drop dtype={dtype} (or use float32)")
    return torch.float32 if quantize else dtype


def quantize_language_model(model: SpeechLMModel, scheme: str = "int8") -> SpeechLMModel:
    """Dynamic int8 quantisation of every linear layer of the LLM (LM head included), in place, for CPU decoding.

    Decoding a small LLM on a CPU is bound by reading its weights once per token; int8 weights read 4x fewer bytes
    (activations are quantised on the fly, per channel weights keep the error small). The encoder and projector
    stay in floating point: they run once per clip. LoRA adapters must be merged first.
    """
    import warnings

    from torch import nn

    if scheme != "int8":
        raise ValueError(f"unsupported quantisation scheme {scheme!r}; supported: int8")
    if any("lora_" in name for name, _ in model.language_model.named_parameters()):
        raise ValueError("merge the LoRA adapters (model.merge_lora()) before quantising the LLM")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch deprecates eager-mode quantisation in favour of torchao (not installed)
        warnings.simplefilter("ignore")
        model.language_model = quantize_dynamic(
            model.language_model.float(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    return model


def default_generation_kwargs(model: SpeechLMModel, **overrides) -> dict:
    """Greedy decoding with a length cap; the caller's options win."""
    kwargs = {"max_new_tokens": 128, "do_sample": False, "num_beams": 1}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if not kwargs.get("do_sample"):
        kwargs.pop("temperature", None)
        kwargs.pop("top_p", None)
    return kwargs


# Config fields that hold a decoder's position limit, by family (GPT-2 and friends say n_positions).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def position_limit(model: SpeechLMModel) -> int | None:
    """The LLM's position limit, or None when its config states none.

    Learned position tables (GPT-2) crash with an `IndexError` past it and rotary models decode garbage, so every
    sequence is checked against it before any work is done.
    """
    config = model.language_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def audio_positions(model: SpeechLMModel, processor: SpeechLMProcessor, num_samples: int) -> int:
    """LLM positions one clip of `num_samples` (at the encoder's rate) takes, start/end markers included.

    Computed from the length alone (no encoder pass), so a request can be refused before it is queued; an upper
    bound when a CTC head compresses the audio.
    """
    length = int(num_samples)
    if processor.audio_input_name == "input_features":  # log-mel frames: one per hop, the last one dropped
        length = length // int(getattr(processor.feature_extractor, "hop_length", 160))
    return int(model.audio_output_lengths(torch.tensor([max(length, 1)]))[0]) + 2


def prompt_positions(processor: SpeechLMProcessor, prompt: str | None = None) -> int:
    """Tokens the prompt adds to the LLM's sequence (as `SpeechLMProcessor` builds it)."""
    text = processor.build_prompt(prompt)
    if not text:
        return 0
    ids = processor.tokenizer(text, add_special_tokens=not processor.use_chat_template)["input_ids"]
    # In the placeholder layout the audio token is replaced by the clip, which `audio_positions` counts.
    return len(ids) - ids.count(processor.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))


def new_token_budget(generate_kwargs: dict) -> int:
    """Tokens `generate` may add with these options (`transcribe_arrays`' default when none is given)."""
    kwargs = default_generation_kwargs(None, **generate_kwargs)
    return int(kwargs.get("max_new_tokens") or kwargs.get("max_length") or 0)


def check_positions(model: SpeechLMModel, audio: int, prompt: int, new_tokens: int, name: str = "audio") -> None:
    """Raise a `ValueError` saying what to shorten when audio + prompt + new tokens exceed the LLM's positions."""
    limit = position_limit(model)
    total = audio + prompt + new_tokens
    if limit is not None and total > limit:
        raise ValueError(
            f"{name}: audio ({audio} positions) + prompt ({prompt} tokens) + max_new_tokens ({new_tokens}) = {total} "
            f"exceeds the LLM's {limit} positions; use shorter audio chunks, a shorter prompt or fewer new tokens"
        )


@torch.no_grad()
def transcribe_arrays(
    model: SpeechLMModel,
    processor: SpeechLMProcessor,
    audios: Sequence[np.ndarray],
    prompt: str | Sequence[str] | None = None,
    batch_size: int = 8,
    **generate_kwargs,
) -> list[str]:
    """Decode clips (1-D float arrays at the encoder's rate) in length-sorted batches; results keep input order.

    Sorting by length keeps padding (wasted compute) small; batched output equals one-by-one output by
    construction of the model, so sorting never changes a transcript. A clip whose audio + prompt + new tokens
    exceed the LLM's positions raises a `ValueError` before anything is generated.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [prompt] * len(audios) if prompt is None or isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(audios):
        raise ValueError(f"{len(audios)} clip(s) but {len(prompts)} prompt(s)")
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    kwargs = default_generation_kwargs(model, **generate_kwargs)
    limit, new_tokens = position_limit(model), new_token_budget(kwargs)
    audio_token = processor.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    device = next(model.parameters()).device
    results: list[str] = [""] * len(audios)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = processor([audios[i] for i in index], prompt=[prompts[i] for i in index])
        if limit is not None:
            audio_lengths = model.audio_output_lengths(batch["attention_mask"].sum(-1)) + 2
            prompt_lengths = batch["decoder_attention_mask"].sum(-1) - (batch["input_ids"] == audio_token).sum(-1)
            for row, i in enumerate(index):
                check_positions(model, int(audio_lengths[row]), int(prompt_lengths[row]), new_tokens, f"clip {i}")
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = model.generate(**batch, **kwargs)
        for i, text in zip(index, processor.batch_decode(tokens)):
            results[i] = text
    return results


# --------------------------------------------------------------------------------------------------------------------
# Long audio: streaming silence splitting


@dataclass
class Segment:
    """A transcribed stretch of a recording; `start`/`end` in seconds from the recording's start."""

    start: float
    end: float
    text: str


@dataclass
class SpeechChunk:
    """Audio cut out of a longer recording, `start` seconds from its beginning, ready for the encoder."""

    start: float
    audio: np.ndarray
    sampling_rate: int

    @property
    def end(self) -> float:
        return self.start + len(self.audio) / self.sampling_rate


def load_vad_model():
    """silero-vad's TorchScript model (shipped inside the package, no download).

    Importing silero_vad calls `torch.set_num_threads(1)` as a side effect; the caller's thread count is restored so
    that loading the VAD does not slow the speech model down.
    """
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
    finally:
        torch.set_num_threads(threads)
    return load_silero_vad(onnx=False)


class SilenceSplitter:
    """Streaming segmentation on silence: `push` blocks of any size, get `SpeechChunk`s as soon as they are complete.

    Speech starts when the VAD probability reaches `threshold` and ends after `min_silence_seconds` below
    `threshold - 0.15` (hysteresis, as in silero's own iterator). Chunks get `speech_pad_seconds` of context on each
    silence side. A stretch of speech longer than `max_chunk_seconds` (padding included) is cut at its quietest frame
    in the second half of the window, preferring frames the VAD calls non-speech, so a chunk always fits the encoder.
    Blips shorter than `min_speech_seconds` are dropped. Only about `max_chunk_seconds` plus one block of audio is
    ever buffered (`peak_buffered_samples` says how much was), whatever the recording's length.

    The VAD runs one 32 ms frame per call, where intra-op threads only add synchronisation (several times slower on a
    busy machine). With `vad_threads` (default 1) torch's thread count is set to it during `push`/`flush` and then
    restored; that setting is process-wide, so pass `vad_threads=None` where other threads run models concurrently.
    """

    def __init__(
        self,
        sampling_rate: int = 16000,
        max_chunk_seconds: float = 25.0,
        min_silence_seconds: float = 0.5,
        min_speech_seconds: float = 0.25,
        speech_pad_seconds: float = 0.2,
        threshold: float = 0.5,
        vad_model=None,
        vad_threads: int | None = 1,
    ):
        if sampling_rate not in (8000, 16000):
            raise ValueError(f"silence splitting (silero-vad) needs 8 or 16 kHz audio, got {sampling_rate} Hz")
        self.sampling_rate = sampling_rate
        self.frame = 512 if sampling_rate == 16000 else 256  # silero's fixed window
        self.pad = round(speech_pad_seconds * sampling_rate)
        self.max_region = round(max_chunk_seconds * sampling_rate) - 2 * self.pad
        if self.max_region < 4 * self.frame:
            raise ValueError(
                f"max_chunk_seconds={max_chunk_seconds:g} leaves no room for speech with "
                f"speech_pad_seconds={speech_pad_seconds:g}"
            )
        self.min_silence = round(min_silence_seconds * sampling_rate)
        self.min_speech = round(min_speech_seconds * sampling_rate)
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.vad = vad_model if vad_model is not None else load_vad_model()
        self.vad.reset_states()
        self.vad_threads = vad_threads
        self.peak_buffered_samples = 0
        self._buffer = np.zeros(0, dtype=np.float32)
        self._offset = 0  # absolute index of _buffer[0]
        self._position = 0  # samples already seen by the VAD
        self._start: int | None = None  # start of the speech region in progress
        self._padded = False  # the region began after silence (so it gets leading context)
        self._silence: int | None = None  # start of the silence inside the region, if any
        self._frames: list[tuple[int, float, float]] = []  # (start, speech probability, rms) of the region's frames
        self._last_end = 0  # end of the last chunk: padding never overlaps it

    def push(self, block: np.ndarray) -> list[SpeechChunk]:
        """Feed the next block of mono float32 audio; returns the chunks it completed (often none)."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        self._buffer = np.concatenate([self._buffer, block]) if self._buffer.size else block
        self.peak_buffered_samples = max(self.peak_buffered_samples, self._buffer.size)
        chunks = []
        end = self._offset + self._buffer.size
        with _torch_threads(self.vad_threads):
            while self._position + self.frame <= end:
                chunks += self._step(self._position)
                self._position += self.frame
        self._trim()
        return chunks

    def flush(self) -> list[SpeechChunk]:
        """End of the recording: the last partial frame and the speech still in progress."""
        end = self._offset + self._buffer.size
        chunks = []
        if self._position < end:
            with _torch_threads(self.vad_threads):
                chunks += self._step(self._position)
            self._position = end
        if self._start is not None:
            stop = self._silence if self._silence is not None else end
            chunks += self._emit(self._start, stop, pad_end=self._silence is not None)
            self._start = None
        self._buffer, self._offset = np.zeros(0, dtype=np.float32), end
        return chunks

    def _slice(self, begin: int, end: int) -> np.ndarray:
        return self._buffer[begin - self._offset : end - self._offset]

    def _step(self, sample: int) -> list[SpeechChunk]:
        frame = self._slice(sample, sample + self.frame)
        rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64))))
        if frame.size < self.frame:
            frame = np.pad(frame, (0, self.frame - frame.size))
        with torch.inference_mode():  # with autograd on, every call of the TorchScript VAD is ~30x slower
            probability = float(self.vad(torch.from_numpy(np.ascontiguousarray(frame)), self.sampling_rate))
        frame_end = sample + self.frame
        if self._start is None:
            if probability >= self.threshold:
                self._start, self._padded, self._silence = sample, True, None
                self._frames = [(sample, probability, rms)]
            return []
        self._frames.append((sample, probability, rms))
        if probability < self.neg_threshold:
            self._silence = sample if self._silence is None else self._silence
        elif probability >= self.threshold:
            self._silence = None
        if self._silence is not None and frame_end - self._silence >= self.min_silence:
            chunks = self._emit(self._start, self._silence, pad_end=True)
            self._start, self._frames = None, []
            return chunks
        if frame_end - self._start >= self.max_region:
            cut = self._quietest_point()
            chunks = self._emit(self._start, cut, pad_end=False)
            self._start, self._padded = cut, False
            self._frames = [entry for entry in self._frames if entry[0] >= cut]
            if self._silence is not None:
                self._silence = max(self._silence, cut)
            return chunks
        return []

    def _quietest_point(self) -> int:
        """Where to cut an over-long region: the quietest frame of its second half, pauses (non-speech) first."""
        earliest = self._start + self.max_region // 2
        candidates = [entry for entry in self._frames if entry[0] >= earliest] or self._frames[-1:]
        pauses = [entry for entry in candidates if entry[1] < self.threshold]
        start, _, _ = min(pauses or candidates, key=lambda entry: entry[2])
        return max(self._start + self.frame, start + self.frame // 2)

    def _emit(self, start: int, stop: int, pad_end: bool) -> list[SpeechChunk]:
        if self._padded and stop - start < self.min_speech:
            return []  # a click or breath, not speech
        begin = max(start - self.pad if self._padded else start, self._last_end, self._offset)
        available = self._offset + self._buffer.size
        end = min(stop + self.pad, available) if pad_end else stop
        self._last_end = end
        return [SpeechChunk(begin / self.sampling_rate, self._slice(begin, end).copy(), self.sampling_rate)]

    def _trim(self) -> None:
        keep = (self._start if self._start is not None else self._position) - self.pad
        keep = min(max(keep, self._offset), self._offset + self._buffer.size)
        if keep > self._offset:
            self._buffer = self._buffer[keep - self._offset :]
            self._offset = keep


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def split_on_silence(blocks: Iterable[np.ndarray], sampling_rate: int = 16000, **options) -> Iterator[SpeechChunk]:
    """Lazily turn a stream of audio blocks into speech chunks (`SilenceSplitter` options as keywords)."""
    splitter = SilenceSplitter(sampling_rate, **options)
    for block in blocks:
        yield from splitter.push(block)
    yield from splitter.flush()


def array_blocks(audio: np.ndarray, block_seconds: float = 4.0, sampling_rate: int = 16000) -> Iterator[np.ndarray]:
    """An in-memory recording as the blocks `split_on_silence` takes (the server's uploads)."""
    size = max(1, round(block_seconds * sampling_rate))
    for start in range(0, len(audio), size):
        yield audio[start : start + size]


def iter_transcribe_chunks(
    model: SpeechLMModel,
    processor: SpeechLMProcessor,
    chunks: Iterable[SpeechChunk],
    prompt: str | None = None,
    batch_size: int = 8,
    **generate_kwargs,
) -> Iterator[Segment]:
    """Decode chunks `batch_size` at a time as they arrive, yielding segments in time order."""
    pending: list[SpeechChunk] = []

    def decode() -> list[Segment]:
        texts = transcribe_arrays(
            model, processor, [chunk.audio for chunk in pending], prompt, batch_size, **generate_kwargs
        )
        return [Segment(round(c.start, 3), round(c.end, 3), text) for c, text in zip(pending, texts)]

    for chunk in chunks:
        pending.append(chunk)
        if len(pending) >= batch_size:
            yield from decode()
            pending = []
    if pending:
        yield from decode()


def iter_transcribe_long(
    model: SpeechLMModel,
    processor: SpeechLMProcessor,
    path: str | Path,
    prompt: str | None = None,
    batch_size: int = 8,
    max_chunk_seconds: float = 25.0,
    min_silence_seconds: float = 0.5,
    speech_pad_seconds: float = 0.2,
    vad_threshold: float = 0.5,
    block_seconds: float = 4.0,
    **generate_kwargs,
) -> Iterator[Segment]:
    """`transcribe_long` as a generator: segments come out while the rest of the file is still unread."""
    from .audio import iter_audio_blocks

    blocks = iter_audio_blocks(path, block_seconds, processor.sampling_rate)
    chunks = split_on_silence(
        blocks,
        processor.sampling_rate,
        max_chunk_seconds=max_chunk_seconds,
        min_silence_seconds=min_silence_seconds,
        speech_pad_seconds=speech_pad_seconds,
        threshold=vad_threshold,
    )
    yield from iter_transcribe_chunks(model, processor, chunks, prompt, batch_size, **generate_kwargs)


def transcribe_long(
    model: SpeechLMModel, processor: SpeechLMProcessor, path: str | Path, prompt: str | None = None, **kwargs
) -> list[Segment]:
    """Transcribe a recording of any length: stream it, cut it on silence, decode the chunks in batches.

    Chunks are at most `max_chunk_seconds` (default 25 s, under Whisper's 30 s window); memory stays at a few
    chunks whatever the file's length. Keywords are `iter_transcribe_long`'s (VAD options, `batch_size`) and
    generation options (`max_new_tokens`, `num_beams`, ...). Raises `AudioError` for unreadable or corrupt files.
    """
    return list(iter_transcribe_long(model, processor, path, prompt, **kwargs))


# --------------------------------------------------------------------------------------------------------------------
# Output formats


def format_timestamp(seconds: float, decimal_marker: str = ".") -> str:
    """HH:MM:SS.mmm (WebVTT) or, with `decimal_marker=","`, HH:MM:SS,mmm (SubRip)."""
    milliseconds = max(0, round(seconds * 1000))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


def segments_text(segments: Sequence[Segment]) -> str:
    return " ".join(segment.text for segment in segments if segment.text).strip()


def segments_to_srt(segments: Sequence[Segment]) -> str:
    """SubRip subtitles; segments without text are left out (subtitle players show empty cues as gaps anyway)."""
    cues = [segment for segment in segments if segment.text]
    return "".join(
        f"{index}\n{format_timestamp(c.start, ',')} --> {format_timestamp(c.end, ',')}\n{c.text}\n\n"
        for index, c in enumerate(cues, 1)
    )


def segments_to_vtt(segments: Sequence[Segment]) -> str:
    """WebVTT subtitles; segments without text are left out."""
    cues = [f"{format_timestamp(c.start)} --> {format_timestamp(c.end)}\n{c.text}\n\n" for c in segments if c.text]
    return "WEBVTT\n\n" + "".join(cues)


# --------------------------------------------------------------------------------------------------------------------
# `speechlm transcribe`

AUDIO_EXTENSIONS = {
    ".aac", ".aif", ".aiff", ".amr", ".flac", ".m4a", ".mka", ".mp3", ".mp4", ".oga", ".ogg", ".opus", ".wav", ".weba",
    ".webm", ".wma",
}  # fmt: skip
MANIFEST_EXTENSIONS = {".jsonl", ".json"}
# Shorter clips are below every encoder's receptive field / STFT window: refused with a clear message up front.
MIN_AUDIO_SECONDS = 0.1


@dataclass
class AudioInput:
    """One file to transcribe: where it is, how messages name it, where its output goes (relative, no suffix)."""

    path: Path
    name: str
    output_stem: Path
    id: str | None = None
    duration: float = 0.0


@dataclass
class Transcript:
    audio: str
    duration: float
    segments: list[Segment] = field(default_factory=list)
    id: str | None = None

    @property
    def text(self) -> str:
        return segments_text(self.segments)

    def render(self, fmt: str, indent: int | None = None) -> str:
        if fmt == "txt":
            return self.text + "\n"
        if fmt == "srt":
            return segments_to_srt(self.segments)
        if fmt == "vtt":
            return segments_to_vtt(self.segments)
        record: dict[str, Any] = {"audio": self.audio} | ({"id": self.id} if self.id is not None else {})
        record |= {"text": self.text, "duration": round(self.duration, 3)}
        record["segments"] = [asdict(segment) for segment in self.segments]
        return json.dumps(record, ensure_ascii=False, indent=indent) + "\n"


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
    from .audio import AudioError, audio_duration, load_audio

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
    parser.add_argument("inputs", nargs="+", help="audio files, folders (recursive) or JSONL manifests")
    parser.add_argument("--model", required=True, help="model folder (model + processor, as saved by training)")
    parser.add_argument("--prompt", default=None, help="instruction for the LLM (default: the processor's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generated tokens per chunk (default 128)")
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--format", choices=["txt", "json", "srt", "vtt"], default="txt")
    parser.add_argument("--output", default="-", help="folder for one output file per input, or - for stdout")
    parser.add_argument(
        "--max-chunk-seconds", type=float, default=25.0,
        help="longer audio is cut on silence (silero-vad) into chunks of at most this length",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_loading_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_for_inference(args: argparse.Namespace, device: str | torch.device):
    """(processor, model) as the CLI options say, LoRA merged (decoding never trains)."""
    return load_pretrained(args.model, dtype=args.dtype, device=device, quantize=args.quantize, merge_lora=True)


def run_transcribe(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    inputs, errors = collect_inputs(args.inputs)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    if not inputs:
        print("error: nothing to transcribe", file=sys.stderr)
        return 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        processor, model = load_for_inference(args, device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    try:  # the longest chunk must fit the LLM's positions: say so now, not after a crash on the first long file
        longest = audio_positions(model, processor, round(args.max_chunk_seconds * processor.sampling_rate))
        check_positions(model, longest, prompt_positions(processor, args.prompt), new_token_budget(generate_kwargs),
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
    "Segment",
    "audio_positions",
    "check_positions",
    "position_limit",
    "prompt_positions",
    "SilenceSplitter",
    "SpeechChunk",
    "default_generation_kwargs",
    "format_timestamp",
    "load_pretrained",
    "quantize_language_model",
    "resolve_dtype",
    "segments_to_srt",
    "segments_to_vtt",
    "split_on_silence",
    "transcribe_arrays",
    "transcribe_files",
    "transcribe_long",
]
