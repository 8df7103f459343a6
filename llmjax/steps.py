"""The model, optimizer and train state as pure functions, ready for `jax.jit` on a mesh.

`build(config, mesh)` returns everything the loop, the benchmark and the tests need: abstract
state with shardings, a sharded initialiser, and the jitted train and eval steps with explicit
in/out shardings and the state donated. Nothing here reads data or touches the filesystem.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import optim, sharding
from llmjax.losses import chunked_cross_entropy, cross_entropy
from llmjax.models import ModelConfig, build_model, resolve_attention

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
# Encoder-decoders add the decoder side; targets and weights are then decoder-length.
DECODER_KEYS = ("decoder_inputs", "decoder_segment_ids", "decoder_positions")
# The multimodal family adds the images of each row: images float32 [B, max_images, H, W, 3] in
# [-1, 1] and image_segment_ids int32 [B, max_images] (the text segment of each slot, 0: empty).
IMAGE_KEYS = ("images", "image_segment_ids")


def batch_keys(model_cfg: ModelConfig) -> tuple[str, ...]:
    extra = {"encoder_decoder": DECODER_KEYS, "multimodal": IMAGE_KEYS}
    return BATCH_KEYS + extra.get(model_cfg.family, ())


def batch_shapes(config, model_cfg: ModelConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Global [batch, length] of every batch key: all seq_len, except an encoder-decoder's decoder
    side, whose length the objective fixes (T5 span corruption: 114 targets for 512 inputs), and
    the multimodal images ([batch, max_images, size, size, 3]) and their segments ([batch,
    max_images])."""
    from llmjax.data.objectives import target_length  # pylint: disable=g-import-not-at-top
    model_cfg = model_cfg or ModelConfig.from_config(config.model)
    shapes = {k: (config.batch_size, config.seq_len) for k in batch_keys(model_cfg)}
    if model_cfg.family == "encoder_decoder":
        if config.data.get("task", "lm") == "seq2seq":  # fine-tuning: data.target_len (0: seq_len)
            decoder = (config.batch_size, config.data.get("target_len", 0) or config.seq_len)
        else:
            decoder = (config.batch_size, target_length(config.data, config.seq_len))
        shapes.update({k: decoder for k in DECODER_KEYS + ("targets", "weights")})
    if model_cfg.family == "multimodal":
        size = model_cfg.image_size
        shapes.update(images=(config.batch_size, model_cfg.max_images, size, size, 3),
                      image_segment_ids=(config.batch_size, model_cfg.max_images))
    if model_cfg.num_labels:
        # Sequence classification: one label per row, so one target and one weight (0: an empty
        # padding row); the loss and accuracy are then per example.
        shapes.update(targets=(config.batch_size, 1), weights=(config.batch_size, 1))
    return shapes


def forward(model, batch: dict, dropout_key=None) -> jax.Array:
    """The model's float32 logits for a batch, whatever its family (logits align with targets)."""
    if model.cfg.family == "encoder_decoder":
        return model(batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key,
                     decoder_tokens=batch["decoder_inputs"],
                     decoder_segment_ids=batch["decoder_segment_ids"],
                     decoder_positions=batch["decoder_positions"])
    if model.cfg.family == "multimodal":
        return model(batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key,
                     images=batch["images"], image_segment_ids=batch["image_segment_ids"])
    logits = model(batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key=dropout_key)
    if model.cfg.num_labels:  # [batch, num_labels] -> [batch, 1, num_labels], as targets [batch, 1]
        logits = logits[:, None, :]
    return logits


