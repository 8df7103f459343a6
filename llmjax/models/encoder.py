"""Bidirectional encoders trained by masked language modelling: BERT and RoBERTa.

Call convention (as every family):
    logits = model(tokens, segment_ids=None, positions=None, dropout_key=None, token_types=None)
tokens, segment_ids, positions, token_types: int [batch, length]. Every token attends to every
non-padding token of its own segment (segment 0 is padding); positions restart at 0 in each
segment. Returns float32 MLM logits [batch, length, vocab] at every position; the loss weights
pick the masked ones. `encode` gives the hidden states and `pool` BERT's pooled first token.

The `model` config section chooses the style:
    BERT:    post_norm=True, norm='layernorm', norm_eps=1e-12, activation='gelu_exact',
             position='learned', type_vocab_size=2, pooler=True, tie_embeddings=True
    RoBERTa: as BERT with type_vocab_size=1 (a single token type, kept so weights map one to one
             onto Hugging Face's) and position_offset=2 (its positions start after the pad row).
The MLM head is BERT's: a dense transform with the activation, a LayerNorm, then the (tied)
token table plus an output bias. Parameter names map onto Hugging Face's BertModel one to one:
token_embed ~ word_embeddings, encoder/pos_embed ~ position_embeddings, encoder/type_embed ~
token_type_embeddings, encoder/embed_norm ~ embeddings.LayerNorm, encoder/layers/* ~
encoder.layer.N (stacked on a leading axis), pooler ~ pooler.dense, mlm_* ~ cls.predictions.

Sequence classification (`model.num_labels > 0`, as Hugging Face's BertForSequenceClassification):
    logits = model(tokens, ...)  # float32 [batch, num_labels]
the first token's hidden state ([CLS]; llmjax rows start with bos) goes through the pooler (when
`model.pooler`, else it is used as it is), dropout (`model.dropout_rate`), then `classifier`, a
Linear d_model -> num_labels. The MLM head is not built then: a classifier has no use for it, and
fine-tuning from an MLM checkpoint (`init_from`) leaves its MLM parameters on disk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models import layers as L
from llmjax.models.decoder import dtype_of
from llmjax.sharding import constrain

# Parameters used only by the pretraining objective: Hugging Face's base model (and published
# parameter counts) leave them out.
PRETRAINING_HEADS = ("mlm_transform", "mlm_norm", "mlm_bias")


class Encoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.token_embed = L.Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs,
                                   init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype)
        self.encoder = L.Stack(cfg, num_layers=cfg.num_layers, causal=False, cross=False, rngs=rngs)
        dense = dict(rngs=rngs, init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype)
        # d_model -> d_model maps name their output "mlp" (sharded like an MLP's hidden layer):
        # two "embed" axes would ask for the same mesh axis twice.
        self.pooler = (L.Linear((cfg.d_model,), (cfg.d_model,), ("embed", "mlp"), use_bias=True,
                                **dense) if cfg.pooler else None)
        if cfg.num_labels:
            # A handful of labels: replicated (None), not split over the tensor axis.
            self.classifier = L.Linear((cfg.d_model,), (cfg.num_labels,), ("embed", None),
                                       use_bias=True, **dense)
            return
        self.mlm_transform = L.Linear((cfg.d_model,), (cfg.d_model,), ("embed", "mlp"),
                                      use_bias=cfg.use_bias, **dense)
        self.mlm_norm = L.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, use_bias=cfg.use_bias,
                                    rngs=rngs, dtype=dtype, param_dtype=pdtype)
        self.lm_head = None if cfg.tie_embeddings else L.Linear(
            (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False, **dense)
        self.mlm_bias = L.param(rngs, nnx.initializers.zeros, (cfg.vocab_size,), ("vocab",), pdtype)

    def encode(self, tokens, segment_ids=None, positions=None, dropout_key=None, token_types=None):
        """Hidden states [batch, length, d_model] in the compute dtype."""
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.token_embed(tokens)
        return self.encoder(x, segment_ids, positions, token_types=token_types,
                            dropout_key=dropout_key)

    def pool(self, hidden):
        """BERT's pooled representation: tanh(dense(first token)), for classification heads."""
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def classify(self, tokens, segment_ids=None, positions=None, dropout_key=None,
                 token_types=None):
        """Class logits, float32 [batch, num_labels], from the pooled first token."""
        keys = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        hidden = self.encode(tokens, segment_ids, positions, keys[0], token_types)
        pooled = self.pool(hidden) if self.pooler is not None else hidden[:, 0]
        pooled = L.dropout(pooled, self.cfg.dropout_rate, keys[1])
        return self.classifier(pooled).astype(jnp.float32)

    def __call__(self, tokens, segment_ids=None, positions=None, dropout_key=None, token_types=None):
        if self.cfg.num_labels:
            return self.classify(tokens, segment_ids, positions, dropout_key, token_types)
        x = self.encode(tokens, segment_ids, positions, dropout_key, token_types)
        act = L.MLP_ACTIVATIONS[self.cfg.activation][0]
        x = self.mlm_norm(act(self.mlm_transform(x)))
        if self.lm_head is None:
            logits = self.token_embed.attend(x)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        logits = logits + self.mlm_bias[...].astype(jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))
