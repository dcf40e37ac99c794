"""Shared serving fixtures: decoding made slow on purpose, to prove timeouts and disconnects really stop the work."""

from __future__ import annotations

import threading
import time

import openai
import pytest
import torch
from transformers import StoppingCriteria

import speechlm.serving.batcher as batcher_module


class SlowSteps(StoppingCriteria):
    """Makes every generation step take a while and counts the steps (never stops anything itself)."""

    def __init__(self):
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        time.sleep(0.05)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def slow_down(monkeypatch, owner, name: str, **forced) -> dict:
    """Replace `owner.name` (a decoding function) by one that runs 400 forced steps of 50 ms (20 s) unless the server
    stops it, with `forced` generation settings; the record says when decoding ended and holds the step counters."""
    record = {"ended": threading.Event(), "criteria": []}
    real = getattr(owner, name)

    def slow(*args, **kwargs):
        criterion = SlowSteps()
        record["criteria"].append(criterion)
        kwargs["stopping_criteria"] = list(kwargs.get("stopping_criteria") or []) + [criterion]
        try:
            return real(*args, **(kwargs | forced))
        finally:
            record["ended"].set()

    monkeypatch.setattr(owner, name, slow)
    return record


def stopped_early(record: dict, steps: int = 400) -> bool:
    """A slowed decoding (`slow_down`'s record) ended within 10 s, before its `steps` tokens."""
    return record["ended"].wait(10) and record["criteria"][0].steps < steps


@pytest.fixture
def slow_decoding(monkeypatch):
    """The server's transcription decoding, slowed (see `slow_down`)."""
    return slow_down(monkeypatch, batcher_module, "transcribe_arrays", min_new_tokens=400)


@pytest.fixture(scope="module")
def client(server):
    """The official `openai` client on the module's live `server` (its URL, or (URL, app))."""
    url = server[0] if isinstance(server, tuple) else server
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client
