"""The launch scripts: launch/tpu_vm.sh against a fake `gcloud` that records every call (1 host,
a 4-host slice, 2 slices), its --dry-run output, its bad-input lines; launch/gpu_multinode.sh's
command; and launch/slurm_gpu.sbatch under a fake SLURM (a fake `srun` starting the 2 "nodes" as
2 local processes with 4 CPU devices each), whose losses match 1 process driving 8 devices."""

import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_multiprocess import free_port, reference_losses

ROOT = pathlib.Path(__file__).parent.parent
LAUNCH = ROOT / "launch"

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records its argv (NUL-separated, one file per call); a TPU "exists" once created.
set -euo pipefail
printf '%s\0' "$@" > "$FAKE_GCLOUD_DIR/call.$(date +%s%N).$$"
case "$*" in
  *" describe "*) if [ -e "$FAKE_GCLOUD_DIR/exists.$5" ]; then echo "${FAKE_STATE:-READY}"; else exit 1; fi ;;
  *" create "*) touch "$FAKE_GCLOUD_DIR/exists.$5" ;;
esac
"""

FAKE_SRUN = r"""#!/usr/bin/env bash
# Starts the step's tasks (one per node, SLURM_NNODES nodes) as local processes with the
# variables srun sets; each task's output goes to its own file.
set -euo pipefail
printf '%s\n' "$@" > "$FAKE_SRUN_DIR/argv"
while [[ "${1:-}" == --* ]]; do shift; done
env | grep '^JAX_LOCAL_DEVICE_IDS=' > "$FAKE_SRUN_DIR/env" || true
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_NTASKS=$SLURM_NNODES \
  SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_NUM_NODES=$SLURM_NNODES \
    "$@" > "$FAKE_SRUN_DIR/task$i.log" 2>&1 &
  pids+=("$!")
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
"""


def executable(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def clean_env(**extra) -> dict:
    """The environment minus anything the scripts read, plus `extra`."""
    names = ("TPU", "TPU_NAME", "ZONE", "WORKDIR", "REPO", "REF", "ACCELERATOR",
             "RUNTIME_VERSION", "SLICES", "PROJECT", "SPOT", "DETACH", "KILL_PREVIOUS",
             "SKIP_SETUP", "PY_VERSION", "COORDINATOR", "NUM_NODES", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("SLURM_")}
    env.update(extra)
    return env


@pytest.fixture
def gcloud(tmp_path):
    """A fake gcloud first on PATH; returns a function giving the recorded calls in order."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud"
    bin_dir.mkdir()
    log.mkdir()
    executable(bin_dir / "gcloud", FAKE_GCLOUD)

    def calls() -> list[list[str]]:
        files = sorted(log.glob("call.*"), key=lambda p: int(p.name.split(".")[1]))
        return [f.read_text().split("\0")[:-1] for f in files]

    calls.env = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(log))
    calls.exists = lambda name: (log / f"exists.{name}").touch()
    return calls


def tpu_vm(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], env=clean_env(**env),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def remote_script(call: list[str]) -> str:
    """The --command of a recorded `gcloud ... ssh` call, checked to parse as bash."""
    script = call[call.index("--command") + 1]
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    return script


def remote_args(script: str) -> list[str]:
    """The llmjax.main flags in the workers' script (its ARGS=( ... ) line), as bash reads them."""
    line = next(l for l in script.splitlines() if l.startswith("ARGS=("))
    return shlex.split(line[len("ARGS=("):-1])


BASE = dict(ZONE="us-east5-a", WORKDIR="gs://bucket/runs/gpt_small",
            REPO="https://github.com/someone/llmjax.git")
FLAGS = ["--config=configs/gpt_small.py", '--config.mesh.shape=(1,-1,1)']
ZONE = "--zone=us-east5-a"


