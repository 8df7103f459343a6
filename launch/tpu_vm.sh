#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host). Every host runs the same command;
# --distributed makes JAX find the other hosts. The workdir must be shared (a gs:// bucket).
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/gpt_small \
#     bash launch/tpu_vm.sh --config=configs/gpt_small.py --config.mesh.shape="(1,-1,1)"
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://...)}"
REPO=${REPO:-https://github.com/llmjax/llmjax.git}  # or your fork: REPO=... bash launch/tpu_vm.sh
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d llmjax ] || git clone $REPO llmjax
  cd llmjax && git pull --ff-only
  PYTHON=python3 bash scripts/setup.sh
  .venv/bin/pip install -q 'jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')'
  .venv/bin/python -m llmjax.main --distributed --workdir=$WORKDIR $*
"
