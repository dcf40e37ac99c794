"""The decoding loop: `transcribe_arrays` turns clips into text in length-sorted batches.

Evaluation, `speechlm transcribe` and the server all decode through it, and every sequence is checked against the
LLM's position limit first (a clear `ValueError` instead of an `IndexError` or garbage deep inside `generate`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from ..base_models import AUDIO_TOKEN
from ..configuration import DEFAULT_GENERATION
from ..modeling import SpeechLMModel
from ..processing import SpeechLMProcessor
from .structured import WORDS_FROM, first_quoted, quoting, schema_of, structure_grammar, with_json_schema

# Shorter clips are below every encoder's receptive field / STFT window: refused with a clear message up front.
MIN_AUDIO_SECONDS = 0.1
# Added to a clip's length-based token cap (`tokens_per_second`): room for a short clip's few words and the end token.
LENGTH_CAP_MARGIN = 8


# What decoding uses where neither the caller nor the model's generation_config.json says (see `DEFAULT_GENERATION`).
FALLBACK_GENERATION = DEFAULT_GENERATION
# The generation_config.json fields that choose how to decode (token ids and the like are read by `generate`).
DECODING_FIELDS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "num_beams",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
)
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")


def beam_width(model: SpeechLMModel | None, num_beams: int | None = None) -> int:
    """The beams a decoding searches with: `num_beams`, else the model's generation config's, else 1."""
    return default_generation_kwargs(model, num_beams=num_beams).get("num_beams") or 1


def saved_generation_settings(model: SpeechLMModel | None) -> dict:
    """The decoding fields the model's generation config sets (from its generation_config.json when loaded)."""
    config = getattr(model, "generation_config", None)
    return {name: getattr(config, name) for name in DECODING_FIELDS if getattr(config, name, None) is not None}


def default_generation_kwargs(model: SpeechLMModel | None, **overrides) -> dict:
    """Generation keywords: the caller's (None means unset) over the model's generation config over
    `FALLBACK_GENERATION`, so a saved generation_config.json is respected unless a flag or request overrides it."""
    kwargs = {**FALLBACK_GENERATION, **saved_generation_settings(model)}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if not kwargs.get("do_sample"):
        for name in _SAMPLING_ONLY:
            kwargs.pop(name, None)
    return kwargs


# Config fields that hold a decoder's position limit, by family (GPT-2 and friends say n_positions).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def position_limit(model: SpeechLMModel) -> int | None:
    """The LLM's position limit, or None when its config states none.

    Learned position tables (GPT-2) crash with an `IndexError` past it and rotary models decode garbage, so every
    sequence is checked against it before any work is done.
    """
    config = model.language_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def audio_positions(model: SpeechLMModel, processor: SpeechLMProcessor, num_samples: int) -> int:
    """LLM positions one clip of `num_samples` (at the encoder's rate) takes, start/end markers included.

    Computed from the length alone (no encoder pass), so a request can be refused before it is queued; an upper
    bound when a CTC head compresses the audio.
    """
    length = int(num_samples)
    if processor.audio_input_name == "input_features":  # log-mel frames: one per hop, the last one dropped
        length = length // int(getattr(processor.feature_extractor, "hop_length", 160))
    return int(model.audio_output_lengths(torch.tensor([max(length, 1)]))[0]) + 2


def prompt_positions(processor: SpeechLMProcessor, prompt: str | None = None) -> int:
    """Tokens the prompt adds to the LLM's sequence (as `SpeechLMProcessor` builds it)."""
    text = processor.build_prompt(prompt)
    if not text:
        return 0
    ids = processor.tokenizer(text, add_special_tokens=not processor.use_chat_template)["input_ids"]
    # In the placeholder layout the audio token is replaced by the clip, which `audio_positions` counts.
    return len(ids) - ids.count(processor.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))


def new_token_budget(generate_kwargs: dict, model: SpeechLMModel | None = None) -> int:
    """Tokens `generate` may add with these options (else the model's generation config, else our default)."""
    kwargs = default_generation_kwargs(model, **generate_kwargs)
    return int(kwargs.get("max_new_tokens") or kwargs.get("max_length") or 0)


def check_positions(model: SpeechLMModel, audio: int, prompt: int, new_tokens: int, name: str = "audio") -> None:
    """Raise a `ValueError` saying what to shorten when audio + prompt + new tokens exceed the LLM's positions."""
    limit = position_limit(model)
    total = audio + prompt + new_tokens
    if limit is not None and total > limit:
        raise ValueError(
            f"{name}: audio ({audio} positions) + prompt ({prompt} tokens) + max_new_tokens ({new_tokens}) = {total} "
            f"exceeds the LLM's {limit} positions; use shorter audio chunks, a shorter prompt or fewer new tokens"
        )


def length_cap(seconds: float, tokens_per_second: float, budget: int | None = None) -> int:
    """New tokens a transcript of a `seconds`-long clip may have: rate x length + margin, within `budget`."""
    cap = math.ceil(tokens_per_second * seconds) + LENGTH_CAP_MARGIN
    return min(cap, budget) if budget else cap


