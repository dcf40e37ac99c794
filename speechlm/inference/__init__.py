"""Inference: load a trained SpeechLM and turn audio into text, one concept per module.

- `decoding`: `transcribe_arrays`, the one decoding loop (evaluation, `speechlm transcribe` and the server call it),
  with the LLM's position limits and the default generation options;
- `structured`: answers held to a JSON schema while decoding (`transcribe_arrays(..., json_schema=...)`, the
  server's `response_format`);
- `segmentation`: long audio cut on silence by a streaming VAD (`SilenceSplitter`) and decoded chunk by chunk;
- `formats`: timed segments as text, SubRip, WebVTT and JSON;
- `cli`: `speechlm transcribe` (inputs, manifests, writing the outputs);
- loading lives in `speechlm.loading`, the options shared with `evaluate` and `serve` in `speechlm.cli_options`.

Every name is also importable from here (`from speechlm.inference import transcribe_arrays`), resolved on first use
so that building the `transcribe` parser imports neither torch nor the model code.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_HOMES = {
    "speechlm.inference.decoding": (
        "MIN_AUDIO_SECONDS", "audio_positions", "check_positions", "default_generation_kwargs", "new_token_budget",
        "position_limit", "prompt_positions", "transcribe_arrays",
    ),
    "speechlm.inference.structured": (
        "JSON_OBJECT_SCHEMA", "JsonSchemaLogitsProcessor", "first_quoted", "quoted_throughout", "read_schema_file",
        "regex_grammar", "schema_grammar", "with_json_schema",
    ),
    "speechlm.inference.segmentation": (
        "SilenceSplitter", "SpeechChunk", "array_blocks", "iter_transcribe_chunks", "iter_transcribe_long",
        "load_vad_model", "split_on_silence", "transcribe_long",
    ),
    "speechlm.inference.formats": (
        "Segment", "Transcript", "format_timestamp", "segments_text", "segments_to_srt", "segments_to_vtt",
    ),
    "speechlm.inference.cli": (
        "AUDIO_EXTENSIONS", "MANIFEST_EXTENSIONS", "MAX_ID_BYTES", "AudioInput", "TranscriptWriter",
        "add_transcribe_arguments", "collect_inputs", "run_transcribe", "transcribe_files", "add_arguments", "run",
    ),
    "speechlm.loading": (
        "DTYPE_CHOICES", "QUANTIZE_CHOICES", "load_pretrained", "quantize_language_model", "resolve_dtype",
        "resolve_quantize",
    ),
    "speechlm.cli_options": ("load_for_inference",),
}  # fmt: skip
_WHERE, __getattr__, __dir__ = lazy_exports(__name__, globals(), _HOMES)

__all__ = sorted(set(_WHERE) - {"add_arguments", "run"})

