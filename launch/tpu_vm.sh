#!/usr/bin/env bash
# Train on Cloud TPU VMs: one host, a multi-host pod slice, or several slices (multislice).
# Creates the TPU (or reuses it), ships the code to every worker, installs a Python the lock
# supports, the pinned dependencies and jax[tpu]/libtpu at the locked versions (scripts/setup.sh
# with LLMJAX_TPU_EXTRA=1), then runs the same `python -m llmjax.main --distributed ...` on every
# worker of every slice. docs/launch.md has the walk-through and the errors people hit.
#
#   TPU_NAME=my-v5p ZONE=us-east5-a ACCELERATOR=v5p-32 REPO=https://github.com/you/llmjax.git \
#   WORKDIR=gs://my-bucket/runs/gpt_small \
#     bash launch/tpu_vm.sh --config=configs/gpt_small.py --config.mesh.shape="(1,-1,1)"
#
# Environment (required: TPU_NAME, ZONE, WORKDIR, REPO):
#   TPU_NAME         the TPU VM (SLICES=1) or queued resource (SLICES>1); slice i is TPU_NAME-i
#   ZONE             e.g. us-east5-a
#   WORKDIR          gs://bucket/path: every host reads and writes the same checkpoints
#   REPO             a git URL the workers can clone (your fork), or `local` to copy this
#                    checkout's files (tracked and untracked-but-not-ignored) to every worker
#   REF              with a git URL: the branch, tag or commit to run (default: the remote's HEAD)
#   ACCELERATOR      e.g. v5p-8, v5litepod-16, v6e-8, v4-32; needed only to create the TPU
#   RUNTIME_VERSION  the TPU software version (default from ACCELERATOR: v2-alpha-tpuv6e,
#                    v2-alpha-tpuv5, v2-alpha-tpuv5-lite, tpu-ubuntu2204-base)
#   SLICES           number of slices (default 1); >1 uses queued resources (multislice) and
#                    adds --config.mesh.dcn_shape="(SLICES,1,1)" unless you pass one
#   PROJECT          a gcloud project other than the configured one
#   SPOT=1           create Spot TPUs
#   DETACH=1         start training in the background on every worker (log: ~/llmjax-train.log)
#                    instead of streaming its output through ssh
#   KILL_PREVIOUS=1  stop an llmjax.main still running on a worker (it holds the TPU) first
#   SKIP_SETUP=1     skip the setup pass (code, Python, venv) and only start training
#   PY_VERSION       the Python uv installs where the image's is older than 3.11 (default 3.11)
# Flags: --dry-run prints every command (gcloud, and the script each worker runs) and runs none.
set -euo pipefail

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

DRY_RUN=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done

TPU_NAME=${TPU_NAME:-${TPU:-}}
[ -n "$TPU_NAME" ] || die "set TPU_NAME to the TPU VM (or queued resource) name"
[ -n "${ZONE:-}" ] || die "set ZONE to the TPU's zone, e.g. ZONE=us-east5-a"
[ -n "${WORKDIR:-}" ] || die "set WORKDIR to a gs:// path shared by all hosts, e.g. WORKDIR=gs://my-bucket/run1"
case "$WORKDIR" in gs://?*) ;; *) die "WORKDIR must be a gs:// path (every host writes the same checkpoints), not $WORKDIR" ;; esac
[ -n "${REPO:-}" ] || die "set REPO to a git URL the TPU workers can clone (your fork), or REPO=local to copy this checkout"
SLICES=${SLICES:-1}
case "$SLICES" in '' | *[!0-9]* | 0) die "SLICES must be a positive integer, not '$SLICES'" ;; esac
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$arg" in --workdir=* | --workdir) die "give the workdir as WORKDIR=gs://..., not $arg" ;; esac
done
if [ "$SLICES" -gt 1 ]; then
  dcn_given=0
  for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
    case "$arg" in --config.mesh.dcn_shape=*) dcn_given=1 ;; esac
  done
  if [ "$dcn_given" = 0 ]; then ARGS+=("--config.mesh.dcn_shape=($SLICES,1,1)"); fi
fi
ACCELERATOR=${ACCELERATOR:-}
if [ -z "${RUNTIME_VERSION:-}" ]; then
  case "$ACCELERATOR" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

GCLOUD=(gcloud)
COMMON=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then COMMON+=(--project="$PROJECT"); fi

# Prints a command so that it can be pasted into bash: words quoted with %q, and a multi-line
# word (the workers' script) as a quoted here-document.
show() {
  local word out=() doc=""
  for word in "$@"; do
    if [[ "$word" == *$'\n'* ]]; then
      out+=('"$(cat <<'"'"'LLMJAX_REMOTE'"'"'')
      doc=$word
    else
      out+=("$(printf '%q' "$word")")
    fi
  done
  if [ -n "$doc" ]; then
    printf '%s\n%s\nLLMJAX_REMOTE\n)"\n' "${out[*]}" "$doc"
  else
    printf '%s\n' "${out[*]}"
  fi
}
run() {
  if [ "$DRY_RUN" = 1 ]; then show "$@"; else "$@"; fi
}