def test_tpu_vm_one_host_creates_then_runs(gcloud):
    out = tpu_vm(dict(BASE, TPU_NAME="tiny", ACCELERATOR="v5p-8", **gcloud.env), *FLAGS)
    assert out.returncode == 0, out.stderr
    calls = gcloud()
    assert [c[:5] for c in calls] == [["compute", "tpus", "tpu-vm", c, "tiny"]
                                      for c in ("describe", "create", "ssh", "ssh")]
    assert calls[1][5:] == [ZONE, "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]
    setup, train = map(remote_script, calls[2:])
    assert calls[2][5:7] == calls[3][5:7] == [ZONE, "--worker=all"]
    assert "REPO=https://github.com/someone/llmjax.git REF=HEAD WORKDIR=gs://bucket/runs/gpt_small" in setup
    assert 'git clone -q "$REPO" llmjax' in setup
    assert 'PYTHON="$python" LLMJAX_TPU_EXTRA=1 bash scripts/setup.sh' in setup
    assert "llmjax.main" not in setup
    assert remote_args(train) == FLAGS
    assert '-m llmjax.main --distributed "--workdir=$WORKDIR" "${ARGS[@]}"' in train


def test_tpu_vm_four_hosts_reuses_and_copies_local_tree(gcloud, tmp_path):
    gcloud.exists("pod")
    env = dict(BASE, TPU_NAME="pod", ACCELERATOR="v5p-32", REPO="local", **gcloud.env)
    out = tpu_vm(env, *FLAGS, "--config.total_steps=10")
    assert out.returncode == 0, out.stderr
    calls = gcloud()
    assert [c[3] for c in calls] == ["describe", "scp", "ssh", "ssh"]  # exists: no create
    scp = calls[1]
    assert scp[5:] == ["pod:llmjax-src.tgz", ZONE, "--worker=all"]
    assert scp[4].endswith(".tgz") and not pathlib.Path(scp[4]).exists()  # removed after
    setup, train = map(remote_script, calls[2:])
    assert "tar -xzf llmjax-src.tgz -C llmjax" in setup and "REPO=local" in setup
    assert remote_args(train) == FLAGS + ["--config.total_steps=10"]
    # The training script, run here with HOME holding a checkout whose venv python records argv.
    home = tmp_path / "home"
    (home / "llmjax" / ".venv" / "bin").mkdir(parents=True)
    executable(home / "llmjax" / ".venv" / "bin" / "python",
               '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$HOME/argv"\n')
    ran = subprocess.run(["bash", "-c", train], env=dict(os.environ, HOME=str(home)),
                         capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert (home / "argv").read_text().split("\0")[:-1] == [
        "-m", "llmjax.main", "--distributed", "--workdir=gs://bucket/runs/gpt_small", *FLAGS,
        "--config.total_steps=10"]
    # SKIP_SETUP=1: training only.
    out = tpu_vm(dict(env, SKIP_SETUP="1"), *FLAGS)
    assert out.returncode == 0, out.stderr
    assert [c[3] for c in gcloud()[4:]] == ["describe", "scp", "ssh"]
    assert "llmjax.main" in remote_script(gcloud()[-1])


def test_tpu_vm_two_slices_queued_resources(gcloud):
    env = dict(BASE, TPU_NAME="ms", ACCELERATOR="v5p-32", SLICES="2", SPOT="1",
               FAKE_STATE="ACTIVE", **gcloud.env)
    out = tpu_vm(env, *FLAGS)
    assert out.returncode == 0, out.stderr
    calls = gcloud()
    assert calls[0] == ["compute", "tpus", "queued-resources", "describe", "ms", ZONE,
                        "--format=value(state.state)"]
    assert calls[1] == ["compute", "tpus", "queued-resources", "create", "ms", ZONE,
                        "--node-count=2", "--node-prefix=ms", "--accelerator-type=v5p-32",
                        "--runtime-version=v2-alpha-tpuv5", "--spot"]
    assert calls[2] == calls[0]  # waits for ACTIVE
    # Setup on both slices (at once), then training on both.
    for ssh in sorted(calls[3:5]), sorted(calls[5:7]):
        assert [c[:7] for c in ssh] == [["compute", "tpus", "tpu-vm", "ssh", f"ms-{i}", ZONE,
                                         "--worker=all"] for i in (0, 1)]
    assert all("scripts/setup.sh" in remote_script(c) for c in calls[3:5])
    for call in calls[5:7]:
        assert remote_args(remote_script(call)) == FLAGS + ["--config.mesh.dcn_shape=(2,1,1)"]
    assert len(calls) == 7


def test_tpu_vm_dry_run_prints_and_runs_nothing(gcloud, tmp_path):
    for env, lines in [
        (dict(TPU_NAME="tiny", ACCELERATOR="v5p-8"),
         ["gcloud compute tpus tpu-vm describe tiny --zone=us-east5-a --format=value\\(state\\)",
          "gcloud compute tpus tpu-vm create tiny --zone=us-east5-a --accelerator-type=v5p-8 "
          "--version=v2-alpha-tpuv5",
          "gcloud compute tpus tpu-vm ssh tiny --zone=us-east5-a --worker=all --command "
          "\"$(cat <<'LLMJAX_REMOTE'"]),
        (dict(TPU_NAME="pod", ACCELERATOR="v5litepod-16", REPO="local"),
         ["gcloud compute tpus tpu-vm create pod --zone=us-east5-a "
          "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite",
          "gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all --command "
          "\"$(cat <<'LLMJAX_REMOTE'"]),
        (dict(TPU_NAME="ms", ACCELERATOR="v6e-256", SLICES="2"),
         ["gcloud compute tpus queued-resources create ms --zone=us-east5-a --node-count=2 "
          "--node-prefix=ms --accelerator-type=v6e-256 --runtime-version=v2-alpha-tpuv6e",
          "gcloud compute tpus tpu-vm ssh ms-0 --zone=us-east5-a --worker=all --command "
          "\"$(cat <<'LLMJAX_REMOTE'",
          "gcloud compute tpus tpu-vm ssh ms-1 --zone=us-east5-a --worker=all --command "
          "\"$(cat <<'LLMJAX_REMOTE'",
          "ARGS=( --config=configs/gpt_small.py --config.mesh.shape=\\(1\\,-1\\,1\\) "
          "--config.mesh.dcn_shape=\\(2\\,1\\,1\\) )"]),
    ]:
        out = tpu_vm(dict(BASE, **env, **gcloud.env), "--dry-run", *FLAGS)
        assert out.returncode == 0, out.stderr
        printed = out.stdout.splitlines()
        for line in lines:
            assert line in printed, (line, out.stdout)
        assert printed.count("LLMJAX_REMOTE") == 2 * int(env.get("SLICES", 1))  # setup, train
        if env.get("REPO") == "local":
            assert any(l.startswith("gcloud compute tpus tpu-vm scp ") for l in printed)
        # What it prints is bash: the commands and the workers' script parse.
        check = subprocess.run(["bash", "-n"], input=out.stdout, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    assert gcloud() == []


def test_tpu_vm_worker_refuses_then_stops_a_previous_run(gcloud, tmp_path):
    """A previous llmjax.main of this checkout's venv holds the TPU: the training script says so
    in one line, or with KILL_PREVIOUS=1 stops it and starts."""
    gcloud.exists("pod")
    out = tpu_vm(dict(BASE, TPU_NAME="pod", SKIP_SETUP="1", **gcloud.env), *FLAGS)
    assert out.returncode == 0, out.stderr
    train = remote_script(gcloud()[-1])
    home, fake = tmp_path / "home", tmp_path / "fake"
    (home / "llmjax" / ".venv" / "bin").mkdir(parents=True)
    (home / "llmjax" / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (fake / "llmjax").mkdir(parents=True)
    (fake / "llmjax" / "__init__.py").write_text("")
    (fake / "llmjax" / "main.py").write_text(
        "import sys, time\nif '--hold' in sys.argv: time.sleep(60)\n")
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(fake))
    held = subprocess.Popen([str(home / "llmjax" / ".venv" / "bin" / "python"), "-m", "llmjax.main",
                             "--hold"], env=env, cwd=fake)
    try:
        refused = subprocess.run(["bash", "-c", train], env=env, capture_output=True, text=True,
                                 timeout=30)
        assert refused.returncode == 1 and held.poll() is None
        assert f"llmjax.main (pid {held.pid}) still runs and holds the TPU" in refused.stderr
        ran = subprocess.run(["bash", "-c", train.replace("KILL_PREVIOUS=0", "KILL_PREVIOUS=1", 1)],
                             env=env, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        assert held.wait(timeout=10) != 0  # stopped by SIGTERM
    finally:
        held.kill()


def test_tpu_vm_worker_setup_clones_and_keeps_the_venv(gcloud, tmp_path):
    """The workers' setup script, run here: a copied tree (no .git) becomes a clone of REPO at
    REF with its venv kept; a Python 3.11+ is found; scripts/setup.sh with LLMJAX_TPU_EXTRA=1
    finds its stamp current and installs nothing."""
    gcloud.exists("pod")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    env = dict(BASE, TPU_NAME="pod", REPO=str(ROOT), REF=head, **gcloud.env)
    assert tpu_vm(env, *FLAGS).returncode == 0
    setup = remote_script(gcloud()[1])
    home = tmp_path / "home"
    venv = home / "llmjax" / ".venv"
    venv.mkdir(parents=True)
    (home / "llmjax" / "stale.txt").write_text("from a copied tree")
    locks = [ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "tpu-lock.txt",
             ROOT / "requirements" / "gcs-lock.txt", ROOT / "pyproject.toml"]
    stamp = subprocess.run(["cksum"], input=b"".join(p.read_bytes() for p in locks),
                           capture_output=True, check=True).stdout.decode()
    (venv / ".llmjax-installed").write_text(stamp)
    bin_dir = tmp_path / "pybin"
    bin_dir.mkdir()
    (bin_dir / "python3.11").symlink_to(sys.executable)
    ran = subprocess.run(["bash", "-c", setup], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert ran.returncode == 0, ran.stderr
    checkout = home / "llmjax"
    assert subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() == head
    assert (venv / ".llmjax-installed").read_text() == stamp  # kept, and current: no install
    assert not (checkout / "stale.txt").exists() and (checkout / "llmjax" / "main.py").exists()
    assert "setting up" not in ran.stderr


@pytest.mark.parametrize("env,message", [
    (dict(ZONE="z", WORKDIR="gs://b/r", REPO="x"), "set TPU_NAME"),
    (dict(TPU_NAME="t", WORKDIR="gs://b/r", REPO="x"), "set ZONE"),
    (dict(TPU_NAME="t", ZONE="z", REPO="x"), "set WORKDIR"),
    (dict(TPU_NAME="t", ZONE="z", WORKDIR="/tmp/run", REPO="x"), "WORKDIR must be a gs:// path"),
    (dict(TPU_NAME="t", ZONE="z", WORKDIR="gs://b/r"), "set REPO"),
    (dict(TPU_NAME="t", ZONE="z", WORKDIR="gs://b/r", REPO="x", SLICES="two"), "SLICES must be"),
    (dict(TPU_NAME="t", ZONE="z", WORKDIR="gs://b/r", REPO="x"), "no TPU named t in z; set ACCELERATOR"),
])
def test_tpu_vm_bad_input_is_one_line(gcloud, env, message):
    out = tpu_vm(dict(env, **gcloud.env))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


@pytest.mark.parametrize("state,slices,message", [
    ("PREEMPTED", "1", "TPU pod is PREEMPTED; delete it (gcloud compute tpus tpu-vm delete pod"),
    ("STOPPED", "1", "TPU pod is STOPPED; start it"),
    ("FAILED", "2", "queued resource pod is FAILED; delete it"),
])
def test_tpu_vm_unusable_tpu_is_one_line(gcloud, state, slices, message):
    gcloud.exists("pod")
    out = tpu_vm(dict(BASE, TPU_NAME="pod", SLICES=slices, FAKE_STATE=state, **gcloud.env))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not [c for c in gcloud() if c[3] == "ssh"]


def test_gpu_multinode_command_and_bad_input():
    env = clean_env(COORDINATOR="10.0.0.1:8476", NUM_NODES="2", NODE_RANK="1", WORKDIR="/nfs/run")
    script = str(LAUNCH / "gpu_multinode.sh")
    out = subprocess.run(["bash", script, "--dry-run", *FLAGS], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == [
        ".venv/bin/python", "-m", "llmjax.main", "--coordinator_address=10.0.0.1:8476",
        "--num_processes=2", "--process_id=1", "--workdir=/nfs/run", *FLAGS]
    for change, message in [(dict(NODE_RANK="2"), "NODE_RANK=2 is not below NUM_NODES=2"),
                            (dict(COORDINATOR="10.0.0.1"), "COORDINATOR must be host:port")]:
        bad = subprocess.run(["bash", script, "--dry-run"], env=dict(env, **change),
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr


def test_distributed_without_a_cluster_is_one_line(tmp_path):
    env = clean_env(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_RANK", "KUBERNETES_SERVICE_HOST"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-m", "llmjax.main", "--config=tests/reliability_config.py",
                          f"--workdir={tmp_path / 'run'}", "--distributed"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert "No cluster environment" in out.stderr and "--coordinator_address=HOST:PORT" in out.stderr
    assert not (tmp_path / "run").exists()


def test_slurm_sbatch_bad_input_is_one_line(tmp_path):
    script = str(LAUNCH / "slurm_gpu.sbatch")
    for env, message in [(clean_env(), "run this with sbatch"),
                         (clean_env(SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=str(tmp_path)),
                          "submit from the llmjax checkout")]:
        out = subprocess.run(["bash", script], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr


def test_scripts_parse():
    for script in LAUNCH.glob("*.s*"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


@pytest.mark.slow
def test_slurm_sbatch_two_nodes_match_one_process(devices, tokenizer_path, tmp_path):
    """`bash launch/slurm_gpu.sbatch` as SLURM runs it on a 2-node allocation: a fake srun starts
    one task per node (2 local processes, 4 CPU devices each) and jax.distributed finds the
    coordinator, ranks and process count in the SLURM_* variables alone."""
    total = 2
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "srun", FAKE_SRUN)
    workdir = tmp_path / "run"
    env = clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SRUN_DIR=str(tmp_path),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="llmjax", SLURM_NNODES="2",
        SLURM_JOB_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(ROOT),
        JAX_COORDINATOR_PORT=str(free_port()),  # instead of 61440 + job id % 4096
        LLMJAX_SKIP_SETUP="1", LLMJAX_PYTHON=sys.executable, GPUS_PER_NODE="4",
        WORKDIR=str(workdir), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    started = time.perf_counter()
    out = subprocess.run(
        ["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config=tests/reliability_config.py",
         f"--config.data.tokenizer={tokenizer_path}", f"--config.total_steps={total}",
         "--config.checkpoint_every_steps=1000"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
    assert out.returncode == 0, out.stderr + logs[0][-3000:] + logs[1][-3000:]
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert argv[2:6] == [sys.executable, "-m", "llmjax.main", "--distributed"]
    assert (tmp_path / "env").read_text().strip() == "JAX_LOCAL_DEVICE_IDS=0,1,2,3"
    assert "2 process(es)" in logs[0]
    assert not [l for l in logs[1].splitlines() if l.startswith(("mesh", "step"))]
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(logged) == list(range(1, total + 1))
    launched = time.perf_counter()
    expected = reference_losses(tokenizer_path, total)
    np.testing.assert_allclose([logged[s] for s in range(1, total + 1)], expected, rtol=2e-5)
    print(f"\nfake SLURM, 2 nodes x 4 devices: losses {[logged[s] for s in (1, 2)]} equal 1 process "
          f"x 8 devices; sbatch {launched - started:.0f} s, reference {time.perf_counter() - launched:.0f} s")