STRUCTURES = ("json_schema", "regex")


def per_clip_structures(generate_kwargs: dict, count: int) -> list[tuple[str, dict]]:
    """Each clip's structure option (`{"json_schema": ...}`, `{"regex": ...}` or `{}`) with a key that groups
    equal ones; a list option must have one entry per clip. Every distinct grammar is checked here, so an unusable
    schema or regex fails before any work is done. Each distinct option object is checked and keyed once, not once
    per clip (a large schema given for every clip is serialised once)."""
    per_kind = {}
    for kind in STRUCTURES:
        value = generate_kwargs.get(kind)
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"{count} clip(s) but {len(value)} {kind} value(s)")
            per_kind[kind] = list(value)
        else:
            per_kind[kind] = [value] * count
    seen: dict[tuple, tuple[str, dict]] = {}
    structures = []
    for i in range(count):
        option = {kind: values[i] for kind, values in per_kind.items() if values[i] is not None}
        identity = tuple((kind, id(value)) for kind, value in option.items())  # the objects live for this call
        if identity not in seen:
            structure_grammar(option)
            seen[identity] = (json.dumps(option, sort_keys=True), option)
        structures.append(seen[identity])
    return structures


def structured_batches(structures: list[tuple[str, dict]], order: list[int], batch_size: int) -> list[list[int]]:
    """`order` (grouped by structure) cut into batches of at most `batch_size` that share one structure: one
    grammar per `generate` call."""
    batches = []
    for _, group in itertools.groupby(order, key=lambda i: structures[i][0]):
        group = list(group)
        batches += [group[start : start + batch_size] for start in range(0, len(group), batch_size)]
    return batches


