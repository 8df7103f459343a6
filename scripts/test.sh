#!/usr/bin/env bash
# The whole test suite: sets up .venv, then runs pytest on two workers (8 fake CPU devices each).
set -euo pipefail
cd "$(dirname "$0")/.."
LLMJAX_TEST_EXTRA=1 bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 -q "$@"
