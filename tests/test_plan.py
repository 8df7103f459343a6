"""The planner (llmjax/plan.py, `python -m llmjax.describe --topology/--devices`): slice names, the
memory plan on fake CPU devices against an independently compiled step, and a real TPU ahead-of-
time compile through libtpu (the `tpu` extra, which the tests install)."""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from llmjax import plan, sharding, steps
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu (the TPU compiler) is not installed: pip install -r "
    "requirements/tpu-lock.txt (scripts/test.sh installs it where pip can get it)")


@pytest.mark.parametrize("name, topology, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-128", "v5p:4x4x4", 64),
    ("v5p-2048", "v5p:8x8x16", 1024), ("v4-32", "v4:2x2x4", 16), ("v5litepod-16", "v5e:4x4", 16),
    ("v5e-8", "v5e:2x4", 8), ("v6e-256", "v6e:16x16", 256), ("v5p:2x2x1", "v5p:2x2x1", 4)])
def test_slice_names(name, topology, chips):
    spec = plan.parse_topology(name)
    assert (spec.topology, spec.chips) == (topology, chips)


@pytest.mark.parametrize("name", ["v5p-7", "v5p-12", "tpu-8", "v5p"])
def test_bad_slice_name_is_one_sentence(name):
    with pytest.raises(plan.PlanError) as e:
        plan.parse_topology(name)
    message = str(e.value)
    assert "\n" not in message and message.endswith(".") and name in message


