"""Optimizers, learning-rate schedules, weight-decay masks and optimizer-state shardings.

Everything is built from the config's `optim` section (an `ml_collections.ConfigDict`); every key
is optional and read with `.get(key, default)`:

    name            "adamw" | "adafactor"
    learning_rate   peak learning rate (3e-4)
    b1, b2, eps     AdamW moments (0.9, 0.95, 1e-8)
    weight_decay    decoupled weight decay (0.1): each step subtracts lr(t) * weight_decay * param
    no_decay        regex searched in each parameter's '/'-joined path; matches get no decay
                    (default: biases, norm scales and embeddings)
    grad_clip_norm  clip gradients to this global norm first (1.0; 0 or None disables)
    schedule        "cosine" | "linear" | "constant" | "rsqrt" | "wsd"
    warmup_steps    linear warmup from 0 to the peak (0)
    min_lr_ratio    final lr / peak for cosine, linear and wsd (0.1)
    decay_fraction  share of all steps taken by wsd's final linear decay (0.2)
    freeze          regex searched in each parameter's '/'-joined path; matches are not trained
                    (e.g. "embedding$" freezes the token and position tables; '' trains all)
    mu_dtype        dtype of the first moment, e.g. "bfloat16" (None: the parameter's dtype)
    adafactor_factored (True), adafactor_decay_rate (0.8), adafactor_clipping_threshold (1.0),
    adafactor_min_dim_size_to_factor (128), adafactor_multiply_by_parameter_scale (True),
    adafactor_momentum (None: no first moment, which is where adafactor saves its memory)
                    passed to `optax.adafactor`; the defaults are optax's. With parameter scaling
                    the learning rate is relative (T5 used 1e-2 with rsqrt).

The optimizer's update count starts at 0, so with warmup the very first update uses lr 0.
"""

import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

