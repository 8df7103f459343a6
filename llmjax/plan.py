"""Plan before paying: compile the real train step for a TPU slice (or a fake CPU mesh) ahead of
time, without allocating a weight, and read what the compiler says about it.

    plan(config, topology="v5p-128")   # libtpu's compiler, on any machine (no TPU needed)
    plan(config, devices=jax.devices(), chip="h100")   # fake CPU devices, judged against a GPU

What comes back, per device: parameter and optimizer-state bytes (from the shard shapes of the
sharded abstract state), the compiler's memory analysis (arguments, outputs, aliased, temporaries,
i.e. activations, gradients and workspace), whether the peak (arguments + outputs - aliased +
temporaries) fits the chip's HBM, FLOPs per step three ways
(the compiled program's `cost_analysis()`, which counts a scanned layer once; the same counter on
unrolled 1- and 2-layer lowerings extrapolated to the full depth; the PaLM formula), and a
roofline estimate of step time and MFU. When it does not fit, `advice` names config overrides.
XLA:TPU refuses a program (in seconds) only when its temporaries alone exceed HBM; one whose
arguments and temporaries together do compiles, and the plan says it does not fit.

Slice names are Cloud TPU's accelerator types (`v5p-128`, `v5litepod-16`, `v6e-8`, `v4-32`) or the
compiler's own `v5p:4x4x4`. Cloud names count TensorCores: v4 and v5p chips have two (one JAX
device per chip, megacore), v5e and v6e one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Sequence
from unittest import mock

from llmjax.config import with_overrides

GiB = 2**30


class PlanError(ValueError):
    """A plan that cannot be made (bad slice name, no TPU compiler); the message is one sentence."""


# ---------------------------------------------------------------------------------------------
# Chips


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    kinds: tuple[str, ...]  # lower-case substrings of jax's device_kind, most specific first
    hbm_bytes: float  # memory of one JAX device
    peak_flops: float  # dense bfloat16 FLOP/s of one JAX device
    hbm_bandwidth: float  # bytes/s of one JAX device


# Per JAX device (a v4/v5p chip is one device: megacore). TPU HBM: what libtpu 0.0.42's compiler
# says is available when it refuses a program (`exceeds available HBM (95.74G)`, G = GiB), a
# little under the nominal 32 / 16 / 95 / 32 GiB; bandwidths from cloud.google.com/tpu/docs/<v>.
# GPUs: NVIDIA's datasheets (GB). Peak FLOP/s agree with metrics.PEAK_FLOPS (dense bfloat16).
CHIPS = (
    Chip("v4", ("tpu v4",), 30.75 * GiB, 275e12, 1228e9),
    Chip("v5e", ("tpu v5 lite", "tpu v5e"), 15.75 * GiB, 197e12, 819e9),
    Chip("v5p", ("tpu v5p", "tpu v5"), 95.74 * GiB, 459e12, 2765e9),
    Chip("v6e", ("tpu v6 lite", "tpu v6e"), 31.25 * GiB, 918e12, 1640e9),
    Chip("a100-40gb", ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb"), 40e9, 312e12, 1555e9),
    Chip("a100-80gb", ("a100-sxm4-80gb", "a100 80gb", "a100"), 80e9, 312e12, 2039e9),
    Chip("h100", ("h100",), 80e9, 989e12, 3350e9),
    Chip("h200", ("h200",), 141e9, 989e12, 4800e9),
)


def find_chip(name_or_kind: str) -> Chip | None:
    """A chip by its table name (`v5p`, `h100`) or by a device's `device_kind` ("TPU v5")."""
    key = name_or_kind.lower()
    for chip in CHIPS:
        if key == chip.name:
            return chip
    for chip in CHIPS:
        if any(k in key for k in chip.kinds):
            return chip
    return None


# ---------------------------------------------------------------------------------------------
# Slice names

CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
# The 3D tori of v4/v5p are named 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; v5e/v6e are 2D.
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    shape = [1] * dims
    left = chips
    while left > 1:
        shape[shape.index(min(shape))] *= 2  # grow the smallest side: the most cubic shape
        left //= 2
    shape.sort()
    if dims == 3 and shape[0] == 1:  # Cloud writes the 4-chip cube as 2x2x1
        shape = shape[1:] + [1]
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given
    generation: str  # v4 | v5p | v5e | v6e
    topology: str  # the compiler's name, e.g. v5p:4x4x4
    chips: int


