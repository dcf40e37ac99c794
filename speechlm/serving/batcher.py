"""Dynamic batching: concurrent requests that arrive within a few milliseconds are decoded as one batch.

One worker thread owns the model (generation is not thread-safe, and one big batch beats several small ones on any
device). It takes the oldest waiting clip, waits until `max_wait_ms` after that clip arrived for more clips with the
same generation options, and hands up to `max_batch_size` of them to `transcribe_arrays`. Since batched output equals
one-by-one output, batching changes latency and throughput, never a transcript.

Chat requests (`chat`) share the worker and its queue: a batch holds requests of one kind with equal generation
options, so a chat conversation and a transcription wait in the same line and neither kind can starve the other.
A request with a `seed` is decoded alone, so its sampled text depends on its seed only.
A request with a `sink` gets its text as it is decoded (`streaming.TextDeltas`), token by token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..inference.decoding import default_generation_kwargs, transcribe_arrays
from .streaming import BatchStreamer, TextDeltas, cut_at_stop, eos_token_ids

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass
class ChatResult:
    """One chat completion: its text (cut before a stop string), generated tokens and why generation ended."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens reached)


@dataclass
class _Job:
    audio: np.ndarray | None
    prompt: str | None
    options: tuple  # (kind, generation kwargs as sorted items): only identical options share a batch
    conversation: list | None = None  # a chat request: messages whose audio parts are decoded arrays
    sink: Callable[[str], None] | None = None  # receives text deltas as they are decoded
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    abandoned: threading.Event = field(default_factory=threading.Event)  # nobody waits for the text any more

    def gone(self) -> bool:
        return self.abandoned.is_set() or self.future.cancelled()


