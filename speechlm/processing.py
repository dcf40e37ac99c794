"""SpeechLMProcessor: audio -> encoder inputs, prompt/target text -> token ids and labels, ids -> text.

Audio features are extracted clip by clip on the real length, then padded. Extracting on a padded batch would
change the last frames of every shorter clip (STFT windows and normalisation statistics that see the padding), so
a clip would get different features in a batch than alone: one of the classic batched != one-by-one bugs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer

from .factory import AUDIO_TOKEN
from .modeling import IGNORE_INDEX

PROCESSOR_CONFIG_NAME = "speechlm_processor.json"
DEFAULT_PROMPT = "Transcribe the audio."


class SpeechLMProcessor:
    """Feature extractor + tokenizer + prompt building, saved and loaded beside the model.

    Args:
        audio_layout: must match the model's `config.audio_layout`. `"placeholder"` puts `<|audio|>` in the prompt
            (inside the user turn when a chat template is used); `"prefix"` lets the model put audio first.
        prompt: the default instruction; a per-call `prompt=` overrides it, `""` means audio only.
        use_chat_template: wrap the prompt in the tokenizer's chat template (instruct LLMs expect their format).
    """

    def __init__(self, feature_extractor, tokenizer, audio_layout: str = "prefix", prompt: str = DEFAULT_PROMPT,
                 use_chat_template: bool = False):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.audio_layout = audio_layout
        self.prompt = prompt
        self.use_chat_template = use_chat_template
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        if AUDIO_TOKEN not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer lacks {AUDIO_TOKEN}; build it with create_speech_lm_model")

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    @property
    def audio_input_name(self) -> str:
        return self.feature_extractor.model_input_names[0]

    # ------------------------------------------------------------------------------------------------ audio
    def extract_audio(self, audios: Sequence, sampling_rate: int | None = None) -> dict[str, torch.Tensor]:
        """Clips (1-D arrays at the encoder's rate) -> padded encoder inputs + `attention_mask`."""
        from .audio import validate_audio

        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio at {sampling_rate} Hz but the encoder expects {self.sampling_rate} Hz: resample first "
                "(speechlm.audio.load_audio does)"
            )
        if isinstance(audios, np.ndarray | torch.Tensor) and np.ndim(audios) == 1:
            audios = [audios]
        features = []
        for index, clip in enumerate(audios):
            clip = validate_audio(clip, self.sampling_rate, name=f"audio[{index}]")
            kwargs = {"sampling_rate": self.sampling_rate, "return_tensors": "np"}
            if self.audio_input_name == "input_features":
                kwargs.update(padding="longest", truncation=False, return_attention_mask=False)
            values = self.feature_extractor(clip, **kwargs)[self.audio_input_name][0]
            features.append(torch.from_numpy(np.asarray(values, dtype=np.float32)))
        lengths = [f.shape[-1] for f in features]
        batch = torch.zeros((len(features), *features[0].shape[:-1], max(lengths)), dtype=torch.float32)
        mask = torch.zeros((len(features), max(lengths)), dtype=torch.long)
        for index, (feature, length) in enumerate(zip(features, lengths)):
            batch[index, ..., :length] = feature
            mask[index, :length] = 1
        return {self.audio_input_name: batch, "attention_mask": mask}

    # ------------------------------------------------------------------------------------------------- text
    def build_prompt(self, prompt: str | None = None, num_clips: int = 1) -> str:
        """The prompt string as the LLM sees it (placeholders included in the placeholder layout)."""
        prompt = self.prompt if prompt is None else prompt
        if self.audio_layout == "placeholder":
            prompt = AUDIO_TOKEN * num_clips + ("\n" + prompt if prompt else "")
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def encode_text(self, prompts: Sequence[str], targets: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Prompt (+ target + EOS) ids, right-padded, with labels that are -100 everywhere but the target."""
        rows, label_rows = [], []
        special = not self.use_chat_template  # a chat template already writes BOS / turn markers itself
        for index, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"] if prompt else []
            labels = [IGNORE_INDEX] * len(ids)
            if targets is not None:
                target = self.tokenizer(targets[index], add_special_tokens=False)["input_ids"]
                target = target + [self.tokenizer.eos_token_id]
                ids, labels = ids + target, labels + target
            rows.append(ids)
            label_rows.append(labels)
        width = max(1, max(len(r) for r in rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for index, (ids, row_labels) in enumerate(zip(rows, label_rows)):
            input_ids[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[index, : len(ids)] = 1
            labels[index, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
        out = {"input_ids": input_ids, "decoder_attention_mask": mask}
        if targets is not None:
            out["labels"] = labels
        return out

    def __call__(self, audio: Sequence, text: Sequence[str] | str | None = None,
                 prompt: Sequence[str] | str | None = None, sampling_rate: int | None = None) -> dict:
        """Everything `SpeechLMModel.forward` (with `text`) or `.generate` (without) needs."""
        batch = self.extract_audio(audio, sampling_rate)
        size = batch["attention_mask"].shape[0]
        if isinstance(text, str):
            text = [text]
        if text is not None and len(text) != size:
            raise ValueError(f"batch size mismatch: {size} audio clip(s) but {len(text)} text(s)")
        prompts = [prompt] * size if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != size:
            raise ValueError(f"batch size mismatch: {size} audio clip(s) but {len(prompts)} prompt(s)")
        batch.update(self.encode_text([self.build_prompt(p) for p in prompts], text))
        return batch

    def batch_decode(self, token_ids, **kwargs) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, **kwargs)]

    # ------------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.feature_extractor.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)
        settings = {"audio_layout": self.audio_layout, "prompt": self.prompt,
                    "use_chat_template": self.use_chat_template}
        with open(os.path.join(save_directory, PROCESSOR_CONFIG_NAME), "w") as handle:
            json.dump(settings, handle, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> SpeechLMProcessor:
        settings = {}
        path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
        if os.path.isfile(path):
            with open(path) as handle:
                settings = json.load(handle)
        settings.update(kwargs)
        feature_extractor = AutoFeatureExtractor.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(feature_extractor, tokenizer, **settings)


__all__ = ["SpeechLMProcessor", "DEFAULT_PROMPT"]
