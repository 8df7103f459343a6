"""Hugging Face families for the encoder (BERT, RoBERTa) and encoder-decoder (T5, BART) models.

Each is a `Family` of hf.py: config.json <-> our `model` section, and one `Tensor` table between
Hugging Face's names and ours (models/encoder.py, models/encoder_decoder.py). hf.py lists them
in its FAMILIES and owns reading and writing.

    BertForMaskedLM              bert.embeddings / bert.encoder.layer.N / bert.pooler, cls.predictions
    RobertaForMaskedLM           the same under roberta., the MLM head as lm_head.*
    T5ForConditionalGeneration   shared, encoder/decoder.block.N.layer.K, lm_head (v1.1)
    BartForConditionalGeneration model.shared, model.encoder/decoder.layers.N, final_logits_bias
"""

from __future__ import annotations

from llmjax.interop.table import Family, Tensor, _need, _require
from llmjax.models import ModelConfig


def _attention(names, ours: tuple[str, ...], m: ModelConfig, bias: bool,
               layers: int = 0) -> list[Tensor]:
    """The q, k, v and output projections (torch.nn.Linear, [out, in]) of one attention block,
    `names` in that order."""
    d, inner = m.d_model, m.num_heads * m.head_dim
    rows = []
    for name, mine, (out, inp) in zip(names, ("query", "key", "value", "out"),
                                      ((inner, d), (inner, d), (inner, d), (d, inner))):
        rows += _dense(name, out, inp, ours + (mine,), bias, layers)
    return rows


def _dense(name: str, out: int, inp: int, ours: tuple[str, ...], bias: bool = True,
           layers: int = 0) -> list[Tensor]:
    rows = [Tensor(name + ".weight", (out, inp), (ours + ("kernel",),), "linear", layers=layers)]
    if bias:
        rows.append(Tensor(name + ".bias", (out,), (ours + ("bias",),), layers=layers))
    return rows


def _layernorm(name: str, d: int, ours: tuple[str, ...], bias: bool = True,
               layers: int = 0) -> list[Tensor]:
    rows = [Tensor(name + ".weight", (d,), (ours + ("scale",),), layers=layers)]
    if bias:
        rows.append(Tensor(name + ".bias", (d,), (ours + ("bias",),), layers=layers))
    return rows


# ------------------------------------------------------------------------------------------------
# BERT and RoBERTa: post-LN encoder, learned positions (RoBERTa's start after its pad row), token
# types, the MLM head (dense + activation + LayerNorm, the tied token table, an output bias) and
# BERT's optional tanh pooler. BertForMaskedLM leaves the pooler out; checkpoints saved from
# BertForPreTraining or BertModel carry it, and then so does ours.

def _bert_to_model(hf: dict, offset: int) -> dict:
    kind = hf.get("model_type")
    _need(hf, "hidden_act", "gelu", f"llmjax's {kind} uses exact (erf) GELU")
    _need(hf, "position_embedding_type", "absolute", "llmjax's encoders use learned absolute "
          "positions")
    _need(hf, "is_decoder", False, "only the bidirectional encoder is supported")
    _need(hf, "add_cross_attention", False, "only the bidirectional encoder is supported")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    return dict(family="encoder", vocab_size=hf["vocab_size"], d_model=d,
                num_layers=hf["num_hidden_layers"], num_heads=n, head_dim=d // n,
                mlp_dim=hf["intermediate_size"], max_len=hf["max_position_embeddings"] - offset,
                position="learned", position_offset=offset, norm="layernorm",
                norm_eps=float(hf.get("layer_norm_eps", 1e-12)), activation="gelu_exact",
                use_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                post_norm=True, type_vocab_size=hf.get("type_vocab_size", 2), pooler=False,
                dropout_rate=0.0)


def _roberta_offset(hf: dict) -> int:
    # RoBERTa numbers positions from its pad id + 1 (fairseq's convention): rows 0..pad unused.
    pad = hf.get("pad_token_id")
    return (1 if pad is None else int(pad)) + 1


def _with_pooler(model: dict, names: frozenset) -> dict:
    return dict(model, pooler=any(n.endswith("pooler.dense.weight") for n in names))