def test_describe_cli_bad_topology():
    r = subprocess.run([sys.executable, "-m", "llmjax.describe", "--config=configs/gpt_small.py:runlocal",
                        "--topology=v5p-7"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --topology=v5p-7 is not a v5p slice")


def test_memory_plan_on_fake_cpu_devices_matches_the_compiled_step(devices):
    config = tiny_config(**{"mesh.shape": (2, 2, 2), "microbatches": 2})
    p = plan.plan(config, devices=devices, chip="h100")
    assert p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and p["chip"] == "h100"
    # What each device holds, from the shard shapes, is exactly the compiled step's arguments.
    assert p["argument_bytes"] == p["param_bytes"] + p["opt_state_bytes"] + p["batch_bytes"]
    assert p["temp_bytes"] > 0 and p["fits"] is True and p["advice"] == []

    # The same step built and compiled the way train.py does, over real (initialised) arrays.
    mesh = sharding.make_mesh(config.mesh.shape)
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        compiled = built.train_step.lower(built.init(), steps.abstract_batch(config, built)).compile()
    stats = compiled.memory_analysis()
    assert p["argument_bytes"] == stats.argument_size_in_bytes
    assert p["output_bytes"] == stats.output_size_in_bytes
    assert p["alias_bytes"] == stats.alias_size_in_bytes
    assert p["temp_bytes"] == stats.temp_size_in_bytes
    counts = steps.count_params(built.model_cfg)
    assert p["param_bytes"] * 8 >= 4 * counts["params"]  # float32, each device a shard or more
    # FLOPs: the compiled count sees a scanned layer once; counting every layer lands near the
    # PaLM formula (which leaves out norms, softmax and the optimizer).
    assert 0.9 < p["counted_flops_per_step"] / p["formula_flops_per_step"] < 1.3
    assert p["compiled_flops_per_device"] * p["devices"] < p["counted_flops_per_step"]
    assert 0 < p["estimated_mfu"] <= 1


def test_multislice_mesh_puts_slices_on_the_data_axis(devices):
    mesh = sharding.make_mesh((1, -1, 2), devices, num_slices=2)
    assert mesh.devices.shape == (2, 2, 2)
    assert {d.id for d in mesh.devices[0].flat} == {d.id for d in devices[:4]}


def test_advice_when_it_does_not_fit():
    config = tiny_config(**{"mesh.shape": (2, 2, 2), "batch_size": 64})
    gib = plan.GiB
    p = {"remat": "none", "mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "num_slices": 1,
         "param_bytes": 10 * gib, "opt_state_bytes": 20 * gib, "batch_bytes": 0,
         "hbm_bytes": 95 * gib, "fits": False, "temp_bytes": 210 * gib, "peak_bytes": 240 * gib}
    tips = " ".join(plan.advice(config, p, plan.parse_topology("v5p-8")))
    assert "--config.model.remat_policy=full" in tips
    assert '--config.mesh.shape="(1,-1,2)"' in tips
    # 200 GiB of activations into the ~41 GiB left after state and gradients: 5 -> 8 (divides 64/4).
    assert "--config.microbatches=8" in tips
    assert "--topology=v5p-32" in tips  # 240 GiB needs about 3x the memory: 4x the chips
    assert plan.advice(config, dict(p, fits=True), None) == []


@needs_libtpu
def test_tpu_ahead_of_time_compile():
    config = tiny_config(**{"mesh.shape": (1, -1, 2), "model.dtype": "bfloat16"})
    p = plan.plan(config, topology="v5p-8", count_layers=False)
    assert p["device_kind"].startswith("TPU v5") and p["chip"] == "v5p" and p["devices"] == 4
    assert p["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert p["fits"] is True and p["temp_bytes"] > 0 and p["compiled_flops_per_device"] > 0
    # TPU layouts pad small minor dimensions to tiles, so arguments can only be larger.
    assert p["argument_bytes"] >= p["param_bytes"] + p["opt_state_bytes"] + p["batch_bytes"]
    assert p["estimated_step_s"] > 0
    assert "TPU v5" in plan.format_plan(p)


@needs_libtpu
def test_tpu_multislice_devices():
    spec, devs = plan.topology_devices("v5p-8", num_slices=2)
    mesh = sharding.make_mesh((1, -1, 2), devs, num_slices=2)
    assert spec.chips == 4 and mesh.devices.shape == (2, 2, 2)
    assert {d.slice_index for d in mesh.devices[0].flat} == {0}
    assert {d.slice_index for d in mesh.devices[1].flat} == {1}
    # v4 as JAX uses it: one device per chip (megacore), not one per TensorCore.
    spec, devs = plan.topology_devices("v4-8")
    assert spec.chips == 4 and len(devs) == 4 and devs[0].device_kind == "TPU v4"


@needs_libtpu
def test_two_slice_ahead_of_time_compile():
    """mesh.dcn_shape=(2,1,1) over two v5p-8 slices: data parallel across the slices, FSDP and
    tensor parallel within each; the step compiles for the TPU topology on this CPU."""
    config = tiny_config(**{"mesh.shape": (1, -1, 2), "mesh.dcn_shape": (2, 1, 1),
                            "model.dtype": "bfloat16"})
    p = plan.plan(config, topology="v5p-8", num_slices=2, count_layers=False)
    assert p["devices"] == 8 and p["chips"] == 8 and p["num_slices"] == 2
    assert p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert p["fits"] is True and p["compiled_flops_per_device"] > 0
    with pytest.raises(ValueError, match="lays out 2 slices but --num_slices=4"):
        plan.plan(config, topology="v5p-8", num_slices=4, count_layers=False)
    with pytest.raises(ValueError, match="span 2 TPU slices; set --config.mesh.dcn_shape"):
        plan.plan(tiny_config(**{"mesh.shape": (1, -1, 2)}), devices=plan.topology_devices(
            "v5p-8", 2)[1], count_layers=False)


@needs_libtpu
def test_mesh_axis_that_splits_a_torus_side():
    # tensor=8 on v5p-128's 4x4x4 torus: no side is 8, so one side is split over two mesh axes.
    _, devs = plan.topology_devices("v5p-128")
    mesh = sharding.make_mesh((1, -1, 8), devs)
    assert mesh.devices.shape == (1, 8, 8)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devs)


def test_largest_batch_is_the_last_that_fits_the_budget(devices):
    """The search's answer fits and one more data-parallel unit does not, judged by the compiled
    step's own peak against a memory budget (here between two batch sizes' peaks)."""
    config = tiny_config(**{"mesh.shape": (2, 2, 2)})
    peak = lambda b: plan.plan(plan.with_overrides(config, batch_size=b), devices=devices,
                               chip="h100", count_layers=False)["peak_bytes"]
    budget = (peak(24) + peak(28)) / 2
    found = plan.largest_batch(config, devices=devices, chip="h100", budget_bytes=budget)
    assert found["unit"] == 4 and found["batch_size"] == 24
    assert all(p["fits"] == (p["peak_bytes"] <= budget) for p in found["probes"])
    assert {24, 28} <= {p["batch_size"] for p in found["probes"]}
    assert "train with --config.batch_size=24" in plan.format_largest_batch(found)
