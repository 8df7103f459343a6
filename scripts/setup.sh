#!/usr/bin/env bash
# Creates .venv with the pinned dependency set (requirements/lock.txt) and llmjax itself; with
# LLMJAX_TEST_EXTRA=1 also the test extra's pinned set (requirements/test-lock.txt).
# Idempotent: a second run with the same lock file does nothing. Needs Python 3.11+ and access to
# the package registry; PYTHON=/path/to/python3.x picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LLMJAX_VENV:-.venv}

"$PYTHON" - <<'PY' || { echo "error: llmjax needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2; exit 2; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

stamp="$VENV/.llmjax-installed"
# LLMJAX_TEST_EXTRA=1 (scripts/test.sh) adds the test extra's pinned torch (CPU) + transformers
# and the tpu extra's libtpu (the tests compile for a TPU topology ahead of time);
# LLMJAX_TPU_EXTRA=1 adds libtpu alone (a TPU VM, or planning with describe --topology).
# The gcs extra (gcsfs: gs:// workdirs) comes with both, or alone with LLMJAX_GCS_EXTRA=1; the
# eval extra (lm-evaluation-harness) with the tests, or alone with LLMJAX_EVAL_EXTRA=1.
locks="requirements/lock.txt"
if [ "${LLMJAX_TEST_EXTRA:-0}" = 1 ]; then locks="$locks requirements/test-lock.txt"; fi
if [ "${LLMJAX_TEST_EXTRA:-0}" = 1 ] || [ "${LLMJAX_TPU_EXTRA:-0}" = 1 ]; then
  locks="$locks requirements/tpu-lock.txt"
fi
if [ "${LLMJAX_TEST_EXTRA:-0}" = 1 ] || [ "${LLMJAX_TPU_EXTRA:-0}" = 1 ] \
    || [ "${LLMJAX_GCS_EXTRA:-0}" = 1 ]; then
  locks="$locks requirements/gcs-lock.txt"
fi
if [ "${LLMJAX_TEST_EXTRA:-0}" = 1 ] || [ "${LLMJAX_EVAL_EXTRA:-0}" = 1 ]; then
  locks="$locks requirements/eval-lock.txt"
fi
want="$(cat $locks pyproject.toml | cksum)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (pinned dependencies from requirements/lock.txt) ..." >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/lock.txt
if [ "${LLMJAX_TEST_EXTRA:-0}" = 1 ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/test-lock.txt
fi
case " $locks " in *tpu-lock.txt*)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/tpu-lock.txt ;;
esac
case " $locks " in *gcs-lock.txt*)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/gcs-lock.txt ;;
esac
case " $locks " in *eval-lock.txt*)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/eval-lock.txt ;;
esac
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
echo "$want" > "$stamp"