def _bert_to_hf(m: ModelConfig, architecture: str) -> dict:
    _require(m, architecture, norm="layernorm", use_bias=True, post_norm=True,
             activation="gelu_exact", scale_attention=True, scale_embeddings=False,
             head_dim=m.d_model // m.num_heads)
    if m.type_vocab_size < 1:
        raise ValueError(f"model.type_vocab_size=0 cannot be written as Hugging Face's "
                         f"{architecture}, which always has token-type embeddings; set it to 1 "
                         "(RoBERTa) or 2 (BERT) before training.")
    out = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
               num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
               max_position_embeddings=m.max_len + m.position_offset,
               type_vocab_size=m.type_vocab_size, layer_norm_eps=m.norm_eps, hidden_act="gelu",
               position_embedding_type="absolute", tie_word_embeddings=m.tie_embeddings,
               hidden_dropout_prob=m.dropout_rate, attention_probs_dropout_prob=m.dropout_rate,
               initializer_range=m.init_std, is_decoder=False, add_cross_attention=False)
    if m.position_offset:  # RoBERTa: the pad id is what places the positions
        out["pad_token_id"] = m.position_offset - 1
    return out


def _bert_tensors(m: ModelConfig, head: str) -> list[Tensor]:
    """head: the MLM head's prefix, BERT's 'cls.' or RoBERTa's 'lm_head.'."""
    d, f, v = m.d_model, m.mlp_dim, m.vocab_size
    e, layer = ("encoder",), ("encoder", "layers")
    a = "encoder.layer.{i}.attention."
    rows = [Tensor("embeddings.word_embeddings.weight", (v, d), (("token_embed", "embedding"),)),
            Tensor("embeddings.position_embeddings.weight", (m.max_len + m.position_offset, d),
                   (e + ("pos_embed", "embedding"),)),
            Tensor("embeddings.token_type_embeddings.weight", (m.type_vocab_size, d),
                   (e + ("type_embed", "embedding"),)),
            *_layernorm("embeddings.LayerNorm", d, e + ("embed_norm",)),
            *_attention((a + "self.query", a + "self.key", a + "self.value", a + "output.dense"),
                        layer + ("attn",), m, True)]
    rows += _layernorm(a + "output.LayerNorm", d, layer + ("attn_norm",))
    rows += _dense("encoder.layer.{i}.intermediate.dense", f, d, layer + ("mlp", "wi"))
    rows += _dense("encoder.layer.{i}.output.dense", d, f, layer + ("mlp", "wo"))
    rows += _layernorm("encoder.layer.{i}.output.LayerNorm", d, layer + ("mlp_norm",))
    if m.pooler:
        rows += _dense("pooler.dense", d, d, ("pooler",))
    transform, norm = (("predictions.transform.dense", "predictions.transform.LayerNorm")
                       if head == "cls." else ("dense", "layer_norm"))
    rows += _dense(head + transform, d, d, ("mlm_transform",))
    rows += _layernorm(head + norm, d, ("mlm_norm",))
    # The output layer is `decoder` (a Linear with bias); a tied model ties decoder.bias to the
    # head's `bias`, an untied one uses decoder.bias and leaves `bias` unused.
    out = head + ("predictions." if head == "cls." else "")
    rows.append(Tensor(out + ("bias" if m.tie_embeddings else "decoder.bias"), (v,), (("mlm_bias",),)))
    if not m.tie_embeddings:
        rows.append(Tensor(out + "decoder.weight", (v, d), (("lm_head", "kernel"),), "linear"))
    return rows


_BERT_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids",
                 # BertForPreTraining's next-sentence head, and the output bias the model does not
                 # use (tied: decoder.bias copies bias; untied: bias is unused).
                 "cls.seq_relationship.weight", "cls.seq_relationship.bias",
                 "predictions.decoder.bias", "lm_head.decoder.bias", "cls.predictions.bias",
                 "lm_head.bias")

BERT = Family(
    model_type="bert", architecture="BertForMaskedLM",
    to_model=lambda hf: _bert_to_model(hf, 0),
    to_hf_config=lambda m: _bert_to_hf(m, "BertForMaskedLM"),
    tensors=lambda m: _bert_tensors(m, "cls."), prefixes=("bert.", ""), heads=("cls.",),
    tied_head="cls.predictions.decoder.weight", ignored=_BERT_IGNORED, from_files=_with_pooler,
    represents=lambda m: m.family == "encoder" and m.position_offset == 0,
    data=dict(objective="mlm", mask_dynamic=False),
    tokenizer="BERT's WordPiece vocabulary (vocab.txt)")

