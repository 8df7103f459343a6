"""Two processes on localhost (jax.distributed, 4 CPU devices each, gloo collectives) train,
checkpoint and resume together, each reading its own shard of the data; their losses equal one
process driving all 8 devices over the same global batches."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
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


def launch_pair(workdir, tokenizer_path, extra):
    port = free_port()
    # The restart loads the executables the first pair compiled (a persistent cache).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "llmjax.main", "--config=tests/reliability_config.py",
         f"--workdir={workdir}", f"--config.data.tokenizer={tokenizer_path}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out[-2000:], err[-4000:])
    return outs


def reference_losses(tokenizer_path, total):
    """One process, 8 devices, the global batch assembled from both processes' shards in process
    order (process 0's rows first: its devices come first in the mesh)."""
    config = reliability_config.get_config()
    config.data.tokenizer = str(tokenizer_path)
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
def test_two_processes_train_checkpoint_resume(devices, tmp_path):
    tokenizer_path = data_lib.load_or_train_tokenizer(
        reliability_config.get_config().data, 512, str(tmp_path / "tok")).path
    workdir = tmp_path / "run"
    first = launch_pair(workdir, tokenizer_path, ["--config.total_steps=4",
                                                  "--config.stop_at_step=2"])
    assert "2 process(es)" in first[0][0]
    assert not [l for l in first[1][0].splitlines() if l.startswith(("mesh", "step"))]  # 0 prints
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    second = launch_pair(workdir, tokenizer_path, ["--config.total_steps=4"])
    assert "resumed from step 2" in second[0][0]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(logged) == [1, 2, 3, 4]
    expected = reference_losses(tokenizer_path, 4)
    np.testing.assert_allclose([logged[s] for s in (1, 2, 3, 4)], expected, rtol=2e-5)
