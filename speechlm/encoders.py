"""Per-family audio encoder adapters: the one home of "any encoder".

Each adapter knows four things about its family: the input kind (`input_values` waveform or `input_features`
log-mel), its output frame rate, its output lengths (from the encoder's own conv arithmetic, never a guessed
`len // 320`), and how to run a padded batch so that every clip gets exactly what it would get alone.

Families whose padded batch is exact (padding zeroed and masked everywhere) run batched. Families where padding
leaks into real frames (group-norm feature encoders normalise over the whole padded length, stacked positional
convolutions smear padding into the last real frames) run each clip on its real length, grouped by equal length.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig, WhisperFeatureExtractor

WAVEFORM_SAMPLING_RATE = 16_000
WHISPER_MEL_FRAMES_PER_SECOND = 100


class AudioTooShortError(ValueError):
    """A clip shorter than what the encoder (or its feature extractor's analysis window) can turn into one frame."""

    def __init__(self, clips: list[int], lengths: list[int], minimum: int, unit: str):
        self.clips, self.lengths, self.minimum = clips, lengths, minimum
        super().__init__(
            f"audio clip(s) {clips} have {lengths} {unit}, shorter than the encoder's receptive field "
            f"({minimum} {unit}); empty or too-short audio cannot be encoded"
        )


def min_audio_samples(feature_extractor) -> int:
    """Fewest waveform samples a feature extractor turns into at least one frame.

    A Whisper-style log-mel extractor reflect-pads its STFT by `n_fft // 2` (torch raises a bare RuntimeError on
    anything shorter) and drops the last frame, so it needs `max(n_fft // 2 + 1, hop_length)` samples. Waveform
    extractors pass samples through; the model checks their conv receptive field.
    """
    n_fft, hop = getattr(feature_extractor, "n_fft", None), getattr(feature_extractor, "hop_length", None)
    if n_fft is None or hop is None:
        return 1
    return max(n_fft // 2 + 1, hop)


def check_audio_samples(lengths: list[int], feature_extractor, first_index: int = 0) -> None:
    """Raise `AudioTooShortError` (naming the clips) for clips the feature extractor cannot handle."""
    minimum = min_audio_samples(feature_extractor)
    short = [(first_index + i, n) for i, n in enumerate(lengths) if n < minimum]
    if short:
        raise AudioTooShortError([i for i, _ in short], [n for _, n in short], minimum, "samples")


class AudioEncoderAdapter:
    """Base adapter; subclasses fill in the family specifics."""

    input_name: str = "input_values"
    exact_batching: bool = True

    def __init__(self, config: PreTrainedConfig):
        self.config = config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def frame_rate(self) -> float:
        """Encoder output frames per second of audio."""
        raise NotImplementedError

    def output_lengths(self, encoder: nn.Module, input_lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def min_input_length(self, encoder: nn.Module) -> int:
        """Smallest input length (samples or mel frames) that yields one output frame (computed once: the conv
        arithmetic never changes, and counting up sample by sample on every forward cost hundreds of tiny ops)."""
        if getattr(self, "_min_input_length", None) is None:
            length = 1
            while self.output_lengths(encoder, torch.tensor([length])).item() < 1:
                length += 1
            self._min_input_length = length
        return self._min_input_length

    def max_input_length(self) -> int | None:
        return None

    def build(self) -> nn.Module:
        return AutoModel.from_config(self.config)

    def load(self, name_or_path: str, **kwargs) -> nn.Module:
        return AutoModel.from_pretrained(name_or_path, **kwargs)

    def encode(self, encoder: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, ..., T_in) padded inputs + lengths -> (B, T_out, D); frames past each clip's length are zero."""
        if self.exact_batching:
            hidden = self._forward(encoder, inputs, lengths)
        else:
            hidden = self._forward_by_length(encoder, inputs, lengths)
        out_lengths = self.output_lengths(encoder, lengths)
        frame_mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < out_lengths[:, None]
        return hidden * frame_mask[..., None].to(hidden.dtype)

    def _forward(self, encoder: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_by_length(self, encoder: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run clips of equal length together, each trimmed to its real length, then re-pad the outputs."""
        out_lengths = self.output_lengths(encoder, lengths)
        outputs = None
        for length in torch.unique(lengths).tolist():
            index = (lengths == length).nonzero().squeeze(1)
            group = inputs.index_select(0, index)[..., :length]
            hidden = self._forward(encoder, group, lengths.index_select(0, index))
            if outputs is None:
                outputs = hidden.new_zeros(inputs.shape[0], int(out_lengths.max()), hidden.shape[-1])
            outputs[index, : hidden.shape[1]] = hidden
        return outputs


class Wav2Vec2StyleAdapter(AudioEncoderAdapter):
    """Wav2Vec2 / MMS / HuBERT / WavLM / Data2VecAudio / UniSpeech: raw 16 kHz waveform, conv feature encoder."""

    input_name = "input_values"

    def __init__(self, config: PreTrainedConfig):
        super().__init__(config)
        # Group-norm feature encoders (wav2vec2-base) normalise over the padded length and were trained without a
        # mask; Data2VecAudio's stacked positional convs spread padding into real frames. Both run per length.
        group_norm = getattr(config, "feat_extract_norm", "layer") == "group"
        self.uses_attention_mask = not group_norm
        self.exact_batching = not group_norm and config.model_type != "data2vec-audio"

    @property
    def frame_rate(self) -> float:
        stride = 1
        for s in self.config.conv_stride:
            stride *= s
        if getattr(self.config, "add_adapter", False):
            stride *= self.config.adapter_stride ** self.config.num_adapter_layers
        return WAVEFORM_SAMPLING_RATE / stride

    def output_lengths(self, encoder: nn.Module, input_lengths: torch.Tensor) -> torch.Tensor:
        return encoder._get_feat_extract_output_lengths(input_lengths).long()

    def _forward(self, encoder: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(inputs.shape[-1], device=inputs.device)[None, :] < lengths[:, None]
        inputs = inputs * mask.to(inputs.dtype)
        attention_mask = mask.long() if self.uses_attention_mask else None
        return encoder(inputs, attention_mask=attention_mask).last_hidden_state


class WhisperStyleAdapter(AudioEncoderAdapter):
    """Whisper encoder run on the real audio length instead of transformers' mandatory 30 s.

    Padding to 30 s costs 10x compute and 10x audio tokens for a 3 s clip. Here padded mel frames are zeroed
    before each conv (matching the conv's own zero padding on a single clip) and masked in self-attention, so a
    padded batch gives each clip exactly its single-clip output.
    """

    input_name = "input_features"

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    @property
    def frame_rate(self) -> float:
        return WHISPER_MEL_FRAMES_PER_SECOND / 2

    def output_lengths(self, encoder: nn.Module, input_lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(input_lengths - 1, 2, rounding_mode="floor") + 1

    def max_input_length(self) -> int:
        return self.config.max_source_positions * 2

    def build(self) -> nn.Module:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(self.config)

    def load(self, name_or_path: str, **kwargs) -> nn.Module:
        from transformers import WhisperModel

        from .converters.ctranslate2 import is_ctranslate2_whisper, load_ctranslate2_whisper_encoder

        if is_ctranslate2_whisper(name_or_path):
            return load_ctranslate2_whisper_encoder(name_or_path, dtype=_as_dtype(kwargs.get("dtype")))
        return WhisperModel.from_pretrained(name_or_path, **kwargs).get_encoder()

    def _forward(self, encoder: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        frames = torch.arange(inputs.shape[-1], device=inputs.device)[None, :] < lengths[:, None]
        frames = frames[:, None, :].to(inputs.dtype)
        hidden = nn.functional.gelu(encoder.conv1(inputs * frames)) * frames
        hidden = nn.functional.gelu(encoder.conv2(hidden)).transpose(1, 2)
        hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]].to(hidden.dtype)
        hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)

        valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < self.output_lengths(encoder, lengths)[
            :, None
        ]
        attention_mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        attention_mask = attention_mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)
        attention_mask = attention_mask[:, None, None, :].expand(-1, 1, hidden.shape[1], -1)
        for layer in encoder.layers:
            if encoder.training and encoder.layerdrop > 0 and torch.rand([]) < encoder.layerdrop:
                continue
            hidden = layer(hidden, attention_mask)
        return encoder.layer_norm(hidden)


class ExactWhisperFeatureExtractor(WhisperFeatureExtractor):
    """`WhisperFeatureExtractor` whose batches give every clip exactly the features and frame count it gets alone.

    The stock extractor computes a padded batch at once: a shorter clip's last STFT window sees the padding instead
    of its own reflection, and its attention mask is the sample mask strided by `hop_length` (57 frames for a
    9,000-sample clip in a batch, 56 alone), so a clip's tokens depended on its batch-mates. Here each clip is also
    extracted alone and its valid frames and mask are written into the stock output, whose shape and padding stay
    what the caller asked for. Saved as a plain `WhisperFeatureExtractor`, so a saved folder needs no speechlm to
    load; `SpeechLMProcessor` extracts clip by clip anyway.
    """

    def __call__(self, raw_speech, *args, **kwargs):
        bound = inspect.signature(WhisperFeatureExtractor.__call__).bind(self, raw_speech, *args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        batched = (isinstance(raw_speech, np.ndarray) and raw_speech.ndim > 1) or (
            isinstance(raw_speech, list | tuple) and len(raw_speech) > 0
            and isinstance(raw_speech[0], np.ndarray | tuple | list)
        )
        clips = [np.asarray(clip, dtype=np.float32) for clip in raw_speech] if batched else [
            np.asarray(raw_speech, dtype=np.float32)]
        if any(clip.ndim != 1 for clip in clips):
            return super().__call__(raw_speech, *args, **kwargs)
        check_audio_samples([clip.shape[-1] for clip in clips], self)
        output = super().__call__(raw_speech, *args, **kwargs)
        features, mask = output["input_features"], output.get("attention_mask")
        for index, clip in enumerate(clips):
            alone = super().__call__(
                clip, sampling_rate=options["sampling_rate"], padding="longest", truncation=False,
                return_attention_mask=False, return_tensors="np", do_normalize=options["do_normalize"],
                device=options["device"],
            )["input_features"][0]
            frames = min(alone.shape[-1], features[index].shape[-1])
            row = features[index]
            alone = alone[..., :frames]
            row[..., :frames] = torch.from_numpy(alone).to(row) if isinstance(row, torch.Tensor) else alone
            if mask is not None:
                mask[index][:] = 0
                mask[index][:frames] = 1
        return output

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["feature_extractor_type"] = WhisperFeatureExtractor.__name__
        return output


def exact_feature_extractor(feature_extractor):
    """The batch-exact version of a feature extractor (Whisper's); waveform extractors already are exact."""
    if type(feature_extractor) is WhisperFeatureExtractor:
        return ExactWhisperFeatureExtractor.from_dict(feature_extractor.to_dict())
    return feature_extractor


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def encoder_adapter(config: PreTrainedConfig) -> AudioEncoderAdapter:
    """The adapter for an encoder config; raises a clear error for families we have not verified."""
    model_type = config.model_type
    if model_type == "whisper":
        return WhisperStyleAdapter(config)
    if hasattr(config, "conv_stride") and hasattr(config, "conv_kernel"):
        return Wav2Vec2StyleAdapter(config)
    raise ValueError(
        f"Unsupported audio encoder family {model_type!r}. Supported: Wav2Vec2/MMS, HuBERT, WavLM, Data2VecAudio, "
        "UniSpeech(-SAT), SEW and other conv-feature waveform encoders, and Whisper."
    )


def validated_audio_lengths(adapter: AudioEncoderAdapter, encoder: nn.Module, audio: torch.Tensor,
                            audio_mask: torch.Tensor | None) -> torch.Tensor:
    """(N,) real lengths of a padded audio batch, after checking it is something `adapter.encode` can run.

    Shape, emptiness and mask shape are checked on the host; non-finite values, too-short and too-long clips with
    one device sync for all three (this runs in every forward and generate), and the encoder's minimum length comes
    from the adapter's cache. Errors name the offending clips, for a bad clip in a large batch.
    """
    name = adapter.input_name
    expected_dim = 2 if name == "input_values" else 3
    if audio.dim() != expected_dim:
        shape = "(batch, samples)" if name == "input_values" else "(batch, mel_bins, frames)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(audio.shape)}")
    if audio.shape[0] == 0 or audio.shape[-1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(audio.shape)}): every clip needs audio")
    if audio_mask is None:
        lengths = torch.full((audio.shape[0],), audio.shape[-1], device=audio.device, dtype=torch.long)
    else:
        if audio_mask.shape != (audio.shape[0], audio.shape[-1]):
            raise ValueError(
                f"attention_mask for {name} must have shape {(audio.shape[0], audio.shape[-1])}, "
                f"got {tuple(audio_mask.shape)}"
            )
        lengths = audio_mask.long().sum(-1)
    valid = torch.arange(audio.shape[-1], device=audio.device)[None, :] < lengths[:, None]
    if name == "input_features":
        valid = valid[:, None, :].expand_as(audio)
    finite = torch.isfinite(audio) | ~valid
    all_finite, shortest, longest = torch.stack([finite.all().long(), lengths.min(), lengths.max()]).tolist()
    if not all_finite:
        bad = sorted({int(i) for i in (~finite).nonzero()[:, 0].tolist()})
        raise ValueError(f"{name} contains NaN or inf values in clip(s) {bad}")
    minimum = adapter.min_input_length(encoder)
    if shortest < minimum:
        too_short = (lengths < minimum).nonzero().flatten().tolist()
        unit = "samples" if name == "input_values" else "mel frames"
        raise AudioTooShortError(too_short, [int(lengths[i]) for i in too_short], minimum, unit)
    maximum = adapter.max_input_length()
    if maximum is not None and longest > maximum:
        raise ValueError(
            f"{name} has {longest} frames but this encoder's position table holds at most {maximum} "
            f"({maximum / 100:.0f} s); split long audio into chunks (speechlm transcribe does this)"
        )
    return lengths
