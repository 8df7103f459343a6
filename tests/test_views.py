"""Views: llmjax.plot draws a real run's curves; the main job leaves WORKDIR/curves.png; the Colab
notebook (launch/colab.ipynb) executes top to bottom on the CPU; progress lines appear only for
slow phases."""

import importlib.util
import io
import json
import os
import pathlib
import re
import shutil
import sys
import time

import numpy as np
import pytest

from llmjax import plot, progress
from tests import reliability_config
from tests.helpers import apply_overrides

ROOT = pathlib.Path(__file__).parent.parent
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # tab10's first two colours: run 1 and run 2


def pixels_of(png: pathlib.Path, colour) -> int:
    from PIL import Image
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array(colour)).sum(-1) < 30).sum())


@pytest.fixture(scope="module")
def real_run(tokenizer_path, tmp_path_factory):
    """A seconds-long training run (tests/reliability_config.py: 6 steps, log every step)."""
    from llmjax.main import run
    workdir = tmp_path_factory.mktemp("run") / "tiny"
    config = apply_overrides(reliability_config.get_config(),
                             {"data.tokenizer": str(tokenizer_path)})
    run(config, str(workdir))
    return workdir


def test_the_main_job_writes_curves_png(real_run):
    png = real_run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pixels_of(png, BLUE) > 500  # the run's curves, in the first colour


def test_plot_reads_what_the_run_logged(real_run):
    records = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    series = plot.read_metrics(str(real_run))
    assert series["loss"] == ([r["step"] for r in records if "loss" in r],
                              [r["loss"] for r in records if "loss" in r])
    assert series["loss"][0] == [1, 2, 3, 4, 5, 6]
    assert series["eval_loss"][0] == [6]
    assert series["unigram_eval_loss"][0] == [0]
    assert len(series["learning_rate"][0]) == len(series["tokens_per_sec"][0]) == 6


def test_plot_cli_draws_several_runs_on_one_figure(real_run, tmp_path, capsys):
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(real_run / "metrics.jsonl", second / "metrics.jsonl")
    out = tmp_path / "figures" / "compare.png"
    plot.main(["--workdir", str(real_run), str(second), f"--out={out}"])
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Identical curves: the second run's colour is drawn over the first's, and both are in the
    # legend.
    assert pixels_of(out, ORANGE) > 500 and pixels_of(out, BLUE) > 20


def test_plot_keeps_the_last_value_of_a_relogged_step(tmp_path):
    lines = [{"step": 0, "unigram_eval_loss": 5.0}, {"step": 1, "loss": 9.0},
             {"step": 2, "loss": 8.0}, {"step": 1, "loss": 7.0}, {"step": 2, "loss": "nan"}]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"step": 3, "lo'  # a torn last line
    (tmp_path / "metrics.jsonl").write_text(text)
    series = plot.read_metrics(str(tmp_path))
    assert series["loss"][0] == [1, 2] and series["loss"][1][0] == 7.0
    assert np.isnan(series["loss"][1][1])
    assert series["unigram_eval_loss"] == ([0], [5.0])


@pytest.mark.parametrize("args, message", [
    (["--workdir=/nonexistent/run"], "/nonexistent/run does not exist"),
    (["--workdir={tmp}"], "has no metrics.jsonl"),
    (["--workdir={tmp}/a", "{tmp}/b"], "--out is required with several workdirs"),
    ([], "--workdir is required"),
])
def test_plot_bad_input_is_one_line(args, message, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        plot.main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_plot_refuses_an_empty_metrics_file(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "checkpoint_blocking_ms": 3.0}\n')
    with pytest.raises(SystemExit):
        plot.main([f"--workdir={tmp_path}", f"--out={tmp_path}/x.png"])
    assert "nothing to plot" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_progress_is_silent_for_quick_phases_and_ticks_for_slow_ones(monkeypatch):
    err = io.StringIO()  # progress goes to stdout: stderr is for errors, one line each
    monkeypatch.setattr(sys, "stdout", err)
    for _ in progress.bar(range(3), total=3, desc="quick", unit="doc"):
        pass
    with progress.ticker("compiling"):
        pass
    assert err.getvalue() == ""
    monkeypatch.setattr(progress, "DELAY_S", 0.2)
    monkeypatch.setattr(progress, "EVERY_S", 0.2)
    for _ in progress.bar(range(4), total=4, desc="slow", unit="doc"):
        time.sleep(0.15)
    with progress.ticker("compiling the train step"):
        time.sleep(0.5)
    text = err.getvalue()
    assert "slow: 100%" in text and "4/4" in text and "doc/s" in text
    ticks = re.findall(r"^still compiling the train step \((\d+) s\)$", text, re.M)
    assert 1 <= len(ticks) == text.count("still compiling")  # at 0.2 s, 0.4 s (later if busy)


@pytest.mark.slow
def test_the_colab_notebook_executes(tmp_path):
    """launch/colab.ipynb top to bottom in a python3 kernel on this interpreter, inside this
    checkout (no clone or install: LLMJAX_NOTEBOOK_PYTHON), gpt_small:runlocal for 4 steps."""
    import nbformat
    from nbclient import NotebookClient

    workdir = tmp_path / "run"
    env = dict(os.environ)
    # The kernel and the commands it starts see one CPU device, not the tests' 8 fake ones.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip()
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
        LLMJAX_NOTEBOOK_PYTHON=sys.executable,
        LLMJAX_NOTEBOOK_WORKDIR=str(workdir),
        LLMJAX_NOTEBOOK_STEPS="4",
        LLMJAX_NOTEBOOK_FLAGS="--config.log_every_steps=2 --config.eval_steps=2 "
                              "--config.sample.max_new_tokens=16",
    )
    nb = nbformat.read(ROOT / "launch" / "colab.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=240,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=env)

    def output_text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    code = [c for c in nb.cells if c.cell_type == "code"]
    train, = [c for c in code if "llmjax.main" in c.source]
    assert "over 1 cpu devices" in output_text(train)  # not the tests' 8 fake devices
    assert "step 4/4 | loss" in output_text(train) and "curves:" in output_text(train)
    plot_cell, = [c for c in code if "llmjax.plot" in c.source]
    assert any("image/png" in o.get("data", {}) for o in plot_cell.outputs)
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tb_cell, = [c for c in code if "tensorboard" in c.source]
    if importlib.util.find_spec("tensorboard") is None:
        assert "pip install tensorboard" in output_text(tb_cell)
    generate, = [c for c in code if "llmjax.generate" in c.source]
    sample = output_text(generate)
    assert sample.startswith("def ") and len(sample.strip()) > len("def"), sample
