"""The encoder-decoder family (T5 v1.0/v1.1, BART): published sizes, numerics against a numpy
reference, T5's relative buckets, a causal decoder whose cross-attention ignores encoder padding,
8 devices = 1 device."""

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import steps
from llmjax.models import ModelConfig
from llmjax.models.layers import relative_position_bucket

import family_helpers as fh
import model_reference
from test_encoder import run_steps

PUBLISHED = {  # Hugging Face's T5ForConditionalGeneration / BartModel
    "t5_small": 60_506_624,
    "t5_base": 222_903_552,
    "t5_large": 737_668_096,
    "t5_v1_1_base": 247_577_856,
    "bart_base": 139_420_416,
    "bart_large": 406_291_456,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    model = fh.load_config(name).model
    counts = steps.count_params(ModelConfig.from_config(model))
    assert counts["backbone_params"] == PUBLISHED[name]
    # BART's final logits bias is the only pretraining-only parameter.
    assert counts["params"] - counts["backbone_params"] == (
        model.vocab_size if model.final_logits_bias else 0)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_runlocal_keeps_architecture(name):
    full, local = fh.load_config(name).model, fh.load_config(name, "runlocal").model
    for key in ("family", "position", "norm", "activation", "use_bias", "tie_embeddings",
                "post_norm", "position_offset", "scale_attention", "scale_decoder_output",
                "final_logits_bias", "init"):
        assert full[key] == local[key], key
    assert steps.count_params(ModelConfig.from_config(local))["params"] < 3_000_000


def test_relative_position_buckets_match_t5():
    rel = np.arange(-300, 301)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (8, 20)):
            got = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                           num_buckets=num_buckets, max_distance=max_distance)
            want = [model_reference.t5_bucket(int(r), bidirectional, num_buckets, max_distance)
                    for r in rel]
            np.testing.assert_array_equal(np.asarray(got), want)
    # Known values: exact up to 7 each way, logarithmic up to 128, then the last bucket.
    assert [model_reference.t5_bucket(r, True, 32, 128) for r in (0, -1, 1, -8, 8, -127, -500)] == [
        0, 1, 17, 8, 24, 15, 15]


@pytest.mark.parametrize("style", ["t5", "t5_v1_1"])
def test_t5_starts_from_t5x_initialisers(style):
    """Fan-in scaling with head_dim**-0.5 folded into the query and N(0, 1) token embeddings (with
    0.02 everywhere the tiny T5 learned nothing of the shipped seq2seq task: docs/finetuning.md)."""
    cfg = fh.tiny_model_cfg(style, d_model=64, num_heads=4, mlp_dim=256, vocab_size=256)
    _, params = fh.make(cfg)
    d, f, hd = cfg.d_model, cfg.mlp_dim, cfg.head_dim
    want = {("token_embed", "embedding"): 1.0,
            ("encoder", "layers", "attn", "query", "kernel"): (d * hd) ** -0.5,
            ("decoder", "layers", "cross_attn", "key", "kernel"): d ** -0.5,
            ("encoder", "layers", "attn", "out", "kernel"): (cfg.num_heads * hd) ** -0.5,
            ("decoder", "layers", "mlp", "wi", "kernel"): d ** -0.5,
            ("encoder", "layers", "mlp", "wo", "kernel"): f ** -0.5}
    if style == "t5_v1_1":
        want[("decoder", "layers", "mlp", "wi_gate", "kernel")] = d ** -0.5
        want[("lm_head", "kernel")] = d ** -0.5
    for path, std in want.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert abs(np.std(leaf) / std - 1) < 0.1, (path, np.std(leaf), std)
    # A BART (init 'normal') keeps init_std everywhere.
    _, bart = fh.make(fh.tiny_model_cfg("bart", d_model=64, num_heads=4, mlp_dim=256))
    assert abs(np.std(bart["encoder"]["layers"]["attn"]["query"]["kernel"]) / 0.02 - 1) < 0.1


def _example(rng, vocab):
    tokens = rng.integers(0, vocab, (2, 12)).astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 5, [1] * 12], np.int32)
    pos = np.array([list(range(7)) + list(range(5)), list(range(12))], np.int32)
    dec = rng.integers(0, vocab, (2, 8)).astype(np.int32)
    dec_seg = np.array([[1] * 5 + [2] * 3, [1] * 8], np.int32)
    dec_pos = np.array([list(range(5)) + list(range(3)), list(range(8))], np.int32)
    return tokens, seg, pos, dec, dec_seg, dec_pos