def abstract_model(model_cfg: ModelConfig):
    """(graphdef, abstract nnx.State with logical-axis metadata) without allocating weights."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    return nnx.split(model)


# Tables that are looked up rather than multiplied (and the output head, counted apart in FLOPs).
EMBEDDING_NAMES = ("token_embed", "pos_embed", "type_embed", "relpos_bias", "lm_head")
# Pretraining-only heads (BERT's MLM transform and bias, BART's logits bias): the published counts
# (Hugging Face's base models) leave them out.
PRETRAINING_HEADS = ("mlm_transform", "mlm_norm", "mlm_bias", "final_logits_bias")


def count_params(model_cfg: ModelConfig) -> dict[str, int]:
    """params: every trained parameter; non_embedding_params: without the tables and an untied
    head; backbone_params: without the pretraining-only heads, as published counts are given.
    Encoder-decoders add encoder_ and decoder_non_embedding_params (for FLOPs). The multimodal
    family counts its ViT apart: vision_params (all of it, in params and backbone_params too) and
    vision_non_embedding_params (without its position table); non_embedding_params is then the
    text decoder's alone."""
    _, state = abstract_model(model_cfg)
    counts = {"params": 0, "non_embedding_params": 0, "backbone_params": 0}
    if model_cfg.family == "encoder_decoder":
        counts.update(encoder_non_embedding_params=0, decoder_non_embedding_params=0)
    if model_cfg.family == "multimodal":
        counts.update(vision_params=0, vision_non_embedding_params=0)
    for path, var in nnx.to_flat_state(state):
        size = int(jnp.size(var))
        counts["params"] += size
        if not any(p in PRETRAINING_HEADS for p in path):
            counts["backbone_params"] += size
        if path[0] == "vision" and model_cfg.family == "multimodal":
            counts["vision_params"] += size
            if not any(p in EMBEDDING_NAMES for p in path):
                counts["vision_non_embedding_params"] += size
            continue
        if not any(p in EMBEDDING_NAMES for p in path):
            counts["non_embedding_params"] += size
            if path[0] in ("encoder", "decoder") and model_cfg.family == "encoder_decoder":
                counts[f"{path[0]}_non_embedding_params"] += size
    return counts


def flops_per_token(model_cfg: ModelConfig, seq_len: int, target_len: int | None = None) -> int:
    """Training FLOPs per (encoder) input token; see metrics.flops_per_token. An encoder counts
    like a decoder (its MLM head scores every position); an encoder-decoder counts both stacks
    per step and divides by the input tokens (target_len: the decoder side, default seq_len)."""
    from llmjax.metrics import flops_per_token as fpt
    if model_cfg.family == "encoder_decoder":
        from llmjax.metrics import encoder_decoder_flops_per_token
        counts = count_params(model_cfg)
        return encoder_decoder_flops_per_token(
            encoder_params=counts["encoder_non_embedding_params"],
            decoder_params=counts["decoder_non_embedding_params"], vocab_size=model_cfg.vocab_size,
            d_model=model_cfg.d_model, encoder_layers=model_cfg.num_layers,
            decoder_layers=model_cfg.decoder_layers, num_heads=model_cfg.num_heads,
            head_dim=model_cfg.head_dim, inputs_length=seq_len, targets_length=target_len or seq_len)
    if model_cfg.family == "multimodal":
        return multimodal_flops_per_token(model_cfg, seq_len)
    # A classifier has no output projection over the vocabulary (its head, once per sequence,
    # is in non_embedding_params).
    return fpt(non_embedding_params=count_params(model_cfg)["non_embedding_params"],
               vocab_size=0 if model_cfg.num_labels else model_cfg.vocab_size, d_model=model_cfg.d_model,
               num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
               head_dim=model_cfg.head_dim, seq_len=seq_len)


def multimodal_flops_per_token(model_cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs of a multimodal row per TEXT token (the tokens the loop counts in
    tokens_per_sec), in `metrics.flops_per_token`'s convention: the decoder's 6N and attention over
    all M*P + L positions it runs (image prefix included), the output head over the L text
    positions only, and the ViT's 6N and attention over every image slot (M images of P patches,
    empty slots too: they are computed), all divided by L."""
    from llmjax.metrics import flops_per_token as fpt
    counts = count_params(model_cfg)
    total = model_cfg.image_tokens + seq_len
    decoder = total * fpt(non_embedding_params=counts["non_embedding_params"], vocab_size=0,
                          d_model=model_cfg.d_model, num_layers=model_cfg.num_layers,
                          num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim, seq_len=total)
    head = 6 * model_cfg.vocab_size * model_cfg.d_model * seq_len
    vision = model_cfg.image_tokens * fpt(
        non_embedding_params=counts["vision_non_embedding_params"], vocab_size=0,
        d_model=model_cfg.vision_d_model, num_layers=model_cfg.vision_layers,
        num_heads=model_cfg.vision_heads,
        head_dim=model_cfg.vision_d_model // model_cfg.vision_heads, seq_len=model_cfg.num_patches)
    return (decoder + head + vision) // seq_len


def update_count(opt_state, step):
    """The updates the optimizer has applied, which is where its schedule stands: `step` less the
    skipped non-finite steps. Read from optax's own `count`; `step` when the state has none."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return found[0][1] if found else step


