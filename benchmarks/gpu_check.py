"""The GPU path, checked in one short run on a lent CUDA GPU (prepared on CPU; not run there). ~5-8 minutes.

    python benchmarks/gpu_check.py [--steps 300] [--quick]

Writes benchmarks/results/gpu_check.md (and .json) with one row per check:
1. bf16 attention: the left-padded vs the right-padded merged batch through the bf16 LLM under SDPA (cuDNN
   enabled, the torch default on H100/H200), eager and flex_attention, forward + backward at merged widths of
   64 mod 128 and others: are the gradients finite? Expect NaN only for "left" under cuDNN SDPA (pytorch#196678), so
   the fix (right padding in loss passes) is confirmed when every "right" row is finite.
2. A short bf16 training run of tiny-but-real-shaped parts (Whisper-tiny-shaped encoder + 4-layer Llama, random
   weights, frozen bf16 LLM + LoRA, fp32 projector, the demo's AdamW settings) on synthetic clips of random lengths:
   the loss must stay finite and fall over `--steps` steps (the sweep diverged within 25-300).
3. FSDP2 (`fully_shard`) on the GPU, 1 process over NCCL (world of one: the wrapping, mixed frozen/trainable units
   and the gathered state dict; the 2-process curve is tested on CPU).
4. The shipped `configs/accelerate/fsdp.yaml` through `accelerate launch -m speechlm.cli train` (accelerate enters
   FSDP only on an accelerator, so this is where the file runs): sharded, finite, reloads.
5. Batched transcription RTFx in bf16 (audio seconds per wall second, greedy, batch 16).
Nothing is downloaded: every model is built from a config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def build(tmp: Path, attn: str = "sdpa", llm_dtype=torch.bfloat16, lora: bool = True):
    from transformers import AutoModelForCausalLM, LlamaConfig, WhisperConfig, WhisperFeatureExtractor

    from speechlm import SpeechLMProcessor, create_speech_lm_model
    from tests.tiny_models import make_tokenizer

    enc_dir, dec_dir = tmp / "encoder", tmp / "decoder"
    if not enc_dir.exists():
        from transformers import WhisperForConditionalGeneration

        torch.manual_seed(0)
        cfg = WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                            decoder_layers=1, decoder_attention_heads=6, decoder_ffn_dim=64, num_mel_bins=80,
                            vocab_size=64, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)
        WhisperForConditionalGeneration(cfg).save_pretrained(enc_dir)
        WhisperFeatureExtractor(feature_size=80).save_pretrained(enc_dir)
        tokenizer = make_tokenizer()
        llm = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        llm.save_pretrained(dec_dir)
        tokenizer.save_pretrained(dec_dir)
    fe, tok, model = create_speech_lm_model(str(enc_dir), str(dec_dir), projection_hidden_size=1024,
                                            decoder_kwargs={"dtype": llm_dtype, "attn_implementation": attn},
                                            projector_dtype=torch.float32)
    model.freeze_encoder()
    model.freeze_decoder()
    if lora:
        model.add_lora(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    return SpeechLMProcessor(fe, tok, prompt="Transcribe the audio."), model.cuda()


def clips(n: int, rng: np.random.Generator, low=1.0, high=6.0):
    out = []
    for _ in range(n):
        t = np.arange(int(rng.uniform(low, high) * 16000)) / 16000
        f = rng.uniform(100, 300)
        out.append((0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32))
    return out


WORDS = "set an alarm call mom play some jazz remind me to buy milk what is the weather in paris one two three".split()


def on_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def texts(n: int, rng: np.random.Generator):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(n)]


def pad_to(merged, width: int, side: str):
    """More padding slots on `side` of a merged batch (zero embeddings, mask 0, label -100)."""
    from speechlm.modeling import MergedInputs, position_ids_from_mask

    extra = width - merged.attention_mask.shape[1]
    if extra <= 0:
        return merged
    b, _, d = merged.inputs_embeds.shape
    embeds = merged.inputs_embeds.new_zeros(b, extra, d)
    mask = merged.attention_mask.new_zeros(b, extra)
    labels = merged.labels.new_full((b, extra), -100)
    def cat(pad, x):
        return torch.cat([pad, x] if side == "left" else [x, pad], dim=1)
    attention_mask = cat(mask, merged.attention_mask)
    return MergedInputs(cat(embeds, merged.inputs_embeds), attention_mask, position_ids_from_mask(attention_mask),
                        cat(labels, merged.labels))


def check_attention(tmp: Path, rows: list[dict]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rng = np.random.default_rng(0)
    for attn in ("sdpa", "eager", "flex_attention"):
        try:
            processor, model = build(tmp, attn=attn)
        except Exception as error:  # noqa: BLE001
            rows.append({"check": f"bf16 attention {attn}", "result": f"cannot load: {error}"[:200]})
            continue
        model.train()
        backends = [("default", None)] + ([("cudnn only", SDPBackend.CUDNN_ATTENTION)] if attn == "sdpa" else [])
        for backend_name, backend in backends:
            for side in ("left", "right"):
                bad, tried = 0, 0
                for trial in range(12):
                    batch = on_cuda(processor(clips(4, rng, 0.5, 4.0), text=texts(4, rng)))
                    merged = model.prepare_inputs(**batch, padding_side=side)
                    if trial % 2 == 0:  # widths of 64 mod 128 are what cuDNN's backward gets wrong
                        merged = pad_to(merged, merged.attention_mask.shape[1]
                                        + (64 - merged.attention_mask.shape[1]) % 128, side)
                    model.zero_grad(set_to_none=True)
                    try:
                        context = sdpa_kernel(backend) if backend is not None else torch.autocast("cuda",
                                                                                                   enabled=False)
                        with context:
                            out = model.language_model(inputs_embeds=merged.inputs_embeds,
                                                       attention_mask=merged.attention_mask,
                                                       position_ids=merged.position_ids, labels=merged.labels)
                            out.loss.backward()
                    except RuntimeError as error:
                        rows.append({"check": f"bf16 attention {attn} {backend_name} {side}",
                                     "result": f"error: {error}"[:200]})
                        break
                    tried += 1
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    bad += int(not (torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)))
                widths = "incl. widths = 64 mod 128"
                rows.append({"check": f"bf16 attention {attn} ({backend_name}), {side} padding",
                             "result": f"{bad}/{tried} batches with NaN/inf loss or grads ({widths})",
                             "ok": bad == 0 or side == "left"})
        del model
        torch.cuda.empty_cache()


def exact_width_check(rows: list[dict]) -> None:
    """Bare SDPA at L = 704 (64 mod 128) and 768 with one fully masked query row: the kernel-level cause."""
    torch.manual_seed(0)
    for length in (704, 768):
        q, k, v = (torch.randn(1, 8, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
        mask[:, :16] = False  # 16 left pad slots: rows 0..15 attend to nothing
        mask = mask[None, None]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(torch.randn_like(out))
        finite = all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
        rows.append({"check": f"bare SDPA bf16, L={length}, 16 empty rows, default backend",
                     "result": "grads finite" if finite else "NaN/inf grads", "ok": True})


def check_training(tmp: Path, steps: int, rows: list[dict], side: str = "right") -> None:
    """`side="left"` trains with the loss pass padded on the left, as before the fix (the A/B of the NaN cause)."""
    from speechlm.data import SpeechLMCollator  # noqa: F401  (import check)

    rng = np.random.default_rng(1)
    processor, model = build(tmp)
    model.train()
    model.add_ctc_head(None, processor.tokenizer.all_special_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.0)
    losses, started = [], time.time()
    # The A/B draws shorter clips so that batch widths often land on 64 mod 128 (what cuDNN's backward gets wrong).
    low, high = (0.5, 3.5) if side == "left" or os.environ.get("GPU_CHECK_SHORT") else (1.0, 6.0)
    pool = [(clips(1, rng, low, high)[0], texts(1, rng)[0]) for _ in range(64)]
    widths = []
    for _ in range(steps):
        chosen = [pool[i] for i in rng.choice(len(pool), size=8, replace=False)]
        batch = on_cuda(processor([c for c, _ in chosen], text=[t for _, t in chosen]))
        if side == "left":
            merged = model.prepare_inputs(**batch, padding_side="left")
            loss = model.language_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                                        position_ids=merged.position_ids, labels=merged.labels).loss
            widths.append(merged.attention_mask.shape[1])
        else:
            loss = model(**batch).loss
        loss = loss + model.ctc_head(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
    finite = all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    rows.append({"check": f"bf16 training, {side}-padded loss pass, {len(losses)} of {steps} steps of batch 8 "
                          "(LoRA + projector + CTC)",
                 "result": f"finite={finite}, loss {first:.3f} -> {last:.3f} ({time.time() - started:.0f} s)"
                           + (f"; {sum(w % 128 == 64 for w in widths)} batches of width 64 mod 128" if widths else ""),
                 "ok": (finite and last < first) if side == "right" else True})


def check_fsdp(tmp: Path, rows: list[dict]) -> None:
    from speechlm.training import apply_fully_shard, fsdp_layer_classes, full_state_dict

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        rng = np.random.default_rng(2)
        processor, model = build(tmp)
        classes = fsdp_layer_classes(model)
        model.train()
        apply_fully_shard(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=2e-3)
        losses = []
        for _ in range(20):
            batch = on_cuda(processor(clips(8, rng), text=texts(8, rng)))
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        state = full_state_dict(model)
        rows.append({"check": "FSDP2 fully_shard on CUDA (1 process, NCCL)",
                     "result": f"wrapped {classes}; 20 steps loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
                               f"gathered {len(state)} tensors",
                     "ok": all(math.isfinite(x) for x in losses)})
    finally:
        torch.distributed.destroy_process_group()


def check_accelerate_fsdp(tmp: Path, rows: list[dict], steps: int = 30) -> None:
    """The shipped `configs/accelerate/fsdp.yaml` through `accelerate launch ... -m speechlm.cli train` (one process:
    NCCL refuses two ranks on one GPU): FSDP2 entered (no whole-weight hash), loss finite, reload + generate."""
    import subprocess

    import soundfile as sf
    import yaml

    from speechlm import SpeechLMModel, SpeechLMProcessor
    from speechlm.inference import transcribe_arrays

    build(tmp, lora=False)  # writes the encoder and decoder folders
    torch.cuda.empty_cache()
    rng = np.random.default_rng(4)
    data = tmp / "fsdp_data"
    data.mkdir(exist_ok=True)
    lines = []
    for index, (clip, text) in enumerate(zip(clips(32, rng), texts(32, rng))):
        sf.write(data / f"{index}.wav", clip, 16000)
        lines.append(json.dumps({"audio": f"{index}.wav", "text": text, "id": f"c{index}"}) + "\n")
    (data / "train.jsonl").write_text("".join(lines))
    (data / "eval.jsonl").write_text("".join(lines[:4]))
    output = tmp / "fsdp_run"
    shutil.rmtree(output, ignore_errors=True)
    config = {
        "model": {"encoder": str(tmp / "encoder"), "decoder": str(tmp / "decoder"), "projector_hidden_size": 1024},
        "data": {"train_manifest": str(data / "train.jsonl"), "eval_manifest": str(data / "eval.jsonl"),
                 "prompt": "Transcribe the audio."},
        "training": {"output_dir": str(output), "max_steps": steps, "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 4, "learning_rate": 2e-3, "logging_steps": 1,
                     "eval_steps": steps, "save_steps": steps, "report_to": []},
        "stages": [{"name": "lora", "lora": {"r": 8, "lora_alpha": 16}}],
    }
    (tmp / "fsdp.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
               "-m", "speechlm.cli", "train", "--config", str(tmp / "fsdp.yaml")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode != 0:
        print(result.stderr[-3000:], flush=True)
        rows.append({"check": "configs/accelerate/fsdp.yaml through accelerate launch",
                     "result": f"exit {result.returncode}: "
                               + " ".join(line for line in result.stderr.splitlines() if "Error" in line)[-300:],
                     "ok": False})
        return
    stage = json.loads((output / "training_summary.json").read_text())["stages"][0]
    log = json.loads((output / "stages" / "01-lora" / "stage_done.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    sharded = stage["trainable_weights_sha256"] is None  # speechlm train hashes the whole weights unless FSDP
    model = SpeechLMModel.from_pretrained(output).cuda().eval()
    hypotheses = transcribe_arrays(model, SpeechLMProcessor.from_pretrained(output), clips(2, rng), batch_size=2,
                                   max_new_tokens=8)
    finite = all(math.isfinite(x) for x in losses)
    rows.append({"check": "configs/accelerate/fsdp.yaml through `accelerate launch -m speechlm.cli train` (1 process, "
                          "bf16 mixed precision, LoRA)",
                 "result": f"FSDP entered: {sharded}; {stage['global_step']} steps, loss {np.mean(losses[:5]):.3f} -> "
                           f"{np.mean(losses[-5:]):.3f} ({time.time() - started:.0f} s with start-up); reloaded with "
                           f"from_pretrained, transcribed {len(hypotheses)} clips",
                 "ok": sharded and finite and stage["global_step"] == steps})


def check_rtfx(tmp: Path, rows: list[dict]) -> None:
    from speechlm.inference import transcribe_arrays

    rng = np.random.default_rng(3)
    processor, model = build(tmp, lora=False)
    model.to(torch.bfloat16).eval()
    audio = clips(128, rng, 2.0, 12.0)
    seconds = sum(len(a) for a in audio) / 16000
    transcribe_arrays(model, processor, audio[:16], batch_size=16, max_new_tokens=32)  # warm-up
    torch.cuda.synchronize()
    started = time.time()
    transcribe_arrays(model, processor, audio, batch_size=16, max_new_tokens=32)
    torch.cuda.synchronize()
    elapsed = time.time() - started
    rows.append({"check": "batched transcription bf16, batch 16, greedy, 32 new tokens",
                 "result": f"{seconds:.0f} s of audio in {elapsed:.1f} s: RTFx {seconds / elapsed:.0f}", "ok": True})


def write_results(rows: list[dict]) -> None:
    device = torch.cuda.get_device_name()
    header = (f"# GPU check\n\n{device}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
              f"cuDNN SDPA enabled: {torch.backends.cuda.cudnn_sdp_enabled()}\n\n"
              "| check | result | ok |\n|---|---|---|\n")
    table = "".join(f"| {r['check']} | {r['result']} | {'yes' if r.get('ok', True) else 'NO'} |\n" for r in rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_check.md").write_text(header + table)
    (RESULTS / "gpu_check.json").write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                        "rows": rows}, indent=2,
                                                       default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="60 training steps, no flex_attention")
    parser.add_argument("--only", nargs="+", default=None, metavar="CHECK",
                        help="run only these checks (names as printed: 'exact width', attention, training, fsdp, "
                        "'accelerate fsdp', rtfx)")
    parser.add_argument("--padding-ab", action="store_true",
                        help="only: bf16 training with the loss pass padded left (before the fix) vs right")
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "speechlm_gpu_check"
    tmp.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    steps = 60 if args.quick else args.steps
    checks = (("exact width", lambda: exact_width_check(rows)),
                        ("attention", lambda: check_attention(tmp, rows)),
                        ("training", lambda: check_training(tmp, steps, rows)),
                        ("fsdp", lambda: check_fsdp(tmp, rows)),
                        ("accelerate fsdp", lambda: check_accelerate_fsdp(tmp, rows)),
                        ("rtfx", lambda: check_rtfx(tmp, rows)))
    if args.padding_ab:
        os.environ["GPU_CHECK_SHORT"] = "1"  # the same short clips on both sides
        checks = tuple((f"training {side}", lambda side=side: check_training(tmp, steps, rows, side))
                       for side in ("left", "right"))
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _ in checks})
        if unknown:
            parser.error(f"--only: no check named {', '.join(map(repr, unknown))}; the checks: "
                         + ", ".join(repr(name) for name, _ in checks))
        checks = tuple((name, check) for name, check in checks if name in args.only)
    if not torch.cuda.is_available():
        print("no CUDA device: this script is for a lent GPU", file=sys.stderr)
        return 2
    for name, check in checks:
        started = time.time()
        try:
            check()
        except Exception as error:  # noqa: BLE001  (one failing check must not hide the others)
            traceback.print_exc()
            rows.append({"check": name, "result": f"failed: {type(error).__name__}: {error}"[:300], "ok": False})
        print(f"[gpu_check] {name}: {time.time() - started:.0f} s", flush=True)
        write_results(rows)  # after every check: a lease that ends mid-run still leaves the checks done so far
    print((RESULTS / "gpu_check.md").read_text())
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
