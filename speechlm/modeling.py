"""SpeechLMModel: audio encoder -> projector -> [audio embeddings | text embeddings] -> decoder-only LLM.

The whole concept in one place:
1. `get_audio_features` runs the encoder through its family adapter (real lengths, exact masks) and the projector;
   an optional CTC head (`add_ctc_head(compress=True)`) then keeps one averaged token per label it hears.
2. `merge_audio_and_text` splices each clip, framed by learned start/end embeddings, into the text sequence at its
   placeholder (or in front of the text), compacts every sample and pads the batch: on the left for generation, on
   the right when labels are given (no query row then attends to nothing; see `merge_audio_and_text`). Position ids
   follow from the mask, so a padded training batch, a left-padded generation batch and a single clip all see the
   same positions for the same tokens.
3. `forward` hands the merged embeddings to the LLM (loss on text only); `generate` merges once and lets
   transformers' `GenerationMixin` do greedy, beam search, sampling and the KV cache.

Only the architecture lives here: the merge itself is `merging`, input validation `encoders`, what training does to
the model (freezing, LoRA, the CTC head) `adaptation`, and the saved folder's extra files `checkpoint_files`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMultimodalLM,
    GenerationMixin,
    LogitsProcessorList,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .adaptation import LORA_DEFAULTS, SpeechLMAdaptationMixin, has_lora
from .alignment import CTCAlignmentHead
from .checkpoint_files import SpeechLMCheckpointMixin
from .configuration import IGNORE_INDEX, SpeechLMConfig
from .encoders import encoder_adapter, validated_audio_lengths
from .merging import MergedInputs, merge_audio_and_text, position_ids_from_mask
from .projector import SpeechLMProjector, SpeechLMProjectorLayer, default_stack_factor

# The audio prompt is embeddings without ids, so `no_repeat_ngram_size` (the repetition guard in our generation
# config) can only ever see the generated text, which is what it is meant for: transformers' warning says no more.
warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`", category=UserWarning)


class SpeechLMPreTrainedModel(PreTrainedModel):
    config_class = SpeechLMConfig
    config: SpeechLMConfig
    base_model_prefix = ""
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = None
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only our own pieces: the encoder and LLM are sub-models that initialise (or load) themselves.
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, SpeechLMProjector):
            for linear in (module.linear_1, module.linear_2):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            nn.init.ones_(module.norm.weight)
            nn.init.zeros_(module.norm.bias)
        elif isinstance(module, SpeechLMProjectorLayer):
            for linear in (module.qkv, module.out_proj, module.fc1, module.fc2):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            for norm in (module.attention_norm, module.mlp_norm):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
            nn.init.zeros_(module.attention_gate)  # the identity: see SpeechLMProjectorLayer
            nn.init.zeros_(module.mlp_gate)
        elif isinstance(module, SpeechLMModel):
            nn.init.normal_(module.audio_start, std=std)
            nn.init.normal_(module.audio_end, std=std)
        elif isinstance(module, CTCAlignmentHead):
            module.reset_parameters()


def _mark_initialized(module: nn.Module) -> None:
    """Keep a given sub-model's weights through `post_init`.

    transformers re-runs each sub-model's own random init on every module not flagged as initialised; modules that
    did not come from `from_pretrained` (a converted checkpoint, a model built by hand) carry no flag.
    """
    for submodule in module.modules():
        submodule._is_hf_initialized = True


def kept_positions(logits_to_keep: int | torch.Tensor, sequence: torch.Tensor) -> int | torch.Tensor:
    """The last `logits_to_keep` positions as an index tensor rather than a count. Given a count, the LLM slices its
    hidden states, and its LM head then multiplies a non-contiguous view, which torch's CPU kernels do by copying the
    weight per sample: SmolLM2's head over the text of a batch of 8 took 1.9 s in bfloat16 instead of 0.13 s
    (benchmarks/cpu_training_step.py). Indexing gathers the rows into a contiguous tensor; the logits are the same."""
    length = sequence.shape[1]
    if isinstance(logits_to_keep, int) and 0 < logits_to_keep < length:
        return torch.arange(length - logits_to_keep, length, device=sequence.device)
    return logits_to_keep


class SpeechLMModel(SpeechLMCheckpointMixin, SpeechLMAdaptationMixin, SpeechLMPreTrainedModel, GenerationMixin):
    """Any Hugging Face audio encoder + any decoder-only LLM, as one generating model.

    Only the architecture lives here; freezing, LoRA and the CTC head's life cycle come from
    `SpeechLMAdaptationMixin`, the checkpoint files from `SpeechLMCheckpointMixin` (both before `PreTrainedModel`
    in the bases, so their `super()` calls reach transformers).
    """

    def __init__(self, config: SpeechLMConfig, audio_tower: nn.Module | None = None,
                 language_model: nn.Module | None = None):
        # Keep the attention implementation each sub-model was loaded with (the base init would reset them).
        sub_attention = {name: getattr(config, name)._attn_implementation for name in ("audio_config", "text_config")}
        super().__init__(config)
        for name, implementation in sub_attention.items():
            if implementation is not None:
                getattr(config, name)._attn_implementation = implementation
        for given in (audio_tower, language_model):
            if given is not None:
                _mark_initialized(given)
        self.adapter = encoder_adapter(config.audio_config)
        self.audio_tower = audio_tower if audio_tower is not None else self.adapter.build()
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        if config.stack_factor is None:
            config.stack_factor = default_stack_factor(self.adapter.frame_rate)
        text_hidden = config.text_config.hidden_size
        self.multi_modal_projector = SpeechLMProjector(
            self.adapter.hidden_size, text_hidden, config.projector_hidden_size, config.stack_factor,
            dropout=config.projector_dropout, act=config.projector_act, num_layers=config.projector_layers,
        )
        self.audio_start = nn.Parameter(torch.zeros(text_hidden))
        self.audio_end = nn.Parameter(torch.zeros(text_hidden))
        self.ctc_head = self._build_ctc_head(config.ctc_head) if config.ctc_head else None
        if config.lora and not has_lora(self.language_model):
            self._inject_lora(config.lora)
        self.post_init()

    # ----------------------------------------------------------------------------------------------- plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.audio_tower

    @property
    def audio_input_name(self) -> str:
        """`input_values` (waveform encoders) or `input_features` (Whisper-style log-mel encoders)."""
        return self.adapter.input_name

    # ------------------------------------------------------------------------------------------- audio side
    def audio_output_lengths(self, audio_lengths: torch.Tensor) -> torch.Tensor:
        """Number of LLM audio tokens for clips of `audio_lengths` input samples (or mel frames); an upper bound
        when a CTC head compresses the audio (its count depends on what the head hears)."""
        frames = self.adapter.output_lengths(self.audio_tower, audio_lengths)
        return self.multi_modal_projector.output_lengths(frames)

    def encode_audio(self, audio: torch.Tensor, audio_mask: torch.Tensor | None = None):
        """Validated encoder pass -> ((N, T, D) frames, zero past each clip's end; (N,) frame counts).

        The encoder half of `get_audio_features`, public so a frozen encoder's output can be cached once and fed
        back as `encoder_frames` every epoch.
        """
        lengths = validated_audio_lengths(self.adapter, self.audio_tower, audio, audio_mask)
        audio = audio.to(next(self.audio_tower.parameters()).dtype)
        frames = self.adapter.encode(self.audio_tower, audio, lengths)
        return frames, self.adapter.output_lengths(self.audio_tower, lengths)

    def get_audio_features(self, audio: torch.Tensor | None = None, audio_mask: torch.Tensor | None = None, *,
                           encoder_frames: torch.Tensor | None = None,
                           encoder_frame_lengths: torch.Tensor | None = None):
        """Encode (or take cached encoder frames) and project -> ((N, A, D) embeddings, (N,) token counts)."""
        if encoder_frames is None:
            encoder_frames, encoder_frame_lengths = self.encode_audio(audio, audio_mask)
        elif encoder_frame_lengths is None:
            raise ValueError("encoder_frames need encoder_frame_lengths (frames per clip)")
        else:
            valid = torch.arange(encoder_frames.shape[1], device=encoder_frames.device)[None] < encoder_frame_lengths[
                :, None
            ].to(encoder_frames.device)
            encoder_frames = encoder_frames * valid[..., None].to(encoder_frames.dtype)
        projector_dtype = self.multi_modal_projector.linear_1.weight.dtype
        embeds = self.multi_modal_projector(encoder_frames.to(projector_dtype), encoder_frame_lengths)
        return embeds, self.multi_modal_projector.output_lengths(encoder_frame_lengths.to(embeds.device))

    # ------------------------------------------------------------------------------------------------ merge
    def merge_audio_and_text(
        self,
        audio_embeds: torch.Tensor,
        audio_lengths: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
    ) -> MergedInputs:
        """Splice clips into the text, drop padding, pad the batch; labels are -100 on audio positions.

        The model's embeddings and layout around `speechlm.merging.merge_audio_and_text` (which documents the
        layouts and why `padding_side` defaults to "left" without labels and "right" with them).
        """
        return merge_audio_and_text(
            self.get_input_embeddings(), self.audio_start, self.audio_end, audio_embeds, audio_lengths, input_ids,
            text_mask, labels, padding_side, audio_token_id=self.config.audio_token_id,
            audio_layout=self.config.audio_layout,
        )

    def prepare_inputs(
        self,
        input_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_frames: torch.Tensor | None = None,
        encoder_frame_lengths: torch.Tensor | None = None,
        padding_side: str | None = None,
    ) -> MergedInputs:
        """Validate the audio inputs (or take cached encoder frames), encode them and merge them with the text
        (`padding_side`: see `merge_audio_and_text`)."""
        audio = None if encoder_frames is not None else self._select_audio_input(input_values, input_features)
        audio_embeds, audio_lengths = self.get_audio_features(
            audio, attention_mask, encoder_frames=encoder_frames, encoder_frame_lengths=encoder_frame_lengths
        )
        return self._merge_projected(audio_embeds, audio_lengths, input_ids, decoder_attention_mask, labels,
                                     padding_side)

    def _merge_projected(self, audio_embeds, audio_lengths, input_ids, text_mask, labels=None, padding_side=None):
        if self.ctc_head is not None and self.config.ctc_head.get("compress"):
            audio_embeds, audio_lengths = self.ctc_head.compress(audio_embeds, audio_lengths,
                                                                 self.get_input_embeddings().weight)
        return self.merge_audio_and_text(audio_embeds, audio_lengths, input_ids, text_mask, labels,
                                         padding_side=padding_side)

    def _select_audio_input(self, input_values, input_features) -> torch.Tensor:
        if input_values is not None and input_features is not None:
            raise ValueError("pass either input_values or input_features, not both")
        expected = self.audio_input_name
        given = "input_values" if input_values is not None else "input_features"
        audio = input_values if input_values is not None else input_features
        if given != expected:
            kind = "raw waveforms (input_values)" if expected == "input_values" else "log-mel input_features"
            raise ValueError(
                f"this model's {self.config.audio_config.model_type} encoder takes {kind}, but {given} were given; "
                "use the model's feature extractor / SpeechLMProcessor to prepare audio"
            )
        return audio

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        encoder_frames: torch.Tensor | None = None,
        encoder_frame_lengths: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        With audio (`input_values` or `input_features`): `attention_mask` is the audio mask, `input_ids` /
        `decoder_attention_mask` / `labels` the text (prompt + target; prompt labels set to -100 by the collator).
        `encoder_frames` / `encoder_frame_lengths` (from `encode_audio`) replace the audio for a cached frozen encoder.
        Without audio (generation steps, text-only use): `attention_mask` covers the already merged sequence.
        """
        if input_values is not None or input_features is not None or encoder_frames is not None:
            if inputs_embeds is not None:
                raise ValueError("pass audio + input_ids, or inputs_embeds, not both")
            merged = self.prepare_inputs(
                input_values, input_features, attention_mask, input_ids, decoder_attention_mask, labels,
                encoder_frames, encoder_frame_lengths,
            )
            inputs_embeds, attention_mask, position_ids, labels = (
                merged.inputs_embeds, merged.attention_mask, merged.position_ids, merged.labels
            )
            input_ids = None
        elif attention_mask is None and decoder_attention_mask is not None:
            attention_mask = decoder_attention_mask
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
            position_ids = position_ids_from_mask(attention_mask)[:, -length:]
        if self.training and labels is not None and isinstance(logits_to_keep, int) and logits_to_keep == 0:
            # Training only needs logits where a label follows: skip the LM head over audio and prompt positions.
            labelled = (labels != IGNORE_INDEX).any(0).nonzero()
            first = max(int(labelled[0]) - 1, 0) if len(labelled) else 0
            logits_to_keep, labels = labels.shape[1] - first, labels[:, first:]
        logits_to_keep = kept_positions(logits_to_keep, inputs_embeds if inputs_embeds is not None else input_ids)
        return self.language_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_frames: torch.Tensor | None = None,
        encoder_frame_lengths: torch.Tensor | None = None,
        joint_ctc_weight: float = 0.0,
        joint_ctc_span: tuple | None = None,
        joint_ctc_head_candidates: int | None = None,
        **kwargs,
    ):
        """Generate text from audio (+ an optional prompt). Returns only the new tokens.

        `max_length` and `max_new_tokens` both count generated tokens. Every `GenerationMixin` option works
        (num_beams, do_sample, temperature, top_p, repetition_penalty, streamer, ...). `joint_ctc_weight` > 0 decodes
        jointly with the model's CTC head (`speechlm.joint_ctc`: the head's prefix score, at that weight, beside the
        LLM's log-probabilities), which keeps the LLM from writing text the audio does not hold; `joint_ctc_span`
        (`speechlm.joint_ctc.json_string_span`) limits it to one part of the answer, e.g. a JSON transcript field;
        `joint_ctc_head_candidates` sets how many of the head's own best next tokens are scored beside the LLM's
        (default: the model's `joint_ctc_head_candidates`)."""
        if joint_ctc_span is not None and not joint_ctc_weight:
            raise ValueError("joint_ctc_span needs a joint_ctc_weight > 0: it limits joint CTC decoding to one part "
                             "of the answer, and alone would change nothing")
        if joint_ctc_head_candidates is not None and not joint_ctc_weight:
            raise ValueError("joint_ctc_head_candidates needs a joint_ctc_weight > 0: the head proposes tokens only "
                             "in joint CTC decoding, and alone would change nothing")
        for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if kwargs.get(total) is not None and kwargs.get(new) is None:
                kwargs[new] = kwargs.pop(total)
        if input_values is None and input_features is None and encoder_frames is None:
            if joint_ctc_weight:
                raise ValueError("joint_ctc_weight needs audio: joint CTC decoding scores the text against the clip")
            return super().generate(input_ids=input_ids, attention_mask=decoder_attention_mask, **kwargs)
        audio = None if encoder_frames is not None else self._select_audio_input(input_values, input_features)
        audio_embeds, audio_lengths = self.get_audio_features(
            audio, attention_mask, encoder_frames=encoder_frames, encoder_frame_lengths=encoder_frame_lengths
        )
        if joint_ctc_weight:
            kwargs["logits_processor"] = self._joint_ctc(audio_embeds, audio_lengths, joint_ctc_weight, kwargs,
                                                         joint_ctc_span, joint_ctc_head_candidates)
        merged = self._merge_projected(audio_embeds, audio_lengths, input_ids, decoder_attention_mask)
        return super().generate(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask, **kwargs)

    def _joint_ctc(self, audio_embeds, audio_lengths, weight: float, kwargs: dict, span: tuple | None = None,
                   head_candidates: int | None = None) -> LogitsProcessorList:
        """The caller's logits processors with a `CTCPrefixScorer` over these clips appended."""
        from .joint_ctc import CTCPrefixScorer

        if self.ctc_head is None:
            raise ValueError("joint_ctc_weight needs a CTC head: this model was trained without one (add_ctc_head)")
        config = kwargs.get("generation_config") or self.generation_config
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        if eos is None:
            raise ValueError("joint_ctc_weight needs an eos_token_id: the CTC head scores where the answer ends")
        log_probs = self.ctc_head.scores(audio_embeds, self.get_input_embeddings().weight).log_softmax(-1)
        if head_candidates is None:
            head_candidates = self.joint_ctc_head_candidates
        scorer = CTCPrefixScorer(log_probs, audio_lengths, weight, eos, self.ctc_head.vocabulary_ids, span=span,
                                 head_candidates=head_candidates)
        return LogitsProcessorList([*(kwargs.get("logits_processor") or []), scorer])


# Registered where it is defined (see `speechlm/__init__.py`); AutoModelForMultimodalLM is the class transformers'
# "any-to-any" pipeline loads (audio + text in, text out).
AutoModel.register(SpeechLMConfig, SpeechLMModel, exist_ok=True)
AutoModelForMultimodalLM.register(SpeechLMConfig, SpeechLMModel, exist_ok=True)


__all__ = ["SpeechLMModel", "SpeechLMPreTrainedModel", "MergedInputs", "IGNORE_INDEX", "LORA_DEFAULTS"]