def parse_topology(name: str) -> Slice:
    """`v5p-128` -> Slice(generation v5p, topology v5p:4x4x4, chips 64); `v5p:2x2x1` passes through."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    if m:
        generation, cores = _GENERATIONS[m.group(1)], int(m.group(2))
        chips, rest = divmod(cores, CORES_PER_CHIP[generation])
        if rest or chips < 1 or chips & (chips - 1):
            raise PlanError(
                f"--topology={name} is not a {generation} slice: Cloud names count TensorCores "
                f"({CORES_PER_CHIP[generation]} per {generation} chip) and slices have a power of "
                f"two of chips, e.g. {m.group(1)}-{8 * CORES_PER_CHIP[generation]}.")
        shape = _torus(chips, _DIMS[generation])
        return Slice(name, generation, f"{generation}:{'x'.join(map(str, shape))}", chips)
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", text)
    if m:
        chips = math.prod(int(s) for s in m.group(2).split("x"))
        return Slice(name, m.group(1), text, chips)
    raise PlanError(
        f"--topology={name!r} is not a TPU slice name; use a Cloud accelerator type such as "
        "v5p-8, v5p-128, v5litepod-16, v6e-8 or v4-32, or the compiler's form such as v5p:2x2x1.")


def topology_devices(name: str, num_slices: int = 1) -> tuple[Slice, list]:
    """The compile-only TPU devices of `num_slices` slices of `name` (libtpu, no TPU needed)."""
    spec = parse_topology(name)
    # libtpu takes /tmp/libtpu_lockfile so that one process owns a real TPU; compiling for a
    # described topology owns nothing, and two planners (or parallel test workers) must coexist.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        if spec.generation == "v4":  # libtpu describes v4 with a device per core unless asked
            kwargs["chip_config_name"] = "megacore"
        desc = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology, **kwargs)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise PlanError("--topology needs libtpu, the TPU compiler, which is not installed: "
                            "pip install -e '.[tpu]' (or pip install -r requirements/tpu-lock.txt)."
                            ) from e
        raise PlanError(f"libtpu could not describe the topology {spec.topology}: "
                        f"{str(e).strip().splitlines()[0]}") from e
    return spec, list(desc.devices)


# ---------------------------------------------------------------------------------------------
# Compiling and reading the compiler


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    import jax  # pylint: disable=g-import-not-at-top
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _cost(analysis) -> dict:
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


# How XLA:TPU refuses a program that does not fit (sizes in its K/M/G/T, powers of 1024):
#   "the total memory required for HLO temporaries (1.09T) exceeds available HBM (95.74G)"
#   "Used 120.5G of 95.74G hbm. Exceeded hbm capacity by 24.8G."
_OOM_TEMPS = re.compile(r"temporaries \(([\d.]+)([KMGTP]?)\) exceeds available HBM \(([\d.]+)([KMGTP]?)\)")
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGTP]?) of ([\d.]+)([KMGTP]?) hbm", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def _parse_oom(message: str) -> dict:
    """{"temp_bytes" or "used_bytes", "compiler_hbm_bytes"} from XLA's out-of-memory message."""
    for pattern, key in ((_OOM_TEMPS, "temp_bytes"), (_OOM_USED, "used_bytes")):
        m = pattern.search(message)
        if m:
            return {key: float(m.group(1)) * _UNITS[m.group(2).upper()],
                    "compiler_hbm_bytes": float(m.group(3)) * _UNITS[m.group(4).upper()]}
    return {}


