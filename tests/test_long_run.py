"""Host memory stays flat over a long run: no growth from metrics, iterators, async saves, evals
or compiled-function caches. The run logs its resident memory (`host_rss_mib` in metrics.jsonl);
this trains the tiny reliability config for a few hundred steps with frequent logs, evals and
async checkpoints, in its own process, and bounds the growth after warm-up."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
STEPS, WARM = 400, 100
BOUND_MIB = 32  # measured: 6.8 MiB from step 100 to 400, 9 from 150 to 600 (docs/reliability.md)


@pytest.mark.slow
def test_host_memory_stays_flat(tokenizer_path, tmp_path):
    workdir = tmp_path / "long"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "llmjax.main", "--config=tests/reliability_config.py",
         f"--workdir={workdir}", f"--config.data.tokenizer={tokenizer_path}",
         f"--config.total_steps={STEPS}", "--config.log_every_steps=10",
         "--config.eval_every_steps=50", "--config.checkpoint_every_steps=25",
         "--config.max_to_keep=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rss = {r["step"]: r["host_rss_mib"] for r in records if "host_rss_mib" in r}
    assert sorted(rss) == list(range(10, STEPS + 1, 10))
    growth = max(v for s, v in rss.items() if s >= WARM) - rss[WARM]
    print(f"\nhost RSS: {rss[10]:.0f} MiB at step 10, {rss[WARM]:.0f} at {WARM}, "
          f"{rss[STEPS]:.0f} at {STEPS}; largest growth after step {WARM}: {growth:.1f} MiB")
    assert growth < BOUND_MIB, rss
