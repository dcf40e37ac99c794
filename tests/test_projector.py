"""The projector (speechlm/projector.py): k-frame stacking, layer norm, a 2-layer MLP into the LLM's embeddings,
optionally transformer layers over each clip."""

from __future__ import annotations

import math

import pytest
import torch

from speechlm.projector import SpeechLMProjector, default_stack_factor

DIM, TEXT = 6, 10


@pytest.fixture
def projector():
    torch.manual_seed(0)
    return SpeechLMProjector(DIM, TEXT, hidden_size=16, stack_factor=4).double().eval()


def test_a_clip_of_t_frames_becomes_ceil_t_over_k_tokens(projector):
    for frames in range(1, 14):
        tokens = projector(torch.randn(1, frames, DIM, dtype=torch.float64)).shape[1]
        assert tokens == math.ceil(frames / 4) == int(projector.output_lengths(torch.tensor([frames]))[0]), frames


def test_zero_frames_past_a_clip_do_not_change_its_tokens(projector):
    """In a batch padded to the longest clip, a 5-frame clip's 2 tokens are those of the clip alone: the stacking
    groups frames 0-3 and 4-7 of each clip, so the padding only fills the clip's own last token (as alone)."""
    clip = torch.randn(1, 5, DIM, dtype=torch.float64)
    batch = torch.zeros(2, 12, DIM, dtype=torch.float64)
    batch[0, :5], batch[1] = clip[0], torch.randn(12, DIM, dtype=torch.float64)
    with torch.no_grad():
        alone, together = projector(clip), projector(batch)
    torch.testing.assert_close(together[0, :2], alone[0], rtol=0, atol=1e-12)


def test_the_encoder_output_scale_does_not_matter(projector):
    frames = torch.randn(2, 8, DIM, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(projector(frames * 40.0), projector(frames), rtol=1e-4, atol=1e-4)


@pytest.fixture
def layered():
    torch.manual_seed(0)
    projector = SpeechLMProjector(DIM, TEXT, hidden_size=16, stack_factor=4, num_layers=2).double().eval()
    for param in projector.parameters():
        param.data.normal_(0, 0.5)  # far from the near-identity start, so attention really mixes tokens
    return projector


def test_layers_give_a_clip_in_a_padded_batch_what_it_gets_alone(layered):
    """The attention must not read the padding tokens of a shorter clip, nor the rest of the batch."""
    clip = torch.randn(1, 9, DIM, dtype=torch.float64)
    batch = torch.zeros(2, 30, DIM, dtype=torch.float64)
    batch[0, :9], batch[1] = clip[0], torch.randn(30, DIM, dtype=torch.float64)
    with torch.no_grad():
        alone = layered(clip, torch.tensor([9]))
        together = layered(batch, torch.tensor([9, 30]))
    torch.testing.assert_close(together[0, :3], alone[0], rtol=0, atol=1e-12)


def test_layers_let_each_token_depend_on_the_rest_of_its_clip(projector, layered):
    """The MLP alone reads each token from its own frames; with layers the first token hears the last frames."""
    frames = torch.randn(1, 16, DIM, dtype=torch.float64)
    changed = frames.clone()
    changed[0, -4:] = torch.randn(4, DIM, dtype=torch.float64)
    lengths = torch.tensor([16])
    with torch.no_grad():
        assert torch.equal(projector(frames)[0, 0], projector(changed)[0, 0])
        assert not torch.allclose(layered(frames, lengths)[0, 0], layered(changed, lengths)[0, 0])


def test_fresh_layers_start_as_the_identity():
    """Zero-gated branches: a new projector with layers maps every clip token as the MLP alone does, so adding layers
    does not throw away what the MLP would learn from its first step."""
    torch.manual_seed(0)
    projector = SpeechLMProjector(DIM, TEXT, hidden_size=128, stack_factor=4, num_layers=2).double().eval()
    frames = torch.randn(2, 12, DIM, dtype=torch.float64)
    frames[1, 5:] = 0.0
    with torch.no_grad():
        layered = projector(frames, torch.tensor([12, 5]))
        projector.layers = torch.nn.ModuleList()
        alone = projector(frames)
    torch.testing.assert_close(layered[0], alone[0], rtol=0, atol=0)
    torch.testing.assert_close(layered[1, :2], alone[1, :2], rtol=0, atol=0)


def test_layers_without_frame_counts_are_refused(layered):
    with pytest.raises(ValueError, match="frame_lengths"):
        layered(torch.randn(1, 8, DIM, dtype=torch.float64))


@pytest.mark.parametrize(("frame_rate", "expected"), [(50.0, 4), (49.9, 4), (12.5, 1), (13.0, 2), (100.0, 8), (5, 1)])
def test_default_stack_factor_is_the_smallest_giving_at_most_12_5_tokens_per_second(frame_rate, expected):
    k = default_stack_factor(frame_rate)
    assert k == expected
    assert frame_rate / k <= 12.5 and (k == 1 or frame_rate / (k - 1) > 12.5)
