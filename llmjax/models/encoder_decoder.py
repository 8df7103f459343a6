"""Encoder-decoder transformers trained by denoising: T5 (v1.0, v1.1) and BART.

Call convention:
    logits = model(tokens, segment_ids=None, positions=None, dropout_key=None, *,
                   decoder_tokens, decoder_segment_ids=None, decoder_positions=None)
The encoder reads `tokens` bidirectionally; the decoder reads `decoder_tokens` (the targets
shifted right) causally and cross-attends to the encoder output of the segment with the same id
(segment 0 is padding on both sides and is never attended to). Returns float32 logits
[batch, decoder_length, vocab]. `encode` and `decode` expose the two halves (for generation).

The `model` config section chooses the style:
    T5 v1.0: position='relative', norm='rmsnorm', norm_eps=1e-6, use_bias=False, activation='relu',
             scale_attention=False, tie_embeddings=True, scale_decoder_output=True
    T5 v1.1: as v1.0 with activation='gated_gelu', tie_embeddings=False, scale_decoder_output=False
    BART:    position='learned', position_offset=2, post_norm=True, activation='gelu_exact',
             use_bias=True, tie_embeddings=True, final_logits_bias=True
Names map onto Hugging Face's: token_embed ~ shared, encoder/decoder ~ the two stacks, their
relpos_bias ~ block[0].layer[0].SelfAttention.relative_attention_bias (T5), pos_embed ~
embed_positions (BART, 2 offset rows), embed_norm ~ layernorm_embedding, final_norm ~
final_layer_norm, lm_head ~ lm_head (untied T5 v1.1), final_logits_bias ~ final_logits_bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models import layers as L
from llmjax.models.decoder import dtype_of
from llmjax.sharding import constrain

# Pretraining-only parameters, left out of published counts (Hugging Face keeps BART's
# final_logits_bias as a buffer, not a parameter).
PRETRAINING_HEADS = ("final_logits_bias",)


def _defaults(tokens, segment_ids, positions):
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return segment_ids, positions


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        # T5X's token table is N(0, 1): rows are O(1) like the unit-scale activations they join.
        self.token_embed = L.Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs,
                                   init_std=1.0 if cfg.init == "t5" else cfg.init_std, dtype=dtype,
                                   param_dtype=pdtype)
        self.encoder = L.Stack(cfg, num_layers=cfg.num_layers, causal=False, cross=False, rngs=rngs)
        self.decoder = L.Stack(cfg, num_layers=cfg.decoder_layers, causal=True, cross=True, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else L.Linear(
            (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False, rngs=rngs,
            init_std=L.init_std(cfg, cfg.d_model, cfg.init_std), dtype=dtype, param_dtype=pdtype)
        self.final_logits_bias = (L.param(rngs, nnx.initializers.zeros, (cfg.vocab_size,), ("vocab",),
                                          pdtype) if cfg.final_logits_bias else None)

    def _embed(self, tokens):
        x = self.token_embed(tokens)
        return x * (self.cfg.d_model ** 0.5) if self.cfg.scale_embeddings else x

    def encode(self, tokens, segment_ids=None, positions=None, dropout_key=None):
        segment_ids, positions = _defaults(tokens, segment_ids, positions)
        return self.encoder(self._embed(tokens), segment_ids, positions, dropout_key=dropout_key)

    def init_cache(self, encoded, length: int) -> dict:
        """The decoder's cache for up to `length` target tokens: empty self-attention keys and
        values and every layer's cross-attention keys and values of `encoded`, computed once (see
        `layers.Stack.init_cache`)."""
        return self.decoder.init_cache(encoded, length)

    def decode(self, decoder_tokens, encoded, segment_ids, decoder_segment_ids=None,
               decoder_positions=None, dropout_key=None, cache=None):
        """Logits of the decoder tokens given the encoder output. With a `cache` (from
        `init_cache`; `encoded` may then be None), the tokens are written at its column
        cache["index"] and the call returns (logits, updated cache)."""
        decoder_segment_ids, decoder_positions = _defaults(decoder_tokens, decoder_segment_ids,
                                                           decoder_positions)
        x = self.decoder(self._embed(decoder_tokens), decoder_segment_ids, decoder_positions,
                         context=encoded, context_segments=segment_ids, dropout_key=dropout_key,
                         cache=cache)
        if cache is not None:
            x, cache = x
            return self._logits(x), cache
        return self._logits(x)

    def _logits(self, x):
        cfg = self.cfg
        if self.lm_head is None:
            if cfg.scale_decoder_output:
                # T5 ties the head to the input table, whose rows are O(1), not O(d**-0.5).
                x = x * (cfg.d_model ** -0.5)
            logits = self.token_embed.attend(x)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias[...].astype(jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def __call__(self, tokens, segment_ids=None, positions=None, dropout_key=None, *,
                 decoder_tokens, decoder_segment_ids=None, decoder_positions=None):
        segment_ids, positions = _defaults(tokens, segment_ids, positions)
        keys = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        encoded = self.encode(tokens, segment_ids, positions, keys[0])
        return self.decode(decoder_tokens, encoded, segment_ids, decoder_segment_ids,
                           decoder_positions, keys[1])
