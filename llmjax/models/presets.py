"""Architecture styles, pretraining recipes and the `:runlocal` shrink of the encoder (BERT,
RoBERTa) and encoder-decoder (T5, BART) configs. A config file picks a style, adds its published
shape and applies a recipe (the decoder families keep theirs in llmjax/config.py)."""

from __future__ import annotations

import ml_collections

BERT_STYLE = dict(family="encoder", position="learned", norm="layernorm", norm_eps=1e-12,
                  activation="gelu_exact", use_bias=True, tie_embeddings=True, post_norm=True,
                  type_vocab_size=2, pooler=True, max_len=512, dropout_rate=0.1)
# RoBERTa: BERT's architecture; one token type (Hugging Face keeps the row), positions offset by
# the pad index + 1 (fairseq's convention), LayerNorm eps 1e-5.
ROBERTA_STYLE = dict(BERT_STYLE, norm_eps=1e-5, type_vocab_size=1, position_offset=2, max_len=512)
T5_STYLE = dict(family="encoder_decoder", position="relative", norm="rmsnorm", norm_eps=1e-6,
                activation="relu", use_bias=False, tie_embeddings=True, scale_attention=False,
                scale_decoder_output=True, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, max_len=512, dropout_rate=0.1, init="t5")
# T5 v1.1: gated GELU, untied head, no dropout in pretraining.
T5_V1_1_STYLE = dict(T5_STYLE, activation="gated_gelu", tie_embeddings=False,
                     scale_decoder_output=False, dropout_rate=0.0)
BART_STYLE = dict(family="encoder_decoder", position="learned", position_offset=2, norm="layernorm",
                  norm_eps=1e-5, activation="gelu_exact", use_bias=True, tie_embeddings=True,
                  post_norm=True, final_logits_bias=True, max_len=1024, dropout_rate=0.1)

# The output biases of the pretraining heads are biases too: no weight decay.
NO_DECAY = r"(^|/)(bias|scale|embedding|mlm_bias|final_logits_bias)$"


def bert_recipe(c: ml_collections.ConfigDict) -> None:
    """BERT (Devlin et al. 2019): batch 256 x 512, 1M steps, Adam lr 1e-4 (b2 0.999, wd 0.01),
    10k warmup then linear decay; static masking (one mask per document)."""
    c.seq_len, c.batch_size, c.total_steps = 512, 256, 1_000_000
    c.optim.update(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
                   warmup_steps=10_000, schedule="linear", min_lr_ratio=0.0, no_decay=NO_DECAY)
    c.data.objective, c.data.mask_dynamic = "mlm", False
    c.sample.max_new_tokens = 0  # an encoder does not generate


def roberta_recipe(c: ml_collections.ConfigDict, *, learning_rate: float, warmup_steps: int) -> None:
    """RoBERTa (Liu et al. 2019): batch 8k x 512, 500k steps, b2 0.98, eps 1e-6, wd 0.01, linear
    decay; dynamic masking (a new mask each time a sequence is seen)."""
    c.seq_len, c.batch_size, c.total_steps = 512, 8192, 500_000
    c.optim.update(learning_rate=learning_rate, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01,
                   warmup_steps=warmup_steps, schedule="linear", min_lr_ratio=0.0, no_decay=NO_DECAY)
    c.data.objective, c.data.mask_dynamic = "mlm", True
    c.sample.max_new_tokens = 0


def t5_recipe(c: ml_collections.ConfigDict) -> None:
    """T5 (Raffel et al. 2020): span corruption on 512 input tokens (114 targets), batch 128,
    2**19 steps, Adafactor at relative lr 1e-2 with inverse-square-root decay after 10k steps."""
    c.seq_len, c.batch_size, c.total_steps = 512, 128, 524_288
    c.optim.update(name="adafactor", learning_rate=1e-2, schedule="rsqrt", warmup_steps=10_000,
                   weight_decay=0.0, no_decay=NO_DECAY)
    c.data.objective = "span_corruption"
    c.sample.max_new_tokens = 0


def bart_recipe(c: ml_collections.ConfigDict, *, learning_rate: float) -> None:
    """BART (Lewis et al. 2020): text infilling (30%, Poisson 3 spans) plus sentence permutation,
    512-token documents, batch 8k, 500k steps, Adam b2 0.98, wd 0.01, linear decay."""
    c.seq_len, c.batch_size, c.total_steps = 512, 8000, 500_000
    c.optim.update(learning_rate=learning_rate, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01,
                   warmup_steps=10_000, schedule="linear", min_lr_ratio=0.0, no_decay=NO_DECAY)
    c.data.objective, c.data.permute_sentences = "text_infilling", 1.0
    c.sample.max_new_tokens = 0


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks an encoder or encoder-decoder config to train on a laptop CPU in minutes, keeping
    its architecture (norm placement, activation, positions, biases, tying, heads)."""
    m = c.model
    gated = m.activation == "gated_gelu"
    m.update(d_model=128, num_layers=2, num_heads=4, head_dim=0, vocab_size=2048, dtype="float32",
             remat_policy="none", dropout_rate=0.0)
    m.mlp_dim = 352 if gated else 512
    if m.family == "encoder_decoder":
        m.num_decoder_layers = 2
    if m.position == "learned":
        m.max_len = 128
    c.seq_len, c.batch_size, c.total_steps = 128, 16, 600
    c.log_every_steps, c.eval_every_steps, c.eval_steps = 50, 200, 8
    c.checkpoint_every_steps = 200
    c.optim.update(name="adamw", learning_rate=2e-3, b2=0.98, warmup_steps=50, weight_decay=0.01,
                   schedule="cosine", min_lr_ratio=0.1)
    c.data.tokenizer_train_chars = 3_000_000
    c.data.num_sentinels = 32  # a 128-token row has about 7 noise spans
    return c