def layer_flops(config) -> dict:
    """FLOPs of one whole train step (all devices), counted by XLA's HLO cost analysis with every
    layer counted: `cost_analysis()` counts a scanned (while-loop) body once, so this lowers (no
    compile, no memory) the step with 1 and 2 layers and scans unrolled, on one CPU device, and
    extrapolates linearly to the config's depth and micro-batches. It counts what the program
    computes, remat recomputation included, before XLA's optimisations."""
    import jax  # pylint: disable=g-import-not-at-top
    from llmjax import sharding, steps  # pylint: disable=g-import-not-at-top
    from llmjax.models import ModelConfig  # pylint: disable=g-import-not-at-top

    model_cfg = ModelConfig.from_config(config.model)
    micro = config.microbatches
    cpu = jax.devices("cpu")[:1]
    mesh = sharding.make_mesh((1, 1, 1), cpu)
    scan = jax.lax.scan

    def count(layers: int, decoder_layers: int | None = None) -> float:
        overrides = {"model.num_layers": layers, "microbatches": 1,
                     "batch_size": config.batch_size // micro, "mesh.shape": (1, 1, 1)}
        if decoder_layers is not None:
            overrides["model.num_decoder_layers"] = decoder_layers
        c = with_overrides(config, **overrides)
        built = steps.build(c, mesh)
        with mock.patch.object(jax.lax, "scan", functools.partial(scan, unroll=True)), \
                sharding.use_mesh(mesh, c.sharding_rules):
            lowered = built.train_step.lower(built.abstract_state, steps.abstract_batch(c, built))
        return float(_cost(lowered.cost_analysis()).get("flops", math.nan))

    if model_cfg.family == "encoder_decoder":
        f11, f21, f12 = count(1, 1), count(2, 1), count(1, 2)
        per_enc, per_dec = f21 - f11, f12 - f11
        total = f11 + (model_cfg.num_layers - 1) * per_enc + (
            (model_cfg.num_decoder_layers or model_cfg.num_layers) - 1) * per_dec
        per_layer = per_enc + per_dec
    else:
        f1, f2 = count(1), count(2)
        per_layer = f2 - f1
        total = f1 + (model_cfg.num_layers - 1) * per_layer
    # The optimizer update runs once per step, not per micro-batch; it is a rounding error next
    # to the matmuls, so the whole micro-batch's count is repeated.
    return {"per_step": micro * total, "per_layer": micro * per_layer}


def plan(config, *, devices: Sequence | None = None, topology: str | None = None,
         num_slices: int = 1, chip: str | None = None, count_layers: bool = True) -> dict:
    """Compiles `config`'s train step for `topology` (TPU, via libtpu) or over `devices` (default:
    all local devices) and returns the plan as a dict (see the module docstring)."""
    import jax  # pylint: disable=g-import-not-at-top
    from llmjax import metrics, sharding, steps  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_threefry_partitionable", True)
    spec = None
    if topology:
        spec, devices = topology_devices(topology, num_slices)
    devices = list(devices if devices is not None else jax.devices())
    kind = devices[0].device_kind
    hw = find_chip(chip) if chip else find_chip(kind)
    if chip and hw is None:
        raise PlanError(f"--chip={chip!r} is not in the chip table; use one of "
                        f"{', '.join(c.name for c in CHIPS)}.")
    mesh = sharding.mesh_from_config(config, devices, num_slices=num_slices)
    # Built outside the mesh context: optax.tree_map_params runs tx.init eagerly, which cannot run
    # on compile-only TPU devices.
    built = steps.build(config, mesh)
    batch = steps.abstract_batch(config, built)
    state = built.abstract_state
    model_cfg = built.model_cfg
    out: dict[str, Any] = {
        "platform": devices[0].platform, "device_kind": kind,
        "topology": spec.topology if spec else None, "slice": topology,
        "num_slices": num_slices, "devices": len(devices),
        "chips": spec.chips * num_slices if spec else len(devices),
        "chip": hw.name if hw else None,
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
        "family": model_cfg.family, "params": steps.count_params(model_cfg)["params"],
        "dtype": model_cfg.dtype, "remat": model_cfg.remat_policy,
        "batch_size": config.batch_size, "seq_len": config.seq_len,
        "microbatches": config.microbatches,
        # From the shard shapes of the sharded abstract state (what each device must hold).
        "param_bytes": _device_bytes(state["params"]),
        "opt_state_bytes": _device_bytes(state["opt_state"]) + _device_bytes(state["step"]),
        "batch_bytes": _device_bytes(batch),
        "hbm_bytes": hw.hbm_bytes if hw else None,
    }
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh, config.sharding_rules):
        lowered = built.train_step.lower(state, batch)
    try:
        compiled = lowered.compile()
        error = None
    except Exception as e:  # pylint: disable=broad-except
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
            raise
        compiled, error = None, message
    out["compile_s"] = round(time.perf_counter() - t0, 1)

    if compiled is not None:
        mem = compiled.memory_analysis()
        out.update(
            argument_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
            code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)))
        out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                             + out["temp_bytes"])
        cost = _cost(compiled.cost_analysis())
        out["compiled_flops_per_device"] = float(cost.get("flops", math.nan))
        out["compiled_bytes_accessed_per_device"] = float(cost.get("bytes accessed", math.nan))
        out["fits"] = None if hw is None else out["peak_bytes"] <= hw.hbm_bytes
    else:
        # No memory analysis; the refusal names the temporaries (or the total) and the capacity.
        oom = _parse_oom(error)
        if "temp_bytes" in oom:
            oom["peak_bytes"] = (out["param_bytes"] + out["opt_state_bytes"] + out["batch_bytes"]
                                 + oom["temp_bytes"])
        elif "used_bytes" in oom:
            oom["peak_bytes"] = oom.pop("used_bytes")
        out.update(oom, fits=False, compile_error=error.strip().splitlines()[0][:300])

    tokens = config.batch_size * config.seq_len
    target_len = steps.batch_shapes(config, model_cfg)["targets"][1]
    fpt = steps.flops_per_token(model_cfg, config.seq_len, target_len)
    out["formula_flops_per_step"] = float(fpt * tokens)
    if count_layers:
        counted = layer_flops(config)
        out["counted_flops_per_step"] = counted["per_step"]

    if hw is not None:
        out.update(roofline(out, hw))
    out["advice"] = advice(config, out, spec)
    return out


