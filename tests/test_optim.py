"""Schedules, weight-decay masks, optimizers and optimizer-state shardings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax import optim

P = jax.sharding.PartitionSpec


def cfg(**kw):
    return ml_collections.ConfigDict(kw)


# --- schedules: peak 1, warmup 10, 110 steps, so the 100 decay steps make the arithmetic easy.

def lr_at(schedule_name, steps, **kw):
    kw = {"learning_rate": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw}
    schedule = optim.make_schedule(cfg(schedule=schedule_name, **kw), total_steps=110)
    return [float(schedule(s)) for s in steps]


@pytest.mark.parametrize("name, expected", [
    # steps:      0, mid-warmup, end of warmup, middle of decay, end
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    # halfway through a cosine from 1 to 0.1: 0.1 + 0.9 * (1 + cos(pi/2)) / 2 = 0.55
    ("cosine", [0.0, 0.5, 1.0, 0.55, 0.1]),
    ("linear", [0.0, 0.5, 1.0, 0.55, 0.1]),
])
def test_warmup_then_decay(name, expected):
    np.testing.assert_allclose(lr_at(name, [0, 5, 10, 60, 110]), expected, rtol=1e-6, atol=1e-7)


def test_rsqrt():
    # peak * sqrt(warmup / step) after warmup: sqrt(10/40) = 0.5, sqrt(10/1000) = 0.1
    np.testing.assert_allclose(lr_at("rsqrt", [0, 5, 10, 40, 1000]), [0, 0.5, 1, 0.5, 0.1], rtol=1e-6)
    # without warmup: peak / sqrt(max(step, 1))
    np.testing.assert_allclose(lr_at("rsqrt", [0, 1, 4, 100], warmup_steps=0), [1, 1, 0.5, 0.1],
                               rtol=1e-6)


def test_wsd():
    # decay_fraction 0.2 of 110 steps: stable until step 88, then linear 1 -> 0.1 over 22 steps.
    np.testing.assert_allclose(lr_at("wsd", [0, 5, 10, 50, 88, 99, 110], decay_fraction=0.2),
                               [0, 0.5, 1, 1, 1, 0.55, 0.1], rtol=1e-6, atol=1e-7)


def test_no_warmup_starts_at_peak():
    # optax.warmup_constant_schedule(0, peak, 0) would stay at 0 forever.
    for name in optim.SCHEDULES:
        assert lr_at(name, [0], warmup_steps=0) == [1.0], name


# --- weight-decay mask

NAMES = {
    "layers/attn/query/kernel": True,
    "layers/attn_norm/scale": False,
    "token_embed/embedding": False,
    "layers/mlp/wo/bias": False,
    "layers/mlp/wo/kernel": True,
    "layers/embedding_proj/kernel": True,  # the regex is anchored to the last path element
}


def nested(leaf_fn):
    tree = {}
    for path in NAMES:
        *parents, last = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf_fn()
    return tree


def flat(mask):
    return {optim.path_str(p): bool(v) for p, v in jax.tree_util.tree_leaves_with_path(mask)}


def test_decay_mask_dict():
    params = nested(lambda: jnp.zeros(2))
    mask = optim.decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert flat(mask) == NAMES


def test_decay_mask_nnx_state():
    params = nnx.State(nested(lambda: nnx.Param(jnp.zeros(2))))
    mask = optim.decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    # Leaves of an nnx.State sit under the Variable's `value` attribute.
    assert {k.removesuffix("/value"): v for k, v in flat(mask).items()} == NAMES


# --- optimizers

def one_update(tx, grads, params):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_adamw_masked_params_are_not_decayed():
    params = {"mlp": {"kernel": jnp.ones(3)}, "norm": {"scale": jnp.ones(3)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    base = dict(name="adamw", schedule="constant", learning_rate=0.1, grad_clip_norm=0)
    tx, _ = optim.make_optimizer(cfg(weight_decay=0.1, **base), 100)
    tx_no_wd, _ = optim.make_optimizer(cfg(weight_decay=0.0, **base), 100)
    with_wd, without = one_update(tx, zeros, params), one_update(tx_no_wd, zeros, params)
    # Zero gradients: Adam moves nothing, so what remains is the decay, -lr * wd * param.
    np.testing.assert_allclose(with_wd["mlp"]["kernel"], -0.01 * np.ones(3), rtol=1e-6)
    np.testing.assert_array_equal(with_wd["norm"]["scale"], without["norm"]["scale"])
    np.testing.assert_array_equal(with_wd["norm"]["scale"], np.zeros(3))


def test_clipping():
    g = {"w": jnp.array([6.0, 8.0])}  # norm 10
    clipped, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(optim.global_norm(clipped), 1.0, rtol=1e-6)
    # Through make_optimizer: with eps=1 Adam's first update g / (|g| + 1) depends on the gradient's
    # scale, so clipping a norm-10 gradient to 1 must give the update of g / 10.
    params = {"w": jnp.zeros(2)}
    base = dict(name="adamw", schedule="constant", learning_rate=1.0, eps=1.0, weight_decay=0.0)
    tx, _ = optim.make_optimizer(cfg(grad_clip_norm=1.0, **base), 10)
    tx_unclipped, _ = optim.make_optimizer(cfg(grad_clip_norm=0, **base), 10)
    small = jax.tree.map(lambda x: x / 10, g)
    np.testing.assert_allclose(one_update(tx, g, params)["w"],
                               one_update(tx_unclipped, small, params)["w"], rtol=1e-6)
    assert not np.allclose(one_update(tx_unclipped, g, params)["w"],
                           one_update(tx_unclipped, small, params)["w"])


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_adafactor_decreases_a_quadratic(momentum):
    params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))},
              "w_norm": {"scale": jnp.full((3,), 2.0)}}
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    tx, _ = optim.make_optimizer(cfg(name="adafactor", schedule="constant", learning_rate=0.1,
                                     adafactor_min_dim_size_to_factor=2,  # factor the 4x3 kernel
                                     adafactor_momentum=momentum), 100)
    state = tx.init(params)
    assert state[1][0].v["w"]["kernel"].shape == (1,)  # factored: rows and columns, no full v

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    start = loss(params)
    for _ in range(20):
        params, state = step(params, state)
    assert loss(params) < 0.5 * start


def test_mu_dtype():
    params = {"w": {"kernel": jnp.zeros((2, 2))}}
    tx, _ = optim.make_optimizer(cfg(mu_dtype="bfloat16"), 10)
    state = jax.eval_shape(tx.init, params)
    assert state[1][0].mu["w"]["kernel"].dtype == jnp.bfloat16
    assert state[1][0].nu["w"]["kernel"].dtype == jnp.float32


def test_global_norm_is_float32():
    tree = {"a": jnp.full((1000,), 3.0, jnp.bfloat16), "b": jnp.full((1000,), 4.0, jnp.bfloat16)}
    norm = optim.global_norm(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(norm, 5.0 * np.sqrt(1000), rtol=1e-6)


def test_unknown_names():
    with pytest.raises(ValueError, match=r"optim.schedule 'cosin'; choose one of cosine, linear"):
        optim.make_schedule(cfg(schedule="cosin"), 10)
    with pytest.raises(ValueError, match=r"optim.name 'sgd'; choose one of adamw, adafactor\.$"):
        optim.make_optimizer(cfg(name="sgd"), 10)


# --- optimizer-state shardings

@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_opt_state_shardings(name):
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.NamedSharding(mesh, P())
    shapes = {"layers": {"attn": {"query": {"kernel": (256, 128)}}, "attn_norm": {"scale": (128,)}},
              "token_embed": {"embedding": (300, 128)}}
    is_shape = lambda x: isinstance(x, tuple)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=is_shape)
    param_shardings = jax.tree.map(
        lambda s: jax.NamedSharding(mesh, P("fsdp", None) if len(s) == 2 else P()), shapes,
        is_leaf=is_shape)
    tx, _ = optim.make_optimizer(cfg(name=name, adafactor_momentum=0.9), 100)

    shardings = optim.opt_state_shardings(tx, abstract, param_shardings, replicated)

    abstract_state = jax.eval_shape(tx.init, abstract)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract_state)
    for (path, slot), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_state),
                                      jax.tree.leaves(shardings)):
        assert isinstance(sharding, jax.NamedSharding), path
        assert len(sharding.spec) <= slot.ndim, path  # a spec of the wrong rank would not compile
        if slot.shape in ((256, 128), (300, 128)):  # moments shaped like a matrix param
            assert sharding.spec == P("fsdp", None), path
        else:  # counts, vectors, factored statistics and adafactor's (1,) dummies
            assert sharding.spec in (P(), P(None)), path
    # And they are usable: init the state straight into them.
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    assert jax.tree.structure(state) == jax.tree.structure(abstract_state)
