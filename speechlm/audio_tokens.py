"""How many LLM tokens a clip becomes, from the configs alone: the processor's side of the audio token count.

A processor that expands each audio placeholder into exactly the clip's tokens (as Voxtral's and Qwen2-Audio's do,
and as vLLM needs) must know the count without running the encoder. The count is conv arithmetic on the encoder's
input length (samples for waveform encoders, mel frames for Whisper) followed by the projector's k-frame stacking;
a `rule` is that arithmetic as plain JSON, saved with the processor. `tests/test_audio_tokens.py` checks it against
each family's own length function.
"""

from __future__ import annotations

from collections.abc import Sequence


def audio_token_rule(audio_config, stack_factor: int) -> dict:
    """{"convs": [[kernel, stride, padding], ...], "stack_factor": k} for an encoder config."""
    if audio_config.model_type == "whisper":
        convs = [[3, 1, 1], [3, 2, 1]]  # WhisperEncoder's conv1 / conv2
    else:  # the wav2vec2 family: transformers' _get_feat_extract_output_lengths
        convs = [[int(k), int(s), 0] for k, s in zip(audio_config.conv_kernel, audio_config.conv_stride)]
        if getattr(audio_config, "add_adapter", False):
            convs += [[1, int(audio_config.adapter_stride), 0]] * int(audio_config.num_adapter_layers)
    return {"convs": convs, "stack_factor": int(stack_factor)}


def count_audio_tokens(rule: dict, input_lengths: Sequence[int]) -> list[int]:
    """LLM audio tokens (without the start/end markers) for clips of `input_lengths` encoder input units."""
    counts = []
    for length in input_lengths:
        for kernel, stride, padding in rule["convs"]:
            length = (int(length) + 2 * padding - kernel) // stride + 1
        counts.append(max(0, -(-length // rule["stack_factor"])))
    return counts


def expand_audio_placeholders(rows: Sequence[list[int]], label_rows: Sequence[list[int]] | None, audio_token_id: int,
                              counts: Sequence[int]) -> tuple[list[list[int]], list[list[int]] | None]:
    """Each `audio_token_id` in `rows` (row-major, one per clip) -> `count + 2` of them: the clip's start marker,
    its tokens and its end marker, all labelled -100."""
    from .configuration import IGNORE_INDEX

    counts = iter(counts)
    new_rows, new_labels = [], []
    for index, ids in enumerate(rows):
        labels = label_rows[index] if label_rows is not None else [IGNORE_INDEX] * len(ids)
        row, row_labels = [], []
        for token, label in zip(ids, labels):
            repeat = next(counts) + 2 if token == audio_token_id else 1
            row += [token] * repeat
            row_labels += [IGNORE_INDEX if token == audio_token_id else label] * repeat
        new_rows.append(row)
        new_labels.append(row_labels)
    return new_rows, new_labels if label_rows is not None else None


__all__ = ["audio_token_rule", "count_audio_tokens", "expand_audio_placeholders"]
