"""The demo's training: the examples over cached frozen-encoder frames (the library's `EncoderCache`,
`SpeechLMDataset`, `SpeechLMCollator`), then transformers' Trainer (`SpeechLMTrainer`) stopped by the clock, a CTC
pre-alignment of the projector first, with a held-out WER curve along the way.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import EncoderCache, SpeechLMCollator, SpeechLMDataset
from ..hardware import DtypeChoice
from ..processing import SpeechLMProcessor
from .evaluate import MAX_NEW_TOKENS, ctc_head_transcripts, transcribe_capped
from .report import HEAD_CURVE
from .settings import PRESETS, DemoSettings
from .understanding import parse_tasks, text_only_examples, training_examples

# The defaults were first tuned on a 2-core Xeon with AMX (bfloat16 LLM): ~50 LLM steps of batch 8 per minute (since:
# ~32 in float32 on a Xeon without AMX, 36-44 in bfloat16 on a Zen 4). Far below that, a time-budgeted run trains a
# different, much weaker model, and the demo says so.
EXPECTED_LLM_STEPS_PER_MINUTE = 50
RATE_CHECK_STEPS = 10
TEXT_ONLY_SENTENCES = 20_000  # fresh grammar sentences behind --text-rows (1,200 LLM steps x 8 rows: about half)
REAL_SOURCES = ("asterisk", "uqm")  # manifest `source`s of real speech, repeated by --real-speech-repeats


# The copies after the first of a repeated real clip, in turn (with --real-speech-augment): slower and faster speech,
# a room, a noisy line, the phone channel; each copy's noise and room drawn from its own seed.
# Each still readable: Whisper tiny.en reads real clips through them at 10-15 % WER (3.7 % clean; stacking a room,
# noise and the phone line reached 42 %: benchmarks/augmentation.py).
REAL_SPEECH_AUGMENTS = ("speed=0.9,reverb=0.3", "speed=1.1,telephone,noise=30", "speed=0.95,reverb=0.4,noise=25",
                        "speed=1.05,noise=15")


def training_records(records: Sequence[dict], real_speech_repeats: int = 1, tasks: Sequence[str] = ("transcribe",),
                     meanings: dict | None = None, augment: bool = False) -> list[dict]:
    """Manifest records -> the examples the trainer sees. Each real-speech record (`source` "asterisk" or "uqm")
    comes `real_speech_repeats` times (the few hundred real prompts would otherwise be a few percent of a large
    synthetic corpus), each copy after the first augmented (`REAL_SPEECH_AUGMENTS`) when `augment`; with
    understanding `tasks`, each grammar clip whose meaning is in `meanings` also gives one understanding example.
    An example's `text` is what the LLM learns, its `transcript` what the clip says (the CTC head's target whatever
    the task)."""
    meanings = meanings or {}
    examples = []
    for index, record in enumerate(records):
        repeats = real_speech_repeats if record.get("extra", {}).get("source") in REAL_SOURCES else 1
        for copy in range(repeats):
            spec = record.get("augment")
            if augment and copy:
                spec = f"{REAL_SPEECH_AUGMENTS[(copy - 1) % len(REAL_SPEECH_AUGMENTS)]},seed={index * 16 + copy}"
            for example in training_examples(record["text"], meanings.get(record["text"]), tasks):
                examples.append({**record, "text": example.target, "prompt": example.prompt, "task": example.task,
                                 "transcript": record["text"], "augment": spec})
    return examples


def cached_training_set(model, processor: SpeechLMProcessor, records: Sequence[dict], examples: Sequence[dict],
                        cache_file: Path) -> SpeechLMDataset:
    """`examples` over the frozen encoder's frames of every clip of `records` and every augmented copy in `examples`:
    encoded once (length-sorted batches), kept in memory in float16 and on disk as one file (`cache_file`, reused
    while the encoder and the clips are the same); batched by frame count."""
    cache = EncoderCache.for_model(model, processor, dtype=torch.float16)
    if cache_file.is_file():
        cache.load(cache_file)
    unique = {cache.key(clip): clip for clip in [*records, *(e for e in examples if e.get("augment"))]}
    clips = SpeechLMDataset(list(unique.values()), processor.sampling_rate, encoder_cache=cache)
    if cache.fill(model, processor, clips, batch_size=32):
        cache.save(cache_file, keys=list(unique))
    lengths = [cache.get(cache.key(example)).shape[0] for example in examples]
    return SpeechLMDataset(examples, processor.sampling_rate, encoder_cache=cache, lengths=lengths)


def corpus_token_ids(processor: SpeechLMProcessor, texts: list[str]) -> list[int]:
    """Every token id the training transcripts use (as labels): the CTC head's classes, ~1k instead of 49k."""
    ids: set[int] = set()
    for start in range(0, len(texts), 256):
        chunk = texts[start : start + 256]
        labels = processor.encode_text([processor.build_prompt()] * len(chunk), chunk)["labels"]
        ids.update(labels[labels >= 0].tolist())
    return sorted(ids)


