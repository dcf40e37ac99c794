"""What the real-speech bars need: `speechlm demo --preset real-speech` trained on a GPU for minutes instead of on two
CPU cores for hours, then measured here with the demo's own evaluation (same held-out clips, decoding, normaliser).

The lent GPU machine has no Debian packages (no espeak-ng, no UQM data) and takes 64 MiB of files per call, so the
work goes in three steps:

    python benchmarks/gpu_real_speech.py pack PACK        # here: training clips as Opus, encoder, GGUF, manifest
    python benchmarks/gpu_real_speech.py train PACK OUT   # on the GPU: trainable weights at four points in time
    python benchmarks/gpu_real_speech.py evaluate OUT     # here: each snapshot through the demo's evaluation

The training clips travel as Opus (~14 kbit/s), a codec the held-out clips never go through: they are read from the
demo's corpus here, unchanged. Snapshots before the last are rounded to bfloat16 to fit the transfer back.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechlm.demo.settings import PRESETS, DemoSettings  # noqa: E402

OPUS_BITRATE = "14k"
SAMPLING_RATE = 16000
GGUF_NAME = "llm.gguf"
MANIFEST = "train.jsonl.gz"
RESULTS = Path(__file__).parent / "results" / "gpu_real_speech.md"


def recipe(**changes) -> DemoSettings:
    """The `real-speech` preset as the GPU run trains it: batch 32 instead of 8 (a GPU step costs about the same)."""
    return replace(DemoSettings(**{**PRESETS["real-speech"], "batch_size": 32}), **changes)


# ----------------------------------------------------------------------------------------------------------- pack
def pack(folder: Path, shard_seconds: float) -> None:
    """The real-speech corpus's training clips as Opus shards (ffmpeg's libopus, ~14 kbit/s; one stream per
    `shard_seconds` of audio, since encoding a file per clip cost more than the audio itself) + a manifest of where
    each clip lies in its shard, then the parts (`pack_parts`)."""
    import subprocess
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import soundfile as sf

    from speechlm.audio import load_audio
    from speechlm.demo.corpus import manifest_records
    from speechlm.demo.run import demo_corpus

    _, manifests = demo_corpus(recipe())
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows, shards, pieces, offset = [], [], [], 0
    scratch = Path(tempfile.mkdtemp())
    records = manifest_records(manifests["train"])
    for index, record in enumerate(records):
        audio = load_audio(record["audio"])
        rows.append({"shard": f"audio/shard{len(shards):02d}.ogg", "start": offset, "end": offset + len(audio),
                     "text": record["text"], "id": record.get("id", str(index)), **record.get("extra", {})})
        pieces.append(audio)
        offset += len(audio)
        if offset >= shard_seconds * SAMPLING_RATE or index == len(records) - 1:
            wav = scratch / f"shard{len(shards):02d}.wav"
            sf.write(wav, np.concatenate(pieces), SAMPLING_RATE)
            shards.append(wav)
            pieces, offset = [], 0

    def encode(wav: Path) -> None:
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), "-c:a", "libopus", "-b:a", OPUS_BITRATE,
                        "-application", "voip", "-compression_level", "5", str(folder / "audio" / f"{wav.stem}.ogg")],
                       check=True)
        wav.unlink()

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(encode, shards))
    (folder / MANIFEST).write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    size = sum(p.stat().st_size for p in (folder / "audio").iterdir()) / 2**20
    print(f"packed {len(rows)} clips in {len(shards)} shards, {size:.1f} MiB of audio")
    pack_parts(folder)


def unpack_clips(folder: Path, target: Path, limit: int | None = None) -> Path:
    """The packed shards cut back into one 16 kHz wav per clip (the first `limit`); the manifest of those (the demo's
    columns)."""
    from concurrent.futures import ThreadPoolExecutor

    import soundfile as sf

    from speechlm.audio import load_audio
    from speechlm.demo.corpus import write_manifest

    target.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in gzip.decompress((folder / MANIFEST).read_bytes()).splitlines()][:limit]
    names = sorted({row["shard"] for row in rows})
    with ThreadPoolExecutor(len(names)) as pool:
        shards = dict(zip(names, pool.map(lambda name: load_audio(str(folder / name)), names), strict=True))
    manifest = []
    for index, row in enumerate(rows):
        path = target / f"{index:05d}.wav"
        sf.write(path, shards[row.pop("shard")][row.pop("start"):row.pop("end")], SAMPLING_RATE)
        manifest.append({"audio": str(path), **row})
    write_manifest(target / "train.jsonl", manifest)
    return target / "train.jsonl"


def pack_parts(folder: Path) -> None:
    """The bundled encoder as a transformers Whisper folder (encoder weights only, in float16 as the CTranslate2 file
    stores them) and the bundled GGUF decoder file."""
    import shutil

    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    from speechlm.base_models import load_encoder
    from speechlm.demo.run import SMOLLM2_GGUF, bundled_smollm2_dir, resolve_parts

    encoder_path, _, _ = resolve_parts(recipe())
    _, encoder, _ = load_encoder(encoder_path)
    target = folder / "encoder"
    target.mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(target)
    save_file({f"encoder.{k}": v.to(torch.float16).contiguous() for k, v in encoder.state_dict().items()},
              target / "model.safetensors", metadata={"format": "pt"})
    WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins).save_pretrained(target)
    shutil.copy(bundled_smollm2_dir() / SMOLLM2_GGUF, folder / GGUF_NAME)


# ---------------------------------------------------------------------------------------------------------- train
def train(folder: Path, out: Path, minutes: float, ctc_steps: int, snapshots: int, device: str = "cuda",
          limit: int | None = None) -> None:
    """The demo's training (`train_within_budget`) on `device` over the packed clips (the first `limit` of them: a
    smoke test); the trainable weights at `snapshots` evenly spaced training times, the last in float32."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from speechlm.data import read_manifest
    from speechlm.demo.run import load_parts
    from speechlm.demo.training import cached_training_set, train_within_budget, training_records
    from speechlm.hardware import choose_training_dtype

    out.mkdir(parents=True, exist_ok=True)
    settings = recipe(minutes=minutes, ctc_steps=ctc_steps, encoder=str(folder / "encoder"), decoder=str(folder),
                      gguf_file=GGUF_NAME)
    dtype_choice = choose_training_dtype(device)
    processor, model = load_parts(settings, dtype_choice.dtype)
    model.language_model.set_attn_implementation("sdpa")  # eager is the CPU's choice for bfloat16
    model.to(device)
    scratch = Path(tempfile.mkdtemp())  # this run's clips and frames: never another run's
    records = read_manifest(unpack_clips(folder, scratch / "clips", limit), probe_audio=False).records
    examples = training_records(records, settings.real_speech_repeats, augment=settings.real_speech_augment)
    started = time.monotonic()
    dataset = cached_training_set(model, processor, records, examples, scratch / "train-frames.safetensors")
    encode_seconds = time.monotonic() - started

    def trainable_state(dtype) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(dtype).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.start, self.taken = None, []

        def on_step_end(self, args, state, control, **kwargs):
            self.start = self.start or time.monotonic()
            due = (len(self.taken) + 1) * minutes * 60 / snapshots
            if len(self.taken) < snapshots - 1 and time.monotonic() - self.start >= due:
                save_file(trainable_state(torch.bfloat16), out / f"snapshot{len(self.taken)}.safetensors")
                self.taken.append({"step": state.global_step, "minutes": (time.monotonic() - self.start) / 60})

    snapshot_callback = Snapshots()
    history = train_within_budget(model, processor, dataset, settings, {}, out, dtype_choice, device=device,
                                  callbacks=[snapshot_callback])
    final = trainable_state(torch.float32)
    lora = {n: t for n, t in final.items() if "lora_" in n}
    save_file(lora, out / "final_lora.safetensors")
    save_file({n: t for n, t in final.items() if n not in lora}, out / "final_rest.safetensors")
    snapshot_callback.taken.append({"step": history["steps"], "minutes": history["minutes"]})
    (out / "run.json").write_text(json.dumps({
        "settings": {k: v for k, v in vars(settings).items() if k not in ("encoder", "decoder", "gguf_file")},
        "ctc_vocabulary": model.config.ctc_head, "snapshots": snapshot_callback.taken, "clips": len(records),
        "examples": len(examples), "encode_seconds": encode_seconds,
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "history": history}, default=str))
    print(json.dumps({k: history[k] for k in ("steps", "ctc_steps", "llm_steps", "minutes", "dtype")}))