@pytest.mark.parametrize("style", ["t5", "t5_v1_1", "bart"])
def test_matches_numpy_reference(style):
    cfg = fh.tiny_model_cfg(style)
    model, params = fh.make(cfg)
    tokens, seg, pos, dec, dec_seg, dec_pos = _example(np.random.default_rng(0), cfg.vocab_size)
    got = fh.jitted(model)(tokens, seg, pos, decoder_tokens=dec, decoder_segment_ids=dec_seg,
                           decoder_positions=dec_pos)
    for i in range(2):
        want = model_reference.encoder_decoder_logits(params, cfg, tokens[i], seg[i], pos[i], dec[i],
                                                      dec_seg[i], dec_pos[i])
        np.testing.assert_allclose(got[i], want, atol=2e-4, rtol=2e-4)


def test_decoder_is_causal_and_ignores_encoder_padding():
    cfg = fh.tiny_model_cfg("t5")
    model, _ = fh.make(cfg)
    run = fh.jitted(model)
    rng = np.random.default_rng(2)
    tokens = np.repeat(rng.integers(4, cfg.vocab_size, (1, 16)), 3, 0).astype(np.int32)
    seg = np.array([[1] * 10 + [0] * 6] * 3, np.int32)
    pos = np.where(seg != 0, np.arange(16), 0).astype(np.int32)
    dec = np.repeat(rng.integers(4, cfg.vocab_size, (1, 8)), 3, 0).astype(np.int32)
    tokens[1, 10:] = (tokens[1, 10:] + 5) % cfg.vocab_size  # other tokens under encoder padding
    dec[2, 5] = (dec[2, 5] + 5) % cfg.vocab_size  # a later decoder token changed
    out = run(tokens, seg, pos, decoder_tokens=dec)
    np.testing.assert_allclose(out[1], out[0], atol=1e-5)  # padding is invisible
    np.testing.assert_allclose(out[2, :5], out[0, :5], atol=1e-5)  # the past cannot see the future
    assert np.abs(out[2, 5:] - out[0, 5:]).max() > 1e-3  # but the future sees it
    # Changing a real encoder token changes every decoder position (cross-attention works).
    tokens[1, 3] = (tokens[1, 3] + 5) % cfg.vocab_size
    out = run(tokens, seg, pos, decoder_tokens=dec)
    assert (np.abs(out[1] - out[0]).max(-1) > 1e-4).all()


def test_eight_devices_give_the_same_losses(devices):
    # T5 v1.1 (relative bias per stack, gated MLP, untied head) plus BART's final logits bias: every
    # encoder-decoder parameter kind in one compile (BERT's test covers learned positions, post-LN).
    make = lambda: fh.tiny_train_config("t5_v1_1", **{"model.final_logits_bias": True})
    config = make()
    batch = fh.synthetic_batch(config, steps.batch_shapes(config))
    one, _ = run_steps(config, (1, 1, 1), batch, evaluate=False)
    eight, _ = run_steps(make(), (2, 2, 2), batch, evaluate=False)
    np.testing.assert_allclose(one, eight, rtol=2e-5)
    assert one[1] < one[0]


def test_target_length_comes_from_the_objective():
    config = fh.tiny_train_config("t5", seq_len=512)
    config.model.max_len = 512
    shapes = steps.batch_shapes(config)
    assert shapes["inputs"] == (16, 512) and shapes["targets"] == shapes["decoder_inputs"] == (16, 114)
    config = fh.tiny_train_config("bart", **{"data.objective": "text_infilling"})
    assert steps.batch_shapes(config)["targets"] == (16, 16)


@pytest.mark.parametrize("args, message", [
    (["--config.model.pooler=True"], "model.pooler=True belongs to the encoder family"),
    (["--config.seq_len=3"], "seq_len=3 is too short for span corruption"),
    (["--config.data.objective=mlm"], "trains with data.objective in"),
    (["TOKENIZER"], "has no <mask> piece"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    from test_train import run_cli
    if args == ["TOKENIZER"]:  # a tokenizer trained without the reserved pieces
        path = tmp_path / "plain.model"
        from llmjax.data.tokenizer import train_tokenizer
        train_tokenizer(["def f(x):\n    return x + 1\n" * 100], 300, path)
        args = [f"--config.data.tokenizer={path}"]
    out = run_cli("llmjax.main", "--config=configs/t5_small.py:runlocal",
                  f"--workdir={tmp_path / 'run'}", *args)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