@contextmanager
def float32_frozen_weights(model):
    """Upcast the frozen bfloat16 weights while decoding, then restore them bit-exactly.

    bfloat16 halves a training step on this CPU, but its one-token decode steps are several times slower than
    float32's; the trainable float32 parts are left alone.
    """
    frozen = [p for p in model.parameters() if p.dtype == torch.bfloat16 and not p.requires_grad]
    for parameter in frozen:
        parameter.data = parameter.data.float()
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.data = parameter.data.to(torch.bfloat16)


class TrainingClock:
    """Seconds spent training. The held-out curve's evaluations pause it: they would otherwise take ~30 s of the
    budget each (~9 % of the LLM phase in a 20-minute run), and the steps a budget buys would depend on how often
    the curve is drawn."""

    def __init__(self, now: Callable[[], float] = time.monotonic):
        self.now = now
        self.start = now()
        self.paused_seconds = 0.0

    def elapsed(self) -> float:
        return self.now() - self.start - self.paused_seconds

    @contextmanager
    def paused(self):
        began = self.now()
        try:
            yield
        finally:
            self.paused_seconds += self.now() - began


@dataclass
class PhaseWindow:
    """Where the current training phase began (seconds on the training clock, step) and how many seconds it has:
    with `phase_schedules` a time-bounded CTC pre-alignment and the LLM phase after it each get their own warmup and
    cosine (`time_cosine_schedule(window=...)`); the demo moves the window when the phase changes."""

    seconds: float
    start_seconds: float = 0.0
    start_step: int = 0

    def move(self, start_seconds: float, start_step: int, seconds: float) -> None:
        self.start_seconds, self.start_step, self.seconds = start_seconds, start_step, seconds


def time_cosine_schedule(optimizer, budget_seconds: float, warmup_steps: int = 20, max_steps: int | None = None,
                         first_step: int = 0, clock: TrainingClock | None = None, window: PhaseWindow | None = None):
    """Warmup, then cosine decay to 10 % over the training-time budget (the step count is unknown in advance), or
    over steps `first_step`..`max_steps` when that cap comes first. `first_step` is where a step-bounded CTC
    pre-alignment ends: its steps are ~25x cheaper than LLM steps, and counting them would leave the LLM phase a
    decayed learning rate. A `window` does the same for a time-bounded pre-alignment: warmup and decay run over the
    current phase's steps and seconds instead of the whole budget's (without it, the LLM phase after a 60 % share
    starts at 41 % of the learning rate, and its fresh LoRA adapters never see more); a `max_steps` cap still ends
    the current phase's decay when it comes before the phase's seconds run out."""
    clock = clock or TrainingClock()

    def factor(step: int) -> float:
        if window is not None:
            start_step = window.start_step
            warm = min(1.0, (step - start_step + 1) / warmup_steps)
            progress = min(1.0, (clock.elapsed() - window.start_seconds) / max(window.seconds, 1e-9))
        else:
            start_step = first_step
            warm = min(1.0, (step + 1) / warmup_steps)
            progress = min(1.0, clock.elapsed() / budget_seconds)
        if max_steps:  # whichever comes first, the phase's seconds or the step cap
            progress = max(progress, min(1.0, max(0, step - start_step) / max(1, max_steps - start_step)))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def slow_machine_warning(per_minute: float, settings: DemoSettings, dtype_choice: DtypeChoice,
                         steps_left: int | None = None, minutes_left: float | None = None) -> str | None:
    """A loud sentence when this machine trains less than half the LLM steps per minute the defaults expect, unless
    the run is bounded by steps (`--max-steps`) and its `steps_left` fit in its `minutes_left`: then the slowness costs
    time, not training."""
    if per_minute >= EXPECTED_LLM_STEPS_PER_MINUTE / 2:
        return None
    if settings.max_steps and steps_left is not None and minutes_left is not None:
        if steps_left <= per_minute * minutes_left:
            return None
    remedy = "raise --minutes"
    if not settings.max_steps:  # a run bounded by time: offer the recipe bounded by steps, timed at this rate
        preset = PRESETS["augmented"]
        llm_steps = preset["max_steps"] - preset["ctc_steps"]
        remedy += (f", or run --preset augmented: bounded by steps, not minutes, its {llm_steps:,} LLM steps take "
                   f"about {llm_steps / per_minute:.0f} minutes here")
    return (f"WARNING: this machine trains {per_minute:.1f} LLM steps per minute, less than half of the "
            f"~{EXPECTED_LLM_STEPS_PER_MINUTE} the defaults were tuned on; within --minutes {settings.minutes:g} the "
            f"model sees far fewer examples and its WER will be much worse than the README's ({remedy}). "
            f"Frozen weights are in {dtype_choice.reason}.")


