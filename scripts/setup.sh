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
