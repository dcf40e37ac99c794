"""Load test of `speechlm serve`: throughput and latency with and without dynamic batching, in one run.

Builds a small random SpeechLM (Whisper-style encoder + Qwen2-style decoder, big enough that the model rather than
HTTP dominates), saves it like a trained checkpoint, starts `speechlm serve` on 127.0.0.1 twice (`--max-batch-size
16` and `--max-batch-size 1`) and sends the same bounded load to each: REQUESTS uploads, CONCURRENCY at a time.
Any failed request (or any 5xx) fails the benchmark. A random model never emits end-of-sequence, so every request
generates exactly `--max-new-tokens` tokens and both runs do the same work.

With batching on, the good load runs in `--rounds` clean segments interleaved with as many hostile ones (one hostile
client beside every four good ones: 30-minute uploads, maximal prompts, dribbled, oversized and stalled uploads), so
the p95 ratio hostile / clean compares segments that ran on the same (busy) machine at nearly the same time.

    PYTHONPATH=. python benchmarks/serving.py [--requests 200] [--concurrency 16] [--device cpu] [--threads 1]

`--replicas N` adds a Ray Serve comparison in the same run (needs the ray extra): `speechlm serve-ray --replicas 1`
and `--replicas N`, each replica with `--threads` CPUs, same load; `--skip-batching` runs only that comparison.
Replicas only help when the machine has the cores (or GPUs) for them: with one thread each, 2 replicas on 2 cores
served x1.42 the requests/s of one (benchmarks/results/serving_replicas.md:
`--replicas 2 --skip-batching --no-hostile --requests 120 --output benchmarks/results/serving_replicas.md`).

The table goes to stdout and to benchmarks/results/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import torch
from transformers import AutoModel, AutoModelForCausalLM, Qwen2Config, WhisperConfig, WhisperFeatureExtractor

from speechlm import SpeechLMProcessor, create_speech_lm_model
from tests.tiny_models import make_tokenizer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "serving.md"
SR = 16000


def build_model(folder: Path) -> int:
    """Save a random encoder and decoder, join them with `create_speech_lm_model`, save the result; returns #params."""
    torch.manual_seed(0)
    encoder_config = WhisperConfig(
        d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=256, num_mel_bins=80, max_source_positions=1500,
        vocab_size=64, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    AutoModel.from_config(encoder_config).save_pretrained(folder / "encoder")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder / "encoder")
    tokenizer = make_tokenizer()
    decoder_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(decoder_config).save_pretrained(folder / "decoder")
    tokenizer.save_pretrained(folder / "decoder")
    feature_extractor, tokenizer, model = create_speech_lm_model(
        str(folder / "encoder"), str(folder / "decoder"), projection_hidden_size=512
    )
    processor = SpeechLMProcessor(feature_extractor, tokenizer, prompt="Transcribe the audio.")
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return sum(p.numel() for p in model.parameters())