def largest_batch(config, *, limit: int = 1 << 16, budget_bytes: float | None = None,
                  **plan_kwargs) -> dict:
    """The largest global batch_size whose compiled step fits the chip's HBM (or `budget_bytes`),
    everything else as configured: doubles the batch from one row per data-parallel device and
    micro-batch until a plan does not fit (or `limit`), then bisects between the last fit and the
    first miss. Each probe is one compile (`plan`, without the FLOPs count). Returns
    {"batch_size": the largest that fits (0: not even the smallest), "unit", "budget_bytes",
    "probes": [{"batch_size", "peak_bytes", "fits"}, ...]}."""
    from llmjax import sharding  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top

    devices = plan_kwargs.pop("devices", None)
    topology, num_slices = plan_kwargs.get("topology"), plan_kwargs.get("num_slices", 1)
    if topology:
        _, devices = topology_devices(topology, num_slices)
    devices = list(devices if devices is not None else jax.devices())
    mesh = sharding.mesh_from_config(config, devices, num_slices=num_slices)
    rules = tuple(sharding.rules_from_config(config.sharding_rules))
    unit = sharding.data_parallel_size(mesh, rules) * config.microbatches
    probes: list[dict] = []

    def fits(rows: int) -> bool:
        p = plan(with_overrides(config, batch_size=rows), count_layers=False,
                 devices=None if topology else devices, **plan_kwargs)
        budget = budget_bytes if budget_bytes is not None else p["hbm_bytes"]
        if budget is None:
            raise PlanError("the largest batch needs a memory size: give --chip (or a budget).")
        ok = bool(p.get("peak_bytes") is not None and p["peak_bytes"] <= budget)
        probes.append({"batch_size": rows, "peak_bytes": p.get("peak_bytes"), "fits": ok,
                       "budget_bytes": budget})
        return ok

    good, bad = 0, None
    rows = unit
    while rows <= limit:
        if not fits(rows):
            bad = rows
            break
        good, rows = rows, rows * 2
    if bad is not None and good:
        while bad - good > unit:  # both multiples of unit
            mid = (good + bad) // 2 // unit * unit
            if fits(mid):
                good = mid
            else:
                bad = mid
    return {"batch_size": good, "unit": unit, "limit": limit,
            "budget_bytes": probes[-1]["budget_bytes"] if probes else budget_bytes,
            "probes": probes}


