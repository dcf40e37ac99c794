"""The projector: k-frame stacking, then an MLP into the LLM's embedding space."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN


def default_stack_factor(frame_rate: float, max_tokens_per_second: float = 12.5) -> int:
    """Smallest stacking factor that gives the LLM at most `max_tokens_per_second` audio tokens per second."""
    return max(1, math.ceil(frame_rate / max_tokens_per_second - 1e-9))


class SpeechLMProjector(nn.Module):
    """Stack `stack_factor` consecutive frames into one vector, normalise, and map it through a 2-layer MLP.

    Stacking cuts the audio tokens the LLM attends to (50 frames/s -> 12.5 tokens/s with k=4) at no loss of
    information, which is where most of a speech LLM's compute goes. The layer norm makes the projector indifferent
    to the encoder's output scale, so one learning rate suits every encoder.
    """

    def __init__(self, encoder_hidden_size: int, text_hidden_size: int, hidden_size: int, stack_factor: int,
                 dropout: float = 0.0, act: str = "gelu"):
        super().__init__()
        self.stack_factor = stack_factor
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(encoder_hidden_size * stack_factor)
        self.linear_1 = nn.Linear(encoder_hidden_size * stack_factor, hidden_size)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(hidden_size, text_hidden_size)

    def output_lengths(self, frame_lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(frame_lengths + self.stack_factor - 1, self.stack_factor, rounding_mode="floor")

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) encoder frames, zero past each clip's end -> (B, ceil(T / k), text_hidden)."""
        batch, length, dim = frames.shape
        remainder = (-length) % self.stack_factor
        if remainder:
            frames = nn.functional.pad(frames, (0, 0, 0, remainder))
        stacked = frames.reshape(batch, -1, dim * self.stack_factor)
        hidden = self.act(self.linear_1(self.norm(self.dropout(stacked))))
        return self.linear_2(hidden)


__all__ = ["SpeechLMProjector", "default_stack_factor"]