def make_uploads(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct 2-5 s speech-like clips (modulated tones + noise) as WAV bytes."""
    rng = np.random.default_rng(seed)
    uploads = []
    for _ in range(count):
        t = np.arange(int(rng.uniform(2.0, 5.0) * SR)) / SR
        tone = np.sin(2 * np.pi * rng.uniform(120, 300) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
        audio = (0.3 * tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
        buffer = io.BytesIO()
        sf.write(buffer, audio, SR, format="WAV", subtype="PCM_16")
        uploads.append(buffer.getvalue())
    return uploads


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, port: int, max_batch_size: int, args,
                 replicas: int | None = None) -> subprocess.Popen:  # fmt: skip
    """`speechlm serve`, or with `replicas` `speechlm serve-ray` on a fresh local Ray (each replica gets --threads
    CPUs); returns once /health answers."""
    command = [
        sys.executable, "-m", "speechlm.cli", "serve" if replicas is None else "serve-ray", "--model", str(model_dir),
        "--port", str(port), "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
        "--max-new-tokens", str(args.max_new_tokens), "--device", args.device,
    ] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
    if replicas is not None:
        command += ["--replicas", str(replicas), "--address", "local", "--replica-cpus", str(args.threads or 1)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # The log goes to a file: an undrained pipe would fill up and stall the server.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + (180 if replicas is None else 300)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.25)
    process.kill()
    raise RuntimeError("server did not start in time")


async def load(url: str, uploads: list[bytes], requests: int, concurrency: int,
               first: int = 0) -> tuple[list[float], int, float, int]:  # fmt: skip
    """Send `requests` uploads (from index `first`) with at most `concurrency` in flight; (latencies in s, errors,
    wall seconds, 5xx answers)."""
    latencies: list[float] = []
    errors = server_errors = 0
    queue: asyncio.Queue = asyncio.Queue()
    for index in range(first, first + requests):
        queue.put_nowait(index)

    async def worker(client: httpx.AsyncClient):
        nonlocal errors, server_errors
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            try:
                response = await client.post(
                    url, files={"file": (f"{index}.wav", uploads[index % len(uploads)])}, data={"model": "bench"}
                )
                ok = response.status_code == 200 and isinstance(response.json().get("text"), str)
                server_errors += response.status_code >= 500
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, errors, wall, server_errors


def hostile_payloads(max_prompt_tokens: int = 200) -> dict[str, bytes | str]:
    """What the hostile clients send. Within the limits: 30 min of 8 kHz 8-bit WAV (14 MB, the most audio a 25 MB
    upload under a 1,800 s limit can hold: 72 encoder windows of work) and the longest prompt the limits allow.
    Past them: a 1 Hz WAV and a 60k-character prompt."""
    rng = np.random.default_rng(7)
    long_wav = io.BytesIO()
    t = np.arange(1800 * 8000) / 8000
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(t.shape)  # no silence: cut every 25 s
    sf.write(long_wav, audio.astype(np.float32), 8000, format="WAV", subtype="PCM_U8")
    tiny = io.BytesIO()
    sf.write(tiny, np.zeros(1800, dtype=np.int16), 1, format="WAV", subtype="PCM_16")
    tokenizer, words = make_tokenizer(), []
    while len(tokenizer(" ".join(words + ["remind"]))["input_ids"]) <= max_prompt_tokens:
        words.append("remind")
        if len(" ".join(words)) > 1900:
            break
    return {"long": long_wav.getvalue(), "rate": tiny.getvalue(), "max_prompt": " ".join(words),
            "good": make_uploads(1, seed=99)[0]}  # fmt: skip


# One hostile client in five: the first three always do their own attack, the fourth rotates through the rest.
HOSTILE_KINDS = (("long",), ("max_prompt",), ("huge",), ("slow", "dribble", "prompt", "rate"))


async def hostile(url: str, kinds: tuple[str, ...], payloads: dict, stop: asyncio.Event, counts: dict) -> None:
    """One hostile client, looping until `stop`: 30 minutes of audio, a maximal valid prompt, a 64 MB chunked
    upload, a stalled slowloris header, a slow upload that never stalls long enough to be cut, a 60k-character
    prompt, a 1 Hz WAV (issue 14). Every answer it gets is counted by kind and status."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    good = payloads["good"]

    async def huge_body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="huge.wav"\r\n\r\n'
        for _ in range(1024):  # 64 MB
            yield b"\0" * 65536

    async def dribble_body(body: bytes):
        for start in range(0, len(body), 16384):  # ~10 s for a 3-4 s clip; never a pause the server cuts
            yield body[start : start + 16384]
            await asyncio.sleep(1.0)

    iteration = 0
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            kind = kinds[iteration % len(kinds)]
            iteration += 1
            try:
                if kind == "slow":
                    reader, writer = await asyncio.open_connection(host, int(port))
                    writer.write(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    await writer.drain()
                    await asyncio.wait_for(reader.read(), 60)  # held until the server closes it
                    writer.close()
                    status = "closed"
                elif kind == "huge":
                    headers = {"Content-Type": "multipart/form-data; boundary=b"}
                    response = await client.post(url, content=huge_body(), headers=headers)
                    status = response.status_code
                elif kind == "dribble":
                    request = client.build_request("POST", url, files={"file": ("d.wav", good)})
                    body = b"".join([part async for part in request.stream])
                    headers = {"Content-Type": request.headers["Content-Type"]}
                    response = await client.post(url, content=dribble_body(body), headers=headers)
                    status = response.status_code
                elif kind in ("prompt", "max_prompt"):
                    text = "x" * 60000 if kind == "prompt" else payloads["max_prompt"]
                    response = await client.post(url, files={"file": ("p.wav", good)}, data={"prompt": text})
                    status = response.status_code
                else:
                    response = await client.post(url, files={"file": (f"{kind}.wav", payloads[kind])})
                    status = response.status_code
            except (httpx.HTTPError, OSError, TimeoutError):
                status = "closed"
            except asyncio.CancelledError:  # cut off at the end of its segment
                counts[(kind, "cut off")] = counts.get((kind, "cut off"), 0) + 1
                raise
            counts[(kind, status)] = counts.get((kind, status), 0) + 1


async def hostile_load(url: str, uploads: list[bytes], requests: int, first: int, payloads: dict, counts: dict,
                       args) -> tuple[list[float], int, float, int]:  # fmt: skip
    """The good load of `load`, with one hostile client beside every four good ones (20 % of the clients); the
    hostile clients are cut off (their requests cancelled) when the good requests are done."""
    stop = asyncio.Event()
    kinds = [(args.hostile_only,)] * len(HOSTILE_KINDS) if args.hostile_only else HOSTILE_KINDS
    tasks = [asyncio.create_task(hostile(url, kinds[i % len(kinds)], payloads, stop, counts))
             for i in range(args.concurrency // 4)]  # fmt: skip
    try:
        return await load(url, uploads, requests, args.concurrency, first)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=30)


def interleaved(url: str, uploads: list[bytes], pid: int, args) -> tuple[dict, dict]:
    """Clean and hostile segments in turn (`--rounds` of each, the same good requests in both), so a busy machine
    slows both alike; (clean, hostile) pooled results."""
    payloads = hostile_payloads()
    rows = [{"latencies": [], "errors": 0, "wall": 0.0, "server_errors": 0} for _ in range(2)]
    counts: dict = {}
    per_round = args.requests // args.rounds
    clean_memory = None
    for round_ in range(args.rounds):
        for row, hostile_mix in zip(rows, (False, True)):
            first = round_ * per_round
            if hostile_mix:
                result = asyncio.run(hostile_load(url, uploads, per_round, first, payloads, counts, args))
            else:
                result = asyncio.run(load(url, uploads, per_round, args.concurrency, first))
                clean_memory = clean_memory or peak_memory_mb(pid)
            row["latencies"] += result[0]
            row["errors"] += result[1]
            row["wall"] += result[2]
            row["server_errors"] += result[3]
    clean, bad = rows
    bad |= {"counts": counts, "memory_clean": clean_memory, "memory": peak_memory_mb(pid)}
    bad["server_errors"] += sum(n for (_, status), n in counts.items() if isinstance(status, int) and status >= 500)
    return clean, bad


def peak_memory_mb(pid: int) -> float:
    """The server's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _summary(latencies: list[float], errors: int, wall: float, requests: int) -> dict:
    return {"errors": errors, "rps": requests / wall, "p50": percentile(latencies, 50) * 1000, "wall": wall,
            "p95": percentile(latencies, 95) * 1000, "mean": float(np.mean(latencies)) * 1000}  # fmt: skip


def run_mode(model_dir: Path, uploads: list[bytes], max_batch_size: int, args, replicas: int | None = None) -> dict:
    port = free_port()
    server = start_server(model_dir, port, max_batch_size, args, replicas)
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/audio/transcriptions"
    hostile_row = None
    try:
        asyncio.run(load(url, uploads, args.concurrency, args.concurrency))  # warm-up
        before = httpx.get(base + "/health").json()["batching"]
        if args.hostile and max_batch_size > 1 and replicas is None:
            clean, bad = interleaved(url, uploads, server.pid, args)
            requests = len(clean["latencies"])
            hostile_row = _summary(bad["latencies"], bad["errors"], bad["wall"], requests) | {
                key: bad[key] for key in ("counts", "memory_clean", "memory", "server_errors")}  # fmt: skip
            latencies, errors, wall = clean["latencies"], clean["errors"], clean["wall"]
        else:
            latencies, errors, wall, _ = asyncio.run(load(url, uploads, args.requests, args.concurrency))
            requests = args.requests
        after = httpx.get(base + "/health").json()["batching"]
    finally:
        server.terminate()  # serve-ray: SIGTERM drains the replicas, then stops Ray
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            server.kill()
    batches = after["batches"] - before["batches"]
    return {
        "replicas": replicas,
        "max_batch_size": max_batch_size,
        **_summary(latencies, errors, wall, requests),
        # With the hostile mix the counters include its batches too.
        "mean_batch": (after["clips"] - before["clips"]) / batches if batches else 0.0,
        "hostile": hostile_row,
    }


def replicas_table(rows: list[dict], args) -> list[str]:
    """The Ray Serve rows: 1 replica vs N, the same load in the same run (mean batch is per replica: not shown)."""
    one, many = rows
    lines = [
        f"Ray Serve (`speechlm serve-ray`, max batch {one['max_batch_size']}, {args.threads or 'default'} CPU(s) and "
        "torch thread(s) per replica, fresh local Ray per row), same load:",
        "",
        "| Replicas | Errors | Requests/s | p50 latency (ms) | p95 latency (ms) | Mean latency (ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['replicas']} | {row['errors']} | {row['rps']:.2f} | {row['p50']:.0f} | "
                     f"{row['p95']:.0f} | {row['mean']:.0f} |")  # fmt: skip
    lines += [
        "",
        f"{many['replicas']} replicas / 1, same run: throughput x{many['rps'] / one['rps']:.2f}, "
        f"p50 latency x{many['p50'] / one['p50']:.2f}, p95 latency x{many['p95'] / one['p95']:.2f}.",
        "",
    ]
    return lines


def table(rows: list[dict], args, params: int) -> str:
    ray_rows = [row for row in rows if row["replicas"] is not None]
    rows = [row for row in rows if row["replicas"] is None]
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Serving benchmark (`benchmarks/serving.py`)",
        "",
        f"{args.requests} requests, {args.concurrency} concurrent, against the server on 127.0.0.1; random "
        f"SpeechLM of {params / 1e6:.1f} M parameters (Whisper-style encoder 4x256 + Qwen2-style decoder 4x256), "
        f"2-5 s clips, {args.max_new_tokens} generated tokens per request, device `{args.device}` "
        f"({os.cpu_count()} CPU cores, {cpu}, torch {torch.__version__}, server threads "
        f"{args.threads or 'default'}), batch window {args.batch_wait_ms:g} ms.",
        "",
    ]
    if ray_rows:
        lines += replicas_table(ray_rows, args)
    if not rows:
        return "\n".join(lines)
    batched, single = rows
    lines += [
        "| Dynamic batching | Max batch | Errors | Requests/s | p50 latency (ms) | p95 latency (ms) | Mean latency (ms)"
        " | Mean batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in (("on", batched), ("off", single)):
        lines.append(
            f"| {name} | {row['max_batch_size']} | {row['errors']} | {row['rps']:.2f} | {row['p50']:.0f} | "
            f"{row['p95']:.0f} | {row['mean']:.0f} | {row['mean_batch']:.1f} |"
        )
    lines += [
        "",
        f"Batching on/off, same run: throughput x{batched['rps'] / single['rps']:.2f}, "
        f"p50 latency x{batched['p50'] / single['p50']:.2f}, p95 latency x{batched['p95'] / single['p95']:.2f}.",
        "",
    ]
    if bad := batched.get("hostile"):
        answered = ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(bad["counts"].items(), key=str))
        lines += [
            f"Hostile mix (same server, same run, {args.rounds} clean and {args.rounds} hostile segments in turn, "
            f"{args.requests // args.rounds} good requests each): {args.concurrency // 4} hostile clients beside the "
            f"{args.concurrency} good ones. Within the limits: 30 min of 8 kHz audio per upload (72 chunks of 25 s), "
            "the longest allowed prompt, uploads dribbled in 16 kB a second; past them: 64 MB chunked uploads, "
            "slowloris headers, 60k-character prompts, 1 Hz WAVs. Hostile clients give up after 60 s (a cancelled "
            "request's work stops). The on/off rows above use the clean segments; mean batch counts both.",
            "",
            "| Good requests | Errors (good) | Requests/s | p50 latency (ms) | p95 latency (ms) | Server peak memory"
            " (MB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            f"| clean | {batched['errors']} | {batched['rps']:.2f} | {batched['p50']:.0f} | {batched['p95']:.0f} | "
            f"{bad['memory_clean']:.0f} |",
            f"| hostile mix | {bad['errors']} | {bad['rps']:.2f} | {bad['p50']:.0f} | {bad['p95']:.0f} | "
            f"{bad['memory']:.0f} |",
            "",
            f"Hostile / clean: throughput x{bad['rps'] / batched['rps']:.2f}, p95 latency "
            f"x{bad['p95'] / batched['p95']:.2f}; 5xx answers (good and hostile): {bad['server_errors']}. "
            f"Hostile requests answered: {answered}.",
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="the server's torch threads; 0 = torch's default. 1 keeps CPU runs reproducible on a shared machine, "
        "where idle-spinning OpenMP threads made 2-thread runs vary 20x between runs",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4,
                        help="clean and hostile segments in turn (each --requests / --rounds good requests)")
    parser.add_argument("--hostile-only", default=None, help="every hostile client sends only this kind (to find "
                        "which one costs): long, max_prompt, huge, slow, dribble, prompt, rate")  # fmt: skip
    parser.add_argument("--no-hostile", dest="hostile", action="store_false",
                        help="skip the hostile-mix run (good requests beside hostile clients)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=0,
                        help="also compare `speechlm serve-ray` with 1 and with this many replicas (needs the ray "
                             "extra; 0: no Ray rows)")  # fmt: skip
    parser.add_argument("--skip-batching", action="store_true",
                        help="skip the batching on/off rows (with --replicas: only the Ray comparison)")  # fmt: skip
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        params = build_model(folder)
        uploads = make_uploads(50)
        rows = [] if args.skip_batching else [run_mode(folder / "model", uploads, size, args) for size in (16, 1)]
        if args.replicas:
            rows += [run_mode(folder / "model", uploads, 16, args, replicas) for replicas in (1, args.replicas)]
    text = table(rows, args, params)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    bad = [row["hostile"] or {} for row in rows]
    failed = sum(row["errors"] + b.get("errors", 0) + b.get("server_errors", 0) for row, b in zip(rows, bad))
    if failed:
        print(f"error: {failed} request(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
