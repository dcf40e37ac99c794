"""Inference: load a trained SpeechLM and turn audio into text, batched and sorted by length.

`transcribe_arrays` is the one decoding loop: evaluation, `speechlm transcribe` and the server all call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .modeling import SpeechLMModel
from .processing import SpeechLMProcessor


def load_pretrained(path: str, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None):
    """(processor, model) from a folder written by training / `save_pretrained` (model + processor side by side)."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = SpeechLMModel.from_pretrained(path, **kwargs).eval()
    if device is not None:
        model = model.to(device)
    processor = SpeechLMProcessor.from_pretrained(path)
    return processor, model


def default_generation_kwargs(model: SpeechLMModel, **overrides) -> dict:
    """Greedy decoding with a length cap; the caller's options win."""
    kwargs = {"max_new_tokens": 128, "do_sample": False, "num_beams": 1}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if not kwargs.get("do_sample"):
        kwargs.pop("temperature", None)
        kwargs.pop("top_p", None)
    return kwargs


@torch.no_grad()
def transcribe_arrays(
    model: SpeechLMModel,
    processor: SpeechLMProcessor,
    audios: Sequence[np.ndarray],
    prompt: str | Sequence[str] | None = None,
    batch_size: int = 8,
    **generate_kwargs,
) -> list[str]:
    """Decode clips (1-D float arrays at the encoder's rate) in length-sorted batches; results keep input order.

    Sorting by length keeps padding (wasted compute) small; batched output equals one-by-one output by
    construction of the model, so sorting never changes a transcript.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [prompt] * len(audios) if prompt is None or isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(audios):
        raise ValueError(f"{len(audios)} clip(s) but {len(prompts)} prompt(s)")
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    kwargs = default_generation_kwargs(model, **generate_kwargs)
    device = next(model.parameters()).device
    results: list[str] = [""] * len(audios)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = processor([audios[i] for i in index], prompt=[prompts[i] for i in index])
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = model.generate(**batch, **kwargs)
        for i, text in zip(index, processor.batch_decode(tokens)):
            results[i] = text
    return results


__all__ = ["load_pretrained", "transcribe_arrays", "default_generation_kwargs"]