def roofline(p: dict, hw: Chip) -> dict:
    """Step time >= max(FLOPs / peak, HBM bytes / bandwidth) per device: no communication, perfect
    overlap, so a lower bound on time and an upper bound on MFU."""
    flops = p.get("counted_flops_per_step")
    flops = (flops / p["devices"]) if flops else p.get("compiled_flops_per_device")
    if not flops or math.isnan(flops):
        return {}
    t_compute = flops / hw.peak_flops
    # The compiled count of bytes also sees a scanned layer once: a lower bound on the traffic.
    bytes_ = p.get("compiled_bytes_accessed_per_device") or 0.0
    t_memory = bytes_ / hw.hbm_bandwidth
    t = max(t_compute, t_memory)
    return {"estimated_step_s": t, "estimated_compute_s": t_compute,
            "estimated_memory_s": t_memory,
            "estimated_mfu": p["formula_flops_per_step"] / (t * p["devices"] * hw.peak_flops)}


def _next_slice(spec: Slice, factor: float) -> str:
    chips = spec.chips
    while chips < spec.chips * factor:
        chips *= 2
    return f"{spec.generation}-{chips * CORES_PER_CHIP[spec.generation]}"


def advice(config, p: dict, spec: Slice | None) -> list[str]:
    """Concrete config overrides when the plan does not fit (empty when it does or is unknown)."""
    if p.get("fits") is not False:
        return []
    hbm = p.get("compiler_hbm_bytes") or p.get("hbm_bytes")
    peak, temps = p.get("peak_bytes"), p.get("temp_bytes")
    args = p["param_bytes"] + p["opt_state_bytes"] + p["batch_bytes"]
    tips = []
    if p["remat"] != "full":
        tips.append("recompute activations in the backward pass: --config.model.remat_policy=full")
    mesh = p["mesh"]
    if mesh["data"] > p["num_slices"]:
        tips.append(f"shard parameters and optimizer state over every device (FSDP): "
                    f"--config.mesh.shape=\"(1,-1,{mesh['tensor']})\"")
    # Temporaries hold the gradients (about the parameters' bytes) and the activations; only the
    # activations shrink with micro-batches, into what HBM leaves after state and gradients.
    if hbm and temps:
        room = 0.85 * hbm - args - p["param_bytes"]
        activations = temps - p["param_bytes"]
        dp = mesh["data"] * mesh["fsdp"]
        if room > 0 and activations > room:
            want = config.microbatches * math.ceil(activations / room)
            fitting = [m for m in range(want, config.batch_size // dp + 1)
                       if config.batch_size % (m * dp) == 0]
            if fitting:
                tips.append(f"split the batch into micro-batches (gradient accumulation): "
                            f"--config.microbatches={fitting[0]} (activations about "
                            f"{activations / GiB:,.0f} GiB per device now)")
    if spec is not None and hbm and peak:
        factor = peak / (0.85 * hbm)
        tips.append(f"or a bigger slice: --topology={_next_slice(spec, max(factor, 2))} (about "
                    f"{factor:.1f}x this slice's memory is needed as configured)")
    elif hbm and peak:
        tips.append(f"or about {peak / (0.85 * hbm):.1f}x the devices")
    return tips


# ---------------------------------------------------------------------------------------------
# Printing


def _gib(x) -> str:
    if x is None:
        return "?"
    if x < 2**20:
        return f"{x / 2**10:,.1f} KiB"
    if x < GiB:
        return f"{x / 2**20:,.1f} MiB"
    return f"{x / GiB:,.1f} GiB"


def _secs(x: float) -> str:
    return f"{x:.3g} s" if x >= 1 else f"{1e3 * x:.3g} ms"


def _flops(x) -> str:
    return "?" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3e}"


