"""How long a trained demo folder (trainable-only: projector + LoRA + the base models' paths) takes to load.

Before: every load re-reads the CTranslate2 Whisper file and de-quantises the GGUF LLM (and rebuilds its tokenizer).
After: both come from the conversion cache (safetensors keyed by the source's fingerprint). Each load runs in a fresh
process (`load_pretrained(folder, dtype=float32)`, what `transcribe`/`evaluate`/`serve` do), the two sides
interleaved, median of repeats; process CPU time is reported beside wall time because the machine may be shared.

    python benchmarks/load_time.py [--model RUN/model] [--repeats 3]   # writes benchmarks/results/load_time.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
wall, cpu = time.perf_counter(), time.process_time()
import torch
from speechlm.inference import load_pretrained
imported = (time.perf_counter() - wall, time.process_time() - cpu)
wall, cpu = time.perf_counter(), time.process_time()
load_pretrained(sys.argv[1], dtype=torch.float32)
print(json.dumps({"import_wall": imported[0], "import_cpu": imported[1],
                  "load_wall": time.perf_counter() - wall, "load_cpu": time.process_time() - cpu}))
"""


def newest_demo_model() -> Path:
    from speechlm.cache import cache_dir

    runs = sorted(cache_dir("demo", "runs").glob("*/model/trainable.safetensors"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no trained demo folder under the cache; run `speechlm demo` or pass --model")
    return runs[-1].parent


def load_once(model: Path, cache_root: Path, cached: bool) -> dict:
    env = {**os.environ, "SPEECHLM_CACHE": str(cache_root), "SPEECHLM_CONVERSION_CACHE": "1" if cached else "0",
           "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(model)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="trainable-only model folder (default: newest demo)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "load_time.md")
    args = parser.parse_args()
    model = args.model or newest_demo_model()
    with tempfile.TemporaryDirectory() as cache_root:
        first = load_once(model, Path(cache_root), cached=True)  # fills the empty cache
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for cached in (False, True):
                runs[cached].append(load_once(model, Path(cache_root), cached))
                print(cached, runs[cached][-1], flush=True)
    med = {side: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for side, rows in runs.items()}
    rows = [("load_pretrained, wall (s)", "load_wall"), ("load_pretrained, process CPU (s)", "load_cpu"),
            ("import speechlm + torch, wall (s)", "import_wall")]
    lines = [
        "# Loading a trained demo folder: conversions redone vs read from the conversion cache",
        "",
        f"`{model.name}` folder of a demo run (Whisper tiny.en CTranslate2 + SmolLM2-135M GGUF Q4_1, trainable-only "
        f"checkpoint), `load_pretrained(folder, dtype=float32)` in a fresh process, {args.repeats} interleaved "
        f"repeats, median, {os.cpu_count()} CPU cores. Produced by `python benchmarks/load_time.py`.",
        "",
        "| | no cache (converts every time) | cache hit | ratio |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        before, after = med[False][key], med[True][key]
        lines.append(f"| {label} | {before:.2f} | {after:.2f} | {after / before:.3f} |")
    lines += [
        "",
        f"The first load with an empty cache (converts and writes the cache once): {first['load_wall']:.2f} s wall, "
        f"{first['load_cpu']:.2f} s CPU. Target: a demo folder loads in <= 15 s on 2 cores.",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