DEFAULT_NO_DECAY = r"(^|/)(bias|scale|embedding)$"
SCHEDULES = ("cosine", "linear", "constant", "rsqrt", "wsd")
OPTIMIZERS = ("adamw", "adafactor")


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak over `warmup_steps`, then the configured shape."""
    name = optim_cfg.get("schedule", "cosine")
    peak = optim_cfg.get("learning_rate", 3e-4)
    warmup = int(optim_cfg.get("warmup_steps", 0))
    end = optim_cfg.get("min_lr_ratio", 0.1) * peak
    decay_steps = max(total_steps - warmup, 1)  # optax's decays need a positive length

    if name == "constant":
        after = optax.constant_schedule(peak)
    elif name == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif name == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif name == "rsqrt":
        # T5's inverse square root, scaled to meet the warmup at its end: peak * sqrt(warmup/step).
        ref = max(warmup, 1)
        after = lambda count: peak * jnp.sqrt(ref / jnp.maximum(count + warmup, ref))
    elif name == "wsd":
        decay_fraction = optim_cfg.get("decay_fraction", 0.2)
        stable_end = max(int(round(total_steps * (1 - decay_fraction))), warmup)
        after = optax.join_schedules(
            [optax.constant_schedule(peak),
             optax.linear_schedule(peak, end, max(total_steps - stable_end, 1))],
            [stable_end - warmup])
    else:
        raise ValueError(f"Unknown optim.schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")

    # A join rather than optax.warmup_*: warmup_constant_schedule(0, peak, 0) is 0 forever, while a
    # join at boundary 0 simply skips the warmup.
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path) -> str:
    """'layers/attn/query/kernel' from a jax key path."""
    return "/".join(_key_name(k) for k in path)


def decay_mask(params, no_decay_regex: str = DEFAULT_NO_DECAY):
    """A tree shaped like `params` (dict or `nnx.State`) with True where weight decay applies.

    NNX Variables are visited whole so that a path ends at the parameter's name rather than at
    the Variable's own `value` attribute; the mask keeps the Variable wrapper around its bool, so
    its structure equals that of `params`.
    """
    pattern = re.compile(no_decay_regex)

    def leaf_mask(path, leaf):
        decay = pattern.search(path_str(path)) is None
        return jax.tree.map(lambda _: decay, leaf)

    return jax.tree_util.tree_map_with_path(
        leaf_mask, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(optim_cfg, total_steps: int):
    """Returns `(tx, schedule)`. The mask is a callable, so tx is built before params exist."""
    schedule = make_schedule(optim_cfg, total_steps)
    name = optim_cfg.get("name", "adamw")
    weight_decay = optim_cfg.get("weight_decay", 0.1)
    no_decay = optim_cfg.get("no_decay", DEFAULT_NO_DECAY)
    mask = lambda params: decay_mask(params, no_decay)
    mu_dtype = optim_cfg.get("mu_dtype", None)

    if name == "adamw":
        opt = optax.adamw(
            schedule,
            b1=optim_cfg.get("b1", 0.9),
            b2=optim_cfg.get("b2", 0.95),
            eps=optim_cfg.get("eps", 1e-8),
            mu_dtype=mu_dtype,
            weight_decay=weight_decay,
            mask=mask)
    elif name == "adafactor":
        # optax.adafactor adds the decay after its lr scaling, so a constant rate would subtract
        # `rate * param` whatever the lr; scheduling the rate gives AdamW's lr(t) * wd * param.
        opt = optax.adafactor(
            schedule,
            min_dim_size_to_factor=optim_cfg.get("adafactor_min_dim_size_to_factor", 128),
            decay_rate=optim_cfg.get("adafactor_decay_rate", 0.8),
            multiply_by_parameter_scale=optim_cfg.get("adafactor_multiply_by_parameter_scale", True),
            clipping_threshold=optim_cfg.get("adafactor_clipping_threshold", 1.0),
            momentum=optim_cfg.get("adafactor_momentum", None),
            dtype_momentum=mu_dtype or jnp.float32,
            weight_decay_rate=(lambda count: weight_decay * schedule(count)) if weight_decay else None,
            factored=optim_cfg.get("adafactor_factored", True),
            weight_decay_mask=mask)
    else:
        raise ValueError(f"Unknown optim.name {name!r}; choose one of {', '.join(OPTIMIZERS)}.")

    clip = optim_cfg.get("grad_clip_norm", 1.0)
    tx = optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt
    if freeze := optim_cfg.get("freeze", ""):
        # Zeroing the frozen gradients first keeps them out of the clipping norm and the moments;
        # zeroing the final update removes the weight decay too. (optax.multi_transform would also
        # drop their optimizer slots, but its masked state breaks optax.tree_map_params, which
        # the optimizer-state shardings rely on.)
        frozen = optax.masked(optax.set_to_zero(), lambda params: freeze_mask(params, freeze))
        tx = optax.chain(frozen, tx, frozen)
    return tx, schedule


def freeze_mask(params, freeze_regex: str):
    """True where the regex is found in the parameter's '/'-joined path (kept frozen)."""
    pattern = re.compile(freeze_regex)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: pattern.search(path_str(path)) is not None, params)
    # (optax.tree_map_params calls init on a placeholder that is no parameter tree.)
    if isinstance(params, dict) and not any(jax.tree.leaves(labels)):
        raise ValueError(f"optim.freeze={freeze_regex!r} matches no parameter path (paths look like "
                         "'token_embed/embedding' or 'layers/attn/query/kernel'); fix the regex.")
    return labels


def opt_state_shardings(tx, abstract_params, param_shardings, replicated):
    """The sharding tree of `tx.init(params)`, with exactly the structure of its `eval_shape`.

    `optax.tree_map_params` finds the param-structured subtrees of the state by calling `tx.init`
    on a placeholder. Adafactor's factored statistics (`v_row`, `v_col`, and the `(1,)` dummies in
    `v`) come out of that as param-structured trees whose leaves are NOT param-shaped, so handing
    them the param's sharding gives specs of the wrong rank. A slot therefore takes its parameter's
    sharding only when the shapes agree; everything else (counts, factored row/column statistics,
    dummies) is replicated: factored statistics are O(rows + cols) per matrix, so that costs little.
    """
    abstract_state = jax.eval_shape(tx.init, abstract_params)

    def slot_sharding(slot, param, sharding):
        return sharding if slot.shape == param.shape else replicated

    return optax.tree_map_params(
        tx, slot_sharding, abstract_state, abstract_params, param_shardings,
        transform_non_params=lambda _: replicated)


def global_norm(tree) -> jax.Array:
    """L2 norm of all leaves, accumulated in float32 (bfloat16 sums of squares lose precision)."""
    return optax.tree.norm(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree))
