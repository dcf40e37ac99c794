"""Streaming: text deltas out of a batched `generate`, carried to the event loop as OpenAI's server-sent events.

Decoding runs on the batcher's worker thread, a batch of several requests at a time; `BatchStreamer` hands each
row's new tokens to that request's `TextDeltas`, whose `sink` moves the text to the request's event loop
(`EventPump`). Streaming never changes what is decoded: the deltas of a request concatenate to the text it would get
without streaming.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable, Sequence

from transformers.generation.streamers import BaseStreamer

_END = object()


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (OpenAI leaves the stop string out), and whether one was found."""
    positions = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return (text[: min(positions)], True) if positions else (text, False)


class TextDeltas:
    """One request's growing token ids -> text deltas whose concatenation is its final, stripped text.

    Held back until later tokens settle it: a trailing incomplete UTF-8 character (decoded as U+FFFD), trailing
    whitespace (the final text is stripped) and the last characters that could still begin a stop string.
    """

    def __init__(self, tokenizer, sink: Callable[[str], None], stops: Sequence[str] = ()):
        self.tokenizer, self.sink, self.stops = tokenizer, sink, tuple(stops)
        self.ids: list[int] = []
        self.sent = ""
        self.finished = False

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        text, stopped = cut_at_stop(text, self.stops)
        if not stopped and self.stops:
            text = text[: max(len(text) - max(len(stop) for stop in self.stops) + 1, 0)]
        self._emit(text.rstrip().rstrip("\ufffd").rstrip())

    def finish(self, text: str) -> None:
        """The final text (as the non-streaming answer has it): send what is still missing."""
        self.finished = True
        self._emit(text)

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent) :], text
            self.sink(delta)


class BatchStreamer(BaseStreamer):
    """A `generate` streamer for a whole batch: row i's tokens go to `rows[i]` (None: that request does not stream).

    transformers' `TextIteratorStreamer` takes batch size 1 only; the server decodes several requests together.
    """

    def __init__(self, rows: Sequence[TextDeltas | None], eos_token_ids: Sequence[int]):
        self.rows = list(rows)
        self.eos = set(eos_token_ids)

    def put(self, value) -> None:
        if value.dim() > 1:  # the prompt (empty: the model generates from embeddings)
            return
        for row, token in zip(self.rows, value.tolist()):
            if row is None or row.finished:
                continue
            if token in self.eos:
                row.finished = True  # later tokens of this row are padding
                continue
            row.add(token)

    def end(self) -> None:
        pass


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a row: the generation config's (one or several) and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


class EventPump:
    """Items pushed from any thread (`sink`) as an async iterator that ends when `work` does, within a deadline.

    Raises `TimeoutError` when the deadline passes; leaving the iteration early (client gone, error, timeout)
    cancels `work`, which abandons its decoding.
    """

    def __init__(self, timeout: float):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = self.loop.time() + timeout

    def sink(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def run(self, work: asyncio.Future) -> AsyncIterator:
        work.add_done_callback(lambda _: self.sink(_END))  # after every item the worker pushed before finishing
        try:
            while True:
                item = await asyncio.wait_for(self.queue.get(), max(self.deadline - self.loop.time(), 0.0))
                if item is _END:
                    return
                yield item
        finally:
            if not work.done():
                work.cancel()


def sse(data: dict | str) -> str:
    """One server-sent event (`data: ...` and a blank line)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def stream_error(error: Exception, logger) -> dict:
    """The error event sent once a stream has begun (the status line is gone): OpenAI's error body.

    An `APIError` says what it says; anything else is logged on one line with a reference, never shown.
    """
    from .guard import APIError

    if not isinstance(error, APIError):
        reference = secrets.token_hex(4)
        logger.error("internal error %s while streaming: %s: %s", reference, type(error).__name__,
                     str(error).splitlines()[0][:300] if str(error) else "")  # fmt: skip
        error = APIError(500, f"Internal server error (reference {reference}); the server log has the details.",
                         type="server_error")  # fmt: skip
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def start_event_stream(request, events: AsyncIterator[str], what: str):
    """A `StreamingResponse` of `events`, answered only once the first event exists.

    An error before the first event is raised here, so the client gets an ordinary 4xx/5xx JSON answer; errors
    after it are the generator's to send as error events. A client that leaves before the first event cancels the
    work (499); after it, Starlette's disconnect watch cancels the generator.
    """
    from fastapi.responses import StreamingResponse

    from .guard import first_or_disconnect

    first = await first_or_disconnect(request, asyncio.ensure_future(anext(events)), what)

    async def body():
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


__all__ = ["BatchStreamer", "EventPump", "TextDeltas", "cut_at_stop", "sse", "start_event_stream", "stream_error"]
