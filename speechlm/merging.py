"""Splicing encoded audio into the text: the one operation that turns a speech batch into an LLM batch.

A pure function of tensors (the model passes its embedding table and learned start/end embeddings), vectorised so
that a batch is merged without a Python loop over samples. Kept out of `modeling` because it is data layout, not
architecture: the padding side, the placeholder count and the label masking are decided here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .configuration import IGNORE_INDEX


@dataclass
class MergedInputs:
    """The LLM-side view of a batch: what `merge_audio_and_text` produces."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count only attended tokens, so left padding never shifts them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def merge_audio_and_text(
    embed_layer: nn.Module,
    audio_start: torch.Tensor,
    audio_end: torch.Tensor,
    audio_embeds: torch.Tensor,
    audio_lengths: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    padding_side: str | None = None,
    *,
    audio_token_id: int | None,
    audio_layout: str,
) -> MergedInputs:
    """Splice clips into the text, drop padding, pad the batch; labels are -100 on audio positions.

    `audio_embeds` (N, A, D) holds N clips of `audio_lengths` real tokens each; every clip is framed by `audio_start`
    and `audio_end`. In the "placeholder" `audio_layout` each `audio_token_id` in `input_ids` takes the next clip
    (row-major order). In the "prefix" layout a placeholder is implied before each sample's text, so both layouts
    share this code path.

    `padding_side` defaults to "left" (generation appends on the right) without labels and to "right" with them.
    A left pad slot is a query that attends to no key at all (causal and padding masks together); transformers 5
    no longer patches such rows, and CUDA attention kernels mishandle them: cuDNN SDPA (the default backend for
    bf16/fp16 on H100/H200 since torch 2.11) returns NaN gradients whenever a row's logsumexp is -inf and the
    width is 64 mod 128: the cause of our bf16 CUDA runs turning NaN after 25-300 steps (confirmed on an H200 by
    benchmarks/gpu_check.py: left-padded training went NaN on its first such batch, right-padded trained on). A
    right pad slot attends to the real tokens before it, so a loss pass never holds such a row; the real tokens see
    exactly the same keys.
    """
    num_clips = audio_embeds.shape[0]
    if input_ids is None:
        if audio_layout == "placeholder":
            raise ValueError("the placeholder layout needs input_ids containing the audio token")
        input_ids = torch.empty((num_clips, 0), dtype=torch.long, device=audio_embeds.device)
    if text_mask is None:
        text_mask = torch.ones_like(input_ids)
    if text_mask.shape != input_ids.shape:
        raise ValueError(
            f"decoder_attention_mask shape {tuple(text_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    audio_token = audio_token_id
    if audio_layout == "prefix":
        if input_ids.shape[0] != num_clips:
            raise ValueError(
                f"batch size mismatch: {num_clips} audio clip(s) but {input_ids.shape[0]} text sequence(s)"
            )
        if audio_token is not None and bool((input_ids == audio_token).any()):
            raise ValueError("input_ids contain the audio token but the model uses the prefix audio layout")
        audio_token = -1 if audio_token is None else audio_token
        column = torch.full((num_clips, 1), audio_token, dtype=input_ids.dtype, device=input_ids.device)
        input_ids = torch.cat([column, input_ids], dim=1)
        text_mask = torch.cat([torch.ones_like(column), text_mask], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full_like(column, IGNORE_INDEX), labels], dim=1)

    batch, text_len = input_ids.shape
    is_audio = (input_ids == audio_token) & text_mask.bool()
    found, expanded = (int(n) for n in torch.stack([is_audio.sum(), (audio_lengths + 2).sum().to(is_audio.device)]))
    if found == expanded and found != num_clips:
        return scatter_expanded_audio(embed_layer, audio_start, audio_end, audio_embeds, audio_lengths, input_ids,
                                      text_mask, labels, is_audio)
    if found != num_clips:
        raise ValueError(f"found {found} audio placeholder(s) in input_ids but {num_clips} clip(s), which take one "
                         f"placeholder each, or {expanded} when the processor expands them (each clip's tokens + "
                         "start/end)")

    # How many output slots each input token expands to: 0 (padding), 1 (text), or start + audio + end.
    flat_audio = is_audio.flatten()
    counts = text_mask.flatten().long() * (~flat_audio)
    counts = counts.masked_scatter(flat_audio, audio_lengths.to(counts.device) + 2)
    seq_lens = counts.view(batch, text_len).sum(1)
    width = int(seq_lens.max())
    total = int(counts.sum())
    device = input_ids.device

    slot = torch.arange(total, device=device)
    token = torch.repeat_interleave(torch.arange(batch * text_len, device=device), counts)
    within = slot - (counts.cumsum(0) - counts)[token]
    sample = token // text_len
    sample_start = seq_lens.cumsum(0) - seq_lens
    if padding_side is None:
        padding_side = "left" if labels is None else "right"
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    pad = (width - seq_lens)[sample] if padding_side == "left" else 0
    dest = sample * width + pad + (slot - sample_start[sample])

    # Gather every output row from one bank: text embeddings, audio frames, start, end, and a zero row.
    safe_ids = input_ids.masked_fill(is_audio | ~text_mask.bool() | (input_ids < 0), 0)
    text_embeds = embed_layer(safe_ids)
    dim = text_embeds.shape[-1]
    audio_embeds = audio_embeds.to(text_embeds.dtype)
    n_text, n_audio = batch * text_len, audio_embeds.shape[0] * audio_embeds.shape[1]
    bank = torch.cat([
        text_embeds.reshape(n_text, dim),
        audio_embeds.reshape(n_audio, dim),
        audio_start.to(text_embeds.dtype)[None],
        audio_end.to(text_embeds.dtype)[None],
        text_embeds.new_zeros(1, dim),
    ])
    source = token.clone()
    audio_slot = flat_audio[token]
    clip = (flat_audio.long().cumsum(0) - 1)[token[audio_slot]]
    offset = within[audio_slot]
    clip_len = audio_lengths.to(device)[clip]
    source[audio_slot] = n_text + _framed_clip_rows(clip, offset, clip_len, audio_embeds.shape)
    index = torch.full((batch * width,), n_text + n_audio + 2, device=device, dtype=torch.long)
    index[dest] = source
    inputs_embeds = bank.index_select(0, index).view(batch, width, dim)

    attention_mask = torch.zeros(batch * width, device=device, dtype=torch.long)
    attention_mask[dest] = 1
    attention_mask = attention_mask.view(batch, width)
    merged_labels = None
    if labels is not None:
        merged_labels = torch.full((batch * width,), IGNORE_INDEX, device=device, dtype=torch.long)
        text_slot = ~audio_slot
        merged_labels[dest[text_slot]] = labels.flatten()[token[text_slot]]
        merged_labels = merged_labels.view(batch, width)
    _check_labels(merged_labels)
    return MergedInputs(inputs_embeds, attention_mask, position_ids_from_mask(attention_mask), merged_labels)


