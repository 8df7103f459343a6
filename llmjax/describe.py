"""Describe a config before paying for it.

Size only (one JSON line, from abstract shapes; no memory for the weights, no compile):
    python -m llmjax.describe --config=configs/llama2_70b.py

The memory plan: compile the real train step ahead of time for a TPU slice (libtpu's compiler runs
on any machine: pip install -e '.[tpu]'), or over N fake CPU devices, and print per device the
parameter, optimizer-state and temporary bytes, whether that fits the chip's HBM (and what to
change when it does not), FLOPs per step and a roofline estimate of step time and MFU:
    python -m llmjax.describe --config=configs/llama2_70b.py --topology=v5p-128
    python -m llmjax.describe --config=configs/llama2_70b.py --topology=v5p-128 --num_slices=2
    python -m llmjax.describe --config=configs/gpt_small.py --devices=8 --chip=h100
Any --config.key=value override applies (mesh.shape, microbatches, model.remat_policy, ...).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from llmjax import cli

TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice to compile for, e.g. v5p-8, v5p-128, v5litepod-16, v6e-8, v4-32 "
    "(Cloud accelerator types count TensorCores) or v5p:4x4x4. Needs libtpu (the `tpu` extra).")
NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Multi-slice: this many --topology slices, "
                                  "joined on the data-parallel mesh axis.")
DEVICES = flags.DEFINE_integer("devices", None, "Compile over this many fake CPU devices instead "
                               "of a TPU slice.")
CHIP = flags.DEFINE_string("chip", None, "Judge memory and speed against this chip (v4, v5e, v5p, "
                           "v6e, a100-40gb, a100-80gb, h100, h200); default: the devices' own.")
MAX_BATCH = flags.DEFINE_bool("max_batch", False, "With --topology or --devices: find the largest "
                                "global batch_size that fits the chip (one compile per probe).")
FLOPS = flags.DEFINE_bool("count_layer_flops", True, "Also count every layer's FLOPs with XLA "
                          "(two extra lowerings, no compile).")


def describe(config) -> dict:
    from llmjax import steps
    from llmjax.models import ModelConfig
    model_cfg = ModelConfig.from_config(config.model)
    counts = steps.count_params(model_cfg)
    return {"family": model_cfg.family, **counts,
            "flops_per_token": steps.flops_per_token(
                model_cfg, config.seq_len, steps.batch_shapes(config, model_cfg)["targets"][1]),
            "seq_len": config.seq_len, "tokens_per_step": config.batch_size * config.seq_len}


def main(argv):
    del argv
    config = cli.require_config()
    if TOPOLOGY.value is None and DEVICES.value is None:
        try:
            print(json.dumps(describe(config)))
        except ValueError as e:
            cli.fail(str(e))
        return
    if TOPOLOGY.value is not None and DEVICES.value is not None:
        cli.fail("give --topology (a TPU slice) or --devices (fake CPU devices), not both.")
    # Before JAX starts its backends: the planner's own arrays live on the CPU, and N fake CPU
    # devices need the flag before the CPU backend exists.
    # (Loading the config file imported jax already, so JAX_PLATFORMS is read: set the option.)
    import jax  # pylint: disable=g-import-not-at-top
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    if DEVICES.value is not None:
        if DEVICES.value < 1:
            cli.fail(f"--devices={DEVICES.value} must be at least 1.")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={DEVICES.value}").strip()
    from llmjax import plan  # pylint: disable=g-import-not-at-top
    try:
        devices = None
        if DEVICES.value is not None:
            devices = jax.devices("cpu")
            if len(devices) != DEVICES.value:
                cli.fail(f"--devices={DEVICES.value} asked for fake CPU devices, but JAX started "
                         f"with {len(devices)} (its CPU backend was initialised before the flag).")
        if MAX_BATCH.value:
            found = plan.largest_batch(config, devices=devices, topology=TOPOLOGY.value,
                                       num_slices=NUM_SLICES.value, chip=CHIP.value)
            print(plan.format_largest_batch(found))
            print(json.dumps(found))
            return
        result = plan.plan(config, devices=devices, topology=TOPOLOGY.value,
                           num_slices=NUM_SLICES.value, chip=CHIP.value,
                           count_layers=FLOPS.value)
    except ValueError as e:  # PlanError, ShardingError and config errors: one sentence
        cli.fail(str(e))
    print(plan.format_plan(result))
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