@torch.no_grad()
def transcribe_arrays(
    model: SpeechLMModel,
    processor: SpeechLMProcessor,
    audios: Sequence[np.ndarray],
    prompt: str | Sequence[str] | None = None,
    batch_size: int = 8,
    tokens_per_second: float | None = None,
    num_return_sequences: int = 1,
    prefer_quoted: bool = False,
    **generate_kwargs,
) -> list[str] | list[list[str]]:
    """Decode clips (1-D float arrays at the encoder's rate) in length-sorted batches; results keep input order.

    Sorting by length keeps padding (wasted compute) small; batched output equals one-by-one output by
    construction of the model, so sorting never changes a transcript. A clip whose audio + prompt + new tokens
    exceed the LLM's positions raises a `ValueError` before anything is generated. `tokens_per_second` (for
    transcription, not for answers that may be longer than the audio) caps each clip's new tokens at that rate
    times its length plus `LENGTH_CAP_MARGIN`: a model that has not learned to stop cannot run on for 100 tokens
    after a one-second clip. Each clip's cap is its own, so a clip's text does not depend on its batch-mates.
    A `json_schema` option (a schema dict or its JSON text) holds every answer to that schema, a `regex` option
    to that regular expression (`speechlm.inference.structured`); either may be a list, one per clip like
    `prompt` (e.g. each question's own answer pattern; None: free), and clips are batched with their own kind.
    With `num_return_sequences` k > 1 each clip gets a list of its k finished beams' texts, best first (the first is
    the text k = 1 gives), for a caller that knows better than the score which one to keep (`first_quoted`).
    `prefer_quoted` is that choice made here: a clip held to a schema whose values are quoted from a transcript
    (`WORDS_FROM`) is answered with its best beam whose values all are, its best beam when none is (other clips:
    the best beam); it needs beams, and at least one such clip.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokens_per_second is not None and not tokens_per_second > 0:
        raise ValueError(f"tokens_per_second must be > 0, got {tokens_per_second}")
    prompts = [prompt] * len(audios) if prompt is None or isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(audios):
        raise ValueError(f"{len(audios)} clip(s) but {len(prompts)} prompt(s)")
    structures = per_clip_structures(generate_kwargs, len(audios))  # an unusable one fails before any work
    # Grouped by structure (one grammar per `generate` call), length-sorted within a group.
    order = sorted(range(len(audios)), key=lambda i: (structures[i][0], len(audios[i])))
    kwargs = default_generation_kwargs(model, **{k: v for k, v in generate_kwargs.items() if k not in STRUCTURES})
    if prefer_quoted:
        num_return_sequences = quoted_choice_beams(num_return_sequences, kwargs, structures)
    returned = check_return_sequences(num_return_sequences, kwargs)
    limit, new_tokens = position_limit(model), new_token_budget(kwargs, model)
    audio_token = processor.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    device = next(model.parameters()).device
    results: list[str] = [""] * len(audios)
    for index in structured_batches(structures, order, batch_size):
        batch = processor([audios[i] for i in index], prompt=[prompts[i] for i in index])
        if limit is not None:
            audio_lengths = model.audio_output_lengths(batch["attention_mask"].sum(-1)) + 2
            prompt_lengths = batch["decoder_attention_mask"].sum(-1) - (batch["input_ids"] == audio_token).sum(-1)
            for row, i in enumerate(index):
                check_positions(model, int(audio_lengths[row]), int(prompt_lengths[row]), new_tokens, f"clip {i}")
        batch = {k: v.to(device) for k, v in batch.items()}
        schema = schema_of(structures[index[0]][1]) if prefer_quoted else None  # a batch shares one structure
        caps, capped = None, {}
        if tokens_per_second is not None:
            caps = [length_cap(len(audios[i]) / processor.sampling_rate, tokens_per_second, new_tokens) for i in index]
            kwargs["max_new_tokens"] = min(max(caps) + 1, new_tokens)  # + the end token forced at a cap
            kwargs.pop("max_length", None)
            eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
            if eos is not None:
                capped = {"logits_processor": [*(kwargs.get("logits_processor") or []), ClipLengthCaps(caps, eos)]}
        structured = {**kwargs, **structures[index[0]][1], **returned, **capped}
        tokens = model.generate(**batch, **with_json_schema(structured, model, processor.tokenizer))
        if caps:  # row r is clip index[r // k]'s
            tokens = [row[: caps[r // num_return_sequences]].tolist() for r, row in enumerate(tokens)]
        texts = processor.batch_decode(tokens)
        for row, i in enumerate(index):
            if num_return_sequences == 1:
                results[i] = texts[row]
            else:
                results[i] = texts[row * num_return_sequences : (row + 1) * num_return_sequences]
            if prefer_quoted:
                results[i] = first_quoted(schema, results[i]) if quoting(schema) else results[i][0]
    return results


def quoted_choice_beams(num_return_sequences: int, kwargs: dict, structures: list[tuple[str, dict]]) -> int:
    """The beams `prefer_quoted` decodes per clip (all of them); a clear `ValueError` where it cannot choose."""
    if num_return_sequences != 1:
        raise ValueError("prefer_quoted answers each clip with one of its beams: give it or num_return_sequences, "
                         "not both")
    beams = kwargs.get("num_beams") or 1
    if beams < 2 or kwargs.get("do_sample"):
        raise ValueError(f"prefer_quoted chooses among a beam search's beams: it needs num_beams >= 2 and no "
                         f"sampling, got num_beams={beams}{', do_sample=True' if kwargs.get('do_sample') else ''}")
    if not any(quoting(schema_of(options)) for options in dict(structures).values()):  # each distinct one once
        raise ValueError(f"prefer_quoted needs clips held to a json_schema with a {WORDS_FROM!r} field (values "
                         "quoted from a transcript); no clip has one")
    return beams


class ClipLengthCaps(LogitsProcessor):
    """Ends each clip's rows at its own cap (`length_cap`) by allowing only the end token there. A batch decodes to
    one `max_new_tokens`, its longest cap; cutting the text afterwards is exact for greedy decoding but not for a
    beam search, whose beams, cut at another length, rank differently: a clip's answer would depend on its
    batch-mates. Runs after the caller's processors (a schema's grammar cannot hold a capped answer open)."""

    def __init__(self, caps: Sequence[int], eos_token_id: int | Sequence[int]):
        self.caps = torch.tensor(list(caps))
        self.eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # `generate` hands the new tokens only (the audio and prompt go in as embeddings); rows are clip-major.
        ended = (self.caps <= input_ids.shape[1]).repeat_interleave(input_ids.shape[0] // len(self.caps))
        if ended.any():
            rows = ended.nonzero().squeeze(-1).to(scores.device)
            only_end = torch.full_like(scores[rows], float("-inf"))
            only_end[:, self.eos.to(scores.device)] = 0.0
            scores[rows] = only_end
        return scores


def check_return_sequences(count: int, kwargs: dict) -> dict:
    """The `generate` option for `count` texts per clip; a clear `ValueError` where the decoding cannot give them
    (greedy decoding has one answer; beam search keeps `num_beams`)."""
    if count < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {count}")
    if count == 1:
        return {}
    if not kwargs.get("do_sample") and kwargs.get("num_beams", 1) < count:
        raise ValueError(f"num_return_sequences={count} needs num_beams >= {count} (beam search keeps num_beams "
                         f"answers) or do_sample=True; got num_beams={kwargs.get('num_beams', 1)}")
    return {"num_return_sequences": count}


__all__ = [
    "MIN_AUDIO_SECONDS",
    "audio_positions",
    "beam_width",
    "ClipLengthCaps",
    "check_positions",
    "check_return_sequences",
    "quoted_choice_beams",
    "DECODING_FIELDS",
    "FALLBACK_GENERATION",
    "LENGTH_CAP_MARGIN",
    "length_cap",
    "default_generation_kwargs",
    "new_token_budget",
    "position_limit",
    "prompt_positions",
    "per_clip_structures",
    "saved_generation_settings",
    "structured_batches",
    "transcribe_arrays",
]
