"""The PyTorch reference of `python -m llmjax.benchmark --compare=torch` (benchmarks/torch_gpt.py)
is the same workload as llmjax's GPT-2 step: the same parameter count, and from llmjax's initial
parameters the same losses and gradient norms, step after step (so the same architecture, loss,
clipping and AdamW). Tests never assert a time."""

import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llmjax import benchmark, steps  # noqa: E402
from llmjax.config import GPT2_STYLE, LLAMA_STYLE, base_config  # noqa: E402
from llmjax.models import ModelConfig  # noqa: E402

torch_gpt = benchmark.load_torch_reference()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Micro shapes: PyTorch's threads only spin against XLA's on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def micro_config(**model):
    c = base_config()
    c.model.update(**GPT2_STYLE)
    c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_dim=128, max_len=16,
                   **model)
    c.seq_len, c.batch_size, c.total_steps = 16, 8, 10
    # A constant 1e-2 from the first update, so every step moves the parameters visibly.
    c.optim.update(learning_rate=1e-2, warmup_steps=0, schedule="constant")
    return c


@pytest.fixture(scope="module")
def float32_step():
    """llmjax's compiled float32 step for micro_config() on one device (compiling is most of
    this module's time)."""
    return benchmark.LlmjaxStep(micro_config(), jax.devices()[:1])


@pytest.mark.parametrize("shape", [
    dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_dim=128, max_len=16),
    dict(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, max_len=256),
    dict(vocab_size=50257, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, max_len=1024),
], ids=["micro", "bench_tiny", "gpt2_small"])
def test_same_parameter_count(shape):
    expected = steps.count_params(ModelConfig(**GPT2_STYLE, **shape))["params"]
    with torch.device("meta"):  # shapes only, no memory
        model = torch_gpt.GPT(shape["d_model"], shape["num_layers"], shape["num_heads"],
                              shape["mlp_dim"], shape["vocab_size"], shape["max_len"])
    assert sum(p.numel() for p in model.parameters()) == expected
    if shape["d_model"] == 768:
        assert expected == 124_439_808  # GPT-2 small, as published


# Measured: float32 agrees to ~3e-7; bfloat16 (autocast vs llmjax's bf16 compute) to ~4e-5 in
# the loss and ~5e-3 in the gradient norm.
@pytest.mark.parametrize("dtype,loss_rtol,norm_rtol", [("float32", 1e-5, 1e-5),
                                                       ("bfloat16", 1e-3, 2e-2)])
def test_same_steps_from_llmjax_params(dtype, loss_rtol, norm_rtol, float32_step):
    """llmjax's initial parameters in the torch model: three train steps give the same loss and
    pre-clip gradient norm (steps 2 and 3 after clipped AdamW updates with weight decay)."""
    config = micro_config(dtype=dtype)
    if dtype == "float32":
        ours = float32_step
        ours.state = ours.built.init()  # fresh parameters and optimizer state
    else:
        ours = benchmark.LlmjaxStep(config, jax.devices()[:1])
    params = jax.tree.map(np.asarray, ours.state["params"])
    ref = torch_gpt.TorchGPT(**benchmark.torch_reference_kwargs(config), device="cpu")
    ref.load_llmjax_params(params)
    ref.set_batch(ours.local["inputs"], ours.local["targets"])
    for step in range(3):
        ours.state, m = ours.compiled(ours.state, ours.batch)
        loss, grad_norm = ref.step()
        np.testing.assert_allclose(loss.item(), float(m["loss"]), rtol=loss_rtol,
                                   err_msg=f"step {step}")
        np.testing.assert_allclose(grad_norm.item(), float(m["grad_norm"]), rtol=norm_rtol,
                                   err_msg=f"step {step}")
    if dtype == "float32":
        assert float(m["grad_norm"]) > 1.0  # clipping was exercised


def test_compare_runs_and_returns_ratios(float32_step, monkeypatch):
    config = micro_config()
    # The llmjax step compiled once for the module (compare() builds its own otherwise).
    monkeypatch.setattr(benchmark, "LlmjaxStep", lambda config, devices=None: float32_step)
    r = benchmark.compare(config, steps=1, warmup=1, rounds=1, torch_modes=["eager"])
    assert set(r["engines"]) == {"llmjax", "torch eager"}
    assert r["ratios"]["eager"] > 0
    assert r["params"] == steps.count_params(ModelConfig.from_config(config.model))["params"]
    assert len(r["engines"]["llmjax"]["tokens_per_sec_rounds"]) == 1


@pytest.mark.parametrize("change,match", [
    (lambda c: c.model.update(**LLAMA_STYLE), "GPT-2-style decoders only.*model.position"),
    (lambda c: c.model.update(dropout_rate=0.1), "dropout_rate"),
    (lambda c: c.optim.update(name="adafactor"), "adafactor"),
    (lambda c: c.update(microbatches=2), "microbatches"),
    (lambda c: c.mesh.update(shape=(2, 1, 1)), "one device"),
])
def test_compare_refuses_what_the_reference_cannot_reproduce(change, match):
    config = micro_config()
    change(config)
    with pytest.raises(ValueError, match=match):
        benchmark.compare(config, steps=1, warmup=0, rounds=1)


def test_compare_without_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ValueError, match=r"pip install -e '\.\[test\]'"):
        benchmark.load_torch_reference()
