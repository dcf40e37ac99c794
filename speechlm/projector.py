"""The projector: k-frame stacking, an MLP, optionally transformer layers over the clip, into the LLM's embedding
space."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN


def default_stack_factor(frame_rate: float, max_tokens_per_second: float = 12.5) -> int:
    """Smallest stacking factor that gives the LLM at most `max_tokens_per_second` audio tokens per second."""
    return max(1, math.ceil(frame_rate / max_tokens_per_second - 1e-9))


class SpeechLMProjectorLayer(nn.Module):
    """A pre-norm transformer layer (self-attention over one clip's tokens, then an MLP) whose two branches join the
    residual stream through gates that start at zero (ReZero): a fresh layer is the identity, so the projector starts
    as the MLP alone and learns from its first step what the layers add. Ungated, fresh attention layers mixed every
    token with its whole clip and held the demo's CTC pre-alignment on its all-blank plateau for hundreds of steps."""

    def __init__(self, hidden_size: int, act: str = "gelu", dropout: float = 0.0, head_size: int = 64):
        super().__init__()
        self.num_heads = max(1, hidden_size // head_size)
        if hidden_size % self.num_heads:
            raise ValueError(f"projector layers need a width divisible by their {self.num_heads} heads, got "
                             f"{hidden_size}")
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, 4 * hidden_size)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(4 * hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.attention_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens, (B, T) True on padding -> (B, T, D); no token reads another clip's or the padding."""
        batch, length, width = hidden.shape
        qkv = self.qkv(self.attention_norm(hidden)).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=~padding[:, None, None, :],
            dropout_p=self.dropout.p if self.training else 0.0,
        )
        attended = self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))
        hidden = hidden + self.attention_gate * self.dropout(attended)
        return hidden + self.mlp_gate * self.dropout(self.fc2(self.act(self.fc1(self.mlp_norm(hidden)))))


class SpeechLMProjector(nn.Module):
    """Stack `stack_factor` consecutive frames into one vector, normalise, and map it through a 2-layer MLP.

    Stacking cuts the audio tokens the LLM attends to (50 frames/s -> 12.5 tokens/s with k=4) at no loss of
    information, which is where most of a speech LLM's compute goes. The layer norm makes the projector indifferent
    to the encoder's output scale, so one learning rate suits every encoder.

    `num_layers` > 0 puts transformer layers (`SpeechLMProjectorLayer`, width `hidden_size`, heads of 64) between the
    MLP's two linears, as NeMo's modality adapter puts layers after its encoder: the MLP maps each token alone, so
    with a frozen encoder nothing trainable before the LLM relates one token to its neighbours. They attend within
    each clip only (`frame_lengths`), so a padded batch gives each clip what it gets alone.
    """

    def __init__(self, encoder_hidden_size: int, text_hidden_size: int, hidden_size: int, stack_factor: int,
                 dropout: float = 0.0, act: str = "gelu", num_layers: int = 0):
        super().__init__()
        self.stack_factor = stack_factor
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(encoder_hidden_size * stack_factor)
        self.linear_1 = nn.Linear(encoder_hidden_size * stack_factor, hidden_size)
        self.act = ACT2FN[act]
        self.layers = nn.ModuleList(SpeechLMProjectorLayer(hidden_size, act, dropout) for _ in range(num_layers))
        self.linear_2 = nn.Linear(hidden_size, text_hidden_size)

    def output_lengths(self, frame_lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(frame_lengths + self.stack_factor - 1, self.stack_factor, rounding_mode="floor")

    def forward(self, frames: torch.Tensor, frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) encoder frames, zero past each clip's end; (B,) frame counts (needed with layers) ->
        (B, ceil(T / k), text_hidden)."""
        batch, length, dim = frames.shape
        remainder = (-length) % self.stack_factor
        if remainder:
            frames = nn.functional.pad(frames, (0, 0, 0, remainder))
        stacked = frames.reshape(batch, -1, dim * self.stack_factor)
        hidden = self.act(self.linear_1(self.norm(self.dropout(stacked))))
        if self.layers:
            if frame_lengths is None:
                raise ValueError("a projector with layers needs the frame count of each clip (frame_lengths)")
            tokens = self.output_lengths(frame_lengths.to(hidden.device))
            padding = torch.arange(hidden.shape[1], device=hidden.device)[None] >= tokens[:, None]
            for layer in self.layers:
                hidden = layer(hidden, padding)
            hidden = hidden.masked_fill(padding[..., None], 0.0)
        return self.linear_2(hidden)


__all__ = ["SpeechLMProjector", "SpeechLMProjectorLayer", "default_stack_factor"]
