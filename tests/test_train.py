"""The training loop end to end on the embedded corpus: resume, metrics, learning, entry points."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmjax.train import train_and_evaluate
from tests.helpers import tiny_config

ROOT = pathlib.Path(__file__).parent.parent


def loop_config(tokenizer_path, **overrides):
    c = tiny_config("llama", **{"model.vocab_size": 512, "data.tokenizer": str(tokenizer_path),
                                "total_steps": 6, "log_every_steps": 1, "eval_every_steps": 3,
                                "eval_steps": 2, "checkpoint_every_steps": 3,
                                "async_checkpointing": True, "sample.max_new_tokens": 0,
                                "batch_size": 8, "seq_len": 32, "model.max_len": 64,
                                "optim.schedule": "cosine", "optim.warmup_steps": 2, "mesh.shape": (-1, 1, 1),
                                **overrides})
    return c


def read_metrics(workdir):
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def final_params(workdir, step):
    with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


@pytest.mark.slow
def test_stopped_and_restarted_run_equals_uninterrupted(devices, tokenizer_path, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_and_evaluate(loop_config(tokenizer_path), str(straight))
    train_and_evaluate(loop_config(tokenizer_path, stop_at_step=3), str(resumed))
    assert sorted(os.listdir(resumed / "checkpoints")) == ["3"]
    train_and_evaluate(loop_config(tokenizer_path), str(resumed))

    losses = lambda w: [r["loss"] for r in read_metrics(w) if "loss" in r]
    assert losses(resumed) == losses(straight)  # same data order, same updates: bit for bit
    a, b = final_params(straight, 6), final_params(resumed, 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)

    # A resumed run with another model shape is refused in one line, and the checkpoints survive.
    with pytest.raises(ValueError, match="model.d_model=32 there but 64 now"):
        train_and_evaluate(loop_config(tokenizer_path, total_steps=9, **{"model.d_model": 64}),
                           str(resumed))
    assert sorted(os.listdir(resumed / "checkpoints")) == ["3", "6"]


@pytest.mark.slow
def test_metrics_and_learning(devices, tokenizer_path, tmp_path):
    config = loop_config(tokenizer_path, total_steps=80, eval_every_steps=80, log_every_steps=20,
                         checkpoint_every_steps=80, batch_size=16, **{
                             "optim.learning_rate": 1e-2, "optim.warmup_steps": 10,
                             "sample.max_new_tokens": 8})
    config.mesh.shape = (2, 2, 2)
    last = train_and_evaluate(config, str(tmp_path))
    records = read_metrics(tmp_path)
    baseline = records[0]["unigram_eval_loss"]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [20, 40, 60, 80]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu", "step_time_ms"):
        assert all(np.isfinite(r[key]) for r in train), key
    evals = [r for r in records if "eval_loss" in r]
    assert evals[-1]["eval_perplexity"] == pytest.approx(np.exp(evals[-1]["eval_loss"]), rel=1e-6)
    assert evals[-1]["eval_loss"] < baseline  # beats a model that only knows token frequencies
    assert isinstance(last["sample"], str) and last["sample"].startswith(config.sample.prompt)
    assert list((tmp_path / "tb").iterdir())  # TensorBoard events


def run_cli(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_describe_prints_one_json_line():
    out = run_cli("llmjax.describe", "--config=configs/gpt_small.py")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["params"] == 124_439_808
    assert info["non_embedding_params"] == 124_439_808 - 50257 * 768 - 1024 * 768
    assert info["flops_per_token"] > 6 * info["params"]


def test_benchmark_prints_its_figures(tmp_path):
    out = run_cli("llmjax.benchmark", "--config=configs/llama2_7b.py:runlocal", "--steps=2",
                  "--warmup=1", "--config.batch_size=8", "--config.seq_len=64",
                  "--config.mesh.shape=(2,2,2)", f"--profile={tmp_path}", "--profile_steps=2")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_sec", "mfu", "step_time_ms", "compile_s", "peak_memory_bytes_per_device"):
        assert result[key] > 0, key
    assert result["mesh"] == [2, 2, 2] and result["devices"] == 8
    # The per-operation profile: rows of ms per step, named by their source operations.
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if "XLA operations; the 25 costliest" in line)
    rows = [line.split() for line in lines[head + 2:head + 27]]
    assert all(float(r[0]) >= 0 and r[1].endswith("%") for r in rows), rows
    assert any("dot_general" in line for line in lines[head + 2:head + 27]), lines[head:head + 27]
    assert list(tmp_path.glob("plugins/profile/*/*.trace.json.gz"))
    bad = run_cli("llmjax.benchmark", "--config=configs/llama2_7b.py:runlocal", "--profile_steps=2")
    assert bad.returncode != 0 and "--profile_steps applies only with --profile" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["--config.not_a_key=1"], "not_a_key"),
    (["--config.total_steps=many"], "total_steps"),
    (["--config=configs/no_such_model.py"], "No such file"),
    (["--config.mesh.shape=(3,1,1)"], "mesh.shape (3, 1, 1) needs 3 devices but 8 are available"),
    (["--config.data.name=text", "--config.data.files=/nonexistent/*.txt"], "/nonexistent/*.txt"),
    (["--config.model.vocab_size=100"], "model.vocab_size"),
])
def test_bad_input_is_one_line(tokenizer_path, tmp_path, args, message):
    extra = [] if "vocab_size" not in args[0] else [f"--config.data.tokenizer={tokenizer_path}"]
    out = run_cli("llmjax.main", "--config=configs/gpt_small.py:runlocal", f"--workdir={tmp_path}",
                  *args, *extra)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow
def test_cli_relative_workdir_resumes_and_samples(tokenizer_path, tmp_path):
    """The README's way of running: a relative workdir, stopped and started again."""
    args = ["llmjax.main", f"--config={ROOT}/configs/gpt_small.py:runlocal", "--workdir=runs/rel",
            f"--config.data.tokenizer={tokenizer_path}", "--config.model.vocab_size=512",
            "--config.total_steps=4", "--config.log_every_steps=2", "--config.eval_steps=1",
            "--config.sample.max_new_tokens=4", "--config.mesh.shape=(-1,1,1)"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    run = lambda *extra: subprocess.run([sys.executable, "-m", *args, *extra], capture_output=True,
                                        text=True, cwd=tmp_path, env=env, timeout=300)
    first = run("--config.stop_at_step=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "runs/rel/checkpoints")) == ["2"]
    second = run()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2" in second.stdout
    assert "step 4/4" in second.stdout and "sample:" in second.stdout
    assert sorted(os.listdir(tmp_path / "runs/rel/checkpoints")) == ["2", "4"]


def test_model_check_allows_compute_keys_and_older_configs():
    from llmjax.checkpoint import check_same_model
    config = tiny_config()
    saved = {"model": {k: v for k, v in config.model.to_dict().items()
                       if k not in ("num_decoder_layers", "type_vocab_size")}}  # an older run's keys
    saved["model"].update(dtype="bfloat16", remat_policy="full", dropout_rate=0.1)
    check_same_model(saved, config, "here")  # compute-only changes and missing keys pass
    saved["model"]["d_model"] = 64
    with pytest.raises(ValueError, match=r"model.d_model=64 there but 32 now"):
        check_same_model(saved, config, "here")


def test_checkpoint_paths_without_a_checkpoint_or_config_are_one_line_errors(tmp_path):
    from llmjax.checkpoint import saved_config
    with pytest.raises(FileNotFoundError, match="no llmjax checkpoint under"):
        saved_config(str(tmp_path))
    (tmp_path / "checkpoints" / "3" / "state").mkdir(parents=True)  # a step without its config
    with pytest.raises(FileNotFoundError, match=r"checkpoints/3 has no saved config"):
        saved_config(str(tmp_path))
