"""Two processes on localhost (jax.distributed, 4 CPU devices each, gloo collectives) train,
are preempted (SIGTERM to one of them), checkpoint and resume together, each reading its own shard
of the data; their losses equal one process driving all 8 devices over the same global batches."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from llmjax import data as data_lib
from llmjax import sharding, steps
from tests import reliability_config

ROOT = pathlib.Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(workdir, tokenizer_path, extra, after: str | None = None, action: str = "",
                victim: int = 1):
    """Runs process 0 and 1 to their end; returns their outputs. With `after`, once process 0 has
    printed a line starting with it, process `victim` gets `action`:
    - "term": SIGTERM (a preemption notice reaches one host; JAX's sync point makes both save at
      the same step); both must then exit 0;
    - "stop": SIGSTOP to its whole process group (a hung host), killed afterwards;
    - "kill": SIGKILL to its whole process group (a host that died).
    After "stop" or "kill" the other process must end on its own within the watchdog's bound
    (llmjax/multihost.py, llmjax/supervise.py) with exit status 4; the outputs then end with the
    seconds it took to stop. Each process is the supervising parent plus the trainer child that
    `--coordinator_address` starts, in a session of its own."""
    port = free_port()
    # The restart loads the executables the first pair compiled (a persistent cache).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    logs = [workdir.parent / f"process{i}.{free_port()}.log" for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:  # files, not pipes: a full pipe would stall a collective
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "llmjax.main", "--config=tests/reliability_config.py",
                 f"--workdir={workdir}", f"--config.data.tokenizer={tokenizer_path}",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}", *extra], cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
    if after is not None:
        deadline = time.time() + 300
        while not any(line.startswith(after) for line in logs[0].read_text().splitlines()):
            assert time.time() < deadline and procs[0].poll() is None, logs[0].read_text()[-3000:]
            time.sleep(0.05)
        if action == "term":
            procs[victim].send_signal(signal.SIGTERM)  # the parent forwards it to the trainer
        else:
            os.killpg(procs[victim].pid, signal.SIGSTOP if action == "stop" else signal.SIGKILL)
    if action in ("stop", "kill"):
        stopped = time.time()
        survivor = procs[1 - victim]
        survivor.wait(timeout=300)
        took = time.time() - stopped
        os.killpg(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait()
        out = logs[1 - victim].read_text()
        assert survivor.returncode == 4, out[-3000:]  # multihost.EXIT_LOST_PROCESS
        return [log.read_text() for log in logs] + [took]
    for p in procs:
        p.wait(timeout=400)
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def reference_losses(tokenizer_path, total):
    """One process, 8 devices, the global batch assembled from both processes' shards in process
    order (process 0's rows first: its devices come first in the mesh)."""
    config = reliability_config.get_config()
    config.data.tokenizer, config.total_steps = str(tokenizer_path), total
    tokenizer = data_lib.Tokenizer.load(tokenizer_path)
    iters = [data_lib.make_train_iterator(config.data, tokenizer, seed=config.seed,
                                          seq_len=config.seq_len, batch_size=config.batch_size,
                                          process_index=i, process_count=2) for i in range(2)]
    mesh = sharding.make_mesh(config.mesh.shape)
    losses = []
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        state = built.init()
        for _ in range(total):
            parts = [next(it) for it in iters]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, m = built.train_step(state, sharding.global_batch(batch, built.batch_sharding))
            losses.append(float(m["loss"]))
    return losses


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume(devices, tokenizer_path, tmp_path):
    total = 30
    workdir = tmp_path / "run"
    timeout = 8  # --heartbeat_timeout: the watchdog's bound, short for the test
    extra = [f"--config.total_steps={total}", "--config.checkpoint_every_steps=1000",
             f"--heartbeat_timeout={timeout}"]
    first = launch_pair(workdir, tokenizer_path, extra, "step  2/", "term")
    assert "2 process(es)" in first[0]
    assert not [l for l in first[1].splitlines() if l.startswith(("mesh", "step"))]  # 0 prints
    preempted = [l for l in first[0].splitlines() if l.startswith("preempted")]
    assert len(preempted) == 1, first[0][-3000:]
    at = int(preempted[0].split(" at step ")[1].split(";")[0])
    assert 2 < at < total and sorted(os.listdir(workdir / "checkpoints")) == [str(at)]
    # A hung host: process 1 stops answering a few steps after the resume; process 0 ends within
    # the bound with one line and exit status 4, and nothing past step `at` is kept.
    out0, _, took = launch_pair(workdir, tokenizer_path, extra, f"step {at + 3:>2}/", "stop")
    assert f"resumed from step {at}" in out0
    last = out0.strip().splitlines()[-1]
    assert last.startswith("error: process 1 of 2 stopped answering for 8 s"), out0[-3000:]
    assert "Start every process again with the same command" in last
    assert took < timeout * 4 / 3 + 15, took  # the bound, plus slack for a loaded test machine
    # A host that dies, the coordinator's: JAX aborts process 1 at once; its parent says why in
    # one line (no C++ stack trace, no thread dump) and exits 4.
    _, out1, took_kill = launch_pair(workdir, tokenizer_path, extra, f"step {at + 2:>2}/", "kill",
                                     victim=0)
    tail = [l for l in out1.strip().splitlines() if not l.startswith(("step", "[Gloo]", "I1"))]
    assert tail[-1].startswith("error: process 1 lost the coordinator, process 0"), out1[-3000:]
    assert "Start every process again with the same command" in tail[-1]
    assert not [l for l in tail if "Fatal" in l or "stack trace" in l or l.startswith("F1")], tail
    assert took_kill < timeout * 4 / 3 + 15, took_kill
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(at)]
    second = launch_pair(workdir, tokenizer_path, extra)
    assert f"resumed from step {at}" in second[0]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(logged) == list(range(1, total + 1))
    expected = reference_losses(tokenizer_path, total)
    np.testing.assert_allclose([logged[s] for s in range(1, total + 1)], expected, rtol=2e-5)
    print(f"\n2 processes: process 0 stopped {took:.1f} s after process 1 hung, process 1 "
          f"{took_kill:.1f} s after process 0 was killed (bound {timeout * 4 / 3:.1f} s)")
    print(f"\n2 processes: SIGTERM to process 1 after step 2, both saved at step {at}; max relative "
          f"loss difference to 1 process x 8 devices over {total} steps: "
          f"{max(abs(logged[s] - e) / abs(e) for s, e in zip(range(1, total + 1), expected)):.1e}")
