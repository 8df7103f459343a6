"""Tiny models, configs and batches for the encoder and encoder-decoder tests."""

import importlib.util
import pathlib

import jax
import numpy as np
from flax import nnx

from llmjax import steps

from llmjax.config import base_config
from llmjax.models import ModelConfig, build_model, presets
from tests.helpers import apply_overrides

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=32,
            dropout_rate=0.0)
STYLES = {"bert": presets.BERT_STYLE, "roberta": presets.ROBERTA_STYLE, "t5": presets.T5_STYLE,
          "t5_v1_1": presets.T5_V1_1_STYLE, "bart": presets.BART_STYLE}


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_model_cfg(style, **overrides):
    kw = {**STYLES[style], **TINY, **overrides}
    if kw["family"] == "encoder_decoder":
        kw.setdefault("num_decoder_layers", 3)  # unequal depths catch a mixed-up stack
    return ModelConfig(**kw)


def make(cfg, seed=0):
    """(model, params): created under jit (eager creation of the scanned stacks is slow), with
    random rather than zero biases and norm offsets so that the reference checks them too."""
    graphdef, abstract = steps.abstract_model(cfg)

    @jax.jit
    def init():
        with nnx.use_eager_sharding(False):
            return nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(seed)), nnx.Param))

    rng = np.random.default_rng(seed + 1)
    params = jax.tree.map(
        lambda a: (rng.normal(0, 0.5, a.shape).astype(np.float32)
                   if a.ndim <= 2 and not np.any(np.asarray(a)) else np.asarray(a)), init())
    state = abstract
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), params


def jitted(model, method="__call__", **static):
    """model.method as one jitted function of its array arguments."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, *args, **kwargs):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs, **static)

    return lambda *args, **kwargs: np.asarray(run(state, *args, **kwargs))


def tiny_train_config(style, **overrides):
    """A train config for the tiny model of `style` with its family's objective."""
    c = base_config()
    m = dict(STYLES[style], **TINY)
    if m["family"] == "encoder_decoder":
        m["num_decoder_layers"] = 3
    c.model.update(m)
    c.seq_len, c.batch_size, c.total_steps = 16, 16, 4
    c.optim.update(learning_rate=1e-2, warmup_steps=0, no_decay=presets.NO_DECAY)
    c.mesh.shape = (1, 1, 1)
    c.data.objective = "mlm" if m["family"] == "encoder" else "span_corruption"
    c.data.num_sentinels = 8
    c.sample.max_new_tokens = 0
    return apply_overrides(c, overrides)


def synthetic_batch(config, shapes, seed=0):
    """Random tokens, a padded tail, every other target scored; shapes from steps.batch_shapes."""
    rng = np.random.default_rng(seed)
    vocab = config.model.vocab_size
    out = {}
    for prefix in ("", "decoder_"):
        key = "inputs" if not prefix else "decoder_inputs"
        if key not in shapes:
            continue
        b, t = shapes[key]
        lengths = rng.integers(t // 2, t + 1, b)
        seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
        out[key] = rng.integers(4, vocab, (b, t)).astype(np.int32)
        out[prefix + "segment_ids"] = seg
        out[prefix + "positions"] = np.where(seg != 0, np.arange(t)[None], 0).astype(np.int32)
    b, t = shapes["targets"]
    dec_seg = out["decoder_segment_ids" if "decoder_inputs" in shapes else "segment_ids"]
    out["targets"] = rng.integers(4, vocab, (b, t)).astype(np.int32)
    out["weights"] = (dec_seg * rng.integers(0, 2, (b, t))).astype(np.int32)
    return out
