"""The vision tower of the multimodal family: a ViT (Dosovitskiy et al. 2020) as PaliGemma uses it.

    tokens = vit(images)   # images float32 [n, H, W, 3] in [-1, 1] -> [n, num_patches, d_model]

Each image is cut into patch_size x patch_size patches; a Linear over a patch's flattened pixels
is the strided patch embedding (the same map as a conv with stride = patch). Positions are a
learned table or the fixed 2-D sin-cos of big_vision (`model.vision_position`). The blocks are the
shared pre-LN `layers.Stack` (bidirectional, scanned over the `layers` axis, same remat policy and
logical names as the text stacks), followed by its final norm and a projection into the text
decoder's d_model, so image tokens enter the decoder like token embeddings.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from llmjax.models import ModelConfig
from llmjax.models import layers as L
from llmjax.sharding import constrain


def vision_config(cfg: ModelConfig) -> ModelConfig:
    """The ViT's own ModelConfig (an encoder stack) from the multimodal `model` section: the
    vision_* widths, the text model's norm, activation, bias, dtypes, init and remat policy."""
    return ModelConfig(
        family="encoder", vocab_size=1, d_model=cfg.vision_d_model, num_layers=cfg.vision_layers,
        num_heads=cfg.vision_heads, mlp_dim=cfg.vision_mlp_dim, max_len=cfg.num_patches,
        position="learned", norm=cfg.norm, norm_eps=cfg.norm_eps, activation=cfg.activation,
        use_bias=cfg.use_bias, dropout_rate=cfg.dropout_rate, init_std=cfg.init_std,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat_policy=cfg.remat_policy,
        attention="xla")


def patchify(images: jnp.ndarray, patch: int) -> jnp.ndarray:
    """[n, H, W, C] -> [n, (H/p)*(W/p), p*p*C], patches in row-major order."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def sincos_2d(side: int, width: int, temperature: float = 10_000.0) -> jnp.ndarray:
    """Fixed 2-D sin-cos positions [side*side, width] (big_vision's posemb_sincos_2d): a quarter
    of the channels each for sin/cos of the column and of the row, at geometric frequencies."""
    y, x = jnp.mgrid[:side, :side]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


class ViT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        from llmjax.models.decoder import dtype_of
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.cfg, self.vcfg = cfg, vision_config(cfg)
        p, vd = cfg.patch_size, cfg.vision_d_model
        kw = dict(use_bias=True, rngs=rngs, init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype)
        self.patch_embed = L.Linear((p * p * 3,), (vd,), ("patch", "embed"), **kw)
        self.stack = L.Stack(self.vcfg, num_layers=cfg.vision_layers, causal=False, cross=False,
                             rngs=rngs, own_positions=cfg.vision_position == "learned")
        self.proj = L.Linear((vd,), (cfg.d_model,), ("vision_embed", "embed"), **kw)

    def __call__(self, images: jnp.ndarray, dropout_key=None) -> jnp.ndarray:
        """images [n, H, W, 3] -> image tokens [n, num_patches, d_model] (compute dtype)."""
        cfg = self.cfg
        if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"images of shape {tuple(images.shape[1:])} do not match the model's "
                             f"({cfg.image_size}, {cfg.image_size}, 3) (model.image_size).")
        x = self.patch_embed(patchify(images, cfg.patch_size))
        if cfg.vision_position == "sincos2d":
            side = cfg.image_size // cfg.patch_size
            x = x + sincos_2d(side, cfg.vision_d_model).astype(x.dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        n, num = x.shape[:2]
        segments = jnp.ones((n, num), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(num), (n, num))
        x = self.stack(x, segments, positions, dropout_key=dropout_key)
        return constrain(self.proj(x), ("act_batch", "act_length", "act_embed"))