ROBERTA = Family(
    model_type="roberta", architecture="RobertaForMaskedLM",
    to_model=lambda hf: _bert_to_model(hf, _roberta_offset(hf)),
    to_hf_config=lambda m: _bert_to_hf(m, "RobertaForMaskedLM"),
    tensors=lambda m: _bert_tensors(m, "lm_head."), prefixes=("roberta.", ""),
    heads=("lm_head.",), tied_head="lm_head.decoder.weight", ignored=_BERT_IGNORED,
    from_files=_with_pooler,
    represents=lambda m: m.family == "encoder" and m.position_offset > 0,
    data=dict(objective="mlm", mask_dynamic=True),
    tokenizer="RoBERTa's byte-level BPE (vocab.json + merges.txt)")


# ------------------------------------------------------------------------------------------------
# T5: pre-RMSNorm blocks without biases or mean subtraction, unscaled attention, a relative
# position bias in the first layer of each stack (shared by all its layers), ReLU (v1.0) or gated
# GELU (v1.1). transformers 4 tied the head and scaled the decoder output by d_model**-0.5 unless
# tie_word_embeddings=False (v1.1); transformers 5 keeps the scaling as scale_decoder_outputs and
# unties the head whenever the file carries its own lm_head.weight.

_T5_ACTIVATIONS = {"relu": "relu", "gated-gelu": "gated_gelu"}


def _t5_to_model(hf: dict) -> dict:
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in _T5_ACTIVATIONS:
        raise ValueError(f"config.json has feed_forward_proj={ff!r}, which llmjax's T5 cannot "
                         f"represent; it supports {sorted(_T5_ACTIVATIONS)} (T5 v1.0 and v1.1).")
    _need(hf, "is_decoder", False, "convert the full T5ForConditionalGeneration")
    tied = hf.get("tie_word_embeddings", True) is not False
    layers = hf["num_layers"]
    decoder_layers = hf.get("num_decoder_layers") or layers
    return dict(family="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
                num_layers=layers, num_decoder_layers=0 if decoder_layers == layers else decoder_layers,
                num_heads=hf["num_heads"], head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], max_len=512,
                position="relative",
                relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
                relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
                norm="rmsnorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
                activation=_T5_ACTIVATIONS[ff], use_bias=False, tie_embeddings=tied,
                scale_attention=False,
                scale_decoder_output=bool(hf.get("scale_decoder_outputs", tied)), dropout_rate=0.0,
                init="t5")


def _t5_untie(model: dict, names: frozenset) -> dict:
    return dict(model, tie_embeddings=False) if "lm_head.weight" in names else model


def _t5_to_hf(m: ModelConfig) -> dict:
    _require(m, "T5ForConditionalGeneration", norm="rmsnorm", use_bias=False, post_norm=False,
             scale_attention=False, scale_embeddings=False, position_offset=0,
             final_logits_bias=False)
    ff = {v: k for k, v in _T5_ACTIVATIONS.items()}.get(m.activation)
    if ff is None:
        raise ValueError(f"model.activation={m.activation!r} cannot be written as Hugging Face's "
                         f"T5, which has {sorted(_T5_ACTIVATIONS.values())}.")
    # transformers 4 reads tie_word_embeddings as "tied head and scaled output" (v1.0) or neither
    # (v1.1); transformers 5 reads scale_decoder_outputs and unties a head the file carries.
    return dict(vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.head_dim, d_ff=m.mlp_dim,
                num_layers=m.num_layers, num_decoder_layers=m.decoder_layers,
                num_heads=m.num_heads,
                relative_attention_num_buckets=m.relative_attention_num_buckets,
                relative_attention_max_distance=m.relative_attention_max_distance,
                layer_norm_epsilon=m.norm_eps, feed_forward_proj=ff,
                tie_word_embeddings=m.tie_embeddings and m.scale_decoder_output,
                scale_decoder_outputs=m.scale_decoder_output, dropout_rate=m.dropout_rate,
                initializer_factor=1.0, is_encoder_decoder=True, decoder_start_token_id=0)