@dataclasses.dataclass
class Built:
    model_cfg: ModelConfig
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying the shardings (for restore)
    batch_sharding: NamedSharding
    init: Callable  # () -> sharded state
    train_step: Callable  # (state, batch) -> (state, metrics)
    eval_step: Callable  # (params, batch) -> metrics sums


def validate(config, mesh, model_cfg: ModelConfig):
    """Checks that need the mesh, with one-line errors naming the fix (before any compilation)."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    tensor = sizes["tensor"]
    for key, value in (("num_heads", model_cfg.num_heads), ("num_kv_heads", model_cfg.num_kv_heads)):
        if value % tensor:
            raise sharding.ShardingError(
                f"model.{key}={value} is not divisible by the tensor axis ({tensor}); set "
                f"--config.mesh.shape so its last entry divides {value}.")
    dp = sharding.data_parallel_size(mesh, tuple(config.sharding_rules))
    micro = config.microbatches
    if config.batch_size % micro:
        raise sharding.ShardingError(
            f"batch_size={config.batch_size} is not divisible by microbatches={micro}; "
            "choose a batch_size that is a multiple of microbatches.")
    if (config.batch_size // micro) % dp:
        raise sharding.ShardingError(
            f"batch_size={config.batch_size} (per micro-batch {config.batch_size // micro}) is not "
            f"divisible by the {dp} data-parallel devices (mesh data x fsdp); set --config.batch_size "
            f"to a multiple of {dp * micro}.")
    task = config.data.get("task", "lm")
    if config.loss_chunk:
        if model_cfg.family != "decoder":
            raise ValueError(f"loss_chunk={config.loss_chunk} applies to decoders only, not "
                             f"model.family={model_cfg.family!r}; set --config.loss_chunk=0.")
        if config.loss_chunk < 0 or config.seq_len % config.loss_chunk:
            raise ValueError(f"loss_chunk={config.loss_chunk} does not divide seq_len="
                             f"{config.seq_len}; set --config.loss_chunk to a divisor of it "
                             "(or 0 for the whole sequence).")
    if model_cfg.family not in ("decoder", "multimodal"):
        from llmjax.data.objectives import ENCODER_DECODER_OBJECTIVES
        objective = config.data.get("objective", "causal_lm")
        wanted = ENCODER_DECODER_OBJECTIVES if model_cfg.family == "encoder_decoder" else ("mlm",)
        # Fine-tuning tasks bring their own examples; the pretraining objective is not used.
        if task not in ("seq2seq", "classification") and objective not in wanted:
            raise ValueError(f"model.family={model_cfg.family!r} trains with data.objective in "
                             f"{wanted}, not {objective!r}; set --config.data.objective.")
        if model_cfg.position == "learned":
            longest = max(n for _, n in batch_shapes(config, model_cfg).values())
            if longest > model_cfg.max_len:
                raise ValueError(f"a sequence of {longest} tokens exceeds model.max_len="
                                 f"{model_cfg.max_len} (learned positions); lower seq_len or "
                                 "raise model.max_len.")
    elif model_cfg.position == "learned" and config.seq_len + model_cfg.image_tokens > model_cfg.max_len:
        images = (f" after {model_cfg.image_tokens} image tokens" if model_cfg.image_tokens else "")
        raise ValueError(f"seq_len={config.seq_len}{images} exceeds model.max_len="
                         f"{model_cfg.max_len} (learned positions); lower seq_len or raise "
                         "model.max_len.")


def build(config, mesh) -> Built:
    rules = sharding.rules_from_config(config.sharding_rules)
    # model.attention='auto' picks the kernel for the mesh's devices (TPU in an AOT compile too).
    model_cfg = resolve_attention(ModelConfig.from_config(config.model),
                                  mesh.devices.flat[0].platform, config.seq_len)
    validate(config, mesh, model_cfg)
    graphdef, abs_state = abstract_model(model_cfg)
    with nnx.logical_axis_rules(rules):
        param_sh = sharding.param_shardings(abs_state, mesh, rules)
    abs_params = nnx.to_pure_dict(abs_state)

    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    replicated = NamedSharding(mesh, P())
    state_sh = {
        "step": replicated,
        "params": param_sh,
        "opt_state": optim.opt_state_shardings(tx, abs_params, param_sh, replicated),
    }
    batch_sh = NamedSharding(mesh, sharding.batch_spec(mesh, rules))
    seed, micro, dropout = config.seed, config.microbatches, model_cfg.dropout_rate > 0
    loss_chunk = config.loss_chunk

    def init():
        # Created inside jit with out_shardings: each device materialises only its own shards.
        with nnx.use_eager_sharding(False):
            model = build_model(model_cfg, nnx.Rngs(params=seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def loss_sums(params, batch, key):
        # Only positions with weight 1 are scored: the objective's masked/corrupted ones, so
        # "accuracy" is the masked-token accuracy for masked LM.
        model = nnx.merge(graphdef, params)
        weights = batch["weights"].astype(jnp.float32)
        if loss_chunk:  # the [batch, length, vocab] logits are never whole (llmjax/losses.py)
            hidden = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"], key)
            loss_sum, count, correct = chunked_cross_entropy(
                model.head, hidden, batch["targets"], weights, loss_chunk)
        else:
            loss_sum, count, correct = cross_entropy(forward(model, batch, key),
                                                     batch["targets"], weights)
        return loss_sum, (count, correct)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def train_step(state, batch):
        params = state["params"]
        # Keys come from (seed, step): a resumed run draws exactly the keys it would have drawn.
        key = jax.random.fold_in(jax.random.key(seed), state["step"]) if dropout else None
        if micro == 1:
            (loss_sum, (count, correct)), grads = grad_fn(params, batch, key)
        else:
            # Row j*micro + i goes to micro-batch i: every micro-batch keeps the batch's sharding,
            # so splitting moves no data between devices.
            def split(x):
                x = x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(
                    x, NamedSharding(mesh, P(None, *batch_sh.spec)))
            micro_batches = jax.tree.map(split, batch)

            def accumulate(carry, xs):
                i, mb = xs
                mb_key = None if key is None else jax.random.fold_in(key, i)
                (l, (c, k)), g = grad_fn(params, mb, mb_key)
                acc_g, acc_l, acc_c, acc_k = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, acc_c + c, acc_k + k), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum, count, correct), _ = jax.lax.scan(
                accumulate, (zeros, 0.0, 0.0, 0.0), (jnp.arange(micro), micro_batches))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        loss, grad_norm = loss_sum / denom, optim.global_norm(grads)
        # A NaN/Inf loss or gradient leaves parameters and optimizer state as they were (only the
        # step advances, so the next batch and key are the ones an uninterrupted run would use);
        # the loop then stops or counts the skip (config.nonfinite). Finite steps are unchanged
        # bit for bit: the select picks the new values exactly.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                     "opt_state": keep(opt_state, state["opt_state"])}
        metrics = {"loss": loss, "accuracy": correct / denom,
                   "grad_norm": grad_norm, "learning_rate": schedule(update_count(state["opt_state"], state["step"])),
                   "loss_tokens": count,  # target tokens the loss scored (padding excluded)
                   "nonfinite": 1 - finite.astype(jnp.int32)}  # 1: this step's update was skipped
        return new_state, metrics

    def eval_step(params, batch):
        loss_sum, (count, correct) = loss_sums(params, batch, None)
        return {"loss_sum": loss_sum, "count": count, "correct": correct}

    batch_shardings = {k: batch_sh for k in batch_keys(model_cfg)}
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(init), state_sh)
    return Built(
        model_cfg=model_cfg, graphdef=graphdef, tx=tx, schedule=schedule, state_shardings=state_sh,
        abstract_state=abstract_state, batch_sharding=batch_sh,
        init=jax.jit(init, out_shardings=state_sh),
        train_step=jax.jit(train_step, in_shardings=(state_sh, batch_shardings),
                           out_shardings=(state_sh, replicated), donate_argnums=0),
        eval_step=jax.jit(eval_step, in_shardings=(state_sh["params"], batch_shardings),
                          out_shardings=replicated),
    )


def abstract_batch(config, built: Built) -> dict:
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "images" else jnp.int32,
                                    sharding=built.batch_sharding)
            for k, shape in batch_shapes(config, built.model_cfg).items()}
