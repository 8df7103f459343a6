"""Silent corruption and failing writes: checkpoint manifests (a flipped byte anywhere is found and
the previous step restored), `python -m llmjax.checkpoint verify`, a full disk during an async
save (the previous checkpoint stays, one line, non-zero exit) and metric writes that fail."""

import contextlib
import errno
import io
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmjax import checkpoint as ckpt_lib
from llmjax import metrics as metrics_lib
from llmjax.train import train_and_evaluate
from tests.test_reliability import (ROOT, cli_env, compilation_cache, losses_by_step,  # noqa: F401
                                    loop_config, main_command)


def flip(path: pathlib.Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def item_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in step_dir.rglob("*") if p.is_file() and p.parent != step_dir),
                  key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def saved_run(devices, tokenizer_path, tmp_path_factory):
    """A run stopped at step 4 (checkpoints 2 and 4, saved asynchronously) and its losses."""
    workdir = tmp_path_factory.mktemp("saved")
    train_and_evaluate(loop_config(tokenizer_path, stop_at_step=4), str(workdir))
    return workdir, losses_by_step(workdir)


def copy_of(saved_run, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(saved_run[0], workdir)
    return workdir


def test_every_step_has_a_manifest_that_matches(saved_run):
    workdir, _ = saved_run
    for step in ("2", "4"):
        step_dir = workdir / "checkpoints" / step
        assert (step_dir / "manifest.json").is_file()
        assert ckpt_lib.verify_step(step_dir) is True
        listed = set(ckpt_lib._files(ckpt_lib.epath.Path(step_dir)))
        assert listed == {str(p.relative_to(step_dir)) for p in item_files(step_dir)}


def test_flipped_byte_in_each_kind_of_file_is_detected(saved_run, tmp_path):
    """Each item file of a step (arrays, their metadata and sharding, the OCDBT manifests, the data
    iterator's position, the config, the loop counters, the commit markers), one flipped byte at a
    random place: verify names that file."""
    workdir = copy_of(saved_run, tmp_path)
    step_dir = workdir / "checkpoints/4"
    rng = np.random.default_rng(0)
    files = item_files(step_dir)
    kinds = {p.relative_to(step_dir).parts[0] for p in files}
    assert kinds == {"state", "data", "config", "loop"}, kinds
    for path in files:
        original = path.read_bytes()
        flip(path, int(rng.integers(len(original))))
        name = str(path.relative_to(step_dir))
        with pytest.raises(ckpt_lib.DamagedCheckpoint, match=f"^{name} differs"):
            ckpt_lib.verify_step(step_dir)
        path.write_bytes(original)
    assert ckpt_lib.verify_step(step_dir)


def test_detection_rate_over_random_positions(saved_run, tmp_path):
    """300 single-byte flips at uniformly random positions of the step's bytes: all detected."""
    workdir = copy_of(saved_run, tmp_path)
    step_dir = workdir / "checkpoints/4"
    files = item_files(step_dir)
    sizes = np.array([p.stat().st_size for p in files])
    rng = np.random.default_rng(1)
    detected = 0
    trials = 300
    for position in rng.integers(sizes.sum(), size=trials):
        i = int(np.searchsorted(np.cumsum(sizes), position, side="right"))
        offset = int(position - (np.cumsum(sizes)[i - 1] if i else 0))
        original = files[i].read_bytes()
        flip(files[i], offset)
        try:
            ckpt_lib.verify_step(step_dir)
        except ckpt_lib.DamagedCheckpoint:
            detected += 1
        files[i].write_bytes(original)
    print(f"\nflipped-byte detection: {detected}/{trials} over {len(files)} files "
          f"({sizes.sum()} bytes)")
    assert detected == trials


@pytest.mark.slow
def test_flipped_bytes_fall_back_to_the_previous_step(saved_run, tokenizer_path, tmp_path,
                                                      capsys):
    """The issue's case: one byte flipped in each of the three largest files of the newest
    checkpoint. `verify` names it; a restart sets it aside, resumes from step 2, and steps 3 and 4
    log exactly the losses the uninterrupted run logged."""
    workdir = copy_of(saved_run, tmp_path)
    first = saved_run[1]
    for path in item_files(workdir / "checkpoints/4")[-3:]:
        flip(path, path.stat().st_size // 2)

    out = subprocess.run([sys.executable, "-m", "llmjax.checkpoint", "verify",
                          f"--workdir={workdir}"], capture_output=True, text=True, cwd=ROOT,
                         env=cli_env(1), timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("step 2: ok (") and lines[1].startswith("step 4: DAMAGED: state/")
    assert len(lines) == 2 and out.stderr.strip().splitlines() == [
        f"error: 1 damaged step(s) in {workdir}; a run restores the newest good one and sets the "
        "damaged ones aside."]

    train_and_evaluate(loop_config(tokenizer_path), str(workdir))
    err = capsys.readouterr().err
    assert "checkpoints/4 is damaged (DamagedCheckpoint: state/" in err, err
    again = losses_by_step(workdir)
    assert again[3] == first[3] * 2 and again[4] == first[4] * 2, (again, first)
    assert sorted(os.listdir(workdir / "checkpoints_damaged")) == ["4"]
    assert ckpt_lib.verify(str(workdir), out=lambda line: None) == 0  # 2, 4 and 6 all whole


@pytest.mark.slow
def test_full_disk_during_async_save(devices, tokenizer_path, tmp_path):
    """ENOSPC from Orbax's writer while the async save of step 4 is written: the run stops with one
    line (exit 5) naming the path and the free space; step 2 stays whole; the next start removes
    the half-written step and goes on with the uninterrupted run's losses. Failing TensorBoard
    writes meanwhile only warn, once."""
    workdir = tmp_path / "full"
    hook = ("import errno, os, sys, orbax.checkpoint as ocp\n"
            "orig = ocp.JsonCheckpointHandler._save_fn\n"
            "async def full(self, x, directory):\n"
            "    if directory.parent.name.startswith('4'):\n"
            "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "    return await orig(self, x, directory)\n"
            "ocp.JsonCheckpointHandler._save_fn = full\n"
            "from absl import app\n"
            "from llmjax import cli, main\n"
            "app.run(main.main, flags_parser=cli.parse_flags)\n")
    command = main_command(workdir, tokenizer_path, [])
    out = subprocess.run([sys.executable, "-c", hook, *command[3:]], capture_output=True,
                         text=True, cwd=ROOT, env=cli_env(8), timeout=300)  # as this process
    assert out.returncode == 5, out.stderr[-3000:]
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert err[0].startswith(f"error: could not write checkpoint {workdir}/checkpoints/4 (No space "
                             "left on device; "), err[0]
    assert f"free on {workdir}/checkpoints); the previous checkpoint {workdir}/checkpoints/2 is " \
           "intact; free space" in err[0], err[0]
    print(f"\nENOSPC: {err[0]}")
    names = sorted(os.listdir(workdir / "checkpoints"))
    assert names[0] == "2" and len(names) == 2 and ".orbax-checkpoint-tmp" in names[1], names
    assert ckpt_lib.verify_step(workdir / "checkpoints/2")
    first = losses_by_step(workdir)
    assert sorted(first) == [1, 2, 3, 4, 5, 6]  # the loop went on until the error surfaced

    # The disk has room again, but TensorBoard's folder cannot be written: the run goes on.
    failing = pytest.MonkeyPatch()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    failing.setattr(metrics_lib.MetricWriter, "_write_tb", no_space)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            train_and_evaluate(loop_config(tokenizer_path), str(workdir))
    finally:
        failing.undo()
    warnings = [line for line in stderr.getvalue().splitlines() if "cannot write" in line]
    assert warnings == [f"warning: cannot write {workdir}/tb (No space left on device); training "
                        "goes on, this is reported once."], stderr.getvalue()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]  # the tmp one is gone
    again = losses_by_step(workdir)
    for step in (3, 4, 5, 6):
        assert again[step] == first[step] * 2, (step, again, first)


def test_metrics_file_that_cannot_be_written_warns_once(tmp_path, monkeypatch, capsys):
    writer = metrics_lib.MetricWriter(str(tmp_path))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(writer, "_write_line", no_space)
    for step in range(3):
        writer.write(step, {"loss": 1.0})
    writer.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: cannot write {tmp_path}/metrics.jsonl (No space left on device); "
                   "training goes on, this is reported once."]
