"""Records -> `SpeechLMDataset` items -> `SpeechLMCollator` batches, exactly what `SpeechLMProcessor` produces.

Batches are the processor's own output, so training sees the same features as inference. With a frozen encoder,
an `EncoderCache` (`speechlm.data.encoder_cache`) holds each clip's encoder frames and the collator feeds them back
as `encoder_frames`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..audio import load_audio, validate_audio

if TYPE_CHECKING:
    from .encoder_cache import EncoderCache
    from .manifests import Manifest


def load_record_audio(record: Mapping[str, Any], sampling_rate: int) -> np.ndarray:
    """A record's audio as mono float32 at `sampling_rate` (the encoder's rate), augmented as its `augment` says."""
    if record.get("messages") is not None:
        raise ValueError(f"{record.get('location')}: a chat row (messages) has no single audio clip; load it through "
                         "SpeechLMDataset, which decodes every clip of the chat")
    audio = record["audio"]
    if isinstance(audio, np.ndarray):
        audio = validate_audio(audio, record["sampling_rate"], name=record["location"],
                               target_sampling_rate=sampling_rate)
    elif isinstance(audio, bytes):
        audio = load_audio(audio, sampling_rate, name=record.get("name") or record.get("location"))
    else:
        audio = load_audio(audio, sampling_rate)
    if record.get("augment"):
        from .augment import augment_audio

        audio = augment_audio(audio, sampling_rate, record["augment"])
    return audio


def resolve_prompt(record: Mapping[str, Any], task_prompts: Mapping[str, str] | None = None) -> str | None:
    """The record's own prompt, else its task's prompt, else None (the processor's default prompt).

    A chat row's instruction is in its messages: its `task` only labels it (e.g. for per-task loss), so it needs
    no prompt.
    """
    if record.get("messages") is not None:
        return None
    if record.get("prompt") is not None:
        return record["prompt"]
    task = record.get("task")
    if task is not None and task_prompts:
        if task not in task_prompts:
            raise KeyError(f"{record.get('location')}: task {task!r} has no prompt; known: {sorted(task_prompts)}")
        return task_prompts[task]
    return None


class SpeechLMDataset(torch.utils.data.Dataset):
    """Records -> `{"audio": float32 array at the encoder's rate, "text", "prompt", "task", "id"}`, decoded on access;
    a chat row -> `{"messages": its chat with every clip decoded, "text", "task", "id"}`.

    With an `encoder_cache` that holds a clip, the item carries its `cache_key` instead of audio, so a cached epoch
    decodes no audio at all. Chat rows cannot use the cache (their clips are not cached one by one yet).
    `audio_layout="prefix"` checks now that every chat row has exactly the one clip that layout takes.
    `lengths` replaces the durations for length-grouped batching (e.g. the frame counts of cached clips).
    """

    def __init__(self, records: Manifest | Sequence[dict], sampling_rate: int,
                 task_prompts: Mapping[str, str] | None = None, encoder_cache: EncoderCache | None = None,
                 audio_layout: str | None = None, lengths: Sequence[int] | None = None):
        self.records = list(records)
        if lengths is not None and len(lengths) != len(self.records):
            raise ValueError(f"{len(lengths)} lengths for {len(self.records)} records")
        self._lengths = None if lengths is None else [int(n) for n in lengths]
        self.sampling_rate = int(sampling_rate)
        self.task_prompts = dict(task_prompts or {})
        self.encoder_cache = encoder_cache
        for record in self.records:  # fail now, not at step 10 000, on a task without a prompt
            resolve_prompt(record, self.task_prompts)
        chats = [r for r in self.records if r.get("messages") is not None]
        if chats and encoder_cache is not None:
            raise ValueError(
                f"{chats[0]['location']}: the encoder cache does not support chat rows ('messages') yet: train "
                "without it (data.encoder_cache: null)"
            )
        if audio_layout == "prefix":
            bad = [r["location"] for r in chats if sum(len(m.clips) for m in r["messages"]) != 1]
            if bad:
                raise ValueError(
                    f"{len(bad)} chat row(s) without exactly one audio clip, e.g. {bad[0]}: the prefix audio layout "
                    "takes one clip per conversation; build the model with audio_layout='placeholder' for several"
                )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """Per-clip lengths in milliseconds for length-grouped batching (text length when the duration is unknown),
        or the `lengths` given."""
        if self._lengths is not None:
            return self._lengths
        return [
            int(1000 * r["duration"]) if r.get("duration") else 60 * len(r["text"]) for r in self.records
        ]

    def load_audio(self, index: int) -> np.ndarray:
        return load_record_audio(self.records[index], self.sampling_rate)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        if record.get("messages") is not None:
            return {"messages": self._decoded_chat(record), "text": record["text"], "task": record.get("task"),
                    "id": record["id"]}
        item = {"text": record["text"], "prompt": resolve_prompt(record, self.task_prompts),
                "task": record.get("task"), "id": record["id"], "transcript": record.get("transcript")}
        if self.encoder_cache is not None:
            key = self.encoder_cache.key(record)
            if key in self.encoder_cache:
                item["cache_key"] = key
                return item
        item["audio"] = self.load_audio(index)
        return item


    def _decoded_chat(self, record: Mapping[str, Any]) -> list[dict]:
        """The record's chat in the message format, every clip decoded to the encoder's rate."""
        from ..chat import AudioPart, load_clip

        messages = []
        for message in record["messages"]:
            content = [
                {"type": "audio", "audio": load_clip(part, self.sampling_rate), "sampling_rate": self.sampling_rate}
                if isinstance(part, AudioPart) else {"type": "text", "text": part}
                for part in message.parts
            ]
            messages.append({"role": message.role, "content": content})
        return messages


# A batch's text-only rows (`SpeechLMCollator(text_rows=...)`): never inputs of the model's audio pass.
TEXT_ROW_KEYS = ("text_input_ids", "text_attention_mask", "text_labels")


class SpeechLMCollator:
    """Items -> exactly what `SpeechLMModel.forward` takes: the processor's output, or cached encoder frames + text.

    The audio path is `processor(audios, text=targets, prompt=prompts)` itself, so training batches cannot drift
    from what inference feeds the model; chat items go through the processor's chat template path
    (`apply_chat_template(..., return_labels=True)`), and a plain item in the same batch is encoded exactly as alone.

    An item whose `transcript` differs from its `text` (an understanding answer learned from the clip) gives the
    batch `ctc_labels`: every row's transcript, for a CTC alignment head. `frame_masking` > 0 zeroes that fraction of
    whole frames and of channels of cached encoder frames (SpecAugment on the encoder output; the labels stay).
    `distillation=True` adds the text-only teacher's rows (`speechlm.training.distillation`): the same prompt and
    answer with each item's transcript where its clip stands.

    `text_examples` (`{"prompt", "text", "transcript"}` dicts) with `text_rows` > 0 add that many text-only rows to
    every batch (`TEXT_ROW_KEYS`), drawn in turn from a seeded shuffle: the transcript stands where a clip would and
    the model learns the answer from the words alone. Text is free where audio is not, so an instruction's mapping
    (words -> intent and slots) can see many more sentences than the clips carry; the trainer adds their loss. The
    draw is the collator's own: a run resumed from a checkpoint starts the shuffle again.
    """

    def __init__(self, processor, encoder_cache: EncoderCache | None = None, frame_masking: float = 0.0,
                 distillation: bool = False, text_examples: Sequence[Mapping[str, str]] = (), text_rows: int = 0,
                 seed: int = 0):
        if not 0 <= frame_masking < 1:
            raise ValueError(f"frame_masking must be in [0, 1), got {frame_masking}")
        if text_rows < 0:
            raise ValueError(f"text_rows must be >= 0, got {text_rows}")
        if text_rows and not text_examples:
            raise ValueError(f"text_rows={text_rows} needs text_examples to draw them from")
        for index, example in enumerate(text_examples):
            missing = [key for key in ("prompt", "text", "transcript") if not example.get(key)]
            if missing:
                raise ValueError(f"text example {index} lacks {', '.join(missing)}: a text-only row needs the "
                                 "instruction, the answer and the words that stand where the clip would")
        self.processor = processor
        self.encoder_cache = encoder_cache
        self.frame_masking = frame_masking
        self.distillation = distillation
        self.text_examples, self.text_rows = list(text_examples), text_rows
        self._text_order = np.random.default_rng(seed).permutation(len(self.text_examples)).tolist()
        self._text_next = 0

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if any(f.get("messages") is not None for f in features):
            return self._with_chats(features)
        texts = [f["text"] for f in features]
        prompts = [f.get("prompt") for f in features]
        cached = ["cache_key" in f and "audio" not in f for f in features]
        if not any(cached):
            batch = dict(self.processor([f["audio"] for f in features], text=texts, prompt=prompts))
            return self._with_transcripts(batch, features, prompts)
        if not all(cached) or self.encoder_cache is None:
            raise ValueError("a batch mixes cached and uncached clips: fill the EncoderCache before training")
        frames = [self.encoder_cache.get(f["cache_key"]) for f in features]
        lengths = torch.tensor([f.shape[0] for f in frames], dtype=torch.long)
        padded = frames[0].new_zeros(len(frames), int(lengths.max()), frames[0].shape[-1])
        for index, clip in enumerate(frames):
            padded[index, : clip.shape[0]] = clip
        if self.frame_masking > 0:
            padded *= torch.rand(padded.shape[0], padded.shape[1], 1) >= self.frame_masking
            padded *= torch.rand(padded.shape[0], 1, padded.shape[2]) >= self.frame_masking
        batch = {"encoder_frames": padded, "encoder_frame_lengths": lengths}
        batch.update(self.processor.encode_text([self.processor.build_prompt(p) for p in prompts], texts))
        return self._with_transcripts(batch, features, prompts)

    def next_text_rows(self) -> dict[str, torch.Tensor]:
        """The next `text_rows` text-only examples as `TEXT_ROW_KEYS` tensors (the shuffle cycles)."""
        chosen = []
        for _ in range(self.text_rows):
            chosen.append(self.text_examples[self._text_order[self._text_next % len(self._text_order)]])
            self._text_next += 1
        built = [self.processor.build_prompt(e["prompt"], audio_text=e["transcript"]) for e in chosen]
        rows = self.processor.encode_text(built, [e["text"] for e in chosen])
        return dict(zip(TEXT_ROW_KEYS, (rows["input_ids"], rows["decoder_attention_mask"], rows["labels"])))

    def _with_transcripts(self, batch: dict, features: Sequence[Mapping[str, Any]], prompts: list) -> dict:
        if self.text_rows:
            batch.update(self.next_text_rows())
        texts = [f["text"] for f in features]
        transcripts = [f.get("transcript") or f["text"] for f in features]
        if transcripts != texts:
            built = [self.processor.build_prompt(p) for p in prompts]
            batch["ctc_labels"] = self.processor.encode_text(built, transcripts)["labels"]
        if self.distillation:
            from ..tasks import TRANSCRIPTION_TASKS

            for feature in features:
                if not feature.get("transcript") and feature.get("task") not in (None, *TRANSCRIPTION_TASKS):
                    raise ValueError(f"{feature.get('id')}: distillation needs the `transcript` of a "
                                     f"{feature['task']!r} example (the text-only teacher would read its answer in "
                                     "place of the clip)")
            built = [self.processor.build_prompt(p, audio_text=t) for p, t in zip(prompts, transcripts)]
            teacher = self.processor.encode_text(built, texts)
            batch.update(teacher_input_ids=teacher["input_ids"], teacher_attention_mask=teacher[
                "decoder_attention_mask"], teacher_labels=teacher["labels"])
        return batch

    def _with_chats(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        from ..chat import ChatError

        processor = self.processor
        if self.distillation:
            raise ValueError("distillation needs each example's transcript in place of its one clip: chat rows "
                             "(`messages`) are not supported; train them without distillation")
        if any("audio" not in f and f.get("messages") is None for f in features):
            raise ValueError("chat rows cannot be batched with cached encoder frames: train without the encoder cache")
        clips, rows, label_rows = [], [], []
        for index, feature in enumerate(features):
            if feature.get("messages") is None:
                clips.append(feature["audio"])
                ids, labels = processor._text_row(processor.build_prompt(feature.get("prompt")), feature["text"])
            else:
                try:
                    parsed = processor._parse_chat(feature["messages"], index, max_clips=None)
                    chat_clips, (ids,), (labels,) = processor._chat_rows([parsed], add_generation_prompt=False,
                                                                         return_labels=True)
                except ChatError as error:
                    raise ValueError(f"{feature.get('id')}: {error}") from None
                clips += chat_clips
            rows.append(ids)
            label_rows.append(labels)
        batch = processor._pack(clips, rows, label_rows)
        return {**batch, **self.next_text_rows()} if self.text_rows else batch
