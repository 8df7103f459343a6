"""Sharded training equals single-device training; bad meshes fail with one clear line."""

import jax
import numpy as np
import pytest

from llmjax import sharding, steps
from tests.helpers import synthetic_batches, tiny_config


def run_losses(config, batches, devices=None):
    devices = devices or jax.devices()[: int(np.prod([max(s, 1) for s in config.mesh.shape]))
                                       * int(np.prod(config.mesh.dcn_shape))]
    mesh = sharding.mesh_from_config(config, devices)
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        state = built.init()
        losses = []
        for local in batches:
            state, m = built.train_step(state, sharding.global_batch(local, built.batch_sharding))
            losses.append(float(m["loss"]))
        evaluated = built.eval_step(state["params"], sharding.global_batch(batches[0], built.batch_sharding))
        losses.append(float(evaluated["loss_sum"] / evaluated["count"]))  # the eval path too
        params = jax.device_get(state["params"])
    return np.array(losses), params, state


@pytest.mark.parametrize("style", ["gpt", "llama"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)])
def test_mesh_matches_single_device(devices, style, shape):
    config = tiny_config(style)
    batches = synthetic_batches(config, 1) * 3  # one batch repeated: the loss must fall
    single, single_params, _ = run_losses(config, batches, devices[:1])
    config.mesh.shape = shape
    sharded, sharded_params, state = run_losses(config, batches)
    np.testing.assert_allclose(sharded, single, rtol=2e-5, atol=2e-5)
    # Adam divides by sqrt(v): on a weight whose gradient is ~0, float32 reduction-order noise
    # can flip an update of size ~lr, so parameters get a tolerance of a tenth of the lr.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3), sharded_params, single_params)
    assert single[-1] < single[0]  # it learns, so equal losses are not equal constants


@pytest.mark.parametrize("ici, dcn", [((1, 2, 2), (2, 1, 1)), ((2, 1, 2), (1, 2, 1))],
                         ids=["data_over_slices", "fsdp_over_slices"])
def test_multislice_mesh_matches_single_device(devices, ici, dcn):
    """Two fake slices of 4 devices (mesh.dcn_shape): each axis is slices x within-slice, and
    training gives the single-device losses."""
    config = tiny_config("llama")
    batches = synthetic_batches(config, 1) * 3
    single, _, _ = run_losses(config, batches, devices[:1])
    config.mesh.shape, config.mesh.dcn_shape = ici, dcn
    mesh = sharding.mesh_from_config(config, devices)
    assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {
        a: i * d for a, i, d in zip(sharding.MESH_AXES, ici, dcn)}
    axis = dcn.index(2)  # the axis that crosses slices: its two halves are the two slices
    halves = np.split(mesh.devices, 2, axis=axis)
    assert [sorted(d.id for d in h.flat) for h in halves] == [list(range(4)), list(range(4, 8))]
    sharded, _, _ = run_losses(config, batches)
    np.testing.assert_allclose(sharded, single, rtol=2e-5, atol=2e-5)
    assert single[-1] < single[0]


@pytest.mark.parametrize("dcn, message", [
    ((2, 1), "must have 3 positive entries"),
    ((3, 1, 1), "do not split into the 3 slices"),
    ((-1, 1, 1), "give the number of slices instead of -1"),
])
def test_bad_dcn_shape_is_one_line(devices, dcn, message):
    config = tiny_config("gpt", **{"mesh.shape": (1, -1, 1), "mesh.dcn_shape": dcn})
    with pytest.raises(ValueError, match=message) as err:
        sharding.mesh_from_config(config, devices)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, tol", [
    ({"optim.name": "adafactor"}, 2e-5),
    ({"model.dtype": "bfloat16"}, 2e-2),  # bf16 matmuls: reduction order moves the last bits
    ({"model.remat_policy": "full", "model.dropout_rate": 0.1}, 2e-5),
], ids=["adafactor", "bfloat16", "remat_dropout"])
def test_variants_match_single_device_on_2x2x2(devices, overrides, tol):
    config = tiny_config("llama", **overrides)
    batches = synthetic_batches(config, 1) * 3
    single, _, _ = run_losses(config, batches, devices[:1])
    config.mesh.shape = (2, 2, 2)
    sharded, _, _ = run_losses(config, batches)
    np.testing.assert_allclose(sharded, single, rtol=tol, atol=tol)
    assert single[-1] < single[0]


def test_parameters_are_actually_sharded(devices):
    config = tiny_config("llama", **{"mesh.shape": (1, 2, 4)})
    _, _, state = run_losses(config, synthetic_batches(config, 1))
    q = state["params"]["layers"]["attn"]["query"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 4)
    mu = state["opt_state"][1][0].mu["layers"]["attn"]["query"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec


def test_accumulation_equals_large_batch(devices):
    config = tiny_config("gpt", **{"mesh.shape": (2, 2, 2)})
    batches = synthetic_batches(config, 3)
    big, big_params, _ = run_losses(config, batches)
    config.microbatches = 4
    acc, acc_params, _ = run_losses(config, batches)
    np.testing.assert_allclose(acc, big, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), acc_params, big_params)


def test_uneven_vocab_is_replicated_not_rejected(devices):
    config = tiny_config("gpt", **{"model.vocab_size": 101, "mesh.shape": (1, 1, 2)})
    batches = synthetic_batches(config, 1)
    for b in batches:
        b["inputs"] %= 101
        b["targets"] %= 101
    _, _, state = run_losses(config, batches)
    table = state["params"]["token_embed"]["embedding"]
    assert table.sharding.spec == jax.sharding.PartitionSpec(None, None)


@pytest.mark.parametrize("shape, overrides, message", [
    ((2, 2, 1), {}, "needs 4 devices but 8 are available"),
    ((-1, 3, 1), {}, "not divisible"),
    ((1, 1, 8), {"model.num_heads": 4, "model.d_model": 32}, "num_heads=4 is not divisible by the tensor axis"),
    ((8, 1, 1), {"batch_size": 12}, "batch_size=12"),
    ((8, 1, 1), {"batch_size": 16, "microbatches": 4}, "multiple of 32"),
])
def test_bad_mesh_and_batch_give_one_line(devices, shape, overrides, message):
    config = tiny_config("gpt", **overrides)
    config.mesh.shape = shape
    with pytest.raises(ValueError, match=message) as err:
        mesh = sharding.make_mesh(shape, devices)
        steps.build(config, mesh)
    assert "\n" not in str(err.value)


def test_unmapped_logical_name_is_an_error():
    with pytest.raises(ValueError, match="no entry in sharding_rules"):
        sharding.logical_to_spec(("embed", "mystery"), (4, 4), {"data": 1, "fsdp": 2, "tensor": 2},
                                 sharding.DEFAULT_RULES)
