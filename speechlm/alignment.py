"""CTC alignment of the projector against the LLM's own embedding matrix: a cheap training signal for the projector.

The LLM loss only tells the projector, through a full LLM pass, how the whole answer came out. Scoring each projected
audio token against every row of the (frozen) input embedding matrix and aligning the sequence to the transcript with
CTC gives a dense per-token signal that pulls audio tokens toward the text embeddings the LLM already reads, at the
cost of one matmul per token and no LLM pass. Used alone before the LLM loss (pre-alignment) or added to it.

The same scores can also shorten what the LLM reads (`compress`): audio tokens the head calls blank are dropped and
runs of one label are averaged into one token, so the LLM sees about one audio token per text token instead of 12.5
per second (CTC compression, as in Gaido et al. 2021 and the "CTC prompts" of Tsunoo et al. 2024).
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration import IGNORE_INDEX


class CTCAlignmentHead(nn.Module):
    """Cosine scores against the vocabulary with a learned temperature, plus a learned blank direction.

    Cosine rather than raw dot products: embedding rows differ in norm; on the demo, dot products left the loss near
    6 nats per token after 900 steps of batch 8, cosine with a learned scale reached 3.6 after 250 of batch 16.
    """

    def __init__(self, hidden_size: int, ignore_token_ids: list[int] | tuple[int, ...] = (), scale: float = 10.0,
                 vocabulary_ids: list[int] | tuple[int, ...] | None = None):
        super().__init__()
        self.initial_scale = float(scale)
        self.blank = nn.Parameter(torch.empty(hidden_size))
        self.blank_bias = nn.Parameter(torch.empty(()))
        self.scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()
        self.ignore_token_ids = sorted(set(ignore_token_ids))
        # Optional class set: only the tokens a corpus uses (e.g. ~1k of 49k), so the vocabulary matmul is cheap.
        ids = sorted(set(vocabulary_ids)) if vocabulary_ids is not None else None
        # Persistent: a full checkpoint is loaded onto meta tensors, which only the state dict fills back in.
        self.register_buffer("vocabulary_ids", torch.tensor(ids) if ids is not None else None)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.blank.normal_(std=self.blank.shape[0] ** -0.5)
            self.blank_bias.zero_()
            self.scale.fill_(self.initial_scale)

    def targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transcript tokens per row (labelled positions minus special tokens such as EOS) and their counts."""
        keep = labels != IGNORE_INDEX
        if self.ignore_token_ids:
            keep &= ~torch.isin(labels, torch.tensor(self.ignore_token_ids, device=labels.device))
        return labels[keep], keep.sum(-1)

    def scores(self, embeds: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """(B, A, 1 + classes) scores of projected audio tokens `embeds` against the LLM's input embedding matrix,
        blank = class 0."""
        vocabulary = embedding_weight.detach()
        if self.vocabulary_ids is not None:
            vocabulary = vocabulary[self.vocabulary_ids]
        vocabulary = nn.functional.normalize(vocabulary.float(), dim=-1)
        directions = nn.functional.normalize(embeds.float(), dim=-1)
        token_logits = self.scale * (directions @ vocabulary.T)
        blank_logits = self.scale * (directions @ nn.functional.normalize(self.blank.float(), dim=0)) + self.blank_bias
        return torch.cat([blank_logits[..., None], token_logits], dim=-1)

    def logits(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of every projected audio token of `batch`, (B, A, 1 + classes) with blank = class 0, and the
        audio token counts per row."""
        embeds, lengths = model.get_audio_features(
            batch.get(model.audio_input_name), batch.get("attention_mask"),
            encoder_frames=batch.get("encoder_frames"), encoder_frame_lengths=batch.get("encoder_frame_lengths"),
        )  # fmt: skip
        return self.scores(embeds, model.get_input_embeddings().weight), lengths

    @torch.no_grad()
    def segments(self, scores: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy CTC segmentation: (B, A) segment index of each audio token (-1: blank or padding) and (B,) segment
        counts. A segment is a run of one non-blank label; a blank between two equal labels starts a new one. A clip
        the head hears nothing in keeps its least blank token, so no clip vanishes from the LLM's input."""
        best = scores.argmax(-1)
        valid = torch.arange(best.shape[1], device=best.device)[None] < lengths.to(best.device)[:, None]
        kept = (best != 0) & valid
        silent = ~kept.any(1)
        if bool(silent.any()):
            not_blank = (scores[..., 1:].max(-1).values - scores[..., 0]).masked_fill(~valid, float("-inf"))
            kept[silent, not_blank[silent].argmax(-1)] = True
        previous = nn.functional.pad(best[:, :-1], (1, 0), value=-1)
        previous_kept = nn.functional.pad(kept[:, :-1], (1, 0), value=False)
        starts = kept & ~(previous_kept & (previous == best))
        index = (starts.long().cumsum(1) - 1).masked_fill(~kept, -1)
        return index, starts.sum(1)

    def compress(self, embeds: torch.Tensor, lengths: torch.Tensor, embedding_weight: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the audio tokens the head calls blank and average each run of one label into one token.

        (B, A, D) embeddings + (B,) counts -> (B, S, D) + (B,) segment counts, zero past each row's end. The choice
        of tokens is discrete; gradients reach every kept token through the average.
        """
        index, counts = self.segments(self.scores(embeds, embedding_weight), lengths)
        rows = torch.arange(embeds.shape[0], device=embeds.device)[:, None].expand_as(index)
        kept = index >= 0
        width = max(int(counts.max()), 1)
        summed = embeds.new_zeros(embeds.shape[0], width, embeds.shape[-1])
        summed = summed.index_put((rows[kept], index[kept]), embeds[kept], accumulate=True)
        sizes = torch.zeros(embeds.shape[0], width, device=embeds.device, dtype=embeds.dtype)
        sizes = sizes.index_put((rows[kept], index[kept]), torch.ones_like(index[kept], dtype=embeds.dtype),
                                accumulate=True)
        return summed / sizes.clamp(min=1)[..., None], counts

    def forward(self, model, batch: dict) -> torch.Tensor:
        """Mean CTC loss per target token of `batch` (the model's usual training inputs, labels included); a batch's
        `ctc_labels`, when present, replace `labels` as targets (the transcript, when the LLM learns another answer)."""
        labels = batch.get("ctc_labels", batch.get("labels"))
        if labels is None:
            raise ValueError("CTC alignment needs labels: the transcript tokens to align the audio with")
        logits, lengths = self.logits(model, batch)
        targets, target_lengths = self.targets(labels.to(logits.device))
        if self.vocabulary_ids is not None:
            classes = torch.searchsorted(self.vocabulary_ids, targets).clamp(max=len(self.vocabulary_ids) - 1)
            if (self.vocabulary_ids[classes] != targets).any():
                missing = sorted(set(targets.tolist()) - set(self.vocabulary_ids.tolist()))
                raise ValueError(f"label token ids {missing[:10]} are not in the CTC head's vocabulary_ids")
            targets = classes
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # (A, B, V + 1)
        loss = nn.functional.ctc_loss(log_probs, targets + 1, lengths, target_lengths, blank=0,
                                      reduction="sum", zero_infinity=True)
        return loss / target_lengths.sum().clamp(min=1)

    def greedy_token_ids(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Greedy CTC decoding of `logits()`: best class per audio token, repeats merged, blanks dropped, classes
        mapped back to the LLM's token ids. Shows what the projector alone carries, without the LLM."""
        decoded = []
        for best, length in zip(logits.argmax(-1).tolist(), lengths.tolist()):
            classes = [c for i, c in enumerate(best[:length]) if c != 0 and (i == 0 or c != best[i - 1])]
            ids = [c - 1 for c in classes]
            decoded.append(self.vocabulary_ids[ids].tolist() if self.vocabulary_ids is not None else ids)
        return decoded


__all__ = ["CTCAlignmentHead"]
