"""SpeechLMProcessor: audio -> encoder inputs, prompt/target text -> token ids and labels, ids -> text; chats with
audio parts -> the same inputs (`apply_chat_template`).

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
from transformers import AutoProcessor, ProcessorMixin
from transformers.utils import PROCESSOR_NAME

from .base_models import AUDIO_TOKEN
from .chat import DEFAULT_MAX_CLIPS
from .configuration import AUTO_MAP, IGNORE_INDEX, SpeechLMConfig

PROCESSOR_CONFIG_NAME = "speechlm_processor.json"
DEFAULT_PROMPT = "Transcribe the audio."


class SpeechLMProcessor(ProcessorMixin):
    """Feature extractor + tokenizer + prompt building, saved and loaded beside the model.

    A transformers `ProcessorMixin` registered with `AutoProcessor` (after `import speechlm`): `save_pretrained`
    writes `processor_config.json` (settings + feature extractor) and the tokenizer files, `from_pretrained` /
    `AutoProcessor.from_pretrained` read them (and folders saved before, with `speechlm_processor.json`),
    `push_to_hub` uploads them.

    Args:
        audio_layout: must match the model's `config.audio_layout`. `"placeholder"` puts `<|audio|>` in the prompt
            (inside the user turn when a chat template is used); `"prefix"` lets the model put audio first.
        prompt: the default instruction; a per-call `prompt=` overrides it, `""` means audio only.
        use_chat_template: wrap the prompt in the tokenizer's chat template (instruct LLMs expect their format).
        audio_tokens: the model's audio token arithmetic (`speechlm.audio_tokens.audio_token_rule`; see
            `expanding_for`). Given, each placeholder becomes exactly its clip's tokens + start/end, as Voxtral's and
            Qwen2-Audio's processors do and vLLM needs, and the model only scatters; generation inputs are then
            left-padded here. None (default) keeps one placeholder per clip: the model expands it, which CTC
            compression (a count that depends on what the head hears) requires.
    """

    def __init__(self, feature_extractor, tokenizer, audio_layout: str = "prefix", prompt: str = DEFAULT_PROMPT,
                 use_chat_template: bool = False, audio_tokens: dict | None = None):
        super().__init__(feature_extractor, tokenizer)
        self.audio_layout = audio_layout
        self.prompt = prompt
        self.use_chat_template = use_chat_template
        self.audio_tokens = audio_tokens
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        if audio_tokens is not None and audio_layout != "placeholder":
            raise ValueError("audio_tokens (placeholder expansion) needs audio_layout='placeholder'")
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
        from .encoders import check_audio_samples

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
            check_audio_samples([clip.shape[-1]], self.feature_extractor, first_index=index)
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
    def build_prompt(self, prompt: str | None = None, num_clips: int = 1, audio_text: str | None = None) -> str:
        """The prompt string as the LLM sees it (placeholders included in the placeholder layout). `audio_text`
        stands where the clip would, in either layout: the same prompt as text alone (a transcript, for the
        text-only teacher of distillation)."""
        prompt = self.prompt if prompt is None else prompt
        if audio_text is not None:
            prompt = audio_text + ("\n" + prompt if prompt else "")
        elif self.audio_layout == "placeholder":
            prompt = AUDIO_TOKEN * num_clips + ("\n" + prompt if prompt else "")
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def encode_text(self, prompts: Sequence[str], targets: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Prompt (+ target + EOS) ids, right-padded, with labels that are -100 everywhere but the target."""
        rows = [self._text_row(p, None if targets is None else targets[i]) for i, p in enumerate(prompts)]
        return self._pad_rows([r[0] for r in rows], [r[1] for r in rows] if targets is not None else None)

    def _text_row(self, prompt: str, target: str | None = None) -> tuple[list[int], list[int]]:
        """One built prompt (+ target + EOS) -> (ids, labels)."""
        special = not self.use_chat_template  # a chat template already writes BOS / turn markers itself
        ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"] if prompt else []
        labels = [IGNORE_INDEX] * len(ids)
        if target is not None:
            target_ids = self.tokenizer(target, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            ids, labels = ids + target_ids, labels + target_ids
        return ids, labels

    def _pad_rows(self, rows: Sequence[list[int]], label_rows: Sequence[list[int]] | None = None,
                  left: bool = False) -> dict[str, torch.Tensor]:
        """Token rows -> `input_ids` / `decoder_attention_mask` (/ `labels`), padded on the right unless `left`."""
        width = max(1, max(len(r) for r in rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for index, ids in enumerate(rows):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[index, span] = torch.tensor(ids, dtype=torch.long)
            mask[index, span] = 1
            if label_rows is not None:
                labels[index, span] = torch.tensor(label_rows[index], dtype=torch.long)
        out = {"input_ids": input_ids, "decoder_attention_mask": mask}
        if label_rows is not None:
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
        rows = [self._text_row(self.build_prompt(p), None if text is None else text[i]) for i, p in enumerate(prompts)]
        return self._with_text(batch, [r[0] for r in rows], [r[1] for r in rows] if text is not None else None)

    # ------------------------------------------------------------------------------------- audio token count
    def expanding_for(self, config) -> SpeechLMProcessor:
        """This processor, expanding placeholders by the arithmetic of `config` (a `SpeechLMConfig`)."""
        from .audio_tokens import audio_token_rule

        return type(self)(self.feature_extractor, self.tokenizer, **{
            **self._settings(), "audio_layout": "placeholder",
            "audio_tokens": audio_token_rule(config.audio_config, config.stack_factor)})

    def audio_token_counts(self, audio_mask: torch.Tensor) -> list[int]:
        """LLM audio tokens per clip (without start/end) for the clips of an `attention_mask` over encoder inputs."""
        from .audio_tokens import count_audio_tokens

        if self.audio_tokens is None:
            raise ValueError("this processor has no audio token arithmetic: build it with expanding_for(config)")
        return count_audio_tokens(self.audio_tokens, audio_mask.long().sum(-1).tolist())

    def _with_text(self, batch: dict, rows: list[list[int]], label_rows: list[list[int]] | None) -> dict:
        """Add the padded text; with `audio_tokens`, each placeholder first becomes its clip's start + tokens + end
        (row-major clip order) and rows for generation are padded on the left (the model will not re-pad)."""
        left = not batch and label_rows is None
        if self.audio_tokens is not None and batch:
            from .audio_tokens import expand_audio_placeholders

            rows, label_rows = expand_audio_placeholders(rows, label_rows, self.tokenizer.convert_tokens_to_ids(
                AUDIO_TOKEN), self.audio_token_counts(batch["attention_mask"]))
            left = label_rows is None
        batch.update(self._pad_rows(rows, label_rows, left=left))
        return batch

    # ------------------------------------------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        conversation: Sequence,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = True,
        sampling_rate: int | None = None,
        return_labels: bool = False,
        max_clips: int | None = DEFAULT_MAX_CLIPS,
        continue_final_message: bool = False,
        return_tensors: str | None = None,
        processor_kwargs: dict | None = None,
    ):
        """Chat messages with audio parts -> model inputs, so that instructions, questions and multi-turn chats about
        audio reach the model in the format it was trained on (message and part formats: `speechlm.chat`).

        A single user turn `[audio, "T"]` gives exactly the inputs of `processor(audio, prompt="T")`, with or without a
        chat template. With `use_chat_template` the tokenizer's template renders the messages, content flattened to
        text with `<|audio|>` where each clip stands (placeholder layout: any number of clips; prefix layout: exactly
        one, implied before the text). Without a template the plain rendering concatenates tokens: consecutive
        system/user messages join with a newline, each assistant message is followed by EOS, so
        `[user: [audio, "T"], assistant: "A"]` is `processor(audio, text="A", prompt="T")`, labels included.

        Args:
            conversation: a list of messages, or a list of such lists (a batch).
            add_generation_prompt: open an assistant turn after a conversation that does not end with one.
            tokenize: `False` returns the rendered string(s) instead.
            return_dict: `False` returns only `input_ids`.
            sampling_rate: the rate of array parts without their own `sampling_rate` (default: the encoder's);
                they are resampled to the encoder's rate.
            return_labels: add `labels`: -100 everywhere but the assistant messages' content and the token that ends
                each (the template's end-of-turn token, or EOS), so a multi-turn chat trains only the assistant's words.
            max_clips: the most clips one conversation may hold.
            continue_final_message, return_tensors, processor_kwargs: what transformers' "any-to-any" pipeline passes.
                Only `continue_final_message=False` (an answer always starts a new assistant turn) and
                `return_tensors="pt"` (or None: the same torch tensors) are supported; `processor_kwargs` may hold
                `sampling_rate`, `max_clips` and `return_tensors`.

        Returns:
            A `transformers.BatchFeature` (`.to(device)` / `.to(dtype=...)` work) holding, like `processor(...)`, the
            encoder inputs of every clip in row-major order with their `attention_mask`,
            `input_ids`, `decoder_attention_mask` (and `labels`). A batch without any clip (placeholder layout) has no
            audio keys and, without labels, is left-padded for `generate`. Problems raise `speechlm.chat.ChatError`,
            which names the conversation, message and part.
        """
        from transformers import BatchFeature

        from .chat import as_batch

        if continue_final_message:
            raise ValueError(
                "continue_final_message=True (prefilling the assistant's answer) is not supported: every answer "
                "starts a new assistant turn. Transformers' pipeline sets it when a chat ends with an assistant "
                "message: end the chat with a user message, or pass continue_final_message=False"
            )
        for key, value in (processor_kwargs or {}).items():
            if key == "sampling_rate":
                sampling_rate = value
            elif key == "max_clips":
                max_clips = value
            elif key == "return_tensors":
                return_tensors = value
            else:
                raise TypeError(f"processor_kwargs: {key!r} is not supported (only sampling_rate, max_clips, "
                                "return_tensors)")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported: SpeechLMProcessor returns torch "
                             "tensors (return_tensors='pt' or None)")
        conversations, batched = as_batch(conversation)
        parsed = [self._parse_chat(c, i, max_clips) for i, c in enumerate(conversations)]
        if not tokenize:
            texts = [self._render(segments) for segments in self._chat_segments(parsed, add_generation_prompt)]
            return texts if batched else texts[0]
        clips, rows, label_rows = self._chat_rows(parsed, add_generation_prompt, sampling_rate, return_labels)
        batch = self._pack(clips, rows, label_rows)
        return BatchFeature(batch) if return_dict else batch["input_ids"]

    def apply_transcription_request(self, audio, prompt: str | None = None, sampling_rate: int | None = None,
                                    **kwargs) -> dict:
        """Model inputs to transcribe `audio` (one clip: array, path or bytes; or a list of clips) with `prompt`
        (default: the processor's prompt); the same inputs as `processor(audio, prompt=prompt)` for arrays."""
        prompt = self.prompt if prompt is None else prompt
        single = isinstance(audio, str | bytes | os.PathLike) or (
            isinstance(audio, np.ndarray | torch.Tensor) and audio.ndim == 1
        )
        clips = [audio] if single else list(audio)
        conversations = [
            [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": prompt}]}]
            for clip in clips
        ]
        return self.apply_chat_template(conversations, sampling_rate=sampling_rate, **kwargs)

    def _parse_chat(self, conversation, index: int, max_clips: int | None = DEFAULT_MAX_CLIPS,
                    base_dir: str | os.PathLike | None = None) -> list:
        """Validate one conversation, including the clip count the audio layout allows."""
        from .chat import ChatError, parse_conversation

        messages = parse_conversation(conversation, index, max_clips, base_dir)
        if self.audio_layout == "prefix":
            clips = [part for message in messages for part in message.clips]
            if len(clips) != 1:
                where = clips[1].where if clips else (index,)
                raise ChatError(
                    f"{len(clips)} audio clips in the conversation, but this model's prefix audio layout takes exactly "
                    "one clip per conversation (in front of the text); a model built with "
                    "audio_layout='placeholder' takes several clips (or none) anywhere in the chat",
                    *where,
                )
        return messages

    def _chat_segments(self, parsed: Sequence[list], add_generation_prompt: bool) -> list[list[tuple[str, str]]]:
        """Each conversation as (kind, text) segments: "text" (no labels), "answer" (labelled), "turn_end" (labelled
        up to its first special token) and "eos" (the EOS token, labelled)."""
        return [self._segments(messages, index, add_generation_prompt) for index, messages in enumerate(parsed)]

    def _segments(self, messages: list, index: int, add_generation_prompt: bool) -> list[tuple[str, str]]:
        from .chat import ChatError, flatten

        audio_text = AUDIO_TOKEN if self.audio_layout == "placeholder" else None
        texts = [flatten(message.parts, audio_text) for message in messages]
        segments: list[tuple[str, str]] = []
        if not self.use_chat_template:
            run: list[str] = []
            for message, text in zip(messages, texts):
                if message.role != "assistant":
                    run.append(text)
                    continue
                segments += [("text", "\n".join(t for t in run if t)), ("answer", text), ("eos", "")]
                run = []
            if run or not segments:
                segments.append(("text", "\n".join(t for t in run if t)))
            return segments

        chat = [{"role": message.role, "content": text} for message, text in zip(messages, texts)]
        opens_turn = add_generation_prompt and messages[-1].role != "assistant"
        full = self._render_template(chat, opens_turn)
        cursor = 0
        for k, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prefix = self._render_template(chat[:k], True) if k else None
            start = len(prefix) if prefix is not None and full.startswith(prefix) and len(prefix) >= cursor else None
            if start is None or full[start : start + len(texts[k])] != texts[k]:
                # A template that rewrites earlier turns (or cannot render a conversation opening with an assistant
                # turn) gives no prefix to split at: the content is searched after the previous answer instead.
                found = full.find(texts[k], cursor)
                if found < 0:
                    raise ChatError("the chat template does not render this assistant message's content verbatim, "
                                    "so its labels cannot be located", index, k)
                start = found
            segments += [("turn_end" if segments else "text", full[cursor:start]), ("answer", texts[k])]
            cursor = start + len(texts[k])
        tail = full[cursor:]
        if segments and not tail:
            segments.append(("eos", ""))
        else:
            segments.append(("turn_end" if segments else "text", tail))
        return segments

    def _render_template(self, chat: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _render(self, segments: list[tuple[str, str]]) -> str:
        return "".join(self.tokenizer.eos_token if kind == "eos" else text for kind, text in segments)

    def _chat_rows(self, parsed: Sequence[list], add_generation_prompt: bool = True, sampling_rate: int | None = None,
                   return_labels: bool = False) -> tuple[list, list[list[int]], list[list[int]] | None]:
        """Parsed conversations -> (decoded clips in row-major order, token rows, label rows or None)."""
        from .chat import ChatError, load_clip

        if return_labels:
            for index, messages in enumerate(parsed):
                if not any(message.role == "assistant" for message in messages):
                    raise ChatError("return_labels=True but the conversation has no assistant message: nothing to "
                                    "learn", index)
        clips = [load_clip(part, self.sampling_rate, sampling_rate)
                 for messages in parsed for message in messages for part in message.clips]
        rows, label_rows = [], []
        for segments in self._chat_segments(parsed, add_generation_prompt):
            ids, labels = self._tokenize_segments(segments)
            rows.append(ids)
            label_rows.append(labels)
        return clips, rows, label_rows if return_labels else None

    def _tokenize_segments(self, segments: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Segments are tokenized one by one, so training and generation see the same ids for the same history."""
        ids, labels = [], []
        for position, (kind, text) in enumerate(segments):
            if kind == "eos":
                piece = [self.tokenizer.eos_token_id]
            elif not text:
                piece = []
            else:
                special = position == 0 and not self.use_chat_template
                piece = self.tokenizer(text, add_special_tokens=special)["input_ids"]
            if kind in ("answer", "eos"):
                labelled = len(piece)
            elif kind == "turn_end":
                ends = [i for i, token in enumerate(piece) if token in self._turn_end_ids]
                labelled = ends[0] + 1 if ends else 0
            else:
                labelled = 0
            ids += piece
            labels += piece[:labelled] + [IGNORE_INDEX] * (len(piece) - labelled)
        return ids, labels

    @property
    def end_of_turn_token_ids(self) -> list[int]:
        """EOS plus the chat template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...) when it differs: the token
        chat training teaches after each answer. Pass them as `eos_token_id` to `generate` so that a model trained on
        chats stops after its answer even when its tokenizer's EOS is another token (a base LLM with a template)."""
        from .chat import parse_conversation

        ids = [self.tokenizer.eos_token_id]
        if self.use_chat_template:
            probe = parse_conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
            _, labels = self._tokenize_segments(self._segments(probe, 0, False))
            labelled = [token for token in labels if token != IGNORE_INDEX]
            if labelled and labelled[-1] in self._turn_end_ids and labelled[-1] not in ids:
                ids.append(labelled[-1])
        return ids

    @property
    def _turn_end_ids(self) -> set[int]:
        """Special tokens that can close a turn (EOS, <|im_end|>, <|eot_id|>, ...): never audio or padding."""
        tokenizer = self.tokenizer
        ids = set(tokenizer.all_special_ids)
        ids |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
        ids -= {tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), tokenizer.pad_token_id, tokenizer.bos_token_id}
        return ids

    def _pack(self, clips: Sequence[np.ndarray], rows: Sequence[list[int]],
              label_rows: Sequence[list[int]] | None = None) -> dict[str, torch.Tensor]:
        """Clips + token rows -> a batch; a text-only batch has no audio keys and is left-padded for `generate`."""
        return self._with_text(self.extract_audio(clips) if clips else {}, rows, label_rows)

    def batch_decode(self, token_ids, **kwargs) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, **kwargs)]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """What transformers' multimodal pipelines decode with: `batch_decode`, so a pipeline's answer is the text
        `processor.batch_decode(model.generate(...))` gives."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    # ------------------------------------------------------------------------------------------ save / load
    def to_dict(self) -> dict:
        return {**super().to_dict(), "auto_map": {"AutoProcessor": AUTO_MAP["AutoProcessor"]}}

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """transformers' processor files, plus `speechlm_processor.json` for readers of the older format and the
        module `auto_map` names (so `trust_remote_code=True` loads without `import speechlm`)."""
        from .configuration import write_remote_code

        os.makedirs(save_directory, exist_ok=True)
        write_remote_code(str(save_directory))
        with open(os.path.join(save_directory, PROCESSOR_CONFIG_NAME), "w") as handle:
            json.dump(self._settings(), handle, indent=2)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def _settings(self) -> dict:
        return {"audio_layout": self.audio_layout, "prompt": self.prompt, "use_chat_template": self.use_chat_template,
                "audio_tokens": self.audio_tokens}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SpeechLMProcessor:
        """Load a processor folder or hub repo; `audio_layout` / `prompt` / `use_chat_template` override the saved
        settings. A folder without `processor_config.json` (the older format) takes `speechlm_processor.json`."""
        overrides = {key: kwargs.pop(key) for key in ("audio_layout", "prompt", "use_chat_template", "audio_tokens")
                     if key in kwargs}
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        settings = loaded._settings()
        if _find(pretrained_model_name_or_path, PROCESSOR_NAME, kwargs) is None:
            legacy = _find(pretrained_model_name_or_path, PROCESSOR_CONFIG_NAME, kwargs)
            if legacy is not None:
                with open(legacy) as handle:
                    settings.update(json.load(handle))
        settings.update(overrides)
        if settings == loaded._settings():
            return loaded
        return cls(loaded.feature_extractor, loaded.tokenizer, **settings)


# Registered where it is defined (see `speechlm/__init__.py`), so AutoProcessor returns it, not the tokenizer.
AutoProcessor.register(SpeechLMConfig, SpeechLMProcessor, exist_ok=True)


def _find(path, filename: str, kwargs: dict) -> str | None:
    """A file of a processor folder or hub repo (None when absent)."""
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "revision", "token", "subfolder") if k in kwargs}
    return cached_file(path, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False, **hub)


__all__ = ["SpeechLMProcessor", "DEFAULT_PROMPT"]
