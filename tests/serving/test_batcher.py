"""The batcher's line (speechlm/serving/batcher.py): who is decoded next when one request queued a lot of work.

Decoding is a deterministic fake that records each batch and can be held, so every check counts batches and never
depends on how fast anything runs.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import speechlm.serving.batcher as batcher_module
from speechlm.serving.batcher import DynamicBatcher, request_flow

SR = 16000


class _Processor:
    tokenizer = None

    class feature_extractor:  # noqa: N801 - stands in for the processor's attribute
        sampling_rate = SR


@pytest.fixture
def decoded(monkeypatch):
    """Fake `transcribe_arrays`: returns each clip's prompt as its text, records the batches (lists of prompts);
    the first call blocks until `release` is set, so the test can queue work behind it."""
    record = {"batches": [], "busy": threading.Event(), "release": threading.Event(), "during": None}

    def fake(model, processor, audios, prompts, batch_size, **kwargs):
        record["batches"].append(list(prompts))
        record["busy"].set()
        assert record["release"].wait(30)
        if record["during"] is not None:  # e.g. a client sends its next request while this batch decodes
            record["during"]()
        return list(prompts)

    monkeypatch.setattr(batcher_module, "transcribe_arrays", fake)
    return record


def _submit(batcher, flow, name, seconds):
    token = request_flow.set(flow)
    try:
        return batcher.submit(np.zeros(int(seconds * SR), dtype=np.float32), name)
    finally:
        request_flow.reset(token)


def _order(decoded, futures) -> list[str]:
    for future in futures:
        assert future.result(30) is not None
    return [name for batch in decoded["batches"] for name in batch]


def test_a_short_request_is_not_served_after_a_long_requests_queue(decoded):
    """A good request queued behind 10 chunks of one long upload is decoded after at most one of them (FIFO: all)."""
    batcher = DynamicBatcher(None, _Processor(), max_batch_size=1, max_wait_ms=0)
    try:
        futures = [_submit(batcher, "long", "long-0", 25)]
        assert decoded["busy"].wait(30)  # the worker holds the first chunk
        futures += [_submit(batcher, "long", f"long-{i}", 25) for i in range(1, 11)]
        futures.append(_submit(batcher, "good", "good", 3))
        decoded["release"].set()
        order = _order(decoded, futures)
    finally:
        batcher.close()
    assert sorted(order) == sorted(["good"] + [f"long-{i}" for i in range(11)])  # everyone is served, once
    assert order.index("good") <= 2, order  # after the chunk in flight and at most one more


def test_two_long_requests_share_the_worker_in_turns(decoded):
    """Two flows with equal work take turns instead of the first-come one going to the end."""
    batcher = DynamicBatcher(None, _Processor(), max_batch_size=1, max_wait_ms=0)
    try:
        futures = [_submit(batcher, "a", "a0", 10)]
        assert decoded["busy"].wait(30)
        futures += [_submit(batcher, "a", f"a{i}", 10) for i in range(1, 5)]
        futures += [_submit(batcher, "b", f"b{i}", 10) for i in range(4)]
        decoded["release"].set()
        order = _order(decoded, futures)
    finally:
        batcher.close()
    # At every point the two flows have had nearly equal turns (FIFO: a0-a4 first, 5 ahead); each keeps its order.
    assert all(abs(sum(n[0] == "a" for n in order[:k]) - sum(n[0] == "b" for n in order[:k])) <= 2
               for k in range(len(order))), order  # fmt: skip
    assert [name for name in order if name[0] == "a"] == [f"a{i}" for i in range(5)], order


def test_a_long_clip_is_not_starved_by_a_stream_of_short_requests(decoded):
    """Each new request is a new flow; virtual time advances with the work done, so a 10 s clip waiting while a
    new 2 s request arrives during every decode is served after a bounded number of them (shortest-first alone, or
    a virtual time that stood still, would keep it waiting as long as the stream lasts)."""
    batcher = DynamicBatcher(None, _Processor(), max_batch_size=1, max_wait_ms=0)
    futures = []

    def next_short():
        if len(futures) < 42:
            futures.append(_submit(batcher, f"short-{len(futures)}", f"short-{len(futures)}", 2))

    decoded["during"] = next_short
    try:
        futures += [_submit(batcher, "first", "first", 2), _submit(batcher, "long", "long", 10)]
        decoded["release"].set()
        order = _order(decoded, futures)
        order = _order(decoded, futures)  # the list grew while it was waited on
    finally:
        batcher.close()
    assert len(order) == 42 and order.index("long") <= 12, order


def test_short_clips_do_not_ride_in_a_batch_padded_to_long_chunks(decoded):
    """With a padded-audio budget a batch of short clips is not joined by 25 s chunks (they go in their own)."""
    batcher = DynamicBatcher(None, _Processor(), max_batch_size=16, max_wait_ms=0, max_batch_seconds=60)
    try:
        futures = [_submit(batcher, "first", "first", 3)]
        assert decoded["busy"].wait(30)
        futures += [_submit(batcher, "long", f"long-{i}", 25) for i in range(4)]
        futures += [_submit(batcher, f"good-{i}", f"good-{i}", 3) for i in range(5)]
        decoded["release"].set()
        order = _order(decoded, futures)
    finally:
        batcher.close()
    batches = decoded["batches"]
    assert batches[0] == ["first"]
    assert sorted(batches[1]) == [f"good-{i}" for i in range(5)], batches  # the short ones, together, first
    assert all(len(batch) <= 2 for batch in batches[2:]), batches  # 2 x 25 s fit in 60 s, 3 do not
    assert sorted(order) == sorted(["first"] + [f"long-{i}" for i in range(4)] + [f"good-{i}" for i in range(5)])


def test_work_outside_the_worker_takes_its_turn_in_the_line(decoded):
    """`turn` (the server's silence splitting) waits in the fair line and holds the worker: no batch is decoded
    while a turn is held, and three turns of one long upload interleave with other requests instead of going first.
    """
    import concurrent.futures

    batcher = DynamicBatcher(None, _Processor(), max_batch_size=1, max_wait_ms=0)
    log = decoded["batches"]  # batches, and the turns' markers, in the order they happened
    inside: list = []

    def split():
        token = request_flow.set("long")
        try:
            for block in range(3):
                with batcher.turn(4.0):
                    log.append(f"turn-{block}")
                    future = _submit(batcher, f"during-{block}", f"during-{block}", 2)
                    with pytest.raises(concurrent.futures.TimeoutError):
                        future.result(timeout=0.2)  # the worker is held: it cannot decode meanwhile
                    inside.append(future)
                    log.append(f"end-{block}")
        finally:
            request_flow.reset(token)

    try:
        futures = [_submit(batcher, "first", "first", 2)]
        assert decoded["busy"].wait(30)
        splitter = threading.Thread(target=split)
        splitter.start()
        futures += [_submit(batcher, f"good-{i}", f"good-{i}", 2) for i in range(3)]
        decoded["release"].set()
        splitter.join(30)
        _order(decoded, futures + inside)
    finally:
        batcher.close()
    for block in range(3):
        start = log.index(f"turn-{block}")
        assert log[start + 1] == f"end-{block}", log  # nothing decoded while the turn was held
    assert log.index("turn-2") > log.index(["good-0"]), log  # the long upload does not take all its turns first


def test_a_maximal_prompt_does_not_pad_a_batch_of_short_ones(decoded):
    """Clips batch only with prompts of similar length: one 1,900-character prompt among short ones goes alone."""
    batcher = DynamicBatcher(None, _Processor(), max_batch_size=16, max_wait_ms=0)
    long_prompt = "remind " * 270
    try:
        futures = [_submit(batcher, "first", "first", 2)]
        assert decoded["busy"].wait(30)
        futures += [_submit(batcher, f"good-{i}", f"good-{i}", 2) for i in range(3)]
        futures.append(_submit(batcher, "hostile", long_prompt, 2))
        futures += [_submit(batcher, f"good-{i}", f"good-{i}", 2) for i in range(3, 6)]
        decoded["release"].set()
        _order(decoded, futures)
    finally:
        batcher.close()
    batches = decoded["batches"]
    assert sorted(batches[1]) == [f"good-{i}" for i in range(6)] and batches[2] == [long_prompt], batches
