#!/usr/bin/env bash
# Set up (idempotent) and run the offline demo: train a real speech LLM on this CPU and report its WER.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/speechlm demo "$@"
