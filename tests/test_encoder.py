"""The encoder family (BERT, RoBERTa): published sizes, numerics against a numpy reference,
padding independence, loss only on scored positions, 8 devices = 1 device, config errors."""

import jax
import numpy as np
import pytest

from llmjax import sharding, steps
from llmjax.models import ModelConfig

import family_helpers as fh
import model_reference

PUBLISHED = {  # Hugging Face's base models (BertModel / RobertaModel with the pooler)
    "bert_base": 109_482_240,
    "bert_large": 335_141_888,
    "roberta_base": 124_645_632,
    "roberta_large": 355_359_744,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    counts = steps.count_params(ModelConfig.from_config(fh.load_config(name).model))
    assert counts["backbone_params"] == PUBLISHED[name]
    d, v = fh.load_config(name).model.d_model, fh.load_config(name).model.vocab_size
    # The MLM head (transform, LayerNorm, output bias) is all that params adds.
    assert counts["params"] - counts["backbone_params"] == d * d + d + 2 * d + v


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_runlocal_keeps_architecture(name):
    full, local = fh.load_config(name).model, fh.load_config(name, "runlocal").model
    for key in ("family", "position", "norm", "activation", "use_bias", "tie_embeddings",
                "post_norm", "type_vocab_size", "position_offset", "pooler"):
        assert full[key] == local[key], key
    assert steps.count_params(ModelConfig.from_config(local))["params"] < 3_000_000


def test_matches_numpy_reference():
    # RoBERTa's offset positions with BERT's two token types: every encoder feature in one model.
    cfg = fh.tiny_model_cfg("roberta", type_vocab_size=2)
    model, params = fh.make(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 5, [1] * 12], np.int32)  # two packed documents in row 0
    pos = np.array([list(range(7)) + list(range(5)), list(range(12))], np.int32)
    got = fh.jitted(model)(tokens, seg, pos)
    for i in range(2):
        want = model_reference.encoder_logits(params, cfg, tokens[i], seg[i], pos[i])
        np.testing.assert_allclose(got[i], want, atol=2e-4, rtol=2e-4)


def test_output_at_a_position_does_not_depend_on_padding():
    cfg = fh.tiny_model_cfg("bert")
    model, _ = fh.make(cfg)
    rng = np.random.default_rng(1)
    tokens = np.repeat(rng.integers(4, cfg.vocab_size, (1, 16)), 2, 0).astype(np.int32)
    seg = np.array([[1] * 10 + [0] * 6] * 2, np.int32)
    pos = np.where(seg != 0, np.arange(16), 0).astype(np.int32)
    tokens[1, 10:] = (tokens[1, 10:] + 7) % cfg.vocab_size  # other tokens under the padding
    encode = fh.jitted(model, "encode")
    out = encode(tokens, seg, pos)
    np.testing.assert_allclose(out[0, :10], out[1, :10], atol=1e-5)
    # And more padding (a longer row) changes nothing either.
    long = np.concatenate([tokens[:1], rng.integers(4, 64, (1, 8))], 1).astype(np.int32)
    long_seg = np.concatenate([seg[:1], np.zeros((1, 8), np.int32)], 1)
    long_pos = np.where(long_seg != 0, np.arange(24), 0).astype(np.int32)
    out_long = encode(long, long_seg, long_pos)
    np.testing.assert_allclose(out_long[0, :10], out[0, :10], atol=1e-5)


def run_steps(config, mesh_shape, batch, train_steps=2, evaluate=True):
    """Losses of `train_steps` train steps from init, then the eval sums, on a mesh of that shape."""
    config.mesh.shape = mesh_shape
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        state = built.init()
        global_batch = sharding.global_batch(batch, built.batch_sharding)
        losses = []
        for _ in range(train_steps):
            state, metrics = built.train_step(state, global_batch)
            losses.append(float(metrics["loss"]))
        ev = jax.device_get(built.eval_step(state["params"], global_batch)) if evaluate else None
    return losses, ev


def test_loss_only_on_scored_positions():
    config = fh.tiny_train_config("bert")
    batch = fh.synthetic_batch(config, steps.batch_shapes(config))
    other = dict(batch, targets=np.where(batch["weights"] == 0, 3, batch["targets"]).astype(np.int32))
    _, ev = run_steps(config, (1, 1, 1), batch, train_steps=0)
    _, ev_other = run_steps(config, (1, 1, 1), other, train_steps=0)
    assert ev["count"] == batch["weights"].sum()
    np.testing.assert_allclose(ev["loss_sum"], ev_other["loss_sum"], rtol=1e-6)


def test_eight_devices_give_the_same_losses(devices):
    config = fh.tiny_train_config("bert")
    batch = fh.synthetic_batch(config, steps.batch_shapes(config))
    one, _ = run_steps(config, (1, 1, 1), batch, evaluate=False)
    eight, _ = run_steps(fh.tiny_train_config("bert"), (2, 2, 2), batch, evaluate=False)
    np.testing.assert_allclose(one, eight, rtol=2e-5)
    assert one[1] < one[0]


def test_mixed_family_config_is_one_line_error():
    with pytest.raises(ValueError, match=r"model.pooler=True belongs to the encoder family") as e:
        ModelConfig(**fh.TINY, pooler=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="num_decoder_layers"):
        fh.tiny_model_cfg("bert", num_decoder_layers=2)
    with pytest.raises(ValueError, match="'learned' or 'relative'"):
        fh.tiny_model_cfg("bert", position="rope")
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    for override, message in (({"data.objective": "span_corruption"}, "data.objective"),):
        config = fh.tiny_train_config("bert", **override)
        with pytest.raises(ValueError, match=message):
            steps.validate(config, mesh, ModelConfig.from_config(config.model))
