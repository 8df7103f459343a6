#!/usr/bin/env bash
# The main job: sets up .venv, then trains the default config (GPT-2 small's architecture shrunk
# to run on a CPU) on the embedded corpus (the Python standard library) and prints a sample.
# Extra arguments go to llmjax.main, e.g. --config.total_steps=100. Rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m llmjax.main --config=configs/gpt_small.py:runlocal \
  --workdir="${WORKDIR:-runs/gpt_small_local}" "$@"
