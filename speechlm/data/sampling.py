"""Duration-grouped batches: clips of similar duration batched together (less padding), the same order on resume."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler


class DurationGroupedSampler(LengthGroupedSampler):
    """transformers' `LengthGroupedSampler` on known durations, reseeded from `seed + epoch` at every epoch.

    Durations come from the manifest (the stock sampler decodes every item to measure it). Seeding per epoch instead
    of drawing from one running generator makes epoch `e`'s order a function of `e` alone, so a run resumed from a
    checkpoint sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int = 0):
        super().__init__(batch_size, lengths=list(lengths))
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator = torch.Generator().manual_seed(self.seed + epoch)
