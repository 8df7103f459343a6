"""The multimodal family: a decoder reading images and text in one sequence (PaliGemma's prefix-LM).

Call convention (the text part of every family's, plus the images):
    logits = model(tokens, segment_ids, positions, dropout_key=None,
                   images=images, image_segment_ids=image_segment_ids)
tokens, segment_ids, positions: int [B, L] packed text rows as for the decoder (segment 0 is
padding, positions restart at 0 per segment). images: float32 [B, M, H, W, 3] in [-1, 1];
image_segment_ids: int [B, M], the text segment each image slot belongs to (0: an empty slot).
Returns float32 logits for the text part only, [B, L, vocab], aligned with the text targets.

The decoder sees [M * num_patches image tokens] + [L text tokens]; the image tokens are the ViT's
(models/vision.py) projected into d_model. Mask (prefix-LM per segment): an image token of segment
s attends bidirectionally to the image tokens of segment s; a text token of segment s attends to
all image tokens of segment s and causally to the text of segment s; nothing crosses segments and
empty slots are never attended to. Image tokens of a segment take positions 0.. in slot order, and
its text continues after them (text position + the segment's image tokens), for learned positions
and RoPE alike.

Decoding (llmjax/generate.py): `prefill` writes the image prefix and the prompt into the decoder's
KV cache in one pass with the prefix-LM mask; the text then decodes through `Decoder.__call__`
with the cache, as a text decoder does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models import layers as L
from llmjax.models.decoder import Decoder
from llmjax.models.vision import ViT
from llmjax.sharding import constrain


def image_layout(image_segment_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 num_patches: int):
    """(image token segments [B, M*P], image token positions [B, M*P], text positions [B, L]):
    the k-th image of a segment holds positions k*P .. k*P+P-1, and the segment's text is shifted
    by P times the segment's images."""
    m = image_segment_ids.shape[1]
    real = image_segment_ids != 0
    same = (image_segment_ids[:, :, None] == image_segment_ids[:, None, :]) & real[:, None, :]
    rank = jnp.sum(same & jnp.tril(jnp.ones((m, m), bool), -1)[None], axis=-1)  # [B, M]
    image_pos = (rank[:, :, None] * num_patches + jnp.arange(num_patches)).reshape(
        image_segment_ids.shape[0], m * num_patches)
    image_pos = jnp.where(jnp.repeat(real, num_patches, axis=1), image_pos, 0)
    count = jnp.sum((segment_ids[:, :, None] == image_segment_ids[:, None, :])
                    & real[:, None, :], axis=-1)  # [B, L] images of each text token's segment
    text_pos = jnp.where(segment_ids != 0, positions + count * num_patches, positions)
    return jnp.repeat(image_segment_ids, num_patches, axis=1), image_pos, text_pos


def prefix_lm_mask(image_segments: jax.Array, text_segments: jax.Array) -> jax.Array:
    """Boolean [B, 1, 1, T, T] over [image tokens] + [text tokens] (T = M*P + L)."""
    segments = jnp.concatenate([image_segments, text_segments], axis=1)
    n_img, t = image_segments.shape[1], segments.shape[1]
    is_image = jnp.arange(t) < n_img
    causal = jnp.tril(jnp.ones((t, t), bool))
    # Every query may see the image keys (bidirectional prefix) and earlier text keys.
    visible = is_image[None, :] | (causal & ~is_image[:, None])
    mask = ((segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
            & visible[None])
    # A padding query sees itself only (no all-masked rows), as layers.attention_mask does.
    mask |= jnp.eye(t, dtype=bool) & (segments[:, :, None] == 0)
    return mask[:, None, None]


class MultimodalDecoder(Decoder):
    """`Decoder` (token table, blocks, final norm, head) plus a ViT whose tokens prefix the text."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.vision = ViT(cfg, rngs=rngs)

    def __call__(self, tokens, segment_ids=None, positions=None, dropout_key=None, cache=None, *,
                 images=None, image_segment_ids=None):
        """Without a cache: text logits [B, L, vocab] of the whole image + text sequence. With a
        cache (decoding after `prefill`): text tokens only, exactly as `Decoder`."""
        if cache is not None:
            return super().__call__(tokens, segment_ids, positions, cache=cache)
        return self.head(self.hidden(tokens, segment_ids, positions, dropout_key, images=images,
                                     image_segment_ids=image_segment_ids))

    def embed_all(self, tokens, segment_ids, positions, images, image_segment_ids,
                  dropout_key=None):
        """(x [B, T, d], segments [B, T], positions [B, T], layer keys): the image tokens of every
        slot followed by the text embeddings, with their positions added (learned) or returned
        for RoPE."""
        cfg = self.cfg
        if images is None or image_segment_ids is None:
            raise ValueError("model.family='multimodal' needs `images` [B, M, H, W, 3] and "
                             "`image_segment_ids` [B, M] with the text.")
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        b, m = image_segment_ids.shape
        keys = (jax.random.split(dropout_key, cfg.num_layers + 2) if dropout_key is not None
                else None)
        image = self.vision(images.reshape(b * m, *images.shape[2:]),
                            None if keys is None else keys[-1])
        image = image.reshape(b, m * cfg.num_patches, cfg.d_model)
        image_seg, image_pos, text_pos = image_layout(image_segment_ids, segment_ids, positions,
                                                      cfg.num_patches)
        x = jnp.concatenate([image.astype(self.token_embed.dtype), self.token_embed(tokens)], 1)
        all_pos = jnp.concatenate([image_pos, text_pos], axis=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed(all_pos)
        x = L.dropout(x, cfg.dropout_rate, None if keys is None else keys[-2])
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        segments = jnp.concatenate([image_seg, segment_ids], axis=1)
        return x, segments, all_pos, None if keys is None else keys[:cfg.num_layers]

    def hidden(self, tokens, segment_ids=None, positions=None, dropout_key=None, *, images=None,
               image_segment_ids=None):
        """Final normalised hidden states of the text part [B, L, d_model]."""
        x, segments, all_pos, keys = self.embed_all(tokens, segment_ids, positions, images,
                                                    image_segment_ids, dropout_key)
        n_img = segments.shape[1] - tokens.shape[1]
        mask = prefix_lm_mask(segments[:, :n_img], segments[:, n_img:])
        x = self._blocks(x, mask, all_pos, keys, causal=False)  # the prefix is bidirectional
        return self.final_norm(x[:, n_img:])

    def prefill(self, tokens, segment_ids, positions, images, image_segment_ids, cache):
        """Writes the image prefix and the prompt into an empty `cache` (image columns first,
        attending to each other bidirectionally); returns (text logits [B, L, vocab], cache).
        `positions` are the text's own (from 0); the image offset is added here."""
        x, segments, all_pos, _ = self.embed_all(tokens, segment_ids, positions, images,
                                                 image_segment_ids)
        n_img = segments.shape[1] - tokens.shape[1]
        logits, cache = self._decode(x, segments, all_pos, cache, prefix=n_img)
        return logits[:, n_img:], cache