def _t5_tensors(m: ModelConfig) -> list[Tensor]:
    d, f, gated = m.d_model, m.mlp_dim, m.activation == "gated_gelu"
    rows = [Tensor("shared.weight", (m.vocab_size, d), (("token_embed", "embedding"),))]
    for stack, layers in (("encoder", m.num_layers), ("decoder", m.decoder_layers)):
        s, blk = (stack, "layers"), f"{stack}.block.{{i}}.layer."
        rows.append(Tensor(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           (m.relative_attention_num_buckets, m.num_heads),
                           ((stack, "relpos_bias", "embedding"),)))
        rows += _attention([blk + "0.SelfAttention." + x for x in "qkvo"], s + ("attn",), m, False,
                           layers)
        rows += _layernorm(blk + "0.layer_norm", d, s + ("attn_norm",), False, layers)
        ff = 1
        if stack == "decoder":
            rows += _attention([blk + "1.EncDecAttention." + x for x in "qkvo"],
                               s + ("cross_attn",), m, False, layers)
            rows += _layernorm(blk + "1.layer_norm", d, s + ("cross_norm",), False, layers)
            ff = 2
        mlp = f"{blk}{ff}.DenseReluDense."
        if gated:  # wo(gelu(wi_0 x) * wi_1 x): wi_0 is our gate
            rows += _dense(mlp + "wi_0", f, d, s + ("mlp", "wi_gate"), False, layers)
            rows += _dense(mlp + "wi_1", f, d, s + ("mlp", "wi"), False, layers)
        else:
            rows += _dense(mlp + "wi", f, d, s + ("mlp", "wi"), False, layers)
        rows += _dense(mlp + "wo", d, f, s + ("mlp", "wo"), False, layers)
        rows += _layernorm(f"{blk}{ff}.layer_norm", d, s + ("mlp_norm",), False, layers)
        rows += _layernorm(f"{stack}.final_layer_norm", d, (stack, "final_norm"), False)
    if not m.tie_embeddings:
        # transformers 5 scales the decoder output by d_model**-0.5 whenever scale_decoder_outputs
        # is set, also before an untied head; ours scales only a tied head's input, so an untied
        # head holds the factor in its weights (the head is linear: the same logits).
        factor = m.d_model ** -0.5 if m.scale_decoder_output else 1.0
        rows.append(Tensor("lm_head.weight", (m.vocab_size, d), (("lm_head", "kernel"),), "linear",
                           factor=factor))
    return rows


T5 = Family(
    model_type="t5", architecture="T5ForConditionalGeneration", to_model=_t5_to_model,
    to_hf_config=_t5_to_hf, tensors=_t5_tensors, prefixes=("",), from_files=_t5_untie,
    # Old files repeat the shared table per stack; Hugging Face ignores a cross-attention bias.
    ignored=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
             "EncDecAttention.relative_attention_bias.weight"),
    represents=lambda m: m.family == "encoder_decoder" and m.position == "relative",
    data=dict(objective="span_corruption"), sentencepiece="spiece.model")


# ------------------------------------------------------------------------------------------------
# BART: post-LN encoder-decoder, learned positions with 2 offset rows, a LayerNorm on each stack's
# embeddings, exact GELU, biases everywhere, optional sqrt(d_model) embedding scale, a tied head
# and final_logits_bias (a buffer in Hugging Face, a parameter here). mBART's pre-LN variant
# (normalize_before, add_final_layer_norm) is a different model_type and refused here.

