#!/usr/bin/env bash
# Train on this machine's CPU, optionally as a fake N-device mesh (tests sharding, not speed):
#   DEVICES=8 bash launch/local_cpu.sh --config=configs/llama2_7b.py:runlocal --config.mesh.shape="(2,2,2)"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DEVICES=${DEVICES:-1}
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES ${XLA_FLAGS:-}"
exec .venv/bin/python -m llmjax.main --workdir="${WORKDIR:-runs/local}" "$@"
