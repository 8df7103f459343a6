"""The multimodal decoder (models/multimodal.py): the prefix-LM mask by perturbation, packed
segments kept apart, 8-device mesh == one device, cached generation == the full forward pass, and
one-line errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import sharding, steps
from llmjax.models import ModelConfig, build_model
from tests.helpers import apply_overrides, base_config

# 16x16 images in 8x8 patches: 4 image tokens per slot, 2 slots, then 8 text tokens. One layer
# per stack: every property tested here (masks, packing, sharding, the cache) holds per layer, and
# the compiles dominate this file's time.
MODEL = dict(family="multimodal", vocab_size=64, d_model=32, num_layers=1, num_heads=4, mlp_dim=64,
             max_len=32, image_size=16, patch_size=8, vision_layers=1, vision_d_model=16,
             vision_heads=2, vision_mlp_dim=32, max_images=2)
B, L, M, P = 2, 8, 2, 4


def tiny_config(**overrides):
    c = base_config()
    c.model.update(MODEL)
    c.seq_len, c.batch_size, c.total_steps = L, 8, 4
    c.data.update(task="captions", image_size=16, max_images=2)
    c.optim.update(learning_rate=1e-2, warmup_steps=1)
    c.mesh.shape = (1, 1, 1)
    return apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(**MODEL)
    graphdef, _ = steps.abstract_model(cfg)

    @jax.jit
    def init():  # one compiled init: creating the model eagerly costs ~20 s of op dispatch
        with nnx.use_eager_sharding(False):
            return nnx.state(build_model(cfg, nnx.Rngs(0)))

    params = init()

    @jax.jit
    def everything(params, batch):
        """(text logits [B, L, V], hidden states of every position [B, M*P + L, d])."""
        mm = nnx.merge(graphdef, params)
        logits = steps.forward(mm, batch)
        x, segments, pos, _ = mm.embed_all(batch["inputs"], batch["segment_ids"],
                                           batch["positions"], batch["images"],
                                           batch["image_segment_ids"])
        from llmjax.models.multimodal import prefix_lm_mask
        n = M * P
        return logits, mm._blocks(x, prefix_lm_mask(segments[:, :n], segments[:, n:]), pos, None,
                                  causal=False)

    return cfg, graphdef, params, everything


def one_segment_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(1, 64, (B, L)).astype(np.int32),
            "segment_ids": np.ones((B, L), np.int32),
            "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
            "images": rng.uniform(-1, 1, (B, M, 16, 16, 3)).astype(np.float32),
            "image_segment_ids": np.ones((B, M), np.int32)}


def changed(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max(axis=-1) > 1e-6


def test_images_bidirectional_text_causal(model):
    *_, everything = model
    batch = one_segment_batch()
    logits, hidden = everything(model[2], batch)
    # A later image (slot 1) changes the earlier image's tokens: the prefix is bidirectional.
    later = dict(batch, images=batch["images"].copy())
    later["images"][:, 1, 8:, 8:] += 0.5  # the last patch of slot 1
    logits2, hidden2 = everything(model[2], later)
    assert changed(hidden[:, :P], hidden2[:, :P]).all()
    assert changed(logits, logits2).all()  # and every text token sees the images
    # A later text token leaves earlier text logits alone and the image tokens too.
    text = dict(batch, inputs=batch["inputs"].copy())
    text["inputs"][:, 5] = (text["inputs"][:, 5] + 1) % 64
    logits3, hidden3 = everything(model[2], text)
    assert not changed(logits[:, :5], logits3[:, :5]).any()
    assert not changed(hidden[:, :M * P], hidden3[:, :M * P]).any()
    assert changed(logits[:, 5:], logits3[:, 5:]).all()


def packed_batch(seed=0):
    """Row 0: example A (text 0..3, image slot 0) and example B (text 4..6, image slot 1), one
    padding token; row 1: example B alone (its image in slot 0, slot 1 empty)."""
    batch = one_segment_batch(seed)
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 0, 0, 0, 0, 0]], np.int32)
    batch["inputs"][1, :3] = batch["inputs"][0, 4:7]
    batch["images"][1, 0] = batch["images"][0, 1]
    return dict(batch, segment_ids=seg, positions=pos,
                image_segment_ids=np.array([[1, 2], [1, 0]], np.int32))


def test_packed_segments_and_empty_slots(model):
    *_, everything = model
    batch = packed_batch()
    logits, _ = everything(model[2], batch)
    # Example B packed after A sees exactly what it sees alone (positions restart, its image is
    # its own first image, A's tokens and image are masked out).
    np.testing.assert_allclose(logits[0, 4:7], logits[1, :3], atol=1e-5)
    # A's image and text leave B alone; B's image leaves A alone.
    a = dict(batch, images=batch["images"].copy(), inputs=batch["inputs"].copy())
    a["images"][0, 0] += 0.5
    a["inputs"][0, 1] = (a["inputs"][0, 1] + 1) % 64
    logits_a, _ = everything(model[2], a)
    assert not changed(logits[0, 4:], logits_a[0, 4:]).any()
    assert changed(logits[0, 1:4], logits_a[0, 1:4]).all()
    b = dict(batch, images=batch["images"].copy())
    b["images"][0, 1] += 0.5
    logits_b, _ = everything(model[2], b)
    assert not changed(logits[0, :4], logits_b[0, :4]).any()
    # An empty slot's pixels change nothing.
    empty = dict(batch, images=batch["images"].copy())
    empty["images"][1, 1] = 1.0
    logits_e, _ = everything(model[2], empty)
    np.testing.assert_array_equal(np.asarray(logits_e), np.asarray(logits))


def synthetic_batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b = config.batch_size
        tokens = rng.integers(1, 64, (b, L + 1)).astype(np.int32)
        seg = np.where(np.arange(L)[None] < 5, 1, 2).astype(np.int32)
        seg = np.repeat(seg, b, 0)
        pos = np.where(seg == 1, np.arange(L), np.arange(L) - 5).astype(np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
                    "positions": pos, "weights": np.ones((b, L), np.int32),
                    "images": rng.uniform(-1, 1, (b, M, 16, 16, 3)).astype(np.float32),
                    "image_segment_ids": np.repeat(np.array([[1, 2]], np.int32), b, 0)})
    return out


def run_losses(config, batches, devices, initial=None):
    """(losses of training on `batches`, the initial state on the host). `initial` (a host state)
    is placed on this mesh instead of compiling and running the initialiser again."""
    mesh = sharding.mesh_from_config(config, devices)
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        state = (built.init() if initial is None
                 else jax.device_put(initial, built.state_shardings))
        initial, losses = jax.device_get(state), []  # the train step donates `state`
        for local in batches:
            state, m = built.train_step(state, sharding.global_batch(local, built.batch_sharding))
            losses.append(float(m["loss"]))
    return np.array(losses), initial


def test_mesh_matches_single_device_and_learns(devices):
    config = tiny_config()
    batches = synthetic_batches(config, 1) * 3
    single, initial = run_losses(config, batches, devices[:1])
    assert single[-1] < single[0] - 0.1, single  # a fixed batch: the loss falls
    config.mesh.shape = (2, 2, 2)  # data, fsdp and tensor axes all split, from the same start
    sharded, _ = run_losses(config, batches, devices, initial)
    np.testing.assert_allclose(sharded, single, rtol=2e-5, atol=2e-5)


def test_counts_flops_and_abstract_batch():
    config = tiny_config()
    cfg = ModelConfig.from_config(config.model)
    counts = steps.count_params(cfg)
    assert 0 < counts["vision_params"] < counts["params"]
    assert counts["non_embedding_params"] + counts["vision_params"] < counts["params"]
    assert steps.flops_per_token(ModelConfig(**{**MODEL, "vision_layers": 2}), L) > (
        steps.flops_per_token(cfg, L))
    shapes = steps.batch_shapes(config, cfg)
    assert shapes["images"] == (8, 2, 16, 16, 3) and shapes["image_segment_ids"] == (8, 2)


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=20), "not a multiple of model.patch_size"),
    (dict(attention="splash"), "prefix-LM mask is not causal"),
    (dict(max_len=8), "leaves no room for text"),
    (dict(vision_position="sincos"), "vision_position"),
])
def test_bad_model_config_is_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        ModelConfig(**{**MODEL, **overrides})
    assert "\n" not in str(e.value)


def test_vision_keys_belong_to_multimodal():
    with pytest.raises(ValueError, match="belongs to the multimodal family"):
        ModelConfig(family="decoder", image_size=32)


def test_cached_generation_equals_full_forward(model):
    from llmjax.generate import MultimodalGenerator, layout
    cfg, graphdef, params, _ = model
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 64, 5).tolist(), rng.integers(1, 64, 2).tolist()]
    images = [[rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)],  # one image, one empty slot
              [rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32) for _ in range(2)]]
    gen = MultimodalGenerator(graphdef, cfg)
    new = 6
    out = gen.generate(params, prompts, images=images, max_new_tokens=new)
    assert [len(t) for t in out.tokens] == [new, new]
    full = jax.jit(lambda p, b: steps.forward(nnx.merge(graphdef, p), b))
    for row, (prompt, imgs) in enumerate(zip(prompts, images)):
        text = prompt + out.tokens[row]
        pixels, image_segments = gen.image_batch([imgs])
        batch = {"inputs": np.zeros((1, L + 8), np.int32), "segment_ids": np.zeros((1, L + 8), np.int32),
                 "positions": np.zeros((1, L + 8), np.int32), "images": pixels,
                 "image_segment_ids": image_segments}
        batch["inputs"][0, :len(text)] = text
        batch["segment_ids"][0, :len(text)] = 1
        batch["positions"][0, :len(text)] = np.arange(len(text))
        logits = np.asarray(full(params, batch))[0]
        # Greedy: each new token is the argmax of the full pass at the token before it.
        greedy = logits[len(prompt) - 1:len(text) - 1].argmax(-1)
        np.testing.assert_array_equal(greedy, out.tokens[row])
        # The prefill's logits (images + prompt through the cache) equal the full pass's.
        tokens, segments, positions, last = layout([prompt])
        prefill, _ = gen._prefill_images(params, tokens, segments, positions, last, pixels,
                                         image_segments, tokens.shape[1] + 1)
        np.testing.assert_allclose(np.asarray(prefill)[0], logits[len(prompt) - 1], atol=1e-4)


def test_generation_bad_input_is_one_line(model):
    from llmjax.generate import MultimodalGenerator, sample_text
    cfg, graphdef, params, _ = model
    gen = MultimodalGenerator(graphdef, cfg)
    image = np.zeros((16, 16, 3), np.float32)
    cases = [
        (dict(images=[[]]), "has no image"),
        (dict(images=[[image] * 3]), "at most model.max_images=2"),
        (dict(images=[[np.zeros((8, 8, 3), np.float32)]]), "not the model's"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            gen.generate(params, [[1, 2]], max_new_tokens=2, **kw)
        assert "\n" not in str(e.value)
    sample = base_config().sample
    with pytest.raises(ValueError, match="answers about an image"):
        sample_text(graphdef, cfg, params, None, sample, ["hi"])
    text_cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, mlp_dim=64)
    with pytest.raises(ValueError, match="reads text only"):
        sample_text(graphdef, text_cfg, params, None, sample, ["hi"], images=[[image]])