def phase_frame_masking(settings: DemoSettings, ctc_phase: bool) -> float:
    """Share of cached frames and channels zeroed in a batch: `frame_masking` while CTC pre-aligns the projector,
    `llm_frame_masking` once training goes through the LLM."""
    return settings.frame_masking if ctc_phase else settings.llm_frame_masking


def phase_text_rows(settings: DemoSettings, ctc_phase: bool) -> int:
    """Text-only rows per batch: none while CTC pre-aligns the projector (no LLM pass reads them there), so the
    LLM phase starts its shuffle at the first example and the CTC steps do not tokenize rows for nothing (the one
    batch the data loader has already collated when the phase changes goes without)."""
    return 0 if ctc_phase else settings.text_rows


def tell_deepspeed_the_device() -> None:
    """The demo trains on the CPU (`use_cpu=True`). DeepSpeed, when installed, is imported by the Trainer and looks
    for a GPU first, then tells every user it "was unable to detect it"; naming the CPU spares them that line."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def train_within_budget(model, processor, dataset, settings: DemoSettings, curve_sets: dict[str, tuple[list, list]],
                        output: Path, dtype_choice: DtypeChoice | None = None, device: str = "cpu",
                        callbacks: Sequence = ()):
    """transformers' Trainer on cached frames, stopped by the training clock (or `max_steps`); returns the loss and
    WER history, the steps reached in each phase and any warning about this machine's speed. `device` "cuda" trains
    on the GPU (benchmarks/gpu_real_speech.py); `callbacks` join the Trainer's. With `settings.text_rows` every
    batch also carries that many text-only understanding examples (`text_only_examples`)."""
    dtype_choice = dtype_choice or DtypeChoice(torch.float32, "float32")
    pre_align = settings.pre_aligns
    if device == "cpu":
        tell_deepspeed_the_device()
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    from ..evaluation import word_error_rate
    from ..training import SpeechLMTrainer

    budget = settings.minutes * 60
    history = {"ctc_loss": [], "loss": [], "wer": [], "warnings": []}
    clock = TrainingClock()
    # The settings allow it only after a time-bounded pre-alignment: with --ctc-steps and --max-steps (the presets) the
    # LLM phase's cosine already runs over its own steps.
    window = PhaseWindow(settings.ctc_fraction * budget) if settings.phase_schedules else None

    class Budget(TrainerCallback):
        def __init__(self):
            self.next_eval = settings.eval_every_minutes * 60
            self.phase_changed = False
            self.llm_start: tuple[float, int] | None = None if pre_align else (0.0, 0)  # (seconds, step)
            self.rate_checked = False
            self.bar = tqdm(total=round(budget), desc="training (seconds of budget)", unit="s")

        def _pre_alignment_done(self, elapsed: float, step: int) -> bool:
            if settings.ctc_steps is not None:
                return step >= settings.ctc_steps
            return elapsed >= settings.ctc_fraction * budget

        def _check_rate(self, elapsed: float, step: int) -> None:
            """Once, after a few LLM steps: warn loudly when this machine will train far fewer than expected."""
            start_seconds, start_step = self.llm_start
            if self.rate_checked or step - start_step < RATE_CHECK_STEPS:
                return
            self.rate_checked = True
            per_minute = (step - start_step) / max(elapsed - start_seconds, 1e-9) * 60
            history["llm_steps_per_minute"] = per_minute
            steps_left = settings.max_steps - step if settings.max_steps else None
            message = slow_machine_warning(per_minute, settings, dtype_choice, steps_left, (budget - elapsed) / 60)
            if message:
                history["warnings"].append(message)
                self.bar.write(f"[demo] {message}")

        def _elapsed(self) -> float:
            return clock.elapsed()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            if self.phase_changed:  # this logged mean still covers CTC-only steps: on neither curve
                self.phase_changed = False
            else:
                curve = "ctc_loss" if trainer.ctc_only else "loss"
                history[curve].append((self._elapsed() / 60, state.global_step, float(logs["loss"])))
                self.bar.set_postfix(step=state.global_step, **{curve: f"{logs['loss']:.3f}"})

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = self._elapsed()
            if trainer.ctc_only and self._pre_alignment_done(elapsed, state.global_step):
                trainer.ctc_only, self.phase_changed = False, True
                collator.frame_masking = phase_frame_masking(settings, ctc_phase=False)
                collator.text_rows = phase_text_rows(settings, ctc_phase=False)
                self.llm_start = (elapsed, state.global_step)
                if window is not None:
                    window.move(elapsed, state.global_step, budget - elapsed)
                history["ctc_steps"], history["ctc_minutes"] = state.global_step, elapsed / 60
                self.bar.write(f"[demo] {elapsed / 60:.1f} min, step {state.global_step}: CTC pre-alignment done, "
                               "training through the LLM")
            elif self.llm_start is not None:
                self._check_rate(elapsed, state.global_step)
            self.bar.update(min(round(elapsed), round(budget)) - self.bar.n)
            if elapsed >= budget or (settings.max_steps and state.global_step >= settings.max_steps):
                control.should_training_stop = True
            elif elapsed >= self.next_eval and curve_sets:
                self.next_eval += settings.eval_every_minutes * 60
                with clock.paused():
                    self._draw_curve(elapsed, state.global_step)

        def _draw_curve(self, elapsed: float, step: int) -> None:
            model.eval()
            for name, (audio, texts) in curve_sets.items():
                with float32_frozen_weights(model):
                    hyps = transcribe_capped(model, processor, audio, MAX_NEW_TOKENS.get(f"test_{name}", 48),
                                             batch_size=24)
                    head = ctc_head_transcripts(model, processor, audio) if model.ctc_head is not None else None
                wer = word_error_rate(texts, hyps)["wer"]
                curve = "wer" if name == "synthetic" else f"wer_{name}"
                history.setdefault(curve, []).append((elapsed / 60, step, wer))
                line = f"[demo] {elapsed / 60:.1f} min, step {step}: WER on {len(audio)} held-out {name} clips "
                line += f"{wer:.1%}"
                if head is not None:
                    head_wer = word_error_rate(texts, head)["wer"]
                    history.setdefault(HEAD_CURVE + curve, []).append((elapsed / 60, step, head_wer))
                    line += f" (the CTC head alone {head_wer:.1%})"
                self.bar.write(line)
            model.train()

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    if settings.trains_ctc_head:
        transcripts = [record["transcript"] or record["text"] for record in dataset.records]
        model.add_ctc_head(corpus_token_ids(processor, transcripts), processor.tokenizer.all_special_ids,
                           compress=settings.ctc_compression)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if "lora_" not in name], "lr": settings.learning_rate},
        {"params": [p for name, p in trainable if "lora_" in name], "lr": settings.lora_learning_rate},
    ]
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]], weight_decay=0.0)
    arguments = TrainingArguments(
        output_dir=str(output / "trainer"), per_device_train_batch_size=settings.batch_size, max_steps=10**7,
        logging_steps=10, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=device == "cpu",
        remove_unused_columns=False, dataloader_num_workers=0, max_grad_norm=1.0, seed=settings.training_seed,
        log_level="warning", train_sampling_strategy="group_by_length",
    )
    text_examples = (text_only_examples(TEXT_ONLY_SENTENCES, parse_tasks(settings.tasks), settings.seed,
                                        distinct=not settings.text_rows_repeat) if settings.text_rows else ())
    collator = SpeechLMCollator(processor, dataset.encoder_cache,
                                frame_masking=phase_frame_masking(settings, ctc_phase=pre_align),
                                distillation=settings.distill_weight > 0, text_examples=text_examples,
                                text_rows=phase_text_rows(settings, ctc_phase=pre_align),
                                seed=settings.training_seed)
    trainer = SpeechLMTrainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collator,
        optimizers=(optimizer, time_cosine_schedule(optimizer, budget, max_steps=settings.max_steps,
                                                    first_step=settings.ctc_steps or 0, clock=clock,
                                                    window=window)),
        callbacks=[Budget(), *callbacks],
        ctc_head=model.ctc_head, ctc_weight=settings.ctc_weight, ctc_only=pre_align,
        distill_weight=settings.distill_weight, distill_agreeing_only=settings.distill_agreeing_only,
    )
    trainer.remove_callback(PrinterCallback)  # the progress bar shows the loss; no log dict every 10 steps
    result = trainer.train()
    llm_minutes = clock.elapsed() / 60 - history.get("ctc_minutes", 0.0)
    if "ctc_steps" in history or not pre_align:
        overall = (result.global_step - history.get("ctc_steps", 0)) / max(llm_minutes, 1e-9)
        steps_left = settings.max_steps - result.global_step if settings.max_steps else None
        message = slow_machine_warning(overall, settings, dtype_choice, steps_left, 0.0)
        if message and not history["warnings"]:  # the early check saw fast steps; the whole phase did not
            history["warnings"].append(message)
    history["steps"] = result.global_step
    history["llm_steps"] = result.global_step - history.get("ctc_steps", result.global_step if pre_align else 0)
    history["minutes"] = min(budget, clock.elapsed()) / 60
    history["dtype"], history["dtype_reason"] = dtype_choice.name, dtype_choice.reason
    return history