# 1. The TPU: reuse it if it exists, else create it (ACCELERATOR needed).
if [ "$SLICES" = 1 ]; then
  NODES=("$TPU_NAME")
  describe=("${GCLOUD[@]}" compute tpus tpu-vm describe "$TPU_NAME" "${COMMON[@]}" --format=value\(state\))
  create=("${GCLOUD[@]}" compute tpus tpu-vm create "$TPU_NAME" "${COMMON[@]}"
          --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION")
else
  NODES=()
  for ((i = 0; i < SLICES; i++)); do NODES+=("$TPU_NAME-$i"); done
  describe=("${GCLOUD[@]}" compute tpus queued-resources describe "$TPU_NAME" "${COMMON[@]}"
            --format=value\(state.state\))
  create=("${GCLOUD[@]}" compute tpus queued-resources create "$TPU_NAME" "${COMMON[@]}"
          --node-count="$SLICES" --node-prefix="$TPU_NAME" --accelerator-type="$ACCELERATOR"
          --runtime-version="$RUNTIME_VERSION")
fi
if [ "${SPOT:-0}" = 1 ]; then create+=(--spot); fi
if [ "$DRY_RUN" = 1 ]; then
  echo "# reuse the TPU if this finds it:"
  show "${describe[@]}"
  if [ -n "$ACCELERATOR" ]; then echo "# else create it:"; show "${create[@]}"; fi
elif ! state=$("${describe[@]}" 2>/dev/null); then
  [ -n "$ACCELERATOR" ] || die "no TPU named $TPU_NAME in $ZONE; set ACCELERATOR (e.g. v5p-8) to create it"
  echo "creating $TPU_NAME ($ACCELERATOR x $SLICES, $RUNTIME_VERSION) ..." >&2
  "${create[@]}"
elif [ "$SLICES" = 1 ]; then
  case "$state" in
    PREEMPTED | TERMINATED) die "TPU $TPU_NAME is $state; delete it (gcloud compute tpus tpu-vm delete $TPU_NAME --zone=$ZONE) and rerun: training resumes from the last checkpoint" ;;
    STOPPED | STOPPING) die "TPU $TPU_NAME is $state; start it (gcloud compute tpus tpu-vm start $TPU_NAME --zone=$ZONE) and rerun" ;;
  esac
fi
if [ "$SLICES" -gt 1 ]; then
  # A queued resource is usable once ACTIVE; its nodes are TPU_NAME-0 .. TPU_NAME-(SLICES-1).
  if [ "$DRY_RUN" = 1 ]; then
    echo "# wait until this prints ACTIVE:"
    show "${describe[@]}"
  else
    while :; do
      state=$("${describe[@]}") || die "cannot describe queued resource $TPU_NAME (its error is above)"
      [ "$state" != ACTIVE ] || break
      case "$state" in
        FAILED | SUSPENDED | SUSPENDING) die "queued resource $TPU_NAME is $state; delete it (gcloud compute tpus queued-resources delete $TPU_NAME --zone=$ZONE --force) and rerun" ;;
      esac
      echo "queued resource $TPU_NAME: ${state:-?}; waiting ..." >&2
      sleep 30
    done
  fi
fi

# 2. The code: REPO=local ships an archive of this checkout; a git URL is cloned on the workers.
if [ "$REPO" = local ]; then
  root=$(cd "$(dirname "$0")/.." && pwd)
  archive=${TMPDIR:-/tmp}/llmjax-src-$$.tgz
  if [ "$DRY_RUN" = 1 ]; then
    echo "# archive this checkout (tracked and untracked, not ignored):"
    echo "git -C $(printf '%q' "$root") ls-files -z --cached --others --exclude-standard | tar -C $(printf '%q' "$root") --null -T - -czf $(printf '%q' "$archive")"
  else
    git -C "$root" ls-files -z --cached --others --exclude-standard |
      tar -C "$root" --null -T - -czf "$archive"
    trap 'rm -f "$archive"' EXIT
  fi
  for node in "${NODES[@]}"; do
    run "${GCLOUD[@]}" compute tpus tpu-vm scp "$archive" "$node:llmjax-src.tgz" "${COMMON[@]}" --worker=all
  done
fi

