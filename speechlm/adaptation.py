"""What training does to a SpeechLM model, kept off the architecture: freezing, LoRA adapters and the CTC head.

`SpeechLMAdaptationMixin` is mixed into `SpeechLMModel`, so `model.freeze_encoder()`, `model.add_lora()` and
`model.add_ctc_head()` work as before, while `modeling` holds only what the forward pass computes. The mixin expects
the model's `audio_tower`, `language_model`, `multi_modal_projector`, `audio_start` / `audio_end`, `ctc_head` and
`config`.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .alignment import CTCAlignmentHead
from .configuration import one_value

# `add_lora`'s defaults for the settings it accepts under two names (the one place they live).
LORA_DEFAULTS = {"lora_alpha": 32, "lora_dropout": 0.05}


class SpeechLMAdaptationMixin:
    """Freezing, LoRA and CTC head life cycle for `SpeechLMModel` (placed before `PreTrainedModel` in its bases, so
    `train` here wraps `nn.Module.train`)."""

    # ------------------------------------------------------------------------------------------- freezing
    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the audio encoder; a frozen encoder also stays in eval mode (no dropout/SpecAugment)."""
        set_trainable(self.audio_tower, not frozen)
        self.train(self.training)

    def freeze_decoder(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the LLM; LoRA adapters, if any, stay trainable."""
        for name, param in self.language_model.named_parameters():
            param.requires_grad = (not frozen) or "lora_" in name
        self.train(self.training)

    def freeze_decoder_except_lm_head(self) -> None:
        """Freeze the LLM but its output head (tied to the input embeddings in some models, which then train too)."""
        self.freeze_decoder()
        set_trainable(self.get_output_embeddings(), True)

    def freeze_projection(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the projector, the learned audio start/end embeddings and the CTC head, if any."""
        set_trainable(self.multi_modal_projector, not frozen)
        if self.ctc_head is not None:
            set_trainable(self.ctc_head, not frozen)
        self.audio_start.requires_grad = not frozen
        self.audio_end.requires_grad = not frozen

    def unfreeze_encoder(self) -> None:
        self.freeze_encoder(False)

    def unfreeze_decoder(self) -> None:
        self.freeze_decoder(False)

    def unfreeze_projection(self) -> None:
        self.freeze_projection(False)

    def train(self, mode: bool = True):
        """A fully frozen encoder or LLM stays in eval mode: its dropout and SpecAugment would only add noise."""
        super().train(mode)
        for module in (self.audio_tower, self.language_model):
            if mode and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    # ------------------------------------------------------------------------------------------------ LoRA
    def add_lora(self, r: int = 16, alpha: int | None = None, dropout: float | None = None,
                 target_modules: list[str] | str | None = None, *, lora_alpha: int | None = None,
                 lora_dropout: float | None = None) -> None:
        """Add LoRA adapters to the LLM (peft); the base LLM weights are frozen, the adapters train.

        `lora_alpha` / `lora_dropout` are peft's (and the config's) names for the seed's `alpha` / `dropout`: one
        setting each, either spelling (defaults: `LORA_DEFAULTS`).
        """
        if has_lora(self.language_model):
            raise ValueError("the decoder already has LoRA adapters")
        alpha = one_value("lora_alpha", lora_alpha, "alpha", alpha, LORA_DEFAULTS["lora_alpha"])
        dropout = one_value("lora_dropout", lora_dropout, "dropout", dropout, LORA_DEFAULTS["lora_dropout"])
        lora = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                "target_modules": target_modules or "all-linear"}
        self._inject_lora(lora)
        self.train(self.training)  # new adapter modules start in training mode: follow the model's (dropout)
        self.config.lora = lora

    def _inject_lora(self, lora: dict) -> None:
        """Adapters into the LLM in place (no PeftModel wrapper, so the model's structure and names stay ours)."""
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(**lora)
        if config.target_modules == "all-linear" or config.target_modules == {"all-linear"}:
            config.target_modules = linear_module_names(self.language_model)
        inject_adapter_in_model(config, self.language_model)
        for name, param in self.language_model.named_parameters():
            param.requires_grad = "lora_" in name

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the decoder weights (for serving: no adapter overhead, plain checkpoint)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.language_model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = self.language_model.get_submodule(parent_name) if parent_name else self.language_model
                setattr(parent, child, module.get_base_layer())
        self.config.lora = None

    # ------------------------------------------------------------------------------------------- CTC head
    def add_ctc_head(self, vocabulary_ids: list[int] | None = None, ignore_token_ids: list[int] | None = None,
                     compress: bool = False) -> CTCAlignmentHead:
        """Add a CTC head over the projector's output (trainable, saved with the model).

        Train it with `SpeechLMTrainer(ctc_head=model.ctc_head, ...)`. `compress=True` then feeds the LLM one
        averaged audio token per label the head recognises instead of every audio token (blanks dropped).
        """
        if self.ctc_head is not None:
            raise ValueError("the model already has a CTC head")
        settings = {"vocabulary_ids": sorted(set(vocabulary_ids)) if vocabulary_ids is not None else None,
                    "ignore_token_ids": sorted(set(ignore_token_ids or [])), "compress": compress}
        self.ctc_head = self._build_ctc_head(settings)
        self.config.ctc_head = settings
        return self.ctc_head

    @property
    def joint_ctc_weight(self) -> float:
        """The joint CTC weight saved with the head (`config.ctc_head["joint_weight"]`, 0 without one): the command
        line tools decode transcripts with it unless told otherwise, so a trained model is read as it was measured.
        `generate` itself takes its `joint_ctc_weight` argument only, since chat and JSON answers are not transcripts
        the head can score."""
        return float((self.config.ctc_head or {}).get("joint_weight") or 0.0)

    @property
    def joint_ctc_head_candidates(self) -> int:
        """How many of the head's own best next tokens joint decoding scores beside the LLM's: the number saved with
        the head (`config.ctc_head["head_candidates"]`), else `speechlm.joint_ctc.HEAD_CANDIDATES`. Saved because it
        changes the answers: a model is read as it was measured even if the library's default moves."""
        from .joint_ctc import HEAD_CANDIDATES

        saved = (self.config.ctc_head or {}).get("head_candidates")
        return HEAD_CANDIDATES if saved is None else int(saved)

    def _build_ctc_head(self, settings: dict) -> CTCAlignmentHead:
        """A head on the projector's device and dtype (also used by `__init__` to rebuild a saved one)."""
        projector = self.multi_modal_projector.linear_2.weight
        head = CTCAlignmentHead(self.config.text_config.hidden_size, settings.get("ignore_token_ids") or (),
                                vocabulary_ids=settings.get("vocabulary_ids"))
        return head.to(device=projector.device, dtype=projector.dtype)


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad = trainable


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


@contextmanager
def lora_disabled(module: nn.Module):
    """`module` computes as its base weights while inside (the frozen LLM a distillation teacher reads with); the
    adapters' trainable flags come back as they were (peft's toggle would set them all trainable)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in flags:
            parameter.requires_grad = flag


def linear_module_names(language_model: nn.Module) -> list[str]:
    """Names of the LLM's linear layers except the output head: the usual 'all-linear' LoRA target."""
    head = language_model.get_output_embeddings()
    names = set()
    for name, module in language_model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
        elif type(module).__name__ == "Conv1D":  # GPT-2's fused projections
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


__all__ = ["LORA_DEFAULTS", "SpeechLMAdaptationMixin", "has_lora", "linear_module_names", "lora_disabled",
           "set_trainable"]