def format_plan(p: dict) -> str:
    slices = f" in {p['num_slices']} slices" if p["num_slices"] > 1 else ""
    where = (f"{p['slice']} ({p['topology']}, {p['chips']} chips{slices})"
             if p["topology"] else f"{p['devices']} {p['platform']} devices")
    lines = [
        f"{p['family']} {p['params']:,} params, batch {p['batch_size']}x{p['seq_len']} "
        f"{p['dtype']}, remat {p['remat']}, microbatches {p['microbatches']} on {where}, "
        f"mesh {p['mesh']}",
        f"  {'compiled' if 'argument_bytes' in p else 'refused'} in {p['compile_s']:.1f} s "
        f"for {p['device_kind']}"
        + (f" (judged as {p['chip']})" if p["chip"] else " (no chip to judge it against; "
           "pass --chip)"),
        "  per device:",
        f"    parameters          {_gib(p['param_bytes'])}",
        f"    optimizer state     {_gib(p['opt_state_bytes'])}",
        f"    batch               {_gib(p['batch_bytes'])}",
    ]
    if "argument_bytes" in p:
        lines += [
            f"    compiler: arguments {_gib(p['argument_bytes'])}, outputs {_gib(p['output_bytes'])}"
            f" ({_gib(p['alias_bytes'])} aliased to donated arguments), temporaries "
            f"(activations, gradients, workspace) {_gib(p['temp_bytes'])}",
            f"    peak                {_gib(p['peak_bytes'])}"
            + (f" of {_gib(p['hbm_bytes'])} HBM" if p["hbm_bytes"] else ""),
        ]
    else:
        lines.append(f"    the compiler refused: {p.get('compile_error', '')}")
        if p.get("peak_bytes"):
            lines.append(f"    peak (from the refusal) about {_gib(p['peak_bytes'])} of "
                         f"{_gib(p.get('compiler_hbm_bytes') or p['hbm_bytes'])} HBM")
    if p["fits"] is not None:
        spare = (p["hbm_bytes"] - p["peak_bytes"]) if p.get("peak_bytes") else None
        lines.append(f"  fits: {'yes' if p['fits'] else 'NO'}"
                     + (f" ({_gib(spare)} to spare)" if p["fits"] and spare is not None else ""))
        if not p["fits"] and "argument_bytes" in p and p["platform"] == "tpu":
            lines.append("  (XLA:TPU compiled it anyway: it refuses only when the temporaries "
                         "alone exceed HBM)")
    lines.append("  FLOPs per step (all devices):")
    lines.append(f"    formula 6N + 12LHQT x tokens     {_flops(p['formula_flops_per_step'])}")
    if "counted_flops_per_step" in p:
        lines.append(f"    XLA count, every layer           {_flops(p['counted_flops_per_step'])}"
                     "  (1- and 2-layer unrolled lowerings extrapolated; "
                     "includes any remat recompute)")
    if "compiled_flops_per_device" in p:
        lines.append(f"    compiled cost_analysis x devices "
                     f"{_flops(p['compiled_flops_per_device'] * p['devices'])}"
                     "  (counts a scanned loop body once: not the step's total)")
    if "estimated_step_s" in p:
        lines.append(
            f"  ESTIMATE (roofline: no communication, perfect overlap): step >= "
            f"{_secs(p['estimated_step_s'])} (compute {_secs(p['estimated_compute_s'])}, HBM >= "
            f"{_secs(p['estimated_memory_s'])}), MFU <= {100 * p['estimated_mfu']:.0f}%")
    if p["advice"]:
        lines.append("  it does not fit; change one of:")
        lines += [f"    - {tip}" for tip in p["advice"]]
    return "\n".join(lines)


def format_largest_batch(found: dict) -> str:
    lines = [f"  batch_size {p['batch_size']:>6}: peak {_gib(p['peak_bytes'])} of "
             f"{_gib(p['budget_bytes'])} -> {'fits' if p['fits'] else 'does not fit'}"
             for p in found["probes"]]
    if found["batch_size"]:
        lines.append(f"largest global batch_size that fits: {found['batch_size']} (a multiple of "
                     f"{found['unit']}, the data-parallel devices x micro-batches); train with "
                     f"--config.batch_size={found['batch_size']}")
    else:
        lines.append(f"not even batch_size {found['unit']} fits: see the plan's advice "
                     "(describe without --max_batch) for remat, fsdp or a bigger slice")
    return "\n".join(lines)