# 3. Two scripts for the workers, run one after the other on all of them: setup, then training.
# Setup first everywhere, so that every worker starts llmjax.main within seconds of the others
# (jax.distributed.initialize waits 5 minutes for the rest, and a first setup can take longer on
# one worker than another). Values go in as bash-quoted assignments; the bodies are quoted
# here-documents, so nothing in them is expanded here.
values=$(
  printf 'REPO=%q REF=%q WORKDIR=%q PY_VERSION=%q DETACH=%q KILL_PREVIOUS=%q\n' \
    "$REPO" "${REF:-HEAD}" "$WORKDIR" "${PY_VERSION:-3.11}" "${DETACH:-0}" "${KILL_PREVIOUS:-0}"
  printf 'ARGS=('
  if [ "${#ARGS[@]}" -gt 0 ]; then printf ' %q' "${ARGS[@]}"; fi
  printf ' )\n'
)
setup=$values$'\n'$(cat <<'SETUP'
set -euo pipefail
cd "$HOME"
if [ "$REPO" = local ]; then
  mkdir -p llmjax
  find llmjax -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
  tar -xzf llmjax-src.tgz -C llmjax
else
  if [ ! -d llmjax/.git ]; then  # first run, or a copied tree before: clone, keep the venv
    rm -rf llmjax.clone
    git clone -q "$REPO" llmjax.clone
    if [ -d llmjax/.venv ]; then mv llmjax/.venv llmjax.clone/; fi
    rm -rf llmjax
    mv llmjax.clone llmjax
  fi
  git -C llmjax remote set-url origin "$REPO"
  git -C llmjax fetch -q origin "$REF"
  git -C llmjax checkout -q --detach FETCH_HEAD
fi
cd llmjax
# A Python the lock supports (3.11+, with venv): the image's own if it has one, else uv's.
python=""
for candidate in python3.11 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null &&
     "$candidate" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=$(command -v "$candidate")
    break
  fi
done
if [ -z "$python" ]; then
  uv="$HOME/.local/bin/uv"
  if [ ! -x "$uv" ]; then  # uv from the package registry, into ~/.local
    python3 -m pip --version >/dev/null 2>&1 || sudo apt-get install -y -q python3-pip
    python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv
  fi
  "$uv" python install "$PY_VERSION"
  python=$("$uv" python find "$PY_VERSION")
fi
# The pinned set plus jax[tpu]'s libtpu at the locked version (requirements/tpu-lock.txt).
PYTHON="$python" LLMJAX_TPU_EXTRA=1 bash scripts/setup.sh
SETUP
)
train=$values$'\n'$(cat <<'TRAIN'
set -euo pipefail
cd "$HOME/llmjax"
# A previous run (started by this script: this checkout's venv) still holding the TPU makes this
# one fail with "TPU in use" / device busy.
running="^$PWD/\\.venv/bin/python -m llmjax\\.main"
mapfile -t previous < <(pgrep -f "$running" || true)
if [ "${#previous[@]}" -gt 0 ]; then
  if [ "$KILL_PREVIOUS" = 1 ]; then
    kill "${previous[@]}" || true
    for _ in $(seq 60); do pgrep -f "$running" >/dev/null || break; sleep 1; done
  else
    echo "$(hostname): llmjax.main (pid ${previous[*]}) still runs and holds the TPU; stop it or rerun with KILL_PREVIOUS=1" >&2
    exit 1
  fi
fi
cmd=("$PWD/.venv/bin/python" -m llmjax.main --distributed "--workdir=$WORKDIR" "${ARGS[@]}")
if [ "$DETACH" = 1 ]; then
  nohup "${cmd[@]}" >"$HOME/llmjax-train.log" 2>&1 </dev/null &
  echo "$(hostname): training in the background (pid $!), log $HOME/llmjax-train.log"
else
  exec "${cmd[@]}"
fi
TRAIN
)

# 4. Runs a script on every worker of every slice at once (one ssh per slice, --worker=all) and
# waits for all of them; fails if any fails.
on_all_workers() {
  local node pid status=0 pids=()
  if [ "$DRY_RUN" = 1 ] && [ "${#NODES[@]}" -gt 1 ]; then
    echo "# these ${#NODES[@]} run at the same time (in the background, then wait):"
  fi
  for node in "${NODES[@]}"; do
    local ssh=("${GCLOUD[@]}" compute tpus tpu-vm ssh "$node" "${COMMON[@]}" --worker=all --command "$1")
    if [ "$DRY_RUN" = 1 ]; then
      show "${ssh[@]}"
    elif [ "${#NODES[@]}" = 1 ]; then
      "${ssh[@]}" || status=$?  # in the foreground: gcloud may ask to make an ssh key first
    else
      "${ssh[@]}" &
      pids+=("$!")
    fi
  done
  for pid in "${pids[@]+"${pids[@]}"}"; do wait "$pid" || status=$?; done
  return "$status"
}

if [ "${SKIP_SETUP:-0}" != 1 ]; then
  if [ "$DRY_RUN" = 1 ]; then echo "# setup on every worker:"; fi
  on_all_workers "$setup" || die "setup failed on some worker (its output is above)"
fi
if [ "$DRY_RUN" = 1 ]; then echo "# then training on every worker:"; fi
on_all_workers "$train"