def _bart_to_model(hf: dict) -> dict:
    _need(hf, "activation_function", "gelu", "llmjax's BART uses exact (erf) GELU")
    for key in ("normalize_before", "add_final_layer_norm", "add_bias_logits",
                "static_position_embeddings"):
        _need(hf, key, False, "llmjax's BART is post-LN with learned positions (mBART is not "
              "supported)")
    _need(hf, "normalize_embedding", True, "llmjax's BART normalises its embeddings")
    _need(hf, "decoder_attention_heads", hf["encoder_attention_heads"],
          "llmjax uses one head count for both stacks")
    _need(hf, "decoder_ffn_dim", hf["encoder_ffn_dim"], "llmjax uses one MLP width for both stacks")
    layers, decoder_layers = hf["encoder_layers"], hf["decoder_layers"]
    d, n = hf["d_model"], hf["encoder_attention_heads"]
    return dict(family="encoder_decoder", vocab_size=hf["vocab_size"], d_model=d,
                num_layers=layers, num_decoder_layers=0 if decoder_layers == layers else decoder_layers,
                num_heads=n, head_dim=d // n, mlp_dim=hf["encoder_ffn_dim"],
                max_len=hf["max_position_embeddings"], position="learned", position_offset=2,
                norm="layernorm", norm_eps=1e-5, activation="gelu_exact", use_bias=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)), post_norm=True,
                final_logits_bias=True, scale_embeddings=bool(hf.get("scale_embedding", False)),
                dropout_rate=0.0)


def _bart_to_hf(m: ModelConfig) -> dict:
    _require(m, "BartForConditionalGeneration", norm="layernorm", norm_eps=1e-5, use_bias=True,
             post_norm=True, activation="gelu_exact", scale_attention=True, position_offset=2,
             scale_decoder_output=False, head_dim=m.d_model // m.num_heads)
    return dict(vocab_size=m.vocab_size, d_model=m.d_model, encoder_layers=m.num_layers,
                decoder_layers=m.decoder_layers, encoder_attention_heads=m.num_heads,
                decoder_attention_heads=m.num_heads, encoder_ffn_dim=m.mlp_dim,
                decoder_ffn_dim=m.mlp_dim, max_position_embeddings=m.max_len,
                activation_function="gelu", scale_embedding=m.scale_embeddings,
                tie_word_embeddings=m.tie_embeddings, dropout=m.dropout_rate, attention_dropout=0.0,
                activation_dropout=0.0, init_std=m.init_std, is_encoder_decoder=True)


def _bart_tensors(m: ModelConfig) -> list[Tensor]:
    d, f, v = m.d_model, m.mlp_dim, m.vocab_size
    rows = [Tensor("shared.weight", (v, d), (("token_embed", "embedding"),))]
    for stack, layers in (("encoder", m.num_layers), ("decoder", m.decoder_layers)):
        s, lyr = (stack, "layers"), f"{stack}.layers.{{i}}."
        rows.append(Tensor(f"{stack}.embed_positions.weight", (m.max_len + m.position_offset, d),
                           ((stack, "pos_embed", "embedding"),)))
        rows += _layernorm(f"{stack}.layernorm_embedding", d, (stack, "embed_norm"))
        proj = ("q_proj", "k_proj", "v_proj", "out_proj")
        rows += _attention([lyr + "self_attn." + x for x in proj], s + ("attn",), m, True, layers)
        rows += _layernorm(lyr + "self_attn_layer_norm", d, s + ("attn_norm",), layers=layers)
        if stack == "decoder":
            rows += _attention([lyr + "encoder_attn." + x for x in proj], s + ("cross_attn",), m,
                               True, layers)
            rows += _layernorm(lyr + "encoder_attn_layer_norm", d, s + ("cross_norm",),
                               layers=layers)
        rows += _dense(lyr + "fc1", f, d, s + ("mlp", "wi"), layers=layers)
        rows += _dense(lyr + "fc2", d, f, s + ("mlp", "wo"), layers=layers)
        rows += _layernorm(lyr + "final_layer_norm", d, s + ("mlp_norm",), layers=layers)
    if m.final_logits_bias:
        rows.append(Tensor("final_logits_bias", (1, v), (("final_logits_bias",),)))
    if not m.tie_embeddings:
        rows.append(Tensor("lm_head.weight", (v, d), (("lm_head", "kernel"),), "linear"))
    return rows


BART = Family(
    model_type="bart", architecture="BartForConditionalGeneration", to_model=_bart_to_model,
    to_hf_config=_bart_to_hf, tensors=_bart_tensors, prefixes=("model.", ""),
    heads=("lm_head", "final_logits_bias"),
    ignored=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    represents=lambda m: m.family == "encoder_decoder" and m.position == "learned",
    data=dict(objective="text_infilling", permute_sentences=1.0),
    tokenizer="BART's byte-level BPE (vocab.json + merges.txt)")