def scatter_expanded_audio(
    embed_layer: nn.Module, audio_start: torch.Tensor, audio_end: torch.Tensor, audio_embeds: torch.Tensor,
    audio_lengths: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor, labels: torch.Tensor | None,
    is_audio: torch.Tensor,
) -> MergedInputs:
    """The processor already expanded each clip's placeholder into start + its tokens + end: `masked_scatter` the
    framed clips into those positions and keep the processor's layout and padding as they are.

    Gives the same embeddings, mask and positions per sample as the one-placeholder merge (tested); the count was
    checked by the caller. CTC compression cannot take this path: its token count depends on what the head hears.
    """
    device = input_ids.device
    spans = audio_lengths.to(device) + 2
    clip = torch.repeat_interleave(torch.arange(len(spans), device=device), spans)
    within = torch.arange(int(clip.numel()), device=device) - (spans.cumsum(0) - spans)[clip]
    text_embeds = embed_layer(input_ids.masked_fill(is_audio | ~text_mask.bool() | (input_ids < 0), 0))
    audio_embeds = audio_embeds.to(text_embeds.dtype)
    n_audio = audio_embeds.shape[0] * audio_embeds.shape[1]
    bank = torch.cat([audio_embeds.reshape(n_audio, -1), audio_start.to(text_embeds.dtype)[None],
                      audio_end.to(text_embeds.dtype)[None]])
    source = _framed_clip_rows(clip, within, spans[clip] - 2, audio_embeds.shape)
    inputs_embeds = text_embeds.masked_scatter(is_audio[..., None], bank.index_select(0, source))
    attention_mask = text_mask.long()
    merged_labels = None if labels is None else labels.masked_fill(is_audio | ~text_mask.bool(), IGNORE_INDEX)
    _check_labels(merged_labels)
    return MergedInputs(inputs_embeds, attention_mask, position_ids_from_mask(attention_mask), merged_labels)


def _framed_clip_rows(clip: torch.Tensor, offset: torch.Tensor, clip_len: torch.Tensor,
                      shape: torch.Size) -> torch.Tensor:
    """Rows of a bank [all clips' frames (N*A) | start | end] for slot `offset` of a framed clip: 0 is the start
    marker, `clip_len + 1` the end marker, anything between the clip's frame `offset - 1`."""
    n_audio = shape[0] * shape[1]
    rows = clip * shape[1] + offset - 1
    return torch.where(offset == 0, n_audio, torch.where(offset == clip_len + 1, n_audio + 1, rows))


def _check_labels(labels: torch.Tensor | None) -> None:
    if labels is None:
        return
    no_text = ((labels != IGNORE_INDEX).sum(1) == 0).nonzero().flatten().tolist()
    if no_text:
        raise ValueError(f"labels of sample(s) {no_text} contain no text tokens (all -100): there is nothing to learn")


__all__ = ["MergedInputs", "merge_audio_and_text", "position_ids_from_mask", "scatter_expanded_audio"]
