"""Dynamic batching: concurrent requests that arrive within a few milliseconds are decoded as one batch.

One worker thread owns the model (generation is not thread-safe, and one big batch beats several small ones on any
device). It takes the oldest waiting clip, waits until `max_wait_ms` after that clip arrived for more clips with the
same generation options, and hands up to `max_batch_size` of them to `transcribe_arrays`. Since batched output equals
one-by-one output, batching changes latency and throughput, never a transcript.

Chat requests (`chat`) share the worker and its queue: a batch holds requests of one kind with equal generation
options, so a chat conversation and a transcription wait in the same line and neither kind can starve the other.
A request with a `seed` is decoded alone, so its sampled text depends on its seed only.
A request with a `sink` gets its text as it is decoded (`streaming.TextDeltas`), token by token.

Fairness (issue 14): the worker is one, so the order of the line decides who waits. Waiting clips are served in
order of a fair-queueing tag, not of arrival: each *flow* (one request, `request_flow`: a long upload's chunks share
one) is charged the rough work of its clips (audio seconds), so a request that queued 30 minutes of chunks gets one
chunk's turn while a short request arriving later goes ahead of the rest. A batch also holds at most
`max_batch_seconds` of padded audio, so short clips never ride in (and wait for) a batch padded to 25 s chunks,
and only clips with prompts of similar length (a maximal prompt pads every row of its batch).
Model work done outside the worker (the server's silence splitting of long uploads, ~13 ms of CPU per second of
audio) takes its `turn` in the same line and runs while the worker waits, so it never competes with decoding for the
cores: measured, four 30-minute uploads split concurrently made good requests 3.7x slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..inference.decoding import default_generation_kwargs, transcribe_arrays
from ..inference.structured import first_quoted, schema_of, with_json_schema
from ..joint_ctc import joint_options
from .guard import request_flow
from .streaming import BatchStreamer, TextDeltas, cut_at_stop, eos_token_ids

logger = logging.getLogger(__name__)

_STOP = object()
# Prompt characters that cost about what a second of audio costs (~25 tokens ~ the LLM positions of a second).
PROMPT_CHARS_PER_SECOND = 100
# Clips share a batch only if their prompts differ by at most this many characters: every row is padded to the
# longest prompt, so one maximal prompt in a batch of short ones multiplies the whole batch's work.
PROMPT_CHARS_TOLERANCE = 200
_flows = itertools.count()  # `request_flow` (set per API request by `RequestGuard`) unset: each clip is its own flow


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
    flow: object = field(default_factory=lambda: request_flow.get() or next(_flows))
    tag: float = 0.0  # fair-queueing finish tag, set by the worker when it takes the job in
    turn_samples: int = 0  # a `turn`: the audio it covers (its cost)
    released: threading.Event | None = None  # a `turn`: set when the work it covers is done
    max_hold: float = 10.0  # a `turn`: the longest the worker waits for `released`

    def gone(self) -> bool:
        return self.abandoned.is_set() or self.future.cancelled()

    def samples(self) -> int:
        """Audio samples of the clip (of every clip of a chat): what padding and decoding cost scale with."""
        if self.audio is not None:
            return len(self.audio)
        if self.released is not None:
            return self.turn_samples
        return sum(len(part["audio"]) for message in self.conversation or () for part in message.get("content", ())
                   if isinstance(part, dict) and part.get("type") == "audio")  # fmt: skip


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
        max_batch_seconds: most padded audio per batch (clips x the longest clip's seconds); a batch's first clip
            always fits. None: no limit.
    """

    def __init__(self, model, processor, max_batch_size: int = 16, max_wait_ms: float = 10.0,
                 max_batch_seconds: float | None = None):  # fmt: skip
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        extractor = getattr(processor, "feature_extractor", None)
        self.sampling_rate = getattr(extractor, "sampling_rate", None) or 16000
        self.max_batch_samples = None if max_batch_seconds is None else max_batch_seconds * self.sampling_rate
        self._queue: queue.Queue = queue.Queue()
        self._waiting: list[_Job] = []  # taken from the queue by the worker, not yet decoded
        self._flow_finish: dict[object, float] = {}  # each flow's last finish tag
        self._virtual_time = 0.0  # the start tag of the batch last chosen
        self._stopping = False
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

    @contextlib.contextmanager
    def turn(self, seconds: float, stop: threading.Event | None = None, max_hold: float = 10.0):
        """Wait (blocking; call it off the event loop) for the worker to reach this work in the fair line, then hold
        the worker while the body runs: model work done elsewhere, charged to the request's flow as `seconds` of
        audio. Waiting ends early once `stop` is set; the worker takes the line back after `max_hold` seconds."""
        if self._closed or threading.current_thread() is self._thread:
            yield
            return
        job = _Job(None, None, (("kind", "turn"),), turn_samples=round(seconds * self.sampling_rate),
                   released=threading.Event(), max_hold=max_hold)  # fmt: skip
        self._submit(job)
        try:
            while True:
                try:
                    job.future.result(timeout=0.1)
                    break
                except TimeoutError:
                    if stop is not None and stop.is_set():
                        job.abandoned.set()
                        job.future.cancel()
                        break
            yield
        finally:
            job.released.set()

    def pending(self) -> int:
        return self._queue.qsize() + len(self._waiting)

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
            batch = self._collect()
            if batch:
                self._decode(batch)
            elif self._stopping:
                return

    def _take_in(self, job) -> None:
        """Tag a job from the queue: its flow's finish so far (or now, if the flow is idle) plus its work."""
        if job is _STOP:
            self._stopping = True
            return
        job.tag = max(self._virtual_time, self._flow_finish.get(job.flow, 0.0)) + self._cost(job)
        self._flow_finish[job.flow] = job.tag
        self._waiting.append(job)

    def _cost(self, job: _Job) -> float:
        """A job's work for fairness: seconds of audio, plus one per `PROMPT_CHARS_PER_SECOND` characters of its
        prompt, at least 1 (the fixed cost of a request)."""
        return max(job.samples() / self.sampling_rate + len(job.prompt or "") / PROMPT_CHARS_PER_SECOND, 1.0)

    def _drain(self, timeout: float | None = None) -> bool:
        """Take in what is queued, waiting up to `timeout` for the first item (None: forever); False if nothing."""
        try:
            item = self._queue.get_nowait() if timeout is not None and timeout <= 0 else self._queue.get(
                timeout=timeout)  # fmt: skip
        except queue.Empty:
            return False
        self._take_in(item)
        while True:
            try:
                self._take_in(self._queue.get_nowait())
            except queue.Empty:
                return True

    def _collect(self) -> list[_Job]:
        """The next batch: the waiting job with the lowest tag, then jobs with its options in tag order while they
        fit (`max_batch_size`, `max_batch_seconds`). Empty when stopping and nothing is left."""
        while not self._waiting:
            if self._stopping:
                return []
            self._drain()
        # The batch window: until `max_wait` after the oldest waiting clip arrived, more may join.
        deadline = min(job.arrived for job in self._waiting) + self.max_wait
        while not self._stopping and len(self._waiting) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._drain(remaining):
                break
        self._drain(0)  # past the deadline, still take what is already queued
        ordered = sorted(self._waiting, key=lambda job: (job.tag, job.arrived))
        first = ordered[0]
        batch, longest = [first], first.samples()
        # A turn goes alone; so does a seeded request (its draws must not depend on others).
        if first.released is None and "seed" not in dict(first.options):
            for job in ordered[1:]:
                if len(batch) >= self.max_batch_size:
                    break
                if job.options != first.options:
                    continue
                if abs(len(job.prompt or "") - len(first.prompt or "")) > PROMPT_CHARS_TOLERANCE:
                    continue
                padded = max(longest, job.samples()) * (len(batch) + 1)
                if self.max_batch_samples is not None and padded > self.max_batch_samples:
                    continue
                batch.append(job)
                longest = max(longest, job.samples())
        # Virtual time runs at the rate each backlogged flow would be served if the worker were shared equally: the
        # batch's work over the flows waiting now. A new request starts at it, so it neither jumps ahead of work
        # queued long ago (no starvation of long clips under steady load) nor waits behind a flow's whole backlog.
        flows = {job.flow for job in self._waiting}
        self._virtual_time += sum(self._cost(job) for job in batch) / len(flows)
        chosen = {id(job) for job in batch}
        self._waiting = [job for job in self._waiting if id(job) not in chosen]
        waiting_flows = {job.flow for job in self._waiting}
        self._flow_finish = {flow: tag for flow, tag in self._flow_finish.items()
                             if tag > self._virtual_time or flow in waiting_flows}  # fmt: skip
        return batch

    def _decode(self, batch: list[_Job]) -> None:
        if batch[0].released is not None:  # a turn: let its holder run, wait until it is done
            if batch[0].future.set_running_or_notify_cancel():
                batch[0].future.set_result(None)
                batch[0].released.wait(batch[0].max_hold)
            return
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
        weight = options.pop("joint_ctc_weight", None)  # set only for one clip and a schema opening with a transcript
        if weight:
            options |= joint_options(processor.tokenizer, weight, False, json.loads(options["json_schema"]))
        schema = schema_of(options) if options.pop("prefer_quoted", False) else None
        kwargs = default_generation_kwargs(model, **options)
        beams = kwargs["num_beams"] if schema else 1  # every beam of each answer, to keep the best quoted one
        kwargs |= {"num_return_sequences": beams} if beams > 1 else {}
        if stops:
            kwargs.update(stop_strings=list(stops), tokenizer=processor.tokenizer)
        deltas = self._streamer(jobs, kwargs, stops)
        inputs = processor.apply_chat_template([job.conversation for job in jobs], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)  # fmt: skip
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        tokens = model.generate(**inputs, **with_json_schema(kwargs, model, processor.tokenizer))
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
        if beams > 1:  # row r is jobs[r // beams]'s
            results = [quoted_result(schema, results[start : start + beams]) for start in range(0, len(results), beams)]
        self._finish(deltas, [result.text for result in results])
        return results


def quoted_result(schema: dict, beams: list[ChatResult]) -> ChatResult:
    """One answer's best beam whose values are all quoted (`first_quoted`), else its best beam."""
    texts = [beam.text for beam in beams]
    return beams[texts.index(first_quoted(schema, texts))]


__all__ = ["ChatResult", "DynamicBatcher", "request_flow"]
