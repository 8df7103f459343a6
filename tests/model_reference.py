"""Plain float64 numpy forward passes for the encoder and encoder-decoder families, one example
and one layer at a time, written from the papers (BERT, T5, BART) for the numerics tests."""

import math

import jax
import numpy as np

_erf = np.vectorize(math.erf)
ACT = {
    "gelu_exact": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0),
}
ACT["gated_gelu"] = ACT["gelu"]


def t5_bucket(rel, bidirectional, num_buckets, max_distance):
    """Mesh TensorFlow's _relative_position_bucket for one integer offset (key - query)."""
    ret, n = 0, -rel
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


def _norm(x, p, cfg):
    if cfg.norm == "layernorm":
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p.get("bias", 0.0)
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * p["scale"]


def _linear(x, p, n_in=1):
    y = np.tensordot(x, p["kernel"], axes=n_in)
    return y + p["bias"] if "bias" in p else y


def _attention(x, ctx, p, mask, bias, cfg):
    q, k, v = _linear(x, p["query"]), _linear(ctx, p["key"]), _linear(ctx, p["value"])
    logits = np.einsum("thd,shd->hts", q, k)
    if cfg.scale_attention:
        logits = logits / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    logits = np.where(mask[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return _linear(np.einsum("hts,shd->thd", probs, v), p["out"], n_in=2)


def _mlp(x, p, cfg):
    if "wi_gate" in p:
        return _linear(ACT[cfg.activation](_linear(x, p["wi_gate"])) * _linear(x, p["wi"]), p["wo"])
    return _linear(ACT[cfg.activation](_linear(x, p["wi"])), p["wo"])


def _stack(p, cfg, x, seg, pos, *, causal, ctx=None, ctx_seg=None, num_layers):
    t = len(seg)
    if "pos_embed" in p:
        x = x + p["pos_embed"]["embedding"][pos + cfg.position_offset]
    if "type_embed" in p:
        x = x + p["type_embed"]["embedding"][0]
    if "embed_norm" in p:
        x = _norm(x, p["embed_norm"], cfg)
    mask = (seg[:, None] == seg[None, :]) & (seg[None, :] != 0)
    if causal:
        mask &= np.tril(np.ones((t, t), bool))
    bias = None
    if "relpos_bias" in p:
        table = p["relpos_bias"]["embedding"]  # [buckets, heads]
        b = np.array([[t5_bucket(int(pos[j] - pos[i]), not causal, cfg.relative_attention_num_buckets,
                                 cfg.relative_attention_max_distance) for j in range(t)]
                      for i in range(t)])
        bias = table[b].transpose(2, 0, 1)
    cmask = None if ctx is None else (seg[:, None] == ctx_seg[None, :]) & (ctx_seg[None, :] != 0)

    def sub(x, norm_p, f):
        return _norm(x + f(x), norm_p, cfg) if cfg.post_norm else x + f(_norm(x, norm_p, cfg))

    for layer in range(num_layers):
        lp = jax.tree.map(lambda a: a[layer], p["layers"])
        x = sub(x, lp["attn_norm"], lambda h: _attention(h, h, lp["attn"], mask, bias, cfg))
        if ctx is not None:
            x = sub(x, lp["cross_norm"], lambda h: _attention(h, ctx, lp["cross_attn"], cmask, None, cfg))
        x = sub(x, lp["mlp_norm"], lambda h: _mlp(h, lp["mlp"], cfg))
    if "final_norm" in p:
        x = _norm(x, p["final_norm"], cfg)
    return x


def _f64(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def encoder_logits(params, cfg, tokens, seg, pos):
    """BERT / RoBERTa MLM logits for one example [t] -> [t, vocab]."""
    p = _f64(params)
    table = p["token_embed"]["embedding"]
    h = _stack(p["encoder"], cfg, table[tokens], seg, pos, causal=False, num_layers=cfg.num_layers)
    h = _norm(ACT[cfg.activation](_linear(h, p["mlm_transform"])), p["mlm_norm"], cfg)
    return h @ table.T + p["mlm_bias"]


def encoder_decoder_logits(params, cfg, tokens, seg, pos, dec_tokens, dec_seg, dec_pos):
    """T5 / BART logits for one example -> [t_dec, vocab]."""
    p = _f64(params)
    table = p["token_embed"]["embedding"]
    scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
    enc = _stack(p["encoder"], cfg, table[tokens] * scale, seg, pos, causal=False,
                 num_layers=cfg.num_layers)
    h = _stack(p["decoder"], cfg, table[dec_tokens] * scale, dec_seg, dec_pos, causal=True, ctx=enc,
               ctx_seg=seg, num_layers=cfg.decoder_layers)
    if "lm_head" in p:
        logits = _linear(h, p["lm_head"])
    else:
        logits = (h * (cfg.d_model ** -0.5 if cfg.scale_decoder_output else 1.0)) @ table.T
    return logits + p.get("final_logits_bias", 0.0)
