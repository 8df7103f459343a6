"""Reliability by killing runs: exact resume after SIGKILL (also during an async save), SIGTERM
preemption, damaged checkpoints, non-finite steps, resume on another mesh or device count."""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from llmjax import sharding, steps
from llmjax.train import NonFiniteError, train_and_evaluate
from tests import reliability_config
from tests.helpers import apply_overrides, synthetic_batches, tiny_config

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module's runs and subprocesses: each restart of
    the same config then loads its executables instead of compiling them again."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = [getattr(jax.config, key) for key in keys]
    jax_cache.reset_cache()
    jax.config.update(keys[0], path)
    jax.config.update(keys[1], 0)
    yield path
    for key, value in zip(keys, before):
        jax.config.update(key, value)
    jax_cache.reset_cache()


def loop_config(tokenizer_path, **overrides):
    c = reliability_config.get_config()
    c.data.tokenizer = str(tokenizer_path)
    return apply_overrides(c, overrides)


def read_metrics(workdir):
    return [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]


def losses_by_step(workdir) -> dict[int, list[float]]:
    """Every logged loss per step: a step re-run after a restart is logged again."""
    out = {}
    for r in read_metrics(workdir):
        if "loss" in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def saved_params(workdir, step):
    with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as mngr:
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def tree_files(path) -> dict:
    """What a workdir holds (names and contents): to show that a failed start changed nothing."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
            else "dir" for p in sorted(pathlib.Path(path).rglob("*"))}


# ------------------------------------------------------------------------------------------------
# Non-finite losses and gradients.

def test_nonfinite_step_is_a_no_op(devices):
    """A NaN loss (token ids outside the vocabulary read NaN rows of the embedding) is caught in
    the jitted step: parameters and optimizer state come back bit for bit, only the step advances.
    Training on a good batch afterwards gives exactly what it gives without the bad step."""
    config = tiny_config(**{"optim.warmup_steps": 0})  # one device: the select is per element
    mesh = sharding.make_mesh(config.mesh.shape, jax.devices()[:1])
    good, = synthetic_batches(config, 1)
    bad = dict(good, inputs=np.full_like(good["inputs"], config.model.vocab_size))
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        put = lambda b: sharding.global_batch(b, built.batch_sharding)
        state = built.init()
        before = jax.device_get(state)
        state, m = built.train_step(state, put(bad))
        assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
        after = jax.device_get(state)
        assert int(after["step"]) == 1
        jax.tree.map(np.testing.assert_array_equal,
                     (before["params"], before["opt_state"]), (after["params"], after["opt_state"]))
        state, m = built.train_step(state, put(good))
        assert int(m["nonfinite"]) == 0 and np.isfinite(float(m["loss"]))
        direct, m_direct = built.train_step(built.init(), put(good))
        assert float(m["loss"]) == float(m_direct["loss"])
        # The skipped step did not move the schedule: the good step ran at the first step's rate.
        assert float(m["learning_rate"]) == float(m_direct["learning_rate"])
        assert float(m_direct["learning_rate"]) != float(built.schedule(1))
        jax.tree.map(np.testing.assert_array_equal,
                     jax.device_get((state["params"], state["opt_state"])),
                     jax.device_get((direct["params"], direct["opt_state"])))
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before["params"],
                               jax.device_get(state["params"]))
        assert all(jax.tree.leaves(changed))  # the good step did train


def test_nonfinite_stop_names_step_and_checkpoint(devices, tokenizer_path, tmp_path):
    with pytest.raises(NonFiniteError, match=r"at step 5 .*last good checkpoint is .*checkpoints/4;"):
        train_and_evaluate(loop_config(tokenizer_path, fault_nonfinite_steps=(5,)), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing saved past it


def test_nonfinite_skip_counts_and_survives_restart(devices, tokenizer_path, tmp_path):
    config = lambda **kw: loop_config(tokenizer_path, nonfinite="skip", fault_nonfinite_steps=(2, 3),
                                      **kw)
    train_and_evaluate(config(stop_at_step=4), str(tmp_path))
    last = train_and_evaluate(config(), str(tmp_path))
    skipped = {r["step"]: r["skipped_steps"] for r in read_metrics(tmp_path) if "loss" in r}
    assert skipped == {1: 0, 2: 1, 3: 2, 4: 2, 5: 2, 6: 2}  # the count came back from step 4
    assert last["skipped_steps"] == 2 and np.isfinite(last["loss"])


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints.

def damage(step_dir):
    """Truncates the largest array file of a checkpoint, as a full disk or a torn copy would."""
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back(devices, tokenizer_path, tmp_path, capsys):
    train_and_evaluate(loop_config(tokenizer_path, stop_at_step=4), str(tmp_path))
    first = losses_by_step(tmp_path)
    damage(tmp_path / "checkpoints/4")
    train_and_evaluate(loop_config(tokenizer_path), str(tmp_path))
    err = capsys.readouterr().err
    assert "checkpoints/4 is damaged" in err and "trying the previous one" in err
    # Resumed from step 2: steps 3 and 4 ran again with exactly the same losses.
    again = losses_by_step(tmp_path)
    assert again[3] == first[3] * 2 and again[4] == first[4] * 2 and sorted(again) == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6"]
    assert os.listdir(tmp_path / "checkpoints_damaged") == ["4"]  # set aside, not deleted

    # No readable checkpoint at all: refuse, and leave the workdir as it is.
    for step in ("2", "4", "6"):
        damage(tmp_path / "checkpoints" / step)
    before = tree_files(tmp_path)
    with pytest.raises(ValueError, match=r"no usable checkpoint .*steps \[2, 4, 6\] cannot be read.*allow_fresh_start=True"):
        train_and_evaluate(loop_config(tokenizer_path, total_steps=8), str(tmp_path))
    after = tree_files(tmp_path)
    assert after == before, {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    # Told to, it sets them aside and starts again from step 0 (the same run: same losses).
    train_and_evaluate(loop_config(tokenizer_path, stop_at_step=2, allow_fresh_start=True),
                       str(tmp_path))
    assert losses_by_step(tmp_path)[1] == first[1] * 2
    assert sorted(os.listdir(tmp_path / "checkpoints_damaged")) == ["2", "4", "4.1", "6"]


# ------------------------------------------------------------------------------------------------
# Resume on another mesh or device count.

@pytest.mark.slow
def test_resume_on_other_meshes_and_device_counts(devices, tokenizer_path, tmp_path):
    """Saved at step 2 on (2,2,2); steps 3-4 on (8,1,1), (1,1,8) and on 4 devices as (2,1,2) give
    the losses the (2,2,2) run itself went on to log."""
    saved = tmp_path / "saved"
    train_and_evaluate(loop_config(tokenizer_path, total_steps=4, **{"mesh.shape": (2, 2, 2)}),
                       str(saved))
    reference = [losses_by_step(saved)[s][0] for s in (3, 4)]
    shutil.rmtree(saved / "checkpoints/4")  # continue from step 2

    def continue_in(name):
        workdir = tmp_path / name
        shutil.copytree(saved, workdir)
        return workdir

    losses = {}
    for shape in ((8, 1, 1), (1, 1, 8)):
        workdir = continue_in("x".join(map(str, shape)))
        train_and_evaluate(loop_config(tokenizer_path, total_steps=4, **{"mesh.shape": shape}),
                           str(workdir))
        losses[shape] = [losses_by_step(workdir)[s][-1] for s in (3, 4)]
    # Another device count needs another process (JAX fixes it at start-up).
    workdir = continue_in("4dev")
    out = run_main(workdir, tokenizer_path, ["--config.total_steps=4", "--config.mesh.shape=(2,1,2)"],
                   devices=4)
    assert out.returncode == 0 and "resumed from step 2" in out.stdout, out.stderr[-3000:]
    losses["4 devices (2,1,2)"] = [losses_by_step(workdir)[s][-1] for s in (3, 4)]
    for key, value in losses.items():
        np.testing.assert_allclose(value, reference, rtol=2e-5, err_msg=str(key))
    print(f"\nresume on other meshes: reference {reference}, " + ", ".join(
        f"{k}: max rel diff {max(abs(a - b) / abs(b) for a, b in zip(v, reference)):.1e}"
        for k, v in losses.items()))


# ------------------------------------------------------------------------------------------------
# Killing real runs: SIGKILL at random steps and during an async save, SIGTERM preemption.

CLI_ARGS = ["--config=tests/reliability_config.py"]


def cli_env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def main_command(workdir, tokenizer_path, extra):
    return [sys.executable, "-m", "llmjax.main", *CLI_ARGS, f"--workdir={workdir}",
            f"--config.data.tokenizer={tokenizer_path}", *extra]


def run_main(workdir, tokenizer_path, extra, devices=2):
    return subprocess.run(main_command(workdir, tokenizer_path, extra), capture_output=True,
                          text=True, cwd=ROOT, env=cli_env(devices), timeout=300)


def run_until(workdir, tokenizer_path, extra, trigger: str, sig: int):
    """Starts the run, sends `sig` as soon as a stdout line starts with `trigger`; returns
    (return code, stdout, whether an unfinished save was on disk right after the kill)."""
    proc = subprocess.Popen(main_command(workdir, tokenizer_path, extra), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=cli_env(2))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(trigger):
            proc.send_signal(sig)
            break
    in_save = any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").iterdir())
    lines += proc.stdout.readlines()
    return proc.wait(timeout=300), "".join(lines), in_save


def resumed_from(stdout: str) -> int:
    lines = [line for line in stdout.splitlines() if line.startswith("resumed from step ")]
    return int(lines[0].split()[-1]) if lines else 0


@pytest.mark.slow
def test_killed_runs_resume_bit_for_bit(tokenizer_path, tmp_path):
    total = 20
    rng = np.random.default_rng(int(os.environ.get("LLMJAX_FAULT_SEED", "0")))
    # Dropout on: its keys must come back too. Checkpoints every 4 steps.
    extra = [f"--config.total_steps={total}", "--config.model.dropout_rate=0.1",
             "--config.checkpoint_every_steps=4"]
    straight = tmp_path / "straight"
    out = run_main(straight, tokenizer_path, extra)
    assert out.returncode == 0, out.stderr[-3000:]
    reference = {s: v[0] for s, v in losses_by_step(straight).items()}
    assert sorted(reference) == list(range(1, total + 1))

    workdir = tmp_path / "killed"
    # 1. SIGKILL mid-run at a random step after the save of step 8 began.
    k1 = int(rng.integers(9, 12))
    rc, _, _ = run_until(workdir, tokenizer_path, extra, f"step {k1:2d}/", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    # 2. SIGKILL while an async save is being written (right after the loop hands it off).
    k2 = 4 * int(rng.integers(3, 5))  # 12 or 16
    rc, stdout, in_save = run_until(workdir, tokenizer_path, extra,
                                    f"step {k2}: checkpoint saving", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    # (From step 8, or from 4 when the kill came before the save of step 8 had finished.)
    resumed = [resumed_from(stdout)]
    # 3. SIGTERM (preemption) at a random step: saves at that step boundary and exits 0.
    k3 = int(rng.integers(k2 + 1, total - 1))
    rc, stdout, _ = run_until(workdir, tokenizer_path, extra, f"step {k3:2d}/", signal.SIGTERM)
    assert rc == 0, stdout[-3000:]
    resumed.append(resumed_from(stdout))
    preempted = [line for line in stdout.splitlines() if line.startswith("preempted")]
    assert len(preempted) == 1, stdout[-3000:]
    at = int(preempted[0].split(" at step ")[1].split(";")[0])
    assert at >= k3 and (workdir / "checkpoints" / str(at)).is_dir()
    # 4. The same command once more finishes the run.
    out = run_main(workdir, tokenizer_path, extra)
    assert out.returncode == 0 and resumed_from(out.stdout) == at, out.stderr[-3000:]

    # Every loss ever logged, including the steps re-run after each kill, is the uninterrupted
    # run's loss bit for bit (JSON keeps a float64 exactly).
    logged = losses_by_step(workdir)
    assert sorted(logged) == list(range(1, total + 1))
    mismatched = {s: v for s, v in logged.items() if any(x != reference[s] for x in v)}
    assert not mismatched, (mismatched, reference)
    jax.tree.map(np.testing.assert_array_equal, saved_params(straight, total),
                 saved_params(workdir, total))
    print(f"\nkill points: SIGKILL at step {k1}, SIGKILL during the async save of step {k2} "
          f"(unfinished save on disk: {in_save}), SIGTERM at step {k3} (saved at {at}); "
          f"restarts resumed from steps {resumed + [at]}; "
          f"{sum(len(v) for v in logged.values())} logged losses, all bit-identical")