class _StopWhenAbandoned:
    """A `generate` stopping criterion: the whole batch stops once every clip in it has been abandoned.

    A request that timed out or whose client went away must not keep a core busy for minutes.
    """

    def __init__(self, jobs: list[_Job]):
        self.jobs = jobs

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = all(job.gone() for job in self.jobs)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class DynamicBatcher:
    """Queue clips from any thread or event loop; a worker thread decodes them in batches.

    Args:
        max_batch_size: most clips per `transcribe_arrays` call; 1 turns batching off (clips decoded one at a time).
        max_wait_ms: how long the oldest waiting clip may wait for others to join its batch.
    """

    def __init__(self, model, processor, max_batch_size: int = 16, max_wait_ms: float = 10.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._held: deque[_Job] = deque()  # jobs taken from the queue whose options differ from the current batch's
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0
        self.clips = 0
        self.largest_batch = 0

    # ------------------------------------------------------------------------------------------------ client side
    def submit(self, audio: np.ndarray, prompt: str | None = None, **generate_kwargs) -> Future:
        """Queue one clip; the future resolves to its text (or to the exception that decoding it raised).

        Cancelling the future drops the clip if it is still waiting, and stops its batch's generation once every
        clip of that batch is cancelled.
        """
        return self._submit(_Job(audio, prompt, self._options("transcribe", generate_kwargs))).future

    @staticmethod
    def _options(kind: str, generate_kwargs: dict) -> tuple:
        items = tuple(sorted((k, v) for k, v in generate_kwargs.items() if v is not None))
        return (("kind", kind), *items)

    def _submit(self, job: _Job) -> _Job:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        self._ensure_worker()
        self._queue.put(job)
        return job

    async def transcribe(self, audio: np.ndarray, prompt: str | None = None,
                         sink: Callable[[str], None] | None = None, **generate_kwargs) -> str:  # fmt: skip
        """`submit` for an event loop; cancelling the await (a timeout, a client gone) abandons the clip."""
        job = _Job(audio, prompt, self._options("transcribe", generate_kwargs), sink=sink)
        return await self._wait(self._submit(job))

    async def chat(self, conversation: list, sink: Callable[[str], None] | None = None,
                   **generate_kwargs) -> ChatResult:  # fmt: skip
        """Queue one conversation (`processor.apply_chat_template`'s input, audio decoded); `stop` is a tuple of
        stop strings. Cancelling the await abandons it, as for `transcribe`."""
        job = _Job(None, None, self._options("chat", generate_kwargs), conversation=conversation, sink=sink)
        return await self._wait(self._submit(job))

    @staticmethod
    async def _wait(job: _Job):
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.abandoned.set()
            job.future.cancel()  # still waiting: never decoded
            raise

    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    def stats(self) -> dict:
        return {
            "batches": self.batches,
            "clips": self.clips,
            "mean_batch_size": round(self.clips / self.batches, 2) if self.batches else 0.0,
            "largest_batch": self.largest_batch,
            "pending": self.pending(),
        }

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the queued clips, then stop the worker."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="speechlm-batcher", daemon=True)
                self._thread.start()

    # ------------------------------------------------------------------------------------------------ worker side
    def _run(self) -> None:
        while True:
            batch, stop = self._collect()
            if batch:
                self._decode(batch)
            if stop:
                while self._held:  # jobs of other options that were waiting behind the stop marker
                    self._decode([self._held.popleft()])
                return

    def _collect(self) -> tuple[list[_Job], bool]:
        first = self._held.popleft() if self._held else self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        if "seed" in dict(first.options):  # a seeded request samples alone: its draws must not depend on others
            return batch, False
        for job in list(self._held):
            if len(batch) < self.max_batch_size and job.options == first.options:
                self._held.remove(job)
                batch.append(job)
        deadline = first.arrived + self.max_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                # Past the deadline, still take what is already queued (it arrived while the last batch decoded).
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            if job.options == first.options:
                batch.append(job)
            else:
                self._held.append(job)
        return batch, False

    def _decode(self, batch: list[_Job]) -> None:
        jobs = [job for job in batch if job.future.set_running_or_notify_cancel()]  # skip abandoned requests
        if not jobs:
            return
        self.batches += 1
        self.clips += len(jobs)
        self.largest_batch = max(self.largest_batch, len(jobs))
        try:
            texts = self._generate(jobs)
        except Exception as error:  # noqa: BLE001 - isolate the clip that failed from the others
            if len(jobs) == 1:
                jobs[0].future.set_exception(error)
                return
            logger.warning("batch of %d failed (%s); decoding its clips one by one", len(jobs), error)
            for job in jobs:
                if job.gone():  # nobody waits for it: do not decode it alone either
                    continue
                try:
                    job.future.set_result(self._generate([job])[0])
                except Exception as single_error:  # noqa: BLE001
                    job.future.set_exception(single_error)
            return
        for job, text in zip(jobs, texts):
            job.future.set_result(text)

    def _generate(self, jobs: list[_Job]) -> list:
        from transformers import StoppingCriteriaList

        options = dict(jobs[0].options)
        kind = options.pop("kind")
        options.pop("seed", None)
        if "seed" in dict(jobs[0].options):
            import torch

            torch.manual_seed(dict(jobs[0].options)["seed"])
        options["stopping_criteria"] = StoppingCriteriaList([_StopWhenAbandoned(jobs)])
        if kind == "chat":
            return self._chat(jobs, options)
        # transcribe_arrays sorts clips by length (stably): pre-sorted, row i of its one batch is jobs[i].
        order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].audio))
        ordered = [jobs[i] for i in order]
        deltas = self._streamer(ordered, options)
        texts = transcribe_arrays(self.model, self.processor, [job.audio for job in ordered],
                                  [job.prompt for job in ordered], len(jobs), **options)  # fmt: skip
        self._finish(deltas, texts)
        results = [""] * len(jobs)
        for position, index in enumerate(order):
            results[index] = texts[position]
        return results

    def _streamer(self, jobs: list[_Job], options: dict, stops: tuple = ()) -> list[TextDeltas | None]:
        """Per-row text deltas, and a `BatchStreamer` in `options` when a job streams (beam search cannot)."""
        tokenizer = self.processor.tokenizer
        deltas = [TextDeltas(tokenizer, job.sink, stops) if job.sink else None for job in jobs]
        if any(deltas) and (options.get("num_beams") or 1) == 1:
            options["streamer"] = BatchStreamer(deltas, eos_token_ids(self.model, tokenizer))
        return deltas

    @staticmethod
    def _finish(deltas: list[TextDeltas | None], texts: list[str]) -> None:
        for row, text in zip(deltas, texts):
            if row is not None:
                row.finish(text)

    def _chat(self, jobs: list[_Job], options: dict) -> list[ChatResult]:
        import torch

        processor, model = self.processor, self.model
        stops = tuple(options.pop("stop", ()) or ())
        kwargs = default_generation_kwargs(model, **options)
        if stops:
            kwargs.update(stop_strings=list(stops), tokenizer=processor.tokenizer)
        deltas = self._streamer(jobs, kwargs, stops)
        inputs = processor.apply_chat_template([job.conversation for job in jobs], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)  # fmt: skip
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        tokens = model.generate(**inputs, **kwargs)
        eos = set(eos_token_ids(model, processor.tokenizer))
        pad = model.generation_config.pad_token_id
        results = []
        for row, text in zip(tokens.tolist(), processor.batch_decode(tokens)):
            while pad is not None and row and row[-1] == pad and pad not in eos:  # a row stopped by a stop string
                row.pop()
            ended = next((i for i, token in enumerate(row) if token in eos), None)
            text, stopped = cut_at_stop(text, stops)
            text = text.strip()  # as batch_decode leaves it (streamed deltas add up to this)
            count = len(row) if ended is None else ended + 1
            reason = "stop" if ended is not None or stopped or count < kwargs["max_new_tokens"] else "length"
            results.append(ChatResult(text, count, reason))
        self._finish(deltas, [result.text for result in results])
        return results


__all__ = ["ChatResult", "DynamicBatcher"]