# ------------------------------------------------------------------------------------------------------- evaluate
def evaluate(out: Path, limit: int | None) -> None:
    """Each snapshot rebuilt on the bundled parts, saved and reloaded as the demo does, then its held-out sets: the
    curve greedy on every set, the last snapshot also as the demo decodes (4 beams, joint with the CTC head)."""
    from safetensors.torch import load_file

    from speechlm.demo.evaluate import evaluate_sets
    from speechlm.demo.run import demo_corpus, load_parts, remember_joint_decoding
    from speechlm.inference import load_pretrained
    from speechlm.joint_ctc import joint_options

    run = json.loads((out / "run.json").read_text())
    settings = recipe()
    _, manifests = demo_corpus(settings)
    snapshots = sorted(out.glob("snapshot*.safetensors")) + [None]
    rows = []
    for info, path in zip(run["snapshots"], snapshots, strict=True):
        state = load_file(path) if path else {**load_file(out / "final_lora.safetensors"),
                                              **load_file(out / "final_rest.safetensors")}
        processor, model = load_parts(settings)
        ctc = run["ctc_vocabulary"]
        model.add_ctc_head(ctc["vocabulary_ids"], ctc["ignore_token_ids"], compress=ctc["compress"])
        missing = set(state) - set(dict(model.named_parameters()))
        if missing:
            raise SystemExit(f"{path}: weights the rebuilt model lacks: {sorted(missing)[:5]}")
        model.load_state_dict({n: t.float() for n, t in state.items()}, strict=False)
        model_dir = out / f"model-step{info['step']}"
        model.save_pretrained(model_dir, trainable_only=True)
        processor.save_pretrained(model_dir)
        remember_joint_decoding(model_dir, settings.decoding_ctc_weight, settings.joint_ctc_head_candidates)
        processor, model = load_pretrained(str(model_dir), dtype=torch.float32)
        decodings = [("greedy, LLM alone", 1, {})]
        if path is None:
            decodings.append((f"{settings.num_beams} beams, joint CTC {model.joint_ctc_weight:g}", settings.num_beams,
                              joint_options(processor.tokenizer, model.joint_ctc_weight, transcript=True)))
        for label, beams, joint in decodings:
            results = evaluate_sets(model, processor, manifests, limit, beams, **joint)
            rows.append({**info, "decoding": label, **{name.removeprefix("test_"): {
                "wer": m["wer"], "insertions": m["insertions"], "clips": m["n_utterances"],
                "whisper": m.get("whisper", {}).get("wer")} for name, m in results.items()}})
            print(json.dumps(rows[-1]), flush=True)
    (out / "evaluation.json").write_text(json.dumps(rows, indent=1))
    RESULTS.write_text(results_table(run, rows))
    print(f"table: {RESULTS}")


