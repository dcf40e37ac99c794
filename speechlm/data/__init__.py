"""Training data: JSONL manifests and Hugging Face datasets -> records -> `SpeechLMDataset` -> `SpeechLMCollator`.

A manifest is JSON Lines, one utterance a line: `{"audio": path, "text": ..., "prompt"?: ..., "task"?: ...,
"id"?: ..., "duration"?: seconds, "augment"?: "speed=0.9,telephone,..."}`, or a chat `{"messages": [...],
"task"?: ..., "id"?: ...}` whose user messages carry audio parts (`speechlm.chat`; the loss then covers the
assistant messages only, and one manifest may mix both kinds of rows); relative audio paths resolve against the
manifest's folder, so a corpus folder can be moved as a whole; `augment` (`speechlm.data.augment`) names a fixed
waveform augmentation of the clip (speed, room, noise, phone line). Every problem is reported as
`file:line: problem`; `on_error="skip"` drops the bad lines and logs how many were skipped and why (never
silently), `on_error="raise"` lists them all in one `ManifestError`.

Batches are exactly what `SpeechLMProcessor` produces, so training sees the same features as inference;
`DurationGroupedSampler` batches clips of similar duration together (less padding). With a
frozen encoder, `EncoderCache` stores each clip's encoder frames once and the collator feeds them back as
`encoder_frames` every epoch (the encoder is usually most of the compute of a projector/LoRA run).

Text-only examples (`read_text_examples`: JSONL rows of `{"transcript", "text", "prompt"? / "task"?}`) join every
batch as extra rows with the words where a clip would stand (`SpeechLMCollator(text_examples=..., text_rows=N)`):
text is free where audio is not, so an instruction's mapping can see more sentences than the clips carry.

The package, one concept a module: `manifests` (`read_manifest`, `read_text_examples`, `records_from_dataset`,
`load_records`, `Manifest` and its errors), `records` (one raw entry -> a record: fields, audio values, chat rows),
`dataset` (`SpeechLMDataset`, `SpeechLMCollator`, `TEXT_ROW_KEYS`, `resolve_prompt`, `load_record_audio`),
`sampling` (`DurationGroupedSampler`), `encoder_cache` (`EncoderCache`, `encoder_fingerprint`), `augment`
(`augment_audio`, `parse_augment`: a record's fixed waveform augmentation). Every name is also importable from here
(`from speechlm.data import read_manifest`), resolved on first use: `import speechlm.data` itself imports none of
them (nor torch).
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_HOMES = {
    "speechlm.data.manifests": (
        "ON_ERROR_CHOICES", "Manifest", "ManifestError", "ManifestIssue", "load_records", "read_manifest",
        "read_text_examples", "records_from_dataset",
    ),
    "speechlm.data.dataset": ("TEXT_ROW_KEYS", "SpeechLMCollator", "SpeechLMDataset", "load_record_audio",
                              "resolve_prompt"),
    "speechlm.data.sampling": ("DurationGroupedSampler",),
    "speechlm.data.encoder_cache": ("EncoderCache", "encoder_fingerprint"),
    "speechlm.data.augment": ("augment_audio", "parse_augment"),
}  # fmt: skip
_WHERE, __getattr__, __dir__ = lazy_exports(__name__, globals(), _HOMES)

__all__ = sorted(set(_WHERE) - {"ON_ERROR_CHOICES"})