def results_table(run: dict, rows: list[dict]) -> str:
    """The curve and the final decoding as markdown, Whisper tiny.en alone on the same clips beside them."""
    sets = ("synthetic", "asterisk", "librivox", "uqm")
    history = run["history"]
    lines = [
        "# The real-speech recipe on a GPU (benchmarks/gpu_real_speech.py)", "",
        f"`--preset real-speech` settings at batch {run['settings']['batch_size']} on one {run['device']}: "
        f"{run['clips']:,} training clips ({run['examples']:,} examples with the real clips x3), "
        f"{history['ctc_steps']} CTC pre-alignment steps, then {history['llm_steps']} steps through the LLM "
        f"({history['llm_steps_per_minute']:.0f} a minute), {history['minutes']:.1f} minutes of training in all "
        f"(frozen weights in {history['dtype']}); encoding the clips once took {run['encode_seconds']:.0f} s. "
        "Evaluated on two CPU cores with the demo's own evaluation; the training clips went through Opus "
        "(~14 kbit/s) to reach the GPU, the held-out ones did not. Snapshots before the last were rounded to "
        "bfloat16.", "",
        "| training minutes | step | decoding | " + " | ".join(f"WER {name}" for name in sets)
        + " | UQM inserted words |",
        "|---|---|---|" + "---|" * (len(sets) + 1),
    ]
    for row in rows:
        wers = " | ".join(f"{100 * row[name]['wer']:.1f} %" for name in sets)
        lines.append(f"| {row['minutes']:.1f} | {row['step']} | {row['decoding']} | {wers} "
                     f"| {row['uqm']['insertions']} |")
    whisper = " | ".join(f"{100 * rows[-1][name]['whisper']:.1f} %" if rows[-1][name]["whisper"] is not None else "-"
                         for name in sets)
    lines += [f"| Whisper tiny.en alone (reference) | | | {whisper} | |", "",
              "Clips: " + ", ".join(f"{name} {rows[-1][name]['clips']}" for name in sets) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack")
    p.add_argument("folder", type=Path)
    p.add_argument("--shard-seconds", type=float, default=3600.0)
    p.add_argument("--parts-only", action="store_true", help="only the encoder and decoder files")
    t = commands.add_parser("train")
    t.add_argument("folder", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--minutes", type=float, default=5.2, help="training time (session 36's run: 5.2)")
    t.add_argument("--ctc-steps", type=int, default=600, help="CTC pre-alignment steps (session 36's run: 600)")
    t.add_argument("--snapshots", type=int, default=4)
    t.add_argument("--device", default="cuda")
    t.add_argument("--limit", type=int, default=None, help="train on the first N clips only (a smoke test)")
    e = commands.add_parser("evaluate")
    e.add_argument("out", type=Path)
    e.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    if args.command == "pack":
        pack_parts(args.folder) if args.parts_only else pack(args.folder, args.shard_seconds)
    elif args.command == "train":
        train(args.folder, args.out, args.minutes, args.ctc_steps, args.snapshots, args.device, args.limit)
    else:
        evaluate(args.out, args.limit)


if __name__ == "__main__":
    main()
